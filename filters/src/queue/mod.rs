//! `queue`: admission. A request that cannot start at once — every channel that can serve
//! its model is at `max_concurrency`, or its key, account or model is at a concurrency cap —
//! waits here for a slot instead of failing.
//!
//! - **Order**: strict priority classes (0 lowest … 9 highest), then, within a class,
//!   weighted fair share between accounts, then arrival. Fair share is start-time fair
//!   queueing weighted by estimated tokens: each account has a pass that advances by the
//!   estimated tokens of every request it is granted, and the account with the smallest pass
//!   goes next; an account that was idle starts at the current virtual time, so it can
//!   neither bank credit nor be starved by a tenant's burst.
//! - **Aging**: every `aging_ms` waited moves a request up one class, so low priority never
//!   starves.
//! - **Deadline**: the smaller of `timeout_ms` and the client's `x-tollgate-queue-timeout-ms`;
//!   past it the answer is 429 `queue_timeout`; at `max_depth` waiting, 429 `queue_full`;
//!   both with `Retry-After` from the pool's observed drain rate.
//! - **One owner of the slot**: the [`Scheduler`] hands out channel slots ([`ChannelSlot`])
//!   and concurrency holds ([`ConcurrencyHold`]); both give themselves back when dropped and
//!   wake the next waiter, so whatever path a request ends on (done, refused, client gone,
//!   panic) it holds nothing afterwards. A waiter whose future is dropped (the relay stops
//!   waiting when the client disconnects) leaves the queue at once.
//!
//! Concurrency caps wait here rather than in `limits`, so that one request waits in one place
//! with one deadline and one order, and a slot freed by either kind of release goes to the
//! best waiter that can use it.
//!
//! The pool a request waits in is the set of channels its plan may still try: a slot on any
//! of them admits it. When the slot is on another channel than the attempt's, the queue moves
//! that channel to the attempt's place in `ctx.plan` and refuses the attempt; the relay then
//! starts the attempt again on the granted channel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;

mod scheduler;
mod stats;

use scheduler::Ask;
pub use scheduler::{ChannelSlot, ConcurrencyHold, QueueSnapshot, Scheduler};

use crate::chain::{Attempt, Phases};
use crate::limits::shared::local_share;
use crate::limits::{OnError, Scope, Shared, SharedLimits, Unreachable};
use crate::{Ctx, Filter, GatewayError, RequestHead};

/// Client header: the priority asked for (0–9).
pub const PRIORITY_HEADER: &str = "x-tollgate-priority";
/// Client header: the longest the client will wait in the queue, in ms.
pub const TIMEOUT_HEADER: &str = "x-tollgate-queue-timeout-ms";
/// Response header: how long the request waited in the queue, in ms.
pub const WAITED_HEADER: &str = "x-tollgate-queue-ms";
/// The highest priority.
pub const MAX_PRIORITY: u8 = 9;
const CLASSES: usize = MAX_PRIORITY as usize + 1;

/// `queue.groups.<group>`: the priority of a group's keys.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupPriority {
    pub priority: Option<u8>,
    pub max_priority: Option<u8>,
}

/// `queue:` in the YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `false`: nothing waits; a full channel is 503 `no_channel_available` and a concurrency
    /// cap 429 `rate_limit_exceeded`, at once.
    pub enabled: bool,
    /// The longest a request waits.
    pub timeout_ms: u64,
    /// Most requests waiting per pool; past it, 429 `queue_full`.
    pub max_depth: usize,
    /// Every this many ms waited moves a request up one class; 0 turns aging off.
    pub aging_ms: u64,
    pub default_priority: u8,
    /// Requests estimated above this many tokens (prompt + output cap) are heavy.
    pub heavy_tokens: u64,
    /// The priority heavy requests (and any with images, audio or files) default to.
    pub heavy_priority: u8,
    /// Priorities by account group.
    pub groups: BTreeMap<String, GroupPriority>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            enabled: true,
            timeout_ms: 30_000,
            max_depth: 1024,
            aging_ms: 5_000,
            default_priority: 5,
            heavy_tokens: 32_000,
            heavy_priority: 3,
            groups: BTreeMap::new(),
        }
    }
}

/// The queue's per-request state (`ctx.admission`).
#[derive(Default)]
pub struct Admission {
    /// From `x-tollgate-priority` and `x-tollgate-queue-timeout-ms`.
    asked_priority: Option<u8>,
    asked_timeout: Option<Duration>,
    /// Set at the first attempt.
    priority: Option<u8>,
    deadline: Option<Instant>,
    hold: Option<ConcurrencyHold>,
    /// The places taken under shared concurrency caps (`redis:`), with `hold`.
    places: Option<SharedPlaces>,
    /// Channels granted to earlier attempts.
    tried: Vec<usize>,
    /// Time spent waiting, over every attempt.
    pub waited: Duration,
}

impl Admission {
    /// The class the request was queued in (after the key, group, heavy and header rules).
    pub fn priority(&self) -> Option<u8> {
        self.priority
    }
}

/// Places held under shared concurrency caps; given back when dropped (or, if this node
/// dies, when their TTL runs out).
pub struct SharedPlaces {
    backend: Arc<dyn SharedLimits>,
    held: Vec<String>,
    holder: String,
}

impl Drop for SharedPlaces {
    fn drop(&mut self) {
        for scope in &self.held {
            self.backend.leave(scope, &self.holder);
        }
    }
}

/// How long a request at a shared concurrency cap waits before it asks again. (Places freed
/// on other nodes are not announced; one freed here wakes the local queue at once.)
const SHARED_RETRY: Duration = Duration::from_millis(25);

/// The `queue` filter.
pub struct Queue {
    scheduler: Arc<Scheduler>,
    /// Output cap assumed for the cost estimate when a request sets none.
    default_max_output: u64,
    /// Concurrency caps held across nodes, when `redis:` is configured.
    shared: Option<Shared>,
}

impl Queue {
    pub fn new(scheduler: Arc<Scheduler>, default_max_output: u64) -> Queue {
        Queue {
            scheduler,
            default_max_output,
            shared: None,
        }
    }

    /// Concurrency caps also held across nodes through `shared`.
    pub fn with_shared(mut self, shared: Option<Shared>) -> Queue {
        self.shared = shared;
        self
    }

    /// Takes a shared place under every cap, all or nothing. `Ok(None)`: one is full.
    async fn enter_shared(
        shared: &Shared,
        caps: &[(Scope, u32)],
        holder: &str,
    ) -> Result<Option<SharedPlaces>, Unreachable> {
        let mut places = SharedPlaces {
            backend: shared.backend.clone(),
            held: Vec::with_capacity(caps.len()),
            holder: holder.to_string(),
        };
        for (scope, cap) in caps {
            let name = scope.concurrency_name();
            // On a refusal or an error, `places` gives back what it holds when dropped.
            if !shared.backend.enter(&name, *cap, holder).await? {
                return Ok(None);
            }
            places.held.push(name);
        }
        Ok(Some(places))
    }

    fn cfg(&self) -> &QueueConfig {
        &self.scheduler.cfg
    }

    /// Estimated tokens: what tokens/min counted, else the prompt estimate plus output cap.
    fn cost(&self, ctx: &Ctx) -> u64 {
        if let Some(t) = ctx.limit_hold.as_ref().map(|h| h.tokens).filter(|&t| t > 0) {
            return t;
        }
        ctx.facts.as_ref().map_or(1, |f| {
            let cap = f.output_cap().unwrap_or(self.default_max_output);
            f.prompt_tokens_estimate
                .saturating_add(cap.saturating_mul(f.choices.max(1)))
        })
    }

    /// The key's priority, else its group's, else the default; heavy work lower; then the
    /// client's header, which may lower it or raise it up to the key's `max_priority`.
    fn priority(&self, ctx: &Ctx, asked: Option<u8>) -> u8 {
        let cfg = self.cfg();
        let key = ctx.key.as_deref();
        let group = key.and_then(|k| cfg.groups.get(&k.group)).copied();
        let mut base = key
            .and_then(|k| k.priority)
            .or(group.and_then(|g| g.priority))
            .unwrap_or(cfg.default_priority)
            .min(MAX_PRIORITY);
        let max = key
            .and_then(|k| k.max_priority)
            .or(group.and_then(|g| g.max_priority))
            .unwrap_or(base)
            .clamp(base, MAX_PRIORITY);
        let heavy = self.cost(ctx) > cfg.heavy_tokens
            || ctx.facts.as_ref().is_some_and(|f| !f.media.is_empty());
        if heavy {
            base = base.min(cfg.heavy_priority);
        }
        match asked {
            Some(p) => p.min(max),
            None => base,
        }
    }
}

fn header_number(head: &RequestHead<'_>, name: &'static str) -> Result<Option<u64>, GatewayError> {
    match head.headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| GatewayError::invalid(format!("`{name}` must be a whole number."))),
    }
}

#[async_trait]
impl Filter for Queue {
    fn name(&self) -> &'static str {
        "queue"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEAD | Phases::ATTEMPT_START | Phases::DONE | Phases::ABANDON
    }

    /// Reads the client's priority and queue timeout headers.
    async fn on_request_head(
        &self,
        ctx: &mut Ctx,
        head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        let priority = header_number(head, PRIORITY_HEADER)?;
        if priority.is_some_and(|p| p > u64::from(MAX_PRIORITY)) {
            return Err(GatewayError::invalid(format!(
                "`{PRIORITY_HEADER}` must be 0 to {MAX_PRIORITY}."
            )));
        }
        let timeout = header_number(head, TIMEOUT_HEADER)?;
        if priority.is_some() || timeout.is_some() {
            ctx.admission = Some(Admission {
                asked_priority: priority.map(|p| p as u8),
                asked_timeout: timeout.map(Duration::from_millis),
                ..Admission::default()
            });
        }
        Ok(())
    }

    async fn on_attempt_start(
        &self,
        ctx: &mut Ctx,
        attempt: &Attempt<'_>,
    ) -> Result<(), GatewayError> {
        let channel = attempt.channel.index;
        // The queue redirected this attempt here: the slot is already held.
        if let Some(slot) = &ctx.channel_slot {
            let tried = ctx
                .admission
                .as_ref()
                .is_some_and(|a| a.tried.contains(&slot.channel));
            if slot.channel == channel && !tried {
                if let Some(a) = ctx.admission.as_mut() {
                    a.tried.push(channel);
                }
                return Ok(());
            }
        }
        // An earlier attempt's slot goes back before this one waits.
        ctx.channel_slot = None;
        let mut adm = ctx.admission.take().unwrap_or_default();
        let now = Instant::now();
        let first = adm.priority.is_none();
        if first {
            adm.priority = Some(self.priority(ctx, adm.asked_priority));
            let limit = Duration::from_millis(self.cfg().timeout_ms);
            adm.deadline = Some(now + adm.asked_timeout.map_or(limit, |t| t.min(limit)));
        }
        // The pool: this attempt's channel and the planned ones not yet tried.
        let pos = ctx.plan.iter().position(|p| p.channel == channel);
        let mut candidates: Vec<usize> = vec![channel];
        if let Some(pos) = pos {
            candidates.extend(
                ctx.plan[pos + 1..]
                    .iter()
                    .map(|p| p.channel)
                    .filter(|c| !adm.tried.contains(c) && *c != channel),
            );
        }
        let mut caps = adm.hold.is_none().then(|| {
            ctx.limit_hold
                .as_ref()
                .map(|h| h.concurrency_caps())
                .unwrap_or_default()
        });
        let shared = self
            .shared
            .as_ref()
            .filter(|_| caps.as_ref().is_some_and(|c| !c.is_empty()));
        if let (Some(sh), Some(caps)) = (shared, caps.as_mut()) {
            if !sh.backend.reachable() && sh.on_error == OnError::LocalShare {
                // The shared places cannot be counted: each node takes its share.
                let live = sh.backend.live_nodes();
                for (_, cap) in caps.iter_mut() {
                    *cap = local_share(*cap, live);
                }
            }
        }
        let account = ctx.key.as_ref().map_or(0, |k| k.account_id);
        let cost = self.cost(ctx);
        let deadline = adm.deadline.unwrap_or(now);
        let class = adm.priority.unwrap_or(self.cfg().default_priority);
        let grant = loop {
            // Without shared caps the loop runs once: the caps move into the ask.
            let ask_caps = match shared {
                Some(_) => caps.clone(),
                None => caps.take(),
            };
            let (granted, waited) = self
                .scheduler
                .admit(Ask {
                    candidates: &candidates,
                    caps: ask_caps,
                    class,
                    account,
                    cost,
                    deadline,
                })
                .await;
            adm.waited += waited;
            ctx.response_headers
                .set(WAITED_HEADER, adm.waited.as_millis().to_string());
            let grant = match granted {
                Ok(g) => g,
                Err(e) => {
                    ctx.admission = Some(adm);
                    // A retry that finds no slot reports the earlier failure's kind, not a
                    // queue refusal for a request that did reach a provider.
                    return Err(if first {
                        e
                    } else {
                        GatewayError::NoChannelAvailable
                    });
                }
            };
            let (Some(sh), Some(caps), Some(_)) = (shared, caps.as_ref(), grant.hold.as_ref())
            else {
                break grant;
            };
            match Self::enter_shared(sh, caps, &ctx.request_id).await {
                Ok(Some(places)) => {
                    adm.places = Some(places);
                    break grant;
                }
                Err(Unreachable) if sh.on_error == OnError::Deny => {
                    ctx.admission = Some(adm);
                    return Err(GatewayError::LimitsUnavailable);
                }
                // Local caps only until the shared state is back.
                Err(Unreachable) => break grant,
                Ok(None) => {
                    // Full on other nodes: the local grant goes back while this one waits.
                    drop(grant);
                    let now = Instant::now();
                    if now >= deadline {
                        let waited = adm.waited;
                        ctx.admission = Some(adm);
                        return Err(GatewayError::QueueTimeout {
                            what: "a concurrency place",
                            waited,
                            retry_after: Duration::from_millis(100),
                        });
                    }
                    let pause = SHARED_RETRY.min(deadline - now);
                    tokio::time::sleep(pause).await;
                    adm.waited += pause;
                }
            }
        };
        if let Some(h) = grant.hold {
            adm.hold = Some(h);
        }
        let granted_channel = grant.slot.channel;
        ctx.channel_slot = Some(grant.slot);
        if granted_channel != channel {
            // Another channel of the pool: move it to this attempt's place; the relay
            // starts the attempt again there.
            if let (Some(pos), Some(other)) = (
                pos,
                ctx.plan.iter().position(|p| p.channel == granted_channel),
            ) {
                ctx.plan.swap(pos, other);
            }
            ctx.admission = Some(adm);
            return Err(GatewayError::NoChannelAvailable);
        }
        adm.tried.push(channel);
        ctx.admission = Some(adm);
        Ok(())
    }

    /// The slot and the concurrency place go back as soon as the exchange is over.
    async fn on_done(&self, ctx: &mut Ctx) {
        ctx.channel_slot = None;
        if let Some(a) = ctx.admission.as_mut() {
            a.hold = None;
            a.places = None;
        }
    }

    fn on_abandon(&self, ctx: &mut Ctx) {
        ctx.channel_slot = None;
        if let Some(a) = ctx.admission.as_mut() {
            a.hold = None;
            a.places = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::auth::KeyRecord;
    use crate::channel::Channels;
    use crate::channel::{build_channels, ChannelConfig, HealthConfig};
    use crate::limits::Scope;
    use crate::limits::{Held, LimitHold, LimitSet};
    use crate::route::PlannedAttempt;
    use crate::Chain;

    fn channels(caps: &[u32]) -> Channels {
        let cfgs: Vec<ChannelConfig> = caps
            .iter()
            .enumerate()
            .map(|(i, c)| {
                serde_json::from_value(serde_json::json!({
                    "name": format!("c{i}"), "base_url": "http://127.0.0.1:9", "models": ["m"],
                    "max_concurrency": c,
                }))
                .unwrap()
            })
            .collect();
        build_channels(&cfgs, HealthConfig::default()).unwrap()
    }

    struct Setup {
        chain: Chain,
        scheduler: Arc<Scheduler>,
        chans: Channels,
    }

    fn setup(caps: &[u32], cfg: QueueConfig) -> Setup {
        let chans = channels(caps);
        let scheduler = Scheduler::new(cfg, chans.clone());
        let chain = Chain::new(vec![Arc::new(Queue::new(scheduler.clone(), 100))]);
        Setup {
            chain,
            scheduler,
            chans,
        }
    }

    fn cfg() -> QueueConfig {
        QueueConfig {
            aging_ms: 0,
            ..QueueConfig::default()
        }
    }

    /// A request of `account` at `priority`, planned over every channel.
    fn ctx(s: &Setup, account: i64, priority: u8, tokens: u64) -> Ctx {
        let mut c = Ctx::new(format!("r-{account}"));
        c.key = Some(Arc::new(KeyRecord {
            id: account * 100,
            account_id: account,
            priority: Some(priority),
            max_priority: Some(9),
            ..Default::default()
        }));
        c.limit_hold = Some(LimitHold {
            scopes: Vec::new(),
            tokens,
        });
        c.plan = (0..s.chans.len())
            .map(|channel| PlannedAttempt {
                channel,
                upstream_model: None,
            })
            .collect();
        c
    }

    async fn start(s: &Setup, c: &mut Ctx) -> Result<(), GatewayError> {
        let at = Attempt {
            channel: &s.chans[c.plan[0].channel],
            number: 1,
        };
        s.chain.attempt_start(c, &at).await
    }

    /// Waits (bounded) until `n` requests are queued.
    async fn queued(s: &Setup, n: usize) {
        for _ in 0..2000 {
            if s.scheduler.snapshot().waiting == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("never {n} queued: {:?}", s.scheduler.snapshot());
    }

    type Order = Arc<Mutex<Vec<String>>>;

    /// Spawns a request that, once admitted, records `name` and ends at once (freeing its
    /// slot for the next).
    fn spawn(
        s: &Arc<Setup>,
        mut c: Ctx,
        name: String,
        order: &Order,
    ) -> tokio::task::JoinHandle<()> {
        let (s, order) = (s.clone(), order.clone());
        tokio::spawn(async move {
            let r = start(&s, &mut c).await;
            order.lock().unwrap().push(if r.is_ok() {
                name
            } else {
                format!("{name}:err")
            });
            s.chain.done(&mut c).await;
        })
    }

    fn assert_idle(s: &Setup) {
        let snap = s.scheduler.snapshot();
        assert_eq!((snap.waiting, snap.concurrency_held), (0, 0), "{snap:?}");
        for ch in s.chans.iter() {
            assert_eq!(ch.in_use(), 0, "{}", ch.name);
        }
    }

    #[tokio::test]
    async fn a_high_priority_request_goes_ahead_of_ten_low_ones_queued_before_it() {
        let s = Arc::new(setup(&[1], cfg()));
        let order = Order::default();
        let mut holder = ctx(&s, 1, 5, 10);
        start(&s, &mut holder).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..10 {
            tasks.push(spawn(&s, ctx(&s, 1, 1, 10), format!("low{i}"), &order));
            queued(&s, i + 1).await;
        }
        tasks.push(spawn(&s, ctx(&s, 1, 9, 10), "high".into(), &order));
        queued(&s, 11).await;
        assert_eq!(s.scheduler.snapshot().by_class[1], 10);
        s.chain.done(&mut holder).await;
        for t in tasks {
            t.await.unwrap();
        }
        let got = order.lock().unwrap().clone();
        let mut want = vec!["high".to_string()];
        want.extend((0..10).map(|i| format!("low{i}")));
        assert_eq!(got, want);
        assert_idle(&s);
    }

    #[tokio::test]
    async fn a_request_past_its_deadline_gets_queue_timeout_with_retry_after() {
        let s = setup(&[1], cfg());
        let mut holder = ctx(&s, 1, 5, 10);
        start(&s, &mut holder).await.unwrap();
        let mut c = ctx(&s, 2, 5, 10);
        c.admission = Some(Admission {
            asked_timeout: Some(Duration::from_millis(50)),
            ..Admission::default()
        });
        let t0 = Instant::now();
        let e = start(&s, &mut c).await.unwrap_err();
        assert!(t0.elapsed() >= Duration::from_millis(50));
        assert_eq!((e.status(), e.code()), (429, Some("queue_timeout")));
        assert!(e.retry_after().is_some());
        assert!(e.to_string().contains("a channel slot"), "{e}");
        let waited: u64 = c
            .response_headers
            .iter()
            .find(|h| h.0 == WAITED_HEADER)
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert!(waited >= 50);
        assert_eq!(s.scheduler.snapshot().waiting, 0);
        drop(holder);
        drop(c);
        assert_idle(&s);
    }

    #[tokio::test]
    async fn a_small_tenant_is_not_starved_by_a_burst_of_another() {
        let s = Arc::new(setup(&[1], cfg()));
        let order = Order::default();
        let mut holder = ctx(&s, 1, 5, 100);
        start(&s, &mut holder).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            tasks.push(spawn(&s, ctx(&s, 1, 5, 100), format!("big{i}"), &order));
            queued(&s, i + 1).await;
        }
        for i in 0..2 {
            tasks.push(spawn(&s, ctx(&s, 2, 5, 100), format!("small{i}"), &order));
            queued(&s, 21 + i).await;
        }
        s.chain.done(&mut holder).await;
        for t in tasks {
            t.await.unwrap();
        }
        let got = order.lock().unwrap().clone();
        let last_small = got.iter().rposition(|n| n.starts_with("small")).unwrap();
        // Fair share alternates the two accounts while both wait: the small tenant's two
        // are among the first four of 22.
        assert!(last_small < 4, "{got:?}");
        assert_idle(&s);
    }

    #[tokio::test]
    async fn heavier_requests_cost_their_account_more_share() {
        let s = Arc::new(setup(&[1], cfg()));
        let order = Order::default();
        let mut holder = ctx(&s, 9, 5, 1);
        start(&s, &mut holder).await.unwrap();
        let mut tasks = Vec::new();
        // Account 1 sends 1000-token requests, account 2 100-token ones.
        for i in 0..4 {
            tasks.push(spawn(&s, ctx(&s, 1, 5, 1000), format!("heavy{i}"), &order));
            queued(&s, 2 * i + 1).await;
            tasks.push(spawn(&s, ctx(&s, 2, 5, 100), format!("light{i}"), &order));
            queued(&s, 2 * i + 2).await;
        }
        s.chain.done(&mut holder).await;
        for t in tasks {
            t.await.unwrap();
        }
        let got = order.lock().unwrap().clone();
        let first_half: Vec<_> = got[..4].iter().filter(|n| n.starts_with("light")).collect();
        assert!(first_half.len() >= 3, "{got:?}");
    }

    #[tokio::test]
    async fn aging_serves_a_low_priority_request_under_a_stream_of_high_ones() {
        let s = Arc::new(setup(
            &[1],
            QueueConfig {
                aging_ms: 20,
                ..QueueConfig::default()
            },
        ));
        let order = Order::default();
        let mut holder = ctx(&s, 1, 9, 10);
        start(&s, &mut holder).await.unwrap();
        let low = spawn(&s, ctx(&s, 2, 0, 10), "low".into(), &order);
        queued(&s, 1).await;
        // A steady stream: there is always a high-priority request waiting.
        let mut highs = Vec::new();
        for i in 0..3 {
            highs.push(spawn(&s, ctx(&s, 1, 9, 10), format!("high{i}"), &order));
        }
        queued(&s, 4).await;
        s.chain.done(&mut holder).await;
        let mut i = 3;
        while !order.lock().unwrap().iter().any(|n| n == "low") {
            assert!(i < 2000, "the low request was never served");
            highs.push(spawn(&s, ctx(&s, 1, 9, 10), format!("high{i}"), &order));
            i += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        low.await.unwrap();
        for t in highs {
            t.await.unwrap();
        }
        assert_idle(&s);
    }

    #[tokio::test]
    async fn a_waiter_dropped_while_queued_leaves_at_once_and_holds_nothing() {
        let s = setup(&[1], cfg());
        let mut holder = ctx(&s, 1, 5, 10);
        start(&s, &mut holder).await.unwrap();
        let mut c = ctx(&s, 2, 5, 10);
        {
            let wait = start(&s, &mut c);
            // Poll it until it is queued, then drop it (as the relay does when the client
            // closes its connection).
            let r = tokio::time::timeout(Duration::from_millis(30), wait).await;
            assert!(r.is_err(), "still waiting");
        }
        assert_eq!(s.scheduler.snapshot().waiting, 0);
        assert_eq!(s.scheduler.metrics.left.get(), 1);
        drop(holder);
        assert_idle(&s);
    }

    #[tokio::test]
    async fn a_key_at_its_concurrency_cap_waits_for_its_own_slot() {
        let s = Arc::new(setup(&[10], cfg()));
        let capped = |s: &Setup| {
            let mut c = ctx(s, 1, 5, 10);
            c.limit_hold = Some(LimitHold {
                scopes: vec![Held {
                    scope: Scope::Key(100),
                    limits: LimitSet {
                        concurrency: Some(1),
                        ..Default::default()
                    },
                    tokens: 0,
                    images: 0,
                    audio_seconds: 0,
                    local: 0,
                }],
                tokens: 10,
            });
            c
        };
        let mut a = capped(&s);
        start(&s, &mut a).await.unwrap();
        let order = Order::default();
        let b = spawn(&s, capped(&s), "b".into(), &order);
        queued(&s, 1).await;
        // Another key is not held up by it.
        let mut other = ctx(&s, 2, 5, 10);
        start(&s, &mut other).await.unwrap();
        assert!(order.lock().unwrap().is_empty());
        assert_eq!(s.scheduler.snapshot().concurrency_held, 1);
        s.chain.done(&mut a).await;
        b.await.unwrap();
        assert_eq!(order.lock().unwrap().clone(), ["b"]);
        drop(other);
        assert_idle(&s);
    }

    #[tokio::test]
    async fn a_slot_on_another_channel_of_the_pool_redirects_the_attempt() {
        let s = setup(&[1, 1], cfg());
        let mut a = ctx(&s, 1, 5, 10);
        start(&s, &mut a).await.unwrap();
        assert_eq!(a.channel_slot.as_ref().unwrap().channel, 0);
        // The next request is planned on channel 0 first; channel 1 is free.
        let mut b = ctx(&s, 2, 5, 10);
        assert!(start(&s, &mut b).await.is_err());
        assert_eq!(
            b.plan[0].channel, 1,
            "the granted channel moved to the front"
        );
        start(&s, &mut b).await.unwrap();
        assert_eq!(b.channel_slot.as_ref().unwrap().channel, 1);
        drop(a);
        drop(b);
        assert_idle(&s);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_with_queue_full_and_a_disabled_queue_never_waits() {
        let s = Arc::new(setup(
            &[1],
            QueueConfig {
                max_depth: 2,
                ..cfg()
            },
        ));
        let mut holder = ctx(&s, 1, 5, 10);
        start(&s, &mut holder).await.unwrap();
        let order = Order::default();
        let w1 = spawn(&s, ctx(&s, 1, 5, 10), "w1".into(), &order);
        let w2 = spawn(&s, ctx(&s, 1, 5, 10), "w2".into(), &order);
        queued(&s, 2).await;
        let e = start(&s, &mut ctx(&s, 1, 5, 10)).await.unwrap_err();
        assert_eq!((e.status(), e.code()), (429, Some("queue_full")));
        assert!(e.retry_after().is_some());
        s.chain.done(&mut holder).await;
        w1.await.unwrap();
        w2.await.unwrap();
        assert_idle(&s);

        let s = setup(
            &[1],
            QueueConfig {
                enabled: false,
                ..cfg()
            },
        );
        let mut holder = ctx(&s, 1, 5, 10);
        start(&s, &mut holder).await.unwrap();
        let e = start(&s, &mut ctx(&s, 1, 5, 10)).await.unwrap_err();
        assert_eq!(e, GatewayError::NoChannelAvailable);
        drop(holder);
        assert_idle(&s);
    }

    #[tokio::test]
    async fn priority_comes_from_the_key_group_default_heavy_and_header() {
        let mut groups = BTreeMap::new();
        groups.insert(
            "batch".to_string(),
            GroupPriority {
                priority: Some(2),
                max_priority: Some(4),
            },
        );
        let s = setup(
            &[4],
            QueueConfig {
                heavy_tokens: 1000,
                heavy_priority: 1,
                groups,
                ..cfg()
            },
        );
        let q = Queue::new(s.scheduler.clone(), 100);
        let with = |key: KeyRecord, tokens: u64| {
            let mut c = Ctx::new("r".into());
            c.key = Some(Arc::new(key));
            c.limit_hold = Some(LimitHold {
                scopes: Vec::new(),
                tokens,
            });
            c
        };
        let plain = KeyRecord::default();
        let batch = KeyRecord {
            group: "batch".into(),
            ..Default::default()
        };
        let own = KeyRecord {
            priority: Some(7),
            ..Default::default()
        };
        assert_eq!(q.priority(&with(plain.clone(), 10), None), 5);
        assert_eq!(q.priority(&with(batch.clone(), 10), None), 2);
        assert_eq!(q.priority(&with(own.clone(), 10), None), 7);
        // Heavy work defaults lower.
        assert_eq!(q.priority(&with(own.clone(), 5000), None), 1);
        // A client may lower, or raise up to max_priority (the group's 4 here).
        assert_eq!(q.priority(&with(batch.clone(), 10), Some(0)), 0);
        assert_eq!(q.priority(&with(batch, 10), Some(9)), 4);
        // Without a max_priority it cannot raise at all.
        assert_eq!(q.priority(&with(plain, 10), Some(9)), 5);
        let mut c = with(own, 10);
        c.facts = Some(crate::RequestFacts {
            media: crate::media::Media {
                images: 1,
                image_tokens: 85,
                ..Default::default()
            },
            ..Default::default()
        });
        assert_eq!(q.priority(&c, None), 1, "images make a request heavy");
    }

    #[tokio::test]
    async fn the_priority_header_must_be_a_class() {
        let s = setup(&[1], cfg());
        let mut headers = http::HeaderMap::new();
        headers.insert(PRIORITY_HEADER, "12".parse().unwrap());
        let head = RequestHead {
            method: &http::Method::POST,
            path: "/v1/chat/completions",
            headers: &headers,
            client_ip: None,
        };
        let mut c = Ctx::new("r".into());
        assert_eq!(
            s.chain
                .request_head(&mut c, &head)
                .await
                .unwrap_err()
                .status(),
            400
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(PRIORITY_HEADER, "3".parse().unwrap());
        headers.insert(TIMEOUT_HEADER, "250".parse().unwrap());
        let head = RequestHead {
            method: &http::Method::POST,
            path: "/v1/chat/completions",
            headers: &headers,
            client_ip: None,
        };
        s.chain.request_head(&mut c, &head).await.unwrap();
        let a = c.admission.as_ref().unwrap();
        assert_eq!(
            (a.asked_priority, a.asked_timeout),
            (Some(3), Some(Duration::from_millis(250)))
        );
    }

    #[tokio::test]
    async fn two_thousand_mixed_requests_leave_nothing_behind() {
        let s = Arc::new(setup(
            &[2, 1],
            QueueConfig {
                max_depth: 64,
                aging_ms: 5,
                ..cfg()
            },
        ));
        let mut tasks = Vec::new();
        for i in 0..2000u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = ctx(&s, (i % 7) as i64, (i % 10) as u8, 10 + i % 50);
                if i % 3 == 0 {
                    c.admission = Some(Admission {
                        asked_timeout: Some(Duration::from_millis(i % 5)),
                        ..Admission::default()
                    });
                }
                let fut = start(&s, &mut c);
                if i % 5 == 0 {
                    // Leaves while waiting.
                    let _ = tokio::time::timeout(Duration::from_micros(200), fut).await;
                } else {
                    let _ = fut.await;
                    tokio::task::yield_now().await;
                }
                s.chain.done(&mut c).await;
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("bounded")
                .unwrap();
        }
        assert_idle(&s);
        let m = &s.scheduler.metrics;
        let total =
            m.immediate.get() + m.waited.get() + m.timed_out.get() + m.full.get() + m.left.get();
        assert!(total >= 2000, "every request has an outcome: {total}");
    }
}
