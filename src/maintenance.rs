//! Background upkeep, off the request path, and the graceful drain on SIGTERM.
//!
//! - re-resolves upstream hosts (Pingora's `HttpPeer::new` would block on DNS per request);
//! - polls the key-change counter, so a key revoked by another process or node takes effect
//!   here within `KEY_POLL`;
//! - on SIGTERM: waits for in-flight requests (bounded by `server.grace_period_s`), then
//!   commits every queued ledger row, and exits. Pingora itself would sleep the whole grace
//!   period even when idle;
//! - deletes ledger rows older than `accounting.retention_days`, in small batches, hourly;
//! - with balance leases: renews this node's slices, hands idle ones back, reclaims expired
//!   ones, and hands everything back after the ledger's last commit at shutdown.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tollgate_filters::auth::KeyCache;

use crate::ledger::Ledger;
use crate::service::InFlight;
use crate::store::{self, Store};
use tollgate_filters::Channels;

const DNS_REFRESH: Duration = Duration::from_secs(30);
const KEY_POLL: Duration = Duration::from_millis(250);
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
const RETENTION_BATCH: usize = 5000;

pub struct Maintenance {
    pub channels: Channels,
    pub pool: Store,
    pub keys: Arc<KeyCache>,
    pub in_flight: Arc<InFlight>,
    pub ledger: Arc<Ledger>,
    pub grace: Duration,
    /// Ledger rows older than this are deleted (0 keeps everything).
    pub retention_days: u32,
    /// Balance leases (`accounting.leases`).
    pub leases: Option<crate::leases::LeaseKeeper>,
}

#[async_trait]
impl BackgroundService for Maintenance {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut dns = tokio::time::interval(DNS_REFRESH);
        let mut keys = tokio::time::interval(KEY_POLL);
        let mut retention = tokio::time::interval(RETENTION_EVERY);
        let mut epoch = None;
        let mut lease_round = tokio::time::interval(
            self.leases
                .as_ref()
                .map_or(Duration::from_secs(3600), |l| l.every()),
        );
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = lease_round.tick(), if self.leases.is_some() => {
                    if let Some(l) = &self.leases {
                        l.tick().await;
                    }
                }
                _ = dns.tick() => {
                    let channels = self.channels.clone();
                    let _ = tokio::task::spawn_blocking(move || refresh_dns(&channels)).await;
                }
                _ = retention.tick(), if self.retention_days > 0 => {
                    let pool = self.pool.clone();
                    let before = store::now_ms() - i64::from(self.retention_days) * 86_400_000;
                    match tokio::task::spawn_blocking(move || store::usage::delete_older_than(&pool, before, RETENTION_BATCH)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, "old ledger rows deleted"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "ledger retention failed"),
                        _ => {}
                    }
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
        let ledger = self.ledger.clone();
        let _ = tokio::task::spawn_blocking(move || ledger.shutdown()).await;
        if let Some(l) = &self.leases {
            // Every charge is committed: what is left of this node's slices goes back.
            l.hand_back(Duration::ZERO).await;
        }
        tracing::info!("shutdown complete");
        crate::observe::access_log::flush();
        std::process::exit(0);
    }
}

/// Resolves every channel's host; failures are logged and retried on the next refresh.
pub fn refresh_dns(channels: &Channels) {
    for ch in channels.iter() {
        if let Err(e) = ch.resolve() {
            tracing::warn!(channel = %ch.name, error = %e, "upstream host not resolved or refused (see security); will retry");
        }
    }
}
