//! The relay against the real binary, a real SQLite file and the mock upstream.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{channel, post, wait_exit, Behaviour, Gateway, MockServer};

const PROVIDER_KEY: &str = "sk-provider-SECRET-0123456789abcdef";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// One mock, one channel serving `m1` and an embeddings model, with `gpt-4 → m1` mapped.
async fn single() -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\", models: [m1, m2, emb], model_map: {{ gpt-4: m1 }} }}\n",
        mock.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, ""))
        .await
        .unwrap();
    (mock, gw)
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_embeddings_are_relayed_with_request_id_and_timing() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(rid.starts_with("req_"));
    assert!(r.headers()["server-timing"]
        .to_str()
        .unwrap()
        .contains("upstream;dur="));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["completion_tokens"], 3);

    let r = post(
        &gw,
        &key,
        "/v1/embeddings",
        &json!({"model": "emb", "input": ["a", "b"]}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reaches_the_client_chunk_by_chunk() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let body = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"gate": true, "chunks": 4}});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut stream = r.bytes_stream();
    let mut seen = String::new();
    // The mock holds every chunk after the first until the gate opens: the client must
    // already hold chunk 1 while the mock has sent exactly one content chunk.
    while !seen.contains("tok0") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("chunk 1 must arrive while the upstream is still waiting")
            .unwrap()
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!(mock.chunks_sent(), 1);
    assert!(!seen.contains("tok1"));
    mock.open_gate();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
    {
        seen.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(seen.contains("tok3"));
    assert!(seen.trim_end().ends_with("data: [DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_body_is_forwarded_and_over_limit_gets_413() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let big = "x".repeat(1024 * 1024);
    let body = json!({"messages": [{"role": "user", "content": big}], "model": "m1"});
    let sent = serde_json::to_vec(&body).unwrap();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body(sent.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = mock.requests().last().unwrap().body.clone();
    assert_eq!(got.len(), sent.len());
    assert_eq!(
        &got[..],
        &sent[..],
        "the body must reach the provider byte for byte"
    );

    // The test config sets max_body_bytes to 2 MiB.
    let huge = vec![b'a'; 3 * 1024 * 1024];
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body(huge)
        .send()
        .await
        .unwrap();
    let (status, v) = error_of(r).await;
    assert_eq!(status, 413);
    assert_eq!(v["error"]["code"], "request_too_large");
    assert_eq!(mock.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_gets_400_in_openai_shape() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, v) = error_of(r).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"].is_string());
    assert!(v["error"].as_object().unwrap().contains_key("param"));
    assert!(mock.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_revoked_keys_get_401_from_the_next_request_on() {
    let (_mock, gw) = single().await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth("sk-tg-unknown")
        .json(&chat("m1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-should-retry"], "false");
    let (status, v) = error_of(r).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );

    let key = gw.new_key("acme", &[]);
    let ok = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(ok.status(), 200, "warms the key cache");
    let prefix = &key[..12];
    let out = gw.cli(&["keys", "revoke", prefix]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    let (status, v) = error_of(r).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert!(v["error"]["message"].as_str().unwrap().contains("revoked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_outside_allow_list_gets_403_and_unknown_model_404() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &["--models", "m1"]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m2")).await;
    assert_eq!(r.headers()["x-should-retry"], "false");
    let (status, v) = error_of(r).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let open = gw.new_key("other", &[]);
    let r = post(&gw, &open, "/v1/chat/completions", &chat("nope")).await;
    let (status, v) = error_of(r).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    assert!(mock.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_allow_list_refuses_other_addresses() {
    let (_mock, gw) = single().await;
    let key = gw.new_key("acme", &["--allow-ips", "10.0.0.0/8"]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    let (status, v) = error_of(r).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (403, Some("ip_not_allowed"))
    );
    let local = gw.new_key("local", &["--allow-ips", "127.0.0.0/8"]);
    let r = post(&gw, &local, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_first_channel_fails_over_and_5xx_is_retried_on_the_next_channel() {
    let failing = MockServer::start_with(Behaviour {
        status: Some(503),
        ..Default::default()
    })
    .await;
    let good = MockServer::start().await;
    // Port 1 on loopback: nothing listens there, and no test can take it.
    let channels = [
        channel("dead", "http://127.0.0.1:1", "k1", &["m1"], 30),
        channel("failing", &failing.base_url(), "k2", &["m1", "m5"], 20),
        channel("good", &good.base_url(), "k3", &["m1", "m5"], 10),
    ]
    .concat();
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&channels, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        failing.requests().len(),
        1,
        "the 503 channel was tried after the dead one"
    );
    assert_eq!(good.requests().len(), 1);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m5")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(failing.requests().len(), 2);
    assert_eq!(good.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_channel_fails_the_client_gets_a_502_without_provider_details() {
    let failing = MockServer::start_with(Behaviour {
        status: Some(500),
        ..Default::default()
    })
    .await;
    let ch = channel("only", &failing.base_url(), PROVIDER_KEY, &["m1"], 1);
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    let text = r.text().await.unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["code"], "upstream_error");
    assert!(
        !text.contains(&failing.base_url())
            && !text.contains("127.0.0.1")
            && !text.contains(PROVIDER_KEY)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_map_is_applied_and_models_are_filtered_by_key() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("gpt-4")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.requests()[0].json().unwrap()["model"], "m1");

    let names = |v: Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    let all: Value = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(names(all), ["emb", "gpt-4", "m1", "m2"]);
    let narrow = gw.new_key("narrow", &["--models", "m2,emb"]);
    let some: Value = client()
        .get(gw.url("/v1/models"))
        .bearer_auth(&narrow)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(names(some), ["emb", "m2"]);
    let r = client()
        .get(gw.url("/v1/models/m1"))
        .bearer_auth(&narrow)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_key_never_reaches_the_upstream() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-api-key", &key)
        .header("x-custom", "kept")
        .json(&chat("m1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let req = &mock.requests()[0];
    assert_eq!(
        req.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_eq!(req.header("host"), Some(mock.addr().to_string().as_str()));
    assert_eq!(req.header("x-custom"), Some("kept"));
    for (name, value) in &req.headers {
        assert!(
            !value.contains(&key),
            "client key leaked upstream in {name}"
        );
    }
    assert!(!String::from_utf8_lossy(&req.body).contains(&key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_error_never_leaks_the_channel_key() {
    let (_mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    // A 400 the provider builds around the key it was sent, as some do.
    let body = json!({"model": "m1", "messages": [], "x_mock": {"status": 400, "echo_auth_in_error": true}});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(
        !text.contains(PROVIDER_KEY) && !text.contains("SECRET"),
        "{text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("redacted"));
    // A provider refusing the channel key is not the caller's 401.
    let body = json!({"model": "m1", "messages": [], "x_mock": {"status": 401, "echo_auth_in_error": true}});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 502);
    assert!(!r.text().await.unwrap().contains(PROVIDER_KEY));
    assert!(
        !gw.log().contains(PROVIDER_KEY),
        "the provider key must never be logged"
    );
    assert!(
        !gw.log().contains(&key),
        "the client key must never be logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_truncation_reaches_the_client_as_a_broken_stream() {
    let (_mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let body = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"chunks": 10, "truncate_after": 3}});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut broken = false;
    let mut text = String::new();
    while let Some(item) = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
    {
        match item {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    assert!(broken, "a cut stream must not look complete: {text}");
    assert!(!text.contains("[DONE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_stream_finish() {
    let (mock, mut gw) = single().await;
    let key = gw.new_key("acme", &[]);
    let body = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"chunks": 10, "delay_ms": 150}});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let mut child = gw.sigterm();
    let mut text = String::from_utf8_lossy(&first).to_string();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
    {
        text.push_str(&String::from_utf8_lossy(
            &chunk.expect("the stream must not be cut by SIGTERM"),
        ));
    }
    assert!(
        text.contains("tok9") && text.trim_end().ends_with("data: [DONE]"),
        "{text}"
    );
    assert_eq!(mock.chunks_sent(), 10);
    // Idle after the stream: the gateway exits well before its 10 s grace period.
    let (status, took) =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(15)))
            .await
            .unwrap();
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
    assert!(took < Duration::from_secs(9), "took {took:?}");
    // New connections are refused once draining has begun.
    assert!(client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat("m1"))
        .send()
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_prints_every_error_with_its_path() {
    let (_mock, gw) = single().await;
    let bad = gw.dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "server:\n  listen: nope\n  admin_listen: 127.0.0.1:1\n  threads: 0\nchannels:\n  - name: a\n    base_url: ftp://x\n    models: [m]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "server.listen (line 2)",
        "server.threads (line 4)",
        "channels[0].base_url (line 7)",
    ] {
        assert!(err.contains(want), "missing `{want}` in:\n{err}");
    }
    let out = gw.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_requires_the_token_and_exports_metrics() {
    let (_mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    let r = client().get(gw.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(gw.admin_url("/metrics"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Metrics are recorded in the logging phase, just after the response; poll briefly.
    let want = r#"model="m1",route="chat",status="200"} 1"#;
    let mut text = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        text = client()
            .get(gw.admin_url("/metrics"))
            .bearer_auth(&gw.admin_token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(want) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(text.contains(want), "{text}");
    assert!(text.contains("tollgate_request_duration_seconds_bucket"));
    let r = client()
        .get(gw.admin_url("/readyz"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_works_over_rustls_with_the_channel_ca() {
    let mock = MockServer::start_tls(Behaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, mock.ca_pem().unwrap()).unwrap();
    let url = format!("https://127.0.0.1:{}", mock.addr().port());
    let ch = format!(
        "  - {{ name: tls, base_url: \"{url}\", api_key: k, models: [m1], ca_file: \"{}\" }}\n  - {{ name: untrusted, base_url: \"{url}\", api_key: k, models: [m2] }}\n",
        ca.display()
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    // Without the CA the self-signed certificate is refused: verification is really on.
    // (Asked first: a pooled connection to the same address would otherwise be reused.)
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m2")).await;
    assert_eq!(r.status(), 502);
    assert!(mock.requests().is_empty());
    let body = json!({"model": "m1", "stream": true, "messages": []});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[DONE]"));
    assert_eq!(mock.requests()[0].header("authorization"), Some("Bearer k"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_that_climb_out_of_v1_and_org_headers_never_reach_the_provider() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    // Written raw: HTTP client libraries fold these before sending, attackers do not.
    let body = chat("m1").to_string();
    for path in [
        "/v1/../admin",
        "/v1/%2e%2e/x",
        "/v1/chat/%2E%2E/%2e%2e/admin",
        "/v1//x",
    ] {
        let (port, key, body) = (gw.port, key.clone(), body.clone());
        let status = tokio::task::spawn_blocking(move || {
            support::raw_status(port, "POST", path, &key, &body)
        })
        .await
        .unwrap();
        assert_eq!(status, Some(400), "{path}");
    }
    assert!(mock.requests().is_empty());
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("openai-organization", "org-someone-else")
        .json(&chat("m1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(mock.requests()[0].header("openai-organization"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_key_the_provider_refuses_fails_over() {
    let refusing = MockServer::start_with(Behaviour {
        status: Some(401),
        ..Default::default()
    })
    .await;
    let good = MockServer::start().await;
    let channels = [
        channel("bad-key", &refusing.base_url(), "k1", &["m1"], 20),
        channel("good", &good.base_url(), "k2", &["m1"], 10),
    ]
    .concat();
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&channels, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!((refusing.requests().len(), good.requests().len()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_limits_refuse_with_retry_after_and_ratelimit_headers() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &["--rpm", "2", "--tpm", "100000"]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "2");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "1");
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "100000");
    assert!(r.headers().contains_key("x-ratelimit-reset-tokens"));
    assert_eq!(
        post(&gw, &key, "/v1/chat/completions", &chat("m1"))
            .await
            .status(),
        200
    );
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let (_, v) = error_of(r).await;
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert_eq!(mock.requests().len(), 2);

    // One at a time: a second request while a slow stream runs waits, or with no wait
    // allowed is refused.
    let one = gw.new_key("solo", &["--concurrency", "1"]);
    // The mock holds the stream after its first chunk until the gate opens.
    let held = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"chunks": 5, "gate": true}});
    let first = post(&gw, &one, "/v1/chat/completions", &held).await;
    assert_eq!(first.status(), 200);
    // It does not wait for the slot (the queue would hold it): refused at once.
    let second = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&one)
        .header("x-tollgate-queue-timeout-ms", "0")
        .json(&chat("m1"))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 429);
    let (_, v) = error_of(second).await;
    assert_eq!(v["error"]["code"], "queue_timeout", "{v}");
    mock.open_gate();
    first.text().await.unwrap();
    // The slot is freed in the logging phase, just after the last byte; allow it a moment.
    let mut third = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        third = post(&gw, &one, "/v1/chat/completions", &chat("m1"))
            .await
            .status()
            .as_u16();
        if third == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(third, 200, "the slot came back when the stream ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_less_v1_requests_are_forwarded_by_path_with_the_channel_key() {
    let (mock, gw) = single().await;
    let key = gw.new_key("acme", &[]);
    for (method, path) in [
        (reqwest::Method::GET, "/v1/files/file-abc"),
        (reqwest::Method::DELETE, "/v1/files/file-abc"),
        (reqwest::Method::GET, "/v1/batches"),
    ] {
        let r = client()
            .request(method.clone(), gw.url(path))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{method} {path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["path"], path);
        let seen = mock.requests().last().unwrap().clone();
        assert_eq!(
            (seen.method.as_str(), seen.path.as_str()),
            (method.as_str(), path)
        );
        assert_eq!(
            seen.header("authorization"),
            Some(format!("Bearer {PROVIDER_KEY}").as_str())
        );
    }
    // Still authenticated: no key, no forwarding.
    let before = mock.requests().len();
    let r = client().get(gw.url("/v1/files/x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(mock.requests().len(), before);
}
