//! Refusals and responses (streams: `stream_tests.rs`; the request corpus: `translate/corpus/`).

use serde_json::{json, Value};

use super::*;
use crate::translate::Untranslatable;

fn refused_to_anthropic(extra: Value) -> String {
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    match request_from_openai(&body, "claude") {
        Err(Untranslatable(message)) => message,
        Ok(v) => panic!("translated: {v}"),
    }
}

#[test]
fn openai_fields_without_an_anthropic_meaning_are_refused_by_name() {
    let cases = [
        (json!({"n": 2}), "n > 1 cannot be sent to an Anthropic model"),
        (json!({"logprobs": true}), "logprobs cannot be sent to an Anthropic model"),
        (json!({"top_logprobs": 3}), "top_logprobs cannot be sent to an Anthropic model"),
        (json!({"logit_bias": {"50256": -100}}), "logit_bias cannot be sent to an Anthropic model"),
        (json!({"seed": 7}), "seed cannot be sent to an Anthropic model"),
        (json!({"frequency_penalty": 0.5}), "a nonzero frequency_penalty cannot be sent to an Anthropic model"),
        (json!({"presence_penalty": -1}), "a nonzero presence_penalty cannot be sent to an Anthropic model"),
        (json!({"modalities": ["text", "audio"]}), "audio output (modalities/audio) cannot be sent to an Anthropic model"),
        (json!({"audio": {"voice": "alloy", "format": "wav"}}), "audio output (modalities/audio) cannot be sent to an Anthropic model"),
        (json!({"response_format": {"type": "json_object"}}), "response_format of type `json_object` cannot be sent to an Anthropic model"),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}), "response_format of type `json_schema` cannot be sent to an Anthropic model"),
        (json!({"reasoning_effort": "high"}), "reasoning_effort cannot be sent to an Anthropic model"),
        (json!({"functions": [{"name": "f"}]}), "functions cannot be sent to an Anthropic model"),
        (json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]}), "a tools entry of type `custom` cannot be sent to an Anthropic model"),
        (json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "UklG", "format": "wav"}}]}]}),
            "audio input (an input_audio content part) cannot be sent to an Anthropic model"),
        (json!({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}),
            "a `file` content part cannot be sent to an Anthropic model"),
        (json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]}),
            "an image URL that is neither http(s) nor a base64 data URL cannot be sent to an Anthropic model"),
        (json!({"messages": [{"role": "function", "name": "f", "content": "x"}]}), "a `function` role message cannot be sent to an Anthropic model"),
        (json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
            "messages[1].tool_calls[0].function.arguments is not a JSON object"),
        (json!({"messages": [{"role": "wizard", "content": "x"}]}), "unknown message role `wizard`"),
    ];
    for (extra, expected) in cases {
        assert_eq!(refused_to_anthropic(extra.clone()), expected, "{extra}");
    }
}

fn refused_to_openai(extra: Value) -> String {
    let mut body =
        json!({"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    request_to_openai(&body, "gpt").unwrap_err().0
}

#[test]
fn anthropic_fields_without_an_openai_meaning_are_refused_by_name() {
    let cases = [
        (
            json!({"top_k": 40}),
            "top_k cannot be sent to an OpenAI-compatible model",
        ),
        (
            json!({"thinking": {"type": "enabled", "budget_tokens": 2048}}),
            "thinking (extended thinking) cannot be sent to an OpenAI-compatible model",
        ),
        (
            json!({"mcp_servers": [{"type": "url", "url": "https://m", "name": "m"}]}),
            "mcp_servers cannot be sent to an OpenAI-compatible model",
        ),
        (
            json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
            "the server tool `web_search_20250305` cannot be sent to an OpenAI-compatible model",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}}]}]}),
            "a `document` content block cannot be sent to an OpenAI-compatible model",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://x/a.png"}}]}]}]}),
            "a `image` block inside a tool_result cannot be sent to an OpenAI-compatible model",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]}),
            "an image with a `file` source cannot be sent to an OpenAI-compatible model",
        ),
    ];
    for (extra, expected) in cases {
        assert_eq!(refused_to_openai(extra.clone()), expected, "{extra}");
    }
    // Disabled thinking is fine.
    assert!(request_to_openai(
        &json!({"model": "c", "max_tokens": 1, "thinking": {"type": "disabled"}, "messages": []}),
        "gpt"
    )
    .is_ok());
}

#[test]
fn is_error_with_block_content_prefixes_the_first_text() {
    let body = json!({"model": "c", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "is_error": true, "content": [{"type": "text", "text": "boom"}]}]}]});
    assert_eq!(
        request_to_openai(&body, "gpt").unwrap()["messages"],
        json!([{"role": "tool", "tool_call_id": "t", "content": [{"type": "text", "text": "Error: boom"}]}])
    );
}

#[test]
fn a_user_message_before_a_tool_result_is_reordered_for_anthropic() {
    let body = json!({"model": "m", "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "user", "content": "also this"},
        {"role": "tool", "tool_call_id": "c", "content": "r"}]});
    assert_eq!(
        request_from_openai(&body, "claude").unwrap()["messages"][2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c", "content": "r"},
            {"type": "text", "text": "also this"}]})
    );
}

// ---- responses -------------------------------------------------------------------------------

/// `created` is the current time: checked, then zeroed for comparison.
fn without_created(mut v: Value) -> Value {
    let created = v["created"].as_u64().expect("created is a number");
    assert!(created > 1_700_000_000, "created is now: {created}");
    v["created"] = json!(0);
    v
}

#[test]
fn anthropic_text_response_to_openai() {
    let body = json!({
        "id": "msg_01ABC", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "thinking", "thinking": "..", "signature": "s"},
                    {"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5, "cache_read_input_tokens": 100, "output_tokens": 7}});
    assert_eq!(
        without_created(response_to_openai(&body, "my-claude")),
        json!({
            "id": "msg_01ABC", "object": "chat.completion", "created": 0, "model": "my-claude",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 115, "completion_tokens": 7, "total_tokens": 122,
                      "prompt_tokens_details": {"cached_tokens": 100}}})
    );
}

#[test]
fn anthropic_tool_use_response_to_openai() {
    let body = json!({
        "id": "msg_2", "type": "message", "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "n": 2}}],
        "stop_reason": "tool_use", "usage": {"input_tokens": 3, "output_tokens": 4}});
    assert_eq!(
        without_created(response_to_openai(&body, "c")),
        json!({
            "id": "msg_2", "object": "chat.completion", "created": 0, "model": "c",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\",\"n\":2}"}}]},
                "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 0}}})
    );
}

#[test]
fn stop_reasons_map_both_ways() {
    for (anthropic, openai) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        let body = json!({"id": "m", "content": [], "stop_reason": anthropic, "usage": {}});
        assert_eq!(
            response_to_openai(&body, "c")["choices"][0]["finish_reason"],
            openai
        );
    }
    for (openai, anthropic) in [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
    ] {
        let body = json!({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": openai}]});
        assert_eq!(response_from_openai(&body, "c")["stop_reason"], anthropic);
    }
}

#[test]
fn openai_response_to_anthropic_with_text_tools_and_cache() {
    let body = json!({
        "id": "chatcmpl-9", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Checking.",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "broken", "arguments": "{oops"}}]}}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                  "prompt_tokens_details": {"cached_tokens": 100}}});
    assert_eq!(
        response_from_openai(&body, "my-gpt"),
        json!({
            "id": "msg_chatcmpl-9", "type": "message", "role": "assistant", "model": "my-gpt",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Rome"}},
                {"type": "tool_use", "id": "call_2", "name": "broken", "input": {}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100, "output_tokens": 30}})
    );
}

#[test]
fn response_round_trip_keeps_text_calls_and_usage() {
    let openai = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]},
            "logprobs": null, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55, "prompt_tokens_details": {"cached_tokens": 10}}});
    let back = without_created(response_to_openai(&response_from_openai(&openai, "m"), "m"));
    let mut expected = openai.clone();
    expected["id"] = json!("msg_chatcmpl-1");
    assert_eq!(back, expected);
}

#[test]
fn error_bodies_translate_both_ways() {
    let anthropic =
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
    assert_eq!(
        response_to_openai(&anthropic, "c"),
        json!({"error": {"message": "Overloaded", "type": "overloaded_error", "param": null, "code": null}})
    );
    let openai =
        json!({"error": {"message": "Bad key", "type": "invalid_request_error", "code": "x"}});
    assert_eq!(
        response_from_openai(&openai, "c"),
        json!({"type": "error", "error": {"type": "invalid_request_error", "message": "Bad key"}})
    );
    let odd = json!({"error": {"message": "m", "type": "server_error"}});
    assert_eq!(
        response_from_openai(&odd, "c")["error"]["type"],
        "api_error"
    );
}
