//! `limits`: requests/min, tokens/min, media units/min and concurrency, per key, per
//! account, per model and per key per model.
//!
//! A key's own limits are its `--rpm/--tpm/--concurrency`, else its account group's
//! (`limits.groups`), else `limits.default`. An account's are `limits.accounts.<name>`, else
//! `limits.account_default`; a model's `limits.models.<model>` (all keys together); a key's
//! per-model ones come from `--model-limits`. Every scope that sets a dimension is checked,
//! so the tightest decides, and the `x-ratelimit-*` headers report the scope with the least
//! room left. Requests/min and tokens/min are GCRA buckets: one "theoretical arrival time"
//! per scope and dimension, a single number updated under the shard lock, with no separate
//! refill bookkeeping to race. A bucket holds a minute's worth: a scope may burst its whole
//! per-minute allowance, then proceeds at the steady rate.
//!
//! Tokens are counted up front as the prompt estimate (text, plus images, audio and files by
//! their formulas, see [`crate::request::Media`]) plus the output cap (`n × max_tokens`, or
//! `default_max_output`; none on routes that generate no output, such as embeddings), like
//! OpenAI's own estimate; when the response reports its real usage the difference goes back
//! into every bucket it was taken from. Images and audio seconds are counted as units against
//! `images_per_min` and `audio_seconds_per_min`, and given back when nothing was served.
//!
//! Concurrency is not counted here: a request at a concurrency cap waits in the admission
//! queue ([`crate::queue`]), which reads the caps from [`LimitHold::concurrency_caps`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

mod config;
mod scope;
pub mod shared;

pub use config::{LimitSet, LimitsConfig};
use scope::{Dim, ScopeState, State, DIMS, SHARDS};
pub use scope::{Held, LimitHold, Scope};
pub use shared::{Lease, OnError, SharedLimits, Unreachable};

use crate::chain::Phases;
use crate::ctx::ResponseHeaders;
pub use crate::gcra::format_reset;
use crate::{Ctx, Filter, GatewayError, Limit, RequestHead};

/// The shared state and what to do when it cannot be reached.
#[derive(Clone)]
pub struct Shared {
    pub backend: Arc<dyn SharedLimits>,
    pub on_error: OnError,
}

/// The `limits` filter.
pub struct Limits {
    /// Swapped whole by a reload ([`Limits::set_config`]); the counts carry over.
    cfg: arc_swap::ArcSwap<LimitsConfig>,
    state: Arc<State>,
    /// Tokens counted for requests not yet done, over every scope (a leak check for /readyz).
    tokens_held: AtomicU64,
    /// Limits held across nodes, when `redis:` is configured.
    shared: Option<Shared>,
}

/// What a dimension reports in the headers: the scope with the least room wins.
#[derive(Clone, Copy)]
struct Report {
    limit: u32,
    remaining: u64,
    reset: Duration,
}

impl Report {
    fn tighter(self, other: Option<Report>) -> Report {
        match other {
            Some(o) if (o.remaining, o.limit) <= (self.remaining, self.limit) => o,
            _ => self,
        }
    }
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Self {
        Limits {
            cfg: arc_swap::ArcSwap::from_pointee(cfg),
            state: Arc::new(State {
                shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
                epoch: Instant::now(),
            }),
            tokens_held: AtomicU64::new(0),
            shared: None,
        }
    }

    /// Limits held across nodes through `shared` (see [`shared`]).
    pub fn with_shared(cfg: LimitsConfig, shared: Shared) -> Self {
        Limits {
            shared: Some(shared),
            ..Limits::new(cfg)
        }
    }

    /// New limits from a reloaded config. What every scope has counted carries over, so a
    /// reload neither refills nor empties a bucket.
    pub fn set_config(&self, cfg: LimitsConfig) {
        self.cfg.store(Arc::new(cfg));
    }

    /// The shared state, for the admission queue's shared concurrency places.
    pub fn shared(&self) -> Option<&Shared> {
        self.shared.as_ref()
    }

    fn now(&self) -> Duration {
        self.state.now()
    }

    fn lock(&self, scope: &Scope) -> std::sync::MutexGuard<'_, HashMap<Scope, ScopeState>> {
        self.state.lock(scope)
    }

    /// One more request and `tokens` more tokens in every scope `hold` holds, for an
    /// exchange that makes several (a realtime session's responses): requests/min and
    /// tokens/min apply per response. A refusal takes nothing.
    pub async fn take_response(
        &self,
        hold: &mut LimitHold,
        tokens: u64,
    ) -> Result<(), GatewayError> {
        let n = hold.scopes.len();
        self.take_all(&mut hold.scopes, Dim::Requests, &vec![1; n])
            .await
            .1?;
        if let Err(e) = self
            .take_all(&mut hold.scopes, Dim::Tokens, &vec![tokens; n])
            .await
            .1
        {
            for h in &hold.scopes {
                self.give_back_dim(h, Dim::Requests, 1);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Tokens taken by [`Limits::take_response`] and not used.
    pub fn return_tokens(&self, hold: &LimitHold, tokens: u64) {
        for h in &hold.scopes {
            self.give_back_dim(h, Dim::Tokens, tokens);
        }
    }

    /// Tokens counted for requests in flight (0 when idle: nothing leaked).
    pub fn tokens_held(&self) -> u64 {
        self.tokens_held.load(Ordering::Relaxed)
    }

    fn key_limits(&self, key: &crate::auth::KeyRecord) -> LimitSet {
        let cfg = self.cfg.load();
        let group = cfg.groups.get(&key.group).copied().unwrap_or_default();
        LimitSet {
            rpm: key.rpm,
            tpm: key.tpm,
            concurrency: key.concurrency,
            ..LimitSet::default()
        }
        .or(group)
        .or(cfg.default)
    }

    fn account_limits(&self, key: &crate::auth::KeyRecord) -> LimitSet {
        let cfg = self.cfg.load();
        cfg.accounts
            .get(&key.account)
            .copied()
            .unwrap_or(cfg.account_default)
    }

    fn refused(limit: Limit, wait: Duration) -> GatewayError {
        GatewayError::RateLimited {
            limit,
            retry_after: wait.max(Duration::from_millis(1)),
        }
    }

    /// Takes `n` of `dim` in every held scope that limits it, all or nothing. Returns the
    /// tightest scope's report (for the headers) and the refusal, if any.
    async fn take_all(
        &self,
        scopes: &mut [Held],
        dim: Dim,
        amounts: &[u64],
    ) -> (Option<Report>, Result<(), GatewayError>) {
        let mut report: Option<Report> = None;
        for i in 0..scopes.len() {
            let Some(pm) = dim.per_minute(&scopes[i].limits) else {
                continue;
            };
            match self.take_one(&scopes[i].scope, dim, amounts[i], pm).await {
                Ok((r, local)) => {
                    if local {
                        scopes[i].local |= dim.bit();
                    }
                    if let Some(r) = r {
                        report = Some(r.tighter(report));
                    }
                }
                Err((r, e)) => {
                    // All or nothing: what the looser scopes gave goes back.
                    for (j, back) in scopes[..i].iter().enumerate() {
                        self.give_back_dim(back, dim, amounts[j]);
                    }
                    return (r.or(report), Err(e));
                }
            }
        }
        (report, Ok(()))
    }

    /// Takes `n` from this node's own bucket.
    fn take_local(
        &self,
        scope: &Scope,
        dim: Dim,
        n: u64,
        pm: u32,
    ) -> Result<Report, (Option<Report>, GatewayError)> {
        let now = self.now();
        let mut map = self.lock(scope);
        let g = map.entry(scope.clone()).or_default().bucket(dim);
        let taken = g.take(now, n, pm);
        let r = Report {
            limit: pm,
            remaining: g.remaining(now, pm),
            reset: g.reset(now),
        };
        match taken {
            Ok(()) => Ok(r),
            Err(wait) => Err((Some(r), Self::refused(dim.limit(scope), wait))),
        }
    }

    /// Puts `n` of `dim` back where `h` took it from.
    fn give_back_dim(&self, h: &Held, dim: Dim, n: u64) {
        let now = self.now();
        let mut map = self.lock(&h.scope);
        if let Some(st) = map.get_mut(&h.scope) {
            self.put_back(st, h, dim, n, now);
        }
    }

    /// Puts `n` of `dim` back into `st` (the state of `h`'s scope, locked by the caller).
    fn put_back(&self, st: &mut ScopeState, h: &Held, dim: Dim, n: u64, now: Duration) {
        let Some(pm) = dim.per_minute(&h.limits).filter(|_| n > 0) else {
            return;
        };
        if self.shared.is_some() && h.local & dim.bit() == 0 {
            // Into the credit: used by this node's next request, or returned with it.
            let c = st.credit(dim);
            c.units += n;
            c.per_minute = pm;
            c.until = c.until.max(now + shared::CREDIT_LIFE);
        } else {
            st.bucket(dim).give_back(now, n, pm);
        }
    }

    fn set_headers(h: &mut ResponseHeaders, names: [&'static str; 3], r: Option<Report>) {
        if let Some(r) = r {
            h.set(names[0], r.limit.to_string());
            h.set(names[1], r.remaining.to_string());
            h.set(names[2], format_reset(r.reset));
        }
    }

    fn give_back(&self, hold: &LimitHold, ctx_settlement: &crate::Settlement) {
        let used = ctx_settlement.tokens();
        let now = self.now();
        for h in &hold.scopes {
            // One lock per scope for everything that goes back.
            let mut map = self.lock(&h.scope);
            let Some(st) = map.get_mut(&h.scope) else {
                continue;
            };
            // The settlement (the same one billing charges) settles the count: reported
            // or estimated usage for a served request; nothing for one that was not.
            self.put_back(st, h, Dim::Tokens, h.tokens.saturating_sub(used), now);
            if !ctx_settlement.served {
                self.put_back(st, h, Dim::Images, h.images, now);
                self.put_back(st, h, Dim::AudioSeconds, h.audio_seconds, now);
            }
            // Idle scopes with full buckets are dropped so the map stays small.
            if st.idle(now) {
                map.remove(&h.scope);
            }
        }
        self.tokens_held.fetch_sub(hold.tokens, Ordering::Relaxed);
    }
}

const REQUEST_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const TOKEN_HEADERS: [&str; 3] = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

#[async_trait]
impl Filter for Limits {
    fn name(&self) -> &'static str {
        "limits"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEAD | Phases::REQUEST_BODY | Phases::DONE | Phases::ABANDON
    }

    /// Requests/min of the key and its account: known before the body, so refused before
    /// reading it.
    async fn on_request_head(
        &self,
        ctx: &mut Ctx,
        _head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        let Some(key) = &ctx.key else {
            return Ok(());
        };
        let mut scopes = vec![
            Held::new(Scope::Key(key.id), self.key_limits(key)),
            Held::new(Scope::Account(key.account_id), self.account_limits(key)),
        ];
        let (report, taken) = self.take_all(&mut scopes, Dim::Requests, &[1, 1]).await;
        Self::set_headers(&mut ctx.response_headers, REQUEST_HEADERS, report);
        taken?;
        ctx.limit_hold = Some(LimitHold { scopes, tokens: 0 });
        Ok(())
    }

    /// The model's scopes (requests/min), then tokens/min and media units in every scope:
    /// these need the body's model, prompt estimate and output cap.
    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(key), Some(facts)) = (ctx.key.clone(), &ctx.facts) else {
            return Ok(());
        };
        let Some(mut hold) = ctx.limit_hold.take() else {
            return Ok(());
        };
        let model: Arc<str> = Arc::from(facts.model.as_str());
        let mut added = Vec::new();
        let cfg = self.cfg.load();
        if let Some(l) = cfg.models.get(&*model) {
            added.push(Held::new(Scope::Model(model.clone()), *l));
        }
        if let Some((_, l)) = key.model_limits.iter().find(|(m, _)| **m == *model) {
            added.push(Held::new(Scope::KeyModel(key.id, model.clone()), *l));
        }
        if !added.is_empty() {
            let ones = vec![1; added.len()];
            let (report, taken) = self.take_all(&mut added, Dim::Requests, &ones).await;
            if let Err(e) = taken {
                Self::set_headers(&mut ctx.response_headers, REQUEST_HEADERS, report);
                ctx.limit_hold = Some(hold);
                return Err(e);
            }
            // The headers report the tightest of every scope.
            let now = self.now();
            let mut all = report;
            for h in &hold.scopes {
                if let Some(pm) = h.limits.rpm {
                    let mut map = self.lock(&h.scope);
                    let st = map.entry(h.scope.clone()).or_default();
                    let r = if self.shared.is_some() && h.local & Dim::Requests.bit() == 0 {
                        let c = st.credit(Dim::Requests);
                        Report {
                            limit: pm,
                            remaining: c.remaining,
                            reset: c.reset,
                        }
                    } else {
                        Report {
                            limit: pm,
                            remaining: st.requests.remaining(now, pm),
                            reset: st.requests.reset(now),
                        }
                    };
                    all = Some(r.tighter(all));
                }
            }
            Self::set_headers(&mut ctx.response_headers, REQUEST_HEADERS, all);
            hold.scopes.extend(added);
        }
        // Embeddings and other non-generating routes count no output.
        let cap = facts.output_cap().unwrap_or(cfg.default_max_output);
        // Saturating: a sum that wrapped would admit anything.
        let tokens = facts
            .prompt_tokens_estimate
            .saturating_add(cap.saturating_mul(facts.choices.max(1)));
        let tightest_tpm = hold.scopes.iter().filter_map(|h| h.limits.tpm).min();
        if let Some(tpm) = tightest_tpm.filter(|&t| tokens > u64::from(t)) {
            ctx.limit_hold = Some(hold);
            // Retrying can never help: say so, rather than name a wait.
            return Err(GatewayError::OverTokenLimit {
                limit: tpm,
                requested: tokens,
            });
        }
        let n = hold.scopes.len();
        let (report, taken) = self
            .take_all(&mut hold.scopes, Dim::Tokens, &vec![tokens; n])
            .await;
        Self::set_headers(&mut ctx.response_headers, TOKEN_HEADERS, report);
        if let Err(e) = taken {
            ctx.limit_hold = Some(hold);
            return Err(e);
        }
        let give_tokens_back = |hold: &LimitHold| {
            for h in &hold.scopes {
                self.give_back_dim(h, Dim::Tokens, tokens);
            }
        };
        let media = facts.media;
        for (dim, amount) in [
            (Dim::Images, u64::from(media.images)),
            (Dim::AudioSeconds, media.audio_seconds),
        ] {
            if amount == 0 {
                continue;
            }
            if let Some((what, limit)) = hold.scopes.iter().find_map(|h| {
                dim.per_minute(&h.limits)
                    .filter(|&pm| amount > u64::from(pm))
                    .map(|pm| (dim.limit(&h.scope).what(), pm))
            }) {
                give_tokens_back(&hold);
                ctx.limit_hold = Some(LimitHold { tokens: 0, ..hold });
                return Err(GatewayError::InvalidRequest {
                    message: format!(
                        "This request carries {amount} units and the limit is {limit} {what}."
                    ),
                    param: Some("messages"),
                });
            }
            let (_, taken) = self.take_all(&mut hold.scopes, dim, &vec![amount; n]).await;
            if let Err(e) = taken {
                give_tokens_back(&hold);
                if dim == Dim::AudioSeconds {
                    // The images taken a moment ago go back too.
                    for h in &hold.scopes {
                        self.give_back_dim(h, Dim::Images, u64::from(media.images));
                    }
                }
                ctx.limit_hold = Some(LimitHold { tokens: 0, ..hold });
                return Err(e);
            }
            for h in &mut hold.scopes {
                if dim.per_minute(&h.limits).is_some() {
                    match dim {
                        Dim::Images => h.images = amount,
                        _ => h.audio_seconds = amount,
                    }
                }
            }
        }
        for h in &mut hold.scopes {
            if h.limits.tpm.is_some() {
                h.tokens = tokens;
            }
        }
        hold.tokens = tokens;
        self.tokens_held.fetch_add(tokens, Ordering::Relaxed);
        ctx.limit_hold = Some(hold);
        Ok(())
    }

    fn on_abandon(&self, ctx: &mut Ctx) {
        // Nothing was served: everything counted up front goes back.
        if let Some(hold) = ctx.limit_hold.take() {
            self.give_back(&hold, &crate::Settlement::default());
        }
    }

    /// Returns tokens counted but not used, and media units of a request not served.
    async fn on_done(&self, ctx: &mut Ctx) {
        if let Some(hold) = ctx.limit_hold.take() {
            self.give_back(&hold, &ctx.settlement);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeyRecord;
    use crate::gcra::Gcra;
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
            ..Default::default()
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
            l.key_limits(&key),
            LimitSet {
                rpm: Some(2),
                tpm: None,
                concurrency: Some(1),
                ..Default::default()
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

    fn scoped(models: &[(&str, LimitSet)], accounts: &[(&str, LimitSet)]) -> Limits {
        Limits::new(LimitsConfig {
            models: models.iter().map(|(m, l)| (m.to_string(), *l)).collect(),
            accounts: accounts.iter().map(|(a, l)| (a.to_string(), *l)).collect(),
            default_max_output: 100,
            ..Default::default()
        })
    }

    fn rpm(n: u32) -> LimitSet {
        LimitSet {
            rpm: Some(n),
            ..Default::default()
        }
    }

    async fn full(l: &Limits, key: &KeyRecord, model: &str) -> (Ctx, Result<(), GatewayError>) {
        let mut c = ctx_for(key.clone());
        if let Err(e) = head(l, &mut c).await {
            return (c, Err(e));
        }
        c.facts = Some(crate::RequestFacts {
            model: model.into(),
            prompt_tokens_estimate: 10,
            max_output_tokens: Some(10),
            choices: 1,
            ..Default::default()
        });
        let r = l.on_request_body(&mut c).await;
        (c, r)
    }

    fn header<'a>(c: &'a Ctx, name: &str) -> Option<&'a str> {
        c.response_headers.iter().find(|h| h.0 == name).map(|h| h.1)
    }

    #[tokio::test]
    async fn a_model_limit_counts_every_key_and_refuses_at_its_threshold() {
        let l = scoped(&[("gpt-4o", rpm(3))], &[]);
        let keys: Vec<KeyRecord> = (1..=3)
            .map(|id| KeyRecord {
                id,
                account_id: id,
                rpm: Some(100),
                ..Default::default()
            })
            .collect();
        for k in &keys {
            let (c, r) = full(&l, k, "gpt-4o").await;
            r.unwrap();
            // The model's 3/min is tighter than the key's 100/min.
            assert_eq!(header(&c, "x-ratelimit-limit-requests"), Some("3"));
        }
        let (c, r) = full(&l, &keys[0], "gpt-4o").await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), Some("rate_limit_exceeded"));
        assert!(e.to_string().contains("on this model"), "{e}");
        assert_eq!(header(&c, "x-ratelimit-remaining-requests"), Some("0"));
        // Another model is not limited by it.
        full(&l, &keys[0], "gpt-4o-mini").await.1.unwrap();
    }

    #[tokio::test]
    async fn an_account_limit_counts_all_its_keys() {
        let l = scoped(&[], &[("acme", rpm(2))]);
        let key = |id| KeyRecord {
            id,
            account_id: 7,
            account: "acme".into(),
            ..Default::default()
        };
        full(&l, &key(1), "m").await.1.unwrap();
        full(&l, &key(2), "m").await.1.unwrap();
        let (c, r) = full(&l, &key(3), "m").await;
        assert!(r.unwrap_err().to_string().contains("on this account"));
        assert_eq!(header(&c, "x-ratelimit-limit-requests"), Some("2"));
        // Another account's keys are not.
        let other = KeyRecord {
            id: 4,
            account_id: 8,
            account: "other".into(),
            ..Default::default()
        };
        full(&l, &other, "m").await.1.unwrap();
    }

    #[tokio::test]
    async fn key_model_limits_and_the_tightest_tokens_header() {
        let l = scoped(
            &[(
                "m",
                LimitSet {
                    tpm: Some(10_000),
                    ..Default::default()
                },
            )],
            &[],
        );
        let key = KeyRecord {
            id: 1,
            tpm: Some(100_000),
            model_limits: vec![(
                "m".into(),
                LimitSet {
                    tpm: Some(50),
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let (c, r) = full(&l, &key, "m").await;
        r.unwrap();
        // 20 tokens counted; the key-on-model bucket of 50 is the tightest.
        assert_eq!(header(&c, "x-ratelimit-limit-tokens"), Some("50"));
        assert_eq!(header(&c, "x-ratelimit-remaining-tokens"), Some("30"));
        full(&l, &key, "m").await.1.unwrap();
        let (_, r) = full(&l, &key, "m").await;
        assert!(r
            .unwrap_err()
            .to_string()
            .contains("this key on this model"));
        // A refusal in one scope takes nothing from the others: 60 tokens went to the
        // model scope for the two admitted requests, none for the refused one.
        let mut map = l.lock(&Scope::Model("m".into()));
        let st = map.get_mut(&Scope::Model("m".into())).unwrap();
        assert_eq!(st.tokens.remaining(l.now(), 10_000), 10_000 - 40);
    }

    #[tokio::test]
    async fn images_are_counted_against_images_per_min_and_come_back_when_not_served() {
        let l = limits(LimitSet {
            images_per_min: Some(3),
            ..Default::default()
        });
        let facts = crate::RequestFacts {
            model: "m".into(),
            max_output_tokens: Some(1),
            choices: 1,
            media: crate::media::Media {
                images: 2,
                image_tokens: 1530,
                ..Default::default()
            },
            ..Default::default()
        };
        let mut a = ctx_for(KeyRecord::default());
        head(&l, &mut a).await.unwrap();
        a.facts = Some(facts.clone());
        l.on_request_body(&mut a).await.unwrap();
        let mut b = ctx_for(KeyRecord::default());
        head(&l, &mut b).await.unwrap();
        b.facts = Some(facts.clone());
        let e = l.on_request_body(&mut b).await.unwrap_err();
        assert!(e.to_string().contains("images per minute"), "{e}");
        // a was not served: its two images come back.
        a.outcome.status = 502;
        a.settle();
        l.on_done(&mut a).await;
        let mut c = ctx_for(KeyRecord::default());
        head(&l, &mut c).await.unwrap();
        c.facts = Some(facts);
        l.on_request_body(&mut c).await.unwrap();
        l.on_done(&mut c).await;
        assert_eq!(l.tokens_held(), 0);
    }

    #[test]
    fn model_limit_specs_parse() {
        let v = LimitSet::parse_model_limits("gpt-4o=rpm:60,tpm:100000").unwrap();
        assert_eq!(v[0].0, "gpt-4o");
        assert_eq!((v[0].1.rpm, v[0].1.tpm), (Some(60), Some(100_000)));
        assert!(LimitSet::parse_model_limits("gpt-4o=rpm:x").is_err());
        assert!(LimitSet::parse_model_limits("gpt-4o=bogus:1").is_err());
        assert!(LimitSet::parse_model_limits("rpm:1").is_err());
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
