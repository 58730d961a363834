//! API keys. The secret (`sk-tg-…`) is shown once at creation; only its SHA-256 and a short
//! display prefix are stored.

use std::collections::BTreeMap;

use ipnet::IpNet;
use rand::distr::{Alphanumeric, SampleString};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use tollgate_filters::auth::{hash_secret, KeyHash, KeyRecord};
use tollgate_filters::limits::LimitSet;

use super::{now_ms, Pool, StoreError};

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

pub fn create(pool: &Pool, new: &NewKey) -> Result<(KeyInfo, String), StoreError> {
    if new.budget_nano.is_some_and(|b| b < 0) {
        return Err(StoreError::Invalid("budget must not be negative".into()));
    }
    check_priority(new.priority)?;
    check_priority(new.max_priority)?;
    let secret = format!(
        "{SECRET_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 40)
    );
    let prefix = secret[..PREFIX_LEN].to_string();
    let hash = hash_secret(&secret);
    let c = pool.get()?;
    let account_id: i64 = c
        .query_row(
            "SELECT id FROM accounts WHERE name = ?1",
            [&new.account],
            |r| r.get(0),
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no account named `{}`", new.account)))?;
    let models = serde_json::to_string(&new.models).unwrap_or_else(|_| "[]".into());
    let ips: Vec<String> = new.allow_ips.iter().map(|n| n.to_string()).collect();
    let ips = serde_json::to_string(&ips).unwrap_or_else(|_| "[]".into());
    c.execute(
        "INSERT INTO api_keys(account_id, name, prefix, hash, expires_at, budget_nano, models, allow_ips, rpm, tpm, concurrency, created_at, priority, max_priority, model_limits)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            account_id, new.name, prefix, &hash[..], new.expires_at, new.budget_nano, models, ips,
            new.rpm, new.tpm, new.concurrency, now_ms(), new.priority, new.max_priority,
            model_limits_json(&new.model_limits)
        ],
    )?;
    let id = c.last_insert_rowid();
    drop(c);
    let info = get(pool, id)?;
    Ok((info, secret))
}

const INFO_COLS: &str =
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

pub fn get(pool: &Pool, id: i64) -> Result<KeyInfo, StoreError> {
    pool.get()?
        .query_row(
            &format!("SELECT {INFO_COLS} FROM api_keys k JOIN accounts a ON a.id = k.account_id WHERE k.id = ?1"),
            [id],
            info_row,
        )
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("no key with id {id}")))
}

pub fn list(pool: &Pool, account: Option<&str>) -> Result<Vec<KeyInfo>, StoreError> {
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
pub fn revoke(pool: &Pool, id_or_prefix: &str) -> Result<KeyInfo, StoreError> {
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
    drop(c);
    let info = get(pool, id)?;
    if n == 0 && !info.revoked {
        return Err(StoreError::NotFound(format!("no key `{id_or_prefix}`")));
    }
    Ok(info)
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

pub fn update(pool: &Pool, id: i64, p: &KeyPatch) -> Result<KeyInfo, StoreError> {
    use rusqlite::types::Value;
    let mut sets: Vec<String> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    let mut set = |col: &str, v: Value| {
        args.push(v);
        sets.push(format!("{col} = ?{}", args.len()));
    };
    let opt_int = |v: Option<i64>| v.map_or(Value::Null, Value::Integer);
    if let Some(n) = &p.name {
        set("name", Value::Text(n.clone()));
    }
    if let Some(b) = p.budget_nano {
        if b.is_some_and(|b| b < 0) {
            return Err(StoreError::Invalid("budget must not be negative".into()));
        }
        set("budget_nano", opt_int(b));
    }
    if let Some(m) = &p.models {
        set(
            "models",
            Value::Text(serde_json::to_string(m).unwrap_or_else(|_| "[]".into())),
        );
    }
    for (col, v) in [
        ("rpm", p.rpm),
        ("tpm", p.tpm),
        ("concurrency", p.concurrency),
    ] {
        if let Some(v) = v {
            set(col, opt_int(v.map(i64::from)));
        }
    }
    if let Some(e) = p.expires_at {
        set("expires_at", opt_int(e));
    }
    for (col, v) in [("priority", p.priority), ("max_priority", p.max_priority)] {
        if let Some(v) = v {
            check_priority(v)?;
            set(col, opt_int(v.map(i64::from)));
        }
    }
    if let Some(m) = &p.model_limits {
        set("model_limits", Value::Text(model_limits_json(m)));
    }
    if let Some(ips) = &p.allow_ips {
        let ips: Vec<String> = ips.iter().map(|n| n.to_string()).collect();
        set(
            "allow_ips",
            Value::Text(serde_json::to_string(&ips).unwrap_or_else(|_| "[]".into())),
        );
    }
    if let Some(r) = p.revoked {
        set(
            "revoked_at",
            if r {
                Value::Integer(now_ms())
            } else {
                Value::Null
            },
        );
    }
    if !sets.is_empty() {
        args.push(Value::Integer(id));
        let sql = format!(
            "UPDATE api_keys SET {} WHERE id = ?{}",
            sets.join(", "),
            args.len()
        );
        let n = pool
            .get()?
            .execute(&sql, rusqlite::params_from_iter(args.iter()))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no key with id {id}")));
        }
    }
    get(pool, id)
}

/// The request-path lookup: the key with this hash, with its account.
pub fn find_by_hash(pool: &Pool, hash: &KeyHash) -> Result<Option<KeyRecord>, StoreError> {
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

/// The [`tollgate_filters::auth::KeyLookup`] port over SQLite. Lookups run on the blocking
/// pool; the key cache in front keeps them rare.
/// The auth filter's key store: SQLite, each read counted by its result
/// (`[found, unknown, error]`, `tollgate_key_store_lookups_total`).
pub struct SqliteKeys {
    pub pool: Pool,
    pub lookups: [prometheus::IntCounter; 3],
}

#[async_trait::async_trait]
impl tollgate_filters::auth::KeyLookup for SqliteKeys {
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

    #[test]
    fn secret_is_shown_once_and_only_its_hash_is_stored() {
        let (_d, pool) = crate::store::test_pool();
        crate::store::accounts::create(&pool, "acme", "default", 0).unwrap();
        let (info, secret) = create(
            &pool,
            &NewKey {
                account: "acme".into(),
                models: vec!["m".into()],
                allow_ips: vec!["10.0.0.0/8".parse().unwrap()],
                rpm: Some(5),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(secret.starts_with("sk-tg-") && secret.len() == 46);
        assert!(secret.starts_with(&info.prefix));
        let c = pool.get().unwrap();
        let stored: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM api_keys WHERE instr(hash, ?1) > 0 OR instr(prefix || name || models, ?1) > 0",
                [&secret],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 0);
        drop(c);
        let rec = find_by_hash(&pool, &hash_secret(&secret)).unwrap().unwrap();
        assert_eq!(rec.models, ["m"]);
        assert_eq!(rec.rpm, Some(5));
        assert_eq!(rec.allow_ips.len(), 1);
        assert!(find_by_hash(&pool, &hash_secret("sk-tg-other"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn revoke_by_id_or_prefix_bumps_the_key_epoch() {
        let (_d, pool) = crate::store::test_pool();
        crate::store::accounts::create(&pool, "acme", "default", 0).unwrap();
        let new = NewKey {
            account: "acme".into(),
            ..Default::default()
        };
        let (a, _) = create(&pool, &new).unwrap();
        let (b, _) = create(&pool, &new).unwrap();
        let e0 = crate::store::key_epoch(&pool).unwrap();
        assert!(revoke(&pool, &a.id.to_string()).unwrap().revoked);
        assert!(revoke(&pool, &b.prefix).unwrap().revoked);
        assert!(crate::store::key_epoch(&pool).unwrap() > e0);
        assert!(matches!(revoke(&pool, "999"), Err(StoreError::NotFound(_))));
        assert_eq!(list(&pool, Some("acme")).unwrap().len(), 2);
    }

    #[test]
    fn patch_changes_only_what_it_names() {
        let (_d, pool) = crate::store::test_pool();
        crate::store::accounts::create(&pool, "acme", "default", 0).unwrap();
        let new = NewKey {
            account: "acme".into(),
            rpm: Some(5),
            budget_nano: Some(10),
            ..Default::default()
        };
        let (k, _) = create(&pool, &new).unwrap();
        let p = KeyPatch {
            budget_nano: Some(None),
            models: Some(vec!["m".into()]),
            ..Default::default()
        };
        let k2 = update(&pool, k.id, &p).unwrap();
        assert_eq!(
            (k2.budget_nano, k2.rpm, k2.models.clone()),
            (None, Some(5), vec!["m".to_string()])
        );
        let k3 = update(
            &pool,
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
                &pool,
                999,
                &KeyPatch {
                    name: Some("x".into()),
                    ..Default::default()
                }
            ),
            Err(StoreError::NotFound(_))
        ));
    }
}
