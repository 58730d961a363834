//! The fuzz targets' bodies, as plain functions: `fuzz/` (cargo-fuzz, its own workspace)
//! calls them with generated inputs, and `tests/fuzz_corpus.rs` replays every committed
//! corpus file through them in CI. Each returns normally for any input and panics only when
//! an invariant breaks.

use bytes::Bytes;
use tollgate_filters::request::{RequestBody, MAX_CHOICES, MAX_OUTPUT_TOKENS};
use tollgate_filters::usage::UsageScanner;

use crate::admin::{parse_body, BodyKind};
use crate::config::Config;

/// A target's body.
pub type Target = fn(&[u8]);

/// The targets, by name (the `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*` names).
pub const TARGETS: &[(&str, Target)] = &[
    ("request_body", request_body),
    ("sse_usage", sse_usage),
    ("json_usage", json_usage),
    ("auth_header", auth_header),
    ("config_yaml", config_yaml),
    ("admin_body", admin_body),
];

const PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/moderations",
];

/// First byte picks the path; the rest is the body. A parsed body's facts stay within
/// their documented caps, and its rewrite (model swapped, usage forced on) parses again to
/// the same facts but the model.
pub fn request_body(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let path = PATHS[usize::from(sel) % PATHS.len()];
    let Ok((parsed, facts)) = RequestBody::parse_for_path(path, Bytes::copy_from_slice(body))
    else {
        return;
    };
    assert_eq!(facts.body_bytes, body.len());
    assert!(facts
        .max_output_tokens
        .is_none_or(|m| m <= MAX_OUTPUT_TOKENS));
    assert!(
        facts.choices >= 1 && facts.choices <= MAX_CHOICES,
        "{}",
        facts.choices
    );
    let same = parsed.rewrite(None, false).expect("an unchanged rewrite");
    assert_eq!(
        &same[..],
        body,
        "a rewrite that changes nothing keeps the bytes"
    );
    let Ok(rewritten) = parsed.rewrite(Some("upstream-model"), facts.stream) else {
        return;
    };
    let (_, again) = RequestBody::parse_for_path(path, rewritten).expect("a rewritten body parses");
    // Only a `model` that is there is replaced; a body without one (refused later, by
    // routing) stays without one.
    if facts.model.is_empty() {
        assert!(again.model.is_empty() || again.model == "upstream-model");
    } else {
        assert_eq!(again.model, "upstream-model");
    }
    assert_eq!(again.stream, facts.stream);
    assert_eq!(again.max_output_tokens, facts.max_output_tokens);
    assert_eq!(again.choices, facts.choices);
    if facts.stream {
        assert!(
            again.include_usage,
            "forced include_usage is on after the rewrite"
        );
    }
}

/// Everything a scanner ends with: the client's bytes and what it learned.
fn scan(mut scanner: UsageScanner, parts: &[&[u8]]) -> (Vec<u8>, String) {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&scanner.feed(Bytes::copy_from_slice(p)));
    }
    out.extend_from_slice(&scanner.finish());
    let r = &scanner.report;
    let learned = format!(
        "{:?} text={} error={} done={}",
        r.usage, r.text_bytes, r.saw_error, scanner.saw_done
    );
    (out, learned)
}

/// Inputs longer than this are cut, so every-boundary splits stay quadratic in a small n.
const SPLIT_MAX: usize = 2048;

/// Differential: first byte picks the strip mode; the rest is an SSE body. Fed whole, split
/// at every byte boundary into two chunks, and byte by byte, the scanner passes the same
/// bytes to the client and learns the same usage, text and flags. Without stripping, the
/// client gets the body unchanged.
pub fn sse_usage(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let body = &body[..body.len().min(SPLIT_MAX)];
    let strip = sel & 1 == 1;
    let whole = scan(UsageScanner::sse(strip), &[body]);
    if !strip {
        assert_eq!(whole.0, body, "without stripping the body passes unchanged");
    }
    for at in 1..body.len() {
        let split = scan(UsageScanner::sse(strip), &[&body[..at], &body[at..]]);
        assert_eq!(split, whole, "split at {at}");
    }
    let bytes: Vec<&[u8]> = body.chunks(1).collect();
    assert_eq!(
        scan(UsageScanner::sse(strip), &bytes),
        whole,
        "byte by byte"
    );
}

/// The JSON usage extractor: the client gets the body unchanged, and every split finds the
/// same usage.
pub fn json_usage(data: &[u8]) {
    let body = &data[..data.len().min(SPLIT_MAX)];
    let whole = scan(UsageScanner::json(), &[body]);
    assert_eq!(whole.0, body);
    for at in 1..body.len() {
        assert_eq!(
            scan(UsageScanner::json(), &[&body[..at], &body[at..]]),
            whole,
            "split at {at}"
        );
    }
}

/// `Authorization` then `x-api-key` values, split at the first NUL. A presented key is
/// never empty, has no surrounding whitespace, and is part of a header the client sent.
pub fn auth_header(data: &[u8]) {
    let (a, b) = match data.iter().position(|&c| c == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_bytes(a) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    if let Some(Ok(v)) = b.map(http::HeaderValue::from_bytes) {
        headers.insert("x-api-key", v);
    }
    if let Some(key) = tollgate_filters::auth::presented_key(&headers) {
        assert!(!key.is_empty());
        assert_eq!(key, key.trim());
        let within = |h: &[u8]| h.windows(key.len()).any(|w| w == key.as_bytes());
        assert!(
            within(a) || b.is_some_and(within),
            "{key:?} came from nowhere"
        );
    }
}

/// The YAML loader with `${VAR}` interpolation (variables A, EMPTY and QUOTE are set; any
/// other is unset): never panics, and no error message shows a variable's value unless the
/// text itself holds it.
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |k: &str| match k {
        "A" => Some("secret-value-a".to_string()),
        "EMPTY" => Some(String::new()),
        "QUOTE" => Some("se\"cret: 'v' #x".to_string()),
        _ => None,
    };
    if let Err(errors) = Config::from_yaml(text, env) {
        for e in errors {
            let msg = e.to_string();
            assert!(
                !msg.contains("secret-value-a") || text.contains("secret-value-a"),
                "an error shows a variable's value: {msg}"
            );
        }
    }
}

/// First byte picks the admin route; the rest is its JSON body. Parsing never panics, and a
/// body that is not a JSON object is refused.
pub fn admin_body(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let kind = match sel % 4 {
        0 => BodyKind::NewAccount,
        1 => BodyKind::Topup,
        2 => BodyKind::NewKey,
        _ => BodyKind::KeyPatch,
    };
    let parsed = parse_body(kind, body);
    if parsed.is_ok() && !body.is_empty() {
        let v: serde_json::Value = serde_json::from_slice(body).expect("accepted, so JSON");
        assert!(v.is_object());
    }
}
