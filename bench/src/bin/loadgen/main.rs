//! tollgate-loadgen: an HTTP/1.1 load generator for loopback benchmarks.
//!
//! Two modes:
//! - open loop (`--rate R`): request k is *intended* at `start + k/R`. Free
//!   connections take the next slot from a shared counter (work stealing), so
//!   one slow response doesn't hold back the schedule. A request sent behind
//!   its slot has its latency measured from the slot, not from when it went
//!   out (coordinated-omission correction, as in wrk2); a request whose
//!   connection waited for its slot is measured from the wake-up, so tokio's
//!   1 ms timer granularity is not charged to the target.
//! - closed loop (no `--rate`): `--connections` connections, each sending its
//!   next request when the previous answer is complete; for saturation.
//!
//! Every answer that is not a 2xx (or a transport error, a timeout, a stream
//! that ends without `data: [DONE]`) makes the run invalid: exit status 2.
//! Only loopback targets are accepted.

mod report;

use report::*;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http::{header, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The longest run accepted, whatever `--duration` says.
const MAX_DURATION: Duration = Duration::from_secs(3600);
const DEFAULT_BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}"#;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tollgate-loadgen",
    about = "Open/closed-loop HTTP/1.1 load generator (loopback targets only)"
)]
struct Args {
    /// Target URL, e.g. http://127.0.0.1:8080/v1/chat/completions (host must be loopback).
    url: String,
    /// Open loop at this many requests per second; without it, closed loop.
    #[arg(long)]
    rate: Option<f64>,
    /// Keep-alive connections (closed loop: the concurrency; open loop: the pool slots are served from).
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// How long to measure: 10s, 500ms, 2m (at most 1h).
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up at the same load before the measured run.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Hard cap on requests in the measured run, whatever the duration.
    #[arg(long, default_value_t = 5_000_000)]
    max_requests: u64,
    /// Per-request timeout (the whole exchange, body included), in ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Tokio worker threads for the generator itself.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Ask for an SSE stream (`"stream": true`) and report time to first byte and chunk gaps.
    #[arg(long)]
    stream: bool,
    /// Content chunks per stream, sent to the mock as `x_mock.chunks`.
    #[arg(long, default_value_t = 50)]
    chunks: u32,
    /// Delay before each content chunk (mock `x_mock.delay_ms`); 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Request body (JSON); `stream`/`x_mock` are added to it for `--stream`.
    #[arg(long, default_value = DEFAULT_BODY)]
    body: String,
    /// Bearer token sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "TOLLGATE_KEY")]
    key: Option<String>,
    /// Send `Bearer KEY-i` with i cycling through this many values: N distinct keys (for
    /// a flood of unknown keys).
    #[arg(long)]
    distinct_keys: Option<u64>,
    /// A non-2xx status that counts as the expected answer, not a failure (repeatable;
    /// e.g. `--expect 401 --expect 429` for a flood of unknown keys).
    #[arg(long)]
    expect: Vec<u16>,
    /// Extra request header, "Name: value" (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Name printed with the result (and put in the JSON).
    #[arg(long, default_value = "")]
    label: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s or m)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    let d = Duration::from_secs_f64(secs);
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than the 1h limit"));
    }
    Ok(d)
}

/// Where requests go: a loopback socket address, and what to put in Host.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    authority: HeaderValue,
    path: Uri,
}

/// Only 127.0.0.0/8, ::1 and `localhost` (which must resolve to loopback only).
async fn loopback_target(url: &str) -> Result<Target, String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL {url:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url}: only http:// targets are supported"));
    }
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(80);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addr = if bare.eq_ignore_ascii_case("localhost") {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| format!("{url}: resolving localhost: {e}"))?
            .collect();
        if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "{url}: localhost resolves to a non-loopback address ({addrs:?}); refused"
            ));
        }
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .copied()
            .unwrap_or(addrs[0])
    } else {
        match bare.parse::<IpAddr>() {
            Ok(ip) if ip.is_loopback() => SocketAddr::new(ip, port),
            _ => {
                return Err(format!(
                    "{url}: refused: only loopback targets (127.0.0.0/8, ::1, localhost)"
                ))
            }
        }
    };
    let authority = uri
        .authority()
        .map(|a| a.as_str())
        .unwrap_or(host)
        .parse::<HeaderValue>()
        .map_err(|e| e.to_string())?;
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .parse::<Uri>()
        .map_err(|e| e.to_string())?;
    Ok(Target {
        addr,
        authority,
        path,
    })
}

/// One request as every connection sends it.
struct Plan {
    target: Target,
    /// The key, and how many distinct suffixes to cycle through.
    key: Option<(String, Option<u64>)>,
    expect: Vec<u16>,
    body: Bytes,
    headers: Vec<(HeaderName, HeaderValue)>,
    stream: bool,
    timeout: Duration,
}

impl Plan {
    fn answered(&self, status: u16) -> bool {
        (200..300).contains(&status) || self.expect.contains(&status)
    }

    fn request(&self, k: u64) -> Request<Full<Bytes>> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.target.path.clone())
            .body(Full::new(self.body.clone()))
            .expect("static request parts");
        let h = req.headers_mut();
        h.insert(header::HOST, self.target.authority.clone());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some((key, distinct)) = &self.key {
            let bearer = match distinct {
                Some(n) => format!("Bearer {key}-{:08}", k % n.max(&1)),
                None => format!("Bearer {key}"),
            };
            if let Ok(v) = HeaderValue::from_str(&bearer) {
                h.insert(header::AUTHORIZATION, v);
            }
        }
        for (n, v) in &self.headers {
            h.insert(n.clone(), v.clone());
        }
        req
    }
}

fn build_plan(args: &Args, target: Target) -> Result<Plan, String> {
    let mut body: Value =
        serde_json::from_str(&args.body).map_err(|e| format!("--body is not JSON: {e}"))?;
    if args.stream {
        let obj = body.as_object_mut().ok_or("--body must be a JSON object")?;
        obj.insert("stream".into(), Value::Bool(true));
        obj.insert(
            "x_mock".into(),
            json!({ "chunks": args.chunks, "delay_ms": args.chunk_delay_ms }),
        );
    }
    let mut headers = Vec::new();
    if let Some(k) = &args.key {
        HeaderValue::from_str(&format!("Bearer {k}")).map_err(|e| e.to_string())?;
    }
    for h in &args.headers {
        let (n, v) = h
            .split_once(':')
            .ok_or_else(|| format!("bad header {h:?}: want \"Name: value\""))?;
        let n = HeaderName::from_bytes(n.trim().as_bytes()).map_err(|e| e.to_string())?;
        let v = HeaderValue::from_str(v.trim()).map_err(|e| e.to_string())?;
        headers.push((n, v));
    }
    Ok(Plan {
        target,
        key: args.key.clone().map(|k| (k, args.distinct_keys)),
        expect: args.expect.clone(),
        body: Bytes::from(serde_json::to_vec(&body).expect("serialising JSON")),
        headers,
        stream: args.stream,
        timeout: Duration::from_millis(args.timeout_ms),
    })
}

type Conn = SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Conn, &'static str> {
    let tcp = TcpStream::connect(addr).await.map_err(|_| "connect")?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| "connect")?;
    tokio::spawn(conn);
    Ok(sender)
}

/// What one exchange measured, relative to `origin` (the time latency is counted from)
/// and `sent` (when the request actually went out).
enum Outcome {
    Answer {
        status: u16,
        /// The stream ended with `data: [DONE]` (always true when not streaming).
        complete: bool,
    },
    Error(&'static str),
}

/// Sends one request on `conn` (connecting first if there is none) and reads the whole
/// answer. Leaves `conn` as `None` when the connection can't be reused.
async fn exchange(
    plan: &Plan,
    conn: &mut Option<Conn>,
    origin: Instant,
    stats: &mut Stats,
    record: bool,
    k: u64,
) -> Outcome {
    let work = async {
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = Some(connect(plan.target.addr).await?);
        }
        let c = conn.as_mut().expect("connected above");
        c.ready().await.map_err(|_| "io")?;
        let sent = Instant::now();
        let resp = c.send_request(plan.request(k)).await.map_err(|_| "io")?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut last: Option<Instant> = None;
        // The last bytes seen, to check the stream's terminator.
        let mut tail: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| "io")?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            if !plan.stream || data.is_empty() {
                continue;
            }
            let now = Instant::now();
            let events = sse_events(data) as u64;
            if record {
                match last {
                    None => {
                        stats.ttfb.saturating_record(us(now - origin));
                    }
                    Some(prev) if events > 0 => {
                        stats.gap.saturating_record(us(now - prev));
                        // Events that arrived in the same read had no gap at all.
                        for _ in 1..events {
                            stats.gap.saturating_record(0);
                        }
                    }
                    Some(_) => {}
                }
                stats.events += events;
            }
            if last.is_none() || events > 0 {
                last = Some(now);
            }
            tail.extend_from_slice(data);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
        let done = Instant::now();
        if record {
            stats.service.saturating_record(us(done - sent));
        }
        let complete = !plan.stream || trim_ascii_end(&tail).ends_with(b"data: [DONE]");
        Ok::<_, &'static str>(Outcome::Answer { status, complete })
    };
    match tokio::time::timeout(plan.timeout, work).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            *conn = None;
            Outcome::Error(e)
        }
        Err(_) => {
            *conn = None;
            Outcome::Error("timeout")
        }
    }
}

/// SSE events completed in this frame (their "\n\n" terminators).
fn sse_events(data: &[u8]) -> usize {
    data.windows(2).filter(|w| w == b"\n\n").count()
}

fn trim_ascii_end(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &b[..end]
}

fn count(plan: &Plan, stats: &mut Stats, origin: Instant, outcome: Outcome) {
    match outcome {
        Outcome::Answer { status, complete } => {
            *stats.status.entry(status).or_default() += 1;
            if !complete {
                *stats.errors.entry("truncated_stream").or_default() += 1;
            } else if plan.answered(status) {
                stats.ok += 1;
                stats.latency.saturating_record(us(origin.elapsed()));
            }
        }
        Outcome::Error(e) => *stats.errors.entry(e).or_default() += 1,
    }
}

/// The load of one phase (warm-up or measured).
#[derive(Clone, Copy)]
struct Phase {
    start: Instant,
    deadline: Instant,
    cap: u64,
    rate: Option<f64>,
    record: bool,
}

async fn worker(
    plan: Arc<Plan>,
    phase: Phase,
    next: Arc<AtomicU64>,
    mut conn: Option<Conn>,
) -> (Stats, Option<Conn>) {
    let mut stats = Stats::new();
    loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        if k >= phase.cap {
            break;
        }
        let origin = match phase.rate {
            Some(rate) => {
                let intended = phase.start + Duration::from_secs_f64(k as f64 / rate);
                if intended >= phase.deadline {
                    break;
                }
                let now = Instant::now();
                if now >= phase.deadline {
                    // Too far behind to send it within the run: counted as unsent.
                    break;
                }
                if now < intended {
                    tokio::time::sleep_until(intended).await;
                    // Waited for its slot: count from the wake-up (timer slack is ours).
                    Instant::now()
                } else {
                    // Behind schedule: count from the slot (coordinated omission).
                    if phase.record {
                        stats.send_lag.saturating_record(us(now - intended));
                    }
                    intended
                }
            }
            None => {
                let now = Instant::now();
                if now >= phase.deadline {
                    break;
                }
                now
            }
        };
        let outcome = exchange(&plan, &mut conn, origin, &mut stats, phase.record, k).await;
        if phase.record {
            count(&plan, &mut stats, origin, outcome);
        }
    }
    (stats, conn)
}

async fn run_phase(
    plan: &Arc<Plan>,
    conns: Vec<Option<Conn>>,
    duration: Duration,
    cap: u64,
    rate: Option<f64>,
    record: bool,
) -> (Stats, Vec<Option<Conn>>, Duration) {
    let start = Instant::now();
    let phase = Phase {
        start,
        deadline: start + duration,
        cap,
        rate,
        record,
    };
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for c in conns {
        set.spawn(worker(plan.clone(), phase, next.clone(), c));
    }
    let mut total = Stats::new();
    let mut back = Vec::new();
    while let Some(r) = set.join_next().await {
        let (s, c) = r.expect("worker panicked");
        total.merge(&s);
        back.push(c);
    }
    if let (Some(rate), true) = (rate, record) {
        // Slots the schedule held before the deadline that never went out: the
        // target (or this generator) could not keep the rate, so the run is invalid.
        let due = ((duration.as_secs_f64() * rate).ceil() as u64).min(cap);
        let unsent = due.saturating_sub(total.total());
        if unsent > 0 {
            total.errors.insert("unsent_at_deadline", unsent);
        }
    }
    (total, back, start.elapsed())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.connections == 0 || args.threads == 0 {
        eprintln!("--connections and --threads must be at least 1");
        return ExitCode::from(1);
    }
    if let Some(r) = args.rate {
        if !(r.is_finite() && r > 0.0) {
            eprintln!("--rate must be positive");
            return ExitCode::from(1);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let target = match loopback_target(&args.url).await {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        };
        let plan = match build_plan(&args, target) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        };
        let conns = (0..args.connections).map(|_| None).collect();
        let conns = if args.warmup.is_zero() {
            conns
        } else {
            run_phase(&plan, conns, args.warmup, u64::MAX, args.rate, false)
                .await
                .1
        };
        let cpu0 = cpu_seconds();
        let (stats, _, elapsed) = run_phase(
            &plan,
            conns,
            args.duration,
            args.max_requests,
            args.rate,
            true,
        )
        .await;
        let cpu = cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
        if report(&args, &stats, elapsed, cpu) {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        }
    })
}
