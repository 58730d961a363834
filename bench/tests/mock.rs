//! Wire-level tests of the mock upstream. A raw HTTP/1.1 client is used on
//! purpose: it lets the tests see chunk boundaries, an unterminated chunked
//! body and a connection closed without a response, which a full client hides.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tollgate_bench::mock::{Behaviour, MockServer, ServedUsage};

const T: Duration = Duration::from_secs(10);

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

struct Conn {
    r: BufReader<TcpStream>,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Conn {
        let s = timeout(T, TcpStream::connect(addr)).await.unwrap().unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            r: BufReader::new(s),
        }
    }

    async fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!(
                "content-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        // One write, so Nagle + delayed ACK don't add ~40 ms per request.
        let mut buf = req.into_bytes();
        buf.extend_from_slice(body);
        self.r.get_mut().write_all(&buf).await.unwrap();
    }

    async fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        let n = self.r.read_line(&mut l).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(l.trim_end_matches(['\r', '\n']).to_owned())
    }

    async fn head(&mut self) -> io::Result<Head> {
        let status_line = self.line().await?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let l = self.line().await?;
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(Head { status, headers })
    }

    /// One HTTP chunk; `Ok(None)` on the terminating chunk, `Err` if the
    /// connection ends before it.
    async fn chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let size_line = self.line().await?;
        let size = usize::from_str_radix(size_line.trim(), 16)
            .map_err(|_| io::Error::other(format!("bad chunk size {size_line:?}")))?;
        if size == 0 {
            let trailer_end = self.line().await?;
            assert!(trailer_end.is_empty());
            return Ok(None);
        }
        let mut buf = vec![0; size + 2];
        self.r.read_exact(&mut buf).await?;
        assert_eq!(&buf[size..], b"\r\n");
        buf.truncate(size);
        Ok(Some(buf))
    }

    async fn body(&mut self, head: &Head) -> io::Result<Vec<u8>> {
        if head.chunked() {
            let mut out = Vec::new();
            while let Some(c) = self.chunk().await? {
                out.extend_from_slice(&c);
            }
            Ok(out)
        } else {
            let len: usize = head.header("content-length").unwrap().parse().unwrap();
            let mut buf = vec![0; len];
            self.r.read_exact(&mut buf).await?;
            Ok(buf)
        }
    }

    /// Reads a whole response; all HTTP chunks are returned separately too.
    async fn response(&mut self) -> (Head, Vec<u8>) {
        timeout(T, async {
            let head = self.head().await.unwrap();
            let body = self.body(&head).await.unwrap();
            (head, body)
        })
        .await
        .expect("response timed out")
    }
}

async fn post(addr: SocketAddr, path: &str, body: &Value) -> (Head, Vec<u8>, usize) {
    let bytes = serde_json::to_vec(body).unwrap();
    let mut c = Conn::connect(addr).await;
    c.send("POST", path, &[], &bytes).await;
    let (h, b) = c.response().await;
    (h, b, bytes.len())
}

fn prompt_tokens(body_len: usize) -> u64 {
    body_len as u64 / 4 + 1
}

/// Splits an SSE body into its `data:` payloads.
fn events(body: &[u8]) -> Vec<String> {
    let s = std::str::from_utf8(body).unwrap();
    assert!(s.ends_with("\n\n"), "body must end on an event boundary");
    s.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data: prefix").to_owned())
        .collect()
}

fn parsed(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn chat(stream: bool, include_usage: bool, x_mock: Value) -> Value {
    let mut v = json!({
        "model": "gpt-test",
        "messages": [{"role": "user", "content": "hello there"}],
        "x_mock": x_mock,
    });
    if stream {
        v["stream"] = json!(true);
    }
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v
}

#[tokio::test]
async fn json_chat_reports_deterministic_usage() {
    let m = MockServer::start().await;
    let (h, body, len) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(false, false, json!({"chunks": 5, "cached_tokens": 7})),
    )
    .await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-type"), Some("application/json"));
    assert_eq!(
        h.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap(),
        body.len()
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    let p = prompt_tokens(len);
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert!(v["created"].as_u64().unwrap() > 0);
    assert_eq!(v["model"], "gpt-test");
    assert_eq!(
        v["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "},
                "finish_reason": "stop", "logprobs": null}])
    );
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": p, "completion_tokens": 5, "total_tokens": p + 5,
               "prompt_tokens_details": {"cached_tokens": 7, "audio_tokens": 0},
               "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}})
    );
    assert_eq!(
        m.served(),
        vec![ServedUsage {
            model: "gpt-test".into(),
            prompt_tokens: p,
            completion_tokens: 5,
            cached_tokens: 7,
            stream: false,
            user: None,
            ..ServedUsage::default()
        }]
    );
    assert_eq!(m.chunks_sent(), 0);
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_usage_chunk_then_done() {
    let m = MockServer::start().await;
    let req = chat(true, true, json!({"chunks": 4}));
    let bytes = serde_json::to_vec(&req).unwrap();
    let mut c = Conn::connect(m.addr()).await;
    c.send("POST", "/v1/chat/completions", &[], &bytes).await;
    let head = timeout(T, c.head()).await.unwrap().unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert!(head.chunked());
    // Every SSE event must be its own HTTP chunk.
    let mut chunks = Vec::new();
    while let Some(ch) = timeout(T, c.chunk()).await.unwrap().unwrap() {
        let s = String::from_utf8(ch).unwrap();
        assert_eq!(events(s.as_bytes()).len(), 1, "one event per chunk: {s:?}");
        chunks.push(s);
    }
    let evs = events(chunks.concat().as_bytes());
    assert_eq!(evs.last().unwrap(), "[DONE]");
    let vs = parsed(&evs);
    // role + 4 content + finish + usage
    assert_eq!(vs.len(), 7);
    assert_eq!(
        vs[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(vs[0]["object"], "chat.completion.chunk");
    for (i, v) in vs[1..5].iter().enumerate() {
        assert_eq!(
            v["choices"][0]["delta"],
            json!({"content": format!("tok{i} ")})
        );
        assert_eq!(v["choices"][0]["finish_reason"], Value::Null);
    }
    assert_eq!(vs[5]["choices"][0]["delta"], json!({}));
    assert_eq!(vs[5]["choices"][0]["finish_reason"], "stop");
    for v in &vs[..6] {
        assert!(v.as_object().unwrap().contains_key("usage"));
        assert_eq!(v["usage"], Value::Null);
        assert_eq!(v["id"], vs[0]["id"]);
    }
    let last = &vs[6];
    assert_eq!(last["choices"], json!([]));
    let p = prompt_tokens(bytes.len());
    assert_eq!(last["usage"]["prompt_tokens"], p);
    assert_eq!(last["usage"]["completion_tokens"], 4);
    assert_eq!(last["usage"]["total_tokens"], p + 4);
    assert_eq!(m.chunks_sent(), 4);
    assert_eq!(
        m.served(),
        vec![ServedUsage {
            model: "gpt-test".into(),
            prompt_tokens: p,
            completion_tokens: 4,
            cached_tokens: 0,
            stream: true,
            user: None,
            ..ServedUsage::default()
        }]
    );
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage() {
    let m = MockServer::start().await;
    let (h, body, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(true, false, json!({})),
    )
    .await;
    assert_eq!(h.status, 200);
    let evs = events(&body);
    assert_eq!(evs.last().unwrap(), "[DONE]");
    let vs = parsed(&evs);
    assert_eq!(vs.len(), 5); // role + 3 content + finish
    for v in &vs {
        assert!(!v.as_object().unwrap().contains_key("usage"), "{v}");
        assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    }
    assert!(m.served().is_empty());
    assert_eq!(m.chunks_sent(), 3);
}

#[tokio::test]
async fn cumulative_usage_on_every_chunk_and_recorded_once() {
    let m = MockServer::start().await;
    let req = chat(
        true,
        false,
        json!({"chunks": 3, "usage": "cumulative", "cached_tokens": 2}),
    );
    let (_, body, len) = post(m.addr(), "/v1/chat/completions", &req).await;
    let vs = parsed(&events(&body));
    let p = prompt_tokens(len);
    let completions: Vec<u64> = vs
        .iter()
        .map(|v| v["usage"]["completion_tokens"].as_u64().unwrap())
        .collect();
    assert_eq!(completions, vec![0, 1, 2, 3, 3]);
    for v in &vs {
        assert_eq!(v["usage"]["prompt_tokens"], p);
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(
            v["choices"].as_array().unwrap().len(),
            1,
            "no usage-only chunk"
        );
    }
    assert_eq!(
        m.served(),
        vec![ServedUsage {
            model: "gpt-test".into(),
            prompt_tokens: p,
            completion_tokens: 3,
            cached_tokens: 2,
            stream: true,
            user: None,
            ..ServedUsage::default()
        }]
    );
}

#[tokio::test]
async fn usage_none_never_reports() {
    let m = MockServer::start().await;
    let (_, body, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(true, true, json!({"usage": "none"})),
    )
    .await;
    for v in parsed(&events(&body)) {
        assert!(!v.as_object().unwrap().contains_key("usage"));
    }
    let (_, body, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(false, false, json!({"usage": "none"})),
    )
    .await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(v.get("usage").is_none());
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn truncate_aborts_mid_body() {
    let m = MockServer::start().await;
    let bytes =
        serde_json::to_vec(&chat(true, true, json!({"chunks": 5, "truncate_after": 2}))).unwrap();
    let mut c = Conn::connect(m.addr()).await;
    c.send("POST", "/v1/chat/completions", &[], &bytes).await;
    let head = timeout(T, c.head()).await.unwrap().unwrap();
    assert_eq!(head.status, 200);
    let mut got = Vec::new();
    let end = loop {
        match timeout(T, c.chunk()).await.unwrap() {
            Ok(Some(ch)) => got.extend_from_slice(&ch),
            other => break other,
        }
    };
    assert!(end.is_err(), "chunked body must not be terminated: {end:?}");
    let evs = events(&got);
    assert!(!evs.contains(&"[DONE]".to_owned()));
    let vs = parsed(&evs);
    assert_eq!(vs.len(), 3, "role + 2 content chunks");
    assert_eq!(vs[2]["choices"][0]["delta"]["content"], "tok1 ");
    assert!(vs
        .iter()
        .all(|v| v["choices"].as_array().unwrap().len() == 1));
    assert_eq!(m.chunks_sent(), 2);
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn error_after_sends_error_event_and_ends_cleanly() {
    let m = MockServer::start().await;
    let req = chat(
        true,
        true,
        json!({"chunks": 5, "error_after": 2, "error_message": "overloaded"}),
    );
    let (h, body, _) = post(m.addr(), "/v1/chat/completions", &req).await;
    assert_eq!(h.status, 200);
    let evs = events(&body);
    assert!(!evs.contains(&"[DONE]".to_owned()));
    let vs = parsed(&evs);
    assert_eq!(vs.len(), 4);
    assert_eq!(
        vs[3],
        json!({"error": {"message": "overloaded", "type": "server_error", "param": null, "code": null}})
    );
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn reset_gives_no_response() {
    let m = MockServer::start().await;
    let bytes = serde_json::to_vec(&chat(false, false, json!({"reset": true}))).unwrap();
    let mut c = Conn::connect(m.addr()).await;
    c.send("POST", "/v1/chat/completions", &[], &bytes).await;
    let mut rest = Vec::new();
    let r = timeout(T, c.r.read_to_end(&mut rest)).await.unwrap();
    assert!(r.is_err() || rest.is_empty(), "got bytes: {rest:?}");
    assert_eq!(m.requests().len(), 1, "the request is still recorded");
}

#[tokio::test]
async fn gate_holds_second_chunk_until_opened() {
    let m = MockServer::start().await;
    let bytes = serde_json::to_vec(&chat(true, false, json!({"chunks": 3, "gate": true}))).unwrap();
    let mut c = Conn::connect(m.addr()).await;
    c.send("POST", "/v1/chat/completions", &[], &bytes).await;
    timeout(T, c.head()).await.unwrap().unwrap();
    let role = timeout(T, c.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8(role)
        .unwrap()
        .contains("\"role\":\"assistant\""));
    let first = timeout(T, c.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8(first).unwrap().contains("tok0 "));
    assert!(
        timeout(Duration::from_millis(300), c.chunk())
            .await
            .is_err(),
        "second chunk must wait for the gate"
    );
    assert_eq!(m.chunks_sent(), 1);
    m.open_gate();
    let second = timeout(T, c.chunk()).await.unwrap().unwrap().unwrap();
    assert!(String::from_utf8(second).unwrap().contains("tok1 "));
    let mut rest = Vec::new();
    while let Some(ch) = timeout(T, c.chunk()).await.unwrap().unwrap() {
        rest.extend_from_slice(&ch);
    }
    assert!(events(&rest).ends_with(&["[DONE]".to_owned()]));
    assert_eq!(m.chunks_sent(), 3);
    // The gate stays open for later streams.
    let (_, body, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(true, false, json!({"gate": true})),
    )
    .await;
    assert_eq!(events(&body).last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn delay_spaces_chunks_on_the_wire() {
    let m = MockServer::start().await;
    let bytes =
        serde_json::to_vec(&chat(true, false, json!({"chunks": 3, "delay_ms": 100}))).unwrap();
    let mut c = Conn::connect(m.addr()).await;
    let start = Instant::now();
    c.send("POST", "/v1/chat/completions", &[], &bytes).await;
    timeout(T, c.head()).await.unwrap().unwrap();
    timeout(T, c.chunk()).await.unwrap().unwrap().unwrap(); // role, undelayed
    assert_eq!(
        m.chunks_sent(),
        0,
        "the role chunk does not wait for the delay"
    );
    let mut arrivals = Vec::new();
    for i in 0..3 {
        timeout(T, c.chunk()).await.unwrap().unwrap().unwrap();
        arrivals.push(start.elapsed());
        assert_eq!(m.chunks_sent(), i + 1);
    }
    // Sleeps are real: three 100 ms delays cannot end sooner than 300 ms (no upper bound:
    // a loaded machine may be slower, never faster).
    assert!(arrivals[2] >= Duration::from_millis(300), "{arrivals:?}");
}

#[tokio::test]
async fn status_429_has_retry_after() {
    let m = MockServer::start().await;
    let (h, body, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(true, true, json!({"status": 429})),
    )
    .await;
    assert_eq!(h.status, 429);
    assert_eq!(h.header("retry-after"), Some("1"));
    assert_eq!(h.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "mock upstream error", "type": "requests",
                         "param": null, "code": "rate_limit_exceeded"}})
    );
    let (h, _, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(false, false, json!({"status": 503})),
    )
    .await;
    assert_eq!(h.status, 503);
    assert_eq!(h.header("retry-after"), None);
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn echo_auth_in_error_appends_the_received_key() {
    let m = MockServer::start().await;
    let bytes = serde_json::to_vec(&chat(
        false,
        false,
        json!({"status": 401, "error_message": "Incorrect API key", "echo_auth_in_error": true}),
    ))
    .unwrap();
    let mut c = Conn::connect(m.addr()).await;
    c.send(
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-upstream-secret")],
        &bytes,
    )
    .await;
    let (h, body) = c.response().await;
    assert_eq!(h.status, 401);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["error"]["message"],
        "Incorrect API key (key: Bearer sk-upstream-secret)"
    );
    assert_eq!(v["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn requests_are_recorded_and_keep_alive_works() {
    let m = MockServer::start().await;
    let mut c = Conn::connect(m.addr()).await;
    let body = serde_json::to_vec(&chat(false, false, json!({}))).unwrap();
    c.send(
        "POST",
        "/v1/chat/completions?api-version=1",
        &[("X-Custom", "A")],
        &body,
    )
    .await;
    let (h, _) = c.response().await;
    assert_eq!(h.status, 200);
    // Same connection, second request.
    c.send("GET", "/v1/models", &[], b"").await;
    let (h, b) = c.response().await;
    assert_eq!(h.status, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(
        v,
        json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}]})
    );
    let reqs = m.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(reqs[0].query.as_deref(), Some("api-version=1"));
    assert_eq!(reqs[0].header("x-custom"), Some("A"));
    assert!(reqs[0].headers.iter().any(|(n, _)| n == "x-custom"));
    assert_eq!(reqs[0].body, body);
    assert_eq!(reqs[0].json().unwrap()["model"], "gpt-test");
    assert_eq!(reqs[1].method, "GET");
    assert!(reqs[1].json().is_none());
}

#[tokio::test]
async fn many_requests_over_keep_alive() {
    let m = MockServer::start().await;
    let body = serde_json::to_vec(&chat(false, false, json!({}))).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let addr = m.addr();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(addr).await;
            for _ in 0..50 {
                c.send("POST", "/v1/chat/completions", &[], &body).await;
                let (h, _) = c.response().await;
                assert_eq!(h.status, 200);
            }
        }));
    }
    for t in tasks {
        timeout(T, t).await.unwrap().unwrap();
    }
    assert_eq!(m.requests().len(), 200);
    assert_eq!(m.served().len(), 200);
}

#[tokio::test]
async fn server_default_and_per_request_override() {
    let m = MockServer::start_with(Behaviour {
        chunks: Some(2),
        cached_tokens: Some(9),
        ..Default::default()
    })
    .await;
    let (_, body, _) = post(
        m.addr(),
        "/chat/completions",
        &chat(false, false, json!({"cached_tokens": 1})),
    )
    .await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2, "server default kept");
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"], 1,
        "request wins"
    );
    m.set_default(Behaviour {
        status: Some(500),
        ..Default::default()
    });
    let (h, _, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(false, false, json!({})),
    )
    .await;
    assert_eq!(h.status, 500);
    // Header form, for requests without a JSON body.
    m.set_default(Behaviour::default());
    let mut c = Conn::connect(m.addr()).await;
    c.send("GET", "/v1/models", &[("x-mock", r#"{"status":404}"#)], b"")
        .await;
    let (h, _) = c.response().await;
    assert_eq!(h.status, 404);
}

#[tokio::test]
async fn invalid_json_and_unknown_x_mock_are_400() {
    let m = MockServer::start().await;
    let mut c = Conn::connect(m.addr()).await;
    c.send("POST", "/v1/chat/completions", &[], b"{not json")
        .await;
    let (h, body) = c.response().await;
    assert_eq!(h.status, 400);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], Value::Null);
    let (h, _, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(false, false, json!({"chunkz": 1})),
    )
    .await;
    assert_eq!(h.status, 400);
    let (h, _, _) = post(
        m.addr(),
        "/v1/chat/completions",
        &chat(false, false, json!({"usage": "sometimes"})),
    )
    .await;
    assert_eq!(h.status, 400);
}

#[tokio::test]
async fn legacy_completions_json_and_stream() {
    let m = MockServer::start().await;
    let req = json!({"model": "davinci", "prompt": "say hi"});
    let (_, body, len) = post(m.addr(), "/v1/completions", &req).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-mock-"));
    assert_eq!(v["choices"][0]["text"], "tok0 tok1 tok2 ");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], prompt_tokens(len));
    assert_eq!(v["usage"]["completion_tokens"], 3);

    let req = json!({"model": "davinci", "prompt": "say hi", "stream": true,
                     "stream_options": {"include_usage": true}, "x_mock": {"chunks": 2}});
    let (h, body, len) = post(m.addr(), "/v1/completions", &req).await;
    assert_eq!(h.header("content-type"), Some("text/event-stream"));
    let evs = events(&body);
    assert_eq!(evs.last().unwrap(), "[DONE]");
    let vs = parsed(&evs);
    assert_eq!(vs.len(), 4); // 2 content + finish + usage, no role chunk
    for (i, v) in vs[..2].iter().enumerate() {
        assert_eq!(v["object"], "text_completion");
        assert_eq!(
            v["choices"],
            json!([{"text": format!("tok{i} "), "index": 0, "logprobs": null, "finish_reason": null}])
        );
        assert_eq!(v["usage"], Value::Null);
    }
    assert_eq!(vs[2]["choices"][0]["finish_reason"], "stop");
    assert_eq!(vs[3]["choices"], json!([]));
    assert_eq!(vs[3]["usage"]["prompt_tokens"], prompt_tokens(len));
    assert_eq!(vs[3]["usage"]["completion_tokens"], 2);
    assert_eq!(m.served().len(), 2);
    assert_eq!(m.chunks_sent(), 2);
}

#[tokio::test]
async fn embeddings_one_vector_per_input() {
    let m = MockServer::start().await;
    let req = json!({"model": "text-embedding-3-small", "input": ["a", "b", "c"]});
    let (_, body, len) = post(m.addr(), "/v1/embeddings", &req).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 3);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        assert_eq!(d["embedding"].as_array().unwrap().len(), 8);
    }
    let p = prompt_tokens(len);
    assert_eq!(v["usage"], json!({"prompt_tokens": p, "total_tokens": p}));

    let req = json!({"model": "e", "input": "one string", "encoding_format": "base64"});
    let (_, body, _) = post(m.addr(), "/v1/embeddings", &req).await;
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    // 8 f32 = 32 bytes = 44 base64 characters.
    assert_eq!(v["data"][0]["embedding"].as_str().unwrap().len(), 44);
    assert_eq!(m.served().len(), 2);
}

#[tokio::test]
async fn other_paths_echo() {
    let m = MockServer::start().await;
    let (h, body, _) = post(m.addr(), "/v1/files", &json!({"x": 1})).await;
    assert_eq!(h.status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v,
        json!({"object": "echo", "path": "/v1/files", "method": "POST"})
    );
}

#[tokio::test]
async fn drop_stops_the_server() {
    let m = MockServer::start().await;
    let addr = m.addr();
    drop(m);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = timeout(T, TcpStream::connect(addr)).await.unwrap();
    assert!(r.is_err(), "listener must be closed after drop");
}

#[tokio::test]
async fn truncated_cumulative_stream_records_last_reported_usage() {
    let m = MockServer::start().await;
    let bytes = serde_json::to_vec(&chat(
        true,
        false,
        json!({"chunks": 5, "truncate_after": 2, "usage": "cumulative"}),
    ))
    .unwrap();
    let mut c = Conn::connect(m.addr()).await;
    c.send("POST", "/v1/chat/completions", &[], &bytes).await;
    timeout(T, c.head()).await.unwrap().unwrap();
    let end = loop {
        match timeout(T, c.chunk()).await.unwrap() {
            Ok(Some(_)) => {}
            other => break other,
        }
    };
    assert!(end.is_err());
    // The stream task records after the abort; give it a moment.
    timeout(T, async {
        while m.served().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    let s = m.served();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].completion_tokens, 2);
    assert_eq!(s[0].prompt_tokens, prompt_tokens(bytes.len()));
}

#[tokio::test]
async fn malformed_chunk_big_line_and_error_body_200() {
    let m = MockServer::start().await;
    // One unparseable event after 1 content chunk; the stream then carries on to its usage.
    let mut req = chat(true, true, json!({"chunks": 3, "malformed_after": 1}));
    req["user"] = json!("marker-1");
    let (h, body, _) = post(m.addr(), "/v1/chat/completions", &req).await;
    assert_eq!(h.status, 200);
    let evs = events(&body);
    let bad: Vec<_> = evs
        .iter()
        .filter(|e| *e != "[DONE]" && serde_json::from_str::<Value>(e).is_err())
        .collect();
    assert_eq!(bad.len(), 1, "{evs:?}");
    assert_eq!(evs.last().map(String::as_str), Some("[DONE]"));
    let served = m.take_served();
    assert_eq!(served.len(), 1);
    assert_eq!(served[0].completion_tokens, 3);
    assert_eq!(served[0].user.as_deref(), Some("marker-1"));
    assert!(m.served().is_empty(), "taken");
    assert_eq!(m.take_requests().len(), 1);

    // The first content chunk is one 64 KiB line.
    let req = chat(true, true, json!({"chunks": 2, "big_line_bytes": 65536}));
    let (_, body, _) = post(m.addr(), "/v1/chat/completions", &req).await;
    let vs = parsed(&events(&body));
    let text = vs[1]["choices"][0]["delta"]["content"].as_str().unwrap();
    assert_eq!(text.len(), 65536);
    assert!(text.starts_with("tok0 x"));
    assert_eq!(m.take_served()[0].completion_tokens, 2);

    // A 200 whose body is an error, for a stream request too; no usage.
    let req = chat(true, true, json!({"error_body_200": true}));
    let (h, body, _) = post(m.addr(), "/v1/chat/completions", &req).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert!(m.served().is_empty());
}
