//! `tollgate-soak`: fixed-rate traffic with upstream, client and process faults against the
//! real gateway on a temp SQLite file, then a reconciliation of the ledger against what the
//! mock upstream served. Exits non-zero on any reconciliation failure.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tollgate_bench::soak::{run, Options};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-soak",
    about = "Soak the gateway with faults, then reconcile the ledger"
)]
struct Args {
    /// Run for this many seconds (default 1800, i.e. 30 minutes).
    #[arg(long, env = "TOLLGATE_SOAK_SECS")]
    duration_secs: Option<u64>,
    /// Three minutes instead of thirty.
    #[arg(long)]
    short: bool,
    /// Requests started per second.
    #[arg(long, default_value_t = 150)]
    rate: u32,
    /// The gateway binary (default: `tollgate` beside this binary).
    #[arg(long)]
    tollgate: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The gateway's `accounting.flush_interval_ms`.
    #[arg(long, default_value_t = 100)]
    flush_interval_ms: u64,
    /// A row lost to SIGKILL must belong to a request finished at most this long before the
    /// kill (or in flight at it).
    #[arg(long, default_value_t = 2000)]
    kill_window_ms: u64,
    /// Keep the temp directory (config, SQLite file, gateway log); kept anyway on failure.
    #[arg(long)]
    keep: bool,
    /// Also write the RSS / open-fd samples as an SVG plot.
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let bin = args.tollgate.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("tollgate")))
            .unwrap_or_else(|| PathBuf::from("tollgate"))
    });
    let secs = args
        .duration_secs
        .unwrap_or(if args.short { 180 } else { 1800 });
    let mut opts = Options::new(bin, Duration::from_secs(secs));
    opts.rate = args.rate;
    opts.seed = args.seed;
    opts.flush_interval_ms = args.flush_interval_ms;
    opts.kill_window = Duration::from_millis(args.kill_window_ms);
    opts.keep_dir = args.keep;
    opts.svg = args.svg;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = rt.block_on(run(opts));
    print!("{}", report.render());
    rt.shutdown_timeout(Duration::from_secs(5));
    std::process::exit(if report.failures.is_empty() { 0 } else { 1 });
}
