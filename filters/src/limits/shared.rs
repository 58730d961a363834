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
