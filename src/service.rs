//! The HTTP service: tollgate is its own Pingora [`HttpServerApp`].
//!
//! Every request is answered by tollgate itself (the relay forwards; see `relay/`), so it
//! owns the whole exchange on a connection: the deadline on reading a request head, the
//! rendering of a head that cannot be parsed (OpenAI JSON, not an empty 400), the body
//! deadline, keep-alive and pipelining. Per request it takes one snapshot of the
//! [`Pipeline`] (config, chain, channel table), so a reload is one swap.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::header;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ReusedHttpStream};
use pingora::protocols::http::v2::server::H2Options;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use tollgate_filters::billing::Billing;
use tollgate_filters::limits::Limits;
use tollgate_filters::route::ChannelPicker;
use tollgate_filters::{
    gemini_model, Chain, Channels, Ctx, Endpoint, GatewayError, RequestBody, RequestHead,
};

use crate::connections::ConnectionLimits;
use crate::metrics::Metrics;
use crate::pricing_page::PricingPage;
use crate::relay::{Outbound, Relay};
use crate::respond::{write_error, write_malformed, write_page, write_replay};

/// Counts requests in flight so shutdown can wait for them, and says when draining began.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    draining: AtomicBool,
}

impl InFlight {
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

/// What one request runs with: taken once per request from the [`Gateway`]'s `ArcSwap`.
pub struct Pipeline {
    pub chain: Chain,
    /// The chain's billing filter, for exchanges billed by the response (a realtime
    /// session's meter); `None` only for a pipeline without billing.
    pub billing: Option<Arc<Billing>>,
    /// The chain's limits filter, for exchanges limited by the response.
    pub limits: Option<Arc<Limits>>,
    pub channels: Channels,
    pub picker: Arc<ChannelPicker>,
    pub max_body_bytes: usize,
    pub connections: ConnectionLimits,
    /// `GET /api/pricing`, when `pricing.expose` is on.
    pub pricing: Option<PricingPage>,
}

/// One request's state: the filters' [`Ctx`] and the pipeline it runs on. Dropped without
/// `done` (a panic, a cancelled task), it gives back what the filters hold.
struct RequestCtx {
    ctx: Ctx,
    pipeline: Arc<Pipeline>,
    done: bool,
    in_flight: Arc<InFlight>,
    metrics: Arc<Metrics>,
}

impl RequestCtx {
    fn new(pipeline: Arc<Pipeline>, in_flight: Arc<InFlight>, metrics: Arc<Metrics>) -> Self {
        in_flight.count.fetch_add(1, Ordering::SeqCst);
        metrics.in_flight.inc();
        RequestCtx {
            ctx: Ctx::new(new_request_id()),
            pipeline,
            done: false,
            in_flight,
            metrics,
        }
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if !self.done {
            self.pipeline.chain.abandon(&mut self.ctx);
        }
        self.metrics.in_flight.dec();
        self.in_flight.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The gateway service.
pub struct Gateway {
    /// Swapped by a reload ([`crate::reload`]); each request loads it once.
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub relay: Arc<Relay>,
    pub metrics: Arc<Metrics>,
    pub in_flight: Arc<InFlight>,
    /// h2c (`server.h2c`) and the idle timeout of HTTP/2 connections.
    pub http_options: HttpServerOptions,
    /// `server.h2`: streams per connection and header-list size.
    pub h2: crate::tls::H2Limits,
}

fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7().simple())
}

impl Gateway {
    async fn handle(
        &self,
        session: &mut ServerSession,
        p: &Pipeline,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let req = session.req_header();
        let path = req.uri.path().to_owned();
        let method = req.method.clone();
        ctx.endpoint = Endpoint::of(&path);
        ctx.path.clone_from(&path);
        ctx.client_ip = client_ip(session);
        // A request read from a kept-alive connection after SIGTERM: its count came after the
        // drain looked (the count is taken before this check, the flag set before the drain
        // looks, so one of the two always sees the other). Refuse it before it holds money.
        if self.in_flight.is_draining() {
            session.set_keepalive(None);
            return Err(GatewayError::ShuttingDown);
        }
        if req.version == http::Version::HTTP_11
            && !req.headers.contains_key(header::HOST)
            && req.uri.authority().is_none()
        {
            return Err(GatewayError::invalid(
                "An HTTP/1.1 request must carry a Host header.",
            ));
        }
        if let Err(e) = check_framing(req) {
            // The body's end is ambiguous: nothing more is read from this connection.
            session.set_keepalive(None);
            return Err(e);
        }
        // `Transfer_Encoding` and friends: some servers read `_` as `-`, so such a name could
        // smuggle framing or identity past the checks below. No client needs one.
        if let Some(name) = req.headers.keys().find(|n| n.as_str().contains('_')) {
            return Err(GatewayError::invalid(format!(
                "Header names with underscores are not accepted (`{}`).",
                truncate(name.as_str(), 64)
            )));
        }
        if path == "/api/pricing" && method == http::Method::GET {
            return self.pricing_page(session, p, ctx).await;
        }
        if !path.starts_with("/v1/") && ctx.endpoint != Endpoint::GeminiGenerate {
            return Err(GatewayError::RouteNotFound(truncate(&path, 128)));
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
            client_ip: ctx.client_ip,
        };
        p.chain.request_head(ctx, &head).await?;

        let bodyless = matches!(method, http::Method::GET | http::Method::DELETE);
        if bodyless && !session.is_body_empty() {
            return Err(GatewayError::invalid(format!(
                "A {method} request takes no body."
            )));
        }
        if ctx.endpoint == Endpoint::Realtime {
            return self.realtime(session, p, ctx).await;
        }
        if method == http::Method::GET && ctx.endpoint == Endpoint::Models {
            let one = path.strip_prefix("/v1/models/");
            return self.list_models(session, p, ctx, one).await;
        }
        let body = match method {
            http::Method::POST => {
                let raw = self.read_body(session, p).await?;
                let form = session
                    .req_header()
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .filter(|ct| {
                        ct.trim_start()
                            .get(..19)
                            .is_some_and(|m| m.eq_ignore_ascii_case("multipart/form-data"))
                    });
                let (body, mut facts) = match form {
                    Some(ct) => RequestBody::parse_form(&path, ct, raw)?,
                    None => RequestBody::parse_for_path(&path, raw)?,
                };
                if let Some((model, stream)) = gemini_model(&path) {
                    // Gemini names the model and whether to stream in the path.
                    if model.len() > tollgate_filters::request::MAX_MODEL_BYTES {
                        return Err(GatewayError::invalid(
                            "The model name in the path is too long.",
                        ));
                    }
                    facts.model = model.to_owned();
                    facts.stream = stream;
                    facts.generates_output = true;
                }
                ctx.facts = Some(facts);
                ctx.body = body.raw.clone();
                Some(body)
            }
            // Body-less calls (`GET /v1/files/{id}`, `DELETE /v1/files/{id}`,
            // `GET /v1/batches`): forwarded by path, authenticated and logged. A body was
            // refused above.
            http::Method::GET | http::Method::DELETE => None,
            _ => return Err(GatewayError::MethodNotAllowed(method.to_string())),
        };
        p.chain.request_body(ctx).await?;
        // Answered from the response cache: no provider, no channel slot.
        if let Some(hit) = &ctx.cache_hit {
            let (content_type, body) = (hit.content_type, hit.body.clone());
            ctx.usage.usage = Some(hit.usage);
            write_replay(session, ctx, content_type, body).await;
            return Ok(());
        }
        let out = Outbound {
            chain: &p.chain,
            channels: &p.channels,
            body: body.as_ref(),
            path: &path,
        };
        self.relay.forward(session, ctx, out).await
    }

    /// `GET /v1/realtime?model=…`: a websocket session. Admitted as one request (its model
    /// allowed, its concurrency place and channel slot held until it ends), its responses
    /// billed one by one (see [`crate::relay`]'s realtime module).
    async fn realtime(
        &self,
        session: &mut ServerSession,
        p: &Pipeline,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let req = session.req_header();
        let upgrade = req
            .headers
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        if req.method != http::Method::GET || !upgrade || session.is_http2() {
            return Err(GatewayError::invalid(
                "/v1/realtime takes a websocket upgrade (GET over HTTP/1.1).",
            ));
        }
        let model = form_urlencoded::parse(req.uri.query().unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "model")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        if model.len() > tollgate_filters::request::MAX_MODEL_BYTES {
            return Err(GatewayError::invalid("The model name is too long."));
        }
        // The session itself generates nothing: each response reserves its own worst case.
        ctx.facts = Some(tollgate_filters::RequestFacts {
            model,
            stream: true,
            max_output_tokens: Some(0),
            choices: 1,
            ..Default::default()
        });
        p.chain.request_body(ctx).await?;
        let billing = p.billing.as_deref().ok_or(GatewayError::Internal)?;
        let path = ctx.path.clone();
        let out = Outbound {
            chain: &p.chain,
            channels: &p.channels,
            body: None,
            path: &path,
        };
        self.relay
            .realtime(session, ctx, out, billing, p.limits.clone())
            .await
    }

    /// Reads the whole body, refusing past `max_body_bytes` (by `Content-Length` up front when
    /// the client sends one, else as the bytes arrive), within the body deadlines.
    async fn read_body(
        &self,
        session: &mut ServerSession,
        p: &Pipeline,
    ) -> Result<Bytes, GatewayError> {
        let limit = p.max_body_bytes;
        let declared = session
            .req_header()
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(GatewayError::RequestTooLarge { limit });
        }
        let expects_continue = session
            .req_header()
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue {
            session
                .write_continue_response()
                .await
                .map_err(|_| GatewayError::invalid("The client closed the connection."))?;
        }
        let limits = p.connections;
        session.set_read_timeout(Some(Duration::from_millis(limits.body_idle_timeout_ms)));
        let read_all = async {
            let mut buf = BytesMut::with_capacity(declared.unwrap_or(8 * 1024).min(limit));
            loop {
                match session.read_request_body().await {
                    Ok(Some(chunk)) => {
                        if buf.len() + chunk.len() > limit {
                            return Err(GatewayError::RequestTooLarge { limit });
                        }
                        buf.extend_from_slice(&chunk);
                    }
                    Ok(None) => return Ok(buf.freeze()),
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the request body failed");
                        return Err(body_error(&e));
                    }
                }
            }
        };
        pingora_timeout::timeout(Duration::from_millis(limits.body_timeout_ms), read_all)
            .await
            .unwrap_or(Err(GatewayError::RequestTimeout))
    }

    async fn pricing_page(
        &self,
        session: &mut ServerSession,
        p: &Pipeline,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let page = p
            .pricing
            .as_ref()
            .ok_or_else(|| GatewayError::RouteNotFound("/api/pricing".into()))?;
        let group = session.req_header().uri.query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "group")
                .map(|(_, v)| v.into_owned())
        });
        let body = page.page(group.as_deref()).ok_or_else(|| {
            GatewayError::invalid(format!(
                "Unknown pricing group `{}`.",
                truncate(&group.unwrap_or_default(), 64)
            ))
        })?;
        write_page(
            session,
            ctx,
            body,
            &[("cache-control", "public, max-age=60".into())],
        )
        .await;
        Ok(())
    }

    /// `GET /v1/models` (and `/v1/models/{id}`): the models this key may use.
    async fn list_models(
        &self,
        session: &mut ServerSession,
        p: &Pipeline,
        ctx: &mut Ctx,
        one: Option<&str>,
    ) -> Result<(), GatewayError> {
        let key = ctx.key.clone().ok_or(GatewayError::MissingApiKey)?;
        let model = |id: &str| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "tollgate"});
        let body = match one {
            Some(id) => {
                if !p.picker.serves(id) || !key.allows_model(id) {
                    return Err(GatewayError::ModelNotFound(id.to_owned()));
                }
                model(id)
            }
            None => {
                let data: Vec<_> = p
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
        // Per key (its model allow-list), so only the key's own client may reuse it.
        write_page(
            session,
            ctx,
            body,
            &[("cache-control", "private, no-cache".into())],
        )
        .await;
        Ok(())
    }

    /// One request on a session whose head has been read.
    async fn serve(&self, session: &mut ServerSession, shutdown: &ShutdownWatch) {
        let pipeline = self.pipeline.load_full();
        let mut rc = RequestCtx::new(
            pipeline.clone(),
            self.in_flight.clone(),
            self.metrics.clone(),
        );
        let limits = pipeline.connections;
        // Keep-alive stays off where Pingora turned it off on reading the head: HTTP/1.0
        // without `Connection: keep-alive`, and a body framed by `Transfer-Encoding` with a
        // `Content-Length` beside it (RFC 9112 §6.1: the connection must close after it, or
        // bytes a front proxy framed differently would be read as a smuggled request).
        session.set_keepalive(if *shutdown.borrow() || session.get_keepalive().is_none() {
            None
        } else {
            Some(limits.keepalive_timeout_s)
        });
        // Pipelined requests are answered in order, one after another.
        session.set_pipelining_enabled(true);
        session.set_total_drain_timeout(Some(Duration::from_millis(limits.body_idle_timeout_ms)));
        if let Err(e) = self.handle(session, &pipeline, &mut rc.ctx).await {
            // An unread body makes the connection unusable; an unauthenticated caller gets
            // no second request on it.
            if !session.is_body_done() || e.status() == 401 {
                session.set_keepalive(None);
            }
            if e == GatewayError::ClientGone {
                // Nobody to answer: the status is recorded (499) and the connection closed.
                session.set_keepalive(None);
                rc.ctx.outcome.status = e.status();
            } else if rc.ctx.outcome.status == 0 {
                write_error(session, &mut rc.ctx, &e).await;
                if !session.is_body_done() {
                    linger(session).await;
                }
            }
            rc.ctx.outcome.error = Some(e);
        }
        rc.ctx.settle();
        pipeline.chain.done(&mut rc.ctx).await;
        rc.done = true;
    }
}

#[async_trait]
impl HttpServerApp for Gateway {
    fn server_options(&self) -> Option<&HttpServerOptions> {
        Some(&self.http_options)
    }

    fn h2_options(&self) -> Option<H2Options> {
        Some(self.h2.options())
    }

    async fn process_new_http(
        self: &Arc<Self>,
        mut session: ServerSession,
        shutdown: &ShutdownWatch,
    ) -> Option<ReusedHttpStream> {
        let head_timeout = Duration::from_millis(self.pipeline.load().connections.head_timeout_ms);
        let mut stop = shutdown.clone();
        let read = tokio::select! {
            biased;
            r = pingora_timeout::timeout(head_timeout, session.read_request()) => r,
            _ = stop.wait_for(|v| *v) => return None,
        };
        match read {
            Ok(Ok(true)) => {}
            // Closed before a byte, or idle past the keep-alive timeout: nothing to say.
            Ok(Ok(false)) => return None,
            Ok(Err(e)) if *e.etype() == pingora::ErrorType::InvalidHTTPHeader => {
                self.metrics.malformed_requests.inc();
                write_malformed(&mut session, new_request_id()).await;
                session.shutdown().await;
                return None;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "connection closed before a full request head");
                self.metrics.abandoned_connections.inc();
                return None;
            }
            Err(_) => {
                tracing::debug!("request head deadline passed; closing");
                self.metrics.head_timeouts.inc();
                return None;
            }
        }
        self.serve(&mut session, shutdown).await;
        let settings = HttpPersistentSettings::for_session(&session);
        match session.finish().await {
            Ok(Some(stream)) => Some(ReusedHttpStream::from_reusable_stream(stream, settings)),
            _ => None,
        }
    }
}

/// Largest request head accepted (request line and headers, as parsed): four times what is
/// forwarded upstream ([`crate::relay::MAX_FORWARDED_HEADER_BYTES`]), far above what an API
/// client sends. Pingora itself reads heads of up to 1 MiB.
pub const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;

/// Refuses a head whose body framing is ambiguous or whose size is out of bounds:
/// `Transfer-Encoding` other than one plain `chunked` (tollgate decodes no other coding, and
/// a proxy in front might frame it differently) and a head over [`MAX_REQUEST_HEAD_BYTES`].
/// (`Transfer-Encoding` beside `Content-Length` is framed by the former as RFC 9112 §6.3
/// says: Pingora drops the `Content-Length` and turns keep-alive off, which
/// [`Gateway::serve`] keeps off, so nothing after that body is read as another request.)
fn check_framing(req: &pingora::http::RequestHeader) -> Result<(), GatewayError> {
    let mut te = req.headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(first) = te.next() {
        let chunked = first
            .as_bytes()
            .trim_ascii()
            .eq_ignore_ascii_case(b"chunked");
        if !chunked || te.next().is_some() {
            return Err(GatewayError::invalid(
                "Only `Transfer-Encoding: chunked` is accepted.",
            ));
        }
    }
    let target = req.uri.path_and_query().map_or(0, |p| p.as_str().len())
        + req.uri.authority().map_or(0, |a| a.as_str().len());
    let head_bytes = target
        + req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if head_bytes > MAX_REQUEST_HEAD_BYTES {
        return Err(GatewayError::invalid(format!(
            "The request head is larger than {} KiB.",
            MAX_REQUEST_HEAD_BYTES / 1024
        )));
    }
    Ok(())
}

/// What a failed body read means for the client: a deadline or a vanished client is a 408
/// (nobody may be reading it); a body whose framing cannot be parsed (a bad chunk size, a
/// body cut short of its `Content-Length`) is a 400.
fn body_error(e: &pingora::Error) -> GatewayError {
    use pingora::ErrorType::*;
    match e.etype() {
        ReadTimedout | ConnectionClosed | ReadError => GatewayError::RequestTimeout,
        _ => GatewayError::invalid("The request body is not validly framed."),
    }
}

/// After answering a request whose body was not read (413, 401), read and discard a bounded
/// amount of it before closing, so the client sees the answer rather than a reset.
async fn linger(session: &mut ServerSession) {
    const MAX: usize = 64 * 1024 * 1024;
    let mut seen = 0;
    let discard = async {
        while let Ok(Some(chunk)) = session.read_request_body().await {
            seen += chunk.len();
            if seen > MAX {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), discard).await;
}

fn client_ip(session: &ServerSession) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
}

/// At most `max` characters of `s`, for echoing client input in errors.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline() -> Arc<Pipeline> {
        let channels: Channels = Arc::from(Vec::new());
        Arc::new(Pipeline {
            chain: Chain::default(),
            billing: None,
            limits: None,
            picker: Arc::new(ChannelPicker::new(channels.clone(), 1)),
            channels,
            max_body_bytes: 1024,
            connections: ConnectionLimits::default(),
            pricing: None,
        })
    }

    #[test]
    fn a_request_dropped_before_it_is_done_leaves_no_in_flight_count_behind() {
        let metrics = Arc::new(Metrics::new());
        let in_flight = Arc::new(InFlight::default());
        let finished = RequestCtx::new(pipeline(), in_flight.clone(), metrics.clone());
        let abandoned = RequestCtx::new(pipeline(), in_flight.clone(), metrics.clone());
        assert_eq!((in_flight.count(), metrics.in_flight.get()), (2, 2));
        let mut finished = finished;
        finished.done = true;
        drop(finished);
        drop(abandoned);
        assert_eq!((in_flight.count(), metrics.in_flight.get()), (0, 0));
    }

    #[test]
    fn echoed_client_input_is_cut_on_a_character_boundary() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééééé", 2), "éé…");
    }
}
