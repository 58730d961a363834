//! Usage queries on PostgreSQL: the statements of `store::usage` in this dialect.

use postgres::Row;

use super::{params, refs, PgPool};
use crate::store::usage::{where_clause, GroupBy, UsageFilter, UsageGroup, UsageTotals};
use crate::store::StoreError;

/// `SUM(BIGINT)` is `NUMERIC` in PostgreSQL: each sum is cast back (the ledger's totals fit
/// an i64 as they do on SQLite).
const SUMS: &str = "COUNT(*), COALESCE(SUM(u.prompt_tokens),0)::BIGINT, \
    COALESCE(SUM(u.completion_tokens),0)::BIGINT, COALESCE(SUM(u.cached_tokens),0)::BIGINT, \
    COALESCE(SUM(u.estimated),0)::BIGINT, COALESCE(SUM(u.cache_hit),0)::BIGINT, \
    COALESCE(SUM(u.cost_nano),0)::BIGINT";

fn totals(r: &Row, at: usize) -> UsageTotals {
    let mut v = [0i64; 7];
    for (i, x) in v.iter_mut().enumerate() {
        *x = r.get(at + i);
    }
    UsageTotals::from_sums(v)
}

pub fn summary(
    pool: &PgPool,
    f: &UsageFilter,
    by: Option<GroupBy>,
) -> Result<(UsageTotals, Vec<UsageGroup>), StoreError> {
    let mut c = pool.get()?;
    let (w, args) = where_clause(f, '$');
    let p = params(&args);
    let total = totals(
        &c.query_one(&format!("SELECT {SUMS} FROM usage_ledger u {w}"), &refs(&p))?,
        0,
    );
    let Some(by) = by else {
        return Ok((total, Vec::new()));
    };
    let (expr, join) = match by {
        GroupBy::Model => ("u.model", ""),
        GroupBy::Day => (
            "to_char(to_timestamp(u.ts / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
            "",
        ),
        GroupBy::Key => (
            "COALESCE(k.prefix, CAST(u.key_id AS TEXT))",
            "LEFT JOIN api_keys k ON k.id = u.key_id",
        ),
    };
    // Groups sort by their bytes (collation "C"), as with SQLite's default collation.
    let sql = format!(
        "SELECT ({expr}) COLLATE \"C\" AS g, {SUMS} FROM usage_ledger u {join} {w} GROUP BY g ORDER BY g"
    );
    let groups = c
        .query(&sql, &refs(&p))?
        .iter()
        .map(|r| UsageGroup {
            group: r.get(0),
            totals: totals(r, 1),
        })
        .collect();
    Ok((total, groups))
}

/// Deletes ledger rows older than `before_ms`, `batch` rows per statement (each its own
/// transaction), so the writer is never held up for long. Returns how many went.
pub fn delete_older_than(pool: &PgPool, before_ms: i64, batch: usize) -> Result<usize, StoreError> {
    let mut c = pool.get()?;
    let mut total = 0;
    loop {
        let n = c.execute(
            "DELETE FROM usage_ledger WHERE request_id IN (SELECT request_id FROM usage_ledger WHERE ts < $1 LIMIT $2)",
            &[&before_ms, &(batch as i64)],
        )? as usize;
        total += n;
        if n < batch {
            return Ok(total);
        }
    }
}
