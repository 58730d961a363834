//! The mock's OpenAI images and audio endpoints over real loopback HTTP (reqwest,
//! 127.0.0.1 only): answer shapes, the recorded billing quantities (images, seconds,
//! characters), multipart parsing with the exact body recorded, and the 400s.

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use tollgate_bench::mock::{speech_bytes, MockServer, ServedUsage, PNG_1X1, SPEECH_BYTES};

const T: Duration = Duration::from_secs(10);
const BOUNDARY: &str = "mockBoundary7MA4YWxkTrZu0gW";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(T)
        .build()
        .unwrap()
}

async fn post_json(m: &MockServer, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", m.base_url()))
        .header("authorization", "Bearer sk-test")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// A multipart/form-data body built by hand: `(name, filename, bytes)` per part.
fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, filename, data) in parts {
        out.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match filename {
            Some(f) => out.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => out.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

async fn post_form(
    m: &MockServer,
    path: &str,
    body: Vec<u8>,
    x_mock: Option<&str>,
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}{path}", m.base_url()))
        .header("authorization", "Bearer sk-test")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(body);
    if let Some(x) = x_mock {
        req = req.header("x-mock", x);
    }
    req.send().await.unwrap()
}

/// A PCM WAV: `byte_rate` bytes a second, `data_len` bytes of samples.
fn wav(byte_rate: u32, data_len: u32) -> Vec<u8> {
    let mut w = b"RIFF".to_vec();
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes());
    w.extend_from_slice(&(byte_rate / 2).to_le_bytes());
    w.extend_from_slice(&byte_rate.to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    w.extend((0..data_len).map(|i| (i % 7) as u8));
    w
}

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn image_generations_b64_and_url() {
    let m = MockServer::start().await;
    let resp = post_json(
        &m,
        "/v1/images/generations",
        &json!({"model": "gpt-image-1", "prompt": "a red square", "size": "1024x1024",
                "quality": "low"}),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        b64.decode(data[0]["b64_json"].as_str().unwrap()).unwrap(),
        PNG_1X1
    );

    let resp = post_json(
        &m,
        "/v1/images/generations",
        &json!({"model": "dall-e-3", "prompt": "p", "n": 3, "response_format": "url"}),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["data"],
        json!([
            {"url": "https://example.invalid/img/0.png"},
            {"url": "https://example.invalid/img/1.png"},
            {"url": "https://example.invalid/img/2.png"},
        ])
    );

    assert_eq!(
        m.served(),
        vec![
            ServedUsage {
                model: "gpt-image-1".into(),
                images: 1,
                ..ServedUsage::default()
            },
            ServedUsage {
                model: "dall-e-3".into(),
                images: 3,
                ..ServedUsage::default()
            },
        ]
    );
}

#[tokio::test]
async fn image_generations_refusals() {
    let m = MockServer::start().await;
    let (s, v) =
        error_of(post_json(&m, "/v1/images/generations", &json!({"model": "m", "n": 1})).await)
            .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (s, _) = error_of(
        post_json(
            &m,
            "/v1/images/generations",
            &json!({"model": "m", "prompt": "p", "n": 0}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = error_of(
        post_json(
            &m,
            "/v1/images/generations",
            &json!({"model": "m", "prompt": "p", "response_format": "gif"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
    // The x_mock body field steers images like any JSON request.
    let (s, v) = error_of(
        post_json(
            &m,
            "/v1/images/generations",
            &json!({"model": "m", "prompt": "p", "x_mock": {"status": 500}}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 500);
    assert_eq!(v["error"]["type"], "server_error");
    assert!(m.served().is_empty());
    assert_eq!(m.requests().len(), 4);
}

#[tokio::test]
async fn transcription_of_a_wav_bills_its_duration_and_records_the_exact_body() {
    let m = MockServer::start().await;
    // 40,000 bytes at 16,000 bytes a second: 2.5 s, billed as 3.
    let audio = wav(16_000, 40_000);
    let body = form(&[
        ("model", None, b"whisper-1"),
        ("file", Some("speech.wav"), &audio),
    ]);
    let resp = post_form(&m, "/v1/audio/transcriptions", body.clone(), None).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/json"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"text": "mock transcript", "usage": {"type": "duration", "seconds": 3}})
    );
    let reqs = m.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].path, "/v1/audio/transcriptions");
    assert_eq!(reqs[0].body.as_ref(), body.as_slice());
    assert_eq!(
        reqs[0].header("content-type"),
        Some(format!("multipart/form-data; boundary={BOUNDARY}").as_str())
    );
    assert_eq!(
        m.served(),
        vec![ServedUsage {
            model: "whisper-1".into(),
            audio_seconds: 3,
            ..ServedUsage::default()
        }]
    );

    // Exactly 2 s stays 2; the WAV duration wins over the knob.
    let body = form(&[
        ("file", Some("a.wav"), &wav(8_000, 16_000)),
        ("model", None, b"gpt-4o-transcribe"),
    ]);
    let resp = post_form(
        &m,
        "/v1/audio/transcriptions",
        body,
        Some(r#"{"audio_seconds": 99}"#),
    )
    .await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["seconds"], 2);
    assert_eq!(m.served()[1].audio_seconds, 2);
    assert_eq!(m.served()[1].model, "gpt-4o-transcribe");
}

#[tokio::test]
async fn translation_of_other_audio_uses_the_knob_else_one_second() {
    let m = MockServer::start().await;
    let mp3 = b"ID3\x04\x00not really an mp3";
    let body = form(&[
        ("file", Some("a.mp3"), mp3),
        ("model", None, b"whisper-1"),
        ("response_format", None, b"verbose_json"),
    ]);
    let resp = post_form(
        &m,
        "/v1/audio/translations",
        body,
        Some(r#"{"audio_seconds": 7}"#),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"task": "translate", "language": "english", "duration": 7.0,
               "text": "mock transcript", "segments": [],
               "usage": {"type": "duration", "seconds": 7}})
    );

    let body = form(&[("file", Some("a.mp3"), mp3), ("model", None, b"whisper-1")]);
    let v: Value = post_form(&m, "/v1/audio/translations", body, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["seconds"], 1);

    // Plain-text formats carry no usage, so nothing is recorded for them.
    let body = form(&[
        ("file", Some("a.mp3"), mp3),
        ("model", None, b"whisper-1"),
        ("response_format", None, b"srt"),
    ]);
    let resp = post_form(&m, "/v1/audio/transcriptions", body, None).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(
        resp.text().await.unwrap(),
        "1\n00:00:00,000 --> 00:00:01,000\nmock transcript\n\n"
    );

    assert_eq!(
        m.served(),
        vec![
            ServedUsage {
                model: "whisper-1".into(),
                audio_seconds: 7,
                ..ServedUsage::default()
            },
            ServedUsage {
                model: "whisper-1".into(),
                audio_seconds: 1,
                ..ServedUsage::default()
            },
        ]
    );
}

#[tokio::test]
async fn transcription_refusals() {
    let m = MockServer::start().await;
    let no_file = form(&[("model", None, b"whisper-1")]);
    let (s, v) = error_of(post_form(&m, "/v1/audio/transcriptions", no_file, None).await).await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("file"));
    let no_model = form(&[("file", Some("a.wav"), &wav(100, 100))]);
    let (s, v) = error_of(post_form(&m, "/v1/audio/translations", no_model, None).await).await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().unwrap().contains("model"));
    // A JSON body is not a form.
    let (s, v) = error_of(
        post_json(
            &m,
            "/v1/audio/transcriptions",
            &json!({"model": "whisper-1", "file": "x"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    // A form cut before its closing boundary.
    let mut cut = form(&[("model", None, b"whisper-1"), ("file", Some("a"), b"xyz")]);
    cut.truncate(cut.len() - 20);
    let (s, _) = error_of(post_form(&m, "/v1/audio/transcriptions", cut, None).await).await;
    assert_eq!(s, 400);
    assert!(m.served().is_empty());
    assert_eq!(m.requests().len(), 4);
}

#[tokio::test]
async fn speech_answers_audio_and_bills_characters() {
    let m = MockServer::start().await;
    let resp = post_json(
        &m,
        "/v1/audio/speech",
        &json!({"model": "tts-1", "input": "héllo wörld", "voice": "alloy"}),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["content-type"], "audio/mpeg");
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes.len(), SPEECH_BYTES);
    assert_eq!(bytes.as_ref(), speech_bytes().as_slice());
    assert_eq!(&bytes[..3], b"ID3");

    let resp = post_json(
        &m,
        "/v1/audio/speech",
        &json!({"model": "gpt-4o-mini-tts", "input": "hi", "voice": "alloy",
                "response_format": "wav"}),
    )
    .await;
    assert_eq!(resp.headers()["content-type"], "audio/wav");
    assert_eq!(resp.bytes().await.unwrap().len(), SPEECH_BYTES);

    let (s, _) = error_of(
        post_json(
            &m,
            "/v1/audio/speech",
            &json!({"model": "tts-1", "voice": "alloy"}),
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);

    assert_eq!(
        m.served(),
        vec![
            ServedUsage {
                model: "tts-1".into(),
                characters: 11,
                ..ServedUsage::default()
            },
            ServedUsage {
                model: "gpt-4o-mini-tts".into(),
                characters: 2,
                ..ServedUsage::default()
            },
        ]
    );
}
