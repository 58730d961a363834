//! Gemini requests, responses and streams.

use serde_json::{json, Value};

use super::*;
use crate::translate::testutil::{data_sse, done_count, json_events, run_split};
use crate::translate::StreamTranslator;

fn weather_tool() -> Value {
    json!({"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
}

#[test]
fn system_user_and_generation_config() {
    let body = json!({"model": "gemini-2.5-flash", "stream": true, "stream_options": {"include_usage": true},
        "user": "u", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Weather?"}],
        "max_completion_tokens": 200, "max_tokens": 50, "temperature": 0.5, "top_p": 0.9, "stop": "END",
        "n": 2, "seed": 3, "presence_penalty": 0.1, "frequency_penalty": 0.2});
    assert_eq!(
        request_from_openai(&body).unwrap(),
        json!({
            "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use metric."}]},
            "contents": [
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Hello!"}]},
                {"role": "user", "parts": [{"text": "Weather?"}]}],
            "generationConfig": {"maxOutputTokens": 200, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"],
                "candidateCount": 2, "seed": 3, "presencePenalty": 0.1, "frequencyPenalty": 0.2}})
    );
}

#[test]
fn plain_request_has_no_generation_config_and_runs_merge() {
    let body = json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "max_tokens": 10});
    assert_eq!(
        request_from_openai(&body).unwrap(),
        json!({"contents": [{"role": "user", "parts": [{"text": "a"}, {"text": "b"}]}], "generationConfig": {"maxOutputTokens": 10}})
    );
    let bare = json!({"messages": [{"role": "user", "content": "a"}]});
    assert_eq!(
        request_from_openai(&bare).unwrap(),
        json!({"contents": [{"role": "user", "parts": [{"text": "a"}]}]})
    );
}

#[test]
fn images_inline_and_by_url() {
    let body = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/webp;base64,UklGRg=="}},
        {"type": "image_url", "image_url": {"url": "https://example.com/pics/cat.PNG?size=2"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/photo"}}]}]});
    assert_eq!(
        request_from_openai(&body).unwrap()["contents"],
        json!([{"role": "user", "parts": [
            {"text": "Compare"},
            {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
            {"fileData": {"mimeType": "image/png", "fileUri": "https://example.com/pics/cat.PNG?size=2"}},
            {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/photo"}}]}])
    );
}

#[test]
fn tool_calls_and_results_become_function_parts() {
    let body = json!({"tools": [weather_tool(), {"type": "function", "function": {"name": "now"}}], "tool_choice": "auto",
        "messages": [
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18}"},
            {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
            {"role": "user", "content": "Thanks"}]});
    assert_eq!(
        request_from_openai(&body).unwrap(),
        json!({
            "contents": [
                {"role": "user", "parts": [{"text": "Paris and Rome?"}]},
                {"role": "model", "parts": [
                    {"text": "Checking."},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "now", "args": {}}}]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"content": {"temp": 18}}}},
                    {"functionResponse": {"name": "now", "response": {"content": {"result": "noon"}}}},
                    {"text": "Thanks"}]}],
            "tools": [{"functionDeclarations": [
                {"name": "get_weather", "description": "Weather for a city",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
                {"name": "now"}]}],
            "toolConfig": {"functionCallingConfig": {"mode": "AUTO"}}})
    );
}

#[test]
fn tool_choice_modes() {
    for (choice, expected) in [
        (json!("auto"), json!({"mode": "AUTO"})),
        (json!("none"), json!({"mode": "NONE"})),
        (json!("required"), json!({"mode": "ANY"})),
        (
            json!({"type": "function", "function": {"name": "get_weather"}}),
            json!({"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
        ),
    ] {
        let body = json!({"messages": [{"role": "user", "content": "x"}], "tools": [weather_tool()], "tool_choice": choice,
            "parallel_tool_calls": false});
        assert_eq!(
            request_from_openai(&body).unwrap()["toolConfig"],
            json!({"functionCallingConfig": expected})
        );
    }
}

#[test]
fn response_formats() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let body = json!({"messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}});
    assert_eq!(
        request_from_openai(&body).unwrap()["generationConfig"],
        json!({"responseMimeType": "application/json", "responseSchema": schema})
    );
    let body = json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}});
    assert_eq!(
        request_from_openai(&body).unwrap()["generationConfig"],
        json!({"responseMimeType": "application/json"})
    );
}

#[test]
fn refusals_name_the_field() {
    let cases = [
        (
            json!({"logprobs": true}),
            "logprobs cannot be sent to a Gemini model",
        ),
        (
            json!({"top_logprobs": 2}),
            "top_logprobs cannot be sent to a Gemini model",
        ),
        (
            json!({"logit_bias": {"1": 5}}),
            "logit_bias cannot be sent to a Gemini model",
        ),
        (
            json!({"modalities": ["audio"]}),
            "audio output (modalities/audio) cannot be sent to a Gemini model",
        ),
        (
            json!({"tools": [{"type": "custom", "custom": {"name": "x"}}]}),
            "a tools entry of type `custom` cannot be sent to a Gemini model",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "mp3"}}]}]}),
            "audio input (an input_audio content part) cannot be sent to a Gemini model",
        ),
        (
            json!({"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}),
            "messages[0].tool_call_id `nope` matches no earlier tool call",
        ),
        (
            json!({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}]}),
            "messages[0].tool_calls[0].function.arguments is not a JSON object",
        ),
    ];
    for (extra, expected) in cases {
        let mut body = json!({"messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        assert_eq!(
            request_from_openai(&body).unwrap_err().0,
            expected,
            "{extra}"
        );
    }
}

fn without_created(mut v: Value) -> Value {
    assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
    v["created"] = json!(0);
    v
}

#[test]
fn text_response_with_usage() {
    let body = json!({
        "candidates": [{"index": 0, "finishReason": "STOP", "content": {"role": "model", "parts": [
            {"text": "thinking...", "thought": true}, {"text": "Hello"}, {"text": " world"}]}}],
        "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 5, "thoughtsTokenCount": 7,
                          "cachedContentTokenCount": 4, "totalTokenCount": 24},
        "modelVersion": "gemini-2.5-flash", "responseId": "abc"});
    assert_eq!(
        without_created(response_to_openai(&body, "my-gemini")),
        json!({"id": "chatcmpl-abc", "object": "chat.completion", "created": 0, "model": "my-gemini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"}, "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24,
                      "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 7}}})
    );
}

#[test]
fn function_call_response_and_finish_reasons() {
    let body = json!({"candidates": [
        {"finishReason": "STOP", "content": {"parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
            {"functionCall": {"name": "now"}}]}},
        {"index": 1, "finishReason": "MAX_TOKENS", "content": {"parts": [{"text": "cut"}]}}]});
    let out = response_to_openai(&body, "g");
    assert_eq!(
        out["choices"],
        json!([
            {"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}},
                {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
             "logprobs": null, "finish_reason": "tool_calls"},
            {"index": 1, "message": {"role": "assistant", "content": "cut"}, "logprobs": null, "finish_reason": "length"}])
    );
    assert!(out.get("usage").is_none());
    for (reason, expected) in [
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("OTHER", "stop"),
        ("STOP", "stop"),
    ] {
        let body = json!({"candidates": [{"finishReason": reason, "content": {"parts": [{"text": "x"}]}}]});
        assert_eq!(
            response_to_openai(&body, "g")["choices"][0]["finish_reason"],
            expected,
            "{reason}"
        );
    }
}

#[test]
fn blocked_prompt_and_errors() {
    let blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 3, "totalTokenCount": 3}});
    let out = response_to_openai(&blocked, "g");
    assert_eq!(
        out["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": "content_filter"}])
    );
    assert_eq!(out["usage"]["prompt_tokens"], 3);
    let error = json!({"error": {"code": 429, "message": "Resource exhausted", "status": "RESOURCE_EXHAUSTED"}});
    assert_eq!(
        response_to_openai(&error, "g"),
        json!({"error": {"message": "Resource exhausted", "type": "RESOURCE_EXHAUSTED", "param": null, "code": null}})
    );
}

fn gemini_stream(with_finish: bool) -> Vec<u8> {
    let mut items = vec![
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "The wea"}]}, "index": 0}],
               "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 2, "totalTokenCount": 11}, "responseId": "r1"}),
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "ther in Zürich:"}]}, "index": 0}],
               "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 6, "totalTokenCount": 15}, "responseId": "r1"}),
        json!({"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Zürich"}}}]}, "index": 0}],
               "responseId": "r1"}),
    ];
    if with_finish {
        items.push(json!({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 20, "thoughtsTokenCount": 5,
                              "cachedContentTokenCount": 2, "totalTokenCount": 34}, "responseId": "r1"}));
    }
    data_sse(&items.iter().map(Value::to_string).collect::<Vec<_>>())
}

fn run(input: &[u8], include_usage: bool, cuts: &[usize], clean: bool) -> (Vec<u8>, bool) {
    let mut t = StreamToOpenAi::new("my-gemini", include_usage).created_at(99);
    let out = run_split(&mut t, input, cuts, clean);
    (out, t.complete())
}

#[test]
fn gemini_stream_to_openai() {
    let input = gemini_stream(true);
    let (out, complete) = run(&input, true, &[], true);
    assert!(complete);
    assert_eq!(done_count(&out), 1);
    let chunks = json_events(&out);
    let base = |choices: Value, usage: Value| {
        json!({"id": "chatcmpl-r1", "object": "chat.completion.chunk", "created": 99,
        "model": "my-gemini", "choices": choices, "usage": usage})
    };
    let choice = |delta: Value, finish: Value| {
        base(
            json!([{"index": 0, "delta": delta, "finish_reason": finish}]),
            Value::Null,
        )
    };
    assert_eq!(
        chunks,
        vec![
            choice(json!({"role": "assistant", "content": ""}), Value::Null),
            choice(json!({"content": "The wea"}), Value::Null),
            choice(json!({"content": "ther in Zürich:"}), Value::Null),
            choice(
                json!({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Zürich\"}"}}]}),
                Value::Null
            ),
            choice(json!({}), json!("tool_calls")),
            base(
                json!([]),
                json!({"prompt_tokens": 9, "completion_tokens": 25, "total_tokens": 34,
                "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 5}})
            ),
        ]
    );
    // Without include_usage: no usage key and no usage chunk.
    let (plain, _) = run(&input, false, &[], true);
    let plain = json_events(&plain);
    assert_eq!(plain.len(), 5);
    assert!(plain.iter().all(|c| c.get("usage").is_none()));
}

#[test]
fn gemini_stream_is_the_same_at_every_split() {
    let input = gemini_stream(true);
    let (whole, _) = run(&input, true, &[], true);
    for i in 0..=input.len() {
        assert_eq!(run(&input, true, &[i], true).0, whole, "split at {i}");
    }
    let every: Vec<usize> = (1..input.len()).collect();
    assert_eq!(run(&input, true, &every, true).0, whole);
}

#[test]
fn gemini_stream_without_finish_or_cut_off_gets_no_done() {
    let (out, complete) = run(&gemini_stream(false), true, &[], true);
    assert!(!complete);
    assert_eq!(done_count(&out), 0);
    assert!(json_events(&out)
        .iter()
        .all(|c| c["choices"].as_array().unwrap().len() == 1));
    let (out, complete) = run(&gemini_stream(true), true, &[], false);
    assert!(complete, "the finish reason arrived");
    assert_eq!(done_count(&out), 0, "but the connection was cut");
}

#[test]
fn gemini_stream_two_candidates_and_an_error() {
    let input = data_sse(&[
        json!({"candidates": [{"index": 0, "content": {"parts": [{"text": "A"}]}}, {"index": 1, "content": {"parts": [{"text": "B"}]}}]}).to_string(),
        json!({"candidates": [{"index": 1, "finishReason": "SAFETY", "content": {"parts": []}}]}).to_string(),
        json!({"error": {"code": 500, "message": "Internal", "status": "INTERNAL"}}).to_string(),
        json!({"candidates": [{"index": 0, "finishReason": "STOP", "content": {"parts": [{"text": "late"}]}}]}).to_string(),
    ]);
    let (out, _) = run(&input, false, &[], true);
    let chunks = json_events(&out);
    let summary: Vec<(Value, Value, Value)> = chunks
        .iter()
        .map(|c| {
            (
                c["choices"][0]["index"].clone(),
                c["choices"][0]["delta"]["content"].clone(),
                c["choices"][0]["finish_reason"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary[..5],
        [
            (json!(0), json!(""), Value::Null),
            (json!(0), json!("A"), Value::Null),
            (json!(1), json!(""), Value::Null),
            (json!(1), json!("B"), Value::Null),
            (json!(1), Value::Null, json!("content_filter")),
        ]
    );
    assert_eq!(
        chunks[5],
        json!({"error": {"message": "Internal", "type": "INTERNAL", "param": null, "code": null}})
    );
    assert_eq!(chunks.len(), 6);
    assert_eq!(done_count(&out), 0);
}
