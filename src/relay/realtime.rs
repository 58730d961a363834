//! The Realtime API: a websocket session relayed frame by frame, billed by the response.
//!
//! The upgrade is authenticated and admitted as any request (the session holds its
//! concurrency place and channel slot until it ends), then sent to the channel as an
//! HTTP/1.1 upgrade with the channel's key: never the client's credential, whether it came
//! as a bearer token or as the `openai-insecure-api-key.` subprotocol, and never
//! `permessage-deflate` (see [`tollgate_filters::realtime`]). Once both sides have switched,
//! each complete frame is passed on as it came. A client `response.create` (or a response
//! the provider starts on its own) reserves that response's worst case first; the
//! provider's `response.done` settles its usage into its own ledger row. When the account
//! cannot cover the next response, the client gets an `error` event and the session is
//! closed; the `response.create` never reaches the provider.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::http::ServerSession;
use pingora::protocols::ALPN;
use tollgate_filters::billing::{Billing, Held, Meter};
use tollgate_filters::limits::{LimitHold, Limits};
use tollgate_filters::realtime::{
    client_close_frame, close_frame, error_event, read_event, Event, Frame, FrameReader, OP_CLOSE,
};
use tollgate_filters::{Attempt, AttemptOutcome, Channel, Ctx, GatewayError, Wire};

use super::attempt::Exchange;
use super::{error_of, Outbound, Relay};
use crate::respond::decorate;

/// Client headers of the upgrade passed to the provider (besides those tollgate sets).
const PASS: &[&str] = &[
    "openai-beta",
    "user-agent",
    "sec-websocket-version",
    "sec-websocket-key",
];

impl Relay {
    /// Upgrades to the first planned channel that accepts, then relays the session until
    /// either side closes.
    pub async fn realtime(
        &self,
        session: &mut ServerSession,
        ctx: &mut Ctx,
        out: Outbound<'_>,
        billing: &Billing,
        limits: Option<Arc<Limits>>,
    ) -> Result<(), GatewayError> {
        let mut last = GatewayError::NoChannelAvailable;
        let plan = ctx.plan.clone();
        for (i, planned) in plan.iter().enumerate() {
            let ch = &out.channels[planned.channel];
            ctx.outcome.attempts += 1;
            let attempt = Attempt {
                channel: ch,
                number: ctx.outcome.attempts,
            };
            if let Err(e) = out.chain.attempt_start(ctx, &attempt).await {
                last = e;
                continue;
            }
            let model = planned
                .upstream_model
                .as_deref()
                .or(ctx.model())
                .unwrap_or_default();
            let started = std::time::Instant::now();
            let upgraded = self.upgrade(session.req_header(), ch, model).await;
            ctx.outcome.upstream_time += started.elapsed();
            let outcome = match &upgraded {
                Ok(s) => {
                    AttemptOutcome::Status(s.response_header().map_or(502, |h| h.status.as_u16()))
                }
                Err(o) => *o,
            };
            out.chain.attempt_end(ctx, &attempt, outcome);
            let mut up = match upgraded {
                Ok(up) => up,
                Err(o) => {
                    last = error_of(o, None);
                    continue;
                }
            };
            let status = up.response_header().map_or(502, |h| h.status.as_u16());
            if status != 101 {
                if outcome.is_channel_failure() && i + 1 < plan.len() {
                    last = error_of(outcome, up.response_header());
                    up.shutdown().await;
                    continue;
                }
                ctx.outcome.channel = Some(ch.index);
                let Some(peer) = ch.peer() else {
                    return Err(GatewayError::UpstreamFailed("connect"));
                };
                let ex = Exchange { session: up, peer };
                let status = if status < 300 { 502 } else { status };
                return self.relay_error(session, ctx, ch, ex, status).await;
            }
            ctx.outcome.channel = Some(ch.index);
            ctx.upstream_model = planned.upstream_model.clone();
            ctx.upstream_wire = Wire::OpenAi;
            ctx.outcome.upstream_header_time = Some(started.elapsed());
            let resp = switching(up.response_header(), ctx)?;
            if session.write_response_header(Box::new(resp)).await.is_err() {
                ctx.outcome.client_gone = true;
                up.shutdown().await;
                return Ok(());
            }
            ctx.outcome.status = 101;
            if let HttpSession::H1(h1) = &mut up {
                h1.maybe_upgrade_body_writer();
            }
            let Some(meter) = billing.meter(ctx) else {
                up.shutdown().await;
                return Err(GatewayError::Internal);
            };
            relay_frames(session, &mut up, ctx, meter, limits).await;
            up.shutdown().await;
            session.set_keepalive(None);
            return Ok(());
        }
        Err(last)
    }

    /// Opens an HTTP/1.1 connection to the channel and asks it to switch to the websocket.
    async fn upgrade(
        &self,
        client: &RequestHeader,
        ch: &Channel,
        model: &str,
    ) -> Result<HttpSession, AttemptOutcome> {
        let peer = ch.peer().ok_or(AttemptOutcome::Unresolved)?;
        // A websocket upgrade is an HTTP/1.1 affair.
        let mut peer = (*peer).clone();
        peer.options.alpn = ALPN::H1;
        let (mut s, _) = self
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|_| AttemptOutcome::Connect)?;
        if !matches!(s, HttpSession::H1(_)) {
            return Err(AttemptOutcome::Connect);
        }
        s.set_write_timeout(Some(ch.write_timeout()));
        let req = upgrade_request(client, ch, model).map_err(|_| AttemptOutcome::Io)?;
        let head = async {
            s.write_request_header(Box::new(req)).await?;
            s.read_response_header().await
        };
        match tokio::time::timeout(ch.read_timeout, head).await {
            Ok(Ok(())) => Ok(s),
            Ok(Err(_)) => Err(AttemptOutcome::Io),
            Err(_) => Err(AttemptOutcome::Timeout),
        }
    }
}

/// `GET /v1/realtime?model=<upstream model>` with the channel's key and the client's
/// websocket handshake, less the key subprotocol and any extension.
fn upgrade_request(
    client: &RequestHeader,
    ch: &Channel,
    model: &str,
) -> Result<RequestHeader, GatewayError> {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("model", model)
        .finish();
    let path = ch.upstream_target("/v1/realtime", Some(&query), Some(model));
    let mut req = RequestHeader::build("GET", path.as_bytes(), Some(12))
        .map_err(|_| GatewayError::Internal)?;
    let set = |req: &mut RequestHeader, name: &'static str, value: HeaderValue| {
        req.insert_header(name, value)
            .map_err(|_| GatewayError::Internal)
    };
    set(&mut req, "host", ch.host_header.clone())?;
    if let Some((name, value)) = &ch.auth_header {
        req.insert_header(name.clone(), value.clone())
            .map_err(|_| GatewayError::Internal)?;
    }
    set(&mut req, "upgrade", HeaderValue::from_static("websocket"))?;
    set(&mut req, "connection", HeaderValue::from_static("Upgrade"))?;
    for name in PASS {
        if let Some(v) = client.headers.get(*name) {
            set(&mut req, name, v.clone())?;
        }
    }
    let protocols: Vec<&str> = client
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.starts_with(tollgate_filters::auth::KEY_SUBPROTOCOL))
        .collect();
    if !protocols.is_empty() {
        let v = HeaderValue::from_str(&protocols.join(", ")).map_err(|_| GatewayError::Internal)?;
        set(&mut req, "sec-websocket-protocol", v)?;
    }
    Ok(req)
}

/// The client's `101 Switching Protocols`, with the provider's accept key and protocol.
fn switching(up: Option<&ResponseHeader>, ctx: &Ctx) -> Result<ResponseHeader, GatewayError> {
    let up = up.ok_or(GatewayError::UpstreamFailed("no response header"))?;
    let mut resp =
        ResponseHeader::build_no_case(101, Some(8)).map_err(|_| GatewayError::Internal)?;
    let put = |resp: &mut ResponseHeader, name: &'static str, v: HeaderValue| {
        resp.insert_header(name, v)
            .map_err(|_| GatewayError::Internal)
    };
    put(&mut resp, "upgrade", HeaderValue::from_static("websocket"))?;
    put(&mut resp, "connection", HeaderValue::from_static("Upgrade"))?;
    for name in ["sec-websocket-accept", "sec-websocket-protocol"] {
        if let Some(v) = up.headers.get(name) {
            put(&mut resp, name, v.clone())?;
        }
    }
    decorate(&mut resp, ctx);
    Ok(resp)
}

/// What the session is doing with the money and the limits.
struct Book {
    meter: Meter,
    /// The limits filter and the scopes the session holds (its key's, account's, model's):
    /// requests/min and tokens/min apply per response.
    limits: Option<(Arc<Limits>, LimitHold)>,
    /// Responses reserved and not yet done, oldest first, with the tokens counted for them.
    held: VecDeque<(Held, u64)>,
    /// `response.create`s reserved whose `response.created` has not come yet.
    asked: usize,
    /// Tokens the conversation may hold so far (the next prompt's upper bound).
    prompt: u64,
    /// `session.update`'s output cap.
    cap: Option<u64>,
}

impl Book {
    /// Counts and reserves one response; `Err` ends the session.
    async fn reserve(&mut self, cap: Option<u64>) -> Result<(), GatewayError> {
        let cap = cap.or(self.cap);
        let tokens = self.prompt.saturating_add(self.meter.output_cap(cap));
        if let Some((limits, hold)) = &mut self.limits {
            limits.take_response(hold, tokens).await?;
        }
        match self.meter.reserve(self.prompt, cap).await {
            Ok(held) => {
                self.held.push_back((held, tokens));
                Ok(())
            }
            Err(e) => {
                self.return_tokens(tokens);
                Err(e)
            }
        }
    }

    fn return_tokens(&self, n: u64) {
        if let Some((limits, hold)) = &self.limits {
            limits.return_tokens(hold, n);
        }
    }

    /// A response is over: settle the oldest hold with its usage.
    fn done(&mut self, usage: Option<tollgate_filters::billing::Usage>) {
        match self.held.pop_front() {
            Some((h, tokens)) => {
                let used = usage.map_or(0, |u| u.prompt_tokens.saturating_add(u.completion_tokens));
                self.return_tokens(tokens.saturating_sub(used));
                self.meter.settle(h, usage);
            }
            None => tracing::warn!("realtime: response.done without a started response"),
        }
    }
}

/// Relays frames both ways until either side closes, settling each response.
async fn relay_frames(
    session: &mut ServerSession,
    up: &mut HttpSession,
    ctx: &mut Ctx,
    meter: Meter,
    limits: Option<Arc<Limits>>,
) {
    let limits = limits.zip(ctx.limit_hold.take());
    let mut book = Book {
        meter,
        limits,
        held: VecDeque::new(),
        asked: 0,
        prompt: 0,
        cap: None,
    };
    let (mut from_client, mut from_up) = (FrameReader::default(), FrameReader::default());
    let refusal = 'session: loop {
        tokio::select! {
            r = session.read_request_body() => {
                let Ok(Some(bytes)) = r else {
                    ctx.outcome.client_gone = true;
                    break None;
                };
                from_client.push(&bytes);
                loop {
                    let frame = match from_client.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => break 'session Some(GatewayError::invalid("The websocket frame is too large or compressed.")),
                    };
                    if let Err(e) = client_event(&frame, &mut book).await {
                        break 'session Some(e);
                    }
                    if write_up(up, frame.raw).await.is_err() {
                        ctx.outcome.upstream_cut = true;
                        break 'session None;
                    }
                    if frame.opcode == OP_CLOSE {
                        break 'session None;
                    }
                }
            }
            r = up.read_response_body() => {
                let Ok(Some(bytes)) = r else {
                    break None;
                };
                from_up.push(&bytes);
                loop {
                    let frame = match from_up.next_frame() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => break 'session Some(GatewayError::UpstreamFailed("websocket frame")),
                    };
                    if let Some(e) = provider_event(&frame, &mut book).await {
                        break 'session Some(e);
                    }
                    if ctx.outcome.first_byte.is_none() {
                        ctx.outcome.first_byte = Some(ctx.started.elapsed());
                    }
                    let close = frame.opcode == OP_CLOSE;
                    if session.write_response_body(frame.raw, false).await.is_err() {
                        ctx.outcome.client_gone = true;
                        break 'session None;
                    }
                    if close {
                        break 'session None;
                    }
                }
            }
        }
    };
    if let Some(e) = refusal {
        tracing::info!(request_id = %ctx.request_id, error = %e, "realtime session closed by the gateway");
        let (kind, code) = (e.kind(), e.code().unwrap_or("error"));
        let _ = session
            .write_response_body(error_event(kind, code, &e.to_string()), false)
            .await;
        let _ = session
            .write_response_body(close_frame(1008, code), false)
            .await;
        let _ = write_up(up, client_close_frame(1000)).await;
        ctx.outcome.error = Some(e);
    }
    // Responses the session ended before: no usage will come, their money and tokens go
    // back; the session's own hold goes back to ctx for the limits filter to free.
    for (h, tokens) in std::mem::take(&mut book.held) {
        book.return_tokens(tokens);
        book.meter.release(h);
    }
    ctx.limit_hold = book.limits.map(|(_, hold)| hold);
    let _ = session.write_response_body(Bytes::new(), true).await;
}

/// Acts on a client frame before it is passed on.
async fn client_event(frame: &Frame, book: &mut Book) -> Result<(), GatewayError> {
    match frame.text.as_deref().and_then(read_event) {
        Some(Event::ResponseCreate { max_output_tokens }) => {
            book.reserve(max_output_tokens).await?;
            book.asked += 1;
        }
        Some(Event::SessionCap(cap)) => book.cap = cap,
        Some(Event::Input { tokens }) => book.prompt = book.prompt.saturating_add(tokens),
        _ => {}
    }
    Ok(())
}

/// Acts on a provider frame before it is passed on; `Some` ends the session.
async fn provider_event(frame: &Frame, book: &mut Book) -> Option<GatewayError> {
    match frame.text.as_deref().and_then(read_event) {
        // A response the client asked for was reserved then; one the provider started on
        // its own (server VAD) is reserved now.
        Some(Event::ResponseCreated) if book.asked > 0 => book.asked -= 1,
        Some(Event::ResponseCreated) => return book.reserve(None).await.err(),
        Some(Event::ResponseDone(usage)) => book.done(usage),
        _ => {}
    }
    None
}

async fn write_up(up: &mut HttpSession, raw: Bytes) -> pingora::Result<()> {
    match up {
        HttpSession::H1(h1) => h1.write_body(&raw).await.map(|_| ()),
        _ => Err(pingora::Error::new(pingora::ErrorType::WriteError)),
    }
}
