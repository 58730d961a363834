//! The client listener under hostile or sloppy clients, and what crosses the gateway in
//! each direction: slow heads and bodies, idle keep-alive, the connection cap, malformed
//! and Host-less requests, pipelining, abandoned connections, header allow-lists, streams
//! without `[DONE]`, POSTs never resent, and the drain deadline. Real binary, real SQLite
//! file, the in-repo mock upstream; loopback only; every loop bounded in count and time.
//!
//! Tests that set `server.connections` can be run against a build that predates that
//! section with `TOLLGATE_DEFAULT_CONNECTIONS=1`: the section is then left out of the
//! config and the test expects the documented defaults (head 10 s, body 60 s, keep-alive
//! 60 s, 10 000 connections).

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use support::{Gateway, MockServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROVIDER_KEY: &str = "sk-provider-SECRET-0123456789abcdef";

// ---------------------------------------------------------------------------------------
// Harness pieces
// ---------------------------------------------------------------------------------------

/// `server.connections` as a test sets it, and the values the test then expects.
#[derive(Clone, Copy)]
struct Limits {
    head_timeout_ms: u64,
    body_timeout_ms: u64,
    body_idle_timeout_ms: u64,
    keepalive_timeout_s: u64,
    max_connections: usize,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        head_timeout_ms: 10_000,
        body_timeout_ms: 60_000,
        body_idle_timeout_ms: 10_000,
        keepalive_timeout_s: 60,
        max_connections: 10_000,
    };

    /// Whether the section is left out (to run against a build that does not know it).
    fn defaults_only() -> bool {
        std::env::var_os("TOLLGATE_DEFAULT_CONNECTIONS").is_some()
    }

    /// `self` as configured, or the defaults when the section is left out.
    fn effective(self) -> Limits {
        if Self::defaults_only() {
            Self::DEFAULT
        } else {
            self
        }
    }

    /// The `server:` lines for these limits (none when the section is left out).
    fn yaml(self) -> String {
        if Self::defaults_only() {
            return String::new();
        }
        format!(
            "  connections: {{ head_timeout_ms: {}, body_timeout_ms: {}, body_idle_timeout_ms: {}, keepalive_timeout_s: {}, max_connections: {} }}\n",
            self.head_timeout_ms,
            self.body_timeout_ms,
            self.body_idle_timeout_ms,
            self.keepalive_timeout_s,
            self.max_connections
        )
    }
}

fn channel_yaml(mock: &MockServer) -> String {
    format!(
        "  - {{ name: main, base_url: \"{}\", api_key: \"{PROVIDER_KEY}\", models: [m1, m2] }}\n",
        mock.base_url()
    )
}

/// A mock and a gateway with one channel for `m1`/`m2`; `server` lines go under `server:`,
/// `extra` at the top level.
async fn start(server: String, extra: &str) -> (MockServer, Gateway) {
    let mock = MockServer::start().await;
    let ch = channel_yaml(&mock);
    let extra = extra.to_owned();
    let gw = tokio::task::spawn_blocking(move || Gateway::start_with_server(&ch, &server, &extra))
        .await
        .unwrap();
    (mock, gw)
}

/// A gateway with limits (which may be the defaults, see [`Limits::defaults_only`]).
async fn start_limited(limits: Limits) -> (MockServer, Gateway, Limits) {
    let (mock, gw) = start(limits.yaml(), "").await;
    (mock, gw, limits.effective())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

/// Raises this process's open-file soft limit to its hard limit (the gateway, started
/// after, inherits it) and returns the new soft limit.
fn raise_nofile_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
        r.rlim_cur
    }
}

/// The value of one sample line of the admin listener's `/metrics` (`name` may include
/// labels), if present.
async fn metric(gw: &Gateway, name: &str) -> Option<f64> {
    let text = client()
        .get(gw.admin_url("/metrics"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Polls `/metrics` (bounded) until `name` satisfies `ok`; returns the last value seen.
async fn wait_metric(
    gw: &Gateway,
    name: &str,
    limit: Duration,
    ok: impl Fn(f64) -> bool,
) -> Option<f64> {
    let deadline = Instant::now() + limit;
    loop {
        let v = metric(gw, name).await;
        if v.is_some_and(&ok) || Instant::now() >= deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn db(gw: &Gateway) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c
}

fn ledger_count(gw: &Gateway) -> i64 {
    db(gw)
        .query_row("SELECT COUNT(*) FROM usage_ledger", [], |r| r.get(0))
        .unwrap()
}

/// A parsed HTTP/1.1 response read off a raw connection.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// Lower-case names, in order.
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

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} {:?}",
                self.headers,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// One raw client connection, so the test controls every byte (clients fold or refuse
/// what these tests send) and can see the connection close.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(port: u16) -> Raw {
        let s = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        s.set_nodelay(true).unwrap();
        Raw { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    /// Reads more into the buffer; `Ok(0)` at EOF; an error on timeout or reset.
    async fn fill(&mut self, deadline: Instant) -> std::io::Result<usize> {
        let mut tmp = [0u8; 16 * 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.s.read(&mut tmp)).await {
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&tmp[..n]);
                Ok(n)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            )),
        }
    }

    /// The next whole response (Content-Length, chunked, or up to EOF), within `limit`.
    async fn response(&mut self, limit: Duration) -> Resp {
        let deadline = Instant::now() + limit;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i;
            }
            let n = self.fill(deadline).await.expect("response head");
            assert!(
                n > 0,
                "connection closed before a response head; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_string();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
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
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                let n = self.fill(deadline).await.expect("response body");
                assert!(n > 0, "connection closed inside a response body");
            }
            resp.body = self.buf.drain(..len).collect();
        } else if resp
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            loop {
                let line_end = loop {
                    if let Some(i) = find(&self.buf, b"\r\n") {
                        break i;
                    }
                    let n = self.fill(deadline).await.expect("chunk size");
                    assert!(n > 0, "connection closed inside a chunked body");
                };
                let size_text = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
                let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                    .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
                while self.buf.len() < line_end + 2 + size + 2 {
                    let n = self.fill(deadline).await.expect("chunk");
                    assert!(n > 0, "connection closed inside a chunk");
                }
                resp.body
                    .extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while let Ok(n) = self.fill(deadline).await {
                if n == 0 {
                    break;
                }
            }
            resp.body = std::mem::take(&mut self.buf);
        }
        resp
    }

    /// Reads (discarding) until the gateway closes the connection; how long that took, or
    /// `None` if it was still open after `limit`.
    async fn closed_within(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let deadline = start + limit;
        loop {
            match self.fill(deadline).await {
                Ok(0) => return Some(start.elapsed()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
                Err(_) => return Some(start.elapsed()),
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn get_models(key: &str) -> String {
    format!("GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n")
}

fn post_chat(key: &str, body: &Value, extra_headers: &str) -> String {
    let body = body.to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

/// Starts a gateway for the drip tests, with a key.
async fn drip_gateway(head_timeout_ms: u64) -> (MockServer, Gateway, Limits, String) {
    let (mock, gw, limits) = start_limited(Limits {
        head_timeout_ms,
        ..Limits::DEFAULT
    })
    .await;
    let key = gw.new_key("acme", &[]);
    (mock, gw, limits, key)
}

/// One slow client: connects, writes one byte of a request head every `every`, and
/// reports how long after connecting the gateway closed the connection (or an error if
/// it was still open after `max_drips` bytes).
async fn drip_head(port: u16, every: Duration, max_drips: usize) -> Result<Duration, String> {
    const HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n";
    let mut s = match tokio::time::timeout(
        Duration::from_secs(10),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err("connect timed out".into()),
    };
    let start = Instant::now();
    let mut tmp = [0u8; 1024];
    for i in 0..max_drips.min(HEAD.len()) {
        if s.write_all(&HEAD[i..i + 1]).await.is_err() {
            return Ok(start.elapsed());
        }
        let next = start + every * (i as u32 + 1);
        loop {
            let left = next.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.read(&mut tmp)).await {
                // Closed (EOF or reset).
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
                // Bytes before the head was complete: not expected, but keep watching.
                Ok(Ok(_)) => continue,
                Err(_) => break,
            }
        }
    }
    Err(format!(
        "still open after {:?} and {max_drips} bytes",
        start.elapsed()
    ))
}

// ---------------------------------------------------------------------------------------
// 1. Slow clients, idle connections, the connection cap
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_dripping_a_byte_every_5s_are_all_closed_by_the_head_deadline_while_requests_are_served(
) {
    const SLOW: usize = 2000;
    let nofile = raise_nofile_limit();
    assert!(
        nofile >= 2 * SLOW as u64 + 500,
        "RLIMIT_NOFILE hard limit {nofile} is too low for {SLOW} connections"
    );
    let (mock, gw, limits, key) = drip_gateway(3000).await;
    let head = Duration::from_millis(limits.head_timeout_ms);
    let every = Duration::from_secs(5);
    // Enough drips to outlast the deadline by two intervals, never more.
    let max_drips = (limits.head_timeout_ms / 5000) as usize + 3;

    let started = Instant::now();
    let port = gw.port;
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(200));
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..SLOW {
        let gate = gate.clone();
        slow.spawn(async move {
            // At most 200 connects in flight, so the listen backlog never overflows.
            let permit = gate.acquire_owned().await.unwrap();
            let conn = tokio::spawn(drip_head(port, every, max_drips));
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(permit);
            conn.await.unwrap()
        });
    }

    // Normal requests, each on a new connection, all the while the slow ones are open.
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let bound = head + every * max_drips as u32 + Duration::from_secs(15);
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    let mut closes = Vec::with_capacity(SLOW);
    let mut failures = Vec::new();
    while !slow.is_empty() && started.elapsed() < bound {
        let t = Instant::now();
        let r = fresh
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat("m1"))
            .send()
            .await;
        let status = match r {
            Ok(r) => r.status().as_u16(),
            Err(e) => panic!(
                "a normal request failed after {:?} with {SLOW} slow clients open: {e}",
                started.elapsed()
            ),
        };
        assert_eq!(status, 200, "a normal request was refused");
        served += 1;
        slowest = slowest.max(t.elapsed());
        // Collect the slow clients that have finished, without waiting on the rest.
        let pause = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                Some(done) = slow.join_next() => match done.unwrap() {
                    Ok(d) => closes.push(d),
                    Err(e) => failures.push(e),
                },
                _ = &mut pause => break,
            }
        }
    }
    slow.abort_all();
    assert!(
        failures.is_empty() && closes.len() == SLOW,
        "{} of {SLOW} slow connections closed; {} failed, e.g. {:?}",
        closes.len(),
        failures.len(),
        failures.first()
    );
    let latest = closes.iter().max().unwrap();
    let earliest = closes.iter().min().unwrap();
    assert!(
        *latest <= head + Duration::from_millis(2500),
        "a slow connection lived {latest:?} (head deadline {head:?})"
    );
    assert!(
        *earliest + Duration::from_millis(200) >= head,
        "a slow connection was closed after {earliest:?}, before the {head:?} deadline"
    );
    assert!(
        served >= 5,
        "only {served} requests were served while the slow clients were open"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a normal request took {slowest:?}"
    );
    assert_eq!(
        mock.requests().len(),
        served,
        "every normal request reached the mock"
    );
    let timeouts = wait_metric(
        &gw,
        "tollgate_request_head_timeouts_total",
        Duration::from_secs(5),
        |v| v >= SLOW as f64,
    )
    .await;
    assert_eq!(timeouts, Some(SLOW as f64));
    let open = wait_metric(
        &gw,
        "tollgate_connections_open",
        Duration::from_secs(5),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(open, Some(0.0), "the open-connections gauge came back to 0");
    eprintln!(
        "{SLOW} slow connections closed between {earliest:?} and {latest:?}; {served} requests served meanwhile, slowest {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_stop_a_normal_request_and_are_closed_by_the_head_deadline(
) {
    const IDLE: usize = 2000;
    let nofile = raise_nofile_limit();
    assert!(
        nofile >= 2 * IDLE as u64 + 500,
        "RLIMIT_NOFILE hard limit {nofile} is too low for {IDLE} connections"
    );
    let (mock, gw, limits, key) = drip_gateway(3000).await;
    let head = Duration::from_millis(limits.head_timeout_ms);
    // Connected and silent: not a byte is ever written on them.
    let started = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for chunk in 0..IDLE / 200 {
        let batch = (0..200).map(|_| {
            tokio::time::timeout(
                Duration::from_secs(10),
                TcpStream::connect(("127.0.0.1", gw.port)),
            )
        });
        for (i, c) in futures_util::future::join_all(batch)
            .await
            .into_iter()
            .enumerate()
        {
            match c {
                Ok(Ok(s)) => idle.push(s),
                other => panic!(
                    "idle connection {} did not connect: {other:?}",
                    chunk * 200 + i
                ),
            }
        }
    }
    let opened = started.elapsed();
    // While all of them are open, a normal request on a new connection is served at once.
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let t = Instant::now();
    let r = fresh
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat("m1"))
        .send()
        .await
        .expect("a normal request is answered while 2,000 idle connections are open");
    assert_eq!(r.status(), 200);
    let took = t.elapsed();
    assert!(
        started.elapsed() < head,
        "the idle connections were opened in {opened:?}; the request came too late to count"
    );
    assert_eq!(mock.requests().len(), 1);
    // Each idle connection is closed by the head deadline (bounded wait).
    let bound = started + head + Duration::from_secs(10);
    let mut still_open = 0;
    for mut s in idle {
        let left = bound.saturating_duration_since(Instant::now());
        let mut tmp = [0u8; 256];
        match tokio::time::timeout(left, s.read(&mut tmp)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {}
            Ok(Ok(n)) => panic!("an idle connection got {n} bytes: {:?}", &tmp[..n]),
            Err(_) => still_open += 1,
        }
    }
    assert_eq!(still_open, 0, "idle connections outlived the head deadline");
    eprintln!("{IDLE} idle connections opened in {opened:?}; a normal request took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_deadline_is_total_not_per_read() {
    let (_mock, gw, limits, _key) = drip_gateway(2000).await;
    let head = Duration::from_millis(limits.head_timeout_ms);
    // A byte every 300 ms: no single read is ever slow, the head as a whole is.
    let every = Duration::from_millis(300);
    let max_drips = (limits.head_timeout_ms / 300) as usize + 10;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        set.spawn(drip_head(gw.port, every, max_drips));
    }
    let mut closes = Vec::new();
    while let Some(r) = set.join_next().await {
        closes.push(r.unwrap().expect("closed by the head deadline"));
    }
    for d in &closes {
        assert!(
            *d + Duration::from_millis(200) >= head && *d <= head + Duration::from_millis(1500),
            "closed after {d:?}, deadline {head:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_idle_past_keepalive_timeout_is_closed() {
    let (_mock, gw, limits) = start_limited(Limits {
        keepalive_timeout_s: 2,
        ..Limits::DEFAULT
    })
    .await;
    let key = gw.new_key("acme", &[]);
    let idle = Duration::from_secs(limits.keepalive_timeout_s);
    let mut c = Raw::connect(gw.port).await;
    c.send(get_models(&key).as_bytes()).await;
    let r = c.response(Duration::from_secs(5)).await;
    assert_eq!(r.status, 200);
    // Well inside the timeout the connection is still usable...
    tokio::time::sleep(idle / 4).await;
    c.send(get_models(&key).as_bytes()).await;
    let r = c.response(Duration::from_secs(5)).await;
    assert_eq!(r.status, 200, "kept alive within the timeout");
    // ... and past it, the gateway closes it.
    let closed = c.closed_within(idle + Duration::from_secs(5)).await;
    let closed = closed.unwrap_or_else(|| {
        panic!(
            "still open {:?} after the last response (keepalive_timeout_s {})",
            idle + Duration::from_secs(5),
            limits.keepalive_timeout_s
        )
    });
    assert!(
        closed + Duration::from_millis(300) >= idle && closed <= idle + Duration::from_secs(2),
        "closed after {closed:?}, keep-alive timeout {idle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_dripped_past_body_timeout_gets_408_request_timeout() {
    let (mock, gw, limits) = start_limited(Limits {
        body_timeout_ms: 2000,
        body_idle_timeout_ms: 5000,
        ..Limits::DEFAULT
    })
    .await;
    let key = gw.new_key("acme", &[]);
    let total = Duration::from_millis(limits.body_timeout_ms);
    let mut c = Raw::connect(gw.port).await;
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let start = Instant::now();
    // One body byte every 250 ms: never idle for long, never finished in time.
    let every = Duration::from_millis(250);
    let max_drips = (total.as_millis() / every.as_millis()) as u32 + 40;
    let mut drips = 0;
    {
        let (mut rd, mut wr) = c.s.split();
        let mut tmp = [0u8; 4096];
        while find(&c.buf, b"\r\n\r\n").is_none() && drips < max_drips {
            tokio::select! {
                r = rd.read(&mut tmp) => match r {
                    Ok(n) if n > 0 => c.buf.extend_from_slice(&tmp[..n]),
                    _ => break,
                },
                _ = tokio::time::sleep_until((start + every * drips).into()) => {
                    if wr.write_all(b" ").await.is_err() {
                        break;
                    }
                    drips += 1;
                }
            }
        }
    }
    let took = start.elapsed();
    assert!(
        find(&c.buf, b"\r\n\r\n").is_some(),
        "no answer {took:?} into a body still arriving (body_timeout_ms {}); got {:?}",
        limits.body_timeout_ms,
        String::from_utf8_lossy(&c.buf)
    );
    let r = c.response(Duration::from_secs(2)).await;
    assert_eq!(r.status, 408, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "request_timeout");
    assert!(
        took + Duration::from_millis(200) >= total && took <= total + Duration::from_millis(1500),
        "answered after {took:?}, body deadline {total:?}"
    );
    assert!(mock.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_get_a_503_too_many_connections_and_are_closed() {
    let nofile = raise_nofile_limit();
    let (_mock, gw, limits) = start_limited(Limits {
        max_connections: 3,
        ..Limits::DEFAULT
    })
    .await;
    let cap = limits.max_connections;
    assert!(
        nofile as usize > cap + 500,
        "RLIMIT_NOFILE {nofile} is too low for {cap} connections"
    );
    let key = gw.new_key("acme", &[]);
    // Fill every slot with a connection that has sent nothing yet (well inside the head
    // deadline), and one that is mid-request.
    let mut held = Vec::with_capacity(cap);
    let mut busy = Raw::connect(gw.port).await;
    busy.send(get_models(&key).as_bytes()).await;
    assert_eq!(busy.response(Duration::from_secs(5)).await.status, 200);
    held.push(busy);
    for _ in 1..cap {
        held.push(Raw::connect(gw.port).await);
    }
    let open = wait_metric(
        &gw,
        "tollgate_connections_open",
        Duration::from_secs(3),
        |v| v >= cap as f64,
    )
    .await;

    // The next one is refused before anything is read from it: it has sent nothing.
    let mut extra = Raw::connect(gw.port).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while find(&extra.buf, b"\r\n\r\n").is_none() {
        match extra.fill(deadline).await {
            Ok(n) if n > 0 => {}
            other => panic!(
                "connection {} (cap {cap}) got no answer before sending anything: {other:?}",
                cap + 1
            ),
        }
    }
    let r = extra.response(Duration::from_secs(5)).await;
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "too_many_connections");
    assert!(
        extra.closed_within(Duration::from_secs(2)).await.is_some(),
        "the refused connection is closed"
    );
    assert_eq!(open, Some(cap as f64), "every held connection held a slot");
    let refused = wait_metric(
        &gw,
        "tollgate_connections_refused_total",
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(refused, Some(1.0));

    // A freed slot serves again.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    while Instant::now() < deadline {
        let mut c = Raw::connect(gw.port).await;
        c.send(get_models(&key).as_bytes()).await;
        status = c.response(Duration::from_secs(5)).await.status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "a slot came back when a connection closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_closes_the_connection() {
    let (_mock, gw) = start(String::new(), "").await;
    let mut c = Raw::connect(gw.port).await;
    c.send(get_models("sk-tg-not-a-key").as_bytes()).await;
    let r = c.response(Duration::from_secs(5)).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "{r:?}"
    );
    assert!(
        c.closed_within(Duration::from_secs(3)).await.is_some(),
        "the connection is closed after a 401"
    );
}

// ---------------------------------------------------------------------------------------
// 2-5. Malformed heads, Host, pipelining, abandoned connections
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_head_gets_a_400_in_openai_error_json_with_a_request_id() {
    let (mock, gw) = start(String::new(), "").await;
    for head in [
        "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        "GARBAGE\r\n\r\n",
        "GET /v1/models HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    ] {
        let mut c = Raw::connect(gw.port).await;
        c.send(head.as_bytes()).await;
        let r = c.response(Duration::from_secs(5)).await;
        assert_eq!(r.status, 400, "{head:?}: {r:?}");
        assert!(
            r.header("x-request-id")
                .is_some_and(|id| id.starts_with("req_")),
            "{head:?}: no x-request-id in {:?}",
            r.headers
        );
        assert!(
            !r.header("server").is_some_and(|s| s.contains("Pingora")),
            "{head:?}: {:?}",
            r.headers
        );
        let v = r.json();
        let err = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
        for field in ["message", "type", "param", "code"] {
            assert!(err.contains_key(field), "{head:?}: no {field} in {v}");
        }
        assert!(err["message"].is_string());
        assert_eq!(err["type"], "invalid_request_error");
        assert!(c.closed_within(Duration::from_secs(3)).await.is_some());
    }
    assert!(mock.requests().is_empty());
    let n = wait_metric(
        &gw,
        "tollgate_malformed_requests_total",
        Duration::from_secs(5),
        |v| v >= 3.0,
    )
    .await;
    assert_eq!(n, Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http11_request_without_host_gets_400() {
    let (mock, gw) = start(String::new(), "").await;
    let key = gw.new_key("acme", &[]);
    let body = chat("m1").to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut c = Raw::connect(gw.port).await;
    c.send(req.as_bytes()).await;
    let r = c.response(Duration::from_secs(5)).await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(mock.requests().is_empty(), "nothing reached the provider");
    // The same request with a Host is served: the Host was what was missing.
    let mut c = Raw::connect(gw.port).await;
    c.send(post_chat(&key, &chat("m1"), "").as_bytes()).await;
    assert_eq!(c.response(Duration::from_secs(5)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_on_one_connection_are_all_answered_in_order() {
    let (mock, gw) = start(String::new(), "").await;
    let key = gw.new_key("acme", &[]);
    // The first is the slowest, so answering out of order would show.
    let first = post_chat(
        &key,
        &json!({"model": "m1", "messages": [], "x_mock": {"chunks": 1, "delay_ms": 300}}),
        "",
    );
    let second = post_chat(
        &key,
        &json!({"model": "m2", "messages": [], "x_mock": {"chunks": 2}}),
        "",
    );
    let third = format!(
        "GET /v1/models/m2 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
    );
    let mut c = Raw::connect(gw.port).await;
    c.send(format!("{first}{second}{third}").as_bytes()).await;
    let r1 = c.response(Duration::from_secs(10)).await;
    let r2 = c.response(Duration::from_secs(10)).await;
    let r3 = c.response(Duration::from_secs(10)).await;
    assert_eq!((r1.status, r2.status, r3.status), (200, 200, 200));
    let (v1, v2, v3) = (r1.json(), r2.json(), r3.json());
    assert_eq!(v1["model"], "m1", "{v1}");
    assert_eq!(v1["choices"][0]["message"]["content"], "tok0 ");
    assert_eq!(v2["model"], "m2", "{v2}");
    assert_eq!(v2["choices"][0]["message"]["content"], "tok0 tok1 ");
    assert_eq!(v3["id"], "m2", "{v3}");
    let ids: Vec<_> = [&r1, &r2, &r3]
        .iter()
        .map(|r| r.header("x-request-id").unwrap().to_string())
        .collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2]);
    let models: Vec<_> = mock
        .requests()
        .iter()
        .map(|r| r.json().unwrap()["model"].clone())
        .collect();
    assert_eq!(models, ["m1", "m2"], "forwarded once each, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_before_a_full_request_head_is_counted_as_abandoned_and_logs_no_error()
{
    let (mock, gw) = start(String::new(), "").await;
    for partial in [
        "POST /v1/chat/comp",
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthori",
        "G",
    ] {
        let mut c = Raw::connect(gw.port).await;
        c.send(partial.as_bytes()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(c);
    }
    let n = wait_metric(
        &gw,
        "tollgate_connections_abandoned_total",
        Duration::from_secs(5),
        |v| v >= 3.0,
    )
    .await;
    // Give the log a moment to flush anything it was going to write.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gw.log();
    let errors: Vec<_> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "ERROR lines:\n{}", errors.join("\n"));
    assert_eq!(n, Some(3.0), "tollgate_connections_abandoned_total");
    assert!(mock.requests().is_empty());
}

// ---------------------------------------------------------------------------------------
// 6-7. Headers in each direction
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_response_headers_reach_the_client_by_allow_list_only_and_never_with_the_channel_key(
) {
    let (_mock, gw) = start(String::new(), "").await;
    let key = gw.new_key("acme", &[]);
    let tail = &PROVIDER_KEY[PROVIDER_KEY.len() - 8..];
    let x_mock = json!({
        "echo_auth_in_header": true,
        "response_headers": {
            "openai-processing-ms": "7",
            "anthropic-ratelimit-requests-remaining": "9",
            "openai-organization": "org-provider-account",
            "openai-project": "proj-provider-account",
            "etag": "\"e1\"",
            "content-language": "en",
            "vary": "Origin",
            "set-cookie": "session=provider",
            "server": "provider-frontend",
            "x-powered-by": "provider",
            "x-envoy-upstream-service-time": "12",
            "openai-echo": format!("masked ...{tail}"),
        }
    });
    for stream in [false, true] {
        let body = json!({"model": "m1", "stream": stream, "messages": [], "x_mock": x_mock});
        let r = support::post(&gw, &key, "/v1/chat/completions", &body).await;
        assert_eq!(r.status(), 200);
        let h = r.headers().clone();
        let text = r.text().await.unwrap();
        let what = if stream { "stream" } else { "json" };
        for (name, value) in &h {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !v.contains(PROVIDER_KEY) && !v.contains(tail),
                "{what}: the channel key reached the client in {name}: {v}"
            );
        }
        for gone in [
            "x-debug-auth",
            "openai-debug-auth",
            "openai-debug-key-tail",
            "openai-echo",
            "x-internal-thing",
            "openai-organization",
            "openai-project",
            "set-cookie",
            "x-powered-by",
            "x-envoy-upstream-service-time",
        ] {
            assert!(
                !h.contains_key(gone),
                "{what}: {gone} reached the client: {h:?}"
            );
        }
        assert!(
            h.get("server")
                .is_none_or(|s| s.to_str().unwrap() != "provider-frontend"),
            "{what}: the provider's Server header reached the client"
        );
        for (name, want) in [
            ("openai-processing-ms", "7"),
            ("anthropic-ratelimit-requests-remaining", "9"),
            ("etag", "\"e1\""),
            ("content-language", "en"),
            ("vary", "Origin"),
        ] {
            assert_eq!(
                h.get(name).map(|v| v.to_str().unwrap()),
                Some(want),
                "{what}: allowed header {name} missing: {h:?}"
            );
        }
        assert!(
            h["x-upstream-request-id"]
                .to_str()
                .unwrap()
                .starts_with("req_mock_"),
            "{what}: {h:?}"
        );
        assert!(h["x-request-id"].to_str().unwrap().starts_with("req_"));
        assert!(!text.contains(PROVIDER_KEY), "{what}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_connection_named_and_forwarding_headers_never_reach_the_provider() {
    let (mock, gw) = start(String::new(), "").await;
    let key = gw.new_key("acme", &[]);
    let headers = "Connection: keep-alive, X-Drop-Me\r\nX-Drop-Me: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: x-t\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nVia: 1.1 client-proxy\r\nX-Real-IP: 203.0.113.9\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nForwarded: for=203.0.113.9\r\nX-Keep: kept\r\n";
    let mut c = Raw::connect(gw.port).await;
    c.send(post_chat(&key, &chat("m1"), headers).as_bytes())
        .await;
    assert_eq!(c.response(Duration::from_secs(5)).await.status, 200);
    let got = mock.requests();
    assert_eq!(got.len(), 1);
    let req = &got[0];
    for gone in [
        "x-drop-me",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "proxy-authorization",
        "via",
        "x-real-ip",
        "x-forwarded-host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "forwarded",
    ] {
        assert_eq!(
            req.header(gone),
            None,
            "{gone} reached the provider: {:?}",
            req.headers
        );
    }
    if let Some(conn) = req.header("connection") {
        assert!(!conn.to_ascii_lowercase().contains("x-drop-me"), "{conn}");
    }
    assert_eq!(
        req.header("x-keep"),
        Some("kept"),
        "ordinary headers still pass"
    );

    // 40 KB of client headers: at most 16 KiB of them are forwarded.
    let pad: String = (0..40)
        .map(|i| format!("X-Pad-{i:02}: {}\r\n", "p".repeat(1000)))
        .collect();
    let mut c = Raw::connect(gw.port).await;
    c.send(post_chat(&key, &chat("m1"), &pad).as_bytes()).await;
    assert_eq!(c.response(Duration::from_secs(5)).await.status, 200);
    let got = mock.requests();
    assert_eq!(got.len(), 2);
    let padded: Vec<_> = got[1]
        .headers
        .iter()
        .filter(|(n, _)| n.starts_with("x-pad-"))
        .collect();
    let bytes: usize = got[1]
        .headers
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "host" | "authorization" | "content-length"))
        .map(|(n, v)| n.len() + v.len())
        .sum();
    assert!(
        bytes <= 16 * 1024,
        "{bytes} bytes of client headers forwarded ({} pads)",
        padded.len()
    );
    assert!(padded.len() >= 10, "only {} pads forwarded", padded.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_names_with_underscores_never_reach_the_provider() {
    let (mock, gw) = start(String::new(), "").await;
    let key = gw.new_key("acme", &[]);
    let mut statuses = Vec::new();
    for header in ["Transfer_Encoding: chunked\r\n", "X_Tenant: other\r\n"] {
        let mut c = Raw::connect(gw.port).await;
        c.send(post_chat(&key, &chat("m1"), header).as_bytes())
            .await;
        let r = c.response(Duration::from_secs(5)).await;
        statuses.push(r.status);
        if r.status == 400 {
            assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        }
    }
    for req in mock.requests() {
        for (name, _) in &req.headers {
            assert!(!name.contains('_'), "{name} reached the provider");
        }
    }
    eprintln!("underscore header answers: {statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 400),
        "a request with an underscore header name is refused with 400: {statuses:?}"
    );
    assert!(mock.requests().is_empty());
}

// ---------------------------------------------------------------------------------------
// 8-10. Streams without [DONE], POSTs never resent, the drain deadline
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_stream_ending_without_done_reaches_the_client_broken_and_is_billed_as_estimated()
{
    let (mock, gw) = start(String::new(), "").await;
    let key = gw.new_key("acme", &[]);
    // The provider reports no usage and ends the body cleanly after the finish chunk, with
    // no `data: [DONE]`.
    let body = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"chunks": 4, "omit_done": true, "usage": "none"}});
    let r = support::post(&gw, &key, "/v1/chat/completions", &body).await;
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut stream = r.bytes_stream();
    let mut text = String::new();
    let mut broken = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(b))) => text.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Err(_))) => {
                broken = true;
                break;
            }
            Ok(None) => break,
            Err(_) => panic!("the stream neither ended nor broke: {text}"),
        }
    }
    assert!(text.contains("tok3"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(
        broken,
        "a stream without [DONE] must not look complete to the client:\n{text}"
    );
    assert_eq!(mock.requests().len(), 1);
    // Its ledger row is an estimate.
    let deadline = Instant::now() + Duration::from_secs(10);
    let estimated = loop {
        let row: Option<i64> = db(&gw)
            .query_row(
                "SELECT estimated FROM usage_ledger WHERE request_id = ?1",
                [&rid],
                |r| r.get(0),
            )
            .ok();
        if let Some(e) = row {
            break e;
        }
        assert!(Instant::now() < deadline, "no ledger row for {rid}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(estimated, 1, "billed as estimated");
    // ... because the stream was cut, not merely because no usage came.
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        let log = gw.log();
        if let Some(l) = log
            .lines()
            .find(|l| l.contains(&rid) && l.contains("estimated="))
        {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no access log line for {rid}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        line.contains("estimated=\"cut\"") || line.contains("estimated=cut"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_provider_read_in_full_before_resetting_a_reused_connection_is_never_resent() {
    let (mock, gw) = start(String::new(), "").await;
    let key = gw.new_key("acme", &[]);
    let r = support::post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 200, "warms the upstream connection pool");
    r.text().await.unwrap();
    let body = json!({"model": "m1", "messages": [{"role": "user", "content": "once only"}], "x_mock": {"reset_after_body": true}});
    let r = support::post(&gw, &key, "/v1/chat/completions", &body).await;
    let status = r.status().as_u16();
    let _ = r.text().await;
    // Anything resent would have happened before the answer; allow a moment anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = mock.requests();
    let copies: Vec<_> = got
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("once only"))
        .collect();
    assert_eq!(
        got[0].conn, copies[0].conn,
        "the POST went out on the pooled connection (the test's premise)"
    );
    assert_eq!(
        copies.len(),
        1,
        "the POST reached the provider {} times, on connections {:?}",
        copies.len(),
        copies.iter().map(|r| r.conn).collect::<Vec<_>>()
    );
    assert!(
        status >= 500,
        "the client gets a gateway error, got {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_the_provider_read_before_failing_is_not_sent_to_the_next_channel() {
    let first = MockServer::start().await;
    let second = MockServer::start().await;
    let channels = format!(
        "{}{}",
        support::channel("first", &first.base_url(), "sk-one", &["m1"], 10),
        support::channel("second", &second.base_url(), "sk-two", &["m1"], 1),
    );
    let gw = tokio::task::spawn_blocking(move || Gateway::start(&channels, ""))
        .await
        .unwrap();
    let key = gw.new_key("acme", &[]);
    let body = json!({"model": "m1", "messages": [{"role": "user", "content": "once only"}], "x_mock": {"reset_after_body": true}});
    let r = support::post(&gw, &key, "/v1/chat/completions", &body).await;
    let status = r.status().as_u16();
    let _ = r.text().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        first.requests().len(),
        1,
        "the first channel read the request"
    );
    assert!(
        second.requests().is_empty(),
        "the request was sent again, to the second channel"
    );
    assert_eq!(status, 502, "the client gets the gateway's error");
    // A provider that fails before reading anything (refused connection) still fails over.
    drop(first);
    let r = support::post(&gw, &key, "/v1/chat/completions", &chat("m1")).await;
    assert_eq!(r.status(), 200, "the second channel served");
    assert_eq!(second.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_holds_when_the_client_is_gone_before_the_response_head() {
    let (mock, gw) = start(String::new(), "accounting: { drain_timeout_ms: 500 }\n").await;
    let key = gw.new_key("acme", &[]);
    // 60 chunks 400 ms apart: a 24 s stream.
    let body = json!({"model": "m1", "stream": true, "messages": [], "x_mock": {"delay_ms": 400, "chunks": 60}});
    let mut c = Raw::connect(gw.port).await;
    c.send(post_chat(&key, &body, "").as_bytes()).await;
    let start = Instant::now();
    // Gone at once, with a reset: the gateway's first write to the client, the response
    // head, fails (the request bytes already sent are still read).
    c.s.set_zero_linger().unwrap();
    drop(c);
    let deadline = start + Duration::from_secs(10);
    while ledger_count(&gw) < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    assert_eq!(
        ledger_count(&gw),
        1,
        "no ledger row {took:?} after the client left (drain_timeout_ms 500, stream 24 s)"
    );
    assert!(
        took < Duration::from_millis(2500),
        "the ledger row came {took:?} after the client left (drain_timeout_ms 500)"
    );
    let in_flight = wait_metric(
        &gw,
        "tollgate_in_flight_requests",
        Duration::from_secs(2),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(in_flight, Some(0.0));
    assert_eq!(mock.requests().len(), 1);
    let sent = mock.chunks_sent();
    assert!(sent < 20, "the gateway read {sent} of 60 chunks");
    eprintln!("ledger row {took:?} after the client left; {sent} chunks read");
}
