//! `tollgate bench --url …`, the user-facing load tool, against the real gateway and the
//! mock upstream: what it counts must match what the gateway served.

mod support;

use std::process::Command;

use serde_json::Value;
use support::{tollgate_bin, Gateway, MockServer};

async fn start() -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = support::channel("main", &mock.base_url(), "sk-up", &["m1"], 0);
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, ""))
        .await
        .unwrap();
    (mock, gw)
}

/// Runs `tollgate bench` with `args`; returns its exit success, parsed JSON and stdout.
fn bench(args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(tollgate_bin())
        .arg("bench")
        .args(args)
        .arg("--json")
        .env_remove("OPENAI_API_KEY")
        .output()
        .expect("run tollgate bench");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v, stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_streams_are_counted_with_first_token_and_usage_as_the_gateway_served_them() {
    let (mock, gw) = start().await;
    let key = gw.new_key("acme", &[]);
    let url = gw.url("/v1");
    let (ok, v, stdout) = bench(&[
        "--url",
        &url,
        "--key",
        &key,
        "--model",
        "m1",
        "-c",
        "4",
        "--requests",
        "40",
        "--duration",
        "30s",
        "--stream",
    ]);
    assert!(ok, "{stdout}");
    assert_eq!(v["requests"], 40, "{stdout}");
    assert_eq!(v["ok"], 40);
    assert_eq!(v["outcomes"]["200"], 40);
    assert_eq!(v["url"], format!("{url}/chat/completions"));
    // The mock streams 3 content chunks and reports 3 completion tokens per answer.
    assert_eq!(v["output_tokens"], 120, "{stdout}");
    let first = v["first_token"]["p50_ms"].as_f64().unwrap();
    let whole = v["latency"]["p50_ms"].as_f64().unwrap();
    assert!(first > 0.0 && first <= whole, "{stdout}");
    assert!(!stdout.contains(&key), "the key must never be printed");
    // Every one of them reached the provider as a stream.
    let served = mock
        .requests()
        .iter()
        .filter(|r| serde_json::from_slice::<Value>(&r.body).is_ok_and(|b| b["stream"] == true))
        .count();
    assert_eq!(served, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_sends_on_schedule_and_failures_are_counted_by_status() {
    let (mock, gw) = start().await;
    let key = gw.new_key("acme", &[]);
    let url = gw.url("/v1");
    // 50 req/s for 1 s: exactly the 50 requests due before the end, whatever the latency.
    let (ok, v, stdout) = bench(&[
        "--url",
        &url,
        "--key",
        &key,
        "--model",
        "m1",
        "--rate",
        "50",
        "--duration",
        "1s",
    ]);
    assert!(ok, "{stdout}");
    assert_eq!(v["mode"], "open loop");
    assert_eq!(
        (v["requests"].as_u64(), v["ok"].as_u64()),
        (Some(50), Some(50))
    );
    assert_eq!(mock.requests().len(), 50);

    // A key the gateway does not know: every request a 401, counted, and the run fails.
    let (ok, v, stdout) = bench(&[
        "--url",
        &url,
        "--key",
        "sk-tg-unknownunknownunknown",
        "--model",
        "m1",
        "-c",
        "2",
        "--requests",
        "6",
    ]);
    assert!(!ok, "a run with no success exits non-zero: {stdout}");
    assert_eq!(v["outcomes"]["401"], 6, "{stdout}");
    assert_eq!(v["failed"], 6);
    assert!(v["latency"].is_null(), "failures do not shape the latency");
    assert_eq!(
        mock.requests().len(),
        50,
        "nothing unauthenticated reached the provider"
    );

    // Nobody listening: connect errors, not a hang.
    let dead = format!("http://127.0.0.1:{}/v1", support::free_port());
    let (ok, v, stdout) = bench(&["--url", &dead, "-c", "1", "--requests", "3"]);
    assert!(!ok);
    assert_eq!(v["outcomes"]["connect error"], 3, "{stdout}");
}
