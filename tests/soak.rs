//! The soak, bounded for CI: fixed-rate traffic with upstream, client and process faults
//! (SIGTERM and SIGKILL with restarts) against this build's `tollgate`, then the ledger
//! reconciled against what the mock upstream served. `TOLLGATE_SOAK_SECS` sets the length
//! (default 60; 0 skips). The full runs are `tollgate-soak` (30 min) and
//! `tollgate-soak --short` (3 min); see the README.

use std::path::PathBuf;
use std::time::Duration;

use tollgate_bench::soak::{run, Options};

#[test]
fn soak_with_faults_reconciles_to_the_nano_usd() {
    let secs: u64 = std::env::var("TOLLGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    if secs == 0 {
        return;
    }
    let bin = PathBuf::from(
        std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").into()),
    );
    let opts = Options::new(bin, Duration::from_secs(secs));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = rt.block_on(run(opts));
    println!("{}", report.render());
    rt.shutdown_timeout(Duration::from_secs(5));
    assert!(
        report.failures.is_empty(),
        "soak reconciliation failed:\n{}",
        report.render()
    );
}
