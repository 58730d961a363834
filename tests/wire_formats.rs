//! Anthropic's and Gemini's native APIs, and translation between wire formats, against the
//! real binary, a real SQLite file and the mock upstream speaking each format: what reaches
//! the provider (path, key header, version headers, body), what the client gets back (its
//! own format, its own error shape), and that each request is billed to the nano-USD from
//! the usage the provider reported, Anthropic's cache reads and writes included.

mod support;

use serde_json::{json, Value};
use support::{post_with, Behaviour, Gateway, MockServer};
use tollgate_bench::mock::ServedUsage;

const ANTHROPIC_KEY: &str = "sk-ant-channel-key-0123456789abcdef";
const GEMINI_KEY: &str = "AIza-channel-key-0123456789abcdef";
const OPENAI_KEY: &str = "sk-openai-channel-key-0123456789";

/// Rates in nano-USD per token: (input, output, cache read, cache write).
const CLAUDE: (i64, i64, i64, i64) = (3000, 15000, 300, 3750);
const GPT: (i64, i64, i64, i64) = (2000, 8000, 1000, 2000);
const GEM: (i64, i64, i64, i64) = (1000, 4000, 250, 1000);

const PRICING: &str = "pricing:
  models:
    claude-x: { input: 3.00, output: 15.00, cache_read: 0.30, cache_write: 3.75 }
    gpt-x: { input: 2.00, output: 8.00, cached_input: 1.00 }
    gem-x: { input: 1.00, output: 4.00, cached_input: 0.25 }
  unpriced: reject
";

fn anthropic_channel(mock: &MockServer, models: &str, priority: i32) -> String {
    format!(
        "  - {{ name: claude-{priority}, kind: anthropic, base_url: \"{}\", api_key: \"{ANTHROPIC_KEY}\", models: [{models}], priority: {priority} }}\n",
        mock.base_url()
    )
}

fn openai_channel(mock: &MockServer, models: &str, priority: i32) -> String {
    format!(
        "  - {{ name: openai-{priority}, base_url: \"{}\", api_key: \"{OPENAI_KEY}\", models: [{models}], priority: {priority} }}\n",
        mock.base_url()
    )
}

fn gemini_channel(mock: &MockServer, models: &str) -> String {
    format!(
        "  - {{ name: gemini, kind: gemini, base_url: \"{}\", api_key: \"{GEMINI_KEY}\", models: [{models}] }}\n",
        mock.base_url()
    )
}

async fn start(channels: String) -> Gateway {
    tokio::task::spawn_blocking(move || Gateway::start(&channels, PRICING))
        .await
        .unwrap()
}

/// Status and body text.
async fn send(gw: &Gateway, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, String) {
    let r = post_with(gw, path, headers, &body).await;
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

/// The exact cost of what the mock reported serving, at `rate`.
fn cost(u: &ServedUsage, rate: (i64, i64, i64, i64)) -> i64 {
    let (input, output, read, write) = rate;
    let fresh = u.prompt_tokens - u.cached_tokens - u.cache_write_tokens;
    fresh as i64 * input
        + u.cached_tokens as i64 * read
        + u.cache_write_tokens as i64 * write
        + u.completion_tokens as i64 * output
}

/// (the row's model, cost) of every ledger row, once `n` are there.
async fn ledger(gw: &Gateway, n: usize) -> Vec<(String, i64)> {
    support::ledger_rows(gw, "model", "ts, request_id", n).await
}

/// The `data:` payloads of an SSE body, as JSON where they are JSON.
fn sse_data(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_owned())))
        .collect()
}

/// The `event:` names of an SSE body, in order.
fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("event:"))
        .map(|e| e.trim().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_clients_reach_an_anthropic_channel_natively_and_are_billed_cache_and_all() {
    let mock = MockServer::start().await;
    let gw = start(anthropic_channel(&mock, "claude-x", 0)).await;
    let key = gw.new_key("acme", &[]);
    let caching = json!({"cached_tokens": 7, "cache_write_tokens": 5});
    let message = json!({
        "model": "claude-x", "max_tokens": 50,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "hello"}],
        "x_mock": caching,
    });
    let (status, body) = send(
        &gw,
        "/v1/messages",
        &[
            ("x-api-key", &key),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "prompt-caching-2024-07-31"),
        ],
        message.clone(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["usage"]["cache_read_input_tokens"], 7);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 5);

    // A stream, the key as a bearer token, no anthropic-version: the channel's default.
    let mut stream = message.clone();
    stream["stream"] = json!(true);
    let auth = format!("Bearer {key}");
    let (status, body) = send(&gw, "/v1/messages", &[("authorization", &auth)], stream).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    assert_eq!(events.first().map(String::as_str), Some("message_start"));
    assert_eq!(events.last().map(String::as_str), Some("message_stop"));

    // count_tokens: relayed, never billed.
    let (status, body) = send(
        &gw,
        "/v1/messages/count_tokens",
        &[("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        json!({"model": "claude-x", "messages": [{"role": "user", "content": "hello"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        serde_json::from_str::<Value>(&body).unwrap()["input_tokens"].as_u64() > Some(0),
        "{body}"
    );

    // A bad key: Anthropic's error shape, the status its SDK maps to AuthenticationError.
    let (status, body) = send(
        &gw,
        "/v1/messages",
        &[("x-api-key", "sk-tg-not-a-key")],
        message.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "authentication_error");
    assert!(v["error"]["message"].is_string());

    let seen = mock.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].path, "/v1/messages");
    assert_eq!(seen[2].path, "/v1/messages/count_tokens");
    for r in &seen {
        assert_eq!(
            r.header("x-api-key"),
            Some(ANTHROPIC_KEY),
            "the channel's key"
        );
        assert_eq!(r.header("authorization"), None);
        assert!(!r.headers.iter().any(|(_, v)| v.contains(&key)));
    }
    assert_eq!(
        seen[0].header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    assert_eq!(seen[1].header("anthropic-version"), Some("2023-06-01"));

    let served = mock.served();
    assert_eq!(served.len(), 2, "count_tokens reports no usage");
    assert!(served
        .iter()
        .all(|u| u.cached_tokens == 7 && u.cache_write_tokens == 5));
    let rows = ledger(&gw, 3).await;
    assert_eq!(rows[0].1, cost(&served[0], CLAUDE));
    assert_eq!(rows[1].1, cost(&served[1], CLAUDE));
    assert_eq!(rows[2].1, 0, "count_tokens is free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_clients_reach_claude_through_translation_with_tools_streams_and_usage() {
    let mock = MockServer::start().await;
    let gw = start(anthropic_channel(&mock, "claude-x", 0)).await;
    let key = gw.new_key("acme", &[]);
    let auth = format!("Bearer {key}");
    let h = [
        ("authorization", auth.as_str()),
        ("x-mock", r#"{"cached_tokens": 3, "cache_write_tokens": 2}"#),
    ];
    let chat = json!({
        "model": "claude-x",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
        ],
        "max_tokens": 64,
        "stop": "END",
    });
    let (status, body) = send(&gw, "/v1/chat/completions", &h, chat.clone()).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "claude-x");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let served = mock.served();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64(),
        Some(served[0].prompt_tokens),
        "cache reads and writes counted in the prompt"
    );
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 3);

    // Streaming with include_usage: text deltas, a finish, one usage chunk, [DONE].
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let (status, body) = send(&gw, "/v1/chat/completions", &h, stream).await;
    assert_eq!(status, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last(), Some(&json!("[DONE]")), "{body}");
    let text: String = data
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty(), "{body}");
    let usage: Vec<&Value> = data.iter().filter(|c| c["usage"].is_object()).collect();
    assert_eq!(usage.len(), 1, "{body}");
    assert_eq!(
        usage[0]["usage"]["completion_tokens"].as_u64(),
        Some(mock.served()[1].completion_tokens)
    );
    assert!(data
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "stop"));

    // Tool calls, streamed: the arguments reassemble to the tool's input.
    let tools = json!([{"type": "function", "function": {
        "name": "lookup", "description": "Looks up.",
        "parameters": {"type": "object", "properties": {"arg": {"type": "string"}}}}}]);
    let mut call = chat.clone();
    call["tools"] = tools.clone();
    call["tool_choice"] = json!({"type": "function", "function": {"name": "lookup"}});
    call["stream"] = json!(true);
    let (status, body) = send(&gw, "/v1/chat/completions", &h, call.clone()).await;
    assert_eq!(status, 200, "{body}");
    let data = sse_data(&body);
    let calls: Vec<&Value> = data
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]
                .as_object()
                .map(|_| c)
        })
        .map(|c| &c["choices"][0]["delta"]["tool_calls"][0])
        .collect();
    assert_eq!(calls[0]["function"]["name"], "lookup");
    assert!(calls[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    let args: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"arg": "value"})
    );
    assert!(data
        .iter()
        .any(|c| c["choices"][0]["finish_reason"] == "tool_calls"));
    // Not streamed: the same call as a message.
    call["stream"] = json!(false);
    let (status, body) = send(&gw, "/v1/chat/completions", &h, call).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let tc = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(tc["type"], "function");
    assert_eq!(tc["function"]["name"], "lookup");
    assert_eq!(
        serde_json::from_str::<Value>(tc["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"arg": "value"})
    );

    // n > 1 has no Anthropic form: a clear 400 naming it, nothing sent.
    let mut many = chat.clone();
    many["n"] = json!(2);
    let (status, body) = send(&gw, "/v1/chat/completions", &h, many).await;
    assert_eq!(status, 400, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains('n'),
        "{body}"
    );

    let seen = mock.requests();
    assert_eq!(seen.len(), 4, "the untranslatable request never left");
    for r in &seen {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.header("x-api-key"), Some(ANTHROPIC_KEY));
        assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
        let b = r.json().unwrap();
        assert_eq!(b["system"], "Be brief.");
        assert_eq!(b["max_tokens"], 64);
        assert_eq!(b["stop_sequences"], json!(["END"]));
        assert!(b.get("stream_options").is_none());
    }
    let served = mock.served();
    let rows = ledger(&gw, 5).await;
    for (i, u) in served.iter().enumerate() {
        assert_eq!(rows[i].1, cost(u, CLAUDE), "request {i}: {u:?}");
    }
    assert_eq!(rows[4].1, 0, "the refused request costs nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_clients_reach_an_openai_model_through_translation() {
    let mock = MockServer::start().await;
    let gw = start(openai_channel(&mock, "gpt-x", 0)).await;
    let key = gw.new_key("acme", &[]);
    let h = [
        ("x-api-key", key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    let message = json!({
        "model": "gpt-x", "max_tokens": 40,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "stop_sequences": ["END"],
    });
    let (status, body) = send(&gw, "/v1/messages", &h, message.clone()).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["stop_reason"], "end_turn");
    let served = mock.served();
    assert_eq!(
        v["usage"]["input_tokens"].as_u64(),
        Some(served[0].prompt_tokens)
    );
    assert_eq!(
        v["usage"]["output_tokens"].as_u64(),
        Some(served[0].completion_tokens)
    );

    let mut stream = message.clone();
    stream["stream"] = json!(true);
    let (status, body) = send(&gw, "/v1/messages", &h, stream).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    assert_eq!(events.first().map(String::as_str), Some("message_start"));
    assert!(events.contains(&"content_block_delta".to_owned()));
    assert_eq!(
        &events[events.len() - 2..],
        ["message_delta", "message_stop"],
        "{body}"
    );
    let delta = sse_data(&body)
        .into_iter()
        .find(|d| d["type"] == "message_delta")
        .unwrap();
    assert_eq!(
        delta["usage"]["output_tokens"].as_u64(),
        Some(mock.served()[1].completion_tokens)
    );

    // An error is in Anthropic's shape here too.
    let (status, body) = send(
        &gw,
        "/v1/messages",
        &h,
        json!({"model": "nope", "max_tokens": 1, "messages": []}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["type"],
        "not_found_error"
    );

    let seen = mock.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.path, "/v1/chat/completions");
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {OPENAI_KEY}").as_str())
        );
        assert_eq!(
            r.header("anthropic-version"),
            None,
            "Anthropic headers stay home"
        );
        let b = r.json().unwrap();
        assert_eq!(
            b["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(b["stop"], json!(["END"]));
    }
    assert_eq!(
        seen[1].json().unwrap()["stream_options"],
        json!({"include_usage": true})
    );
    let served = mock.served();
    let rows = ledger(&gw, 3).await;
    assert_eq!(rows[0].1, cost(&served[0], GPT));
    assert_eq!(rows[1].1, cost(&served[1], GPT));
    assert_eq!(
        rows[2],
        ("nope".to_owned(), 0),
        "the refused request costs nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_serves_native_clients_and_openai_clients_through_translation() {
    let mock = MockServer::start().await;
    let gw = start(gemini_channel(&mock, "gem-x")).await;
    let key = gw.new_key("acme", &[]);
    let h = [
        ("x-goog-api-key", key.as_str()),
        ("x-mock", r#"{"cached_tokens": 4}"#),
    ];
    let native = json!({"contents": [{"role": "user", "parts": [{"text": "hello"}]}]});
    let (status, body) = send(
        &gw,
        "/v1beta/models/gem-x:generateContent",
        &h,
        native.clone(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["candidates"][0]["content"]["parts"][0]["text"].is_string());
    assert_eq!(v["usageMetadata"]["cachedContentTokenCount"], 4);
    let (status, body) = send(
        &gw,
        "/v1beta/models/gem-x:streamGenerateContent?alt=sse",
        &h,
        native,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(sse_data(&body)
        .iter()
        .any(|d| d["candidates"][0]["finishReason"] == "STOP"));

    let auth = format!("Bearer {key}");
    let oh = [
        ("authorization", auth.as_str()),
        ("x-mock", r#"{"cached_tokens": 4}"#),
    ];
    let chat = json!({"model": "gem-x", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 30});
    let (status, body) = send(&gw, "/v1/chat/completions", &oh, chat.clone()).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["choices"][0]["message"]["content"].is_string());
    let mut stream = chat;
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let (status, body) = send(&gw, "/v1/chat/completions", &oh, stream).await;
    assert_eq!(status, 200, "{body}");
    let data = sse_data(&body);
    assert_eq!(data.last(), Some(&json!("[DONE]")), "{body}");
    assert_eq!(data.iter().filter(|c| c["usage"].is_object()).count(), 1);

    // Unknown key: Google's error shape.
    let (status, body) = send(
        &gw,
        "/v1beta/models/gem-x:generateContent",
        &[("x-goog-api-key", "sk-tg-nope")],
        json!({"contents": []}),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["status"],
        "UNAUTHENTICATED"
    );

    let seen = mock.requests();
    assert_eq!(seen.len(), 4);
    let paths: Vec<(&str, Option<&str>)> = seen
        .iter()
        .map(|r| (r.path.as_str(), r.query.as_deref()))
        .collect();
    assert_eq!(
        paths,
        [
            ("/v1beta/models/gem-x:generateContent", None),
            (
                "/v1beta/models/gem-x:streamGenerateContent",
                Some("alt=sse")
            ),
            ("/v1beta/models/gem-x:generateContent", None),
            (
                "/v1beta/models/gem-x:streamGenerateContent",
                Some("alt=sse")
            ),
        ]
    );
    for r in &seen {
        assert_eq!(r.header("x-goog-api-key"), Some(GEMINI_KEY));
        assert_eq!(r.header("authorization"), None);
    }
    assert_eq!(
        seen[2].json().unwrap()["generationConfig"]["maxOutputTokens"],
        30
    );
    let served = mock.served();
    assert_eq!(served.len(), 4);
    let rows = ledger(&gw, 4).await;
    for (i, u) in served.iter().enumerate() {
        assert_eq!(u.cached_tokens, 4);
        assert_eq!(rows[i].1, cost(u, GEM), "request {i}: {u:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_fails_over_from_an_anthropic_channel_to_an_openai_one_with_translation() {
    // The Anthropic provider is down (529, overloaded); the OpenAI-compatible one serves.
    let down = MockServer::start_with(Behaviour {
        status: Some(529),
        ..Behaviour::default()
    })
    .await;
    let up = MockServer::start().await;
    let channels = anthropic_channel(&down, "claude-x", 10) + &openai_channel(&up, "claude-x", 0);
    let gw = start(channels).await;
    let key = gw.new_key("acme", &[]);
    let auth = format!("Bearer {key}");
    let chat = json!({"model": "claude-x", "messages": [{"role": "user", "content": "hello"}], "stream": true});
    let (status, body) = send(
        &gw,
        "/v1/chat/completions",
        &[("authorization", &auth)],
        chat,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sse_data(&body).last(), Some(&json!("[DONE]")));
    assert_eq!(
        down.requests()[0].path,
        "/v1/messages",
        "tried first, translated"
    );
    assert_eq!(up.requests()[0].path, "/v1/chat/completions");
    // The other way: an Anthropic client whose Anthropic channel is down.
    let h = [
        ("x-api-key", key.as_str()),
        ("anthropic-version", "2023-06-01"),
    ];
    let message = json!({"model": "claude-x", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = send(&gw, "/v1/messages", &h, message).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["type"],
        "message"
    );
    assert_eq!(down.requests().len(), 2);
    assert_eq!(up.requests()[1].path, "/v1/chat/completions");
    // Billed once each, from the provider that served (at claude-x's price).
    let served = up.served();
    let rows = ledger(&gw, 2).await;
    assert_eq!(rows[0].1, cost(&served[0], CLAUDE));
    assert_eq!(rows[1].1, cost(&served[1], CLAUDE));
}
