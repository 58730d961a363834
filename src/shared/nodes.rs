//! The node registry: each node heartbeats into `{ns}:nodes` (a sorted set scored by the
//! last heartbeat, on Redis's clock) with its details under `{ns}:node:{id}`. The live count
//! sizes the `local_share` fallback; `GET /admin/nodes` lists the nodes.

use std::sync::Arc;
use std::time::Duration;

use redis::Script;
use serde_json::{json, Value};

use super::{Op, Redis};

/// A node that has not heartbeat for this long is not counted.
pub const NODE_TTL: Duration = Duration::from_secs(6);
/// How often a node heartbeats.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

const BEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ttl)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
return redis.call('ZCOUNT', KEYS[1], now - ttl, '+inf')
"#;

pub struct Nodes {
    redis: Arc<Redis>,
    beat: Script,
    /// What this node says of itself.
    info: Value,
}

impl Nodes {
    pub fn new(redis: Arc<Redis>, listen: &str, admin_listen: &str) -> Nodes {
        let info = json!({
            "id": redis.node_id,
            "listen": listen,
            "admin_listen": admin_listen,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started_ms": crate::store::now_ms(),
        });
        Nodes {
            redis,
            beat: Script::new(BEAT),
            info,
        }
    }

    fn set_key(&self) -> String {
        self.redis.key("nodes")
    }

    fn info_key(&self, id: &str) -> String {
        self.redis.key(&format!("node:{id}"))
    }

    /// Records this node as alive and learns how many are.
    pub async fn heartbeat(&self, in_flight: usize) {
        let mut info = self.info.clone();
        info["in_flight"] = json!(in_flight);
        let mut inv = self.beat.key(self.set_key());
        inv.key(self.info_key(&self.redis.node_id))
            .arg(&self.redis.node_id)
            .arg(info.to_string())
            .arg(NODE_TTL.as_millis() as u64);
        let live = self
            .redis
            .call(Op::Heartbeat, |mut c| async move {
                inv.invoke_async::<u32>(&mut c).await
            })
            .await;
        if let Ok(n) = live {
            self.redis.set_live_nodes(n);
        }
    }

    /// Leaves the registry (at shutdown).
    pub async fn leave(&self) {
        let (set, info, id) = (
            self.set_key(),
            self.info_key(&self.redis.node_id),
            self.redis.node_id.clone(),
        );
        let _ = self
            .redis
            .call(Op::Heartbeat, |mut c| async move {
                redis::pipe()
                    .cmd("ZREM")
                    .arg(set)
                    .arg(id)
                    .cmd("DEL")
                    .arg(info)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await;
    }

    /// The live nodes, each with its details and the age of its last heartbeat.
    pub async fn list(&self) -> Result<Vec<Value>, ()> {
        let set = self.set_key();
        let entries: Vec<(String, i64)> = self
            .redis
            .call(Op::Nodes, |mut c| async move {
                redis::cmd("ZRANGE")
                    .arg(set)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = entries.iter().map(|(id, _)| self.info_key(id)).collect();
        let infos: Vec<Option<String>> = self
            .redis
            .call(Op::Nodes, |mut c| async move {
                redis::cmd("MGET").arg(keys).query_async(&mut c).await
            })
            .await?;
        Ok(entries
            .into_iter()
            .zip(infos)
            .filter_map(|((id, beat_ms), info)| {
                let mut v: Value = serde_json::from_str(&info?).ok()?;
                v["id"] = json!(id);
                v["last_heartbeat_ms"] = json!(beat_ms);
                v["this_node"] = json!(id == self.redis.node_id);
                Some(v)
            })
            .collect())
    }
}
