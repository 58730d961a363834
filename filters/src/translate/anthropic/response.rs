//! Non-streaming response bodies, both directions.

use serde_json::{json, Value};

use crate::translate::{now_unix, openai_error, openai_usage};

fn u64_at(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// Anthropic `stop_reason` -> OpenAI `finish_reason`.
pub(crate) fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything new.
        _ => "stop",
    }
}

/// OpenAI `finish_reason` -> Anthropic `stop_reason`.
pub(crate) fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

/// Anthropic usage (`input_tokens` excludes cached tokens) -> OpenAI usage (prompt includes
/// them).
pub(crate) fn usage_to_openai(usage: &Value) -> Value {
    let cache_read = u64_at(usage, "cache_read_input_tokens");
    let prompt =
        u64_at(usage, "input_tokens") + u64_at(usage, "cache_creation_input_tokens") + cache_read;
    openai_usage(prompt, u64_at(usage, "output_tokens"), cache_read)
}

/// The cached part of an OpenAI usage object's prompt.
pub(crate) fn cached_tokens(usage: &Value) -> u64 {
    usage
        .get("prompt_tokens_details")
        .map(|d| u64_at(d, "cached_tokens"))
        .unwrap_or(0)
}

/// Anthropic message response (non-stream) -> OpenAI chat.completion response. `model`: the
/// model name the client asked for (echoed in the response). An Anthropic error body becomes an
/// OpenAI error body.
pub fn response_to_openai(body: &Value, model: &str) -> Value {
    if body.get("type").and_then(Value::as_str) == Some("error") {
        let e = body.get("error").unwrap_or(&Value::Null);
        return openai_error(
            e.get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error"),
            e.get("type").and_then(Value::as_str).unwrap_or("api_error"),
        );
    }
    let mut text = String::new();
    let mut has_text = false;
    let mut calls = Vec::new();
    for b in body
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match b.get("type").and_then(Value::as_str) {
            Some("text") => {
                has_text = true;
                text.push_str(b.get("text").and_then(Value::as_str).unwrap_or(""));
            }
            Some("tool_use") => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or_default(),
                    "arguments": b.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            _ => {}
        }
    }
    let content = if has_text || calls.is_empty() {
        Value::String(text)
    } else {
        Value::Null
    };
    let mut message = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let finish = body
        .get("stop_reason")
        .and_then(Value::as_str)
        .map(finish_reason);
    json!({
        "id": body.get("id").cloned().unwrap_or_default(),
        "object": "chat.completion",
        "created": now_unix(),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": usage_to_openai(body.get("usage").unwrap_or(&Value::Null)),
    })
}

/// Anthropic error `type`s; an OpenAI error type outside them becomes `api_error`.
const ANTHROPIC_ERROR_TYPES: &[&str] = &[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "overloaded_error",
];

pub(crate) fn anthropic_error(message: &str, kind: &str) -> Value {
    let kind = if ANTHROPIC_ERROR_TYPES.contains(&kind) {
        kind
    } else {
        "api_error"
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// OpenAI chat.completion response (non-stream) -> Anthropic message response. An OpenAI
/// error body becomes an Anthropic error body.
pub fn response_from_openai(body: &Value, model: &str) -> Value {
    if let Some(e) = body.get("error").filter(|e| !e.is_null()) {
        return anthropic_error(
            e.get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error"),
            e.get("type").and_then(Value::as_str).unwrap_or("api_error"),
        );
    }
    let choice = body
        .get("choices")
        .and_then(|c| c.get(0))
        .unwrap_or(&Value::Null);
    let message = choice.get("message").unwrap_or(&Value::Null);
    let mut content = Vec::new();
    let text = match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    };
    let text = if text.is_empty() {
        message
            .get("refusal")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    } else {
        text
    };
    if !text.is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let f = call.get("function").unwrap_or(&Value::Null);
        let input = f
            .get("arguments")
            .and_then(Value::as_str)
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        content.push(json!({
            "type": "tool_use",
            "id": call.get("id").cloned().unwrap_or_default(),
            "name": f.get("name").cloned().unwrap_or_default(),
            "input": input,
        }));
    }
    let stop = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(stop_reason);
    let usage = body.get("usage").unwrap_or(&Value::Null);
    let cached = cached_tokens(usage);
    let id = body.get("id").and_then(Value::as_str).unwrap_or("");
    json!({
        "id": format!("msg_{id}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {
            "input_tokens": u64_at(usage, "prompt_tokens").saturating_sub(cached),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
            "output_tokens": u64_at(usage, "completion_tokens"),
        },
    })
}
