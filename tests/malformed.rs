//! A corpus of malformed requests replayed byte for byte against the real binary: HTTP-level
//! garbage (framing, header syntax, sizes, request-target forms) and JSON-level garbage
//! (nesting, sizes, duplicate keys, a wrong type for every field tollgate reads, absurd
//! numbers, encodings). Every case must get a clean answer — OpenAI's error shape on a 4xx,
//! or a closed connection for HTTP-level garbage; never a 5xx, a hang, an empty or
//! non-OpenAI body — and after each batch a normal request is still served (the process is
//! alive). Loopback only; every read is bounded.

mod support;

use std::io::Write as _;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{channel, Gateway, MockServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROVIDER_KEY: &str = "sk-provider-SECRET-0123456789abcdef";
/// Whole-case bound: the gateway's own deadlines (below) are shorter.
const CASE_LIMIT: Duration = Duration::from_secs(8);
/// `server.max_body_bytes` of the test gateway (tests/support).
const MAX_BODY: usize = 2 * 1024 * 1024;

/// What a case must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Exactly this status, with OpenAI's error shape.
    Status(u16),
    /// Any 4xx in OpenAI's error shape, or the connection closed without an answer.
    Refused,
    /// Served (200 with a JSON body) or refused with any 4xx in OpenAI's error shape: the
    /// gateway does not judge the field, the provider may.
    Answered,
    /// `n` answers on the one connection, all 200.
    Pipelined(usize),
    /// One answer (200 or an OpenAI 4xx), then the connection closes: whatever followed the
    /// first request is never answered.
    OneThenClosed,
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
}

/// One answer read off a raw connection.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more into `buf`: `Ok(0)` at EOF or on a reset, `Err` past `deadline`.
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> Result<usize, String> {
    let mut tmp = [0u8; 16 * 1024];
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, s.read(&mut tmp)).await {
        Ok(Ok(n)) => {
            buf.extend_from_slice(&tmp[..n]);
            Ok(n)
        }
        Ok(Err(_)) => Ok(0),
        Err(_) => Err("timed out".to_string()),
    }
}

/// Reads the next answer: `Ok(None)` when the connection closed (EOF or reset) before any
/// byte of one; `Err` on a timeout or a malformed answer.
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<Option<Resp>, String> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if fill(s, buf, deadline).await? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(format!(
                "closed inside a response head: {:?}",
                String::from_utf8_lossy(buf)
            ));
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    buf.drain(..head_end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(len) = resp.header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad content-length")?;
        while buf.len() < len {
            if fill(s, buf, deadline).await? == 0 {
                return Err("closed inside a response body".into());
            }
        }
        resp.body = buf.drain(..len).collect();
    } else if resp.header("transfer-encoding").is_some() {
        // Only a successful stream would be chunked; none is asked for here.
        return Err(format!("unexpected chunked answer {:?}", resp.headers));
    } else if status != 100 {
        while fill(s, buf, deadline).await? > 0 {}
        resp.body = std::mem::take(buf);
    }
    Ok(Some(resp))
}

/// Checks OpenAI's error shape: `{"error": {"message": str, "type": str, "param", "code"}}`.
fn openai_error(r: &Resp) -> Result<(), String> {
    let v: Value = serde_json::from_slice(&r.body).map_err(|e| {
        format!(
            "{} body is not JSON ({e}): {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        )
    })?;
    let err = v["error"]
        .as_object()
        .ok_or_else(|| format!("{} without an error object: {v}", r.status))?;
    for f in ["message", "type", "param", "code"] {
        if !err.contains_key(f) {
            return Err(format!("{} error without `{f}`: {v}", r.status));
        }
    }
    if !err["message"].is_string() || !err["type"].is_string() {
        return Err(format!("{} error fields of the wrong type: {v}", r.status));
    }
    if !r
        .header("x-request-id")
        .is_some_and(|id| id.starts_with("req_"))
    {
        return Err(format!(
            "{} without x-request-id: {:?}",
            r.status, r.headers
        ));
    }
    Ok(())
}

/// Replays one case on its own connection and judges the answer.
async fn run_case(port: u16, case: &Case) -> Result<String, String> {
    let deadline = Instant::now() + CASE_LIMIT;
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.set_nodelay(true).ok();
    // The gateway may answer and close before the whole request is written (a 400 on the
    // head, a 413 on Content-Length): a failed write is not a failure of the case.
    let _ = tokio::time::timeout(CASE_LIMIT, s.write_all(&case.bytes)).await;
    let mut buf = Vec::new();
    let mut first = read_response(&mut s, &mut buf, deadline).await?;
    // An interim 100 Continue is not the answer.
    if first.as_ref().is_some_and(|r| r.status == 100) {
        first = read_response(&mut s, &mut buf, deadline).await?;
    }
    match (case.expect, first) {
        (Expect::Refused, None) => Ok("closed".into()),
        (_, None) => Err("closed without an answer".into()),
        (Expect::Status(want), Some(r)) => {
            if r.status != want {
                return Err(format!(
                    "want {want}, got {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            openai_error(&r).map(|()| r.status.to_string())
        }
        (Expect::Refused, Some(r)) => {
            if !(400..500).contains(&r.status) {
                return Err(format!(
                    "want a 4xx or a close, got {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            openai_error(&r).map(|()| r.status.to_string())
        }
        (Expect::Answered, Some(r)) => match r.status {
            200 => serde_json::from_slice::<Value>(&r.body)
                .map(|_| "200".into())
                .map_err(|e| format!("200 without JSON: {e}")),
            400..=499 => openai_error(&r).map(|()| r.status.to_string()),
            other => Err(format!(
                "want 200 or a 4xx, got {other}: {}",
                String::from_utf8_lossy(&r.body)
            )),
        },
        (Expect::OneThenClosed, Some(r)) => {
            if r.status != 200 {
                openai_error(&r)?;
            }
            match read_response(&mut s, &mut buf, deadline).await? {
                None => Ok(format!("{} then closed", r.status)),
                Some(second) => Err(format!(
                    "a second answer ({}) to bytes after the first request",
                    second.status
                )),
            }
        }
        (Expect::Pipelined(n), Some(r)) => {
            let mut statuses = vec![r.status];
            for _ in 1..n {
                match read_response(&mut s, &mut buf, deadline).await? {
                    Some(r) => statuses.push(r.status),
                    None => return Err(format!("closed after {statuses:?}")),
                }
            }
            if statuses.iter().all(|&st| st == 200) {
                Ok(format!("{statuses:?}"))
            } else {
                Err(format!("want {n} × 200, got {statuses:?}"))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------

fn chat_body() -> String {
    json!({"model": "m1", "messages": [{"role": "user", "content": "hello"}]}).to_string()
}

/// A well-formed POST to `path` with `body`; `extra` header lines (each ending `\r\n`) go
/// after the usual ones, which `extra` cannot replace.
fn post_to(key: &str, path: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn post_chat(key: &str, body: &[u8]) -> Vec<u8> {
    post_to(key, "/v1/chat/completions", body, "")
}

/// A POST whose head is written by hand (everything after the request line up to the blank
/// line), followed by `body` as given.
fn raw_post(key: &str, head_lines: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n{head_lines}\r\n"
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn gzip_of(data: &[u8]) -> Vec<u8> {
    // A stored (uncompressed) deflate block inside a gzip member: a real gzip body without a
    // compression library.
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let len = data.len() as u16;
    out.push(1);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&[0; 8]); // CRC and size left wrong: nobody should get this far
    out
}

fn http_cases(key: &str) -> Vec<Case> {
    let body = chat_body();
    let b = body.as_bytes();
    let n = b.len();
    let chunked = format!("{n:x}\r\n{body}\r\n0\r\n\r\n");
    let smuggled = format!(
        "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .into_bytes();
    let mut v: Vec<(&str, Vec<u8>, Expect)> = vec![
        // Framing.
        // Chunked framing wins (RFC 9112 §6.3) and the connection then closes: the request
        // smuggled after the chunked body is never read.
        (
            "content-length with transfer-encoding",
            [
                raw_post(key, &format!("Content-Length: {n}\r\nTransfer-Encoding: chunked\r\n"), chunked.as_bytes()),
                smuggled.clone(),
            ]
            .concat(),
            Expect::OneThenClosed,
        ),
        (
            "transfer-encoding before content-length",
            [
                raw_post(key, "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", chunked.as_bytes()),
                smuggled.clone(),
            ]
            .concat(),
            Expect::OneThenClosed,
        ),
        (
            "duplicate differing content-length",
            raw_post(key, &format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n + 3), format!("{body}   ").as_bytes()),
            Expect::Refused,
        ),
        (
            "content-length list of differing values",
            raw_post(key, &format!("Content-Length: {n}, {}\r\n", n + 1), b),
            Expect::Refused,
        ),
        ("negative content-length", raw_post(key, "Content-Length: -1\r\n", b), Expect::Refused),
        ("non-numeric content-length", raw_post(key, "Content-Length: abc\r\n", b), Expect::Refused),
        (
            "content-length with a plus sign",
            raw_post(key, &format!("Content-Length: +{n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "content-length past u64",
            raw_post(key, "Content-Length: 99999999999999999999999\r\n", b),
            Expect::Refused,
        ),
        (
            "content-length larger than max_body_bytes",
            raw_post(key, &format!("Content-Length: {}\r\n", MAX_BODY + 1), b),
            Expect::Status(413),
        ),
        (
            "content-length longer than the body sent",
            raw_post(key, &format!("Content-Length: {}\r\n", n + 100), b),
            Expect::Refused,
        ),
        (
            "non-hex chunk size",
            raw_post(key, "Transfer-Encoding: chunked\r\n", format!("zz\r\n{body}\r\n0\r\n\r\n").as_bytes()),
            Expect::Refused,
        ),
        (
            "chunk size past u64",
            raw_post(key, "Transfer-Encoding: chunked\r\n", b"fffffffffffffffffffff\r\nxx\r\n0\r\n\r\n"),
            Expect::Refused,
        ),
        (
            "negative chunk size",
            raw_post(key, "Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"),
            Expect::Refused,
        ),
        (
            "chunk data longer than its size",
            raw_post(key, "Transfer-Encoding: chunked\r\n", format!("2\r\n{body}\r\n0\r\n\r\n").as_bytes()),
            Expect::Refused,
        ),
        (
            "chunk size larger than max_body_bytes",
            raw_post(key, "Transfer-Encoding: chunked\r\n", format!("{:x}\r\n{body}", MAX_BODY + 1).as_bytes()),
            Expect::Refused,
        ),
        (
            "chunk size with garbage extension",
            raw_post(key, "Transfer-Encoding: chunked\r\n", format!("{n:x};\x01\x02=\"\r\n{body}\r\n0\r\n\r\n").as_bytes()),
            Expect::Answered,
        ),
        (
            "transfer-encoding gzip, chunked",
            raw_post(key, "Transfer-Encoding: gzip, chunked\r\n", chunked.as_bytes()),
            Expect::Refused,
        ),
        (
            "transfer-encoding chunked, identity",
            raw_post(key, "Transfer-Encoding: chunked, identity\r\n", chunked.as_bytes()),
            Expect::Refused,
        ),
        (
            "transfer-encoding xchunked",
            raw_post(key, "Transfer-Encoding: xchunked\r\n", chunked.as_bytes()),
            Expect::Refused,
        ),
        (
            "two transfer-encoding headers",
            raw_post(key, "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", chunked.as_bytes()),
            Expect::Refused,
        ),
        // Header syntax.
        (
            "obs-fold continuation line",
            raw_post(key, &format!("X-Folded: a\r\n  b\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "obs-fold on Authorization",
            format!("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer\r\n {key}\r\nContent-Length: {n}\r\n\r\n{body}").into_bytes(),
            Expect::Refused,
        ),
        (
            "NUL in a header value",
            raw_post(key, &format!("X-Nul: a\0b\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "bare CR in a header value",
            raw_post(key, &format!("X-Cr: a\rb\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "bare LF splitting a header value",
            raw_post(key, &format!("X-Lf: a\nInjected: b\r\nContent-Length: {n}\r\n"), b),
            Expect::Answered,
        ),
        (
            "CR LF inside Content-Type",
            raw_post(key, &format!("X-Crlf: a\r\n\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "a space before the colon",
            raw_post(key, &format!("X-Space : a\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "a header line without a colon",
            raw_post(key, &format!("NoColonHere\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "an empty header name",
            raw_post(key, &format!(": empty\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "a non-ASCII header name",
            raw_post(key, &format!("X-\u{e9}t\u{e9}: a\r\nContent-Length: {n}\r\n"), b),
            Expect::Refused,
        ),
        (
            "an underscore in a header name",
            raw_post(key, &format!("Content_Length: 5\r\nContent-Length: {n}\r\n"), b),
            Expect::Status(400),
        ),
        (
            "a 100 KB header value",
            raw_post(key, &format!("X-Big: {}\r\nContent-Length: {n}\r\n", "a".repeat(100 * 1024)), b),
            Expect::Refused,
        ),
        (
            "500 headers",
            raw_post(
                key,
                &format!("{}Content-Length: {n}\r\n", (0..500).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()),
                b,
            ),
            Expect::Refused,
        ),
        (
            "a 64 KB request line",
            format!("POST /v1/{} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Length: {n}\r\n\r\n{body}", "a".repeat(64 * 1024)).into_bytes(),
            Expect::Refused,
        ),
        (
            "a 10 KB bearer token",
            post_chat(&"k".repeat(10 * 1024), b),
            Expect::Status(401),
        ),
        (
            "two Host headers",
            raw_post(key, &format!("Host: evil.example\r\nContent-Length: {n}\r\n"), b),
            Expect::Answered,
        ),
        (
            "a Host with control bytes",
            format!("POST /v1/chat/completions HTTP/1.1\r\nHost: a\x01b\r\nAuthorization: Bearer {key}\r\nContent-Length: {n}\r\n\r\n{body}").into_bytes(),
            Expect::Refused,
        ),
        // Request line and target.
        (
            "absolute-form URI naming another host",
            format!("POST http://169.254.169.254/v1/chat/completions HTTP/1.1\r\nHost: 169.254.169.254\r\nAuthorization: Bearer {key}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{body}").into_bytes(),
            Expect::Answered,
        ),
        (
            "CONNECT to another host",
            b"CONNECT 169.254.169.254:80 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
        (
            "asterisk-form OPTIONS",
            b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
        (
            "HTTP/1.0 without Host",
            format!("POST /v1/chat/completions HTTP/1.0\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n{body}").into_bytes(),
            Expect::Answered,
        ),
        (
            "HTTP/1.1 without Host",
            format!("POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {key}\r\nContent-Length: {n}\r\n\r\n{body}").into_bytes(),
            Expect::Status(400),
        ),
        ("HTTP/0.9 request line", b"GET /v1/models\r\n\r\n".to_vec(), Expect::Refused),
        (
            "unknown HTTP version",
            b"GET /v1/models HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
        (
            "HTTP/2 preface on the HTTP/1 port",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            Expect::Refused,
        ),
        (
            "a TLS ClientHello on the plain port",
            vec![0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0, 0],
            Expect::Refused,
        ),
        ("binary garbage", (0..2048u32).map(|i| (i * 7919 % 251) as u8).collect(), Expect::Refused),
        ("only blank lines", b"\r\n\r\n\r\n\r\n".to_vec(), Expect::Refused),
        (
            "a lower-case method",
            format!("post /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Length: {n}\r\n\r\n{body}").into_bytes(),
            Expect::Refused,
        ),
        (
            "an unknown method",
            format!("FROB /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").into_bytes(),
            Expect::Refused,
        ),
        (
            "a path without a leading slash",
            format!("GET v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n").into_bytes(),
            Expect::Refused,
        ),
        (
            "an encoded NUL in the path",
            format!("GET /v1/models/%00 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").into_bytes(),
            Expect::Refused,
        ),
        (
            "raw UTF-8 in the path",
            format!("GET /v1/models/\u{e9}\u{1F600} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n").into_bytes(),
            Expect::Refused,
        ),
        (
            "a GET with a body",
            format!("GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n{body}").into_bytes(),
            Expect::Status(400),
        ),
        // Expect and pipelining.
        (
            "Expect: 100-continue with no body",
            raw_post(key, "Expect: 100-continue\r\nContent-Length: 0\r\nConnection: close\r\n", b""),
            Expect::Status(400),
        ),
        (
            "Expect: 100-continue and no Content-Length",
            raw_post(key, "Expect: 100-continue\r\nConnection: close\r\n", b""),
            Expect::Status(400),
        ),
        (
            "Expect: 100-continue with the body sent at once",
            raw_post(key, &format!("Expect: 100-continue\r\nContent-Length: {n}\r\nConnection: close\r\n"), b),
            Expect::Answered,
        ),
        (
            "an unknown expectation",
            raw_post(key, &format!("Expect: teapot\r\nContent-Length: {n}\r\nConnection: close\r\n"), b),
            Expect::Answered,
        ),
        (
            "a pipelined second request",
            [
                raw_post(key, &format!("Content-Length: {n}\r\n"), b),
                raw_post(key, &format!("Content-Length: {n}\r\n"), b),
            ]
            .concat(),
            Expect::Pipelined(2),
        ),
        (
            "a pipelined request after a refused one",
            [
                raw_post(key, "Content-Length: 2\r\n", b"{]"),
                raw_post(key, &format!("Content-Length: {n}\r\n"), b),
            ]
            .concat(),
            Expect::Status(400),
        ),
    ];
    v.drain(..)
        .map(|(name, bytes, expect)| Case {
            name: format!("http: {name}"),
            bytes,
            expect,
        })
        .collect()
}

fn json_cases(key: &str) -> Vec<Case> {
    let chat = |extra: &str| -> Vec<u8> {
        let body =
            format!(r#"{{"model":"m1","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#);
        post_chat(key, body.as_bytes())
    };
    let deep_arrays = format!(
        r#"{{"model":"m1","messages":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let deep_objects = format!(
        r#"{{"model":"m1","messages":[],"metadata":{}1{}}}"#,
        r#"{"a":"#.repeat(100_000),
        "}".repeat(100_000)
    );
    let ten_mb = format!(
        r#"{{"model":"m1","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(10 * 1024 * 1024)
    );
    let mut non_utf8 = br#"{"model":"m1","messages":[{"role":"user","content":""#.to_vec();
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28]);
    non_utf8.extend_from_slice(br#""}]}"#);
    let mut non_utf8_model = br#"{"model":"m"#.to_vec();
    non_utf8_model.extend_from_slice(&[0xc0, 0xaf]);
    non_utf8_model.extend_from_slice(br#"","messages":[]}"#);
    let mut bom = vec![0xef, 0xbb, 0xbf];
    bom.extend_from_slice(chat_body().as_bytes());
    let utf16: Vec<u8> = chat_body()
        .encode_utf16()
        .flat_map(|u| u.to_le_bytes())
        .collect();
    let embed = |input: &str| -> Vec<u8> {
        post_to(
            key,
            "/v1/embeddings",
            format!(r#"{{"model":"m1","input":{input}}}"#).as_bytes(),
            "",
        )
    };
    let mut v: Vec<(&str, Vec<u8>, Expect)> = vec![
        // Structure and size.
        (
            "100k-deep nested arrays",
            post_chat(key, deep_arrays.as_bytes()),
            Expect::Status(400),
        ),
        (
            "100k-deep nested objects",
            post_chat(key, deep_objects.as_bytes()),
            Expect::Status(400),
        ),
        (
            "a 10 MB string",
            post_chat(key, ten_mb.as_bytes()),
            Expect::Status(413),
        ),
        (
            "a 10 MB string, chunked",
            raw_post(
                key,
                "Transfer-Encoding: chunked\r\nConnection: close\r\n",
                format!("{:x}\r\n{ten_mb}\r\n0\r\n\r\n", ten_mb.len()).as_bytes(),
            ),
            Expect::Status(413),
        ),
        (
            "duplicate model keys",
            post_chat(key, br#"{"model":"m1","model":"m2","messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "duplicate stream keys",
            chat(r#","stream":false,"stream":true"#),
            Expect::Status(400),
        ),
        (
            "duplicate keys spelled with an escape",
            post_chat(key, br#"{"model":"m1","mod\u0065l":"m2","messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "duplicate max_tokens",
            chat(r#","max_tokens":1,"max_tokens":1000000000"#),
            Expect::Status(400),
        ),
        ("an empty body", post_chat(key, b""), Expect::Status(400)),
        (
            "whitespace only",
            post_chat(key, b"  \r\n\t "),
            Expect::Status(400),
        ),
        ("null", post_chat(key, b"null"), Expect::Status(400)),
        (
            "a JSON array",
            post_chat(key, br#"[{"model":"m1"}]"#),
            Expect::Status(400),
        ),
        (
            "a JSON string",
            post_chat(key, br#""m1""#),
            Expect::Status(400),
        ),
        (
            "an empty object",
            post_chat(key, b"{}"),
            Expect::Status(400),
        ),
        (
            "truncated JSON",
            post_chat(key, br#"{"model":"m1","messages":[{"role":"#),
            Expect::Status(400),
        ),
        (
            "trailing garbage",
            post_chat(key, format!("{} x", chat_body()).as_bytes()),
            Expect::Status(400),
        ),
        (
            "two objects back to back",
            post_chat(key, format!("{0}{0}", chat_body()).as_bytes()),
            Expect::Status(400),
        ),
        (
            "a trailing comma",
            post_chat(key, br#"{"model":"m1","messages":[],}"#),
            Expect::Status(400),
        ),
        (
            "single quotes",
            post_chat(key, br#"{'model':'m1','messages':[]}"#),
            Expect::Status(400),
        ),
        (
            "comments",
            post_chat(key, br#"{"model":"m1", /* c */ "messages":[]}"#),
            Expect::Status(400),
        ),
        ("NaN", chat(r#","temperature":NaN"#), Expect::Status(400)),
        (
            "Infinity",
            chat(r#","temperature":Infinity"#),
            Expect::Status(400),
        ),
        (
            "a raw control character in a string",
            post_chat(
                key,
                b"{\"model\":\"m1\",\"messages\":[{\"role\":\"user\",\"content\":\"a\x01b\"}]}",
            ),
            Expect::Status(400),
        ),
        // Encodings and content types.
        (
            "invalid UTF-8 in a message",
            post_chat(key, &non_utf8),
            Expect::Status(400),
        ),
        (
            "overlong UTF-8 in the model",
            post_chat(key, &non_utf8_model),
            Expect::Status(400),
        ),
        (
            "a lone surrogate escape in the model",
            post_chat(key, br#"{"model":"\ud800","messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "a UTF-8 byte-order mark",
            post_chat(key, &bom),
            Expect::Status(400),
        ),
        ("UTF-16 JSON", post_chat(key, &utf16), Expect::Status(400)),
        (
            "a gzip body without Content-Encoding",
            post_chat(key, &gzip_of(chat_body().as_bytes())),
            Expect::Status(400),
        ),
        (
            "a gzip body with Content-Encoding: gzip",
            post_to(
                key,
                "/v1/chat/completions",
                &gzip_of(chat_body().as_bytes()),
                "Content-Encoding: gzip\r\n",
            ),
            Expect::Refused,
        ),
        (
            "a form-encoded body",
            post_to(
                key,
                "/v1/chat/completions",
                b"model=m1&messages=hi",
                "Content-Type: application/x-www-form-urlencoded\r\n",
            ),
            Expect::Status(400),
        ),
        (
            "JSON under a text/plain Content-Type",
            {
                let body = chat_body();
                format!("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
            },
            Expect::Answered,
        ),
        (
            "multipart to the chat route",
            {
                let body =
                    "--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm1\r\n--b--\r\n";
                format!("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes()
            },
            Expect::Status(400),
        ),
        // Wrong types, one per field tollgate reads.
        (
            "model: number",
            post_chat(key, br#"{"model":5,"messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "model: array",
            post_chat(key, br#"{"model":["m1"],"messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "model: object",
            post_chat(key, br#"{"model":{"id":"m1"},"messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "model: true",
            post_chat(key, br#"{"model":true,"messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "model: null",
            post_chat(key, br#"{"model":null,"messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "model: missing",
            post_chat(key, br#"{"messages":[]}"#),
            Expect::Status(400),
        ),
        (
            "model: 300 bytes",
            post_chat(
                key,
                format!(r#"{{"model":"{}","messages":[]}}"#, "m".repeat(300)).as_bytes(),
            ),
            Expect::Status(400),
        ),
        (
            "model: unknown",
            post_chat(key, br#"{"model":"nope","messages":[]}"#),
            Expect::Status(404),
        ),
        (
            "model: with a NUL",
            post_chat(key, br#"{"model":"m1\u0000","messages":[]}"#),
            Expect::Status(404),
        ),
        (
            "stream: string",
            chat(r#","stream":"yes""#),
            Expect::Status(400),
        ),
        (
            "stream: number",
            chat(r#","stream":1"#),
            Expect::Status(400),
        ),
        (
            "stream: object",
            chat(r#","stream":{}"#),
            Expect::Status(400),
        ),
        (
            "stream_options: string",
            chat(r#","stream":true,"stream_options":"x""#),
            Expect::Status(400),
        ),
        (
            "stream_options: array",
            chat(r#","stream":true,"stream_options":[]"#),
            Expect::Status(400),
        ),
        (
            "stream_options.include_usage: string",
            chat(r#","stream":true,"stream_options":{"include_usage":"yes"}"#),
            Expect::Status(400),
        ),
        (
            "max_tokens: negative",
            chat(r#","max_tokens":-1"#),
            Expect::Status(400),
        ),
        (
            "max_tokens: fraction",
            chat(r#","max_tokens":1.5"#),
            Expect::Status(400),
        ),
        (
            "max_tokens: string",
            chat(r#","max_tokens":"10""#),
            Expect::Status(400),
        ),
        (
            "max_tokens: exponent",
            chat(r#","max_tokens":1e3"#),
            Expect::Status(400),
        ),
        (
            "max_completion_tokens: string",
            chat(r#","max_completion_tokens":"x""#),
            Expect::Status(400),
        ),
        (
            "max_completion_tokens: bool",
            chat(r#","max_completion_tokens":true"#),
            Expect::Status(400),
        ),
        (
            "max_output_tokens: array",
            chat(r#","max_output_tokens":[]"#),
            Expect::Status(400),
        ),
        (
            "max_output_tokens: object",
            chat(r#","max_output_tokens":{}"#),
            Expect::Status(400),
        ),
        ("n: string", chat(r#","n":"2""#), Expect::Status(400)),
        ("n: negative", chat(r#","n":-1"#), Expect::Status(400)),
        ("n: fraction", chat(r#","n":1.5"#), Expect::Status(400)),
        ("user: number", chat(r#","user":5"#), Expect::Status(400)),
        (
            "user: object",
            chat(r#","user":{"id":"u"}"#),
            Expect::Status(400),
        ),
        (
            "user: 300 bytes",
            chat(&format!(r#","user":"{}""#, "u".repeat(300))),
            Expect::Status(400),
        ),
        (
            "messages: string",
            post_chat(key, br#"{"model":"m1","messages":"hi"}"#),
            Expect::Status(400),
        ),
        (
            "messages: number",
            post_chat(key, br#"{"model":"m1","messages":5}"#),
            Expect::Status(400),
        ),
        (
            "messages: object",
            post_chat(key, br#"{"model":"m1","messages":{"role":"user"}}"#),
            Expect::Status(400),
        ),
        ("input: number", embed("5"), Expect::Status(400)),
        (
            "input: object",
            embed(r#"{"text":"a"}"#),
            Expect::Status(400),
        ),
        ("input: bool", embed("true"), Expect::Status(400)),
        // Absurd numbers.
        ("n: a million", chat(r#","n":1000000"#), Expect::Status(400)),
        (
            "n: past u64",
            chat(r#","n":18446744073709551616"#),
            Expect::Status(400),
        ),
        ("n: 1e308", chat(r#","n":1e308"#), Expect::Status(400)),
        (
            "max_tokens: 2^21",
            chat(r#","max_tokens":2097152"#),
            Expect::Status(400),
        ),
        (
            "max_tokens: u64::MAX",
            chat(r#","max_tokens":18446744073709551615"#),
            Expect::Status(400),
        ),
        (
            "max_tokens: 10^30",
            chat(r#","max_tokens":1000000000000000000000000000000"#),
            Expect::Status(400),
        ),
        (
            "max_completion_tokens: u64::MAX",
            chat(r#","max_completion_tokens":18446744073709551615"#),
            Expect::Status(400),
        ),
        (
            "temperature: 1e308",
            chat(r#","temperature":1e308"#),
            Expect::Answered,
        ),
        (
            "temperature: 1e400",
            chat(r#","temperature":1e400"#),
            Expect::Answered,
        ),
        (
            "temperature: -1e308",
            chat(r#","temperature":-1e308"#),
            Expect::Answered,
        ),
        (
            "temperature: a 10 KB number",
            chat(&format!(r#","temperature":1{}"#, "0".repeat(10_000))),
            Expect::Answered,
        ),
        ("a leading zero", chat(r#","n":01"#), Expect::Status(400)),
    ];
    v.drain(..)
        .map(|(name, bytes, expect)| Case {
            name: format!("json: {name}"),
            bytes,
            expect,
        })
        .collect()
}

/// A normal request, on a fresh connection, is served.
async fn still_serving(gw: &mut Gateway, key: &str, after: &str) {
    if let Some(Ok(Some(status))) = gw.child.as_mut().map(|c| c.try_wait()) {
        panic!(
            "gateway exited ({status}) after {after}; log:\n{}",
            gw.log()
        );
    }
    let case = Case {
        name: "control".into(),
        bytes: post_chat(key, chat_body().as_bytes()),
        expect: Expect::Answered,
    };
    let got = run_case(gw.port, &case).await;
    assert_eq!(
        got.as_deref(),
        Ok("200"),
        "a normal request after {after}; log:\n{}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_request_gets_a_clean_answer_and_the_gateway_keeps_serving() {
    let mock = MockServer::start().await;
    let ch = channel("main", &mock.base_url(), PROVIDER_KEY, &["m1"], 0);
    let server = "  connections: { head_timeout_ms: 3000, body_timeout_ms: 3000, body_idle_timeout_ms: 1500 }\n";
    let mut gw = tokio::task::spawn_blocking(move || Gateway::start_with_server(&ch, server, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    let mut cases = http_cases(&key);
    cases.extend(json_cases(&key));
    assert!(cases.len() >= 80, "{} cases", cases.len());

    let mut failures = Vec::new();
    let mut report = String::new();
    for batch in cases.chunks(10) {
        let results =
            futures_util::future::join_all(batch.iter().map(|c| run_case(gw.port, c))).await;
        for (case, got) in batch.iter().zip(results) {
            match got {
                Ok(how) => report.push_str(&format!("  ok   {:<60} {how}\n", case.name)),
                Err(why) => {
                    report.push_str(&format!("  FAIL {:<60} {why}\n", case.name));
                    failures.push(format!("{}: {why}", case.name));
                }
            }
        }
        still_serving(
            &mut gw,
            &key,
            &format!("the batch ending with {}", batch[batch.len() - 1].name),
        )
        .await;
    }
    let _ = std::io::stderr().write_all(report.as_bytes());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    let log = gw.log();
    assert!(!log.contains("panicked"), "a panic in the log:\n{log}");
}
