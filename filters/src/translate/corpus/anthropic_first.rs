//! Anthropic-first shapes: to OpenAI and back.

use super::*;

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
