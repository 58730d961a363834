//! Billing by the response within one long exchange: a Realtime session holds many
//! responses, each reserved up front and settled from its own usage into its own ledger row
//! (`{request id}.{n}`), as a request is. The exchange's own row (the session) carries
//! nothing: the money moves with the responses.

use std::sync::Arc;
use std::time::Instant;

use super::{Billing, LedgerRow, LedgerSink, ModelRate, PriceTable, Reservation, Usage, Wallets};
use crate::auth::KeyRecord;
use crate::{Ctx, GatewayError};

/// Reserves and settles responses for one session.
pub struct Meter {
    prices: Arc<PriceTable>,
    wallets: Arc<Wallets>,
    ledger: Arc<dyn LedgerSink>,
    key: Arc<KeyRecord>,
    model: String,
    upstream_model: Option<String>,
    channel: Option<String>,
    request_id: String,
    /// Responses settled so far.
    settled: u32,
}

/// One response's hold on the money, from its start to its settlement.
#[derive(Debug)]
pub struct Held {
    reservation: Option<Reservation>,
    started: Instant,
}

impl Billing {
    /// The meter for the exchange `ctx` committed to (its key, model and channel).
    pub fn meter(&self, ctx: &Ctx) -> Option<Meter> {
        let key = ctx.key.clone()?;
        let model = ctx.model()?.to_owned();
        Some(Meter {
            prices: self.prices.clone(),
            wallets: self.wallets.clone(),
            ledger: self.ledger.clone(),
            key,
            model,
            upstream_model: ctx.upstream_model.clone(),
            channel: ctx
                .outcome
                .channel
                .and_then(|i| self.channels.get(i).map(|c| c.name.clone())),
            request_id: ctx.request_id.clone(),
            settled: 0,
        })
    }
}

impl Meter {
    /// The output cap a response is reserved for: its own, else the model's default, else
    /// the price table's.
    pub fn output_cap(&self, max_output: Option<u64>) -> u64 {
        let model_default = self
            .rate()
            .ok()
            .flatten()
            .and_then(|r| r.default_max_output);
        max_output
            .or(model_default)
            .unwrap_or(self.prices.default_max_output)
    }

    fn rate(&self) -> Result<Option<&ModelRate>, GatewayError> {
        self.prices
            .rate(&self.model, self.upstream_model.as_deref())
    }

    /// Holds the worst case of one response: `prompt_estimate` tokens in and `max_output`
    /// out, each at the dearer of the text and audio rates. Refused as a request would be
    /// (`InsufficientQuota`, `KeyBudgetExceeded`, `LedgerBacklogged`).
    pub async fn reserve(
        &self,
        prompt_estimate: u64,
        max_output: Option<u64>,
    ) -> Result<Held, GatewayError> {
        if !self.ledger.has_room() {
            return Err(GatewayError::LedgerBacklogged);
        }
        let started = Instant::now();
        let Some(rate) = self.rate()? else {
            return Ok(Held {
                reservation: None,
                started,
            });
        };
        let dearest = ModelRate {
            input: rate.input.max(rate.audio_input),
            output: rate.output.max(rate.audio_output),
            ..rate.clone()
        };
        let worst =
            self.prices
                .worst_case(&dearest, &self.key.group, prompt_estimate, max_output, 1);
        let budget = self.key.budget_nano.map(|b| (self.key.id, b));
        let reservation = self
            .wallets
            .reserve(self.key.account_id, budget, worst)
            .await?;
        Ok(Held {
            reservation: Some(reservation),
            started,
        })
    }

    /// Settles a response from its reported usage (none: it cost nothing, e.g. cancelled
    /// before any output) and records its ledger row. Returns what was charged.
    pub fn settle(&mut self, held: Held, usage: Option<Usage>) -> i64 {
        self.settled += 1;
        let usage = usage.unwrap_or_default();
        let cost = match self.rate() {
            Ok(Some(rate)) if usage != Usage::default() => {
                self.prices.cost(rate, &self.key.group, &usage)
            }
            _ => 0,
        };
        let (charged, budget_key) = match &held.reservation {
            Some(r) => (self.wallets.settle(r, cost), r.key_id),
            None => (0, None),
        };
        self.ledger.record(LedgerRow {
            request_id: format!("{}.{}", self.request_id, self.settled),
            ts_ms: super::unix_ms(),
            key_id: self.key.id,
            account_id: self.key.account_id,
            model: self.model.clone(),
            upstream_model: self.upstream_model.clone(),
            channel: self.channel.clone(),
            status: 200,
            usage,
            cost_nano: charged,
            budget_key,
            latency_ms: held.started.elapsed().as_millis() as u64,
            ttft_ms: None,
            stream: true,
            cache_hit: false,
        });
        charged
    }

    /// A response that will never be settled (the session ended first): its money back.
    pub fn release(&self, held: Held) {
        if let Some(r) = &held.reservation {
            self.wallets.settle(r, 0);
        }
    }

    /// Responses settled so far.
    pub fn responses(&self) -> u32 {
        self.settled
    }
}

#[cfg(test)]
mod tests {
    use super::super::book::tests::wallets;
    use super::super::price::tests::table;
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Rows(Mutex<Vec<LedgerRow>>);
    impl LedgerSink for Rows {
        fn record(&self, row: LedgerRow) {
            self.0.lock().unwrap().push(row);
        }
    }

    fn key() -> Arc<KeyRecord> {
        Arc::new(KeyRecord {
            id: 1,
            account_id: 1,
            group: "default".into(),
            ..KeyRecord::default()
        })
    }

    #[tokio::test]
    async fn each_response_is_reserved_settled_and_recorded_on_its_own_row() {
        let (_s, w) = wallets(1_000_000);
        let w = Arc::new(w);
        let rows = Arc::new(Rows::default());
        let billing = Billing::new(
            Arc::new(table()),
            w.clone(),
            rows.clone(),
            Arc::from(Vec::<crate::channel::Channel>::new()),
        );
        let mut ctx = Ctx::new("req_1".into());
        ctx.key = Some(key());
        ctx.facts = Some(crate::RequestFacts {
            model: "m".into(),
            ..Default::default()
        });
        let mut meter = billing.meter(&ctx).unwrap();
        // m: 150 nano-USD per 1k prompt tokens … worst case 100 in + 1000 out.
        let held = meter.reserve(100, Some(1000)).await.unwrap();
        assert!(w.account_available(1).unwrap() < 1_000_000);
        let usage = Usage {
            prompt_tokens: 100,
            completion_tokens: 10,
            ..Usage::default()
        };
        let charged = meter.settle(held, Some(usage));
        assert_eq!(charged, 100 * 150 + 10 * 600);
        assert_eq!(w.account_available(1), Some(1_000_000 - charged));
        let held = meter.reserve(10, Some(10)).await.unwrap();
        assert_eq!(meter.settle(held, None), 0);
        let held = meter.reserve(10, Some(10)).await.unwrap();
        meter.release(held);
        assert_eq!(w.account_available(1), Some(1_000_000 - charged));
        let recorded: Vec<(String, i64)> = rows
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| (r.request_id.clone(), r.cost_nano))
            .collect();
        assert_eq!(
            recorded,
            [("req_1.1".to_owned(), charged), ("req_1.2".to_owned(), 0)]
        );
        // Out of money: refused like a request.
        assert_eq!(
            meter.reserve(1_000_000_000, Some(1)).await.unwrap_err(),
            GatewayError::InsufficientQuota
        );
    }
}
