//! Hot reload against the real binary: a price change by SIGHUP prices the next request at
//! the new price while a stream started before it settles at the old one; an invalid file
//! is refused (by SIGHUP and by `POST /admin/reload`) and the node keeps serving on the old
//! one; a section that needs a restart is reported, not applied.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Gateway, MockServer};

/// Old prices: 1000 nano-USD per prompt token, 2000 per completion token; new: ten times.
const OLD: &str = "m1: { input: 1.00, output: 2.00 }";
const NEW: &str = "m1: { input: 10.00, output: 20.00 }";

fn db(gw: &Gateway) -> rusqlite::Connection {
    rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap()
}

/// `(prompt, completion, cost_nano, stream)` of every row, in time order.
fn rows(gw: &Gateway) -> Vec<(i64, i64, i64, i64)> {
    let c = db(gw);
    let mut st = c
        .prepare("SELECT prompt_tokens, completion_tokens, cost_nano, stream FROM usage_ledger ORDER BY ts, request_id")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

async fn wait_rows(gw: &Gateway, n: usize) -> Vec<(i64, i64, i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = rows(gw);
        if r.len() >= n {
            return r;
        }
        assert!(Instant::now() < deadline, "ledger has {} rows", r.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn chat(stream: bool, x_mock: Value) -> Value {
    json!({"model": "m1", "max_tokens": 10, "stream": stream,
           "messages": [{"role": "user", "content": "hello"}], "x_mock": x_mock})
}

fn rewrite(gw: &Gateway, from: &str, to: &str) {
    let yaml = std::fs::read_to_string(&gw.config).unwrap();
    assert!(yaml.contains(from), "{yaml}");
    std::fs::write(&gw.config, yaml.replace(from, to)).unwrap();
}

fn hangup(gw: &Gateway) {
    let pid = gw.child.as_ref().unwrap().id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
}

async fn reload(gw: &Gateway) -> (u16, Value) {
    let r = client()
        .post(gw.admin_url("/admin/reload"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn start() -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1] }}\n",
        mock.base_url()
    );
    let extra = format!("pricing:\n  models:\n    {OLD}\n  unpriced: reject\n");
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, &extra))
        .await
        .unwrap();
    (mock, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_price_by_sighup_applies_to_the_next_request_and_not_to_a_stream_in_flight() {
    let (mock, gw) = start().await;
    let key = gw.new_key("acme", &[]);

    // A stream starts at the old price and waits at the mock's gate.
    let stream = {
        let (url, key) = (gw.url("/v1/chat/completions"), key.clone());
        tokio::spawn(async move {
            let r = client()
                .post(url)
                .bearer_auth(key)
                .json(&chat(true, json!({"gate": true, "chunks": 4})))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.chunks_sent() == 0 {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    rewrite(&gw, OLD, NEW);
    hangup(&gw);
    // The next request is priced at the new price once the reload has run.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    loop {
        let r = client()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(false, json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        sent += 1;
        let last = *wait_rows(&gw, sent).await.last().unwrap();
        if last.2 == last.0 * 10_000 + last.1 * 20_000 {
            break;
        }
        assert_eq!(
            last.2,
            last.0 * 1_000 + last.1 * 2_000,
            "old price before the reload"
        );
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not apply the new prices"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    mock.open_gate();
    let text = stream.await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    let all = wait_rows(&gw, sent + 1).await;
    let streamed: Vec<_> = all.iter().filter(|r| r.3 == 1).collect();
    assert_eq!(streamed.len(), 1, "{all:?}");
    let (p, c, cost, _) = *streamed[0];
    assert!(c >= 4, "{all:?}");
    assert_eq!(
        cost,
        p * 1_000 + c * 2_000,
        "the stream settles at its start's price"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_and_the_node_keeps_serving() {
    let (_mock, gw) = start().await;
    let key = gw.new_key("acme", &[]);
    let good = std::fs::read_to_string(&gw.config).unwrap();

    // A typo in a section: refused with the errors, by the admin API and by SIGHUP.
    rewrite(&gw, OLD, "m1: { input: 1.00, outptu: 2.00 }");
    let (status, v) = reload(&gw).await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"]["code"], "invalid_config");
    assert!(v["error"]["errors"].to_string().contains("outptu"), "{v}");
    hangup(&gw);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(false, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the node serves on the old file");
    let (p, c, cost, _) = wait_rows(&gw, 1).await[0];
    assert_eq!(cost, p * 1_000 + c * 2_000);
    assert!(gw.log().contains("refused"), "{}", gw.log());

    // Back to a valid file that also changes the thread count: applied where it can be,
    // the rest reported.
    std::fs::write(&gw.config, good.replace("threads: 2", "threads: 3")).unwrap();
    let (status, v) = reload(&gw).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["restart_required"], json!(["server"]), "{v}");
    assert_eq!(v["applied"], json!([]), "{v}");
}
