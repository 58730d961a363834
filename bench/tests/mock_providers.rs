//! The mock's Anthropic Messages and Gemini wires, over real loopback HTTP (reqwest,
//! 127.0.0.1 only): answer shapes, exact usage, the exact stream event sequences,
//! tool calls, header checks, error shapes and the stream misbehaviours.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::timeout;
use tollgate_bench::mock::{MockServer, ServedUsage, WireFormat};

const T: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(T)
        .build()
        .unwrap()
}

fn prompt_tokens(body: &[u8]) -> u64 {
    body.len() as u64 / 4 + 1
}

/// POSTs `body` with the given headers; returns the response and the bytes sent.
async fn post(url: String, headers: &[(&str, &str)], body: &Value) -> (reqwest::Response, Vec<u8>) {
    let bytes = serde_json::to_vec(body).unwrap();
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(bytes.clone());
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    (req.send().await.unwrap(), bytes)
}

/// The whole body, and whether it ended cleanly (`false`: the connection was cut).
async fn read_body(mut resp: reqwest::Response) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    for _ in 0..10_000 {
        match timeout(T, resp.chunk()).await.expect("body timed out") {
            Ok(Some(c)) => out.extend_from_slice(&c),
            Ok(None) => return (out, true),
            Err(_) => return (out, false),
        }
    }
    panic!("more than 10000 body chunks");
}

const ANTHROPIC_HEADERS: [(&str, &str); 3] = [
    ("x-api-key", "sk-ant-test"),
    ("anthropic-version", "2023-06-01"),
    ("anthropic-beta", "prompt-caching-2024-07-31"),
];

fn messages(stream: bool, x_mock: Value) -> Value {
    json!({
        "model": "claude-test",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "hello there"}],
        "x_mock": x_mock,
    })
}

fn with_tools(mut body: Value) -> Value {
    body["tools"] = json!([
        {"name": "lookup", "description": "d", "input_schema": {"type": "object"}},
        {"name": "other", "description": "d", "input_schema": {"type": "object"}},
    ]);
    body
}

/// `(event name, data)` per Anthropic SSE event; asserts each name matches data.type.
fn anthropic_events(body: &[u8]) -> Vec<(String, Value)> {
    let s = std::str::from_utf8(body).unwrap();
    assert!(s.ends_with("\n\n"), "ends on an event boundary: {s:?}");
    s.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (name, data) = e.split_once('\n').expect("event line then data line");
            let name = name.strip_prefix("event: ").expect("event: prefix");
            let data: Value =
                serde_json::from_str(data.strip_prefix("data: ").expect("data: prefix")).unwrap();
            assert_eq!(data["type"], name, "event name and data type agree");
            (name.to_owned(), data)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(n, _)| n.as_str()).collect()
}

async fn anthropic(m: &MockServer, body: &Value) -> (reqwest::Response, Vec<u8>) {
    post(
        format!("{}/v1/messages", m.base_url()),
        &ANTHROPIC_HEADERS,
        body,
    )
    .await
}

#[tokio::test]
async fn anthropic_json_answer_and_usage() {
    let m = MockServer::start().await;
    let (resp, sent) = anthropic(
        &m,
        &messages(
            false,
            json!({"chunks": 4, "cached_tokens": 5, "cache_write_tokens": 7}),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.headers()["request-id"], "req_mock_1");
    let v: Value = resp.json().await.unwrap();
    let p = prompt_tokens(&sent);
    assert_eq!(
        v,
        json!({
            "id": "msg_mock_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test",
            "content": [{"type": "text", "text": "tok0 tok1 tok2 tok3 "}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {
                "input_tokens": p - 12,
                "output_tokens": 4,
                "cache_creation_input_tokens": 7,
                "cache_read_input_tokens": 5,
            },
        })
    );
    assert_eq!(
        m.served(),
        vec![ServedUsage {
            model: "claude-test".into(),
            prompt_tokens: p,
            completion_tokens: 4,
            cached_tokens: 5,
            cache_write_tokens: 7,
            stream: false,
            user: None,
            wire: WireFormat::Anthropic,
            ..ServedUsage::default()
        }]
    );
    let rec = &m.requests()[0];
    assert_eq!(rec.path, "/v1/messages");
    assert_eq!(rec.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        rec.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    assert_eq!(rec.header("x-api-key"), Some("sk-ant-test"));
}

#[tokio::test]
async fn anthropic_json_tool_use_by_knob_and_by_tool_choice() {
    let m = MockServer::start().await;
    let mut body = with_tools(messages(
        false,
        json!({"chunks": 1, "tool_call": "other", "usage": "final"}),
    ));
    body["metadata"] = json!({"user_id": "u-7"});
    let (resp, sent) = anthropic(&m, &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["content"],
        json!([
            {"type": "text", "text": "tok0 "},
            {"type": "tool_use", "id": "toolu_mock_1", "name": "other", "input": {"arg": "value"}},
        ])
    );
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(v["usage"]["output_tokens"], 4, "1 chunk + 3 for the call");
    assert_eq!(v["usage"]["input_tokens"], prompt_tokens(&sent));

    let mut body = with_tools(messages(false, json!({"chunks": 2})));
    body["tool_choice"] = json!({"type": "any"});
    let (resp, _) = anthropic(&m, &body).await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["content"][1]["name"], "lookup");
    assert_eq!(v["content"][1]["id"], "toolu_mock_2");
    assert_eq!(v["stop_reason"], "tool_use");

    // Tools declared but nothing asks for a call: text only.
    let (resp, _) = anthropic(&m, &with_tools(messages(false, json!({})))).await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["content"].as_array().unwrap().len(), 1);
    assert_eq!(v["stop_reason"], "end_turn");

    let served = m.served();
    assert_eq!(served.len(), 3);
    assert_eq!(served[0].user.as_deref(), Some("u-7"));
    assert_eq!(served[0].completion_tokens, 4);
    assert_eq!(served[1].completion_tokens, 5);
    assert_eq!(served[2].completion_tokens, 3);
}

#[tokio::test]
async fn anthropic_stream_has_the_exact_event_sequence() {
    let m = MockServer::start().await;
    let (resp, sent) = anthropic(
        &m,
        &messages(
            true,
            json!({"chunks": 2, "cached_tokens": 3, "cache_write_tokens": 1}),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (body, complete) = read_body(resp).await;
    assert!(complete);
    let evs = anthropic_events(&body);
    assert_eq!(
        names(&evs),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let p = prompt_tokens(&sent);
    assert_eq!(
        evs[0].1,
        json!({"type": "message_start", "message": {
            "id": "msg_mock_1", "type": "message", "role": "assistant", "model": "claude-test",
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": p - 4, "cache_creation_input_tokens": 1,
                      "cache_read_input_tokens": 3, "output_tokens": 1},
        }})
    );
    assert_eq!(
        evs[1].1,
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    assert_eq!(evs[2].1, json!({"type": "ping"}));
    assert_eq!(
        evs[3].1,
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "tok0 "}})
    );
    assert_eq!(evs[4].1["delta"]["text"], "tok1 ");
    assert_eq!(evs[5].1, json!({"type": "content_block_stop", "index": 0}));
    assert_eq!(
        evs[6].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": 2}})
    );
    assert_eq!(evs[7].1, json!({"type": "message_stop"}));
    assert_eq!(m.chunks_sent(), 2);
    assert_eq!(
        m.served(),
        vec![ServedUsage {
            model: "claude-test".into(),
            prompt_tokens: p,
            completion_tokens: 2,
            cached_tokens: 3,
            cache_write_tokens: 1,
            stream: true,
            user: None,
            wire: WireFormat::Anthropic,
            ..ServedUsage::default()
        }]
    );
}

#[tokio::test]
async fn anthropic_stream_tool_use_fragments_concatenate_to_json() {
    let m = MockServer::start().await;
    let mut body = with_tools(messages(true, json!({"chunks": 1})));
    body["tool_choice"] = json!({"type": "tool", "name": "other"});
    let (resp, _) = anthropic(&m, &body).await;
    let (body, complete) = read_body(resp).await;
    assert!(complete);
    let evs = anthropic_events(&body);
    assert_eq!(
        names(&evs),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        evs[5].1,
        json!({"type": "content_block_start", "index": 1, "content_block":
               {"type": "tool_use", "id": "toolu_mock_1", "name": "other", "input": {}}})
    );
    let fragments: Vec<&str> = evs[6..10]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["index"], 1);
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap()
        })
        .collect();
    assert_eq!(fragments[0], "", "Anthropic's first fragment is empty");
    let input: Value = serde_json::from_str(&fragments.concat()).unwrap();
    assert_eq!(input, json!({"arg": "value"}));
    assert_eq!(evs[10].1, json!({"type": "content_block_stop", "index": 1}));
    assert_eq!(evs[11].1["delta"]["stop_reason"], "tool_use");
    assert_eq!(evs[11].1["usage"], json!({"output_tokens": 4}));
    assert_eq!(m.served()[0].completion_tokens, 4);
    assert_eq!(m.chunks_sent(), 4, "1 text delta + 3 non-empty fragments");
}

#[tokio::test]
async fn anthropic_stream_usage_none_and_omit_done() {
    let m = MockServer::start().await;
    let (resp, _) = anthropic(
        &m,
        &messages(true, json!({"usage": "none", "omit_done": true})),
    )
    .await;
    let (body, complete) = read_body(resp).await;
    assert!(complete, "ends cleanly, just without message_stop");
    let evs = anthropic_events(&body);
    // start, block start, ping, 3 deltas (default chunks), block stop, message_delta.
    assert_eq!(evs.len(), 8);
    assert_eq!(evs.last().unwrap().0, "message_delta");
    for (_, d) in &evs {
        assert!(d.get("usage").is_none(), "{d}");
        assert!(d
            .get("message")
            .is_none_or(|msg| msg.get("usage").is_none()));
    }
    let (resp, _) = anthropic(&m, &messages(false, json!({"usage": "none"}))).await;
    let v: Value = resp.json().await.unwrap();
    assert!(v.get("usage").is_none());
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn anthropic_stream_truncate_and_error_after() {
    let m = MockServer::start().await;
    let (resp, _) = anthropic(
        &m,
        &messages(true, json!({"chunks": 5, "truncate_after": 2})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let (body, complete) = read_body(resp).await;
    assert!(!complete, "the body must be cut, not ended");
    let evs = anthropic_events(&body);
    assert_eq!(
        names(&evs),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta"
        ]
    );
    // Only message_start's usage reached the client.
    assert_eq!(m.served()[0].completion_tokens, 1);

    let (resp, _) = anthropic(
        &m,
        &messages(
            true,
            json!({"chunks": 5, "error_after": 1, "error_message": "busy now"}),
        ),
    )
    .await;
    let (body, complete) = read_body(resp).await;
    assert!(complete, "an in-band error ends the body cleanly");
    let evs = anthropic_events(&body);
    assert_eq!(
        names(&evs),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "error"
        ]
    );
    assert_eq!(
        evs[4].1,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "busy now"}})
    );
    assert_eq!(m.served().len(), 2);
}

#[tokio::test]
async fn anthropic_count_tokens() {
    let m = MockServer::start().await;
    let body =
        json!({"model": "claude-test", "messages": [{"role": "user", "content": "count me"}]});
    let (resp, sent) = post(
        format!("{}/v1/messages/count_tokens", m.base_url()),
        &ANTHROPIC_HEADERS,
        &body,
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v, json!({"input_tokens": prompt_tokens(&sent)}));
    assert!(m.served().is_empty(), "counting is not billed");
}

#[tokio::test]
async fn anthropic_header_and_body_checks() {
    let m = MockServer::start().await;
    let url = format!("{}/v1/messages", m.base_url());
    let (resp, _) = post(
        url.clone(),
        &[("anthropic-version", "2023-06-01")],
        &messages(false, json!({})),
    )
    .await;
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "x-api-key header is required"}})
    );
    let (resp, _) = post(
        url.clone(),
        &[("x-api-key", "k")],
        &messages(false, json!({})),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "anthropic-version: header is required"
    );

    for field in ["model", "max_tokens", "messages"] {
        let mut body = messages(false, json!({}));
        body.as_object_mut().unwrap().remove(field);
        let (resp, _) = post(url.clone(), &ANTHROPIC_HEADERS, &body).await;
        assert_eq!(resp.status(), 400, "{field}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(field),
            "{v}"
        );
    }
    // Every request was recorded, none billed.
    assert_eq!(m.requests().len(), 5);
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn anthropic_status_knob_answers_in_anthropic_shape() {
    let m = MockServer::start().await;
    for (status, kind) in [
        (429, "rate_limit_error"),
        (529, "overloaded_error"),
        (500, "api_error"),
        (400, "invalid_request_error"),
        (401, "authentication_error"),
    ] {
        let (resp, _) = anthropic(
            &m,
            &messages(true, json!({"status": status, "error_message": "nope"})),
        )
        .await;
        assert_eq!(resp.status().as_u16(), status);
        let retry = resp.headers().get("retry-after").map(|v| v.to_owned());
        assert_eq!(retry.is_some(), status == 429, "{status}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v,
            json!({"type": "error", "error": {"type": kind, "message": "nope"}})
        );
    }
    let (resp, _) = anthropic(&m, &messages(false, json!({"error_body_200": true}))).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
    assert!(m.served().is_empty());
}

// ---- Gemini ----

fn contents(x_mock: Value) -> Value {
    json!({
        "contents": [{"role": "user", "parts": [{"text": "hello"}, {"text": "there"}]}],
        "x_mock": x_mock,
    })
}

/// The `data:` payloads of a Gemini SSE body (CRLF framed).
fn gemini_events(body: &[u8]) -> Vec<Value> {
    let s = std::str::from_utf8(body).unwrap();
    assert!(s.ends_with("\r\n\r\n"), "CRLF event boundary: {s:?}");
    s.split("\r\n\r\n")
        .filter(|e| !e.is_empty())
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").expect("data: prefix")).unwrap())
        .collect()
}

#[tokio::test]
async fn gemini_json_answer_and_usage() {
    let m = MockServer::start().await;
    let url = format!("{}/v1beta/models/gemini-test:generateContent", m.base_url());
    let (resp, sent) = post(
        url.clone(),
        &[("x-goog-api-key", "g-key")],
        &contents(json!({"chunks": 2, "cached_tokens": 4})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let p = prompt_tokens(&sent);
    assert_eq!(
        v,
        json!({
            "candidates": [{
                "content": {"role": "model", "parts": [{"text": "tok0 tok1 "}]},
                "finishReason": "STOP",
                "index": 0,
            }],
            "usageMetadata": {"promptTokenCount": p, "candidatesTokenCount": 2,
                              "totalTokenCount": p + 2, "cachedContentTokenCount": 4},
            "modelVersion": "gemini-test",
            "responseId": "mock-1",
        })
    );
    // The key may come as a query parameter; no cached tokens, no cached field.
    let (resp, sent2) = post(format!("{url}?key=q-key"), &[], &contents(json!({}))).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let p2 = prompt_tokens(&sent2);
    assert_eq!(
        v["usageMetadata"],
        json!({"promptTokenCount": p2, "candidatesTokenCount": 3, "totalTokenCount": p2 + 3})
    );
    assert_eq!(
        m.served(),
        vec![
            ServedUsage {
                model: "gemini-test".into(),
                prompt_tokens: p,
                completion_tokens: 2,
                cached_tokens: 4,
                cache_write_tokens: 0,
                stream: false,
                user: None,
                wire: WireFormat::Gemini,
                ..ServedUsage::default()
            },
            ServedUsage {
                model: "gemini-test".into(),
                prompt_tokens: p2,
                completion_tokens: 3,
                cached_tokens: 0,
                cache_write_tokens: 0,
                stream: false,
                user: None,
                wire: WireFormat::Gemini,
                ..ServedUsage::default()
            },
        ]
    );
    assert_eq!(m.requests()[1].query.as_deref(), Some("key=q-key"));
}

#[tokio::test]
async fn gemini_function_call() {
    let m = MockServer::start().await;
    let url = format!("{}/v1beta/models/g:generateContent", m.base_url());
    let mut body = contents(json!({"chunks": 1}));
    body["tools"] = json!([{"functionDeclarations": [{"name": "lookup"}, {"name": "other"}]}]);
    body["toolConfig"] = json!({"functionCallingConfig": {"mode": "ANY"}});
    let (resp, sent) = post(url, &[("x-goog-api-key", "k")], &body).await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["candidates"][0]["content"]["parts"],
        json!([{"text": "tok0 "}, {"functionCall": {"name": "lookup", "args": {"arg": "value"}}}])
    );
    let p = prompt_tokens(&sent);
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 4);
    assert_eq!(v["usageMetadata"]["totalTokenCount"], p + 4);
}

#[tokio::test]
async fn gemini_sse_stream_with_cumulative_usage() {
    let m = MockServer::start().await;
    let url = format!(
        "{}/v1beta/models/gemini-test:streamGenerateContent?alt=sse",
        m.base_url()
    );
    let mut body = contents(json!({"chunks": 3}));
    body["tools"] = json!([{"functionDeclarations": [{"name": "lookup"}]}]);
    body["x_mock"]["tool_call"] = json!("lookup");
    let (resp, sent) = post(url, &[("x-goog-api-key", "k")], &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let (raw, complete) = read_body(resp).await;
    assert!(complete);
    assert!(!String::from_utf8_lossy(&raw).contains("[DONE]"));
    let evs = gemini_events(&raw);
    assert_eq!(evs.len(), 4, "3 text chunks + the function call");
    let p = prompt_tokens(&sent);
    let candidates: Vec<u64> = evs
        .iter()
        .map(|e| e["usageMetadata"]["candidatesTokenCount"].as_u64().unwrap())
        .collect();
    assert_eq!(candidates, [1, 2, 3, 6]);
    for (i, e) in evs.iter().enumerate() {
        assert_eq!(e["usageMetadata"]["promptTokenCount"], p);
        assert_eq!(e["usageMetadata"]["totalTokenCount"], p + candidates[i]);
        assert_eq!(e["modelVersion"], "gemini-test");
        assert_eq!(e["candidates"][0]["content"]["role"], "model");
        let finish = e["candidates"][0].get("finishReason");
        assert_eq!(finish.is_some(), i == 3, "only the last chunk finishes");
    }
    let texts: Vec<&str> = evs[..3]
        .iter()
        .map(|e| {
            e["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(texts, ["tok0 ", "tok1 ", "tok2 "]);
    assert_eq!(
        evs[3]["candidates"][0]["content"]["parts"],
        json!([{"functionCall": {"name": "lookup", "args": {"arg": "value"}}}])
    );
    assert_eq!(evs[3]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(
        m.served(),
        vec![ServedUsage {
            model: "gemini-test".into(),
            prompt_tokens: p,
            completion_tokens: 6,
            stream: true,
            wire: WireFormat::Gemini,
            ..ServedUsage::default()
        }]
    );
    assert_eq!(m.chunks_sent(), 4);
}

#[tokio::test]
async fn gemini_stream_without_alt_sse_is_a_json_array() {
    let m = MockServer::start().await;
    let url = format!(
        "{}/v1beta/models/g:streamGenerateContent?key=k",
        m.base_url()
    );
    let (resp, _) = post(url, &[], &contents(json!({"chunks": 2}))).await;
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v: Value = resp.json().await.unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[1]["candidates"][0]["finishReason"], "STOP");
    assert_eq!(arr[1]["usageMetadata"]["candidatesTokenCount"], 2);
}

#[tokio::test]
async fn gemini_stream_truncate_and_error_after() {
    let m = MockServer::start().await;
    let url = format!(
        "{}/v1beta/models/g:streamGenerateContent?alt=sse",
        m.base_url()
    );
    let (resp, _) = post(
        url.clone(),
        &[("x-goog-api-key", "k")],
        &contents(json!({"chunks": 4, "truncate_after": 2})),
    )
    .await;
    let (raw, complete) = read_body(resp).await;
    assert!(!complete, "the body must be cut, not ended");
    let evs = gemini_events(&raw);
    assert_eq!(evs.len(), 2);
    assert!(evs[1]["candidates"][0].get("finishReason").is_none());
    assert_eq!(m.served()[0].completion_tokens, 2, "the last usage sent");

    let (resp, _) = post(
        url.clone(),
        &[("x-goog-api-key", "k")],
        &contents(json!({"chunks": 4, "error_after": 1, "error_message": "overloaded"})),
    )
    .await;
    let (raw, complete) = read_body(resp).await;
    assert!(complete);
    let evs = gemini_events(&raw);
    assert_eq!(evs.len(), 2);
    assert_eq!(
        evs[1],
        json!({"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}})
    );

    // omit_done: the last chunk lacks its finishReason.
    let (resp, _) = post(
        url,
        &[("x-goog-api-key", "k")],
        &contents(json!({"chunks": 2, "omit_done": true, "usage": "none"})),
    )
    .await;
    let (raw, complete) = read_body(resp).await;
    assert!(complete);
    let evs = gemini_events(&raw);
    assert_eq!(evs.len(), 2);
    for e in &evs {
        assert!(e["candidates"][0].get("finishReason").is_none());
        assert!(e.get("usageMetadata").is_none());
    }
    assert_eq!(m.served().len(), 2);
}

#[tokio::test]
async fn gemini_key_body_and_status_errors() {
    let m = MockServer::start().await;
    let url = format!("{}/v1beta/models/g:generateContent", m.base_url());
    let (resp, _) = post(url.clone(), &[], &contents(json!({}))).await;
    assert_eq!(resp.status(), 403);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], 403);
    assert_eq!(v["error"]["status"], "PERMISSION_DENIED");
    assert!(v["error"]["message"].as_str().unwrap().contains("API Key"));

    let (resp, _) = post(
        url.clone(),
        &[("x-goog-api-key", "k")],
        &json!({"contents": []}),
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");

    for (status, name) in [
        (429, "RESOURCE_EXHAUSTED"),
        (500, "INTERNAL"),
        (503, "UNAVAILABLE"),
    ] {
        let (resp, _) = post(
            url.clone(),
            &[("x-goog-api-key", "k")],
            &contents(json!({"status": status, "error_message": "no"})),
        )
        .await;
        assert_eq!(resp.status().as_u16(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], status);
        assert_eq!(v["error"]["status"], name);
        assert_eq!(v["error"]["message"], "no");
    }

    let (resp, sent) = post(
        format!("{}/v1beta/models/g:countTokens", m.base_url()),
        &[("x-goog-api-key", "k")],
        &contents(json!({})),
    )
    .await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v, json!({"totalTokens": prompt_tokens(&sent)}));
    assert!(m.served().is_empty());
}

#[tokio::test]
async fn azure_paths_answer_as_openai() {
    let m = MockServer::start().await;
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "x_mock": {"chunks": 2}});
    for path in [
        "/openai/deployments/dep1/chat/completions?api-version=2024-10-21",
        "/openai/v1/chat/completions",
    ] {
        let (resp, _) = post(
            format!("{}{path}", m.base_url()),
            &[("api-key", "az")],
            &body,
        )
        .await;
        assert_eq!(resp.status(), 200, "{path}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "tok0 tok1 ");
    }
    let served = m.served();
    assert_eq!(served.len(), 2);
    assert!(served.iter().all(|s| s.wire == WireFormat::OpenAi));
}

#[tokio::test]
async fn gate_delay_and_resets_apply_to_the_new_wires() {
    let m = MockServer::start().await;
    // Gate: the Anthropic stream stops after its first text delta until the gate opens.
    let (mut resp, _) = anthropic(&m, &messages(true, json!({"chunks": 3, "gate": true}))).await;
    let mut got = Vec::new();
    for _ in 0..100 {
        if String::from_utf8_lossy(&got).contains("tok0 ") {
            break;
        }
        let c = timeout(T, resp.chunk()).await.unwrap().unwrap().unwrap();
        got.extend_from_slice(&c);
    }
    assert!(String::from_utf8_lossy(&got).contains("tok0 "));
    let held = timeout(Duration::from_millis(200), resp.chunk()).await;
    assert!(held.is_err(), "nothing passes the closed gate");
    assert_eq!(m.chunks_sent(), 1);
    m.open_gate();
    let (rest, complete) = read_body(resp).await;
    assert!(complete);
    got.extend_from_slice(&rest);
    let evs = anthropic_events(&got);
    assert_eq!(evs.len(), 9);
    assert_eq!(evs.last().unwrap().0, "message_stop");

    // Delay: before every Gemini chunk.
    let url = format!(
        "{}/v1beta/models/g:streamGenerateContent?alt=sse",
        m.base_url()
    );
    let start = std::time::Instant::now();
    let (resp, _) = post(
        url,
        &[("x-goog-api-key", "k")],
        &contents(json!({"chunks": 3, "delay_ms": 60})),
    )
    .await;
    let (raw, complete) = read_body(resp).await;
    assert!(complete);
    assert_eq!(gemini_events(&raw).len(), 3);
    assert!(start.elapsed() >= Duration::from_millis(180));

    // Resets: no response at all, on either wire, after the request was recorded.
    let before = m.requests().len();
    let bytes = serde_json::to_vec(&messages(false, json!({"reset": true}))).unwrap();
    let mut req = client()
        .post(format!("{}/v1/messages", m.base_url()))
        .body(bytes);
    for (n, v) in ANTHROPIC_HEADERS {
        req = req.header(n, v);
    }
    assert!(req.send().await.is_err());
    let url = format!("{}/v1beta/models/g:generateContent", m.base_url());
    let bytes = serde_json::to_vec(&contents(json!({"reset_after_body": true}))).unwrap();
    let sent = client()
        .post(url)
        .header("x-goog-api-key", "k")
        .body(bytes)
        .send()
        .await;
    assert!(sent.is_err());
    assert_eq!(m.requests().len(), before + 2);
}

#[tokio::test]
async fn malformed_event_and_big_line_on_the_new_wires() {
    let m = MockServer::start().await;
    let (resp, _) = anthropic(
        &m,
        &messages(
            true,
            json!({"chunks": 2, "malformed_after": 1, "big_line_bytes": 4096}),
        ),
    )
    .await;
    let (raw, complete) = read_body(resp).await;
    assert!(complete);
    let s = String::from_utf8(raw).unwrap();
    let events: Vec<&str> = s.split("\n\n").filter(|e| !e.is_empty()).collect();
    // 8 regular events + the broken one, right before the second text delta.
    assert_eq!(events.len(), 9);
    let broken = events[4].split_once("data: ").unwrap().1;
    assert!(serde_json::from_str::<Value>(broken).is_err());
    let first: Value = serde_json::from_str(events[3].split_once("data: ").unwrap().1).unwrap();
    let text = first["delta"]["text"].as_str().unwrap();
    assert_eq!(text.len(), 4096);
    assert!(text.starts_with("tok0 x"));
    assert_eq!(
        m.served()[0].completion_tokens,
        2,
        "padding is still one token"
    );

    let (resp, _) = post(
        format!(
            "{}/v1beta/models/g:streamGenerateContent?alt=sse",
            m.base_url()
        ),
        &[("x-goog-api-key", "k")],
        &contents(json!({"chunks": 2, "malformed_after": 0})),
    )
    .await;
    let (raw, _) = read_body(resp).await;
    let s = String::from_utf8(raw).unwrap();
    let events: Vec<&str> = s.split("\r\n\r\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3);
    assert!(serde_json::from_str::<Value>(events[0].strip_prefix("data: ").unwrap()).is_err());
    assert!(serde_json::from_str::<Value>(events[2].strip_prefix("data: ").unwrap()).is_ok());
}
