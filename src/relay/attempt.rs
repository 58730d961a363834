//! One upstream attempt: take a pooled connection, send the head and the whole body, read
//! the response head. A pooled connection the provider closed while idle is retried on
//! another connection, but only when nothing of the request can have reached the provider.

use std::sync::Arc;

use bytes::Bytes;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::protocols::http::client::HttpSession;
use pingora::upstreams::peer::HttpPeer;
use tollgate_filters::{AttemptOutcome, Channel};

/// A response head received from an upstream, with the session to read its body.
pub struct Exchange {
    pub session: HttpSession,
    pub peer: Arc<HttpPeer>,
}

impl Exchange {
    pub fn status(&self) -> u16 {
        self.session
            .response_header()
            .map(|h| h.status.as_u16())
            .unwrap_or(502)
    }
}

fn outcome_of(e: &pingora::Error) -> AttemptOutcome {
    use pingora::ErrorType::*;
    match e.etype() {
        ConnectTimedout | ReadTimedout | WriteTimedout => AttemptOutcome::Timeout,
        ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure
        | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert => AttemptOutcome::Connect,
        _ => AttemptOutcome::Io,
    }
}

/// Where a failed exchange stopped: a stale pooled connection may be retried only if the
/// request never left (the head write failed) — a failure after the body was written may
/// mean the provider is already doing the work, and a POST must not be sent twice.
enum Failure {
    BeforeSend(Box<pingora::Error>),
    AfterSend(Box<pingora::Error>),
}

/// How an attempt failed, and whether the request may have reached the provider: then it
/// is not sent again, on any connection or channel.
#[derive(Debug, Clone, Copy)]
pub struct Failed {
    pub outcome: AttemptOutcome,
    pub reached_provider: bool,
}

impl Failed {
    fn before(outcome: AttemptOutcome) -> Failed {
        Failed {
            outcome,
            reached_provider: false,
        }
    }
}

/// One attempt on one channel: connect (or reuse), send, read the response head.
pub async fn exchange(
    connector: &Connector,
    ch: &Channel,
    req: RequestHeader,
    body: Bytes,
) -> Result<Exchange, Failed> {
    let peer = ch
        .peer()
        .ok_or(Failed::before(AttemptOutcome::Unresolved))?;
    let mut stale_retries = 2;
    loop {
        let (mut s, reused) = session(connector, ch, peer.as_ref()).await?;
        s.set_read_timeout(Some(ch.read_timeout));
        s.set_write_timeout(Some(ch.write_timeout()));
        match send_and_read_head(&mut s, req.clone(), body.clone()).await {
            Ok(()) => return Ok(Exchange { session: s, peer }),
            Err(Failure::BeforeSend(e)) if reused && stale_retries > 0 && is_stale(&e) => {
                stale_retries -= 1;
                s.shutdown().await;
            }
            Err(Failure::BeforeSend(e)) => {
                s.shutdown().await;
                return Err(Failed::before(outcome_of(&e)));
            }
            Err(Failure::AfterSend(e)) => {
                s.shutdown().await;
                return Err(Failed {
                    outcome: outcome_of(&e),
                    reached_provider: true,
                });
            }
        }
    }
}

/// The ways an idle pooled connection the provider already closed fails.
/// A session to the provider: a free stream on a pooled HTTP/2 connection, a pooled
/// HTTP/1.1 connection, or a new connection. While the channel may speak h2, new
/// connections are opened one at a time (see [`tollgate_filters::channel::Dial`]), so
/// a burst shares them; a wait for that turn is bounded by the connect timeout.
async fn session(
    connector: &Connector,
    ch: &Channel,
    peer: &HttpPeer,
) -> Result<(HttpSession, bool), Failed> {
    let failed = |e: Box<pingora::Error>| Failed::before(outcome_of(&e));
    if !ch.dial.gated() {
        return connector.get_http_session(peer).await.map_err(failed);
    }
    let Ok(_turn) = tokio::time::timeout(ch.connect_timeout, ch.dial.gate.lock()).await else {
        return Err(Failed::before(AttemptOutcome::Timeout));
    };
    let (s, reused) = connector.get_http_session(peer).await.map_err(failed)?;
    if !reused && matches!(s, HttpSession::H1(_)) {
        tracing::info!(channel = %ch.name, "the provider chose HTTP/1.1; connections to it are no longer shared");
        ch.dial.learned_h1();
    }
    Ok((s, reused))
}

fn is_stale(e: &pingora::Error) -> bool {
    use pingora::ErrorType::*;
    matches!(e.etype(), ConnectionClosed | ReadError | WriteError)
}

async fn send_and_read_head(
    s: &mut HttpSession,
    req: RequestHeader,
    body: Bytes,
) -> Result<(), Failure> {
    // The head is one small write: if it fails on a reused connection, that connection was
    // closed while idle and nothing reached the provider.
    s.write_request_header(Box::new(req))
        .await
        .map_err(Failure::BeforeSend)?;
    if !body.is_empty() {
        s.write_request_body(body, true)
            .await
            .map_err(Failure::AfterSend)?;
    }
    s.finish_request_body().await.map_err(Failure::AfterSend)?;
    // Informational (1xx) heads come before the real one; reading the body before the real
    // head would panic inside pingora's client.
    loop {
        s.read_response_header().await.map_err(Failure::AfterSend)?;
        match s.response_header().map(|h| h.status.as_u16()) {
            Some(100..=199) => continue,
            _ => return Ok(()),
        }
    }
}
