//! A fresh PostgreSQL database per test (`tollgate_it_<pid>_<n>`), dropped with its
//! connections when the guard goes, also when the test panics. The server is
//! `TOLLGATE_TEST_PG` (a URL without a database), else the local one with trust auth that
//! `scripts/deps.sh` makes sure of.

use std::sync::atomic::{AtomicUsize, Ordering};

use postgres::{Client, NoTls};

pub fn server() -> String {
    std::env::var("TOLLGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub struct TestDb {
    pub name: String,
    pub url: String,
}

fn admin() -> Client {
    Client::connect(&format!("{}/postgres", server()), NoTls)
        .expect("PostgreSQL for the tests (scripts/deps.sh installs and starts it)")
}

/// Runs `f` on a plain thread: the `postgres` client runs a runtime of its own, which
/// panics on a tokio test's thread.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

impl TestDb {
    pub fn create() -> TestDb {
        off_runtime(TestDb::create_here)
    }

    fn create_here() -> TestDb {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tollgate_it_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut c = admin();
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        TestDb {
            url: format!("{}/{name}", server()),
            name,
        }
    }

    /// One `BIGINT` (or `COUNT`) from a query without parameters.
    pub fn scalar(&self, sql: &str) -> i64 {
        off_runtime(|| {
            let mut c = Client::connect(&self.url, NoTls).unwrap();
            c.query_one(sql, &[]).unwrap().get(0)
        })
    }

    /// The one `TEXT` column of every row of a query without parameters.
    pub fn texts(&self, sql: &str) -> Vec<String> {
        off_runtime(|| {
            let mut c = Client::connect(&self.url, NoTls).unwrap();
            c.query(sql, &[])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect()
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = &self.name;
        off_runtime(|| {
            if let Ok(mut c) = Client::connect(&format!("{}/postgres", server()), NoTls) {
                let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        });
    }
}
