//! What a soak prints: the report lines, and the gateway's RSS and fds sampled over time.

use super::*;

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

pub(super) fn sample(pid: u32, at_s: f64, in_flight: usize, started: u64) -> Option<Sample> {
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
    pub(super) fn line(&mut self, k: &str, v: impl ToString) {
        self.lines.push((k.to_string(), v.to_string()));
    }

    pub(super) fn fail(&mut self, msg: String) {
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
