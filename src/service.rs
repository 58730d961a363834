//! The Pingora adapter: one small function per phase.
//!
//! Every request is answered from `request_filter`: the chain runs, the body is read and
//! parsed once, and the relay forwards it itself (see `relay.rs` for why). Returning
//! `Ok(true)` tells Pingora the response is sent, and `logging` still runs.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header;
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use tollgate_filters::route::ChannelPicker;
use tollgate_filters::{Chain, Ctx, GatewayError, RequestBody, RequestHead};

use crate::metrics::{route_label, Metrics};
use crate::pricing_page::PricingPage;
use crate::relay::{Outbound, Relay};

/// Counts requests in flight so shutdown can wait for them, and says when draining began.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    draining: AtomicBool,
}

impl InFlight {
    pub fn enter(self: &Arc<Self>) -> InFlightGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Waits until nothing is in flight, or `limit` passes. Returns what is still in flight.
    pub async fn wait_idle(&self, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        while self.count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count()
    }
}

pub struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The per-request context Pingora carries: the filters' [`Ctx`] plus the adapter's own.
pub struct RequestCtx {
    pub ctx: Ctx,
    route: &'static str,
    /// The chain, to give back what the request holds if it is dropped before `logging`.
    chain: Arc<Chain>,
    done: bool,
    _in_flight: InFlightGuard,
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if !self.done {
            self.chain.abandon(&mut self.ctx);
        }
    }
}

/// The gateway service.
pub struct Gateway {
    pub chain: Arc<Chain>,
    pub relay: Arc<Relay>,
    pub picker: Arc<ChannelPicker>,
    pub max_body_bytes: usize,
    pub metrics: Arc<Metrics>,
    pub in_flight: Arc<InFlight>,
    /// `GET /api/pricing`, when `pricing.expose` is on.
    pub pricing: Option<Arc<PricingPage>>,
}

fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

impl Gateway {
    async fn handle(&self, session: &mut Session, rc: &mut RequestCtx) -> Result<(), GatewayError> {
        let path = session.req_header().uri.path().to_owned();
        let method = session.req_header().method.clone();
        rc.route = route_label(&path);
        rc.ctx.client_ip = client_ip(session);
        // A request read from a kept-alive connection after SIGTERM: its count came after the
        // drain looked (the count is taken before this check, the flag set before the drain
        // looks, so one of the two always sees the other). Refuse it before it holds money.
        if self.in_flight.is_draining() {
            session.as_downstream_mut().set_keepalive(None);
            return Err(GatewayError::ShuttingDown);
        }
        if path == "/api/pricing" && method == http::Method::GET {
            return self.pricing_page(session, &mut rc.ctx).await;
        }
        if !path.starts_with("/v1/") {
            return Err(GatewayError::RouteNotFound(path));
        }
        // The path goes upstream under the channel's key: no climbing out of `/v1/`.
        let encoded_dot = path
            .as_bytes()
            .windows(3)
            .any(|w| w.eq_ignore_ascii_case(b"%2e"));
        if path.contains("//")
            || encoded_dot
            || path.split('/').any(|seg| seg == ".." || seg == ".")
        {
            return Err(GatewayError::invalid("The request path is not allowed."));
        }
        let head = RequestHead {
            method: &method,
            path: &path,
            headers: &session.req_header().headers,
            client_ip: rc.ctx.client_ip,
        };
        self.chain.request_head(&mut rc.ctx, &head).await?;

        if method == http::Method::GET {
            if path == "/v1/models" {
                return self.list_models(session, &mut rc.ctx, None).await;
            }
            if let Some(id) = path.strip_prefix("/v1/models/") {
                return self.list_models(session, &mut rc.ctx, Some(id)).await;
            }
        }
        if method != http::Method::POST {
            return Err(GatewayError::MethodNotAllowed(method.to_string()));
        }
        let raw = self.read_body(session).await?;
        let (body, facts) = RequestBody::parse(raw)?;
        // A stream whose client did not ask for usage: billing still needs it.
        let wants_usage_injection = facts.stream
            && !facts.include_usage
            && matches!(path.as_str(), "/v1/chat/completions" | "/v1/completions");
        rc.ctx.facts = Some(facts);
        self.chain.request_body(&mut rc.ctx).await?;
        let out = Outbound {
            body: &body,
            path: &path,
            wants_usage_injection,
        };
        self.relay.forward(session, &mut rc.ctx, out).await
    }

    /// Reads the whole body, refusing past `max_body_bytes` (by `Content-Length` up front when
    /// the client sends one, else as the bytes arrive).
    async fn read_body(&self, session: &mut Session) -> Result<Bytes, GatewayError> {
        let limit = self.max_body_bytes;
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            // The unread body makes the connection unusable for another request.
            session.as_downstream_mut().set_keepalive(None);
            return Err(GatewayError::RequestTooLarge { limit });
        }
        let expects_continue = session
            .req_header()
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue {
            session
                .as_downstream_mut()
                .write_continue_response()
                .await
                .map_err(|_| GatewayError::invalid("The client closed the connection."))?;
        }
        let mut buf = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit));
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if buf.len() + chunk.len() > limit {
                        session.as_downstream_mut().set_keepalive(None);
                        return Err(GatewayError::RequestTooLarge { limit });
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "reading the request body failed");
                    return Err(GatewayError::invalid("The request body could not be read."));
                }
            }
        }
        Ok(buf.freeze())
    }

    async fn pricing_page(&self, session: &mut Session, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let page = self
            .pricing
            .as_ref()
            .ok_or_else(|| GatewayError::RouteNotFound("/api/pricing".into()))?;
        let group = session.req_header().uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("group="))
                .map(str::to_owned)
        });
        let body = page.page(group.as_deref()).ok_or_else(|| {
            GatewayError::invalid(format!(
                "Unknown pricing group `{}`.",
                group.unwrap_or_default()
            ))
        })?;
        write_json(
            session,
            ctx,
            200,
            body,
            &[("cache-control", "public, max-age=60".into())],
        )
        .await;
        Ok(())
    }

    /// `GET /v1/models` (and `/v1/models/{id}`): the models this key may use.
    async fn list_models(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        one: Option<&str>,
    ) -> Result<(), GatewayError> {
        let key = ctx.key.clone().ok_or(GatewayError::MissingApiKey)?;
        let model = |id: &str| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"});
        let body = match one {
            Some(id) => {
                if !self.picker.serves(id) || !key.allows_model(id) {
                    return Err(GatewayError::ModelNotFound(id.to_owned()));
                }
                model(id)
            }
            None => {
                let data: Vec<_> = self
                    .picker
                    .models()
                    .into_iter()
                    .filter(|m| key.allows_model(m))
                    .map(model)
                    .collect();
                serde_json::json!({"object": "list", "data": data})
            }
        };
        let body = Bytes::from(serde_json::to_vec(&body).map_err(|_| GatewayError::Internal)?);
        write_json(session, ctx, 200, body, &[]).await;
        Ok(())
    }
}

fn client_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// Writes a complete JSON response. Errors mean the client is gone; nothing more to do.
async fn write_json(
    session: &mut Session,
    ctx: &mut Ctx,
    status: u16,
    body: Bytes,
    extra: &[(&'static str, String)],
) {
    let Ok(mut resp) =
        ResponseHeader::build(status, Some(4 + extra.len() + ctx.response_headers.len()))
    else {
        return;
    };
    for (k, v) in &ctx.response_headers {
        let _ = resp.insert_header(*k, v);
    }
    ctx.outcome.status = status;
    let _ = resp.insert_header(header::CONTENT_TYPE, "application/json");
    let _ = resp.insert_header(header::CONTENT_LENGTH, body.len());
    let _ = resp.insert_header("x-request-id", &ctx.request_id);
    for (k, v) in extra {
        let _ = resp.insert_header(*k, v);
    }
    if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_ok()
    {
        let _ = session.write_response_body(Some(body), true).await;
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.metrics.in_flight.inc();
        RequestCtx {
            ctx: Ctx::new(new_request_id()),
            route: "unknown",
            chain: self.chain.clone(),
            done: false,
            _in_flight: self.in_flight.enter(),
        }
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        rc: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        if let Err(e) = self.handle(session, rc).await {
            // Refused before its body was read: do not let pingora drain an unbounded body
            // to keep the connection alive.
            if !session.as_downstream_mut().is_body_done() {
                session.as_downstream_mut().set_keepalive(None);
            }
            let status = e.status();
            if rc.ctx.outcome.status == 0 {
                write_json(session, &mut rc.ctx, status, e.body(), &e.headers()).await;
            }
            rc.ctx.outcome.error = Some(e);
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _rc: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        // Every request is answered in request_filter; reaching here is a bug.
        Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            "the relay forwards every request",
        ))
    }

    async fn logging(
        &self,
        _session: &mut Session,
        _e: Option<&pingora::Error>,
        rc: &mut RequestCtx,
    ) {
        self.chain.done(&mut rc.ctx).await;
        rc.done = true;
        let ctx = &rc.ctx;
        let elapsed = ctx.started.elapsed();
        let status = ctx.outcome.status;
        self.metrics.in_flight.dec();
        self.metrics
            .requests
            .with_label_values(&[rc.route, &status.to_string()])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[rc.route])
            .observe(elapsed.as_secs_f64());
        if let Some(t) = ctx.outcome.first_byte {
            self.metrics
                .ttfb
                .with_label_values(&[rc.route])
                .observe(t.as_secs_f64());
        }
        let channel = ctx
            .outcome
            .channel
            .map(|i| self.relay.channels[i].name.as_str());
        tracing::info!(
            request_id = %ctx.request_id,
            key = ctx.key.as_ref().map(|k| k.prefix.as_str()).unwrap_or("-"),
            model = ctx.model().unwrap_or("-"),
            channel = channel.unwrap_or("-"),
            status,
            attempts = ctx.outcome.attempts,
            latency_ms = elapsed.as_millis() as u64,
            client_gone = ctx.outcome.client_gone,
            error = ctx.outcome.error.as_ref().and_then(|e| e.code()).unwrap_or("-"),
            "request"
        );
    }
}
