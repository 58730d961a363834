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

// ---- OpenAI-first shapes ---------------------------------------------------------------------

#[test]
fn o01_plain_text_gets_the_default_max_tokens() {
    openai_first(
        json!({"model": "gpt-4o", "messages": [user("Hello")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("Hello")]}),
    );
}

#[test]
fn o02_system_and_user() {
    openai_first(
        json!({"model": "m", "messages": [
            {"role": "system", "content": "Be brief."}, user("Hi")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "system": "Be brief.", "messages": [user("Hi")]}),
    );
}

#[test]
fn o03_developer_role_is_system() {
    openai_first(
        json!({"model": "m", "messages": [
            {"role": "developer", "content": "Answer in French."}, user("Hi")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "system": "Answer in French.", "messages": [user("Hi")]}),
    );
}

#[test]
fn o04_several_system_messages_become_text_blocks_in_order() {
    openai_first(
        json!({"model": "m", "messages": [
            {"role": "system", "content": "One."},
            {"role": "developer", "content": [{"type": "text", "text": "Two."}, {"type": "text", "text": "Three."}]},
            user("Hi"),
            {"role": "system", "content": "Four."}]}),
        json!({"model": CLAUDE, "max_tokens": 4096,
            "system": [
                {"type": "text", "text": "One."}, {"type": "text", "text": "Two."},
                {"type": "text", "text": "Three."}, {"type": "text", "text": "Four."}],
            "messages": [user("Hi")]}),
    );
}

#[test]
fn o05_system_as_one_parts_array_is_blocks() {
    openai_first(
        json!({"model": "m", "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Rules."}]}, user("Hi")]}),
        json!({"model": CLAUDE, "max_tokens": 4096,
            "system": [{"type": "text", "text": "Rules."}], "messages": [user("Hi")]}),
    );
}

#[test]
fn o06_multi_turn_keeps_order() {
    let turns = json!([user("2+2?"), {"role": "assistant", "content": "4"}, user("And 3+3?")]);
    openai_first(
        json!({"model": "m", "messages": turns}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": turns}),
    );
}

#[test]
fn o07_same_role_runs_merge_into_blocks() {
    openai_first(
        json!({"model": "m", "messages": [
            user("a"), user("b"),
            {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d", "name": "bot"},
            user("e")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]},
            user("e")]}),
    );
}

#[test]
fn o08_assistant_first_is_passed() {
    openai_first(
        json!({"model": "m", "messages": [{"role": "assistant", "content": "Hello, how can I help?"}, user("Tell me a joke")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [
            {"role": "assistant", "content": "Hello, how can I help?"}, user("Tell me a joke")]}),
    );
}

#[test]
fn o09_image_data_url_becomes_base64_source() {
    openai_first(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}}]}]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}),
    );
}

#[test]
fn o10_image_http_url_becomes_url_source() {
    openai_first(
        json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            {"type": "text", "text": "Describe"}]}]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            {"type": "text", "text": "Describe"}]}]}),
    );
}

#[test]
fn o11_tools_with_auto_choice() {
    openai_first(
        json!({"model": "m", "messages": [user("Weather in Paris?")], "tools": [weather_tool()], "tool_choice": "auto"}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("Weather in Paris?")],
            "tools": [weather_tool_anthropic()], "tool_choice": {"type": "auto"}}),
    );
}

#[test]
fn o12_tool_choice_required_is_any() {
    openai_first(
        json!({"model": "m", "messages": [user("w")], "tools": [weather_tool()], "tool_choice": "required"}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("w")],
            "tools": [weather_tool_anthropic()], "tool_choice": {"type": "any"}}),
    );
}

#[test]
fn o13_tool_choice_none() {
    openai_first(
        json!({"model": "m", "messages": [user("w")], "tools": [weather_tool()], "tool_choice": "none"}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("w")],
            "tools": [weather_tool_anthropic()], "tool_choice": {"type": "none"}}),
    );
}

#[test]
fn o14_tool_choice_named_function() {
    openai_first(
        json!({"model": "m", "messages": [user("w")], "tools": [weather_tool()],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("w")],
            "tools": [weather_tool_anthropic()], "tool_choice": {"type": "tool", "name": "get_weather"}}),
    );
}

#[test]
fn o15_parallel_tool_calls_false_disables_parallel_use() {
    openai_first(
        json!({"model": "m", "messages": [user("w")], "tools": [weather_tool()],
            "tool_choice": "required", "parallel_tool_calls": false}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("w")], "tools": [weather_tool_anthropic()],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true}}),
    );
}

#[test]
fn o16_parallel_tool_calls_false_without_choice_is_auto() {
    openai_first(
        json!({"model": "m", "messages": [user("w")], "tools": [weather_tool()], "parallel_tool_calls": false}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("w")], "tools": [weather_tool_anthropic()],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": true}}),
    );
}

#[test]
fn o17_tool_without_parameters_or_description_gets_empty_schema() {
    openai_first(
        json!({"model": "m", "messages": [user("t")], "tools": [{"type": "function", "function": {"name": "now"}}]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("t")],
            "tools": [{"name": "now", "input_schema": {"type": "object", "properties": {}}}]}),
    );
}

#[test]
fn o18_one_tool_call_and_its_result() {
    openai_first(
        json!({"model": "m", "tools": [weather_tool()], "messages": [
            user("Weather in Paris?"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"}]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "tools": [weather_tool_anthropic()], "messages": [
            user("Weather in Paris?"),
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny"}]}]}),
    );
}

#[test]
fn o19_text_then_several_tool_calls_and_results_then_user_text() {
    openai_first(
        json!({"model": "m", "tools": [weather_tool()], "messages": [
            user("Paris and Rome?"),
            {"role": "assistant", "content": "Checking both.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
            {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "25C"}]},
            user("Which is warmer?")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "tools": [weather_tool_anthropic()], "messages": [
            user("Paris and Rome?"),
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking both."},
                {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Rome"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "call_b", "content": [{"type": "text", "text": "25C"}]},
                {"type": "text", "text": "Which is warmer?"}]}]}),
    );
}

#[test]
fn o20_empty_arguments_are_an_empty_input() {
    openai_first(
        json!({"model": "m", "messages": [
            user("time?"),
            {"role": "assistant", "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "now", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "c", "content": "noon"}]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [
            user("time?"),
            {"role": "assistant", "content": [{"type": "tool_use", "id": "c", "name": "now", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c", "content": "noon"}]}]}),
    );
}

#[test]
fn o21_stop_string_is_a_one_element_array() {
    openai_first(
        json!({"model": "m", "messages": [user("count")], "stop": "5"}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("count")], "stop_sequences": ["5"]}),
    );
}

#[test]
fn o22_stop_array() {
    openai_first(
        json!({"model": "m", "messages": [user("count")], "stop": ["5", "END"]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("count")], "stop_sequences": ["5", "END"]}),
    );
}

#[test]
fn o23_temperature_and_top_p_pass() {
    openai_first(
        json!({"model": "m", "messages": [user("x")], "temperature": 0.3, "top_p": 0.9}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("x")], "temperature": 0.3, "top_p": 0.9}),
    );
}

#[test]
fn o24_max_completion_tokens_wins_over_max_tokens() {
    openai_first(
        json!({"model": "m", "messages": [user("x")], "max_completion_tokens": 300, "max_tokens": 100}),
        json!({"model": CLAUDE, "max_tokens": 300, "messages": [user("x")]}),
    );
}

#[test]
fn o25_max_tokens_alone() {
    openai_first(
        json!({"model": "m", "messages": [user("x")], "max_tokens": 100}),
        json!({"model": CLAUDE, "max_tokens": 100, "messages": [user("x")]}),
    );
}

#[test]
fn o26_stream_true_and_stream_options() {
    openai_first(
        json!({"model": "m", "messages": [user("x")], "stream": true, "stream_options": {"include_usage": true}}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("x")], "stream": true}),
    );
}

#[test]
fn o27_user_is_metadata_user_id() {
    openai_first(
        json!({"model": "m", "messages": [user("x")], "user": "u-42"}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("x")], "metadata": {"user_id": "u-42"}}),
    );
}

#[test]
fn o28_no_op_and_null_fields_are_dropped() {
    openai_first(
        json!({"model": "m", "messages": [user("x")], "n": 1, "logprobs": false, "frequency_penalty": 0,
            "presence_penalty": 0.0, "response_format": {"type": "text"}, "seed": null, "store": false,
            "service_tier": "auto", "temperature": null, "stop": null, "tools": null}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("x")]}),
    );
}

#[test]
fn o29_tool_result_then_user_string_merge_with_results_first() {
    openai_first(
        json!({"model": "m", "messages": [
            user("go"),
            {"role": "assistant", "content": "ok", "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":[1,2]}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "{\"ok\":true}"},
            user("thanks")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [
            user("go"),
            {"role": "assistant", "content": [
                {"type": "text", "text": "ok"},
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": [1, 2]}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "{\"ok\":true}"},
                {"type": "text", "text": "thanks"}]}]}),
    );
}

#[test]
fn o30_everything_at_once() {
    openai_first(
        json!({"model": "m", "stream": false, "temperature": 1, "max_completion_tokens": 64, "user": "u",
            "stop": ["\n\n"], "tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false,
            "messages": [{"role": "system", "content": "sys"}, user("q")]}),
        json!({"model": CLAUDE, "stream": false, "temperature": 1, "max_tokens": 64, "metadata": {"user_id": "u"},
            "stop_sequences": ["\n\n"], "tools": [weather_tool_anthropic()],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "system": "sys", "messages": [user("q")]}),
    );
}

#[test]
fn o31_assistant_refusal_part_is_text() {
    openai_first(
        json!({"model": "m", "messages": [user("x"),
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, user("y")]}),
        json!({"model": CLAUDE, "max_tokens": 4096, "messages": [user("x"),
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, user("y")]}),
    );
    let refusal = json!({"model": "m", "messages": [user("x"),
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]}, user("y")]});
    assert_eq!(
        request_from_openai(&refusal, CLAUDE).unwrap()["messages"][1],
        json!({"role": "assistant", "content": [{"type": "text", "text": "I can't."}]})
    );
}

// ---- Anthropic-first shapes ------------------------------------------------------------------

#[test]
fn a01_system_string() {
    anthropic_first(
        json!({"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": "Be terse.", "messages": [user("Hi")]}),
        json!({"model": GPT, "max_tokens": 1024, "messages": [{"role": "system", "content": "Be terse."}, user("Hi")]}),
    );
}

#[test]
fn a02_system_blocks_with_cache_control() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 10, "system": [
            {"type": "text", "text": "Part one."},
            {"type": "text", "text": "Part two.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
        json!({"model": GPT, "max_tokens": 10, "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}),
    );
}

#[test]
fn a03_image_base64() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
            {"type": "text", "text": "What is it?"}]}]}),
        json!({"model": GPT, "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
            {"type": "text", "text": "What is it?"}]}]}),
    );
}

#[test]
fn a04_image_url() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}]}),
        json!({"model": GPT, "max_tokens": 10, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
    );
}

#[test]
fn a05_tool_use_and_tool_result_turns() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 500, "tools": [weather_tool_anthropic()], "messages": [
            user("Weather in Oslo?"),
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Oslo", "units": ["C"]}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "-3C"}]},
            {"role": "assistant", "content": "It is -3C."}]}),
        json!({"model": GPT, "max_tokens": 500, "tools": [weather_tool()], "messages": [
            user("Weather in Oslo?"),
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\",\"units\":[\"C\"]}"}}]},
            {"role": "tool", "tool_call_id": "toolu_01", "content": "-3C"},
            {"role": "assistant", "content": "It is -3C."}]}),
    );
}

#[test]
fn a06_tool_result_is_error_goes_into_the_text() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [
            user("x"),
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t", "is_error": true, "content": "city not found"}]}]}),
        json!({"model": GPT, "max_tokens": 5, "messages": [
            user("x"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t", "content": "Error: city not found"}]}),
    );
}

#[test]
fn a07_tool_result_blocks_and_text_after() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [
            user("x"),
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "f", "input": {"q": 1}},
                {"type": "tool_use", "id": "t2", "name": "f", "input": {"q": 2}}]},
            {"role": "user", "content": [
                {"type": "text", "text": "here you go"},
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "one"}]},
                {"type": "tool_result", "tool_use_id": "t2"}]}]}),
        json!({"model": GPT, "max_tokens": 5, "messages": [
            user("x"),
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"q\":1}"}},
                {"id": "t2", "type": "function", "function": {"name": "f", "arguments": "{\"q\":2}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": [{"type": "text", "text": "one"}]},
            {"role": "tool", "tool_call_id": "t2", "content": ""},
            {"role": "user", "content": [{"type": "text", "text": "here you go"}]}]}),
    );
}

#[test]
fn a08_tool_choice_any() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x")], "tools": [weather_tool_anthropic()], "tool_choice": {"type": "any"}}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x")], "tools": [weather_tool()], "tool_choice": "required"}),
    );
}

#[test]
fn a09_tool_choice_tool_without_parallel_use() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x")], "tools": [weather_tool_anthropic()],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x")], "tools": [weather_tool()],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "parallel_tool_calls": false}),
    );
}

#[test]
fn a10_tool_choice_none() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x")], "tools": [weather_tool_anthropic()], "tool_choice": {"type": "none"}}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x")], "tools": [weather_tool()], "tool_choice": "none"}),
    );
}

#[test]
fn a11_tool_choice_auto_and_custom_tool_type() {
    let mut tool = weather_tool_anthropic();
    tool["type"] = json!("custom");
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x")], "tools": [tool], "tool_choice": {"type": "auto"}}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x")], "tools": [weather_tool()], "tool_choice": "auto"}),
    );
}

#[test]
fn a12_stop_sequences_temperature_top_p() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x")], "stop_sequences": ["###"], "temperature": 0.2, "top_p": 0.5}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x")], "stop": ["###"], "temperature": 0.2, "top_p": 0.5}),
    );
}

#[test]
fn a13_stream_asks_for_usage() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x")], "stream": true}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x")], "stream": true, "stream_options": {"include_usage": true}}),
    );
}

#[test]
fn a14_metadata_user_id_is_user() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x")], "metadata": {"user_id": "acct-9"}}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x")], "user": "acct-9"}),
    );
}

#[test]
fn a15_disabled_thinking_and_earlier_thinking_blocks_are_dropped() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "thinking": {"type": "disabled"}, "messages": [
            user("x"),
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "y"},
                {"type": "text", "text": "z"}]},
            user("w")]}),
        json!({"model": GPT, "max_tokens": 5, "messages": [
            user("x"),
            {"role": "assistant", "content": [{"type": "text", "text": "y"}, {"type": "text", "text": "z"}]},
            user("w")]}),
    );
}

#[test]
fn a16_stream_false_passes() {
    anthropic_first(
        json!({"model": "c", "max_tokens": 5, "messages": [user("x"), {"role": "assistant", "content": [{"type": "text", "text": "pre"}]}], "stream": false}),
        json!({"model": GPT, "max_tokens": 5, "messages": [user("x"), {"role": "assistant", "content": "pre"}], "stream": false}),
    );
}
