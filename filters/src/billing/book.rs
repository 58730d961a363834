//! The in-process book of balances, budgets and reservations in front of the store.
//!
//! For each account and key [`Wallets`] knows the stored amount, what was settled but not yet
//! written (`unflushed`), and what is reserved. Reserve and settle happen under one lock, so
//! concurrent requests can never together spend more than the account holds. When a
//! reservation does not fit, the book re-reads the store once (a top-up made elsewhere)
//! before refusing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::GatewayError;

/// Reads stored amounts for [`Wallets`]. SQLite in the server; a map in tests.
#[async_trait]
pub trait BalanceSource: Send + Sync {
    /// The account's stored balance, nano-USD.
    async fn account_balance(&self, account_id: i64) -> Result<i64, String>;
    /// What the key has spent so far, as stored.
    async fn key_spent(&self, key_id: i64) -> Result<i64, String>;
}

/// One holder's money as the gateway sees it.
#[derive(Debug, Clone, Copy, Default)]
struct Purse {
    /// Account: stored balance. Key: stored spend.
    stored: i64,
    /// Settled here, not yet committed by the ledger writer.
    unflushed: i64,
    reserved: i64,
}

#[derive(Default)]
struct Book {
    accounts: HashMap<i64, Purse>,
    keys: HashMap<i64, Purse>,
    /// Bumped whenever stored amounts change under the book (a flush, a top-up), so that a
    /// refresh read before the change is not applied after it.
    generation: u64,
}

impl Book {
    fn account_available(&self, id: i64) -> Option<i64> {
        self.accounts
            .get(&id)
            .map(|p| p.stored - p.unflushed - p.reserved)
    }

    fn key_available(&self, id: i64, budget: i64) -> Option<i64> {
        self.keys
            .get(&id)
            .map(|p| budget - p.stored - p.unflushed - p.reserved)
    }
}

/// Money held back for one request until it settles. Settle it exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub account_id: i64,
    /// The key, when it has a budget.
    pub key_id: Option<i64>,
    pub amount: i64,
}

/// The in-process book of balances, budgets and reservations.
pub struct Wallets {
    book: Mutex<Book>,
    source: Arc<dyn BalanceSource>,
}

impl Wallets {
    pub fn new(source: Arc<dyn BalanceSource>) -> Self {
        Wallets {
            book: Mutex::new(Book::default()),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads what the book lacks, or (with `force`) re-reads stored amounts.
    async fn load(
        &self,
        account_id: i64,
        key_id: Option<i64>,
        force: bool,
    ) -> Result<(), GatewayError> {
        let (gen, need_account, need_key) = {
            let b = self.lock();
            (
                b.generation,
                force || !b.accounts.contains_key(&account_id),
                key_id.filter(|k| force || !b.keys.contains_key(k)),
            )
        };
        let fail = |e: String| {
            tracing::error!(error = %e, "cannot read balances");
            GatewayError::Internal
        };
        let balance = if need_account {
            Some(
                self.source
                    .account_balance(account_id)
                    .await
                    .map_err(fail)?,
            )
        } else {
            None
        };
        let spent = match need_key {
            Some(k) => Some(self.source.key_spent(k).await.map_err(fail)?),
            None => None,
        };
        let mut b = self.lock();
        if force && b.generation != gen {
            // A flush or top-up moved the stored amounts while we read: keep the book's.
            return Ok(());
        }
        if let Some(v) = balance {
            put(b.accounts.entry(account_id), v, force);
        }
        if let (Some(k), Some(v)) = (key_id, spent) {
            put(b.keys.entry(k), v, force);
        }
        Ok(())
    }

    fn try_reserve(
        &self,
        account_id: i64,
        key: Option<(i64, i64)>,
        amount: i64,
    ) -> Option<Reservation> {
        let mut b = self.lock();
        if b.account_available(account_id)? < amount {
            return None;
        }
        if let Some((k, budget)) = key {
            if b.key_available(k, budget)? < amount {
                return None;
            }
            b.keys.get_mut(&k)?.reserved += amount;
        }
        b.accounts.get_mut(&account_id)?.reserved += amount;
        Some(Reservation {
            account_id,
            key_id: key.map(|(k, _)| k),
            amount,
        })
    }

    /// Holds `amount` against the account and (when it has a budget) the key, atomically.
    /// `key` is `(key_id, budget_nano)`.
    pub async fn reserve(
        &self,
        account_id: i64,
        key: Option<(i64, i64)>,
        amount: i64,
    ) -> Result<Reservation, GatewayError> {
        let key_id = key.map(|(k, _)| k);
        self.load(account_id, key_id, false).await?;
        if let Some(r) = self.try_reserve(account_id, key, amount) {
            return Ok(r);
        }
        // Maybe a top-up landed in the store since the book last read it.
        self.load(account_id, key_id, true).await?;
        self.try_reserve(account_id, key, amount).ok_or_else(|| {
            let b = self.lock();
            let over_budget =
                key.is_some_and(|(k, budget)| b.key_available(k, budget).unwrap_or(0) < amount);
            GatewayError::InsufficientQuota(if over_budget {
                "This API key has reached its budget.".into()
            } else {
                "You exceeded your current quota: the account balance does not cover this request."
                    .into()
            })
        })
    }

    /// Releases the reservation and charges `cost` instead, never more than the account
    /// holds. Returns what was charged; the ledger writer must later report the commit
    /// ([`Self::committed`]).
    pub fn settle(&self, r: &Reservation, cost: i64) -> i64 {
        let mut b = self.lock();
        let Some(acct) = b.accounts.get_mut(&r.account_id) else {
            return 0;
        };
        acct.reserved -= r.amount;
        let available = (acct.stored - acct.unflushed - acct.reserved).max(0);
        let charged = cost.clamp(0, available);
        if charged < cost {
            tracing::warn!(
                account = r.account_id,
                cost,
                charged,
                "cost above the balance; charged what was left"
            );
        }
        acct.unflushed += charged;
        if let Some(k) = r.key_id.and_then(|k| b.keys.get_mut(&k)) {
            k.reserved -= r.amount;
            k.unflushed += charged;
        }
        charged
    }

    /// A ledger commit landed: its rows' charges leave `unflushed`, and the stored amounts
    /// become the values read back inside that same transaction. Absolute values, not
    /// deltas, so a refresh racing the commit can never count a charge twice.
    pub fn committed(&self, c: &Committed) {
        let mut b = self.lock();
        b.generation += 1;
        for &(account, budget_key, charged) in &c.charges {
            if let Some(a) = b.accounts.get_mut(&account) {
                a.unflushed -= charged;
            }
            if let Some(k) = budget_key.and_then(|k| b.keys.get_mut(&k)) {
                k.unflushed -= charged;
            }
        }
        for &(account, balance) in &c.balances {
            if let Some(a) = b.accounts.get_mut(&account) {
                a.stored = balance;
            }
        }
        for &(key, spent) in &c.spends {
            if let Some(k) = b.keys.get_mut(&key) {
                k.stored = spent;
            }
        }
    }

    /// Forget a key's purse (its budget or spend was edited); it is re-read on next use.
    pub fn forget_key(&self, key_id: i64) {
        let mut b = self.lock();
        if b.keys
            .get(&key_id)
            .is_some_and(|p| p.reserved == 0 && p.unflushed == 0)
        {
            b.keys.remove(&key_id);
        }
    }

    /// What the account can still spend here (stored − unflushed − reserved).
    pub fn account_available(&self, account_id: i64) -> Option<i64> {
        self.lock().account_available(account_id)
    }
}

fn put(entry: std::collections::hash_map::Entry<'_, i64, Purse>, stored: i64, overwrite: bool) {
    use std::collections::hash_map::Entry;
    match entry {
        Entry::Occupied(mut e) if overwrite => e.get_mut().stored = stored,
        Entry::Occupied(_) => {}
        Entry::Vacant(e) => {
            e.insert(Purse {
                stored,
                ..Purse::default()
            });
        }
    }
}

/// What one ledger commit did, for [`Wallets::committed`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Per applied row: account, the key if its budget purse booked the charge, charged.
    pub charges: Vec<(i64, Option<i64>, i64)>,
    /// Account → stored balance after the commit.
    pub balances: Vec<(i64, i64)>,
    /// Key → stored spend after the commit.
    pub spends: Vec<(i64, i64)>,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    pub(crate) struct Store {
        balance: AtomicI64,
        spent: AtomicI64,
    }

    #[async_trait]
    impl BalanceSource for Store {
        async fn account_balance(&self, _: i64) -> Result<i64, String> {
            Ok(self.balance.load(Ordering::SeqCst))
        }
        async fn key_spent(&self, _: i64) -> Result<i64, String> {
            Ok(self.spent.load(Ordering::SeqCst))
        }
    }

    pub(crate) fn wallets(balance: i64) -> (Arc<Store>, Wallets) {
        let s = Arc::new(Store {
            balance: AtomicI64::new(balance),
            spent: AtomicI64::new(0),
        });
        (s.clone(), Wallets::new(s))
    }

    #[tokio::test]
    async fn reservations_never_exceed_the_balance_under_contention() {
        let (_s, w) = wallets(1000);
        let w = Arc::new(w);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let w = w.clone();
            tasks.push(tokio::spawn(
                async move { w.reserve(1, None, 100).await.ok() },
            ));
        }
        let mut held = Vec::new();
        for t in tasks {
            if let Some(r) = t.await.unwrap() {
                held.push(r);
            }
        }
        assert_eq!(held.len(), 10);
        assert_eq!(w.account_available(1), Some(0));
        // Settling for less returns the difference.
        for r in &held {
            assert_eq!(w.settle(r, 40), 40);
        }
        assert_eq!(w.account_available(1), Some(600));
    }

    #[tokio::test]
    async fn key_budget_is_reserved_together_with_the_account() {
        let (s, w) = wallets(10_000);
        let r = w.reserve(1, Some((7, 150)), 100).await.unwrap();
        let e = w.reserve(1, Some((7, 150)), 100).await.unwrap_err();
        assert_eq!(e.code(), Some("insufficient_quota"));
        assert!(e.to_string().contains("budget"));
        w.settle(&r, 100);
        // What the ledger writer does: commit to the store, then tell the book.
        s.spent.store(100, Ordering::SeqCst);
        s.balance.store(9_900, Ordering::SeqCst);
        w.committed(&Committed {
            charges: vec![(1, Some(7), 100)],
            balances: vec![(1, 9_900)],
            spends: vec![(7, 100)],
        });
        assert!(w.reserve(1, Some((7, 150)), 60).await.is_err());
        assert!(w.reserve(1, Some((7, 150)), 50).await.is_ok());
    }

    #[tokio::test]
    async fn a_refused_reservation_rereads_the_store_for_top_ups() {
        let (s, w) = wallets(50);
        assert!(w.reserve(1, None, 100).await.is_err());
        s.balance.store(500, Ordering::SeqCst);
        assert!(w.reserve(1, None, 100).await.is_ok());
    }

    #[tokio::test]
    async fn settle_never_charges_more_than_the_balance() {
        let (_s, w) = wallets(100);
        let r = w.reserve(1, None, 80).await.unwrap();
        assert_eq!(w.settle(&r, 250), 100);
        assert_eq!(w.account_available(1), Some(0));
    }

    #[tokio::test]
    async fn a_commit_moves_unflushed_into_stored_without_changing_available() {
        let (_s, w) = wallets(1000);
        let r = w.reserve(1, None, 300).await.unwrap();
        w.settle(&r, 200);
        assert_eq!(w.account_available(1), Some(800));
        w.committed(&Committed {
            charges: vec![(1, None, 200)],
            balances: vec![(1, 800)],
            spends: vec![],
        });
        assert_eq!(w.account_available(1), Some(800));
        w.committed(&Committed {
            balances: vec![(1, 850)],
            ..Committed::default()
        });
        assert_eq!(w.account_available(1), Some(850));
    }

    #[tokio::test]
    async fn a_refresh_racing_a_top_up_never_credits_twice() {
        let (s, w) = wallets(0);
        assert!(w.reserve(1, None, 100).await.is_err());
        // The top-up lands in the store; a refused reservation re-reads it before the admin
        // API reports the value it read back. Both are absolute: 500, not 1000.
        s.balance.store(500, Ordering::SeqCst);
        let r = w.reserve(1, None, 100).await.unwrap();
        w.committed(&Committed {
            balances: vec![(1, 500)],
            ..Committed::default()
        });
        assert_eq!(w.account_available(1), Some(400));
        w.settle(&r, 0);
        assert_eq!(w.account_available(1), Some(500));
    }
}
