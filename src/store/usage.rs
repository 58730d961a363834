//! Usage queries over the ledger: totals, and a breakdown by model, day or key.

use rusqlite::types::Value;
use serde::Serialize;

use super::{money, pg, Store, StoreError};

#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub account: Option<String>,
    pub key_id: Option<i64>,
    pub model: Option<String>,
    /// Unix ms, inclusive.
    pub since: Option<i64>,
    /// Unix ms, exclusive.
    pub until: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Model,
    Day,
    Key,
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "model" => Ok(GroupBy::Model),
            "day" => Ok(GroupBy::Day),
            "key" => Ok(GroupBy::Key),
            _ => Err(format!("`{s}`: expected model, day or key")),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct UsageTotals {
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub estimated_requests: i64,
    /// Rows answered from the response cache.
    pub cache_hits: i64,
    pub cost_nano: i64,
    pub cost_usd: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct UsageGroup {
    /// The model, the day (YYYY-MM-DD, UTC) or the key prefix.
    pub group: String,
    #[serde(flatten)]
    pub totals: UsageTotals,
}

fn totals(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<UsageTotals> {
    Ok(UsageTotals::from_sums([
        r.get(at)?,
        r.get(at + 1)?,
        r.get(at + 2)?,
        r.get(at + 3)?,
        r.get(at + 4)?,
        r.get(at + 5)?,
        r.get(at + 6)?,
    ]))
}

impl UsageTotals {
    /// From the seven sums of [`SUMS`], in order.
    pub(super) fn from_sums(v: [i64; 7]) -> UsageTotals {
        UsageTotals {
            requests: v[0],
            prompt_tokens: v[1],
            completion_tokens: v[2],
            cached_tokens: v[3],
            estimated_requests: v[4],
            cache_hits: v[5],
            cost_nano: v[6],
            cost_usd: money::format_usd(v[6]),
        }
    }
}

const SUMS: &str =
    "COUNT(*), COALESCE(SUM(u.prompt_tokens),0), COALESCE(SUM(u.completion_tokens),0), \
    COALESCE(SUM(u.cached_tokens),0), COALESCE(SUM(u.estimated),0), COALESCE(SUM(u.cache_hit),0), \
    COALESCE(SUM(u.cost_nano),0)";

/// The `WHERE` clause and its arguments; `ph` is the placeholder's sigil (`?` for SQLite,
/// `$` for PostgreSQL).
pub(super) fn where_clause(f: &UsageFilter, ph: char) -> (String, Vec<Value>) {
    let mut conds = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    if let Some(a) = &f.account {
        args.push(Value::Text(a.clone()));
        conds.push(format!(
            "u.account_id = (SELECT id FROM accounts WHERE name = {ph}{})",
            args.len()
        ));
    }
    if let Some(k) = f.key_id {
        args.push(Value::Integer(k));
        conds.push(format!("u.key_id = {ph}{}", args.len()));
    }
    if let Some(m) = &f.model {
        args.push(Value::Text(m.clone()));
        conds.push(format!("u.model = {ph}{}", args.len()));
    }
    if let Some(s) = f.since {
        args.push(Value::Integer(s));
        conds.push(format!("u.ts >= {ph}{}", args.len()));
    }
    if let Some(u) = f.until {
        args.push(Value::Integer(u));
        conds.push(format!("u.ts < {ph}{}", args.len()));
    }
    let w = if conds.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conds.join(" AND "))
    };
    (w, args)
}

pub fn summary(
    store: &Store,
    f: &UsageFilter,
    by: Option<GroupBy>,
) -> Result<(UsageTotals, Vec<UsageGroup>), StoreError> {
    let pool = match store {
        Store::Sqlite(pool) => pool,
        Store::Postgres(pool) => return pg::usage::summary(pool, f, by),
    };
    let c = pool.get()?;
    let (w, args) = where_clause(f, '?');
    let total = c.query_row(
        &format!("SELECT {SUMS} FROM usage_ledger u {w}"),
        rusqlite::params_from_iter(args.iter()),
        |r| totals(r, 0),
    )?;
    let Some(by) = by else {
        return Ok((total, Vec::new()));
    };
    let (expr, join) = match by {
        GroupBy::Model => ("u.model", ""),
        GroupBy::Day => ("strftime('%Y-%m-%d', u.ts / 1000, 'unixepoch')", ""),
        GroupBy::Key => (
            "COALESCE(k.prefix, CAST(u.key_id AS TEXT))",
            "LEFT JOIN api_keys k ON k.id = u.key_id",
        ),
    };
    let sql =
        format!("SELECT {expr} AS g, {SUMS} FROM usage_ledger u {join} {w} GROUP BY g ORDER BY g");
    let mut st = c.prepare(&sql)?;
    let groups = st
        .query_map(rusqlite::params_from_iter(args.iter()), |r| {
            Ok(UsageGroup {
                group: r.get(0)?,
                totals: totals(r, 1)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok((total, groups))
}

/// Parses `since`/`until`: RFC 3339, a date (`2026-11-27`, midnight UTC) or unix ms.
pub fn parse_time(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_millis())
            .unwrap_or(0));
    }
    Err(format!(
        "`{s}`: expected RFC 3339, YYYY-MM-DD or unix milliseconds"
    ))
}

/// Deletes ledger rows older than `before_ms`, `batch` rows per transaction, so the writer
/// is never locked out for long. Returns how many went.
pub fn delete_older_than(store: &Store, before_ms: i64, batch: usize) -> Result<usize, StoreError> {
    let pool = match store {
        Store::Sqlite(pool) => pool,
        Store::Postgres(pool) => return pg::usage::delete_older_than(pool, before_ms, batch),
    };
    let c = pool.get()?;
    let mut total = 0;
    loop {
        let n = c.execute(
            "DELETE FROM usage_ledger WHERE request_id IN (SELECT request_id FROM usage_ledger WHERE ts < ?1 LIMIT ?2)",
            rusqlite::params![before_ms, batch as i64],
        )?;
        total += n;
        if n < batch {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger row written directly (the ledger writer has tests of its own).
    fn insert(store: &Store, id: &str, ts: i64, account: i64, model: &str, cost: i64) {
        let sql = "INSERT INTO usage_ledger(request_id, ts, key_id, account_id, model, status, prompt_tokens, completion_tokens, cost_nano) VALUES (?1, ?2, 1, ?3, ?4, 200, 5, 7, ?5)";
        match store {
            Store::Sqlite(p) => {
                p.get()
                    .unwrap()
                    .execute(sql, rusqlite::params![id, ts, account, model, cost])
                    .unwrap();
            }
            Store::Postgres(p) => {
                let sql = sql.replace('?', "$");
                p.get()
                    .unwrap()
                    .execute(&sql, &[&id, &ts, &account, &model, &cost])
                    .unwrap();
            }
        }
    }

    #[test]
    fn totals_breakdowns_and_retention() {
        crate::store::testing::each_store(|store| {
            let a = crate::store::accounts::create(store, "acme", "default", 0).unwrap();
            let day = 86_400_000i64;
            for (id, ts, model, cost) in [
                ("a", day, "m1", 10),
                ("b", day + 5, "m2", 20),
                ("c", 3 * day, "m1", 30),
            ] {
                insert(store, id, ts, a.id, model, cost);
            }
            let f = UsageFilter {
                account: Some("acme".into()),
                ..Default::default()
            };
            let (t, g) = summary(store, &f, Some(GroupBy::Model)).unwrap();
            assert_eq!(
                (
                    t.requests,
                    t.prompt_tokens,
                    t.completion_tokens,
                    t.cost_nano
                ),
                (3, 15, 21, 60)
            );
            assert_eq!(
                g.iter()
                    .map(|g| (g.group.as_str(), g.totals.cost_nano))
                    .collect::<Vec<_>>(),
                [("m1", 40), ("m2", 20)]
            );
            let (_, g) = summary(store, &f, Some(GroupBy::Day)).unwrap();
            assert_eq!(
                g.iter().map(|g| g.group.as_str()).collect::<Vec<_>>(),
                ["1970-01-02", "1970-01-04"]
            );
            let (_, g) = summary(store, &f, Some(GroupBy::Key)).unwrap();
            assert_eq!(
                g.iter()
                    .map(|g| (g.group.as_str(), g.totals.requests))
                    .collect::<Vec<_>>(),
                [("1", 3)]
            );
            let since = UsageFilter {
                since: Some(2 * day),
                ..f.clone()
            };
            assert_eq!(summary(store, &since, None).unwrap().0.cost_nano, 30);
            let m2 = UsageFilter {
                model: Some("m2".into()),
                until: Some(2 * day),
                key_id: Some(1),
                ..f.clone()
            };
            assert_eq!(summary(store, &m2, None).unwrap().0.cost_usd, "0.00000002");
            let none = UsageFilter {
                account: Some("nobody".into()),
                ..Default::default()
            };
            assert_eq!(
                summary(store, &none, None).unwrap().0,
                UsageTotals::from_sums([0; 7])
            );
            assert_eq!(delete_older_than(store, 2 * day, 1).unwrap(), 2);
            assert_eq!(summary(store, &f, None).unwrap().0.requests, 1);
            assert_eq!(parse_time("1970-01-02").unwrap(), day);
        });
    }
}
