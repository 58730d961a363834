//! Gemini's native API: `POST .../models/{model}:generateContent`,
//! `:streamGenerateContent` (`?alt=sse`: one `data: <GenerateContentResponse>\r\n\r\n`
//! event per chunk, CRLF line ends as Google sends them, no `[DONE]`; without
//! `alt=sse`: the same objects as a streamed JSON array) and `:countTokens`.
//!
//! Token rule (P = request body bytes / 4 + 1, as on every wire):
//! `promptTokenCount` = P, `cachedContentTokenCount` = `x_mock.cached_tokens` (part of
//! P, present only when set), `candidatesTokenCount` = `chunks` (+3 with a function
//! call), `totalTokenCount` = prompt + candidates. Stream chunks carry the running
//! (cumulative) `usageMetadata`; the last one sent is what [`ServedUsage`] records.
//! `countTokens` answers `{"totalTokens": P}` of its own body and records nothing.

use http::{HeaderMap, Response, StatusCode};
use serde_json::{json, Map, Value};

use super::handler::{Call, Route};
use super::stream::{Gone, Pacing, Sse, Step};
use super::wire::{content_text, json_response, tool_args, MockBody, TOOL_CALL_TOKENS};
use super::{ServedUsage, UsageMode, WireFormat};

/// Google's canonical status name for an HTTP status.
fn status_name(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "NOT_IMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

fn error_value(status: StatusCode, msg: &str) -> Value {
    let mut err = json!({"code": status.as_u16(), "message": msg, "status": status_name(status)});
    if status == StatusCode::TOO_MANY_REQUESTS {
        err["details"] = json!([{
            "@type": "type.googleapis.com/google.rpc.RetryInfo",
            "retryDelay": "1s",
        }]);
    }
    json!({"error": err})
}

/// `{"error":{"code":..,"message":..,"status":..}}`; 429 adds a 1 s `RetryInfo`.
pub(super) fn error_json(status: StatusCode, msg: &str) -> Vec<u8> {
    serde_json::to_vec(&error_value(status, msg)).expect("serialising error")
}

pub(super) fn error_response(status: StatusCode, msg: &str) -> Response<MockBody> {
    json_response(status, error_json(status, msg))
}

fn invalid(msg: &str) -> Response<MockBody> {
    error_response(StatusCode::BAD_REQUEST, msg)
}

/// The `key` query parameter (not percent-decoded: keys are URL-safe).
pub(super) fn query_key(query: Option<&str>) -> Option<String> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("key="))
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
}

/// The real API wants a key in `x-goog-api-key` or `?key=`; without one it answers 403.
pub(super) fn check_key(h: &HeaderMap, query: Option<&str>) -> Option<Response<MockBody>> {
    let header = h.get("x-goog-api-key").is_some_and(|v| !v.is_empty());
    if header || query_key(query).is_some() {
        return None;
    }
    Some(error_response(
        StatusCode::FORBIDDEN,
        "Method doesn't allow unregistered callers (callers without established identity). \
         Please use API Key or other form of API consumer identity to call this API.",
    ))
}

/// `{model}` of `.../models/{model}:action`.
fn model_of(path: &str) -> &str {
    let rest = path.rsplit_once("/models/").map_or(path, |(_, r)| r);
    rest.split(':').next().unwrap_or(rest)
}

/// The function to call: the `tool_call` knob's (empty: the first declared), else the
/// first allowed (or declared) one when `functionCallingConfig.mode` is `ANY`.
fn tool_to_call(obj: &Map<String, Value>, knob: Option<&str>) -> Option<String> {
    let first = obj
        .get("tools")?
        .as_array()?
        .iter()
        .filter_map(|t| t.get("functionDeclarations")?.as_array())
        .flatten()
        .find_map(|d| d.get("name")?.as_str())?;
    if let Some(name) = knob {
        return Some(if name.is_empty() { first } else { name }.to_owned());
    }
    let cfg = obj.get("toolConfig")?.get("functionCallingConfig")?;
    if cfg.get("mode")?.as_str()? != "ANY" {
        return None;
    }
    let allowed = cfg
        .get("allowedFunctionNames")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    Some(allowed.unwrap_or(first).to_owned())
}

/// What one answer reports, in Gemini's terms.
#[derive(Clone, Copy)]
struct Tokens {
    prompt: u64,
    cached: Option<u64>,
}

impl Tokens {
    fn metadata(&self, candidates: u64) -> Value {
        let mut m = json!({
            "promptTokenCount": self.prompt,
            "candidatesTokenCount": candidates,
            "totalTokenCount": self.prompt + candidates,
        });
        if let Some(c) = self.cached {
            m["cachedContentTokenCount"] = json!(c);
        }
        m
    }

    fn served(&self, candidates: u64, model: &str, stream: bool) -> ServedUsage {
        ServedUsage {
            model: model.to_owned(),
            prompt_tokens: self.prompt,
            completion_tokens: candidates,
            cached_tokens: self.cached.unwrap_or(0),
            cache_write_tokens: 0,
            stream,
            user: None,
            wire: WireFormat::Gemini,
            ..ServedUsage::default()
        }
    }
}

fn function_call(name: &str) -> Value {
    json!({"functionCall": {"name": name, "args": tool_args()}})
}

pub(super) async fn answer(call: Call, route: Route) -> Response<MockBody> {
    let Some(obj) = call.json.as_ref().and_then(Value::as_object) else {
        return invalid("Invalid JSON payload received. The request body must be a JSON object.");
    };
    let model = model_of(&call.path).to_owned();
    let contents = obj
        .get("contents")
        .and_then(Value::as_array)
        .is_some_and(|c| !c.is_empty());
    if route == Route::GeminiCount {
        if !contents && !obj.contains_key("generateContentRequest") {
            return invalid("* CountTokensRequest.contents: contents is not specified");
        }
        call.delay().await;
        let n = call.next_id();
        return call.ok_json(
            &json!({"totalTokens": call.prompt_tokens}),
            "x-request-id",
            n,
        );
    }
    if !contents {
        return invalid("* GenerateContentRequest.contents: contents is not specified");
    }
    let tool = tool_to_call(obj, call.b.tool_call.as_deref());
    let chunks = call.b.chunks.unwrap_or(3);
    let tokens = Tokens {
        prompt: call.prompt_tokens,
        cached: call.b.cached_tokens,
    };
    let with_usage = call.mode != UsageMode::None;

    if route == Route::StreamGenerate {
        let sse = call
            .query
            .as_deref()
            .is_some_and(|q| q.split('&').any(|kv| kv == "alt=sse"));
        let n = call.next_id();
        let (out, rx) = Sse::new(call.shared.clone());
        let job = GenerateStream {
            out,
            pacing: call.pacing(),
            n,
            model,
            chunks,
            tool,
            tokens,
            with_usage,
            sse,
            omit_finish: call.b.omit_done,
            error_message: call.error_message(),
        };
        tokio::spawn(job.run());
        let content_type = if sse {
            "text/event-stream"
        } else {
            "application/json"
        };
        return call.stream(rx, content_type, "x-request-id", n);
    }

    call.delay().await;
    let n = call.next_id();
    let mut parts = vec![json!({"text": content_text(chunks)})];
    let mut output = u64::from(chunks);
    if let Some(name) = &tool {
        parts.push(function_call(name));
        output += TOOL_CALL_TOKENS;
    }
    let mut resp = json!({
        "candidates": [{
            "content": {"role": "model", "parts": parts},
            "finishReason": "STOP",
            "index": 0,
        }],
        "modelVersion": model,
        "responseId": format!("mock-{n}"),
    });
    if with_usage {
        resp["usageMetadata"] = tokens.metadata(output);
        call.shared
            .record_served(tokens.served(output, &model, false));
    }
    call.ok_json(&resp, "x-request-id", n)
}

/// The task feeding one streamed answer: a chunk per content chunk (text, then the
/// function call), each with the running usage; the last one has `finishReason`.
struct GenerateStream {
    out: Sse,
    pacing: Pacing,
    n: u64,
    model: String,
    chunks: u32,
    tool: Option<String>,
    tokens: Tokens,
    with_usage: bool,
    /// SSE events; otherwise a streamed JSON array.
    sse: bool,
    /// The last chunk without its `finishReason`.
    omit_finish: bool,
    error_message: String,
}

impl GenerateStream {
    async fn run(self) {
        let mut reported = None;
        let _ = self.emit(&mut reported).await;
        if let Some(output) = reported {
            let served = self.tokens.served(output, &self.model, true);
            self.out.shared.record_served(served);
        }
    }

    /// One element: an SSE event, or an array element (`[` before the first).
    fn frame(&self, first: bool, v: &Value) -> Vec<u8> {
        match (self.sse, first) {
            (true, _) => format!("data: {v}\r\n\r\n"),
            (false, true) => format!("[{v}"),
            (false, false) => format!(",\r\n{v}"),
        }
        .into_bytes()
    }

    fn chunk(&self, part: Value, last: bool, output: u64) -> Value {
        let mut candidate = json!({"content": {"role": "model", "parts": [part]}, "index": 0});
        if last && !self.omit_finish {
            candidate["finishReason"] = json!("STOP");
        }
        let mut chunk = json!({
            "candidates": [candidate],
            "modelVersion": self.model,
            "responseId": format!("mock-{}", self.n),
        });
        if self.with_usage {
            chunk["usageMetadata"] = self.tokens.metadata(output);
        }
        chunk
    }

    /// `reported`: the candidates tokens of the last usage sent.
    async fn emit(&self, reported: &mut Option<u64>) -> Result<(), Gone> {
        let total = self.chunks + u32::from(self.tool.is_some());
        let mut sent = 0u32;
        let mut output = 0u64;
        loop {
            match self.out.step(&self.pacing, sent, total).await? {
                Step::Truncated => return Ok(()),
                Step::Error => {
                    let err = error_value(StatusCode::SERVICE_UNAVAILABLE, &self.error_message);
                    let mut bytes = self.frame(sent == 0, &err);
                    if !self.sse {
                        bytes.push(b']');
                    }
                    return self.out.send(bytes).await;
                }
                Step::End => break,
                Step::Chunk => {}
            }
            if self.pacing.malformed_after == Some(sent) {
                let broken =
                    "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"tok\r\n\r\n";
                self.out.send(broken.as_bytes().to_vec()).await?;
            }
            let part = if sent < self.chunks {
                output += 1;
                json!({"text": self.pacing.text(sent)})
            } else {
                output += TOOL_CALL_TOKENS;
                function_call(self.tool.as_deref().unwrap_or_default())
            };
            let chunk = self.chunk(part, sent + 1 == total, output);
            self.out.count_chunk();
            self.out.send(self.frame(sent == 0, &chunk)).await?;
            if self.with_usage {
                *reported = Some(output);
            }
            sent += 1;
        }
        if total == 0 {
            // Nothing to say still ends with a (empty) finishing chunk.
            let chunk = self.chunk(json!({"text": ""}), true, 0);
            self.out.send(self.frame(true, &chunk)).await?;
            if self.with_usage {
                *reported = Some(0);
            }
        }
        if !self.sse {
            self.out.send(b"]".to_vec()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_and_key_come_from_the_url() {
        assert_eq!(
            model_of("/v1beta/models/gemini-2.0:generateContent"),
            "gemini-2.0"
        );
        assert_eq!(
            model_of(
                "/v1/projects/p/locations/l/publishers/google/models/g1:streamGenerateContent"
            ),
            "g1"
        );
        assert_eq!(query_key(Some("alt=sse&key=abc")).as_deref(), Some("abc"));
        assert_eq!(query_key(Some("alt=sse&key=")), None);
        assert_eq!(query_key(None), None);
    }

    #[test]
    fn function_calling_mode_any_or_knob_picks_the_function() {
        let tools = json!([{"functionDeclarations": [{"name": "f"}, {"name": "g"}]}]);
        let plain = json!({"tools": tools});
        let plain = plain.as_object().unwrap();
        assert_eq!(tool_to_call(plain, None), None);
        assert_eq!(tool_to_call(plain, Some("")).as_deref(), Some("f"));
        assert_eq!(tool_to_call(plain, Some("g")).as_deref(), Some("g"));
        let any = json!({"tools": tools, "toolConfig": {"functionCallingConfig": {"mode": "ANY"}}});
        assert_eq!(
            tool_to_call(any.as_object().unwrap(), None).as_deref(),
            Some("f")
        );
        let allowed = json!({"tools": tools, "toolConfig": {"functionCallingConfig":
            {"mode": "ANY", "allowedFunctionNames": ["g"]}}});
        assert_eq!(
            tool_to_call(allowed.as_object().unwrap(), None).as_deref(),
            Some("g")
        );
    }

    #[test]
    fn errors_carry_the_canonical_status() {
        let v: Value =
            serde_json::from_slice(&error_json(StatusCode::TOO_MANY_REQUESTS, "m")).unwrap();
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(v["error"]["details"][0]["retryDelay"], "1s");
        assert_eq!(status_name(StatusCode::SERVICE_UNAVAILABLE), "UNAVAILABLE");
        assert_eq!(status_name(StatusCode::INTERNAL_SERVER_ERROR), "INTERNAL");
    }
}
