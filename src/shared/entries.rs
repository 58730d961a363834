//! The response cache's shared tier (`cache.responses.backend: redis`): encoded entries
//! under `{ns}:rc:v{format}:{sha256 hex}` with the entry's TTL. A lookup waits at most
//! `redis.timeout_ms`; a store is written in the background. Either failing counts in
//! `tollgate_cache_errors_total{cache="responses"}` and the node goes on with its own tier.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus::IntCounter;
use tollgate_filters::cache::{Key, SharedEntries, FORMAT_VERSION};

use super::{Op, Redis};

pub struct RedisEntries {
    redis: Arc<Redis>,
    errors: IntCounter,
}

impl RedisEntries {
    pub fn new(redis: Arc<Redis>, errors: IntCounter) -> Arc<RedisEntries> {
        Arc::new(RedisEntries { redis, errors })
    }

    fn key(&self, key: &Key) -> String {
        let mut hex = String::with_capacity(64);
        for b in key {
            let _ = write!(hex, "{b:02x}");
        }
        self.redis.key(&format!("rc:v{FORMAT_VERSION}:{hex}"))
    }
}

#[async_trait]
impl SharedEntries for RedisEntries {
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, ()> {
        if !self.redis.reachable() {
            return Err(());
        }
        let k = self.key(key);
        let v: Option<Vec<u8>> = self
            .redis
            .call(Op::CacheGet, |mut c| async move {
                redis::cmd("GET").arg(k).query_async(&mut c).await
            })
            .await?;
        Ok(v.map(Bytes::from))
    }

    fn put(&self, key: &Key, value: Bytes, ttl: Duration) {
        if !self.redis.reachable() {
            self.errors.inc();
            return;
        }
        self.redis.set_in_background(
            Op::CachePut,
            self.key(key),
            value.to_vec(),
            ttl,
            self.errors.clone(),
        );
    }
}
