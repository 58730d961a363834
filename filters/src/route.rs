//! `route`: which channels may serve this model, and in what order to try them.
//!
//! Channels are tried highest `priority` first; within one priority the order is a weighted
//! random shuffle, so traffic spreads by `weight`. A channel whose health breaker is open
//! (see [`crate::channel::Health`]) is tried last rather than never, so a model whose every
//! channel is cooling down still gets an attempt. The relay walks the resulting
//! [`PlannedAttempt`] list, bounded by `max_attempts`. Per attempt (the `queue` filter has
//! granted the channel slot), this filter marks a half-open channel's probe and reports the
//! outcome to the channel's health at once, so a failing channel is judged while a long
//! stream that failed over is still running.

use std::collections::HashMap;

use async_trait::async_trait;
use rand::Rng;
use serde::Deserialize;

use crate::chain::{Attempt, AttemptOutcome, Phases};
use crate::channel::{Channels, HealthConfig};
use crate::{Ctx, Endpoint, Filter, GatewayError};

/// `routing:` in the YAML: attempts per request and how channel health is judged.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Upper bound on upstream attempts per request, over all channels.
    pub max_attempts: usize,
    pub window_s: u64,
    pub min_requests: u32,
    pub failure_threshold: u32,
    pub failure_ratio: f64,
    pub cooldown_s: u64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        let h = HealthConfig::default();
        RoutingConfig {
            max_attempts: 3,
            window_s: h.window_s,
            min_requests: h.min_requests,
            failure_threshold: h.failure_threshold,
            failure_ratio: h.failure_ratio,
            cooldown_s: h.cooldown_s,
        }
    }
}

impl RoutingConfig {
    pub fn health(&self) -> HealthConfig {
        HealthConfig {
            window_s: self.window_s,
            min_requests: self.min_requests,
            failure_threshold: self.failure_threshold,
            failure_ratio: self.failure_ratio,
            cooldown_s: self.cooldown_s,
        }
    }
}

/// `routes:` in the YAML: which channel serves body-less requests (`GET /v1/files/{id}`,
/// `DELETE /v1/files/{id}`, `GET /v1/batches`) under a path prefix. Without a matching
/// entry they go to the first channel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRoute {
    pub prefix: String,
    pub channel: String,
}

/// One planned upstream attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedAttempt {
    /// Index into the channel table.
    pub channel: usize,
    /// The model name to send upstream, when `model_map` renames it.
    pub upstream_model: Option<String>,
}

/// Orders candidate channels for a model. Shared by every request.
pub struct ChannelPicker {
    channels: Channels,
    max_attempts: usize,
    /// model → channel indices serving it, sorted by priority (highest first).
    by_model: HashMap<String, Vec<usize>>,
    /// Path prefix → channel index, longest prefix first.
    by_path: Vec<(String, usize)>,
}

impl ChannelPicker {
    pub fn new(channels: Channels, max_attempts: usize) -> Self {
        Self::with_paths(channels, max_attempts, &[])
    }

    /// With `routes:` for body-less requests; an entry naming no channel is ignored (the
    /// config validation refuses it before this point).
    pub fn with_paths(channels: Channels, max_attempts: usize, paths: &[PathRoute]) -> Self {
        let mut by_path: Vec<(String, usize)> = paths
            .iter()
            .filter_map(|r| {
                let i = channels.iter().position(|c| c.name == r.channel)?;
                Some((r.prefix.clone(), i))
            })
            .collect();
        by_path.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, ch) in channels.iter().enumerate() {
            let names = ch.models.iter().chain(ch.model_map.keys());
            for m in names {
                let list = by_model.entry(m.clone()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        for list in by_model.values_mut() {
            list.sort_by_key(|&i| std::cmp::Reverse(channels[i].priority));
        }
        ChannelPicker {
            channels,
            max_attempts,
            by_model,
            by_path,
        }
    }

    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// Every model some channel serves, sorted.
    pub fn models(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.by_model.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn serves(&self, model: &str) -> bool {
        self.by_model.contains_key(model)
    }

    /// The one attempt for a body-less request on `path`: the `routes:` entry with the
    /// longest matching prefix, else the first channel.
    pub fn plan_path(&self, path: &str) -> Option<Vec<PlannedAttempt>> {
        let channel = self
            .by_path
            .iter()
            .find(|(prefix, _)| path.starts_with(prefix.as_str()))
            .map(|&(_, i)| i)
            .or((!self.channels.is_empty()).then_some(0))?;
        Some(vec![PlannedAttempt {
            channel,
            upstream_model: None,
        }])
    }

    /// The attempt order for a chat request for `model`, or `None` if no channel serves it.
    pub fn plan(&self, model: &str) -> Option<Vec<PlannedAttempt>> {
        self.plan_for(model, Endpoint::Chat)
    }

    /// The attempt order for `model` on `endpoint`: the channels serving the model that can
    /// answer the endpoint natively or through translation (see [`Endpoint::served_by`]).
    /// `None` if no channel serves the model; empty if none of those can answer.
    pub fn plan_for(&self, model: &str, endpoint: Endpoint) -> Option<Vec<PlannedAttempt>> {
        let chans = &self.channels;
        let all = self.by_model.get(model)?;
        // Borrowed in the common case, where every channel of the model can answer.
        let candidates: std::borrow::Cow<[usize]> =
            if all.iter().all(|&i| endpoint.served_by(chans[i].wire)) {
                all.into()
            } else {
                all.iter()
                    .copied()
                    .filter(|&i| endpoint.served_by(chans[i].wire))
                    .collect()
            };
        let mut rng = rand::rng();
        let mut ordered = Vec::with_capacity(candidates.len());
        let mut cooling = Vec::new();
        let mut start = 0;
        while start < candidates.len() {
            let prio = chans[candidates[start]].priority;
            let end = candidates[start..]
                .iter()
                .position(|&i| chans[i].priority != prio)
                .map_or(candidates.len(), |n| start + n);
            // Weighted shuffle of one priority tier: repeatedly draw by remaining weight.
            let mut tier: Vec<usize> = candidates[start..end].to_vec();
            while !tier.is_empty() {
                let total: u64 = tier
                    .iter()
                    .map(|&i| u64::from(chans[i].weight.max(1)))
                    .sum();
                let mut pick = rng.random_range(0..total);
                let mut at = 0;
                for (n, &i) in tier.iter().enumerate() {
                    let w = u64::from(chans[i].weight.max(1));
                    if pick < w {
                        at = n;
                        break;
                    }
                    pick -= w;
                }
                let i = tier.swap_remove(at);
                if chans[i].health.is_available() {
                    ordered.push(i);
                } else {
                    cooling.push(i);
                }
            }
            start = end;
        }
        ordered.extend(cooling);
        ordered.truncate(self.max_attempts.max(1));
        Some(
            ordered
                .into_iter()
                .map(|i| PlannedAttempt {
                    channel: i,
                    upstream_model: chans[i].upstream_model(model).map(str::to_owned),
                })
                .collect(),
        )
    }
}

/// The `route` filter: plans the attempts; per attempt, marks the probe of a half-open
/// channel and reports the outcome to the channel's health.
pub struct Route {
    picker: std::sync::Arc<ChannelPicker>,
}

impl Route {
    pub fn new(picker: std::sync::Arc<ChannelPicker>) -> Self {
        Route { picker }
    }
}

#[async_trait]
impl Filter for Route {
    fn name(&self) -> &'static str {
        "route"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_BODY | Phases::ATTEMPT_START | Phases::ATTEMPT_END
    }

    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        if ctx.facts.is_none() {
            // A body-less request (GET/DELETE under /v1/): routed by its path.
            ctx.plan = self
                .picker
                .plan_path(&ctx.path)
                .ok_or(GatewayError::NoChannelAvailable)?;
            return Ok(());
        }
        let model = ctx.model().unwrap_or_default().to_owned();
        if model.is_empty() {
            return Err(GatewayError::InvalidRequest {
                message: "You must provide a model parameter.".into(),
                param: Some("model"),
            });
        }
        ctx.plan = self
            .picker
            .plan_for(&model, ctx.endpoint)
            .ok_or_else(|| GatewayError::ModelNotFound(model.clone()))?;
        if ctx.plan.is_empty() {
            return Err(GatewayError::invalid(format!(
                "The model `{}` is not served on {} by any of its channels.",
                crate::error::echo_name(&model),
                ctx.endpoint.label()
            )));
        }
        Ok(())
    }

    /// The channel slot is the queue's (it runs first); here, a half-open channel's attempt
    /// becomes its probe.
    async fn on_attempt_start(
        &self,
        _ctx: &mut Ctx,
        attempt: &Attempt<'_>,
    ) -> Result<(), GatewayError> {
        attempt.channel.health.attempt_started();
        Ok(())
    }

    fn on_attempt_end(&self, ctx: &mut Ctx, attempt: &Attempt<'_>, outcome: AttemptOutcome) {
        let failed = outcome.is_channel_failure();
        if attempt.channel.health.report(failed) {
            tracing::warn!(request_id = %ctx.request_id, channel = %attempt.channel.name, "channel cooling down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{build_channels, ChannelConfig};

    fn ch(name: &str, prio: i32, weight: u32, models: &[&str]) -> ChannelConfig {
        serde_json::from_value(serde_json::json!({
            "name": name, "base_url": "http://127.0.0.1:9", "models": models,
            "priority": prio, "weight": weight,
        }))
        .unwrap()
    }

    fn picker(channels: Vec<ChannelConfig>) -> ChannelPicker {
        let health = HealthConfig {
            min_requests: 2,
            failure_threshold: 2,
            failure_ratio: 0.5,
            window_s: 60,
            cooldown_s: 60,
        };
        ChannelPicker::new(build_channels(&channels, health).unwrap(), 3)
    }

    #[test]
    fn higher_priority_is_always_tried_first() {
        let p = picker(vec![ch("low", 1, 100, &["m"]), ch("high", 10, 1, &["m"])]);
        for _ in 0..50 {
            let plan = p.plan("m").unwrap();
            assert_eq!(plan.iter().map(|a| a.channel).collect::<Vec<_>>(), [1, 0]);
        }
    }

    #[test]
    fn weights_spread_traffic_within_a_priority() {
        let p = picker(vec![ch("a", 5, 3, &["m"]), ch("b", 5, 1, &["m"])]);
        let firsts_a = (0..4000)
            .filter(|_| p.plan("m").unwrap()[0].channel == 0)
            .count();
        // Expected 3000; the bound is loose enough never to flake.
        assert!((2600..3400).contains(&firsts_a), "{firsts_a}");
    }

    #[test]
    fn unknown_model_has_no_plan_and_mapped_names_route() {
        let mut c = ch("a", 1, 1, &["gpt-4o"]);
        c.model_map.insert("gpt-4".into(), "gpt-4o".into());
        let p = picker(vec![c]);
        assert!(p.plan("nope").is_none());
        let plan = p.plan("gpt-4").unwrap();
        assert_eq!(plan[0].upstream_model.as_deref(), Some("gpt-4o"));
        assert_eq!(p.plan("gpt-4o").unwrap()[0].upstream_model, None);
        assert_eq!(p.models(), ["gpt-4", "gpt-4o"]);
    }

    #[tokio::test]
    async fn a_failing_channel_cools_down_per_attempt_and_goes_last() {
        let p = std::sync::Arc::new(picker(vec![ch("a", 10, 1, &["m"]), ch("b", 1, 1, &["m"])]));
        let route = Route::new(p.clone());
        let chans = p.channels().clone();
        let mut ctx = Ctx::new("r".into());
        for n in 1..=2 {
            let at = Attempt {
                channel: &chans[0],
                number: n,
            };
            route.on_attempt_start(&mut ctx, &at).await.unwrap();
            route.on_attempt_end(&mut ctx, &at, AttemptOutcome::Status(503));
        }
        let plan = p.plan("m").unwrap();
        assert_eq!(plan.iter().map(|a| a.channel).collect::<Vec<_>>(), [1, 0]);
    }

    #[test]
    fn body_less_requests_route_by_the_longest_prefix_else_the_first_channel() {
        let chans = vec![ch("a", 1, 1, &["m"]), ch("b", 1, 1, &["m"])];
        let routes = [
            PathRoute {
                prefix: "/v1/files".into(),
                channel: "b".into(),
            },
            PathRoute {
                prefix: "/v1/files/special".into(),
                channel: "a".into(),
            },
        ];
        let p = ChannelPicker::with_paths(
            build_channels(&chans, HealthConfig::default()).unwrap(),
            3,
            &routes,
        );
        assert_eq!(p.plan_path("/v1/files/f-1").unwrap()[0].channel, 1);
        assert_eq!(p.plan_path("/v1/files/special/x").unwrap()[0].channel, 0);
        assert_eq!(p.plan_path("/v1/batches").unwrap()[0].channel, 0);
    }

    #[test]
    fn attempts_are_bounded() {
        let chans = (0..6).map(|i| ch(&format!("c{i}"), 1, 1, &["m"])).collect();
        let p = picker(chans);
        assert_eq!(p.plan("m").unwrap().len(), 3);
    }
}
