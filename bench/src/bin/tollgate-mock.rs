//! Standalone mock provider upstream (OpenAI with images, audio and Realtime; Anthropic and Gemini wires) for load benchmarks: the same server the
//! integration tests run in-process, so benchmark baselines and tests agree.

use std::net::SocketAddr;

use clap::Parser;
use tollgate_bench::mock::{Behaviour, MockProtocols, MockServer};

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-mock",
    about = "Mock model provider upstream (OpenAI, Anthropic, Gemini)"
)]
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
    /// HTTPS with a fresh self-signed certificate for localhost and 127.0.0.1 (its PEM
    /// is written to `--ca-out` when given).
    #[arg(long)]
    tls: bool,
    /// Speak HTTP/2 too: ALPN h2 over TLS, prior-knowledge h2c in plain text.
    #[arg(long)]
    h2: bool,
    /// Where to write the certificate to trust in TLS mode.
    #[arg(long)]
    ca_out: Option<std::path::PathBuf>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let default = Behaviour {
        chunks: args.chunks,
        delay_ms: args.delay_ms,
        ..Behaviour::default()
    };
    let protocols = MockProtocols {
        tls: args.tls,
        h2: args.h2,
    };
    let server = MockServer::bind_protocols(args.listen, default, protocols).await?;
    if let (Some(path), Some(pem)) = (&args.ca_out, server.ca_pem()) {
        std::fs::write(path, pem)?;
    }
    server.set_recording(args.record);
    println!("listening on {}", server.addr());
    tokio::signal::ctrl_c().await?;
    drop(server);
    Ok(())
}
