//! Background upkeep, off the request path, and the graceful drain on SIGTERM.
//!
//! - re-resolves upstream hosts (Pingora's `HttpPeer::new` would block on DNS per request);
//! - polls the key-change counter, so a key revoked by another process or node takes effect
//!   here within `KEY_POLL`;
//! - on SIGTERM: waits for in-flight requests (bounded by `server.grace_period_s`), then
//!   exits. Pingora itself would sleep the whole grace period even when idle.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tollgate_filters::auth::KeyCache;

use crate::relay::Relay;
use crate::service::InFlight;
use crate::store::{self, Pool};

const DNS_REFRESH: Duration = Duration::from_secs(30);
const KEY_POLL: Duration = Duration::from_millis(250);

pub struct Maintenance {
    pub relay: Arc<Relay>,
    pub pool: Pool,
    pub keys: Arc<KeyCache>,
    pub in_flight: Arc<InFlight>,
    pub grace: Duration,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut dns = tokio::time::interval(DNS_REFRESH);
        let mut keys = tokio::time::interval(KEY_POLL);
        let mut epoch = None;
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = dns.tick() => {
                    let relay = self.relay.clone();
                    let _ = tokio::task::spawn_blocking(move || relay.refresh_dns()).await;
                }
                _ = keys.tick() => {
                    let pool = self.pool.clone();
                    let now = tokio::task::spawn_blocking(move || store::key_epoch(&pool)).await;
                    match now {
                        Ok(Ok(v)) => {
                            if epoch.is_some_and(|e| e != v) {
                                tracing::info!("keys changed; key cache emptied");
                                self.keys.invalidate_all();
                            }
                            epoch = Some(v);
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "cannot read key epoch"),
                        Err(_) => {}
                    }
                }
            }
        }
        self.in_flight.start_draining();
        tracing::info!(
            in_flight = self.in_flight.count(),
            grace_s = self.grace.as_secs(),
            "SIGTERM: draining"
        );
        let left = self.in_flight.wait_idle(self.grace).await;
        if left > 0 {
            tracing::warn!(left, "grace period over; exiting with requests in flight");
        }
        tracing::info!("shutdown complete");
        std::process::exit(0);
    }
}
