//! The shared buckets and concurrency places in Redis, as Lua scripts on Redis's own clock
//! (`TIME`), so nodes whose clocks disagree still share one bucket. Each script is sent once
//! and then called by its SHA (redis-rs falls back to `EVAL` after a `NOSCRIPT`).
//!
//! - A bucket is a GCRA: one number, the theoretical arrival time in µs, under
//!   `{ns}:rl:{scope}:{dim}`, expiring when the bucket is full again. A lease takes between
//!   `need` and `want` units; a give-back moves the time back (never before now).
//! - A concurrency cap is a sorted set `{ns}:cc:{scope}` of places scored by when they
//!   expire ([`PLACE_TTL`]). A node renews the places it holds every third of that; a node
//!   that dies stops renewing and its places expire. A node takes places one at a time and
//!   counts its own requests against them in memory; under a large cap it keeps a few spare
//!   ([`spare_places`]) for up to [`SPARE_IDLE`], so a busy node does not go to Redis per
//!   request, and under a small cap it gives each back at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Script;
use tollgate_filters::limits::{Lease, SharedLimits, Unreachable};

use super::{Op, Redis};

/// A concurrency place not renewed for this long is free again.
pub const PLACE_TTL: Duration = Duration::from_secs(15);
/// Spare places go back after this long unused.
pub const SPARE_IDLE: Duration = Duration::from_secs(1);

/// How many places a node may keep unused under `cap`: none under small caps (another node
/// may need the place now), up to 16 under large ones.
pub fn spare_places(cap: u32, live_nodes: u32) -> usize {
    if cap < 16 {
        0
    } else {
        (cap / (4 * live_nodes.max(1))).clamp(1, 16) as usize
    }
}

/// The places this node holds under one cap.
#[derive(Default)]
struct Places {
    /// Members of the sorted set this node holds.
    members: Vec<String>,
    in_use: usize,
    cap: u32,
    /// When the last place came free (spares older than [`SPARE_IDLE`] go back).
    freed: Option<Instant>,
}

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
    /// Places this node holds, by sorted-set key; renewed by [`Self::renew`].
    held: Mutex<HashMap<String, Places>>,
    next_place: AtomicU64,
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
            next_place: AtomicU64::new(0),
        })
    }

    fn bucket_key(&self, bucket: &str) -> String {
        self.redis.key(&format!("rl:{bucket}"))
    }

    fn places_key(&self, scope: &str) -> String {
        self.redis.key(&format!("cc:{scope}"))
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Places>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Extends the TTL of every place this node holds (one call for all of them).
    pub async fn renew(&self) {
        let held: Vec<(String, String)> = self
            .held()
            .iter()
            .flat_map(|(k, p)| p.members.iter().map(move |m| (k.clone(), m.clone())))
            .collect();
        if held.is_empty() {
            return;
        }
        let mut inv = self.renew.prepare_invoke();
        inv.arg(PLACE_TTL.as_millis() as u64);
        for (key, member) in &held {
            inv.key(key);
            inv.arg(member);
        }
        let _ = self
            .redis
            .call(Op::Renew, |mut c| async move {
                inv.invoke_async::<i64>(&mut c).await
            })
            .await;
    }

    /// Gives back spare places unused for [`SPARE_IDLE`] (run every few hundred ms).
    pub fn return_spares(&self) {
        let now = Instant::now();
        let mut out = Vec::new();
        self.held().retain(|key, p| {
            if p.in_use < p.members.len() && p.freed.is_some_and(|t| now - t >= SPARE_IDLE) {
                for m in p.members.drain(p.in_use..) {
                    out.push((key.clone(), m));
                }
            }
            !p.members.is_empty() || p.in_use > 0
        });
        self.remove(out);
    }

    /// Places this node holds now, in use or spare (for tests and the drain).
    pub fn places_held(&self) -> usize {
        self.held().values().map(|p| p.members.len()).sum()
    }

    /// Removes members from their sets, in the background.
    fn remove(&self, places: Vec<(String, String)>) {
        if places.is_empty() {
            return;
        }
        // Outside a runtime (never on the request path) the places simply expire.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let redis = self.redis.clone();
        rt.spawn(async move {
            let _ = redis
                .call(Op::Leave, |mut c| async move {
                    let mut pipe = redis::pipe();
                    for (key, member) in &places {
                        pipe.cmd("ZREM").arg(key).arg(member).ignore();
                    }
                    pipe.query_async::<()>(&mut c).await
                })
                .await;
        });
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

    async fn enter(&self, scope: &str, cap: u32, _holder: &str) -> Result<bool, Unreachable> {
        let key = self.places_key(scope);
        {
            let mut held = self.held();
            let p = held.entry(key.clone()).or_default();
            p.cap = cap;
            if p.in_use < p.members.len() {
                p.in_use += 1;
                return Ok(true);
            }
        }
        let member = format!(
            "{}:{}",
            self.redis.node_id,
            self.next_place.fetch_add(1, Ordering::Relaxed)
        );
        let mut inv = self.enter.key(&key);
        inv.arg(cap).arg(&member).arg(PLACE_TTL.as_millis() as u64);
        let ok: i64 = self
            .redis
            .call(
                Op::Enter,
                |mut c| async move { inv.invoke_async(&mut c).await },
            )
            .await
            .map_err(|_| Unreachable)?;
        if ok == 1 {
            let mut held = self.held();
            let p = held.entry(key).or_default();
            p.members.push(member);
            p.in_use += 1;
        }
        Ok(ok == 1)
    }

    fn leave(&self, scope: &str, _holder: &str) {
        let key = self.places_key(scope);
        let live = self.redis.live_nodes();
        let mut out = Vec::new();
        {
            let mut held = self.held();
            let Some(p) = held.get_mut(&key) else {
                return;
            };
            p.in_use = p.in_use.saturating_sub(1);
            p.freed = Some(Instant::now());
            let keep = p.in_use + spare_places(p.cap, live);
            while p.members.len() > keep {
                if let Some(m) = p.members.pop() {
                    out.push((key.clone(), m));
                }
            }
            if p.members.is_empty() && p.in_use == 0 {
                held.remove(&key);
            }
        }
        self.remove(out);
    }

    fn reachable(&self) -> bool {
        self.redis.reachable()
    }

    fn live_nodes(&self) -> u32 {
        self.redis.live_nodes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_only_under_large_caps() {
        assert_eq!(spare_places(3, 3), 0);
        assert_eq!(spare_places(15, 1), 0);
        assert_eq!(spare_places(16, 1), 4);
        assert_eq!(spare_places(4096, 3), 16);
        assert_eq!(spare_places(64, 8), 2);
    }
}
