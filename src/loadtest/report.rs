//! What `tollgate bench` keeps of a run and how it prints it.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::{LoadArgs, Sample};

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// An answer with this status, read to its end (a stream: through `data: [DONE]`).
    Status(u16),
    /// A stream that ended without `data: [DONE]`.
    Unfinished,
    /// No answer within `--timeout-ms`.
    Timeout,
    /// The connection could not be made.
    Connect,
    /// The connection failed after it was made (reset, cut short).
    Io,
}

impl Outcome {
    pub(super) fn transport(e: &reqwest::Error) -> Outcome {
        if e.is_timeout() {
            Outcome::Timeout
        } else if e.is_connect() {
            Outcome::Connect
        } else {
            Outcome::Io
        }
    }

    pub fn is_ok(self) -> bool {
        matches!(self, Outcome::Status(s) if (200..300).contains(&s))
    }

    /// How the outcome is named in the report: the status, or what went wrong.
    pub fn label(self) -> String {
        match self {
            Outcome::Status(s) => s.to_string(),
            Outcome::Unfinished => "stream cut before [DONE]".into(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Connect => "connect error".into(),
            Outcome::Io => "connection error".into(),
        }
    }
}

fn hist() -> Histogram<u64> {
    // Microseconds, 1 us .. 24 h, 3 significant digits.
    Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("histogram bounds")
}

fn us(d: Duration) -> u64 {
    d.as_micros().clamp(1, 86_400_000_000) as u64
}

/// A run's numbers. Latency is kept for successful requests (a fast 429 would flatter it);
/// every request counts in the outcomes.
pub struct Stats {
    pub outcomes: BTreeMap<Outcome, u64>,
    pub ok: u64,
    pub latency: Histogram<u64>,
    pub first_token: Histogram<u64>,
    pub output_tokens: u64,
    pub elapsed: Duration,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            outcomes: BTreeMap::new(),
            ok: 0,
            latency: hist(),
            first_token: hist(),
            output_tokens: 0,
            elapsed: Duration::ZERO,
        }
    }
}

impl Stats {
    pub(super) fn record(&mut self, s: &Sample) {
        *self.outcomes.entry(s.outcome).or_default() += 1;
        if !s.outcome.is_ok() {
            return;
        }
        self.ok += 1;
        let _ = self.latency.record(us(s.latency));
        if let Some(t) = s.first_token {
            let _ = self.first_token.record(us(t));
        }
        self.output_tokens += s.output_tokens.unwrap_or(0);
    }

    pub fn total(&self) -> u64 {
        self.outcomes.values().sum()
    }
}

/// Percentiles in milliseconds.
#[derive(Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Option<Percentiles> {
        let ms = |v: u64| v as f64 / 1000.0;
        (!h.is_empty()).then(|| Percentiles {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        })
    }
}

/// The printed report (`--json` prints this object).
#[derive(Serialize)]
pub struct Report {
    pub url: String,
    pub mode: &'static str,
    /// Open loop: the rate asked for; closed loop: the concurrency.
    pub load: f64,
    pub stream: bool,
    pub elapsed_s: f64,
    pub requests: u64,
    pub ok: u64,
    pub failed: u64,
    pub requests_per_s: f64,
    /// Every outcome by status, or by what went wrong when there was no status.
    pub outcomes: BTreeMap<String, u64>,
    pub latency: Option<Percentiles>,
    pub first_token: Option<Percentiles>,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
}

impl Report {
    pub fn new(a: &LoadArgs, s: &Stats) -> Report {
        let secs = s.elapsed.as_secs_f64().max(1e-9);
        let requests = s.total();
        Report {
            url: a
                .url
                .as_deref()
                .and_then(|u| super::endpoint(u).ok())
                .map_or_else(String::new, |u| u.to_string()),
            mode: if a.rate.is_some() {
                "open loop"
            } else {
                "closed loop"
            },
            load: a.rate.unwrap_or(a.concurrency.unwrap_or(8).max(1) as f64),
            stream: a.stream,
            elapsed_s: (secs * 1000.0).round() / 1000.0,
            requests,
            ok: s.ok,
            failed: requests - s.ok,
            requests_per_s: (requests as f64 / secs * 10.0).round() / 10.0,
            outcomes: s.outcomes.iter().map(|(o, n)| (o.label(), *n)).collect(),
            latency: Percentiles::of(&s.latency),
            first_token: Percentiles::of(&s.first_token),
            output_tokens: s.output_tokens,
            output_tokens_per_s: (s.output_tokens as f64 / secs * 10.0).round() / 10.0,
        }
    }

    pub fn text(&self) -> String {
        let mut t = String::new();
        let load = if self.mode == "open loop" {
            format!("{} req/s", self.load)
        } else {
            format!("concurrency {}", self.load)
        };
        let _ = writeln!(
            t,
            "{}  ({}, {}{})",
            self.url,
            self.mode,
            load,
            if self.stream { ", streaming" } else { "" }
        );
        let _ = writeln!(
            t,
            "requests     {} in {:.1} s: {:.1} req/s, {} ok, {} failed",
            self.requests, self.elapsed_s, self.requests_per_s, self.ok, self.failed
        );
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let _ = writeln!(t, "outcomes     {}", outcomes.join(", "));
        let row = |t: &mut String, name: &str, p: &Option<Percentiles>| {
            if let Some(p) = p {
                let _ = writeln!(
                    t,
                    "{name:<12} p50 {:.2} ms   p95 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
                    p.p50_ms, p.p95_ms, p.p99_ms, p.max_ms
                );
            }
        };
        row(&mut t, "latency", &self.latency);
        row(&mut t, "first token", &self.first_token);
        if self.output_tokens > 0 {
            let _ = writeln!(
                t,
                "output       {} tokens, {:.1} tokens/s",
                self.output_tokens, self.output_tokens_per_s
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_successes_shape_the_latency_and_every_outcome_is_counted() {
        let mut s = Stats::default();
        let ok = |ms| Sample {
            outcome: Outcome::Status(200),
            latency: Duration::from_millis(ms),
            first_token: Some(Duration::from_millis(ms / 2)),
            output_tokens: Some(5),
        };
        for ms in [10, 20, 30, 40] {
            s.record(&ok(ms));
        }
        s.record(&Sample {
            outcome: Outcome::Status(429),
            latency: Duration::from_micros(50),
            first_token: None,
            output_tokens: None,
        });
        s.record(&Sample {
            outcome: Outcome::Timeout,
            latency: Duration::from_secs(60),
            first_token: None,
            output_tokens: None,
        });
        s.elapsed = Duration::from_secs(2);
        let args = LoadArgs {
            url: Some("http://127.0.0.1:1/v1".into()),
            key: None,
            rate: None,
            concurrency: Some(3),
            stream: true,
            duration: Duration::from_secs(2),
            requests: None,
            model: "m".into(),
            prompt: "p".into(),
            max_tokens: 1,
            body: None,
            headers: vec![],
            timeout_ms: 1000,
            max_in_flight: 1,
            json: true,
        };
        let r = Report::new(&args, &s);
        assert_eq!((r.requests, r.ok, r.failed), (6, 4, 2));
        assert_eq!(r.requests_per_s, 3.0);
        assert_eq!(r.outcomes["200"], 4);
        assert_eq!(r.outcomes["429"], 1);
        assert_eq!(r.outcomes["timeout"], 1);
        let l = r.latency.as_ref().unwrap();
        assert!((l.p50_ms - 20.0).abs() < 0.1 && (l.max_ms - 40.0).abs() < 0.1);
        assert!((r.first_token.as_ref().unwrap().max_ms - 20.0).abs() < 0.1);
        assert_eq!(r.output_tokens, 20);
        let text = r.text();
        assert!(
            text.contains("429: 1") && text.contains("first token"),
            "{text}"
        );
    }
}
