//! The shared buckets and concurrency places in Redis, as Lua scripts on Redis's own clock
//! (`TIME`), so nodes whose clocks disagree still share one bucket. Each script is sent once
//! and then called by its SHA (redis-rs falls back to `EVAL` after a `NOSCRIPT`).
//!
//! - A bucket is a GCRA: one number, the theoretical arrival time in µs, under
//!   `{ns}:rl:{scope}:{dim}`, expiring when the bucket is full again. A lease takes between
//!   `need` and `want` units; a give-back moves the time back (never before now).
//! - A concurrency cap is a sorted set `{ns}:cc:{scope}` of holders scored by when their
//!   place expires ([`PLACE_TTL`]). A node renews the places it holds every third of that;
//!   a node that dies stops renewing and its places expire.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use tollgate_filters::limits::{Lease, SharedLimits, Unreachable};

use super::{Op, Redis};

/// A concurrency place not renewed for this long is free again.
pub const PLACE_TTL: Duration = Duration::from_secs(15);

/// µs in a bucket's window (the limits are per minute).
const WINDOW_US: f64 = 60_000_000.0;

const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local need = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local room = math.floor((now + window - tat) / interval)
if room < need then
  return {0, 0, math.ceil(tat + need * interval - window - now), math.ceil(tat - now)}
end
local n = math.min(want, room)
tat = tat + n * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {n, room - n, 0, math.ceil(tat - now)}
"#;

const GIVE_BACK: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
tat = tat - tonumber(ARGV[1]) * tonumber(ARGV[2])
if tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
return 1
"#;

const ENTER: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"#;

const RENEW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"#;

/// The Redis side of [`SharedLimits`].
pub struct RedisLimits {
    redis: Arc<Redis>,
    lease: Script,
    give_back: Script,
    enter: Script,
    renew: Script,
    /// Places this node holds: (sorted-set key, holder), renewed by [`Self::renew`].
    held: Mutex<HashSet<(String, String)>>,
}

impl RedisLimits {
    pub fn new(redis: Arc<Redis>) -> Arc<RedisLimits> {
        Arc::new(RedisLimits {
            redis,
            lease: Script::new(LEASE),
            give_back: Script::new(GIVE_BACK),
            enter: Script::new(ENTER),
            renew: Script::new(RENEW),
            held: Mutex::default(),
        })
    }

    fn bucket_key(&self, bucket: &str) -> String {
        self.redis.key(&format!("rl:{bucket}"))
    }

    fn places_key(&self, scope: &str) -> String {
        self.redis.key(&format!("cc:{scope}"))
    }

    /// Extends the TTL of every place this node holds (one call for all of them).
    pub async fn renew(&self) {
        let held: Vec<(String, String)> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        if held.is_empty() {
            return;
        }
        let mut inv = self.renew.prepare_invoke();
        inv.arg(PLACE_TTL.as_millis() as u64);
        for (key, holder) in &held {
            inv.key(key);
            inv.arg(holder);
        }
        let _ = self
            .redis
            .call(Op::Renew, |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    /// Places this node holds now (for tests and /readyz).
    pub fn places_held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

fn interval_us(per_minute: u32) -> f64 {
    WINDOW_US / f64::from(per_minute.max(1))
}

fn us(v: i64) -> Duration {
    Duration::from_micros(v.max(0) as u64)
}

#[async_trait]
impl SharedLimits for RedisLimits {
    async fn lease(
        &self,
        bucket: &str,
        per_minute: u32,
        need: u64,
        want: u64,
    ) -> Result<Lease, Unreachable> {
        let key = self.bucket_key(bucket);
        let mut inv = self.lease.key(key);
        inv.arg(interval_us(per_minute))
            .arg(WINDOW_US)
            .arg(need)
            .arg(want.max(need));
        let (units, remaining, retry, reset): (i64, i64, i64, i64) = self
            .redis
            .call(
                Op::Lease,
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await
            .map_err(|_| Unreachable)?;
        Ok(if units > 0 {
            Lease::Granted {
                units: units as u64,
                remaining: remaining.max(0) as u64,
                reset: us(reset),
            }
        } else {
            Lease::Refused {
                retry_after: us(retry).max(Duration::from_millis(1)),
                reset: us(reset),
            }
        })
    }

    async fn give_back(
        &self,
        bucket: &str,
        per_minute: u32,
        units: u64,
    ) -> Result<(), Unreachable> {
        let key = self.bucket_key(bucket);
        let mut inv = self.give_back.key(key);
        inv.arg(units).arg(interval_us(per_minute));
        self.redis
            .call(Op::GiveBack, |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await
            .map(|_| ())
            .map_err(|_| Unreachable)
    }

    async fn enter(&self, scope: &str, cap: u32, holder: &str) -> Result<bool, Unreachable> {
        let key = self.places_key(scope);
        let mut inv = self.enter.key(&key);
        inv.arg(cap).arg(holder).arg(PLACE_TTL.as_millis() as u64);
        let ok: i64 = self
            .redis
            .call(
                Op::Enter,
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await
            .map_err(|_| Unreachable)?;
        if ok == 1 {
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((key, holder.to_string()));
        }
        Ok(ok == 1)
    }

    fn leave(&self, scope: &str, holder: &str) {
        let key = self.places_key(scope);
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(key.clone(), holder.to_string()));
        // Outside a runtime (never on the request path) the place simply expires.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (redis, holder) = (self.redis.clone(), holder.to_string());
        rt.spawn(async move {
            let _ = redis
                .call(Op::Leave, |mut c| async move {
                    redis::cmd("ZREM")
                        .arg(&key)
                        .arg(&holder)
                        .query_async::<i64>(&mut c)
                        .await
                })
                .await;
        });
    }

    fn reachable(&self) -> bool {
        self.redis.reachable()
    }

    fn live_nodes(&self) -> u32 {
        self.redis.live_nodes()
    }
}
