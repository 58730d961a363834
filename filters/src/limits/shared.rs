//! Limits held across gateway nodes (`redis:`): the port to the shared state, and the
//! per-node credit that keeps most requests off it.
//!
//! Each node keeps its in-process state as the hot path. For requests/min, tokens/min and
//! media units it holds a **credit** per scope and dimension: units leased from the shared
//! bucket (a GCRA in Redis, on Redis's clock) and not yet used. A request takes from the
//! credit; only when the credit is short does it wait for a lease, which asks for the
//! request's units plus about 250 ms of the scope's rate. When a take leaves the credit under
//! half a lease, one background refill is started, so a steady stream of requests rarely
//! waits. Credit lives [`CREDIT_LIFE`]; what is left then (and what settled requests give
//! back) returns to the shared bucket, so an idle node holds nothing for long and the fleet
//! admits at most one lease per node above the limit.
//!
//! Concurrency caps are shared places with a TTL, taken by the admission queue
//! ([`crate::queue`]) after its local grant; a crashed node's places expire.
//!
//! When the shared state cannot be reached (a timeout, the circuit breaker open), the
//! [`OnError`] policy decides: each node enforces `limit ÷ live nodes` locally
//! (`local_share`), or admits (`allow`), or refuses with 503 `limits_unavailable` (`deny`).

use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use super::{Dim, Report, Scope, Shared, DIMS};
use crate::GatewayError;

/// How long leased units stay on this node before they go back.
pub const CREDIT_LIFE: Duration = Duration::from_secs(1);

/// What to do while the shared state cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Each node enforces `limit ÷ live nodes` on its own.
    #[default]
    LocalShare,
    /// Admit: the limits are not enforced until the shared state is back.
    Allow,
    /// Refuse with 503 `limits_unavailable`.
    Deny,
}

impl OnError {
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::LocalShare => "local_share",
            OnError::Allow => "allow",
            OnError::Deny => "deny",
        }
    }
}

/// The shared bucket's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// `units` were taken (at least what was needed); `remaining` is what the bucket still
    /// holds, and `reset` the time until it is full again.
    Granted {
        units: u64,
        remaining: u64,
        reset: Duration,
    },
    /// Not even the units needed fit; they would after `retry_after`.
    Refused {
        retry_after: Duration,
        reset: Duration,
    },
}

/// The shared state did not answer (an error, a timeout, or its circuit breaker is open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable;

/// The state the nodes share. Redis in the server (`tollgate::shared`); a map in tests.
#[async_trait]
pub trait SharedLimits: Send + Sync {
    /// Takes between `need` and `want` units from the per-minute bucket `bucket`, whose limit
    /// is `per_minute`; all or nothing for `need`.
    async fn lease(
        &self,
        bucket: &str,
        per_minute: u32,
        need: u64,
        want: u64,
    ) -> Result<Lease, Unreachable>;
    /// Puts `units` back into `bucket` (unused credit, tokens counted and not used).
    async fn give_back(&self, bucket: &str, per_minute: u32, units: u64)
        -> Result<(), Unreachable>;
    /// Takes one of `cap` places of `scope` for `holder`; `false` when all are taken.
    async fn enter(&self, scope: &str, cap: u32, holder: &str) -> Result<bool, Unreachable>;
    /// Gives `holder`'s place back (in the background; a place not given back expires).
    fn leave(&self, scope: &str, holder: &str);
    /// `false` while calls are known to fail (the breaker is open): the policy applies at
    /// once instead of after a timeout.
    fn reachable(&self) -> bool;
    /// Gateway nodes alive now, this one included (at least 1).
    fn live_nodes(&self) -> u32;
}

/// Units leased for one scope and dimension and not yet used.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Credit {
    pub(crate) units: u64,
    /// When what is left goes back (offset from the limiter's epoch).
    pub(crate) until: Duration,
    /// A background refill is on its way.
    pub(crate) refilling: bool,
    /// The shared bucket's room and reset at the last lease, for the headers.
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
    /// The scope's limit, for giving the units back.
    pub(crate) per_minute: u32,
}

impl Credit {
    /// Adds a lease's surplus.
    pub(crate) fn add(&mut self, units: u64, now: Duration, remaining: u64, reset: Duration) {
        self.units += units;
        self.until = now + CREDIT_LIFE;
        self.remaining = remaining;
        self.reset = reset;
    }

    /// Takes out units past their life, to go back to the shared bucket.
    pub(crate) fn take_stale(&mut self, now: Duration) -> u64 {
        if self.until <= now {
            std::mem::take(&mut self.units)
        } else {
            0
        }
    }
}

/// About 250 ms of a per-minute rate: what a lease asks for beyond the request's own units.
pub fn lease_size(per_minute: u32) -> u64 {
    (u64::from(per_minute) / 240).max(1)
}

/// The local limit while the shared state is unreachable under `local_share`.
pub fn local_share(per_minute: u32, live_nodes: u32) -> u32 {
    (per_minute / live_nodes.max(1)).max(1)
}

/// The shared side of the `limits` filter.
impl super::Limits {
    /// Takes `n` of `dim` in one scope: from this node's bucket, or with `redis:` from the
    /// credit leased from the shared one. `Ok(true)` when taken locally because the shared
    /// state was unreachable.
    pub(super) async fn take_one(
        &self,
        scope: &Scope,
        dim: Dim,
        n: u64,
        pm: u32,
    ) -> Result<(Option<Report>, bool), (Option<Report>, GatewayError)> {
        let Some(shared) = &self.shared else {
            return self.take_local(scope, dim, n, pm).map(|r| (Some(r), false));
        };
        let lease = lease_size(pm);
        let now = self.now();
        let stale = {
            let mut map = self.lock(scope);
            let c = map.entry(scope.clone()).or_default().credit(dim);
            let stale = c.take_stale(now);
            if c.units >= n {
                c.units -= n;
                let report = Report {
                    limit: pm,
                    remaining: c.remaining,
                    reset: c.reset,
                };
                let refill = c.units < lease.div_ceil(2) && !c.refilling;
                c.refilling |= refill;
                drop(map);
                if refill {
                    self.refill(shared, scope, dim, pm, lease);
                }
                return Ok((Some(report), false));
            }
            stale
        };
        let name = scope.shared_name(dim);
        if stale > 0 {
            let backend = shared.backend.clone();
            let name = name.clone();
            tokio::spawn(async move { backend.give_back(&name, pm, stale).await });
        }
        let answer = if shared.backend.reachable() {
            shared.backend.lease(&name, pm, n, n + lease).await
        } else {
            Err(Unreachable)
        };
        match answer {
            Ok(Lease::Granted {
                units,
                remaining,
                reset,
            }) => {
                let now = self.now();
                let mut map = self.lock(scope);
                let c = map.entry(scope.clone()).or_default().credit(dim);
                c.add(units.saturating_sub(n), now, remaining, reset);
                c.per_minute = pm;
                Ok((
                    Some(Report {
                        limit: pm,
                        remaining,
                        reset,
                    }),
                    false,
                ))
            }
            Ok(Lease::Refused { retry_after, reset }) => {
                let r = Report {
                    limit: pm,
                    remaining: 0,
                    reset,
                };
                Err((Some(r), Self::refused(dim.limit(scope), retry_after)))
            }
            Err(Unreachable) => match shared.on_error {
                OnError::Allow => Ok((None, true)),
                OnError::Deny => Err((None, GatewayError::LimitsUnavailable)),
                OnError::LocalShare => {
                    let pm = local_share(pm, shared.backend.live_nodes());
                    self.take_local(scope, dim, n, pm).map(|r| (Some(r), true))
                }
            },
        }
    }

    /// Tops the credit up in the background (a take left it under half a lease).
    fn refill(&self, shared: &Shared, scope: &Scope, dim: Dim, pm: u32, lease: u64) {
        let (state, backend, scope) = (self.state.clone(), shared.backend.clone(), scope.clone());
        tokio::spawn(async move {
            let got = if backend.reachable() {
                backend.lease(&scope.shared_name(dim), pm, 1, lease).await
            } else {
                Err(Unreachable)
            };
            let now = state.now();
            let mut map = state.lock(&scope);
            let c = map.entry(scope.clone()).or_default().credit(dim);
            c.refilling = false;
            if let Ok(Lease::Granted {
                units,
                remaining,
                reset,
            }) = got
            {
                c.add(units, now, remaining, reset);
                c.per_minute = pm;
            }
        });
    }

    /// Returns credit past its life to the shared buckets (run every few hundred ms by the
    /// server with `redis:`; idle scopes are dropped). Returns the units given back.
    pub async fn return_stale_credit(&self) -> u64 {
        let Some(shared) = &self.shared else {
            return 0;
        };
        let now = self.now();
        let mut stale = Vec::new();
        for shard in self.state.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|scope, st| {
                for d in DIMS {
                    let c = st.credit(d);
                    let units = c.take_stale(now);
                    if units > 0 {
                        stale.push((scope.shared_name(d), c.per_minute, units));
                    }
                }
                !st.idle(now)
            });
        }
        let mut returned = 0;
        for (name, pm, units) in stale {
            if shared.backend.give_back(&name, pm, units).await.is_ok() {
                returned += units;
            }
        }
        returned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_a_quarter_second_of_the_rate_and_never_empty() {
        assert_eq!(lease_size(60), 1);
        assert_eq!(lease_size(60_000), 250);
        assert_eq!(local_share(60, 3), 20);
        assert_eq!(local_share(2, 3), 1);
        assert_eq!(local_share(60, 0), 60);
    }

    #[test]
    fn credit_goes_stale_after_its_life() {
        let mut c = Credit::default();
        c.add(5, Duration::from_secs(10), 100, Duration::ZERO);
        assert_eq!(c.take_stale(Duration::from_millis(10_500)), 0);
        assert_eq!(c.take_stale(Duration::from_secs(11)), 5);
        assert_eq!(c.units, 0);
    }
}
