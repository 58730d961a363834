//! What a request asks the mock to do, and what the mock records about it.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

/// How the mock answers. Server-wide via
/// [`MockServer::start_with`](super::MockServer::start_with) /
/// [`MockServer::set_default`](super::MockServer::set_default), per request via
/// the `"x_mock"` JSON field.
///
/// Unknown fields are rejected (400) so a typo in a test fails loudly instead
/// of silently testing the default path.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Behaviour {
    /// Answer with this status and an error body in the wire's own shape: OpenAI's
    /// `{"error":{message,type,param,code}}` (429 adds `retry-after: 1`); Anthropic's
    /// `{"type":"error","error":{type,message}}` with the type for the status
    /// (400 `invalid_request_error`, 401 `authentication_error`, 403
    /// `permission_error`, 404 `not_found_error`, 413 `request_too_large`, 429
    /// `rate_limit_error` plus `retry-after: 1`, 529 `overloaded_error`, anything else
    /// `api_error`); Gemini's `{"error":{code,message,status}}` (400
    /// `INVALID_ARGUMENT`, 401 `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, 404
    /// `NOT_FOUND`, 429 `RESOURCE_EXHAUSTED` with a `RetryInfo` detail of 1 s, 500
    /// `INTERNAL`, 503 `UNAVAILABLE`, 504 `DEADLINE_EXCEEDED`, anything else `UNKNOWN`).
    pub status: Option<u16>,
    /// Message for `status` errors and `error_after` events (default "mock upstream error").
    pub error_message: Option<String>,
    /// Mimics providers that echo the caller's key in error messages, so the
    /// gateway's redaction can be tested.
    pub echo_auth_in_error: bool,
    /// Drop the TCP connection without writing any response.
    pub reset: bool,
    /// Content chunks for streams (default 3); also completion_tokens for JSON.
    pub chunks: Option<u32>,
    /// Sleep before every content chunk (streams) or before the whole response.
    pub delay_ms: Option<u64>,
    /// Stream: after N content chunks, abort the connection mid-body. Content chunks
    /// are OpenAI content deltas; Anthropic `text_delta`s then the non-empty
    /// `input_json_delta`s of a tool call; Gemini chunks (text, then the function call).
    pub truncate_after: Option<u32>,
    /// Stream: after N content chunks, send an in-band error event and end the body:
    /// OpenAI `data: {"error":{..,"type":"server_error"}}`; Anthropic `event: error`
    /// with `{"type":"error","error":{"type":"overloaded_error",..}}`; Gemini
    /// `data: {"error":{"code":503,..,"status":"UNAVAILABLE"}}`.
    pub error_after: Option<u32>,
    /// Stream: hold everything after the first content chunk until
    /// [`MockServer::open_gate`](super::MockServer::open_gate).
    pub gate: bool,
    /// "final" (default), "cumulative" or "none"; see [`UsageMode`]. Anthropic and
    /// Gemini report usage their own way whatever the mode, except that "none" drops
    /// every usage field.
    pub usage: Option<String>,
    /// Cache reads. OpenAI: `usage.prompt_tokens_details.cached_tokens` (part of
    /// `prompt_tokens`). Anthropic: `usage.cache_read_input_tokens` (taken out of
    /// `input_tokens`). Gemini: `usageMetadata.cachedContentTokenCount` (part of
    /// `promptTokenCount`; the field is present only when this is set).
    pub cached_tokens: Option<u64>,
    /// Anthropic only: cache writes, reported as `usage.cache_creation_input_tokens`
    /// and taken out of `input_tokens`. Ignored by the other wires.
    pub cache_write_tokens: Option<u64>,
    /// Anthropic and Gemini: when the request declares tools (Anthropic `tools`,
    /// Gemini `tools[].functionDeclarations`), call the tool of this name (an empty
    /// string: the first declared one) with the input `{"arg":"value"}`. Without it a
    /// tool is still called when the request forces one: Anthropic `tool_choice`
    /// `{"type":"tool","name":..}` (that one) or `{"type":"any"}` (the first), Gemini
    /// `toolConfig.functionCallingConfig.mode` `"ANY"` (the first, or the first of
    /// `allowedFunctionNames`). A call adds 3 output tokens. Ignored by OpenAI.
    pub tool_call: Option<String>,
    /// Mimics a provider (or a debugging proxy in front of one) that echoes the
    /// credential it received in *successful* (2xx, JSON or stream) response
    /// headers: `x-debug-auth` and `openai-debug-auth` carry the received
    /// `Authorization` (or `x-api-key`/`api-key`) value verbatim,
    /// `openai-debug-key-tail` carries a masked form (`sk-...` + the key's last 8
    /// characters), and `x-internal-thing: 1` is added beside them. For testing
    /// that the gateway's response-header allow-list and key filter hold on 2xx.
    pub echo_auth_in_header: bool,
    /// Extra headers added to successful (2xx, JSON or stream) responses, name →
    /// value, e.g. `{"openai-processing-ms": "7", "set-cookie": "a=b"}`. Invalid
    /// names or values are skipped.
    pub response_headers: Option<BTreeMap<String, String>>,
    /// Stream: end the body cleanly (terminating chunk) after the finish chunk and
    /// the usage chunk, but without the final `data: [DONE]` event, as a provider
    /// cut off at an event boundary would. Anthropic: without the final
    /// `message_stop` event. Gemini (which has no end event): the last chunk lacks
    /// its `finishReason`.
    pub omit_done: bool,
    /// Read the whole request body, record the request, then abort the TCP
    /// connection with a reset (RST, via `SO_LINGER 0`; plain HTTP only, a TLS
    /// connection is just closed) without writing any response. Unlike `reset`
    /// it ignores `delay_ms`. For testing that a POST whose body the provider
    /// fully received is never resent.
    pub reset_after_body: bool,
    /// Stream: after N content chunks, send one event whose `data:` is not valid JSON
    /// (a chunk cut off inside its object), then carry on normally.
    pub malformed_after: Option<u32>,
    /// Stream: the first content chunk's text is padded with `x` to this many bytes, so
    /// its `data:` line is that long (e.g. 2097152 for a 2 MiB line). Usage still counts
    /// one token per chunk.
    pub big_line_bytes: Option<u32>,
    /// Answer `200 OK` with an error envelope (in the wire's shape, as for `status`) as
    /// a JSON body (as some proxies in front of providers do), for stream and
    /// non-stream requests alike; no usage.
    pub error_body_200: bool,
    /// Realtime: input audio tokens each response reports (`usage.input_token_details.
    /// audio_tokens`, part of `input_tokens`); default 0.
    pub realtime_audio_in: Option<u64>,
    /// Realtime: output audio tokens of a response that asked for audio
    /// (`usage.output_token_details.audio_tokens`, part of `output_tokens`); default 0.
    pub realtime_audio_out: Option<u64>,
    /// Audio transcriptions and translations: the `usage.seconds` reported when the
    /// uploaded file is not a WAV whose duration can be read; default 1.
    pub audio_seconds: Option<u64>,
}

impl Behaviour {
    /// Field-by-field so a request can tweak one knob without restating the
    /// server default: `Some` in `over` wins, bools are OR-ed.
    pub fn overlay(&self, over: Behaviour) -> Behaviour {
        Behaviour {
            status: over.status.or(self.status),
            error_message: over.error_message.or_else(|| self.error_message.clone()),
            echo_auth_in_error: self.echo_auth_in_error || over.echo_auth_in_error,
            reset: self.reset || over.reset,
            chunks: over.chunks.or(self.chunks),
            delay_ms: over.delay_ms.or(self.delay_ms),
            truncate_after: over.truncate_after.or(self.truncate_after),
            error_after: over.error_after.or(self.error_after),
            gate: self.gate || over.gate,
            usage: over.usage.or_else(|| self.usage.clone()),
            cached_tokens: over.cached_tokens.or(self.cached_tokens),
            cache_write_tokens: over.cache_write_tokens.or(self.cache_write_tokens),
            tool_call: over.tool_call.or_else(|| self.tool_call.clone()),
            echo_auth_in_header: self.echo_auth_in_header || over.echo_auth_in_header,
            response_headers: match (&self.response_headers, over.response_headers) {
                (Some(base), Some(over)) => {
                    let mut all = base.clone();
                    all.extend(over);
                    Some(all)
                }
                (base, over) => over.or_else(|| base.clone()),
            },
            omit_done: self.omit_done || over.omit_done,
            reset_after_body: self.reset_after_body || over.reset_after_body,
            malformed_after: over.malformed_after.or(self.malformed_after),
            big_line_bytes: over.big_line_bytes.or(self.big_line_bytes),
            error_body_200: self.error_body_200 || over.error_body_200,
            realtime_audio_in: over.realtime_audio_in.or(self.realtime_audio_in),
            realtime_audio_out: over.realtime_audio_out.or(self.realtime_audio_out),
            audio_seconds: over.audio_seconds.or(self.audio_seconds),
        }
    }
}

/// How streamed responses report usage; providers differ and the gateway's
/// billing has to cope with each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageMode {
    /// OpenAI: a trailing `choices: []` usage chunk, only when the client asked
    /// for `stream_options.include_usage`.
    Final,
    /// Some compatible providers: every chunk carries the running usage and
    /// there is no separate usage chunk.
    Cumulative,
    /// Never report usage (streams or JSON), to exercise estimation paths.
    None,
}

impl UsageMode {
    pub(super) fn parse(s: Option<&str>) -> Result<UsageMode, String> {
        match s {
            None | Some("final") => Ok(UsageMode::Final),
            Some("cumulative") => Ok(UsageMode::Cumulative),
            Some("none") => Ok(UsageMode::None),
            Some(other) => Err(format!(
                "x_mock.usage must be \"final\", \"cumulative\" or \"none\", got {other:?}"
            )),
        }
    }
}

/// A request as the upstream saw it, so tests can assert what the gateway
/// forwarded (headers rewritten, keys swapped, body untouched...).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Lower-case names, in arrival order, duplicates kept.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Which connection it arrived on: connections are numbered from 1 in
    /// accept order, so two requests with the same number shared a kept-alive
    /// connection.
    pub conn: u64,
}

impl RecordedRequest {
    /// First value of the header; `name` is matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// The API format a request was answered in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WireFormat {
    /// OpenAI chat/legacy completions and embeddings (also Azure OpenAI's paths).
    #[default]
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// Gemini's native `generateContent` API.
    Gemini,
    /// OpenAI's Realtime API (a websocket); one entry per `response.done`.
    Realtime,
}

/// Usage the mock actually reported to its client; billing tests compare the
/// gateway's ledger against these. The fields are normalised to OpenAI's meaning
/// whatever the wire, so one bill formula fits all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServedUsage {
    /// The request's `model` (Gemini: the model named in the path).
    pub model: String,
    /// All input tokens, cache reads and writes included. OpenAI: `prompt_tokens`;
    /// Anthropic: `input_tokens + cache_creation_input_tokens +
    /// cache_read_input_tokens`; Gemini: `promptTokenCount`.
    pub prompt_tokens: u64,
    /// OpenAI `completion_tokens`, Anthropic `output_tokens`, Gemini
    /// `candidatesTokenCount`.
    pub completion_tokens: u64,
    /// Cache reads (part of `prompt_tokens`): OpenAI `cached_tokens`, Anthropic
    /// `cache_read_input_tokens`, Gemini `cachedContentTokenCount`.
    pub cached_tokens: u64,
    /// Cache writes (part of `prompt_tokens`): Anthropic
    /// `cache_creation_input_tokens`; always 0 on the other wires.
    pub cache_write_tokens: u64,
    /// Realtime: input audio tokens (part of `prompt_tokens`); 0 elsewhere.
    pub audio_prompt_tokens: u64,
    /// Realtime: output audio tokens (part of `completion_tokens`); 0 elsewhere.
    pub audio_completion_tokens: u64,
    /// Images generated (`POST /v1/images/generations`: `n`, default 1); 0 elsewhere.
    pub images: u64,
    /// Audio transcribed or translated, in whole seconds (the `usage.seconds` of
    /// `/v1/audio/transcriptions` and `/v1/audio/translations`); 0 elsewhere.
    pub audio_seconds: u64,
    /// Characters of `input` turned into speech (`/v1/audio/speech`); 0 elsewhere.
    pub characters: u64,
    /// Streamed: SSE answers and realtime responses; images and audio are not.
    pub stream: bool,
    /// The request body's `user` field (a string; Anthropic: `metadata.user_id`), so
    /// a run can correlate what was served with what it sent.
    pub user: Option<String>,
    /// Which API format the usage was reported in.
    pub wire: WireFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_is_field_by_field() {
        let base = Behaviour {
            chunks: Some(2),
            gate: true,
            usage: Some("cumulative".into()),
            ..Default::default()
        };
        let over = Behaviour {
            delay_ms: Some(5),
            usage: Some("none".into()),
            ..Default::default()
        };
        let m = base.overlay(over);
        assert_eq!(m.chunks, Some(2));
        assert_eq!(m.delay_ms, Some(5));
        assert!(m.gate);
        assert_eq!(m.usage.as_deref(), Some("none"));
    }

    #[test]
    fn overlay_merges_the_provider_knobs() {
        let base = Behaviour {
            cache_write_tokens: Some(4),
            tool_call: Some("a".into()),
            ..Default::default()
        };
        let m = base.overlay(Behaviour::default());
        assert_eq!(m.cache_write_tokens, Some(4));
        assert_eq!(m.tool_call.as_deref(), Some("a"));
        let m = base.overlay(Behaviour {
            cache_write_tokens: Some(9),
            tool_call: Some("b".into()),
            ..Default::default()
        });
        assert_eq!(m.cache_write_tokens, Some(9));
        assert_eq!(m.tool_call.as_deref(), Some("b"));
    }

    #[test]
    fn unknown_x_mock_field_is_rejected() {
        assert!(serde_json::from_str::<Behaviour>(r#"{"chunkz": 3}"#).is_err());
        let b: Behaviour = serde_json::from_str(r#"{"chunks": 3, "gate": true}"#).unwrap();
        assert_eq!(b.chunks, Some(3));
        assert!(b.gate);
    }
}
