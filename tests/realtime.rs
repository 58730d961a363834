//! The Realtime API through tollgate: a websocket client (Python's `websockets`) against the
//! real binary, a real SQLite file and the mock's realtime server. Two responses in one
//! session, each billed on its own ledger row from the usage the provider reported (text
//! and audio, input and output, cached); the key never reaches the provider; a bad key is
//! refused at the upgrade; a session whose account cannot pay, or whose key is out of
//! requests/min, gets an error event and is closed without the response reaching the
//! provider.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Behaviour, Gateway, MockServer};

const CHANNEL_KEY: &str = "sk-up-realtime-0123456789abcdef";

/// rt-x in nano-USD per token: text in 4000, cached 400, audio in 32000, text out 16000,
/// audio out 64000.
const PRICING: &str = "pricing:
  models:
    rt-x: { input: 4.00, output: 16.00, cached_input: 0.40, audio_input: 32.00, audio_output: 64.00 }
  unpriced: reject
";

/// The cost of one `response.done` usage object, as the README's formula says.
fn cost(u: &Value) -> i64 {
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    let input = n(&u["input_tokens"]);
    let cached = n(&u["input_token_details"]["cached_tokens"]);
    let audio_in = n(&u["input_token_details"]["audio_tokens"])
        - n(&u["input_token_details"]["cached_tokens_details"]["audio_tokens"]);
    let output = n(&u["output_tokens"]);
    let audio_out = n(&u["output_token_details"]["audio_tokens"]);
    (input - cached - audio_in) * 4000
        + cached * 400
        + audio_in * 32000
        + (output - audio_out) * 16000
        + audio_out * 64000
}

/// Runs the client script; its one JSON line.
async fn client(mode: &str, gw: &Gateway, key: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/compat/realtime_ws.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let url = format!("ws://127.0.0.1:{}/v1/realtime?model=rt-x", gw.port);
    let (mode, key) = (mode.to_owned(), key.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args([script, &mode, &url, &key])
            .output()
            .expect("python3 with websockets (scripts/test.sh installs it)")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "realtime client failed:\nstdout: {}\nstderr: {}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap()
}

/// (the row's request_id, cost) of every ledger row, once `n` are there.
async fn ledger(gw: &Gateway, n: usize) -> Vec<(String, i64)> {
    support::ledger_rows(gw, "request_id", "request_id", n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_sessions_are_relayed_and_billed_by_the_response() {
    let mock = MockServer::start_with(Behaviour {
        realtime_audio_in: Some(20),
        realtime_audio_out: Some(40),
        cached_tokens: Some(3),
        ..Behaviour::default()
    })
    .await;
    let ch = format!(
        "  - {{ name: rt, base_url: \"{}\", api_key: \"{CHANNEL_KEY}\", models: [rt-x] }}\n",
        mock.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, PRICING))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);

    // Two responses in one session, the key as the browser subprotocol.
    let seen = client("two", &gw, &key).await;
    let usages = seen["usages"].as_array().unwrap().clone();
    assert_eq!(usages.len(), 2);
    assert_eq!(usages[1]["output_token_details"]["audio_tokens"], 40);
    let rows = ledger(&gw, 3).await;
    // The session's own row carries nothing; each response has its own.
    let session_id = &rows[0].0;
    assert_eq!(rows[0].1, 0);
    assert_eq!(rows[1].0, format!("{session_id}.1"));
    assert_eq!(rows[2].0, format!("{session_id}.2"));
    assert_eq!(rows[1].1, cost(&usages[0]), "{}", usages[0]);
    assert_eq!(rows[2].1, cost(&usages[1]), "{}", usages[1]);
    assert!(rows[2].1 > rows[1].1, "audio out is dearer");

    // What the provider saw: the channel's key as a bearer token, never the client's.
    let up = &mock.requests()[0];
    assert_eq!(up.path, "/v1/realtime");
    assert_eq!(up.query.as_deref(), Some("model=rt-x"));
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {CHANNEL_KEY}").as_str())
    );
    assert!(
        !up.headers.iter().any(|(_, v)| v.contains(&key)),
        "{:?}",
        up.headers
    );
    assert_eq!(up.header("sec-websocket-extensions"), None);

    // The key as a bearer header works the same.
    let seen = client("bearer", &gw, &key).await;
    let rows = ledger(&gw, 5).await;
    let response = rows
        .iter()
        .find(|(id, _)| id.ends_with(".1") && !id.starts_with(session_id));
    assert_eq!(response.unwrap().1, cost(&seen["usages"][0]));

    // A bad key never gets a websocket.
    client("badkey", &gw, "sk-tg-not-a-key").await;
    assert_eq!(
        mock.requests().len(),
        2,
        "the bad upgrade never reached the provider"
    );

    // An account that cannot pay for a response: an error event, the session closed, the
    // response never asked of the provider, and the provider's session closed too.
    let poor = gw.account_with_key("poor", "0", &[]);
    let served = mock.served().len();
    client("broke", &gw, &poor).await;
    assert_eq!(mock.served().len(), served, "no response was made");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while mock.realtime_sessions() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        mock.realtime_sessions(),
        0,
        "the provider's session was closed"
    );

    // Requests/min apply per response: the upgrade is one request, the first response a
    // second; a third is refused in the session, which is closed.
    let limited = gw.new_key("acme", &["--rpm", "2"]);
    let served = mock.served().len();
    client("limited", &gw, &limited).await;
    assert_eq!(mock.served().len(), served + 1, "one response, not two");
}
