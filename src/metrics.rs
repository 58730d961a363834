//! Prometheus metrics. One registry, created at start-up and handed to whoever records.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Requests by route and final status.
    pub requests: IntCounterVec,
    /// Whole-request latency by route.
    pub latency: HistogramVec,
    /// Time to the first body byte sent to the client, by route.
    pub ttfb: HistogramVec,
    /// Upstream attempts by channel and outcome (`ok`, `connect_error`, `timeout`, `status_5xx`, ...).
    pub upstream_attempts: IntCounterVec,
    pub in_flight: IntGauge,
    /// Ledger rows committed.
    pub ledger_rows: IntCounter,
    /// Ledger rows recorded but not yet committed.
    pub ledger_queue: IntGauge,
    /// Duration of one group commit.
    pub ledger_commit: Histogram,
    /// Connections closed before a full request head (probes, resets, slow clients).
    pub abandoned_connections: IntCounter,
    /// Request heads not read within `server.connections.head_timeout_ms`.
    pub head_timeouts: IntCounter,
    /// Request heads that could not be parsed (answered 400).
    pub malformed_requests: IntCounter,
    /// Connections refused at `server.connections.max_connections`.
    pub connections_refused: IntCounter,
    /// Client connections open now.
    pub connections_open: IntGauge,
    /// Requests refused (503 `ledger_backlogged`) because the ledger queue was over its bound.
    pub ledger_refused: IntCounter,
    /// Rows of refused requests (nothing served, no money moved) not queued while the
    /// ledger was over its bound.
    pub ledger_skipped: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let buckets = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 120.0, 300.0,
        ];
        let requests = IntCounterVec::new(
            Opts::new("tollgate_requests_total", "Requests by route and status"),
            &["route", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new("tollgate_request_duration_seconds", "Request latency")
                .buckets(buckets.clone()),
            &["route"],
        )
        .expect("valid metric");
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_time_to_first_byte_seconds",
                "Time to the first response body byte sent to the client",
            )
            .buckets(buckets),
            &["route"],
        )
        .expect("valid metric");
        let upstream_attempts = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_attempts_total",
                "Upstream attempts by channel and outcome",
            ),
            &["channel", "outcome"],
        )
        .expect("valid metric");
        let in_flight = IntGauge::new("tollgate_in_flight_requests", "Requests being served")
            .expect("valid metric");
        let ledger_rows = IntCounter::new("tollgate_ledger_rows_total", "Ledger rows committed")
            .expect("valid metric");
        let ledger_queue = IntGauge::new(
            "tollgate_ledger_queue_rows",
            "Ledger rows recorded but not yet committed",
        )
        .expect("valid metric");
        let ledger_commit = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_ledger_commit_seconds",
                "Duration of one ledger group commit",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let abandoned_connections = counter(
            "tollgate_connections_abandoned_total",
            "Connections closed before a full request head",
        );
        let head_timeouts = counter(
            "tollgate_request_head_timeouts_total",
            "Request heads not read within the head deadline",
        );
        let malformed_requests = counter(
            "tollgate_malformed_requests_total",
            "Request heads that could not be parsed",
        );
        let connections_refused = counter(
            "tollgate_connections_refused_total",
            "Connections refused at max_connections",
        );
        let connections_open =
            IntGauge::new("tollgate_connections_open", "Client connections open now")
                .expect("valid metric");
        let ledger_refused = IntCounter::new(
            "tollgate_ledger_refused_total",
            "Requests refused because the ledger queue was over accounting.max_queue_rows",
        )
        .expect("valid metric");
        let ledger_skipped = IntCounter::new(
            "tollgate_ledger_skipped_rows_total",
            "Rows of requests that reached no provider and moved no money, not queued while the ledger was over its bound",
        )
        .expect("valid metric");
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(ttfb.clone()),
            Box::new(upstream_attempts.clone()),
            Box::new(in_flight.clone()),
            Box::new(ledger_rows.clone()),
            Box::new(ledger_queue.clone()),
            Box::new(ledger_commit.clone()),
            Box::new(abandoned_connections.clone()),
            Box::new(head_timeouts.clone()),
            Box::new(malformed_requests.clone()),
            Box::new(connections_refused.clone()),
            Box::new(connections_open.clone()),
            Box::new(ledger_refused.clone()),
            Box::new(ledger_skipped.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Metrics {
            registry,
            requests,
            latency,
            ttfb,
            upstream_attempts,
            in_flight,
            ledger_rows,
            ledger_queue,
            ledger_commit,
            abandoned_connections,
            head_timeouts,
            malformed_requests,
            connections_refused,
            connections_open,
            ledger_refused,
            ledger_skipped,
        }
    }

    /// Adds a collector built elsewhere (the admission queue's metrics).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::warn!(error = %e, "metric not registered");
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
