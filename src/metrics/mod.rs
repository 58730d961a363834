//! Prometheus metrics. One registry, created at start-up and handed to whoever records.
//!
//! Label values come from the configuration (routes, the channel table, the models the
//! channels and the price table name), so every labelled child a request touches is
//! resolved once: at start-up, or for `tollgate_requests_total` (whose label product is
//! large and mostly never used) on its first use, into a slot read with one atomic load
//! after that. Recording a request is then atomics only: no formatting, no lock. A model
//! name a client sends that is not configured is counted as `other`, never as a label value.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tollgate_filters::{AttemptOutcome, Channels, Endpoint, EstimateReason, GatewayError};

mod labels;

use labels::{
    route_index, status_index, status_label, ATTEMPT_OUTCOMES, ESTIMATE_REASONS, ROUTES, STATUSES,
};
pub use labels::{ModelLabels, MODEL_NONE, MODEL_OTHER};

/// One bucket set for every duration: from 10 µs (time inside the gateway) to 10 minutes
/// (a long stream), roughly 1-2.5-5 per decade.
pub const DURATION_BUCKETS: [f64; 24] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Per-model series, resolved at start-up.
pub struct ModelSeries {
    pub ttft: Histogram,
    /// prompt, completion, cached.
    pub tokens: [IntCounter; 3],
    cost: Counter,
    /// The exact sum behind `cost`, in nano-USD; `cost` is set from it at each scrape.
    cost_nano: AtomicI64,
}

impl ModelSeries {
    pub fn add_cost_nano(&self, nano: i64) {
        self.cost_nano.fetch_add(nano, Ordering::Relaxed);
    }
}

/// Per-channel series, resolved at start-up.
pub struct ChannelSeries {
    pub upstream_duration: Histogram,
    /// By [`AttemptOutcome::label`], in [`ATTEMPT_OUTCOMES`] order.
    attempts: Vec<IntCounter>,
    up: IntGauge,
    inflight: IntGauge,
}

impl ChannelSeries {
    pub fn attempt(&self, outcome: AttemptOutcome) {
        let label = outcome.label();
        if let Some(i) = ATTEMPT_OUTCOMES.iter().position(|o| *o == label) {
            self.attempts[i].inc();
        }
    }
}

/// The opt-in per-account families (`metrics.account_label`). Accounts are not known at
/// start-up, so these children are looked up per request: one series per account and
/// kind, which is why it is off by default.
pub struct AccountSeries {
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost: CounterVec,
}

pub struct Metrics {
    registry: Registry,
    pub models: ModelLabels,
    channel_names: Vec<String>,
    /// Requests by route, model, channel and final status.
    requests: IntCounterVec,
    requests_grid: Box<[OnceLock<IntCounter>]>,
    /// Whole-request latency by route and stream (`true`/`false`).
    request_duration: Vec<[Histogram; 2]>,
    pub gateway_overhead: Histogram,
    pub per_model: Vec<ModelSeries>,
    pub per_channel: Vec<ChannelSeries>,
    ratelimited: Vec<IntCounter>,
    estimated_usage: Vec<IntCounter>,
    pub streams_open: IntGauge,
    pub in_flight: IntGauge,
    /// Ledger rows committed.
    pub ledger_rows: IntCounter,
    /// Ledger rows recorded but not yet committed (`tollgate_ledger_lag_rows`).
    pub ledger_queue: IntGauge,
    /// Duration of one group commit.
    pub ledger_commit: Histogram,
    /// Rows per group commit.
    pub ledger_batch_rows: Histogram,
    /// Connections closed before a full request head (probes, resets, slow clients).
    pub abandoned_connections: IntCounter,
    /// Request heads not read within `server.connections.head_timeout_ms`.
    pub head_timeouts: IntCounter,
    /// Request heads that could not be parsed (answered 400).
    pub malformed_requests: IntCounter,
    /// Connections refused at `server.connections.max_connections`.
    pub connections_refused: IntCounter,
    /// Key lookups that reached the store (cache misses), by result: `found`, `unknown`,
    /// `error`.
    pub key_store_lookups: [IntCounter; 3],
    /// Client connections open now.
    pub connections_open: IntGauge,
    /// Requests refused (503 `ledger_backlogged`) because the ledger queue was over its bound.
    pub ledger_refused: IntCounter,
    /// Rows of refused requests (nothing served, no money moved) not queued while the
    /// ledger was over its bound.
    pub ledger_skipped: IntCounter,
    /// CPU profiles the monitor wrote (`profiling.cpu_monitor`).
    pub cpu_profiles: IntCounter,
    /// Process CPU as the monitor last sampled it, in percent of one core.
    pub cpu_percent: Gauge,
    pub accounts: Option<AccountSeries>,
    /// The channel table the scrape-time gauges read (replaced by a reload).
    channels: arc_swap::ArcSwapOption<Channels>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    r.expect("valid metric definition")
}

impl Metrics {
    /// A registry with no configured models or channels (tools and tests).
    pub fn new() -> Metrics {
        Metrics::with_labels(ModelLabels::new([]), Vec::new(), false)
    }

    /// `models`: the configured model names; `channels`: the channel table's names in
    /// index order; `account_label`: register the per-account families.
    pub fn with_labels(models: ModelLabels, channels: Vec<String>, account_label: bool) -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn Collector>| registry.register(c).expect("metric registered once");
        let hist = |name: &str, help: &str, labels: &[&str]| {
            let v = must(HistogramVec::new(
                HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec()),
                labels,
            ));
            reg(Box::new(v.clone()));
            v
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = must(IntCounterVec::new(Opts::new(name, help), labels));
            reg(Box::new(v.clone()));
            v
        };
        let counter = |name: &str, help: &str| {
            let c = must(IntCounter::new(name, help));
            reg(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = must(IntGauge::new(name, help));
            reg(Box::new(g.clone()));
            g
        };

        let requests = counter_vec(
            "tollgate_requests_total",
            "Requests by route, model, channel and final status",
            &["route", "model", "channel", "status"],
        );
        let grid_len = ROUTES.len() * models.len() * (channels.len() + 1) * (STATUSES.len() + 1);
        let requests_grid = (0..grid_len).map(|_| OnceLock::new()).collect();

        let duration = hist(
            "tollgate_request_duration_seconds",
            "Whole-request latency, as tollgate measures it",
            &["route", "stream"],
        );
        let request_duration = ROUTES
            .iter()
            .map(|r| {
                [
                    duration.with_label_values(&[r.label(), "false"]),
                    duration.with_label_values(&[r.label(), "true"]),
                ]
            })
            .collect();
        let ttft = hist(
            "tollgate_ttft_seconds",
            "Time to the first response body byte sent to the client (the first token of a stream), 2xx only",
            &["model"],
        );
        let upstream = hist(
            "tollgate_upstream_duration_seconds",
            "Time spent waiting on the provider per served request (every attempt's head, then the body), by the channel that served it",
            &["channel"],
        );
        let gateway_overhead = must(Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_gateway_overhead_seconds",
                "Time inside tollgate per request: the whole request less the time waiting on providers",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        ));
        reg(Box::new(gateway_overhead.clone()));
        let tokens = counter_vec(
            "tollgate_tokens_total",
            "Tokens settled (reported by the provider, or estimated), by model and kind",
            &["model", "kind"],
        );
        let cost = must(CounterVec::new(
            Opts::new(
                "tollgate_cost_usd_total",
                "USD charged to accounts, by model (the ledger's integer amounts)",
            ),
            &["model"],
        ));
        reg(Box::new(cost.clone()));
        let per_model = (0..models.len())
            .map(|i| {
                let m = models.name(i);
                ModelSeries {
                    ttft: ttft.with_label_values(&[m]),
                    tokens: ["prompt", "completion", "cached"]
                        .map(|k| tokens.with_label_values(&[m, k])),
                    cost: cost.with_label_values(&[m]),
                    cost_nano: AtomicI64::new(0),
                }
            })
            .collect();

        let attempts = counter_vec(
            "tollgate_upstream_attempts_total",
            "Upstream attempts by channel and outcome",
            &["channel", "outcome"],
        );
        let up = must(IntGaugeVec::new(
            Opts::new(
                "tollgate_channel_up",
                "1 when the channel's address is resolved and its health breaker lets traffic through",
            ),
            &["channel"],
        ));
        reg(Box::new(up.clone()));
        let inflight = must(IntGaugeVec::new(
            Opts::new(
                "tollgate_channel_inflight",
                "Requests holding one of the channel's concurrency slots",
            ),
            &["channel"],
        ));
        reg(Box::new(inflight.clone()));
        let per_channel = channels
            .iter()
            .map(|c| ChannelSeries {
                upstream_duration: upstream.with_label_values(&[c]),
                attempts: ATTEMPT_OUTCOMES
                    .iter()
                    .map(|o| attempts.with_label_values(&[c.as_str(), o]))
                    .collect(),
                up: up.with_label_values(&[c]),
                inflight: inflight.with_label_values(&[c]),
            })
            .collect();

        let limited = counter_vec(
            "tollgate_ratelimited_total",
            "Requests tollgate refused under a limit of its own, by reason",
            &["reason"],
        );
        let ratelimited = GatewayError::LIMIT_REASONS
            .iter()
            .map(|r| limited.with_label_values(&[r]))
            .collect();
        let estimated = counter_vec(
            "tollgate_estimated_usage_total",
            "Requests settled on an estimate because no usage arrived, by reason",
            &["reason"],
        );
        let estimated_usage = ESTIMATE_REASONS
            .iter()
            .map(|r| estimated.with_label_values(&[r.label()]))
            .collect();

        let ledger_commit = must(Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_ledger_commit_seconds",
                "Duration of one ledger group commit",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
        ));
        reg(Box::new(ledger_commit.clone()));
        let ledger_batch_rows = must(Histogram::with_opts(
            HistogramOpts::new("tollgate_ledger_batch_rows", "Rows per ledger group commit")
                .buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                    10000.0,
                ]),
        ));
        reg(Box::new(ledger_batch_rows.clone()));

        let build = must(IntGaugeVec::new(
            Opts::new(
                "tollgate_build_info",
                "The running build: version and commit",
            ),
            &["version", "commit"],
        ));
        reg(Box::new(build.clone()));
        build
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("TOLLGATE_COMMIT")])
            .set(1);
        let cpu_percent = must(Gauge::new(
            "tollgate_process_cpu_percent",
            "Process CPU in percent of one core, as the CPU monitor last sampled it",
        ));
        reg(Box::new(cpu_percent.clone()));

        let accounts = account_label.then(|| {
            let cost = must(CounterVec::new(
                Opts::new(
                    "tollgate_account_cost_usd_total",
                    "USD charged, by account (metrics.account_label)",
                ),
                &["account"],
            ));
            reg(Box::new(cost.clone()));
            AccountSeries {
                requests: counter_vec(
                    "tollgate_account_requests_total",
                    "Requests by account (metrics.account_label)",
                    &["account"],
                ),
                tokens: counter_vec(
                    "tollgate_account_tokens_total",
                    "Tokens settled, by account and kind (metrics.account_label)",
                    &["account", "kind"],
                ),
                cost,
            }
        });

        Metrics {
            models,
            channel_names: channels,
            requests,
            requests_grid,
            request_duration,
            gateway_overhead,
            per_model,
            per_channel,
            ratelimited,
            estimated_usage,
            streams_open: gauge(
                "tollgate_streams_open",
                "Streaming responses being relayed now",
            ),
            in_flight: gauge("tollgate_in_flight_requests", "Requests being served"),
            ledger_rows: counter("tollgate_ledger_rows_total", "Ledger rows committed"),
            ledger_queue: gauge(
                "tollgate_ledger_lag_rows",
                "Ledger rows recorded but not yet committed",
            ),
            ledger_commit,
            ledger_batch_rows,
            abandoned_connections: counter(
                "tollgate_connections_abandoned_total",
                "Connections closed before a full request head",
            ),
            head_timeouts: counter(
                "tollgate_request_head_timeouts_total",
                "Request heads not read within the head deadline",
            ),
            malformed_requests: counter(
                "tollgate_malformed_requests_total",
                "Request heads that could not be parsed",
            ),
            connections_refused: counter(
                "tollgate_connections_refused_total",
                "Connections refused at max_connections",
            ),
            key_store_lookups: {
                let v = counter_vec(
                    "tollgate_key_store_lookups_total",
                    "API key lookups that missed the cache and read the store, by result",
                    &["result"],
                );
                ["found", "unknown", "error"].map(|r| v.with_label_values(&[r]))
            },
            connections_open: gauge("tollgate_connections_open", "Client connections open now"),
            ledger_refused: counter(
                "tollgate_ledger_refused_total",
                "Requests refused because the ledger queue was over accounting.max_queue_rows",
            ),
            ledger_skipped: counter(
                "tollgate_ledger_skipped_rows_total",
                "Rows of requests that reached no provider and moved no money, not queued while the ledger was over its bound",
            ),
            cpu_profiles: counter(
                "tollgate_cpu_profiles_total",
                "CPU profiles written by the CPU monitor",
            ),
            cpu_percent,
            accounts,
            channels: arc_swap::ArcSwapOption::empty(),
            registry,
        }
    }

    /// The channel table whose state (`channel_up`, `channel_inflight`) is read at each
    /// scrape.
    pub fn watch_channels(&self, channels: Channels) {
        self.channels.store(Some(Arc::new(channels)));
    }

    /// Counts one finished request. `channel`: an index into the channel table.
    pub fn request(&self, route: Endpoint, model: usize, channel: Option<usize>, status: u16) {
        let n_channels = self.channel_names.len() + 1;
        let channel = channel
            .filter(|c| *c < self.channel_names.len())
            .unwrap_or(self.channel_names.len());
        let status = status_index(status);
        let model = model.min(self.models.len() - 1);
        let slot = ((route_index(route) * self.models.len() + model) * n_channels + channel)
            * (STATUSES.len() + 1)
            + status;
        let Some(cell) = self.requests_grid.get(slot) else {
            return;
        };
        cell.get_or_init(|| {
            self.requests.with_label_values(&[
                route.label(),
                self.models.name(model),
                self.channel_names
                    .get(channel)
                    .map_or("none", String::as_str),
                &status_label(status),
            ])
        })
        .inc();
    }

    pub fn request_duration(&self, route: Endpoint, stream: bool) -> &Histogram {
        &self.request_duration[route_index(route)][usize::from(stream)]
    }

    /// Counts a refusal by its [`GatewayError::limit_reason`].
    pub fn ratelimited(&self, reason: &str) {
        if let Some(i) = GatewayError::LIMIT_REASONS
            .iter()
            .position(|r| *r == reason)
        {
            self.ratelimited[i].inc();
        }
    }

    pub fn estimated(&self, reason: EstimateReason) {
        if let Some(i) = ESTIMATE_REASONS.iter().position(|r| *r == reason) {
            self.estimated_usage[i].inc();
        }
    }

    pub fn channel(&self, index: usize) -> Option<&ChannelSeries> {
        self.per_channel.get(index)
    }

    /// Adds a collector built elsewhere (the admission queue's metrics).
    pub fn register(&self, c: Box<dyn prometheus::core::Collector>) {
        if let Err(e) = self.registry.register(c) {
            tracing::warn!(error = %e, "metric not registered");
        }
    }

    /// Takes a family out of the registry (a reload replacing the cache that owns it).
    pub fn unregister(&self, c: Box<dyn prometheus::core::Collector>) {
        let _ = self.registry.unregister(c);
    }

    /// The text exposition format. Brings the scrape-time series up to date first.
    pub fn render(&self) -> Vec<u8> {
        if let Some(channels) = self.channels.load_full() {
            for (c, s) in channels.iter().zip(&self.per_channel) {
                s.up.set(i64::from(c.peer().is_some() && c.health.is_available()));
                s.inflight.set(c.in_use() as i64);
            }
        }
        for m in &self.per_model {
            // Set from the exact integer sum, so the exported value never drifts from the
            // ledger by float accumulation.
            let usd = m.cost_nano.load(Ordering::Relaxed) as f64 / 1e9;
            m.cost.reset();
            m.cost.inc_by(usd);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Shared handle, as the filters and services hold it.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn unknown_models_are_counted_as_other_never_as_their_name() {
        let m = Metrics::with_labels(
            ModelLabels::new(["gpt-x".to_string()]),
            vec!["main".into()],
            false,
        );
        let known = m.models.of(Some("gpt-x"));
        let unknown = m.models.of(Some("attacker-chosen-name"));
        assert_eq!(unknown, MODEL_OTHER);
        m.request(Endpoint::Chat, known, Some(0), 200);
        m.request(Endpoint::Chat, unknown, None, 404);
        m.request(Endpoint::Chat, unknown, None, 404);
        m.request(Endpoint::Unknown, MODEL_NONE, None, 799);
        let t = text(&m);
        assert!(t.contains(
            r#"tollgate_requests_total{channel="main",model="gpt-x",route="chat",status="200"} 1"#
        ));
        assert!(t.contains(
            r#"tollgate_requests_total{channel="none",model="other",route="chat",status="404"} 2"#
        ));
        assert!(t.contains(r#"model="none",route="unknown",status="other"} 1"#));
        assert!(!t.contains("attacker"));
    }

    #[test]
    fn cost_is_exported_from_the_exact_nano_sum() {
        let m = Metrics::with_labels(ModelLabels::new(["a".to_string()]), vec![], false);
        let a = m.models.of(Some("a"));
        for _ in 0..10 {
            m.per_model[a].add_cost_nano(100_000_000); // 0.1 USD, not exact in binary
        }
        assert!(text(&m).contains(r#"tollgate_cost_usd_total{model="a"} 1"#));
        // A second scrape does not add it again.
        assert!(text(&m).contains(r#"tollgate_cost_usd_total{model="a"} 1"#));
    }

    #[test]
    fn every_reason_and_build_info_are_exported_from_the_start() {
        let t = text(&Metrics::new());
        for r in GatewayError::LIMIT_REASONS {
            assert!(
                t.contains(&format!(r#"tollgate_ratelimited_total{{reason="{r}"}} 0"#)),
                "{r}"
            );
        }
        assert!(t.contains("tollgate_build_info{commit="));
        assert!(t.contains("tollgate_estimated_usage_total{reason=\"cut\"} 0"));
    }
}
