//! The soak: the real `tollgate` binary on a temp SQLite file, the in-process mock upstream,
//! traffic at a fixed rate with upstream, client and process faults, then a reconciliation
//! of the ledger against what the mock served. See the README's "Soak" section.
//!
//! Correlation: tollgate does not send its request id upstream, so every request carries a
//! unique marker in the body's `user` field (`soak-N`), which the mock records with each
//! request and each usage it served. The client learns tollgate's request id from the
//! `x-request-id` response header; a client that left before the head never learns it, and
//! its row is matched by key and token counts instead.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::mock::{Behaviour, MockServer};

/// What a run does; see `tollgate-soak --help`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The gateway binary to run.
    pub tollgate_bin: PathBuf,
    pub duration: Duration,
    /// Requests started per second.
    pub rate: u32,
    pub seed: u64,
    /// `accounting.flush_interval_ms` of the gateway under test.
    pub flush_interval_ms: u64,
    /// A row lost to SIGKILL must belong to a request that finished at most this long
    /// before the kill (the open flush window, plus scheduling slack on a loaded machine),
    /// or was in flight at the kill.
    pub kill_window: Duration,
    /// Resident memory and open descriptors are sampled this often.
    pub sample_every: Duration,
    /// Keep the temp directory (config, SQLite file, gateway log).
    pub keep_dir: bool,
    /// Write the memory/descriptor samples as an SVG plot here.
    pub svg: Option<PathBuf>,
}

impl Options {
    pub fn new(tollgate_bin: PathBuf, duration: Duration) -> Options {
        Options {
            tollgate_bin,
            duration,
            rate: 150,
            seed: 1,
            flush_interval_ms: 100,
            kill_window: Duration::from_millis(2000),
            sample_every: Duration::from_secs(10),
            keep_dir: false,
            svg: None,
        }
    }
}

/// Injected faults, one per request (or none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    None,
    /// The provider aborts the connection mid-stream (`truncate_after`).
    ResetMidStream,
    /// The provider drops the connection before answering (`reset`).
    ResetBeforeHead,
    Status5xx,
    Status429,
    /// A 1.2 s wait for the first byte (`delay_ms`, non-streaming).
    SlowFirstByte,
    /// The stream ends cleanly without `data: [DONE]` (`omit_done`).
    TruncatedSse,
    /// An in-band error event, then the end (`error_after`).
    InBandError,
    /// One unparseable event mid-stream (`malformed_after`).
    MalformedChunk,
    /// One 2 MiB `data:` line (`big_line_bytes`).
    BigLine,
    /// Usage on every chunk (`usage: cumulative`).
    CumulativeUsage,
    /// `200 OK` with an error body (`error_body_200`).
    ErrorBody200,
    /// The client leaves after two content chunks of a slow stream.
    ClientGoneMidStream,
    /// The client leaves 150 ms into a 600 ms wait for the response head.
    ClientGoneBeforeHead,
}

impl Fault {
    /// Share of requests in thousandths; the rest get no fault.
    const MIX: [(Fault, u32); 13] = [
        (Fault::ResetMidStream, 30),
        (Fault::ResetBeforeHead, 10),
        (Fault::Status5xx, 25),
        (Fault::Status429, 25),
        (Fault::SlowFirstByte, 30),
        (Fault::TruncatedSse, 25),
        (Fault::InBandError, 20),
        (Fault::MalformedChunk, 30),
        (Fault::BigLine, 5),
        (Fault::CumulativeUsage, 50),
        (Fault::ErrorBody200, 20),
        (Fault::ClientGoneMidStream, 30),
        (Fault::ClientGoneBeforeHead, 20),
    ];

    fn pick(r: u32) -> Fault {
        let mut acc = 0;
        for (f, share) in Self::MIX {
            acc += share;
            if r % 1000 < acc {
                return f;
            }
        }
        Fault::None
    }

    /// `Some(true)`: streaming only; `Some(false)`: non-streaming only.
    fn needs_stream(self) -> Option<bool> {
        match self {
            Fault::ResetMidStream
            | Fault::TruncatedSse
            | Fault::InBandError
            | Fault::MalformedChunk
            | Fault::BigLine
            | Fault::CumulativeUsage
            | Fault::ClientGoneMidStream => Some(true),
            Fault::SlowFirstByte | Fault::ClientGoneBeforeHead => Some(false),
            _ => None,
        }
    }

    /// 5xx and 429 are retried on the next channel, so they may reach the provider twice.
    fn may_repeat(self) -> bool {
        matches!(self, Fault::Status5xx | Fault::Status429)
    }

    /// The provider dropped the connection after reading the whole body. The relay never
    /// sends such a request again (it may be doing the work); one that reached the provider
    /// twice is counted and fails the run.
    fn resent_after_reset(self) -> bool {
        self == Fault::ResetBeforeHead
    }
}

/// splitmix64: deterministic per seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const MAX_TOKENS: u64 = 64;
const BIG_LINE: u32 = 2 * 1024 * 1024;
/// Requests in flight beyond this are not started (counted as shed), so a stalled gateway
/// cannot make the run grow without bound.
const MAX_IN_FLIGHT: usize = 2000;

struct Account {
    name: &'static str,
    group: &'static str,
    balance_usd: &'static str,
    /// (name, extra key fields, share of traffic in thousandths)
    keys: &'static [(&'static str, &'static str, u32)],
    /// Topped up by this much every 15 s (nano-USD), through the admin API.
    topup_nano: i64,
    /// The client always sets `stream_options.include_usage`, so the provider's prompt
    /// count equals the gateway's estimate and the reservation always covers the charge.
    always_include_usage: bool,
}

const ACCOUNTS: &[Account] = &[
    Account {
        name: "big",
        group: "default",
        balance_usd: "1000",
        keys: &[
            ("big-0", "{}", 120),
            ("big-1", "{}", 120),
            ("big-2", "{}", 100),
            ("big-rpm", r#"{"rpm": 300}"#, 80),
            ("big-conc", r#"{"concurrency": 3}"#, 80),
        ],
        topup_nano: 0,
        always_include_usage: false,
    },
    Account {
        name: "vip",
        group: "vip",
        balance_usd: "1000",
        keys: &[("vip-0", "{}", 120), ("vip-1", "{}", 100)],
        topup_nano: 0,
        always_include_usage: false,
    },
    Account {
        name: "tight",
        group: "default",
        balance_usd: "0.02",
        keys: &[("tight-0", "{}", 60), ("tight-1", r#"{"rpm": 120}"#, 40)],
        topup_nano: 5_000_000,
        always_include_usage: true,
    },
    Account {
        name: "budget",
        group: "default",
        balance_usd: "1000",
        keys: &[
            ("budget-0", r#"{"budget_usd": "0.03"}"#, 80),
            ("budget-tpm", r#"{"tpm": 20000}"#, 100),
        ],
        topup_nano: 0,
        always_include_usage: true,
    },
];

/// nano-USD per 1M tokens, as the config below says in USD.
fn rate(model: &str) -> (i128, i128, i128) {
    match model {
        "m1" => (2_000_000_000, 1_000_000_000, 8_000_000_000),
        "emb" => (20_000_000, 20_000_000, 0),
        _ => (0, 0, 0),
    }
}

/// The README's formula, rounded half up.
pub fn price(model: &str, group: &str, prompt: u64, completion: u64, cached: u64) -> i64 {
    let (input, cached_input, output) = rate(model);
    let cached = cached.min(prompt) as i128;
    let tokens =
        (prompt as i128 - cached) * input + cached * cached_input + completion as i128 * output;
    let ppm: i128 = if group == "vip" { 500_000 } else { 1_000_000 };
    let denom = 1_000_000i128 * 1_000_000;
    ((tokens * ppm + denom / 2) / denom) as i64
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// A 200 read to its end.
    Complete,
    /// A 200 whose body broke off (as a cut stream must).
    Broken,
    /// Any other status, body read.
    Refused,
    /// No response: connection refused or reset (gateway restarting, killed).
    Transport,
    /// The client left on purpose.
    Left,
}

#[derive(Clone, Debug)]
struct Sent {
    key: usize,
    fault: Fault,
    stream: bool,
    body_len: usize,
    started: Instant,
    finished: Option<Instant>,
    status: Option<u16>,
    rid: Option<String>,
    outcome: Option<Outcome>,
}

struct KeyInfo {
    id: i64,
    secret: String,
    account: usize,
}

/// Tally of what the mock saw, drained from it every second.
#[derive(Default)]
struct MockSeen {
    /// marker → attempts that reached the provider
    reached: HashMap<u64, u32>,
    /// marker → (model, prompt, completion, cached), at most one each
    served: HashMap<u64, (String, u64, u64, u64)>,
    served_twice: Vec<u64>,
}

fn marker_of(user: Option<&str>) -> Option<u64> {
    user?.strip_prefix("soak-")?.parse().ok()
}

impl MockSeen {
    fn drain(&mut self, mock: &MockServer) {
        #[derive(serde::Deserialize)]
        struct UserOnly {
            user: Option<String>,
        }
        for r in mock.take_requests() {
            let user = serde_json::from_slice::<UserOnly>(&r.body)
                .ok()
                .and_then(|u| u.user);
            if let Some(m) = marker_of(user.as_deref()) {
                *self.reached.entry(m).or_default() += 1;
            }
        }
        for s in mock.take_served() {
            if let Some(m) = marker_of(s.user.as_deref()) {
                let v = (
                    s.model,
                    s.prompt_tokens,
                    s.completion_tokens,
                    s.cached_tokens,
                );
                if self.served.insert(m, v).is_some() {
                    self.served_twice.push(m);
                }
            }
        }
    }
}

/// One sample of the gateway process.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at_s: f64,
    pub pid: u32,
    pub rss_kib: u64,
    pub fds: usize,
    pub in_flight: usize,
    pub started: u64,
}

fn sample(pid: u32, at_s: f64, in_flight: usize, started: u64) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Sample {
        at_s,
        pid,
        rss_kib,
        fds,
        in_flight,
        started,
    })
}

/// The gateway process: one config, one SQLite file, restarted on the same file.
struct Gateway {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    admin_port: u16,
    token: String,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Gateway {
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("gateway log: {e}"))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.bin)
            .args(["serve", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn wait_healthy(&mut self, http: &reqwest::Client) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let r = http
                .get(format!("http://127.0.0.1:{}/healthz", self.admin_port))
                .bearer_auth(&self.token)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if r.is_ok_and(|r| r.status() == 200) {
                return Ok(());
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(Child::try_wait) {
                return Err(format!("gateway exited with {st}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("gateway did not become healthy within 30 s".into())
    }

    /// Sends `sig` and waits (bounded) for the exit; returns the exit status text.
    async fn signal_and_wait(&mut self, sig: &str, limit: Duration) -> String {
        let Some(mut child) = self.child.take() else {
            return "not running".into();
        };
        if sig == "KILL" {
            let _ = child.kill();
        } else {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.to_string();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return format!("did not exit within {limit:?}; killed");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The report: counts, sums, samples, and every reconciliation failure.
#[derive(Default)]
pub struct Report {
    pub lines: Vec<(String, String)>,
    pub faults: BTreeMap<String, u64>,
    pub samples: Vec<Sample>,
    pub failures: Vec<String>,
    pub dir: Option<PathBuf>,
}

impl Report {
    fn line(&mut self, k: &str, v: impl ToString) {
        self.lines.push((k.to_string(), v.to_string()));
    }

    fn fail(&mut self, msg: String) {
        if self.failures.len() < 200 {
            self.failures.push(msg);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "== soak reconciliation ==");
        let w = self.lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &self.lines {
            let _ = writeln!(out, "{k:<w$}  {v}");
        }
        let _ = writeln!(out, "-- faults injected (requests) --");
        for (k, v) in &self.faults {
            let _ = writeln!(out, "{k:<24} {v}");
        }
        let _ = writeln!(out, "-- gateway process, sampled --");
        let _ = writeln!(
            out,
            "{:>7} {:>8} {:>10} {:>5} {:>9} {:>9}",
            "t (s)", "pid", "RSS (KiB)", "fds", "in flight", "started"
        );
        for s in &self.samples {
            let _ = writeln!(
                out,
                "{:>7.0} {:>8} {:>10} {:>5} {:>9} {:>9}",
                s.at_s, s.pid, s.rss_kib, s.fds, s.in_flight, s.started
            );
        }
        if let Some(d) = &self.dir {
            let _ = writeln!(out, "kept: {}", d.display());
        }
        if self.failures.is_empty() {
            let _ = writeln!(out, "RESULT: reconciled, no failure");
        } else {
            let _ = writeln!(out, "RESULT: {} failure(s):", self.failures.len());
            for f in &self.failures {
                let _ = writeln!(out, "  FAIL {f}");
            }
        }
        out
    }

    /// A small SVG: RSS (MiB) and open descriptors against time.
    pub fn svg(&self) -> String {
        let (w, h) = (640.0, 240.0);
        let t_max = self.samples.iter().map(|s| s.at_s).fold(1.0, f64::max);
        let rss_max = self
            .samples
            .iter()
            .map(|s| s.rss_kib as f64 / 1024.0)
            .fold(1.0, f64::max);
        let fd_max = self
            .samples
            .iter()
            .map(|s| s.fds as f64)
            .fold(1.0, f64::max);
        let line = |f: &dyn Fn(&Sample) -> f64, max: f64| {
            self.samples
                .iter()
                .map(|s| {
                    format!(
                        "{:.1},{:.1}",
                        40.0 + s.at_s / t_max * (w - 60.0),
                        h - 20.0 - f(s) / max * (h - 40.0)
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
<line x1=\"40\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#888\"/><line x1=\"40\" y1=\"20\" x2=\"40\" y2=\"{y0}\" stroke=\"#888\"/>\
<polyline fill=\"none\" stroke=\"#c33\" points=\"{rss}\"/><polyline fill=\"none\" stroke=\"#36c\" points=\"{fds}\"/>\
<text x=\"45\" y=\"14\" fill=\"#c33\">RSS, max {rss_max:.1} MiB</text><text x=\"260\" y=\"14\" fill=\"#36c\">open fds, max {fd_max:.0}</text>\
<text x=\"{x1}\" y=\"{h}\" text-anchor=\"end\">{t_max:.0} s</text></svg>\n",
            y0 = h - 20.0,
            x1 = w - 20.0,
            rss = line(&|s| s.rss_kib as f64 / 1024.0, rss_max),
            fds = line(&|s| s.fds as f64, fd_max),
        )
    }
}

struct Shared {
    http: reqwest::Client,
    url: String,
    keys: Vec<KeyInfo>,
    sent: Mutex<Vec<Sent>>,
    in_flight: AtomicUsize,
    started: AtomicU64,
}

fn config_yaml(
    port: u16,
    admin_port: u16,
    token: &str,
    db: &Path,
    mock: &str,
    flush: u64,
) -> String {
    format!(
        "server:\n  listen: \"127.0.0.1:{port}\"\n  admin_listen: \"127.0.0.1:{admin_port}\"\n  threads: 2\n  admin_token: {token}\n  max_body_bytes: 2097152\n  grace_period_s: 10\n  log_level: warn\n\
database:\n  path: \"{db}\"\n\
channels:\n  - {{ name: a, base_url: \"{mock}\", api_key: sk-soak-upstream-a, models: [m1, emb], priority: 2, connect_timeout_ms: 1000, read_timeout_ms: 10000 }}\n  - {{ name: b, base_url: \"{mock}\", api_key: sk-soak-upstream-b, models: [m1, emb], priority: 1, connect_timeout_ms: 1000, read_timeout_ms: 10000 }}\n\
pricing:\n  models:\n    m1: {{ input: 2.00, output: 8.00, cached_input: 1.00 }}\n    emb: {{ input: 0.02 }}\n  unpriced: reject\n  groups: {{ default: 1.0, vip: 0.5 }}\n\
accounting: {{ flush_interval_ms: {flush} }}\n",
        db = db.display()
    )
}

/// Runs the soak and reconciles; `Report::failures` is empty when everything holds.
pub async fn run(opts: Options) -> Report {
    let mut report = Report::default();
    let dir = match tempfile::Builder::new().prefix("tollgate-soak-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            report.fail(format!("temp dir: {e}"));
            return report;
        }
    };
    let mock = MockServer::start_with(Behaviour::default()).await;
    let port = free_port();
    let admin_port = free_port();
    let token = format!("soak-admin-token-{port}-{admin_port}-0123456789abcdef");
    let db = dir.path().join("tollgate.db");
    let config = dir.path().join("tollgate.yaml");
    let yaml = config_yaml(
        port,
        admin_port,
        &token,
        &db,
        &mock.base_url(),
        opts.flush_interval_ms,
    );
    if let Err(e) = std::fs::write(&config, yaml) {
        report.fail(format!("write config: {e}"));
        return report;
    }
    let mut gw = Gateway {
        bin: opts.tollgate_bin.clone(),
        config,
        log: dir.path().join("gateway.log"),
        admin_port,
        token: token.clone(),
        child: None,
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(256)
        .build()
        .expect("http client");
    if let Err(e) = gw.spawn() {
        report.fail(e);
        return report;
    }
    if let Err(e) = gw.wait_healthy(&http).await {
        report.fail(format!("{e}; log:\n{}", tail(&gw.log)));
        return report;
    }

    // Accounts and keys, through the admin API.
    let mut keys = Vec::new();
    let mut weights = Vec::new();
    let mut initial: Vec<i64> = Vec::new();
    let mut group_of_account: HashMap<i64, &'static str> = HashMap::new();
    for (ai, a) in ACCOUNTS.iter().enumerate() {
        let r = admin_post(
            &http,
            &gw,
            "/admin/accounts",
            json!({"name": a.name, "group": a.group, "balance_usd": a.balance_usd}),
        )
        .await;
        let Some(acc) = r else {
            report.fail(format!("create account {}", a.name));
            return report;
        };
        initial.push(acc["balance_nano"].as_i64().unwrap_or(-1));
        group_of_account.insert(acc["id"].as_i64().unwrap_or(-1), a.group);
        for (name, extra, share) in a.keys {
            let mut body: Value = serde_json::from_str(extra).expect("key fields");
            body["account"] = json!(a.name);
            body["name"] = json!(name);
            let Some(k) = admin_post(&http, &gw, "/admin/keys", body).await else {
                report.fail(format!("create key {name}"));
                return report;
            };
            keys.push(KeyInfo {
                id: k["id"].as_i64().unwrap_or(-1),
                secret: k["key"].as_str().unwrap_or_default().to_string(),
                account: ai,
            });
            weights.push(*share);
        }
    }

    let shared = Arc::new(Shared {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(512)
            .build()
            .expect("http client"),
        url: format!("http://127.0.0.1:{port}"),
        keys,
        sent: Mutex::new(Vec::new()),
        in_flight: AtomicUsize::new(0),
        started: AtomicU64::new(0),
    });

    let mut seen = MockSeen::default();
    let t0 = Instant::now();
    let end = t0 + opts.duration;
    let sigterm_at = t0 + opts.duration.mul_f64(0.4);
    let sigkill_at = t0 + opts.duration.mul_f64(0.7);
    let mut term_done = false;
    let mut kill_done = false;
    let mut killed_at: Option<Instant> = None;
    let mut restarts = Vec::new();
    let mut topups = vec![0i64; ACCOUNTS.len()];
    let mut next_topup = t0 + Duration::from_secs(15);
    let mut next_sample = t0;
    let mut shed = 0u64;
    let mut rng = Rng(opts.seed);
    let total_weight: u32 = weights.iter().sum();
    let period = Duration::from_secs_f64(1.0 / f64::from(opts.rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last_drain = Instant::now();
    let mut marker = 0u64;

    // The traffic loop: bounded by `end` (the interval fires rate × duration times).
    while Instant::now() < end {
        tick.tick().await;
        let now = Instant::now();
        if now.duration_since(last_drain) >= Duration::from_secs(1) {
            seen.drain(&mock);
            last_drain = now;
        }
        if now >= next_sample {
            if let Some(pid) = gw.pid() {
                if let Some(s) = sample(
                    pid,
                    now.duration_since(t0).as_secs_f64(),
                    shared.in_flight.load(Ordering::Relaxed),
                    shared.started.load(Ordering::Relaxed),
                ) {
                    report.samples.push(s);
                }
            }
            next_sample = now + opts.sample_every;
        }
        if now >= next_topup {
            for (ai, a) in ACCOUNTS.iter().enumerate() {
                if a.topup_nano > 0 {
                    let usd = format!("0.{:09}", a.topup_nano);
                    let path = format!("/admin/accounts/{}/topup", a.name);
                    if admin_post(&http, &gw, &path, json!({"usd": usd}))
                        .await
                        .is_some()
                    {
                        topups[ai] += a.topup_nano;
                    }
                }
            }
            next_topup = now + Duration::from_secs(15);
        }
        if !term_done && now >= sigterm_at {
            term_done = true;
            let t = Instant::now();
            let st = gw.signal_and_wait("TERM", Duration::from_secs(40)).await;
            let stopped = t.elapsed();
            let up = gw.spawn().map(|_| ());
            let up = match up {
                Ok(()) => gw.wait_healthy(&http).await,
                Err(e) => Err(e),
            };
            restarts.push(format!(
                "SIGTERM at {:.1} s: exited ({st}) in {:.2} s, restarted: {}",
                t.duration_since(t0).as_secs_f64(),
                stopped.as_secs_f64(),
                up.as_ref().map_or_else(|e| e.clone(), |_| "ok".into())
            ));
            if let Err(e) = up {
                report.fail(format!(
                    "restart after SIGTERM: {e}; log:\n{}",
                    tail(&gw.log)
                ));
                break;
            }
            continue;
        }
        if !kill_done && now >= sigkill_at {
            kill_done = true;
            let t = Instant::now();
            killed_at = Some(t);
            let st = gw.signal_and_wait("KILL", Duration::from_secs(10)).await;
            let up = gw.spawn().map(|_| ());
            let up = match up {
                Ok(()) => gw.wait_healthy(&http).await,
                Err(e) => Err(e),
            };
            restarts.push(format!(
                "SIGKILL at {:.1} s: {st}, restarted: {}",
                t.duration_since(t0).as_secs_f64(),
                up.as_ref().map_or_else(|e| e.clone(), |_| "ok".into())
            ));
            if let Err(e) = up {
                report.fail(format!(
                    "restart after SIGKILL: {e}; log:\n{}",
                    tail(&gw.log)
                ));
                break;
            }
            continue;
        }
        if shared.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            shed += 1;
            continue;
        }
        // One request.
        let mut pick = rng.below(u64::from(total_weight)) as u32;
        let mut key = 0;
        for (i, w) in weights.iter().enumerate() {
            if pick < *w {
                key = i;
                break;
            }
            pick -= w;
        }
        let fault = Fault::pick(rng.below(1000) as u32);
        let embeddings = fault == Fault::None && rng.below(100) < 5;
        let stream = !embeddings && fault.needs_stream().unwrap_or_else(|| rng.below(100) < 70);
        let include_usage =
            ACCOUNTS[shared.keys[key].account].always_include_usage || rng.below(2) == 0;
        let chunks = 1 + rng.below(16) as u32;
        let m = marker;
        marker += 1;
        let (path, body) = build_body(
            m,
            fault,
            stream,
            embeddings,
            include_usage,
            chunks,
            &mut rng,
        );
        let body = serde_json::to_vec(&body).expect("body");
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        shared.started.fetch_add(1, Ordering::Relaxed);
        let idx = {
            let mut sent = shared.sent.lock().unwrap();
            sent.push(Sent {
                key,
                fault,
                stream,
                body_len: body.len(),
                started: Instant::now(),
                finished: None,
                status: None,
                rid: None,
                outcome: None,
            });
            sent.len() - 1
        };
        debug_assert_eq!(idx as u64, m);
        tokio::spawn(send_one(shared.clone(), idx, path, body));
    }
    drop(tick);

    // Let everything in flight finish (each request is bounded by the client's 30 s).
    let quiet = Instant::now() + Duration::from_secs(45);
    while shared.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < quiet {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left_in_flight = shared.in_flight.load(Ordering::Relaxed);
    if left_in_flight > 0 {
        report.fail(format!(
            "{left_in_flight} requests still in flight 45 s after the end"
        ));
    }
    // Drains after the client left end within 0.5 s; give the writer a few flushes.
    tokio::time::sleep(Duration::from_millis(1500 + 3 * opts.flush_interval_ms)).await;
    seen.drain(&mock);
    if let Some(pid) = gw.pid() {
        if let Some(s) = sample(
            pid,
            t0.elapsed().as_secs_f64(),
            0,
            shared.started.load(Ordering::Relaxed),
        ) {
            report.samples.push(s);
        }
    }

    // At rest: no reservation held, no channel slot taken.
    let mut at_rest = Vec::new();
    for a in ACCOUNTS {
        let v = admin_get(&http, &gw, &format!("/admin/accounts/{}", a.name)).await;
        let (bal, avail) = v
            .as_ref()
            .map(|v| (v["balance_usd"].clone(), v["available_usd"].clone()))
            .unwrap_or_default();
        if v.is_none() || bal != avail {
            report.fail(format!(
                "account {} at rest: balance {bal} but available {avail}",
                a.name
            ));
        }
        at_rest.push(format!("{}={}", a.name, bal.as_str().unwrap_or("?")));
    }
    let ready = admin_get(&http, &gw, "/readyz").await;
    let mut slots = 0;
    if let Some(ch) = ready.as_ref().and_then(|r| r["channels"].as_object()) {
        for (name, c) in ch {
            let n = c["in_use"].as_u64().unwrap_or(u64::MAX);
            slots += n;
            if n != 0 {
                report.fail(format!("channel {name} has {n} slots in use at rest"));
            }
        }
    } else {
        report.fail(format!("/readyz at rest: {ready:?}"));
    }

    let st = gw.signal_and_wait("TERM", Duration::from_secs(40)).await;
    restarts.push(format!("final SIGTERM: {st}"));
    seen.drain(&mock);

    let sent = shared.sent.lock().unwrap().clone();
    reconcile(
        &mut report,
        &opts,
        &db,
        &sent,
        &shared.keys,
        &seen,
        &initial,
        &topups,
        &group_of_account,
        killed_at,
    );
    report.line(
        "duration",
        format!(
            "{:.1} s at {} req/s",
            opts.duration.as_secs_f64(),
            opts.rate
        ),
    );
    report.line("process faults", restarts.join("; "));
    report.line("shed (over the in-flight cap)", shed);
    report.line("balances at rest", at_rest.join(" "));
    report.line("channel slots in use at rest", slots);
    for s in &sent {
        *report.faults.entry(format!("{:?}", s.fault)).or_default() += 1;
    }
    if let Some(p) = &opts.svg {
        if let Err(e) = std::fs::write(p, report.svg()) {
            report.fail(format!("write {}: {e}", p.display()));
        }
    }
    if opts.keep_dir || !report.failures.is_empty() {
        report.dir = Some(dir.keep());
    }
    report
}

fn tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let start = s.len().saturating_sub(4000);
    s.get(start..).unwrap_or_default().to_string()
}

async fn admin_post(
    http: &reqwest::Client,
    gw: &Gateway,
    path: &str,
    body: Value,
) -> Option<Value> {
    let r = http
        .post(gw.admin(path))
        .bearer_auth(&gw.token)
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().await.ok()
}

async fn admin_get(http: &reqwest::Client, gw: &Gateway, path: &str) -> Option<Value> {
    let r = http
        .get(gw.admin(path))
        .bearer_auth(&gw.token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    r.json().await.ok()
}

/// The request for one marker: path, body, model, and the text bytes a full answer has.
fn build_body(
    m: u64,
    fault: Fault,
    stream: bool,
    embeddings: bool,
    include_usage: bool,
    chunks: u32,
    rng: &mut Rng,
) -> (&'static str, Value) {
    let words = "lorem ipsum ".repeat(1 + rng.below(40) as usize);
    let user = format!("soak-{m}");
    if embeddings {
        let body = json!({"model": "emb", "input": [format!("soak {m} {words}")], "user": user});
        return ("/v1/embeddings", body);
    }
    let mut x = json!({"chunks": chunks});
    match fault {
        Fault::None | Fault::ClientGoneBeforeHead | Fault::SlowFirstByte => {}
        Fault::ResetMidStream => x["truncate_after"] = json!(rng.below(u64::from(chunks)) as u32),
        Fault::ResetBeforeHead => x["reset"] = json!(true),
        Fault::Status5xx => x["status"] = json!(if rng.below(2) == 0 { 500 } else { 503 }),
        Fault::Status429 => x["status"] = json!(429),
        Fault::TruncatedSse => x["omit_done"] = json!(true),
        Fault::InBandError => x["error_after"] = json!(rng.below(u64::from(chunks)) as u32),
        Fault::MalformedChunk => x["malformed_after"] = json!(rng.below(u64::from(chunks)) as u32),
        Fault::BigLine => {
            x["big_line_bytes"] = json!(BIG_LINE);
        }
        Fault::CumulativeUsage => x["usage"] = json!("cumulative"),
        Fault::ErrorBody200 => x["error_body_200"] = json!(true),
        Fault::ClientGoneMidStream => {
            x["chunks"] = json!(20);
            x["delay_ms"] = json!(25);
        }
    }
    match fault {
        Fault::SlowFirstByte => x["delay_ms"] = json!(1200),
        Fault::ClientGoneBeforeHead => x["delay_ms"] = json!(600),
        _ => {}
    }
    let mut body = json!({
        "model": "m1",
        "messages": [{"role": "user", "content": format!("soak {m} {words}")}],
        "max_tokens": MAX_TOKENS,
        "user": user,
        "x_mock": x,
    });
    if stream {
        body["stream"] = json!(true);
        if include_usage {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    ("/v1/chat/completions", body)
}

async fn send_one(shared: Arc<Shared>, idx: usize, path: &'static str, body: Vec<u8>) {
    let (key, fault) = {
        let s = shared.sent.lock().unwrap();
        (s[idx].key, s[idx].fault)
    };
    let req = shared
        .http
        .post(format!("{}{path}", shared.url))
        .bearer_auth(&shared.keys[key].secret)
        .header("content-type", "application/json")
        .body(body)
        .send();
    let resp = if fault == Fault::ClientGoneBeforeHead {
        match tokio::time::timeout(Duration::from_millis(150), req).await {
            Ok(r) => r,
            Err(_) => {
                finish(&shared, idx, None, None, Outcome::Left);
                return;
            }
        }
    } else {
        req.await
    };
    let resp = match resp {
        Ok(r) => r,
        Err(_) => {
            finish(&shared, idx, None, None, Outcome::Transport);
            return;
        }
    };
    let status = resp.status().as_u16();
    let rid = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = resp.bytes_stream();
    let mut seen = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    let mut outcome = if status == 200 {
        Outcome::Complete
    } else {
        Outcome::Refused
    };
    while let Some(part) = body.next().await {
        match part {
            Ok(b) => {
                if fault == Fault::ClientGoneMidStream && status == 200 {
                    seen += b.windows(3).filter(|w| w == b"tok").count();
                    if seen >= 2 {
                        outcome = Outcome::Left;
                        break;
                    }
                }
                tail.extend_from_slice(&b[b.len().saturating_sub(64)..]);
                let cut = tail.len().saturating_sub(64);
                tail.drain(..cut);
            }
            Err(_) => {
                if status == 200 {
                    outcome = Outcome::Broken;
                }
                break;
            }
        }
    }
    drop(body);
    finish(&shared, idx, Some(status), rid, outcome);
}

fn finish(shared: &Shared, idx: usize, status: Option<u16>, rid: Option<String>, outcome: Outcome) {
    {
        let mut s = shared.sent.lock().unwrap();
        let e = &mut s[idx];
        e.finished = Some(Instant::now());
        e.status = status;
        e.rid = rid;
        e.outcome = Some(outcome);
    }
    shared.in_flight.fetch_sub(1, Ordering::Relaxed);
}

struct Row {
    key_id: i64,
    account_id: i64,
    model: String,
    channel: Option<String>,
    prompt: u64,
    completion: u64,
    cached: u64,
    cost: i64,
    estimated: bool,
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; the run's whole state"
)]
fn reconcile(
    report: &mut Report,
    opts: &Options,
    db: &Path,
    sent: &[Sent],
    keys: &[KeyInfo],
    seen: &MockSeen,
    initial: &[i64],
    topups: &[i64],
    group_of_account: &HashMap<i64, &'static str>,
    killed_at: Option<Instant>,
) {
    let conn =
        match rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        {
            Ok(c) => c,
            Err(e) => {
                report.fail(format!("open {}: {e}", db.display()));
                return;
            }
        };
    let mut rows: HashMap<String, Row> = HashMap::new();
    let q = conn.prepare(
        "SELECT request_id, key_id, account_id, model, channel, prompt_tokens, completion_tokens, cached_tokens, cost_nano, estimated FROM usage_ledger",
    );
    match q.and_then(|mut st| {
        let it = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Row {
                    key_id: r.get::<_, Option<i64>>(1)?.unwrap_or(-1),
                    account_id: r.get::<_, Option<i64>>(2)?.unwrap_or(-1),
                    model: r.get(3)?,
                    channel: r.get(4)?,
                    prompt: r.get::<_, i64>(5)? as u64,
                    completion: r.get::<_, i64>(6)? as u64,
                    cached: r.get::<_, i64>(7)? as u64,
                    cost: r.get(8)?,
                    estimated: r.get::<_, i64>(9)? != 0,
                },
            ))
        })?;
        for r in it {
            let (id, row) = r?;
            rows.insert(id, row);
        }
        Ok(())
    }) {
        Ok(()) => {}
        Err(e) => {
            report.fail(format!("read ledger: {e}"));
            return;
        }
    }
    let final_balances: HashMap<String, i64> = conn
        .prepare("SELECT name, balance_nano FROM accounts")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()
        })
        .unwrap_or_default();
    let spent: i64 = conn
        .query_row(
            "SELECT COALESCE(SUM(spent_nano), 0) FROM api_keys",
            [],
            |r| r.get(0),
        )
        .unwrap_or(-1);
    let over_budget: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM api_keys WHERE budget_nano IS NOT NULL AND spent_nano > budget_nano",
            [],
            |r| r.get(0),
        )
        .unwrap_or(-1);

    let key_index: HashMap<i64, usize> = keys.iter().enumerate().map(|(i, k)| (k.id, i)).collect();
    let group_of_key = |key_id: i64| -> &'static str {
        key_index
            .get(&key_id)
            .map(|&i| ACCOUNTS[keys[i].account].group)
            .unwrap_or("default")
    };

    // 1. Every row's cost is the price of its own tokens.
    let mut ledger_sum = 0i64;
    let mut estimated_rows = 0u64;
    let mut capped = 0u64;
    for (id, r) in &rows {
        ledger_sum += r.cost;
        estimated_rows += u64::from(r.estimated);
        let group = group_of_account
            .get(&r.account_id)
            .copied()
            .unwrap_or("default");
        let want = price(&r.model, group, r.prompt, r.completion, r.cached);
        if r.cost != want {
            if r.cost < want {
                capped += 1;
            }
            report.fail(format!(
                "row {id}: cost {} but {} × ({}, {}, {}) prices {want}",
                r.cost, r.model, r.prompt, r.completion, r.cached
            ));
        }
    }

    // 2. Rows the client can name (it saw x-request-id).
    let mut rid_to_marker: HashMap<&str, usize> = HashMap::new();
    for (m, s) in sent.iter().enumerate() {
        if let Some(rid) = &s.rid {
            if rid_to_marker.insert(rid.as_str(), m).is_some() {
                report.fail(format!("request id {rid} seen on two requests"));
            }
        }
    }
    let mut served_price = 0i64;
    for (m, (model, p, c, k)) in &seen.served {
        if let Some(s) = sent.get(*m as usize) {
            served_price += price(model, ACCOUNTS[keys[s.key].account].group, *p, *c, *k);
        }
    }
    for m in &seen.served_twice {
        report.fail(format!("soak-{m}: the provider served usage twice"));
    }
    let mut resent = 0u64;
    for (m, n) in &seen.reached {
        if let Some(s) = sent.get(*m as usize) {
            if *n > 1 && s.fault.resent_after_reset() {
                resent += 1;
                report.fail(format!(
                    "soak-{m} reached the provider {n} times after a reset that followed its body"
                ));
            } else if *n > 1 && !s.fault.may_repeat() {
                report.fail(format!(
                    "soak-{m} ({:?}) reached the provider {n} times",
                    s.fault
                ));
            }
        }
    }

    // The README's bound: prompt = body bytes / 4 + 1; completion never above n × max_tokens
    // (n = 1 here). Text bytes / 4 is not checked: for a JSON body without usage the body's
    // bytes stand in for the text.
    let estimate_ok = |r: &Row, body_len: usize| -> bool {
        r.prompt <= body_len as u64 / 4 + 1 && r.completion <= MAX_TOKENS
    };

    let mut matched = 0u64;
    let mut served_matched = 0u64;
    let mut lost: Vec<(usize, &str)> = Vec::new();
    for (rid, &m) in &rid_to_marker {
        let s = &sent[m];
        let reached = seen.reached.get(&(m as u64)).copied().unwrap_or(0) > 0;
        let served = seen.served.get(&(m as u64));
        let Some(r) = rows.get(*rid) else {
            // Refusals before the body (rpm, concurrency) leave no row; only requests that
            // reached the provider must have one.
            if reached {
                lost.push((m, "named"));
            }
            continue;
        };
        matched += 1;
        if r.key_id != keys[s.key].id {
            report.fail(format!(
                "row {rid}: key {} but soak-{m} used key {}",
                r.key_id, keys[s.key].id
            ));
        }
        match served {
            Some((_, p, c, k)) => {
                served_matched += 1;
                if r.estimated || (r.prompt, r.completion, r.cached) != (*p, *c, *k) {
                    report.fail(format!(
                        "row {rid} (soak-{m}, {:?}): ({}, {}, {}, estimated {}) but the provider served ({p}, {c}, {k})",
                        s.fault, r.prompt, r.completion, r.cached, r.estimated
                    ));
                }
            }
            None if reached => {
                if r.cost != 0 && !(r.estimated && estimate_ok(r, s.body_len)) {
                    report.fail(format!(
                        "row {rid} (soak-{m}, {:?}): charged {} for ({}, {}), estimated {}, with no usage served",
                        s.fault, r.cost, r.prompt, r.completion, r.estimated
                    ));
                }
            }
            None => {
                if r.cost != 0 {
                    report.fail(format!(
                        "row {rid} (soak-{m}, {:?}): charged {} but never reached the provider",
                        s.fault, r.cost
                    ));
                }
            }
        }
    }

    // 3. Rows nobody could name (the client left before the head, or lost it to a kill):
    // matched per key against requests without an id that reached the provider.
    let named: std::collections::HashSet<&str> = rid_to_marker.keys().copied().collect();
    let mut pool_served: HashMap<i64, Vec<(String, u64, u64, u64)>> = HashMap::new();
    let mut pool_reached: HashMap<i64, Vec<usize>> = HashMap::new();
    for (m, s) in sent.iter().enumerate() {
        if s.rid.is_some() {
            continue;
        }
        let key_id = keys[s.key].id;
        if seen.reached.get(&(m as u64)).copied().unwrap_or(0) > 0 {
            pool_reached.entry(key_id).or_default().push(m);
        }
        if let Some((model, p, c, k)) = seen.served.get(&(m as u64)) {
            pool_served
                .entry(key_id)
                .or_default()
                .push((model.clone(), *p, *c, *k));
        }
    }
    let mut unnamed_rows = 0u64;
    let mut unnamed_touched: HashMap<i64, u64> = HashMap::new();
    for (id, r) in &rows {
        if named.contains(id.as_str()) {
            continue;
        }
        unnamed_rows += 1;
        if r.channel.is_some() {
            *unnamed_touched.entry(r.key_id).or_default() += 1;
        }
        if r.cost == 0 {
            continue;
        }
        if !r.estimated {
            let pool = pool_served.entry(r.key_id).or_default();
            if let Some(i) = pool.iter().position(|(model, p, c, k)| {
                *model == r.model && (*p, *c, *k) == (r.prompt, r.completion, r.cached)
            }) {
                pool.swap_remove(i);
                served_matched += 1;
            } else {
                report.fail(format!(
                    "row {id} (unnamed, key {}): ({}, {}, {}) matches no usage the provider served to that key",
                    r.key_id, r.prompt, r.completion, r.cached
                ));
            }
        } else {
            let max_body = pool_reached
                .get(&r.key_id)
                .and_then(|v| v.iter().map(|&m| sent[m].body_len).max())
                .unwrap_or(0);
            if !estimate_ok(r, max_body) {
                report.fail(format!(
                    "row {id} (unnamed, estimated): ({}, {}) out of bounds",
                    r.prompt, r.completion
                ));
            }
        }
    }

    // 4. Losses: only inside the SIGKILL window.
    let window = opts.kill_window;
    let in_window = |s: &Sent| -> Option<&'static str> {
        let k = killed_at?;
        let f = s.finished?;
        if s.started <= k && f >= k {
            Some("in flight at the kill")
        } else if f <= k && k.duration_since(f) <= window {
            Some("completed within the window")
        } else {
            None
        }
    };
    let mut lost_window = 0u64;
    let mut lost_inflight = 0u64;
    let mut oldest = Duration::ZERO;
    let mut count_loss = |report: &mut Report, m: usize, what: &str| {
        let s = &sent[m];
        match in_window(s) {
            Some("in flight at the kill") => lost_inflight += 1,
            Some(_) => {
                lost_window += 1;
                if let (Some(k), Some(f)) = (killed_at, s.finished) {
                    oldest = oldest.max(k.saturating_duration_since(f));
                }
            }
            None => report.fail(format!(
                "soak-{m} ({:?}, {what}, status {:?}, {:?}): no ledger row, outside the SIGKILL window",
                s.fault, s.status, s.outcome
            )),
        }
    };
    let mut lost_served_price = 0i64;
    let group_of_marker = |m: usize| ACCOUNTS[keys[sent[m].key].account].group;
    for (m, what) in &lost {
        count_loss(report, *m, what);
        if let Some((model, p, c, k)) = seen.served.get(&(*m as u64)) {
            lost_served_price += price(model, group_of_marker(*m), *p, *c, *k);
        }
    }
    // Unnamed requests that were served usage but have no row.
    for (key_id, left) in &pool_served {
        if left.is_empty() {
            continue;
        }
        let mut candidates: Vec<usize> = pool_reached
            .get(key_id)
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|&m| in_window(&sent[m]).is_some())
                    .collect()
            })
            .unwrap_or_default();
        for (model, p, c, k) in left {
            lost_served_price += price(model, group_of_key(*key_id), *p, *c, *k);
            match candidates.pop() {
                Some(m) => count_loss(report, m, "unnamed, served"),
                None => report.fail(format!(
                    "key {key_id}: usage served to a request without an id, and no ledger row for it"
                )),
            }
        }
    }
    let reached_unnamed: u64 = pool_reached.values().map(|v| v.len() as u64).sum();
    let touched_unnamed: u64 = unnamed_touched.values().sum();
    for (key_id, v) in &pool_reached {
        let rows_k = unnamed_touched.get(key_id).copied().unwrap_or(0);
        if rows_k > v.len() as u64 {
            report.fail(format!(
                "key {key_id}: {rows_k} unnamed rows reached a channel but only {} unnamed requests reached the provider (a duplicate?)",
                v.len()
            ));
        }
    }

    // 5. Money: ledger = balances = key spend; nothing below zero.
    let mut decrease = 0i64;
    for (ai, a) in ACCOUNTS.iter().enumerate() {
        let fin = final_balances.get(a.name).copied().unwrap_or(i64::MIN);
        if fin < 0 {
            report.fail(format!("account {} below zero: {fin}", a.name));
        }
        decrease += initial[ai] + topups[ai] - fin;
    }
    if ledger_sum != decrease {
        report.fail(format!(
            "Σ ledger {ledger_sum} ≠ Σ balance decrease {decrease}"
        ));
    }
    if ledger_sum != spent {
        report.fail(format!("Σ ledger {ledger_sum} ≠ Σ key spend {spent}"));
    }
    if over_budget != 0 {
        report.fail(format!("{over_budget} keys spent past their budget"));
    }
    let estimated_sum: i64 = rows.values().filter(|r| r.estimated).map(|r| r.cost).sum();
    if ledger_sum - estimated_sum + lost_served_price != served_price {
        report.fail(format!(
            "reported-usage rows charge {} and lost rows {lost_served_price}, but the provider served {served_price} worth",
            ledger_sum - estimated_sum
        ));
    }

    let count = |f: &dyn Fn(&Sent) -> bool| sent.iter().filter(|s| f(s)).count();
    report.line("requests sent", sent.len());
    report.line(
        "  outcomes",
        format!(
            "complete {} / broken stream {} / refused (non-200) {} / no response {} / client left {}",
            count(&|s| s.outcome == Some(Outcome::Complete)),
            count(&|s| s.outcome == Some(Outcome::Broken)),
            count(&|s| s.outcome == Some(Outcome::Refused)),
            count(&|s| s.outcome == Some(Outcome::Transport)),
            count(&|s| s.outcome == Some(Outcome::Left)),
        ),
    );
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for s in sent {
        if let Some(st) = s.status {
            *statuses.entry(st).or_default() += 1;
        }
    }
    report.line(
        "  statuses",
        statuses
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(" "),
    );
    report.line(
        "  streaming",
        format!(
            "{:.1} %",
            100.0 * count(&|s| s.stream) as f64 / sent.len().max(1) as f64
        ),
    );
    report.line("reached the provider (markers)", seen.reached.len());
    report.line("provider served usage (markers)", seen.served.len());
    report.line(
        "POSTs resent to the next channel after a provider reset post-body",
        resent,
    );
    report.line("ledger rows", rows.len());
    report.line(
        "  named by x-request-id / matched",
        format!("{} / {matched}", rid_to_marker.len()),
    );
    report.line(
        "  unnamed rows / with a channel / unnamed requests that reached the provider",
        format!("{unnamed_rows} / {touched_unnamed} / {reached_unnamed}"),
    );
    report.line(
        "  estimated rows (Σ nano-USD)",
        format!("{estimated_rows} ({estimated_sum})"),
    );
    report.line("  served usages matched to a row", served_matched);
    report.line("  rows charged below their price (capped)", capped);
    report.line("Σ ledger cost (nano-USD)", ledger_sum);
    report.line("Σ balance decrease (nano-USD)", decrease);
    report.line("Σ key spend (nano-USD)", spent);
    report.line("Σ mock-served price (nano-USD)", served_price);
    report.line(
        "Σ ledger cost of reported-usage rows",
        ledger_sum - estimated_sum,
    );
    report.line(
        "  + Σ price of served usage whose row was lost",
        lost_served_price,
    );
    report.line(
        "rows lost (SIGKILL)",
        format!(
            "{} completed ≤ {:?} before the kill (oldest {:?}), {} in flight at the kill",
            lost_window, window, oldest, lost_inflight
        ),
    );
    let _ = named;
}
