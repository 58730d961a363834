//! The per-scope state of the `limits` filter: who a limit applies to ([`Scope`]), the
//! dimensions counted per minute, each scope's buckets and leased credit, what a request
//! holds, and the sharded map they live in.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::shared::Credit;
use super::LimitSet;
use crate::gcra::Gcra;
use crate::{Limit, LimitScope};

/// Lock shards for the per-scope state.
pub(super) const SHARDS: usize = 64;

/// Who a limit applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Key(i64),
    Account(i64),
    Model(Arc<str>),
    KeyModel(i64, Arc<str>),
}

impl Scope {
    /// The words an error message uses for the scope.
    pub fn label(&self) -> &'static str {
        match self {
            Scope::Key(_) => "key",
            Scope::Account(_) => "account",
            Scope::Model(_) => "model",
            Scope::KeyModel(..) => "key_model",
        }
    }
}

impl Scope {
    /// The scope's name in the shared state (`redis:`): the store's ids and model names are
    /// the same on every node.
    pub(super) fn shared_name(&self, dim: Dim) -> String {
        let d = dim.code();
        match self {
            Scope::Key(id) => format!("key:{id}:{d}"),
            Scope::Account(id) => format!("account:{id}:{d}"),
            Scope::Model(m) => format!("model:{m}:{d}"),
            Scope::KeyModel(id, m) => format!("key_model:{id}:{m}:{d}"),
        }
    }

    /// The name of the scope's shared concurrency places.
    pub fn concurrency_name(&self) -> String {
        match self {
            Scope::Key(id) => format!("key:{id}"),
            Scope::Account(id) => format!("account:{id}"),
            Scope::Model(m) => format!("model:{m}"),
            Scope::KeyModel(id, m) => format!("key_model:{id}:{m}"),
        }
    }
}

/// The dimensions counted per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dim {
    Requests = 0,
    Tokens = 1,
    Images = 2,
    AudioSeconds = 3,
}

pub(super) const DIMS: [Dim; 4] = [Dim::Requests, Dim::Tokens, Dim::Images, Dim::AudioSeconds];

impl Dim {
    pub(super) fn code(self) -> &'static str {
        match self {
            Dim::Requests => "rpm",
            Dim::Tokens => "tpm",
            Dim::Images => "ipm",
            Dim::AudioSeconds => "aspm",
        }
    }

    /// This dimension's bit in [`Held::local`].
    pub(super) fn bit(self) -> u8 {
        1 << self as u8
    }

    pub(super) fn per_minute(self, l: &LimitSet) -> Option<u32> {
        match self {
            Dim::Requests => l.rpm,
            Dim::Tokens => l.tpm,
            Dim::Images => l.images_per_min,
            Dim::AudioSeconds => l.audio_seconds_per_min,
        }
    }

    /// The limit that refused, naming the dimension and the scope.
    pub(super) fn limit(self, scope: &Scope) -> Limit {
        let scope = match scope {
            Scope::Key(_) => LimitScope::Key,
            Scope::Account(_) => LimitScope::Account,
            Scope::Model(_) => LimitScope::Model,
            Scope::KeyModel(..) => LimitScope::KeyModel,
        };
        match self {
            Dim::Requests => Limit::RequestsPerMinute(scope),
            Dim::Tokens => Limit::TokensPerMinute(scope),
            Dim::Images => Limit::ImagesPerMinute(scope),
            Dim::AudioSeconds => Limit::AudioSecondsPerMinute(scope),
        }
    }
}

#[derive(Default)]
pub(super) struct ScopeState {
    pub(super) requests: Gcra,
    pub(super) tokens: Gcra,
    pub(super) images: Gcra,
    pub(super) audio: Gcra,
    /// Units leased from the shared buckets (`redis:`), per dimension.
    pub(super) credits: [Credit; 4],
}

impl ScopeState {
    pub(super) fn bucket(&mut self, d: Dim) -> &mut Gcra {
        match d {
            Dim::Requests => &mut self.requests,
            Dim::Tokens => &mut self.tokens,
            Dim::Images => &mut self.images,
            Dim::AudioSeconds => &mut self.audio,
        }
    }

    pub(super) fn credit(&mut self, d: Dim) -> &mut Credit {
        &mut self.credits[d as usize]
    }

    pub(super) fn idle(&self, now: Duration) -> bool {
        [self.requests, self.tokens, self.images, self.audio]
            .iter()
            .all(|g| g.tat <= now)
            && self.credits.iter().all(|c| c.units == 0 && !c.refilling)
    }
}

/// One scope a request was counted in, and what was taken there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub scope: Scope,
    pub limits: LimitSet,
    pub tokens: u64,
    pub images: u64,
    pub audio_seconds: u64,
    /// Dimensions taken from this node's own buckets while the shared state was unreachable
    /// (one bit per dimension): they go back there, not to the shared credit.
    pub local: u8,
}

impl Held {
    pub fn new(scope: Scope, limits: LimitSet) -> Held {
        Held {
            scope,
            limits,
            tokens: 0,
            images: 0,
            audio_seconds: 0,
            local: 0,
        }
    }
}

/// What a request holds, to give back in `on_done`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitHold {
    pub scopes: Vec<Held>,
    /// Tokens counted up front (the same count in every scope with a tokens/min limit).
    pub tokens: u64,
}

impl LimitHold {
    /// The concurrency caps that apply, for the admission queue.
    pub fn concurrency_caps(&self) -> Vec<(Scope, u32)> {
        self.scopes
            .iter()
            .filter_map(|h| h.limits.concurrency.map(|c| (h.scope.clone(), c)))
            .collect()
    }
}

/// Per-scope state, sharded by scope so that keys rarely share a lock. Shared with the
/// background refills of the credit.
pub(super) struct State {
    pub(super) shards: Box<[Mutex<HashMap<Scope, ScopeState>>]>,
    pub(super) epoch: Instant,
}

impl State {
    pub(super) fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The shard holding `scope`'s state.
    pub(super) fn lock(
        &self,
        scope: &Scope,
    ) -> std::sync::MutexGuard<'_, HashMap<Scope, ScopeState>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        scope.hash(&mut h);
        let shard = (h.finish() % SHARDS as u64) as usize;
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }
}
