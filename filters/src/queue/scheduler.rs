//! The admission scheduler: every pool's waiters, the channel slots and concurrency places
//! they are granted, and fair share between accounts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::stats::{Drain, QueueMetrics};
use super::{QueueConfig, CLASSES, MAX_PRIORITY};
use crate::channel::Channels;
use crate::limits::Scope;
use crate::GatewayError;

/// What the scheduler hands a waiter.
pub(super) struct Grant {
    pub(super) slot: ChannelSlot,
    pub(super) hold: Option<ConcurrencyHold>,
}

/// A channel concurrency slot. Dropping it frees the slot and wakes the next waiter.
pub struct ChannelSlot {
    /// Index into the channel table.
    pub channel: usize,
    pub(super) permit: Option<OwnedSemaphorePermit>,
    pub(super) scheduler: Arc<Scheduler>,
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
    pub(super) scopes: Vec<Scope>,
    pub(super) scheduler: Arc<Scheduler>,
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

/// What one admission asks for.
pub(super) struct Ask<'a> {
    /// Channels any of which will do, this attempt's first.
    pub(super) candidates: &'a [usize],
    /// The concurrency caps to take a place under; `None` when the request holds its places.
    pub(super) caps: Option<Vec<(Scope, u32)>>,
    pub(super) class: u8,
    pub(super) account: i64,
    /// Estimated tokens, for fair share.
    pub(super) cost: u64,
    pub(super) deadline: Instant,
}

/// A waiter's place in line: class (highest first), fair-share pass, arrival.
pub(super) type Rank = (std::cmp::Reverse<u8>, u64, u64);

/// One waiting request.
pub(super) struct Waiter {
    pub(super) seq: u64,
    pub(super) class: u8,
    pub(super) since: Instant,
    pub(super) account: i64,
    pub(super) cost: u64,
    pub(super) caps: Vec<(Scope, u32)>,
    /// The request holds no concurrency place yet (its first admission).
    pub(super) needs_hold: bool,
    pub(super) candidates: Box<[usize]>,
    pub(super) tx: oneshot::Sender<Grant>,
}

#[derive(Default)]
pub(super) struct Pool {
    pub(super) waiters: Vec<Waiter>,
    pub(super) drain: Drain,
}

#[derive(Default)]
pub(super) struct State {
    /// By candidate channel set (sorted).
    pub(super) pools: HashMap<Box<[usize]>, Pool>,
    pub(super) seq: u64,
    /// Requests admitted and not done, per concurrency scope.
    pub(super) in_flight: HashMap<Scope, u32>,
    /// Fair share: each account's pass, in estimated tokens.
    pub(super) pass: HashMap<i64, u64>,
    /// The pass of the last request granted: where an idle account starts again.
    pub(super) vtime: u64,
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
    pub(super) cfg: QueueConfig,
    pub(super) channels: Channels,
    pub(super) state: Mutex<State>,
    /// Waiters over every pool: a release with nobody waiting skips the lock.
    pub(super) waiting: AtomicUsize,
    pub(super) metrics: QueueMetrics,
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

    /// A scheduler for a reloaded config that counts into `old`'s metric families (already
    /// registered); `old`'s waiters finish on it.
    pub fn succeed(old: &Scheduler, cfg: QueueConfig, channels: Channels) -> Arc<Scheduler> {
        Arc::new(Scheduler {
            cfg,
            channels,
            state: Mutex::default(),
            waiting: AtomicUsize::new(0),
            metrics: old.metrics.clone(),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
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

    pub(super) fn effective_class(&self, w: &Waiter, now: Instant) -> u8 {
        if self.cfg.aging_ms == 0 {
            return w.class;
        }
        let steps = now.duration_since(w.since).as_millis() / u128::from(self.cfg.aging_ms);
        (u128::from(w.class) + steps).min(u128::from(MAX_PRIORITY)) as u8
    }

    pub(super) fn caps_free(in_flight: &HashMap<Scope, u32>, w: &Waiter) -> bool {
        !w.needs_hold
            || w.caps
                .iter()
                .all(|(s, cap)| in_flight.get(s).copied().unwrap_or(0) < *cap)
    }

    pub(super) fn channel_free(&self, w: &Waiter) -> Option<usize> {
        w.candidates
            .iter()
            .copied()
            .find(|&c| self.channels[c].slots.available_permits() > 0)
    }

    /// Grants slots to the best admissible waiters while there are slots. Returns grants
    /// whose waiter had already gone, to be dropped once the lock is released (dropping one
    /// frees its slot, which dispatches again).
    pub(super) fn dispatch(self: &Arc<Self>, st: &mut State) -> Vec<Grant> {
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
    pub(super) fn remove(&self, st: &mut State, pool: &[usize], seq: u64) -> bool {
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
    pub(super) fn blocked_on(
        &self,
        st: &State,
        caps: &[(Scope, u32)],
        candidates: &[usize],
    ) -> &'static str {
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
    pub(super) async fn admit(
        self: &Arc<Self>,
        mut ask: Ask<'_>,
    ) -> (Result<Grant, GatewayError>, Duration) {
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
    pub(super) fn grant_now(
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
    pub(super) async fn wait(
        self: &Arc<Self>,
        ask: Ask<'_>,
    ) -> (Result<Grant, GatewayError>, Duration) {
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
pub(super) struct Waiting<'a> {
    pub(super) scheduler: &'a Arc<Scheduler>,
    pub(super) pool: &'a [usize],
    pub(super) seq: u64,
    pub(super) armed: bool,
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
