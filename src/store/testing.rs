//! Scratch stores for unit tests: each store-level test runs the same body on SQLite (a temp
//! file) and on PostgreSQL (a fresh database, dropped afterwards, also when the body panics).

use super::{open_and_migrate, pg, Pool, Store};
use crate::config::DatabaseConfig;

/// A scratch SQLite database.
pub fn sqlite_pool() -> (tempfile::TempDir, Pool) {
    let dir = tempfile::tempdir().unwrap();
    let pool =
        super::open_sqlite(&DatabaseConfig::default().with_sqlite_path(dir.path().join("t.db")))
            .unwrap();
    super::migrate(&mut pool.get().unwrap()).unwrap();
    (dir, pool)
}

/// A scratch database of either kind; what it holds is removed on drop.
pub enum Scratch {
    Sqlite(tempfile::TempDir),
    Postgres(pg::testing::TestDb),
}

/// Runs `f` with the config of a scratch SQLite database, then of a scratch PostgreSQL one.
pub fn each_db(f: impl Fn(&DatabaseConfig)) {
    for kind in ["sqlite", "postgres"] {
        let (cfg, _scratch) = scratch(kind);
        eprintln!("-- on {kind}");
        f(&cfg);
    }
}

/// A scratch database's config, and the guard that removes it. Small pools: tests run in
/// parallel against one server.
pub fn scratch(kind: &str) -> (DatabaseConfig, Scratch) {
    let base = DatabaseConfig {
        pool_size: 3,
        ..DatabaseConfig::default()
    };
    if kind == "sqlite" {
        let dir = tempfile::tempdir().unwrap();
        (
            base.with_sqlite_path(dir.path().join("t.db")),
            Scratch::Sqlite(dir),
        )
    } else {
        let db = pg::testing::TestDb::create();
        let cfg = DatabaseConfig {
            url: Some(db.url.clone()),
            ..base
        };
        (cfg, Scratch::Postgres(db))
    }
}

/// Runs `f` on a migrated scratch SQLite store, then on a migrated scratch PostgreSQL one.
pub fn each_store(f: impl Fn(&Store)) {
    each_db(|cfg| {
        let store = open_and_migrate(cfg).unwrap();
        f(&store);
    });
}

/// One `COUNT(*)`-like integer query without parameters, on either store.
pub fn scalar(store: &Store, sql: &str) -> i64 {
    match store {
        Store::Sqlite(p) => p.get().unwrap().query_row(sql, [], |r| r.get(0)).unwrap(),
        Store::Postgres(p) => p.get().unwrap().query_one(sql, &[]).unwrap().get(0),
    }
}
