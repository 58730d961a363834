//! The durable store: SQLite (the default) or PostgreSQL (`database.url`), behind one
//! [`Store`] port. This module holds the SQLite pool, its PRAGMAs and migrations; `pg/` the
//! PostgreSQL side; `accounts`, `keys` and `usage` the typed access, which dispatches on
//! the backend.
//!
//! Reads go through an r2d2 pool (both backends). Every SQLite connection gets the PRAGMAs
//! from `database:` when it is opened. Writes made on the request path go through the
//! ledger's single group-committing writer; the rarely-run admin writes (accounts, keys) use
//! the pool directly.

pub mod accounts;
pub mod keys;
pub mod leases;
pub mod pg;
#[cfg(test)]
pub mod testing;
pub mod usage;

use std::time::Duration;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::Connection;

use crate::config::{DatabaseConfig, JournalMode, Synchronous, TempStore};

pub type Pool = r2d2::Pool<SqliteConnectionManager>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The client's errors name no URL and no password; their cause (the refused
    /// connection, the server's message) is shown too.
    #[error("postgres: {}", pg::explain(.0))]
    Postgres(#[from] postgres::Error),
    #[error("connection pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// Try again later (the ledger writer is not committing).
    #[error("{0}")]
    Unavailable(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// The numbered migrations, in order. Each is applied once and recorded in `schema_migrations`.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "key_priority_and_model_limits",
        include_str!("../../migrations/0002_key_priority_and_model_limits.sql"),
    ),
    (
        3,
        "usage_cache_hit",
        include_str!("../../migrations/0003_usage_cache_hit.sql"),
    ),
    (
        4,
        "balance_leases",
        include_str!("../../migrations/0004_balance_leases.sql"),
    ),
];

/// The PRAGMAs for one connection, from config.
pub fn pragmas(cfg: &DatabaseConfig) -> String {
    let journal = match cfg.journal_mode {
        JournalMode::Wal => "WAL",
        JournalMode::Delete => "DELETE",
        JournalMode::Truncate => "TRUNCATE",
        JournalMode::Persist => "PERSIST",
        JournalMode::Memory => "MEMORY",
        JournalMode::Off => "OFF",
    };
    let sync = match cfg.synchronous {
        Synchronous::Off => "OFF",
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
        Synchronous::Extra => "EXTRA",
    };
    let temp = match cfg.temp_store {
        TempStore::Default => "DEFAULT",
        TempStore::File => "FILE",
        TempStore::Memory => "MEMORY",
    };
    // cache_size is negative for KiB in SQLite.
    format!(
        "PRAGMA busy_timeout = {}; PRAGMA journal_mode = {journal}; PRAGMA synchronous = {sync}; \
         PRAGMA cache_size = -{}; PRAGMA mmap_size = {}; PRAGMA temp_store = {temp}; \
         PRAGMA foreign_keys = ON;",
        cfg.busy_timeout_ms, cfg.cache_size_kib, cfg.mmap_size_bytes
    )
}

/// The store port: every typed access in `accounts`, `keys` and `usage` takes one and runs
/// the backend's SQL. Cheap to clone (both are pools).
#[derive(Clone)]
pub enum Store {
    Sqlite(Pool),
    Postgres(pg::PgPool),
}

impl Store {
    /// "sqlite" or "postgres", for logs and messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Applies the migrations not yet recorded. Returns the versions applied now.
    pub fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        match self {
            Store::Sqlite(p) => migrate(&mut *p.get()?),
            Store::Postgres(p) => pg::migrate(&mut *p.get()?),
        }
    }

    /// One query, for /readyz.
    pub fn ping(&self) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(p) => {
                p.get()?.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
                Ok(())
            }
            Store::Postgres(p) => pg::ping(p),
        }
    }
}

/// Opens the configured store (`database.url` or `database.path`) without migrating.
pub fn open(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
    Ok(match cfg.postgres_url() {
        Some(url) => Store::Postgres(pg::open(cfg, url)?),
        None => Store::Sqlite(open_sqlite(cfg)?),
    })
}

/// Opens the SQLite pool (creating the file and its folder), applying PRAGMAs on every
/// connection.
pub fn open_sqlite(cfg: &DatabaseConfig) -> Result<Pool, StoreError> {
    let path = cfg.sqlite_path();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let init = pragmas(cfg);
    let manager = SqliteConnectionManager::file(&path).with_init(move |c| c.execute_batch(&init));
    let pool = r2d2::Pool::builder()
        .max_size(cfg.pool_size)
        .connection_timeout(Duration::from_millis(cfg.busy_timeout_ms.max(1000)))
        .build(manager)?;
    Ok(pool)
}

/// Opens one SQLite connection outside the pool (the ledger writer owns one).
pub fn open_connection(cfg: &DatabaseConfig) -> Result<Connection, StoreError> {
    let c = Connection::open(cfg.sqlite_path())?;
    c.execute_batch(&pragmas(cfg))?;
    Ok(c)
}

/// Applies the SQLite migrations not yet recorded. Returns the versions applied now.
pub fn migrate(conn: &mut Connection) -> Result<Vec<i64>, StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )?;
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let done: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM schema_migrations WHERE version = ?1)",
            [version],
            |r| r.get(0),
        )?;
        if !done {
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_migrations(version, name, applied_at) VALUES (?1, ?2, ?3)",
                rusqlite::params![version, name, now_ms()],
            )?;
            applied.push(version);
        }
        tx.commit()?;
    }
    Ok(applied)
}

/// Opens the configured store and brings its schema up to date.
pub fn open_and_migrate(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
    let store = open(cfg)?;
    let applied = store.migrate()?;
    if !applied.is_empty() {
        tracing::info!(?applied, db = %cfg.describe(), "migrations applied");
    }
    Ok(store)
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The key-change counter maintained by triggers.
pub fn key_epoch(store: &Store) -> Result<i64, StoreError> {
    match store {
        Store::Sqlite(pool) => Ok(pool.get()?.query_row(
            "SELECT value FROM meta WHERE name = 'key_epoch'",
            [],
            |r| r.get(0),
        )?),
        Store::Postgres(pool) => pg::key_epoch(pool),
    }
}

/// Exact money: nano-USD in an i64. Conversions from the decimal USD users type are done
/// on the decimal text, never through binary floating point.
pub mod money {
    pub const NANO_PER_USD: i64 = 1_000_000_000;

    /// Parses "12.345" into nano-USD exactly. At most 9 decimals.
    pub fn parse_usd(s: &str) -> Result<i64, String> {
        let s = s.trim();
        let (neg, s) = match s.strip_prefix('-') {
            Some(r) => (true, r),
            None => (false, s),
        };
        let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
        if whole.is_empty() && frac.is_empty()
            || !whole.chars().all(|c| c.is_ascii_digit())
            || !frac.chars().all(|c| c.is_ascii_digit())
        {
            return Err(format!("`{s}` is not a USD amount like 12.50"));
        }
        if frac.len() > 9 {
            return Err("at most 9 decimal places (nano-USD)".into());
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "amount too large")?
        };
        let frac_n: i64 = format!("{frac:0<9}").parse().map_err(|_| "bad fraction")?;
        let v = whole
            .checked_mul(NANO_PER_USD)
            .and_then(|w| w.checked_add(frac_n))
            .ok_or("amount too large")?;
        Ok(if neg { -v } else { v })
    }

    /// Formats nano-USD as a decimal string with trailing zeros trimmed (at least 2 places).
    pub fn format_usd(nano: i64) -> String {
        let sign = if nano < 0 { "-" } else { "" };
        let n = nano.unsigned_abs();
        let whole = n / NANO_PER_USD as u64;
        let frac = format!("{:09}", n % NANO_PER_USD as u64);
        let frac = frac.trim_end_matches('0');
        let frac = if frac.len() < 2 {
            format!("{frac:0<2}")
        } else {
            frac.to_string()
        };
        format!("{sign}{whole}.{frac}")
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn usd_round_trips_exactly() {
            assert_eq!(parse_usd("12.5").unwrap(), 12_500_000_000);
            assert_eq!(parse_usd("0.000000001").unwrap(), 1);
            assert_eq!(parse_usd(".1").unwrap(), 100_000_000);
            assert!(parse_usd("1.0000000001").is_err());
            assert!(parse_usd("abc").is_err());
            assert_eq!(format_usd(12_500_000_000), "12.50");
            assert_eq!(format_usd(1), "0.000000001");
            assert_eq!(format_usd(0), "0.00");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pragmas_from_config_are_applied() {
        let (_dir, pool) = testing::sqlite_pool();
        let c = pool.get().unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!(sync, 1);
        let busy: i64 = c
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .unwrap();
        assert_eq!(busy, 5000);
    }

    #[test]
    fn migrations_run_once_on_either_store() {
        testing::each_store(|store| {
            assert!(store.migrate().unwrap().is_empty());
            let n: i64 = match store {
                Store::Sqlite(p) => p
                    .get()
                    .unwrap()
                    .query_row("SELECT COUNT(*) FROM schema_migrations", [], |r| r.get(0))
                    .unwrap(),
                Store::Postgres(p) => p
                    .get()
                    .unwrap()
                    .query_one("SELECT COUNT(*) FROM schema_migrations", &[])
                    .unwrap()
                    .get(0),
            };
            assert_eq!(n, MIGRATIONS.len() as i64);
            store.ping().unwrap();
            assert_eq!(key_epoch(store).unwrap(), 0);
        });
    }
}
