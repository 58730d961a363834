//! PostgreSQL (`database.url`): the pool, the migrations, and the same typed access as the
//! SQLite modules beside it, for several gateways sharing one database.
//!
//! The client is the synchronous `postgres` crate behind an r2d2 pool, like the SQLite code:
//! every store call already runs on a blocking thread (`spawn_blocking`, the ledger writer's
//! thread, the CLI), so one port serves both backends with the same shape. The `postgres`
//! client drives its connection with a small runtime of its own; it must never be used, nor
//! its last connection dropped, on a tokio worker: see [`PgPool`]'s `Drop`.
//!
//! Money stays integer nano-USD (`BIGINT`); every integer column is `BIGINT`, so the rows
//! read back as `i64` exactly as from SQLite.

pub mod accounts;
pub mod copy;
pub mod keys;
pub mod ledger;
pub mod usage;

use std::sync::Arc;
use std::time::Duration;

use r2d2_postgres::postgres::{self, Client, NoTls};
use r2d2_postgres::PostgresConnectionManager;

use super::{now_ms, StoreError};
use crate::config::DatabaseConfig;

pub type Manager = PostgresConnectionManager<NoTls>;
pub type PgConnection = r2d2::PooledConnection<Manager>;

/// The numbered migrations in PostgreSQL's dialect: the same versions and names as SQLite's
/// (`super::MIGRATIONS`), so `schema_migrations` reads the same on both.
pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "key_priority_and_model_limits",
        include_str!("../../../migrations/postgres/0002_key_priority_and_model_limits.sql"),
    ),
    (
        3,
        "usage_cache_hit",
        include_str!("../../../migrations/postgres/0003_usage_cache_hit.sql"),
    ),
    (
        4,
        "balance_leases",
        include_str!("../../../migrations/postgres/0004_balance_leases.sql"),
    ),
];

/// The advisory lock taken around applying migrations ("tollgate" in ASCII), so nodes that
/// start at once apply each migration exactly once.
const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// A pooled set of PostgreSQL connections; cheap to clone.
#[derive(Clone)]
pub struct PgPool(Arc<Inner>);

struct Inner {
    pool: Option<r2d2::Pool<Manager>>,
    /// The URL with its password replaced, for logs and errors.
    shown: String,
}

/// Closing a `postgres` connection runs its runtime, which panics on a tokio worker: the
/// last clone dropped there (a service's state at shutdown) closes them on a plain thread.
impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::spawn(move || drop(pool)).join();
            }
        }
    }
}

impl PgPool {
    /// A connection from the pool (waits at most `database.busy_timeout_ms`, 1 s or more).
    pub fn get(&self) -> Result<PgConnection, StoreError> {
        match &self.0.pool {
            Some(p) => Ok(p.get()?),
            None => Err(StoreError::Unavailable(
                "the database pool is closed".into(),
            )),
        }
    }

    /// The URL, password redacted.
    pub fn describe(&self) -> &str {
        &self.0.shown
    }
}

/// Replaces the password in a `postgres://user:password@host/db` URL (and a `password=`
/// query parameter) with `***`, for anything that is logged or shown.
pub fn redact(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            // The userinfo ends at the last `@` before the path.
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((user, host)) => match user.split_once(':') {
                    Some((name, _)) => format!("{scheme}://{name}:***@{host}{path}"),
                    None => format!("{scheme}://{user}@{host}{path}"),
                },
                None => head.to_string(),
            }
        }
        None => head.to_string(),
    };
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// An error with its causes (`error connecting to server: Connection refused …`): the
/// client's own text stops at the first. None of them holds the URL.
pub fn explain(e: &postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The client config from a URL, with a connect timeout and an application name unless the
/// URL sets them.
pub fn client_config(url: &str, timeout: Duration) -> Result<postgres::Config, StoreError> {
    let mut cfg: postgres::Config = url.parse()?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(timeout);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("tollgate");
    }
    Ok(cfg)
}

fn timeout(cfg: &DatabaseConfig) -> Duration {
    Duration::from_millis(cfg.busy_timeout_ms.max(1000))
}

/// Opens the pool on `url` (connecting `pool_size` connections now, so a wrong URL or an
/// unreachable server fails the start).
pub fn open(cfg: &DatabaseConfig, url: &str) -> Result<PgPool, StoreError> {
    // One direct connection first: the pool's error would only say that it timed out.
    connect(cfg, url)?;
    let manager = PostgresConnectionManager::new(client_config(url, timeout(cfg))?, NoTls);
    let pool = r2d2::Pool::builder()
        .max_size(cfg.pool_size)
        .connection_timeout(timeout(cfg))
        .build(manager)?;
    Ok(PgPool(Arc::new(Inner {
        pool: Some(pool),
        shown: redact(url),
    })))
}

/// One connection outside the pool (the ledger writer and `migrate --to` own one).
pub fn connect(cfg: &DatabaseConfig, url: &str) -> Result<Client, StoreError> {
    Ok(client_config(url, timeout(cfg))?.connect(NoTls)?)
}

/// Applies the migrations not yet recorded, all in one transaction under an advisory lock:
/// a node that starts while another migrates waits, then finds nothing left to do.
pub fn migrate(c: &mut Client) -> Result<Vec<i64>, StoreError> {
    let mut tx = c.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )?;
    let done: Vec<i64> = tx
        .query("SELECT version FROM schema_migrations", &[])?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations(version, name, applied_at) VALUES ($1, $2, $3)",
            &[&version, &name, &now_ms()],
        )?;
        applied.push(version);
    }
    tx.commit()?;
    Ok(applied)
}

/// The key-change counter maintained by triggers.
pub fn key_epoch(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(pool
        .get()?
        .query_one("SELECT value FROM meta WHERE name = 'key_epoch'", &[])?
        .get(0))
}

/// One round trip, for /readyz.
pub fn ping(pool: &PgPool) -> Result<(), StoreError> {
    pool.get()?.query_one("SELECT 1", &[])?;
    Ok(())
}

/// Dynamic parameters (built as SQLite values by the shared query builders) for PostgreSQL.
/// A NULL is sent as a `BIGINT` NULL: every nullable column that is set this way is one.
pub(super) fn params(
    args: &[rusqlite::types::Value],
) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    use rusqlite::types::Value;
    args.iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match v {
                Value::Null => Box::new(None::<i64>),
                Value::Integer(i) => Box::new(*i),
                Value::Real(f) => Box::new(*f),
                Value::Text(s) => Box::new(s.clone()),
                Value::Blob(b) => Box::new(b.clone()),
            }
        })
        .collect()
}

/// The parameters as the slice the client takes.
pub(super) fn refs(
    p: &[Box<dyn postgres::types::ToSql + Sync>],
) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    p.iter().map(|b| b.as_ref()).collect()
}

/// A `BIGINT` column that holds a `u32` field (limits); a value out of range reads as none.
pub(super) fn opt_u32(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

/// A `BIGINT` column that holds a `u8` field (priorities); a value out of range reads as none.
pub(super) fn opt_u8(v: Option<i64>) -> Option<u8> {
    v.and_then(|v| u8::try_from(v).ok())
}

/// A fresh database per test, dropped (with its connections) when the guard goes.
#[cfg(test)]
pub mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// The server the tests use: `TOLLGATE_TEST_PG` (a URL without a database), else the
    /// local one with trust auth.
    pub fn server() -> String {
        std::env::var("TOLLGATE_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
    }

    pub struct TestDb {
        pub name: String,
        pub url: String,
    }

    impl TestDb {
        /// Creates `tollgate_test_<pid>_<n>`.
        pub fn create() -> TestDb {
            static N: AtomicUsize = AtomicUsize::new(0);
            let name = format!(
                "tollgate_test_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            );
            let mut admin = Client::connect(&format!("{}/postgres", server()), NoTls)
                .expect("PostgreSQL for the tests (see scripts/deps.sh)");
            // Left over by a run that was killed: a pid is reused only across runs.
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .unwrap();
            admin
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .unwrap();
            TestDb {
                url: format!("{}/{name}", server()),
                name,
            }
        }
    }

    impl Drop for TestDb {
        fn drop(&mut self) {
            if let Ok(mut admin) = Client::connect(&format!("{}/postgres", server()), NoTls) {
                let _ = admin.batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_shown() {
        for (url, shown) in [
            (
                "postgres://u:hunter22@h:5432/db",
                "postgres://u:***@h:5432/db",
            ),
            ("postgresql://u@h/db", "postgresql://u@h/db"),
            (
                "postgres://h/db?sslmode=disable&password=hunter22",
                "postgres://h/db?sslmode=disable&password=***",
            ),
            ("postgres://u:p@ss:w@h/db", "postgres://u:***@h/db"),
        ] {
            assert_eq!(redact(url), shown);
        }
    }

    #[test]
    fn migrations_match_sqlite_s_and_concurrent_starts_apply_them_once() {
        assert_eq!(
            MIGRATIONS.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(),
            super::super::MIGRATIONS
                .iter()
                .map(|m| (m.0, m.1))
                .collect::<Vec<_>>()
        );
        let db = testing::TestDb::create();
        let runs: Vec<_> = (0..3)
            .map(|_| {
                let url = db.url.clone();
                std::thread::spawn(move || {
                    migrate(&mut connect(&DatabaseConfig::default(), &url).unwrap()).unwrap()
                })
            })
            .collect();
        let mut applied: Vec<i64> = runs.into_iter().flat_map(|t| t.join().unwrap()).collect();
        applied.sort();
        let all: Vec<i64> = MIGRATIONS.iter().map(|m| m.0).collect();
        assert_eq!(applied, all);
    }
}
