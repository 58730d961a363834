//! `tollgate bench --url URL …`: load-tests any OpenAI-compatible endpoint (tollgate itself,
//! or a provider) with chat completions and prints throughput, errors by status, latency
//! and time to first token.
//!
//! Two modes:
//! - `--concurrency C` (the default, 8): C requests in flight at all times, each sent when
//!   the previous one is answered; this finds what the endpoint sustains.
//! - `--rate R`: an open loop. Request k is due at `start + k/R` whatever the endpoint does,
//!   and its latency counts from when it was due, not when it went out: a stalled endpoint
//!   shows as the latency its users would see rather than as fewer, faster requests
//!   (coordinated omission). In flight is capped at `--max-in-flight`; past it the sender
//!   waits, and that wait is counted in the latency too.
//!
//! The HTTP client is `reqwest` (rustls, the system's trust store), so any `https://`
//! provider can be measured as well as a plain-HTTP gateway on the same network.

mod report;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use clap::Args;
use http::{HeaderMap, HeaderName, HeaderValue};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::Semaphore;
use tokio::time::Instant;

pub use report::{Outcome, Stats};

/// The longest run accepted, whatever `--duration` says.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// `tollgate bench` options (without a subcommand).
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// The endpoint: a base URL as given to an OpenAI SDK (`http://127.0.0.1:8080/v1`;
    /// `/chat/completions` is added) or a full `…/chat/completions` URL.
    #[arg(long)]
    pub url: Option<String>,
    /// The API key, sent as `Authorization: Bearer`; never printed.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Open loop: this many requests per second, latency counted from when each was due.
    #[arg(long, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: this many requests in flight (default 8).
    #[arg(long, short = 'c')]
    pub concurrency: Option<usize>,
    /// Ask for a stream (`"stream": true`, with usage) and measure time to first token.
    #[arg(long)]
    pub stream: bool,
    /// How long to send: 30s, 500ms, 2m, 1h.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many requests, even before the duration.
    #[arg(long)]
    pub requests: Option<u64>,
    #[arg(long, default_value = "gpt-4o-mini")]
    pub model: String,
    /// The user message sent.
    #[arg(long, default_value = "Say hello in one short sentence.")]
    pub prompt: String,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// A whole request body (JSON) instead of the one built from model, prompt and
    /// max tokens; `--stream` still sets `stream` in it.
    #[arg(long, conflicts_with_all = ["prompt", "max_tokens"])]
    pub body: Option<String>,
    /// An extra request header, `Name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Per-request timeout, the whole answer included, in ms.
    #[arg(long, default_value_t = 120_000)]
    pub timeout_ms: u64,
    /// Open loop: the most requests in flight before the sender waits.
    #[arg(long, default_value_t = 4096)]
    pub max_in_flight: usize,
    /// Print one JSON object (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m or h)")),
    };
    if !(secs.is_finite() && secs > 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    let d = Duration::from_secs_f64(secs);
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than the 24h limit"));
    }
    Ok(d)
}

/// The endpoint a URL names: a base URL gets `/chat/completions`.
pub fn endpoint(url: &str) -> Result<reqwest::Url, String> {
    let mut u = reqwest::Url::parse(url.trim()).map_err(|e| format!("`--url {url}`: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!(
            "`--url {url}`: only http:// and https:// are supported"
        ));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("`--url`: put the key in `--key`, not in the URL".into());
    }
    if !u.path().ends_with("/chat/completions") {
        let path = format!("{}/chat/completions", u.path().trim_end_matches('/'));
        u.set_path(&path);
    }
    Ok(u)
}

/// What every request carries.
struct Plan {
    url: reqwest::Url,
    headers: HeaderMap,
    body: Bytes,
    stream: bool,
    timeout: Duration,
}

impl Plan {
    fn new(a: &LoadArgs) -> Result<Plan, String> {
        let url = endpoint(a.url.as_deref().ok_or("`--url` is required")?)?;
        let mut headers = HeaderMap::new();
        if let Some(key) = &a.key {
            let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| "`--key` holds characters a header cannot carry".to_string())?;
            v.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, v);
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for h in &a.headers {
            let (n, v) = h
                .split_once(':')
                .ok_or_else(|| format!("`--header {h}`: expected `Name: value`"))?;
            let n = HeaderName::from_bytes(n.trim().as_bytes())
                .map_err(|_| format!("`--header {h}`: bad name"))?;
            let v = HeaderValue::from_str(v.trim())
                .map_err(|_| format!("`--header {h}`: bad value"))?;
            headers.append(n, v);
        }
        let mut body: serde_json::Value = match &a.body {
            Some(b) => serde_json::from_str(b).map_err(|e| format!("`--body`: {e}"))?,
            None => serde_json::json!({
                "model": a.model,
                "messages": [{"role": "user", "content": a.prompt}],
                "max_tokens": a.max_tokens,
            }),
        };
        let obj = body
            .as_object_mut()
            .ok_or("`--body` must be a JSON object")?;
        if a.stream {
            obj.insert("stream".into(), true.into());
            obj.insert(
                "stream_options".into(),
                serde_json::json!({"include_usage": true}),
            );
        }
        Ok(Plan {
            url,
            headers,
            body: Bytes::from(serde_json::to_vec(&body).map_err(|e| e.to_string())?),
            stream: a.stream,
            timeout: Duration::from_millis(a.timeout_ms.max(1)),
        })
    }
}

/// One request's result.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub outcome: Outcome,
    /// From when it was due (open loop) or sent (closed loop) to the answer's end.
    pub latency: Duration,
    /// Streams: to the first event with content (text, a tool call or a refusal).
    pub first_token: Option<Duration>,
    /// `usage.completion_tokens`, when the answer reported usage.
    pub output_tokens: Option<u64>,
}

/// Sends one request and reads its whole answer.
async fn one(client: &reqwest::Client, plan: &Plan, due: Instant) -> Sample {
    let exchange = async {
        let mut resp = match client
            .post(plan.url.clone())
            .headers(plan.headers.clone())
            .body(plan.body.clone())
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => return (Outcome::transport(&e), None, None),
        };
        let status = resp.status().as_u16();
        let sse = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if !(plan.stream && sse) {
            return match resp.bytes().await {
                Ok(b) if (200..300).contains(&status) => {
                    (Outcome::Status(status), None, json_output_tokens(&b))
                }
                Ok(_) => (Outcome::Status(status), None, None),
                Err(e) => (Outcome::transport(&e), None, None),
            };
        }
        let mut reader = SseReader::default();
        let mut first = None;
        loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    if reader.feed(&c) && first.is_none() {
                        first = Some(due.elapsed());
                    }
                }
                Ok(None) => break,
                Err(e) => return (Outcome::transport(&e), first, reader.output_tokens),
            }
        }
        let outcome = if reader.done {
            Outcome::Status(status)
        } else {
            Outcome::Unfinished
        };
        (outcome, first, reader.output_tokens)
    };
    let (outcome, first_token, output_tokens) =
        match tokio::time::timeout(plan.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => (Outcome::Timeout, None, None),
        };
    Sample {
        outcome,
        latency: due.elapsed(),
        first_token,
        output_tokens,
    }
}

fn json_output_tokens(body: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.pointer("/usage/completion_tokens")?.as_u64()
}

/// Reads an SSE body as it arrives: events split on a blank line (`\n\n` or `\r\n\r\n`),
/// whatever the chunking.
#[derive(Default)]
pub struct SseReader {
    buf: BytesMut,
    /// `data: [DONE]` was seen.
    pub done: bool,
    pub output_tokens: Option<u64>,
    seen_content: bool,
}

impl SseReader {
    /// Feeds a chunk; true when it completed the first event with content.
    pub fn feed(&mut self, chunk: &[u8]) -> bool {
        self.buf.extend_from_slice(chunk);
        let mut first = false;
        while let Some((end, sep)) = find_event_end(&self.buf) {
            let event = self.buf.split_to(end + sep);
            first |= self.event(&event[..end]);
        }
        first
    }

    fn event(&mut self, event: &[u8]) -> bool {
        let mut data = Vec::new();
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(d) = line.strip_prefix(b"data:") {
                if !data.is_empty() {
                    data.push(b'\n');
                }
                data.extend_from_slice(d.strip_prefix(b" ").unwrap_or(d));
            }
        }
        if data == b"[DONE]" {
            self.done = true;
            return false;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&data) else {
            return false;
        };
        if let Some(n) = v
            .pointer("/usage/completion_tokens")
            .and_then(|n| n.as_u64())
        {
            self.output_tokens = Some(n);
        }
        if self.seen_content {
            return false;
        }
        let content = v
            .get("choices")
            .and_then(|c| c.as_array())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    let d = &c["delta"];
                    d["content"].as_str().is_some_and(|s| !s.is_empty())
                        || d["refusal"].as_str().is_some_and(|s| !s.is_empty())
                        || d["tool_calls"].as_array().is_some_and(|t| !t.is_empty())
                })
            });
        self.seen_content = content;
        content
    }
}

fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| (i, 2));
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Runs the load and returns what it measured.
pub async fn run(args: &LoadArgs, bar: &ProgressBar) -> Result<Stats, String> {
    if args.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err("`--rate` must be a positive number".into());
    }
    let plan = Arc::new(Plan::new(args)?);
    let concurrency = args.concurrency.unwrap_or(8).max(1);
    let pool = args.rate.map_or(concurrency, |_| args.max_in_flight.max(1));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .build()
        .map_err(|e| format!("building the HTTP client: {e}"))?;
    let max = args.requests.unwrap_or(u64::MAX);
    let stats = Arc::new(Mutex::new(Stats::default()));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let record = {
        let (stats, done, failed) = (stats.clone(), done.clone(), failed.clone());
        move |s: Sample| {
            if !s.outcome.is_ok() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            done.fetch_add(1, Ordering::Relaxed);
            stats.lock().unwrap_or_else(|p| p.into_inner()).record(&s);
        }
    };
    let start = Instant::now();
    let end = start + args.duration;
    let ticker = {
        let (bar, done, failed) = (bar.clone(), done.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let el = start.elapsed();
                let n = done.load(Ordering::Relaxed);
                bar.set_position(el.as_millis().min(u128::from(u64::MAX)) as u64);
                bar.set_message(format!(
                    "{n} done, {} failed, {:.0} req/s",
                    failed.load(Ordering::Relaxed),
                    n as f64 / el.as_secs_f64().max(0.001)
                ));
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    match args.rate {
        Some(rate) => {
            let permits = Arc::new(Semaphore::new(pool));
            let mut k: u64 = 0;
            while k < max {
                let due = start + Duration::from_secs_f64(k as f64 / rate);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let (client, plan, record) = (client.clone(), plan.clone(), record.clone());
                tasks.spawn(async move {
                    record(one(&client, &plan, due).await);
                    drop(permit);
                });
                k += 1;
                // Reap finished tasks as we go, so the set stays small on long runs.
                while tasks.try_join_next().is_some() {}
            }
        }
        None => {
            let sent = Arc::new(AtomicU64::new(0));
            for _ in 0..concurrency {
                let (client, plan, record, sent) =
                    (client.clone(), plan.clone(), record.clone(), sent.clone());
                tasks.spawn(async move {
                    while Instant::now() < end && sent.fetch_add(1, Ordering::Relaxed) < max {
                        record(one(&client, &plan, Instant::now()).await);
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    ticker.abort();
    let mut out = std::mem::take(&mut *stats.lock().unwrap_or_else(|p| p.into_inner()));
    out.elapsed = start.elapsed();
    Ok(out)
}

/// `tollgate bench --url …`: runs on its own runtime and prints the report.
pub fn main(args: LoadArgs) -> Result<bool, String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(
            Some(args.duration.as_millis().min(u128::from(u64::MAX)) as u64),
            ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}")
                .map_err(|e| e.to_string())?,
        );
        bar
    };
    let stats = rt.block_on(run(&args, &bar))?;
    bar.finish_and_clear();
    let report = report::Report::new(&args, &stats);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", report.text());
    }
    Ok(stats.ok > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_url_gets_the_chat_path_and_a_full_one_is_kept() {
        let u = |s| endpoint(s).unwrap().to_string();
        assert_eq!(
            u("http://127.0.0.1:8080/v1"),
            "http://127.0.0.1:8080/v1/chat/completions"
        );
        assert_eq!(
            u("https://api.example.com/v1/"),
            "https://api.example.com/v1/chat/completions"
        );
        assert_eq!(
            u("http://h/openai/v1/chat/completions"),
            "http://h/openai/v1/chat/completions"
        );
        assert!(endpoint("ftp://h/v1").is_err());
        assert!(endpoint("http://user:sk-secret@h/v1")
            .unwrap_err()
            .contains("--key"));
    }

    #[test]
    fn durations_take_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("25h").is_err());
        assert!(parse_duration("1y").is_err());
    }

    #[test]
    fn the_sse_reader_finds_the_first_token_usage_and_done_across_any_split() {
        let body = b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n\
data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\n\
data: {\"choices\":[],\"usage\":{\"completion_tokens\":7}}\n\n\
data: [DONE]\n\n";
        for split in 0..body.len() {
            let mut r = SseReader::default();
            let firsts = [r.feed(&body[..split]), r.feed(&body[split..])];
            assert_eq!(firsts.iter().filter(|f| **f).count(), 1, "split {split}");
            assert!(r.done, "split {split}");
            assert_eq!(r.output_tokens, Some(7));
        }
        let mut r = SseReader::default();
        assert!(!r.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"\"}}]}\n\n"));
        assert!(!r.done);
    }
}
