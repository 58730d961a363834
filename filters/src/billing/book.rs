//! The in-process book of balances, budgets and reservations in front of the store.
//!
//! For each account and key [`Wallets`] knows the stored amount, what was settled but not yet
//! written (`unflushed`), and what is reserved. Reserve and settle happen under one lock, so
//! concurrent requests can never together spend more than the account holds. When a
//! reservation does not fit, the book re-reads the store (a top-up made elsewhere) before
//! refusing: at most once per account, and per key budget, per reload interval, one read
//! shared by every request refused meanwhile.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::lease::AccountLeases;
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
    /// Account: stored balance (in lease mode: this node's slice). Key: stored spend.
    stored: i64,
    /// Settled here, not yet committed by the ledger writer.
    unflushed: i64,
    reserved: i64,
    /// Lease mode: charged here since `window_start` (the lease size), and the last
    /// reservation (for returning an idle slice).
    recent: i64,
    window_start: Option<Instant>,
    touched: Option<Instant>,
}

/// Whose stored amount a read is for.
#[derive(Debug, Clone, Copy)]
enum Holder {
    Account(i64),
    Key(i64),
}

/// Serialises one holder's store reads; holds when it was last re-read for a refusal.
type ReloadGate = Arc<tokio::sync::Mutex<Option<Instant>>>;

#[derive(Default)]
struct Book {
    accounts: HashMap<i64, Purse>,
    keys: HashMap<i64, Purse>,
    account_gates: HashMap<i64, ReloadGate>,
    key_gates: HashMap<i64, ReloadGate>,
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

    fn purse(&self, h: Holder) -> Option<&Purse> {
        match h {
            Holder::Account(id) => self.accounts.get(&id),
            Holder::Key(id) => self.keys.get(&id),
        }
    }

    fn entry(&mut self, h: Holder) -> Entry<'_, i64, Purse> {
        match h {
            Holder::Account(id) => self.accounts.entry(id),
            Holder::Key(id) => self.keys.entry(id),
        }
    }

    fn gate(&mut self, h: Holder) -> ReloadGate {
        let gates = match h {
            Holder::Account(id) => self.account_gates.entry(id),
            Holder::Key(id) => self.key_gates.entry(id),
        };
        gates.or_default().clone()
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

/// How often a refused reservation may re-read one holder's stored amount, by default.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The in-process book of balances, budgets and reservations.
pub struct Wallets {
    book: Mutex<Book>,
    source: Arc<dyn BalanceSource>,
    /// Lease mode ([`super::lease`]): accounts are spent from this node's slice.
    leases: Option<Arc<dyn AccountLeases>>,
    /// At most one re-read of the store per holder per this interval.
    reload_interval: Duration,
}

impl Wallets {
    pub fn new(source: Arc<dyn BalanceSource>) -> Self {
        Self::with_reload_interval(source, DEFAULT_RELOAD_INTERVAL)
    }

    /// A book whose refused reservations re-read an account (or a key's spend) from the store
    /// at most once per `reload_interval`: a top-up made outside the ledger writer is seen at
    /// most that late, and an account at zero costs the store one read per interval, however
    /// many requests it sends.
    pub fn with_reload_interval(source: Arc<dyn BalanceSource>, reload_interval: Duration) -> Self {
        Wallets {
            book: Mutex::new(Book::default()),
            source,
            leases: None,
            reload_interval,
        }
    }

    /// A book in lease mode: several nodes spend one balance through slices `leases` takes
    /// from the store (keys' budgets are still read from `source`).
    pub fn with_leases(source: Arc<dyn BalanceSource>, leases: Arc<dyn AccountLeases>) -> Self {
        Wallets {
            leases: Some(leases),
            ..Self::new(source)
        }
    }

    /// Lease mode: takes more of the account's balance when `amount` does not fit in this
    /// node's slice. One take at a time per account; the others wait and use it.
    /// Lease mode: takes more of the account's balance for this node and reserves `amount`
    /// out of it in the same step, so a request arriving meanwhile cannot spend what was
    /// taken for this one. `None` when the store has not enough free.
    async fn grow(
        &self,
        leases: &Arc<dyn AccountLeases>,
        account_id: i64,
        key: Option<(i64, i64)>,
        amount: i64,
    ) -> Result<Option<Reservation>, GatewayError> {
        let gate = self.lock().gate(Holder::Account(account_id));
        let _one = gate.lock().await;
        let (short, want) = {
            let mut b = self.lock();
            let p = b.accounts.entry(account_id).or_default();
            let short = amount - (p.stored - p.unflushed - p.reserved);
            (short, super::lease::want(short, p.recent))
        };
        if short <= 0 {
            return Ok(self.try_reserve(account_id, key, amount));
        }
        let got = leases.take(account_id, short, want).await.map_err(|e| {
            tracing::error!(error = %e, "cannot take a balance lease");
            GatewayError::Internal
        })?;
        let mut b = self.lock();
        b.accounts.entry(account_id).or_default().stored += got;
        Ok(Self::reserve_in(
            &mut b,
            self.leases.is_some(),
            account_id,
            key,
            amount,
        ))
    }

    /// Lease mode: the slices of accounts idle here for `idle` (nothing reserved since),
    /// taken out of the book, to be given back to the store. What a commit still has to
    /// move stays.
    pub fn take_idle_leases(&self, idle: Duration) -> Vec<(i64, i64)> {
        if self.leases.is_none() {
            return Vec::new();
        }
        let mut b = self.lock();
        let now = Instant::now();
        b.accounts
            .iter_mut()
            .filter(|(_, p)| p.reserved == 0 && p.touched.is_none_or(|t| now - t >= idle))
            .filter_map(|(&id, p)| {
                let spare = p.stored - p.unflushed;
                (spare > 0).then(|| {
                    p.stored -= spare;
                    (id, spare)
                })
            })
            .collect()
    }

    /// Lease mode: a slice that could not be given back is this node's again.
    pub fn keep_lease(&self, account_id: i64, amount: i64) {
        self.lock().accounts.entry(account_id).or_default().stored += amount;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one holder's stored amount into the book: without `force`, only when the book
    /// lacks it; with `force` (a refusal looking for a top-up), at most once per reload
    /// interval. One read at a time per holder: concurrent callers wait for the read in
    /// progress and use its result instead of querying again. Returns whether this call read.
    async fn load(&self, holder: Holder, force: bool) -> Result<bool, GatewayError> {
        let gate = self.lock().gate(holder);
        let mut last_reload = gate.lock().await;
        let gen = {
            let b = self.lock();
            let due = if force {
                last_reload.is_none_or(|t| t.elapsed() >= self.reload_interval)
            } else {
                b.purse(holder).is_none()
            };
            if !due {
                return Ok(false);
            }
            b.generation
        };
        if force {
            // Counted from the attempt: a failed or abandoned read is not retried at once.
            *last_reload = Some(Instant::now());
        }
        let read = match holder {
            Holder::Account(id) => self.source.account_balance(id).await,
            Holder::Key(id) => self.source.key_spent(id).await,
        };
        let stored = read.map_err(|e| {
            tracing::error!(error = %e, "cannot read balances");
            GatewayError::Internal
        })?;
        let mut b = self.lock();
        if force && b.generation != gen {
            // A flush or top-up moved the stored amounts while we read: keep the book's.
            return Ok(true);
        }
        put(b.entry(holder), stored, force);
        Ok(true)
    }

    fn try_reserve(
        &self,
        account_id: i64,
        key: Option<(i64, i64)>,
        amount: i64,
    ) -> Option<Reservation> {
        let mut b = self.lock();
        Self::reserve_in(&mut b, self.leases.is_some(), account_id, key, amount)
    }

    /// Reserves `amount` in the locked book, if both purses have it.
    fn reserve_in(
        b: &mut Book,
        leased: bool,
        account_id: i64,
        key: Option<(i64, i64)>,
        amount: i64,
    ) -> Option<Reservation> {
        if b.account_available(account_id)? < amount {
            return None;
        }
        if let Some((k, budget)) = key {
            if b.key_available(k, budget)? < amount {
                return None;
            }
            b.keys.get_mut(&k)?.reserved += amount;
        }
        let acct = b.accounts.get_mut(&account_id)?;
        acct.reserved += amount;
        if leased {
            acct.touched = Some(Instant::now());
        }
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
        // The common case, both purses known and the money there: one lock, no store.
        if let Some(r) = self.try_reserve(account_id, key, amount) {
            return Ok(r);
        }
        let key_id = key.map(|(k, _)| k);
        let read_account = match &self.leases {
            // A slice starts empty: never read as a balance.
            Some(_) => {
                self.lock().accounts.entry(account_id).or_default();
                true
            }
            None => self.load(Holder::Account(account_id), false).await?,
        };
        let read_key = match key_id {
            Some(k) => self.load(Holder::Key(k), false).await?,
            None => false,
        };
        if let Some(r) = self.try_reserve(account_id, key, amount) {
            return Ok(r);
        }
        // Maybe a top-up landed in the store since the book last read it. What this call has
        // just read is current; the rest is re-read at most once per interval. In lease
        // mode: take more of the balance.
        if let Some(leases) = &self.leases {
            if let Some(r) = self.grow(leases, account_id, key, amount).await? {
                return Ok(r);
            }
        } else if !read_account {
            self.load(Holder::Account(account_id), true).await?;
        }
        if let Some(k) = key_id.filter(|_| !read_key) {
            self.load(Holder::Key(k), true).await?;
        }
        self.try_reserve(account_id, key, amount).ok_or_else(|| {
            let b = self.lock();
            let over_budget =
                key.is_some_and(|(k, budget)| b.key_available(k, budget).unwrap_or(0) < amount);
            if over_budget {
                GatewayError::KeyBudgetExceeded
            } else {
                GatewayError::InsufficientQuota
            }
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
        if self.leases.is_some() {
            let now = Instant::now();
            if acct
                .window_start
                .is_none_or(|t| now - t >= super::lease::LEASE_WINDOW)
            {
                acct.window_start = Some(now);
                acct.recent = 0;
            }
            acct.recent += charged;
        }
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
        let leased = self.leases.is_some();
        for &(account, budget_key, charged) in &c.charges {
            if let Some(a) = b.accounts.get_mut(&account) {
                a.unflushed -= charged;
                if leased {
                    // The commit moved this node's slice down by the charge.
                    a.stored -= charged;
                }
            }
            if let Some(k) = budget_key.and_then(|k| b.keys.get_mut(&k)) {
                k.unflushed -= charged;
            }
        }
        for &(account, balance) in c.balances.iter().filter(|_| !leased) {
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

    /// Nano-USD reserved by requests in flight, over every account (0 when idle).
    pub fn reserved_total(&self) -> i64 {
        self.lock().accounts.values().map(|p| p.reserved).sum()
    }
}

fn put(entry: Entry<'_, i64, Purse>, stored: i64, overwrite: bool) {
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
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    pub(crate) struct Store {
        balance: AtomicI64,
        spent: AtomicI64,
        account_reads: AtomicUsize,
        key_reads: AtomicUsize,
    }

    #[async_trait]
    impl BalanceSource for Store {
        async fn account_balance(&self, _: i64) -> Result<i64, String> {
            self.account_reads.fetch_add(1, Ordering::SeqCst);
            // A query takes a while: let other requests run meanwhile.
            tokio::task::yield_now().await;
            Ok(self.balance.load(Ordering::SeqCst))
        }
        async fn key_spent(&self, _: i64) -> Result<i64, String> {
            self.key_reads.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Ok(self.spent.load(Ordering::SeqCst))
        }
    }

    fn store(balance: i64, spent: i64) -> Arc<Store> {
        Arc::new(Store {
            balance: AtomicI64::new(balance),
            spent: AtomicI64::new(spent),
            ..Store::default()
        })
    }

    pub(crate) fn wallets(balance: i64) -> (Arc<Store>, Wallets) {
        let s = store(balance, 0);
        (s.clone(), Wallets::new(s))
    }

    /// Sends `n` reservations at once; returns how many were refused for quota.
    /// 200 concurrent refusals for key 7 (budget 1,000): one read to load each purse and
    /// one re-read for a top-up at most, not one per refusal.
    async fn burst_of_refusals(s: &Arc<Store>) -> Arc<Wallets> {
        let w = Arc::new(Wallets::with_reload_interval(
            s.clone(),
            Duration::from_secs(60),
        ));
        assert_eq!(refused_of(&w, 200, Some((7, 1_000))).await, 200);
        assert!(s.account_reads.load(Ordering::SeqCst) <= 2, "{s:?}");
        assert!(s.key_reads.load(Ordering::SeqCst) <= 2, "{s:?}");
        w
    }

    async fn refused_of(w: &Arc<Wallets>, n: usize, key: Option<(i64, i64)>) -> usize {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let w = w.clone();
                tokio::spawn(async move { w.reserve(1, key, 100).await })
            })
            .collect();
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Err(e) if e.code() == Some("insufficient_quota") => refused += 1,
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        refused
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_for_a_broke_account_reload_the_store_at_most_once_per_interval() {
        let s = store(0, 0);
        let w = burst_of_refusals(&s).await;
        // Later refusals in the same interval read nothing.
        let before = s.account_reads.load(Ordering::SeqCst) + s.key_reads.load(Ordering::SeqCst);
        assert_eq!(refused_of(&w, 200, Some((7, 1_000))).await, 200);
        let after = s.account_reads.load(Ordering::SeqCst) + s.key_reads.load(Ordering::SeqCst);
        assert_eq!(after, before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn refusals_over_a_key_budget_reload_its_spend_at_most_once_per_interval() {
        let s = store(1_000_000, 1_000);
        burst_of_refusals(&s).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_top_up_made_elsewhere_is_seen_within_one_reload_interval() {
        let s = store(0, 0);
        let w = Wallets::with_reload_interval(s.clone(), Duration::from_secs(1));
        assert!(w.reserve(1, None, 100).await.is_err()); // loads the account
        assert!(w.reserve(1, None, 100).await.is_err()); // re-reads it
        s.balance.store(500, Ordering::SeqCst);
        // Within the interval the book's amount stands.
        assert!(w.reserve(1, None, 100).await.is_err());
        assert_eq!(s.account_reads.load(Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(w.reserve(1, None, 100).await.is_ok());
        // A top-up through the ledger writer reaches the book at once, interval or not.
        w.committed(&Committed {
            balances: vec![(1, 1_500)],
            ..Committed::default()
        });
        assert_eq!(w.account_available(1), Some(1_400));
    }
}
