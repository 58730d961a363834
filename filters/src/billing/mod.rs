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
//! reservation does not fit, the book re-reads the store (a top-up made elsewhere) before
//! refusing, at most once per account and per key budget per reload interval.

mod book;
pub mod lease;
mod meter;
mod price;

use std::sync::Arc;

use async_trait::async_trait;

use crate::chain::Phases;
use crate::channel::Channels;
use crate::{Ctx, Filter, GatewayError};

pub use book::{BalanceSource, Committed, Reservation, Wallets, DEFAULT_RELOAD_INTERVAL};
pub use lease::AccountLeases;
pub use meter::{Held, Meter};
pub use price::{usd_to_nano, ModelRate, PriceTable, UnpricedPolicy, Usage, NANO_PER_USD};

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
    /// Answered from the response cache (`cost_nano` follows `cache.responses.bill`).
    pub cache_hit: bool,
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
    /// The channel table, for the ledger's channel name.
    channels: Channels,
}

impl Billing {
    pub fn new(
        prices: Arc<PriceTable>,
        wallets: Arc<Wallets>,
        ledger: Arc<dyn LedgerSink>,
        channels: Channels,
    ) -> Self {
        Billing {
            prices,
            wallets,
            ledger,
            channels,
        }
    }

    /// A cache hit: the stored usage at the full price, times the bill policy's share
    /// (rounded half up, see [`crate::cache::BillPolicy::apply`]).
    fn hit_cost(&self, rate: &ModelRate, group: &str, hit: &crate::CacheHit) -> i64 {
        let full = self.prices.cost(rate, group, &hit.usage);
        crate::cache::BillPolicy { ppm: hit.bill_ppm }.apply(full)
    }
}

/// Whether the request is charged by its units (it asks for some, and the model has unit
/// prices) rather than its tokens.
fn units_priced(rate: &ModelRate, facts: &crate::RequestFacts) -> bool {
    facts.units != crate::request::Units::default() && PriceTable::prices_units(rate)
}

/// The upstream model a cache hit is priced as: the first planned channel's (a hit never
/// reaches one, but a `model_map` alias is priced as what it maps to).
fn hit_upstream(ctx: &Ctx) -> Option<&str> {
    ctx.plan.first().and_then(|a| a.upstream_model.as_deref())
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

    fn phases(&self) -> Phases {
        Phases::REQUEST_BODY | Phases::DONE | Phases::ABANDON
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
        // A cache hit's price is known exactly: its stored usage by the bill policy.
        if let Some(hit) = &ctx.cache_hit {
            let cost = match self.prices.rate(&facts.model, hit_upstream(ctx))? {
                Some(rate) => self.hit_cost(rate, &key.group, hit),
                None => 0,
            };
            if cost > 0 {
                let budget = key.budget_nano.map(|b| (key.id, b));
                ctx.reservation = Some(self.wallets.reserve(key.account_id, budget, cost).await?);
            }
            return Ok(());
        }
        // Any planned channel may serve the request, and `model_map` may send each a
        // different model: reserve for the dearest.
        let mut worst = None;
        let unplanned = ctx.plan.is_empty().then_some(None);
        let planned = ctx.plan.iter().map(|a| a.upstream_model.as_deref());
        for upstream in unplanned.into_iter().chain(planned) {
            let Some(rate) = self.prices.rate(&facts.model, upstream)? else {
                continue;
            };
            let cost = if units_priced(rate, facts) {
                self.prices.unit_cost(rate, &key.group, &facts.units, true)
            } else {
                self.prices.worst_case(
                    rate,
                    &key.group,
                    facts.prompt_tokens_estimate,
                    facts.output_cap(),
                    facts.choices,
                )
            };
            worst = worst.max(Some(cost));
        }
        let Some(worst) = worst else {
            return Ok(());
        };
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
        let usage = ctx.settlement.usage;
        let upstream = match ctx.cache_hit {
            Some(_) => hit_upstream(ctx),
            None => ctx.upstream_model.as_deref(),
        };
        let cost = match self.prices.rate(&facts.model, upstream) {
            // Images, audio seconds, characters: charged once served, by the units asked
            // for (audio by the seconds the provider reports, when it does).
            Ok(Some(rate)) if units_priced(rate, facts) => match ctx.settlement.served {
                true => {
                    let mut units = facts.units.clone();
                    if let Some(s) = ctx.usage.audio_seconds.filter(|_| units.audio_seconds > 0) {
                        units.audio_seconds = s;
                    }
                    self.prices.cost_of_units(rate, &key.group, &units)
                }
                false => 0,
            },
            Ok(Some(rate)) if usage != Usage::default() => match &ctx.cache_hit {
                Some(hit) => self.hit_cost(rate, &key.group, hit),
                None => self.prices.cost(rate, &key.group, &usage),
            },
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
            channel: out
                .channel
                .and_then(|i| self.channels.get(i).map(|c| c.name.clone())),
            status: out.status,
            usage,
            cost_nano: charged,
            budget_key,
            latency_ms: ctx.started.elapsed().as_millis() as u64,
            ttft_ms: out.first_byte.map(|d| d.as_millis() as u64),
            stream: facts.stream,
            cache_hit: ctx.cache_hit.is_some(),
        });
        ctx.charged_nano = Some(charged);
    }
}

#[cfg(test)]
mod tests {
    use super::book::tests::wallets;
    use super::price::tests::table;
    use super::*;

    struct NoLedger;
    impl LedgerSink for NoLedger {
        fn record(&self, _: LedgerRow) {}
    }

    #[tokio::test]
    async fn an_abandoned_request_gives_its_reservation_back() {
        let (_s, w) = wallets(1000);
        let w = Arc::new(w);
        let billing = Billing::new(
            Arc::new(table()),
            w.clone(),
            Arc::new(NoLedger),
            Arc::from(Vec::<crate::channel::Channel>::new()),
        );
        let mut ctx = Ctx::new("r".into());
        ctx.reservation = Some(w.reserve(1, None, 700).await.unwrap());
        assert_eq!(w.account_available(1), Some(300));
        billing.on_abandon(&mut ctx);
        assert_eq!(w.account_available(1), Some(1000));
        assert!(ctx.reservation.is_none());
    }

    #[test]
    fn completion_estimate_is_bounded_by_the_cap() {
        assert_eq!(estimate_completion(10, None, 1), 3);
        assert_eq!(estimate_completion(10_000, Some(100), 2), 200);
    }

    #[tokio::test]
    async fn embeddings_reserve_their_input_only() {
        let (_s, w) = wallets(1_000_000_000);
        let w = Arc::new(w);
        let t = Arc::new(table());
        let billing = Billing::new(t.clone(), w.clone(), Arc::new(NoLedger), no_channels());
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
        let billing = Billing::new(
            Arc::new(table()),
            w.clone(),
            Arc::new(FullLedger),
            no_channels(),
        );
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

    fn no_channels() -> crate::channel::Channels {
        Arc::from(Vec::<crate::channel::Channel>::new())
    }
}
