//! Observability against the real binary: the metric families and what they count, the
//! latency summary, timing headers, CPU profiles (on demand and from the monitor), the admin
//! token on every admin and debug route, the JSON access log, and the deploy files.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use pprof::protos::Message;
use serde_json::{json, Value};
use support::{post, Gateway, MockServer};

/// Whole nano-USD per token: m1 2000 in, 1000 cached, 8000 out.
const PRICING: &str = "pricing:\n  models:\n    m1: { input: 2.00, output: 8.00, cached_input: 1.00 }\n  unpriced: free\n";

const SECRET_UPSTREAM: &str = "sk-upstream-observability-secret";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

async fn start(extra: &str) -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: \"{SECRET_UPSTREAM}\", models: [m1, free-model], read_timeout_ms: 10000 }}\n",
        mock.base_url()
    );
    let extra = format!("{PRICING}{extra}");
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, &extra))
        .await
        .unwrap();
    (mock, gw)
}

async fn admin(gw: &Gateway, method: reqwest::Method, path: &str) -> reqwest::Response {
    client()
        .request(method, gw.admin_url(path))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap()
}

async fn metrics_text(gw: &Gateway) -> String {
    let r = admin(gw, reqwest::Method::GET, "/metrics").await;
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// Samples of the exposition text: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The sum of every sample of `name` whose labels contain all of `labels` (`k="v"`).
fn sum(s: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    s.iter()
        .filter(|(k, _)| {
            let (n, rest) = k.split_once('{').unwrap_or((k.as_str(), ""));
            n == name && labels.iter().all(|l| rest.contains(l))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Metric names (sample names: `_bucket`, `_sum`, `_count` included) the gateway exports.
fn exported_names(text: &str) -> BTreeSet<String> {
    samples(text)
        .keys()
        .map(|k| k.split('{').next().unwrap().to_string())
        .collect()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]})
}

/// Reads a whole response (a stream to its end).
async fn drain(r: reqwest::Response) -> String {
    let mut out = String::new();
    let mut body = r.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(20), body.next())
        .await
        .expect("body chunk in time")
    {
        out.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    out
}

/// Waits (bounded) until `cond` holds for the metrics text.
async fn wait_metrics(gw: &Gateway, what: &str, cond: impl Fn(&BTreeMap<String, f64>) -> bool) {
    wait_metrics_for(gw, what, Duration::from_secs(15), cond).await
}

async fn wait_metrics_for(
    gw: &Gateway,
    what: &str,
    limit: Duration,
    cond: impl Fn(&BTreeMap<String, f64>) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        let text = metrics_text(gw).await;
        if cond(&samples(&text)) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}; metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const FAMILIES: [&str; 17] = [
    "tollgate_requests_total",
    "tollgate_request_duration_seconds_bucket",
    "tollgate_ttft_seconds_bucket",
    "tollgate_upstream_duration_seconds_bucket",
    "tollgate_gateway_overhead_seconds_bucket",
    "tollgate_tokens_total",
    "tollgate_cost_usd_total",
    "tollgate_ratelimited_total",
    "tollgate_channel_up",
    "tollgate_channel_inflight",
    "tollgate_streams_open",
    "tollgate_estimated_usage_total",
    "tollgate_ledger_batch_rows_bucket",
    "tollgate_ledger_commit_seconds_bucket",
    "tollgate_ledger_lag_rows",
    "tollgate_build_info",
    "tollgate_upstream_attempts_total",
];

fn assert_timing_headers(r: &reqwest::Response, what: &str) {
    let h = r.headers();
    let rt: f64 = h
        .get("x-response-time-ms")
        .unwrap_or_else(|| panic!("{what}: no X-Response-Time-Ms in {h:?}"))
        .to_str()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{what}: X-Response-Time-Ms not a number: {e}"));
    assert!((0.0..60_000.0).contains(&rt), "{what}: {rt}");
    let st = h
        .get("server-timing")
        .unwrap_or_else(|| panic!("{what}: no Server-Timing in {h:?}"))
        .to_str()
        .unwrap();
    assert!(
        st.contains("gateway;dur=") && st.contains("upstream;dur="),
        "{what}: {st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_family_is_exported_grows_with_traffic_and_tokens_and_cost_match_the_ledger() {
    let (_mock, gw) = start("").await;
    let key = gw.new_key("acme", &[]);
    let before = samples(&metrics_text(&gw).await);
    for i in 0..6 {
        let r = post(&gw, &key, "/v1/chat/completions", &chat("m1", i % 2 == 1)).await;
        assert_eq!(r.status(), 200);
        assert_timing_headers(&r, "200");
        if i % 2 == 1 {
            let st = r.headers()["server-timing"].to_str().unwrap().to_string();
            assert!(st.contains("ttft;dur="), "{st}");
            assert!(drain(r).await.contains("[DONE]"));
        } else {
            drain(r).await;
        }
    }
    // Cached tokens, and a model without a price.
    let mut body = chat("m1", false);
    body["x_mock"] = json!({"cached_tokens": 3});
    assert_eq!(
        post(&gw, &key, "/v1/chat/completions", &body)
            .await
            .status(),
        200
    );
    let r = post(&gw, &key, "/v1/chat/completions", &chat("free-model", true)).await;
    drain(r).await;
    // A cut stream is settled on an estimate.
    let mut body = chat("m1", true);
    body["x_mock"] = json!({"truncate_after": 1, "chunks": 3});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    let _ = r.bytes().await;
    // 4xx and 5xx carry the timing headers too.
    let r = post(
        &gw,
        "sk-tg-wrong",
        "/v1/chat/completions",
        &chat("m1", false),
    )
    .await;
    assert_eq!(r.status(), 401);
    assert_timing_headers(&r, "401");
    let r = post(&gw, &key, "/v1/chat/completions", &chat("nope", false)).await;
    assert_eq!(r.status(), 404);
    assert_timing_headers(&r, "404");
    let mut body = chat("m1", false);
    body["x_mock"] = json!({"status": 500});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 502);
    assert_timing_headers(&r, "502");
    let mut body = chat("m1", false);
    body["x_mock"] = json!({"status": 400});
    let r = post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 400);
    assert_timing_headers(&r, "relayed 400");

    // Metrics are recorded after billing queued the request's ledger row: once all 13 are
    // counted and the ledger has no lag, every row is committed.
    wait_metrics(&gw, "every request counted and committed", |s| {
        sum(s, "tollgate_requests_total", &[]) >= 13.0
            && sum(s, "tollgate_ledger_lag_rows", &[]) == 0.0
    })
    .await;
    let usage: Value = admin(&gw, reqwest::Method::GET, "/admin/usage?account=acme")
        .await
        .json()
        .await
        .unwrap();
    let text = metrics_text(&gw).await;
    let after = samples(&text);
    let names = exported_names(&text);
    for f in FAMILIES {
        assert!(names.contains(f), "{f} not exported:\n{text}");
    }
    // Counters and histograms grew with JSON and streaming traffic.
    let grew = |name: &str, labels: &[&str]| sum(&after, name, labels) > sum(&before, name, labels);
    for (name, labels) in [
        ("tollgate_requests_total", vec![r#"status="200""#]),
        ("tollgate_requests_total", vec![r#"status="401""#]),
        ("tollgate_requests_total", vec![r#"status="502""#]),
        (
            "tollgate_request_duration_seconds_count",
            vec![r#"stream="true""#],
        ),
        (
            "tollgate_request_duration_seconds_count",
            vec![r#"stream="false""#],
        ),
        ("tollgate_ttft_seconds_count", vec![r#"model="m1""#]),
        ("tollgate_ttft_seconds_count", vec![r#"model="free-model""#]),
        (
            "tollgate_upstream_duration_seconds_count",
            vec![r#"channel="main""#],
        ),
        ("tollgate_gateway_overhead_seconds_count", vec![]),
        ("tollgate_tokens_total", vec![r#"kind="prompt""#]),
        ("tollgate_tokens_total", vec![r#"kind="completion""#]),
        ("tollgate_tokens_total", vec![r#"kind="cached""#]),
        ("tollgate_cost_usd_total", vec![r#"model="m1""#]),
        ("tollgate_estimated_usage_total", vec![r#"reason="cut""#]),
        ("tollgate_ledger_batch_rows_count", vec![]),
        ("tollgate_ledger_commit_seconds_count", vec![]),
        ("tollgate_upstream_attempts_total", vec![r#"outcome="ok""#]),
    ] {
        assert!(
            grew(name, &labels),
            "{name}{labels:?} did not grow:\n{text}"
        );
    }
    // The client's unknown model is `other`, never its own label value.
    assert!(!text.contains("model=\"nope\""));
    assert!(sum(&after, "tollgate_requests_total", &[r#"model="other""#]) >= 1.0);
    assert_eq!(
        sum(&after, "tollgate_channel_up", &[r#"channel="main""#]),
        1.0
    );
    assert_eq!(sum(&after, "tollgate_streams_open", &[]), 0.0);
    assert_eq!(sum(&after, "tollgate_ledger_lag_rows", &[]), 0.0);
    assert!(text.contains("tollgate_build_info{commit="));

    // Tokens and cost match the ledger totals exactly.
    for (kind, field) in [
        ("prompt", "prompt_tokens"),
        ("completion", "completion_tokens"),
        ("cached", "cached_tokens"),
    ] {
        assert_eq!(
            sum(
                &after,
                "tollgate_tokens_total",
                &[&format!("kind=\"{kind}\"")]
            ),
            usage[field].as_u64().unwrap() as f64,
            "{kind}: {usage}"
        );
    }
    let ledger_usd = usage["cost_nano"].as_i64().unwrap() as f64 / 1e9;
    assert!(ledger_usd > 0.0);
    let metric_usd = sum(&after, "tollgate_cost_usd_total", &[]);
    assert!(
        (metric_usd - ledger_usd).abs() < 1e-9,
        "metrics {metric_usd} vs ledger {ledger_usd}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimited_total_counts_each_reason_once_per_refused_request() {
    // With the admission queue off, a key at its concurrency cap is refused at once (with
    // it on, the request would wait for the slot instead).
    let (mock, gw) =
        start("limits:\n  ip: { failed_auth_per_min: 2 }\nqueue: { enabled: false }\n").await;
    let cli_ok = |args: &[&str]| {
        let out = gw.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .trim()
            .to_string()
    };
    let rpm = gw.new_key("rpm", &["--rpm", "1"]);
    let tpm = gw.new_key("tpm", &["--tpm", "10"]);
    let conc = gw.new_key("conc", &["--concurrency", "1"]);
    let budget = gw.new_key("budget", &["--budget-usd", "0.000000001"]);
    cli_ok(&["accounts", "create", "broke", "--balance-usd", "0"]);
    let broke = cli_ok(&["keys", "create", "--account", "broke"]);

    let expect = |r: &reqwest::Response, code: u16| assert_eq!(r.status(), code);
    // rpm: the second request in the minute.
    expect(
        &post(&gw, &rpm, "/v1/chat/completions", &chat("m1", false)).await,
        200,
    );
    expect(
        &post(&gw, &rpm, "/v1/chat/completions", &chat("m1", false)).await,
        429,
    );
    // tpm: the request alone is over the key's tokens per minute.
    expect(
        &post(&gw, &tpm, "/v1/chat/completions", &chat("m1", false)).await,
        429,
    );
    // quota: the account holds nothing; budget: the key's budget is one nano-USD.
    let r = post(&gw, &broke, "/v1/chat/completions", &chat("m1", false)).await;
    expect(&r, 429);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "insufficient_quota"
    );
    let r = post(&gw, &budget, "/v1/chat/completions", &chat("m1", false)).await;
    expect(&r, 429);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "insufficient_quota"
    );
    // concurrency: a second request while a held stream takes the key's one slot.
    let mut held = chat("m1", true);
    held["x_mock"] = json!({"gate": true, "chunks": 2});
    let r = post(&gw, &conc, "/v1/chat/completions", &held).await;
    expect(&r, 200);
    let mut stream = r.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap();
    assert!(first.is_some());
    expect(
        &post(&gw, &conc, "/v1/chat/completions", &chat("m1", false)).await,
        429,
    );
    mock.open_gate();
    while let Some(c) = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
    {
        c.unwrap();
    }
    // ip: two failed authentications, then the address is refused before the key lookup.
    for _ in 0..2 {
        expect(
            &post(
                &gw,
                "sk-tg-nope",
                "/v1/chat/completions",
                &chat("m1", false),
            )
            .await,
            401,
        );
    }
    expect(
        &post(
            &gw,
            "sk-tg-nope",
            "/v1/chat/completions",
            &chat("m1", false),
        )
        .await,
        429,
    );

    wait_metrics(&gw, "every reason counted", |s| {
        sum(s, "tollgate_ratelimited_total", &[]) >= 6.0
    })
    .await;
    // Let anything late land, then check each reason was counted exactly once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = samples(&metrics_text(&gw).await);
    for reason in ["rpm", "tpm", "concurrency", "ip", "quota", "budget"] {
        assert_eq!(
            sum(
                &s,
                "tollgate_ratelimited_total",
                &[&format!("reason=\"{reason}\"")]
            ),
            1.0,
            "{reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_brackets_the_latencies_the_client_observed_and_resets() {
    let (_mock, gw) = start("metrics: { summary_window_s: 600 }\n").await;
    let key = gw.new_key("acme", &[]);
    let mut observed = Vec::new();
    for i in 0..20u64 {
        let mut body = chat("m1", false);
        body["x_mock"] = json!({"delay_ms": 20 + i * 10});
        let t = Instant::now();
        let r = post(&gw, &key, "/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        observed.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    observed.sort_by(f64::total_cmp);
    let (min, max) = (observed[0], observed[observed.len() - 1]);
    // The summary is recorded at the very end of each request; wait for the last one.
    let deadline = Instant::now() + Duration::from_secs(10);
    let v = loop {
        let v: Value = admin(&gw, reqwest::Method::GET, "/admin/metrics/summary")
            .await
            .json()
            .await
            .unwrap();
        if v["overall"]["total"]["count"] == 20 {
            break v;
        }
        assert!(Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(v["window_s"], 600);
    let total = &v["overall"]["total"];
    let q = |k: &str| total[k].as_f64().unwrap();
    // The gateway's own measure is what the client saw (its HDR buckets are 1%), plus the
    // work done after the last byte went out (settling, the ledger row), which a loaded
    // machine can stretch by some milliseconds: a generous upper bound, never a tight
    // timing. The mock sleeps at least 20 ms, so nothing sits below that.
    let upper = max * 1.01 + 50.0;
    for k in ["p50_ms", "p95_ms", "p99_ms", "max_ms"] {
        assert!(
            q(k) >= 20.0 && q(k) <= upper,
            "{k} {} not in [20, {upper}] (client max {max})",
            q(k)
        );
    }
    // At least the tenth-longest provider delay (110 ms), within the histogram's 1 %.
    assert!(
        q("p50_ms") >= 110.0 * 0.99,
        "p50 {} vs the median provider delay (client min {min})",
        q("p50_ms")
    );
    let median = observed[observed.len() / 2];
    // Lower bounds from what the mock was told to sleep, not from the client's clock (which a
    // loaded machine stretches by tens of ms the gateway never sees): every request's total
    // includes its provider delay, so the p99 is at least the second-longest one (200 ms),
    // within the histogram's 1 %.
    let second_longest_delay = (20 + 18 * 10) as f64;
    assert!(
        q("p50_ms") <= median * 1.01 + 50.0 && q("p99_ms") >= second_longest_delay * 0.99,
        "{total} vs {observed:?}"
    );
    assert!(q("p50_ms") <= q("p95_ms") && q("p95_ms") <= q("p99_ms"));
    for m in ["ttft", "upstream", "gateway_overhead"] {
        assert_eq!(v["overall"][m]["count"], 20, "{m}: {v}");
    }
    let upstream_p50 = v["overall"]["upstream"]["p50_ms"].as_f64().unwrap();
    assert!(upstream_p50 >= 20.0 && upstream_p50 <= q("p50_ms") * 1.01);
    // The overhead leaves the provider's time out: its median sits below the upstream's.
    assert!(v["overall"]["gateway_overhead"]["p50_ms"].as_f64().unwrap() < upstream_p50);
    assert_eq!(v["models"]["m1"]["total"]["count"], 20);

    // `tollgate status` shows the same gateway on one screen.
    let out = gw.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["uptime", "req/s", "p99", "channels    1/1 up", "ledger lag"] {
        assert!(text.contains(want), "{want}: {text}");
    }

    let r = admin(&gw, reqwest::Method::POST, "/admin/metrics/reset").await;
    assert_eq!(r.status(), 200);
    let v: Value = admin(&gw, reqwest::Method::GET, "/admin/metrics/summary")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["overall"]["total"]["count"], 0, "{v}");
}

/// Keeps the gateway busy until the returned sender is dropped.
fn load(gw: &Gateway, key: &str) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    let url = gw.url("/v1/chat/completions");
    let key = key.to_string();
    tokio::spawn(async move {
        let c = client();
        loop {
            let req = c
                .post(&url)
                .bearer_auth(&key)
                .json(&chat("m1", false))
                .send();
            tokio::select! {
                _ = &mut rx => return,
                r = req => { if let Ok(r) = r { let _ = r.bytes().await; } }
            }
        }
    });
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pprof_returns_a_protobuf_that_decodes_and_an_svg_that_is_well_formed() {
    let (_mock, gw) =
        start("limits:\n  default: { rpm: 1000000, tpm: 1000000000, concurrency: 64 }\n").await;
    let key = gw.new_key("acme", &[]);
    let stop = load(&gw, &key);
    let r = admin(&gw, reqwest::Method::GET, "/debug/pprof/profile?seconds=1").await;
    assert_eq!(r.status(), 200);
    let bytes = r.bytes().await.unwrap();
    let profile = pprof::protos::Profile::decode(bytes.as_ref()).expect("pprof protobuf");
    assert!(!profile.sample_type.is_empty());
    assert!(!profile.string_table.is_empty());
    assert!(profile.duration_nanos > 0);

    let r = admin(
        &gw,
        reqwest::Method::GET,
        "/debug/pprof/profile?seconds=1&format=svg",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    let svg = r.text().await.unwrap();
    // inferno's SVG starts with an SVG 1.1 DOCTYPE.
    let opts = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(&svg, opts).expect("well-formed SVG");
    assert!(svg.contains("<rect"), "a flamegraph with frames");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    drop(stop);

    // Bad parameters are refused, and one profile runs at a time.
    let r = admin(&gw, reqwest::Method::GET, "/debug/pprof/profile?seconds=0").await;
    assert_eq!(r.status(), 400);
    let long = client()
        .get(gw.admin_url("/debug/pprof/profile?seconds=2"))
        .bearer_auth(&gw.admin_token)
        .send();
    let second = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        admin(&gw, reqwest::Method::GET, "/debug/pprof/profile?seconds=1").await
    };
    let (a, b) = tokio::join!(long, second);
    assert_eq!(a.unwrap().status(), 200);
    assert_eq!(b.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cpu_monitor_writes_a_profile_when_cpu_stays_over_a_low_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "limits:\n  default: {{ rpm: 1000000, tpm: 1000000000, concurrency: 64 }}\nprofiling:\n  cpu_monitor: true\n  cpu_threshold_percent: 1\n  sustain_s: 1\n  sample_interval_s: 1\n  profile_s: 1\n  cooldown_s: 1\n  keep: 2\n  dir: \"{}\"\n",
        dir.path().display()
    );
    let (_mock, gw) = start(&extra).await;
    let key = gw.new_key("acme", &[]);
    let stop = load(&gw, &key);
    // Three profiles, so that `keep: 2` has had to delete one.
    wait_metrics_for(
        &gw,
        "three profiles written",
        Duration::from_secs(60),
        |s| sum(s, "tollgate_cpu_profiles_total", &[]) >= 3.0,
    )
    .await;
    drop(stop);
    let s = samples(&metrics_text(&gw).await);
    assert!(sum(&s, "tollgate_process_cpu_percent", &[]) >= 0.0);
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pb"))
        .collect();
    assert!(!files.is_empty() && files.len() <= 2, "{files:?}");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let p = pprof::protos::Profile::decode(bytes.as_slice()).expect("pprof protobuf");
        assert!(!p.string_table.is_empty(), "{f:?}");
    }
    assert!(gw.log().contains("CPU profile written"));
}

const ADMIN_ROUTES: [(&str, &str); 16] = [
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/admin/metrics/summary"),
    ("POST", "/admin/metrics/reset"),
    ("GET", "/admin/status"),
    ("GET", "/admin/accounts"),
    ("POST", "/admin/accounts"),
    ("GET", "/admin/keys"),
    ("GET", "/admin/usage"),
    ("GET", "/admin/pricing"),
    ("POST", "/admin/cache/keys/invalidate"),
    ("GET", "/debug/pprof/profile?seconds=1"),
    ("GET", "/debug/pprof/profile?seconds=1&format=svg"),
    ("GET", "/admin/nowhere"),
    ("GET", "/debug/nowhere"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_debug_routes_answer_401_without_the_token() {
    let (_mock, gw) = start("").await;
    for (method, path) in ADMIN_ROUTES {
        for token in ["", "wrong-token"] {
            let code = support::raw_status(gw.admin_port, method, path, token, "");
            assert_eq!(code, Some(401), "{method} {path} with {token:?}");
        }
    }
    // With the token they answer (not 401).
    for (method, path) in [("GET", "/admin/metrics/summary"), ("GET", "/admin/status")] {
        let code = support::raw_status(gw.admin_port, method, path, &gw.admin_token, "");
        assert_eq!(code, Some(200), "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_public_opens_only_the_probes_and_the_scrape() {
    let (_mock, gw) = start("metrics: { public: true }\n").await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(support::probe(gw.admin_port, path, ""), Some(200), "{path}");
    }
    for (method, path) in ADMIN_ROUTES.iter().skip(3) {
        let code = support::raw_status(gw.admin_port, method, path, "", "");
        assert_eq!(code, Some(401), "{method} {path}");
    }
}

fn access_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v["target"] == "access")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_access_log_parses_line_by_line_and_carries_no_secret() {
    let (_mock, gw) = start("log: { format: json }\n").await;
    let key = gw.new_key("acme", &[]);
    let mut ids = Vec::new();
    for stream in [false, true] {
        let r = post(&gw, &key, "/v1/chat/completions", &chat("m1", stream)).await;
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
        drain(r).await;
    }
    let r = post(
        &gw,
        "sk-tg-not-a-real-key-0123456789",
        "/v1/chat/completions",
        &chat("m1", false),
    )
    .await;
    assert_eq!(r.status(), 401);
    // Lines are written off the request threads; wait for the three.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = access_lines(&gw.log());
        if lines.len() >= 3 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 3, "{}", gw.log());
    let log = gw.log();
    assert!(!log.contains(&key), "the key's secret is in the log");
    assert!(
        !log.contains(&key[12..]),
        "part of the key's secret is in the log"
    );
    assert!(!log.contains("sk-tg-not-a-real-key-0123456789"));
    assert!(!log.contains(SECRET_UPSTREAM));
    let ok = lines
        .iter()
        .find(|l| l["request_id"] == ids[1].as_str())
        .expect("the stream's line");
    assert_eq!(ok["key"], &key[..12]);
    assert_eq!(ok["account"], "acme");
    assert_eq!(ok["model"], "m1");
    assert_eq!(ok["channel"], "main");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["stream"], true);
    assert_eq!(ok["attempts"], 1);
    assert!(ok["prompt_tokens"].as_u64().unwrap() > 0);
    assert!(ok["completion_tokens"].as_u64().unwrap() > 0);
    assert!(ok["cost_nano"].as_i64().unwrap() > 0);
    assert!(ok["cost_usd"].as_str().unwrap().starts_with("0."));
    for f in ["latency_ms", "upstream_ms", "gateway_ms", "ttft_ms"] {
        assert!(ok[f].as_f64().unwrap() >= 0.0, "{f}: {ok}");
    }
    let refused = lines.iter().find(|l| l["status"] == 401).unwrap();
    assert_eq!(refused["key"], "-");
    assert_eq!(refused["error"], "invalid_api_key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metrics_and_the_access_log_off_no_request_is_counted_or_logged() {
    let (_mock, gw) =
        start("metrics: { enabled: false }\nlog: { format: json, access: false }\n").await;
    let key = gw.new_key("acme", &[]);
    let r = post(&gw, &key, "/v1/chat/completions", &chat("m1", false)).await;
    assert_eq!(r.status(), 200);
    // The headers do not depend on the metrics filter.
    assert_timing_headers(&r, "200 with metrics off");
    r.bytes().await.unwrap();
    // Wait until the ledger has the row (the request is over), then look.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let u: Value = admin(&gw, reqwest::Method::GET, "/admin/usage")
            .await
            .json()
            .await
            .unwrap();
        if u["requests"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = metrics_text(&gw).await;
    assert!(!text.contains("tollgate_requests_total{"), "{text}");
    assert!(text.contains("tollgate_ledger_rows_total 1"));
    assert!(access_lines(&gw.log()).is_empty(), "{}", gw.log());
}

/// Metric names a PromQL expression refers to.
fn metric_refs(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("tollgate_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        out.insert(expr[start..end].to_string());
        i = end;
    }
    out
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml_docs(path: &str) -> Vec<serde_norway::Value> {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            <serde_norway::Value as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{path}: {e}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_files_parse_and_name_only_metrics_tollgate_exports() {
    // What a gateway that has served a request exports.
    let (_mock, gw) = start("").await;
    let key = gw.new_key("acme", &[]);
    drain(post(&gw, &key, "/v1/chat/completions", &chat("m1", true)).await).await;
    wait_metrics(&gw, "a request counted", |s| {
        sum(s, "tollgate_requests_total", &[]) >= 1.0
            && sum(s, "tollgate_ledger_rows_total", &[]) >= 1.0
    })
    .await;
    let exported = exported_names(&metrics_text(&gw).await);

    let prom = &yaml_docs("deploy/prometheus.yml")[0];
    assert!(prom["scrape_configs"][0]["job_name"].as_str() == Some("tollgate"));
    let rule_files = prom["rule_files"].as_sequence().unwrap();
    assert!(rule_files
        .iter()
        .any(|f| f.as_str().unwrap().ends_with("alerts.yml")));

    // Alert rules: promtool when it is installed, and always the structure and the names.
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("deploy/alerts.yml"))
        .output()
    {
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let rules = &yaml_docs("deploy/alerts.yml")[0];
    let mut alerts = BTreeSet::new();
    let mut referenced = BTreeSet::new();
    for group in rules["groups"].as_sequence().unwrap() {
        assert!(group["name"].as_str().is_some());
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().expect("every rule is an alert");
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            assert!(
                rule["annotations"]["summary"].as_str().is_some(),
                "{name}: no summary"
            );
            let refs = metric_refs(expr);
            assert!(!refs.is_empty() || expr.contains("up{"), "{name}: {expr}");
            referenced.extend(refs);
            alerts.insert(name.to_string());
        }
    }
    for want in [
        "TollgateChannelDown",
        "TollgateErrorRatio",
        "TollgateLedgerLag",
        "TollgateGatewayOverheadP99",
        "TollgateCpuProfileCaptured",
    ] {
        assert!(alerts.contains(want), "{want} missing: {alerts:?}");
    }

    // The dashboard.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/dashboards/tollgate.json")).unwrap(),
    )
    .unwrap();
    let mut dash_refs = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            dash_refs.extend(metric_refs(t["expr"].as_str().unwrap()));
        }
    }
    for family in [
        "tollgate_requests_total",
        "tollgate_request_duration_seconds_bucket",
        "tollgate_ttft_seconds_bucket",
        "tollgate_gateway_overhead_seconds_bucket",
        "tollgate_tokens_total",
        "tollgate_cost_usd_total",
        "tollgate_ratelimited_total",
        "tollgate_channel_up",
        "tollgate_channel_inflight",
        "tollgate_ledger_lag_rows",
    ] {
        assert!(dash_refs.contains(family), "the dashboard has no {family}");
    }
    referenced.extend(dash_refs);
    let unknown: Vec<_> = referenced.difference(&exported).collect();
    assert!(unknown.is_empty(), "not exported by tollgate: {unknown:?}");

    // Kubernetes manifests: every document parses and has its kind; the ConfigMap's
    // config is one tollgate accepts.
    let mut kinds = BTreeSet::new();
    for f in [
        "namespace.yaml",
        "secret.yaml",
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "servicemonitor.yaml",
        "kustomization.yaml",
    ] {
        for doc in yaml_docs(&format!("deploy/k8s/{f}")) {
            kinds.insert(doc["kind"].as_str().expect("kind").to_string());
            if doc["kind"] == "Deployment" {
                let c = &doc["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(
                    c["readinessProbe"]["httpGet"]["path"].as_str(),
                    Some("/readyz")
                );
            }
            if doc["kind"] == "ConfigMap" {
                let conf = doc["data"]["tollgate.yaml"].as_str().unwrap();
                let path = gw.dir.path().join("k8s.yaml");
                std::fs::write(&path, conf).unwrap();
                let out = std::process::Command::new(support::tollgate_bin())
                    .args(["check-config", "--config"])
                    .arg(&path)
                    .env("OPENAI_API_KEY", "sk-test")
                    .env(
                        "TOLLGATE_ADMIN_TOKEN",
                        "k8s-test-admin-token-0123456789abcdef",
                    )
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "k8s config: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
    for k in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(k), "{k} missing: {kinds:?}");
    }
    // Compose brings up the four services, Prometheus with the rules.
    let compose = &yaml_docs("deploy/compose.yaml")[0];
    for s in ["tollgate", "redis", "prometheus", "grafana"] {
        assert!(compose["services"][s].is_mapping(), "{s}");
    }
    let prom_volumes = format!("{:?}", compose["services"]["prometheus"]["volumes"]);
    assert!(prom_volumes.contains("alerts.yml"), "{prom_volumes}");
}
