//! The caches' shared tier in Redis, with two nodes on one database and one Redis of the
//! test's own: a response stored by one node is a hit on the other (in either form), a key
//! looked up by one node is found in Redis by the other, and with Redis killed requests
//! still succeed while `tollgate_cache_errors_total` grows.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::redis::{fleet, RedisServer};
use support::{metric, Gateway, MockServer};

fn channels(mock: &MockServer) -> String {
    format!(
        "  - {{ name: main, base_url: \"{}\", api_key: sk-up, models: [m1] }}\n",
        mock.base_url()
    )
}

const CACHE: &str = "cache:\n  responses: { backend: redis, ttl_s: 60 }\n";

fn chat(content: &str, stream: bool) -> Value {
    json!({"model": "m1", "temperature": 0, "stream": stream,
           "messages": [{"role": "user", "content": content}]})
}

/// `(status, x-tollgate-cache, body)`.
async fn send(gw: &Gateway, key: &str, body: &Value) -> (u16, String, String) {
    let r = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    let status = r.status().as_u16();
    let cache = r
        .headers()
        .get("x-tollgate-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, cache, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_stored_on_one_node_is_a_hit_on_the_other_in_either_form() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let nodes = fleet(&channels(&mock), &redis, 2, CACHE);
    let key = nodes[0].new_key("acme", &[]);

    let (s, c, first) = send(&nodes[0], &key, &chat("shared", false)).await;
    assert_eq!((s, c.as_str()), (200, "miss"), "{first}");
    // Written to Redis in the background: the other node finds it there.
    let mut second = None;
    for _ in 0..100 {
        let (s, c, text) = send(&nodes[1], &key, &chat("shared", false)).await;
        assert_eq!(s, 200);
        if c == "hit" {
            second = Some(text);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = second.expect("node 2 hits what node 1 stored");
    let a: Value = serde_json::from_str(&first).unwrap();
    let b: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(a["choices"], b["choices"]);
    assert_eq!(a["usage"], b["usage"]);
    // The stored JSON answer replays as a stream on the other node too.
    let (s, c, sse) = send(&nodes[1], &key, &chat("shared", true)).await;
    assert_eq!((s, c.as_str()), (200, "hit"));
    assert!(sse.contains("data: [DONE]"), "{sse}");
    assert_eq!(mock.requests().len(), 1, "one upstream call for the fleet");
    let keys = redis.cli(&["--scan", "--pattern", &format!("t{}:rc:v1:*", redis.port)]);
    assert_eq!(keys.lines().count(), 1, "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_found_by_one_node_is_read_from_redis_by_the_other() {
    let mock = MockServer::start().await;
    let redis = RedisServer::start();
    let nodes = fleet(&channels(&mock), &redis, 2, "");
    let key = nodes[0].new_key("acme", &[]);
    assert_eq!(send(&nodes[0], &key, &chat("a", false)).await.0, 200);
    let lookups = "tollgate_key_store_lookups_total{result=\"found\"}";
    assert_eq!(metric(&nodes[0], lookups).await, 1.0);
    // Stored in Redis in the background; node 2 reads it there, not from the store.
    let hit = "tollgate_cache_requests_total{cache=\"keys\",result=\"hit\"}";
    for _ in 0..100 {
        if redis
            .cli(&["--scan", "--pattern", &format!("t{}:kc:v1:*", redis.port)])
            .contains("kc:v1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(send(&nodes[1], &key, &chat("b", false)).await.0, 200);
    assert_eq!(metric(&nodes[1], hit).await, 1.0);
    assert_eq!(metric(&nodes[1], lookups).await, 0.0);

    // An unknown key is cached as unknown for the fleet too.
    for gw in &nodes {
        assert_eq!(
            send(gw, "sk-tg-unknown-0123456789", &chat("c", false))
                .await
                .0,
            401
        );
    }
    let missing = "tollgate_key_store_lookups_total{result=\"unknown\"}";
    let total = metric(&nodes[0], missing).await + metric(&nodes[1], missing).await;
    assert!(total <= 2.0, "{total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_redis_killed_requests_succeed_and_the_error_counter_grows() {
    let mock = MockServer::start().await;
    let mut redis = RedisServer::start();
    let nodes = fleet(&channels(&mock), &redis, 2, CACHE);
    let key = nodes[0].new_key("acme", &[]);
    assert_eq!(send(&nodes[0], &key, &chat("before", false)).await.0, 200);
    redis.kill();
    let errors = "tollgate_cache_errors_total{cache=\"responses\"}";
    let before = metric(&nodes[1], errors).await;
    for i in 0..5 {
        let (s, c, text) = send(&nodes[1], &key, &chat(&format!("down {i}"), false)).await;
        assert_eq!(s, 200, "{text}");
        assert_eq!(c, "miss");
    }
    // A repeat is still a hit from the node's own tier.
    assert_eq!(send(&nodes[1], &key, &chat("down 0", false)).await.1, "hit");
    assert!(metric(&nodes[1], errors).await > before);
}
