//! A committed response: a provider 2xx streamed to the client through the chain's
//! response phases, or a provider 4xx rebuilt as OpenAI error JSON.

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use tollgate_filters::{Chain, Channel, Ctx, GatewayError};

use super::attempt::Exchange;
use super::error_body::scrub_error_body;
use super::{error_of, headers, Relay};
use crate::respond::decorate;

/// Largest upstream error body read for rewriting; the rest is dropped.
const MAX_ERROR_BODY: usize = 64 * 1024;

impl Relay {
    /// The provider answered 2xx: its head, then its body chunk by chunk through
    /// `on_chunk`. If the client goes away, keep reading (bounded) for the usage.
    pub(super) async fn stream_response(
        &self,
        session: &mut ServerSession,
        ctx: &mut Ctx,
        chain: &Chain,
        ch: &Channel,
        mut ex: Exchange,
    ) -> Result<(), GatewayError> {
        let Some(up) = ex.session.response_header() else {
            return Err(GatewayError::UpstreamFailed("no response header"));
        };
        let rewritten = ctx.upstream_wire != ctx.endpoint.wire();
        let Ok(mut resp) = headers::client_response(up, ch, session.is_http2(), rewritten) else {
            ex.session.shutdown().await;
            return Err(GatewayError::UpstreamFailed("unusable response header"));
        };
        chain.response_head(ctx, &mut resp);
        decorate(&mut resp, ctx);
        ctx.outcome.status = resp.status.as_u16();
        session.set_write_timeout(Some(self.limits.write_timeout));
        if let Err(e) = session.write_response_header(Box::new(resp)).await {
            tracing::info!(request_id = %ctx.request_id, error = %e, "client went away before the response header");
            self.client_left(ctx);
        }
        let mut drained: u64 = 0;
        let mut drain_deadline = self.drain_deadline(ctx);
        loop {
            let waited = std::time::Instant::now();
            let read = match drain_deadline {
                None => ex.session.read_response_body().await,
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, ex.session.read_response_body()).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::info!(request_id = %ctx.request_id, "stopped draining: time limit");
                            ctx.outcome.drain_limited = true;
                            break;
                        }
                    }
                }
            };
            ctx.outcome.upstream_time += waited.elapsed();
            let mut chunk = match read {
                Ok(Some(chunk)) if chunk.is_empty() => continue,
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, error = ?e.etype(), "upstream broke off the response");
                    ctx.outcome.upstream_cut = true;
                    break;
                }
            };
            chain.chunk(ctx, &mut chunk, false);
            if ctx.outcome.client_gone {
                drained += chunk.len() as u64;
                if drained > self.limits.drain_max_bytes {
                    tracing::info!(request_id = %ctx.request_id, "stopped draining: byte limit");
                    ctx.outcome.drain_limited = true;
                    break;
                }
                continue;
            }
            if chunk.is_empty() {
                continue;
            }
            if ctx.outcome.first_byte.is_none() {
                ctx.outcome.first_byte = Some(ctx.started.elapsed());
            }
            if let Err(e) = session.write_response_body(chunk, false).await {
                tracing::info!(request_id = %ctx.request_id, error = %e, "client went away mid-response; reading on for usage");
                self.client_left(ctx);
                drain_deadline = self.drain_deadline(ctx);
            }
        }
        // The body is over (or given up on): the filters release what they held back and
        // settle what they saw; they may judge the stream incomplete (`upstream_cut`).
        let mut rest = Bytes::new();
        chain.chunk(ctx, &mut rest, true);
        let broken = ctx.outcome.upstream_cut || ctx.outcome.drain_limited;
        if broken || ctx.outcome.client_gone {
            // Never terminate the body cleanly after a cut: the client must see a broken
            // stream, not a short one that looks complete.
            if broken && !ctx.outcome.client_gone {
                if !rest.is_empty() {
                    let _ = session.write_response_body(rest, false).await;
                }
                ctx.outcome.error = Some(GatewayError::UpstreamFailed("truncated"));
            }
            ex.session.shutdown().await;
            session.set_keepalive(None);
            session.shutdown().await;
            return Ok(());
        }
        if !rest.is_empty() && session.write_response_body(rest, false).await.is_err() {
            self.client_left(ctx);
        }
        if let Err(e) = session.write_response_body(Bytes::new(), true).await {
            tracing::info!(request_id = %ctx.request_id, error = %e, "client went away at the end");
            self.client_left(ctx);
        }
        self.release(ex, ch).await;
        Ok(())
    }

    fn client_left(&self, ctx: &mut Ctx) {
        ctx.outcome.client_gone = true;
    }

    /// Once the client is gone, draining for usage is bounded in time.
    fn drain_deadline(&self, ctx: &Ctx) -> Option<tokio::time::Instant> {
        ctx.outcome
            .client_gone
            .then(|| tokio::time::Instant::now() + self.limits.drain_timeout)
    }

    /// A non-2xx the gateway passes on (a 4xx, or the last channel's 401/403/429/5xx).
    pub(super) async fn relay_error(
        &self,
        session: &mut ServerSession,
        ctx: &mut Ctx,
        ch: &Channel,
        mut ex: Exchange,
        status: u16,
    ) -> Result<(), GatewayError> {
        // 401/403: a provider refusing the *channel's* key is the gateway's problem, not the
        // caller's; a 401 would tell the client its own key is wrong. 429/5xx: the
        // gateway's error, with its retry hints.
        // A redirect is never followed (the provider would learn nothing from the gateway
        // that it should send elsewhere) nor passed on (its Location names the provider).
        if (300..400).contains(&status) {
            tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, status, "provider answered with a redirect");
            ex.session.shutdown().await;
            return Err(GatewayError::UpstreamFailed("redirect"));
        }
        if matches!(status, 401 | 403 | 429) || status >= 500 {
            if matches!(status, 401 | 403) {
                tracing::error!(request_id = %ctx.request_id, channel = %ch.name, status, "provider rejected the channel credentials");
            }
            let e = error_of(
                tollgate_filters::AttemptOutcome::Status(status),
                ex.session.response_header(),
            );
            ex.session.shutdown().await;
            return Err(e);
        }
        let mut buf = BytesMut::new();
        let mut complete = false;
        while buf.len() < MAX_ERROR_BODY {
            match ex.session.read_response_body().await {
                Ok(Some(b)) => buf.extend_from_slice(&b),
                Ok(None) => {
                    complete = true;
                    break;
                }
                Err(_) => break,
            }
        }
        let body = ctx
            .endpoint
            .wire()
            .reshape_error(status, scrub_error_body(&buf, status, &ch.secret));
        let mut resp =
            ResponseHeader::build_no_case(status, Some(6)).map_err(|_| GatewayError::Internal)?;
        resp.insert_header(header::CONTENT_TYPE, "application/json")
            .map_err(|_| GatewayError::Internal)?;
        resp.insert_header(header::CONTENT_LENGTH, body.len())
            .map_err(|_| GatewayError::Internal)?;
        decorate(&mut resp, ctx);
        ctx.outcome.status = status;
        if session.write_response_header(Box::new(resp)).await.is_err()
            || session.write_response_body(body, true).await.is_err()
        {
            ctx.outcome.client_gone = true;
        }
        if complete {
            self.release(ex, ch).await;
        } else {
            ex.session.shutdown().await;
        }
        Ok(())
    }

    async fn release(&self, mut ex: Exchange, ch: &Channel) {
        if ex.session.response_done() {
            self.connector
                .release_http_session(ex.session, ex.peer.as_ref(), Some(ch.idle_timeout))
                .await;
        } else {
            ex.session.shutdown().await;
        }
    }
}
