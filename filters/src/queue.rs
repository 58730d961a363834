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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
};
use serde::Deserialize;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::chain::{Attempt, Phases};
use crate::channel::Channels;
use crate::limits::Scope;
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

/// What the scheduler hands a waiter.
struct Grant {
    slot: ChannelSlot,
    hold: Option<ConcurrencyHold>,
}

/// A channel concurrency slot. Dropping it frees the slot and wakes the next waiter.
pub struct ChannelSlot {
    /// Index into the channel table.
    pub channel: usize,
    permit: Option<OwnedSemaphorePermit>,
    scheduler: Arc<Scheduler>,
}

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        drop(self.permit.take());
        // Seen after the permit is back: a waiter counted after this load took its place in
        // the queue after the permit returned, and its own dispatch sees the permit.
        if self.scheduler.waiting.load(Ordering::SeqCst) > 0 {
            let failed = self.scheduler.dispatch(&mut self.scheduler.lock());
            drop(failed);
        }
    }
}

impl std::fmt::Debug for ChannelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelSlot({})", self.channel)
    }
}

/// A request's place under its key's, account's and model's concurrency caps, held from
/// admission to the end of the request (across retries). Dropping it gives it back.
pub struct ConcurrencyHold {
    scopes: Vec<Scope>,
    scheduler: Arc<Scheduler>,
}

impl Drop for ConcurrencyHold {
    fn drop(&mut self) {
        if self.scopes.is_empty() {
            return;
        }
        let failed = {
            let mut st = self.scheduler.lock();
            for s in &self.scopes {
                if let Some(n) = st.in_flight.get_mut(s) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        st.in_flight.remove(s);
                    }
                }
            }
            self.scheduler.dispatch(&mut st)
        };
        drop(failed);
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

/// What one admission asks for.
struct Ask<'a> {
    /// Channels any of which will do, this attempt's first.
    candidates: &'a [usize],
    /// The concurrency caps to take a place under; `None` when the request holds its places.
    caps: Option<Vec<(Scope, u32)>>,
    class: u8,
    account: i64,
    /// Estimated tokens, for fair share.
    cost: u64,
    deadline: Instant,
}

/// A waiter's place in line: class (highest first), fair-share pass, arrival.
type Rank = (std::cmp::Reverse<u8>, u64, u64);

/// One waiting request.
struct Waiter {
    seq: u64,
    class: u8,
    since: Instant,
    account: i64,
    cost: u64,
    caps: Vec<(Scope, u32)>,
    /// The request holds no concurrency place yet (its first admission).
    needs_hold: bool,
    candidates: Box<[usize]>,
    tx: oneshot::Sender<Grant>,
}

/// Grants per second, for `Retry-After`.
#[derive(Default)]
struct Drain {
    window_start: Option<Instant>,
    count: u64,
    rate: f64,
}

impl Drain {
    fn record(&mut self, now: Instant) {
        let start = *self.window_start.get_or_insert(now);
        self.count += 1;
        let el = now.duration_since(start).as_secs_f64();
        if el >= 1.0 {
            let r = self.count as f64 / el;
            self.rate = if self.rate > 0.0 {
                0.5 * self.rate + 0.5 * r
            } else {
                r
            };
            self.window_start = Some(now);
            self.count = 0;
        }
    }

    fn rate(&self, now: Instant) -> f64 {
        // A window still filling says something too, once it has a few grants.
        match self.window_start {
            Some(s) if self.rate == 0.0 && self.count >= 2 => {
                self.count as f64 / now.duration_since(s).as_secs_f64().max(0.001)
            }
            _ => self.rate,
        }
    }

    /// How long `ahead` requests take to drain at the observed rate, 1–60 s.
    fn retry_after(&self, ahead: usize, now: Instant) -> Duration {
        let rate = self.rate(now);
        if rate <= 0.0 {
            return Duration::from_secs(1);
        }
        Duration::from_secs_f64(((ahead + 1) as f64 / rate).clamp(1.0, 60.0))
    }
}

#[derive(Default)]
struct Pool {
    waiters: Vec<Waiter>,
    drain: Drain,
}

#[derive(Default)]
struct State {
    /// By candidate channel set (sorted).
    pools: HashMap<Box<[usize]>, Pool>,
    seq: u64,
    /// Requests admitted and not done, per concurrency scope.
    in_flight: HashMap<Scope, u32>,
    /// Fair share: each account's pass, in estimated tokens.
    pass: HashMap<i64, u64>,
    /// The pass of the last request granted: where an idle account starts again.
    vtime: u64,
}

/// The queue's metrics, resolved once.
struct QueueMetrics {
    depth: IntGaugeVec,
    depth_by_class: Vec<IntGauge>,
    wait: Histogram,
    outcomes: IntCounterVec,
    immediate: IntCounter,
    waited: IntCounter,
    timed_out: IntCounter,
    full: IntCounter,
    left: IntCounter,
}

impl QueueMetrics {
    fn new() -> QueueMetrics {
        let depth = IntGaugeVec::new(
            Opts::new(
                "tollgate_queue_depth",
                "Requests waiting for admission, by the priority class they were queued in",
            ),
            &["class"],
        )
        .expect("valid metric");
        let wait = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_queue_wait_seconds",
                "Time requests that had to wait spent in the admission queue",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0,
            ]),
        )
        .expect("valid metric");
        let outcomes = IntCounterVec::new(
            Opts::new(
                "tollgate_queue_outcomes_total",
                "Admission outcomes: admitted_immediately, admitted_after_wait, timed_out, full, left",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let c = |o: &str| outcomes.with_label_values(&[o]);
        QueueMetrics {
            depth_by_class: (0..CLASSES)
                .map(|i| depth.with_label_values(&[&i.to_string()]))
                .collect(),
            depth,
            wait,
            immediate: c("admitted_immediately"),
            waited: c("admitted_after_wait"),
            timed_out: c("timed_out"),
            full: c("full"),
            left: c("left"),
            outcomes,
        }
    }
}

/// A snapshot for `/readyz`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueSnapshot {
    /// Requests waiting now.
    pub waiting: usize,
    /// By the class they were queued in, 0 to 9.
    pub by_class: Vec<usize>,
    /// Requests holding a concurrency place, summed over scopes (key, account, model).
    pub concurrency_held: u64,
}

/// The admission scheduler: every pool's waiters, the concurrency counts, fair-share state.
/// One lock: admission and release are a handful of map operations under it.
pub struct Scheduler {
    cfg: QueueConfig,
    channels: Channels,
    state: Mutex<State>,
    /// Waiters over every pool: a release with nobody waiting skips the lock.
    waiting: AtomicUsize,
    metrics: QueueMetrics,
}

impl Scheduler {
    pub fn new(cfg: QueueConfig, channels: Channels) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            cfg,
            channels,
            state: Mutex::default(),
            waiting: AtomicUsize::new(0),
            metrics: QueueMetrics::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The metric families, for the server's registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.metrics.depth.clone()),
            Box::new(self.metrics.wait.clone()),
            Box::new(self.metrics.outcomes.clone()),
        ]
    }

    pub fn snapshot(&self) -> QueueSnapshot {
        let st = self.lock();
        let mut by_class = vec![0; CLASSES];
        for w in st.pools.values().flat_map(|p| p.waiters.iter()) {
            by_class[usize::from(w.class)] += 1;
        }
        QueueSnapshot {
            waiting: by_class.iter().sum(),
            by_class,
            concurrency_held: st.in_flight.values().map(|&n| u64::from(n)).sum(),
        }
    }

    fn effective_class(&self, w: &Waiter, now: Instant) -> u8 {
        if self.cfg.aging_ms == 0 {
            return w.class;
        }
        let steps = now.duration_since(w.since).as_millis() / u128::from(self.cfg.aging_ms);
        (u128::from(w.class) + steps).min(u128::from(MAX_PRIORITY)) as u8
    }

    fn caps_free(in_flight: &HashMap<Scope, u32>, w: &Waiter) -> bool {
        !w.needs_hold
            || w.caps
                .iter()
                .all(|(s, cap)| in_flight.get(s).copied().unwrap_or(0) < *cap)
    }

    fn channel_free(&self, w: &Waiter) -> Option<usize> {
        w.candidates
            .iter()
            .copied()
            .find(|&c| self.channels[c].slots.available_permits() > 0)
    }

    /// Grants slots to the best admissible waiters while there are slots. Returns grants
    /// whose waiter had already gone, to be dropped once the lock is released (dropping one
    /// frees its slot, which dispatches again).
    fn dispatch(self: &Arc<Self>, st: &mut State) -> Vec<Grant> {
        let mut failed = Vec::new();
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return failed;
        }
        let now = Instant::now();
        loop {
            // (class desc, pass asc, arrival asc)
            let mut best: Option<(Rank, &[usize], usize)> = None;
            for (key, pool) in &st.pools {
                for (i, w) in pool.waiters.iter().enumerate() {
                    if w.tx.is_closed()
                        || !Self::caps_free(&st.in_flight, w)
                        || self.channel_free(w).is_none()
                    {
                        continue;
                    }
                    let pass = st.pass.get(&w.account).copied().unwrap_or(0).max(st.vtime);
                    let rank = (std::cmp::Reverse(self.effective_class(w, now)), pass, w.seq);
                    if best.as_ref().is_none_or(|b| rank < b.0) {
                        best = Some((rank, key, i));
                    }
                }
            }
            let Some((_, key, i)) = best else {
                break;
            };
            let key: Box<[usize]> = key.into();
            let Some(pool) = st.pools.get_mut(&key) else {
                break;
            };
            let w = pool.waiters.swap_remove(i);
            // Arrival order among equals is kept by `seq`, so swap_remove's reordering of
            // the vector does not matter.
            let Some(channel) = self.channel_free(&w) else {
                pool.waiters.push(w);
                break;
            };
            let Ok(permit) = self.channels[channel].slots.clone().try_acquire_owned() else {
                pool.waiters.push(w);
                break;
            };
            pool.drain.record(now);
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            self.metrics.depth_by_class[usize::from(w.class)].dec();
            let hold = w.needs_hold.then(|| {
                for (s, _) in &w.caps {
                    *st.in_flight.entry(s.clone()).or_insert(0) += 1;
                }
                ConcurrencyHold {
                    scopes: w.caps.iter().map(|(s, _)| s.clone()).collect(),
                    scheduler: self.clone(),
                }
            });
            let start = st.pass.get(&w.account).copied().unwrap_or(0).max(st.vtime);
            st.vtime = start;
            st.pass
                .insert(w.account, start.saturating_add(w.cost.max(1)));
            if st.pass.len() > 4096 {
                let v = st.vtime;
                st.pass.retain(|_, p| *p > v);
            }
            let grant = Grant {
                slot: ChannelSlot {
                    channel,
                    permit: Some(permit),
                    scheduler: self.clone(),
                },
                hold,
            };
            if let Err(g) = w.tx.send(grant) {
                failed.push(g);
            }
        }
        failed
    }

    /// Removes waiter `seq` from `pool` if it is still there.
    fn remove(&self, st: &mut State, pool: &[usize], seq: u64) -> bool {
        let Some(p) = st.pools.get_mut(pool) else {
            return false;
        };
        let Some(i) = p.waiters.iter().position(|w| w.seq == seq) else {
            return false;
        };
        let w = p.waiters.swap_remove(i);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.depth_by_class[usize::from(w.class)].dec();
        true
    }

    /// Why a waiter could not be admitted: a channel slot, or the scope of a full cap.
    fn blocked_on(&self, st: &State, caps: &[(Scope, u32)], candidates: &[usize]) -> &'static str {
        if let Some((s, _)) = caps
            .iter()
            .find(|(s, cap)| st.in_flight.get(s).copied().unwrap_or(0) >= *cap)
        {
            return match s {
                Scope::Key(_) => "this key's concurrency limit",
                Scope::Account(_) => "this account's concurrency limit",
                Scope::Model(_) => "this model's concurrency limit",
                Scope::KeyModel(..) => "this key's concurrency limit on this model",
            };
        }
        let _ = candidates;
        "a channel slot"
    }

    /// Waits for a slot on one of `ask.candidates` (and, when `ask.caps` is given, a place
    /// under each cap) until `ask.deadline`. Dropping the future leaves the queue.
    async fn admit(self: &Arc<Self>, mut ask: Ask<'_>) -> (Result<Grant, GatewayError>, Duration) {
        // Nobody waits anywhere: a free slot is taken at once, with no place in a line.
        if self.waiting.load(Ordering::SeqCst) == 0 {
            match self.grant_now(ask.candidates, ask.caps.take()) {
                Ok(g) => {
                    self.metrics.immediate.inc();
                    return (Ok(g), Duration::ZERO);
                }
                Err(back) => ask.caps = back,
            }
        }
        self.wait(ask).await
    }

    /// The fast path, taken while nobody waits: a free slot on one of `candidates` and a
    /// place under each of `caps`, or the caps back for the slow path. No waiter, channel
    /// or key is allocated. Fair-share passes are left alone: they order waiters, and an
    /// account served while nobody waited competed with nobody.
    fn grant_now(
        self: &Arc<Self>,
        candidates: &[usize],
        caps: Option<Vec<(Scope, u32)>>,
    ) -> Result<Grant, Option<Vec<(Scope, u32)>>> {
        let slot = |permit, channel| ChannelSlot {
            channel,
            permit: Some(permit),
            scheduler: self.clone(),
        };
        let take = || {
            candidates.iter().find_map(|&c| {
                self.channels[c]
                    .slots
                    .clone()
                    .try_acquire_owned()
                    .ok()
                    .map(|p| (p, c))
            })
        };
        match caps {
            // Uncapped, or a retry whose request already holds its places: no lock at all.
            None => match take() {
                Some((permit, c)) => Ok(Grant {
                    slot: slot(permit, c),
                    hold: None,
                }),
                None => Err(None),
            },
            Some(caps) if caps.is_empty() => match take() {
                Some((permit, c)) => Ok(Grant {
                    slot: slot(permit, c),
                    hold: Some(ConcurrencyHold {
                        scopes: Vec::new(),
                        scheduler: self.clone(),
                    }),
                }),
                None => Err(Some(caps)),
            },
            Some(caps) => {
                let mut st = self.lock();
                let free = caps
                    .iter()
                    .all(|(s, cap)| st.in_flight.get(s).copied().unwrap_or(0) < *cap);
                let Some((permit, c)) = free.then(take).flatten() else {
                    drop(st);
                    return Err(Some(caps));
                };
                for (s, _) in &caps {
                    *st.in_flight.entry(s.clone()).or_insert(0) += 1;
                }
                drop(st);
                Ok(Grant {
                    slot: slot(permit, c),
                    hold: Some(ConcurrencyHold {
                        scopes: caps.into_iter().map(|(s, _)| s).collect(),
                        scheduler: self.clone(),
                    }),
                })
            }
        }
    }

    /// The slow path: a place in the pool's line until a grant or the deadline.
    async fn wait(self: &Arc<Self>, ask: Ask<'_>) -> (Result<Grant, GatewayError>, Duration) {
        let Ask {
            candidates,
            caps,
            class,
            account,
            cost,
            deadline,
        } = ask;
        let mut key: Vec<usize> = candidates.to_vec();
        key.sort_unstable();
        let key: Box<[usize]> = key.into();
        let since = Instant::now();
        let (tx, mut rx) = oneshot::channel();
        let needs_hold = caps.is_some();
        let caps = caps.unwrap_or_default();
        let seq;
        let failed;
        {
            let mut st = self.lock();
            let depth = st.pools.get(&key).map_or(0, |p| p.waiters.len());
            if depth >= self.cfg.max_depth && self.cfg.enabled {
                self.metrics.full.inc();
                let retry_after = st.pools[&key].drain.retry_after(depth, since);
                return (
                    Err(GatewayError::QueueFull { depth, retry_after }),
                    Duration::ZERO,
                );
            }
            st.seq += 1;
            seq = st.seq;
            self.waiting.fetch_add(1, Ordering::SeqCst);
            self.metrics.depth_by_class[usize::from(class)].inc();
            st.pools
                .entry(key.clone())
                .or_default()
                .waiters
                .push(Waiter {
                    seq,
                    class,
                    since,
                    account,
                    cost,
                    caps: caps.clone(),
                    needs_hold,
                    candidates: candidates.into(),
                    tx,
                });
            failed = self.dispatch(&mut st);
        }
        drop(failed);
        if let Ok(g) = rx.try_recv() {
            self.metrics.immediate.inc();
            return (Ok(g), Duration::ZERO);
        }
        let mut guard = Waiting {
            scheduler: self,
            pool: &key,
            seq,
            armed: true,
        };
        let got = if self.cfg.enabled && deadline > since {
            tokio::time::timeout_at(deadline.into(), &mut rx).await.ok()
        } else {
            None
        };
        let waited = since.elapsed();
        guard.armed = false;
        if let Some(Ok(g)) = got {
            self.metrics.waited.inc();
            self.metrics.wait.observe(waited.as_secs_f64());
            return (Ok(g), waited);
        }
        // The deadline: leave, unless a grant arrived in the meantime.
        let (removed, what, retry_after) = {
            let mut st = self.lock();
            let removed = self.remove(&mut st, &key, seq);
            let what = self.blocked_on(&st, if needs_hold { &caps } else { &[] }, candidates);
            let depth = st.pools.get(&key).map_or(0, |p| p.waiters.len());
            let retry_after = st.pools.get(&key).map_or(Duration::from_secs(1), |p| {
                p.drain.retry_after(depth, Instant::now())
            });
            (removed, what, retry_after)
        };
        if !removed {
            if let Ok(g) = rx.try_recv() {
                self.metrics.waited.inc();
                self.metrics.wait.observe(waited.as_secs_f64());
                return (Ok(g), waited);
            }
        }
        let err = if !self.cfg.enabled {
            if what == "a channel slot" {
                GatewayError::NoChannelAvailable
            } else {
                GatewayError::RateLimited {
                    limit: crate::Limit::Concurrency,
                    retry_after: Duration::from_secs(1),
                }
            }
        } else {
            self.metrics.timed_out.inc();
            if !waited.is_zero() {
                self.metrics.wait.observe(waited.as_secs_f64());
            }
            GatewayError::QueueTimeout {
                what,
                waited,
                retry_after,
            }
        };
        (Err(err), waited)
    }
}

/// Takes a waiter out of the queue when its future is dropped (the client left).
struct Waiting<'a> {
    scheduler: &'a Arc<Scheduler>,
    pool: &'a [usize],
    seq: u64,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.scheduler.lock();
            self.scheduler.remove(&mut st, self.pool, self.seq);
            self.scheduler.metrics.left.inc();
            // A grant already sent is dropped with the receiver, after this lock is released.
        }
    }
}

/// The `queue` filter.
pub struct Queue {
    scheduler: Arc<Scheduler>,
    /// Output cap assumed for the cost estimate when a request sets none.
    default_max_output: u64,
}

impl Queue {
    pub fn new(scheduler: Arc<Scheduler>, default_max_output: u64) -> Queue {
        Queue {
            scheduler,
            default_max_output,
        }
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
        let caps = adm.hold.is_none().then(|| {
            ctx.limit_hold
                .as_ref()
                .map(|h| h.concurrency_caps())
                .unwrap_or_default()
        });
        let account = ctx.key.as_ref().map_or(0, |k| k.account_id);
        let cost = self.cost(ctx);
        let deadline = adm.deadline.unwrap_or(now);
        let class = adm.priority.unwrap_or(self.cfg().default_priority);
        let (granted, waited) = self
            .scheduler
            .admit(Ask {
                candidates: &candidates,
                caps,
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
                // A retry that finds no slot reports the earlier failure's kind, not a queue
                // refusal for a request that did reach a provider.
                return Err(if first {
                    e
                } else {
                    GatewayError::NoChannelAvailable
                });
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
        }
    }

    fn on_abandon(&self, ctx: &mut Ctx) {
        ctx.channel_slot = None;
        if let Some(a) = ctx.admission.as_mut() {
            a.hold = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::KeyRecord;
    use crate::channel::{build_channels, ChannelConfig, HealthConfig};
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
