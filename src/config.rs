//! Configuration: YAML text → `${ENV}` interpolation → typed structs → validation.
//!
//! Parsing rejects unknown fields and names the field path and line of the first structural
//! error; [`Config::validate`] then checks meaning and reports *every* problem it finds, each
//! with its path. Nothing downstream reads YAML or looks a setting up by string: each filter
//! and service gets its own typed section at construction.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted field path, e.g. `channels[1].base_url`.
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {}): {}", self.path, line, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// All the problems found in one file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} error(s)", self.file.display(), self.errors.len())?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    #[serde(default)]
    pub channels: Vec<ChannelConfig>,
    #[serde(default)]
    pub pricing: PricingConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub accounting: AccountingConfig,
    #[serde(default)]
    pub auth: AuthSection,
    #[serde(default)]
    pub routing: RoutingSection,
}

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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    pub path: PathBuf,
    pub journal_mode: JournalMode,
    pub synchronous: Synchronous,
    pub cache_size_kib: i64,
    pub mmap_size_bytes: u64,
    pub temp_store: TempStore,
    pub busy_timeout_ms: u64,
    pub pool_size: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            path: PathBuf::from("data/tollgate.db"),
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    #[serde(default = "d_redis_pool")]
    pub pool_size: u32,
    #[serde(default = "d_redis_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "d_on_error")]
    pub on_error: OnError,
}

fn d_redis_pool() -> u32 {
    16
}
fn d_redis_timeout() -> u64 {
    50
}
fn d_on_error() -> OnError {
    OnError::Allow
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelKind {
    Openai,
}

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

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    /// USD per 1M prompt tokens.
    #[serde(default)]
    pub input: f64,
    /// USD per 1M completion tokens.
    #[serde(default)]
    pub output: f64,
    /// USD per 1M cached prompt tokens; defaults to `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
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

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSet {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrency: Option<u32>,
}

/// `limits.ip`: the pre-auth guard. It counts failed authentications (401s) per address.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpLimit {
    /// Failed authentications one address may make per minute before its requests are
    /// refused (429) until the minute ends; 0 turns the guard off.
    pub failed_auth_per_min: u32,
    /// Deprecated and ignored: the guard no longer counts every request. Still accepted so
    /// that existing files load.
    pub rps: Option<u32>,
}

impl Default for IpLimit {
    fn default() -> Self {
        IpLimit {
            failed_auth_per_min: 120,
            rps: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub default: LimitSet,
    pub groups: BTreeMap<String, LimitSet>,
    pub ip: IpLimit,
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
        }
    }
}

/// `auth:` (an extension): the key cache.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    pub cache_ttl_ms: u64,
    pub negative_cache_ttl_ms: u64,
    pub cache_capacity: usize,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            cache_ttl_ms: 30_000,
            negative_cache_ttl_ms: 2_000,
            cache_capacity: 100_000,
        }
    }
}

/// `routing:` (an extension): retries and channel health.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSection {
    pub max_attempts: usize,
    pub failure_threshold: u32,
    pub cooldown_s: u64,
}

impl Default for RoutingSection {
    fn default() -> Self {
        RoutingSection {
            max_attempts: 3,
            failure_threshold: 5,
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

/// Where in a YAML line a `${...}` stands, which decides how its value must be written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quoting {
    Plain,
    Single,
    Double,
}

/// Writes `v` so YAML reads it back as exactly `v` in that position, or says why it cannot.
fn splice(v: &str, q: Quoting) -> Result<String, &'static str> {
    if v.chars().any(|c| c.is_control()) {
        return Err("contains a control character");
    }
    match q {
        Quoting::Double => Ok(v.replace('\\', "\\\\").replace('"', "\\\"")),
        Quoting::Single => Ok(v.replace('\'', "''")),
        // Unquoted, these would end the value, start a comment, a mapping or a flow
        // collection, or change the scalar's type. (`host:8080` and URLs are fine.)
        Quoting::Plain
            if v.contains(": ")
                || v.contains(" #")
                || v.contains(|c: char| ",[]{}".contains(c))
                || v.starts_with(|c: char| "-?:#&*!|>'\"%@`".contains(c))
                || v.ends_with(':')
                || v.trim() != v =>
        {
            Err("needs quoting: put the reference in double quotes")
        }
        Quoting::Plain => Ok(v.to_string()),
    }
}

/// Replaces `${NAME}` and `${NAME:-default}` (`$${` is a literal `${`). Shell semantics:
/// `${X}` takes X even when empty, `${X:-d}` uses `d` when X is unset or empty; one trailing
/// newline is dropped. The value is written to suit its place: escaped inside quotes,
/// refused unquoted when YAML would read it differently. Comments are left alone. Errors
/// name the variable, never its value.
pub fn interpolate(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let mut err = |message: String| {
            errors.push(ConfigError {
                path: "(interpolation)".into(),
                line: Some(n + 1),
                message,
            })
        };
        let mut quoting = Quoting::Plain;
        let mut rest = line;
        let mut prev: Option<char> = None;
        while let Some(c) = rest.chars().next() {
            // A comment: `#` at the start or after a space, outside quotes.
            if c == '#' && quoting == Quoting::Plain && prev.is_none_or(char::is_whitespace) {
                out.push_str(rest);
                rest = "";
                break;
            }
            if rest.starts_with("$${") {
                out.push_str("${");
                rest = &rest[3..];
                prev = Some('{');
                continue;
            }
            if !rest.starts_with("${") {
                quoting = match (c, quoting) {
                    ('"', Quoting::Plain) => Quoting::Double,
                    ('"', Quoting::Double) if prev != Some('\\') => Quoting::Plain,
                    ('\'', Quoting::Plain) => Quoting::Single,
                    ('\'', Quoting::Single) => Quoting::Plain,
                    (_, q) => q,
                };
                out.push(c);
                rest = &rest[c.len_utf8()..];
                prev = Some(c);
                continue;
            }
            let Some(len) = rest.find('}') else {
                err("unterminated `${`".into());
                out.push_str(rest);
                rest = "";
                break;
            };
            let expr = &rest[2..len];
            rest = &rest[len + 1..];
            prev = Some('}');
            let (name, default) = match expr.split_once(":-") {
                Some((name, d)) => (name, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                err(format!("`${{{expr}}}` is not a valid variable reference"));
                continue;
            }
            let value = env(name).map(|v| v.strip_suffix('\n').map(str::to_owned).unwrap_or(v));
            let value = match default {
                Some(d) => Some(
                    value
                        .filter(|v| !v.is_empty())
                        .unwrap_or_else(|| d.to_string()),
                ),
                None => value,
            };
            match value {
                None => err(format!(
                    "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
                )),
                Some(v) => match splice(&v, quoting) {
                    Ok(text) => out.push_str(&text),
                    Err(why) => err(format!("environment variable `{name}` {why}")),
                },
            }
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The line where a dotted path (`channels[1].base_url`) is written, found by walking the
/// YAML's indentation. Best effort: `None` where the text does not follow block style.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut from = 0usize;
    let mut min_indent: Option<usize> = None;
    let mut found = None;
    for seg in path.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(from) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let ind = indent(l);
            if min_indent.is_some_and(|m| ind < m) && i > from {
                return found;
            }
            let t = t.strip_prefix("- ").unwrap_or(t);
            if t.starts_with(&format!("{key}:")) {
                hit = Some((i, ind));
                break;
            }
        }
        let (i, ind) = hit?;
        found = Some(i + 1);
        from = i + 1;
        min_indent = Some(ind + 1);
        if let Some(want) = index {
            let mut seen = 0;
            let mut item = None;
            for (j, l) in lines.iter().enumerate().skip(from) {
                let t = l.trim_start();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                if indent(l) < ind || (indent(l) == ind && !t.starts_with('-')) {
                    break;
                }
                if t.starts_with('-') {
                    if seen == want {
                        item = Some(j);
                        break;
                    }
                    seen += 1;
                }
            }
            let j = item?;
            found = Some(j + 1);
            // The item's own first key sits on the dash line; search from there.
            from = j;
            min_indent = Some(indent(lines[j]));
        }
    }
    found
}

impl Config {
    /// Reads, interpolates, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            file: path.to_path_buf(),
            errors,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            fail(vec![ConfigError {
                path: "(file)".into(),
                line: None,
                message: format!("cannot read: {e}"),
            }])
        })?;
        Config::from_yaml(&text, |k| std::env::var(k).ok()).map_err(fail)
    }

    pub fn from_yaml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigError>> {
        let text = interpolate(text, env)?;
        let de = serde_norway::Deserializer::from_str(&text);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .location()
                .map(|l| l.line())
                .or_else(|| line_of(&text, &path));
            // serde_norway appends "at line N column M"; the line is reported separately.
            let msg = inner.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            vec![ConfigError {
                path: if path == "." { "(root)".into() } else { path },
                line,
                message: msg,
            }]
        })?;
        let mut errors = cfg.validate();
        for e in &mut errors {
            e.line = e.line.or_else(|| line_of(&text, &e.path));
        }
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }

    /// Every semantic problem, each with its field path.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut err = |path: String, message: String| {
            errs.push(ConfigError {
                path,
                line: None,
                message,
            })
        };
        let s = &self.server;
        let admin: Option<SocketAddr> = s.admin_listen.parse().ok();
        for (name, v) in [("listen", &s.listen), ("admin_listen", &s.admin_listen)] {
            if v.parse::<SocketAddr>().is_err() {
                err(
                    format!("server.{name}"),
                    format!("`{v}` is not an address like 127.0.0.1:8080"),
                );
            }
        }
        if s.listen == s.admin_listen {
            err(
                "server.admin_listen".into(),
                "must differ from server.listen".into(),
            );
        }
        if s.threads == 0 {
            err("server.threads".into(), "must be at least 1".into());
        }
        if s.max_body_bytes < 1024 {
            err(
                "server.max_body_bytes".into(),
                "must be at least 1024".into(),
            );
        }
        if s.admin_token.is_empty() && admin.is_some_and(|a| !a.ip().is_loopback()) {
            err(
                "server.admin_token".into(),
                "is required when admin_listen is not a loopback address".into(),
            );
        }
        if s.log_level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            err(
                "server.log_level".into(),
                format!("`{}` is not a valid log filter", s.log_level),
            );
        }
        let d = &self.database;
        if d.pool_size == 0 {
            err("database.pool_size".into(), "must be at least 1".into());
        }
        if d.path.as_os_str().is_empty() {
            err("database.path".into(), "must not be empty".into());
        }
        if let Some(r) = &self.redis {
            if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://")) {
                err(
                    "redis.url".into(),
                    "must start with redis:// or rediss://".into(),
                );
            }
            if r.pool_size == 0 {
                err("redis.pool_size".into(), "must be at least 1".into());
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, c) in self.channels.iter().enumerate() {
            let p = |f: &str| format!("channels[{i}].{f}");
            if c.name.is_empty() {
                err(p("name"), "must not be empty".into());
            } else if !names.insert(c.name.as_str()) {
                err(
                    p("name"),
                    format!("`{}` is used by another channel", c.name),
                );
            }
            if let Err(e) = UpstreamUrl::parse(&c.base_url) {
                // The URL itself is not echoed: it may carry credentials.
                err(p("base_url"), e);
            }
            if c.models.is_empty() && c.model_map.is_empty() {
                err(p("models"), "list at least one model".into());
            }
            if c.weight == 0 {
                err(p("weight"), "must be at least 1".into());
            }
            if c.max_concurrency == 0 {
                err(p("max_concurrency"), "must be at least 1".into());
            }
            for (f, v) in [
                ("connect_timeout_ms", c.connect_timeout_ms),
                ("read_timeout_ms", c.read_timeout_ms),
            ] {
                if v == 0 {
                    err(p(f), "must be greater than 0".into());
                }
            }
            if let Some(ca) = &c.ca_file {
                if !ca.is_file() {
                    err(
                        p("ca_file"),
                        format!("`{}` is not a readable file", ca.display()),
                    );
                }
            }
            if c.api_key.chars().any(|ch| ch.is_control()) {
                err(p("api_key"), "contains control characters".into());
            }
        }
        for (m, price) in &self.pricing.models {
            let fields = [
                ("input", Some(price.input)),
                ("output", Some(price.output)),
                ("cached_input", price.cached_input),
                ("per_request", Some(price.per_request)),
            ];
            for (f, v) in fields {
                if let Some(v) = v {
                    if !v.is_finite() || v < 0.0 {
                        err(
                            format!("pricing.models.{m}.{f}"),
                            "must be a non-negative number".into(),
                        );
                    }
                }
            }
        }
        for (g, mult) in &self.pricing.groups {
            if !mult.is_finite() || *mult < 0.0 {
                err(
                    format!("pricing.groups.{g}"),
                    "must be a non-negative number".into(),
                );
            }
        }
        if self.accounting.flush_interval_ms == 0 {
            err(
                "accounting.flush_interval_ms".into(),
                "must be at least 1".into(),
            );
        }
        if !(1..=100_000).contains(&self.accounting.max_batch) {
            err(
                "accounting.max_batch".into(),
                "must be between 1 and 100000".into(),
            );
        }
        if self.accounting.max_queue_rows == 0 {
            err(
                "accounting.max_queue_rows".into(),
                "must be at least 1".into(),
            );
        }
        if s.client_write_timeout_ms == 0 {
            err(
                "server.client_write_timeout_ms".into(),
                "must be greater than 0".into(),
            );
        }
        if self.routing.max_attempts == 0 {
            err("routing.max_attempts".into(), "must be at least 1".into());
        }
        if self.routing.failure_threshold == 0 {
            err(
                "routing.failure_threshold".into(),
                "must be at least 1".into(),
            );
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "server:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8081\n";

    fn parse(s: &str) -> Result<Config, Vec<ConfigError>> {
        Config::from_yaml(s, |k| (k == "SET").then(|| "value".to_string()))
    }

    #[test]
    fn the_shipped_default_config_is_valid() {
        let text = include_str!("../conf/tollgate.yaml");
        let cfg = Config::from_yaml(text, |_| None).unwrap();
        assert_eq!(cfg.database.journal_mode, JournalMode::Wal);
        assert!(cfg.redis.is_none());
    }

    #[test]
    fn env_interpolation_with_and_without_default() {
        let out = interpolate("a: ${SET}\nb: ${UNSET:-dflt}\n# c: ${NOPE}\n", |k| {
            (k == "SET").then(|| "v".into())
        })
        .unwrap();
        assert_eq!(out, "a: v\nb: dflt\n# c: ${NOPE}\n");
        let e = interpolate("x: 1\nb: ${MISSING}\n", |_| None).unwrap_err();
        assert_eq!(e[0].line, Some(2));
        assert!(e[0].message.contains("MISSING"));
        let quoted = interpolate("k: \"${Q}\"\n", |_| Some("a\"b\\c".into())).unwrap();
        assert_eq!(quoted, "k: \"a\\\"b\\\\c\"\n");
        let plain = interpolate("k: ${Q}\n", |_| Some("a, tls_verify: false".into())).unwrap_err();
        assert!(plain[0].message.contains("`Q`") && !plain[0].message.contains("tls_verify"));
        let ctl = interpolate("k: \"${Q}\"\n", |_| Some("a\tb".into())).unwrap_err();
        assert!(ctl[0].message.contains("control"));
        assert_eq!(
            interpolate("k: v # ${NOPE}\n", |_| None).unwrap(),
            "k: v # ${NOPE}\n"
        );
        assert_eq!(
            interpolate("k: \"a#${X}\"\n", |_| Some("1".into())).unwrap(),
            "k: \"a#1\"\n"
        );
        assert_eq!(
            interpolate("k: '$${X}'\n", |_| None).unwrap(),
            "k: '${X}'\n"
        );
        assert_eq!(
            interpolate("k: '${X}'\n", |_| Some("it's".into())).unwrap(),
            "k: 'it''s'\n"
        );
        assert_eq!(
            interpolate("l: ${L:-127.0.0.1:8080}\nu: ${U}\n", |k| (k == "U")
                .then(|| "https://h/v1".into()))
            .unwrap(),
            "l: 127.0.0.1:8080\nu: https://h/v1\n"
        );
        assert_eq!(
            interpolate("k: ${E}|${E:-d}\n", |_| Some(String::new())).unwrap(),
            "k: |d\n"
        );
        assert_eq!(
            interpolate("k: ${N}\n", |_| Some("v\n".into())).unwrap(),
            "k: v\n"
        );
    }

    #[test]
    fn unknown_field_is_rejected_with_path_and_line() {
        let e = parse(&format!(
            "{MIN}channels:\n  - name: a\n    base_url: http://x\n    modles: [m]\n"
        ))
        .unwrap_err();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "channels[0].modles");
        assert!(e[0].message.contains("modles"), "{}", e[0].message);
        assert_eq!(e[0].line, Some(7));
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_path() {
        let yaml = "server:\n  listen: nope\n  admin_listen: 0.0.0.0:9\n  threads: 0\nchannels:\n  - name: a\n    base_url: ftp://x\n    models: [m]\n  - name: a\n    base_url: https://user:secret@h\n    models: []\n";
        let e = parse(yaml).unwrap_err();
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        for want in [
            "server.listen",
            "server.threads",
            "server.admin_token",
            "channels[0].base_url",
            "channels[1].name",
            "channels[1].base_url",
            "channels[1].models",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
        let cred = e.iter().find(|e| e.path == "channels[1].base_url").unwrap();
        assert!(!cred.message.contains("secret"));
        assert_eq!(cred.line, Some(10));
        assert_eq!(
            e.iter().find(|e| e.path == "server.threads").unwrap().line,
            Some(4)
        );
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
