//! The mock's OpenAI Realtime websocket over real loopback TCP (tokio-tungstenite as the
//! client, 127.0.0.1 only): the handshake, the credential check, the exact event
//! sequences and usage of text and audio responses, per-response `x_mock`, the
//! misbehaviours and the open-session counter.

use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tollgate_bench::mock::{Behaviour, MockServer, ServedUsage, WireFormat};

const T: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

/// Opens `/v1/realtime?model=gpt-realtime` with the given extra headers.
async fn open(
    m: &MockServer,
    headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    WsError,
> {
    let url = format!("ws://{}/v1/realtime?model=gpt-realtime", m.addr());
    let mut req = url.into_client_request().unwrap();
    for (n, v) in headers {
        req.headers_mut().insert(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let tcp = TcpStream::connect(m.addr()).await.unwrap();
    timeout(T, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("handshake timed out")
}

const AUTH: (&str, &str) = ("authorization", "Bearer sk-channel-key");

/// Opens a session with a bearer key and reads its `session.created`.
async fn connect(m: &MockServer) -> (Ws, Value) {
    let (mut ws, _) = open(m, &[AUTH]).await.expect("handshake");
    let created = next_event(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    (ws, created)
}

/// The next text frame as JSON.
async fn next_event(ws: &mut Ws) -> Value {
    for _ in 0..10 {
        match timeout(T, ws.next()).await.expect("event timed out") {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text event, got {other:?}"),
        }
    }
    panic!("no text event in 10 frames");
}

async fn send(ws: &mut Ws, ev: Value) {
    ws.send(Message::text(ev.to_string())).await.unwrap();
}

/// Every event up to and including `response.done`.
async fn until_done(ws: &mut Ws) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..100 {
        let ev = next_event(ws).await;
        let done = ev["type"] == "response.done";
        out.push(ev);
        if done {
            return out;
        }
    }
    panic!("no response.done in 100 events: {out:?}");
}

fn types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).collect()
}

fn user_text(text: &str) -> Value {
    json!({
        "type": "conversation.item.create",
        "item": {"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": text}]},
    })
}

/// The usage object the mock documents.
fn usage(text_in: u64, audio_in: u64, cached: u64, text_out: u64, audio_out: u64) -> Value {
    json!({
        "total_tokens": text_in + audio_in + text_out + audio_out,
        "input_tokens": text_in + audio_in,
        "output_tokens": text_out + audio_out,
        "input_token_details": {
            "text_tokens": text_in,
            "audio_tokens": audio_in,
            "image_tokens": 0,
            "cached_tokens": cached,
            "cached_tokens_details": {"text_tokens": cached, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
    })
}

/// Waits (bounded) until the mock counts `n` open sessions.
async fn sessions_become(m: &MockServer, n: u64) {
    for _ in 0..200 {
        if m.realtime_sessions() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "realtime sessions stayed at {} (wanted {n})",
        m.realtime_sessions()
    );
}

/// The next read after a cut connection: an error or the end, never a close frame or
/// another event.
async fn assert_cut(ws: &mut Ws) {
    match timeout(T, ws.next())
        .await
        .expect("read after the cut timed out")
    {
        None | Some(Err(_)) => {}
        other => panic!("expected the connection to be cut, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_selects_realtime_and_records_the_upgrade() {
    let m = MockServer::start().await;
    let (mut ws, resp) = open(
        &m,
        &[
            AUTH,
            (
                "sec-websocket-protocol",
                "realtime, openai-beta.realtime-v1",
            ),
        ],
    )
    .await
    .expect("handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "realtime");
    assert_eq!(resp.headers()["upgrade"], "websocket");
    let created = next_event(&mut ws).await;
    assert_eq!(created["type"], "session.created");
    assert_eq!(created["event_id"], "evt_mock_1");
    assert_eq!(created["session"]["model"], "gpt-realtime");
    assert_eq!(created["session"]["type"], "realtime");
    assert_eq!(created["session"]["output_modalities"], json!(["text"]));
    assert!(created["session"]["id"]
        .as_str()
        .unwrap()
        .starts_with("sess_mock_"));

    let reqs = m.requests();
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.method, "GET");
    assert_eq!(r.path, "/v1/realtime");
    assert_eq!(r.query.as_deref(), Some("model=gpt-realtime"));
    assert_eq!(r.header("authorization"), Some("Bearer sk-channel-key"));
    assert_eq!(
        r.header("sec-websocket-protocol"),
        Some("realtime, openai-beta.realtime-v1")
    );
    assert!(r.body.is_empty());

    // Without a subprotocol offered, none is selected.
    let (mut ws2, resp) = open(&m, &[AUTH]).await.expect("handshake");
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    assert_eq!(next_event(&mut ws2).await["type"], "session.created");
    let reqs = m.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].header("sec-websocket-protocol"), None);
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn missing_credential_is_401_and_status_refuses_the_upgrade() {
    let m = MockServer::start().await;
    // The browsers' subprotocol credential is not a credential to the provider.
    let err = open(
        &m,
        &[(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-browser",
        )],
    )
    .await
    .unwrap_err();
    let WsError::Http(resp) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let err = open(
        &m,
        &[
            AUTH,
            ("x-mock", r#"{"status": 503, "error_message": "busy"}"#),
        ],
    )
    .await
    .unwrap_err();
    let WsError::Http(resp) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
    assert_eq!(
        body,
        json!({"error": {"message": "busy", "type": "server_error", "param": null, "code": null}})
    );

    // A server default refuses the same way.
    m.set_default(Behaviour {
        status: Some(429),
        ..Behaviour::default()
    });
    let err = open(&m, &[AUTH]).await.unwrap_err();
    let WsError::Http(resp) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);

    assert_eq!(m.requests().len(), 3);
    assert_eq!(
        m.requests()[1].header("authorization"),
        Some("Bearer sk-channel-key")
    );
    assert_eq!(m.realtime_sessions(), 0);
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn a_plain_get_is_not_an_upgrade() {
    let m = MockServer::start().await;
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/v1/realtime?model=x", m.base_url()))
        .header("authorization", "Bearer k")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(m.realtime_sessions(), 0);
}

#[tokio::test]
async fn two_text_responses_in_one_session() {
    let m = MockServer::start().await;
    let (mut ws, _) = connect(&m).await;

    send(
        &mut ws,
        json!({"type": "session.update",
               "session": {"type": "realtime", "instructions": "be brief"}}),
    )
    .await;
    let updated = next_event(&mut ws).await;
    assert_eq!(updated["type"], "session.updated");
    assert_eq!(updated["session"]["instructions"], "be brief");
    assert_eq!(updated["session"]["model"], "gpt-realtime");

    // 12 bytes of input_text: 12 / 4 + 1 = 4 input tokens.
    send(&mut ws, user_text("hello world!")).await;
    let added = next_event(&mut ws).await;
    assert_eq!(added["type"], "conversation.item.added");
    assert_eq!(added["item"]["id"], "item_mock_1");
    assert_eq!(added["item"]["status"], "completed");
    assert_eq!(added["item"]["content"][0]["text"], "hello world!");
    assert_eq!(added["previous_item_id"], Value::Null);
    let done = next_event(&mut ws).await;
    assert_eq!(done["type"], "conversation.item.done");
    assert_eq!(done["item"]["id"], "item_mock_1");

    send(&mut ws, json!({"type": "response.create"})).await;
    let events = until_done(&mut ws).await;
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done",
        ]
    );
    assert_eq!(events[0]["response"]["id"], "resp_1");
    assert_eq!(events[0]["response"]["status"], "in_progress");
    let deltas: Vec<&str> = events[3..6]
        .iter()
        .map(|e| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, ["tok0 ", "tok1 ", "tok2 "]);
    for e in &events[1..9] {
        if e.get("item_id").is_some() {
            assert_eq!(e["item_id"], "item_mock_2");
            assert_eq!(e["response_id"], "resp_1");
        }
    }
    assert_eq!(events[6]["text"], "tok0 tok1 tok2 ");
    assert_eq!(events[8]["item"]["content"][0]["text"], "tok0 tok1 tok2 ");
    let r = &events[9]["response"];
    assert_eq!(r["id"], "resp_1");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["usage"], usage(4, 0, 0, 3, 0));
    // Event ids are unique and increasing within the session.
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[0], "evt_mock_5");
    assert_eq!(ids[9], "evt_mock_14");

    // 4 more bytes (16 in all: 5 tokens); this response's x_mock: 2 chunks, 2 cached.
    send(&mut ws, user_text("abcd")).await;
    assert_eq!(next_event(&mut ws).await["previous_item_id"], "item_mock_2");
    assert_eq!(next_event(&mut ws).await["type"], "conversation.item.done");
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"chunks": 2, "cached_tokens": 2}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert_eq!(events.len(), 9);
    let r = &events[8]["response"];
    assert_eq!(r["id"], "resp_2");
    assert_eq!(r["status"], "completed");
    assert_eq!(r["usage"], usage(5, 0, 2, 2, 0));

    // The x_mock was for that response only.
    send(&mut ws, json!({"type": "response.create"})).await;
    let events = until_done(&mut ws).await;
    assert_eq!(events[9]["response"]["usage"], usage(5, 0, 0, 3, 0));

    let base = ServedUsage {
        model: "gpt-realtime".into(),
        stream: true,
        wire: WireFormat::Realtime,
        ..ServedUsage::default()
    };
    assert_eq!(
        m.served(),
        vec![
            ServedUsage {
                prompt_tokens: 4,
                completion_tokens: 3,
                ..base.clone()
            },
            ServedUsage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cached_tokens: 2,
                ..base.clone()
            },
            ServedUsage {
                prompt_tokens: 5,
                completion_tokens: 3,
                ..base
            },
        ]
    );
    assert_eq!(m.chunks_sent(), 8);
}

#[tokio::test]
async fn audio_response_events_and_usage() {
    // The session's behaviour comes from the upgrade's x-mock header.
    let m = MockServer::start().await;
    let (mut ws, _) = open(&m, &[AUTH, ("x-mock", r#"{"realtime_audio_in": 10}"#)])
        .await
        .expect("handshake");
    assert_eq!(next_event(&mut ws).await["type"], "session.created");

    send(
        &mut ws,
        json!({"type": "response.create",
               "response": {"output_modalities": ["audio"]},
               "x_mock": {"chunks": 2, "realtime_audio_out": 30, "cached_tokens": 3}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_audio_transcript.delta",
            "response.output_audio.delta",
            "response.output_audio_transcript.delta",
            "response.output_audio.delta",
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done",
        ]
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(events[3]["delta"], "tok0 ");
    assert_eq!(
        b64.decode(events[4]["delta"].as_str().unwrap()).unwrap(),
        [0u8; 16]
    );
    assert_eq!(
        b64.decode(events[6]["delta"].as_str().unwrap()).unwrap(),
        [1u8; 16]
    );
    assert_eq!(events[8]["transcript"], "tok0 tok1 ");
    assert_eq!(events[2]["part"]["type"], "audio");
    assert_eq!(
        events[10]["item"]["content"][0],
        json!({"type": "output_audio", "transcript": "tok0 tok1 "})
    );
    let r = &events[11]["response"];
    assert_eq!(r["status"], "completed");
    assert_eq!(r["output_modalities"], json!(["audio"]));
    // No input_text yet: 0 / 4 + 1 = 1 text token, plus 10 audio; cached 3: 1 text, 2 audio.
    let mut want = usage(1, 10, 3, 2, 30);
    want["input_token_details"]["cached_tokens_details"] =
        json!({"text_tokens": 1, "audio_tokens": 2, "image_tokens": 0});
    assert_eq!(r["usage"], want);

    // The beta `modalities` field asks for audio too; a text response reports no audio out
    // even with the knob set.
    send(
        &mut ws,
        json!({"type": "response.create", "response": {"modalities": ["text", "audio"]},
               "x_mock": {"chunks": 1, "realtime_audio_out": 7}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert_eq!(events[3]["type"], "response.output_audio_transcript.delta");
    assert_eq!(
        events.last().unwrap()["response"]["usage"],
        usage(1, 10, 0, 1, 7)
    );
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"chunks": 1, "realtime_audio_out": 7}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert_eq!(events[3]["type"], "response.output_text.delta");
    assert_eq!(
        events.last().unwrap()["response"]["usage"],
        usage(1, 10, 0, 1, 0)
    );

    // session.update to audio makes audio the default.
    send(
        &mut ws,
        json!({"type": "session.update", "session": {"output_modalities": ["audio"]}}),
    )
    .await;
    let updated = next_event(&mut ws).await;
    assert_eq!(updated["session"]["output_modalities"], json!(["audio"]));
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"chunks": 1}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert_eq!(events[3]["type"], "response.output_audio_transcript.delta");

    let base = ServedUsage {
        model: "gpt-realtime".into(),
        stream: true,
        wire: WireFormat::Realtime,
        ..ServedUsage::default()
    };
    assert_eq!(
        m.served(),
        vec![
            ServedUsage {
                prompt_tokens: 11,
                completion_tokens: 32,
                cached_tokens: 3,
                audio_prompt_tokens: 10,
                audio_completion_tokens: 30,
                ..base.clone()
            },
            ServedUsage {
                prompt_tokens: 11,
                completion_tokens: 8,
                audio_prompt_tokens: 10,
                audio_completion_tokens: 7,
                ..base.clone()
            },
            ServedUsage {
                prompt_tokens: 11,
                completion_tokens: 1,
                audio_prompt_tokens: 10,
                ..base.clone()
            },
            ServedUsage {
                prompt_tokens: 11,
                completion_tokens: 1,
                audio_prompt_tokens: 10,
                ..base
            },
        ]
    );
}

#[tokio::test]
async fn error_after_fails_the_response_and_the_session_goes_on() {
    let m = MockServer::start().await;
    let (mut ws, _) = connect(&m).await;
    send(
        &mut ws,
        json!({"type": "response.create",
               "response": {"output_modalities": ["audio"]},
               "x_mock": {"error_after": 1, "chunks": 4, "realtime_audio_out": 40,
                          "error_message": "model fell over"}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_audio_transcript.delta",
            "response.output_audio.delta",
            "error",
            "response.done",
        ]
    );
    assert_eq!(events[5]["error"]["type"], "server_error");
    assert_eq!(events[5]["error"]["message"], "model fell over");
    let r = &events[6]["response"];
    assert_eq!(r["status"], "failed");
    assert_eq!(r["status_details"]["error"]["message"], "model fell over");
    // One of four chunks: 1 text token out and 40 * 1 / 4 = 10 audio tokens.
    assert_eq!(r["usage"], usage(1, 0, 0, 1, 10));

    // error_after 0: the error before any delta, no output billed.
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"error_after": 0}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert_eq!(
        types(&events),
        [
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "error",
            "response.done",
        ]
    );
    assert_eq!(events[4]["response"]["usage"], usage(1, 0, 0, 0, 0));

    send(&mut ws, json!({"type": "response.create"})).await;
    let events = until_done(&mut ws).await;
    assert_eq!(events[0]["response"]["id"], "resp_3");
    assert_eq!(events[9]["response"]["status"], "completed");

    let served = m.served();
    assert_eq!(served.len(), 3);
    assert_eq!(
        (
            served[0].prompt_tokens,
            served[0].completion_tokens,
            served[0].audio_completion_tokens
        ),
        (1, 11, 10)
    );
    assert_eq!(
        (served[1].prompt_tokens, served[1].completion_tokens),
        (1, 0)
    );
    assert_eq!(
        (served[2].prompt_tokens, served[2].completion_tokens),
        (1, 3)
    );
}

#[tokio::test]
async fn truncate_after_cuts_the_connection() {
    let m = MockServer::start().await;
    let (mut ws, _) = connect(&m).await;
    assert_eq!(m.realtime_sessions(), 1);
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"truncate_after": 2, "chunks": 5}}),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_event(&mut ws).await);
    }
    assert_eq!(
        types(&got),
        [
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
        ]
    );
    assert_cut(&mut ws).await;
    sessions_become(&m, 0).await;
    assert!(m.served().is_empty());
    assert_eq!(m.chunks_sent(), 2);
}

#[tokio::test]
async fn session_counter_follows_closes_and_drops() {
    let m = MockServer::start().await;
    assert_eq!(m.realtime_sessions(), 0);
    let (mut a, _) = connect(&m).await;
    let (b, _) = connect(&m).await;
    assert_eq!(m.realtime_sessions(), 2);

    // A close frame is answered with one, and the session ends.
    a.close(None).await.unwrap();
    let mut answered = false;
    for _ in 0..10 {
        match timeout(T, a.next()).await.expect("close answer timed out") {
            Some(Ok(Message::Close(_))) => answered = true,
            Some(Ok(other)) => panic!("unexpected frame after close: {other:?}"),
            None | Some(Err(WsError::ConnectionClosed)) => break,
            Some(Err(e)) => panic!("unclean close: {e}"),
        }
    }
    assert!(answered, "the mock answered the close frame");
    sessions_become(&m, 1).await;

    // A client that just goes away ends its session too.
    drop(b);
    sessions_become(&m, 0).await;

    // Dropping the server ends the sessions it still holds.
    let (mut c, _) = connect(&m).await;
    assert_eq!(m.realtime_sessions(), 1);
    drop(m);
    assert_cut(&mut c).await;
}

#[tokio::test]
async fn close_while_gated_ends_the_session_and_delays_are_real() {
    let m = MockServer::start().await;
    let (mut ws, _) = connect(&m).await;
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"gate": true}}),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_event(&mut ws).await);
    }
    assert_eq!(got[3]["delta"], "tok0 ");
    // Held at the gate: nothing more comes.
    assert!(timeout(Duration::from_millis(200), ws.next())
        .await
        .is_err());
    assert_eq!(m.chunks_sent(), 1);
    ws.close(None).await.unwrap();
    sessions_become(&m, 0).await;
    assert!(m.served().is_empty());

    // Gate open: a gated response flows; delay_ms spaces the chunks.
    m.open_gate();
    let (mut ws, _) = connect(&m).await;
    let start = Instant::now();
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"gate": true, "delay_ms": 60, "chunks": 3}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    assert!(start.elapsed() >= Duration::from_millis(180));
    assert_eq!(events.last().unwrap()["response"]["status"], "completed");
}

#[tokio::test]
async fn bad_client_events_get_error_events() {
    let m = MockServer::start().await;
    let (mut ws, _) = connect(&m).await;
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"chunkz": 1}}),
    )
    .await;
    let e = next_event(&mut ws).await;
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid x_mock"));
    ws.send(Message::text("not json")).await.unwrap();
    assert_eq!(
        next_event(&mut ws).await["error"]["type"],
        "invalid_request_error"
    );
    send(&mut ws, json!({"type": "no.such.event"})).await;
    assert_eq!(
        next_event(&mut ws).await["error"]["type"],
        "invalid_request_error"
    );
    // Audio input events are accepted; commit and clear are acknowledged.
    send(
        &mut ws,
        json!({"type": "input_audio_buffer.append", "audio": "AAAA"}),
    )
    .await;
    send(&mut ws, json!({"type": "input_audio_buffer.commit"})).await;
    let c = next_event(&mut ws).await;
    assert_eq!(c["type"], "input_audio_buffer.committed");
    assert_eq!(c["item_id"], "item_mock_1");
    send(&mut ws, json!({"type": "input_audio_buffer.clear"})).await;
    assert_eq!(
        next_event(&mut ws).await["type"],
        "input_audio_buffer.cleared"
    );
    // usage "none": response.done without usage, nothing recorded.
    send(
        &mut ws,
        json!({"type": "response.create", "x_mock": {"usage": "none", "chunks": 1}}),
    )
    .await;
    let events = until_done(&mut ws).await;
    let r = &events.last().unwrap()["response"];
    assert_eq!(r["status"], "completed");
    assert!(r.get("usage").is_none());
    assert!(m.served().is_empty());
}
