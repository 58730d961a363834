//! tollgate's filter chain.
//!
//! A request passes through an ordered list of [`Filter`]s. Each filter is one module with its
//! config struct and its tests beside it, and gets its dependencies (stores, caches) through
//! small traits ("ports") at construction, never from globals. The service in the `tollgate`
//! crate drives the chain through Pingora's phases:
//!
//! ```text
//! on_request_head   ip_guard → auth(key, ip) → limits(rpm, concurrency)     (before the body)
//! on_request_body   auth(model) → limits(tpm) → route → billing(reserve)   (after one parse)
//! on_done           billing(settle, ledger) → route(health) → limits(free)  (reverse order)
//! ```

pub mod auth;
pub mod billing;
mod chain;
mod ctx;
mod error;
pub mod ip_guard;
pub mod limits;
pub mod request;
pub mod route;

pub use chain::{Chain, Filter};
pub use ctx::{Ctx, Outcome, RequestHead};
pub use error::GatewayError;
pub use request::{RequestBody, RequestFacts};
