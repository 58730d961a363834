//! `observe`: the metrics and the access log, as a filter. First in the chain, so its
//! `on_done` runs last, when billing has settled and the status is final.

use std::sync::Arc;

use async_trait::async_trait;
use tollgate_filters::{Attempt, AttemptOutcome, Channels, Ctx, Filter, Phases};

use crate::metrics::Metrics;

pub struct Observe {
    metrics: Arc<Metrics>,
    channels: Channels,
}

impl Observe {
    pub fn new(metrics: Arc<Metrics>, channels: Channels) -> Self {
        Observe { metrics, channels }
    }
}

#[async_trait]
impl Filter for Observe {
    fn name(&self) -> &'static str {
        "observe"
    }

    fn phases(&self) -> Phases {
        Phases::ATTEMPT_END | Phases::DONE
    }

    fn on_attempt_end(&self, _ctx: &mut Ctx, attempt: &Attempt<'_>, outcome: AttemptOutcome) {
        self.metrics
            .upstream_attempts
            .with_label_values(&[attempt.channel.name.as_str(), outcome.label()])
            .inc();
    }

    async fn on_done(&self, ctx: &mut Ctx) {
        let elapsed = ctx.started.elapsed();
        let status = ctx.outcome.status;
        let route = ctx.endpoint.label();
        let mut code = itoa::Buffer::new();
        self.metrics
            .requests
            .with_label_values(&[route, code.format(status)])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
        if let Some(t) = ctx.outcome.first_byte {
            self.metrics
                .ttfb
                .with_label_values(&[route])
                .observe(t.as_secs_f64());
        }
        let channel = ctx
            .outcome
            .channel
            .and_then(|i| self.channels.get(i))
            .map_or("-", |c| c.name.as_str());
        tracing::info!(
            request_id = %ctx.request_id,
            key = ctx.key.as_ref().map_or("-", |k| k.prefix.as_str()),
            model = ctx.model().unwrap_or("-"),
            channel,
            status,
            attempts = ctx.outcome.attempts,
            latency_ms = elapsed.as_millis() as u64,
            client_gone = ctx.outcome.client_gone,
            estimated = ctx.settlement.estimated.map_or("-", |r| r.label()),
            error = ctx.outcome.error.as_ref().and_then(|e| e.code()).unwrap_or("-"),
            "request"
        );
    }
}
