//! API keys. The secret (`sk-tg-…`) is shown once at creation; only its SHA-256 and a short
//! display prefix are stored.

use std::collections::BTreeMap;

use ipnet::IpNet;
use rand::distr::{Alphanumeric, SampleString};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use tollgate_filters::auth::{hash_secret, KeyHash, KeyRecord};
use tollgate_filters::limits::LimitSet;

use super::{now_ms, pg, Pool, Store, StoreError};

/// What `keys create` accepts (the CLI flags and the admin API fields).
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub account: String,
    pub name: String,
    pub budget_nano: Option<i64>,
    pub models: Vec<String>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrency: Option<u32>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    pub allow_ips: Vec<IpNet>,
    /// Queue priority 0–9, and the highest a client may ask for.
    pub priority: Option<u8>,
    pub max_priority: Option<u8>,
    /// Limits per model.
    pub model_limits: BTreeMap<String, LimitSet>,
}

/// A key as listed: everything but the secret.
#[derive(Debug, Clone, Serialize)]
pub struct KeyInfo {
    pub id: i64,
    pub account: String,
    pub name: String,
    pub prefix: String,
    pub revoked: bool,
    pub expires_at: Option<i64>,
    pub budget_nano: Option<i64>,
    pub spent_nano: i64,
    pub models: Vec<String>,
    pub allow_ips: Vec<String>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrency: Option<u32>,
    pub created_at: i64,
    pub priority: Option<u8>,
    pub max_priority: Option<u8>,
    pub model_limits: BTreeMap<String, LimitSet>,
}

const SECRET_PREFIX: &str = "sk-tg-";
const PREFIX_LEN: usize = SECRET_PREFIX.len() + 6;

/// Creates a key; returns its info and the secret, which is never stored.
/// A priority outside 0–9 is refused.
fn check_priority(p: Option<u8>) -> Result<(), StoreError> {
    if p.is_some_and(|p| p > tollgate_filters::queue::MAX_PRIORITY) {
        return Err(StoreError::Invalid("priority must be 0 to 9".into()));
    }
    Ok(())
}

fn model_limits_json(m: &BTreeMap<String, LimitSet>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".into())
}

/// A new key's columns as stored, the same on both backends.
pub(super) struct KeyRow<'a> {
    pub account: &'a str,
    pub name: &'a str,
    pub prefix: String,
    pub hash: KeyHash,
    pub expires_at: Option<i64>,
    pub budget_nano: Option<i64>,
    pub models: String,
    pub allow_ips: String,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub concurrency: Option<i64>,
    pub created_at: i64,
    pub priority: Option<i64>,
    pub max_priority: Option<i64>,
    pub model_limits: String,
}

pub fn create(store: &Store, new: &NewKey) -> Result<(KeyInfo, String), StoreError> {
    if new.budget_nano.is_some_and(|b| b < 0) {
        return Err(StoreError::Invalid("budget must not be negative".into()));
    }
    check_priority(new.priority)?;
    check_priority(new.max_priority)?;
    let secret = format!(
        "{SECRET_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 40)
    );
    let ips: Vec<String> = new.allow_ips.iter().map(|n| n.to_string()).collect();
    let row = KeyRow {
        account: &new.account,
        name: &new.name,
        prefix: secret[..PREFIX_LEN].to_string(),
        hash: hash_secret(&secret),
        expires_at: new.expires_at,
        budget_nano: new.budget_nano,
        models: serde_json::to_string(&new.models).unwrap_or_else(|_| "[]".into()),
        allow_ips: serde_json::to_string(&ips).unwrap_or_else(|_| "[]".into()),
        rpm: new.rpm.map(i64::from),
        tpm: new.tpm.map(i64::from),
        concurrency: new.concurrency.map(i64::from),
        created_at: now_ms(),
        priority: new.priority.map(i64::from),
        max_priority: new.max_priority.map(i64::from),
        model_limits: model_limits_json(&new.model_limits),
    };
    let id = match store {
        Store::Sqlite(pool) => insert_sqlite(pool, &row)?,
        Store::Postgres(pool) => pg::keys::insert(pool, &row)?,
    };
    let info = get(store, id)?;
    Ok((info, secret))
}

fn no_account(name: &str) -> StoreError {
    StoreError::NotFound(format!("no account named `{name}`"))
}

fn insert_sqlite(pool: &Pool, k: &KeyRow<'_>) -> Result<i64, StoreError> {
    let c = pool.get()?;
    let account_id: i64 = c
        .query_row(
            "SELECT id FROM accounts WHERE name = ?1",
            [k.account],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| no_account(k.account))?;
    c.execute(
        "INSERT INTO api_keys(account_id, name, prefix, hash, expires_at, budget_nano, models, allow_ips, rpm, tpm, concurrency, created_at, priority, max_priority, model_limits)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            account_id, k.name, k.prefix, &k.hash[..], k.expires_at, k.budget_nano, k.models,
            k.allow_ips, k.rpm, k.tpm, k.concurrency, k.created_at, k.priority, k.max_priority,
            k.model_limits
        ],
    )?;
    Ok(c.last_insert_rowid())
}

pub(super) const INFO_COLS: &str =
    "k.id, a.name, k.name, k.prefix, k.revoked_at IS NOT NULL, k.expires_at, k.budget_nano, \
     k.spent_nano, k.models, k.allow_ips, k.rpm, k.tpm, k.concurrency, k.created_at, \
     k.priority, k.max_priority, k.model_limits";

/// The `model_limits` column; an unreadable value reads as empty.
fn model_limits_col(
    r: &rusqlite::Row<'_>,
    idx: usize,
) -> rusqlite::Result<BTreeMap<String, LimitSet>> {
    Ok(serde_json::from_str(&r.get::<_, String>(idx)?).unwrap_or_default())
}

/// A JSON list column (`models`, `allow_ips`); an unreadable value reads as empty.
fn json_list(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<Vec<String>> {
    Ok(serde_json::from_str(&r.get::<_, String>(idx)?).unwrap_or_default())
}

fn info_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0)?,
        account: r.get(1)?,
        name: r.get(2)?,
        prefix: r.get(3)?,
        revoked: r.get(4)?,
        expires_at: r.get(5)?,
        budget_nano: r.get(6)?,
        spent_nano: r.get(7)?,
        models: json_list(r, 8)?,
        allow_ips: json_list(r, 9)?,
        rpm: r.get(10)?,
        tpm: r.get(11)?,
        concurrency: r.get(12)?,
        created_at: r.get(13)?,
        priority: r.get(14)?,
        max_priority: r.get(15)?,
        model_limits: model_limits_col(r, 16)?,
    })
}

pub fn get(store: &Store, id: i64) -> Result<KeyInfo, StoreError> {
    let pool = match store {
        Store::Sqlite(pool) => pool,
        Store::Postgres(pool) => return pg::keys::get(pool, id),
    };
    pool.get()?
        .query_row(
            &format!("SELECT {INFO_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = ?1"),
            [id],
            info_row,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no key with id {id}")))
}

pub fn list(store: &Store, account: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
    let pool = match store {
        Store::Sqlite(pool) => pool,
        Store::Postgres(pool) => return pg::keys::list(pool, account),
    };
    let c = pool.get()?;
    let mut st = c.prepare(&format!(
        "SELECT {INFO_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id
         WHERE ?1 IS NULL OR a.name = ?1 ORDER BY k.id"
    ))?;
    let rows = st
        .query_map([account], info_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Revokes a key by id or by its display prefix. Idempotent.
pub fn revoke(store: &Store, id_or_prefix: &str) -> Result<KeyInfo, StoreError> {
    let (id, n) = match store {
        Store::Sqlite(pool) => revoke_sqlite(pool, id_or_prefix)?,
        Store::Postgres(pool) => pg::keys::revoke(pool, id_or_prefix)?,
    };
    let info = get(store, id)?;
    if n == 0 && !info.revoked {
        return Err(StoreError::NotFound(format!("no key `{id_or_prefix}`")));
    }
    Ok(info)
}

/// The key's id, and how many rows the revoke changed.
fn revoke_sqlite(pool: &Pool, id_or_prefix: &str) -> Result<(i64, u64), StoreError> {
    let c = pool.get()?;
    let id: i64 = match id_or_prefix.parse::<i64>() {
        Ok(id) => id,
        Err(_) => c
            .query_row(
                "SELECT id FROM api_keys WHERE prefix = ?1",
                [id_or_prefix],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no key `{id_or_prefix}`")))?,
    };
    let n = c.execute(
        "UPDATE api_keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
        params![now_ms(), id],
    )?;
    Ok((id, n as u64))
}

/// A partial update (`PATCH /admin/keys/{id}`). `Some(None)` clears a nullable field.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub budget_nano: Option<Option<i64>>,
    pub models: Option<Vec<String>>,
    pub rpm: Option<Option<u32>>,
    pub tpm: Option<Option<u32>>,
    pub concurrency: Option<Option<u32>>,
    pub expires_at: Option<Option<i64>>,
    pub allow_ips: Option<Vec<IpNet>>,
    pub priority: Option<Option<u8>>,
    pub max_priority: Option<Option<u8>>,
    pub model_limits: Option<BTreeMap<String, LimitSet>>,
    /// `true` revokes; `false` restores a revoked key.
    pub revoked: Option<bool>,
}

pub fn update(store: &Store, id: i64, p: &KeyPatch) -> Result<KeyInfo, StoreError> {
    let sets = patch_sets(p)?;
    if !sets.is_empty() {
        let n = match store {
            Store::Sqlite(pool) => update_sqlite(pool, id, sets)?,
            Store::Postgres(pool) => pg::keys::update(pool, id, sets)?,
        };
        if n == 0 {
            return Err(StoreError::NotFound(format!("no key with id {id}")));
        }
    }
    get(store, id)
}

/// The columns a patch sets, with their values, checked.
pub(super) fn patch_sets(
    p: &KeyPatch,
) -> Result<Vec<(&'static str, rusqlite::types::Value)>, StoreError> {
    use rusqlite::types::Value;
    let mut sets: Vec<(&'static str, Value)> = Vec::new();
    let opt_int = |v: Option<i64>| v.map_or(Value::Null, Value::Integer);
    if let Some(n) = &p.name {
        sets.push(("name", Value::Text(n.clone())));
    }
    if let Some(b) = p.budget_nano {
        if b.is_some_and(|b| b < 0) {
            return Err(StoreError::Invalid("budget must not be negative".into()));
        }
        sets.push(("budget_nano", opt_int(b)));
    }
    if let Some(m) = &p.models {
        sets.push((
            "models",
            Value::Text(serde_json::to_string(m).unwrap_or_else(|_| "[]".into())),
        ));
    }
    for (col, v) in [
        ("rpm", p.rpm),
        ("tpm", p.tpm),
        ("concurrency", p.concurrency),
    ] {
        if let Some(v) = v {
            sets.push((col, opt_int(v.map(i64::from))));
        }
    }
    if let Some(e) = p.expires_at {
        sets.push(("expires_at", opt_int(e)));
    }
    for (col, v) in [("priority", p.priority), ("max_priority", p.max_priority)] {
        if let Some(v) = v {
            check_priority(v)?;
            sets.push((col, opt_int(v.map(i64::from))));
        }
    }
    if let Some(m) = &p.model_limits {
        sets.push(("model_limits", Value::Text(model_limits_json(m))));
    }
    if let Some(ips) = &p.allow_ips {
        let ips: Vec<String> = ips.iter().map(|n| n.to_string()).collect();
        sets.push((
            "allow_ips",
            Value::Text(serde_json::to_string(&ips).unwrap_or_else(|_| "[]".into())),
        ));
    }
    if let Some(r) = p.revoked {
        sets.push((
            "revoked_at",
            if r {
                Value::Integer(now_ms())
            } else {
                Value::Null
            },
        ));
    }
    Ok(sets)
}

/// `UPDATE api_keys SET …`; returns the rows changed.
fn update_sqlite(
    pool: &Pool,
    id: i64,
    sets: Vec<(&'static str, rusqlite::types::Value)>,
) -> Result<u64, StoreError> {
    let mut cols = Vec::with_capacity(sets.len());
    let mut args = Vec::with_capacity(sets.len() + 1);
    for (col, v) in sets {
        args.push(v);
        cols.push(format!("{col} = ?{}", args.len()));
    }
    args.push(rusqlite::types::Value::Integer(id));
    let sql = format!(
        "UPDATE api_keys SET {} WHERE id = ?{}",
        cols.join(", "),
        args.len()
    );
    let n = pool
        .get()?
        .execute(&sql, rusqlite::params_from_iter(args.iter()))?;
    Ok(n as u64)
}

/// The request-path lookup: the key with this hash, with its account.
pub fn find_by_hash(store: &Store, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
    let pool = match store {
        Store::Sqlite(pool) => pool,
        Store::Postgres(pool) => return pg::keys::find_by_hash(pool, hash),
    };
    let c = pool.get()?;
    let mut st = c.prepare_cached(
        "SELECT k.id, k.account_id, a.name, a.grp, k.name, k.prefix, k.revoked_at IS NOT NULL, k.expires_at,
                k.models, k.allow_ips, k.rpm, k.tpm, k.concurrency, k.budget_nano,
                k.priority, k.max_priority, k.model_limits
         FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.hash = ?1",
    )?;
    let rec = st
        .query_row([&hash[..]], |r| {
            Ok(KeyRecord {
                id: r.get(0)?,
                account_id: r.get(1)?,
                account: r.get(2)?,
                group: r.get(3)?,
                name: r.get(4)?,
                prefix: r.get(5)?,
                revoked: r.get(6)?,
                // Stored in ms like every other timestamp; the filter works in seconds.
                expires_at: r.get::<_, Option<i64>>(7)?.map(|ms| ms.div_euclid(1000)),
                models: json_list(r, 8)?,
                allow_ips: json_list(r, 9)?
                    .iter()
                    .filter_map(|s| s.parse().ok())
                    .collect(),
                rpm: r.get(10)?,
                tpm: r.get(11)?,
                concurrency: r.get(12)?,
                budget_nano: r.get(13)?,
                priority: r.get(14)?,
                max_priority: r.get(15)?,
                model_limits: model_limits_col(r, 16)?.into_iter().collect(),
            })
        })
        .optional()?;
    Ok(rec)
}

/// The [`tollgate_filters::auth::KeyLookup`] port over the store. Lookups run on the
/// blocking pool; the key cache in front keeps them rare. Each read is counted by its result
/// (`[found, unknown, error]`, `tollgate_key_store_lookups_total`).
pub struct StoreKeys {
    pub pool: Store,
    pub lookups: [prometheus::IntCounter; 3],
}

#[async_trait::async_trait]
impl tollgate_filters::auth::KeyLookup for StoreKeys {
    async fn find_key(&self, hash: KeyHash) -> Result<Option<KeyRecord>, String> {
        let pool = self.pool.clone();
        let found = tokio::task::spawn_blocking(move || find_by_hash(&pool, &hash))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let i = match &found {
            Ok(Some(_)) => 0,
            Ok(None) => 1,
            Err(_) => 2,
        };
        self.lookups[i].inc();
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::each_store;

    /// Rows holding `secret` anywhere in a text column or in the hash.
    fn rows_holding(store: &Store, secret: &str) -> i64 {
        match store {
            Store::Sqlite(p) => p
                .get()
                .unwrap()
                .query_row(
                    "SELECT COUNT(*) FROM api_keys WHERE instr(hash, ?1) > 0 OR instr(prefix || name || models, ?1) > 0",
                    [secret],
                    |r| r.get(0),
                )
                .unwrap(),
            Store::Postgres(p) => p
                .get()
                .unwrap()
                .query_one(
                    "SELECT COUNT(*) FROM api_keys WHERE position(convert_to($1, 'UTF8') in hash) > 0 OR strpos(prefix || name || models, $1) > 0",
                    &[&secret],
                )
                .unwrap()
                .get(0),
        }
    }

    #[test]
    fn secret_is_shown_once_and_only_its_hash_is_stored() {
        each_store(|store| {
            crate::store::accounts::create(store, "acme", "default", 0).unwrap();
            let mut limits = BTreeMap::new();
            limits.insert(
                "m".to_string(),
                LimitSet {
                    rpm: Some(3),
                    ..Default::default()
                },
            );
            let (info, secret) = create(
                store,
                &NewKey {
                    account: "acme".into(),
                    models: vec!["m".into()],
                    allow_ips: vec!["10.0.0.0/8".parse().unwrap()],
                    rpm: Some(5),
                    priority: Some(7),
                    expires_at: Some(4_000_000),
                    model_limits: limits.clone(),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(secret.starts_with("sk-tg-") && secret.len() == 46);
            assert!(secret.starts_with(&info.prefix));
            assert_eq!(
                (info.priority, info.model_limits.clone()),
                (Some(7), limits)
            );
            assert_eq!(rows_holding(store, &secret), 0);
            let rec = find_by_hash(store, &hash_secret(&secret)).unwrap().unwrap();
            assert_eq!(rec.models, ["m"]);
            assert_eq!(
                (rec.rpm, rec.priority, rec.expires_at),
                (Some(5), Some(7), Some(4_000))
            );
            assert_eq!(rec.allow_ips.len(), 1);
            assert_eq!(rec.model_limits.len(), 1);
            assert!(find_by_hash(store, &hash_secret("sk-tg-other"))
                .unwrap()
                .is_none());
            let nobody = NewKey {
                account: "nobody".into(),
                ..Default::default()
            };
            assert!(matches!(
                create(store, &nobody),
                Err(StoreError::NotFound(_))
            ));
        });
    }

    #[test]
    fn revoke_by_id_or_prefix_bumps_the_key_epoch() {
        each_store(|store| {
            crate::store::accounts::create(store, "acme", "default", 0).unwrap();
            let new = NewKey {
                account: "acme".into(),
                ..Default::default()
            };
            let (a, _) = create(store, &new).unwrap();
            let (b, _) = create(store, &new).unwrap();
            let e0 = crate::store::key_epoch(store).unwrap();
            assert!(e0 >= 2, "inserts bump the epoch");
            assert!(revoke(store, &a.id.to_string()).unwrap().revoked);
            assert!(revoke(store, &b.prefix).unwrap().revoked);
            assert!(crate::store::key_epoch(store).unwrap() > e0);
            // Idempotent.
            assert!(revoke(store, &a.id.to_string()).unwrap().revoked);
            assert!(matches!(revoke(store, "999"), Err(StoreError::NotFound(_))));
            assert!(matches!(
                revoke(store, "sk-tg-nope"),
                Err(StoreError::NotFound(_))
            ));
            assert_eq!(list(store, Some("acme")).unwrap().len(), 2);
            assert_eq!(list(store, None).unwrap().len(), 2);
            assert!(list(store, Some("other")).unwrap().is_empty());
        });
    }

    #[test]
    fn patch_changes_only_what_it_names() {
        each_store(|store| {
            crate::store::accounts::create(store, "acme", "default", 0).unwrap();
            let new = NewKey {
                account: "acme".into(),
                rpm: Some(5),
                budget_nano: Some(10),
                ..Default::default()
            };
            let (k, _) = create(store, &new).unwrap();
            let e0 = crate::store::key_epoch(store).unwrap();
            let p = KeyPatch {
                budget_nano: Some(None),
                models: Some(vec!["m".into()]),
                priority: Some(Some(3)),
                ..Default::default()
            };
            let k2 = update(store, k.id, &p).unwrap();
            assert_eq!(
                (k2.budget_nano, k2.rpm, k2.models.clone(), k2.priority),
                (None, Some(5), vec!["m".to_string()], Some(3))
            );
            assert!(crate::store::key_epoch(store).unwrap() > e0);
            let k3 = update(
                store,
                k.id,
                &KeyPatch {
                    revoked: Some(true),
                    ..Default::default()
                },
            )
            .unwrap();
            assert!(k3.revoked);
            assert!(matches!(
                update(
                    store,
                    999,
                    &KeyPatch {
                        name: Some("x".into()),
                        ..Default::default()
                    }
                ),
                Err(StoreError::NotFound(_))
            ));
            assert!(update(
                store,
                k.id,
                &KeyPatch {
                    priority: Some(Some(10)),
                    ..Default::default()
                }
            )
            .is_err());
        });
    }
}
