//! Semantic checks of `queue:` and the scoped `limits:` (accounts, models).

use super::{Config, ConfigError, LimitSet};
use tollgate_filters::queue::MAX_PRIORITY;

impl Config {
    /// Every problem in `queue:` and in the per-account and per-model limits.
    pub(super) fn validate_admission(&self) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut err = ConfigError::collector(&mut errs);
        let q = &self.queue;
        let prio = |v: u8| v <= MAX_PRIORITY;
        for (f, v) in [
            ("default_priority", q.default_priority),
            ("heavy_priority", q.heavy_priority),
        ] {
            if !prio(v) {
                err(format!("queue.{f}"), format!("must be 0 to {MAX_PRIORITY}"));
            }
        }
        for (g, p) in &q.groups {
            for (f, v) in [("priority", p.priority), ("max_priority", p.max_priority)] {
                if v.is_some_and(|v| !prio(v)) {
                    err(
                        format!("queue.groups.{g}.{f}"),
                        format!("must be 0 to {MAX_PRIORITY}"),
                    );
                }
            }
        }
        if q.max_depth == 0 {
            err("queue.max_depth".into(), "must be at least 1".into());
        }
        let zero = |path: String, l: &LimitSet, err: &mut dyn FnMut(String, String)| {
            for (f, v) in [
                ("rpm", l.rpm),
                ("tpm", l.tpm),
                ("concurrency", l.concurrency),
                ("images_per_min", l.images_per_min),
                ("audio_seconds_per_min", l.audio_seconds_per_min),
            ] {
                if v == Some(0) {
                    err(
                        format!("{path}.{f}"),
                        "must be at least 1 (omit it for no limit)".into(),
                    );
                }
            }
        };
        let l = &self.limits;
        zero("limits.default".into(), &l.default, &mut err);
        zero(
            "limits.account_default".into(),
            &l.account_default,
            &mut err,
        );
        for (g, set) in &l.groups {
            zero(format!("limits.groups.{g}"), set, &mut err);
        }
        for (a, set) in &l.accounts {
            zero(format!("limits.accounts.{a}"), set, &mut err);
        }
        for (m, set) in &l.models {
            zero(format!("limits.models.{m}"), set, &mut err);
            let served = self
                .channels
                .iter()
                .any(|c| c.models.contains(m) || c.model_map.contains_key(m));
            if !served {
                err(
                    format!("limits.models.{m}"),
                    "names a model no channel serves".into(),
                );
            }
        }
        drop(err);
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;

    const MIN: &str = "server:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8081\nchannels:\n  - { name: a, base_url: \"http://127.0.0.1:9\", models: [m] }\n";

    #[test]
    fn queue_and_scoped_limits_are_checked_with_paths() {
        let yaml = format!(
            "{MIN}queue: {{ default_priority: 12, max_depth: 0, groups: {{ free: {{ max_priority: 10 }} }} }}\nlimits:\n  models: {{ m: {{ rpm: 0 }}, nope: {{ rpm: 5 }} }}\n  accounts: {{ acme: {{ images_per_min: 0 }} }}\n"
        );
        let e = parse(&yaml).unwrap_err();
        let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
        for p in [
            "queue.default_priority",
            "queue.max_depth",
            "queue.groups.free.max_priority",
            "limits.models.m.rpm",
            "limits.models.nope",
            "limits.accounts.acme.images_per_min",
        ] {
            assert!(paths.contains(&p), "{p} in {paths:?}");
        }
    }

    #[test]
    fn a_valid_queue_section_parses() {
        let yaml = format!(
            "{MIN}queue: {{ timeout_ms: 500, aging_ms: 100, heavy_tokens: 1000, groups: {{ batch: {{ priority: 1 }} }} }}\nlimits:\n  models: {{ m: {{ rpm: 60, concurrency: 4 }} }}\n  account_default: {{ tpm: 100000 }}\n"
        );
        let cfg = parse(&yaml).unwrap();
        assert_eq!(cfg.queue.timeout_ms, 500);
        assert_eq!(cfg.limits.models["m"].concurrency, Some(4));
        assert_eq!(cfg.limits.account_default.tpm, Some(100000));
    }
}
