//! What crosses the gateway in each direction, header by header.
//!
//! - **To the provider**: the client's headers minus hop-by-hop ones, the headers the
//!   client's `Connection` names, gateway-owned ones (credentials, forwarding, ids), and
//!   any whose name has an underscore; at most [`MAX_FORWARDED_HEADER_BYTES`] of them.
//!   The channel's `Host` and key are set.
//! - **To the client**: the provider's response headers pass by allow-list only
//!   ([`FORWARD_RESPONSE`] and `openai-*`/`anthropic-*` except account details), and never
//!   one whose value carries the channel key.

use http::header::{self, HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use tollgate_filters::{Channel, GatewayError, Wire};

/// Bytes of client headers (names + values) forwarded at most; the rest are dropped.
pub const MAX_FORWARDED_HEADER_BYTES: usize = 16 * 1024;

/// Never copied from the client to the provider.
const DROP_REQUEST: &[&str] = &[
    "host",
    "authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    // A websocket subprotocol list may carry a key (`openai-insecure-api-key.…`).
    "sec-websocket-protocol",
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
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "forwarded",
    "via",
    "cookie",
    // The channel's key decides the provider organization and project, not the caller.
    "openai-organization",
    "openai-project",
];

/// Provider response headers passed on to the client.
const FORWARD_RESPONSE: &[&str] = &[
    "content-type",
    "cache-control",
    "content-language",
    "date",
    "etag",
    "last-modified",
    "vary",
    "x-upstream-request-id",
];

/// Provider-specific families passed on, except account details.
const FORWARD_PREFIXES: &[&str] = &["openai-", "anthropic-"];
const NEVER_FORWARD: &[&str] = &["openai-organization", "openai-project"];

/// Anthropic's request headers: sent only to Anthropic channels.
const ANTHROPIC_VERSION: &str = "anthropic-version";
const ANTHROPIC_BETA: &str = "anthropic-beta";

/// The request head sent to the provider for one attempt, to `upath` (path and query) on
/// the channel, for a client speaking `client_wire`.
pub fn upstream_request(
    client: &RequestHeader,
    ch: &Channel,
    client_wire: Wire,
    upath: &str,
    body_len: usize,
) -> Result<RequestHeader, GatewayError> {
    // `anthropic-version` and `-beta` go to Anthropic only, and only from Anthropic clients
    // (an OpenAI client's request is translated into the channel's default version).
    let anthropic_headers = ch.wire == Wire::Anthropic && client_wire == Wire::Anthropic;
    // Built as plain parts (pingora gives no mutable access to a head's map, and its
    // case-preserving inserts re-parse and copy each name), then made a head without a
    // case map: providers take any header case.
    let mut parts = http::Request::new(()).into_parts().0;
    parts.method = client.method.clone();
    let h = &mut parts.headers;
    h.reserve(client.headers.len() + 3);
    let named_by_connection: Vec<&str> = client
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut budget = MAX_FORWARDED_HEADER_BYTES;
    for (name, value) in client.headers.iter() {
        let n = name.as_str();
        if DROP_REQUEST.contains(&n)
            || n.contains('_')
            || (!anthropic_headers && (n == ANTHROPIC_VERSION || n == ANTHROPIC_BETA))
            || named_by_connection
                .iter()
                .any(|c| c.eq_ignore_ascii_case(n))
        {
            continue;
        }
        let size = n.len() + value.len();
        if size > budget {
            continue;
        }
        budget -= size;
        h.append(name.clone(), value.clone());
    }
    h.insert(header::HOST, ch.host_header.clone());
    if let Some((name, value)) = &ch.auth_header {
        h.insert(name.clone(), value.clone());
    }
    if let Some(version) = &ch.anthropic_version {
        if !h.contains_key(ANTHROPIC_VERSION) {
            h.insert(ANTHROPIC_VERSION, version.clone());
        }
    }
    if body_len > 0 || client.method == http::Method::POST {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
    }
    let mut req = RequestHeader::from(parts);
    req.set_raw_path(upath.as_bytes())
        .map_err(|_| GatewayError::Internal)?;
    Ok(req)
}

/// Whether a provider response header may reach the client.
fn forwarded(name: &str) -> bool {
    FORWARD_RESPONSE.contains(&name)
        || (FORWARD_PREFIXES.iter().any(|p| name.starts_with(p)) && !NEVER_FORWARD.contains(&name))
}

/// The client-facing head for a provider's response: allowed headers only, none carrying
/// the channel key; the provider's id as `x-upstream-request-id`; framing for the client
/// (`rewritten`: the body is translated on its way, so its length is not the provider's).
pub fn client_response(
    up: &ResponseHeader,
    ch: &Channel,
    h2: bool,
    rewritten: bool,
) -> pingora::Result<ResponseHeader> {
    // No case map (names go out lower-case, well-known ones titled): names are moved
    // across as they are, never re-parsed.
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = up.status;
    let h = &mut parts.headers;
    h.reserve(up.headers.len() + 6);
    for (name, value) in up.headers.iter() {
        if !forwarded(name.as_str()) || carries_secret(value.as_bytes(), &ch.secret) {
            continue;
        }
        h.append(name.clone(), value.clone());
    }
    if let Some(id) = up.headers.get("x-request-id") {
        if !carries_secret(id.as_bytes(), &ch.secret) {
            h.insert(HeaderName::from_static("x-upstream-request-id"), id.clone());
        }
    }
    let event_stream = tollgate_filters::usage::is_event_stream(up);
    match up.headers.get(header::CONTENT_LENGTH) {
        // A fixed-length body is passed on with its length; anything else is chunked on h1.
        Some(len) if !event_stream && !rewritten => {
            h.insert(header::CONTENT_LENGTH, len.clone());
        }
        _ if !h2 => {
            h.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        _ => {}
    }
    Ok(ResponseHeader::from(parts))
}

/// Whether bytes contain the channel key (or its last 8 characters, for masked echoes).
pub fn carries_secret(bytes: &[u8], secret: &str) -> bool {
    if secret.len() < 8 {
        return !secret.is_empty() && memchr::memmem::find(bytes, secret.as_bytes()).is_some();
    }
    let tail = &secret.as_bytes()[secret.len() - 8..];
    memchr::memmem::find(bytes, tail).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(kind: &str) -> tollgate_filters::Channels {
        let cfg = serde_json::from_value(serde_json::json!({
            "name": "c", "kind": kind, "base_url": "http://127.0.0.1:9", "api_key": "sk-up-0123456789",
        }))
        .unwrap();
        tollgate_filters::channel::build_channels(&[cfg], Default::default()).unwrap()
    }

    #[test]
    fn no_client_credential_reaches_any_kind_of_provider() {
        let mut client = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        for (name, value) in [
            ("authorization", "Bearer sk-tg-a"),
            ("x-api-key", "sk-tg-b"),
            ("x-goog-api-key", "sk-tg-c"),
            ("api-key", "sk-tg-d"),
            ("sec-websocket-protocol", "openai-insecure-api-key.sk-tg-e"),
            ("anthropic-version", "2023-01-01"),
            ("anthropic-beta", "tools-1"),
        ] {
            client.insert_header(name, value).unwrap();
        }
        for (kind, wire) in [
            ("openai", Wire::OpenAi),
            ("anthropic", Wire::Anthropic),
            ("gemini", Wire::OpenAi),
            ("anthropic", Wire::OpenAi),
        ] {
            let chans = channel(kind);
            let req = upstream_request(&client, &chans[0], wire, "/x", 0).unwrap();
            let all: Vec<String> = req
                .headers
                .iter()
                .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
                .collect();
            assert!(!all.iter().any(|h| h.contains("sk-tg-")), "{kind}: {all:?}");
            let version = req
                .headers
                .get("anthropic-version")
                .map(|v| v.to_str().unwrap());
            match (kind, wire) {
                // An Anthropic client's own version and betas reach Anthropic.
                ("anthropic", Wire::Anthropic) => {
                    assert_eq!(version, Some("2023-01-01"));
                    assert_eq!(req.headers["anthropic-beta"], "tools-1");
                    assert_eq!(req.headers["x-api-key"], "sk-up-0123456789");
                }
                // Translated: the channel's default version, no client betas.
                ("anthropic", _) => {
                    assert_eq!(version, Some("2023-06-01"));
                    assert!(req.headers.get("anthropic-beta").is_none());
                }
                _ => assert_eq!(version, None, "{kind}"),
            }
        }
    }

    #[test]
    fn response_headers_pass_by_allow_list_and_never_with_the_key() {
        assert!(forwarded("content-type"));
        assert!(forwarded("openai-processing-ms"));
        assert!(!forwarded("openai-organization"));
        assert!(!forwarded("set-cookie"));
        assert!(!forwarded("x-debug-upstream-auth"));
        assert!(carries_secret(
            b"Bearer sk-live-abcdefgh12345678",
            "sk-live-abcdefgh12345678"
        ));
        assert!(carries_secret(
            b"sk-...gh12345678",
            "sk-live-abcdefgh12345678"
        ));
        assert!(!carries_secret(b"nothing here", "sk-live-abcdefgh12345678"));
    }
}
