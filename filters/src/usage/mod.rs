//! `usage`: reads the provider's reported usage from a response as it streams past, and
//! decides when to ask for it.
//!
//! - **Injection**: a chat or completions stream whose client did not set
//!   `stream_options.include_usage` would carry no usage, so the request asks for it
//!   anyway ([`Ctx::inject_stream_usage`]; the relay applies it on channels with
//!   `inject_stream_usage`), and the usage-only event is stripped from what the client sees.
//!
//! - **SSE**: network chunks do not align with events, so complete events are cut out of a
//!   small pending buffer and parsed on the side. Chunks go to the client unchanged, except
//!   when tollgate itself asked for `stream_options.include_usage`: then the usage-only
//!   event (`"choices": []`) is removed from what the client sees, and only complete events
//!   are forwarded (a partial event waits for its end, never for the next event).
//!   Cumulative usage (sent on every chunk by some providers) is handled by keeping the last.
//! - **JSON**: `usage` sits at the end of chat and embeddings bodies, so only the last
//!   64 KiB are kept and the last `"usage"` object in them is parsed when the body ends.
//!   Large embeddings responses therefore cost no buffering.

mod scanner;
mod shapes;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_http::ResponseHeader;

use crate::chain::Phases;
use crate::wire::Wire;
use crate::{Ctx, Filter, GatewayError};

pub use scanner::UsageScanner;

/// The `usage` filter.
pub struct UsageFilter;

#[async_trait]
impl Filter for UsageFilter {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_BODY | Phases::RESPONSE_HEAD | Phases::CHUNK
    }

    /// A stream whose client did not ask for usage: billing still needs it.
    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        if let Some(f) = &ctx.facts {
            ctx.inject_stream_usage =
                f.stream && !f.include_usage && ctx.endpoint.takes_stream_options();
        }
        Ok(())
    }

    fn on_response_head(&self, ctx: &mut Ctx, head: &mut ResponseHeader) {
        let scanner = if is_event_stream(head) {
            UsageScanner::sse(ctx.stream_usage_injected)
        } else {
            UsageScanner::json()
        };
        ctx.ext.insert(scanner.with_wire(ctx.upstream_wire));
    }

    fn on_chunk(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        let Some(scanner) = ctx.ext.get_mut::<UsageScanner>() else {
            return;
        };
        if !end {
            *chunk = scanner.feed(std::mem::take(chunk));
            return;
        }
        let rest = scanner.finish();
        let sse = scanner.is_sse();
        let (report, done) = (scanner.report, scanner.saw_done);
        if !rest.is_empty() {
            let mut joined = BytesMut::with_capacity(chunk.len() + rest.len());
            joined.extend_from_slice(chunk);
            joined.extend_from_slice(&rest);
            *chunk = joined.freeze();
        }
        ctx.usage = report;
        if report.saw_error {
            // The provider gave up mid-stream: the access log says so, billing estimates.
            ctx.outcome.error = Some(GatewayError::UpstreamFailed("error event mid-stream"));
        }
        let marked_end = match ctx.upstream_wire {
            Wire::OpenAi => {
                ctx.endpoint.takes_stream_options() || ctx.endpoint.wire() != Wire::OpenAi
            }
            Wire::Anthropic | Wire::Gemini => true,
        };
        if sse && !done && marked_end {
            // An OpenAI-format stream ends with `data: [DONE]`, Anthropic's with
            // `message_stop`, Gemini's with a `finishReason`; without it the answer is
            // truncated, however cleanly the connection closed.
            ctx.outcome.upstream_cut = true;
        }
    }
}

/// Whether a response head announces server-sent events.
pub fn is_event_stream(h: &ResponseHeader) -> bool {
    h.headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}
