//! Where translation meets the request path: [`request`] rewrites a body for a channel that
//! speaks another format (the relay calls it per attempt, so failover may cross formats),
//! and the `translate` filter rewrites the answer back into the client's format as it
//! streams past.
//!
//! The filter sits just before `usage` in the chain, so on the way back `usage` reads the
//! provider's own bytes first and every filter before this one (the cache, billing, the
//! access log) sees what the client sees.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_http::ResponseHeader;
use serde_json::Value;

use super::{anthropic, gemini, SseEvents, StreamTranslator, Untranslatable};
use crate::chain::Phases;
use crate::usage::is_event_stream;
use crate::{Ctx, Filter, GatewayError, Wire};

/// Largest non-streamed answer translated; a bigger one (no chat answer is near it) is
/// passed on as the provider sent it.
const MAX_JSON_ANSWER: usize = 32 * 1024 * 1024;

/// The body of a client's request in `from` format, rewritten for a channel speaking `to`,
/// with `model` the model name sent upstream.
pub fn request(from: Wire, to: Wire, body: &[u8], model: &str) -> Result<Bytes, GatewayError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        GatewayError::invalid(format!("The request body could not be translated: {e}."))
    })?;
    let out = match (from, to) {
        (Wire::OpenAi, Wire::Anthropic) => anthropic::request_from_openai(&v, model),
        (Wire::Anthropic, Wire::OpenAi) => anthropic::request_to_openai(&v, model),
        (Wire::OpenAi, Wire::Gemini) => gemini::request_from_openai(&v),
        (from, to) => Err(Untranslatable(format!(
            "A {} request cannot be sent to a {} model.",
            from.label(),
            to.label()
        ))),
    }
    .map_err(|Untranslatable(why)| GatewayError::invalid(why))?;
    serde_json::to_vec(&out)
        .map(Bytes::from)
        .map_err(|_| GatewayError::Internal)
}

/// How one answer is being translated.
enum Reshape {
    /// A JSON answer: gathered whole, translated at its end.
    Json {
        from: Wire,
        to: Wire,
        model: String,
        body: BytesMut,
        /// Too big to translate: passed on as it came.
        passthrough: bool,
    },
    /// An event stream: translated event by event.
    Stream {
        events: SseEvents,
        translator: Box<dyn StreamTranslator>,
    },
}

/// A translation in progress, as `Ctx::ext` holds it (shareable and cloneable; only the
/// request's own task ever locks it).
#[derive(Clone)]
struct Held(Arc<Mutex<Reshape>>);

/// The `translate` filter.
pub struct Translate;

impl Translate {
    fn stream_translator(
        from: Wire,
        to: Wire,
        model: &str,
        include_usage: bool,
    ) -> Option<Box<dyn StreamTranslator>> {
        Some(match (from, to) {
            (Wire::Anthropic, Wire::OpenAi) => {
                Box::new(anthropic::StreamToOpenAi::new(model, include_usage))
            }
            (Wire::OpenAi, Wire::Anthropic) => Box::new(anthropic::StreamFromOpenAi::new(model)),
            (Wire::Gemini, Wire::OpenAi) => {
                Box::new(gemini::StreamToOpenAi::new(model, include_usage))
            }
            _ => return None,
        })
    }
}

#[async_trait]
impl Filter for Translate {
    fn name(&self) -> &'static str {
        "translate"
    }

    fn phases(&self) -> Phases {
        Phases::RESPONSE_HEAD | Phases::CHUNK
    }

    fn on_response_head(&self, ctx: &mut Ctx, head: &mut ResponseHeader) {
        let (from, to) = (ctx.upstream_wire, ctx.endpoint.wire());
        if from == to {
            return;
        }
        let model = ctx.model().unwrap_or_default().to_owned();
        let include_usage = ctx.facts.as_ref().is_some_and(|f| f.include_usage);
        let reshape = if is_event_stream(head) {
            let Some(translator) = Self::stream_translator(from, to, &model, include_usage) else {
                return;
            };
            Reshape::Stream {
                events: SseEvents::new(),
                translator,
            }
        } else {
            let _ = head.insert_header(http::header::CONTENT_TYPE, "application/json");
            Reshape::Json {
                from,
                to,
                model,
                body: BytesMut::new(),
                passthrough: false,
            }
        };
        ctx.ext.insert(Held(Arc::new(Mutex::new(reshape))));
    }

    fn on_chunk(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        // Cut off, or the client left before the end: no closing events that would make a
        // broken answer look complete.
        if ctx.upstream_wire == ctx.endpoint.wire() {
            return;
        }
        let clean = !(ctx.outcome.upstream_cut || ctx.outcome.drain_limited);
        let Some(Held(held)) = ctx.ext.get::<Held>() else {
            return;
        };
        let mut reshape = held.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *reshape {
            Reshape::Stream { events, translator } => {
                let mut out = BytesMut::new();
                events.push(chunk);
                while let Some((name, data)) = events.next() {
                    translator.event(name.as_deref(), &data, &mut out);
                }
                if end {
                    if let Some((name, data)) = events.rest() {
                        translator.event(name.as_deref(), &data, &mut out);
                    }
                    translator.finish(clean, &mut out);
                }
                *chunk = out.freeze();
            }
            Reshape::Json {
                from,
                to,
                model,
                body,
                passthrough,
            } => {
                if *passthrough {
                    return;
                }
                if !end {
                    body.extend_from_slice(chunk);
                    *chunk = Bytes::new();
                    if body.len() > MAX_JSON_ANSWER {
                        *passthrough = true;
                        *chunk = std::mem::take(body).freeze();
                    }
                    return;
                }
                let raw = std::mem::take(body).freeze();
                *chunk = match (clean, serde_json::from_slice::<Value>(&raw)) {
                    (true, Ok(v)) => {
                        let out = match (*from, *to) {
                            (Wire::Anthropic, Wire::OpenAi) => {
                                anthropic::response_to_openai(&v, model)
                            }
                            (Wire::OpenAi, Wire::Anthropic) => {
                                anthropic::response_from_openai(&v, model)
                            }
                            (Wire::Gemini, Wire::OpenAi) => gemini::response_to_openai(&v, model),
                            _ => v,
                        };
                        Bytes::from(out.to_string())
                    }
                    // Not JSON, or cut short: passed on as it came.
                    _ => raw,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Endpoint;

    fn ctx(endpoint: Endpoint, upstream: Wire, include_usage: bool) -> Ctx {
        let mut ctx = Ctx::new("r".into());
        ctx.endpoint = endpoint;
        ctx.upstream_wire = upstream;
        ctx.facts = Some(crate::RequestFacts {
            model: "claude-x".into(),
            stream: true,
            include_usage,
            ..Default::default()
        });
        ctx
    }

    fn head(content_type: &str) -> ResponseHeader {
        let mut h = ResponseHeader::build(200, None).unwrap();
        h.insert_header("content-type", content_type).unwrap();
        h
    }

    /// Runs a body through the filter in `pieces`, as the relay would.
    fn run(ctx: &mut Ctx, ct: &str, pieces: &[&[u8]]) -> Vec<u8> {
        let f = Translate;
        f.on_response_head(ctx, &mut head(ct));
        let mut out = Vec::new();
        for p in pieces {
            let mut c = Bytes::copy_from_slice(p);
            f.on_chunk(ctx, &mut c, false);
            out.extend_from_slice(&c);
        }
        let mut c = Bytes::new();
        f.on_chunk(ctx, &mut c, true);
        out.extend_from_slice(&c);
        out
    }

    const ANTHROPIC_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-x\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":2}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    fn data_events(out: &[u8]) -> Vec<String> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
            .collect()
    }

    #[test]
    fn an_anthropic_stream_reaches_an_openai_client_as_chunks_split_anywhere() {
        let whole = {
            let mut c = ctx(Endpoint::Chat, Wire::Anthropic, true);
            run(&mut c, "text/event-stream", &[ANTHROPIC_STREAM.as_bytes()])
        };
        let events = data_events(&whole);
        assert_eq!(events.last().unwrap(), "[DONE]");
        let text: String = events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(text, "Hello");
        let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], 12);
        assert_eq!(usage["usage"]["completion_tokens"], 2);
        // Any split of the network chunks gives the same events (ids and times aside).
        let strip = |b: &[u8]| {
            data_events(b)
                .iter()
                .map(|e| match serde_json::from_str::<Value>(e) {
                    Ok(mut v) => {
                        v["created"] = Value::Null;
                        v.to_string()
                    }
                    Err(_) => e.clone(),
                })
                .collect::<Vec<_>>()
        };
        let bytes = ANTHROPIC_STREAM.as_bytes();
        for at in (1..bytes.len()).step_by(7) {
            let mut c = ctx(Endpoint::Chat, Wire::Anthropic, true);
            let split = run(&mut c, "text/event-stream", &[&bytes[..at], &bytes[at..]]);
            assert_eq!(strip(&split), strip(&whole), "split at {at}");
        }
    }

    #[test]
    fn a_cut_stream_gets_no_closing_events() {
        let mut c = ctx(Endpoint::Chat, Wire::Anthropic, true);
        let cut = ANTHROPIC_STREAM.find("event: message_delta").unwrap();
        let f = Translate;
        f.on_response_head(&mut c, &mut head("text/event-stream"));
        let mut chunk = Bytes::copy_from_slice(&ANTHROPIC_STREAM.as_bytes()[..cut]);
        f.on_chunk(&mut c, &mut chunk, false);
        c.outcome.upstream_cut = true;
        let mut rest = Bytes::new();
        f.on_chunk(&mut c, &mut rest, true);
        let all = [chunk, rest].concat();
        assert!(!String::from_utf8_lossy(&all).contains("[DONE]"));
    }

    #[test]
    fn a_json_answer_is_gathered_and_translated_at_its_end() {
        let mut c = ctx(Endpoint::Messages, Wire::OpenAi, false);
        let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}"#;
        let out = run(&mut c, "application/json", &[&body[..40], &body[40..]]);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "message");
        assert_eq!(v["content"][0]["text"], "Hi");
        assert_eq!(v["stop_reason"], "end_turn");
        assert_eq!(v["usage"]["input_tokens"], 5);
        assert_eq!(v["usage"]["output_tokens"], 1);
    }

    #[test]
    fn same_format_answers_pass_untouched() {
        let mut c = ctx(Endpoint::Messages, Wire::Anthropic, false);
        let out = run(&mut c, "text/event-stream", &[ANTHROPIC_STREAM.as_bytes()]);
        assert_eq!(out, ANTHROPIC_STREAM.as_bytes());
    }

    #[test]
    fn requests_translate_or_say_why_not() {
        let body =
            br#"{"model":"claude-x","messages":[{"role":"user","content":"hi"}],"max_tokens":10}"#;
        let out = request(Wire::OpenAi, Wire::Anthropic, body, "claude-up").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["model"], "claude-up");
        assert_eq!(v["max_tokens"], 10);
        let e = request(
            Wire::OpenAi,
            Wire::Anthropic,
            br#"{"model":"m","messages":[],"n":2}"#,
            "m",
        )
        .unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains('n'), "{e}");
        let e = request(Wire::Anthropic, Wire::Gemini, body, "g").unwrap_err();
        assert_eq!(e.status(), 400);
    }
}
