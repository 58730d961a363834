//! The real binary on PostgreSQL (`database: { url }`), each test in a fresh database that
//! is dropped afterwards: exact billing through the PostgreSQL ledger writer, and
//! `tollgate migrate --from sqlite:… --to postgres://…` keeping every balance, key and row.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::pg::TestDb;
use support::{wait_exit, Gateway, MockServer};

const PRICING: &str = "pricing:\n  models:\n    m1: { input: 2.00, output: 8.00, cached_input: 1.00 }\n  unpriced: reject\n";

fn channel(mock: &MockServer) -> String {
    format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1] }}\n",
        mock.base_url()
    )
}

/// `n` requests, streamed and not, all answered 200.
async fn send(gw: &Gateway, key: &str, n: usize) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for i in 0..n {
        let content = "word ".repeat(1 + i % 17);
        let body = if i % 3 == 0 {
            json!({"model": "m1", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": content}], "x_mock": {"chunks": 2 + i % 5}})
        } else {
            json!({"model": "m1", "messages": [{"role": "user", "content": content}], "x_mock": {"cached_tokens": i % 3, "chunks": 1 + i % 4}})
        };
        let r = c
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
}

/// Waits (bounded) until `count()` reaches `n`.
async fn wait_for(n: i64, count: impl Fn() -> i64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let have = count();
        if have >= n {
            return;
        }
        assert!(Instant::now() < deadline, "ledger has {have} of {n} rows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, and a clean exit (the ledger drained, no panic closing the pool).
async fn stop(gw: &mut Gateway) {
    let mut child = gw.sigterm();
    let (status, _) =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(30)))
            .await
            .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        gw.log()
    );
    assert!(!gw.log().contains("panicked"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_the_ledger_sum_is_the_balance_decrease_to_the_nano_usd() {
    let db = TestDb::create();
    let mock = MockServer::start().await;
    let (ch, url) = (channel(&mock), db.url.clone());
    let mut gw =
        tokio::task::spawn_blocking(move || Gateway::start_on_postgres(&ch, PRICING, &url))
            .await
            .unwrap();
    let key = gw.account_with_key("acme", "10", &[]);
    let before = 10_000_000_000i64;
    assert_eq!(
        db.scalar("SELECT balance_nano FROM accounts WHERE name = 'acme'"),
        before
    );
    send(&gw, &key, 30).await;
    wait_for(30, || db.scalar("SELECT COUNT(*) FROM usage_ledger")).await;
    let charged = db.scalar("SELECT COALESCE(SUM(cost_nano), 0)::BIGINT FROM usage_ledger");
    let after = db.scalar("SELECT balance_nano FROM accounts WHERE name = 'acme'");
    let spent = db.scalar("SELECT spent_nano FROM api_keys");
    assert!(charged > 0);
    assert_eq!((before - after, spent), (charged, charged));
    // The admin API and the CLI read the same store.
    let usage: serde_json::Value = reqwest::Client::new()
        .get(gw.admin_url("/admin/usage?account=acme"))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        usage
            .to_string()
            .contains(&format!("\"cost_nano\":{charged}")),
        "{usage}"
    );
    let out = gw.cli(&["usage", "--account", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A revoke through the CLI reaches the running gateway through the key epoch trigger.
    let out = gw.cli(&["keys", "revoke", &key[..12]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "m1", "messages": [{"role": "user", "content": "x"}]}))
            .send()
            .await
            .unwrap();
        if r.status() == 401 || r.status() == 403 {
            break;
        }
        assert!(Instant::now() < deadline, "the revoked key still works");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(&mut gw).await;
    assert_eq!(
        db.scalar("SELECT COALESCE(SUM(cost_nano), 0)::BIGINT FROM usage_ledger"),
        before - db.scalar("SELECT balance_nano FROM accounts WHERE name = 'acme'")
    );
}

/// One text column of every row, from the SQLite file.
fn sqlite_texts(path: &std::path::Path, sql: &str) -> Vec<String> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut st = c.prepare(sql).unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<String>, _>>()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_from_sqlite_to_postgres_keeps_every_balance_key_and_row() {
    let mock = MockServer::start().await;
    let ch = channel(&mock);
    let ch2 = ch.clone();
    let mut gw = tokio::task::spawn_blocking(move || Gateway::start(&ch2, PRICING))
        .await
        .unwrap();
    let key = gw.account_with_key("acme", "10", &[]);
    let other = gw.account_with_key("zeta", "0.5", &[]);
    send(&gw, &key, 12).await;
    send(&gw, &other, 3).await;
    stop(&mut gw).await;
    let sqlite = gw.db_path();

    let db = TestDb::create();
    let from = format!("sqlite:{}", sqlite.display());
    let out = gw.cli(&["migrate", "--from", &from, "--to", &db.url]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("copied 2 account(s), 2 key(s), 15 ledger row(s)"),
        "{stdout}"
    );
    // Every row, compared as text: the same ids, balances, hashes, spends and costs.
    for (sqlite_sql, pg_sql) in [
        (
            "SELECT id || ' ' || name || ' ' || grp || ' ' || balance_nano || ' ' || created_at FROM accounts ORDER BY id",
            "SELECT id || ' ' || name || ' ' || grp || ' ' || balance_nano || ' ' || created_at FROM accounts ORDER BY id",
        ),
        (
            "SELECT id || ' ' || account_id || ' ' || prefix || ' ' || lower(hex(hash)) || ' ' || spent_nano FROM api_keys ORDER BY id",
            "SELECT id || ' ' || account_id || ' ' || prefix || ' ' || encode(hash, 'hex') || ' ' || spent_nano FROM api_keys ORDER BY id",
        ),
        (
            "SELECT request_id || ' ' || ts || ' ' || key_id || ' ' || cost_nano || ' ' || prompt_tokens || ' ' || completion_tokens || ' ' || stream FROM usage_ledger ORDER BY request_id",
            "SELECT request_id || ' ' || ts || ' ' || key_id || ' ' || cost_nano || ' ' || prompt_tokens || ' ' || completion_tokens || ' ' || stream FROM usage_ledger ORDER BY request_id COLLATE \"C\"",
        ),
    ] {
        let (a, b) = (sqlite_texts(&sqlite, sqlite_sql), db.texts(pg_sql));
        assert!(!a.is_empty());
        assert_eq!(a, b);
    }
    // A second copy into the now non-empty database is refused.
    let out = gw.cli(&["migrate", "--from", &from, "--to", &db.url]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));

    // The copied key works on a gateway on PostgreSQL, and bills from the copied balance.
    let url = db.url.clone();
    let mut pg_gw =
        tokio::task::spawn_blocking(move || Gateway::start_on_postgres(&ch, PRICING, &url))
            .await
            .unwrap();
    let before = db.scalar("SELECT balance_nano FROM accounts WHERE name = 'acme'");
    send(&pg_gw, &key, 2).await;
    wait_for(17, || db.scalar("SELECT COUNT(*) FROM usage_ledger")).await;
    let after = db.scalar("SELECT balance_nano FROM accounts WHERE name = 'acme'");
    let charged = db.scalar(
        "SELECT SUM(cost_nano)::BIGINT FROM usage_ledger u JOIN accounts a ON a.id = u.account_id WHERE a.name = 'acme'",
    );
    assert_eq!(10_000_000_000 - after, charged);
    assert!(before > after);
    stop(&mut pg_gw).await;
}
