//! Observing requests: the metrics filter, the access-log filter, and the sliding-window
//! latency summary behind `GET /admin/metrics/summary`. Both filters act on `on_done`,
//! which runs in reverse chain order; they are first in the chain, so they see the request
//! after billing has settled it and the status is final.

pub mod access_log;
pub mod log_writer;
pub mod metrics;
pub mod summary;

use std::time::Duration;

use tollgate_filters::Ctx;

pub use access_log::{AccessLog, LogConfig, LogFormat};
pub use metrics::{MetricsConfig, MetricsFilter};
pub use summary::LatencySummary;

/// One request's durations, as the metrics, the summary, the access log and the
/// `Server-Timing` header report them.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// From the request head to now.
    pub total: Duration,
    /// Waiting on providers (every attempt, and the committed response's body).
    pub upstream: Duration,
    /// `total` less `upstream`: time spent inside tollgate.
    pub gateway: Duration,
    /// To the first body byte sent to the client (the first event of a stream).
    pub ttft: Option<Duration>,
}

impl Timings {
    pub fn of(ctx: &Ctx) -> Timings {
        let total = ctx.started.elapsed();
        let upstream = ctx.outcome.upstream_time.min(total);
        Timings {
            total,
            upstream,
            gateway: total - upstream,
            ttft: ctx.outcome.first_byte,
        }
    }
}

/// Milliseconds with microsecond precision, as logs and JSON show them.
pub fn ms(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}
