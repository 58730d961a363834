//! Anthropic's Messages API: `POST /v1/messages` (a JSON message, or an SSE stream
//! with `"stream": true`) and `POST /v1/messages/count_tokens`.
//!
//! Token rule (P = request body bytes / 4 + 1, as on every wire):
//! `cache_read_input_tokens` R = `x_mock.cached_tokens` (default 0),
//! `cache_creation_input_tokens` W = `x_mock.cache_write_tokens` (default 0),
//! `input_tokens` = P − R − W (saturating at 0; like Anthropic's, it excludes the
//! cache tokens), `output_tokens` = `chunks` (+3 when a tool is called).
//! `count_tokens` answers `{"input_tokens": P}` of its own body and records no
//! [`ServedUsage`]. A stream's `message_start` reports the input and cache tokens
//! with `output_tokens: 1`, and its `message_delta` the final `output_tokens`; the
//! last of these the client was sent is what [`ServedUsage`] records (so a stream cut
//! before `message_delta` records 1 output token).

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::handler::{Call, Route};
use super::stream::{Gone, Pacing, Sse, Step};
use super::wire::{
    content_text, json_response, tool_args, MockBody, TOOL_ARGS_FRAGMENTS, TOOL_CALL_TOKENS,
};
use super::{ServedUsage, UsageMode, WireFormat};

/// Anthropic's error `type` for an HTTP status.
fn error_kind(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type":kind,"message":msg}}`.
pub(super) fn error_json(kind: &str, msg: &str) -> Vec<u8> {
    let v = json!({"type": "error", "error": {"type": kind, "message": msg}});
    serde_json::to_vec(&v).expect("serialising error")
}

/// An error answer in Anthropic's shape; 429 adds `retry-after: 1`.
pub(super) fn error_response(status: StatusCode, msg: &str) -> Response<MockBody> {
    let mut resp = json_response(status, error_json(error_kind(status), msg));
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

fn invalid(msg: &str) -> Response<MockBody> {
    error_response(StatusCode::BAD_REQUEST, msg)
}

/// The real API's header checks: a key in `x-api-key`, and an `anthropic-version`.
pub(super) fn check_headers(h: &HeaderMap) -> Option<Response<MockBody>> {
    if h.get("x-api-key").is_none_or(|v| v.is_empty()) {
        return Some(error_response(
            StatusCode::UNAUTHORIZED,
            "x-api-key header is required",
        ));
    }
    if h.get("anthropic-version").is_none() {
        return Some(invalid("anthropic-version: header is required"));
    }
    None
}

/// The tool to call: the `tool_call` knob's (empty: the first declared tool), else the
/// one `tool_choice` forces. `None` without declared tools.
fn tool_to_call(obj: &Map<String, Value>, knob: Option<&str>) -> Option<String> {
    let tools = obj.get("tools")?.as_array()?;
    let first = tools.iter().find_map(|t| t.get("name")?.as_str())?;
    if let Some(name) = knob {
        return Some(if name.is_empty() { first } else { name }.to_owned());
    }
    let choice = obj.get("tool_choice")?;
    match choice.get("type")?.as_str()? {
        "any" => Some(first.to_owned()),
        "tool" => choice.get("name")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// What one answer reports, in Anthropic's terms.
#[derive(Clone, Copy)]
struct Tokens {
    input: u64,
    cache_write: u64,
    cache_read: u64,
    output: u64,
}

impl Tokens {
    fn usage(&self, output: u64) -> Value {
        json!({
            "input_tokens": self.input,
            "cache_creation_input_tokens": self.cache_write,
            "cache_read_input_tokens": self.cache_read,
            "output_tokens": output,
        })
    }

    fn served(&self, output: u64, model: &str, stream: bool, user: Option<String>) -> ServedUsage {
        ServedUsage {
            model: model.to_owned(),
            prompt_tokens: self.input + self.cache_write + self.cache_read,
            completion_tokens: output,
            cached_tokens: self.cache_read,
            cache_write_tokens: self.cache_write,
            stream,
            user,
            wire: WireFormat::Anthropic,
            ..ServedUsage::default()
        }
    }
}

pub(super) async fn answer(call: Call, route: Route) -> Response<MockBody> {
    let Some(obj) = call.json.as_ref().and_then(Value::as_object) else {
        return invalid("the request body must be a JSON object");
    };
    let Some(model) = obj.get("model").and_then(Value::as_str) else {
        return invalid("model: Field required (a string)");
    };
    if !obj.get("messages").is_some_and(Value::is_array) {
        return invalid("messages: Field required (an array)");
    }
    if route == Route::CountTokens {
        call.delay().await;
        let n = call.next_id();
        return call.ok_json(
            &json!({"input_tokens": call.prompt_tokens}),
            "request-id",
            n,
        );
    }
    if obj.get("max_tokens").and_then(Value::as_u64).is_none() {
        return invalid("max_tokens: Field required (an integer)");
    }
    let model = model.to_owned();
    let user = obj
        .get("metadata")
        .and_then(|m| m.get("user_id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let tool = tool_to_call(obj, call.b.tool_call.as_deref());
    let chunks = call.b.chunks.unwrap_or(3);
    let cache_read = call.b.cached_tokens.unwrap_or(0);
    let cache_write = call.b.cache_write_tokens.unwrap_or(0);
    let tokens = Tokens {
        input: call
            .prompt_tokens
            .saturating_sub(cache_read.saturating_add(cache_write)),
        cache_write,
        cache_read,
        output: u64::from(chunks) + if tool.is_some() { TOOL_CALL_TOKENS } else { 0 },
    };
    let with_usage = call.mode != UsageMode::None;
    let stop_reason = if tool.is_some() {
        "tool_use"
    } else {
        "end_turn"
    };

    if obj.get("stream").and_then(Value::as_bool) == Some(true) {
        let n = call.next_id();
        let (sse, rx) = Sse::new(call.shared.clone());
        let job = MessageStream {
            sse,
            pacing: call.pacing(),
            n,
            model,
            chunks,
            tool,
            tokens,
            with_usage,
            omit_stop: call.b.omit_done,
            error_message: call.error_message(),
            user,
        };
        tokio::spawn(job.run());
        return call.stream(rx, "text/event-stream", "request-id", n);
    }

    call.delay().await;
    let n = call.next_id();
    let mut content = vec![json!({"type": "text", "text": content_text(chunks)})];
    if let Some(name) = &tool {
        content.push(json!({
            "type": "tool_use",
            "id": format!("toolu_mock_{n}"),
            "name": name,
            "input": tool_args(),
        }));
    }
    let mut msg = json!({
        "id": format!("msg_mock_{n}"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": null,
    });
    if with_usage {
        msg["usage"] = tokens.usage(tokens.output);
        call.shared
            .record_served(tokens.served(tokens.output, &model, false, user));
    }
    call.ok_json(&msg, "request-id", n)
}

/// The task feeding one streamed message, in Anthropic's event order: `message_start`,
/// `content_block_start` (text), `ping`, `content_block_delta`s, `content_block_stop`,
/// [a `tool_use` block: start, `input_json_delta`s, stop], `message_delta`,
/// `message_stop`.
struct MessageStream {
    sse: Sse,
    pacing: Pacing,
    n: u64,
    model: String,
    chunks: u32,
    tool: Option<String>,
    tokens: Tokens,
    with_usage: bool,
    /// End without `message_stop`.
    omit_stop: bool,
    error_message: String,
    user: Option<String>,
}

impl MessageStream {
    async fn run(self) {
        let mut reported = None;
        let _ = self.emit(&mut reported).await;
        if let Some(output) = reported {
            let served = self
                .tokens
                .served(output, &self.model, true, self.user.clone());
            self.sse.shared.record_served(served);
        }
    }

    async fn send(&self, data: &Value) -> Result<(), Gone> {
        let kind = data["type"].as_str().expect("every event has a type");
        self.sse
            .send(format!("event: {kind}\ndata: {data}\n\n").into_bytes())
            .await
    }

    /// `reported`: the output tokens of the last usage sent.
    async fn emit(&self, reported: &mut Option<u64>) -> Result<(), Gone> {
        let mut message = json!({
            "id": format!("msg_mock_{}", self.n),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
        });
        if self.with_usage {
            message["usage"] = self.tokens.usage(1);
        }
        self.send(&json!({"type": "message_start", "message": message}))
            .await?;
        if self.with_usage {
            *reported = Some(1);
        }
        self.send(&json!({
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }))
        .await?;
        self.send(&json!({"type": "ping"})).await?;
        let fragments = if self.tool.is_some() {
            TOOL_ARGS_FRAGMENTS.len() as u32
        } else {
            0
        };
        let total = self.chunks + fragments;
        let mut sent = 0u32;
        loop {
            match self.sse.step(&self.pacing, sent, total).await? {
                Step::Truncated => return Ok(()),
                Step::Error => {
                    let err = json!({
                        "type": "error",
                        "error": {"type": "overloaded_error", "message": self.error_message},
                    });
                    return self.send(&err).await;
                }
                Step::End => break,
                Step::Chunk => {}
            }
            if self.pacing.malformed_after == Some(sent) {
                let broken = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"tok\n\n";
                self.sse.send(broken.as_bytes().to_vec()).await?;
            }
            if sent < self.chunks {
                let text = self.pacing.text(sent);
                self.sse.count_chunk();
                self.send(&json!({
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                }))
                .await?;
            } else {
                let i = (sent - self.chunks) as usize;
                if i == 0 {
                    self.open_tool_block().await?;
                }
                self.sse.count_chunk();
                self.send(&json!({
                    "type": "content_block_delta",
                    "index": 1,
                    "delta": {"type": "input_json_delta", "partial_json": TOOL_ARGS_FRAGMENTS[i]},
                }))
                .await?;
            }
            sent += 1;
        }
        let last = if self.tool.is_some() { 1 } else { 0 };
        self.send(&json!({"type": "content_block_stop", "index": last}))
            .await?;
        let stop_reason = if self.tool.is_some() {
            "tool_use"
        } else {
            "end_turn"
        };
        let mut delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        });
        if self.with_usage {
            delta["usage"] = json!({"output_tokens": self.tokens.output});
        }
        self.send(&delta).await?;
        if self.with_usage {
            *reported = Some(self.tokens.output);
        }
        if self.omit_stop {
            return Ok(());
        }
        self.send(&json!({"type": "message_stop"})).await
    }

    /// Closes the text block and opens the `tool_use` one, with the empty first
    /// `input_json_delta` Anthropic sends.
    async fn open_tool_block(&self) -> Result<(), Gone> {
        let name = self.tool.as_deref().unwrap_or_default();
        self.send(&json!({"type": "content_block_stop", "index": 0}))
            .await?;
        self.send(&json!({
            "type": "content_block_start",
            "index": 1,
            "content_block": {
                "type": "tool_use",
                "id": format!("toolu_mock_{}", self.n),
                "name": name,
                "input": {},
            },
        }))
        .await?;
        self.send(&json!({
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ""},
        }))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn tool_choice_and_knob_pick_the_tool() {
        let tools = json!([{"name": "a", "input_schema": {}}, {"name": "b", "input_schema": {}}]);
        let plain = obj(json!({"tools": tools}));
        assert_eq!(tool_to_call(&plain, None), None);
        assert_eq!(tool_to_call(&plain, Some("")).as_deref(), Some("a"));
        assert_eq!(tool_to_call(&plain, Some("b")).as_deref(), Some("b"));
        let any = obj(json!({"tools": tools, "tool_choice": {"type": "any"}}));
        assert_eq!(tool_to_call(&any, None).as_deref(), Some("a"));
        let named = obj(json!({"tools": tools, "tool_choice": {"type": "tool", "name": "b"}}));
        assert_eq!(tool_to_call(&named, None).as_deref(), Some("b"));
        let auto = obj(json!({"tools": tools, "tool_choice": {"type": "auto"}}));
        assert_eq!(tool_to_call(&auto, None), None);
        assert_eq!(tool_to_call(&obj(json!({})), Some("a")), None);
    }

    #[test]
    fn tool_fragments_concatenate_to_the_input() {
        let joined: String = TOOL_ARGS_FRAGMENTS.concat();
        assert_eq!(serde_json::from_str::<Value>(&joined).unwrap(), tool_args());
    }

    #[test]
    fn error_kinds_follow_the_status() {
        assert_eq!(
            error_kind(StatusCode::TOO_MANY_REQUESTS),
            "rate_limit_error"
        );
        assert_eq!(
            error_kind(StatusCode::from_u16(529).unwrap()),
            "overloaded_error"
        );
        assert_eq!(error_kind(StatusCode::INTERNAL_SERVER_ERROR), "api_error");
        assert_eq!(error_kind(StatusCode::UNAUTHORIZED), "authentication_error");
    }
}
