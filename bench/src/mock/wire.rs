//! What goes on the wire: the response body type, and the OpenAI format the mock
//! speaks (completions, SSE chunk shapes, usage objects, error envelopes) with
//! the JSON responses built from them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use serde::Serialize;
use tokio::sync::mpsc;

pub(super) type Item = Result<Bytes, io::Error>;

/// Response body: either a whole buffer, or a channel fed by a spawned task so
/// that every SSE event is written as its own HTTP chunk exactly when the task
/// produces it (delays and the gate are real on the wire).
pub enum MockBody {
    Full(Option<Bytes>),
    Chan(mpsc::Receiver<Item>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Chan(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Chan(_) => SizeHint::default(),
        }
    }
}

/// The input of every tool call the mock makes (Anthropic `tool_use.input`, Gemini
/// `functionCall.args`).
pub(super) fn tool_args() -> serde_json::Value {
    serde_json::json!({"arg": "value"})
}

/// [`tool_args`] as an Anthropic stream's `input_json_delta` fragments (after a
/// leading empty one, as Anthropic sends); they concatenate to `{"arg": "value"}`.
pub(super) const TOOL_ARGS_FRAGMENTS: [&str; 3] = ["{\"arg\":", " \"val", "ue\"}"];

/// Output tokens a tool call adds (one per fragment).
pub(super) const TOOL_CALL_TOKENS: u64 = TOOL_ARGS_FRAGMENTS.len() as u64;

pub(super) fn content_text(chunks: u32) -> String {
    (0..chunks).map(|i| format!("tok{i} ")).collect()
}

/// Deterministic so tests can compare vectors relayed by the gateway.
pub(super) fn embedding(i: usize) -> [f32; 8] {
    std::array::from_fn(|k| ((i * 8 + k) as f32 + 1.0) / 100.0)
}

/// Standard padded base64; the OpenAI SDKs request `encoding_format: base64`
/// by default, so the mock must answer it.
pub(super) fn base64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub(super) fn json_response(status: StatusCode, body: Vec<u8>) -> Response<MockBody> {
    let len = body.len();
    let mut resp = Response::new(MockBody::Full(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

pub(super) fn bad_request(msg: &str) -> Response<MockBody> {
    error_response(StatusCode::BAD_REQUEST, msg)
}

/// OpenAI's `type`/`code` pairs, so gateways that map errors by type see
/// realistic values.
fn error_kind(status: StatusCode) -> (&'static str, Option<&'static str>) {
    match status.as_u16() {
        400 => ("invalid_request_error", None),
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("invalid_request_error", Some("permission_denied")),
        404 => ("invalid_request_error", Some("model_not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("mock_error", None),
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: (),
    code: Option<&'a str>,
}

pub(super) fn error_json(msg: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&ErrorEnvelope {
        error: ErrorBody {
            message: msg,
            kind,
            param: (),
            code,
        },
    })
    .expect("serialising error")
}

pub(super) fn error_response(status: StatusCode, msg: &str) -> Response<MockBody> {
    let (kind, code) = error_kind(status);
    let mut resp = json_response(status, error_json(msg, kind, code));
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

// Wire structs: field order follows OpenAI's own output.

#[derive(Serialize, Clone, Copy, Debug)]
pub(super) struct Usage {
    pub(super) prompt_tokens: u64,
    pub(super) completion_tokens: u64,
    pub(super) total_tokens: u64,
    pub(super) prompt_tokens_details: PromptDetails,
    pub(super) completion_tokens_details: CompletionDetails,
}

#[derive(Serialize, Clone, Copy, Debug)]
pub(super) struct PromptDetails {
    pub(super) cached_tokens: u64,
    pub(super) audio_tokens: u64,
}

#[derive(Serialize, Clone, Copy, Debug)]
pub(super) struct CompletionDetails {
    pub(super) reasoning_tokens: u64,
    pub(super) audio_tokens: u64,
}

impl Usage {
    pub(super) fn new(prompt: u64, completion: u32, cached: u64) -> Usage {
        let completion = u64::from(completion);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptDetails {
                cached_tokens: cached,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: 0,
                audio_tokens: 0,
            },
        }
    }
}

#[derive(Serialize)]
pub(super) struct ChatCompletion<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) choices: [ChatChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(super) struct ChatChoice<'a> {
    pub(super) index: u32,
    pub(super) message: Message<'a>,
    pub(super) finish_reason: &'static str,
    pub(super) logprobs: (),
}

#[derive(Serialize)]
pub(super) struct Message<'a> {
    pub(super) role: &'static str,
    pub(super) content: &'a str,
}

#[derive(Serialize)]
pub(super) struct TextCompletion<'a> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) choices: [TextChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Usage>,
}

#[derive(Serialize)]
pub(super) struct TextChoice<'a> {
    pub(super) text: &'a str,
    pub(super) index: u32,
    pub(super) logprobs: (),
    pub(super) finish_reason: Option<&'static str>,
}

/// One SSE chunk of either API. `usage`: absent, `null`, or an object.
#[derive(Serialize)]
pub(super) struct Chunk<'a, C: Serialize> {
    pub(super) id: &'a str,
    pub(super) object: &'static str,
    pub(super) created: u64,
    pub(super) model: &'a str,
    pub(super) choices: &'a [C],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
pub(super) struct ChatDeltaChoice<'a> {
    pub(super) index: u32,
    pub(super) delta: Delta<'a>,
    pub(super) logprobs: (),
    pub(super) finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
pub(super) struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) content: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want);
        }
    }
}
