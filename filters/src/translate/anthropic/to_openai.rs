//! Anthropic request → OpenAI request (field table in the parent module's doc).

use serde_json::{json, Map, Value};

use super::request::invalid;
use crate::translate::{field, Untranslatable};

fn to_openai(what: impl std::fmt::Display) -> Untranslatable {
    Untranslatable(format!(
        "{what} cannot be sent to an OpenAI-compatible model"
    ))
}

/// Anthropic /v1/messages request body -> OpenAI chat.completions request body. When
/// `stream` is true, sets `stream_options: {"include_usage": true}` (Anthropic clients always
/// get usage).
pub fn request_to_openai(body: &Value, model: &str) -> Result<Value, Untranslatable> {
    let req = body
        .as_object()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    if field(req, "top_k").is_some() {
        return Err(to_openai("top_k"));
    }
    if let Some(t) = field(req, "thinking") {
        if t.get("type").and_then(Value::as_str) != Some("disabled") {
            return Err(to_openai("thinking (extended thinking)"));
        }
    }
    for key in ["mcp_servers", "container"] {
        if field(req, key).is_some() {
            return Err(to_openai(key));
        }
    }

    let mut out = Map::new();
    out.insert("model".into(), model.into());
    let mut messages = Vec::new();
    match field(req, "system") {
        None => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(Value::Array(blocks)) => {
            let parts = blocks
                .iter()
                .map(|b| match b.get("type").and_then(Value::as_str) {
                    Some("text") => Ok(json!({"type": "text", "text": b.get("text").and_then(Value::as_str).unwrap_or("")})),
                    kind => Err(to_openai(format!("a `{}` system block", kind.unwrap_or("untyped")))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            messages.push(json!({"role": "system", "content": parts}));
        }
        Some(_) => {
            return Err(invalid(
                "system must be a string or an array of text blocks",
            ))
        }
    }
    let input = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages must be an array"))?;
    for (i, m) in input.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        match (role, content) {
            ("user" | "assistant", Value::String(s)) => {
                messages.push(json!({"role": role, "content": s}));
            }
            ("user", Value::Array(blocks)) => user_to_openai(blocks, &mut messages)?,
            ("assistant", Value::Array(blocks)) => messages.push(assistant_to_openai(blocks)?),
            ("user" | "assistant", _) => {
                return Err(invalid(format!("messages[{i}].content is invalid")))
            }
            (other, _) => return Err(invalid(format!("unknown message role `{other}`"))),
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    for key in ["max_tokens", "temperature", "top_p"] {
        if let Some(v) = field(req, key) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(stop) = field(req, "stop_sequences").and_then(Value::as_array) {
        if !stop.is_empty() {
            out.insert("stop".into(), Value::Array(stop.clone()));
        }
    }
    if let Some(user) = req.get("metadata").and_then(|m| m.get("user_id")) {
        if !user.is_null() {
            out.insert("user".into(), user.clone());
        }
    }
    if let Some(stream) = field(req, "stream") {
        out.insert("stream".into(), stream.clone());
        if stream == &Value::Bool(true) {
            out.insert("stream_options".into(), json!({"include_usage": true}));
        }
    }
    if let Some(tools) = field(req, "tools").and_then(Value::as_array) {
        let tools = tools
            .iter()
            .map(|t| {
                let kind = t.get("type").and_then(Value::as_str).unwrap_or("custom");
                if kind != "custom" {
                    return Err(to_openai(format!("the server tool `{kind}`")));
                }
                let mut f = json!({"name": t.get("name").cloned().unwrap_or_default()});
                if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
                    f["description"] = d.clone();
                }
                f["parameters"] = t
                    .get("input_schema")
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
                Ok(json!({"type": "function", "function": f}))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if !tools.is_empty() {
            out.insert("tools".into(), Value::Array(tools));
        }
    }
    if let Some(choice) = field(req, "tool_choice") {
        let c = match choice.get("type").and_then(Value::as_str).unwrap_or("") {
            "auto" => json!("auto"),
            "any" => json!("required"),
            "none" => json!("none"),
            "tool" => {
                json!({"type": "function", "function": {"name": choice.get("name").cloned().unwrap_or_default()}})
            }
            other => return Err(invalid(format!("unknown tool_choice type `{other}`"))),
        };
        out.insert("tool_choice".into(), c);
        if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            out.insert("parallel_tool_calls".into(), false.into());
        }
    }
    Ok(Value::Object(out))
}

/// A user message's blocks: `tool_result`s become `tool` messages first, then the rest.
fn user_to_openai(blocks: &[Value], messages: &mut Vec<Value>) -> Result<(), Untranslatable> {
    let mut parts = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => parts.push(json!({"type": "text", "text": b.get("text").and_then(Value::as_str).unwrap_or("")})),
            "image" => parts.push(image_part(b)?),
            "tool_result" => messages.push(tool_result_to_openai(b)?),
            other => return Err(to_openai(format!("a `{other}` content block"))),
        }
    }
    if !parts.is_empty() {
        messages.push(json!({"role": "user", "content": parts}));
    }
    Ok(())
}

fn image_part(block: &Value) -> Result<Value, Untranslatable> {
    let source = block.get("source").unwrap_or(&Value::Null);
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => format!(
            "data:{};base64,{}",
            source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or(""),
            source.get("data").and_then(Value::as_str).unwrap_or("")
        ),
        Some("url") => source
            .get("url")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        kind => {
            return Err(to_openai(format!(
                "an image with a `{}` source",
                kind.unwrap_or("missing")
            )))
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

fn tool_result_to_openai(block: &Value) -> Result<Value, Untranslatable> {
    let id = block
        .get("tool_use_id")
        .and_then(Value::as_str)
        .unwrap_or("");
    let is_error = block.get("is_error") == Some(&Value::Bool(true));
    let content = match block.get("content").unwrap_or(&Value::Null) {
        Value::Null => Value::String(String::new()),
        Value::String(s) => Value::String(s.clone()),
        Value::Array(blocks) => Value::Array(
            blocks
                .iter()
                .map(|b| match b.get("type").and_then(Value::as_str) {
                    Some("text") => Ok(json!({"type": "text", "text": b.get("text").and_then(Value::as_str).unwrap_or("")})),
                    kind => Err(to_openai(format!(
                        "a `{}` block inside a tool_result",
                        kind.unwrap_or("untyped")
                    ))),
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err(invalid("tool_result content must be a string or blocks")),
    };
    let content = match (is_error, content) {
        (false, c) => c,
        (true, Value::String(s)) => Value::String(format!("Error: {s}")),
        (true, Value::Array(mut parts)) => {
            match parts.first_mut() {
                Some(first) => {
                    let text = first["text"].as_str().unwrap_or("");
                    first["text"] = format!("Error: {text}").into();
                }
                None => parts.push(json!({"type": "text", "text": "Error: "})),
            }
            Value::Array(parts)
        }
        (true, c) => c,
    };
    Ok(json!({"role": "tool", "tool_call_id": id, "content": content}))
}

fn assistant_to_openai(blocks: &[Value]) -> Result<Value, Untranslatable> {
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    for b in blocks {
        match b.get("type").and_then(Value::as_str).unwrap_or("") {
            "text" => texts.push(b.get("text").and_then(Value::as_str).unwrap_or("")),
            "tool_use" => calls.push(json!({
                "id": b.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or_default(),
                    "arguments": b.get("input").unwrap_or(&json!({})).to_string(),
                },
            })),
            "thinking" | "redacted_thinking" => {}
            other => return Err(to_openai(format!("a `{other}` content block"))),
        }
    }
    let content = match texts.as_slice() {
        [] => Value::Null,
        [one] => Value::String(one.to_string()),
        many => Value::Array(
            many.iter()
                .map(|t| json!({"type": "text", "text": t}))
                .collect(),
        ),
    };
    let mut m = json!({"role": "assistant", "content": content});
    if !calls.is_empty() {
        m["tool_calls"] = Value::Array(calls);
    }
    Ok(m)
}
