//! `cache`: the exact-match response cache (`cache.responses`), memory backend.
//!
//! - **Lookup** (`on_request_body`, after auth and limits, before queue, route and
//!   billing): a cacheable request (chat, completions, embeddings; a configured model; not
//!   sampling unless asked) is keyed by [`replay::key`]. A stored answer becomes
//!   [`Ctx::cache_hit`], which the service writes instead of forwarding: no provider, no
//!   channel slot. Billing prices it by `bill`; limits count its usage.
//! - **Coalescing**: the first miss for a key is the leader; identical requests arriving
//!   while it is out wait (bounded by their queue timeout) and are answered from what it
//!   stores. If it stores nothing, they go upstream themselves.
//! - **Recording** (`on_response_head`, `on_chunk`): a complete 2xx answer with reported
//!   usage, up to `max_entry_bytes`, from a client still there, is stored: JSON as its body,
//!   a stream (ended by `[DONE]`) as its events.
//! - **Store**: `moka`, weighted by entry bytes up to `max_bytes` (least recently used
//!   evicted first), each entry with its own TTL. With `backend: redis` the same memory
//!   store is this node's first tier, and a [`SharedEntries`] store (Redis) the second,
//!   shared by every node: a local miss asks it (within `redis.timeout_ms`), a stored answer
//!   is written to both. Redis entries are [`replay::encode`]d with a version byte, so a
//!   node of another version never misreads one; when Redis cannot be reached, the node
//!   goes on with its own tier and counts `tollgate_cache_errors_total`.

mod config;
mod replay;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora_http::ResponseHeader;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::billing::Usage;
use crate::chain::Phases;
use crate::usage::is_event_stream;
use crate::{CacheHit, Ctx, Endpoint, Filter, GatewayError, RequestHead};

pub use config::{Backend, BillPolicy, CacheConfig, ResponseCacheConfig};
pub use replay::{Form, Key, Stored, FORMAT_VERSION};

/// The client's switch: `on`, `off` or `refresh`.
pub const CACHE_HEADER: &str = "x-tollgate-cache";
/// The client's TTL for what its request stores, in seconds (at most `ttl_s`).
pub const TTL_HEADER: &str = "x-tollgate-cache-ttl";
const QUEUE_TIMEOUT_HEADER: &str = "x-tollgate-queue-timeout-ms";

/// One stored answer.
#[derive(Debug)]
pub struct Entry {
    stored: Stored,
    usage: Usage,
    at: Instant,
    ttl: Duration,
    weight: u32,
}

struct PerEntryTtl;

impl moka::Expiry<Key, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &Key,
        e: &Arc<Entry>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(e.ttl)
    }
}

type Flights = Arc<Mutex<HashMap<Key, watch::Receiver<Option<Arc<Entry>>>>>>;

/// The shared tier (`backend: redis`). Redis in the server; a map in tests.
#[async_trait]
pub trait SharedEntries: Send + Sync {
    /// The encoded entry under `key`; `Err` when the store cannot be reached.
    async fn get(&self, key: &Key) -> Result<Option<Bytes>, ()>;
    /// Stores an encoded entry for `ttl` (in the background).
    fn put(&self, key: &Key, value: Bytes, ttl: Duration);
}

/// The leader of a key's misses: what it stores is sent to the waiters; dropped without
/// storing, the waiters go upstream themselves.
struct Leader {
    key: Key,
    tx: watch::Sender<Option<Arc<Entry>>>,
    flights: Flights,
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut f = self.flights.lock().unwrap_or_else(|e| e.into_inner());
        if f.get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            f.remove(&self.key);
        }
    }
}

/// What a client asked for in its headers.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
enum Mode {
    #[default]
    Config,
    On,
    Off,
    Refresh,
}

#[derive(Clone, Copy, Default)]
struct Ask {
    mode: Mode,
    ttl: Option<Duration>,
    wait: Option<Duration>,
}

/// A miss being recorded.
#[derive(Clone)]
struct Recorder {
    key: Key,
    ttl: Duration,
    sse: bool,
    active: bool,
    too_big: bool,
    buf: BytesMut,
    leader: Option<Arc<Leader>>,
}

struct CacheMetrics {
    /// The shared tier could not be reached (a lookup or a store).
    errors: IntCounter,
    hit: IntCounter,
    miss: IntCounter,
    bypass: IntCounter,
    stored: IntCounter,
    coalesced: IntCounter,
    bytes: IntGauge,
    evictions: IntCounter,
    family: IntCounterVec,
}

/// The `cache` filter and its memory store.
pub struct ResponseCache {
    cfg: ResponseCacheConfig,
    store: moka::sync::Cache<Key, Arc<Entry>>,
    flights: Flights,
    /// The longest a waiter waits for its leader: `queue.timeout_ms`.
    wait_limit: Duration,
    metrics: CacheMetrics,
    /// The second tier, with `backend: redis`.
    shared: Option<Arc<dyn SharedEntries>>,
}

impl ResponseCache {
    pub fn new(cfg: ResponseCacheConfig, wait_limit: Duration) -> Self {
        // The `cache` label names this cache among the gateway's caches.
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("cache", "responses");
        let evictions = IntCounter::with_opts(opts(
            "tollgate_cache_evictions_total",
            "Cache entries evicted to stay under the cache's size bound",
        ))
        .expect("valid metric");
        let evicted = evictions.clone();
        let store = moka::sync::Cache::builder()
            .eviction_listener(move |_, _, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evicted.inc();
                }
            })
            .max_capacity(cfg.max_bytes)
            // Least recently used out first (moka's default, TinyLFU, may refuse a new
            // answer instead of evicting an old one).
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .weigher(|_: &Key, e: &Arc<Entry>| e.weight)
            .expire_after(PerEntryTtl)
            .build();
        let family = IntCounterVec::new(
            opts(
                "tollgate_cache_requests_total",
                "Cache lookups and stores by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let c = |r: &str| family.with_label_values(&[r]);
        let metrics = CacheMetrics {
            errors: IntCounter::with_opts(opts(
                "tollgate_cache_errors_total",
                "Lookups and stores the cache's shared tier (Redis) did not answer",
            ))
            .expect("valid metric"),
            hit: c("hit"),
            miss: c("miss"),
            bypass: c("bypass"),
            stored: c("stored"),
            coalesced: c("coalesced"),
            bytes: IntGauge::with_opts(opts("tollgate_cache_bytes", "Bytes held by the cache"))
                .expect("valid metric"),
            evictions,
            family,
        };
        ResponseCache {
            cfg,
            store,
            flights: Arc::default(),
            wait_limit,
            metrics,
            shared: None,
        }
    }

    /// With a shared second tier (`backend: redis`).
    pub fn with_shared(mut self, shared: Arc<dyn SharedEntries>) -> Self {
        self.shared = Some(shared);
        self
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.metrics.family.clone()),
            Box::new(self.metrics.bytes.clone()),
            Box::new(self.metrics.evictions.clone()),
            Box::new(self.metrics.errors.clone()),
        ]
    }

    /// This node's tier, then the shared one; an entry found there is kept here too, for
    /// what is left of its TTL.
    async fn lookup(&self, key: &Key) -> Option<Arc<Entry>> {
        let e = self.store.get(key);
        self.metrics.bytes.set(self.store.weighted_size() as i64);
        if e.is_some() {
            return e;
        }
        let shared = self.shared.as_ref()?;
        let raw = match shared.get(key).await {
            Ok(raw) => raw?,
            Err(()) => {
                self.metrics.errors.inc();
                return None;
            }
        };
        let (stored, usage, age, ttl) = replay::decode(&raw)?;
        let left = ttl.checked_sub(age).filter(|l| !l.is_zero())?;
        let weight = (stored.bytes() + 128).min(u32::MAX as usize) as u32;
        let entry = Arc::new(Entry {
            stored,
            usage,
            at: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            ttl: left,
            weight,
        });
        // Kept here too, unless it could never fit this node's tier.
        if u64::from(entry.weight) <= self.cfg.max_bytes {
            self.store.insert(*key, entry.clone());
        }
        Some(entry)
    }

    fn insert(&self, key: Key, e: Arc<Entry>) {
        if let Some(shared) = &self.shared {
            shared.put(&key, replay::encode(&e.stored, &e.usage, e.ttl), e.ttl);
        }
        self.store.insert(key, e);
        self.store.run_pending_tasks();
        self.metrics.bytes.set(self.store.weighted_size() as i64);
        self.metrics.stored.inc();
    }

    /// Counts a store the shared tier did not take (called by its implementation).
    pub fn shared_error_counter(&self) -> IntCounter {
        self.metrics.errors.clone()
    }

    /// Answers the request from `e` if it can be shown in the form the client asked for.
    fn hit(&self, ctx: &mut Ctx, e: &Entry, form: Form) -> bool {
        let Some((content_type, body)) = replay::render(&e.stored, &e.usage, form) else {
            return false;
        };
        ctx.cache_hit = Some(CacheHit {
            content_type,
            body,
            usage: e.usage,
            bill_ppm: self.cfg.bill.ppm,
        });
        ctx.response_headers.set(CACHE_HEADER, "hit".into());
        ctx.response_headers
            .set("age", e.at.elapsed().as_secs().to_string());
        true
    }

    fn bypass(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        self.metrics.bypass.inc();
        ctx.response_headers.set(CACHE_HEADER, "bypass".into());
        Ok(())
    }

    /// The end of a recorded answer: stored if it is complete, else dropped.
    fn finish(&self, ctx: &Ctx, mut rec: Recorder) {
        let o = &ctx.outcome;
        let usage = ctx
            .usage
            .usage
            .filter(|u| u.prompt_tokens > 0 || u.completion_tokens > 0);
        let broken = o.client_gone || o.upstream_cut || o.drain_limited || rec.too_big;
        let complete = !broken && !ctx.usage.saw_error && (200..300).contains(&o.status);
        let (Some(usage), true) = (usage, complete) else {
            return;
        };
        let body = rec.buf.split().freeze();
        let stored = if rec.sse {
            match replay::parse_sse(&body) {
                Some(s) => s,
                None => return,
            }
        } else if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() {
            Stored::Json(body)
        } else {
            return;
        };
        let weight = (stored.bytes() + 128).min(u32::MAX as usize) as u32;
        let entry = Arc::new(Entry {
            stored,
            usage: Usage {
                estimated: false,
                ..usage
            },
            at: Instant::now(),
            ttl: rec.ttl,
            weight,
        });
        self.insert(rec.key, entry.clone());
        if let Some(l) = rec.leader.take() {
            let _ = l.tx.send(Some(entry));
        }
    }
}

fn header<'a>(head: &'a RequestHead<'_>, name: &str) -> Option<&'a str> {
    head.headers
        .get(name)
        .map(|v| v.to_str().unwrap_or("\u{fffd}").trim())
}

#[async_trait]
impl Filter for ResponseCache {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEAD | Phases::REQUEST_BODY | Phases::RESPONSE_HEAD | Phases::CHUNK
    }

    /// Reads `x-tollgate-cache` and `x-tollgate-cache-ttl` (a bad value is a 400 before the
    /// body is read), and the queue timeout that bounds waiting for a leader.
    async fn on_request_head(
        &self,
        ctx: &mut Ctx,
        head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        let mode = match header(head, CACHE_HEADER) {
            None => Mode::Config,
            Some(v) if v.eq_ignore_ascii_case("on") => Mode::On,
            Some(v) if v.eq_ignore_ascii_case("off") => Mode::Off,
            Some(v) if v.eq_ignore_ascii_case("refresh") => Mode::Refresh,
            Some(_) => {
                return Err(GatewayError::invalid(format!(
                    "`{CACHE_HEADER}` must be on, off or refresh."
                )))
            }
        };
        let ttl = match header(head, TTL_HEADER) {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(s) if s >= 1 => Some(Duration::from_secs(s.min(self.cfg.ttl_s))),
                _ => {
                    return Err(GatewayError::invalid(format!(
                        "`{TTL_HEADER}` must be a whole number of seconds, at least 1."
                    )))
                }
            },
        };
        // The queue refuses a malformed value itself; here it only bounds the wait.
        let wait = header(head, QUEUE_TIMEOUT_HEADER)
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        if mode != Mode::Config || ttl.is_some() || wait.is_some() {
            ctx.ext.insert(Ask { mode, ttl, wait });
        }
        Ok(())
    }

    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(key), Some(facts)) = (&ctx.key, &ctx.facts) else {
            return Ok(());
        };
        if !matches!(
            ctx.endpoint,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings
        ) {
            return Ok(());
        }
        let ask = ctx.ext.get::<Ask>().copied().unwrap_or_default();
        let model_listed = self.cfg.models.is_empty() || self.cfg.models.contains(&facts.model);
        if ask.mode == Mode::Off || !model_listed {
            return self.bypass(ctx);
        }
        let Ok(body) = serde_json::from_slice::<Map<String, Value>>(&ctx.body) else {
            return self.bypass(ctx);
        };
        if ask.mode == Mode::Config
            && !self.cfg.cache_sampled
            && replay::samples(ctx.endpoint, &body)
        {
            return self.bypass(ctx);
        }
        let k = replay::key(key.account_id, &ctx.path, &body);
        let form = Form {
            endpoint: ctx.endpoint,
            stream: facts.stream,
            include_usage: facts.include_usage,
        };
        let ttl = ask.ttl.unwrap_or(Duration::from_secs(self.cfg.ttl_s));
        let mut leader = None;
        if ask.mode != Mode::Refresh {
            if let Some(e) = self.lookup(&k).await {
                if self.hit(ctx, &e, form) {
                    self.metrics.hit.inc();
                    return Ok(());
                }
            }
            let waiting = {
                let mut f = self.flights.lock().unwrap_or_else(|e| e.into_inner());
                match f.get(&k) {
                    Some(rx) => Some(rx.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        f.insert(k, rx);
                        leader = Some(Arc::new(Leader {
                            key: k,
                            tx,
                            flights: self.flights.clone(),
                        }));
                        None
                    }
                }
            };
            // A leader that stored between the lookup and taking the lead: its answer.
            if leader.is_some() {
                if let Some(e) = self.store.get(&k) {
                    if self.hit(ctx, &e, form) {
                        self.metrics.hit.inc();
                        return Ok(());
                    }
                }
            }
            if let Some(mut rx) = waiting {
                let wait = ask.wait.map_or(self.wait_limit, |w| w.min(self.wait_limit));
                let got = tokio::time::timeout(wait, rx.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|e| e.clone()));
                if let Some(e) = got {
                    if self.hit(ctx, &e, form) {
                        self.metrics.coalesced.inc();
                        return Ok(());
                    }
                }
                // The leader stored nothing (or not in time): go upstream like any miss.
            }
        }
        self.metrics.miss.inc();
        ctx.response_headers.set(CACHE_HEADER, "miss".into());
        ctx.ext.insert(Recorder {
            key: k,
            ttl,
            sse: false,
            active: false,
            too_big: false,
            buf: BytesMut::new(),
            leader,
        });
        Ok(())
    }

    fn on_response_head(&self, ctx: &mut Ctx, head: &mut ResponseHeader) {
        if let Some(rec) = ctx.ext.get_mut::<Recorder>() {
            rec.active = true;
            rec.sse = is_event_stream(head);
        }
    }

    fn on_chunk(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        let Some(rec) = ctx.ext.get_mut::<Recorder>().filter(|r| r.active) else {
            return;
        };
        if !rec.too_big {
            if (rec.buf.len() + chunk.len()) as u64 > self.cfg.max_entry_bytes {
                rec.too_big = true;
                rec.buf = BytesMut::new();
            } else {
                rec.buf.extend_from_slice(chunk);
            }
        }
        if end {
            if let Some(rec) = ctx.ext.remove::<Recorder>() {
                self.finish(ctx, rec);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bill_policies_parse_exactly_and_round_half_up() {
        let p = |s: &str| BillPolicy::try_from(s.to_string());
        assert_eq!(p("free").unwrap().ppm, 0);
        assert_eq!(p("full").unwrap().ppm, 1_000_000);
        assert_eq!(p("ratio:0.1").unwrap().ppm, 100_000);
        assert_eq!(p("ratio:1").unwrap().ppm, 1_000_000);
        assert_eq!(p("ratio:0.000001").unwrap().ppm, 1);
        for bad in [
            "ratio:1.5",
            "ratio:-0.1",
            "ratio:0.0000001",
            "ratio:",
            "half",
            "ratio:.5",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
        let r = p("ratio:0.1").unwrap();
        assert_eq!(r.apply(15), 2, "1.5 rounds half up");
        assert_eq!(r.apply(14), 1);
        assert_eq!(p("free").unwrap().apply(999), 0);
        assert_eq!(p("full").unwrap().apply(999), 999);
    }

    fn cache(max_bytes: u64) -> ResponseCache {
        ResponseCache::new(
            ResponseCacheConfig {
                backend: Backend::Memory,
                ttl_s: 60,
                max_bytes,
                max_entry_bytes: 1 << 20,
                models: Vec::new(),
                cache_sampled: false,
                bill: BillPolicy::default(),
            },
            Duration::from_secs(1),
        )
    }

    fn entry(bytes: usize, ttl: Duration) -> Arc<Entry> {
        Arc::new(Entry {
            stored: Stored::Json(Bytes::from(vec![b' '; bytes])),
            usage: Usage::default(),
            at: Instant::now(),
            ttl,
            weight: bytes as u32,
        })
    }

    #[test]
    fn the_store_is_bounded_by_bytes_and_entries_expire_by_their_own_ttl() {
        let c = cache(10_000);
        for i in 0..20u8 {
            c.insert([i; 32], entry(1_000, Duration::from_secs(60)));
        }
        assert!(c.store.weighted_size() <= 10_000);
        assert!(c.store.entry_count() <= 10);
        assert!(
            c.metrics.evictions.get() >= 10,
            "{}",
            c.metrics.evictions.get()
        );
        c.insert([99; 32], entry(10, Duration::from_millis(30)));
        assert!(c.store.get(&[99; 32]).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.store.get(&[99; 32]).is_none());
    }

    /// A shared tier in a map; `down` makes every call fail.
    #[derive(Default)]
    struct MapTier {
        entries: Mutex<HashMap<Key, Bytes>>,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl SharedEntries for MapTier {
        async fn get(&self, key: &Key) -> Result<Option<Bytes>, ()> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(());
            }
            Ok(self.entries.lock().unwrap().get(key).cloned())
        }
        fn put(&self, key: &Key, value: Bytes, _: Duration) {
            if !self.down.load(std::sync::atomic::Ordering::SeqCst) {
                self.entries.lock().unwrap().insert(*key, value);
            }
        }
    }

    #[tokio::test]
    async fn a_second_node_finds_an_entry_in_the_shared_tier_and_a_failing_tier_is_a_miss() {
        let tier = Arc::new(MapTier::default());
        let a = cache(10_000).with_shared(tier.clone());
        let b = cache(10_000).with_shared(tier.clone());
        a.insert([7; 32], entry(100, Duration::from_secs(60)));
        let got = b.lookup(&[7; 32]).await.expect("found in the shared tier");
        assert!(got.ttl <= Duration::from_secs(60) && got.ttl > Duration::from_secs(50));
        // Now in b's own tier too.
        assert!(b.store.get(&[7; 32]).is_some());
        tier.down.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(b.lookup(&[8; 32]).await.is_none());
        assert_eq!(b.metrics.errors.get(), 1);
    }

    #[tokio::test]
    async fn a_leader_that_stores_nothing_releases_its_waiters() {
        let c = cache(10_000);
        let (tx, rx) = watch::channel(None);
        c.flights.lock().unwrap().insert([1; 32], rx.clone());
        let leader = Leader {
            key: [1; 32],
            tx,
            flights: c.flights.clone(),
        };
        let mut waiter = rx;
        drop(leader);
        assert!(waiter.wait_for(Option::is_some).await.is_err());
        assert!(c.flights.lock().unwrap().is_empty());
    }
}
