//! Load-test and integration-test support for tollgate.
//!
//! The mock upstream lives here (rather than in the gateway's own test tree)
//! so the integration tests can run it in-process while the load benchmarks
//! run the very same code as a standalone binary (`tollgate-mock`).

pub mod mock;
pub mod soak;
