//! The latency summary behind `GET /admin/metrics/summary`: p50/p95/p99/max and counts of
//! total latency, time to first token, upstream time and gateway overhead over a sliding
//! window, overall and per model, from HDR histograms.
//!
//! The window is kept as [`SLICES`] slices of `window / SLICES` each; a slice is cleared
//! when its turn comes round again, so a summary covers between `window × (SLICES-1)/SLICES`
//! and `window` of the most recent requests. Recording takes one short uncontended lock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

use super::{ms, Timings};
use crate::metrics::ModelLabels;

/// Slices the window is cut into.
pub const SLICES: u64 = 6;
/// Largest value recorded: one hour, in microseconds (longer values are clamped).
const MAX_US: u64 = 3_600_000_000;

/// The four measures, in order.
const MEASURES: [&str; 4] = ["total", "ttft", "upstream", "gateway_overhead"];

struct Set([Histogram<u32>; 4]);

impl Set {
    fn new() -> Set {
        let h = || Histogram::new_with_bounds(1, MAX_US, 2).expect("valid HDR bounds");
        Set([h(), h(), h(), h()])
    }

    fn record(&mut self, t: &Timings, upstream: bool) {
        let us = |d: Duration| (d.as_micros() as u64).clamp(1, MAX_US);
        self.0[0].saturating_record(us(t.total));
        if let Some(ttft) = t.ttft {
            self.0[1].saturating_record(us(ttft));
        }
        if upstream {
            self.0[2].saturating_record(us(t.upstream));
        }
        self.0[3].saturating_record(us(t.gateway));
    }

    fn reset(&mut self) {
        self.0.iter_mut().for_each(Histogram::reset);
    }

    fn add(&mut self, other: &Set) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            // Same bounds on both sides: cannot fail.
            let _ = a.add(b);
        }
    }

    fn json(&self) -> Value {
        let mut out = Map::new();
        for (name, h) in MEASURES.iter().zip(&self.0) {
            let q = |q: f64| ms(Duration::from_micros(h.value_at_quantile(q)));
            out.insert(
                (*name).to_string(),
                if h.is_empty() {
                    json!({"count": 0})
                } else {
                    json!({
                        "count": h.len(),
                        "p50_ms": q(0.50),
                        "p95_ms": q(0.95),
                        "p99_ms": q(0.99),
                        "max_ms": ms(Duration::from_micros(h.max())),
                    })
                },
            );
        }
        Value::Object(out)
    }
}

struct Slice {
    epoch: u64,
    overall: Set,
    /// Indexed by model label; allocated on a model's first request in the slice.
    models: Vec<Option<Box<Set>>>,
}

pub struct LatencySummary {
    window: Duration,
    slice: Duration,
    origin: Instant,
    models: ModelLabels,
    slices: Mutex<Vec<Slice>>,
}

impl LatencySummary {
    pub fn new(window: Duration, models: ModelLabels) -> LatencySummary {
        let window = window.max(Duration::from_secs(SLICES));
        let n_models = models.len();
        LatencySummary {
            window,
            slice: window / SLICES as u32,
            origin: Instant::now(),
            models,
            slices: Mutex::new(
                (0..SLICES)
                    .map(|_| Slice {
                        epoch: u64::MAX,
                        overall: Set::new(),
                        models: (0..n_models).map(|_| None).collect(),
                    })
                    .collect(),
            ),
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    fn epoch(&self, now: Instant) -> u64 {
        (now.duration_since(self.origin).as_nanos() / self.slice.as_nanos().max(1)) as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Slice>> {
        self.slices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one request. `model`: its [`ModelLabels`] index; `upstream`: whether it
    /// reached a provider (otherwise its upstream time is not a sample).
    pub fn record(&self, model: usize, t: &Timings, upstream: bool) {
        let epoch = self.epoch(Instant::now());
        let mut slices = self.lock();
        let s = &mut slices[(epoch % SLICES) as usize];
        if s.epoch != epoch {
            s.epoch = epoch;
            s.overall.reset();
            s.models.iter_mut().flatten().for_each(|m| m.reset());
        }
        s.overall.record(t, upstream);
        if let Some(slot) = s.models.get_mut(model) {
            slot.get_or_insert_with(|| Box::new(Set::new()))
                .record(t, upstream);
        }
    }

    /// Forgets everything recorded so far.
    pub fn reset(&self) {
        for s in self.lock().iter_mut() {
            s.epoch = u64::MAX;
        }
    }

    /// Requests recorded in the window, and the seconds the window covers now (less than
    /// `window` until the process has run that long).
    pub fn rate(&self) -> (u64, f64) {
        let now = Instant::now();
        let epoch = self.epoch(now);
        let slices = self.lock();
        let count: u64 = slices
            .iter()
            .filter(|s| s.epoch != u64::MAX && s.epoch + SLICES > epoch)
            .map(|s| s.overall.0[0].len())
            .sum();
        let covered = now
            .duration_since(self.origin)
            .min(self.window)
            .as_secs_f64()
            .max(0.001);
        (count, covered)
    }

    /// The summary as JSON: `{"window_s", "overall": {measure: {...}}, "models": {name: ...}}`.
    pub fn json(&self) -> Value {
        let epoch = self.epoch(Instant::now());
        let mut overall = Set::new();
        let mut models: Vec<Option<Set>> = (0..self.models.len()).map(|_| None).collect();
        {
            let slices = self.lock();
            for s in slices
                .iter()
                .filter(|s| s.epoch != u64::MAX && s.epoch + SLICES > epoch)
            {
                overall.add(&s.overall);
                for (i, m) in s.models.iter().enumerate() {
                    if let Some(m) = m {
                        models[i].get_or_insert_with(Set::new).add(m);
                    }
                }
            }
        }
        let per_model: Map<String, Value> = models
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let m = m.as_ref().filter(|m| !m.0[0].is_empty())?;
                Some((self.models.name(i).to_string(), m.json()))
            })
            .collect();
        json!({
            "window_s": self.window.as_secs(),
            "overall": overall.json(),
            "models": per_model,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(total_ms: u64, upstream_ms: u64) -> Timings {
        Timings {
            total: Duration::from_millis(total_ms),
            upstream: Duration::from_millis(upstream_ms),
            gateway: Duration::from_millis(total_ms - upstream_ms),
            ttft: Some(Duration::from_millis(total_ms / 2)),
        }
    }

    #[test]
    fn percentiles_come_from_what_was_recorded_overall_and_per_model() {
        let s = LatencySummary::new(
            Duration::from_secs(60),
            ModelLabels::new(["a".to_string(), "b".to_string()]),
        );
        let a = s.models.of(Some("a"));
        for i in 1..=100 {
            s.record(a, &timings(i * 10, i * 9), true);
        }
        s.record(s.models.of(Some("b")), &timings(5000, 0), false);
        let v = s.json();
        let total = &v["overall"]["total"];
        assert_eq!(total["count"], 101);
        let p50 = total["p50_ms"].as_f64().unwrap();
        assert!((495.0..=515.0).contains(&p50), "{p50}");
        assert!((4950.0..=5050.0).contains(&total["max_ms"].as_f64().unwrap()));
        // The request that never went upstream is not an upstream sample.
        assert_eq!(v["overall"]["upstream"]["count"], 100);
        let a = &v["models"]["a"]["total"];
        assert_eq!(a["count"], 100);
        let p99 = a["p99_ms"].as_f64().unwrap();
        assert!((985.0..=1010.0).contains(&p99), "{p99}");
        assert_eq!(v["models"]["b"]["total"]["count"], 1);
        assert!(v["models"].get("other").is_none());
        assert_eq!(s.rate().0, 101);
        s.reset();
        assert_eq!(s.json()["overall"]["total"]["count"], 0);
        assert_eq!(s.rate().0, 0);
    }

    #[test]
    fn slices_older_than_the_window_are_left_out() {
        let s = LatencySummary::new(Duration::from_millis(6), ModelLabels::new([]));
        // The window is at least SLICES seconds.
        assert_eq!(s.window(), Duration::from_secs(6));
        s.record(0, &timings(10, 5), true);
        assert_eq!(s.json()["overall"]["total"]["count"], 1);
        // Pretend the clock moved a whole window on.
        s.lock()[0].epoch = 0;
        let later = LatencySummary {
            origin: Instant::now() - Duration::from_secs(7),
            ..LatencySummary::new(Duration::from_secs(6), ModelLabels::new([]))
        };
        later.lock()[0].epoch = 0;
        later.lock()[0].overall.record(&timings(10, 5), true);
        assert_eq!(later.json()["overall"]["total"]["count"], 0);
    }
}
