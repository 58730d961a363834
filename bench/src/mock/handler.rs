//! The request handler: routing, the misbehaviours every wire shares (resets, error
//! statuses, delays), and the OpenAI answers; the Anthropic and Gemini answers are in
//! their own modules.

use super::*;
use crate::mock::stream::{Pacing, Sse};
use crate::mock::{anthropic, gemini, media, realtime};

/// Returned from the service to make hyper drop the connection without
/// writing a response, which is how `reset` is simulated.
#[derive(Debug)]
pub(super) struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock reset")
    }
}

impl StdError for ResetConnection {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Route {
    Chat,
    Completions,
    Embeddings,
    Models,
    Echo,
    /// Anthropic `POST /v1/messages`.
    Messages,
    /// Anthropic `POST /v1/messages/count_tokens`.
    CountTokens,
    /// Gemini `POST .../models/{model}:generateContent`.
    Generate,
    /// Gemini `POST .../models/{model}:streamGenerateContent` (SSE with `alt=sse`).
    StreamGenerate,
    /// Gemini `POST .../models/{model}:countTokens`.
    GeminiCount,
    /// OpenAI Realtime `GET .../realtime?model=..`, a websocket upgrade.
    Realtime,
    /// OpenAI `POST .../images/generations`.
    Images,
    /// OpenAI `POST .../audio/transcriptions` (multipart).
    Transcriptions,
    /// OpenAI `POST .../audio/translations` (multipart).
    Translations,
    /// OpenAI `POST .../audio/speech`.
    Speech,
}

impl Route {
    pub(super) fn wire(self) -> WireFormat {
        match self {
            Route::Messages | Route::CountTokens => WireFormat::Anthropic,
            Route::Generate | Route::StreamGenerate | Route::GeminiCount => WireFormat::Gemini,
            Route::Realtime => WireFormat::Realtime,
            _ => WireFormat::OpenAi,
        }
    }
}

/// Routes on the path suffix so base URLs with or without `/v1` both work (Anthropic
/// paths must keep their `/v1`, so OpenAI's `/threads/{id}/messages` stays an echo).
/// Azure OpenAI's `/openai/deployments/{d}/chat/completions` and `/openai/v1/...` end
/// like OpenAI's.
pub(super) fn route(method: &Method, path: &str) -> Route {
    let path = path.trim_end_matches('/');
    let post = method == Method::POST;
    let gemini = post && path.contains("/models/");
    if post && (path == "/messages" || path.ends_with("/v1/messages")) {
        Route::Messages
    } else if post && path.ends_with("/v1/messages/count_tokens") {
        Route::CountTokens
    } else if gemini && path.ends_with(":generateContent") {
        Route::Generate
    } else if gemini && path.ends_with(":streamGenerateContent") {
        Route::StreamGenerate
    } else if gemini && path.ends_with(":countTokens") {
        Route::GeminiCount
    } else if method == Method::GET && path.ends_with("/realtime") {
        Route::Realtime
    } else if post && path.ends_with("/images/generations") {
        Route::Images
    } else if post && path.ends_with("/audio/transcriptions") {
        Route::Transcriptions
    } else if post && path.ends_with("/audio/translations") {
        Route::Translations
    } else if post && path.ends_with("/audio/speech") {
        Route::Speech
    } else if post && path.ends_with("/chat/completions") {
        Route::Chat
    } else if post && path.ends_with("/completions") {
        Route::Completions
    } else if post && path.ends_with("/embeddings") {
        Route::Embeddings
    } else if method == Method::GET && path.ends_with("/models") {
        Route::Models
    } else {
        Route::Echo
    }
}

/// An error answer with `status` in the wire's own shape.
fn wire_error(wire: WireFormat, status: StatusCode, msg: &str) -> Response<MockBody> {
    match wire {
        WireFormat::OpenAi | WireFormat::Realtime => error_response(status, msg),
        WireFormat::Anthropic => anthropic::error_response(status, msg),
        WireFormat::Gemini => gemini::error_response(status, msg),
    }
}

/// What the Anthropic and Gemini answers need from the common part of [`handle`].
pub(super) struct Call {
    pub(super) shared: Arc<Shared>,
    /// The server default with the request's `x-mock` / `x_mock` laid over it.
    pub(super) b: Behaviour,
    pub(super) mode: UsageMode,
    /// The body, when it parsed as JSON.
    pub(super) json: Option<Value>,
    /// The prompt-token rule every wire shares: request body bytes / 4 + 1.
    pub(super) prompt_tokens: u64,
    pub(super) path: String,
    pub(super) query: Option<String>,
    /// `echo_auth_in_header` and `response_headers`, for 2xx answers.
    pub(super) extra_headers: Vec<(String, String)>,
}

impl Call {
    pub(super) fn pacing(&self) -> Pacing {
        Pacing::new(&self.b)
    }

    pub(super) fn error_message(&self) -> String {
        self.b
            .error_message
            .clone()
            .unwrap_or_else(|| "mock upstream error".to_owned())
    }

    pub(super) fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) async fn delay(&self) {
        if let Some(ms) = self.b.delay_ms {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// A 200 JSON answer with the request-id header `id_header` and the extra headers.
    pub(super) fn ok_json(
        &self,
        body: &Value,
        id_header: &'static str,
        n: u64,
    ) -> Response<MockBody> {
        let body = serde_json::to_vec(body).expect("serialising mock response");
        let mut resp = json_response(StatusCode::OK, body);
        resp.headers_mut().insert(id_header, request_id(n));
        add_success_headers(resp.headers_mut(), &self.extra_headers);
        resp
    }

    /// The head of a streamed answer whose body `rx` is fed by a spawned job.
    pub(super) fn stream(
        &self,
        rx: mpsc::Receiver<wire::Item>,
        content_type: &'static str,
        id_header: &'static str,
        n: u64,
    ) -> Response<MockBody> {
        stream_head(rx, content_type, id_header, n, &self.extra_headers)
    }
}

fn stream_head(
    rx: mpsc::Receiver<wire::Item>,
    content_type: &'static str,
    id_header: &'static str,
    n: u64,
    extra: &[(String, String)],
) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::Chan(rx));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(id_header, request_id(n));
    add_success_headers(h, extra);
    resp
}

/// Counts a request out of [`Shared::in_flight`] however the handler ends.
struct InFlightGuard(Arc<Shared>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(super) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    conn: u64,
    reset: Arc<AtomicBool>,
) -> Result<Response<MockBody>, ResetConnection> {
    let (mut parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Err(ResetConnection),
    };
    let path = parts.uri.path();
    // The connection counts, for a benchmark whose mock runs in another process. Not
    // recorded, so tests reading `requests()` do not see it.
    if parts.method == Method::GET && path == "/mock/stats" {
        let stats = serde_json::to_vec(&shared.connection_stats()).unwrap_or_default();
        return Ok(json_response(StatusCode::OK, stats));
    }
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.peak_in_flight.fetch_max(now, Ordering::SeqCst);
    let _counted = InFlightGuard(shared.clone());
    let auth = ["authorization", "x-api-key", "api-key", "x-goog-api-key"]
        .iter()
        .find_map(|h| parts.headers.get(*h))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .or_else(|| gemini::query_key(parts.uri.query()))
        .unwrap_or_default();
    let route = route(&parts.method, path);
    let wire = route.wire();
    if shared.record.load(Ordering::Relaxed) {
        let rec = RecordedRequest {
            method: parts.method.to_string(),
            path: path.to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
            conn,
        };
        shared.requests.lock().unwrap().push(rec);
    }

    let is_post = parts.method == Method::POST;
    let multipart = matches!(route, Route::Transcriptions | Route::Translations);
    let json: Option<Value> = if body.is_empty() || multipart {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) if is_post => {
                return Ok(wire_error(
                    wire,
                    StatusCode::BAD_REQUEST,
                    &format!("We could not parse the JSON body of your request. ({e})"),
                ))
            }
            Err(_) => None,
        }
    };

    let base = shared.default.read().unwrap().clone();
    let mut b = (*base).clone();
    if let Some(h) = parts.headers.get("x-mock") {
        match serde_json::from_slice::<Behaviour>(h.as_bytes()) {
            Ok(over) => b = b.overlay(over),
            Err(e) => {
                let msg = format!("invalid x-mock header: {e}");
                return Ok(wire_error(wire, StatusCode::BAD_REQUEST, &msg));
            }
        }
    }
    if let Some(x) = json.as_ref().and_then(|v| v.get("x_mock")) {
        match Behaviour::deserialize(x) {
            Ok(over) => b = b.overlay(over),
            Err(e) => {
                let msg = format!("invalid x_mock: {e}");
                return Ok(wire_error(wire, StatusCode::BAD_REQUEST, &msg));
            }
        }
    }
    let mode = match UsageMode::parse(b.usage.as_deref()) {
        Ok(m) => m,
        Err(msg) => return Ok(wire_error(wire, StatusCode::BAD_REQUEST, &msg)),
    };
    let delay = b.delay_ms.map(Duration::from_millis);

    if b.reset_after_body {
        // The body has been read in full and the request recorded above.
        reset.store(true, Ordering::SeqCst);
        return Err(ResetConnection);
    }
    if b.reset {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        return Err(ResetConnection);
    }
    // The provider's own header checks come before anything the request asked for.
    let refused = match wire {
        WireFormat::OpenAi | WireFormat::Realtime => None,
        WireFormat::Anthropic => anthropic::check_headers(&parts.headers),
        WireFormat::Gemini => gemini::check_key(&parts.headers, parts.uri.query()),
    };
    if let Some(resp) = refused {
        return Ok(resp);
    }
    if route == Route::Realtime {
        // Its own checks (credential, then `status`), then the 101.
        return Ok(realtime::upgrade(shared, &mut parts, b));
    }
    if let Some(code) = b.status {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut msg = b
            .error_message
            .clone()
            .unwrap_or_else(|| "mock upstream error".to_owned());
        if b.echo_auth_in_error {
            msg.push_str(&format!(" (key: {auth})"));
        }
        return Ok(wire_error(wire, status, &msg));
    }

    if b.error_body_200 {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let msg = b.error_message.as_deref().unwrap_or("mock upstream error");
        let body = match wire {
            WireFormat::OpenAi | WireFormat::Realtime => {
                wire::error_json(msg, "server_error", None)
            }
            WireFormat::Anthropic => anthropic::error_json("api_error", msg),
            WireFormat::Gemini => gemini::error_json(StatusCode::INTERNAL_SERVER_ERROR, msg),
        };
        return Ok(json_response(StatusCode::OK, body));
    }

    let extra_headers = success_headers(&b, &auth);
    let prompt_tokens = body.len() as u64 / 4 + 1;
    if wire != WireFormat::OpenAi {
        let call = Call {
            shared,
            b,
            mode,
            json,
            prompt_tokens,
            path: path.to_owned(),
            query: parts.uri.query().map(str::to_owned),
            extra_headers,
        };
        return Ok(match wire {
            WireFormat::Anthropic => anthropic::answer(call, route).await,
            _ => gemini::answer(call, route).await,
        });
    }
    if matches!(
        route,
        Route::Images | Route::Transcriptions | Route::Translations | Route::Speech
    ) {
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let call = Call {
            shared,
            b,
            mode,
            json,
            prompt_tokens,
            path: path.to_owned(),
            query: parts.uri.query().map(str::to_owned),
            extra_headers,
        };
        return Ok(media::answer(call, route, &body, content_type.as_deref()).await);
    }
    let obj = json.as_ref().and_then(Value::as_object);
    if matches!(route, Route::Chat | Route::Completions | Route::Embeddings) && obj.is_none() {
        return Ok(bad_request("the request body must be a JSON object"));
    }
    let model = obj
        .and_then(|o| o.get("model"))
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let user = obj
        .and_then(|o| o.get("user"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let cached = b.cached_tokens.unwrap_or(0);
    let chunks = b.chunks.unwrap_or(3);
    let created = unix_now();

    let stream = obj.and_then(|o| o.get("stream")).and_then(Value::as_bool) == Some(true);
    if stream && matches!(route, Route::Chat | Route::Completions) {
        let include_usage = obj
            .and_then(|o| o.get("stream_options"))
            .and_then(|s| s.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let pacing = Pacing::new(&b);
        let (sse, rx) = Sse::new(shared);
        let job = StreamJob {
            sse,
            pacing,
            chat: route == Route::Chat,
            id: if route == Route::Chat {
                format!("chatcmpl-mock-{n}")
            } else {
                format!("cmpl-mock-{n}")
            },
            created,
            model,
            chunks,
            error_message: b
                .error_message
                .unwrap_or_else(|| "mock upstream error".to_owned()),
            mode,
            include_usage,
            prompt_tokens,
            cached,
            omit_done: b.omit_done,
            user,
        };
        tokio::spawn(job.run());
        return Ok(stream_head(
            rx,
            "text/event-stream",
            "x-request-id",
            n,
            &extra_headers,
        ));
    }

    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let usage = (mode != UsageMode::None).then(|| Usage::new(prompt_tokens, chunks, cached));
    let body = match route {
        Route::Chat | Route::Completions => {
            let content = content_text(chunks);
            let out = if route == Route::Chat {
                serde_json::to_vec(&ChatCompletion {
                    id: &format!("chatcmpl-mock-{n}"),
                    object: "chat.completion",
                    created,
                    model: &model,
                    choices: [ChatChoice {
                        index: 0,
                        message: Message {
                            role: "assistant",
                            content: &content,
                        },
                        finish_reason: "stop",
                        logprobs: (),
                    }],
                    usage,
                })
            } else {
                serde_json::to_vec(&TextCompletion {
                    id: &format!("cmpl-mock-{n}"),
                    object: "text_completion",
                    created,
                    model: &model,
                    choices: [TextChoice {
                        text: &content,
                        index: 0,
                        logprobs: (),
                        finish_reason: Some("stop"),
                    }],
                    usage,
                })
            };
            if usage.is_some() {
                shared.record_served(ServedUsage {
                    model: model.clone(),
                    prompt_tokens,
                    completion_tokens: u64::from(chunks),
                    cached_tokens: cached,
                    stream: false,
                    user: user.clone(),
                    ..ServedUsage::default()
                });
            }
            out
        }
        Route::Embeddings => {
            let obj = obj.expect("checked above");
            let count = match obj.get("input") {
                Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => 1,
                Some(Value::Array(a)) => a.len(),
                Some(_) => 1,
                None => return Ok(bad_request("you must provide an input parameter")),
            };
            let base64 = obj.get("encoding_format").and_then(Value::as_str) == Some("base64");
            let data: Vec<Value> = (0..count)
                .map(|i| {
                    let v = embedding(i);
                    let embedding = if base64 {
                        let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                        Value::from(base64_encode(&raw))
                    } else {
                        Value::from(v.to_vec())
                    };
                    serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
                })
                .collect();
            let mut out = serde_json::json!({"object": "list", "data": data, "model": model});
            if mode != UsageMode::None {
                out["usage"] = serde_json::json!({
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens,
                });
                shared.record_served(ServedUsage {
                    model: model.clone(),
                    prompt_tokens,
                    completion_tokens: 0,
                    cached_tokens: 0,
                    stream: false,
                    user: user.clone(),
                    ..ServedUsage::default()
                });
            }
            serde_json::to_vec(&out)
        }
        Route::Models => serde_json::to_vec(&serde_json::json!({
            "object": "list",
            "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}],
        })),
        // Echo; the Anthropic and Gemini routes were answered above.
        _ => serde_json::to_vec(&serde_json::json!({
            "object": "echo",
            "path": path,
            "method": parts.method.as_str(),
        })),
    }
    .expect("serialising mock response");
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut().insert("x-request-id", request_id(n));
    add_success_headers(resp.headers_mut(), &extra_headers);
    Ok(resp)
}

/// The headers `echo_auth_in_header` and `response_headers` add to a 2xx.
fn success_headers(b: &Behaviour, auth: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if b.echo_auth_in_header {
        let key = auth.strip_prefix("Bearer ").unwrap_or(auth);
        let tail = &key[key.len().saturating_sub(8)..];
        out.push(("x-debug-auth".to_owned(), auth.to_owned()));
        out.push(("openai-debug-auth".to_owned(), auth.to_owned()));
        out.push(("openai-debug-key-tail".to_owned(), format!("sk-...{tail}")));
        out.push(("x-internal-thing".to_owned(), "1".to_owned()));
    }
    if let Some(extra) = &b.response_headers {
        out.extend(extra.iter().map(|(n, v)| (n.clone(), v.clone())));
    }
    out
}

pub(super) fn add_success_headers(h: &mut http::HeaderMap, extra: &[(String, String)]) {
    for (name, value) in extra {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            h.append(n, v);
        }
    }
}

pub(super) fn request_id(n: u64) -> HeaderValue {
    HeaderValue::try_from(format!("req_mock_{n}")).expect("ascii request id")
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_on_suffix() {
        assert!(route(&Method::POST, "/v1/chat/completions") == Route::Chat);
        assert!(route(&Method::POST, "/chat/completions") == Route::Chat);
        assert!(route(&Method::POST, "/openai/v1/completions") == Route::Completions);
        assert!(route(&Method::POST, "/v1/embeddings") == Route::Embeddings);
        assert!(route(&Method::GET, "/v1/models") == Route::Models);
        assert!(route(&Method::GET, "/v1/chat/completions") == Route::Echo);
        assert!(route(&Method::POST, "/v1/other") == Route::Echo);
        assert!(route(&Method::POST, "/openai/deployments/d1/chat/completions") == Route::Chat);
        assert!(route(&Method::POST, "/openai/v1/chat/completions") == Route::Chat);
    }

    #[test]
    fn routes_anthropic_and_gemini() {
        assert_eq!(route(&Method::POST, "/v1/messages"), Route::Messages);
        assert_eq!(
            route(&Method::POST, "/anthropic/v1/messages"),
            Route::Messages
        );
        assert_eq!(
            route(&Method::POST, "/v1/messages/count_tokens"),
            Route::CountTokens
        );
        assert_eq!(route(&Method::POST, "/v1/threads/t1/messages"), Route::Echo);
        assert_eq!(route(&Method::GET, "/v1/messages"), Route::Echo);
        assert_eq!(
            route(&Method::POST, "/v1beta/models/gemini-x:generateContent"),
            Route::Generate
        );
        assert_eq!(
            route(
                &Method::POST,
                "/v1beta/models/gemini-x:streamGenerateContent"
            ),
            Route::StreamGenerate
        );
        assert_eq!(
            route(&Method::POST, "/v1beta/models/gemini-x:countTokens"),
            Route::GeminiCount
        );
        assert_eq!(Route::Messages.wire(), WireFormat::Anthropic);
        assert_eq!(Route::StreamGenerate.wire(), WireFormat::Gemini);
        assert_eq!(Route::Chat.wire(), WireFormat::OpenAi);
    }

    #[test]
    fn routes_realtime_images_and_audio() {
        assert_eq!(route(&Method::GET, "/v1/realtime"), Route::Realtime);
        assert_eq!(route(&Method::POST, "/v1/realtime"), Route::Echo);
        assert_eq!(
            route(&Method::POST, "/v1/images/generations"),
            Route::Images
        );
        assert_eq!(
            route(&Method::POST, "/v1/audio/transcriptions"),
            Route::Transcriptions
        );
        assert_eq!(
            route(&Method::POST, "/openai/v1/audio/translations"),
            Route::Translations
        );
        assert_eq!(route(&Method::POST, "/v1/audio/speech"), Route::Speech);
        assert_eq!(Route::Realtime.wire(), WireFormat::Realtime);
        assert_eq!(Route::Speech.wire(), WireFormat::OpenAi);
    }
}
