//! The floor for tollgate's benchmarks: a bare Pingora `ProxyHttp` that does
//! nothing but pick the one upstream. Same Pingora version, same thread count
//! (`--threads`, as tollgate's `server.threads`), the same upstream keep-alive
//! pool (128) and the same upstream idle timeout (a channel's default 90 s)
//! as the gateway, so the difference between the two is what tollgate itself
//! costs. Pingora's default proxy loop streams the request body (a POST is
//! forwarded as is) and the response body (SSE is relayed chunk by chunk).
//!
//!   tollgate-passthrough --listen 127.0.0.1:8090 --upstream 127.0.0.1:9000 --threads 2

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use clap::Parser;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-passthrough",
    about = "Bare Pingora pass-through proxy: the benchmark floor"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// The one upstream (plain HTTP), e.g. the mock.
    #[arg(long, default_value = "127.0.0.1:9000")]
    upstream: SocketAddr,
    /// Worker threads; set it equal to tollgate's `server.threads`.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Upstream keep-alive pool size (tollgate's `server.upstream_keepalive_pool_size`).
    #[arg(long, default_value_t = 128)]
    keepalive_pool: usize,
    /// Idle upstream connections are kept this long (a tollgate channel's `idle_timeout_s`).
    #[arg(long, default_value_t = 90)]
    idle_timeout_s: u64,
}

struct PassThrough {
    upstream: SocketAddr,
    idle_timeout: Duration,
}

#[async_trait]
impl ProxyHttp for PassThrough {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.idle_timeout = Some(self.idle_timeout);
        Ok(Box::new(peer))
    }
}

fn main() {
    let args = Args::parse();
    let conf = ServerConf {
        threads: args.threads,
        upstream_keepalive_pool_size: args.keepalive_pool,
        // A benchmark floor has nothing to drain: exit promptly on SIGTERM.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        PassThrough {
            upstream: args.upstream,
            idle_timeout: Duration::from_secs(args.idle_timeout_s),
        },
    );
    proxy.add_tcp(&args.listen.to_string());
    server.add_service(proxy);
    println!("listening on {} -> {}", args.listen, args.upstream);
    server.run_forever();
}
