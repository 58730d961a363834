//! The upstream exchange: tollgate forwards requests itself.
//!
//! Pingora 0.9.1 re-sends an early-read body only through its 64 KiB retry buffer, and LLM
//! bodies are routinely larger. So the relay takes a pooled connection from Pingora's
//! [`Connector`], writes the head and the whole body, reads the response head, and only
//! then commits: a connect error, timeout, 401/403, 429 or 5xx moves on to the next planned
//! channel while nothing has reached the client. Once committed, every body chunk passes the
//! chain's `on_chunk` filters and is written to the client as it arrives. A finished
//! connection goes back to the keep-alive pool.
//!
//! The relay does the exchange only; what is decided about it (slots, health, usage,
//! metrics) is done by filters on the attempt and response phases.

mod attempt;
mod error_body;
mod headers;
mod realtime;
mod stream;

use std::time::{Duration, Instant};

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use tollgate_filters::{
    translate, Attempt, AttemptOutcome, Chain, Channels, Ctx, GatewayError, RequestBody, Wire,
};

pub use error_body::{mentions_secret, scrub_error_body};
pub use headers::MAX_FORWARDED_HEADER_BYTES;

/// Bounds on the client side of a relayed response.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// After the client has gone, keep reading the provider this long for the real usage...
    pub drain_timeout: Duration,
    /// ... and at most this many bytes.
    pub drain_max_bytes: u64,
    /// A client that accepts no bytes for this long counts as gone.
    pub write_timeout: Duration,
}

/// The relay: the pooled connector and the client-side bounds.
pub struct Relay {
    connector: Connector,
    limits: ClientLimits,
}

/// One request as the relay sends it.
pub struct Outbound<'a> {
    pub chain: &'a Chain,
    pub channels: &'a Channels,
    /// The parsed body, for POSTs; `None` forwards a body-less request.
    pub body: Option<&'a RequestBody>,
    pub path: &'a str,
}

impl Relay {
    pub fn new(keepalive_pool_size: usize, limits: ClientLimits) -> Relay {
        let mut opts = ConnectorOptions::new(keepalive_pool_size);
        opts.keepalive_pool_size = keepalive_pool_size;
        Relay {
            connector: Connector::new(Some(opts)),
            limits,
        }
    }

    /// Forwards the request along `ctx.plan`. `Err` only when nothing was sent to the client
    /// (the caller renders the error); once a response is committed, problems end the
    /// downstream response instead.
    pub async fn forward(
        &self,
        session: &mut ServerSession,
        ctx: &mut Ctx,
        out: Outbound<'_>,
    ) -> Result<(), GatewayError> {
        let mut last = GatewayError::NoChannelAvailable;
        // The plan stays in ctx: the queue may move a channel it granted a slot on to the
        // current place (see `tollgate_filters::queue`).
        // The body as last rewritten, keyed by what the rewrite depends on: attempts that
        // send the same model with the same injection in the same wire format reuse it
        // instead of rewriting.
        let mut rewritten: Option<(BodyKey, Bytes)> = None;
        let client_wire = ctx.endpoint.wire();
        let mut i = 0;
        while i < ctx.plan.len() {
            let planned = ctx.plan[i].clone();
            let n = ctx.plan.len();
            let ch = &out.channels[planned.channel];
            // Only an OpenAI-format exchange takes `stream_options`; a translated one asks
            // for usage in the target format itself.
            let inject = ctx.inject_stream_usage
                && ch.inject_stream_usage
                && ch.wire == Wire::OpenAi
                && client_wire == Wire::OpenAi;
            let key: BodyKey = (planned.upstream_model.clone(), inject, ch.wire);
            let body = match (out.body, &rewritten) {
                (None, _) => Bytes::new(),
                (Some(_), Some((k, b))) if *k == key => b.clone(),
                (Some(b), _) => {
                    let model = key.0.as_deref().or(ctx.model()).unwrap_or_default();
                    let body = if ch.wire == client_wire {
                        b.rewrite(key.0.as_deref(), inject)
                    } else {
                        // A request the channel's format cannot express skips the channel;
                        // if no channel can take it, the client hears why.
                        translate::request(client_wire, ch.wire, &b.raw, model)
                    };
                    match body {
                        Ok(body) => {
                            rewritten = Some((key.clone(), body.clone()));
                            body
                        }
                        Err(e) => {
                            last = e;
                            i += 1;
                            continue;
                        }
                    }
                }
            };
            ctx.outcome.attempts += 1;
            let attempt = Attempt {
                channel: ch,
                number: ctx.outcome.attempts,
            };
            // Waiting for admission can take long: a client that leaves meanwhile is noticed
            // at once (HTTP/1 reads nothing else while the request waits) and the wait is
            // dropped, which takes it out of the queue.
            let started = tokio::select! {
                biased;
                r = out.chain.attempt_start(ctx, &attempt) => r,
                _ = client_closed(session) => {
                    ctx.outcome.client_gone = true;
                    ctx.outcome.attempts -= 1;
                    return Err(GatewayError::ClientGone);
                }
            };
            if ctx.plan[i].channel != planned.channel {
                // The queue granted another channel of the pool: start there instead.
                ctx.outcome.attempts -= 1;
                continue;
            }
            if let Err(e) = started {
                last = e;
                i += 1;
                continue;
            }
            i += 1;
            let model = planned.upstream_model.as_deref().or(ctx.model());
            let client = session.req_header();
            let target = if ch.wire == client_wire {
                ch.upstream_target(out.path, client.uri.query(), model)
            } else {
                let stream = ctx.facts.as_ref().is_some_and(|f| f.stream);
                ch.translated_target(model, stream)
            };
            let req = headers::upstream_request(client, ch, client_wire, &target, body.len())?;
            let started = Instant::now();
            let ex = attempt::exchange(&self.connector, ch, req, body).await;
            ctx.outcome.upstream_time += started.elapsed();
            let outcome = match &ex {
                Ok(ex) => AttemptOutcome::Status(ex.status()),
                Err(f) => f.outcome,
            };
            out.chain.attempt_end(ctx, &attempt, outcome);
            let mut ex = match ex {
                Ok(ex) => ex,
                Err(f) if f.reached_provider => {
                    // The provider read the request and then failed: it may be doing the
                    // work, so the request goes nowhere else (a POST is never sent twice).
                    tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, outcome = f.outcome.label(), "upstream failed after reading the request; not resent");
                    return Err(error_of(f.outcome, None));
                }
                Err(f) => {
                    tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, outcome = f.outcome.label(), "upstream attempt failed");
                    last = error_of(f.outcome, None);
                    continue;
                }
            };
            let status = ex.status();
            // 401/403: the channel's own key is refused; another channel may hold a good one.
            if outcome.is_channel_failure() && i < n {
                tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, status, "upstream refused; trying next channel");
                last = error_of(outcome, ex.session.response_header());
                ex.session.shutdown().await;
                continue;
            }
            ctx.outcome.upstream_header_time = Some(started.elapsed());
            ctx.outcome.channel = Some(ch.index);
            ctx.upstream_model = planned.upstream_model.clone();
            ctx.upstream_wire = ch.wire;
            ctx.stream_usage_injected = inject;
            if !(200..300).contains(&status) {
                return self.relay_error(session, ctx, ch, ex, status).await;
            }
            return self.stream_response(session, ctx, out.chain, ch, ex).await;
        }
        Err(last)
    }
}

/// What an attempt's body depends on: the model sent upstream, whether `stream_options`
/// is injected, and the channel's wire format.
type BodyKey = (Option<String>, bool, Wire);

/// Resolves when the client closes its connection (or sends bytes it should not, which ends
/// the exchange too); pending otherwise. The request body has been read in full.
async fn client_closed(session: &mut ServerSession) {
    match session.read_body_or_idle(true).await {
        Err(_) => {}
        // More data after the body on a connection without pipelining: not a close; wait on.
        Ok(_) => std::future::pending::<()>().await,
    }
}

/// The error a client sees when an attempt's failure is the last word.
fn error_of(outcome: AttemptOutcome, head: Option<&ResponseHeader>) -> GatewayError {
    match outcome {
        AttemptOutcome::Status(429) => {
            let retry_after = head
                .and_then(|h| h.headers.get(http::header::RETRY_AFTER))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            GatewayError::UpstreamRateLimited { retry_after }
        }
        AttemptOutcome::Status(401 | 403) => {
            GatewayError::UpstreamFailed("provider authentication")
        }
        AttemptOutcome::Status(504) | AttemptOutcome::Timeout => GatewayError::UpstreamTimeout,
        AttemptOutcome::Status(_) => GatewayError::UpstreamFailed("server error"),
        AttemptOutcome::Unresolved | AttemptOutcome::Connect => {
            GatewayError::UpstreamFailed("connect")
        }
        AttemptOutcome::Io => GatewayError::UpstreamFailed("connection"),
    }
}
