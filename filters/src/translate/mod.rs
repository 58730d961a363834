//! Wire-format translation between OpenAI Chat Completions, Anthropic Messages and Gemini
//! `generateContent`: request bodies, response bodies and SSE streams.
//!
//! Everything here is pure: bodies are `serde_json::Value`s in and out, streams are fed one
//! complete SSE event at a time ([`SseEvents`] cuts them out of network chunks) and write
//! complete client-facing events into a `BytesMut`. A request that cannot be expressed in the
//! target format is refused with [`Untranslatable`] (the gateway answers 400 with its message)
//! rather than silently losing meaning; every field and its fate is listed in the module doc of
//! [`anthropic`] and [`gemini`].

use std::fmt;

use bytes::BytesMut;
use serde_json::{json, Map, Value};

pub mod anthropic;
mod filter;
pub mod gemini;
mod sse;

#[cfg(test)]
mod corpus;
#[cfg(test)]
mod testutil;

pub use sse::SseEvents;

pub use crate::wire::Wire;
pub use filter::{request, Translate};

/// A request that cannot be expressed in the target format; rendered to the client as a 400
/// with this message (e.g. "n > 1 cannot be sent to an Anthropic model").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untranslatable(pub String);

impl fmt::Display for Untranslatable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Untranslatable {}

/// Implemented by every stream translator. The gateway cuts the upstream byte stream into
/// complete SSE events and calls `event` once per event.
pub trait StreamTranslator: Send {
    /// One complete upstream SSE event: its `event:` field if any, and its `data:` lines joined
    /// with '\n'. Write the client-facing SSE bytes (complete events, each ending "\n\n") to `out`.
    fn event(&mut self, name: Option<&str>, data: &[u8], out: &mut BytesMut);
    /// The upstream stream ended. `clean` is false when it was cut off. Write any closing
    /// events to `out` (e.g. OpenAI's final usage chunk and `data: [DONE]` on a clean end;
    /// nothing that pretends completion on an unclean end).
    fn finish(&mut self, clean: bool, out: &mut BytesMut);
    /// Whether the upstream stream reached its proper end marker (Anthropic `message_stop`,
    /// OpenAI `data: [DONE]`, Gemini: a candidate with a finishReason).
    fn complete(&self) -> bool;
}

// ---- shared helpers -------------------------------------------------------------------------

/// The value of `key` unless it is absent or `null` (OpenAI clients send explicit nulls for
/// "not set").
pub(crate) fn field<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// OpenAI request fields neither Anthropic nor Gemini can express: refused by name.
pub(crate) const OPENAI_ONLY: [&str; 4] = [
    "reasoning_effort",
    "web_search_options",
    "functions",
    "function_call",
];

/// An OpenAI tool call's `function.arguments` (message `i`, call `j`) as the JSON object
/// Anthropic's `input` and Gemini's `args` take: `{}` when empty, refused when it is not
/// an object.
pub(crate) fn call_arguments(call: &Value, i: usize, j: usize) -> Result<Value, Untranslatable> {
    let args = call
        .get("function")
        .and_then(|f| f.get("arguments"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if args.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str::<Value>(args)
        .ok()
        .filter(Value::is_object)
        .ok_or_else(|| {
            Untranslatable(format!(
                "messages[{i}].tool_calls[{j}].function.arguments is not a JSON object"
            ))
        })
}

/// Seconds since the Unix epoch, for `created`.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `data: <json>\n\n`.
pub(crate) fn sse_data(out: &mut BytesMut, value: &Value) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(value.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

/// `event: <name>\ndata: <json>\n\n`.
pub(crate) fn sse_named(out: &mut BytesMut, name: &str, value: &Value) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\n");
    sse_data(out, value);
}

/// OpenAI's end-of-stream marker.
pub(crate) fn sse_done(out: &mut BytesMut) {
    out.extend_from_slice(b"data: [DONE]\n\n");
}

/// An OpenAI `usage` object.
pub(crate) fn openai_usage(prompt: u64, completion: u64, cached: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// An OpenAI error body `{"error": {...}}`.
pub(crate) fn openai_error(message: &str, kind: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
}

/// `data:<mime>;base64,<data>` split into its media type and payload; `None` for anything
/// else (including a data URL that is not base64).
pub(crate) fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let mime = meta.strip_suffix(";base64")?;
    Some((mime, data))
}

pub(crate) fn is_http_url(url: &str) -> bool {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    lower.starts_with("http://") || lower.starts_with("https://")
}

/// Writes OpenAI `chat.completion.chunk` events with one id, timestamp and model.
#[derive(Debug, Clone)]
pub(crate) struct ChunkWriter {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

impl ChunkWriter {
    /// One chunk with a single choice.
    pub fn choice(&self, out: &mut BytesMut, index: u64, delta: Value, finish: Option<&str>) {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        sse_data(out, &chunk);
    }

    /// The usage-only chunk sent after the finish when the client asked for usage.
    pub fn usage(&self, out: &mut BytesMut, usage: Value) {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        });
        sse_data(out, &chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_split_into_mime_and_payload() {
        assert_eq!(
            parse_data_url("data:image/png;base64,iVBOR"),
            Some(("image/png", "iVBOR"))
        );
        assert_eq!(parse_data_url("data:text/plain,hello"), None);
        assert_eq!(parse_data_url("https://x/y.png"), None);
        assert!(is_http_url("HTTPS://example.com/a.png"));
        assert!(is_http_url("http://e"));
        assert!(!is_http_url("ftp://example.com/a.png"));
        assert!(!is_http_url("http"));
    }

    #[test]
    fn chunk_writer_adds_null_usage_only_when_asked() {
        let mut w = ChunkWriter {
            id: "c1".into(),
            created: 7,
            model: "m".into(),
            include_usage: false,
        };
        let mut out = BytesMut::new();
        w.choice(&mut out, 0, json!({"content": "hi"}), None);
        assert!(out.starts_with(b"data: ") && out.ends_with(b"}\n\n"));
        let v: Value = serde_json::from_slice(out[6..].trim_ascii_end()).unwrap();
        assert_eq!(
            v,
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
                   "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]})
        );
        w.include_usage = true;
        out.clear();
        w.choice(&mut out, 1, json!({}), Some("stop"));
        let v: Value = serde_json::from_slice(out[6..].trim_ascii_end()).unwrap();
        assert_eq!(v["usage"], Value::Null);
        assert!(v.as_object().unwrap().contains_key("usage"));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert_eq!(v["choices"][0]["index"], 1);
    }

    #[test]
    fn untranslatable_displays_its_message() {
        let e = Untranslatable("n > 1 cannot be sent to an Anthropic model".into());
        assert_eq!(e.to_string(), "n > 1 cannot be sent to an Anthropic model");
    }
}
