//! OpenAI-first shapes: to Anthropic and back.

use super::*;

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
