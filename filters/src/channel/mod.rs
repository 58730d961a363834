//! The channel table: one entry per configured provider endpoint, built once at start-up
//! and shared (`Arc<[Channel]>`) by the picker, the relay and billing.
//!
//! A [`Channel`] holds everything about one channel: its routing data (models, map,
//! priority, weight), its connection data (resolved peer, `Host`, credentials, timeouts,
//! trusted CA), its concurrency slots and its [`Health`].

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue};
use pingora_core::protocols::tls::CaType;
use pingora_core::upstreams::peer::{HttpPeer, Peer, ALPN};
use pingora_core::utils::tls::{parse_x509, WrappedX509};
use serde::Deserialize;
use tokio::sync::Semaphore;

mod policy;

pub use policy::{classify, is_numeric_host, AddrClass, PrivateUpstreams, UpstreamPolicy};

use crate::azure::{Azure, AzureConfig};
use crate::dial::alpn_for;
pub use crate::dial::{Dial, Http2Mode};
pub use crate::health::{Health, HealthConfig};
use crate::wire::Wire;

/// Per-write timeout towards the upstream.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    /// OpenAI and every provider that speaks its API at `base_url` + `/v1/…`, with the key
    /// as `Authorization: Bearer`.
    Openai,
    /// Azure OpenAI: its deployment (or v1) URLs and the `api-key` header (`azure:`).
    Azure,
    /// Anthropic's Messages API at `base_url` + `/v1/messages`, the key as `x-api-key`, with
    /// `anthropic-version` (the client's, else `anthropic_version`).
    Anthropic,
    /// Gemini's native API at `base_url` + `/v1beta/models/{model}:generateContent`, the
    /// key as `x-goog-api-key`. (Gemini's OpenAI-compatible endpoint is `kind: openai`.)
    Gemini,
}

impl ChannelKind {
    /// The wire format the channel's provider speaks.
    pub fn wire(self) -> Wire {
        match self {
            ChannelKind::Openai | ChannelKind::Azure => Wire::OpenAi,
            ChannelKind::Anthropic => Wire::Anthropic,
            ChannelKind::Gemini => Wire::Gemini,
        }
    }
}

/// The `anthropic-version` sent to an Anthropic channel whose client sent none.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

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
    /// Let `base_url` resolve to a link-local or cloud-metadata address (169.254.0.0/16,
    /// fe80::/10, fd00:ec2::254, `metadata.google.internal`, ...), refused by default.
    #[serde(default)]
    pub allow_link_local: bool,
    /// HTTP/2 to this provider: `auto` (offer h2 by ALPN on https, HTTP/1.1 on http),
    /// `on` (h2 only: ALPN `h2` on https, prior-knowledge h2c on http), `off`.
    #[serde(default)]
    pub http2: Http2Mode,
    /// Streams one HTTP/2 connection to the provider carries at once (the provider's own
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` may lower it).
    #[serde(default = "d_h2_streams")]
    pub max_h2_streams: usize,
    /// With `kind: azure`: how the resource is addressed (see [`crate::azure`]).
    #[serde(default)]
    pub azure: Option<AzureConfig>,
    /// With `kind: anthropic`: the `anthropic-version` sent when the client sends none
    /// (OpenAI clients reaching the channel through translation never do).
    #[serde(default)]
    pub anthropic_version: Option<String>,
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
fn d_h2_streams() -> usize {
    100
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
        if uri.query().is_some() || s.contains('?') {
            return Err("must not have a query string".into());
        }
        if s.contains('#') {
            return Err("must not have a fragment".into());
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
    /// The key's header (`Authorization: Bearer <key>`, or `api-key: <key>` on Azure), the
    /// value marked sensitive so it is never printed by `Debug`.
    pub auth_header: Option<(HeaderName, HeaderValue)>,
    /// `kind: azure`: its URLs.
    pub azure: Option<Azure>,
    /// The wire format the provider speaks (from `kind`).
    pub wire: Wire,
    /// `kind: anthropic`: the `anthropic-version` for clients that send none.
    pub anthropic_version: Option<HeaderValue>,
    /// The key itself, only to scrub it out of what providers send back.
    pub secret: String,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    tls_verify: bool,
    ca: Option<Arc<CaType>>,
    /// Which addresses the host may resolve to.
    pub policy: UpstreamPolicy,
    /// The protocols offered on new connections (from `http2`).
    alpn: ALPN,
    max_h2_streams: usize,
    /// The resolved peer; refreshed off the request path ([`Channel::resolve`]).
    peer: ArcSwapOption<HttpPeer>,
    /// Requests in flight on this channel, bounded by `max_concurrency`.
    pub slots: Arc<Semaphore>,
    pub health: Health,
    /// How the relay opens connections to this provider (HTTP/2 or HTTP/1.1).
    pub dial: Dial,
}

impl Channel {
    /// The path and query sent upstream for a client's `path` and `query`: the channel's
    /// base path in front (`/v1` not doubled), or Azure's URLs; `model` is the model sent
    /// upstream (Azure's deployment follows it).
    pub fn upstream_target(&self, path: &str, query: Option<&str>, model: Option<&str>) -> String {
        if self.wire == Wire::Gemini {
            // Gemini names the model and the method in the path; the client's query (a
            // native client's `alt`, or a `key`) is never passed on.
            let stream = crate::ctx::gemini_model(path).is_some_and(|(_, s)| s);
            return self.gemini_target(model.unwrap_or_default(), stream);
        }
        if let Some(azure) = &self.azure {
            return azure.target(&self.url.base_path, path, query, model);
        }
        let mut target = self.url.upstream_path(path);
        if let Some(q) = query {
            target.push('?');
            target.push_str(q);
        }
        target
    }
}

impl Channel {
    /// The path for a request in the channel's own wire format, for a client speaking
    /// another (`stream`: the client asked for a stream).
    pub fn translated_target(&self, model: Option<&str>, stream: bool) -> String {
        match self.wire {
            Wire::OpenAi => self.upstream_target("/v1/chat/completions", None, model),
            Wire::Anthropic => self.url.upstream_path("/v1/messages"),
            Wire::Gemini => self.gemini_target(model.unwrap_or_default(), stream),
        }
    }

    /// `{base}/v1beta/models/{model}:generateContent`, or `:streamGenerateContent?alt=sse`
    /// (a base URL ending in `/v1beta` does not double it).
    fn gemini_target(&self, model: &str, stream: bool) -> String {
        let base = self.url.base_path.trim_end_matches("/v1beta");
        let mut out = String::with_capacity(base.len() + model.len() + 48);
        out.push_str(base);
        out.push_str("/v1beta/models/");
        crate::azure::push_segment(&mut out, model);
        out.push_str(if stream {
            ":streamGenerateContent?alt=sse"
        } else {
            ":generateContent"
        });
        out
    }
}

/// The table every part of the gateway reads.
pub type Channels = Arc<[Channel]>;

/// Builds the table from the YAML entries (private upstreams allowed).
pub fn build_channels(cfgs: &[ChannelConfig], health: HealthConfig) -> Result<Channels, String> {
    build_channels_with(cfgs, health, PrivateUpstreams::Allow)
}

/// Builds the table from the YAML entries under `security.private_upstreams`.
pub fn build_channels_with(
    cfgs: &[ChannelConfig],
    health: HealthConfig,
    private: PrivateUpstreams,
) -> Result<Channels, String> {
    cfgs.iter()
        .enumerate()
        .map(|(i, c)| {
            let mut ch = Channel::new(i, c, health)?;
            ch.policy.private = private;
            Ok(ch)
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Into::into)
}

impl Channel {
    pub fn new(index: usize, cfg: &ChannelConfig, health: HealthConfig) -> Result<Channel, String> {
        let url = UpstreamUrl::parse(&cfg.base_url)
            .map_err(|e| format!("channel {}: base_url {e}", cfg.name))?;
        let url_tls = url.tls;
        let host_header = HeaderValue::from_str(&url.host_header())
            .map_err(|_| format!("channel {}: bad host", cfg.name))?;
        let azure = match (cfg.kind, &cfg.azure) {
            (ChannelKind::Azure, a) => Some(
                Azure::new(&a.clone().unwrap_or_default())
                    .map_err(|(f, e)| format!("channel {}: azure.{f} {e}", cfg.name))?,
            ),
            (_, None) => None,
            (_, Some(_)) => {
                return Err(format!(
                    "channel {}: `azure:` is for `kind: azure` channels",
                    cfg.name
                ))
            }
        };
        let auth_header = if cfg.api_key.is_empty() {
            None
        } else {
            let (name, value) = match cfg.kind {
                ChannelKind::Openai => (
                    http::header::AUTHORIZATION,
                    format!("Bearer {}", cfg.api_key),
                ),
                ChannelKind::Azure => (HeaderName::from_static("api-key"), cfg.api_key.clone()),
                ChannelKind::Anthropic => {
                    (HeaderName::from_static("x-api-key"), cfg.api_key.clone())
                }
                ChannelKind::Gemini => (
                    HeaderName::from_static("x-goog-api-key"),
                    cfg.api_key.clone(),
                ),
            };
            let mut v = HeaderValue::from_str(&value).map_err(|_| {
                format!("channel {}: api_key is not a valid header value", cfg.name)
            })?;
            v.set_sensitive(true);
            Some((name, v))
        };
        let anthropic_version = match (cfg.kind, &cfg.anthropic_version) {
            (ChannelKind::Anthropic, v) => Some(
                HeaderValue::from_str(v.as_deref().unwrap_or(DEFAULT_ANTHROPIC_VERSION))
                    .map_err(|_| format!("channel {}: bad anthropic_version", cfg.name))?,
            ),
            (_, None) => None,
            (_, Some(_)) => {
                return Err(format!(
                    "channel {}: `anthropic_version` is for `kind: anthropic` channels",
                    cfg.name
                ))
            }
        };
        Ok(Channel {
            index,
            name: cfg.name.clone(),
            wire: cfg.kind.wire(),
            anthropic_version,
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
            azure,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            read_timeout: Duration::from_millis(cfg.read_timeout_ms),
            idle_timeout: Duration::from_secs(cfg.idle_timeout_s),
            tls_verify: cfg.tls_verify,
            ca: cfg
                .ca_file
                .as_ref()
                .map(|p| load_ca(&cfg.name, p))
                .transpose()?,
            policy: UpstreamPolicy {
                allow_link_local: cfg.allow_link_local,
                private: PrivateUpstreams::Allow,
            },
            peer: ArcSwapOption::empty(),
            slots: Arc::new(Semaphore::new(cfg.max_concurrency as usize)),
            health: Health::new(health),
            alpn: alpn_for(cfg.http2, url_tls),
            max_h2_streams: cfg.max_h2_streams.max(1),
            dial: Dial::new(alpn_for(cfg.http2, url_tls).get_max_http_version() == 2),
        })
    }

    /// Resolves the host (a blocking call: run it off the request path) and installs a peer.
    ///
    /// The host is resolved the way the OS resolves it (so `2852039166` and
    /// `0251.0376.0251.0376` are 169.254.169.254), and every address it resolves to is
    /// checked against the channel's [`UpstreamPolicy`]: if any is refused, no peer is
    /// installed (a peer installed by an earlier refresh, whose addresses passed, stays).
    pub fn resolve(&self) -> Result<SocketAddr, String> {
        let addrs: Vec<SocketAddr> = (self.url.host.as_str(), self.url.port)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .collect();
        self.policy.check_resolved(&self.url.host, &addrs)?;
        let addr = *addrs.first().ok_or_else(|| "no address".to_string())?;
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
        peer.options.alpn = self.alpn.clone();
        peer.options.max_h2_streams = self.max_h2_streams;
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
    use std::net::IpAddr;

    #[test]
    fn an_https_channel_offers_h2_and_gates_new_connections_until_the_provider_picks_h1() {
        let plain = test_channel("plain");
        assert!(!plain.dial.gated(), "auto on http:// is HTTP/1.1");
        let cfg: ChannelConfig = serde_json::from_value(serde_json::json!({
            "name": "h2", "base_url": "https://127.0.0.1:9", "models": ["m"], "max_h2_streams": 7
        }))
        .unwrap();
        let ch = Channel::new(0, &cfg, HealthConfig::default()).unwrap();
        assert!(ch.dial.gated());
        ch.dial.learned_h1();
        assert!(
            !ch.dial.gated(),
            "a provider that chose HTTP/1.1 is no longer gated"
        );
        ch.resolve().unwrap();
        let peer = ch.peer().unwrap();
        assert_eq!(
            (peer.options.alpn.clone(), peer.options.max_h2_streams),
            (ALPN::H2H1, 7)
        );
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
    fn metadata_and_link_local_addresses_are_refused_in_every_spelling() {
        let deny = UpstreamPolicy::default();
        for ip in [
            "169.254.169.254",
            "169.254.0.1",
            "169.254.170.2",
            "100.100.100.200",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:a9fe:a9fe",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(deny.check_addr(ip).is_err(), "{ip} allowed");
            let allow = UpstreamPolicy {
                allow_link_local: true,
                ..deny
            };
            assert!(
                allow.check_addr(ip).is_ok(),
                "{ip} refused with allow_link_local"
            );
        }
        for spelled in [
            "2852039166",
            "0251.0376.0251.0376",
            "0xa9fea9fe",
            "0xa9.0xfe.0xa9.0xfe",
            "169.254.43518",
        ] {
            assert!(is_numeric_host(spelled), "{spelled}");
            let addrs: Vec<SocketAddr> = (spelled, 80).to_socket_addrs().unwrap().collect();
            assert!(
                deny.check_resolved(spelled, &addrs).is_err(),
                "{spelled} → {addrs:?} allowed"
            );
        }
        for name in [
            "metadata.google.internal",
            "METADATA.google.internal.",
            "metadata.goog",
        ] {
            assert!(deny.check_name(name).is_err(), "{name}");
        }
        assert!(!is_numeric_host("api.openai.com"));
        assert!(!is_numeric_host("cafe.be"));
    }

    #[test]
    fn loopback_and_private_addresses_are_allowed_unless_denied() {
        let allow = UpstreamPolicy::default();
        let deny = UpstreamPolicy {
            private: PrivateUpstreams::Deny,
            ..allow
        };
        for (ip, class) in [
            ("127.0.0.1", AddrClass::Loopback),
            ("0.0.0.0", AddrClass::Loopback),
            ("::1", AddrClass::Loopback),
            ("::ffff:127.0.0.1", AddrClass::Loopback),
            ("10.1.2.3", AddrClass::Private),
            ("172.31.0.1", AddrClass::Private),
            ("192.168.1.1", AddrClass::Private),
            ("100.64.0.1", AddrClass::Private),
            ("fd12::1", AddrClass::Private),
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(allow.check_addr(ip), Ok(Some(class)), "{ip}");
            assert!(deny.check_addr(ip).is_err(), "{ip}");
        }
        for ip in ["8.8.8.8", "172.32.0.1", "2606:4700::1111", "100.128.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(deny.check_addr(ip), Ok(None), "{ip}");
        }
    }

    #[test]
    fn a_channel_resolving_to_a_refused_address_gets_no_peer() {
        let cfg = |url: &str, allow: bool| -> ChannelConfig {
            serde_json::from_value(serde_json::json!({
                "name": "c", "base_url": url, "models": ["m"], "allow_link_local": allow
            }))
            .unwrap()
        };
        let ch = Channel::new(
            0,
            &cfg("http://2852039166/", false),
            HealthConfig::default(),
        )
        .unwrap();
        assert!(ch.resolve().unwrap_err().contains("169.254.169.254"));
        assert!(ch.peer().is_none());
        let ch =
            Channel::new(0, &cfg("http://2852039166/", true), HealthConfig::default()).unwrap();
        assert!(ch.resolve().is_ok());
        let chans = build_channels_with(
            &[cfg("http://127.0.0.1:9/", false)],
            HealthConfig::default(),
            PrivateUpstreams::Deny,
        )
        .unwrap();
        assert!(chans[0]
            .resolve()
            .unwrap_err()
            .contains("private_upstreams"));
        assert!(chans[0].peer().is_none());
    }

    #[test]
    fn base_urls_with_a_query_fragment_or_credentials_are_refused() {
        for bad in [
            "http://h/v1?x=1",
            "http://h/v1?",
            "http://h/v1#frag",
            "http://h/#",
            "http://user:pw@h/v1",
            "http://user@h/v1",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
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
