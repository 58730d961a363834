//! `limits`: per-key requests/min, tokens/min and concurrency.
//!
//! A key's effective limits are its own values, else its account group's
//! (`limits.groups`), else `limits.default`. Requests/min and tokens/min are GCRA buckets:
//! one "theoretical arrival time" per key and dimension, so a bucket is a single number
//! updated under the lock, with no separate refill bookkeeping to race. A bucket holds a
//! minute's worth: a key may burst its whole per-minute allowance, then proceeds at the
//! steady rate.
//!
//! Tokens are counted up front as the prompt estimate plus the output cap (`n ×
//! max_tokens`, or `default_max_output`; none on routes that generate no output, such as
//! embeddings), like OpenAI's own estimate; when the response
//! reports its real usage the difference goes back into the bucket.
//!
//! Every answer carries OpenAI's `x-ratelimit-*` headers for the dimensions that are limited.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::chain::Phases;
use crate::ctx::ResponseHeaders;
use crate::{Ctx, Filter, GatewayError, Limit, RequestHead};

/// One set of limits (`limits.default`, a group, or a key's own); `None` means unlimited in
/// that dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSet {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrency: Option<u32>,
}

impl LimitSet {
    /// `self` where set, else `fallback`.
    pub fn or(self, fallback: LimitSet) -> LimitSet {
        LimitSet {
            rpm: self.rpm.or(fallback.rpm),
            tpm: self.tpm.or(fallback.tpm),
            concurrency: self.concurrency.or(fallback.concurrency),
        }
    }
}

/// `limits:` after validation.
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    pub default: LimitSet,
    pub groups: HashMap<String, LimitSet>,
    /// Output cap counted for tokens/min when a request sets no `max_tokens`.
    pub default_max_output: u64,
}

/// A GCRA bucket holding up to `per_minute` units, refilled continuously.
#[derive(Debug, Clone, Copy, Default)]
struct Gcra {
    /// Theoretical arrival time, as an offset from the limiter's epoch.
    tat: Duration,
}

const WINDOW: Duration = Duration::from_secs(60);

/// Lock shards for the per-key state.
const SHARDS: usize = 64;

impl Gcra {
    fn interval(per_minute: u32) -> Duration {
        WINDOW / per_minute.max(1)
    }

    /// Takes `n` units at `now`, or says how long until they would fit.
    fn take(&mut self, now: Duration, n: u64, per_minute: u32) -> Result<(), Duration> {
        let t = Self::interval(per_minute);
        let cost = t.saturating_mul(n.min(u32::MAX as u64) as u32);
        let start = self.tat.max(now);
        let new_tat = start + cost;
        // Allowed while the debt stays within one window.
        if new_tat.saturating_sub(now) > WINDOW {
            // (Callers refuse a request larger than the whole bucket before asking.)
            return Err(new_tat.saturating_sub(now) - WINDOW);
        }
        self.tat = new_tat;
        Ok(())
    }

    /// Gives `n` units back (never below `now`).
    fn give_back(&mut self, now: Duration, n: u64, per_minute: u32) {
        let back = Self::interval(per_minute).saturating_mul(n.min(u32::MAX as u64) as u32);
        self.tat = self.tat.saturating_sub(back).max(now);
    }

    fn remaining(&self, now: Duration, per_minute: u32) -> u64 {
        let debt = self.tat.saturating_sub(now);
        let free = WINDOW.saturating_sub(debt);
        (free.as_nanos() / Self::interval(per_minute).as_nanos().max(1)) as u64
    }

    /// Until the bucket is full again.
    fn reset(&self, now: Duration) -> Duration {
        self.tat.saturating_sub(now)
    }
}

#[derive(Default)]
struct KeyState {
    requests: Gcra,
    tokens: Gcra,
    in_flight: u32,
}

/// What a request holds, to give back in `on_done`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitHold {
    pub key_id: i64,
    pub limits: LimitSet,
    pub concurrency: bool,
    /// Tokens counted up front.
    pub tokens: u64,
}

/// The `limits` filter.
pub struct Limits {
    cfg: LimitsConfig,
    /// Per-key state, sharded by key id so that keys rarely share a lock.
    shards: Box<[Mutex<HashMap<i64, KeyState>>]>,
    epoch: Instant,
}

/// `6m0s`, `1.5s`, `120ms`: OpenAI's reset format.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let whole = d.as_secs();
    format!("{}m{}s", whole / 60, whole % 60)
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Self {
        Limits {
            cfg,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn effective(&self, key: &crate::auth::KeyRecord) -> LimitSet {
        let group = self.cfg.groups.get(&key.group).copied().unwrap_or_default();
        LimitSet {
            rpm: key.rpm,
            tpm: key.tpm,
            concurrency: key.concurrency,
        }
        .or(group)
        .or(self.cfg.default)
    }

    /// The shard holding `key_id`'s state.
    fn lock(&self, key_id: i64) -> std::sync::MutexGuard<'_, HashMap<i64, KeyState>> {
        let shard = (key_id as u64 % SHARDS as u64) as usize;
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refused(limit: Limit, wait: Duration) -> GatewayError {
        GatewayError::RateLimited {
            limit,
            retry_after: wait.max(Duration::from_millis(1)),
        }
    }

    /// Sets this filter's `x-ratelimit-*` headers for the limited dimensions.
    fn headers(&self, h: &mut ResponseHeaders, st: &KeyState, l: &LimitSet, now: Duration) {
        let mut bucket = |names: [&'static str; 3], g: &Gcra, per_minute: Option<u32>| {
            if let Some(pm) = per_minute {
                h.set(names[0], pm.to_string());
                h.set(names[1], g.remaining(now, pm).to_string());
                h.set(names[2], format_reset(g.reset(now)));
            }
        };
        bucket(
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
            &st.requests,
            l.rpm,
        );
        bucket(
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
            &st.tokens,
            l.tpm,
        );
    }
}

#[async_trait]
impl Filter for Limits {
    fn name(&self) -> &'static str {
        "limits"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEAD | Phases::REQUEST_BODY | Phases::DONE | Phases::ABANDON
    }

    /// Requests/min and concurrency: known before the body, so refused before reading it.
    async fn on_request_head(
        &self,
        ctx: &mut Ctx,
        _head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        let Some(key) = &ctx.key else {
            return Ok(());
        };
        let limits = self.effective(key);
        let now = self.now();
        let mut map = self.lock(key.id);
        let st = map.entry(key.id).or_default();
        if let Some(max) = limits.concurrency {
            if st.in_flight >= max {
                return Err(Self::refused(Limit::Concurrency, Duration::from_secs(1)));
            }
        }
        if let Some(rpm) = limits.rpm {
            let taken = st.requests.take(now, 1, rpm);
            self.headers(&mut ctx.response_headers, st, &limits, now);
            taken.map_err(|wait| Self::refused(Limit::RequestsPerMinute, wait))?;
        }
        let concurrency = limits.concurrency.is_some();
        if concurrency {
            st.in_flight += 1;
        }
        ctx.limit_hold = Some(LimitHold {
            key_id: key.id,
            limits,
            concurrency,
            tokens: 0,
        });
        Ok(())
    }

    /// Tokens/min: needs the body's prompt estimate and output cap.
    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(hold), Some(facts)) = (ctx.limit_hold.as_mut(), &ctx.facts) else {
            return Ok(());
        };
        let limits = hold.limits;
        let now = self.now();
        let mut map = self.lock(hold.key_id);
        let st = map.entry(hold.key_id).or_default();
        if let Some(tpm) = limits.tpm {
            // Embeddings and other non-generating routes count no output.
            let cap = facts.output_cap().unwrap_or(self.cfg.default_max_output);
            // Saturating: a sum that wrapped would admit anything.
            let tokens = facts
                .prompt_tokens_estimate
                .saturating_add(cap.saturating_mul(facts.choices.max(1)));
            if tokens > u64::from(tpm) {
                // Retrying can never help: say so, rather than name a wait.
                return Err(GatewayError::OverTokenLimit {
                    limit: tpm,
                    requested: tokens,
                });
            }
            let taken = st.tokens.take(now, tokens, tpm);
            if taken.is_ok() {
                hold.tokens = tokens;
            }
            self.headers(&mut ctx.response_headers, st, &limits, now);
            taken.map_err(|wait| Self::refused(Limit::TokensPerMinute, wait))?;
        }
        Ok(())
    }

    fn on_abandon(&self, ctx: &mut Ctx) {
        if let Some(hold) = ctx.limit_hold.take().filter(|h| h.concurrency) {
            if let Some(st) = self.lock(hold.key_id).get_mut(&hold.key_id) {
                st.in_flight = st.in_flight.saturating_sub(1);
            }
        }
    }

    /// Frees the concurrency slot; returns tokens counted but not used.
    async fn on_done(&self, ctx: &mut Ctx) {
        let Some(hold) = ctx.limit_hold.take() else {
            return;
        };
        let now = self.now();
        let mut map = self.lock(hold.key_id);
        let Some(st) = map.get_mut(&hold.key_id) else {
            return;
        };
        if hold.concurrency {
            st.in_flight = st.in_flight.saturating_sub(1);
        }
        if let Some(tpm) = hold.limits.tpm {
            // The settlement (the same one billing charges) settles the count: reported or
            // estimated usage for a served request; nothing for one that was not.
            let used = ctx.settlement.tokens();
            st.tokens
                .give_back(now, hold.tokens.saturating_sub(used), tpm);
        }
        // Idle keys with a full bucket are dropped so the map stays small.
        if st.in_flight == 0 && st.requests.tat <= now && st.tokens.tat <= now {
            map.remove(&hold.key_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeyRecord;
    use bytes::Bytes;
    use std::sync::Arc;

    fn limits(default: LimitSet) -> Limits {
        Limits::new(LimitsConfig {
            default,
            groups: HashMap::from([(
                "free".to_string(),
                LimitSet {
                    rpm: Some(2),
                    ..Default::default()
                },
            )]),
            default_max_output: 100,
        })
    }

    fn ctx_for(key: KeyRecord) -> Ctx {
        let mut c = Ctx::new("r".into());
        c.key = Some(Arc::new(key));
        c
    }

    async fn head(l: &Limits, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let headers = http::HeaderMap::new();
        let h = RequestHead {
            method: &http::Method::POST,
            path: "/v1/chat/completions",
            headers: &headers,
            client_ip: None,
        };
        l.on_request_head(ctx, &h).await
    }

    #[test]
    fn gcra_allows_a_minute_of_burst_then_the_steady_rate() {
        let mut g = Gcra::default();
        let now = Duration::from_secs(100);
        for _ in 0..60 {
            g.take(now, 1, 60).unwrap();
        }
        let wait = g.take(now, 1, 60).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert!(g.take(now + Duration::from_secs(1), 1, 60).is_ok());
    }

    #[tokio::test]
    async fn key_values_override_group_and_default() {
        let l = limits(LimitSet {
            rpm: Some(100),
            concurrency: Some(5),
            ..Default::default()
        });
        let key = KeyRecord {
            id: 1,
            group: "free".into(),
            concurrency: Some(1),
            ..Default::default()
        };
        assert_eq!(
            l.effective(&key),
            LimitSet {
                rpm: Some(2),
                tpm: None,
                concurrency: Some(1)
            }
        );
    }

    #[tokio::test]
    async fn requests_per_minute_refuse_with_retry_after_and_headers() {
        let l = limits(LimitSet::default());
        let key = KeyRecord {
            id: 1,
            group: "free".into(),
            ..Default::default()
        };
        for _ in 0..2 {
            let mut c = ctx_for(key.clone());
            head(&l, &mut c).await.unwrap();
            l.on_done(&mut c).await;
        }
        let mut c = ctx_for(key);
        let e = head(&l, &mut c).await.unwrap_err();
        assert_eq!(e.code(), Some("rate_limit_exceeded"));
        assert!(e.retry_after().unwrap() > Duration::from_secs(25));
        assert!(c
            .response_headers
            .iter()
            .any(|h| h == ("x-ratelimit-remaining-requests", "0")));
    }

    #[tokio::test]
    async fn concurrency_is_held_until_done() {
        let l = limits(LimitSet {
            concurrency: Some(1),
            ..Default::default()
        });
        let key = KeyRecord {
            id: 9,
            ..Default::default()
        };
        let mut a = ctx_for(key.clone());
        head(&l, &mut a).await.unwrap();
        let mut b = ctx_for(key.clone());
        assert!(head(&l, &mut b).await.is_err());
        l.on_done(&mut a).await;
        let mut c = ctx_for(key);
        assert!(head(&l, &mut c).await.is_ok());
    }

    #[tokio::test]
    async fn tokens_are_counted_up_front_and_unused_ones_come_back() {
        let l = limits(LimitSet {
            tpm: Some(1000),
            ..Default::default()
        });
        let key = KeyRecord {
            id: 3,
            ..Default::default()
        };
        let facts = crate::RequestFacts {
            prompt_tokens_estimate: 100,
            max_output_tokens: Some(400),
            choices: 1,
            ..Default::default()
        };
        let mut a = ctx_for(key.clone());
        head(&l, &mut a).await.unwrap();
        a.facts = Some(facts.clone());
        l.on_request_body(&mut a).await.unwrap();
        let mut b = ctx_for(key.clone());
        head(&l, &mut b).await.unwrap();
        b.facts = Some(facts.clone());
        l.on_request_body(&mut b).await.unwrap();
        let mut c = ctx_for(key.clone());
        head(&l, &mut c).await.unwrap();
        c.facts = Some(facts.clone());
        assert!(
            l.on_request_body(&mut c).await.is_err(),
            "1000 of 1000 counted"
        );
        a.usage.usage = Some(crate::billing::Usage {
            prompt_tokens: 90,
            completion_tokens: 10,
            ..Default::default()
        });
        a.outcome.status = 200;
        a.settle();
        l.on_done(&mut a).await;
        // 400 of a's 500 came back: a 300-token request fits, a 500-token one would not.
        let mut d = ctx_for(key);
        head(&l, &mut d).await.unwrap();
        d.facts = Some(crate::RequestFacts {
            max_output_tokens: Some(200),
            ..facts
        });
        assert!(
            l.on_request_body(&mut d).await.is_ok(),
            "unused tokens came back"
        );
    }

    #[tokio::test]
    async fn a_request_larger_than_the_bucket_is_told_not_to_retry() {
        let l = limits(LimitSet {
            tpm: Some(1000),
            ..Default::default()
        });
        let mut c = ctx_for(KeyRecord::default());
        head(&l, &mut c).await.unwrap();
        c.facts = Some(crate::RequestFacts {
            prompt_tokens_estimate: 10,
            max_output_tokens: Some(5000),
            choices: 1,
            ..Default::default()
        });
        let e = l.on_request_body(&mut c).await.unwrap_err();
        assert_eq!(
            (e.status(), e.code(), e.kind()),
            (429, Some("rate_limit_exceeded"), "tokens")
        );
        assert!(e
            .headers()
            .contains(&("x-should-retry", "false".to_string())));
        assert!(e.retry_after().is_none());
    }

    #[tokio::test]
    async fn token_count_saturates_instead_of_wrapping_under_the_limit() {
        // prompt + u64::MAX would wrap to a few tokens and be admitted by a 50-token bucket.
        let l = limits(LimitSet {
            tpm: Some(50),
            ..Default::default()
        });
        for (cap, n) in [
            (Some(u64::MAX), 1),
            (None, u64::MAX / 2),
            (Some(2), u64::MAX),
        ] {
            let mut c = ctx_for(KeyRecord::default());
            head(&l, &mut c).await.unwrap();
            c.facts = Some(crate::RequestFacts {
                prompt_tokens_estimate: 10,
                max_output_tokens: cap,
                choices: n,
                ..Default::default()
            });
            let e = l.on_request_body(&mut c).await.unwrap_err();
            assert_eq!(
                e,
                GatewayError::OverTokenLimit {
                    limit: 50,
                    requested: u64::MAX
                }
            );
        }
        // Reported usage that would overflow when summed settles as the most, not a wrap.
        let mut c = ctx_for(KeyRecord::default());
        head(&l, &mut c).await.unwrap();
        c.facts = Some(crate::RequestFacts {
            prompt_tokens_estimate: 10,
            max_output_tokens: Some(10),
            choices: 1,
            ..Default::default()
        });
        l.on_request_body(&mut c).await.unwrap();
        c.usage.usage = Some(crate::billing::Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            ..Default::default()
        });
        c.outcome.status = 200;
        c.settle();
        assert_eq!(c.settlement.tokens(), u64::MAX);
        l.on_done(&mut c).await;
    }

    #[tokio::test]
    async fn embeddings_are_not_counted_a_phantom_output_cap() {
        // default_max_output is 100 here: a 50-token bucket fits a 10-token embedding, not a
        // chat completion with the default cap.
        let l = limits(LimitSet {
            tpm: Some(50),
            ..Default::default()
        });
        let body = || Bytes::from(format!(r#"{{"model":"m","input":"{}"}}"#, "a".repeat(20)));
        let (_, facts) = crate::RequestBody::parse_for_path("/v1/embeddings", body()).unwrap();
        assert!(facts.prompt_tokens_estimate < 50);
        let mut c = ctx_for(KeyRecord::default());
        head(&l, &mut c).await.unwrap();
        c.facts = Some(facts.clone());
        l.on_request_body(&mut c).await.unwrap();
        assert_eq!(
            c.limit_hold.as_ref().unwrap().tokens,
            facts.prompt_tokens_estimate
        );
        l.on_done(&mut c).await;
        let (_, chat) = crate::RequestBody::parse_for_path("/v1/chat/completions", body()).unwrap();
        let mut c = ctx_for(KeyRecord::default());
        head(&l, &mut c).await.unwrap();
        c.facts = Some(chat);
        assert!(l.on_request_body(&mut c).await.is_err());
    }

    #[tokio::test]
    async fn a_refused_or_failed_request_gives_all_its_tokens_back() {
        let l = limits(LimitSet {
            tpm: Some(1000),
            ..Default::default()
        });
        let facts = crate::RequestFacts {
            prompt_tokens_estimate: 100,
            max_output_tokens: Some(800),
            choices: 1,
            ..Default::default()
        };
        // 900 tokens each against 1000 a minute: only possible if failures give them back.
        for _ in 0..3 {
            let mut c = ctx_for(KeyRecord::default());
            head(&l, &mut c).await.unwrap();
            c.facts = Some(facts.clone());
            l.on_request_body(&mut c).await.unwrap();
            c.outcome.status = 502;
            c.settle();
            l.on_done(&mut c).await;
        }
    }

    #[test]
    fn reset_is_formatted_like_openai() {
        assert_eq!(format_reset(Duration::from_millis(120)), "120ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
