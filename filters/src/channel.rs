//! The channel table: one entry per configured provider endpoint, built once at start-up
//! and shared (`Arc<[Channel]>`) by the picker, the relay and billing.
//!
//! A [`Channel`] holds everything about one channel: its routing data (models, map,
//! priority, weight), its connection data (resolved peer, `Host`, credentials, timeouts,
//! trusted CA), its concurrency slots and its [`Health`].

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use pingora_core::protocols::tls::CaType;
use pingora_core::upstreams::peer::{HttpPeer, Peer};
use pingora_core::utils::tls::{parse_x509, WrappedX509};
use serde::Deserialize;
use tokio::sync::Semaphore;

/// Per-write timeout towards the upstream.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Openai,
}

/// One `channels:` entry in the YAML.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    pub name: String,
    #[serde(default = "d_kind")]
    pub kind: ChannelKind,
    pub base_url: String,
    #[serde(default)]
    pub api_key: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "d_weight")]
    pub weight: u32,
    #[serde(default = "d_max_conc")]
    pub max_concurrency: u32,
    #[serde(default = "d_connect")]
    pub connect_timeout_ms: u64,
    #[serde(default = "d_read")]
    pub read_timeout_ms: u64,
    #[serde(default = "d_idle")]
    pub idle_timeout_s: u64,
    /// Verify the upstream's TLS certificate (turn off only for self-signed test upstreams).
    #[serde(default = "d_true")]
    pub tls_verify: bool,
    /// Ask for `stream_options.include_usage` on streams whose client did not, so usage is
    /// exact; turn off for providers that reject the field.
    #[serde(default = "d_true")]
    pub inject_stream_usage: bool,
    /// A PEM CA certificate to trust for this channel instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn d_kind() -> ChannelKind {
    ChannelKind::Openai
}
fn d_weight() -> u32 {
    1
}
fn d_max_conc() -> u32 {
    256
}
fn d_connect() -> u64 {
    3000
}
fn d_read() -> u64 {
    300_000
}
fn d_idle() -> u64 {
    90
}
fn d_true() -> bool {
    true
}

/// `routing.health`: how a channel's health is judged.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Attempts are judged over windows of this length.
    pub window_s: u64,
    /// No verdict on fewer attempts than this in a window.
    pub min_requests: u32,
    /// At least this many failures in the window...
    pub failure_threshold: u32,
    /// ... and at least this share of the window's attempts failed.
    pub failure_ratio: f64,
    /// A failing channel is tried last for this long, then one probe request decides.
    pub cooldown_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            window_s: 30,
            min_requests: 10,
            failure_threshold: 5,
            failure_ratio: 0.5,
            cooldown_s: 30,
        }
    }
}

/// A channel's `base_url`, split for the connector. Holds no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash, e.g. `` or `/openai`.
    pub base_path: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let uri: http::Uri = s.parse().map_err(|_| {
            "is not a valid URL (expected http(s)://host[:port][/path])".to_string()
        })?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("must start with http:// or https://".into()),
        };
        let auth = uri.authority().ok_or("has no host")?;
        if auth.as_str().contains('@') {
            return Err("must not carry credentials; put the key in `api_key`".into());
        }
        let host = auth
            .host()
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        if host.is_empty() {
            return Err("has no host".into());
        }
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        let port = auth.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            base_path,
        })
    }

    /// The upstream path for a client path: a base URL ending in `/v1` (as many
    /// OpenAI-compatible providers document it) does not double the `/v1`.
    pub fn upstream_path(&self, client_path: &str) -> String {
        if self.base_path.ends_with("/v1") {
            if let Some(rest) = client_path.strip_prefix("/v1") {
                return format!("{}{}", self.base_path, rest);
            }
        }
        format!("{}{}", self.base_path, client_path)
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// A channel's health: attempts are counted in windows of `window_s`; a window with at
/// least `min_requests` attempts, `failure_threshold` failures and a failure share of
/// `failure_ratio` opens the breaker for `cooldown_s`. After that, the next attempt is a
/// probe (the others still see the channel as cooling while the probe is out): its success
/// closes the breaker, its failure opens it again. One tenant's handful of failing requests
/// stays under `min_requests` and cannot cool a channel down for everyone.
pub struct Health {
    cfg: HealthConfig,
    epoch: Instant,
    /// 0 when closed; else the instant (ns since `epoch`, at least 1) the cooldown ends.
    open_until: AtomicU64,
    /// While half-open: until when the probe handed out is exclusive.
    probe_until: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    start: u64,
    ok: u32,
    failed: u32,
}

impl Health {
    pub fn new(cfg: HealthConfig) -> Health {
        Health {
            cfg,
            epoch: Instant::now(),
            open_until: AtomicU64::new(0),
            probe_until: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
        }
    }

    fn now(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    fn cooldown_ns(&self) -> u64 {
        self.cfg.cooldown_s.saturating_mul(1_000_000_000)
    }

    /// Whether the picker should put this channel in its normal place (closed, or
    /// half-open with no probe out) rather than last.
    pub fn is_available(&self) -> bool {
        let open = self.open_until.load(Ordering::Relaxed);
        if open == 0 {
            return true;
        }
        let now = self.now();
        now >= open && now >= self.probe_until.load(Ordering::Relaxed)
    }

    /// An attempt is about to use the channel: if it is half-open, this attempt is the
    /// probe (exclusive for one cooldown, so a probe that never reports cannot wedge it).
    pub fn attempt_started(&self) {
        let open = self.open_until.load(Ordering::Relaxed);
        if open != 0 {
            let now = self.now();
            if now >= open {
                self.probe_until
                    .store(now.saturating_add(self.cooldown_ns()), Ordering::Relaxed);
            }
        }
    }

    /// Records an attempt's result. Returns true when this report opened the breaker.
    pub fn report(&self, failed: bool) -> bool {
        let now = self.now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let open = self.open_until.load(Ordering::Relaxed);
        if open != 0 {
            if now < open {
                // Results of attempts started before the breaker opened.
                return false;
            }
            // Half-open: this is the probe's verdict (or one of its contemporaries').
            *w = Window {
                start: now,
                ..Window::default()
            };
            self.probe_until.store(0, Ordering::Relaxed);
            if failed {
                self.open_until
                    .store(now.saturating_add(self.cooldown_ns()), Ordering::Relaxed);
                return true;
            }
            self.open_until.store(0, Ordering::Relaxed);
            return false;
        }
        if now.saturating_sub(w.start) > self.cfg.window_s.saturating_mul(1_000_000_000) {
            *w = Window {
                start: now,
                ..Window::default()
            };
        }
        if failed {
            w.failed += 1;
        } else {
            w.ok += 1;
        }
        let total = w.ok + w.failed;
        let trips = total >= self.cfg.min_requests
            && w.failed >= self.cfg.failure_threshold
            && f64::from(w.failed) >= self.cfg.failure_ratio * f64::from(total);
        if trips {
            self.open_until
                .store(now.saturating_add(self.cooldown_ns()), Ordering::Relaxed);
            *w = Window {
                start: now,
                ..Window::default()
            };
        }
        trips
    }
}

/// One provider endpoint: routing data, connection data, slots and health.
pub struct Channel {
    /// Position in the table.
    pub index: usize,
    pub name: String,
    pub models: Vec<String>,
    /// Client model name → upstream model name.
    pub model_map: BTreeMap<String, String>,
    pub priority: i32,
    pub weight: u32,
    pub max_concurrency: u32,
    /// Ask for `stream_options.include_usage` when the client did not.
    pub inject_stream_usage: bool,
    pub url: UpstreamUrl,
    pub host_header: HeaderValue,
    /// `Bearer <key>`, marked sensitive so it is never printed by `Debug`.
    pub auth_header: Option<HeaderValue>,
    /// The key itself, only to scrub it out of what providers send back.
    pub secret: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    tls_verify: bool,
    ca: Option<Arc<CaType>>,
    /// The resolved peer; refreshed off the request path ([`Channel::resolve`]).
    peer: ArcSwapOption<HttpPeer>,
    /// Requests in flight on this channel, bounded by `max_concurrency`.
    pub slots: Arc<Semaphore>,
    pub health: Health,
}

/// The table every part of the gateway reads.
pub type Channels = Arc<[Channel]>;

/// Builds the table from the YAML entries.
pub fn build_channels(cfgs: &[ChannelConfig], health: HealthConfig) -> Result<Channels, String> {
    cfgs.iter()
        .enumerate()
        .map(|(i, c)| Channel::new(i, c, health))
        .collect::<Result<Vec<_>, _>>()
        .map(Into::into)
}

impl Channel {
    pub fn new(index: usize, cfg: &ChannelConfig, health: HealthConfig) -> Result<Channel, String> {
        let url = UpstreamUrl::parse(&cfg.base_url)
            .map_err(|e| format!("channel {}: base_url {e}", cfg.name))?;
        let host_header = HeaderValue::from_str(&url.host_header())
            .map_err(|_| format!("channel {}: bad host", cfg.name))?;
        let auth_header = if cfg.api_key.is_empty() {
            None
        } else {
            let mut v =
                HeaderValue::from_str(&format!("Bearer {}", cfg.api_key)).map_err(|_| {
                    format!("channel {}: api_key is not a valid header value", cfg.name)
                })?;
            v.set_sensitive(true);
            Some(v)
        };
        Ok(Channel {
            index,
            name: cfg.name.clone(),
            models: cfg.models.clone(),
            model_map: cfg.model_map.clone(),
            priority: cfg.priority,
            weight: cfg.weight,
            max_concurrency: cfg.max_concurrency,
            inject_stream_usage: cfg.inject_stream_usage,
            url,
            host_header,
            auth_header,
            secret: cfg.api_key.clone(),
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            read_timeout: Duration::from_millis(cfg.read_timeout_ms),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_s),
            tls_verify: cfg.tls_verify,
            ca: cfg
                .ca_file
                .as_ref()
                .map(|p| load_ca(&cfg.name, p))
                .transpose()?,
            peer: ArcSwapOption::empty(),
            slots: Arc::new(Semaphore::new(cfg.max_concurrency as usize)),
            health: Health::new(health),
        })
    }

    /// Resolves the host (a blocking call: run it off the request path) and installs a peer.
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let addr = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| "no address".to_string())?;
        let current = self.peer.load();
        if current
            .as_ref()
            .and_then(|p| p.address().as_inet().copied())
            == Some(addr)
        {
            return Ok(addr);
        }
        let mut peer = HttpPeer::new(addr, self.url.tls, self.url.host.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.total_connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        peer.options.write_timeout = Some(WRITE_TIMEOUT);
        peer.options.idle_timeout = Some(self.idle_timeout);
        peer.options.verify_cert = self.tls_verify;
        peer.options.verify_hostname = self.tls_verify;
        peer.options.ca = self.ca.clone();
        // Pingora's pool key leaves the trusted CA out: each channel pools its own
        // connections, so two channels on one address never share a connection verified
        // against the other's CA.
        peer.group_key = self.index as u64 + 1;
        self.peer.store(Some(Arc::new(peer)));
        Ok(addr)
    }

    /// The resolved peer, if DNS has answered yet.
    pub fn peer(&self) -> Option<Arc<HttpPeer>> {
        self.peer.load_full()
    }

    pub fn write_timeout(&self) -> Duration {
        WRITE_TIMEOUT
    }

    /// Requests on this channel now.
    pub fn in_use(&self) -> usize {
        (self.max_concurrency as usize).saturating_sub(self.slots.available_permits())
    }

    /// The upstream model name for a client model name, when `model_map` renames it.
    pub fn upstream_model(&self, model: &str) -> Option<&str> {
        self.model_map.get(model).map(String::as_str)
    }
}

/// Reads a PEM CA certificate for a channel that trusts its own CA.
fn load_ca(channel: &str, path: &std::path::Path) -> Result<Arc<CaType>, String> {
    let der = pingora_core::tls::load_pem_file_ca(&path.display().to_string())
        .map_err(|e| format!("channel {channel}: ca_file: {e}"))?;
    if der.is_empty() {
        return Err(format!("channel {channel}: ca_file holds no certificate"));
    }
    let cert = WrappedX509::new(der, parse_x509);
    Ok(Arc::from(vec![cert]))
}

/// A channel for unit tests: serves `m`, nothing resolved.
#[cfg(test)]
pub(crate) fn test_channel(name: &str) -> Channel {
    let cfg: ChannelConfig = serde_json::from_value(serde_json::json!({
        "name": name, "base_url": "http://127.0.0.1:9", "models": ["m"]
    }))
    .unwrap();
    Channel::new(0, &cfg, HealthConfig::default()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(min_requests: u32, cooldown_s: u64) -> Health {
        Health::new(HealthConfig {
            window_s: 60,
            min_requests,
            failure_threshold: 3,
            failure_ratio: 0.5,
            cooldown_s,
        })
    }

    #[test]
    fn a_few_failures_below_the_minimum_volume_never_cool_a_channel() {
        let h = health(10, 60);
        for _ in 0..6 {
            assert!(!h.report(true));
        }
        assert!(h.is_available(), "six failures < min_requests");
    }

    #[test]
    fn a_failing_share_over_enough_volume_opens_the_breaker() {
        let h = health(10, 60);
        for _ in 0..5 {
            h.report(false);
        }
        let opened = (0..5).map(|_| h.report(true)).filter(|&o| o).count();
        assert_eq!(opened, 1);
        assert!(!h.is_available());
    }

    #[test]
    fn mostly_successful_traffic_stays_closed() {
        let h = health(10, 60);
        for i in 0..100 {
            h.report(i % 4 == 0); // 25% failures
        }
        assert!(h.is_available());
    }

    #[test]
    fn after_the_cooldown_one_probe_decides() {
        let h = health(2, 0);
        h.report(true);
        h.report(true);
        h.report(true);
        // Cooldown 0: half-open at once; the probe is free.
        assert!(h.is_available());
        h.attempt_started();
        // The probe lease lasts one cooldown (0 here), so take a real one.
        let h = health(2, 3600);
        for _ in 0..3 {
            h.report(true);
        }
        assert!(!h.is_available());
        // Force half-open: pretend the cooldown ended.
        h.open_until.store(1, Ordering::Relaxed);
        assert!(h.is_available(), "half-open with no probe out");
        h.attempt_started();
        assert!(!h.is_available(), "the probe is out: others keep away");
        assert!(!h.report(false));
        assert!(h.is_available(), "a good probe closes the breaker");
        assert_eq!(h.open_until.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_again() {
        let h = health(2, 3600);
        for _ in 0..3 {
            h.report(true);
        }
        h.open_until.store(1, Ordering::Relaxed);
        h.attempt_started();
        assert!(h.report(true));
        assert!(!h.is_available());
    }

    #[test]
    fn channels_on_one_address_never_share_pooled_connections() {
        let cfg = |name: &str| -> ChannelConfig {
            serde_json::from_value(serde_json::json!({
                "name": name, "base_url": "https://127.0.0.1:9443", "models": ["m"]
            }))
            .unwrap()
        };
        let chans = build_channels(&[cfg("a"), cfg("b")], HealthConfig::default()).unwrap();
        chans[0].resolve().unwrap();
        chans[1].resolve().unwrap();
        let (a, b) = (chans[0].peer().unwrap(), chans[1].peer().unwrap());
        assert_eq!(a.address(), b.address());
        assert_ne!(a.reuse_hash(), b.reuse_hash());
    }

    #[test]
    fn upstream_url_paths_and_host_header() {
        let u = UpstreamUrl::parse("https://api.openai.com").unwrap();
        assert_eq!(
            (u.tls, u.port, u.host_header()),
            (true, 443, "api.openai.com".into())
        );
        assert_eq!(
            u.upstream_path("/v1/chat/completions"),
            "/v1/chat/completions"
        );
        let u = UpstreamUrl::parse("http://127.0.0.1:9000/v1/").unwrap();
        assert_eq!(u.upstream_path("/v1/embeddings"), "/v1/embeddings");
        assert_eq!(u.host_header(), "127.0.0.1:9000");
        let u = UpstreamUrl::parse("https://h.example/openai").unwrap();
        assert_eq!(u.upstream_path("/v1/models"), "/openai/v1/models");
    }
}
