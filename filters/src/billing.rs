//! `billing`: price the request, reserve its worst case, settle the real cost, record it.
//!
//! Money is an `i64` of nano-USD everywhere. Prices are configured in USD per 1M tokens and
//! converted once, at start-up, to integer nano-USD per 1M tokens; group multipliers to
//! integer parts-per-million. A cost is then one integer expression, rounded once.
//!
//! Reservations are held in [`Wallets`], an in-process book in front of the store: for each
//! account and key it knows the stored amount, what was settled but not yet written
//! (`unflushed`), and what is reserved. Reserve and settle happen under one lock, so
//! concurrent requests can never together spend more than the account holds. When a
//! reservation does not fit, the book re-reads the store once (a top-up made elsewhere)
//! before refusing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::{Ctx, Filter, GatewayError};

pub const NANO_PER_USD: i64 = 1_000_000_000;
const PPM: i128 = 1_000_000;
const TOKENS_PER_PRICE_UNIT: i128 = 1_000_000;

/// What one model costs, in integer nano-USD.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRate {
    /// nano-USD per 1M prompt tokens.
    pub input: i64,
    /// nano-USD per 1M completion tokens (reasoning tokens are part of these).
    pub output: i64,
    /// nano-USD per 1M cached prompt tokens.
    pub cached_input: i64,
    /// nano-USD per request.
    pub per_request: i64,
    /// Output cap assumed for the worst case when the request sets none.
    pub default_max_output: Option<u64>,
}

/// USD (as configured) → nano-USD. Exact for prices with up to 9 decimals.
pub fn usd_to_nano(usd: f64) -> i64 {
    (usd * NANO_PER_USD as f64).round() as i64
}

impl ModelRate {
    pub fn from_usd(input: f64, output: f64, cached_input: Option<f64>, per_request: f64) -> Self {
        ModelRate {
            input: usd_to_nano(input),
            output: usd_to_nano(output),
            cached_input: usd_to_nano(cached_input.unwrap_or(input)),
            per_request: usd_to_nano(per_request),
            default_max_output: None,
        }
    }
}

/// What to do with a model that has no price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpricedPolicy {
    Reject,
    Free,
}

/// Token counts as the provider reports them (`prompt_tokens` includes `cached_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// Not reported by the provider: estimated by the gateway.
    pub estimated: bool,
}

/// `pricing:` after validation.
#[derive(Debug, Clone)]
pub struct PriceTable {
    pub models: HashMap<String, ModelRate>,
    /// Group → multiplier in parts per million.
    pub groups: HashMap<String, u64>,
    pub unpriced: UnpricedPolicy,
    /// Output cap assumed when neither the request nor the model sets one.
    pub default_max_output: u64,
}

impl PriceTable {
    pub fn multiplier_ppm(&self, group: &str) -> u64 {
        self.groups.get(group).copied().unwrap_or(PPM as u64)
    }

    /// The price of `model`; a `model_map` alias without a price of its own is priced as the
    /// upstream model it maps to. `None` when unpriced models are free; `Err` when refused.
    pub fn rate(
        &self,
        model: &str,
        upstream: Option<&str>,
    ) -> Result<Option<&ModelRate>, GatewayError> {
        let found = self
            .models
            .get(model)
            .or_else(|| upstream.and_then(|m| self.models.get(m)));
        match (found, self.unpriced) {
            (Some(r), _) => Ok(Some(r)),
            (None, UnpricedPolicy::Free) => Ok(None),
            (None, UnpricedPolicy::Reject) => Err(GatewayError::Unpriced(model.to_owned())),
        }
    }

    /// The exact cost of `usage`, rounded half up to the nano-USD.
    pub fn cost(&self, rate: &ModelRate, group: &str, usage: &Usage) -> i64 {
        self.cost_rounded(rate, group, usage, false)
    }

    fn cost_rounded(&self, rate: &ModelRate, group: &str, u: &Usage, ceil: bool) -> i64 {
        let cached = u.cached_tokens.min(u.prompt_tokens) as i128;
        let uncached = u.prompt_tokens as i128 - cached;
        // nano-USD × tokens / 1M: divided out once, at the end, with the multiplier.
        // Saturating throughout: absurd token counts or prices cost the most, never wrap.
        let tokens = (uncached.saturating_mul(rate.input as i128))
            .saturating_add(cached.saturating_mul(rate.cached_input as i128))
            .saturating_add((u.completion_tokens as i128).saturating_mul(rate.output as i128))
            .saturating_add((rate.per_request as i128).saturating_mul(TOKENS_PER_PRICE_UNIT));
        let scaled = tokens.saturating_mul(self.multiplier_ppm(group) as i128);
        let denom = TOKENS_PER_PRICE_UNIT * PPM;
        let q = if ceil {
            scaled.saturating_add(denom - 1) / denom
        } else {
            scaled.saturating_add(denom / 2) / denom
        };
        q.clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    /// The most this request can cost: the prompt estimate in full at the input price, plus
    /// `n ×` the output cap. Rounded up.
    pub fn worst_case(
        &self,
        rate: &ModelRate,
        group: &str,
        prompt_estimate: u64,
        max_output: Option<u64>,
        n: u64,
    ) -> i64 {
        let cap = max_output
            .or(rate.default_max_output)
            .unwrap_or(self.default_max_output);
        let u = Usage {
            prompt_tokens: prompt_estimate,
            completion_tokens: cap.saturating_mul(n.max(1)),
            cached_tokens: 0,
            estimated: true,
        };
        self.cost_rounded(rate, group, &u, true)
    }
}

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

/// One request's ledger row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub request_id: String,
    pub ts_ms: i64,
    pub key_id: i64,
    pub account_id: i64,
    pub model: String,
    pub upstream_model: Option<String>,
    pub channel: Option<String>,
    pub status: u16,
    pub usage: Usage,
    /// What was charged (nano-USD); the balance and key spend move by exactly this.
    pub cost_nano: i64,
    /// The key whose budget purse booked this charge (the key had a budget when reserved).
    pub budget_key: Option<i64>,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub stream: bool,
}

/// Where settled rows go: the server's group-committing writer. Must not block.
pub trait LedgerSink: Send + Sync {
    /// Queues a row. Rows of admitted requests are always accepted, even past the bound.
    fn record(&self, row: LedgerRow);

    /// Whether a new request may be admitted: false while the queue of uncommitted rows is
    /// over its bound. Called once per admission decision (a `false` is counted as a
    /// refusal).
    fn has_room(&self) -> bool {
        true
    }
}

/// The `billing` filter.
pub struct Billing {
    prices: Arc<PriceTable>,
    wallets: Arc<Wallets>,
    ledger: Arc<dyn LedgerSink>,
    /// Channel names by index, for the ledger.
    channels: Vec<String>,
}

impl Billing {
    pub fn new(
        prices: Arc<PriceTable>,
        wallets: Arc<Wallets>,
        ledger: Arc<dyn LedgerSink>,
        channels: Vec<String>,
    ) -> Self {
        Billing {
            prices,
            wallets,
            ledger,
            channels,
        }
    }
}

/// Completion tokens for a response whose usage never came: text bytes / 4, rounded up,
/// never above the request's own cap.
pub fn estimate_completion(text_bytes: u64, cap: Option<u64>, n: u64) -> u64 {
    let est = text_bytes.div_ceil(4);
    match cap {
        Some(c) => est.min(c.saturating_mul(n.max(1))),
        None => est,
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl Filter for Billing {
    fn name(&self) -> &'static str {
        "billing"
    }

    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(key), Some(facts)) = (&ctx.key, &ctx.facts) else {
            return Ok(());
        };
        // A writer that cannot commit (a full disk): admit nothing new, hold no money, so
        // the queue stops growing; what is already admitted is still recorded.
        if !self.ledger.has_room() {
            return Err(GatewayError::LedgerBacklogged);
        }
        let upstream = ctx.route.first().and_then(|a| a.upstream_model.as_deref());
        let Some(rate) = self.prices.rate(&facts.model, upstream)? else {
            return Ok(());
        };
        let worst = self.prices.worst_case(
            rate,
            &key.group,
            facts.prompt_tokens_estimate,
            facts.output_cap(),
            facts.choices,
        );
        let budget = key.budget_nano.map(|b| (key.id, b));
        ctx.reservation = Some(self.wallets.reserve(key.account_id, budget, worst).await?);
        Ok(())
    }

    fn on_abandon(&self, ctx: &mut Ctx) {
        // Nothing is known about what the provider served; free the money rather than hold
        // it until a restart.
        if let Some(r) = ctx.reservation.take() {
            tracing::error!(request_id = %ctx.request_id, "request abandoned; reservation released uncharged");
            self.wallets.settle(&r, 0);
        }
    }

    async fn on_done(&self, ctx: &mut Ctx) {
        let (Some(key), Some(facts)) = (&ctx.key, &ctx.facts) else {
            return;
        };
        let out = &ctx.outcome;
        // Usage as reported; else, if a response was relayed, a bounded estimate.
        // A usage object with nothing in it (an endpoint whose counts we do not know) is no usage.
        let reported = ctx
            .usage
            .filter(|u| u.prompt_tokens > 0 || u.completion_tokens > 0);
        let usage = match (reported, out.status) {
            (Some(u), _) => u,
            (None, 200..=299) => Usage {
                prompt_tokens: facts.prompt_tokens_estimate,
                completion_tokens: estimate_completion(
                    out.completion_text_bytes,
                    facts.output_cap(),
                    facts.choices,
                ),
                cached_tokens: 0,
                estimated: true,
            },
            (None, _) => Usage::default(),
        };
        let cost = match self
            .prices
            .rate(&facts.model, ctx.upstream_model.as_deref())
        {
            Ok(Some(rate)) if usage != Usage::default() => {
                self.prices.cost(rate, &key.group, &usage)
            }
            _ => 0,
        };
        let (charged, budget_key) = match ctx.reservation.take() {
            Some(r) => (self.wallets.settle(&r, cost), r.key_id),
            None => (0, None),
        };
        let upstream_model = ctx.upstream_model.clone();
        self.ledger.record(LedgerRow {
            request_id: ctx.request_id.clone(),
            ts_ms: unix_ms(),
            key_id: key.id,
            account_id: key.account_id,
            model: facts.model.clone(),
            upstream_model,
            channel: out.channel.and_then(|i| self.channels.get(i).cloned()),
            status: out.status,
            usage,
            cost_nano: charged,
            budget_key,
            latency_ms: ctx.started.elapsed().as_millis() as u64,
            ttft_ms: out.first_byte.map(|d| d.as_millis() as u64),
            stream: facts.stream,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    fn table() -> PriceTable {
        let mut models = HashMap::new();
        models.insert(
            "m".to_string(),
            ModelRate::from_usd(0.15, 0.60, Some(0.075), 0.0),
        );
        models.insert(
            "fee".to_string(),
            ModelRate::from_usd(1.0, 2.0, None, 0.001),
        );
        PriceTable {
            models,
            groups: HashMap::from([("default".into(), 1_000_000), ("vip".into(), 500_000)]),
            unpriced: UnpricedPolicy::Reject,
            default_max_output: 4096,
        }
    }

    #[test]
    fn cost_is_exact_integer_nano_usd() {
        let t = table();
        let m = &t.models["m"];
        assert_eq!(m.input, 150_000_000);
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 100,
            cached_tokens: 400,
            estimated: false,
        };
        // 600 × 150 + 400 × 75 + 100 × 600 nano-USD = 90_000 + 30_000 + 60_000
        assert_eq!(t.cost(m, "default", &u), 180_000);
        assert_eq!(t.cost(m, "vip", &u), 90_000);
        assert_eq!(t.cost(m, "unknown-group", &u), 180_000);
        let fee = &t.models["fee"];
        let one = Usage {
            prompt_tokens: 1,
            ..Default::default()
        };
        assert_eq!(t.cost(fee, "default", &one), 1_000 + 1_000_000);
    }

    #[test]
    fn sub_nano_costs_round_half_up_and_worst_case_rounds_up() {
        let mut t = table();
        t.models
            .insert("tiny".into(), ModelRate::from_usd(0.0005, 0.0, None, 0.0)); // 0.5 nano/token
        let r = t.models["tiny"].clone();
        let one = Usage {
            prompt_tokens: 1,
            ..Default::default()
        };
        assert_eq!(t.cost(&r, "default", &one), 1);
        let three = Usage {
            prompt_tokens: 3,
            ..Default::default()
        };
        assert_eq!(t.cost(&r, "default", &three), 2);
        assert_eq!(t.worst_case(&r, "default", 3, Some(0), 1), 2);
    }

    #[test]
    fn worst_case_uses_n_times_the_cap_or_the_default() {
        let t = table();
        let m = &t.models["m"];
        assert_eq!(
            t.worst_case(m, "default", 100, Some(10), 2),
            100 * 150 + 20 * 600
        );
        assert_eq!(t.worst_case(m, "default", 0, None, 1), 4096 * 600);
    }

    #[test]
    fn worst_case_saturates_instead_of_overflowing() {
        let mut t = table();
        // A pricey model with an absurd cap × n: the most money there is, not a wrap.
        t.models
            .insert("pricey".into(), ModelRate::from_usd(1e9, 1e9, None, 1e9));
        t.groups.insert("x10".into(), 10_000_000);
        let r = t.models["pricey"].clone();
        assert_eq!(
            t.worst_case(&r, "x10", u64::MAX, Some(u64::MAX), u64::MAX),
            i64::MAX
        );
        let huge = Usage {
            prompt_tokens: u64::MAX,
            completion_tokens: u64::MAX,
            cached_tokens: 0,
            estimated: false,
        };
        assert_eq!(t.cost(&r, "x10", &huge), i64::MAX);
    }

    #[test]
    fn unpriced_models_are_refused_or_free() {
        let mut t = table();
        assert_eq!(
            t.rate("x", None).unwrap_err().code(),
            Some("model_not_priced")
        );
        assert_eq!(t.rate("alias", Some("m")).unwrap(), Some(&t.models["m"]));
        t.unpriced = UnpricedPolicy::Free;
        assert_eq!(t.rate("x", None).unwrap(), None);
    }

    struct Store {
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

    fn wallets(balance: i64) -> (Arc<Store>, Wallets) {
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

    struct NoLedger;
    impl LedgerSink for NoLedger {
        fn record(&self, _: LedgerRow) {}
    }

    #[tokio::test]
    async fn an_abandoned_request_gives_its_reservation_back() {
        let (_s, w) = wallets(1000);
        let w = Arc::new(w);
        let billing = Billing::new(Arc::new(table()), w.clone(), Arc::new(NoLedger), vec![]);
        let mut ctx = Ctx::new("r".into());
        ctx.reservation = Some(w.reserve(1, None, 700).await.unwrap());
        assert_eq!(w.account_available(1), Some(300));
        billing.on_abandon(&mut ctx);
        assert_eq!(w.account_available(1), Some(1000));
        assert!(ctx.reservation.is_none());
    }

    #[tokio::test]
    async fn embeddings_reserve_their_input_only() {
        let (_s, w) = wallets(1_000_000_000);
        let w = Arc::new(w);
        let t = Arc::new(table());
        let billing = Billing::new(t.clone(), w.clone(), Arc::new(NoLedger), vec![]);
        let body = bytes::Bytes::from_static(br#"{"model":"m","input":"some text to embed"}"#);
        let (_, facts) = crate::RequestBody::parse_for_path("/v1/embeddings", body).unwrap();
        let prompt = facts.prompt_tokens_estimate;
        let mut ctx = Ctx::new("r".into());
        ctx.key = Some(Arc::new(crate::auth::KeyRecord {
            account_id: 1,
            group: "default".into(),
            ..Default::default()
        }));
        ctx.facts = Some(facts);
        billing.on_request_body(&mut ctx).await.unwrap();
        // The prompt at the input price, and no 4096-token output on top.
        let input_only = t.worst_case(&t.models["m"], "default", prompt, Some(0), 1);
        assert_eq!(ctx.reservation.as_ref().unwrap().amount, input_only);
    }

    struct FullLedger;
    impl LedgerSink for FullLedger {
        fn record(&self, _: LedgerRow) {}
        fn has_room(&self) -> bool {
            false
        }
    }

    #[tokio::test]
    async fn a_backlogged_ledger_refuses_new_requests_with_503_before_reserving() {
        let (_s, w) = wallets(1_000_000_000);
        let w = Arc::new(w);
        let billing = Billing::new(Arc::new(table()), w.clone(), Arc::new(FullLedger), vec![]);
        let mut ctx = Ctx::new("r".into());
        ctx.key = Some(Arc::new(crate::auth::KeyRecord {
            account_id: 1,
            ..Default::default()
        }));
        ctx.facts = Some(crate::RequestFacts {
            model: "m".into(),
            ..Default::default()
        });
        let e = billing.on_request_body(&mut ctx).await.unwrap_err();
        assert_eq!(e, GatewayError::LedgerBacklogged);
        assert_eq!((e.status(), e.code()), (503, Some("ledger_backlogged")));
        assert!(e
            .headers()
            .contains(&("x-should-retry", "true".to_string())));
        assert!(e.headers().contains(&("retry-after", "1".to_string())));
        assert!(ctx.reservation.is_none());
    }

    #[test]
    fn completion_estimate_is_bounded_by_the_cap() {
        assert_eq!(estimate_completion(10, None, 1), 3);
        assert_eq!(estimate_completion(10_000, Some(100), 2), 200);
    }
}
