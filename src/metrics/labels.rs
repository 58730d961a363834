//! The label values of the metric families: routes, statuses, attempt outcomes, estimate
//! reasons, and the configured models (anything else is `other`).

use std::collections::HashMap;

use tollgate_filters::{Endpoint, EstimateReason};

/// The routes, in label order.
pub(super) const ROUTES: [Endpoint; 13] = [
    Endpoint::Chat,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Messages,
    Endpoint::CountTokens,
    Endpoint::GeminiGenerate,
    Endpoint::Realtime,
    Endpoint::Images,
    Endpoint::Audio,
    Endpoint::Models,
    Endpoint::OtherV1,
    Endpoint::Unknown,
];

pub(super) fn route_index(e: Endpoint) -> usize {
    ROUTES
        .iter()
        .position(|r| *r == e)
        .unwrap_or(ROUTES.len() - 1)
}

/// Statuses with a label of their own; anything else is `other`. `0`: nothing was sent
/// (the client left first).
pub(super) const STATUSES: [u16; 19] = [
    0, 200, 201, 204, 400, 401, 403, 404, 405, 408, 409, 413, 422, 429, 500, 501, 502, 503, 504,
];

pub(super) fn status_index(s: u16) -> usize {
    STATUSES
        .iter()
        .position(|x| *x == s)
        .unwrap_or(STATUSES.len())
}

pub(super) fn status_label(i: usize) -> String {
    STATUSES
        .get(i)
        .map_or_else(|| "other".to_string(), |s| s.to_string())
}

pub(super) const ATTEMPT_OUTCOMES: [&str; 9] = [
    "ok",
    "status_429",
    "status_auth",
    "status_5xx",
    "status_4xx",
    "unresolved",
    "connect_error",
    "timeout",
    "io_error",
];

pub(super) const ESTIMATE_REASONS: [EstimateReason; 3] = [
    EstimateReason::Cut,
    EstimateReason::DrainLimit,
    EstimateReason::NoUsage,
];

/// Model label values: `none` (no model: a request refused before its body), `other` (a
/// name not in the configuration), then the configured names.
pub struct ModelLabels {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

pub const MODEL_NONE: usize = 0;
pub const MODEL_OTHER: usize = 1;

impl ModelLabels {
    pub fn new(configured: impl IntoIterator<Item = String>) -> ModelLabels {
        let mut names = vec!["none".to_string(), "other".to_string()];
        let mut index = HashMap::new();
        for m in configured {
            if !index.contains_key(&m) && m != "none" && m != "other" {
                index.insert(m.clone(), names.len());
                names.push(m);
            }
        }
        ModelLabels { names, index }
    }

    pub fn of(&self, model: Option<&str>) -> usize {
        match model {
            None => MODEL_NONE,
            Some(m) => self.index.get(m).copied().unwrap_or(MODEL_OTHER),
        }
    }

    pub fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}
