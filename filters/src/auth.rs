//! `auth`: who is calling, and may they make this request?
//!
//! The key comes from `Authorization: Bearer …` (OpenAI SDKs), `x-api-key` (Anthropic-style
//! clients) or `x-goog-api-key` (Gemini's). Only its SHA-256 is ever looked up, cached or logged. Lookups go through
//! [`KeyCache`], a bounded in-process cache (moka: TinyLFU admission, LRU eviction, per-entry
//! expiry) in front of the [`KeyLookup`] port (SQLite in the server), so a hot key costs one
//! hash and one cache probe. Concurrent misses for one key share a single store query. A
//! flood of unknown keys cannot push out keys in use: a new entry is admitted only when it
//! has been seen more often than the entry it would evict. A revoke empties the cache at once
//! on the node that made it; other nodes see it within the TTL.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::chain::Phases;
use crate::{Ctx, Filter, GatewayError, RequestHead};

/// `auth:` in the YAML: the key cache.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a found key stays cached.
    pub cache_ttl_ms: u64,
    /// How long an unknown key stays cached as unknown (keeps floods of bad keys off SQLite).
    pub negative_cache_ttl_ms: u64,
    /// Most entries kept; past this, the least useful entry is evicted (or the newcomer is
    /// not admitted).
    pub cache_capacity: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            cache_ttl_ms: 30_000,
            negative_cache_ttl_ms: 2_000,
            cache_capacity: 100_000,
        }
    }
}

/// A key as the gateway needs it on the request path. Never holds the secret. Serialised
/// (JSON) for the shared key cache in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct KeyRecord {
    pub id: i64,
    pub account_id: i64,
    pub account: String,
    pub group: String,
    pub name: String,
    /// The short display prefix (`sk-tg-ab12`), safe to log.
    pub prefix: String,
    pub revoked: bool,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// Allowed models; empty means every served model.
    pub models: Vec<String>,
    /// Allowed client networks; empty means any.
    pub allow_ips: Vec<IpNet>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrency: Option<u32>,
    /// Spending cap in nano-USD.
    pub budget_nano: Option<i64>,
    /// Queue priority, 0 (lowest) to 9; `None` takes the group's, else `queue.default_priority`.
    pub priority: Option<u8>,
    /// Highest priority a client may ask for with `x-tollgate-priority`; `None`: no raise.
    pub max_priority: Option<u8>,
    /// Limits for this key on one model (`--model-limits gpt-4o=rpm:60,tpm:100000`).
    pub model_limits: Vec<(String, crate::limits::LimitSet)>,
}

impl KeyRecord {
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    pub fn allows_ip(&self, ip: Option<IpAddr>) -> bool {
        if self.allow_ips.is_empty() {
            return true;
        }
        let Some(ip) = ip.map(canonical_ip) else {
            return false;
        };
        self.allow_ips.iter().any(|net| net.contains(&ip))
    }
}

/// `::ffff:10.0.0.1` is `10.0.0.1` for allow-list purposes.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// SHA-256 of a secret key: what is stored, cached and compared.
pub type KeyHash = [u8; 32];

pub fn hash_secret(secret: &str) -> KeyHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Where keys live. The server implements it over SQLite; tests use a map.
#[async_trait]
pub trait KeyLookup: Send + Sync {
    async fn find_key(&self, hash: KeyHash) -> Result<Option<KeyRecord>, String>;
}

/// A cached answer: the key, or `None` for "no such key".
type Cached = Option<Arc<KeyRecord>>;

/// Found keys live `cache_ttl`; unknown ones the shorter `negative_ttl`. Each entry's TTL is
/// spread by up to ±10 % (by its key's hash), so keys loaded together (a restart, a cache
/// flush after an admin change) do not all expire, and go back to the store, together.
struct KeyExpiry {
    positive: Duration,
    negative: Duration,
}

impl KeyExpiry {
    fn ttl(&self, hash: &KeyHash, found: bool) -> Duration {
        let base = if found { self.positive } else { self.negative };
        // 0..=255 → 0.90..=1.10 of the base.
        base.mul_f64(0.9 + 0.2 * f64::from(hash[0]) / 255.0)
    }
}

impl moka::Expiry<KeyHash, Cached> for KeyExpiry {
    fn expire_after_create(&self, hash: &KeyHash, value: &Cached, _: Instant) -> Option<Duration> {
        Some(self.ttl(hash, value.is_some()))
    }
}

/// The bounded cache in front of [`KeyLookup`]. Shared with the admin API, which empties it
/// on every key change.
pub struct KeyCache {
    entries: moka::future::Cache<KeyHash, Cached>,
}

impl KeyCache {
    pub fn new(cfg: AuthConfig) -> Self {
        KeyCache {
            entries: moka::future::Cache::builder()
                .max_capacity(cfg.cache_capacity as u64)
                .expire_after(KeyExpiry {
                    positive: Duration::from_millis(cfg.cache_ttl_ms),
                    negative: Duration::from_millis(cfg.negative_cache_ttl_ms),
                })
                .build(),
        }
    }

    /// The cached answer for `hash`, else `load`'s (cached when it succeeds). Concurrent
    /// callers for one missing key wait for a single `load`.
    async fn get_or_load<F>(&self, hash: KeyHash, load: F) -> Result<Cached, Arc<String>>
    where
        F: std::future::Future<Output = Result<Cached, String>>,
    {
        self.entries.try_get_with(hash, load).await
    }

    /// Forget everything: the next request for any key reads the store again.
    pub fn invalidate_all(&self) {
        self.entries.invalidate_all();
    }

    /// Entries held, once pending evictions have run (tests).
    #[cfg(test)]
    async fn settled_len(&self) -> u64 {
        self.entries.run_pending_tasks().await;
        self.entries.entry_count()
    }
}

/// The `auth` filter.
pub struct Auth {
    store: Arc<dyn KeyLookup>,
    cache: Arc<KeyCache>,
}

impl Auth {
    pub fn new(store: Arc<dyn KeyLookup>, cache: Arc<KeyCache>) -> Self {
        Auth { store, cache }
    }

    async fn lookup(&self, hash: KeyHash) -> Result<Cached, GatewayError> {
        let store = &self.store;
        self.cache
            .get_or_load(hash, async move {
                Ok(store.find_key(hash).await?.map(Arc::new))
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "key lookup failed");
                GatewayError::Internal
            })
    }
}

/// The websocket subprotocol that carries a key, as browser clients of the Realtime API send
/// it (a browser cannot set headers on a websocket).
pub const KEY_SUBPROTOCOL: &str = "openai-insecure-api-key.";

/// The presented secret, from `Authorization: Bearer`, `x-api-key` (Anthropic's clients),
/// `x-goog-api-key` (Gemini's), or a websocket upgrade's `openai-insecure-api-key.<key>`
/// subprotocol.
pub fn presented_key(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))?;
        let token = token.trim();
        return (!token.is_empty()).then_some(token);
    }
    headers
        .get("x-api-key")
        .or_else(|| headers.get("x-goog-api-key"))
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .or_else(|| {
            headers
                .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .find_map(|p| p.trim().strip_prefix(KEY_SUBPROTOCOL))
                .filter(|s| !s.is_empty())
        })
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl Filter for Auth {
    fn name(&self) -> &'static str {
        "auth"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEAD | Phases::REQUEST_BODY
    }

    async fn on_request_head(
        &self,
        ctx: &mut Ctx,
        head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        let secret = presented_key(head.headers).ok_or(GatewayError::MissingApiKey)?;
        let record = self
            .lookup(hash_secret(secret))
            .await?
            .ok_or(GatewayError::InvalidApiKey)?;
        if record.revoked {
            return Err(GatewayError::RevokedApiKey);
        }
        if record.expires_at.is_some_and(|t| t <= unix_now()) {
            return Err(GatewayError::ExpiredApiKey);
        }
        if !record.allows_ip(head.client_ip) {
            return Err(GatewayError::IpNotAllowed);
        }
        ctx.key = Some(record);
        Ok(())
    }

    async fn on_request_body(&self, ctx: &mut Ctx) -> Result<(), GatewayError> {
        let (Some(key), Some(facts)) = (&ctx.key, &ctx.facts) else {
            return Ok(());
        };
        if !facts.model.is_empty() && !key.allows_model(&facts.model) {
            return Err(GatewayError::ModelNotAllowed(facts.model.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct MapStore(HashMap<KeyHash, KeyRecord>, AtomicUsize);

    #[async_trait]
    impl KeyLookup for MapStore {
        async fn find_key(&self, hash: KeyHash) -> Result<Option<KeyRecord>, String> {
            self.1.fetch_add(1, Ordering::SeqCst);
            Ok(self.0.get(&hash).cloned())
        }
    }

    fn setup(rec: KeyRecord) -> (Auth, Arc<MapStore>, Arc<KeyCache>) {
        let mut m = HashMap::new();
        m.insert(hash_secret("sk-tg-good"), rec);
        let store = Arc::new(MapStore(m, AtomicUsize::new(0)));
        let cache = Arc::new(KeyCache::new(AuthConfig::default()));
        (Auth::new(store.clone(), cache.clone()), store, cache)
    }

    async fn run(auth: &Auth, header: &str, ip: &str) -> Result<Ctx, GatewayError> {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", header.parse().unwrap());
        let head = RequestHead {
            method: &http::Method::POST,
            path: "/v1/chat/completions",
            headers: &headers,
            client_ip: Some(ip.parse().unwrap()),
        };
        let mut ctx = Ctx::new("r".into());
        auth.on_request_head(&mut ctx, &head).await?;
        Ok(ctx)
    }

    #[tokio::test]
    async fn known_key_passes_and_is_cached() {
        let (auth, store, _) = setup(KeyRecord::default());
        for _ in 0..3 {
            let ctx = run(&auth, "Bearer sk-tg-good", "127.0.0.1").await.unwrap();
            assert!(ctx.key.is_some());
        }
        assert_eq!(store.1.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn unknown_missing_revoked_and_expired_keys_are_refused() {
        let (auth, _, _) = setup(KeyRecord::default());
        assert_eq!(
            run(&auth, "Bearer sk-tg-bad", "127.0.0.1").await.err(),
            Some(GatewayError::InvalidApiKey)
        );
        assert_eq!(
            run(&auth, "Basic abc", "127.0.0.1").await.err(),
            Some(GatewayError::MissingApiKey)
        );
        let (auth, _, _) = setup(KeyRecord {
            revoked: true,
            ..Default::default()
        });
        assert_eq!(
            run(&auth, "Bearer sk-tg-good", "127.0.0.1").await.err(),
            Some(GatewayError::RevokedApiKey)
        );
        let (auth, _, _) = setup(KeyRecord {
            expires_at: Some(unix_now() - 1),
            ..Default::default()
        });
        assert_eq!(
            run(&auth, "Bearer sk-tg-good", "127.0.0.1").await.err(),
            Some(GatewayError::ExpiredApiKey)
        );
    }

    #[tokio::test]
    async fn invalidate_all_makes_the_next_request_read_the_store() {
        let (auth, store, cache) = setup(KeyRecord::default());
        run(&auth, "Bearer sk-tg-good", "127.0.0.1").await.unwrap();
        cache.invalidate_all();
        run(&auth, "Bearer sk-tg-good", "127.0.0.1").await.unwrap();
        assert_eq!(store.1.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn ip_allow_list_accepts_members_and_mapped_v6() {
        let (auth, _, _) = setup(KeyRecord {
            allow_ips: vec!["10.0.0.0/8".parse().unwrap()],
            ..Default::default()
        });
        assert!(run(&auth, "Bearer sk-tg-good", "10.1.2.3").await.is_ok());
        assert!(run(&auth, "Bearer sk-tg-good", "::ffff:10.1.2.3")
            .await
            .is_ok());
        assert_eq!(
            run(&auth, "Bearer sk-tg-good", "192.168.0.1").await.err(),
            Some(GatewayError::IpNotAllowed)
        );
    }

    #[tokio::test]
    async fn model_allow_list_is_checked_after_the_body() {
        let (auth, _, _) = setup(KeyRecord {
            models: vec!["gpt-4o-mini".into()],
            ..Default::default()
        });
        let mut ctx = run(&auth, "Bearer sk-tg-good", "127.0.0.1").await.unwrap();
        ctx.facts = Some(crate::RequestFacts {
            model: "gpt-4o".into(),
            ..Default::default()
        });
        assert_eq!(
            auth.on_request_body(&mut ctx).await.err(),
            Some(GatewayError::ModelNotAllowed("gpt-4o".into()))
        );
        ctx.facts.as_mut().unwrap().model = "gpt-4o-mini".into();
        assert!(auth.on_request_body(&mut ctx).await.is_ok());
    }

    /// Counts lookups per key; each takes a while, so concurrent misses overlap.
    struct SlowStore {
        good: KeyHash,
        delay: Duration,
        calls: std::sync::Mutex<HashMap<KeyHash, usize>>,
    }

    #[async_trait]
    impl KeyLookup for SlowStore {
        async fn find_key(&self, hash: KeyHash) -> Result<Option<KeyRecord>, String> {
            *self.calls.lock().unwrap().entry(hash).or_default() += 1;
            tokio::time::sleep(self.delay).await;
            Ok((hash == self.good).then(KeyRecord::default))
        }
    }

    fn slow(cfg: AuthConfig, delay_ms: u64) -> (Arc<Auth>, Arc<SlowStore>) {
        let store = Arc::new(SlowStore {
            good: hash_secret("sk-tg-good"),
            delay: Duration::from_millis(delay_ms),
            calls: Default::default(),
        });
        let auth = Auth::new(store.clone(), Arc::new(KeyCache::new(cfg)));
        (Arc::new(auth), store)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_misses_for_one_key_query_the_store_once() {
        let (auth, store) = slow(AuthConfig::default(), 20);
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let auth = auth.clone();
                let secret = if i % 2 == 0 {
                    "sk-tg-good"
                } else {
                    "sk-tg-bad"
                };
                tokio::spawn(async move { auth.lookup(hash_secret(secret)).await })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap().is_some(), i % 2 == 0);
        }
        let calls = store.calls.lock().unwrap();
        assert_eq!(calls[&hash_secret("sk-tg-good")], 1);
        assert_eq!(calls[&hash_secret("sk-tg-bad")], 1);
    }

    #[tokio::test]
    async fn a_flood_of_unknown_keys_does_not_evict_a_key_in_use() {
        let capacity = 200;
        let (auth, store) = slow(
            AuthConfig {
                cache_capacity: capacity,
                ..AuthConfig::default()
            },
            0,
        );
        let good = hash_secret("sk-tg-good");
        // Five times capacity unknown keys, while the good key's client keeps working.
        for i in 0..5 * capacity {
            if i % 10 == 0 {
                assert!(auth.lookup(good).await.unwrap().is_some());
            }
            let bad = hash_secret(&format!("sk-tg-bad-{i}"));
            assert!(auth.lookup(bad).await.unwrap().is_none());
        }
        assert!(auth.cache.settled_len().await <= capacity as u64);
        assert!(auth.lookup(good).await.unwrap().is_some());
        assert_eq!(
            store.calls.lock().unwrap()[&good],
            1,
            "the good key stayed cached"
        );
    }

    #[tokio::test]
    async fn unknown_keys_expire_after_the_negative_ttl_and_known_ones_stay() {
        let (auth, store) = slow(
            AuthConfig {
                negative_cache_ttl_ms: 50,
                ..AuthConfig::default()
            },
            0,
        );
        let (good, bad) = (hash_secret("sk-tg-good"), hash_secret("sk-tg-bad"));
        for _ in 0..2 {
            auth.lookup(good).await.unwrap();
            auth.lookup(bad).await.unwrap();
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        let calls = store.calls.lock().unwrap();
        assert_eq!((calls[&good], calls[&bad]), (1, 2));
    }

    #[test]
    fn x_api_key_is_accepted_too() {
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "sk-tg-1".parse().unwrap());
        assert_eq!(presented_key(&h), Some("sk-tg-1"));
        let mut h = http::HeaderMap::new();
        h.insert("x-goog-api-key", "sk-tg-2".parse().unwrap());
        assert_eq!(presented_key(&h), Some("sk-tg-2"));
        let mut h = http::HeaderMap::new();
        h.insert(
            "sec-websocket-protocol",
            "realtime, openai-insecure-api-key.sk-tg-3, openai-beta.realtime-v1"
                .parse()
                .unwrap(),
        );
        assert_eq!(presented_key(&h), Some("sk-tg-3"));
        h.insert("sec-websocket-protocol", "realtime".parse().unwrap());
        assert_eq!(presented_key(&h), None);
    }

    #[test]
    fn cache_lifetimes_are_spread_by_key_within_a_tenth_of_the_ttl() {
        let e = KeyExpiry {
            positive: Duration::from_secs(30),
            negative: Duration::from_secs(2),
        };
        let ttls: Vec<Duration> = (0..=255u8)
            .map(|b| {
                let mut h = [0u8; 32];
                h[0] = b;
                e.ttl(&h, true)
            })
            .collect();
        assert!(ttls
            .iter()
            .all(|t| *t >= Duration::from_secs(27) && *t <= Duration::from_secs(33)));
        assert_eq!(ttls[0], Duration::from_secs(27));
        assert_eq!(ttls[255], Duration::from_secs(33));
        let distinct: std::collections::BTreeSet<_> = ttls.iter().collect();
        assert!(distinct.len() > 200, "spread, not one value");
        let neg = e.ttl(&[128; 32], false);
        assert!(neg > Duration::from_millis(1800) && neg < Duration::from_millis(2200));
    }
}
