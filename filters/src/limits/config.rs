//! The limits' configuration: one [`LimitSet`] per scope, and `limits:` after validation.

use std::collections::HashMap;

/// One set of limits (`limits.default`, a group, an account, a model, or a key's own);
/// `None` means unlimited in that dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSet {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub concurrency: Option<u32>,
    /// Images per minute (each image in a request is one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub images_per_min: Option<u32>,
    /// Seconds of input audio per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_seconds_per_min: Option<u32>,
}

impl LimitSet {
    /// `self` where set, else `fallback`.
    pub fn or(self, fallback: LimitSet) -> LimitSet {
        LimitSet {
            rpm: self.rpm.or(fallback.rpm),
            tpm: self.tpm.or(fallback.tpm),
            concurrency: self.concurrency.or(fallback.concurrency),
            images_per_min: self.images_per_min.or(fallback.images_per_min),
            audio_seconds_per_min: self
                .audio_seconds_per_min
                .or(fallback.audio_seconds_per_min),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == LimitSet::default()
    }

    /// Parses `rpm:60,tpm:100000,concurrency:2,images_per_min:10,audio_seconds_per_min:600`.
    pub fn parse_spec(spec: &str) -> Result<LimitSet, String> {
        let mut l = LimitSet::default();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once(':')
                .ok_or_else(|| format!("`{part}`: expected name:value"))?;
            let v: u32 = value
                .trim()
                .parse()
                .map_err(|_| format!("`{part}`: the value must be a whole number"))?;
            let slot = match name.trim() {
                "rpm" => &mut l.rpm,
                "tpm" => &mut l.tpm,
                "concurrency" => &mut l.concurrency,
                "images_per_min" | "ipm" => &mut l.images_per_min,
                "audio_seconds_per_min" | "aspm" => &mut l.audio_seconds_per_min,
                other => return Err(format!("`{other}`: unknown limit (rpm, tpm, concurrency, images_per_min, audio_seconds_per_min)")),
            };
            *slot = Some(v);
        }
        Ok(l)
    }

    /// Parses `--model-limits gpt-4o=rpm:60,tpm:100000;gpt-4o-mini=rpm:600` (models apart by
    /// `;`, or one `model=spec` per flag).
    pub fn parse_model_limits(spec: &str) -> Result<Vec<(String, LimitSet)>, String> {
        spec.split(';')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (model, l) = p
                    .split_once('=')
                    .ok_or_else(|| format!("`{p}`: expected model=rpm:N,tpm:N"))?;
                let model = model.trim();
                if model.is_empty() {
                    return Err(format!("`{p}`: the model is empty"));
                }
                Ok((model.to_owned(), LimitSet::parse_spec(l)?))
            })
            .collect()
    }
}

/// `limits:` after validation.
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    pub default: LimitSet,
    pub groups: HashMap<String, LimitSet>,
    /// Per account (all its keys together), by account name.
    pub accounts: HashMap<String, LimitSet>,
    /// For accounts without an entry of their own.
    pub account_default: LimitSet,
    /// Per model (every key together), by the model name clients send.
    pub models: HashMap<String, LimitSet>,
    /// Output cap counted for tokens/min when a request sets no `max_tokens`.
    pub default_max_output: u64,
}
