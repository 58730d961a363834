//! `route`: which channels may serve this model, and in what order to try them.
//!
//! Channels are tried highest `priority` first; within one priority the order is a weighted
//! random shuffle, so traffic spreads by `weight`. A channel that failed
//! `health.failure_threshold` times in a row sits out for `health.cooldown` (it is still tried
//! last rather than never, so a model whose every channel is cooling down still gets an
//! attempt). The relay walks the resulting [`Attempt`] list, bounded by `max_attempts`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rand::Rng;

use crate::{Ctx, Filter, GatewayError};

/// The routing view of one channel (the relay holds the connection side).
#[derive(Debug, Clone)]
pub struct ChannelRoute {
    pub name: String,
    pub models: Vec<String>,
    /// Client model name → upstream model name.
    pub model_map: HashMap<String, String>,
    pub priority: i32,
    pub weight: u32,
}

/// `routing:` settings.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub channels: Vec<ChannelRoute>,
    /// Upper bound on upstream attempts per request, over all channels.
    pub max_attempts: usize,
    pub failure_threshold: u32,
    pub cooldown: Duration,
}

/// One planned upstream attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Index into the channel table.
    pub channel: usize,
    /// The model name to send upstream, when `model_map` renames it.
    pub upstream_model: Option<String>,
}

/// Consecutive failures and the cool-down deadline of one channel.
#[derive(Default)]
struct Health {
    failures: AtomicU32,
    /// Nanoseconds since `epoch` until which the channel is cooling down.
    cooling_until: AtomicU64,
}

/// Orders candidate channels for a model. Shared by every request.
pub struct ChannelPicker {
    cfg: RouteConfig,
    /// model → channel indices serving it, sorted by priority (highest first).
    by_model: HashMap<String, Vec<usize>>,
    health: Vec<Health>,
    epoch: Instant,
}

impl ChannelPicker {
    pub fn new(cfg: RouteConfig) -> Self {
        let mut by_model: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, ch) in cfg.channels.iter().enumerate() {
            let names = ch.models.iter().chain(ch.model_map.keys());
            for m in names {
                let list = by_model.entry(m.clone()).or_default();
                if !list.contains(&i) {
                    list.push(i);
                }
            }
        }
        for list in by_model.values_mut() {
            list.sort_by_key(|&i| std::cmp::Reverse(cfg.channels[i].priority));
        }
        let health = cfg.channels.iter().map(|_| Health::default()).collect();
        ChannelPicker {
            cfg,
            by_model,
            health,
            epoch: Instant::now(),
        }
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

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn cooling(&self, i: usize, now: u64) -> bool {
        self.health[i].cooling_until.load(Ordering::Relaxed) > now
    }

    /// The attempt order for `model`, or `None` if no channel serves it.
    pub fn plan(&self, model: &str) -> Option<Vec<Attempt>> {
        let candidates = self.by_model.get(model)?;
        let now = self.now_ns();
        let mut rng = rand::rng();
        let mut ordered = Vec::with_capacity(candidates.len());
        let mut cooling = Vec::new();
        let mut start = 0;
        while start < candidates.len() {
            let prio = self.cfg.channels[candidates[start]].priority;
            let end = candidates[start..]
                .iter()
                .position(|&i| self.cfg.channels[i].priority != prio)
                .map_or(candidates.len(), |n| start + n);
            // Weighted shuffle of one priority tier: repeatedly draw by remaining weight.
            let mut tier: Vec<usize> = candidates[start..end].to_vec();
            while !tier.is_empty() {
                let total: u64 = tier
                    .iter()
                    .map(|&i| u64::from(self.cfg.channels[i].weight.max(1)))
                    .sum();
                let mut pick = rng.random_range(0..total);
                let mut at = 0;
                for (n, &i) in tier.iter().enumerate() {
                    let w = u64::from(self.cfg.channels[i].weight.max(1));
                    if pick < w {
                        at = n;
                        break;
                    }
                    pick -= w;
                }
                let i = tier.swap_remove(at);
                if self.cooling(i, now) {
                    cooling.push(i);
                } else {
                    ordered.push(i);
                }
            }
            start = end;
        }
        ordered.extend(cooling);
        ordered.truncate(self.cfg.max_attempts.max(1));
        Some(
            ordered
                .into_iter()
                .map(|i| Attempt {
                    channel: i,
                    upstream_model: self.cfg.channels[i].model_map.get(model).cloned(),
                })
                .collect(),
        )
    }

    /// Records an attempt's result for the channel's health.
    pub fn report(&self, channel: usize, failed: bool) {
        let h = &self.health[channel];
        if !failed {
            h.failures.store(0, Ordering::Relaxed);
            h.cooling_until.store(0, Ordering::Relaxed);
            return;
        }
        let n = h.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.cfg.failure_threshold {
            let until = self.now_ns() + self.cfg.cooldown.as_nanos() as u64;
            h.cooling_until.store(until, Ordering::Relaxed);
            tracing::warn!(channel = %self.cfg.channels[channel].name, failures = n, "channel cooling down");
        }
    }

    pub fn is_healthy(&self, channel: usize) -> bool {
        !self.cooling(channel, self.now_ns())
    }
}

/// The `route` filter: plans the attempts, and feeds results back into channel health.
pub struct Route {
    picker: Arc<ChannelPicker>,
}

impl Route {
    pub fn new(picker: Arc<ChannelPicker>) -> Self {
        Route { picker }
    }
}

#[async_trait]
impl Filter for Route {
    fn name(&self) -> &'static str {
        "route"
    }

    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let model = ctx.model().unwrap_or_default();
        if model.is_empty() {
            return Err(GatewayError::InvalidRequest {
                message: "You must provide a model parameter.".into(),
                param: Some("model"),
            });
        }
        ctx.route = self
            .picker
            .plan(model)
            .ok_or_else(|| GatewayError::ModelNotFound(model.to_owned()))?;
        Ok(())
    }

    async fn on_done(&self, ctx: &mut Ctx) {
        for &(channel, failed) in &ctx.outcome.channel_results {
            self.picker.report(channel, failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str, prio: i32, weight: u32, models: &[&str]) -> ChannelRoute {
        ChannelRoute {
            name: name.into(),
            models: models.iter().map(|s| s.to_string()).collect(),
            model_map: HashMap::new(),
            priority: prio,
            weight,
        }
    }

    fn picker(channels: Vec<ChannelRoute>) -> ChannelPicker {
        ChannelPicker::new(RouteConfig {
            channels,
            max_attempts: 3,
            failure_threshold: 2,
            cooldown: Duration::from_secs(60),
        })
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

    #[test]
    fn failing_channel_cools_down_and_goes_last() {
        let p = picker(vec![ch("a", 10, 1, &["m"]), ch("b", 1, 1, &["m"])]);
        p.report(0, true);
        assert!(p.is_healthy(0));
        p.report(0, true);
        assert!(!p.is_healthy(0));
        let plan = p.plan("m").unwrap();
        assert_eq!(plan.iter().map(|a| a.channel).collect::<Vec<_>>(), [1, 0]);
    }

    #[test]
    fn attempts_are_bounded() {
        let chans = (0..6).map(|i| ch(&format!("c{i}"), 1, 1, &["m"])).collect();
        let p = picker(chans);
        assert_eq!(p.plan("m").unwrap().len(), 3);
    }
}
