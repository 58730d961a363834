//! Standalone mock OpenAI upstream for load benchmarks: the same server the
//! integration tests run in-process, so benchmark baselines and tests agree.

use std::net::SocketAddr;

use clap::Parser;
use tollgate_bench::mock::{Behaviour, MockServer};

#[derive(Parser, Debug)]
#[command(name = "tollgate-mock", about = "Mock OpenAI-compatible upstream")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Default content chunks per response (requests may override via x_mock).
    #[arg(long)]
    chunks: Option<u32>,
    /// Default delay before each content chunk / JSON response, in ms.
    #[arg(long)]
    delay_ms: Option<u64>,
    /// Keep every request and served usage in memory; off by default so
    /// long benchmark runs don't grow without bound.
    #[arg(long)]
    record: bool,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let default = Behaviour {
        chunks: args.chunks,
        delay_ms: args.delay_ms,
        ..Behaviour::default()
    };
    let server = MockServer::bind(args.listen, default).await?;
    server.set_recording(args.record);
    println!("listening on {}", server.addr());
    tokio::signal::ctrl_c().await?;
    drop(server);
    Ok(())
}
