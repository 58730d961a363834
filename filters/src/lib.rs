//! tollgate's filter chain.
//!
//! A request passes through an ordered list of [`Filter`]s. Each filter is one module with its
//! config struct and its tests beside it, and gets its dependencies (stores, caches, the
//! channel table) at construction, never from globals. The service in the `tollgate` crate
//! drives the chain through the phases listed in [`chain`]:
//!
//! ```text
//! on_request_head   ip_guard → auth(key, ip) → limits(rpm, concurrency)
//! on_request_body   auth(model) → limits(tpm) → cache(lookup, coalesce) → route(plan)
//!                   → billing(reserve) → usage(inject?)
//! (relay, per attempt: the body rewritten for the channel's wire format, translate::request)
//! on_attempt_start  route(channel slot, health probe)
//! on_attempt_end    route(channel health)                                  (reverse order)
//! on_response_head  usage(pick the scanner) → translate(pick the translator)  (reverse order)
//! on_chunk          usage(scan, strip the injected usage event) → translate(into the
//!                   client's wire format) → cache(record)                     (reverse)
//! on_done           billing(settle, ledger) → limits(free) → metrics → access_log
//! ```

pub mod auth;
pub mod azure;
pub mod billing;
pub mod cache;
pub mod chain;
pub mod channel;
mod ctx;
pub mod dial;
mod error;
mod gcra;
mod health;
pub mod ip_guard;
pub mod limits;
pub mod media;
pub mod multipart;
pub mod queue;
pub mod realtime;
pub mod request;
pub mod route;
pub mod translate;
pub mod usage;
pub mod wire;

pub use chain::{Attempt, AttemptOutcome, Chain, Filter, Phases};
pub use channel::{Channel, Channels};
pub use ctx::{
    gemini_model, CacheHit, Ctx, Endpoint, EstimateReason, Outcome, RequestHead, ResponseHeaders,
    Settlement, UsageReport,
};
pub use error::{error_json, GatewayError, Limit, LimitScope};
pub use request::{RequestBody, RequestFacts};
pub use wire::Wire;
