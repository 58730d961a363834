//! The one place responses tollgate writes itself are rendered: its errors (OpenAI JSON
//! with the retry headers), its JSON pages, and the decoration every response carries:
//! `x-request-id`, the filters' headers, `X-Response-Time-Ms` and `Server-Timing`.

use bytes::Bytes;
use std::fmt::Write;

use http::{header, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::protocols::http::ServerSession;
use tollgate_filters::{Ctx, GatewayError};

use crate::observe::{ms, Timings};

/// Adds what every response carries: `x-request-id`, the filters' headers (`x-ratelimit-*`),
/// `X-Response-Time-Ms` (request head to this response head) and `Server-Timing`, all in
/// milliseconds as of the response head: `gateway` (time inside tollgate), `upstream` (time
/// waiting on providers), and on a provider's response `ttft` (to the provider's first
/// byte, its response head; the first token of a stream follows it).
pub fn decorate(resp: &mut ResponseHeader, ctx: &Ctx) {
    let t = Timings::of(ctx);
    let mut total = String::with_capacity(16);
    let _ = write!(total, "{:.3}", ms(t.total));
    let mut timing = String::with_capacity(80);
    let _ = write!(
        timing,
        "gateway;dur={:.3}, upstream;dur={:.3}",
        ms(t.gateway),
        ms(t.upstream)
    );
    if ctx.outcome.channel.is_some() {
        let _ = write!(timing, ", ttft;dur={:.3}", ms(t.total));
    }
    let headers = [
        ("x-request-id", ctx.request_id.as_str()),
        ("x-response-time-ms", total.as_str()),
        ("server-timing", timing.as_str()),
    ];
    set_all(
        resp,
        ctx.response_headers.iter().chain(headers.iter().copied()),
    );
}

/// Sets headers named by constants (lower-case; a filter's names are constants too). On the
/// heads tollgate builds (no case map) they go straight into the map, no name parsed or
/// copied: pingora gives no mutable access to the map (its case-preserving inserts re-parse
/// every name), so the head is taken apart and put back together, a move and not a copy.
fn set_all<'a>(resp: &mut ResponseHeader, headers: impl Iterator<Item = (&'static str, &'a str)>) {
    let values = headers.filter_map(|(k, v)| Some((k, HeaderValue::from_str(v).ok()?)));
    if resp.has_case() {
        for (k, v) in values {
            let _ = resp.insert_header(k, v);
        }
        return;
    }
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(resp, empty).into();
    for (k, v) in values {
        parts.headers.insert(HeaderName::from_static(k), v);
    }
    *resp = ResponseHeader::from(parts);
}

/// A complete JSON response head.
pub fn json_head(
    status: u16,
    len: usize,
    extra: &[(&'static str, String)],
    ctx: &Ctx,
) -> Option<ResponseHeader> {
    let mut resp =
        ResponseHeader::build_no_case(status, Some(6 + extra.len() + ctx.response_headers.len()))
            .ok()?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")
        .ok()?;
    resp.insert_header(header::CONTENT_LENGTH, len).ok()?;
    set_all(&mut resp, extra.iter().map(|(k, v)| (*k, v.as_str())));
    decorate(&mut resp, ctx);
    Some(resp)
}

/// Writes a complete JSON response and records its status. A write error means the client
/// is gone; there is nothing more to do.
pub async fn write_json(
    session: &mut ServerSession,
    ctx: &mut Ctx,
    status: u16,
    body: Bytes,
    extra: &[(&'static str, String)],
) {
    let Some(resp) = json_head(status, body.len(), extra, ctx) else {
        return;
    };
    ctx.outcome.status = status;
    if session.write_response_header(Box::new(resp)).await.is_err()
        || session.write_response_body(body, true).await.is_err()
    {
        ctx.outcome.client_gone = true;
    }
}

/// Writes one of tollgate's own JSON pages (`GET /v1/models`, `GET /api/pricing`) with a
/// strong `ETag` (a digest of the body), or `304 Not Modified` and no body when the client's
/// `If-None-Match` already names it (`*`, or any tag in its list, weak or strong).
pub async fn write_page(
    session: &mut ServerSession,
    ctx: &mut Ctx,
    body: Bytes,
    extra: &[(&'static str, String)],
) {
    let tag = etag(&body);
    let fresh = session
        .req_header()
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == "*" || t == tag);
    let mut extra = extra.to_vec();
    extra.push(("etag", tag));
    if !fresh {
        return write_json(session, ctx, 200, body, &extra).await;
    }
    let Some(mut resp) = ResponseHeader::build_no_case(304, Some(4 + extra.len())).ok() else {
        return;
    };
    set_all(&mut resp, extra.iter().map(|(k, v)| (*k, v.as_str())));
    decorate(&mut resp, ctx);
    ctx.outcome.status = 304;
    if session.write_response_header(Box::new(resp)).await.is_err()
        || session
            .write_response_body(Bytes::new(), true)
            .await
            .is_err()
    {
        ctx.outcome.client_gone = true;
    }
}

/// A strong entity tag for a body: the first 16 bytes of its SHA-256, quoted.
fn etag(body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    let mut tag = String::with_capacity(34);
    tag.push('"');
    for b in &digest[..16] {
        let _ = write!(tag, "{b:02x}");
    }
    tag.push('"');
    tag
}

/// Writes an answer from the response cache: a 200 with `content_type` (a JSON head as
/// [`json_head`] makes it; an event stream chunked on HTTP/1.1), decorated like every
/// response, and records its status and first byte.
pub async fn write_replay(
    session: &mut ServerSession,
    ctx: &mut Ctx,
    content_type: &'static str,
    body: Vec<Bytes>,
) {
    let build = || -> Option<ResponseHeader> {
        if content_type != "text/event-stream" {
            return json_head(200, body.iter().map(Bytes::len).sum(), &[], ctx);
        }
        let mut resp =
            ResponseHeader::build_no_case(200, Some(6 + ctx.response_headers.len())).ok()?;
        resp.insert_header(header::CONTENT_TYPE, content_type)
            .ok()?;
        resp.insert_header(header::CACHE_CONTROL, "no-cache").ok()?;
        if !session.is_http2() {
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")
                .ok()?;
        }
        decorate(&mut resp, ctx);
        Some(resp)
    };
    let Some(resp) = build() else {
        return;
    };
    ctx.outcome.status = 200;
    if session.write_response_header(Box::new(resp)).await.is_err() {
        ctx.outcome.client_gone = true;
        return;
    }
    for chunk in body {
        if ctx.outcome.first_byte.is_none() {
            ctx.outcome.first_byte = Some(ctx.started.elapsed());
        }
        if session.write_response_body(chunk, false).await.is_err() {
            ctx.outcome.client_gone = true;
            return;
        }
    }
    if session
        .write_response_body(Bytes::new(), true)
        .await
        .is_err()
    {
        ctx.outcome.client_gone = true;
    }
}

/// Renders a gateway error: OpenAI's JSON shape (Anthropic's or Google's to clients of
/// those APIs), `retry-after`/`retry-after-ms`, `x-should-retry`.
pub async fn write_error(session: &mut ServerSession, ctx: &mut Ctx, e: &GatewayError) {
    let body =
        ctx.endpoint
            .wire()
            .error_body(e.status(), &e.to_string(), e.kind(), e.param(), e.code());
    write_json(session, ctx, e.status(), body, &e.headers()).await;
}

/// The answer to a request whose head could not be parsed: the same shape as every other
/// error, with a request id of its own, and the connection closed.
pub async fn write_malformed(session: &mut ServerSession, request_id: String) {
    let mut ctx = Ctx::new(request_id);
    let e = GatewayError::invalid("The HTTP request could not be parsed.");
    session.set_keepalive(None);
    write_error(session, &mut ctx, &e).await;
}
