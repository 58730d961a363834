//! API keys on PostgreSQL: the statements of `store::keys` in this dialect. Validation, the
//! secret and the JSON columns are made once in `store::keys`; only SQL lives here.

use std::collections::BTreeMap;

use postgres::Row;
use tollgate_filters::auth::{KeyHash, KeyRecord};
use tollgate_filters::limits::LimitSet;

use super::{opt_u32, opt_u8, params, refs, PgPool};
use crate::store::keys::{KeyInfo, KeyRow, INFO_COLS};
use crate::store::{now_ms, StoreError};

/// A JSON list column (`models`, `allow_ips`); an unreadable value reads as empty.
fn json_list(r: &Row, idx: usize) -> Vec<String> {
    serde_json::from_str(r.get::<_, &str>(idx)).unwrap_or_default()
}

/// The `model_limits` column; an unreadable value reads as empty.
fn model_limits(r: &Row, idx: usize) -> BTreeMap<String, LimitSet> {
    serde_json::from_str(r.get::<_, &str>(idx)).unwrap_or_default()
}

fn info_row(r: &Row) -> KeyInfo {
    KeyInfo {
        id: r.get(0),
        account: r.get(1),
        name: r.get(2),
        prefix: r.get(3),
        revoked: r.get(4),
        expires_at: r.get(5),
        budget_nano: r.get(6),
        spent_nano: r.get(7),
        models: json_list(r, 8),
        allow_ips: json_list(r, 9),
        rpm: opt_u32(r.get(10)),
        tpm: opt_u32(r.get(11)),
        concurrency: opt_u32(r.get(12)),
        created_at: r.get(13),
        priority: opt_u8(r.get(14)),
        max_priority: opt_u8(r.get(15)),
        model_limits: model_limits(r, 16),
    }
}

/// Inserts a key for `k.account`; returns its id.
pub(in crate::store) fn insert(pool: &PgPool, k: &KeyRow<'_>) -> Result<i64, StoreError> {
    let row = pool.get()?.query_opt(
        "INSERT INTO api_keys(account_id, name, prefix, hash, expires_at, budget_nano, models, allow_ips, rpm, tpm, concurrency, created_at, priority, max_priority, model_limits)
         SELECT id, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15 FROM accounts WHERE name = $1
         RETURNING id",
        &[
            &k.account, &k.name, &k.prefix, &&k.hash[..], &k.expires_at, &k.budget_nano,
            &k.models, &k.allow_ips, &k.rpm, &k.tpm, &k.concurrency, &k.created_at,
            &k.priority, &k.max_priority, &k.model_limits,
        ],
    )?;
    row.map(|r| r.get(0))
        .ok_or_else(|| StoreError::NotFound(format!("no account named `{}`", k.account)))
}

pub fn get(pool: &PgPool, id: i64) -> Result<KeyInfo, StoreError> {
    pool.get()?
        .query_opt(
            &format!("SELECT {INFO_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = $1"),
            &[&id],
        )?
        .map(|r| info_row(&r))
        .ok_or_else(|| StoreError::NotFound(format!("no key with id {id}")))
}

pub fn list(pool: &PgPool, account: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
    Ok(pool
        .get()?
        .query(
            &format!(
                "SELECT {INFO_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id
                 WHERE $1::TEXT IS NULL OR a.name = $1 ORDER BY k.id"
            ),
            &[&account],
        )?
        .iter()
        .map(info_row)
        .collect())
}

/// The key's id, and how many rows the revoke changed.
pub fn revoke(pool: &PgPool, id_or_prefix: &str) -> Result<(i64, u64), StoreError> {
    let mut c = pool.get()?;
    let id: i64 = match id_or_prefix.parse::<i64>() {
        Ok(id) => id,
        Err(_) => c
            .query_opt(
                "SELECT id FROM api_keys WHERE prefix = $1",
                &[&id_or_prefix],
            )?
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::NotFound(format!("no key `{id_or_prefix}`")))?,
    };
    let n = c.execute(
        "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        &[&now_ms(), &id],
    )?;
    Ok((id, n))
}

/// `UPDATE api_keys SET …` with the columns of a checked patch; returns the rows changed.
pub fn update(
    pool: &PgPool,
    id: i64,
    sets: Vec<(&'static str, rusqlite::types::Value)>,
) -> Result<u64, StoreError> {
    let (cols, mut args): (Vec<&str>, Vec<_>) = sets.into_iter().unzip();
    let assigns: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, col)| format!("{col} = ${}", i + 1))
        .collect();
    args.push(rusqlite::types::Value::Integer(id));
    let sql = format!(
        "UPDATE api_keys SET {} WHERE id = ${}",
        assigns.join(", "),
        args.len()
    );
    let p = params(&args);
    Ok(pool.get()?.execute(&sql, &refs(&p))?)
}

/// The request-path lookup: the key with this hash, with its account.
pub fn find_by_hash(pool: &PgPool, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
    let mut c = pool.get()?;
    let st = c.prepare(
        "SELECT k.id, k.account_id, a.name, a.grp, k.name, k.prefix, k.revoked_at IS NOT NULL, k.expires_at,
                k.models, k.allow_ips, k.rpm, k.tpm, k.concurrency, k.budget_nano,
                k.priority, k.max_priority, k.model_limits
         FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.hash = $1",
    )?;
    let rec = c.query_opt(&st, &[&&hash[..]])?.map(|r| KeyRecord {
        id: r.get(0),
        account_id: r.get(1),
        account: r.get(2),
        group: r.get(3),
        name: r.get(4),
        prefix: r.get(5),
        revoked: r.get(6),
        // Stored in ms like every other timestamp; the filter works in seconds.
        expires_at: r.get::<_, Option<i64>>(7).map(|ms| ms.div_euclid(1000)),
        models: json_list(&r, 8),
        allow_ips: json_list(&r, 9)
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        rpm: opt_u32(r.get(10)),
        tpm: opt_u32(r.get(11)),
        concurrency: opt_u32(r.get(12)),
        budget_nano: r.get(13),
        priority: opt_u8(r.get(14)),
        max_priority: opt_u8(r.get(15)),
        model_limits: model_limits(&r, 16).into_iter().collect(),
    });
    Ok(rec)
}
