//! The configuration's sections as typed structs, with their serde defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
pub use tollgate_filters::limits::OnError;

use super::{ConnectionLimits, H2Limits, IpLimit, LimitSet, PrivateUpstreams, TlsConfig};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    pub admin_listen: String,
    #[serde(default = "d_threads")]
    pub threads: usize,
    #[serde(default)]
    pub admin_token: String,
    #[serde(default = "d_max_body")]
    pub max_body_bytes: usize,
    #[serde(default = "d_grace")]
    pub grace_period_s: u64,
    /// Idle upstream connections kept for reuse (Pingora's `upstream_keepalive_pool_size`).
    #[serde(default = "d_pool")]
    pub upstream_keepalive_pool_size: usize,
    /// A client that accepts no response bytes for this long is treated as gone.
    #[serde(default = "d_client_write")]
    pub client_write_timeout_ms: u64,
    /// `tracing` filter directive, e.g. `info` or `tollgate=debug`.
    #[serde(default = "d_log")]
    pub log_level: String,
    /// Deadlines and the cap on client connections.
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// HTTPS on the main listener (ALPN `h2` and `http/1.1`).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// HTTPS on the admin listener (HTTP/1.1), optionally with client certificates.
    #[serde(default)]
    pub admin_tls: Option<TlsConfig>,
    /// Accept prior-knowledge HTTP/2 in plain text on the main listener.
    #[serde(default)]
    pub h2c: bool,
    /// Limits for HTTP/2 client connections.
    #[serde(default)]
    pub h2: H2Limits,
    /// The Unix socket a new process (`tollgate serve --upgrade`) takes the listening
    /// sockets from when this one gets SIGQUIT.
    #[serde(default = "d_upgrade_sock")]
    pub upgrade_sock: String,
}

fn d_threads() -> usize {
    2
}
fn d_max_body() -> usize {
    32 * 1024 * 1024
}
fn d_grace() -> u64 {
    30
}
fn d_pool() -> usize {
    128
}
fn d_upgrade_sock() -> String {
    "/tmp/tollgate_upgrade.sock".into()
}
fn d_client_write() -> u64 {
    30_000
}
fn d_log() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalMode {
    Wal,
    Delete,
    Truncate,
    Persist,
    Memory,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Off,
    Normal,
    Full,
    Extra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TempStore {
    Default,
    File,
    Memory,
}

/// The durable store: an SQLite file (`path`, the default) or a PostgreSQL server (`url`),
/// exactly one of the two. The PRAGMA fields apply to SQLite only; `pool_size` and
/// `busy_timeout_ms` (the wait for a pooled connection) to both.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// The SQLite file; `None` is [`DEFAULT_DB_PATH`] unless `url` is set.
    pub path: Option<PathBuf>,
    /// `postgres://user:password@host:port/db` (or `postgresql://`): PostgreSQL instead of
    /// SQLite. Never printed whole: see [`crate::store::pg::redact`].
    pub url: Option<String>,
    pub journal_mode: JournalMode,
    pub synchronous: Synchronous,
    pub cache_size_kib: i64,
    pub mmap_size_bytes: u64,
    pub temp_store: TempStore,
    pub busy_timeout_ms: u64,
    pub pool_size: u32,
}

/// Where the SQLite file is when `database` names neither a path nor a URL.
pub const DEFAULT_DB_PATH: &str = "data/tollgate.db";

impl DatabaseConfig {
    /// The PostgreSQL URL when one is configured (then `path` is unused).
    pub fn postgres_url(&self) -> Option<&str> {
        self.url.as_deref()
    }

    /// The SQLite file: `path`, or the default.
    pub fn sqlite_path(&self) -> PathBuf {
        self.path
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DB_PATH))
    }

    /// A config for the SQLite file at `path`, the other fields as in `self`.
    pub fn with_sqlite_path(&self, path: PathBuf) -> DatabaseConfig {
        DatabaseConfig {
            path: Some(path),
            url: None,
            ..self.clone()
        }
    }

    /// Where the store is, fit for a log line (a URL's password is replaced).
    pub fn describe(&self) -> String {
        match self.postgres_url() {
            Some(url) => crate::store::pg::redact(url),
            None => self.sqlite_path().display().to_string(),
        }
    }
}

/// Written by hand so that a password in `url` never reaches a log through `{:?}`.
impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(crate::store::pg::redact))
            .field("journal_mode", &self.journal_mode)
            .field("synchronous", &self.synchronous)
            .field("cache_size_kib", &self.cache_size_kib)
            .field("mmap_size_bytes", &self.mmap_size_bytes)
            .field("temp_store", &self.temp_store)
            .field("busy_timeout_ms", &self.busy_timeout_ms)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            path: None,
            url: None,
            journal_mode: JournalMode::Wal,
            synchronous: Synchronous::Normal,
            cache_size_kib: 65536,
            mmap_size_bytes: 268_435_456,
            temp_store: TempStore::Memory,
            busy_timeout_ms: 5000,
            pool_size: 8,
        }
    }
}

/// `redis:`: the state gateway nodes share (limits, concurrency places, pushed changes, the
/// node registry).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    /// Multiplexed connections per node; calls are spread over them.
    #[serde(default = "d_redis_pool")]
    pub pool_size: u32,
    /// Every call's deadline; past it the call counts as an error.
    #[serde(default = "d_redis_timeout")]
    pub timeout_ms: u64,
    /// While Redis cannot be reached: `local_share` (each node enforces limit ÷ live nodes),
    /// `allow` or `deny`.
    #[serde(default)]
    pub on_error: OnError,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    #[serde(default = "d_redis_namespace")]
    pub namespace: String,
    /// This node's name in the registry (`GET /admin/nodes`); default `hostname-pid`.
    #[serde(default)]
    pub node_id: Option<String>,
}

fn d_redis_pool() -> u32 {
    16
}
fn d_redis_timeout() -> u64 {
    50
}
fn d_redis_namespace() -> String {
    "tollgate".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// USD per 1M prompt tokens.
    #[serde(default)]
    pub input: f64,
    /// USD per 1M completion tokens.
    #[serde(default)]
    pub output: f64,
    /// USD per 1M cached prompt tokens (cache reads; `cache_read` is the same field under
    /// Anthropic's name); defaults to `input`.
    #[serde(default, alias = "cache_read")]
    pub cached_input: Option<f64>,
    /// USD per 1M prompt tokens written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`); defaults to `input`.
    #[serde(default)]
    pub cache_write: Option<f64>,
    /// USD per 1M audio input tokens (realtime and audio models); defaults to `input`.
    #[serde(default)]
    pub audio_input: Option<f64>,
    /// USD per 1M audio output tokens; defaults to `output`.
    #[serde(default)]
    pub audio_output: Option<f64>,
    /// USD per generated image (`images/generations`, `edits`, `variations`), keyed by
    /// `quality/size` (`hd/1024x1024`), `size`, `quality` or `default`, the most specific
    /// first. A model with unit prices is charged for its units, not its tokens.
    #[serde(default)]
    pub per_image: BTreeMap<String, f64>,
    /// USD per second of audio transcribed or translated (`audio/transcriptions`).
    #[serde(default)]
    pub per_audio_second: f64,
    /// USD per 1M characters spoken (`audio/speech`).
    #[serde(default)]
    pub per_1m_characters: f64,
    /// Fixed USD per request, on top of tokens.
    #[serde(default)]
    pub per_request: f64,
    /// Output cap assumed when a request sets no `max_tokens`.
    #[serde(default)]
    pub default_max_output: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Unpriced {
    #[default]
    Reject,
    Free,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PricingConfig {
    pub models: BTreeMap<String, ModelPrice>,
    pub groups: BTreeMap<String, f64>,
    pub unpriced: Unpriced,
    /// Serve the price table at `GET /api/pricing` on the main listener.
    pub expose: bool,
    /// Output cap assumed for the worst-case reservation when neither the request
    /// (`max_tokens`) nor the model (`default_max_output`) sets one.
    pub default_max_output: u64,
}

impl Default for PricingConfig {
    fn default() -> Self {
        PricingConfig {
            models: BTreeMap::new(),
            groups: BTreeMap::from([("default".to_string(), 1.0)]),
            unpriced: Unpriced::Reject,
            expose: false,
            default_max_output: 4096,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub default: LimitSet,
    pub groups: BTreeMap<String, LimitSet>,
    pub ip: IpLimit,
    /// Per account (all its keys together), by account name.
    pub accounts: BTreeMap<String, LimitSet>,
    /// For accounts without an entry in `accounts`.
    pub account_default: LimitSet,
    /// Per model (every key together), by the model name clients send.
    pub models: BTreeMap<String, LimitSet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountingConfig {
    pub flush_interval_ms: u64,
    pub max_batch: usize,
    pub retention_days: u32,
    /// After a client disconnects mid-response, keep reading the provider this long for usage.
    pub drain_timeout_ms: u64,
    /// ... and at most this many bytes.
    pub drain_max_bytes: u64,
    /// Ledger rows queued but not committed past which new requests get 503
    /// (`ledger_backlogged`) and /readyz fails. Rows of admitted requests are never dropped.
    pub max_queue_rows: usize,
    /// Credit leases (several nodes spending one balance): `auto` (on with PostgreSQL),
    /// `on` or `off`.
    pub leases: LeaseMode,
    /// A node's slices expire this long after its last renewal (renewed every sixth).
    pub lease_ttl_s: u64,
}

/// `accounting.leases`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseMode {
    #[default]
    Auto,
    On,
    Off,
}

impl Default for AccountingConfig {
    fn default() -> Self {
        AccountingConfig {
            flush_interval_ms: 20,
            max_batch: 2000,
            retention_days: 90,
            drain_timeout_ms: 60_000,
            drain_max_bytes: 16 * 1024 * 1024,
            max_queue_rows: 100_000,
            leases: LeaseMode::Auto,
            lease_ttl_s: 60,
        }
    }
}

/// `security:`: what tollgate refuses on the operator's behalf.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// `allow` (default, with a `check-config` warning) or `deny`: channels whose
    /// `base_url` resolves to a loopback or private address.
    pub private_upstreams: PrivateUpstreams,
}
