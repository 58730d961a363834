//! tollgate's entry point. Read it as a table of contents:
//!
//! 1. parse the command line (`cli`);
//! 2. load and validate the YAML config (`config`);
//! 3. for `serve`: open SQLite and migrate (`store`), build the filter chain and the relay
//!    (`server::build_chain`, `relay`), add the proxy, admin and maintenance services, run.

use clap::Parser;

// The memory allocator: jemalloc by default, mimalloc with `--no-default-features
// --features mimalloc`, the system one with `--no-default-features`. bench/RESULTS.md,
// scenarios (b) and (d), has the measurement behind the default.
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    let cli = tollgate::cli::Cli::parse();
    if let Err(e) = tollgate::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
