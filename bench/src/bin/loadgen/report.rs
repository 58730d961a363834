//! The numbers a run keeps (HDR histograms per connection, merged) and how they are printed.

use super::*;

pub(crate) fn hist() -> Histogram<u64> {
    // Microseconds, 1 us .. 1 h, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds")
}

pub(crate) fn us(d: Duration) -> u64 {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// One worker's (or the merged) results; all times in microseconds.
pub(crate) struct Stats {
    /// From the intended send time (open loop) or the actual send (closed loop).
    pub(crate) latency: Histogram<u64>,
    /// From the actual send: what the target alone took.
    pub(crate) service: Histogram<u64>,
    /// Open loop: how far behind its slot a request went out.
    pub(crate) send_lag: Histogram<u64>,
    pub(crate) ttfb: Histogram<u64>,
    pub(crate) gap: Histogram<u64>,
    pub(crate) ok: u64,
    pub(crate) events: u64,
    pub(crate) status: BTreeMap<u16, u64>,
    pub(crate) errors: BTreeMap<&'static str, u64>,
}

impl Stats {
    pub(crate) fn new() -> Stats {
        Stats {
            latency: hist(),
            service: hist(),
            send_lag: hist(),
            ttfb: hist(),
            gap: hist(),
            ok: 0,
            events: 0,
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    pub(crate) fn merge(&mut self, o: &Stats) {
        self.latency.add(&o.latency).expect("same bounds");
        self.service.add(&o.service).expect("same bounds");
        self.send_lag.add(&o.send_lag).expect("same bounds");
        self.ttfb.add(&o.ttfb).expect("same bounds");
        self.gap.add(&o.gap).expect("same bounds");
        self.ok += o.ok;
        self.events += o.events;
        for (k, v) in &o.status {
            *self.status.entry(*k).or_default() += v;
        }
        for (k, v) in &o.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    /// Answers that were neither a 2xx nor an `--expect`ed status, and errors.
    pub(crate) fn failures(&self, expect: &[u16]) -> u64 {
        self.status
            .iter()
            .filter(|(s, _)| !(200..300).contains(*s) && !expect.contains(s))
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.errors.values().sum::<u64>()
    }

    pub(crate) fn total(&self) -> u64 {
        self.status.values().sum::<u64>() + self.errors.values().sum::<u64>()
    }
}

/// This process's user+system CPU seconds (Linux; `None` elsewhere), to tell whether the
/// generator itself was the bottleneck.
pub(crate) fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime), in clock ticks (100 Hz on Linux).
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

pub(crate) fn pct(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "p50": h.value_at_quantile(0.50),
        "p90": h.value_at_quantile(0.90),
        "p99": h.value_at_quantile(0.99),
        "p99_9": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": (h.mean() * 10.0).round() / 10.0,
    })
}

pub(crate) fn fmt_us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1}ms", v as f64 / 1000.0)
    } else {
        format!("{v}us")
    }
}

pub(crate) fn line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "-".into();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        fmt_us(h.value_at_quantile(0.5)),
        fmt_us(h.value_at_quantile(0.9)),
        fmt_us(h.value_at_quantile(0.99)),
        fmt_us(h.value_at_quantile(0.999)),
        fmt_us(h.max())
    )
}

pub(crate) fn report(args: &Args, s: &Stats, elapsed: Duration, cpu: Option<f64>) -> bool {
    let secs = elapsed.as_secs_f64().max(1e-9);
    // Share of one core the generator used while measuring.
    let cpu_pct = cpu.map(|c| (c / secs * 1000.0).round() / 10.0);
    let valid = s.failures(&args.expect) == 0 && s.ok > 0;
    let errors: BTreeMap<String, u64> = s
        .status
        .iter()
        .filter(|(st, _)| !(200..300).contains(*st) && !args.expect.contains(st))
        .map(|(st, n)| (format!("status_{st}"), *n))
        .chain(s.errors.iter().map(|(e, n)| (e.to_string(), *n)))
        .collect();
    if args.json {
        let out = json!({
            "label": args.label,
            "url": args.url,
            "mode": if args.rate.is_some() { "open" } else { "closed" },
            "rate": args.rate,
            "connections": args.connections,
            "threads": args.threads,
            "stream": args.stream,
            "duration_s": secs,
            "requests": s.total(),
            "ok": s.ok,
            "rps": s.ok as f64 / secs,
            "errors": errors,
            "status": s.status,
            "valid": valid,
            "latency_us": pct(&s.latency),
            "service_us": pct(&s.service),
            "send_lag_us": pct(&s.send_lag),
            "late_sends": s.send_lag.len(),
            "ttfb_us": pct(&s.ttfb),
            "chunk_gap_us": pct(&s.gap),
            "loadgen_cpu_pct": cpu_pct,
            "events_per_request": if s.ok > 0 { s.events as f64 / s.total() as f64 } else { 0.0 },
        });
        println!("{out}");
    } else {
        let mode = match args.rate {
            Some(r) => format!("open loop at {r} req/s"),
            None => "closed loop".to_string(),
        };
        println!(
            "{} {}  {mode}, {} connections, {:.2}s",
            args.label, args.url, args.connections, secs
        );
        println!(
            "  requests {}  ok {}  {:.1} req/s",
            s.total(),
            s.ok,
            s.ok as f64 / secs
        );
        if errors.is_empty() {
            println!("  errors: none");
        } else {
            let e: Vec<String> = errors.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            println!("  errors: {}", e.join(", "));
        }
        let from = if args.rate.is_some() {
            "from intended send"
        } else {
            "from send"
        };
        println!("  latency ({from}): {}", line(&s.latency));
        if args.rate.is_some() {
            println!("  service time (from actual send): {}", line(&s.service));
            println!(
                "  sends behind schedule: {}  lag {}",
                s.send_lag.len(),
                line(&s.send_lag)
            );
        }
        if args.stream {
            println!("  time to first byte: {}", line(&s.ttfb));
            println!("  chunk gap: {}", line(&s.gap));
        }
        if let Some(c) = cpu_pct {
            println!("  loadgen CPU: {c}% of one core");
        }
        println!("  {}", if valid { "VALID" } else { "INVALID RUN" });
    }
    valid
}
