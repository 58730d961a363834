//! `tollgate migrate --from sqlite:PATH --to postgres://…`: moves a gateway's SQLite store to
//! PostgreSQL. Accounts, keys (their hashes: secrets were never stored) and the whole
//! ledger are copied with their ids, in one transaction, into a migrated and empty target;
//! then the id sequences are moved past the copied ids.

use postgres::types::ToSql;
use postgres::Transaction;
use rusqlite::Connection;

use crate::config::DatabaseConfig;
use crate::store::{self, StoreError};

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    pub accounts: i64,
    pub keys: i64,
    pub ledger_rows: i64,
    /// The sum of every account's balance, nano-USD (the same on both sides after the copy).
    pub balance_nano: i64,
}

/// Rows per `INSERT` while copying (PostgreSQL takes at most 65,535 parameters).
const BATCH: usize = 500;

const ACCOUNT_COLS: &str = "id, name, grp, balance_nano, created_at, updated_at";
const KEY_COLS: &str = "id, account_id, name, prefix, hash, revoked_at, expires_at, budget_nano, \
    spent_nano, models, allow_ips, rpm, tpm, concurrency, created_at, priority, max_priority, model_limits";
const LEDGER_COLS: &str = "request_id, ts, key_id, account_id, model, upstream_model, channel, status, \
    prompt_tokens, completion_tokens, cached_tokens, cost_nano, latency_ms, ttft_ms, stream, estimated, cache_hit";

/// One SQLite value as the matching PostgreSQL column takes it (every integer is `BIGINT`,
/// every text `TEXT`, the hash `BYTEA`).
#[derive(Debug)]
enum Cell {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Vec<u8>),
}

impl Cell {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Cell::Int(v) => v,
            Cell::Text(v) => v,
            Cell::Bytes(v) => v,
        }
    }
}

/// Which columns of a table are text and which bytes; the rest are integers.
fn kinds(cols: &str, text: &[&str], bytes: &[&str]) -> Vec<u8> {
    cols.split(',')
        .map(str::trim)
        .map(|c| {
            if text.contains(&c) {
                b't'
            } else if bytes.contains(&c) {
                b'b'
            } else {
                b'i'
            }
        })
        .collect()
}

/// Copies the SQLite store at `from` into the (empty) PostgreSQL database at `to`.
/// The source's pending migrations are applied first, so both schemas are the same.
pub fn sqlite_to_postgres(
    db: &DatabaseConfig,
    from: &std::path::Path,
    to: &str,
) -> Result<Copied, StoreError> {
    if !from.is_file() {
        return Err(StoreError::NotFound(format!(
            "no SQLite database at {}",
            from.display()
        )));
    }
    let src_cfg = db.with_sqlite_path(from.to_path_buf());
    let mut src = store::open_connection(&src_cfg)?;
    store::migrate(&mut src)?;
    let mut dst = super::connect(db, to)?;
    super::migrate(&mut dst)?;
    let mut tx = dst.transaction()?;
    // Nothing else may write while the copy runs, and a second copy waits, then refuses.
    tx.batch_execute("LOCK TABLE accounts, api_keys, usage_ledger IN EXCLUSIVE MODE")?;
    let present: i64 = tx
        .query_one(
            "SELECT (SELECT COUNT(*) FROM accounts) + (SELECT COUNT(*) FROM api_keys) + (SELECT COUNT(*) FROM usage_ledger)",
            &[],
        )?
        .get(0);
    if present > 0 {
        return Err(StoreError::Conflict(format!(
            "the target database is not empty ({present} rows in accounts, api_keys and usage_ledger); copy into an empty one"
        )));
    }
    let copied = Copied {
        accounts: copy_table(
            &src,
            &mut tx,
            "accounts",
            ACCOUNT_COLS,
            &kinds(ACCOUNT_COLS, &["name", "grp"], &[]),
        )?,
        keys: copy_table(
            &src,
            &mut tx,
            "api_keys",
            KEY_COLS,
            &kinds(
                KEY_COLS,
                &["name", "prefix", "models", "allow_ips", "model_limits"],
                &["hash"],
            ),
        )?,
        ledger_rows: copy_table(
            &src,
            &mut tx,
            "usage_ledger",
            LEDGER_COLS,
            &kinds(
                LEDGER_COLS,
                &["request_id", "model", "upstream_model", "channel"],
                &[],
            ),
        )?,
        balance_nano: tx
            .query_one(
                "SELECT COALESCE(SUM(balance_nano), 0)::BIGINT FROM accounts",
                &[],
            )?
            .get(0),
    };
    // New ids continue after the copied ones.
    for table in ["accounts", "api_keys"] {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            ),
            &[],
        )?;
    }
    let source_balance: i64 = src.query_row(
        "SELECT COALESCE(SUM(balance_nano), 0) FROM accounts",
        [],
        |r| r.get(0),
    )?;
    if source_balance != copied.balance_nano {
        return Err(StoreError::Invalid(format!(
            "balances differ after the copy ({source_balance} vs {} nano-USD); nothing was committed",
            copied.balance_nano
        )));
    }
    tx.commit()?;
    Ok(copied)
}

/// Copies every row of `table` (ordered by its key), `BATCH` rows per statement.
fn copy_table(
    src: &Connection,
    tx: &mut Transaction<'_>,
    table: &str,
    cols: &str,
    kinds: &[u8],
) -> Result<i64, StoreError> {
    let order = if table == "usage_ledger" {
        "request_id"
    } else {
        "id"
    };
    let mut st = src.prepare(&format!("SELECT {cols} FROM {table} ORDER BY {order}"))?;
    let mut rows = st.query([])?;
    let mut buf: Vec<Vec<Cell>> = Vec::with_capacity(BATCH);
    let mut n = 0i64;
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(kinds.len());
        for (i, k) in kinds.iter().enumerate() {
            row.push(match *k {
                b't' => Cell::Text(r.get(i)?),
                b'b' => Cell::Bytes(r.get(i)?),
                _ => Cell::Int(r.get(i)?),
            });
        }
        buf.push(row);
        if buf.len() == BATCH {
            n += insert(tx, table, cols, &buf)?;
            buf.clear();
        }
    }
    if !buf.is_empty() {
        n += insert(tx, table, cols, &buf)?;
    }
    Ok(n)
}

fn insert(
    tx: &mut Transaction<'_>,
    table: &str,
    cols: &str,
    rows: &[Vec<Cell>],
) -> Result<i64, StoreError> {
    let width = rows[0].len();
    let tuples: Vec<String> = (0..rows.len())
        .map(|r| {
            let ps: Vec<String> = (0..width)
                .map(|c| format!("${}", r * width + c + 1))
                .collect();
            format!("({})", ps.join(", "))
        })
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> = rows.iter().flatten().map(Cell::as_sql).collect();
    let n = tx.execute(
        &format!("INSERT INTO {table} ({cols}) VALUES {}", tuples.join(", ")),
        &params,
    )?;
    Ok(n as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::scratch;
    use crate::store::{accounts, keys, Store};

    #[test]
    fn a_sqlite_store_is_copied_whole_and_only_into_an_empty_target() {
        let (sqlite_cfg, _s) = scratch("sqlite");
        let (pg_cfg, _p) = scratch("postgres");
        let sqlite = store::open_and_migrate(&sqlite_cfg).unwrap();
        let a = accounts::create(&sqlite, "acme", "vip", 1_234_567_891).unwrap();
        accounts::create(&sqlite, "zero", "default", 0).unwrap();
        let (k, secret) = keys::create(
            &sqlite,
            &keys::NewKey {
                account: "acme".into(),
                budget_nano: Some(99),
                rpm: Some(4),
                priority: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        keys::revoke(&sqlite, &k.id.to_string()).unwrap();
        let Store::Sqlite(p) = &sqlite else {
            unreachable!()
        };
        for i in 0..1203 {
            p.get()
                .unwrap()
                .execute(
                    "INSERT INTO usage_ledger(request_id, ts, key_id, account_id, model, status, cost_nano, stream, cache_hit) VALUES (?1, ?2, ?3, ?4, 'm', 200, ?2, 1, 1)",
                    rusqlite::params![format!("req-{i:05}"), i, k.id, a.id],
                )
                .unwrap();
        }
        let url = pg_cfg.url.clone().unwrap();
        let from = sqlite_cfg.sqlite_path();
        let copied = sqlite_to_postgres(&pg_cfg, &from, &url).unwrap();
        assert_eq!(
            copied,
            Copied {
                accounts: 2,
                keys: 1,
                ledger_rows: 1203,
                balance_nano: 1_234_567_891
            }
        );
        let pg = store::open_and_migrate(&pg_cfg).unwrap();
        assert_eq!(
            accounts::list(&pg).unwrap(),
            accounts::list(&sqlite).unwrap()
        );
        let (before, after) = (
            keys::list(&sqlite, None).unwrap(),
            keys::list(&pg, None).unwrap(),
        );
        assert_eq!(format!("{before:?}"), format!("{after:?}"));
        let rec = keys::find_by_hash(&pg, &tollgate_filters::auth::hash_secret(&secret))
            .unwrap()
            .unwrap();
        assert!(rec.revoked);
        let all = crate::store::usage::UsageFilter::default();
        let by = Some(crate::store::usage::GroupBy::Day);
        let (t1, g1) = crate::store::usage::summary(&sqlite, &all, by).unwrap();
        let (t2, g2) = crate::store::usage::summary(&pg, &all, by).unwrap();
        assert_eq!((t1.clone(), format!("{g1:?}")), (t2, format!("{g2:?}")));
        assert_eq!(t1.cache_hits, 1203);
        // New ids go on after the copied ones.
        let b = accounts::create(&pg, "new", "default", 0).unwrap();
        assert!(b.id > a.id + 1);
        // A second copy into the same database is refused, and changes nothing.
        assert!(matches!(
            sqlite_to_postgres(&pg_cfg, &from, &url),
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            sqlite_to_postgres(&pg_cfg, std::path::Path::new("/nonexistent.db"), &url),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(accounts::list(&pg).unwrap().len(), 3);
    }
}
