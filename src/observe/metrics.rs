//! `metrics`: the per-request Prometheus series and the latency summary, as a filter.
//! First in the chain, so its `on_done` runs last: billing has settled (tokens, the cost
//! charged) and the status is final.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use tollgate_filters::{Attempt, AttemptOutcome, Ctx, Filter, Phases};

use super::{LatencySummary, Timings};
use crate::metrics::Metrics;

/// `metrics:` in the YAML.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// The per-request series (requests, durations, tokens, cost, 429s) and the latency
    /// summary. Off, the filter is left out of the chain; connection and ledger series stay.
    pub enabled: bool,
    /// Adds `tollgate_account_{requests,tokens,cost_usd}_total{account}`: one series per
    /// account (three per account for tokens), for small deployments only.
    pub account_label: bool,
    /// Length of the latency summary's sliding window.
    pub summary_window_s: u64,
    /// Serve `/metrics`, `/healthz` and `/readyz` without the admin token (for scrapers and
    /// orchestrator probes that cannot send one). Every other admin route keeps it.
    pub public: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: true,
            account_label: false,
            summary_window_s: 60,
            public: false,
        }
    }
}

pub struct MetricsFilter {
    metrics: Arc<Metrics>,
    summary: Arc<LatencySummary>,
}

impl MetricsFilter {
    pub fn new(metrics: Arc<Metrics>, summary: Arc<LatencySummary>) -> Self {
        MetricsFilter { metrics, summary }
    }
}

/// Held in `ctx.ext` while a stream is relayed: `tollgate_streams_open` goes down when the
/// request's context is dropped, however the request ended.
#[derive(Clone)]
struct OpenStream(#[allow(dead_code, reason = "held for its Drop")] Arc<StreamGauge>);

struct StreamGauge(prometheus::IntGauge);

impl Drop for StreamGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait]
impl Filter for MetricsFilter {
    fn name(&self) -> &'static str {
        "metrics"
    }

    fn phases(&self) -> Phases {
        Phases::ATTEMPT_END | Phases::RESPONSE_HEAD | Phases::DONE
    }

    fn on_attempt_end(&self, _ctx: &mut Ctx, attempt: &Attempt<'_>, outcome: AttemptOutcome) {
        if let Some(c) = self.metrics.channel(attempt.channel.index) {
            c.attempt(outcome);
        }
    }

    fn on_response_head(&self, ctx: &mut Ctx, _head: &mut pingora::http::ResponseHeader) {
        if ctx.facts.as_ref().is_some_and(|f| f.stream) {
            self.metrics.streams_open.inc();
            ctx.ext.insert(OpenStream(Arc::new(StreamGauge(
                self.metrics.streams_open.clone(),
            ))));
        }
    }

    async fn on_done(&self, ctx: &mut Ctx) {
        let m = &self.metrics;
        let t = Timings::of(ctx);
        let model = m.models.of(ctx.model());
        let channel = ctx.outcome.channel;
        let status = ctx.outcome.status;
        let stream = ctx.facts.as_ref().is_some_and(|f| f.stream);
        m.request(ctx.endpoint, model, channel, status);
        m.request_duration(ctx.endpoint, stream)
            .observe(t.total.as_secs_f64());
        m.gateway_overhead.observe(t.gateway.as_secs_f64());
        let series = &m.per_model[model];
        if (200..300).contains(&status) {
            if let Some(ttft) = t.ttft {
                series.ttft.observe(ttft.as_secs_f64());
            }
        }
        if let Some(c) = channel.and_then(|c| m.channel(c)) {
            c.upstream_duration.observe(t.upstream.as_secs_f64());
        }
        let usage = ctx.settlement.usage;
        series.tokens[0].inc_by(usage.prompt_tokens);
        series.tokens[1].inc_by(usage.completion_tokens);
        series.tokens[2].inc_by(usage.cached_tokens);
        let charged = ctx.charged_nano.unwrap_or(0);
        series.add_cost_nano(charged);
        if let Some(reason) = ctx.outcome.error.as_ref().and_then(|e| e.limit_reason()) {
            m.ratelimited(reason);
        }
        if let Some(reason) = ctx.settlement.estimated {
            m.estimated(reason);
        }
        if let (Some(a), Some(key)) = (&m.accounts, &ctx.key) {
            let account = key.account.as_str();
            a.requests.with_label_values(&[account]).inc();
            for (kind, n) in [
                ("prompt", usage.prompt_tokens),
                ("completion", usage.completion_tokens),
                ("cached", usage.cached_tokens),
            ] {
                if n > 0 {
                    a.tokens.with_label_values(&[account, kind]).inc_by(n);
                }
            }
            if charged > 0 {
                a.cost
                    .with_label_values(&[account])
                    .inc_by(charged as f64 / 1e9);
            }
        }
        self.summary.record(model, &t, ctx.outcome.attempts > 0);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tollgate_filters::billing::Usage;
    use tollgate_filters::{Endpoint, EstimateReason, GatewayError, Limit, RequestFacts};

    use super::*;
    use crate::metrics::ModelLabels;

    fn filter() -> (MetricsFilter, Arc<Metrics>, Arc<LatencySummary>) {
        let labels = || ModelLabels::new(["m".to_string()]);
        let metrics = Arc::new(Metrics::with_labels(labels(), vec!["c".into()], true));
        let summary = Arc::new(LatencySummary::new(Duration::from_secs(60), labels()));
        (
            MetricsFilter::new(metrics.clone(), summary.clone()),
            metrics,
            summary,
        )
    }

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[tokio::test]
    async fn a_settled_request_counts_tokens_cost_and_its_estimate_reason() {
        let (f, m, summary) = filter();
        let mut ctx = Ctx::new("r".into());
        ctx.endpoint = Endpoint::Chat;
        ctx.facts = Some(RequestFacts {
            model: "m".into(),
            stream: true,
            ..Default::default()
        });
        ctx.key = Some(Arc::new(tollgate_filters::auth::KeyRecord {
            account: "acme".into(),
            ..Default::default()
        }));
        ctx.outcome.status = 200;
        ctx.outcome.channel = Some(0);
        ctx.outcome.attempts = 1;
        ctx.outcome.first_byte = Some(Duration::from_millis(3));
        ctx.settlement.usage = Usage {
            prompt_tokens: 7,
            completion_tokens: 5,
            cached_tokens: 2,
            cache_write_tokens: 0,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
            estimated: true,
        };
        ctx.settlement.estimated = Some(EstimateReason::Cut);
        ctx.charged_nano = Some(1_500_000_000);
        let mut head = pingora::http::ResponseHeader::build(200, None).unwrap();
        f.on_response_head(&mut ctx, &mut head);
        assert_eq!(m.streams_open.get(), 1);
        f.on_done(&mut ctx).await;
        drop(ctx);
        assert_eq!(m.streams_open.get(), 0);
        let t = text(&m);
        for line in [
            r#"tollgate_requests_total{channel="c",model="m",route="chat",status="200"} 1"#,
            r#"tollgate_tokens_total{kind="prompt",model="m"} 7"#,
            r#"tollgate_tokens_total{kind="completion",model="m"} 5"#,
            r#"tollgate_tokens_total{kind="cached",model="m"} 2"#,
            r#"tollgate_cost_usd_total{model="m"} 1.5"#,
            r#"tollgate_estimated_usage_total{reason="cut"} 1"#,
            r#"tollgate_ttft_seconds_count{model="m"} 1"#,
            r#"tollgate_request_duration_seconds_count{route="chat",stream="true"} 1"#,
            r#"tollgate_upstream_duration_seconds_count{channel="c"} 1"#,
            r#"tollgate_account_requests_total{account="acme"} 1"#,
            r#"tollgate_account_cost_usd_total{account="acme"} 1.5"#,
        ] {
            assert!(t.contains(line), "missing {line}\n{t}");
        }
        assert_eq!(summary.json()["models"]["m"]["total"]["count"], 1);
    }

    #[tokio::test]
    async fn a_refusal_is_counted_once_under_its_reason() {
        let (f, m, _) = filter();
        let mut ctx = Ctx::new("r".into());
        ctx.outcome.status = 429;
        ctx.outcome.error = Some(GatewayError::RateLimited {
            limit: Limit::Concurrency,
            retry_after: Duration::from_secs(1),
        });
        f.on_done(&mut ctx).await;
        let t = text(&m);
        assert!(t.contains(r#"tollgate_ratelimited_total{reason="concurrency"} 1"#));
        assert!(t.contains(r#"tollgate_ratelimited_total{reason="rpm"} 0"#));
        assert!(t.contains(
            r#"tollgate_requests_total{channel="none",model="none",route="unknown",status="429"} 1"#
        ));
    }
}
