//! The background work of `redis:` on each node: connecting, heartbeats, renewing the
//! concurrency places held here, returning stale credit, and listening for pushed changes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tollgate_filters::auth::KeyCache;
use tollgate_filters::billing::Wallets;
use tollgate_filters::limits::Limits;

use super::events::Events;
use super::limits::{RedisLimits, PLACE_TTL};
use super::nodes::{Nodes, HEARTBEAT};
use super::Redis;
use crate::service::InFlight;

/// How often credit past its life goes back to the shared buckets.
const SWEEP: Duration = Duration::from_millis(250);

pub struct SharedService {
    pub redis: Arc<Redis>,
    pub limits_backend: Arc<RedisLimits>,
    pub limits: Arc<Limits>,
    pub nodes: Arc<Nodes>,
    pub events: Arc<Events>,
    pub keys: Arc<KeyCache>,
    pub shared_keys: Arc<super::keys::SharedKeys>,
    pub wallets: Arc<Wallets>,
    pub in_flight: Arc<InFlight>,
}

#[async_trait]
impl BackgroundService for SharedService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // The connections' tasks run on this runtime, which lasts as long as the server.
        self.redis.connect();
        let listener = tokio::spawn(self.events.clone().run(
            self.keys.clone(),
            self.wallets.clone(),
            self.shared_keys.clone(),
        ));
        let mut beat = tokio::time::interval(HEARTBEAT);
        let mut renew = tokio::time::interval(PLACE_TTL / 3);
        let mut sweep = tokio::time::interval(SWEEP);
        for t in [&mut beat, &mut renew, &mut sweep] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = beat.tick() => self.nodes.heartbeat(self.in_flight.count()).await,
                _ = renew.tick() => self.limits_backend.renew().await,
                _ = sweep.tick() => {
                    self.limits.return_stale_credit().await;
                    self.limits_backend.return_spares();
                }
            }
        }
        // Places still held are renewed until the drain ends; the registry entry goes now
        // so the other nodes' shares grow back.
        self.nodes.leave().await;
        let mut renew = tokio::time::interval(PLACE_TTL / 3);
        let mut sweep = tokio::time::interval(SWEEP);
        for _ in 0..600 {
            tokio::select! {
                _ = renew.tick() => self.limits_backend.renew().await,
                _ = sweep.tick() => {
                    self.limits.return_stale_credit().await;
                    self.limits_backend.return_spares();
                }
            }
            if self.in_flight.count() == 0 && self.limits_backend.places_held() == 0 {
                break;
            }
        }
        listener.abort();
    }
}
