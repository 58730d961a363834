//! Semantic validation of a parsed [`Config`]: every problem, each with its field path.

use std::net::SocketAddr;

use super::{Config, ConfigError, UpstreamUrl};

impl Config {
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
        errs.extend(self.validate_admission());
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;

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
}
