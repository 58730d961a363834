//! OpenAI request → Anthropic request (field table in the parent module's doc).

use serde_json::{json, Map, Value};

use crate::translate::{field, is_http_url, parse_data_url, Untranslatable};

/// Default `max_tokens` when the OpenAI request sets none (Anthropic requires it).
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

fn to_anthropic(what: impl std::fmt::Display) -> Untranslatable {
    Untranslatable(format!("{what} cannot be sent to an Anthropic model"))
}

pub(super) fn invalid(what: impl std::fmt::Display) -> Untranslatable {
    Untranslatable(what.to_string())
}

fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// OpenAI chat.completions request body -> Anthropic /v1/messages request body.
/// `model` is the model name to send upstream (replaces the body's `model`).
pub fn request_from_openai(body: &Value, model: &str) -> Result<Value, Untranslatable> {
    let req = body
        .as_object()
        .ok_or_else(|| invalid("the request body must be a JSON object"))?;
    refuse_openai_only(req)?;

    let mut out = Map::new();
    out.insert("model".into(), model.into());
    let (system, messages) = messages_from_openai(req)?;
    if let Some(system) = system {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(messages));
    let max = field(req, "max_completion_tokens")
        .or_else(|| field(req, "max_tokens"))
        .cloned()
        .unwrap_or_else(|| DEFAULT_MAX_TOKENS.into());
    out.insert("max_tokens".into(), max);
    match field(req, "stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        Some(Value::Array(_)) | None => {}
        Some(_) => return Err(invalid("stop must be a string or an array of strings")),
    }
    for key in ["temperature", "top_p", "stream"] {
        if let Some(v) = field(req, key) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(user) = field(req, "user").or_else(|| field(req, "safety_identifier")) {
        out.insert("metadata".into(), json!({"user_id": user}));
    }
    if let Some(tools) = field(req, "tools") {
        let tools = tools
            .as_array()
            .ok_or_else(|| invalid("tools must be an array"))?;
        let tools = tools
            .iter()
            .map(tool_from_openai)
            .collect::<Result<Vec<_>, _>>()?;
        if !tools.is_empty() {
            out.insert("tools".into(), Value::Array(tools));
        }
    }
    let mut choice = match field(req, "tool_choice") {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "required" => Some(json!({"type": "any"})),
            "none" => Some(json!({"type": "none"})),
            other => return Err(invalid(format!("unknown tool_choice `{other}`"))),
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"))
                .ok_or_else(|| to_anthropic("a tool_choice other than a named function"))?;
            Some(json!({"type": "tool", "name": name}))
        }
        Some(_) => return Err(invalid("tool_choice must be a string or an object")),
    };
    if field(req, "parallel_tool_calls") == Some(&Value::Bool(false)) && out.contains_key("tools") {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = true.into();
        }
    }
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
    Ok(Value::Object(out))
}

/// Fields with no Anthropic equivalent whose loss would change the answer.
fn refuse_openai_only(req: &Map<String, Value>) -> Result<(), Untranslatable> {
    if field(req, "n")
        .and_then(Value::as_f64)
        .is_some_and(|n| n > 1.0)
    {
        return Err(to_anthropic("n > 1"));
    }
    if field(req, "logprobs") == Some(&Value::Bool(true)) {
        return Err(to_anthropic("logprobs"));
    }
    if field(req, "top_logprobs").is_some() {
        return Err(to_anthropic("top_logprobs"));
    }
    if let Some(rf) = field(req, "response_format") {
        let kind = rf.get("type").and_then(Value::as_str).unwrap_or("");
        if kind != "text" {
            return Err(to_anthropic(format!("response_format of type `{kind}`")));
        }
    }
    let audio_out = field(req, "modalities")
        .and_then(Value::as_array)
        .is_some_and(|m| m.iter().any(|x| x == "audio"));
    if audio_out || field(req, "audio").is_some() {
        return Err(to_anthropic("audio output (modalities/audio)"));
    }
    if field(req, "logit_bias").is_some_and(|b| b.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(to_anthropic("logit_bias"));
    }
    if field(req, "seed").is_some() {
        return Err(to_anthropic("seed"));
    }
    for key in ["frequency_penalty", "presence_penalty"] {
        if field(req, key).is_some_and(|v| v.as_f64() != Some(0.0)) {
            return Err(to_anthropic(format!("a nonzero {key}")));
        }
    }
    for key in super::super::OPENAI_ONLY {
        if field(req, key).is_some() {
            return Err(to_anthropic(key));
        }
    }
    Ok(())
}

fn tool_from_openai(tool: &Value) -> Result<Value, Untranslatable> {
    let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "function" {
        return Err(to_anthropic(format!("a tools entry of type `{kind}`")));
    }
    let f = tool
        .get("function")
        .ok_or_else(|| invalid("a function tool has no `function`"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("a function tool has no name"))?;
    let mut out = json!({"name": name});
    if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
        out["description"] = d.clone();
    }
    out["input_schema"] = f
        .get("parameters")
        .filter(|p| !p.is_null())
        .cloned()
        .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
    Ok(out)
}

/// The top-level `system` and the alternating messages.
fn messages_from_openai(
    req: &Map<String, Value>,
) -> Result<(Option<Value>, Vec<Value>), Untranslatable> {
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("messages must be an array"))?;
    let mut system: Vec<Value> = Vec::new();
    let mut system_strings = 0usize;
    let mut system_messages = 0usize;
    let mut out: Vec<(&'static str, Value)> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").filter(|c| !c.is_null());
        match role {
            "system" | "developer" => {
                system_messages += 1;
                match content {
                    Some(Value::String(s)) => {
                        system_strings += 1;
                        system.push(text_block(s));
                    }
                    Some(Value::Array(parts)) => {
                        for p in parts {
                            system.push(text_part(p, role)?);
                        }
                    }
                    _ => {}
                }
            }
            "user" => {
                let content = match content {
                    None => Value::String(String::new()),
                    Some(Value::String(s)) => Value::String(s.clone()),
                    Some(Value::Array(parts)) => {
                        Value::Array(parts.iter().map(user_part).collect::<Result<Vec<_>, _>>()?)
                    }
                    Some(_) => return Err(invalid(format!("messages[{i}].content is invalid"))),
                };
                push_merged(&mut out, "user", content);
            }
            "assistant" => {
                if m.get("function_call").is_some_and(|f| !f.is_null()) {
                    return Err(to_anthropic("an assistant function_call"));
                }
                if let Some(content) = assistant_from_openai(m, content, i)? {
                    push_merged(&mut out, "assistant", content);
                }
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(format!("messages[{i}] has no tool_call_id")))?;
                let content = match content {
                    None => Value::String(String::new()),
                    Some(Value::String(s)) => Value::String(s.clone()),
                    Some(Value::Array(parts)) => Value::Array(
                        parts
                            .iter()
                            .map(|p| text_part(p, "tool"))
                            .collect::<Result<_, _>>()?,
                    ),
                    Some(_) => return Err(invalid(format!("messages[{i}].content is invalid"))),
                };
                let block = json!({"type": "tool_result", "tool_use_id": id, "content": content});
                push_merged(&mut out, "user", Value::Array(vec![block]));
            }
            "function" => return Err(to_anthropic("a `function` role message")),
            other => return Err(invalid(format!("unknown message role `{other}`"))),
        }
    }
    let system = match system.len() {
        0 => None,
        1 if system_messages == 1 && system_strings == 1 => {
            Some(system.pop().unwrap()["text"].clone())
        }
        _ => Some(Value::Array(system)),
    };
    let messages = out
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, messages))
}

/// A text part (of a system, developer or tool message) as a text block.
fn text_part(part: &Value, role: &str) -> Result<Value, Untranslatable> {
    match (
        part.get("type").and_then(Value::as_str),
        part.get("text").and_then(Value::as_str),
    ) {
        (Some("text"), Some(text)) => Ok(text_block(text)),
        (kind, _) => Err(to_anthropic(format!(
            "a `{}` content part in a {role} message",
            kind.unwrap_or("untyped")
        ))),
    }
}

fn user_part(part: &Value) -> Result<Value, Untranslatable> {
    match part.get("type").and_then(Value::as_str).unwrap_or("") {
        "text" => {
            let text = part.get("text").and_then(Value::as_str).unwrap_or("");
            Ok(text_block(text))
        }
        "image_url" => {
            let url = part
                .get("image_url")
                .and_then(|i| i.get("url").or(Some(i)))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("an image_url part has no url"))?;
            image_block(url)
        }
        "input_audio" => Err(to_anthropic("audio input (an input_audio content part)")),
        other => Err(to_anthropic(format!("a `{other}` content part"))),
    }
}

fn image_block(url: &str) -> Result<Value, Untranslatable> {
    if let Some((mime, data)) = parse_data_url(url) {
        Ok(json!({"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}}))
    } else if is_http_url(url) {
        Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
    } else {
        Err(to_anthropic(
            "an image URL that is neither http(s) nor a base64 data URL",
        ))
    }
}

/// An assistant message's content: text, then `tool_use` blocks; `None` when it has neither.
fn assistant_from_openai(
    m: &Value,
    content: Option<&Value>,
    i: usize,
) -> Result<Option<Value>, Untranslatable> {
    let calls = m
        .get("tool_calls")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty());
    let Some(calls) = calls else {
        return Ok(match content {
            None => None,
            Some(Value::String(s)) => Some(Value::String(s.clone())),
            Some(Value::Array(parts)) => Some(Value::Array(assistant_parts(parts)?)),
            Some(_) => return Err(invalid(format!("messages[{i}].content is invalid"))),
        });
    };
    let mut blocks = match content {
        Some(Value::String(s)) if !s.is_empty() => vec![text_block(s)],
        Some(Value::Array(parts)) => assistant_parts(parts)?,
        _ => Vec::new(),
    };
    for (j, call) in calls.iter().enumerate() {
        let f = call.get("function").unwrap_or(&Value::Null);
        let id = call.get("id").and_then(Value::as_str).unwrap_or("");
        let name = f.get("name").and_then(Value::as_str).unwrap_or("");
        let input = super::super::call_arguments(call, i, j)?;
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    Ok(Some(Value::Array(blocks)))
}

fn assistant_parts(parts: &[Value]) -> Result<Vec<Value>, Untranslatable> {
    parts
        .iter()
        .map(|p| match p.get("type").and_then(Value::as_str) {
            Some("text") => Ok(text_block(
                p.get("text").and_then(Value::as_str).unwrap_or(""),
            )),
            Some("refusal") => Ok(text_block(
                p.get("refusal").and_then(Value::as_str).unwrap_or(""),
            )),
            kind => Err(to_anthropic(format!(
                "a `{}` content part in an assistant message",
                kind.unwrap_or("untyped")
            ))),
        })
        .collect()
}

/// Appends a message, merging it into the previous one when the role repeats (Anthropic
/// wants alternation). A merged user message keeps its `tool_result` blocks first.
fn push_merged(out: &mut Vec<(&'static str, Value)>, role: &'static str, content: Value) {
    match out.last_mut() {
        Some((last_role, last)) if *last_role == role => {
            let mut blocks = into_blocks(std::mem::take(last));
            blocks.extend(into_blocks(content));
            if role == "user" {
                let (mut results, rest): (Vec<_>, Vec<_>) =
                    blocks.into_iter().partition(|b| b["type"] == "tool_result");
                results.extend(rest);
                blocks = results;
            }
            *last = Value::Array(blocks);
        }
        _ => out.push((role, content)),
    }
}

fn into_blocks(content: Value) -> Vec<Value> {
    match content {
        Value::String(s) if s.is_empty() => Vec::new(),
        Value::String(s) => vec![text_block(&s)],
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}
