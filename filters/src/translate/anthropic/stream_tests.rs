//! Streams both ways, split at every byte.

use serde_json::{json, Value};

use super::*;
use crate::translate::testutil::{
    anthropic_sse, data_sse, done_count, events, json_events, run_split,
};
use crate::translate::StreamTranslator;

// ---- streams ---------------------------------------------------------------------------------

fn anthropic_stream(with_stop: bool) -> Vec<u8> {
    let delta = |i: u64, d: Value| json!({"type": "content_block_delta", "index": i, "delta": d});
    let mut evs = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_01XYZ", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 25, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 100, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        (
            "content_block_delta",
            delta(
                0,
                json!({"type": "thinking_delta", "thinking": "The user wants weather."}),
            ),
        ),
        (
            "content_block_delta",
            delta(0, json!({"type": "signature_delta", "signature": "EqQB"})),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_delta",
            delta(1, json!({"type": "text_delta", "text": "Let me "})),
        ),
        (
            "content_block_delta",
            delta(1, json!({"type": "text_delta", "text": "check, café ☕."})),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}}}),
        ),
        (
            "content_block_delta",
            delta(2, json!({"type": "input_json_delta", "partial_json": ""})),
        ),
        (
            "content_block_delta",
            delta(
                2,
                json!({"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}),
            ),
        ),
        (
            "content_block_delta",
            delta(
                2,
                json!({"type": "input_json_delta", "partial_json": "ris\", \"unit"}),
            ),
        ),
        (
            "content_block_delta",
            delta(
                2,
                json!({"type": "input_json_delta", "partial_json": "s\": \"C\"}"}),
            ),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 2}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {}}}),
        ),
        (
            "content_block_delta",
            delta(3, json!({"type": "input_json_delta", "partial_json": "{}"})),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 3}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 42}}),
        ),
    ];
    if with_stop {
        evs.push(("message_stop", json!({"type": "message_stop"})));
    }
    anthropic_sse(&evs)
}

fn to_openai(input: &[u8], include_usage: bool, cuts: &[usize], clean: bool) -> Vec<u8> {
    let mut t = StreamToOpenAi::new("my-claude", include_usage).created_at(1234);
    let out = run_split(&mut t, input, cuts, clean);
    assert_eq!(
        t.complete(),
        input.ends_with(b"{\"type\":\"message_stop\"}\n\n")
    );
    out
}

#[test]
fn anthropic_stream_to_openai_is_the_same_at_every_split() {
    let input = anthropic_stream(true);
    for include_usage in [false, true] {
        let whole = to_openai(&input, include_usage, &[], true);
        for i in 0..=input.len() {
            assert_eq!(
                to_openai(&input, include_usage, &[i], true),
                whole,
                "split at {i}"
            );
        }
        let every: Vec<usize> = (1..input.len()).collect();
        assert_eq!(to_openai(&input, include_usage, &every, true), whole);
        // Three chunks: a sample of cut pairs (all pairs would be quadratic).
        for i in (0..input.len()).step_by(37) {
            for j in (i..input.len()).step_by(41) {
                assert_eq!(to_openai(&input, include_usage, &[i, j], true), whole);
            }
        }
    }
}

#[test]
fn anthropic_stream_to_openai_content() {
    let input = anthropic_stream(true);
    let out = to_openai(&input, false, &[], true);
    assert_eq!(done_count(&out), 1);
    assert_eq!(events(&out).last().unwrap().1, "[DONE]");
    let chunks = json_events(&out);
    for c in &chunks {
        assert_eq!(c["id"], "msg_01XYZ");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["created"], 1234);
        assert_eq!(c["model"], "my-claude");
        assert!(
            c.get("usage").is_none(),
            "no usage without include_usage: {c}"
        );
    }
    assert_eq!(
        chunks[0]["choices"],
        json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])
    );
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let text: String = deltas
        .iter()
        .filter_map(|d| d["content"].as_str())
        .collect();
    assert_eq!(text, "Let me check, café ☕.");
    let calls: Vec<&Value> = deltas
        .iter()
        .filter_map(|d| d["tool_calls"].get(0))
        .collect();
    assert_eq!(
        calls[0],
        &json!({"index": 0, "id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": ""}})
    );
    let args = |i: u64| -> String {
        calls
            .iter()
            .filter(|c| c["index"] == i)
            .filter_map(|c| c["function"]["arguments"].as_str())
            .collect()
    };
    assert_eq!(args(0), "{\"city\": \"Paris\", \"units\": \"C\"}");
    assert_eq!(
        calls.iter().find(|c| c["index"] == 1).unwrap()["id"],
        "toolu_02"
    );
    assert_eq!(args(1), "{}");
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, vec!["tool_calls"]);
    assert_eq!(
        chunks.last().unwrap()["choices"][0],
        json!({"index": 0, "delta": {}, "finish_reason": "tool_calls"})
    );
}

#[test]
fn anthropic_stream_usage_chunk_only_with_include_usage() {
    let input = anthropic_stream(true);
    let out = to_openai(&input, true, &[], true);
    let chunks = json_events(&out);
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(
        last,
        &json!({"id": "msg_01XYZ", "object": "chat.completion.chunk", "created": 1234, "model": "my-claude", "choices": [],
            "usage": {"prompt_tokens": 135, "completion_tokens": 42, "total_tokens": 177, "prompt_tokens_details": {"cached_tokens": 100}}})
    );
    for c in rest {
        assert_eq!(c["usage"], Value::Null);
        assert!(c.as_object().unwrap().contains_key("usage"));
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
    assert_eq!(done_count(&out), 1);
    // Without include_usage there is no choices-less chunk.
    let plain = json_events(&to_openai(&input, false, &[], true));
    assert!(plain
        .iter()
        .all(|c| c["choices"].as_array().unwrap().len() == 1));
    assert_eq!(plain.len(), rest.len());
}

#[test]
fn message_delta_usage_fields_override_the_start() {
    let input = anthropic_sse(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"},
            "usage": {"input_tokens": 9, "cache_read_input_tokens": 4, "output_tokens": 3}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let chunks = json_events(&to_openai(&input, true, &[], true));
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
    assert_eq!(
        chunks.last().unwrap()["usage"],
        json!({"prompt_tokens": 13, "completion_tokens": 3, "total_tokens": 16, "prompt_tokens_details": {"cached_tokens": 4}})
    );
}

#[test]
fn anthropic_stream_cut_off_gets_no_done_or_usage() {
    let input = anthropic_stream(false);
    for clean in [false, true] {
        let mut t = StreamToOpenAi::new("m", true).created_at(1);
        let out = run_split(&mut t, &input, &[], clean);
        assert!(!t.complete());
        assert_eq!(done_count(&out), 0);
        assert!(json_events(&out)
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty()));
    }
    // Cut mid-event: the partial event is not translated either.
    let full = anthropic_stream(true);
    let mut t = StreamToOpenAi::new("m", false).created_at(1);
    let out = run_split(&mut t, &full[..full.len() - 5], &[], false);
    assert_eq!(done_count(&out), 0);
    assert!(!t.complete());
}

#[test]
fn anthropic_stream_done_is_written_once_even_if_finish_repeats() {
    let input = anthropic_stream(true);
    let mut t = StreamToOpenAi::new("m", true).created_at(1);
    let mut out = bytes::BytesMut::from(&run_split(&mut t, &input, &[], true)[..]);
    t.finish(true, &mut out);
    t.event(
        Some("message_stop"),
        br#"{"type":"message_stop"}"#,
        &mut out,
    );
    assert_eq!(done_count(&out), 1);
    assert_eq!(
        json_events(&out)
            .iter()
            .filter(|c| c["choices"] == json!([]))
            .count(),
        1
    );
}

#[test]
fn anthropic_error_event_becomes_an_openai_error_and_ends_the_stream() {
    let input = anthropic_sse(&[
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "m1", "usage": {"input_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        ),
        (
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "more"}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    let mut t = StreamToOpenAi::new("my-claude", true).created_at(1234);
    let out = run_split(&mut t, &input, &[], true);
    assert!(!t.complete(), "an error is not a proper end");
    let chunks = json_events(&out);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[1]["choices"][0]["delta"]["content"], "Hi");
    assert_eq!(
        chunks[2],
        json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": null}})
    );
    assert_eq!(done_count(&out), 0);
}

// ---- OpenAI -> Anthropic stream -----------------------------------------------------------------

fn openai_stream(with_done: bool) -> Vec<u8> {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-77", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], "usage": null})
        .to_string()
    };
    let call = |v: Value| json!({"tool_calls": [v]});
    let mut items = vec![
        chunk(json!({"role": "assistant", "content": ""}), Value::Null),
        chunk(json!({"content": "Hello"}), Value::Null),
        chunk(json!({"content": " wörld"}), Value::Null),
        chunk(call(json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}})), Value::Null),
        chunk(call(json!({"index": 0, "function": {"arguments": "{\"city\":"}})), Value::Null),
        chunk(call(json!({"index": 0, "function": {"arguments": "\"Paris\"}"}})), Value::Null),
        chunk(call(json!({"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}})), Value::Null),
        chunk(json!({}), json!("tool_calls")),
        json!({"id": "chatcmpl-77", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o", "choices": [],
               "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70, "prompt_tokens_details": {"cached_tokens": 30}}})
        .to_string(),
    ];
    if with_done {
        items.push("[DONE]".into());
    }
    data_sse(&items)
}

fn from_openai(input: &[u8], cuts: &[usize], clean: bool) -> Vec<u8> {
    let mut t = StreamFromOpenAi::new("my-gpt");
    let out = run_split(&mut t, input, cuts, clean);
    assert_eq!(t.complete(), input.ends_with(b"data: [DONE]\r\n\r\n"));
    out
}

#[test]
fn openai_stream_to_anthropic_events() {
    let out = from_openai(&openai_stream(true), &[], true);
    let evs = events(&out);
    for (name, data) in &evs {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(
            name.as_deref(),
            v["type"].as_str(),
            "event name matches type"
        );
    }
    let data: Vec<Value> = evs
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let delta = |i: u64, d: Value| json!({"type": "content_block_delta", "index": i, "delta": d});
    assert_eq!(
        data,
        vec![
            json!({"type": "message_start", "message": {"id": "msg_chatcmpl-77", "type": "message", "role": "assistant",
                "model": "my-gpt", "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            delta(0, json!({"type": "text_delta", "text": "Hello"})),
            delta(0, json!({"type": "text_delta", "text": " wörld"})),
            json!({"type": "content_block_stop", "index": 0}),
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}}),
            delta(
                1,
                json!({"type": "input_json_delta", "partial_json": "{\"city\":"})
            ),
            delta(
                1,
                json!({"type": "input_json_delta", "partial_json": "\"Paris\"}"})
            ),
            json!({"type": "content_block_stop", "index": 1}),
            json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}}),
            delta(2, json!({"type": "input_json_delta", "partial_json": "{}"})),
            json!({"type": "content_block_stop", "index": 2}),
            json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                "usage": {"output_tokens": 20, "input_tokens": 20, "cache_read_input_tokens": 30}}),
            json!({"type": "message_stop"}),
        ]
    );
}

#[test]
fn openai_stream_to_anthropic_is_the_same_at_every_split() {
    let input = openai_stream(true);
    let whole = from_openai(&input, &[], true);
    for i in 0..=input.len() {
        assert_eq!(from_openai(&input, &[i], true), whole, "split at {i}");
    }
    let every: Vec<usize> = (1..input.len()).collect();
    assert_eq!(from_openai(&input, &every, true), whole);
}

#[test]
fn openai_stream_cut_off_gets_no_message_stop() {
    for clean in [false, true] {
        let out = from_openai(&openai_stream(false), &[], clean);
        let names: Vec<Option<String>> = events(&out).into_iter().map(|(n, _)| n).collect();
        assert!(!names.contains(&Some("message_stop".into())), "{names:?}");
        assert!(!names.contains(&Some("message_delta".into())), "{names:?}");
        assert_eq!(names.first().unwrap().as_deref(), Some("message_start"));
    }
}

#[test]
fn openai_stream_error_becomes_an_anthropic_error_event() {
    let input = data_sse(&[
        json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": null}]}).to_string(),
        json!({"error": {"message": "The server had an error", "type": "server_error"}}).to_string(),
        json!({"id": "c", "choices": [{"index": 0, "delta": {"content": "more"}, "finish_reason": null}]}).to_string(),
        "[DONE]".into(),
    ]);
    let mut t = StreamFromOpenAi::new("my-gpt");
    let out = run_split(&mut t, &input, &[], true);
    assert!(!t.complete(), "an error is not a proper end");
    let evs = events(&out);
    let (name, data) = evs.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    assert_eq!(
        serde_json::from_str::<Value>(data).unwrap(),
        json!({"type": "error", "error": {"type": "api_error", "message": "The server had an error"}})
    );
    assert_eq!(
        evs.len(),
        4,
        "message_start, block start, delta, error: {evs:?}"
    );
}

#[test]
fn openai_stream_text_only_ends_with_end_turn() {
    let input = data_sse(&[
        json!({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "A"}, "finish_reason": null}]}).to_string(),
        json!({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}).to_string(),
        "[DONE]".into(),
    ]);
    let data = json_events(&from_openai(&input, &[], true));
    let types: Vec<&str> = data.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(data[4]["delta"]["stop_reason"], "max_tokens");
    assert_eq!(
        data[4]["usage"],
        json!({"output_tokens": 0, "input_tokens": 0, "cache_read_input_tokens": 0})
    );
}
