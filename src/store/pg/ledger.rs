//! The ledger writer's commit on PostgreSQL: the same group commit as on SQLite (see
//! `crate::ledger`), as multi-row `INSERT … ON CONFLICT (request_id) DO NOTHING RETURNING
//! request_id`, so that only the rows that took effect move money, in the same transaction
//! as the balance and spend updates.
//!
//! Several gateways may share the database: rows are inserted in request-id order and each
//! account and key is updated once per transaction, in id order, so two writers never wait
//! on each other in a cycle.

use std::collections::{BTreeMap, HashSet};

use postgres::types::ToSql;
use postgres::Client;
use tollgate_filters::billing::{Committed, LedgerRow};

use crate::config::DatabaseConfig;
use crate::store::{now_ms, StoreError};

/// Columns per ledger row in the insert.
const COLS: usize = 17;
/// Rows per `INSERT` statement (PostgreSQL takes at most 65,535 parameters).
const ROWS_PER_INSERT: usize = 500;

/// The writer's own connection, opened again after it breaks (a server restart, a
/// failover): the retry loop then goes on on a fresh one.
pub struct Writer {
    db: DatabaseConfig,
    url: String,
    client: Option<Client>,
}

impl Writer {
    /// Connects now, so that a wrong URL fails the start.
    pub fn connect(db: &DatabaseConfig, url: &str) -> Result<Writer, StoreError> {
        Ok(Writer {
            client: Some(super::connect(db, url)?),
            db: db.clone(),
            url: url.to_string(),
        })
    }

    /// The open connection, reconnecting if it is closed.
    pub fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            self.client = Some(super::connect(&self.db, &self.url)?);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }
}

/// One transaction: the rows, then one balance and one spend update per account and key,
/// each reading back the stored value it leaves.
pub fn commit(
    w: &mut Writer,
    batch: &[LedgerRow],
    lease_node: Option<&str>,
) -> Result<Committed, StoreError> {
    let mut tx = w.client()?.transaction()?;
    // The first row of each request id in the batch is written; a later one is a duplicate
    // and moves no money, as with SQLite's one-by-one `INSERT OR IGNORE`.
    let mut seen = HashSet::new();
    let mut firsts: Vec<&LedgerRow> = batch
        .iter()
        .filter(|r| seen.insert(r.request_id.as_str()))
        .collect();
    // Inserted in request-id order: two nodes writing the same ids (a retried request
    // answered by both) then wait on each other in one order and never deadlock.
    firsts.sort_unstable_by(|a, b| a.request_id.cmp(&b.request_id));
    let mut took = HashSet::new();
    for chunk in firsts.chunks(ROWS_PER_INSERT) {
        let vals: Vec<Values> = chunk.iter().map(|r| values(r)).collect();
        let mut p: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(chunk.len() * COLS);
        for (r, v) in chunk.iter().zip(&vals) {
            p.extend_from_slice(&[
                &r.request_id,
                &r.ts_ms,
                &r.key_id,
                &r.account_id,
                &r.model,
                &r.upstream_model,
                &r.channel,
                &v.status,
                &v.prompt,
                &v.completion,
                &v.cached,
                &r.cost_nano,
                &v.latency,
                &v.ttft,
                &v.stream,
                &v.estimated,
                &v.cache_hit,
            ]);
        }
        for r in tx.query(&insert_sql(chunk.len()), &p)? {
            took.insert(r.get::<_, String>(0));
        }
    }
    let mut out = Committed::default();
    let mut by_account: BTreeMap<i64, i64> = BTreeMap::new();
    let mut by_key: BTreeMap<i64, i64> = BTreeMap::new();
    let mut moved = HashSet::new();
    for r in batch {
        if r.cost_nano == 0 {
            continue;
        }
        // The book's unflushed charge is released either way; a duplicate request id
        // moves no money.
        out.charges.push((r.account_id, r.budget_key, r.cost_nano));
        if took.contains(&r.request_id) && moved.insert(r.request_id.as_str()) {
            *by_account.entry(r.account_id).or_default() += r.cost_nano;
            *by_key.entry(r.key_id).or_default() += r.cost_nano;
        }
    }
    let now = now_ms();
    if !by_account.is_empty() {
        let debit = tx.prepare(
            "UPDATE accounts SET balance_nano = GREATEST(balance_nano - $1, 0),
               leased_nano = GREATEST(leased_nano - $4, 0), updated_at = $2
             WHERE id = $3 RETURNING balance_nano",
        )?;
        let slice = tx.prepare(
            "UPDATE account_leases SET amount_nano = GREATEST(amount_nano - $1, 0)
             WHERE account_id = $2 AND node = $3",
        )?;
        for (account, charged) in by_account {
            let leased = if lease_node.is_some() { charged } else { 0 };
            let balance: i64 = tx
                .query_one(&debit, &[&charged, &now, &account, &leased])?
                .get(0);
            out.balances.push((account, balance));
            if let Some(node) = lease_node {
                tx.execute(&slice, &[&charged, &account, &node])?;
            }
        }
    }
    if !by_key.is_empty() {
        let spend = tx.prepare(
            "UPDATE api_keys SET spent_nano = spent_nano + $1 WHERE id = $2 RETURNING spent_nano",
        )?;
        for (key, charged) in by_key {
            let spent: i64 = tx.query_one(&spend, &[&charged, &key])?.get(0);
            out.spends.push((key, spent));
        }
    }
    tx.commit()?;
    Ok(out)
}

/// `INSERT … VALUES ($1…$17), … ON CONFLICT DO NOTHING RETURNING request_id` for `n` rows.
fn insert_sql(n: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO usage_ledger (request_id, ts, key_id, account_id, model, upstream_model, channel, status,
           prompt_tokens, completion_tokens, cached_tokens, cost_nano, latency_ms, ttft_ms, stream, estimated, cache_hit)
         VALUES ",
    );
    for row in 0..n {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..COLS {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(itoa::Buffer::new().format(row * COLS + col + 1));
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (request_id) DO NOTHING RETURNING request_id");
    sql
}

/// One row's values, typed as the `BIGINT` and `TEXT` columns take them.
struct Values {
    status: i64,
    prompt: i64,
    completion: i64,
    cached: i64,
    latency: i64,
    ttft: Option<i64>,
    stream: i64,
    estimated: i64,
    cache_hit: i64,
}

fn values(r: &LedgerRow) -> Values {
    Values {
        status: i64::from(r.status),
        prompt: r.usage.prompt_tokens as i64,
        completion: r.usage.completion_tokens as i64,
        cached: r.usage.cached_tokens as i64,
        latency: r.latency_ms as i64,
        ttft: r.ttft_ms.map(|t| t as i64),
        stream: i64::from(r.stream),
        estimated: i64::from(r.usage.estimated),
        cache_hit: i64::from(r.cache_hit),
    }
}
