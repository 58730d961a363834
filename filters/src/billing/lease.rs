//! Credit leases: how several nodes on one store spend one account's balance without ever
//! spending more than it holds, and without a store round trip per request.
//!
//! In lease mode the book's stored amount for an account is not the balance but this node's
//! **lease**: a slice of the balance that no other node may spend. The store keeps, per
//! account, `leased` (the sum of every node's slice) beside `balance`, and one row per node
//! and account with its slice and an expiry:
//!
//! - **take**: when a reservation does not fit, the node takes more with one conditional
//!   update (`leased + n <= balance`), between what it is short and about
//!   [`LEASE_WINDOW`] of this account's spend on this node, capped by the store at the free
//!   balance ÷ (2 × live nodes). When the balance is low, that is exactly what the request
//!   needs: a per-request reservation against the store.
//! - **spend**: reserve and settle against the slice in memory; the ledger commit moves the
//!   balance, `leased` and the node's slice down by the same charge in one transaction, and
//!   the book its slice by the same delta (never an absolute read, so a take racing a
//!   commit cannot be lost).
//! - **return**: what is left goes back when the account has been idle here for
//!   [`IDLE_RETURN`], and at shutdown.
//! - **expiry**: each node renews its rows; a node that dies stops, and once its rows expire
//!   any node gives their amounts back to `leased`. What the dead node settled and had not
//!   committed is lost, as today on SIGKILL (at most the open group-commit window).
//!
//! The sum of the slices never exceeds the balance, each node never spends more than its
//! slice, so the fleet never spends more than the balance.

use std::time::Duration;

use async_trait::async_trait;

/// A lease asks for about this long of the account's recent spend on this node.
pub const LEASE_WINDOW: Duration = Duration::from_secs(30);
/// An account idle this long on a node gives its slice back.
pub const IDLE_RETURN: Duration = Duration::from_secs(10);

/// The store side of the leases (SQLite or PostgreSQL in the server; a map in tests).
#[async_trait]
pub trait AccountLeases: Send + Sync {
    /// Takes between `need` and `want` nano-USD of the account's unleased balance for this
    /// node (the store caps `want` at the free balance ÷ (2 × live nodes), never below
    /// `need`). Returns what was taken: 0 when not even `need` is free.
    async fn take(&self, account_id: i64, need: i64, want: i64) -> Result<i64, String>;
    /// Gives `amount` of this node's slice back.
    async fn give_back(&self, account_id: i64, amount: i64) -> Result<(), String>;
}

/// What a lease asks for: what the reservation is short of, or more when the account spent
/// more than that here over the last window.
pub(crate) fn want(short: i64, recent_spend: i64) -> i64 {
    short.max(recent_spend)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::billing::{BalanceSource, Committed, Wallets};

    /// One account's balance shared by several nodes, with each node's slice.
    #[derive(Default)]
    struct Shared {
        balance: AtomicI64,
        leased: Mutex<Vec<i64>>,
    }

    struct Node {
        shared: Arc<Shared>,
        index: usize,
        nodes: i64,
    }

    #[async_trait]
    impl AccountLeases for Node {
        async fn take(&self, _: i64, need: i64, want: i64) -> Result<i64, String> {
            tokio::task::yield_now().await;
            let mut leased = self.shared.leased.lock().unwrap();
            let free = self.shared.balance.load(Ordering::SeqCst) - leased.iter().sum::<i64>();
            if free < need {
                return Ok(0);
            }
            let g = want.min(free / (2 * self.nodes)).max(need).min(free);
            leased[self.index] += g;
            Ok(g)
        }
        async fn give_back(&self, _: i64, amount: i64) -> Result<(), String> {
            self.shared.leased.lock().unwrap()[self.index] -= amount;
            Ok(())
        }
    }

    #[async_trait]
    impl BalanceSource for Node {
        async fn account_balance(&self, _: i64) -> Result<i64, String> {
            unreachable!("a leased account is never read as a balance")
        }
        async fn key_spent(&self, _: i64) -> Result<i64, String> {
            Ok(0)
        }
    }

    fn node(shared: &Arc<Shared>, index: usize, nodes: i64) -> Arc<Wallets> {
        let n = Arc::new(Node {
            shared: shared.clone(),
            index,
            nodes,
        });
        Arc::new(Wallets::with_leases(n.clone(), n))
    }

    #[tokio::test]
    async fn three_nodes_never_reserve_more_than_the_balance_together() {
        let shared = Arc::new(Shared {
            balance: AtomicI64::new(1_000),
            leased: Mutex::new(vec![0; 3]),
        });
        let nodes: Vec<_> = (0..3).map(|i| node(&shared, i, 3)).collect();
        let mut tasks = Vec::new();
        for i in 0..60 {
            let w = nodes[i % 3].clone();
            tasks.push(tokio::spawn(async move { w.reserve(1, None, 95).await }));
        }
        let mut admitted = 0;
        for t in tasks {
            if t.await.unwrap().is_ok() {
                admitted += 95;
            }
        }
        assert!(admitted <= 1_000, "{admitted}");
        assert!(
            admitted >= 1_000 - 3 * 95,
            "slices left idle on a node: {admitted}"
        );
        assert!(shared.leased.lock().unwrap().iter().sum::<i64>() <= 1_000);
    }

    #[tokio::test]
    async fn commits_move_the_slice_by_deltas_and_an_idle_slice_goes_back() {
        let shared = Arc::new(Shared {
            balance: AtomicI64::new(1_000),
            leased: Mutex::new(vec![0; 1]),
        });
        let w = node(&shared, 0, 1);
        let r = w.reserve(1, None, 100).await.unwrap();
        assert_eq!(w.settle(&r, 40), 40);
        // The ledger commit: the balance and the slice both move down by the charge.
        shared.balance.fetch_sub(40, Ordering::SeqCst);
        shared.leased.lock().unwrap()[0] -= 40;
        w.committed(&Committed {
            charges: vec![(1, None, 40)],
            balances: vec![(1, 960)],
            spends: vec![],
        });
        let slice = shared.leased.lock().unwrap()[0];
        assert_eq!(w.account_available(1), Some(slice));
        // Idle: everything left goes back, and the book holds nothing.
        let back = w.take_idle_leases(Duration::ZERO);
        assert_eq!(back, vec![(1, slice)]);
        assert_eq!(w.account_available(1), Some(0));
    }
}
