//! Provider kinds other than OpenAI's own URLs, against the real binary, a real SQLite file
//! and the mock upstream: what reaches the provider (URL, key header) and what is billed.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{Gateway, MockServer};

const AZURE_KEY: &str = "sk-azure-resource-key-0123456789";

/// m1: 2000 nano-USD per prompt token, 8000 per completion token.
const PRICING: &str = "pricing:\n  models:\n    m1: { input: 2.00, output: 8.00 }\n    emb: { input: 0.02 }\n  unpriced: reject\n";

async fn azure(section: &str) -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: az, kind: azure, base_url: \"{}\", api_key: \"{AZURE_KEY}\", models: [m1, emb], {section} }}\n",
        mock.base_url()
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, PRICING))
        .await
        .unwrap();
    (mock, gw)
}

async fn post(gw: &Gateway, key: &str, path: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(gw.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("gateway answers");
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

fn ledger_cost(gw: &Gateway) -> Vec<i64> {
    let db = rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap();
    let mut st = db
        .prepare("SELECT cost_nano FROM usage_ledger ORDER BY ts, request_id")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_deployments_get_their_url_the_api_key_header_and_exact_billing() {
    let (mock, gw) =
        azure("azure: { api_version: \"2024-10-21\", deployments: { m1: prod-m1 } }").await;
    let key = gw.new_key("acme", &[]);
    let chat = json!({"model": "m1", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = post(&gw, &key, "/v1/chat/completions", chat.clone()).await;
    assert_eq!(status, 200, "{body}");
    let usage = serde_json::from_str::<Value>(&body).unwrap()["usage"].clone();
    let mut stream = chat.clone();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let (status, sse) = post(&gw, &key, "/v1/chat/completions", stream).await;
    assert_eq!(status, 200);
    assert!(sse.trim_end().ends_with("data: [DONE]"), "{sse}");
    let stream_usage = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .expect("the usage chunk")["usage"]
        .clone();
    let (status, body) = post(
        &gw,
        &key,
        "/v1/embeddings",
        json!({"model": "emb", "input": "x"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let seen = mock.requests();
    assert_eq!(seen.len(), 3);
    for r in &seen[..2] {
        assert_eq!(r.path, "/openai/deployments/prod-m1/chat/completions");
        assert_eq!(r.query.as_deref(), Some("api-version=2024-10-21"));
    }
    // A model without a mapping is its own deployment.
    assert_eq!(seen[2].path, "/openai/deployments/emb/embeddings");
    for r in &seen {
        assert_eq!(r.header("api-key"), Some(AZURE_KEY), "the key in api-key");
        assert_eq!(r.header("authorization"), None, "never as a bearer token");
        assert!(
            !r.headers.iter().any(|(_, v)| v.contains(&key)),
            "the client's key stays home"
        );
    }
    // Billed from the provider's usage, to the nano-USD (m1: 2000 in, 8000 out per token).
    let price = |u: &Value| {
        u["prompt_tokens"].as_i64().unwrap() * 2000
            + u["completion_tokens"].as_i64().unwrap() * 8000
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut costs = ledger_cost(&gw);
    while costs.len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        costs = ledger_cost(&gw);
    }
    assert_eq!(costs.len(), 3, "one ledger row each");
    assert_eq!(costs[0], price(&usage), "{usage}");
    assert_eq!(costs[1], price(&stream_usage), "{stream_usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_v1_api_keeps_openai_paths_and_a_missing_api_version_is_a_config_error() {
    let (mock, gw) = azure("azure: { api: v1 }").await;
    let key = gw.new_key("acme", &[]);
    let (status, body) = post(
        &gw,
        &key,
        "/v1/chat/completions",
        json!({"model": "m1", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let seen = mock.requests();
    assert_eq!(seen[0].path, "/openai/v1/chat/completions");
    assert_eq!(seen[0].query, None);
    assert_eq!(seen[0].header("api-key"), Some(AZURE_KEY));

    // Deployment URLs without an api-version: refused before anything runs, the field named,
    // the key never echoed.
    let cfg = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(&gw.config, cfg.replace("azure: { api: v1 }", "azure: {}")).unwrap();
    let out = gw.cli(&["check-config"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("channels[0].azure.api_version") && err.contains("is required"),
        "{err}"
    );
    assert!(!err.contains(AZURE_KEY));
}

/// A WAV file of `seconds` seconds (16 kHz mono PCM16: 32,000 bytes a second).
fn wav(seconds: u32) -> Vec<u8> {
    let data = 32_000 * seconds;
    let mut w = b"RIFF".to_vec();
    w.extend_from_slice(&(36 + data).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&[1, 0, 1, 0]);
    w.extend_from_slice(&16_000u32.to_le_bytes());
    w.extend_from_slice(&32_000u32.to_le_bytes());
    w.extend_from_slice(&[2, 0, 16, 0]);
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data.to_le_bytes());
    w.resize(44 + data as usize, 0);
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_audio_and_speech_are_billed_by_the_unit_and_forms_pass_intact() {
    let mock = MockServer::start().await;
    let ch = format!(
        "  - {{ name: media, base_url: \"{}\", api_key: sk-media-0123456789, models: [dall-e-3, whisper-1, tts-1] }}\n",
        mock.base_url()
    );
    let pricing = "pricing:
  models:
    dall-e-3: { per_image: { \"1024x1024\": 0.04, \"hd/1024x1024\": 0.08 } }
    whisper-1: { per_audio_second: 0.0001 }
    tts-1: { per_1m_characters: 15.0 }
  unpriced: reject
";
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&ch, pricing))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    let (status, body) = post(
        &gw,
        &key,
        "/v1/images/generations",
        json!({"model": "dall-e-3", "prompt": "a cat", "n": 2, "size": "1024x1024", "quality": "hd"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A 3-second WAV as a form, forwarded byte for byte.
    let mut form = b"--tgform\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--tgform\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n".to_vec();
    form.extend_from_slice(&wav(3));
    form.extend_from_slice(b"\r\n--tgform--\r\n");
    let r = reqwest::Client::new()
        .post(gw.url("/v1/audio/transcriptions"))
        .bearer_auth(&key)
        .header("content-type", "multipart/form-data; boundary=tgform")
        .body(form.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["seconds"], 3, "{v}");

    let (status, _) = post(
        &gw,
        &key,
        "/v1/audio/speech",
        json!({"model": "tts-1", "input": "hello world", "voice": "alloy"}),
    )
    .await;
    assert_eq!(status, 200);

    let seen = mock.requests();
    assert_eq!(seen[1].path, "/v1/audio/transcriptions");
    assert_eq!(
        seen[1].body.as_ref(),
        &form[..],
        "the form arrives as it was sent"
    );
    let served = mock.served();
    assert_eq!(
        (
            served[0].images,
            served[1].audio_seconds,
            served[2].characters
        ),
        (2, 3, 11)
    );
    // 2 hd images at 0.08, 3 s at 0.0001, 11 characters at 15 per 1M: in nano-USD.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut costs = ledger_cost(&gw);
    while costs.len() < 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        costs = ledger_cost(&gw);
    }
    assert_eq!(costs, [160_000_000, 300_000, 165_000]);
}
