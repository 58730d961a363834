//! A mock OpenAI-compatible upstream.
//!
//! It exists so the gateway can be tested against deterministic token counts
//! (billing exactness), controlled failures (resets, truncation, mid-stream
//! errors, error statuses) and controlled timing (delays, a gate), and so the
//! load benchmarks have a cheap baseline upstream. Each request can steer the
//! mock through an `"x_mock"` object in its JSON body (or an `x-mock` header
//! holding the same JSON, for requests without a body); the gateway forwards
//! the body untouched, so tests can pick behaviour per request.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// How the mock answers. Server-wide via [`MockServer::start_with`] /
/// [`MockServer::set_default`], per request via the `"x_mock"` JSON field.
///
/// Unknown fields are rejected (400) so a typo in a test fails loudly instead
/// of silently testing the default path.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Behaviour {
    /// Answer with this status and an OpenAI error body (429 adds `retry-after: 1`).
    pub status: Option<u16>,
    /// Message for `status` errors and `error_after` events (default "mock upstream error").
    pub error_message: Option<String>,
    /// Mimics providers that echo the caller's key in error messages, so the
    /// gateway's redaction can be tested.
    pub echo_auth_in_error: bool,
    /// Drop the TCP connection without writing any response.
    pub reset: bool,
    /// Content chunks for streams (default 3); also completion_tokens for JSON.
    pub chunks: Option<u32>,
    /// Sleep before every content chunk (streams) or before the whole response.
    pub delay_ms: Option<u64>,
    /// Stream: after N content chunks, abort the connection mid-body.
    pub truncate_after: Option<u32>,
    /// Stream: after N content chunks, send an in-band error event and end the body.
    pub error_after: Option<u32>,
    /// Stream: hold everything after the first content chunk until [`MockServer::open_gate`].
    pub gate: bool,
    /// "final" (default), "cumulative" or "none"; see [`UsageMode`].
    pub usage: Option<String>,
    /// Reported as `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: Option<u64>,
}

impl Behaviour {
    /// Field-by-field so a request can tweak one knob without restating the
    /// server default: `Some` in `over` wins, bools are OR-ed.
    pub fn overlay(&self, over: Behaviour) -> Behaviour {
        Behaviour {
            status: over.status.or(self.status),
            error_message: over.error_message.or_else(|| self.error_message.clone()),
            echo_auth_in_error: self.echo_auth_in_error || over.echo_auth_in_error,
            reset: self.reset || over.reset,
            chunks: over.chunks.or(self.chunks),
            delay_ms: over.delay_ms.or(self.delay_ms),
            truncate_after: over.truncate_after.or(self.truncate_after),
            error_after: over.error_after.or(self.error_after),
            gate: self.gate || over.gate,
            usage: over.usage.or_else(|| self.usage.clone()),
            cached_tokens: over.cached_tokens.or(self.cached_tokens),
        }
    }
}

/// How streamed responses report usage; providers differ and the gateway's
/// billing has to cope with each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageMode {
    /// OpenAI: a trailing `choices: []` usage chunk, only when the client asked
    /// for `stream_options.include_usage`.
    Final,
    /// Some compatible providers: every chunk carries the running usage and
    /// there is no separate usage chunk.
    Cumulative,
    /// Never report usage (streams or JSON), to exercise estimation paths.
    None,
}

impl UsageMode {
    fn parse(s: Option<&str>) -> Result<UsageMode, String> {
        match s {
            None | Some("final") => Ok(UsageMode::Final),
            Some("cumulative") => Ok(UsageMode::Cumulative),
            Some("none") => Ok(UsageMode::None),
            Some(other) => Err(format!(
                "x_mock.usage must be \"final\", \"cumulative\" or \"none\", got {other:?}"
            )),
        }
    }
}

/// A request as the upstream saw it, so tests can assert what the gateway
/// forwarded (headers rewritten, keys swapped, body untouched...).
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    /// Lower-case names, in arrival order, duplicates kept.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedRequest {
    /// First value of the header; `name` is matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Usage the mock actually reported to its client; billing tests compare the
/// gateway's ledger against these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedUsage {
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub stream: bool,
}

struct Shared {
    default: RwLock<Arc<Behaviour>>,
    /// Off in the benchmark binary so memory stays flat under sustained load.
    record: AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    served: Mutex<Vec<ServedUsage>>,
    chunks_sent: AtomicU64,
    gate: watch::Sender<bool>,
    next_id: AtomicU64,
}

impl Shared {
    fn record_served(&self, s: ServedUsage) {
        if self.record.load(Ordering::Relaxed) {
            self.served.lock().unwrap().push(s);
        }
    }
}

/// An in-process mock upstream on its own port; dropping it stops the server
/// and every connection it owns.
pub struct MockServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    /// Set in TLS mode only; also what makes `base_url` say https.
    ca_pem: Option<String>,
}

impl MockServer {
    /// Ephemeral port on 127.0.0.1, default behaviour.
    pub async fn start() -> MockServer {
        Self::start_with(Behaviour::default()).await
    }

    /// Ephemeral port on 127.0.0.1 with a server-wide default behaviour.
    pub async fn start_with(default: Behaviour) -> MockServer {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), default)
            .await
            .expect("bind mock upstream on 127.0.0.1:0")
    }

    /// HTTPS on an ephemeral 127.0.0.1 port with a fresh self-signed
    /// certificate for "localhost" and 127.0.0.1, so the gateway's TLS
    /// upstream path can be tested without real certificates. `base_url()`
    /// is then `https://localhost:PORT`; clients must trust [`Self::ca_pem`].
    /// Only ALPN "http/1.1" is offered, matching the plain mock.
    pub async fn start_tls(default: Behaviour) -> MockServer {
        let (acceptor, pem) = self_signed_tls().expect("self-signed TLS config for the mock");
        let listener = listen(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind mock upstream on 127.0.0.1:0");
        Self::serve(listener, default, Some((acceptor, pem))).expect("mock listener address")
    }

    pub async fn bind(addr: SocketAddr, default: Behaviour) -> io::Result<MockServer> {
        Self::serve(listen(addr)?, default, None)
    }

    fn serve(
        listener: TcpListener,
        default: Behaviour,
        tls: Option<(TlsAcceptor, String)>,
    ) -> io::Result<MockServer> {
        let addr = listener.local_addr()?;
        let (acceptor, ca_pem) = tls.unzip();
        let shared = Arc::new(Shared {
            default: RwLock::new(Arc::new(default)),
            record: AtomicBool::new(true),
            requests: Mutex::new(Vec::new()),
            served: Mutex::new(Vec::new()),
            chunks_sent: AtomicU64::new(0),
            gate: watch::Sender::new(false),
            next_id: AtomicU64::new(1),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone(), acceptor));
        Ok(MockServer {
            addr,
            shared,
            task,
            ca_pem,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, or `https://localhost:PORT` in TLS mode because the
    /// name must match the certificate under the usual SNI/hostname checks.
    pub fn base_url(&self) -> String {
        match self.ca_pem {
            Some(_) => format!("https://localhost:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// PEM of the self-signed certificate a client must trust; `None` for
    /// plain HTTP.
    pub fn ca_pem(&self) -> Option<String> {
        self.ca_pem.clone()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// One entry per response that reported usage (JSON body, stream usage
    /// chunk, or the last value of a cumulative stream).
    pub fn served(&self) -> Vec<ServedUsage> {
        self.shared.served.lock().unwrap().clone()
    }

    /// SSE content chunks handed to the connection so far, across all requests.
    pub fn chunks_sent(&self) -> u64 {
        self.shared.chunks_sent.load(Ordering::SeqCst)
    }

    /// Releases gated streams; it stays open so later gated streams flow freely.
    pub fn open_gate(&self) {
        self.shared.gate.send_replace(true);
    }

    pub fn set_default(&self, b: Behaviour) {
        *self.shared.default.write().unwrap() = Arc::new(b);
    }

    /// Recording is on by default; the benchmark binary turns it off because
    /// `requests()`/`served()` would otherwise grow without bound.
    pub fn set_recording(&self, on: bool) {
        self.shared.record.store(on, Ordering::Relaxed);
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        // Connections live in the accept task's JoinSet, so this ends them too.
        self.task.abort();
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets the benchmark binary restart on a fixed port while old
    // connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A deep backlog so connection storms from load tests are not refused.
    socket.listen(4096)
}

/// A new key and certificate per server, so no key material ships in the
/// repo. The ring provider is named explicitly because the process-wide
/// default is ambiguous if another crate ever enables aws-lc-rs.
fn self_signed_tls() -> Result<(TlsAcceptor, String), Box<dyn StdError>> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    // The mock only speaks HTTP/1.1; refusing h2 in ALPN keeps clients honest.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), cert.pem()))
}

/// A client that connects but never finishes the handshake must not pin a
/// task forever.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    let mut builder = http1::Builder::new();
    builder.keep_alive(true).timer(TokioTimer::new());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Small SSE frames must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let builder = builder.clone();
                    let tls = tls.clone();
                    // The handshake runs in the connection task so a slow
                    // client cannot stall the accept loop.
                    conns.spawn(async move {
                        match tls {
                            None => serve_connection(&builder, stream, shared).await,
                            Some(acceptor) => {
                                let hs = tokio::time::timeout(
                                    TLS_HANDSHAKE_TIMEOUT,
                                    acceptor.accept(stream),
                                );
                                if let Ok(Ok(stream)) = hs.await {
                                    serve_connection(&builder, stream, shared).await;
                                }
                            }
                        }
                    });
                }
                // Typically EMFILE under load: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The one place connections are served, so plain and TLS behave the same.
async fn serve_connection<S>(builder: &http1::Builder, io: S, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(shared.clone(), req));
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
}

/// Returned from the service to make hyper drop the connection without
/// writing a response, which is how `reset` is simulated.
#[derive(Debug)]
struct ResetConnection;

impl fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock reset")
    }
}

impl StdError for ResetConnection {}

type Item = Result<Bytes, io::Error>;

/// Response body: either a whole buffer, or a channel fed by a spawned task so
/// that every SSE event is written as its own HTTP chunk exactly when the task
/// produces it (delays and the gate are real on the wire).
pub enum MockBody {
    Full(Option<Bytes>),
    Chan(mpsc::Receiver<Item>),
}

impl Body for MockBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            MockBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            MockBody::Chan(rx) => rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, MockBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            MockBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            MockBody::Full(None) => SizeHint::with_exact(0),
            MockBody::Chan(_) => SizeHint::default(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Chat,
    Completions,
    Embeddings,
    Models,
    Echo,
}

/// Routes on the path suffix so base URLs with or without `/v1` both work.
fn route(method: &Method, path: &str) -> Route {
    let path = path.trim_end_matches('/');
    let post = method == Method::POST;
    if post && path.ends_with("/chat/completions") {
        Route::Chat
    } else if post && path.ends_with("/completions") {
        Route::Completions
    } else if post && path.ends_with("/embeddings") {
        Route::Embeddings
    } else if method == Method::GET && path.ends_with("/models") {
        Route::Models
    } else {
        Route::Echo
    }
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, ResetConnection> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => return Err(ResetConnection),
    };
    let path = parts.uri.path();
    let auth = ["authorization", "x-api-key", "api-key"]
        .iter()
        .find_map(|h| parts.headers.get(*h))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    if shared.record.load(Ordering::Relaxed) {
        let rec = RecordedRequest {
            method: parts.method.to_string(),
            path: path.to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.clone(),
        };
        shared.requests.lock().unwrap().push(rec);
    }

    let is_post = parts.method == Method::POST;
    let json: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => Some(v),
            Err(e) if is_post => {
                return Ok(error_response(
                    StatusCode::BAD_REQUEST,
                    &format!("We could not parse the JSON body of your request. ({e})"),
                ))
            }
            Err(_) => None,
        }
    };

    let base = shared.default.read().unwrap().clone();
    let mut b = (*base).clone();
    if let Some(h) = parts.headers.get("x-mock") {
        match serde_json::from_slice::<Behaviour>(h.as_bytes()) {
            Ok(over) => b = b.overlay(over),
            Err(e) => return Ok(bad_request(&format!("invalid x-mock header: {e}"))),
        }
    }
    if let Some(x) = json.as_ref().and_then(|v| v.get("x_mock")) {
        match Behaviour::deserialize(x) {
            Ok(over) => b = b.overlay(over),
            Err(e) => return Ok(bad_request(&format!("invalid x_mock: {e}"))),
        }
    }
    let mode = match UsageMode::parse(b.usage.as_deref()) {
        Ok(m) => m,
        Err(msg) => return Ok(bad_request(&msg)),
    };
    let delay = b.delay_ms.map(Duration::from_millis);

    if b.reset {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        return Err(ResetConnection);
    }
    if let Some(code) = b.status {
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut msg = b
            .error_message
            .clone()
            .unwrap_or_else(|| "mock upstream error".to_owned());
        if b.echo_auth_in_error {
            msg.push_str(&format!(" (key: {auth})"));
        }
        return Ok(error_response(status, &msg));
    }

    let route = route(&parts.method, path);
    let obj = json.as_ref().and_then(Value::as_object);
    if matches!(route, Route::Chat | Route::Completions | Route::Embeddings) && obj.is_none() {
        return Ok(bad_request("the request body must be a JSON object"));
    }
    let model = obj
        .and_then(|o| o.get("model"))
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let prompt_tokens = body.len() as u64 / 4 + 1;
    let cached = b.cached_tokens.unwrap_or(0);
    let chunks = b.chunks.unwrap_or(3);
    let created = unix_now();

    let stream = obj.and_then(|o| o.get("stream")).and_then(Value::as_bool) == Some(true);
    if stream && matches!(route, Route::Chat | Route::Completions) {
        let include_usage = obj
            .and_then(|o| o.get("stream_options"))
            .and_then(|s| s.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(8);
        let job = StreamJob {
            shared,
            tx,
            chat: route == Route::Chat,
            id: if route == Route::Chat {
                format!("chatcmpl-mock-{n}")
            } else {
                format!("cmpl-mock-{n}")
            },
            created,
            model,
            chunks,
            delay,
            truncate_after: b.truncate_after,
            error_after: b.error_after,
            error_message: b
                .error_message
                .unwrap_or_else(|| "mock upstream error".to_owned()),
            gate: b.gate,
            mode,
            include_usage,
            prompt_tokens,
            cached,
        };
        tokio::spawn(job.run());
        let mut resp = Response::new(MockBody::Chan(rx));
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-request-id", request_id(n));
        return Ok(resp);
    }

    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let n = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let usage = (mode != UsageMode::None).then(|| Usage::new(prompt_tokens, chunks, cached));
    let body = match route {
        Route::Chat | Route::Completions => {
            let content = content_text(chunks);
            let out = if route == Route::Chat {
                serde_json::to_vec(&ChatCompletion {
                    id: &format!("chatcmpl-mock-{n}"),
                    object: "chat.completion",
                    created,
                    model: &model,
                    choices: [ChatChoice {
                        index: 0,
                        message: Message {
                            role: "assistant",
                            content: &content,
                        },
                        finish_reason: "stop",
                        logprobs: (),
                    }],
                    usage,
                })
            } else {
                serde_json::to_vec(&TextCompletion {
                    id: &format!("cmpl-mock-{n}"),
                    object: "text_completion",
                    created,
                    model: &model,
                    choices: [TextChoice {
                        text: &content,
                        index: 0,
                        logprobs: (),
                        finish_reason: Some("stop"),
                    }],
                    usage,
                })
            };
            if usage.is_some() {
                shared.record_served(ServedUsage {
                    model: model.clone(),
                    prompt_tokens,
                    completion_tokens: u64::from(chunks),
                    cached_tokens: cached,
                    stream: false,
                });
            }
            out
        }
        Route::Embeddings => {
            let obj = obj.expect("checked above");
            let count = match obj.get("input") {
                Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_number) => 1,
                Some(Value::Array(a)) => a.len(),
                Some(_) => 1,
                None => return Ok(bad_request("you must provide an input parameter")),
            };
            let base64 = obj.get("encoding_format").and_then(Value::as_str) == Some("base64");
            let data: Vec<Value> = (0..count)
                .map(|i| {
                    let v = embedding(i);
                    let embedding = if base64 {
                        let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                        Value::from(base64_encode(&raw))
                    } else {
                        Value::from(v.to_vec())
                    };
                    serde_json::json!({"object": "embedding", "index": i, "embedding": embedding})
                })
                .collect();
            let mut out = serde_json::json!({"object": "list", "data": data, "model": model});
            if mode != UsageMode::None {
                out["usage"] = serde_json::json!({
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens,
                });
                shared.record_served(ServedUsage {
                    model: model.clone(),
                    prompt_tokens,
                    completion_tokens: 0,
                    cached_tokens: 0,
                    stream: false,
                });
            }
            serde_json::to_vec(&out)
        }
        Route::Models => serde_json::to_vec(&serde_json::json!({
            "object": "list",
            "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": "mock"}],
        })),
        Route::Echo => serde_json::to_vec(&serde_json::json!({
            "object": "echo",
            "path": path,
            "method": parts.method.as_str(),
        })),
    }
    .expect("serialising mock response");
    let mut resp = json_response(StatusCode::OK, body);
    resp.headers_mut().insert("x-request-id", request_id(n));
    Ok(resp)
}

fn request_id(n: u64) -> HeaderValue {
    HeaderValue::try_from(format!("req_mock_{n}")).expect("ascii request id")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn content_text(chunks: u32) -> String {
    (0..chunks).map(|i| format!("tok{i} ")).collect()
}

/// Deterministic so tests can compare vectors relayed by the gateway.
fn embedding(i: usize) -> [f32; 8] {
    std::array::from_fn(|k| ((i * 8 + k) as f32 + 1.0) / 100.0)
}

/// Standard padded base64; the OpenAI SDKs request `encoding_format: base64`
/// by default, so the mock must answer it.
fn base64_encode(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (j, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if j <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<MockBody> {
    let len = body.len();
    let mut resp = Response::new(MockBody::Full(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

fn bad_request(msg: &str) -> Response<MockBody> {
    error_response(StatusCode::BAD_REQUEST, msg)
}

/// OpenAI's `type`/`code` pairs, so gateways that map errors by type see
/// realistic values.
fn error_kind(status: StatusCode) -> (&'static str, Option<&'static str>) {
    match status.as_u16() {
        400 => ("invalid_request_error", None),
        401 => ("invalid_request_error", Some("invalid_api_key")),
        403 => ("invalid_request_error", Some("permission_denied")),
        404 => ("invalid_request_error", Some("model_not_found")),
        429 => ("requests", Some("rate_limit_exceeded")),
        500..=599 => ("server_error", None),
        _ => ("mock_error", None),
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: (),
    code: Option<&'a str>,
}

fn error_json(msg: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    serde_json::to_vec(&ErrorEnvelope {
        error: ErrorBody {
            message: msg,
            kind,
            param: (),
            code,
        },
    })
    .expect("serialising error")
}

fn error_response(status: StatusCode, msg: &str) -> Response<MockBody> {
    let (kind, code) = error_kind(status);
    let mut resp = json_response(status, error_json(msg, kind, code));
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

// Wire structs: field order follows OpenAI's own output.

#[derive(Serialize, Clone, Copy, Debug)]
struct Usage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Serialize, Clone, Copy, Debug)]
struct PromptDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Serialize, Clone, Copy, Debug)]
struct CompletionDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
}

impl Usage {
    fn new(prompt: u64, completion: u32, cached: u64) -> Usage {
        let completion = u64::from(completion);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptDetails {
                cached_tokens: cached,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: 0,
                audio_tokens: 0,
            },
        }
    }
}

#[derive(Serialize)]
struct ChatCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [ChatChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    finish_reason: &'static str,
    logprobs: (),
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct TextCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [TextChoice<'a>; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    text: &'a str,
    index: u32,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

/// One SSE chunk of either API. `usage`: absent, `null`, or an object.
#[derive(Serialize)]
struct Chunk<'a, C: Serialize> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [C],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Serialize)]
struct ChatDeltaChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// The receiver (hyper's body) is gone: the client disconnected.
struct Gone;

struct StreamJob {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Item>,
    chat: bool,
    id: String,
    created: u64,
    model: String,
    chunks: u32,
    delay: Option<Duration>,
    truncate_after: Option<u32>,
    error_after: Option<u32>,
    error_message: String,
    gate: bool,
    mode: UsageMode,
    include_usage: bool,
    prompt_tokens: u64,
    cached: u64,
}

impl StreamJob {
    async fn run(self) {
        let mut last_cumulative = None;
        let _ = self.emit(&mut last_cumulative).await;
        // A cumulative stream has reported usage in-band with every chunk, so
        // whatever it last sent counts, even if the stream then broke.
        if let Some(u) = last_cumulative {
            self.served(u);
        }
    }

    fn served(&self, u: Usage) {
        self.shared.record_served(ServedUsage {
            model: self.model.clone(),
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            cached_tokens: u.prompt_tokens_details.cached_tokens,
            stream: true,
        });
    }

    /// The `usage` field every regular chunk carries after `completion`
    /// content chunks.
    fn usage_field(&self, completion: u32) -> Option<Option<Usage>> {
        match self.mode {
            UsageMode::Final if self.include_usage => Some(None),
            UsageMode::Cumulative => Some(Some(Usage::new(
                self.prompt_tokens,
                completion,
                self.cached,
            ))),
            _ => None,
        }
    }

    async fn send(&self, bytes: Vec<u8>) -> Result<(), Gone> {
        self.tx.send(Ok(Bytes::from(bytes))).await.map_err(|_| Gone)
    }

    fn event<T: Serialize>(v: &T) -> Vec<u8> {
        let mut out = b"data: ".to_vec();
        serde_json::to_writer(&mut out, v).expect("serialising chunk");
        out.extend_from_slice(b"\n\n");
        out
    }

    /// A regular chunk with a single choice; `text: None` with a finish
    /// reason is the closing chunk (empty delta / empty text).
    fn chunk(
        &self,
        role: bool,
        text: Option<&str>,
        finish: Option<&'static str>,
        usage: Option<Option<Usage>>,
    ) -> Vec<u8> {
        if self.chat {
            Self::event(&Chunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: &[ChatDeltaChoice {
                    index: 0,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: if role { Some("") } else { text },
                    },
                    logprobs: (),
                    finish_reason: finish,
                }],
                usage,
            })
        } else {
            Self::event(&Chunk {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: &[TextChoice {
                    text: text.unwrap_or(""),
                    index: 0,
                    logprobs: (),
                    finish_reason: finish,
                }],
                usage,
            })
        }
    }

    fn usage_chunk(&self, u: Usage) -> Vec<u8> {
        Self::event(&Chunk::<'_, ChatDeltaChoice> {
            id: &self.id,
            object: if self.chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            },
            created: self.created,
            model: &self.model,
            choices: &[],
            usage: Some(Some(u)),
        })
    }

    async fn emit(&self, last_cumulative: &mut Option<Usage>) -> Result<(), Gone> {
        let cumulative = self.mode == UsageMode::Cumulative;
        let track = |sent: u32, last: &mut Option<Usage>| {
            if cumulative {
                *last = Some(Usage::new(self.prompt_tokens, sent, self.cached));
            }
        };
        if self.chat {
            self.send(self.chunk(true, None, None, self.usage_field(0)))
                .await?;
            track(0, last_cumulative);
        }
        let mut sent = 0u32;
        loop {
            if self.truncate_after == Some(sent) {
                // Let hyper take every frame already sent (the channel drains), then
                // give it a moment to write them, so the client sees exactly `sent`
                // chunks before the abort. Bounded: a stuck client must not hang us.
                for _ in 0..200 {
                    if self.tx.capacity() == self.tx.max_capacity() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
                let _ = self.tx.send(Err(io::Error::other("mock truncate"))).await;
                return Ok(());
            }
            if self.error_after == Some(sent) {
                let err = error_json(&self.error_message, "server_error", None);
                let mut ev = b"data: ".to_vec();
                ev.extend_from_slice(&err);
                ev.extend_from_slice(b"\n\n");
                // Ends the body cleanly (terminating chunk) but without [DONE].
                return self.send(ev).await;
            }
            if sent == self.chunks {
                break;
            }
            if self.gate && sent == 1 {
                let mut gate = self.shared.gate.subscribe();
                tokio::select! {
                    _ = async { let _ = gate.wait_for(|open| *open).await; } => {}
                    _ = self.tx.closed() => return Err(Gone),
                }
            }
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
            let text = format!("tok{sent} ");
            // Counted before it can reach anyone: a client holding chunk N must never read
            // a count below N.
            self.shared.chunks_sent.fetch_add(1, Ordering::SeqCst);
            self.send(self.chunk(false, Some(&text), None, self.usage_field(sent + 1)))
                .await?;
            sent += 1;
            track(sent, last_cumulative);
        }
        self.send(self.chunk(false, None, Some("stop"), self.usage_field(sent)))
            .await?;
        track(sent, last_cumulative);
        if self.mode == UsageMode::Final && self.include_usage {
            let u = Usage::new(self.prompt_tokens, sent, self.cached);
            self.send(self.usage_chunk(u)).await?;
            self.served(u);
        }
        self.send(b"data: [DONE]\n\n".to_vec()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want);
        }
    }

    #[test]
    fn overlay_is_field_by_field() {
        let base = Behaviour {
            chunks: Some(2),
            gate: true,
            usage: Some("cumulative".into()),
            ..Default::default()
        };
        let over = Behaviour {
            delay_ms: Some(5),
            usage: Some("none".into()),
            ..Default::default()
        };
        let m = base.overlay(over);
        assert_eq!(m.chunks, Some(2));
        assert_eq!(m.delay_ms, Some(5));
        assert!(m.gate);
        assert_eq!(m.usage.as_deref(), Some("none"));
    }

    #[test]
    fn routes_on_suffix() {
        assert!(route(&Method::POST, "/v1/chat/completions") == Route::Chat);
        assert!(route(&Method::POST, "/chat/completions") == Route::Chat);
        assert!(route(&Method::POST, "/openai/v1/completions") == Route::Completions);
        assert!(route(&Method::POST, "/v1/embeddings") == Route::Embeddings);
        assert!(route(&Method::GET, "/v1/models") == Route::Models);
        assert!(route(&Method::GET, "/v1/chat/completions") == Route::Echo);
        assert!(route(&Method::POST, "/v1/other") == Route::Echo);
    }

    #[test]
    fn unknown_x_mock_field_is_rejected() {
        assert!(serde_json::from_str::<Behaviour>(r#"{"chunkz": 3}"#).is_err());
        let b: Behaviour = serde_json::from_str(r#"{"chunks": 3, "gate": true}"#).unwrap();
        assert_eq!(b.chunks, Some(3));
        assert!(b.gate);
    }
}
