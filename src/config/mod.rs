//! Configuration: YAML text → `${ENV}` interpolation → typed structs → validation.
//!
//! Parsing rejects unknown fields and names the field path and line of the first structural
//! error; [`Config::validate`] then checks meaning and reports *every* problem it finds, each
//! with its path. Nothing downstream reads YAML or looks a setting up by string: each filter
//! and service gets its own typed section at construction.

mod admission;
mod interpolate;
mod locate;
mod types;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use interpolate::interpolate;
pub use locate::line_of;
pub use types::{
    AccountingConfig, DatabaseConfig, JournalMode, LeaseMode, LimitsConfig, ModelPrice, OnError,
    PricingConfig, RedisConfig, SecurityConfig, ServerConfig, Synchronous, TempStore, Unpriced,
};

// One definition of each type, shared with the filters that use it.
pub use crate::connections::ConnectionLimits;
pub use crate::observe::{LogConfig, LogFormat, MetricsConfig};
pub use crate::profiling::ProfilingConfig;
pub use crate::tls::{H2Limits, TlsConfig};
pub use tollgate_filters::auth::AuthConfig;
pub use tollgate_filters::cache::{Backend as CacheBackend, CacheConfig, ResponseCacheConfig};
pub use tollgate_filters::channel::{
    ChannelConfig, ChannelKind, PrivateUpstreams, UpstreamPolicy, UpstreamUrl,
};
pub use tollgate_filters::ip_guard::IpGuardConfig as IpLimit;
pub use tollgate_filters::limits::LimitSet;
pub use tollgate_filters::queue::QueueConfig;
pub use tollgate_filters::route::{PathRoute, RoutingConfig};

/// One configuration problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted field path, e.g. `channels[1].base_url`.
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    /// `err(path, message)`: pushes a semantic error (no line) onto `errs`.
    pub(crate) fn collector(errs: &mut Vec<ConfigError>) -> impl FnMut(String, String) + '_ {
        move |path, message| {
            errs.push(ConfigError {
                path,
                line: None,
                message,
            })
        }
    }
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

impl std::error::Error for ConfigError {}

/// Substituted values shorter than this are left in error messages (a port, a flag): too
/// short to be a secret, and too common to replace without garbling the message.
pub const MIN_REDACTED: usize = 4;

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
    pub auth: AuthConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Which channel serves body-less requests under a path prefix.
    #[serde(default)]
    pub routes: Vec<PathRoute>,
    #[serde(default)]
    pub security: SecurityConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub profiling: ProfilingConfig,
    /// Admission: the priority queue for channel slots and concurrency caps.
    #[serde(default)]
    pub queue: QueueConfig,
    /// The response cache; absent: nothing is cached.
    #[serde(default)]
    pub cache: CacheConfig,
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

    /// Reads, interpolates, parses and validates YAML text; `env` supplies `${VAR}` values.
    /// No error shows a substituted value (of [`MIN_REDACTED`] bytes or more): it is
    /// replaced by its `${VAR}` reference.
    pub fn from_yaml(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigError>> {
        // The values substituted, so no error below can show one (an unknown key or a
        // mistyped field quotes the text it read, which may be a secret from the environment).
        let substituted = std::cell::RefCell::new(Vec::<(String, String)>::new());
        let text = interpolate(text, |k| {
            let v = env(k);
            if let Some(v) = &v {
                substituted.borrow_mut().push((k.to_string(), v.clone()));
            }
            v
        })?;
        let mut substituted = substituted.into_inner();
        substituted.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        let redact = |s: String| -> String {
            substituted
                .iter()
                .filter(|(_, v)| v.len() >= MIN_REDACTED)
                .fold(s, |s, (k, v)| s.replace(v.as_str(), &format!("${{{k}}}")))
        };
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
                path: redact(if path == "." { "(root)".into() } else { path }),
                line,
                message: redact(msg),
            }]
        })?;
        let mut errors = cfg.validate();
        for e in &mut errors {
            e.line = e.line.or_else(|| line_of(&text, &e.path));
            e.path = redact(std::mem::take(&mut e.path));
            e.message = redact(std::mem::take(&mut e.message));
        }
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "server:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8081\n";

    pub(super) fn parse(s: &str) -> Result<Config, Vec<ConfigError>> {
        Config::from_yaml(s, |k| (k == "SET").then(|| "value".to_string()))
    }

    #[test]
    fn no_error_shows_an_interpolated_value() {
        // Found by the config_yaml fuzz target: an unknown key or a mistyped field quoted the
        // text it read, secret included.
        let env = |k: &str| (k == "SECRET").then(|| "sk-live-0123456789".to_string());
        for yaml in [
            format!("{MIN}  threads: \"${{SECRET}}\"\n"),
            format!("{MIN}x${{SECRET}}: 1\n"),
            format!("{MIN}channels:\n  - {{ name: a, base_url: \"ftp://${{SECRET}}/\", api_key: k, models: [m] }}\n"),
        ] {
            let errors = Config::from_yaml(&yaml, env).expect_err(&yaml);
            let all = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n");
            assert!(!all.contains("sk-live-0123456789"), "{all}");
        }
        // Short values are left alone.
        let errors = Config::from_yaml(&format!("{MIN}  threads: ${{N}}x\n"), |_| Some("1".into()))
            .expect_err("1x is not a number");
        assert!(errors[0].to_string().contains("1x"), "{}", errors[0]);
    }

    #[test]
    fn the_shipped_default_config_is_valid() {
        let text = include_str!("../../conf/tollgate.yaml");
        let cfg = Config::from_yaml(text, |_| None).unwrap();
        assert_eq!(cfg.database.journal_mode, JournalMode::Wal);
        assert!(cfg.redis.is_none());
    }

    #[test]
    fn the_response_cache_is_checked_with_field_paths() {
        let ch = "channels:\n  - { name: a, base_url: \"http://127.0.0.1:9\", api_key: k, models: [m] }\n";
        let cfg = parse(&format!(
            "{MIN}{ch}cache:\n  responses: {{ backend: memory, models: [m], bill: \"ratio:0.25\" }}\n"
        ))
        .unwrap();
        let r = cfg.cache.responses.unwrap();
        assert_eq!((r.ttl_s, r.bill.ppm), (300, 250_000));
        assert!(parse(&format!("{MIN}{ch}"))
            .unwrap()
            .cache
            .responses
            .is_none());
        let e = parse(&format!(
            "{MIN}{ch}cache:\n  responses: {{ backend: redis, ttl_s: 0, models: [x] }}\n"
        ))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "cache.responses.backend",
                "cache.responses.ttl_s",
                "cache.responses.models[0]"
            ]
        );
        assert!(
            e[0].message.contains("`redis:` section"),
            "{}",
            e[0].message
        );
        // With `redis:`, the Redis backend is accepted.
        let ok = parse(&format!(
            "{MIN}{ch}redis: {{ url: \"redis://127.0.0.1:6379/0\" }}\ncache:\n  responses: {{ backend: redis }}\n"
        ));
        assert!(ok.is_ok(), "{:?}", ok.err());
        let e = parse(&format!(
            "{MIN}{ch}cache:\n  responses: {{ backend: memory, bill: half }}\n"
        ))
        .unwrap_err();
        assert_eq!(e[0].path, "cache.responses.bill");
        let e = parse(&format!(
            "{MIN}{ch}cache:\n  responses: {{ backend: memory, tll_s: 5 }}\n"
        ))
        .unwrap_err();
        assert_eq!(e[0].path, "cache.responses.tll_s");
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
}
