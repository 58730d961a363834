//! What `/readyz` shows of admission: the queue, what the limits count for requests in
//! flight, and the reservations. All of it returns to zero when nothing is in flight, so a
//! leak (a slot, a place, tokens or money held by a request that is gone) shows here.

use std::sync::Arc;

use serde_json::{json, Value};
use tollgate_filters::billing::Wallets;
use tollgate_filters::limits::Limits;

use crate::reload::Reloader;

pub struct AdmissionView {
    /// The queue's scheduler is the reloader's current one.
    pub reloader: Arc<Reloader>,
    pub limits: Arc<Limits>,
    pub wallets: Arc<Wallets>,
}

impl AdmissionView {
    /// `{"queue": {"waiting", "by_class", "concurrency_held"}, "tokens_held", "reserved_nano"}`.
    pub fn json(&self) -> Value {
        json!({
            "queue": self.reloader.scheduler().snapshot(),
            "tokens_held": self.limits.tokens_held(),
            "reserved_nano": self.wallets.reserved_total(),
        })
    }
}
