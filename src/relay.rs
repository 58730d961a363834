//! The upstream exchange: tollgate forwards requests itself, from `request_filter`.
//!
//! Pingora 0.9.1 re-sends an early-read body only through its 64 KiB retry buffer, and LLM
//! bodies are routinely larger. So the relay takes a pooled [`HttpSession`] from Pingora's
//! [`Connector`], writes the header and the whole body, reads the response header, and only
//! then commits: a connect error, timeout, 429 or 5xx moves on to the next planned channel
//! while nothing has reached the client. Once committed, every body chunk is written to the
//! client as it arrives. A finished connection goes back to the keep-alive pool.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use pingora::connectors::http::Connector;
use pingora::connectors::ConnectorOptions;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::tls::CaType;
use pingora::proxy::Session;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::utils::tls::{parse_x509, WrappedX509};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tollgate_filters::route::Attempt;
use tollgate_filters::{Ctx, GatewayError, RequestBody};

use crate::config::{ChannelConfig, UpstreamUrl};
use crate::metrics::Metrics;
use crate::usage::UsageScanner;

/// Largest upstream error body read for rewriting; the rest is dropped.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Per-write timeout towards the upstream.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// One configured provider endpoint, ready to connect.
pub struct UpstreamChannel {
    pub name: String,
    url: UpstreamUrl,
    /// The resolved peer; refreshed off the request path ([`Relay::refresh_dns`]).
    peer: ArcSwapOption<HttpPeer>,
    host_header: HeaderValue,
    /// `Bearer <key>`, marked sensitive so it is never printed by `Debug`.
    auth_header: Option<HeaderValue>,
    /// The key itself, only to scrub it out of provider error messages.
    secret: String,
    connect_timeout: Duration,
    read_timeout: Duration,
    idle_timeout: Duration,
    tls_verify: bool,
    /// Ask for `stream_options.include_usage` when the client did not (see `usage.rs`).
    inject_stream_usage: bool,
    /// The channel's own trusted CA, when `ca_file` is set.
    ca: Option<Arc<CaType>>,
    slots: Arc<Semaphore>,
}

impl UpstreamChannel {
    pub fn new(cfg: &ChannelConfig) -> Result<UpstreamChannel, String> {
        let url = UpstreamUrl::parse(&cfg.base_url)
            .map_err(|e| format!("channel {}: base_url {e}", cfg.name))?;
        let host_header = HeaderValue::from_str(&url.host_header())
            .map_err(|_| format!("channel {}: bad host", cfg.name))?;
        let auth_header = if cfg.api_key.is_empty() {
            None
        } else {
            let mut v =
                HeaderValue::from_str(&format!("Bearer {}", cfg.api_key)).map_err(|_| {
                    format!("channel {}: api_key is not a valid header value", cfg.name)
                })?;
            v.set_sensitive(true);
            Some(v)
        };
        let ch = UpstreamChannel {
            name: cfg.name.clone(),
            url,
            peer: ArcSwapOption::empty(),
            host_header,
            auth_header,
            secret: cfg.api_key.clone(),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            read_timeout: Duration::from_millis(cfg.read_timeout_ms),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_s),
            tls_verify: cfg.tls_verify,
            inject_stream_usage: cfg.inject_stream_usage,
            ca: cfg
                .ca_file
                .as_ref()
                .map(|p| load_ca(&cfg.name, p))
                .transpose()?,
            slots: Arc::new(Semaphore::new(cfg.max_concurrency as usize)),
        };
        Ok(ch)
    }

    /// Resolves the host (a blocking call: run it off the request path) and installs a peer.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let addr = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| "no address".to_string())?;
        let current = self.peer.load();
        if current
            .as_ref()
            .and_then(|p| p.address().as_inet().copied())
            == Some(addr)
        {
            return Ok(addr);
        }
        let mut peer = HttpPeer::new(addr, self.url.tls, self.url.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(WRITE_TIMEOUT);
        peer.options.idle_timeout = Some(self.idle_timeout);
        peer.options.verify_cert = self.tls_verify;
        peer.options.verify_hostname = self.tls_verify;
        peer.options.ca = self.ca.clone();
        self.peer.store(Some(Arc::new(peer)));
        Ok(addr)
    }

    pub fn in_use(&self, max: usize) -> usize {
        max.saturating_sub(self.slots.available_permits())
    }
}

/// Reads a PEM CA certificate for a channel that trusts its own CA.
fn load_ca(channel: &str, path: &std::path::Path) -> Result<Arc<CaType>, String> {
    let der = pingora::tls::load_pem_file_ca(&path.display().to_string())
        .map_err(|e| format!("channel {channel}: ca_file: {e}"))?;
    if der.is_empty() {
        return Err(format!("channel {channel}: ca_file holds no certificate"));
    }
    let cert = WrappedX509::new(der, parse_x509);
    Ok(Arc::from(vec![cert]))
}

/// Why one attempt failed, and whether another channel should be tried.
#[derive(Debug)]
enum AttemptError {
    Busy,
    Unresolved,
    Connect,
    Timeout,
    Io,
}

impl AttemptError {
    fn label(&self) -> &'static str {
        match self {
            AttemptError::Busy => "busy",
            AttemptError::Unresolved => "unresolved",
            AttemptError::Connect => "connect_error",
            AttemptError::Timeout => "timeout",
            AttemptError::Io => "io_error",
        }
    }

    fn to_gateway(&self) -> GatewayError {
        match self {
            AttemptError::Busy => GatewayError::NoChannelAvailable,
            AttemptError::Unresolved | AttemptError::Connect => {
                GatewayError::UpstreamFailed("connect")
            }
            AttemptError::Timeout => GatewayError::UpstreamTimeout,
            AttemptError::Io => GatewayError::UpstreamFailed("connection"),
        }
    }

    fn from_pingora(e: &pingora::Error) -> AttemptError {
        use pingora::ErrorType::*;
        match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout => AttemptError::Timeout,
            ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
            | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert => AttemptError::Connect,
            _ => AttemptError::Io,
        }
    }
}

/// A response header received from an upstream, with the session to read its body.
struct Exchange {
    session: HttpSession,
    peer: Arc<HttpPeer>,
    _permit: OwnedSemaphorePermit,
}

/// Hop-by-hop and gateway-owned headers never copied from the client to the provider.
const DROP_REQUEST: &[&str] = &[
    "host",
    "authorization",
    "x-api-key",
    "api-key",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "accept-encoding",
    "x-request-id",
    "x-forwarded-for",
    "forwarded",
    "cookie",
    // The channel's key decides the provider organization and project, not the caller.
    "openai-organization",
    "openai-project",
];

/// Headers never copied from the provider to the client: hop-by-hop, framing (recomputed),
/// and provider-account details that are the gateway's business, not the caller's.
const DROP_RESPONSE: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "content-length",
    "trailer",
    "upgrade",
    "set-cookie",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "server-timing",
    "alt-svc",
    "via",
];

/// The relay: the channels and the pooled connector.
pub struct Relay {
    connector: Connector,
    limits: ClientLimits,
    pub channels: Vec<UpstreamChannel>,
    max_concurrency: Vec<usize>,
    metrics: Arc<Metrics>,
}

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

/// What the relay needs from the request, beyond the context.
pub struct Outbound<'a> {
    pub body: &'a RequestBody,
    pub path: &'a str,
    /// A stream whose client did not ask for usage: ask the provider for it anyway.
    pub wants_usage_injection: bool,
}

impl Relay {
    pub fn new(
        channels: &[ChannelConfig],
        keepalive_pool_size: usize,
        limits: ClientLimits,
        metrics: Arc<Metrics>,
    ) -> Result<Relay, String> {
        let mut opts = ConnectorOptions::new(keepalive_pool_size);
        opts.keepalive_pool_size = keepalive_pool_size;
        let built = channels
            .iter()
            .map(UpstreamChannel::new)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Relay {
            connector: Connector::new(Some(opts)),
            limits,
            max_concurrency: channels
                .iter()
                .map(|c| c.max_concurrency as usize)
                .collect(),
            channels: built,
            metrics,
        })
    }

    /// Resolves every channel's host; failures are logged and retried on the next refresh.
    pub fn refresh_dns(&self) {
        for ch in &self.channels {
            if let Err(e) = ch.resolve() {
                tracing::warn!(channel = %ch.name, error = %e, "cannot resolve upstream host; will retry");
            }
        }
    }

    pub fn channels_in_use(&self) -> Vec<(&str, usize)> {
        self.channels
            .iter()
            .zip(&self.max_concurrency)
            .map(|(c, &m)| (c.name.as_str(), c.in_use(m)))
            .collect()
    }

    /// Forwards the request along `ctx.route`. `Err` only when nothing was sent to the client
    /// (the caller renders the error); once a response is committed, problems end the
    /// downstream response instead.
    pub async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        out: Outbound<'_>,
    ) -> Result<(), GatewayError> {
        let mut last = GatewayError::NoChannelAvailable;
        let plan: Vec<Attempt> = std::mem::take(&mut ctx.route);
        let n = plan.len();
        for (i, attempt) in plan.iter().enumerate() {
            let ch = &self.channels[attempt.channel];
            let is_last = i + 1 == n;
            ctx.outcome.attempts += 1;
            let inject = out.wants_usage_injection && ch.inject_stream_usage;
            let body = out
                .body
                .rewrite(attempt.upstream_model.as_deref(), inject)?;
            let req = self.request_header(session, ch, out.path, body.len())?;
            let started = Instant::now();
            let mut ex = match self.exchange(ch, req, body).await {
                Ok(ex) => ex,
                Err(e) => {
                    tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, outcome = e.label(), "upstream attempt failed");
                    self.metrics
                        .upstream_attempts
                        .with_label_values(&[&ch.name, e.label()])
                        .inc();
                    // A full channel says nothing about its health.
                    if !matches!(e, AttemptError::Busy) {
                        ctx.outcome.channel_results.push((attempt.channel, true));
                    }
                    last = e.to_gateway();
                    continue;
                }
            };
            let status = ex
                .session
                .response_header()
                .map(|h| h.status.as_u16())
                .unwrap_or(502);
            // 401/403: the channel's own key is refused; another channel may hold a good one.
            let retryable = matches!(status, 401 | 403 | 429) || status >= 500;
            let outcome = if retryable {
                status_label(status)
            } else {
                "ok"
            };
            self.metrics
                .upstream_attempts
                .with_label_values(&[&ch.name, outcome])
                .inc();
            ctx.outcome
                .channel_results
                .push((attempt.channel, retryable));
            if retryable && !is_last {
                tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, status, "upstream refused; trying next channel");
                last = upstream_status_error(status, ex.session.response_header());
                ex.session.shutdown().await;
                continue;
            }
            ctx.outcome.upstream_header_time = Some(started.elapsed());
            ctx.outcome.channel = Some(attempt.channel);
            ctx.upstream_model = attempt.upstream_model.clone();
            if !(200..300).contains(&status) {
                return self.relay_error(session, ctx, ch, ex, status).await;
            }
            return self.stream_response(session, ctx, ch, ex, inject).await;
        }
        Err(last)
    }

    fn request_header(
        &self,
        session: &Session,
        ch: &UpstreamChannel,
        path: &str,
        body_len: usize,
    ) -> Result<RequestHeader, GatewayError> {
        let client = session.req_header();
        let mut upath = ch.url.upstream_path(path);
        if let Some(q) = client.uri.query() {
            upath.push('?');
            upath.push_str(q);
        }
        let mut req = RequestHeader::build(
            client.method.clone(),
            upath.as_bytes(),
            Some(client.headers.len() + 3),
        )
        .map_err(|_| GatewayError::Internal)?;
        for (name, value) in client.headers.iter() {
            if DROP_REQUEST.contains(&name.as_str()) {
                continue;
            }
            req.append_header(name.clone(), value.clone())
                .map_err(|_| GatewayError::Internal)?;
        }
        req.insert_header(header::HOST, ch.host_header.clone())
            .map_err(|_| GatewayError::Internal)?;
        if let Some(auth) = &ch.auth_header {
            req.insert_header(header::AUTHORIZATION, auth.clone())
                .map_err(|_| GatewayError::Internal)?;
        }
        if body_len > 0 || client.method == http::Method::POST {
            req.insert_header(header::CONTENT_LENGTH, body_len)
                .map_err(|_| GatewayError::Internal)?;
        }
        Ok(req)
    }

    /// One attempt on one channel: connect (or reuse), send, read the response header.
    async fn exchange(
        &self,
        ch: &UpstreamChannel,
        req: RequestHeader,
        body: Bytes,
    ) -> Result<Exchange, AttemptError> {
        let permit = ch
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| AttemptError::Busy)?;
        let peer = ch.peer.load_full().ok_or(AttemptError::Unresolved)?;
        // A pooled connection may have been closed by the provider while idle; that failure
        // says nothing about the provider, so retry it on another (eventually fresh) one.
        let mut stale_retries = 2;
        loop {
            let (mut s, reused) = self
                .connector
                .get_http_session(peer.as_ref())
                .await
                .map_err(|e| AttemptError::from_pingora(&e))?;
            s.set_read_timeout(Some(ch.read_timeout));
            s.set_write_timeout(Some(WRITE_TIMEOUT));
            match send_and_read_head(&mut s, req.clone(), body.clone()).await {
                Ok(()) => {
                    return Ok(Exchange {
                        session: s,
                        peer,
                        _permit: permit,
                    })
                }
                Err(e) if reused && stale_retries > 0 && is_stale_connection(&e) => {
                    stale_retries -= 1;
                    s.shutdown().await;
                }
                Err(e) => {
                    s.shutdown().await;
                    return Err(AttemptError::from_pingora(&e));
                }
            }
        }
    }

    /// The provider answered 2xx: copy its header, then its body chunk by chunk, scanning it
    /// for usage on the side. If the client goes away, keep reading (bounded) for the usage.
    async fn stream_response(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        ch: &UpstreamChannel,
        mut ex: Exchange,
        injected_usage: bool,
    ) -> Result<(), GatewayError> {
        let Some(up) = ex.session.response_header() else {
            return Err(GatewayError::UpstreamFailed("no response header"));
        };
        let mut scanner = if is_event_stream(up) {
            UsageScanner::sse(injected_usage)
        } else {
            UsageScanner::json()
        };
        let Ok(mut resp) = client_response_header(up, ctx, session.as_downstream().is_http2())
        else {
            ex.session.shutdown().await;
            return Err(GatewayError::UpstreamFailed("unusable response header"));
        };
        ctx.outcome.status = up.status.as_u16();
        session
            .as_downstream_mut()
            .set_write_timeout(Some(self.limits.write_timeout));
        set_server_timing(&mut resp, ctx);
        if let Err(e) = session.write_response_header(Box::new(resp), false).await {
            tracing::info!(request_id = %ctx.request_id, error = %e, "client went away before the response header");
            ctx.outcome.client_gone = true;
        }
        let mut upstream_broken = false;
        let mut drained: u64 = 0;
        let mut drain_deadline = None;
        loop {
            let read = match drain_deadline {
                None => ex.session.read_response_body().await,
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, ex.session.read_response_body()).await {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::info!(request_id = %ctx.request_id, "stopped draining: time limit");
                            upstream_broken = true;
                            break;
                        }
                    }
                }
            };
            match read {
                Ok(Some(chunk)) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    let out = scanner.feed(chunk);
                    if ctx.outcome.client_gone {
                        drained += out.len() as u64;
                        if drained > self.limits.drain_max_bytes {
                            tracing::info!(request_id = %ctx.request_id, "stopped draining: byte limit");
                            upstream_broken = true;
                            break;
                        }
                        continue;
                    }
                    if out.is_empty() {
                        continue;
                    }
                    if ctx.outcome.first_byte.is_none() {
                        ctx.outcome.first_byte = Some(ctx.started.elapsed());
                    }

                    if let Err(e) = session.write_response_body(Some(out), false).await {
                        tracing::info!(request_id = %ctx.request_id, error = %e, "client went away mid-response; reading on for usage");
                        ctx.outcome.client_gone = true;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(request_id = %ctx.request_id, channel = %ch.name, error = ?e.etype(), "upstream broke off the response");
                    upstream_broken = true;
                    break;
                }
            }
            if ctx.outcome.client_gone && drain_deadline.is_none() {
                drain_deadline = Some(tokio::time::Instant::now() + self.limits.drain_timeout);
            }
        }
        let rest = scanner.finish();
        if scanner.saw_error {
            // The provider gave up mid-stream: the access log says so, billing estimates.
            ctx.outcome.error = Some(GatewayError::UpstreamFailed("error event mid-stream"));
        }
        ctx.usage = scanner.usage;
        ctx.outcome.completion_text_bytes = scanner.text_bytes;
        if upstream_broken || ctx.outcome.client_gone {
            // Never terminate the body cleanly after a cut: the client must see a broken
            // stream, not a short one that looks complete.
            ex.session.shutdown().await;
            session.as_downstream_mut().set_keepalive(None);
            session.as_downstream_mut().shutdown().await;
            if upstream_broken && !ctx.outcome.client_gone {
                ctx.outcome.error = Some(GatewayError::UpstreamFailed("truncated"));
            }
            return Ok(());
        }
        if !rest.is_empty()
            && session
                .write_response_body(Some(rest), false)
                .await
                .is_err()
        {
            ctx.outcome.client_gone = true;
        }
        if let Err(e) = session.write_response_body(None, true).await {
            tracing::info!(request_id = %ctx.request_id, error = %e, "client went away at the end");
            ctx.outcome.client_gone = true;
        }
        self.release(ex, ch).await;
        Ok(())
    }

    /// A non-2xx the gateway passes on (a 4xx, or the last channel's 429/5xx): its body is
    /// rebuilt as OpenAI error JSON with the channel key scrubbed out.
    async fn relay_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        ch: &UpstreamChannel,
        mut ex: Exchange,
        status: u16,
    ) -> Result<(), GatewayError> {
        // A provider refusing the *channel's* key is the gateway's problem, not the caller's:
        // a 401 would tell the client its own key is wrong.
        if status == 401 || status == 403 {
            tracing::error!(request_id = %ctx.request_id, channel = %ch.name, status, "provider rejected the channel credentials");
            ex.session.shutdown().await;
            return Err(GatewayError::UpstreamFailed("provider authentication"));
        }
        if status == 429 || status >= 500 {
            let e = upstream_status_error(status, ex.session.response_header());
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
        let body = scrub_error_body(&buf, status, &ch.secret);
        let mut resp =
            ResponseHeader::build(status, Some(6)).map_err(|_| GatewayError::Internal)?;
        resp.insert_header(header::CONTENT_TYPE, "application/json")
            .map_err(|_| GatewayError::Internal)?;
        resp.insert_header(header::CONTENT_LENGTH, body.len())
            .map_err(|_| GatewayError::Internal)?;
        resp.insert_header("x-request-id", &ctx.request_id)
            .map_err(|_| GatewayError::Internal)?;
        for (k, v) in &ctx.response_headers {
            resp.insert_header(*k, v)
                .map_err(|_| GatewayError::Internal)?;
        }
        set_server_timing(&mut resp, ctx);
        ctx.outcome.status = status;
        if session
            .write_response_header(Box::new(resp), false)
            .await
            .is_err()
            || session.write_response_body(Some(body), true).await.is_err()
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

    async fn release(&self, mut ex: Exchange, ch: &UpstreamChannel) {
        if ex.session.response_done() {
            self.connector
                .release_http_session(ex.session, ex.peer.as_ref(), Some(ch.idle_timeout))
                .await;
        } else {
            ex.session.shutdown().await;
        }
    }
}

/// The ways an idle pooled connection the provider already closed fails: anything else
/// (a timeout, a malformed answer) may mean the provider did the work, so it is not resent.
fn is_stale_connection(e: &pingora::Error) -> bool {
    use pingora::ErrorType::*;
    matches!(e.etype(), ConnectionClosed | ReadError | WriteError)
}

async fn send_and_read_head(
    s: &mut HttpSession,
    req: RequestHeader,
    body: Bytes,
) -> pingora::Result<()> {
    s.write_request_header(Box::new(req)).await?;
    if !body.is_empty() {
        s.write_request_body(body, true).await?;
    }
    s.finish_request_body().await?;
    // Informational (1xx) heads come before the real one; reading the body before the real
    // head would panic inside pingora's client.
    loop {
        s.read_response_header().await?;
        match s.response_header().map(|h| h.status.as_u16()) {
            Some(100..=199) => continue,
            _ => return Ok(()),
        }
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        429 => "status_429",
        500..=599 => "status_5xx",
        _ => "status_other",
    }
}

/// The error a client sees when the provider's 429/5xx is the last word.
fn upstream_status_error(status: u16, head: Option<&ResponseHeader>) -> GatewayError {
    if status == 429 {
        let retry_after = head
            .and_then(|h| h.headers.get(header::RETRY_AFTER))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return GatewayError::UpstreamRateLimited { retry_after };
    }
    if status == 504 {
        return GatewayError::UpstreamTimeout;
    }
    GatewayError::UpstreamFailed("server error")
}

/// The client-facing response header for a provider's 2xx.
fn client_response_header(
    up: &ResponseHeader,
    ctx: &Ctx,
    h2: bool,
) -> pingora::Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(up.status, Some(up.headers.len() + 4))?;
    for (name, value) in up.headers.iter() {
        let n = name.as_str();
        if DROP_RESPONSE.contains(&n) || n.starts_with("x-ratelimit-") {
            continue;
        }
        resp.append_header(name.clone(), value.clone())?;
    }
    if let Some(id) = up.headers.get("x-request-id") {
        resp.insert_header(HeaderName::from_static("x-upstream-request-id"), id.clone())?;
    }
    resp.insert_header("x-request-id", &ctx.request_id)?;
    for (k, v) in &ctx.response_headers {
        resp.insert_header(*k, v)?;
    }
    match up.headers.get(header::CONTENT_LENGTH) {
        // A fixed-length body is passed on with its length; anything else is chunked on h1.
        Some(len) if !is_event_stream(up) => {
            resp.insert_header(header::CONTENT_LENGTH, len.clone())?;
        }
        _ if !h2 => {
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        _ => {}
    }
    Ok(resp)
}

fn is_event_stream(h: &ResponseHeader) -> bool {
    h.headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// `Server-Timing: gateway;dur=…, upstream;dur=…` (milliseconds).
fn set_server_timing(resp: &mut ResponseHeader, ctx: &Ctx) {
    let total = ctx.started.elapsed().as_secs_f64() * 1000.0;
    let upstream = ctx
        .outcome
        .upstream_header_time
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0);
    let v = format!(
        "gateway;dur={:.3}, upstream;dur={:.3}",
        (total - upstream).max(0.0),
        upstream
    );
    let _ = resp.insert_header("server-timing", v);
}

/// Rebuilds a provider's error body as OpenAI error JSON, with the channel key removed from
/// the message (some providers echo the key they were sent).
pub fn scrub_error_body(raw: &[u8], status: u16, secret: &str) -> Bytes {
    #[derive(serde::Deserialize)]
    struct Env {
        error: serde_json::Value,
    }
    let redact = |s: &str| -> String {
        let mut s = s.to_string();
        if secret.len() >= 4 {
            s = s.replace(secret, "[redacted]");
            // Providers also echo a masked key ("sk-abc***wxyz"): drop the visible tail too.
            if secret.len() >= 8 {
                s = s.replace(&secret[secret.len() - 4..], "****");
            }
        }
        s
    };
    let (message, kind, code, param) = match serde_json::from_slice::<Env>(raw) {
        Ok(Env {
            error: serde_json::Value::Object(e),
        }) => (
            e.get("message")
                .and_then(|v| v.as_str())
                .unwrap_or("upstream error")
                .to_string(),
            e.get("type")
                .and_then(|v| v.as_str())
                .unwrap_or("invalid_request_error")
                .to_string(),
            e.get("code").filter(|v| v.is_string()).cloned(),
            e.get("param").filter(|v| v.is_string()).cloned(),
        ),
        _ => (
            format!("The upstream provider answered {status}."),
            "invalid_request_error".to_string(),
            None,
            None,
        ),
    };
    let body = serde_json::json!({
        "error": {
            "message": redact(&message),
            "type": redact(&kind),
            "param": param.map(|p| serde_json::Value::String(redact(p.as_str().unwrap_or_default()))),
            "code": code.map(|c| serde_json::Value::String(redact(c.as_str().unwrap_or_default()))),
        }
    });
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_error_is_rebuilt_without_the_key() {
        let key = "sk-provider-SECRET-abcd1234";
        let raw = format!(
            r#"{{"error":{{"message":"Incorrect API key provided: {key}. Also sk-pro***1234","type":"invalid_request_error","code":"invalid_api_key","param":null,"extra":1}}}}"#
        );
        let out = scrub_error_body(raw.as_bytes(), 400, key);
        let s = std::str::from_utf8(&out).unwrap();
        assert!(!s.contains(key) && !s.contains("1234"), "{s}");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"].get("extra").is_none());
    }

    #[test]
    fn non_json_provider_error_becomes_openai_json() {
        let out = scrub_error_body(b"<html>bad gateway</html>", 400, "k");
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("400"));
    }
}
