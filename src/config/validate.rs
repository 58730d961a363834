//! Semantic validation of a parsed [`Config`]: every problem, each with its field path.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use tollgate_filters::azure::Azure;
use tollgate_filters::channel::{is_numeric_host, AddrClass, ChannelKind};

use super::{Config, ConfigError, UpstreamPolicy, UpstreamUrl};

/// Shortest `server.admin_token` accepted when the admin listener is not on loopback.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

impl Config {
    /// Every semantic problem, each with its field path.
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut err = ConfigError::collector(&mut errs);
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
        if admin.is_some_and(|a| !a.ip().is_loopback()) {
            if s.admin_token.is_empty() {
                err(
                    "server.admin_token".into(),
                    "is required when admin_listen is not a loopback address".into(),
                );
            } else if s.admin_token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
                // The token itself is never echoed.
                err(
                    "server.admin_token".into(),
                    format!(
                        "must be at least {MIN_ADMIN_TOKEN_CHARS} characters when admin_listen is not a loopback address"
                    ),
                );
            }
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
        if d.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            err("database.path".into(), "must not be empty".into());
        }
        if let Some(url) = &d.url {
            // The URL itself is not echoed: it may carry a password.
            if d.path.is_some() {
                err(
                    "database.url".into(),
                    "set either database.url (PostgreSQL) or database.path (SQLite), not both"
                        .into(),
                );
            } else if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                err(
                    "database.url".into(),
                    "must start with postgres:// or postgresql://".into(),
                );
            } else if let Err(e) = url.parse::<postgres::Config>() {
                err(
                    "database.url".into(),
                    format!("is not a valid PostgreSQL URL: {e}"),
                );
            }
        }
        if let Some(r) = &self.redis {
            if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://")) {
                err(
                    "redis.url".into(),
                    "must start with redis:// or rediss://".into(),
                );
            }
            if r.pool_size == 0 || r.pool_size > 64 {
                err("redis.pool_size".into(), "must be between 1 and 64".into());
            }
            if r.timeout_ms == 0 || r.timeout_ms > 10_000 {
                err(
                    "redis.timeout_ms".into(),
                    "must be between 1 and 10000".into(),
                );
            }
            if r.namespace.is_empty() || r.namespace.contains(char::is_whitespace) {
                err(
                    "redis.namespace".into(),
                    "must be a non-empty word without spaces".into(),
                );
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
            match UpstreamUrl::parse(&c.base_url) {
                // The URL itself is not echoed: it may carry credentials.
                Err(e) => err(p("base_url"), e),
                Ok(url) => {
                    if let Err(e) = self.policy_for(c).check_static(&url.host) {
                        err(p("base_url"), e);
                    }
                }
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
            match (c.kind, &c.azure) {
                (ChannelKind::Azure, a) => {
                    if let Err((f, e)) = Azure::new(&a.clone().unwrap_or_default()) {
                        err(p(&format!("azure.{f}")), e);
                    }
                }
                (_, Some(_)) => {
                    err(p("azure"), "is for `kind: azure` channels".into());
                }
                (_, None) => {}
            }
            match (c.kind, &c.anthropic_version) {
                (ChannelKind::Anthropic, Some(v)) if http::HeaderValue::from_str(v).is_err() => {
                    err(p("anthropic_version"), "is not a valid header value".into());
                }
                (ChannelKind::Anthropic, _) | (_, None) => {}
                (_, Some(_)) => {
                    err(
                        p("anthropic_version"),
                        "is for `kind: anthropic` channels".into(),
                    );
                }
            }
        }
        for (m, price) in &self.pricing.models {
            let fields = [
                ("input", Some(price.input)),
                ("output", Some(price.output)),
                ("cached_input", price.cached_input),
                ("cache_write", price.cache_write),
                ("audio_input", price.audio_input),
                ("audio_output", price.audio_output),
                ("per_request", Some(price.per_request)),
                ("per_audio_second", Some(price.per_audio_second)),
                ("per_1m_characters", Some(price.per_1m_characters)),
            ];
            let images = price
                .per_image
                .iter()
                .map(|(k, v)| (format!("per_image.{k}"), Some(*v)));
            let fields = fields
                .into_iter()
                .map(|(f, v)| (f.to_owned(), v))
                .chain(images);
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
        if self.accounting.lease_ttl_s < 6 || self.accounting.lease_ttl_s > 3600 {
            err(
                "accounting.lease_ttl_s".into(),
                "must be between 6 and 3600".into(),
            );
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
        for (i, r) in self.routes.iter().enumerate() {
            if !r.prefix.starts_with("/v1/") {
                err(format!("routes[{i}].prefix"), "must start with /v1/".into());
            }
            if !self.channels.iter().any(|c| c.name == r.channel) {
                err(
                    format!("routes[{i}].channel"),
                    format!("names no channel (`{}`)", r.channel),
                );
            }
        }
        if self.routing.max_attempts == 0 {
            err("routing.max_attempts".into(), "must be at least 1".into());
        }
        if !(self.routing.failure_ratio > 0.0 && self.routing.failure_ratio <= 1.0) {
            err(
                "routing.failure_ratio".into(),
                "must be above 0 and at most 1".into(),
            );
        }
        if self.routing.window_s == 0 {
            err("routing.window_s".into(), "must be at least 1".into());
        }
        if s.h2.max_concurrent_streams == 0 {
            err(
                "server.h2.max_concurrent_streams".into(),
                "must be at least 1".into(),
            );
        }
        if s.h2.max_header_list_bytes < 1024 {
            err(
                "server.h2.max_header_list_bytes".into(),
                "must be at least 1024".into(),
            );
        }
        for (i, c) in self.channels.iter().enumerate() {
            if c.max_h2_streams == 0 {
                err(
                    format!("channels[{i}].max_h2_streams"),
                    "must be at least 1".into(),
                );
            }
        }
        let c = &self.server.connections;
        for (field, v) in [
            ("head_timeout_ms", c.head_timeout_ms),
            ("body_timeout_ms", c.body_timeout_ms),
            ("body_idle_timeout_ms", c.body_idle_timeout_ms),
            ("keepalive_timeout_s", c.keepalive_timeout_s),
            ("max_connections", c.max_connections as u64),
        ] {
            if v == 0 {
                err(
                    format!("server.connections.{field}"),
                    "must be at least 1".into(),
                );
            }
        }
        if self.routing.failure_threshold == 0 {
            err(
                "routing.failure_threshold".into(),
                "must be at least 1".into(),
            );
        }
        let m = &self.metrics;
        if !(6..=86_400).contains(&m.summary_window_s) {
            err(
                "metrics.summary_window_s".into(),
                "must be between 6 and 86400".into(),
            );
        }
        let p = &self.profiling;
        if !(p.cpu_threshold_percent > 0.0 && p.cpu_threshold_percent.is_finite()) {
            err(
                "profiling.cpu_threshold_percent".into(),
                "must be a positive number".into(),
            );
        }
        for (field, v) in [
            ("sample_interval_s", p.sample_interval_s),
            ("profile_s", p.profile_s),
            ("keep", p.keep as u64),
            ("frequency_hz", u64::from(p.frequency_hz)),
        ] {
            if v == 0 {
                err(format!("profiling.{field}"), "must be at least 1".into());
            }
        }
        if p.profile_s > crate::profiling::MAX_PROFILE_S {
            err(
                "profiling.profile_s".into(),
                format!("must be at most {}", crate::profiling::MAX_PROFILE_S),
            );
        }
        if p.frequency_hz > 1000 {
            err(
                "profiling.frequency_hz".into(),
                "must be at most 1000".into(),
            );
        }
        if p.cpu_monitor && p.dir.as_os_str().is_empty() {
            err("profiling.dir".into(), "must be set".into());
        }
        if let Some(c) = &self.cache.responses {
            let p = |f: &str| format!("cache.responses.{f}");
            if c.backend == super::CacheBackend::Redis && self.redis.is_none() {
                err(
                    p("backend"),
                    "`redis` needs a `redis:` section (the Redis the nodes share); or use `memory`"
                        .into(),
                );
            }
            if c.ttl_s == 0 {
                err(p("ttl_s"), "must be at least 1".into());
            }
            if c.max_entry_bytes == 0 {
                err(p("max_entry_bytes"), "must be at least 1".into());
            }
            if c.max_bytes < c.max_entry_bytes {
                err(p("max_bytes"), "must be at least max_entry_bytes".into());
            }
            if c.max_entry_bytes > u64::from(u32::MAX) {
                err(p("max_entry_bytes"), "must be below 4 GiB".into());
            }
            let served = |m: &String| {
                self.channels
                    .iter()
                    .any(|ch| ch.models.contains(m) || ch.model_map.contains_key(m))
            };
            for (i, m) in c.models.iter().enumerate() {
                if !served(m) {
                    err(
                        format!("cache.responses.models[{i}]"),
                        format!("`{m}` is not served by any channel"),
                    );
                }
            }
        }
        drop(err);
        errs.extend(self.validate_admission());
        errs
    }
}

/// What the configuration alone can tell about a host, without asking DNS.
trait StaticCheck {
    fn check_static(&self, host: &str) -> Result<(), String>;
}

impl StaticCheck for UpstreamPolicy {
    /// Metadata names, IP literals, and IPv4 addresses in the spellings the OS reads
    /// without DNS (`2852039166`, `0251.0376.0251.0376`): refused per the policy.
    fn check_static(&self, host: &str) -> Result<(), String> {
        self.check_name(host)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            self.check_addr(ip)?;
        } else if is_numeric_host(host) {
            let addrs: Vec<SocketAddr> = (host, 80)
                .to_socket_addrs()
                .map(Iterator::collect)
                .unwrap_or_default();
            self.check_resolved(host, &addrs)?;
        }
        Ok(())
    }
}

impl Config {
    /// The upstream policy of one channel.
    pub fn policy_for(&self, c: &super::ChannelConfig) -> UpstreamPolicy {
        UpstreamPolicy {
            allow_link_local: c.allow_link_local,
            private: self.security.private_upstreams,
        }
    }

    /// `check-config`'s look at where each channel really goes: every host is resolved as
    /// the gateway will resolve it (this may ask DNS) and every address checked. Returns
    /// the errors (a refused address) and the warnings (a loopback or private upstream, a
    /// host that does not resolve now).
    pub fn check_upstreams(&self) -> (Vec<ConfigError>, Vec<ConfigError>) {
        let (mut errors, mut warnings) = (Vec::new(), Vec::new());
        let problem = |i: usize, message: String| ConfigError {
            path: format!("channels[{i}].base_url"),
            line: None,
            message,
        };
        for (i, c) in self.channels.iter().enumerate() {
            let Ok(url) = UpstreamUrl::parse(&c.base_url) else {
                continue;
            };
            let addrs: Vec<SocketAddr> = match (url.host.as_str(), url.port).to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => {
                    warnings.push(problem(
                        i,
                        format!(
                            "`{}` does not resolve now ({e}); the gateway will retry",
                            url.host
                        ),
                    ));
                    continue;
                }
            };
            match self.policy_for(c).check_resolved(&url.host, &addrs) {
                Err(e) => errors.push(problem(i, e)),
                Ok(notable) => {
                    for (ip, class) in notable {
                        let kind = match class {
                            AddrClass::Loopback => "a loopback",
                            AddrClass::Private => "a private",
                            _ => "a link-local (allowed by allow_link_local)",
                        };
                        warnings.push(problem(
                            i,
                            format!(
                                "`{}` resolves to {kind} address ({ip}); set security.private_upstreams: deny to refuse such upstreams",
                                url.host
                            ),
                        ));
                    }
                }
            }
        }
        (errors, warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;

    #[test]
    fn database_is_a_path_or_a_url_never_both_and_the_url_is_never_echoed() {
        let min = "server:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8081\n";
        let cfg = parse(min).unwrap();
        assert_eq!(
            cfg.database.sqlite_path(),
            std::path::Path::new("data/tollgate.db")
        );
        assert!(cfg.database.postgres_url().is_none());
        for url in [
            "postgres://u:hunter22@127.0.0.1/db",
            "postgresql://127.0.0.1:5432/db",
        ] {
            let cfg = parse(&format!(
                "{min}database: {{ url: \"{url}\", pool_size: 3 }}\n"
            ))
            .unwrap();
            assert_eq!(
                (cfg.database.postgres_url(), cfg.database.pool_size),
                (Some(url), 3)
            );
            assert!(!format!("{:?}", cfg.database).contains("hunter22"));
        }
        for (db, want) in [
            (
                "{ url: \"postgres://u:hunter22@h/db\", path: x.db }",
                "not both",
            ),
            ("{ url: \"mysql://u:hunter22@h/db\" }", "postgres://"),
            (
                "{ url: \"postgres://u:hunter22@h:port/db\" }",
                "not a valid",
            ),
        ] {
            let e = parse(&format!("{min}database: {db}\n")).unwrap_err();
            assert_eq!(e[0].path, "database.url", "{db}");
            assert!(e[0].message.contains(want), "{}", e[0].message);
            assert!(!e[0].message.contains("hunter22"), "{}", e[0].message);
        }
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_path() {
        let yaml = "server:\n  listen: nope\n  admin_listen: 0.0.0.0:9\n  threads: 0\nchannels:\n  - name: a\n    base_url: ftp://x\n    models: [m]\n  - name: a\n    base_url: https://user:secret@h\n    models: []\nmetrics: { summary_window_s: 1 }\nprofiling: { cpu_threshold_percent: -1, keep: 0 }\n";
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
            "metrics.summary_window_s",
            "profiling.cpu_threshold_percent",
            "profiling.keep",
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
    fn http2_limits_and_modes_are_checked_with_their_paths() {
        let base = "server:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8081\n";
        let e = parse(&format!(
            "{base}  h2: {{ max_concurrent_streams: 0, max_header_list_bytes: 10 }}\nchannels:\n  - {{ name: a, base_url: \"http://127.0.0.1:9\", models: [m], max_h2_streams: 0 }}\n"
        ))
        .unwrap_err();
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "server.h2.max_concurrent_streams",
                "server.h2.max_header_list_bytes",
                "channels[0].max_h2_streams"
            ]
        );
        let e = parse(&format!(
            "{base}channels:\n  - {{ name: a, base_url: \"http://127.0.0.1:9\", models: [m], http2: sometimes }}\n"
        ))
        .unwrap_err();
        assert_eq!(e[0].path, "channels[0].http2");
        let ok = parse(&format!(
            "{base}  h2c: true\n  tls: {{ cert: a.pem, key: b.pem }}\nchannels:\n  - {{ name: a, base_url: \"https://h\", models: [m], http2: on, max_h2_streams: 8 }}\n"
        ))
        .unwrap();
        assert!(ok.server.h2c && ok.server.tls.is_some());
        assert_eq!(ok.server.tls.unwrap().reload_interval_s, 5);
        assert_eq!(
            ok.channels[0].http2,
            tollgate_filters::channel::Http2Mode::On
        );
    }

    #[test]
    fn a_non_loopback_admin_listener_needs_a_32_character_token() {
        let cfg = |listen: &str, token: &str| {
            format!("server:\n  listen: 127.0.0.1:8080\n  admin_listen: \"{listen}\"\n  admin_token: \"{token}\"\n")
        };
        let short = "x".repeat(31);
        let e = parse(&cfg("0.0.0.0:8081", &short)).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "server.admin_token");
        assert!(e[0].message.contains("32"), "{}", e[0].message);
        assert!(!e[0].message.contains(&short), "the token is not echoed");
        assert_eq!(e[0].line, Some(4));
        assert!(parse(&cfg("10.0.0.5:8081", &short)).is_err());
        assert!(parse(&cfg("[::]:8081", &short)).is_err());
        assert!(parse(&cfg("0.0.0.0:8081", &"x".repeat(32))).is_ok());
        assert!(
            parse(&cfg("127.0.0.1:8081", "short")).is_ok(),
            "loopback: any token"
        );
        assert!(parse(&cfg("[::1]:8081", "")).is_ok(), "loopback: no token");
    }

    #[test]
    fn link_local_and_metadata_base_urls_are_refused_in_every_spelling() {
        let cfg = |url: &str, extra: &str| {
            format!("server:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8081\nchannels:\n  - name: a\n    base_url: \"{url}\"\n    models: [m]\n{extra}")
        };
        for url in [
            "http://169.254.169.254/",
            "http://2852039166/",
            "http://0251.0376.0251.0376/",
            "http://0xa9fea9fe/",
            "http://169.254.43518/",
            "http://[::ffff:169.254.169.254]/",
            "http://[::ffff:a9fe:a9fe]/",
            "http://[fe80::1]/",
            "http://[fd00:ec2::254]/",
            "http://metadata.google.internal/computeMetadata/v1",
            "http://METADATA.GOOGLE.INTERNAL./",
        ] {
            let e = parse(&cfg(url, "")).unwrap_err();
            assert_eq!(e[0].path, "channels[0].base_url", "{url}: {e:?}");
            assert_eq!(e[0].line, Some(6), "{url}");
            assert!(
                parse(&cfg(url, "    allow_link_local: true\n")).is_ok(),
                "{url} with allow_link_local"
            );
        }
        for url in [
            "http://127.0.0.1:9000",
            "http://10.0.0.2/v1",
            "http://[fd12::1]/",
        ] {
            assert!(parse(&cfg(url, "")).is_ok(), "{url}");
            let e = parse(&cfg(url, "security: { private_upstreams: deny }\n")).unwrap_err();
            assert!(e[0].message.contains("private_upstreams"), "{url}: {e:?}");
        }
        for url in ["http://h/v1?x=1", "http://h/v1#f", "https://u:p@h/v1"] {
            assert!(parse(&cfg(url, "")).is_err(), "{url}");
        }
    }

    #[test]
    fn check_upstreams_warns_of_loopback_and_refuses_what_the_policy_refuses() {
        let cfg = super::super::Config::from_yaml(
            "server:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8081\nchannels:\n  - { name: a, base_url: \"http://localhost:9000\", models: [m] }\n",
            |_| None,
        )
        .unwrap();
        let (errors, warnings) = cfg.check_upstreams();
        assert!(errors.is_empty(), "{errors:?}");
        assert!(
            warnings.iter().any(|w| w.message.contains("loopback")),
            "{warnings:?}"
        );
    }
}
