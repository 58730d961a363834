//! Admission against the real binary: the priority queue (order, deadline, fair share, aging,
//! a client leaving, no leak), limits per model and per account, image estimates, and the
//! pre-auth guard. One channel with `max_concurrency: 1` (or a few) in front of the mock;
//! a request held on the mock's gate keeps the channel full while others queue. Orderings,
//! never tight durations, are asserted.

mod support;

use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use support::{Gateway, MockServer};

const PROVIDER_KEY: &str = "sk-provider-admission";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// One channel serving `m` and `m2` with `max_concurrency`, and `extra` YAML.
async fn gateway(max_concurrency: u32, extra: &str) -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\", models: [m, m2], max_concurrency: {max_concurrency}, read_timeout_ms: 60000 }}\n",
        mock.base_url()
    );
    let extra = extra.to_string();
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, &extra))
        .await
        .unwrap();
    (mock, gw)
}

fn new_key(gw: &Gateway, account: &str, flags: &[&str]) -> String {
    gw.new_key(account, flags)
}

fn body(name: &str, x_mock: Value) -> Value {
    json!({"model": "m", "user": name, "max_tokens": 10,
           "messages": [{"role": "user", "content": "hello"}], "x_mock": x_mock})
}

/// Sends a chat request with headers; returns the response.
async fn send(gw: &Gateway, key: &str, b: &Value, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(b);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("gateway answers")
}

async fn readyz(gw: &Gateway) -> Value {
    client()
        .get(gw.admin_url("/readyz"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (bounded) until `n` requests wait in the queue.
async fn queued(gw: &Gateway, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = readyz(gw).await;
        if v["admission"]["queue"]["waiting"] == n {
            return;
        }
        assert!(Instant::now() < deadline, "never {n} waiting: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (bounded) until nothing is held: channel slots, queue, concurrency places, tokens
/// counted, money reserved.
async fn idle(gw: &Gateway) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = readyz(gw).await;
        let a = &v["admission"];
        let quiet = v["channels"]["main"]["in_use"] == 0
            && a["queue"]["waiting"] == 0
            && a["queue"]["concurrency_held"] == 0
            && a["tokens_held"] == 0
            && a["reserved_nano"] == 0;
        if quiet {
            return v;
        }
        assert!(Instant::now() < deadline, "still held: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `user` of every request the mock received, in arrival order.
fn served(mock: &MockServer) -> Vec<String> {
    mock.requests()
        .iter()
        .filter_map(|r| r.json())
        .map(|v| v["user"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Starts a streamed request the mock holds after its first chunk (until `open_gate`):
/// it keeps the channel's one slot.
async fn hold(gw: &Gateway, key: &str) -> reqwest::Response {
    let b = json!({"model": "m", "user": "holder", "stream": true, "messages": [],
                   "x_mock": {"chunks": 3, "gate": true}});
    let r = send(gw, key, &b, &[]).await;
    assert_eq!(r.status(), 200);
    r
}

async fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = client()
        .get(gw.admin_url("/metrics"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_priority_request_queued_behind_ten_low_ones_is_served_second() {
    let (mock, gw) = gateway(1, "").await;
    let key = new_key(&gw, "acme", &["--max-priority", "9"]);
    let holder = hold(&gw, &key).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let (gw_url, key) = (gw.url("/v1/chat/completions"), key.clone());
        let b = body(&format!("low{i}"), json!({}));
        tasks.push(tokio::spawn(async move {
            client()
                .post(gw_url)
                .bearer_auth(key)
                .header("x-tollgate-priority", "0")
                .json(&b)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
        queued(&gw, i + 1).await;
    }
    let (gw_url, k) = (gw.url("/v1/chat/completions"), key.clone());
    let high = tokio::spawn(async move {
        let r = client()
            .post(gw_url)
            .bearer_auth(k)
            .header("x-tollgate-priority", "9")
            .json(&body("high", json!({})))
            .send()
            .await
            .unwrap();
        let waited: u64 = r.headers()["x-tollgate-queue-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        (r.status().as_u16(), waited)
    });
    queued(&gw, 11).await;
    let v = readyz(&gw).await;
    assert_eq!(v["admission"]["queue"]["by_class"][0], 10, "{v}");
    assert_eq!(v["admission"]["queue"]["by_class"][9], 1, "{v}");
    mock.open_gate();
    holder.text().await.unwrap();
    let (status, waited) = high.await.unwrap();
    assert_eq!(status, 200);
    assert!(waited > 0);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let order = served(&mock);
    let mut want = vec!["holder".to_string(), "high".to_string()];
    want.extend((0..10).map(|i| format!("low{i}")));
    assert_eq!(order, want);
    idle(&gw).await;
    assert!(
        metric(
            &gw,
            "tollgate_queue_outcomes_total{outcome=\"admitted_after_wait\"}"
        )
        .await
            >= 11.0
    );
    assert!(metric(&gw, "tollgate_queue_wait_seconds_count").await >= 11.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_queue_deadline_gets_queue_timeout_and_never_reaches_the_provider() {
    let (mock, gw) = gateway(1, "queue: { timeout_ms: 20000 }\n").await;
    let key = new_key(&gw, "acme", &[]);
    let holder = hold(&gw, &key).await;
    let seen = mock.requests().len();
    let t0 = Instant::now();
    let r = send(
        &gw,
        &key,
        &body("late", json!({})),
        &[("x-tollgate-queue-timeout-ms", "400")],
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let waited: u64 = r.headers()["x-tollgate-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(r.headers()["x-should-retry"], "true");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "queue_timeout");
    // At the deadline: not before it, and long before the configured 20 s.
    assert!(
        waited >= 400 && took >= Duration::from_millis(400),
        "{waited} {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(mock.requests().len(), seen, "the provider never saw it");
    mock.open_gate();
    holder.text().await.unwrap();
    idle(&gw).await;
    assert!(metric(&gw, "tollgate_queue_outcomes_total{outcome=\"timed_out\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_tenant_shares_a_saturated_channel_with_a_burst_of_another() {
    let (mock, gw) = gateway(1, "").await;
    let big = new_key(&gw, "big", &[]);
    let small = new_key(&gw, "small", &[]);
    let holder = hold(&gw, &big).await;
    let mut tasks = Vec::new();
    let spawn = |key: &str, name: String| {
        let (url, key) = (gw.url("/v1/chat/completions"), key.to_string());
        tokio::spawn(async move {
            client()
                .post(url)
                .bearer_auth(key)
                .json(&body(&name, json!({"delay_ms": 5})))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    for i in 0..20 {
        tasks.push(spawn(&big, format!("big{i}")));
    }
    queued(&gw, 20).await;
    for i in 0..2 {
        tasks.push(spawn(&small, format!("small{i}")));
    }
    queued(&gw, 22).await;
    mock.open_gate();
    holder.text().await.unwrap();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let order = served(&mock);
    assert_eq!(order.len(), 23);
    let last_small = order.iter().rposition(|u| u.starts_with("small")).unwrap();
    // Within the first third of the run (23 requests): fair share alternates the tenants.
    assert!(last_small < 23 / 3, "{order:?}");
    idle(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aging_serves_a_low_priority_request_under_a_steady_high_priority_stream() {
    let (mock, gw) = gateway(1, "queue: { aging_ms: 100 }\n").await;
    let key = new_key(&gw, "acme", &["--max-priority", "9"]);
    let holder = hold(&gw, &key).await;
    let (url, k) = (gw.url("/v1/chat/completions"), key.clone());
    let low = tokio::spawn(async move {
        client()
            .post(url)
            .bearer_auth(k)
            .header("x-tollgate-priority", "0")
            .json(&body("low", json!({})))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    queued(&gw, 1).await;
    // Three senders keep high-priority requests waiting all the time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut stream = Vec::new();
    for s in 0..3 {
        let (url, k, stop) = (gw.url("/v1/chat/completions"), key.clone(), stop.clone());
        stream.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2000 {
                let r = client()
                    .post(&url)
                    .bearer_auth(&k)
                    .header("x-tollgate-priority", "9")
                    .json(&body(&format!("high{s}-{n}"), json!({"delay_ms": 5})))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                n += 1;
            }
        }));
    }
    queued(&gw, 4).await;
    mock.open_gate();
    holder.text().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(60), low)
        .await
        .expect("the low-priority request is served in bounded time")
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(status, 200);
    for t in stream {
        t.await.unwrap();
    }
    let order = served(&mock);
    let at = order.iter().position(|u| u == "low").unwrap();
    assert!(
        at > 1,
        "high-priority requests went first for a while: {order:?}"
    );
    idle(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_queued_frees_its_place_reservation_and_tokens() {
    use std::io::Write;
    let price = "pricing:\n  models: { m: { input: 1.0, output: 2.0 } }\n";
    let (mock, gw) = gateway(1, price).await;
    let key = new_key(&gw, "acme", &["--tpm", "1000000"]);
    let holder = hold(&gw, &key).await;
    let before = readyz(&gw).await["admission"].clone();
    let b = serde_json::to_vec(&body("leaver", json!({}))).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        b.len()
    )
    .unwrap();
    s.write_all(&b).unwrap();
    queued(&gw, 1).await;
    let during = readyz(&gw).await["admission"].clone();
    // Waiting, it holds its reservation and its tokens/min estimate.
    assert!(
        during["reserved_nano"].as_i64() > before["reserved_nano"].as_i64(),
        "{during}"
    );
    assert!(
        during["tokens_held"].as_u64() > before["tokens_held"].as_u64(),
        "{during}"
    );
    drop(s);
    // It leaves at once: nothing reads from the client until then, so this is the
    // connection watch at work, well before any deadline (30 s by default).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = readyz(&gw).await["admission"].clone();
        if now["queue"]["waiting"] == 0 && now == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still queued or held: {now} vs {before}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(metric(&gw, "tollgate_queue_outcomes_total{outcome=\"left\"}").await >= 1.0);
    mock.open_gate();
    holder.text().await.unwrap();
    idle(&gw).await;
    assert!(
        !served(&mock).contains(&"leaver".to_string()),
        "the provider never saw it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_mixed_queued_requests_leave_no_slot_place_token_or_reservation_behind() {
    let price = "pricing:\n  models: { m: { input: 1.0, output: 2.0 } }\nqueue: { max_depth: 40, aging_ms: 50 }\n";
    let (mock, gw) = gateway(3, price).await;
    let keys = [
        new_key(&gw, "a", &["--concurrency", "2", "--tpm", "100000000"]),
        new_key(&gw, "b", &["--max-priority", "9"]),
        new_key(&gw, "c", &["--priority", "1"]),
    ];
    let url = gw.url("/v1/chat/completions");
    let mut tasks = Vec::new();
    for w in 0..32usize {
        let (url, keys) = (url.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let mut codes = std::collections::BTreeMap::<String, u32>::new();
            for n in 0..(2000 / 32 + 1) {
                let i = w * 100 + n;
                if w + 32 * n >= 2000 {
                    break;
                }
                let key = &keys[i % 3];
                let mut req = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .unwrap()
                    .post(&url)
                    .bearer_auth(key)
                    .header("x-tollgate-priority", (i % 10).to_string())
                    .json(&body(&format!("r{i}"), json!({"delay_ms": i % 3})));
                match i % 4 {
                    // A short deadline: some time out in the queue.
                    0 => req = req.header("x-tollgate-queue-timeout-ms", "3"),
                    // The client gives up (disconnects) while queued or being served.
                    1 => req = req.timeout(Duration::from_millis(2)),
                    _ => req = req.timeout(Duration::from_secs(60)),
                }
                let code = match req.send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        if s == 429 {
                            let v: Value = r.json().await.unwrap_or_default();
                            v["error"]["code"].as_str().unwrap_or("429").to_string()
                        } else {
                            let _ = r.bytes().await;
                            s.to_string()
                        }
                    }
                    Err(_) => "left".to_string(),
                };
                *codes.entry(code).or_default() += 1;
            }
            codes
        }));
    }
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for t in tasks {
        for (c, n) in tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .expect("bounded")
            .unwrap()
        {
            *codes.entry(c).or_default() += n;
        }
    }
    assert_eq!(codes.values().sum::<u32>(), 2000, "{codes:?}");
    assert!(codes.get("200").copied().unwrap_or(0) > 0, "{codes:?}");
    assert!(
        codes.get("queue_timeout").copied().unwrap_or(0) > 0,
        "{codes:?}"
    );
    assert!(codes.get("left").copied().unwrap_or(0) > 0, "{codes:?}");
    let v = idle(&gw).await;
    assert_eq!(v["admission"]["queue"]["by_class"], json!(vec![0; 10]));
    assert!(!mock.requests().is_empty());
    eprintln!("outcomes: {codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_and_per_account_limits_refuse_at_their_threshold_and_headers_report_the_tightest(
) {
    let extra = "limits:\n  models: { m2: { rpm: 2 } }\n  accounts: { acme: { rpm: 3 } }\n";
    let (_mock, gw) = gateway(8, extra).await;
    let other = new_key(&gw, "other", &["--rpm", "100"]);
    let m2 = |user: &str| json!({"model": "m2", "user": user, "messages": []});
    for i in 0..2 {
        let r = send(&gw, &other, &m2(&format!("x{i}")), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["x-ratelimit-limit-requests"],
            "2",
            "the model's 2/min"
        );
    }
    let r = send(&gw, &other, &m2("x3"), &[]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("on this model"));
    // Model m is not limited; the key's 100/min is what shows.
    let r = send(&gw, &other, &body("y", json!({})), &[]).await;
    assert_eq!(r.headers()["x-ratelimit-limit-requests"], "100");

    // Two keys of one account share its 3/min.
    let a = new_key(&gw, "acme", &["--rpm", "100"]);
    let b = new_key(&gw, "acme", &["--rpm", "100"]);
    for (i, k) in [&a, &b, &a].iter().enumerate() {
        let r = send(&gw, k, &body(&format!("a{i}"), json!({})), &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit-requests"], "3");
        assert_eq!(
            r.headers()["x-ratelimit-remaining-requests"],
            (2 - i).to_string().as_str()
        );
    }
    let r = send(&gw, &b, &body("a3", json!({})), &[]).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("on this account"));

    // A key's own limit on one model (--model-limits), tighter than everything else.
    let km = new_key(&gw, "km", &["--model-limits", "m=rpm:1,tpm:5000"]);
    let r = send(&gw, &km, &body("k0", json!({})), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "5000");
    let r = send(&gw, &km, &body("k1", json!({})), &[]).await;
    assert_eq!(r.status(), 429);
    idle(&gw).await;
}

/// The first bytes of a PNG of `w`×`h`, as a data URL (the header is all the estimate reads).
fn png(w: u32, h: u32) -> String {
    let mut v = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    v.extend_from_slice(&w.to_be_bytes());
    v.extend_from_slice(&h.to_be_bytes());
    v.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(v)
    )
}

fn two_images(detail: &str) -> Value {
    json!({"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": png(1024, 1024), "detail": detail}},
        {"type": "image_url", "image_url": {"url": png(1024, 1024), "detail": detail}},
    ]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_high_detail_images_are_estimated_and_limited_by_the_tile_formula() {
    let (_mock, gw) = gateway(4, "").await;
    let key = new_key(
        &gw,
        "acme",
        &["--tpm", "100000", "--model-limits", "m=images_per_min:3"],
    );
    let counted = |r: &reqwest::Response| {
        100_000
            - r.headers()["x-ratelimit-remaining-tokens"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
    };
    let r = send(&gw, &key, &two_images("high"), &[]).await;
    assert_eq!(r.status(), 200);
    let high = counted(&r);
    // 1024×1024 at high detail: scaled to 768×768, 4 tiles, 85 + 4 × 170 = 765 each; plus
    // 10 output tokens and the text (a few dozen tokens at bytes / 4).
    assert!((1530 + 10..1530 + 10 + 200).contains(&high), "{high}");
    // The refund after the response makes the next count start from a fresh remaining;
    // a second key isolates the low-detail measurement.
    let key2 = new_key(&gw, "acme2", &["--tpm", "100000"]);
    let r = send(&gw, &key2, &two_images("low"), &[]).await;
    assert_eq!(r.status(), 200);
    let low = counted(&r);
    // The bodies differ by "high" → "low" only: 2 × (765 − 85) = 1360 tokens, ± one for the
    // two bytes of text.
    assert!((1359..=1361).contains(&(high - low)), "{high} {low}");
    // Two images of the 3 per minute are used: two more are refused.
    let r = send(&gw, &key, &two_images("high"), &[]).await;
    assert_eq!(r.status(), 429);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("images per minute"));
    idle(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pre_auth_guard_counts_failed_authentications_only() {
    let (_mock, gw) = gateway(64, "").await;
    let key = new_key(&gw, "acme", &[]);
    // 1,000 valid requests from one address, as fast as 16 connections go (well over the
    // guard's 120 failures a minute): none refused.
    let url = gw.url("/v1/chat/completions");
    let run = |secret: String, n: usize| {
        let url = url.clone();
        tokio::spawn(async move {
            let c = client();
            let mut codes = Vec::with_capacity(n);
            for i in 0..n {
                let r = c
                    .post(&url)
                    .bearer_auth(&secret)
                    .json(&json!({"model": "m", "messages": [], "user": format!("u{i}")}))
                    .send()
                    .await
                    .unwrap();
                codes.push(r.status().as_u16());
            }
            codes
        })
    };
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(run(key.clone(), 1000 / 16 + 1));
    }
    let mut ok = 0;
    for t in tasks {
        for c in t.await.unwrap() {
            assert_eq!(c, 200);
            ok += 1;
        }
    }
    assert!(ok >= 1000);
    eprintln!("1,000 valid requests in {:?}", t0.elapsed());
    // 1,000 unknown keys from the same address: the guard refuses past its threshold.
    let mut tasks = Vec::new();
    for t in 0..16 {
        tasks.push(run(format!("sk-tg-unknown{t}"), 1000 / 16 + 1));
    }
    let mut codes = std::collections::BTreeMap::<u16, u32>::new();
    for t in tasks {
        for c in t.await.unwrap() {
            *codes.entry(c).or_default() += 1;
        }
    }
    assert!(codes.get(&429).copied().unwrap_or(0) > 500, "{codes:?}");
    assert!(codes.get(&401).copied().unwrap_or(0) >= 100, "{codes:?}");
    // The guard is per address: until the minute ends, the address is refused whoever asks.
    let r = send(&gw, &key, &body("after", json!({})), &[]).await;
    assert_eq!(r.status(), 429);
}
