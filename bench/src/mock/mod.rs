//! A mock OpenAI-compatible upstream.
//!
//! It exists so the gateway can be tested against deterministic token counts
//! (billing exactness), controlled failures (resets, truncation, mid-stream
//! errors, error statuses) and controlled timing (delays, a gate), and so the
//! load benchmarks have a cheap baseline upstream. Each request can steer the
//! mock through an `"x_mock"` object in its JSON body (or an `x-mock` header
//! holding the same JSON, for requests without a body); the gateway forwards
//! the body untouched, so tests can pick behaviour per request. Every `x_mock`
//! field is documented on [`Behaviour`].

mod behaviour;
mod handler;
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
use hyper_util::rt::{TokioIo, TokioTimer};
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

pub use behaviour::{Behaviour, RecordedRequest, ServedUsage, UsageMode};
use handler::handle;
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
            next_conn: AtomicU64::new(1),
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

    /// Like [`Self::requests`], but hands the recorded requests over and forgets
    /// them, so a long run can record without growing without bound.
    pub fn take_requests(&self) -> Vec<RecordedRequest> {
        std::mem::take(&mut *self.shared.requests.lock().unwrap())
    }

    /// Like [`Self::served`], but hands the entries over and forgets them.
    pub fn take_served(&self) -> Vec<ServedUsage> {
        std::mem::take(&mut *self.shared.served.lock().unwrap())
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

/// The one place connections are served, so plain and TLS behave the same.
/// `reset` is set by a request that wants its connection aborted with a reset
/// (`reset_after_body`); only [`ResetOnDrop`] acts on it.
async fn serve_connection<S>(
    builder: &http1::Builder,
    io: S,
    shared: Arc<Shared>,
    reset: Arc<AtomicBool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let svc = service_fn(move |req| handle(shared.clone(), req, conn, reset.clone()));
    let _ = builder.serve_connection(TokioIo::new(io), svc).await;
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
