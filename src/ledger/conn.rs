//! The ledger writer's connection, SQLite or PostgreSQL, and its SQLite commit (the
//! PostgreSQL one is `store::pg::ledger`).

use std::collections::HashMap;

use rusqlite::{params, Connection, TransactionBehavior};
use tollgate_filters::billing::{Committed, LedgerRow};

use crate::config::DatabaseConfig;
use crate::store::{self, accounts, pg, StoreError};

/// The writer's own connection.
pub enum WriterConn {
    Sqlite(Connection),
    /// Boxed: it carries its config to reconnect with.
    Postgres(Box<pg::ledger::Writer>),
}

impl WriterConn {
    /// Opens a connection to the configured store.
    pub fn open(db: &DatabaseConfig) -> Result<WriterConn, StoreError> {
        Ok(match db.postgres_url() {
            Some(url) => WriterConn::Postgres(Box::new(pg::ledger::Writer::connect(db, url)?)),
            None => WriterConn::Sqlite(store::open_connection(db)?),
        })
    }

    /// Commits a batch. `lease_node`: in lease mode, the node whose slices the charges come
    /// out of (they move with the balance, in the same transaction).
    pub(super) fn commit(
        &mut self,
        batch: &[LedgerRow],
        lease_node: Option<&str>,
    ) -> Result<Committed, StoreError> {
        match self {
            WriterConn::Sqlite(c) => Ok(commit(c, batch, lease_node)?),
            WriterConn::Postgres(w) => pg::ledger::commit(w, batch, lease_node),
        }
    }

    pub(super) fn topup(
        &mut self,
        account: &str,
        delta_nano: i64,
    ) -> Result<accounts::Account, StoreError> {
        match self {
            WriterConn::Sqlite(c) => accounts::topup_on(c, account, delta_nano),
            WriterConn::Postgres(w) => pg::accounts::topup_on(w.client()?, account, delta_nano),
        }
    }
}

/// One SQLite transaction: the rows, then one balance and one spend update per account and
/// key, each reading back the stored value it leaves.
fn commit(
    conn: &mut Connection,
    batch: &[LedgerRow],
    lease_node: Option<&str>,
) -> Result<Committed, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Committed::default();
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO usage_ledger (request_id, ts, key_id, account_id, model, upstream_model, channel, status,
               prompt_tokens, completion_tokens, cached_tokens, cost_nano, latency_ms, ttft_ms, stream, estimated, cache_hit)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        )?;
        let mut by_account: HashMap<i64, i64> = HashMap::new();
        let mut by_key: HashMap<i64, i64> = HashMap::new();
        for r in batch {
            let n = insert.execute(params![
                r.request_id,
                r.ts_ms,
                r.key_id,
                r.account_id,
                r.model,
                r.upstream_model,
                r.channel,
                r.status,
                r.usage.prompt_tokens as i64,
                r.usage.completion_tokens as i64,
                r.usage.cached_tokens as i64,
                r.cost_nano,
                r.latency_ms as i64,
                r.ttft_ms.map(|t| t as i64),
                r.stream,
                r.usage.estimated,
                r.cache_hit,
            ])?;
            if r.cost_nano == 0 {
                continue;
            }
            // The book's unflushed charge is released either way; a duplicate request id
            // moves no money.
            out.charges.push((r.account_id, r.budget_key, r.cost_nano));
            if n == 1 {
                *by_account.entry(r.account_id).or_default() += r.cost_nano;
                *by_key.entry(r.key_id).or_default() += r.cost_nano;
            }
        }
        let now = store::now_ms();
        let mut debit = tx.prepare_cached(
            "UPDATE accounts SET balance_nano = MAX(balance_nano - ?1, 0),
               leased_nano = MAX(leased_nano - ?4, 0), updated_at = ?2 WHERE id = ?3
             RETURNING balance_nano",
        )?;
        let mut slice = tx.prepare_cached(
            "UPDATE account_leases SET amount_nano = MAX(amount_nano - ?1, 0)
             WHERE account_id = ?2 AND node = ?3",
        )?;
        for (account, charged) in by_account {
            let leased = if lease_node.is_some() { charged } else { 0 };
            let balance: i64 =
                debit.query_row(params![charged, now, account, leased], |r| r.get(0))?;
            out.balances.push((account, balance));
            if let Some(node) = lease_node {
                slice.execute(params![charged, account, node])?;
            }
        }
        let mut spend = tx.prepare_cached(
            "UPDATE api_keys SET spent_nano = spent_nano + ?1 WHERE id = ?2 RETURNING spent_nano",
        )?;
        for (key, charged) in by_key {
            let spent: i64 = spend.query_row(params![charged, key], |r| r.get(0))?;
            out.spends.push((key, spent));
        }
    }
    tx.commit()?;
    Ok(out)
}
