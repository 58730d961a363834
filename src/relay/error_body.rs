//! Provider error bodies, rebuilt as OpenAI error JSON with the channel key scrubbed.
//!
//! Only `message`, `type`, `code` and `param` survive, as strings. A field that carries the
//! channel key in any form tollgate can recognise (verbatim, in another case, spaced or
//! dashed out, base64-encoded, or its last eight characters as in a masked echo) is
//! replaced whole, so no part of the key reaches the client.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use tollgate_filters::error_json;

/// Whether `text` carries `secret` in a recognisable form.
pub fn mentions_secret(text: &str, secret: &str) -> bool {
    if secret.len() < 8 {
        return !secret.is_empty() && text.contains(secret);
    }
    // Case-, space- and dash-insensitive: compare letters and digits only.
    let squash = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect()
    };
    let (t, k) = (squash(text), squash(secret));
    if k.len() >= 8 {
        // The last eight significant characters: masked echoes ("sk-abc***wxyz1234").
        let tail_start = k.char_indices().rev().nth(7).map_or(0, |(i, _)| i);
        if t.contains(&k) || t.contains(&k[tail_start..]) {
            return true;
        }
    }
    // Base64 at each of the three alignments; the first and last characters of an encoded
    // run depend on the neighbouring bytes, so only the stable middle is compared.
    (0..3).any(|pad| {
        let mut raw = vec![0u8; pad];
        raw.extend_from_slice(secret.as_bytes());
        [STANDARD.encode(&raw), URL_SAFE_NO_PAD.encode(&raw)]
            .iter()
            .any(|enc| {
                let skip = (pad * 4).div_ceil(3) + 1;
                let body = enc.get(skip..enc.len().saturating_sub(4)).unwrap_or("");
                body.len() >= 8 && text.contains(body)
            })
    })
}

/// Rebuilds a provider's error body (`raw`, status `status`) without the channel key.
pub fn scrub_error_body(raw: &[u8], status: u16, secret: &str) -> Bytes {
    #[derive(serde::Deserialize)]
    struct Env {
        error: serde_json::Value,
    }
    let generic = format!("The upstream provider answered {status}.");
    let fields = match serde_json::from_slice::<Env>(raw) {
        Ok(Env {
            error: serde_json::Value::Object(e),
        }) => Some(e),
        _ => None,
    };
    let field = |name: &str| -> Option<String> {
        let v = fields.as_ref()?.get(name)?.as_str()?;
        (!mentions_secret(v, secret)).then(|| v.to_owned())
    };
    let message = match fields.as_ref().and_then(|e| e.get("message")) {
        Some(_) => field("message").unwrap_or_else(|| {
            format!("The upstream provider answered {status}; its message named a credential and was redacted.")
        }),
        None => generic,
    };
    let kind = field("type").unwrap_or_else(|| "invalid_request_error".into());
    error_json(
        &message,
        &kind,
        field("param").as_deref(),
        field("code").as_deref(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-provider-SECRET-abcd1234";

    fn scrubbed(message: &str) -> String {
        let raw = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "code": "invalid_api_key", "param": null, "extra": 1}});
        let out = scrub_error_body(raw.to_string().as_bytes(), 400, KEY);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn provider_error_is_rebuilt_without_the_key() {
        let s = scrubbed(&format!("Incorrect API key provided: {KEY}."));
        assert!(!s.contains(KEY) && !s.contains("1234"), "{s}");
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"].get("extra").is_none());
    }

    #[test]
    fn transformed_copies_of_the_key_are_scrubbed_too() {
        let b64 = STANDARD.encode(format!("Bearer {KEY}"));
        let spaced: String = KEY.chars().flat_map(|c| [c, ' ']).collect();
        for form in [
            KEY.to_uppercase(),
            spaced,
            b64,
            URL_SAFE_NO_PAD.encode(KEY),
            "sk-pro***************abcd1234".to_string(),
            "key ending in ...SECRET-abcd1234".to_string(),
        ] {
            let s = scrubbed(&format!("bad key: {form}"));
            assert!(!s.contains("abcd") && !s.contains("ABCD"), "{form}: {s}");
        }
        assert!(scrubbed("You exceeded your quota.").contains("exceeded your quota"));
    }

    #[test]
    fn a_non_ascii_key_never_panics() {
        let key = "ключ-секрет-1234ü";
        let raw = format!(r#"{{"error":{{"message":"bad {key}"}}}}"#);
        let out = scrub_error_body(raw.as_bytes(), 401, key);
        assert!(!String::from_utf8_lossy(&out).contains(key));
        assert!(!mentions_secret("fine", "ü"));
    }

    #[test]
    fn non_json_provider_error_becomes_openai_json() {
        let out = scrub_error_body(b"<html>bad gateway</html>", 400, "k");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("400"));
    }
}
