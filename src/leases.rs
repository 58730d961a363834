//! Credit leases on this node (`accounting.leases`; see
//! `tollgate_filters::billing::lease`): the book's [`AccountLeases`] port over the store, and
//! the keeper that renews this node's slices, hands idle ones back, reclaims the slices of
//! nodes that stopped renewing, and at shutdown hands everything back once the ledger has
//! committed its last row.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tollgate_filters::billing::lease::IDLE_RETURN;
use tollgate_filters::billing::{AccountLeases, Wallets};

use crate::shared::Redis;
use crate::store::{self, leases, Store};

/// The store side of this node's slices.
pub struct StoreLeases {
    pub store: Store,
    pub node: String,
    pub ttl: Duration,
    /// The live-node count of the registry, when `redis:` is configured (else 1).
    pub redis: Option<Arc<Redis>>,
}

impl StoreLeases {
    fn expires_at(&self) -> i64 {
        store::now_ms() + self.ttl.as_millis() as i64
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, &str) -> Result<T, store::StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let (store, node) = (self.store.clone(), self.node.clone());
        tokio::task::spawn_blocking(move || f(&store, &node).map_err(|e| e.to_string()))
            .await
            .map_err(|e| e.to_string())?
    }
}

#[async_trait]
impl AccountLeases for StoreLeases {
    async fn take(&self, account_id: i64, need: i64, want: i64) -> Result<i64, String> {
        let live = self.redis.as_ref().map_or(1, |r| r.live_nodes());
        let until = self.expires_at();
        self.blocking(move |s, node| leases::take(s, node, account_id, need, want, live, until))
            .await
    }

    async fn give_back(&self, account_id: i64, amount: i64) -> Result<(), String> {
        self.blocking(move |s, node| leases::give_back(s, node, account_id, amount))
            .await
    }
}

/// Renews, returns and reclaims slices; run by the maintenance service.
pub struct LeaseKeeper {
    pub leases: Arc<StoreLeases>,
    pub wallets: Arc<Wallets>,
}

impl LeaseKeeper {
    /// How often the keeper runs: a sixth of the TTL, so a slice survives missed renewals.
    pub fn every(&self) -> Duration {
        self.leases.ttl / 6
    }

    /// One round: renew this node's rows, hand back slices idle for [`IDLE_RETURN`], reclaim
    /// expired rows of other nodes.
    pub async fn tick(&self) {
        let until = self.leases.expires_at();
        if let Err(e) = self
            .leases
            .blocking(move |s, node| leases::renew(s, node, until))
            .await
        {
            tracing::warn!(error = %e, "cannot renew balance leases");
        }
        self.hand_back(IDLE_RETURN).await;
        match self
            .leases
            .blocking(|s, _| leases::reclaim_expired(s))
            .await
        {
            Ok(n) if n > 0 => tracing::info!(slices = n, "expired balance leases reclaimed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot reclaim expired balance leases"),
        }
    }

    /// Hands back the slices of accounts idle for `idle` (everything, with zero).
    pub async fn hand_back(&self, idle: Duration) {
        for (account, amount) in self.wallets.take_idle_leases(idle) {
            if let Err(e) = self.leases.give_back(account, amount).await {
                tracing::warn!(error = %e, account, "cannot hand a balance lease back");
                self.wallets.keep_lease(account, amount);
            }
        }
    }
}
