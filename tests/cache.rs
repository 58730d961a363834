//! The response cache against the real binary, a real SQLite file and the mock upstream:
//! hits that never reach the provider, replays across forms (stream ↔ JSON), accounts kept
//! apart, sampling, refresh, coalescing, what is never stored, TTL, LRU, and billing.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Gateway, MockServer};

/// m1: 2000 nano-USD per prompt token, 8000 per completion token.
const PRICING: &str =
    "pricing:\n  models:\n    m1: { input: 2.00, output: 8.00 }\n  unpriced: reject\n";

async fn start(cache: &str) -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1] }}\n",
        mock.base_url()
    );
    let extra = format!("{PRICING}{cache}");
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, &extra))
        .await
        .unwrap();
    (mock, gw)
}

fn memory(extra: &str) -> String {
    format!("cache:\n  responses: {{ backend: memory, ttl_s: 60{extra} }}\n")
}

struct Answer {
    status: u16,
    cache: String,
    age: Option<u64>,
    content_type: String,
    text: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|_| panic!("{}", self.text))
    }
}

async fn send(gw: &Gateway, key: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut rb = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.expect("gateway answers");
    let h = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (cache, age, content_type) = (
        h("x-tollgate-cache").unwrap_or_default(),
        h("age").and_then(|a| a.parse().ok()),
        h("content-type").unwrap_or_default(),
    );
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    Answer {
        status,
        cache,
        age,
        content_type,
        text,
    }
}

fn chat(content: &str) -> Value {
    json!({"model": "m1", "temperature": 0, "messages": [{"role": "user", "content": content}]})
}

/// The text of an SSE chat stream, and its usage event's object if any.
fn stream_text(sse: &str) -> (String, Option<Value>, bool) {
    let mut text = String::new();
    let mut usage = None;
    let mut done = false;
    for line in sse.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    (text, usage, done)
}

async fn metric(gw: &Gateway, line_start: &str) -> Option<f64> {
    let text = reqwest::Client::new()
        .get(gw.admin_url("/metrics"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn db(gw: &Gateway) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_is_a_hit_that_never_reaches_the_provider_and_accounts_never_share() {
    let (mock, gw) = start(&memory("")).await;
    let key = gw.new_key("acme", &[]);
    let first = send(&gw, &key, &chat("hello"), &[]).await;
    assert_eq!((first.status, first.cache.as_str()), (200, "miss"));
    assert_eq!(mock.requests().len(), 1);
    let again = send(&gw, &key, &chat("hello"), &[]).await;
    assert_eq!((again.status, again.cache.as_str()), (200, "hit"));
    assert!(again.age.is_some_and(|a| a < 60), "Age on a hit");
    assert_eq!(
        again.json(),
        first.json(),
        "the same answer, id and created included"
    );
    assert_eq!(mock.requests().len(), 1, "a hit never reaches the provider");
    // The access line says what the cache did (the log is written every 50 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("cache=\"hit\"") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.log();
    assert!(
        log.contains("cache=\"miss\"") && log.contains("cache=\"hit\""),
        "{log}"
    );

    // Key order and fields that cannot change the answer do not make another entry.
    let reordered = json!({"messages": [{"content": "hello", "role": "user"}], "user": "u-9", "temperature": 0, "model": "m1"});
    assert_eq!(send(&gw, &key, &reordered, &[]).await.cache, "hit");

    // Another account's identical request misses.
    let other = gw.new_key("other", &[]);
    let theirs = send(&gw, &other, &chat("hello"), &[]).await;
    assert_eq!(theirs.cache, "miss");
    assert_eq!(mock.requests().len(), 2);

    // Sampling requests bypass unless the client says `on`; `off` always bypasses.
    let sampled = json!({"model": "m1", "messages": [{"role": "user", "content": "poem"}]});
    for _ in 0..2 {
        assert_eq!(send(&gw, &key, &sampled, &[]).await.cache, "bypass");
    }
    assert_eq!(mock.requests().len(), 4);
    let on = [("x-tollgate-cache", "on")];
    assert_eq!(send(&gw, &key, &sampled, &on).await.cache, "miss");
    assert_eq!(send(&gw, &key, &sampled, &on).await.cache, "hit");
    assert_eq!(mock.requests().len(), 5);
    let off = [("x-tollgate-cache", "off")];
    assert_eq!(send(&gw, &key, &chat("hello"), &off).await.cache, "bypass");
    assert_eq!(mock.requests().len(), 6);

    // `refresh` goes upstream and replaces the entry.
    let refreshed = send(
        &gw,
        &key,
        &chat("hello"),
        &[("x-tollgate-cache", "refresh")],
    )
    .await;
    assert_eq!(refreshed.cache, "miss");
    assert_eq!(mock.requests().len(), 7);
    assert_ne!(refreshed.json()["id"], first.json()["id"]);
    let after = send(&gw, &key, &chat("hello"), &[]).await;
    assert_eq!(
        (after.cache.as_str(), after.json()["id"].clone()),
        ("hit", refreshed.json()["id"].clone())
    );

    // Bad header values are refused before anything is read or sent.
    for (h, v) in [
        ("x-tollgate-cache", "maybe"),
        ("x-tollgate-cache-ttl", "soon"),
        ("x-tollgate-cache-ttl", "0"),
    ] {
        let a = send(&gw, &key, &chat("hello"), &[(h, v)]).await;
        assert_eq!(a.status, 400, "{h}: {v}");
        assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(mock.requests().len(), 7);

    let hits = metric(
        &gw,
        "tollgate_cache_requests_total{cache=\"responses\",result=\"hit\"}",
    )
    .await;
    let bytes = metric(&gw, "tollgate_cache_bytes{cache=\"responses\"}").await;
    assert_eq!(hits, Some(4.0));
    assert!(bytes.is_some_and(|b| b > 0.0), "{bytes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_stream_serves_json_and_a_stored_json_answer_serves_a_stream() {
    let (mock, gw) = start(&memory("")).await;
    let key = gw.new_key("acme", &[]);
    // A stream first (the client did not ask for usage: tollgate asked and stripped it).
    let mut streamed = chat("stream first");
    streamed["stream"] = json!(true);
    streamed["x_mock"] = json!({"chunks": 4});
    let s = send(&gw, &key, &streamed, &[]).await;
    assert_eq!(
        (s.cache.as_str(), s.content_type.as_str()),
        ("miss", "text/event-stream")
    );
    let (text, usage, done) = stream_text(&s.text);
    assert!(done && usage.is_none());
    let served = mock.served()[0].clone();
    // The same request without `stream`: the stored stream as one chat completion.
    let mut plain = streamed.clone();
    plain.as_object_mut().unwrap().remove("stream");
    let j = send(&gw, &key, &plain, &[]).await;
    assert_eq!(
        (j.cache.as_str(), j.content_type.as_str()),
        ("hit", "application/json")
    );
    let v = j.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], served.prompt_tokens);
    assert_eq!(v["usage"]["completion_tokens"], served.completion_tokens);
    // And as a stream with include_usage: the usage chunk, then [DONE].
    let mut with_usage = streamed.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let su = send(&gw, &key, &with_usage, &[]).await;
    assert_eq!(su.cache, "hit");
    let (text2, usage2, done2) = stream_text(&su.text);
    assert_eq!(text2, text);
    assert!(done2);
    assert_eq!(
        usage2.unwrap()["completion_tokens"],
        served.completion_tokens
    );
    assert_eq!(mock.requests().len(), 1);

    // A JSON answer first, then asked for as a stream.
    let jfirst = chat("json first");
    let j1 = send(&gw, &key, &jfirst, &[]).await;
    assert_eq!(j1.cache, "miss");
    let original = j1.json();
    let mut as_stream = jfirst.clone();
    as_stream["stream"] = json!(true);
    as_stream["stream_options"] = json!({"include_usage": true});
    let s2 = send(&gw, &key, &as_stream, &[]).await;
    assert_eq!(
        (s2.cache.as_str(), s2.content_type.as_str()),
        ("hit", "text/event-stream")
    );
    let (text3, usage3, done3) = stream_text(&s2.text);
    assert!(done3);
    assert_eq!(
        text3,
        original["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
    );
    assert_eq!(usage3.unwrap(), original["usage"]);
    assert!(
        s2.text.contains(original["id"].as_str().unwrap()),
        "the original id"
    );
    as_stream.as_object_mut().unwrap().remove("stream_options");
    let s3 = send(&gw, &key, &as_stream, &[]).await;
    let (_, usage4, _) = stream_text(&s3.text);
    assert!(usage4.is_none(), "no usage chunk unless asked");
    assert_eq!(mock.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_requests_make_one_upstream_call() {
    let (mock, gw) = start(&memory("")).await;
    let key = gw.new_key("acme", &[]);
    let gw = std::sync::Arc::new(gw);
    let mut body = chat("together");
    body["x_mock"] = json!({"delay_ms": 400});
    let run = |body: Value| {
        let (gw, key) = (gw.clone(), key.clone());
        tokio::spawn(async move { send(&gw, &key, &body, &[]).await })
    };
    let all: Vec<_> = (0..10).map(|_| run(body.clone())).collect();
    let mut answers = Vec::new();
    for h in all {
        answers.push(h.await.unwrap());
    }
    assert_eq!(
        mock.requests().len(),
        1,
        "one upstream call for ten requests"
    );
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(answers.iter().filter(|a| a.cache == "miss").count(), 1);
    let id = answers[0].json()["id"].clone();
    assert!(answers.iter().all(|a| a.json()["id"] == id));

    // A leader whose answer fails stores nothing: the waiters go upstream themselves.
    let mut failing = chat("fails");
    failing["x_mock"] = json!({"delay_ms": 300, "status": 500});
    let all: Vec<_> = (0..4).map(|_| run(failing.clone())).collect();
    for h in all {
        assert_eq!(h.await.unwrap().status, 502);
    }
    assert_eq!(mock.requests().len(), 5);
    assert_eq!(send(&gw, &key, &failing, &[]).await.cache, "miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_truncated_or_oversized_answers_are_never_stored() {
    let (mock, gw) = start(&memory(", max_entry_bytes: 4096, max_bytes: 65536")).await;
    let key = gw.new_key("acme", &[]);
    let cases = [
        json!({"truncate_after": 2}),
        json!({"omit_done": true}),
        json!({"error_after": 1}),
        json!({"usage": "none"}),
        json!({"big_line_bytes": 8000}),
    ];
    for (i, x) in cases.iter().enumerate() {
        let mut b = chat(&format!("case {i}"));
        b["stream"] = json!(true);
        b["x_mock"] = x.clone();
        let before = mock.requests().len();
        let _ = send(&gw, &key, &b, &[]).await;
        let again = send(&gw, &key, &b, &[]).await;
        assert_eq!(again.cache, "miss", "{x}");
        assert_eq!(mock.requests().len(), before + 2, "{x}");
    }
    let mut b = chat("error status");
    b["x_mock"] = json!({"status": 400});
    assert_eq!(send(&gw, &key, &b, &[]).await.status, 400);
    assert_eq!(send(&gw, &key, &b, &[]).await.cache, "miss");
    // The control: a complete stream is stored.
    let mut ok = chat("complete");
    ok["stream"] = json!(true);
    let _ = send(&gw, &key, &ok, &[]).await;
    assert_eq!(send(&gw, &key, &ok, &[]).await.cache, "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_by_ttl_and_the_least_recently_used_go_first() {
    let (mock, gw) = start(&memory(", max_bytes: 2500, max_entry_bytes: 1000")).await;
    let key = gw.new_key("acme", &[]);
    // The client's TTL (bounded by ttl_s).
    let short = [("x-tollgate-cache-ttl", "1")];
    assert_eq!(send(&gw, &key, &chat("brief"), &short).await.cache, "miss");
    assert_eq!(send(&gw, &key, &chat("brief"), &[]).await.cache, "hit");
    let deadline = Instant::now() + Duration::from_secs(10);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    loop {
        let a = send(&gw, &key, &chat("brief"), &[]).await;
        if a.cache == "miss" {
            break;
        }
        assert!(Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each answer weighs about 500 bytes: five fit, the first out is the least recently used.
    for i in 0..4 {
        let _ = send(&gw, &key, &chat(&format!("entry {i}")), &[]).await;
    }
    // Entry 0 used again: entry 1 is now the least recently used.
    assert_eq!(send(&gw, &key, &chat("entry 0"), &[]).await.cache, "hit");
    for i in 4..8 {
        let _ = send(&gw, &key, &chat(&format!("entry {i}")), &[]).await;
    }
    let n = mock.requests().len();
    assert_eq!(send(&gw, &key, &chat("entry 7"), &[]).await.cache, "hit");
    assert_eq!(send(&gw, &key, &chat("entry 1"), &[]).await.cache, "miss");
    assert_eq!(mock.requests().len(), n + 1);
    let bytes = metric(&gw, "tollgate_cache_bytes{cache=\"responses\"}")
        .await
        .unwrap();
    assert!(bytes > 0.0 && bytes <= 2500.0, "{bytes}");
    let evicted = metric(&gw, "tollgate_cache_evictions_total{cache=\"responses\"}")
        .await
        .unwrap();
    assert!(evicted >= 3.0, "{evicted}");
}

/// `(prompt, completion, cost_nano, cache_hit)` of every row, in time order.
fn rows(gw: &Gateway) -> Vec<(i64, i64, i64, i64)> {
    let c = db(gw);
    let mut st = c
        .prepare("SELECT prompt_tokens, completion_tokens, cost_nano, cache_hit FROM usage_ledger ORDER BY ts, request_id")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn balance(gw: &Gateway, account: &str) -> i64 {
    db(gw)
        .query_row(
            "SELECT balance_nano FROM accounts WHERE name = ?1",
            [account],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_billed_free_full_or_by_ratio_exactly_and_marked_in_the_ledger() {
    for (bill, ppm) in [
        ("free", 0i64),
        ("full", 1_000_000),
        ("\"ratio:0.123457\"", 123_457),
    ] {
        let (mock, gw) = start(&memory(&format!(", bill: {bill}"))).await;
        let key = gw.new_key("acme", &[]);
        let before = balance(&gw, "acme");
        assert_eq!(send(&gw, &key, &chat("priced"), &[]).await.cache, "miss");
        assert_eq!(send(&gw, &key, &chat("priced"), &[]).await.cache, "hit");
        let served = mock.served()[0].clone();
        let full = (served.prompt_tokens * 2000 + served.completion_tokens * 8000) as i64;
        let hit = (full * ppm + 500_000) / 1_000_000;
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = loop {
            let r = rows(&gw);
            if r.len() == 2 {
                break r;
            }
            assert!(Instant::now() < deadline, "ledger has {} rows", r.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (p, c) = (served.prompt_tokens as i64, served.completion_tokens as i64);
        assert_eq!(got, vec![(p, c, full, 0), (p, c, hit, 1)], "bill {bill}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while balance(&gw, "acme") != before - full - hit {
            assert!(
                Instant::now() < deadline,
                "balance moved by the ledger's sum"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = gw.cli(&["usage", "--account", "acme"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("CACHE_HITS"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_takes_no_channel_slot_and_still_counts_against_limits() {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1], max_concurrency: 1 }}\n",
        mock.base_url()
    );
    let extra = format!("{PRICING}queue: {{ timeout_ms: 300 }}\n{}", memory(""));
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, &extra))
        .await
        .unwrap();
    let key = gw.new_key("acme", &["--rpm", "4"]);
    assert_eq!(send(&gw, &key, &chat("slot"), &[]).await.cache, "miss");
    // A gated stream holds the channel's one slot.
    let hold = json!({"model": "m1", "stream": true, "messages": [],
                      "x_mock": {"chunks": 3, "gate": true}});
    let holder = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&hold)
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status(), 200);
    // The hit is served while the slot is held; an uncached request waits and times out.
    let hit = send(&gw, &key, &chat("slot"), &[]).await;
    assert_eq!((hit.status, hit.cache.as_str()), (200, "hit"));
    let other = send(&gw, &key, &chat("not cached"), &[]).await;
    assert_eq!(
        (other.status, other.json()["error"]["code"].clone()),
        (429, json!("queue_timeout"))
    );
    // requests/min counts hits: the key's 4 are used up.
    let limited = send(&gw, &key, &chat("slot"), &[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.json()["error"]["code"], "rate_limit_exceeded");
    mock.open_gate();
    let _ = holder.text().await;
    assert_eq!(mock.requests().len(), 2, "the miss and the holder only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_client_left_is_not_stored() {
    use futures_util::StreamExt;
    let (mock, gw) = start(&memory("")).await;
    let key = gw.new_key("acme", &[]);
    let mut b = chat("leaving");
    b["stream"] = json!(true);
    b["x_mock"] = json!({"chunks": 20, "delay_ms": 20});
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&b)
        .send()
        .await
        .unwrap();
    let mut body = r.bytes_stream();
    let _ = body.next().await;
    drop(body);
    // The gateway reads on for the usage (the mock serves all 20 chunks), then stores nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.served().is_empty() {
        assert!(Instant::now() < deadline, "the mock never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = send(&gw, &key, &b, &[]).await;
    assert_eq!((again.status, again.cache.as_str()), (200, "miss"));
    assert_eq!(mock.requests().len(), 2);
    assert_eq!(
        send(&gw, &key, &b, &[]).await.cache,
        "hit",
        "the complete answer is"
    );
}

/// `GET` a page of tollgate's own with an optional `If-None-Match`: status, ETag, body.
async fn page(gw: &Gateway, path: &str, key: &str, tag: Option<&str>) -> (u16, String, String) {
    let mut rb = reqwest::Client::new().get(gw.url(path)).bearer_auth(key);
    if let Some(t) = tag {
        rb = rb.header("if-none-match", t);
    }
    let r = rb.send().await.expect("gateway answers");
    let status = r.status().as_u16();
    let etag = r
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, etag, r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_pricing_pages_carry_an_etag_and_answer_304_when_it_matches() {
    let (_mock, gw) = start("  expose: true\n").await;
    let key = gw.new_key("acme", &[]);
    for path in ["/v1/models", "/api/pricing"] {
        let (status, tag, body) = page(&gw, path, &key, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(
            tag.len() == 34 && tag.starts_with('"'),
            "{path}: strong tag {tag:?}"
        );
        let (status, again, _) = page(&gw, path, &key, None).await;
        assert_eq!(
            (status, again.as_str()),
            (200, tag.as_str()),
            "{path}: stable"
        );
        // The tag (in a list, weak or strong) or `*`: 304 and no body.
        for asked in [tag.clone(), format!("\"x\", W/{tag}"), "*".to_string()] {
            let (status, etag, body) = page(&gw, path, &key, Some(&asked)).await;
            assert_eq!(status, 304, "{path} with If-None-Match {asked}");
            assert_eq!(etag, tag);
            assert!(body.is_empty(), "{path}: a 304 has no body");
        }
        // Another tag: the page again.
        let (status, _, body) = page(&gw, path, &key, Some("\"0000\"")).await;
        assert_eq!(status, 200, "{path}");
        assert!(!body.is_empty());
    }
    // Another key sees another model list: another tag.
    let narrow = gw.new_key("acme", &["--models", "m1"]);
    let (_, wide_tag, _) = page(&gw, "/v1/models", &key, None).await;
    let (status, _, _) = page(&gw, "/v1/models", &narrow, Some(&wide_tag)).await;
    let (_, narrow_tag, _) = page(&gw, "/v1/models", &narrow, None).await;
    assert_eq!(status == 304, narrow_tag == wide_tag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_new_keys_reach_the_store_once_however_many_ask_at_once() {
    // The pre-auth guard off, so every request reaches the key lookup.
    let (mock, gw) = start(
        "limits: { ip: { failed_auth_per_min: 0 } }\nauth: { negative_cache_ttl_ms: 30000 }\n",
    )
    .await;
    let lookups = |result: &'static str| {
        let gw = &gw;
        async move {
            let line = format!("tollgate_key_store_lookups_total{{result=\"{result}\"}}");
            metric(gw, &line).await.unwrap_or(0.0)
        }
    };
    // 1,000 requests with one unknown key, 50 at a time: one store lookup.
    let client = reqwest::Client::new();
    let mut answered = 0;
    for _ in 0..20 {
        let batch = (0..50).map(|_| {
            client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth("sk-tg-unknownunknownunknown0000")
                .json(&chat("hello"))
                .send()
        });
        for r in futures_util::future::join_all(batch).await {
            assert_eq!(r.expect("answered").status(), 401);
            answered += 1;
        }
    }
    assert_eq!(answered, 1000);
    assert_eq!(
        lookups("unknown").await,
        1.0,
        "negative caching and single flight"
    );
    // 100 concurrent first requests with a new key: one store lookup, 100 answers. Creating
    // the key changes the key epoch, and the gateway empties its key cache when it sees
    // that (within 250 ms): the burst waits for it, or the emptying would cost a lookup.
    let emptied = |gw: &Gateway| gw.log().matches("key cache emptied").count();
    let before = emptied(&gw);
    let key = gw.new_key("acme", &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while emptied(&gw) == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(emptied(&gw) > before, "the gateway saw the new key's epoch");
    let bodies: Vec<Value> = (0..100).map(|i| chat(&format!("q{i}"))).collect();
    let all = bodies.iter().map(|b| send(&gw, &key, b, &[]));
    for a in futures_util::future::join_all(all).await {
        assert_eq!(a.status, 200, "{}", a.text);
    }
    assert_eq!(lookups("found").await, 1.0);
    assert_eq!(mock.requests().len(), 100);
}
