//! OpenAI's Realtime API: `GET /v1/realtime?model=..` upgraded to a websocket (the GA
//! interface's event names), so the gateway's websocket relay, credential swap and
//! per-response billing can be tested.
//!
//! # The handshake
//!
//! The mock answers the upgrade itself: `101 Switching Protocols` with `Upgrade:
//! websocket`, `Connection: Upgrade`, the `Sec-WebSocket-Accept` derived from the key,
//! and `Sec-WebSocket-Protocol: realtime` when the client offered `realtime` (no other
//! subprotocol is ever selected). The upgrade request is recorded like every request.
//! Before upgrading, in this order: the server default and the `x-mock` header make the
//! [`Behaviour`]; `reset` drops the connection; `Authorization: Bearer <key>` is required
//! (else 401 with OpenAI's `invalid_api_key` error; the browsers' `openai-insecure-api-key.`
//! subprotocol is *not* accepted as a credential, so a gateway that forwards it instead of
//! a header is caught); `status` refuses with that status and an OpenAI error body; a
//! request that is not a websocket upgrade (no `Upgrade: websocket`, no
//! `Sec-WebSocket-Key`, version not 13, HTTP/2) gets 400.
//!
//! # Events
//!
//! On connect: `session.created` (`session.id` `sess_mock_<n>`, `session.model` from the
//! `model` query parameter, default `mock-realtime`). Then, per client event:
//!
//! - `session.update` → `session.updated` with the session's fields overlaid by the
//!   event's `session` object (`output_modalities` or `modalities` there set the
//!   session's default for later responses).
//! - `conversation.item.create` → `conversation.item.added` then `conversation.item.done`
//!   (GA names), the item given an `id` (`item_mock_<k>`) if it had none and `status`
//!   `completed`.
//! - `input_audio_buffer.append` → nothing; `input_audio_buffer.commit` →
//!   `input_audio_buffer.committed`; `input_audio_buffer.clear` → `input_audio_buffer.cleared`.
//! - `response.create` → a response (below). An `x_mock` object at the top level of the
//!   event is laid over the session's behaviour for that response only.
//! - anything else, a binary frame or unparsable JSON → an `error` event
//!   (`invalid_request_error`); the session goes on.
//!
//! A text response (the default; audio when the event's `response.output_modalities` or
//! `response.modalities` contains `"audio"`, else when the session's does):
//! `response.created` (`response.id` `resp_<n>`, n counting the session's responses from
//! 1; `status` `in_progress`), `response.output_item.added`, `response.content_part.added`,
//! `response.output_text.delta` × `chunks` (default 3; deltas `tok0 `, `tok1 `, ..),
//! `response.output_text.done`, `response.content_part.done`, `response.output_item.done`,
//! `response.done` (`status` `completed`, with `usage`). An audio response has, per chunk,
//! `response.output_audio_transcript.delta` (`tok{i} `) then `response.output_audio.delta`
//! (base64 of 16 bytes of value `i`), and closes with `response.output_audio.done`,
//! `response.output_audio_transcript.done`, then the same three `done` events.
//!
//! # Usage
//!
//! `response.done`'s `response.usage`, for every response:
//!
//! - input text tokens = (bytes of the `text` of every `input_text` content part of the
//!   items the client created in this session so far) / 4 + 1;
//! - input audio tokens = `realtime_audio_in` (default 0);
//! - cached tokens = `cached_tokens` capped at the input tokens, taken from the text tokens
//!   first (`cached_tokens_details.text_tokens`), the rest from the audio tokens;
//! - output text tokens = the deltas sent (text deltas, or transcript deltas of an audio
//!   response);
//! - output audio tokens = `realtime_audio_out` (default 0) for an audio response that
//!   completed, `realtime_audio_out * sent / chunks` (rounded down) for one that failed
//!   after `sent` chunks, 0 for a text response;
//! - `input_tokens` = text + audio in, `output_tokens` = text + audio out,
//!   `total_tokens` = both.
//!
//! Each `response.done` that carries usage is recorded as one [`ServedUsage`] (wire
//! [`WireFormat::Realtime`], `stream: true`): `prompt_tokens` = `input_tokens`,
//! `completion_tokens` = `output_tokens`, `cached_tokens`, `audio_prompt_tokens` and
//! `audio_completion_tokens` (parts of the former two). `usage: "none"` drops the usage
//! object (and the record).
//!
//! # Misbehaviour per response
//!
//! `delay_ms` before every chunk; `gate` holds everything after the first chunk until
//! [`MockServer::open_gate`]; `error_after: N` sends, after N chunks, an `error` event
//! (`server_error`, `error_message`) then `response.done` with `status` `failed` and the
//! usage so far; `truncate_after: N` closes the TCP connection after N chunks, without a
//! close frame and without `response.done` (nothing recorded). While a response waits (delay
//! or gate), a close frame from the client still ends the session. A close frame is
//! answered with one, and the connection closed.

use std::collections::VecDeque;
use std::future::Future;

use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use serde_json::json;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::stream::Pacing;
use super::*;

mod response;

use response::modalities;

/// The model named when the upgrade request has no `model` query parameter.
const DEFAULT_MODEL: &str = "mock-realtime";

/// Bytes per `response.output_audio.delta` (before base64).
const AUDIO_DELTA_BYTES: usize = 16;

/// Answers an upgrade request: an error response, or the 101 with the session spawned
/// onto the upgraded connection. `b` is the server default with the `x-mock` header laid
/// over it.
pub(super) fn upgrade(
    shared: Arc<Shared>,
    parts: &mut http::request::Parts,
    b: Behaviour,
) -> Response<MockBody> {
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| !k.trim().is_empty());
    if !bearer {
        return error_response(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an \
             Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        );
    }
    if let Some(code) = b.status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let msg = b.error_message.as_deref().unwrap_or("mock upstream error");
        return error_response(status, msg);
    }
    let h = &parts.headers;
    let has = |name: header::HeaderName, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let key = h
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec());
    let version_ok = h
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let (Some(key), true, true, true) = (
        key,
        version_ok,
        has(header::UPGRADE, "websocket"),
        has(header::CONNECTION, "upgrade"),
    ) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "the Realtime API is a websocket: send a websocket upgrade \
             (Upgrade: websocket, Sec-WebSocket-Key, Sec-WebSocket-Version: 13)",
        );
    };
    let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded (HTTP/1.1 only)",
        );
    };
    let realtime = has(header::SEC_WEBSOCKET_PROTOCOL, "realtime");
    let model = parts
        .uri
        .query()
        .and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("model="))
                .map(str::to_owned)
        })
        .unwrap_or_else(|| DEFAULT_MODEL.to_owned());

    let mut resp = Response::new(MockBody::Full(None));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let out = resp.headers_mut();
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    out.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    out.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::try_from(derive_accept_key(&key)).expect("base64 accept key"),
    );
    if realtime {
        out.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("realtime"),
        );
    }

    let session_no = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let task_shared = shared.clone();
    let task = async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let _open = OpenSession::new(task_shared.clone());
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let mut s = Session {
            ws,
            shared: task_shared,
            base: b,
            model,
            session: Value::Null,
            audio: false,
            events: 0,
            responses: 0,
            items: 0,
            input_text_bytes: 0,
            last_item: None,
            pending: VecDeque::new(),
        };
        s.session = json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": format!("sess_mock_{session_no}"),
            "model": s.model,
            "output_modalities": ["text"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
        });
        s.run().await;
    };
    let mut tasks = shared.realtime_tasks.lock().unwrap();
    while tasks.try_join_next().is_some() {}
    tasks.spawn(task);
    resp
}

/// Counts a session in [`Shared::realtime_open`] while it lives, however it ends.
struct OpenSession(Arc<Shared>);

impl OpenSession {
    fn new(shared: Arc<Shared>) -> OpenSession {
        shared.realtime_open.fetch_add(1, Ordering::SeqCst);
        OpenSession(shared)
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.realtime_open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The session is over: the client closed or went away, or the mock cut it.
struct End;

struct Session {
    ws: WebSocketStream<TokioIo<Upgraded>>,
    shared: Arc<Shared>,
    /// The server default with the upgrade request's `x-mock` header over it.
    base: Behaviour,
    model: String,
    /// The session object `session.created` and `session.updated` carry.
    session: Value,
    /// The session's output modalities include audio (`session.update`).
    audio: bool,
    /// Server events sent, for `event_id`s.
    events: u64,
    /// Responses started, for `response.id`s.
    responses: u64,
    /// Items the mock named, for item ids.
    items: u64,
    /// Bytes of `input_text` the client has sent in conversation items.
    input_text_bytes: u64,
    /// The id of the last item added, for `previous_item_id`.
    last_item: Option<String>,
    /// Client frames that arrived while a response was waiting, handled after it.
    pending: VecDeque<Message>,
}

impl Session {
    async fn run(mut self) {
        let created = json!({"type": "session.created", "session": self.session.clone()});
        if self.send(created).await.is_err() {
            return;
        }
        loop {
            let msg = match self.pending.pop_front() {
                Some(m) => m,
                None => match self.ws.next().await {
                    Some(Ok(m)) => m,
                    _ => return,
                },
            };
            let handled = match msg {
                Message::Text(t) => self.on_event(t.as_str()).await,
                Message::Binary(_) => {
                    self.client_error("binary frames are not supported; send JSON text events")
                        .await
                }
                Message::Close(_) => {
                    self.closed_by_client().await;
                    return;
                }
                _ => Ok(()),
            };
            if handled.is_err() {
                return;
            }
        }
    }

    /// The client sent a close frame: tungstenite has queued the reply; flush it and
    /// let the connection end (bounded, so a client that never reads cannot pin us).
    async fn closed_by_client(&mut self) {
        let drain = async {
            let _ = self.ws.flush().await;
            while let Some(Ok(_)) = self.ws.next().await {}
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }

    fn event_id(&mut self) -> String {
        self.events += 1;
        format!("evt_mock_{}", self.events)
    }

    fn item_id(&mut self) -> String {
        self.items += 1;
        format!("item_mock_{}", self.items)
    }

    async fn send(&mut self, mut event: Value) -> Result<(), End> {
        event["event_id"] = Value::from(self.event_id());
        let text = serde_json::to_string(&event).expect("serialising a realtime event");
        self.ws.send(Message::text(text)).await.map_err(|_| End)
    }

    async fn client_error(&mut self, message: &str) -> Result<(), End> {
        self.send(json!({
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "code": null,
                "message": message,
                "param": null,
                "event_id": null,
            },
        }))
        .await
    }

    /// Waits for `fut` while still reading the client: a close frame or a dropped
    /// connection ends the session; other frames wait in `pending`.
    async fn wait<F: Future>(&mut self, fut: F) -> Result<F::Output, End> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                msg = self.ws.next() => match msg {
                    Some(Ok(Message::Close(_))) => {
                        self.closed_by_client().await;
                        return Err(End);
                    }
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        self.pending.push_back(m)
                    }
                    Some(Ok(_)) => {}
                    _ => return Err(End),
                },
            }
        }
    }

    async fn on_event(&mut self, text: &str) -> Result<(), End> {
        let ev: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return self.client_error("an event must be a JSON object").await,
            Err(e) => {
                let msg = format!("the event is not valid JSON: {e}");
                return self.client_error(&msg).await;
            }
        };
        let kind = ev.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "session.update" => self.session_update(&ev).await,
            "conversation.item.create" => self.item_create(&ev).await,
            "input_audio_buffer.append" => Ok(()),
            "input_audio_buffer.commit" => {
                let item_id = self.item_id();
                let previous = self.last_item.replace(item_id.clone());
                self.send(json!({
                    "type": "input_audio_buffer.committed",
                    "previous_item_id": previous,
                    "item_id": item_id,
                }))
                .await
            }
            "input_audio_buffer.clear" => {
                self.send(json!({"type": "input_audio_buffer.cleared"}))
                    .await
            }
            "response.create" => self.respond(&ev).await,
            other => {
                let msg = format!("Invalid value: '{other}'. Unsupported event type.");
                self.client_error(&msg).await
            }
        }
    }

    async fn session_update(&mut self, ev: &Value) -> Result<(), End> {
        let Some(update) = ev.get("session").and_then(Value::as_object) else {
            return self
                .client_error("session.update needs a `session` object")
                .await;
        };
        for (k, v) in update {
            if !matches!(k.as_str(), "id" | "object" | "model") {
                self.session[k] = v.clone();
            }
        }
        if let Some(m) = modalities(update.get("output_modalities").or(update.get("modalities"))) {
            self.audio = m;
            self.session["output_modalities"] = match m {
                true => json!(["audio"]),
                false => json!(["text"]),
            };
        }
        let session = self.session.clone();
        self.send(json!({"type": "session.updated", "session": session}))
            .await
    }

    async fn item_create(&mut self, ev: &Value) -> Result<(), End> {
        let Some(mut item) = ev.get("item").filter(|i| i.is_object()).cloned() else {
            return self
                .client_error("conversation.item.create needs an `item` object")
                .await;
        };
        if let Some(parts) = item.get("content").and_then(Value::as_array) {
            for p in parts {
                if p.get("type").and_then(Value::as_str) == Some("input_text") {
                    let text = p.get("text").and_then(Value::as_str).unwrap_or("");
                    self.input_text_bytes += text.len() as u64;
                }
            }
        }
        if item.get("id").and_then(Value::as_str).is_none() {
            item["id"] = Value::from(self.item_id());
        }
        item["object"] = Value::from("realtime.item");
        item["status"] = Value::from("completed");
        let id = item["id"].as_str().unwrap_or_default().to_owned();
        let previous = self.last_item.replace(id);
        self.send(json!({
            "type": "conversation.item.added",
            "previous_item_id": previous,
            "item": item,
        }))
        .await?;
        self.send(json!({
            "type": "conversation.item.done",
            "previous_item_id": previous,
            "item": item,
        }))
        .await
    }
}
