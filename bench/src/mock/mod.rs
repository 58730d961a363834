//! A mock model provider upstream.
//!
//! It exists so the gateway can be tested against deterministic token counts
//! (billing exactness), controlled failures (resets, truncation, mid-stream
//! errors, error statuses) and controlled timing (delays, a gate), and so the
//! load benchmarks have a cheap baseline upstream. Each request can steer the
//! mock through an `"x_mock"` object in its JSON body (or an `x-mock` header
//! holding the same JSON, for requests without a body); the gateway forwards
//! the body untouched, so tests can pick behaviour per request. Every `x_mock`
//! field is documented on [`Behaviour`].
//!
//! It speaks three wire formats, chosen by the path:
//!
//! - **OpenAI**: `POST .../chat/completions`, `.../completions`, `.../embeddings`,
//!   `GET .../models` (with or without `/v1`, so Azure OpenAI's
//!   `/openai/deployments/{d}/chat/completions?api-version=..` and `/openai/v1/..`
//!   are answered the same way). No credential is required. Also (`media.rs`)
//!   `POST .../images/generations`, `.../audio/transcriptions`, `.../audio/translations`
//!   (multipart) and `.../audio/speech`, and (`realtime.rs`) the Realtime API's websocket,
//!   `GET .../realtime?model=..`, which does require `Authorization: Bearer`.
//! - **Anthropic Messages** (`anthropic.rs`): `POST /v1/messages` (JSON, or SSE with
//!   `"stream": true`) and `POST /v1/messages/count_tokens`. `x-api-key` (else 401)
//!   and `anthropic-version` (else 400) are required.
//! - **Gemini** (`gemini.rs`): `POST .../models/{model}:generateContent`,
//!   `:streamGenerateContent` (SSE with `?alt=sse`, else a streamed JSON array) and
//!   `:countTokens`. An `x-goog-api-key` header or `key` query parameter is required
//!   (else 403 `PERMISSION_DENIED`, as the real API answers).
//!
//! Token counts are deterministic on every wire: the prompt is the request body's
//! length in bytes / 4 + 1 (`x_mock` included), the output one token per content
//! chunk (`chunks`, default 3; `tok0 tok1 ..`) plus 3 for a tool call. Each wire's
//! fields, and how they map to [`ServedUsage`], are documented in its module and on
//! [`ServedUsage`]. Any other path is echoed back as JSON.

mod anthropic;
mod behaviour;
mod gemini;
mod handler;
mod media;
mod realtime;
mod stream;
mod wire;

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

pub use behaviour::{Behaviour, RecordedRequest, ServedUsage, UsageMode, WireFormat};
use handler::{add_success_headers, handle, request_id, unix_now};
pub use media::{speech_bytes, PNG_1X1, SPEECH_BYTES, TRANSCRIPT};
use stream::StreamJob;
pub use wire::MockBody;
use wire::{
    bad_request, base64_encode, content_text, embedding, error_response, json_response, ChatChoice,
    ChatCompletion, Message, TextChoice, TextCompletion, Usage,
};

struct Shared {
    default: RwLock<Arc<Behaviour>>,
    /// Off in the benchmark binary so memory stays flat under sustained load.
    record: AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    served: Mutex<Vec<ServedUsage>>,
    chunks_sent: AtomicU64,
    gate: watch::Sender<bool>,
    next_id: AtomicU64,
    /// Numbers connections in accept order, for [`RecordedRequest::conn`].
    next_conn: AtomicU64,
    /// Connections that carried at least one HTTP/2 request.
    h2_conns: AtomicU64,
    /// Connections open now, and the most ever open at once.
    open_conns: AtomicU64,
    peak_conns: AtomicU64,
    /// Requests being handled now (JSON answers until written, streams until their head),
    /// and the most at once.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
    /// Realtime websocket sessions open now.
    realtime_open: AtomicU64,
    /// The realtime sessions' tasks: they outlive the request that upgraded, so they are
    /// kept here for [`MockServer`]'s drop to end them.
    realtime_tasks: Mutex<JoinSet<()>>,
}

/// What the mock counts of its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct ConnectionStats {
    /// Accepted since start.
    pub accepted: u64,
    /// Of those, the ones that carried HTTP/2.
    pub h2: u64,
    /// Open now.
    pub open: u64,
    /// The most open at once.
    pub peak: u64,
    /// Requests being handled at once, at most (a JSON answer counts until it is written).
    #[serde(default)]
    pub peak_requests: u64,
}

impl Shared {
    fn connection_stats(&self) -> ConnectionStats {
        ConnectionStats {
            accepted: self.next_conn.load(Ordering::SeqCst) - 1,
            h2: self.h2_conns.load(Ordering::SeqCst),
            open: self.open_conns.load(Ordering::SeqCst),
            peak: self.peak_conns.load(Ordering::SeqCst),
            peak_requests: self.peak_in_flight.load(Ordering::SeqCst),
        }
    }

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

/// Which protocols the mock speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockProtocols {
    /// HTTPS with a fresh self-signed certificate (see [`MockServer::start_tls`]).
    pub tls: bool,
    /// HTTP/2 besides HTTP/1.1: ALPN `h2` then `http/1.1` over TLS, and prior-knowledge
    /// h2c (told apart from HTTP/1.1 by its preface) in plain text. Off: HTTP/1.1 only,
    /// and over TLS only `http/1.1` is offered, like a provider that refuses h2.
    pub h2: bool,
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
        Self::start_protocols(
            default,
            MockProtocols {
                tls: true,
                h2: false,
            },
        )
        .await
    }

    /// Ephemeral port on 127.0.0.1 speaking the given protocols.
    pub async fn start_protocols(default: Behaviour, protocols: MockProtocols) -> MockServer {
        Self::bind_protocols(SocketAddr::from(([127, 0, 0, 1], 0)), default, protocols)
            .await
            .expect("bind mock upstream on 127.0.0.1:0")
    }

    pub async fn bind(addr: SocketAddr, default: Behaviour) -> io::Result<MockServer> {
        Self::serve(listen(addr)?, default, None, false)
    }

    /// [`Self::bind`] with a choice of protocols.
    pub async fn bind_protocols(
        addr: SocketAddr,
        default: Behaviour,
        protocols: MockProtocols,
    ) -> io::Result<MockServer> {
        let tls = match protocols.tls {
            true => Some(self_signed_tls(protocols.h2).map_err(io::Error::other)?),
            false => None,
        };
        Self::serve(listen(addr)?, default, tls, protocols.h2)
    }

    fn serve(
        listener: TcpListener,
        default: Behaviour,
        tls: Option<(TlsAcceptor, String)>,
        h2: bool,
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
            next_conn: AtomicU64::new(1),
            h2_conns: AtomicU64::new(0),
            open_conns: AtomicU64::new(0),
            peak_conns: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            peak_in_flight: AtomicU64::new(0),
            realtime_open: AtomicU64::new(0),
            realtime_tasks: Mutex::new(JoinSet::new()),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone(), acceptor, h2));
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

    /// Like [`Self::requests`], but hands the recorded requests over and forgets
    /// them, so a long run can record without growing without bound.
    pub fn take_requests(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut *self.shared.requests.lock().unwrap())
    }

    /// Like [`Self::served`], but hands the entries over and forgets them.
    pub fn take_served(&self) -> Vec<ServedUsage> {
        std::mem::take(&mut *self.shared.served.lock().unwrap())
    }

    /// Connections accepted so far (after the TLS handshake, in TLS mode). The same
    /// numbers are served as JSON at `GET /mock/stats` for a mock in another process.
    pub fn connections(&self) -> ConnectionStats {
        self.shared.connection_stats()
    }

    /// SSE content chunks handed to the connection so far, across all requests.
    pub fn chunks_sent(&self) -> u64 {
        self.shared.chunks_sent.load(Ordering::SeqCst)
    }

    /// Realtime websocket sessions open now: counted from the upgrade until the
    /// connection is closed (by either side) or cut (`truncate_after`).
    pub fn realtime_sessions(&self) -> u64 {
        self.shared.realtime_open.load(Ordering::SeqCst)
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
        if let Ok(mut sessions) = self.shared.realtime_tasks.lock() {
            sessions.abort_all();
        }
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
fn self_signed_tls(h2: bool) -> Result<(TlsAcceptor, String), Box<dyn StdError + Send + Sync>> {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)?;
    // Without h2 the mock refuses it in ALPN, like a provider that speaks HTTP/1.1 only.
    config.alpn_protocols = match h2 {
        true => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        false => vec![b"http/1.1".to_vec()],
    };
    Ok((TlsAcceptor::from(Arc::new(config)), cert.pem()))
}

/// A client that connects but never finishes the handshake must not pin a
/// task forever.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    h2: bool,
) {
    let mut h1 = http1::Builder::new();
    h1.keep_alive(true).timer(TokioTimer::new());
    let builder = Wire { h1, h2 };
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
                            None => {
                                let reset = Arc::new(AtomicBool::new(false));
                                let io = ResetOnDrop {
                                    io: stream,
                                    reset: reset.clone(),
                                };
                                serve_connection(&builder, io, shared, reset).await
                            }
                            Some(acceptor) => {
                                let hs = tokio::time::timeout(
                                    TLS_HANDSHAKE_TIMEOUT,
                                    acceptor.accept(stream),
                                );
                                if let Ok(Ok(stream)) = hs.await {
                                    let reset = Arc::new(AtomicBool::new(false));
                                    serve_connection(&builder, stream, shared, reset).await;
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

/// How connections are served: HTTP/1.1 only, or HTTP/1.1 and HTTP/2 (whichever the
/// connection speaks: by ALPN over TLS, by the h2 preface in plain text).
#[derive(Clone)]
struct Wire {
    h1: http1::Builder,
    h2: bool,
}

/// Streams one HTTP/2 connection to the mock may carry at once: far above what any
/// test opens, so the gateway's own `max_h2_streams` is what limits them.
const MOCK_H2_MAX_STREAMS: u32 = 10_000;

/// The one place connections are served, so plain and TLS behave the same.
/// `reset` is set by a request that wants its connection aborted with a reset
/// (`reset_after_body`); only [`ResetOnDrop`] acts on it.
async fn serve_connection<S>(builder: &Wire, io: S, shared: Arc<Shared>, reset: Arc<AtomicBool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = shared.next_conn.fetch_add(1, Ordering::SeqCst);
    let open = shared.open_conns.fetch_add(1, Ordering::SeqCst) + 1;
    shared.peak_conns.fetch_max(open, Ordering::SeqCst);
    let counted = shared.clone();
    let seen_h2 = Arc::new(AtomicBool::new(false));
    let svc = service_fn(move |req: Request<Incoming>| {
        if req.version() == http::Version::HTTP_2 && !seen_h2.swap(true, Ordering::SeqCst) {
            shared.h2_conns.fetch_add(1, Ordering::SeqCst);
        }
        handle(shared.clone(), req, conn, reset.clone())
    });
    if builder.h2 {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().keep_alive(true).timer(TokioTimer::new());
        auto.http2()
            .max_concurrent_streams(MOCK_H2_MAX_STREAMS)
            .timer(TokioTimer::new());
        let _ = auto
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .await;
    } else {
        let _ = builder
            .h1
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await;
    }
    counted.open_conns.fetch_sub(1, Ordering::SeqCst);
}

/// A plain TCP connection that, when dropped with its flag set, closes with a
/// reset (RST) instead of a FIN: `SO_LINGER` 0 is set just before the close.
struct ResetOnDrop {
    io: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            let _ = self.io.set_zero_linger();
        }
    }
}

impl AsyncRead for ResetOnDrop {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResetOnDrop {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
