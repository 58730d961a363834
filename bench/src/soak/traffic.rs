//! One soak request: its body and faults, sending it, and recording how it ended.

use super::*;

pub(super) fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let start = s.len().saturating_sub(4000);
    s.get(start..).unwrap_or_default().to_string()
}

pub(super) async fn admin_post(
    http: &reqwest::Client,
    gw: &Gateway,
    path: &str,
    body: Value,
) -> Option<Value> {
    let r = http
        .post(gw.admin(path))
        .bearer_auth(&gw.token)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

pub(super) async fn admin_get(http: &reqwest::Client, gw: &Gateway, path: &str) -> Option<Value> {
    let r = http
        .get(gw.admin(path))
        .bearer_auth(&gw.token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// The request for one marker: path, body, model, and the text bytes a full answer has.
pub(super) fn build_body(
    m: u64,
    fault: Fault,
    stream: bool,
    embeddings: bool,
    include_usage: bool,
    chunks: u32,
    rng: &mut Rng,
) -> (&'static str, Value) {
    let words = "lorem ipsum ".repeat(1 + rng.below(40) as usize);
    let user = format!("soak-{m}");
    if embeddings {
        let body = json!({"model": "emb", "input": [format!("soak {m} {words}")], "user": user});
        return ("/v1/embeddings", body);
    }
    let mut x = json!({"chunks": chunks});
    match fault {
        Fault::None | Fault::ClientGoneBeforeHead | Fault::SlowFirstByte => {}
        Fault::ResetMidStream => x["truncate_after"] = json!(rng.below(u64::from(chunks)) as u32),
        Fault::ResetBeforeHead => x["reset"] = json!(true),
        Fault::Status5xx => x["status"] = json!(if rng.below(2) == 0 { 500 } else { 503 }),
        Fault::Status429 => x["status"] = json!(429),
        Fault::TruncatedSse => x["omit_done"] = json!(true),
        Fault::InBandError => x["error_after"] = json!(rng.below(u64::from(chunks)) as u32),
        Fault::MalformedChunk => x["malformed_after"] = json!(rng.below(u64::from(chunks)) as u32),
        Fault::BigLine => {
            x["big_line_bytes"] = json!(BIG_LINE);
        }
        Fault::CumulativeUsage => x["usage"] = json!("cumulative"),
        Fault::ErrorBody200 => x["error_body_200"] = json!(true),
        Fault::ClientGoneMidStream => {
            x["chunks"] = json!(20);
            x["delay_ms"] = json!(25);
        }
    }
    match fault {
        Fault::SlowFirstByte => x["delay_ms"] = json!(1200),
        Fault::ClientGoneBeforeHead => x["delay_ms"] = json!(600),
        _ => {}
    }
    let mut body = json!({
        "model": "m1",
        "messages": [{"role": "user", "content": format!("soak {m} {words}")}],
        "max_tokens": MAX_TOKENS,
        "user": user,
        "x_mock": x,
    });
    if stream {
        body["stream"] = json!(true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    ("/v1/chat/completions", body)
}

pub(super) async fn send_one(shared: Arc<Shared>, idx: usize, path: &'static str, body: Vec<u8>) {
    let (key, fault) = {
        let s = shared.sent.lock().unwrap();
        (s[idx].key, s[idx].fault)
    };
    let req = shared
        .http
        .post(format!("{}{path}", shared.url))
        .bearer_auth(&shared.keys[key].secret)
        .header("content-type", "application/json")
        .body(body)
        .send();
    let resp = if fault == Fault::ClientGoneBeforeHead {
        match tokio::time::timeout(Duration::from_millis(150), req).await {
            Ok(r) => r,
            Err(_) => {
                finish(&shared, idx, None, None, Outcome::Left);
                return;
            }
        }
    } else {
        req.await
    };
    let resp = match resp {
        Ok(r) => r,
        Err(_) => {
            finish(&shared, idx, None, None, Outcome::Transport);
            return;
        }
    };
    let status = resp.status().as_u16();
    let rid = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.bytes_stream();
    let mut seen = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    let mut outcome = if status == 200 {
        Outcome::Complete
    } else {
        Outcome::Refused
    };
    while let Some(part) = body.next().await {
        match part {
            Ok(b) => {
                if fault == Fault::ClientGoneMidStream && status == 200 {
                    seen += b.windows(3).filter(|w| w == b"tok").count();
                    if seen >= 2 {
                        outcome = Outcome::Left;
                        break;
                    }
                }
                tail.extend_from_slice(&b[b.len().saturating_sub(64)..]);
                let cut = tail.len().saturating_sub(64);
                tail.drain(..cut);
            }
            Err(_) => {
                if status == 200 {
                    outcome = Outcome::Broken;
                }
                break;
            }
        }
    }
    drop(body);
    finish(&shared, idx, Some(status), rid, outcome);
}

pub(super) fn finish(
    shared: &Shared,
    idx: usize,
    status: Option<u16>,
    rid: Option<String>,
    outcome: Outcome,
) {
    {
        let mut s = shared.sent.lock().unwrap();
        let e = &mut s[idx];
        e.finished = Some(Instant::now());
        e.status = status;
        e.rid = rid;
        e.outcome = Some(outcome);
    }
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
}
