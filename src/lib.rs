//! tollgate: an AI gateway on Cloudflare Pingora.
//!
//! `main.rs` is the table of contents; [`server::run`] assembles the pieces:
//! config → store → filter chain → relay → services.

pub mod admin;
pub mod admission;
pub mod cli;
pub mod config;
pub mod connections;
pub mod fuzzing;
pub mod leases;
pub mod ledger;
pub mod loadtest;
pub mod maintenance;
pub mod metrics;
pub mod observe;
pub mod pricing_page;
pub mod profiling;
pub mod relay;
pub mod reload;
pub mod respond;
pub mod server;
pub mod service;
pub mod shared;
pub mod store;
pub mod tls;
