//! What the queue measures: its grant rate (for `Retry-After`) and its metric families.

use std::time::{Duration, Instant};

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};

use super::CLASSES;

/// Grants per second, for `Retry-After`.
#[derive(Default)]
pub(super) struct Drain {
    pub(super) window_start: Option<Instant>,
    pub(super) count: u64,
    pub(super) rate: f64,
}

impl Drain {
    pub(super) fn record(&mut self, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        self.count += 1;
        let el = now.duration_since(start).as_secs_f64();
        if el >= 1.0 {
            let r = self.count as f64 / el;
            self.rate = if self.rate > 0.0 {
                0.5 * self.rate + 0.5 * r
            } else {
                r
            };
            self.window_start = Some(now);
            self.count = 0;
        }
    }

    pub(super) fn rate(&self, now: Instant) -> f64 {
        // A window still filling says something too, once it has a few grants.
        match self.window_start {
            Some(s) if self.rate == 0.0 && self.count >= 2 => {
                self.count as f64 / now.duration_since(s).as_secs_f64().max(0.001)
            }
            _ => self.rate,
        }
    }

    /// How long `ahead` requests take to drain at the observed rate, 1–60 s.
    pub(super) fn retry_after(&self, ahead: usize, now: Instant) -> Duration {
        let rate = self.rate(now);
        if rate <= 0.0 {
            return Duration::from_secs(1);
        }
        Duration::from_secs_f64(((ahead + 1) as f64 / rate).clamp(1.0, 60.0))
    }
}

/// The queue's metrics, resolved once.
#[derive(Clone)]
pub(super) struct QueueMetrics {
    pub(super) depth: IntGaugeVec,
    pub(super) depth_by_class: Vec<IntGauge>,
    pub(super) wait: Histogram,
    pub(super) outcomes: IntCounterVec,
    pub(super) immediate: IntCounter,
    pub(super) waited: IntCounter,
    pub(super) timed_out: IntCounter,
    pub(super) full: IntCounter,
    pub(super) left: IntCounter,
}

impl QueueMetrics {
    pub(super) fn new() -> QueueMetrics {
        let depth = IntGaugeVec::new(
            Opts::new(
                "tollgate_queue_depth",
                "Requests waiting for admission, by the priority class they were queued in",
            ),
            &["class"],
        )
        .expect("valid metric");
        let wait = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_queue_wait_seconds",
                "Time requests that had to wait spent in the admission queue",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0,
            ]),
        )
        .expect("valid metric");
        let outcomes = IntCounterVec::new(
            Opts::new(
                "tollgate_queue_outcomes_total",
                "Admission outcomes: admitted_immediately, admitted_after_wait, timed_out, full, left",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let c = |o: &str| outcomes.with_label_values(&[o]);
        QueueMetrics {
            depth_by_class: (0..CLASSES)
                .map(|i| depth.with_label_values(&[&i.to_string()]))
                .collect(),
            depth,
            wait,
            immediate: c("admitted_immediately"),
            waited: c("admitted_after_wait"),
            timed_out: c("timed_out"),
            full: c("full"),
            left: c("left"),
            outcomes,
        }
    }
}
