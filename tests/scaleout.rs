//! Several `tollgate` nodes sharing one database and one Redis (`redis:`): limits and
//! concurrency caps hold across the nodes, a revoke reaches every node within a second, the
//! registry lists the nodes, and a Redis that is killed, paused and brought back never hangs
//! a request and is used again without a restart. Each test starts its own `redis-server`
//! on a free port, so it can kill it.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::pg::TestDb;
use support::redis::RedisServer;
use support::{channel, metric_sum, Gateway, MockServer};

const PROVIDER_KEY: &str = "sk-provider-scaleout";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// `n` nodes serving `m` from the mock, on one PostgreSQL database and one Redis.
fn fleet(
    mock: &MockServer,
    redis: &RedisServer,
    db: &TestDb,
    n: usize,
    extra: &str,
) -> Vec<Gateway> {
    let ch = channel("main", &mock.base_url(), PROVIDER_KEY, &["m"], 1);
    support::redis::fleet_on(&ch, redis, n, extra, Some(&db.url))
}

fn body(x_mock: Value) -> Value {
    json!({"model": "m", "max_tokens": 5,
           "messages": [{"role": "user", "content": "hello"}], "x_mock": x_mock})
}

async fn send(gw: &Gateway, key: &str, x_mock: Value) -> (u16, Value, Duration) {
    let started = Instant::now();
    let r = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body(x_mock))
        .send()
        .await
        .expect("gateway answers");
    let status = r.status().as_u16();
    let v = r.json().await.unwrap_or(Value::Null);
    (status, v, started.elapsed())
}

async fn admin(gw: &Gateway, method: reqwest::Method, path: &str) -> (u16, Value) {
    let r = client()
        .request(method, gw.admin_url(path))
        .bearer_auth(&gw.admin_token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn key_id(gw: &Gateway, account: &str) -> i64 {
    let (_, v) = admin(gw, reqwest::Method::GET, "/admin/keys").await;
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["account"] == account)
        .and_then(|k| k["id"].as_i64())
        .expect("the key is listed")
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_per_minute_hold_across_three_nodes() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let db = TestDb::create();
    let nodes = fleet(&mock, &redis, &db, 3, "");
    let key = nodes[0].new_key("acme", &["--rpm", "60"]);

    // The registry lists the three nodes (each heartbeats at start).
    wait_for(
        "three nodes in the registry",
        Duration::from_secs(10),
        || async {
            let (s, v) = admin(&nodes[0], reqwest::Method::GET, "/admin/nodes").await;
            s == 200 && v["data"].as_array().is_some_and(|a| a.len() == 3)
        },
    )
    .await;

    // 150 requests spread over the nodes, 6 at a time. One node alone would admit 60, three
    // independent ones 180; shared, the fleet admits 60 plus at most one lease per node and
    // what the bucket refills meanwhile (1 per second).
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let nodes = std::sync::Arc::new(nodes);
    for w in 0..6 {
        let (nodes, key) = (nodes.clone(), key.clone());
        tasks.spawn(async move {
            let mut statuses = Vec::new();
            for i in 0..25 {
                let gw = &nodes[(w + i) % 3];
                statuses.push(send(gw, &key, json!({})).await.0);
            }
            statuses
        });
    }
    let mut statuses = Vec::new();
    while let Some(r) = tasks.join_next().await {
        statuses.extend(r.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let limited = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(ok + limited, 150, "{statuses:?}");
    let most = 60 + 3 + elapsed.ceil() as usize + 1;
    assert!(
        (57..=most).contains(&ok),
        "admitted {ok} in {elapsed:.1}s (expected 57..={most})"
    );
    assert_eq!(
        mock.requests().len(),
        ok,
        "refused requests never reach the provider"
    );
    // The bucket lives in Redis under the deployment's namespace.
    let keys = redis.cli(&["--scan", "--pattern", &format!("t{}:rl:*", redis.port)]);
    assert!(keys.contains(":rpm"), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrency_cap_holds_across_nodes_and_frees_its_places() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let db = TestDb::create();
    let nodes = std::sync::Arc::new(fleet(&mock, &redis, &db, 3, ""));
    let key = nodes[0].new_key("acme", &["--concurrency", "3"]);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (nodes, key) = (nodes.clone(), key.clone());
        tasks.spawn(async move { send(&nodes[i % 3], &key, json!({"delay_ms": 250})).await });
    }
    while let Some(r) = tasks.join_next().await {
        let (status, v, _) = r.unwrap();
        assert_eq!(status, 200, "{v}");
    }
    let peak = mock.connections().peak_requests;
    assert!(
        peak <= 3,
        "{peak} requests at the provider at once; the cap is 3"
    );
    assert!(
        peak >= 2,
        "the nodes did run requests side by side ({peak})"
    );
    // Every place was given back.
    let id = key_id(&nodes[0], "acme").await;
    let set = format!("t{}:cc:key:{id}", redis.port);
    wait_for(
        "the places to be given back",
        Duration::from_secs(5),
        || async { redis.cli(&["ZCARD", &set]).trim() == "0" },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_revoked_on_one_node_is_refused_on_the_others_within_a_second() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let db = TestDb::create();
    let nodes = fleet(&mock, &redis, &db, 3, "");
    let key = nodes[0].new_key("acme", &[]);
    // Every node has the key in its cache.
    for gw in &nodes {
        assert_eq!(send(gw, &key, json!({})).await.0, 200);
    }
    let id = key_id(&nodes[0], "acme").await;
    let (s, _) = admin(
        &nodes[0],
        reqwest::Method::DELETE,
        &format!("/admin/keys/{id}"),
    )
    .await;
    assert_eq!(s, 200);
    let revoked = Instant::now();
    for gw in &nodes[1..] {
        loop {
            let (status, _, _) = send(gw, &key, json!({})).await;
            if status == 401 {
                break;
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "node still admits a revoked key after {:?}",
                revoked.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_paused_and_back_never_hangs_a_request() {
    let mock = MockServer::start().await;
    let mut redis = RedisServer::start();
    let db = TestDb::create();
    let nodes = fleet(&mock, &redis, &db, 2, "");
    let key = nodes[0].new_key("acme", &["--rpm", "6000"]);
    for i in 0..10 {
        assert_eq!(send(&nodes[i % 2], &key, json!({})).await.0, 200);
    }

    // Killed: every request is answered at once under local_share (6000 ÷ 2 per node).
    redis.kill();
    for i in 0..20 {
        let (status, v, took) = send(&nodes[i % 2], &key, json!({})).await;
        assert_eq!(status, 200, "{v}");
        assert!(took < Duration::from_secs(2), "a request took {took:?}");
    }
    assert!(metric_sum(&nodes[0], "tollgate_redis_errors_total").await > 0.0);
    // The heartbeat fails too; after three failures the breaker is open.
    wait_for("the breaker to open", Duration::from_secs(10), || async {
        let (s, v) = admin(&nodes[0], reqwest::Method::GET, "/readyz").await;
        assert_eq!(s, 200, "local_share keeps the node ready: {v}");
        v["redis"]["up"] == false && v["redis"]["breaker_open"] == true
    })
    .await;

    // Back (empty, on the same port): used again without a restart.
    redis.restart();
    wait_for("redis reachable again", Duration::from_secs(10), || async {
        let _ = send(&nodes[0], &key, json!({})).await;
        let (_, v) = admin(&nodes[0], reqwest::Method::GET, "/readyz").await;
        v["redis"]["up"] == true
    })
    .await;
    wait_for(
        "the bucket back in redis",
        Duration::from_secs(10),
        || async {
            let _ = send(&nodes[1], &key, json!({})).await;
            redis
                .cli(&["--scan", "--pattern", &format!("t{}:rl:*", redis.port)])
                .contains(":rpm")
        },
    )
    .await;

    // Paused: calls time out (50 ms) and the breaker opens; nothing waits for Redis.
    let pause = redis.pause(2.0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..10 {
        let (status, v, took) = send(&nodes[i % 2], &key, json!({})).await;
        assert_eq!(status, 200, "{v}");
        assert!(
            took < Duration::from_millis(1500),
            "a request took {took:?}"
        );
    }
    pause.join().unwrap();
    for gw in &nodes {
        assert!(gw.log().find("panicked").is_none(), "{}", gw.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_on_error_deny_limited_requests_are_refused_while_redis_is_down() {
    let mock = MockServer::start().await;
    let mut redis = RedisServer::start();
    let ch = channel("main", &mock.base_url(), PROVIDER_KEY, &["m"], 1);
    let gw = Gateway::start(
        &ch,
        &format!(
            "redis: {{ url: \"{}\", timeout_ms: 50, on_error: deny }}\n",
            redis.url()
        ),
    );
    let limited = gw.new_key("limited", &["--rpm", "100"]);
    let free = gw.new_key("free", &[]);
    assert_eq!(send(&gw, &limited, json!({})).await.0, 200);
    redis.kill();
    // What the node had leased is spent first; then it refuses.
    let mut refused = None;
    for _ in 0..5 {
        let (status, v, _) = send(&gw, &limited, json!({})).await;
        if status != 200 {
            refused = Some((status, v));
            break;
        }
    }
    let (status, v) = refused.expect("refused once its lease is spent");
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["error"]["code"], "limits_unavailable");
    // A key under no limit needs no Redis.
    assert_eq!(send(&gw, &free, json!({})).await.0, 200);
    let (s, v) = admin(&gw, reqwest::Method::GET, "/readyz").await;
    assert_eq!(s, 503, "{v}");
}

/// 1,000,000 nano-USD per prompt token, 2,000,000 per completion token.
const PRICED: &str =
    "pricing:\n  models:\n    m: { input: 1000.0, output: 2000.0 }\n  unpriced: reject\n";

async fn wait_scalar(db: &TestDb, sql: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = db.scalar(sql);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {got}, expected {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_never_spend_more_than_the_balance() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let db = TestDb::create();
    let nodes = std::sync::Arc::new(fleet(&mock, &redis, &db, 3, PRICED));
    // About 10 requests' worst case (prompt estimate + 10 output tokens).
    let key = nodes[0].account_with_key("poor", "0.3", &[]);
    let before = db.scalar("SELECT balance_nano FROM accounts WHERE name = 'poor'");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300 {
        let (nodes, key) = (nodes.clone(), key.clone());
        tasks.spawn(async move { send(&nodes[i % 3], &key, json!({})).await });
    }
    let (mut ok, mut refused) = (0i64, 0);
    while let Some(r) = tasks.join_next().await {
        let (status, v, _) = r.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                assert_eq!(v["error"]["code"], "insufficient_quota", "{v}");
                refused += 1;
            }
            other => panic!("{other}: {v}"),
        }
    }
    assert_eq!(ok + refused, 300);
    assert!(ok >= 5, "admitted {ok}");
    assert_eq!(
        mock.requests().len() as i64,
        ok,
        "refused requests never reach the provider"
    );
    wait_scalar(
        &db,
        "SELECT COUNT(*) FROM usage_ledger WHERE status = 200",
        ok,
    )
    .await;
    let spent = db.scalar("SELECT COALESCE(SUM(cost_nano), 0)::BIGINT FROM usage_ledger");
    let after = db.scalar("SELECT balance_nano FROM accounts WHERE name = 'poor'");
    assert!(spent <= before, "spent {spent} of {before}");
    assert_eq!(
        after,
        before - spent,
        "the balance moved by the ledger's sum"
    );
    let served: i64 = mock
        .served()
        .iter()
        .map(|s| s.prompt_tokens as i64 * 1_000_000 + s.completion_tokens as i64 * 2_000_000)
        .sum();
    assert_eq!(spent, served, "price x the tokens the mock served");
    // The slices never add up to more than the balance.
    assert!(db.scalar("SELECT leased_nano FROM accounts WHERE name = 'poor'") <= after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_requests_over_three_nodes_are_billed_exactly_once_each() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let db = TestDb::create();
    let nodes = std::sync::Arc::new(fleet(&mock, &redis, &db, 3, PRICED));
    let key = nodes[0].account_with_key("rich", "1000", &[]);
    let before = db.scalar("SELECT balance_nano FROM accounts WHERE name = 'rich'");
    // 300 requests, 32 in flight at a time over the three nodes.
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..300usize {
        let (nodes, key) = (nodes.clone(), key.clone());
        let permit = in_flight.clone().acquire_owned().await.unwrap();
        tasks.spawn(async move {
            let _permit = permit;
            let stream = i % 2 == 0;
            let mut b = json!({"model": "m", "max_tokens": 5 + i % 7, "stream": stream,
                               "user": format!("u{i}"),
                               "messages": [{"role": "user", "content": format!("q{i}")}],
                               "x_mock": {"chunks": 1 + i % 5}});
            if stream && i % 4 == 0 {
                b["stream_options"] = json!({"include_usage": true});
            }
            let r = client()
                .post(nodes[i % 3].url("/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&b)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let text = r.text().await.unwrap_or_default();
            (status, text)
        });
    }
    while let Some(r) = tasks.join_next().await {
        let (status, text) = r.unwrap();
        assert_eq!(status, 200, "{text}");
    }
    wait_scalar(&db, "SELECT COUNT(*) FROM usage_ledger", 300).await;
    assert_eq!(
        db.scalar("SELECT COUNT(DISTINCT request_id) FROM usage_ledger"),
        300
    );
    let spent = db.scalar("SELECT SUM(cost_nano)::BIGINT FROM usage_ledger");
    // One answer per request (a request the gateway had to send again, after a pooled
    // connection failed under it, is served twice with the same usage).
    let by_user: std::collections::HashMap<String, i64> = mock
        .served()
        .iter()
        .map(|s| {
            let cost = s.prompt_tokens as i64 * 1_000_000 + s.completion_tokens as i64 * 2_000_000;
            (s.user.clone().unwrap_or_default(), cost)
        })
        .collect();
    assert_eq!(by_user.len(), 300);
    let served: i64 = by_user.values().sum();
    assert_eq!(
        spent, served,
        "ledger sum = price x the tokens the mock served"
    );
    wait_scalar(
        &db,
        "SELECT balance_nano FROM accounts WHERE name = 'rich'",
        before - spent,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_stream_loses_no_committed_row_and_its_slice_comes_back() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let db = TestDb::create();
    let extra = format!("{PRICED}accounting: {{ lease_ttl_s: 6 }}\n");
    let mut nodes = fleet(&mock, &redis, &db, 3, &extra);
    let key = nodes[0].account_with_key("acme", "100", &[]);
    for i in 0..9 {
        assert_eq!(send(&nodes[i % 3], &key, json!({})).await.0, 200);
    }
    wait_scalar(&db, "SELECT COUNT(*) FROM usage_ledger", 9).await;
    assert!(db.scalar("SELECT COUNT(*) FROM account_leases WHERE node = 'node0'") == 1);
    // A stream on node 0, held at the mock's gate; then node 0 is killed.
    let stream = {
        let (url, key) = (nodes[0].url("/v1/chat/completions"), key.clone());
        tokio::spawn(async move {
            let _ = client()
                .post(url)
                .bearer_auth(key)
                .json(&json!({"model": "m", "stream": true, "max_tokens": 5,
                              "messages": [{"role": "user", "content": "held"}],
                              "x_mock": {"gate": true}}))
                .send()
                .await;
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock.chunks_sent() == 0 {
        assert!(Instant::now() < deadline, "the stream never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut dead = nodes.remove(0);
    let mut child = dead.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    mock.open_gate();
    let _ = stream.await;
    // The others go on serving.
    for i in 0..6 {
        assert_eq!(send(&nodes[i % 2], &key, json!({})).await.0, 200);
    }
    // Its slice expires (6 s) and is reclaimed; the sum of slices is the live nodes' again.
    wait_scalar(
        &db,
        "SELECT COUNT(*) FROM account_leases WHERE node = 'node0'",
        0,
    )
    .await;
    let leased = db.scalar("SELECT leased_nano FROM accounts WHERE name = 'acme'");
    let rows = db.scalar("SELECT COALESCE(SUM(amount_nano), 0)::BIGINT FROM account_leases");
    assert_eq!(leased, rows);
    // Every committed row is there: the 9 before, the 6 after.
    wait_scalar(
        &db,
        "SELECT COUNT(*) FROM usage_ledger WHERE status = 200",
        15,
    )
    .await;
    let spent = db.scalar("SELECT SUM(cost_nano)::BIGINT FROM usage_ledger");
    let balance = db.scalar("SELECT balance_nano FROM accounts WHERE name = 'acme'");
    assert_eq!(balance, 100_000_000_000 - spent);
}
