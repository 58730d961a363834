//! The per-request context carried through every phase.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};

use crate::auth::KeyRecord;
use crate::billing::{Reservation, Usage};
use crate::limits::LimitHold;
use crate::route::Attempt;
use crate::{GatewayError, RequestFacts};

/// What a filter may look at before the body is read.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub client_ip: Option<IpAddr>,
}

/// How the exchange ended, filled by the relay and read by `on_done` filters.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The status sent to the client (0 if nothing was sent).
    pub status: u16,
    /// The channel that served the response, as an index into the route table.
    pub channel: Option<usize>,
    /// Upstream attempts made, including failed ones.
    pub attempts: u32,
    /// Per attempt: channel index and whether it failed in a way that counts against its
    /// health (connect error, timeout, 5xx, 429).
    pub channel_results: Vec<(usize, bool)>,
    /// Time from the first upstream byte being requested to the response header.
    pub upstream_header_time: Option<Duration>,
    /// Time to the first body byte sent to the client.
    pub first_byte: Option<Duration>,
    pub error: Option<GatewayError>,
    /// The client went away before the response was complete.
    pub client_gone: bool,
    /// Bytes of generated text seen in the response (for estimates when usage never comes).
    pub completion_text_bytes: u64,
}

/// One request's state. Created in `new_ctx`, dropped after `logging`.
pub struct Ctx {
    /// tollgate's own id: returned as `x-request-id` and the ledger's key.
    pub request_id: String,
    pub started: Instant,
    pub client_ip: Option<IpAddr>,
    /// The authenticated key, once `auth` has run.
    pub key: Option<Arc<KeyRecord>>,
    /// Parsed body facts, once the body is read.
    pub facts: Option<RequestFacts>,
    /// Upstream attempts in order, once `route` has run.
    pub route: Vec<Attempt>,
    /// The model name sent upstream, when `model_map` renamed it.
    pub upstream_model: Option<String>,
    /// Money held for this request, once `billing` has run.
    pub reservation: Option<Reservation>,
    /// Usage as the provider reported it.
    pub usage: Option<Usage>,
    /// What `limits` holds for this request (a concurrency slot, counted tokens).
    pub limit_hold: Option<LimitHold>,
    /// Headers filters add to whatever response the client gets (`x-ratelimit-*`).
    pub response_headers: Vec<(&'static str, String)>,
    pub outcome: Outcome,
}

impl Ctx {
    pub fn new(request_id: String) -> Self {
        Ctx {
            request_id,
            started: Instant::now(),
            client_ip: None,
            key: None,
            facts: None,
            route: Vec::new(),
            upstream_model: None,
            reservation: None,
            usage: None,
            limit_hold: None,
            response_headers: Vec::new(),
            outcome: Outcome::default(),
        }
    }

    /// The model the client asked for, if the body has been read.
    pub fn model(&self) -> Option<&str> {
        self.facts.as_ref().map(|f| f.model.as_str())
    }
}
