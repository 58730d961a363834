//! The shared second tier of the key cache (`redis:`): key → principal, in front of the
//! store and behind each node's own cache ([`tollgate_filters::auth::KeyCache`], which keeps
//! its single-flight misses, TTL jitter and negative entries).
//!
//! - Entries live under `{ns}:kc:v{FORMAT}:{generation}:{sha256(key hash) hex}`: the key is
//!   hashed again, so Redis never holds the value the store is looked up by.
//! - The value is [`FORMAT`] then the `KeyRecord` as JSON, or `null` for a key the store does
//!   not know (a negative entry, with the shorter `auth.negative_cache_ttl_ms`). A node of
//!   another format never reads it: the version is in the key.
//! - Invalidation is by generation: an admin change increments `{ns}:kc:gen` and announces
//!   itself (pub/sub); each node then reads the new generation, so every older entry is out
//!   of use at once and expires by its TTL.
//! - Fail-soft: with Redis unreachable (or slower than `redis.timeout_ms`), lookups go to the
//!   store, and `tollgate_cache_errors_total{cache="keys"}` counts it.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{IntCounter, IntCounterVec, Opts};
use sha2::{Digest, Sha256};
use tollgate_filters::auth::{AuthConfig, KeyHash, KeyLookup, KeyRecord};

use super::{Op, Redis};

/// The entry format (in the key and as the value's first byte).
pub const FORMAT: u8 = 1;

pub struct SharedKeys {
    redis: Arc<Redis>,
    store: Arc<dyn KeyLookup>,
    generation: AtomicU64,
    positive: Duration,
    negative: Duration,
    hits: IntCounter,
    misses: IntCounter,
    family: IntCounterVec,
    errors: IntCounter,
}

impl SharedKeys {
    pub fn new(redis: Arc<Redis>, store: Arc<dyn KeyLookup>, auth: &AuthConfig) -> Arc<SharedKeys> {
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("cache", "keys");
        let family = IntCounterVec::new(
            opts(
                "tollgate_cache_requests_total",
                "Cache lookups and stores by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        Arc::new(SharedKeys {
            redis,
            store,
            generation: AtomicU64::new(0),
            positive: Duration::from_millis(auth.cache_ttl_ms),
            negative: Duration::from_millis(auth.negative_cache_ttl_ms),
            hits: family.with_label_values(&["hit"]),
            misses: family.with_label_values(&["miss"]),
            family,
            errors: IntCounter::with_opts(opts(
                "tollgate_cache_errors_total",
                "Lookups and stores the cache's shared tier (Redis) did not answer",
            ))
            .expect("valid metric"),
        })
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.family.clone()), Box::new(self.errors.clone())]
    }

    fn entry_key(&self, hash: &KeyHash) -> String {
        let mut hex = String::with_capacity(64);
        for b in Sha256::digest(hash) {
            let _ = write!(hex, "{b:02x}");
        }
        let generation = self.generation.load(Ordering::Acquire);
        self.redis.key(&format!("kc:v{FORMAT}:{generation}:{hex}"))
    }

    /// Reads the current generation (at subscribe, and after every announced change).
    pub async fn refresh_generation(&self) {
        let k = self.redis.key("kc:gen");
        let g: Result<Option<u64>, ()> = self
            .redis
            .call(Op::KeyGet, |mut c| async move {
                redis::cmd("GET").arg(k).query_async(&mut c).await
            })
            .await;
        if let Ok(g) = g {
            self.generation.store(g.unwrap_or(0), Ordering::Release);
        }
    }

    /// Puts every entry out of use (an admin change on this node), before announcing it.
    pub async fn bump_generation(&self) {
        let k = self.redis.key("kc:gen");
        let g: Result<u64, ()> = self
            .redis
            .call(Op::KeyPut, |mut c| async move {
                redis::cmd("INCR").arg(k).query_async(&mut c).await
            })
            .await;
        match g {
            Ok(g) => self.generation.store(g, Ordering::Release),
            Err(()) => self.errors.inc(),
        }
    }

    async fn get(&self, key: String) -> Result<Option<Option<KeyRecord>>, ()> {
        if !self.redis.reachable() {
            return Err(());
        }
        let raw: Option<Vec<u8>> = self
            .redis
            .call(Op::KeyGet, |mut c| async move {
                redis::cmd("GET").arg(key).query_async(&mut c).await
            })
            .await?;
        Ok(raw.and_then(|raw| {
            let (&v, json) = raw.split_first()?;
            (v == FORMAT).then(|| serde_json::from_slice(json).ok())?
        }))
    }

    fn put(&self, key: String, found: &Option<KeyRecord>) {
        let ttl = if found.is_some() {
            self.positive
        } else {
            self.negative
        };
        let mut value = vec![FORMAT];
        if serde_json::to_writer(&mut value, found).is_err() {
            return;
        }
        self.redis
            .set_in_background(Op::KeyPut, key, value, ttl, self.errors.clone());
    }
}

#[async_trait]
impl KeyLookup for SharedKeys {
    async fn find_key(&self, hash: KeyHash) -> Result<Option<KeyRecord>, String> {
        let key = self.entry_key(&hash);
        match self.get(key.clone()).await {
            Ok(Some(found)) => {
                self.hits.inc();
                return Ok(found);
            }
            Ok(None) => self.misses.inc(),
            Err(()) => self.errors.inc(),
        }
        let found = self.store.find_key(hash).await?;
        if self.redis.reachable() {
            self.put(key, &found);
        }
        Ok(found)
    }
}
