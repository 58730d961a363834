//! The request corpus: each shape translated to the other format and compared field by field
//! with an expected body written out here, then translated back and compared with the
//! original after normalizing only the documented differences (see `canon_openai` and
//! `canon_anthropic`).

use serde_json::{json, Map, Value};

use super::anthropic::{request_from_openai, request_to_openai};

const CLAUDE: &str = "claude-x";
const GPT: &str = "gpt-x";

/// OpenAI-first: forward must equal `expected`; back must mean the same as `openai`.
fn openai_first(openai: Value, expected: Value) {
    let anthropic = request_from_openai(&openai, CLAUDE).expect("translatable");
    assert_eq!(anthropic, expected, "OpenAI -> Anthropic");
    let back = request_to_openai(&anthropic, GPT).expect("translatable back");
    assert_eq!(back["model"], GPT);
    assert_eq!(
        back.get("stream_options").cloned(),
        (back.get("stream") == Some(&json!(true))).then(|| json!({"include_usage": true})),
        "stream_options exactly when streaming"
    );
    assert_eq!(canon_openai(&back), canon_openai(&openai), "round trip");
}

/// Anthropic-first: to OpenAI must equal `expected`; back must mean the same as `anthropic`.
fn anthropic_first(anthropic: Value, expected: Value) {
    let openai = request_to_openai(&anthropic, GPT).expect("translatable");
    assert_eq!(openai, expected, "Anthropic -> OpenAI");
    let back = request_from_openai(&openai, CLAUDE).expect("translatable back");
    assert_eq!(
        canon_anthropic(&back),
        canon_anthropic(&anthropic),
        "round trip"
    );
}

fn text_parts(content: &Value) -> Vec<Value> {
    match content {
        Value::String(s) if s.is_empty() => vec![],
        Value::String(s) => vec![json!({"type": "text", "text": s})],
        Value::Array(parts) => parts
            .iter()
            .map(|p| {
                let mut p = p.clone();
                if let Some(img) = p.get_mut("image_url").and_then(Value::as_object_mut) {
                    img.remove("detail");
                }
                p
            })
            .collect(),
        _ => vec![],
    }
}

/// The documented differences of an OpenAI -> Anthropic -> OpenAI trip, normalized away:
/// `model` and `stream_options` dropped; `max_completion_tokens` as `max_tokens`, 4096 when
/// absent; `stop` as an array; no-op fields and nulls dropped; `parallel_tool_calls: false`
/// implies an `auto` tool choice; tools get the empty schema; system and developer messages
/// hoisted into one leading system message; consecutive user/tool and assistant messages
/// merged (tool messages first, user text as parts; assistant text: one -> string, none ->
/// null, several -> parts); image `detail` and message `name` dropped; tool call arguments
/// compact.
fn canon_openai(v: &Value) -> Value {
    let mut o: Map<String, Value> = v.as_object().unwrap().clone();
    o.retain(|_, v| !v.is_null());
    for key in [
        "model",
        "stream_options",
        "n",
        "logprobs",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "store",
        "service_tier",
    ] {
        o.remove(key);
    }
    let max = o
        .remove("max_completion_tokens")
        .or_else(|| o.get("max_tokens").cloned())
        .unwrap_or(json!(4096));
    o.insert("max_tokens".into(), max);
    if let Some(Value::String(s)) = o.get("stop").cloned() {
        o.insert("stop".into(), json!([s]));
    }
    if o.get("parallel_tool_calls") == Some(&json!(false)) && !o.contains_key("tool_choice") {
        o.insert("tool_choice".into(), json!("auto"));
    }
    if let Some(tools) = o.get_mut("tools").and_then(Value::as_array_mut) {
        for t in tools {
            let f = &mut t["function"];
            if f.get("parameters").is_none() {
                f["parameters"] = json!({"type": "object", "properties": {}});
            }
        }
    }
    let msgs = o["messages"].as_array().unwrap().clone();
    let mut out = Vec::new();
    let system: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["role"] == "system" || m["role"] == "developer")
        .collect();
    match system.as_slice() {
        [] => {}
        [one] if one["content"].is_string() => {
            out.push(json!({"role": "system", "content": one["content"]}))
        }
        many => {
            let parts: Vec<Value> = many
                .iter()
                .flat_map(|m| text_parts(&m["content"]))
                .collect();
            out.push(json!({"role": "system", "content": parts}));
        }
    }
    let rest: Vec<Value> = msgs
        .into_iter()
        .filter(|m| m["role"] != "system" && m["role"] != "developer")
        .map(|mut m| {
            m.as_object_mut().unwrap().remove("name");
            m
        })
        .collect();
    let side = |m: &Value| m["role"] == "assistant";
    let mut i = 0;
    while i < rest.len() {
        let mut j = i;
        while j < rest.len() && side(&rest[j]) == side(&rest[i]) {
            j += 1;
        }
        let group = &rest[i..j];
        if side(&rest[i]) {
            if let [one] = group {
                if one["content"].is_string() && one.get("tool_calls").is_none() {
                    out.push(one.clone());
                    i = j;
                    continue;
                }
            }
            let texts: Vec<Value> = group
                .iter()
                .flat_map(|m| text_parts(&m["content"]))
                .collect();
            let calls: Vec<Value> = group
                .iter()
                .flat_map(|m| m["tool_calls"].as_array().cloned().unwrap_or_default())
                .map(|mut c| {
                    let a = c["function"]["arguments"]
                        .as_str()
                        .unwrap_or("")
                        .trim()
                        .to_string();
                    let a: Value = if a.is_empty() {
                        json!({})
                    } else {
                        serde_json::from_str(&a).unwrap()
                    };
                    c["function"]["arguments"] = a.to_string().into();
                    c
                })
                .collect();
            let content = match texts.as_slice() {
                [] => Value::Null,
                [one] => one["text"].clone(),
                _ => Value::Array(texts),
            };
            let mut m = json!({"role": "assistant", "content": content});
            if !calls.is_empty() {
                m["tool_calls"] = Value::Array(calls);
            }
            out.push(m);
        } else {
            let tools: Vec<&Value> = group.iter().filter(|m| m["role"] == "tool").collect();
            let users: Vec<&Value> = group.iter().filter(|m| m["role"] == "user").collect();
            out.extend(tools.iter().map(|&m| m.clone()));
            if let ([one], true) = (users.as_slice(), tools.is_empty()) {
                let mut one = (*one).clone();
                if one["content"].is_array() {
                    one["content"] = Value::Array(text_parts(&one["content"]));
                }
                out.push(one);
            } else {
                let parts: Vec<Value> = users
                    .iter()
                    .flat_map(|m| text_parts(&m["content"]))
                    .collect();
                if !parts.is_empty() {
                    out.push(json!({"role": "user", "content": parts}));
                }
            }
        }
        i = j;
    }
    o.insert("messages".into(), Value::Array(out));
    Value::Object(o)
}

/// The documented differences of an Anthropic -> OpenAI -> Anthropic trip, normalized away:
/// `model` set; `thinking: disabled` and thinking blocks dropped; `is_error` folded into the
/// text as `Error: `; a missing tool_result content as ""; `tool_result` blocks first in a
/// user message; an assistant message of exactly one text block as a string; `cache_control`
/// and a tool's `type: custom` dropped.
fn canon_anthropic(v: &Value) -> Value {
    let mut v = v.clone();
    let o = v.as_object_mut().unwrap();
    o.insert("model".into(), CLAUDE.into());
    if o.get("thinking").is_some_and(|t| t["type"] == "disabled") {
        o.remove("thinking");
    }
    fn strip(blocks: &mut Value) {
        for b in blocks.as_array_mut().into_iter().flatten() {
            b.as_object_mut().unwrap().remove("cache_control");
        }
    }
    strip(o.get_mut("system").unwrap_or(&mut Value::Null));
    if let Some(tools) = o.get_mut("tools").and_then(Value::as_array_mut) {
        for t in tools {
            let t = t.as_object_mut().unwrap();
            t.remove("cache_control");
            if t.get("type") == Some(&json!("custom")) {
                t.remove("type");
            }
        }
    }
    for m in o["messages"].as_array_mut().unwrap() {
        let Some(blocks) = m["content"].as_array_mut() else {
            continue;
        };
        let blocks: Vec<Value> = blocks
            .iter()
            .filter(|b| b["type"] != "thinking" && b["type"] != "redacted_thinking")
            .cloned()
            .map(|mut b| {
                let bo = b.as_object_mut().unwrap();
                bo.remove("cache_control");
                if bo.get("type") == Some(&json!("tool_result")) {
                    let content = bo.remove("content").unwrap_or(json!(""));
                    let content = match (bo.remove("is_error"), content) {
                        (Some(Value::Bool(true)), Value::String(s)) => json!(format!("Error: {s}")),
                        (_, c) => c,
                    };
                    bo.insert("content".into(), content);
                }
                b
            })
            .collect();
        let (mut first, rest): (Vec<Value>, Vec<Value>) =
            blocks.into_iter().partition(|b| b["type"] == "tool_result");
        first.extend(rest);
        m["content"] = match (m["role"].as_str(), first.as_slice()) {
            (Some("assistant"), [one]) if one["type"] == "text" => one["text"].clone(),
            _ => Value::Array(first),
        };
    }
    v
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }})
}

fn weather_tool_anthropic() -> Value {
    json!({
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    })
}

mod anthropic_first;
mod openai_first;
