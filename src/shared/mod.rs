//! Redis (`redis:`): the state gateway nodes share.
//!
//! - [`limits`]: the shared per-minute buckets and concurrency places behind the `limits`
//!   filter's credit and the queue's shared caps ([`tollgate_filters::limits::SharedLimits`]);
//! - [`events`]: pushed changes (a key revoked or changed) over pub/sub, so every node drops
//!   what it cached within a second;
//! - [`nodes`]: the node registry (heartbeats), which gives the live node count to
//!   `local_share` and lists the nodes at `GET /admin/nodes`.
//!
//! Every call goes through [`Redis::call`]: one deadline (`redis.timeout_ms`), counted in
//! `tollgate_redis_calls_total` and, when it fails, `tollgate_redis_errors_total`, behind a
//! circuit breaker: after [`BREAKER_FAILURES`] failures in a row the breaker opens for
//! [`BREAKER_OPEN`], and calls fail at once (the `on_error` policy applies without waiting
//! for a timeout); then one call at a time probes, and the first success closes it. The
//! connections are redis-rs connection managers: multiplexed, and reconnecting by
//! themselves, so a Redis that comes back is used again without a restart.

pub mod entries;
pub mod events;
pub mod keys;
pub mod limits;
pub mod nodes;
mod service;

pub use service::SharedService;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus::core::Collector;
use prometheus::{IntCounterVec, IntGauge, Opts};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisConfig;

/// What the server, the filters and the admin API hold of `redis:`.
#[derive(Clone)]
pub struct SharedParts {
    pub redis: Arc<Redis>,
    pub limits: Arc<limits::RedisLimits>,
    pub events: Arc<events::Events>,
    pub nodes: Arc<nodes::Nodes>,
    /// The key cache's shared tier, in front of `store`.
    pub keys: Arc<keys::SharedKeys>,
}

impl SharedParts {
    /// `store`: where keys are looked up when Redis does not have them.
    pub fn new(
        cfg: &crate::config::Config,
        redis_cfg: &RedisConfig,
        store: Arc<dyn tollgate_filters::auth::KeyLookup>,
    ) -> Result<SharedParts, RedisError> {
        let redis = Redis::new(redis_cfg)?;
        Ok(SharedParts {
            limits: limits::RedisLimits::new(redis.clone()),
            events: events::Events::new(redis.clone()),
            nodes: Arc::new(nodes::Nodes::new(
                redis.clone(),
                &cfg.server.listen,
                &cfg.server.admin_listen,
            )),
            keys: keys::SharedKeys::new(redis.clone(), store, &cfg.auth),
            redis,
        })
    }

    /// Every metric family of `redis:`.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let mut c = self.redis.collectors();
        c.extend(self.keys.collectors());
        c
    }

    /// A key changed here: every node's caches drop it (the shared tier by generation, each
    /// node's own through pub/sub).
    pub async fn key_changed(&self, change: events::Change) {
        self.keys.bump_generation().await;
        self.events.publish(change).await;
    }
}

/// Failures in a row that open the breaker.
pub const BREAKER_FAILURES: u32 = 3;
/// How long an open breaker refuses calls before it lets one probe.
pub const BREAKER_OPEN: Duration = Duration::from_secs(1);

/// What a call is for, as the `op` label of the metrics.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Lease,
    GiveBack,
    Enter,
    Leave,
    Renew,
    Publish,
    Heartbeat,
    Nodes,
    CacheGet,
    CachePut,
    KeyGet,
    KeyPut,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Lease => "lease",
            Op::GiveBack => "give_back",
            Op::Enter => "enter",
            Op::Leave => "leave",
            Op::Renew => "renew",
            Op::Publish => "publish",
            Op::Heartbeat => "heartbeat",
            Op::Nodes => "nodes",
            Op::CacheGet => "cache_get",
            Op::CachePut => "cache_put",
            Op::KeyGet => "key_get",
            Op::KeyPut => "key_put",
        }
    }
}

/// Frees the breaker's probe slot when dropped.
struct ProbeSlot<'a>(&'a AtomicBool);

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The circuit breaker's state.
#[derive(Default)]
struct Breaker {
    failures: AtomicU32,
    /// While set and in the future, calls fail at once.
    open_until: Mutex<Option<Instant>>,
    /// A probe is in flight (half-open: one call at a time).
    probing: AtomicBool,
}

pub struct RedisMetrics {
    calls: IntCounterVec,
    errors: IntCounterVec,
    up: IntGauge,
    breaker_open: IntGauge,
}

impl RedisMetrics {
    fn new() -> RedisMetrics {
        RedisMetrics {
            calls: IntCounterVec::new(
                Opts::new("tollgate_redis_calls_total", "Redis round trips, by what they were for"),
                &["op"],
            )
            .expect("metric"),
            errors: IntCounterVec::new(
                Opts::new(
                    "tollgate_redis_errors_total",
                    "Redis calls that failed, timed out or were refused by the open circuit breaker",
                ),
                &["op"],
            )
            .expect("metric"),
            up: IntGauge::new("tollgate_redis_up", "1 while the last Redis call succeeded")
                .expect("metric"),
            breaker_open: IntGauge::new(
                "tollgate_redis_breaker_open",
                "1 while the Redis circuit breaker is open",
            )
            .expect("metric"),
        }
    }
}

/// The connection to Redis shared by everything that uses it on this node.
pub struct Redis {
    pub cfg: RedisConfig,
    /// This node's id in the registry.
    pub node_id: String,
    client: redis::Client,
    /// Empty until [`Redis::connect`] runs on a runtime that outlives the server's.
    conns: ArcSwap<Vec<ConnectionManager>>,
    next: AtomicUsize,
    timeout: Duration,
    breaker: Breaker,
    pub metrics: RedisMetrics,
    /// Gateway nodes alive at the last registry read (at least 1).
    live_nodes: AtomicU32,
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis.url: {0}")]
    Url(String),
}

impl Redis {
    pub fn new(cfg: &RedisConfig) -> Result<Arc<Redis>, RedisError> {
        // The error text of a URL that does not parse could carry its password: say only
        // what is wrong.
        let client = redis::Client::open(cfg.url.as_str())
            .map_err(|e| RedisError::Url(format!("not a Redis URL ({:?})", e.kind())))?;
        let node_id = cfg.node_id.clone().unwrap_or_else(default_node_id);
        Ok(Arc::new(Redis {
            cfg: cfg.clone(),
            node_id,
            client,
            conns: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            timeout: Duration::from_millis(cfg.timeout_ms),
            breaker: Breaker::default(),
            metrics: RedisMetrics::new(),
            live_nodes: AtomicU32::new(1),
        }))
    }

    /// Opens the connections (lazily: each connects on first use, and reconnects after a
    /// failure). Called on the background runtime, whose tasks drive them.
    pub fn connect(&self) {
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conns: Vec<ConnectionManager> = (0..self.cfg.pool_size)
            .filter_map(|_| {
                ConnectionManager::new_lazy_with_config(self.client.clone(), cfg.clone())
                    .map_err(|e| tracing::warn!(error = ?e.kind(), "redis connection"))
                    .ok()
            })
            .collect();
        self.conns.store(Arc::new(conns));
    }

    /// The client, for the pub/sub connection.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.metrics.calls.clone()),
            Box::new(self.metrics.errors.clone()),
            Box::new(self.metrics.up.clone()),
            Box::new(self.metrics.breaker_open.clone()),
        ]
    }

    /// `false` while the breaker is open or nothing is connected yet.
    pub fn reachable(&self) -> bool {
        !self.conns.load().is_empty() && !self.breaker_is_open()
    }

    fn breaker_is_open(&self) -> bool {
        let open = self
            .breaker
            .open_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        open.is_some_and(|t| Instant::now() < t)
    }

    /// The last call succeeded (and the breaker is closed).
    pub fn up(&self) -> bool {
        self.reachable() && self.metrics.up.get() == 1
    }

    pub fn live_nodes(&self) -> u32 {
        self.live_nodes.load(Ordering::Relaxed).max(1)
    }

    pub(crate) fn set_live_nodes(&self, n: u32) {
        self.live_nodes.store(n.max(1), Ordering::Relaxed);
    }

    /// Runs one call on a connection of the pool, within the deadline and the breaker.
    pub async fn call<T, F, Fut>(&self, op: Op, f: F) -> Result<T, ()>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let fail = |what: &str| {
            self.metrics.errors.with_label_values(&[op.label()]).inc();
            tracing::debug!(op = op.label(), what, "redis call failed");
        };
        let conns = self.conns.load();
        if conns.is_empty() {
            fail("not connected");
            return Err(());
        }
        // Half-open: past the open period, one call at a time probes.
        let probe = {
            let open = self
                .breaker
                .open_until
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match *open {
                Some(t) if Instant::now() < t => {
                    drop(open);
                    fail("breaker open");
                    return Err(());
                }
                Some(_) => true,
                None => false,
            }
        };
        if probe && self.breaker.probing.swap(true, Ordering::AcqRel) {
            fail("breaker half-open");
            return Err(());
        }
        // The probe slot is freed however this call ends, even if its caller drops it.
        let _probe = probe.then_some(ProbeSlot(&self.breaker.probing));
        let conn = conns[self.next.fetch_add(1, Ordering::Relaxed) % conns.len()].clone();
        self.metrics.calls.with_label_values(&[op.label()]).inc();
        let answer = tokio::time::timeout(self.timeout, f(conn)).await;
        match answer {
            Ok(Ok(v)) => {
                self.succeeded();
                Ok(v)
            }
            Ok(Err(e)) => {
                fail(&format!("{:?}", e.kind()));
                self.failed();
                Err(())
            }
            Err(_) => {
                fail("timeout");
                self.failed();
                Err(())
            }
        }
    }

    fn succeeded(&self) {
        self.breaker.failures.store(0, Ordering::Relaxed);
        let mut open = self
            .breaker
            .open_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if open.take().is_some() {
            tracing::info!("redis reachable again; shared limits are global again");
        }
        self.metrics.up.set(1);
        self.metrics.breaker_open.set(0);
    }

    fn failed(&self) {
        self.metrics.up.set(0);
        let n = self.breaker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let mut open = self
            .breaker
            .open_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A failed probe re-opens at once; a closed breaker opens after enough failures.
        if open.is_some() || n >= BREAKER_FAILURES {
            if open.is_none() {
                tracing::warn!(
                    on_error = self.cfg.on_error.as_str(),
                    "redis unreachable; circuit breaker open"
                );
            }
            *open = Some(Instant::now() + BREAKER_OPEN);
            self.metrics.breaker_open.set(1);
        }
    }

    /// `SET key value PX ttl` in the background (a cache entry); a failure counts in
    /// `errors`. Outside a runtime nothing is written (the entry is only a cache).
    pub fn set_in_background(
        self: &Arc<Self>,
        op: Op,
        key: String,
        value: Vec<u8>,
        ttl: Duration,
        errors: prometheus::IntCounter,
    ) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let redis = self.clone();
        let ms = ttl.as_millis().max(1) as u64;
        rt.spawn(async move {
            let stored = redis
                .call(op, |mut c| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .arg("PX")
                        .arg(ms)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            if stored.is_err() {
                errors.inc();
            }
        });
    }

    /// A key of this deployment: `{namespace}:{rest}`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.cfg.namespace)
    }

    /// For /readyz: whether Redis answers, and what the node does meanwhile.
    pub fn readiness(&self) -> serde_json::Value {
        serde_json::json!({
            "reachable": self.reachable(),
            "up": self.up(),
            "breaker_open": self.breaker_is_open(),
            "on_error": self.cfg.on_error.as_str(),
            "live_nodes": self.live_nodes(),
            "node_id": self.node_id,
        })
    }
}

/// `hostname-pid`: unique per process, so a restarted node never takes a dead one's slices.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    format!("{host}-{}", std::process::id())
}
