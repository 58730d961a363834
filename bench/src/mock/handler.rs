//! The request handler: routing, the JSON answers, the stream jobs and the misbehaviours.

use super::*;

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
    Embeddings,
    Models,
    Echo,
}

/// Routes on the path suffix so base URLs with or without `/v1` both work.
fn route(method: &Method, path: &str) -> Route {
    let path = path.trim_end_matches('/');
    let post = method == Method::POST;
    if post && path.ends_with("/chat/completions") {
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
    let (parts, body) = req.into_parts();
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
    let auth = ["authorization", "x-api-key", "api-key"]
        .iter()
        .find_map(|h| parts.headers.get(*h))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
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
    let json: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) if is_post => {
                return Ok(error_response(
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
            Err(e) => return Ok(bad_request(&format!("invalid x-mock header: {e}"))),
        }
    }
    if let Some(x) = json.as_ref().and_then(|v| v.get("x_mock")) {
        match Behaviour::deserialize(x) {
            Ok(over) => b = b.overlay(over),
            Err(e) => return Ok(bad_request(&format!("invalid x_mock: {e}"))),
        }
    }
    let mode = match UsageMode::parse(b.usage.as_deref()) {
        Ok(m) => m,
        Err(msg) => return Ok(bad_request(&msg)),
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
        return Ok(error_response(status, &msg));
    }

    if b.error_body_200 {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let msg = b.error_message.as_deref().unwrap_or("mock upstream error");
        return Ok(json_response(
            StatusCode::OK,
            wire::error_json(msg, "server_error", None),
        ));
    }

    let extra_headers = success_headers(&b, &auth);
    let route = route(&parts.method, path);
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
    let prompt_tokens = body.len() as u64 / 4 + 1;
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
        let (tx, rx) = mpsc::channel(8);
        let job = StreamJob {
            shared,
            tx,
            chat: route == Route::Chat,
            id: if route == Route::Chat {
                format!("chatcmpl-mock-{n}")
            } else {
                format!("cmpl-mock-{n}")
            },
            created,
            model,
            chunks,
            delay,
            truncate_after: b.truncate_after,
            error_after: b.error_after,
            error_message: b
                .error_message
                .unwrap_or_else(|| "mock upstream error".to_owned()),
            gate: b.gate,
            mode,
            include_usage,
            prompt_tokens,
            cached,
            omit_done: b.omit_done,
            malformed_after: b.malformed_after,
            big_line_bytes: b.big_line_bytes,
            user,
        };
        tokio::spawn(job.run());
        let mut resp = Response::new(MockBody::Chan(rx));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-request-id", request_id(n));
        add_success_headers(h, &extra_headers);
        return Ok(resp);
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
                });
            }
            serde_json::to_vec(&out)
        }
        Route::Models => serde_json::to_vec(&serde_json::json!({
            "object": "list",
            "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}],
        })),
        Route::Echo => serde_json::to_vec(&serde_json::json!({
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

fn add_success_headers(h: &mut http::HeaderMap, extra: &[(String, String)]) {
    for (name, value) in extra {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            h.append(n, v);
        }
    }
}

fn request_id(n: u64) -> HeaderValue {
    HeaderValue::try_from(format!("req_mock_{n}")).expect("ascii request id")
}

fn unix_now() -> u64 {
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
    }
}
