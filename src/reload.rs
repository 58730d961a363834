//! Hot reload: `SIGHUP` or `POST /admin/reload` reads the YAML again, validates it, builds
//! the new filters and tables, and swaps the pipeline.
//!
//! - A request takes the pipeline once, when it starts: one in flight (a stream, say)
//!   finishes on the chain, prices and channel table it started with; the next request
//!   gets the new ones.
//! - A config that fails validation is refused with its errors, and nothing changes.
//! - What carries over: the limiters' counts (the same `limits` filter gets the new
//!   limits), the key cache, balances and reservations, the ledger, the Redis link, and,
//!   when `channels:`, `routing:`, `routes:`, `security:` and `queue:` are unchanged, the
//!   channel table with its health, connection slots and queue. A changed channel table is
//!   rebuilt (its health starts afresh); it must keep the channels' names in order, since
//!   the metrics' channel labels are fixed at start.
//! - Sections that only a restart applies (listeners, TLS, threads, the database, Redis,
//!   logging, metrics, profiling, accounting, auth) are listed in the answer as
//!   `restart_required` and left as they were.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Serialize;
use serde_json::Value;
use tollgate_filters::billing::PriceTable;
use tollgate_filters::queue::Scheduler;
use tollgate_filters::Channels;

use crate::config::Config;
use crate::maintenance::refresh_dns;
use crate::server::{self, Parts};
use crate::service::Pipeline;

/// What a reload did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reloaded {
    /// Sections whose new values now apply.
    pub applied: Vec<&'static str>,
    /// Sections that changed and apply only after a restart.
    pub restart_required: Vec<&'static str>,
}

/// The live config and parts, and the pipeline handle the gateway reads.
pub struct Reloader {
    path: PathBuf,
    live: Mutex<(Config, Parts)>,
    pipeline: Arc<ArcSwap<Pipeline>>,
}

/// Compares one section of two configs by its parsed value.
fn same<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        cfg: Config,
        parts: Parts,
        pipeline: Arc<ArcSwap<Pipeline>>,
    ) -> Reloader {
        Reloader {
            path,
            live: Mutex::new((cfg, parts)),
            pipeline,
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, (Config, Parts)> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The price table requests are priced with now.
    pub fn prices(&self) -> Arc<PriceTable> {
        self.live().1.prices.clone()
    }

    /// The channel table requests use now.
    pub fn channels(&self) -> Channels {
        self.live().1.channels.clone()
    }

    /// The queue's scheduler now (for /readyz).
    pub fn scheduler(&self) -> Arc<Scheduler> {
        self.live().1.scheduler.clone()
    }

    /// Reads the file again and applies it; the errors when it does not validate.
    pub fn reload(&self) -> Result<Reloaded, Vec<String>> {
        let new = Config::load(&self.path)
            .map_err(|e| e.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
        let mut live = self.live();
        let (old, parts) = &*live;
        let mut p = parts.clone();
        let mut applied = Vec::new();
        let mut restart_required = Vec::new();

        let s = (&old.server, &new.server);
        let server_restart = s.0.listen != s.1.listen
            || s.0.admin_listen != s.1.admin_listen
            || s.0.threads != s.1.threads
            || s.0.admin_token != s.1.admin_token
            || s.0.h2c != s.1.h2c
            || s.0.upgrade_sock != s.1.upgrade_sock
            || s.0.upstream_keepalive_pool_size != s.1.upstream_keepalive_pool_size
            || s.0.log_level != s.1.log_level
            || !same(&s.0.tls, &s.1.tls)
            || !same(&s.0.admin_tls, &s.1.admin_tls)
            || !same(&s.0.h2, &s.1.h2);
        if server_restart {
            restart_required.push("server");
        }
        for (name, unchanged) in [
            ("database", same(&old.database, &new.database)),
            ("redis", same(&old.redis, &new.redis)),
            ("log", same(&old.log, &new.log)),
            ("metrics", same(&old.metrics, &new.metrics)),
            ("profiling", same(&old.profiling, &new.profiling)),
            ("accounting", same(&old.accounting, &new.accounting)),
            ("auth", same(&old.auth, &new.auth)),
        ] {
            if !unchanged {
                restart_required.push(name);
            }
        }

        let table_same = same(&old.channels, &new.channels)
            && same(&old.routing, &new.routing)
            && same(&old.routes, &new.routes)
            && same(&old.security, &new.security);
        if !table_same {
            let names = |c: &Config| {
                c.channels
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
            };
            if names(old) != names(&new) {
                return Err(vec![
                    "channels: adding, removing, renaming or reordering channels needs a restart (the metrics' channel labels are fixed at start); change their settings, or restart".into(),
                ]);
            }
            let (channels, picker) = server::channel_table(&new).map_err(|e| vec![e])?;
            refresh_dns(&channels);
            p.metrics.watch_channels(channels.clone());
            p.channels = channels;
            p.picker = picker;
            applied.push("channels");
        }
        if !table_same || !same(&old.queue, &new.queue) {
            p.scheduler = Scheduler::succeed(&p.scheduler, new.queue.clone(), p.channels.clone());
            applied.push("queue");
        }
        if !same(&old.pricing, &new.pricing) {
            p.prices = Arc::new(server::price_table(&new));
            applied.push("pricing");
        }
        if !same(&old.limits, &new.limits)
            || old.pricing.default_max_output != new.pricing.default_max_output
        {
            p.limits.set_config(server::limits_config(&new));
            applied.push("limits");
        }
        if !same(&old.cache, &new.cache) {
            for c in p.cache.iter().flat_map(|c| c.collectors()) {
                p.metrics.unregister(c);
            }
            p.cache = server::response_cache(&new, p.shared.as_ref());
            for c in p.cache.iter().flat_map(|c| c.collectors()) {
                p.metrics.register(c);
            }
            applied.push("cache");
        }
        if s.0.max_body_bytes != s.1.max_body_bytes || !same(&s.0.connections, &s.1.connections) {
            applied.push("server");
        }
        self.pipeline.store(Arc::new(server::pipeline(&new, &p)));
        *live = (new, p);
        tracing::info!(?applied, ?restart_required, "configuration reloaded");
        Ok(Reloaded {
            applied,
            restart_required,
        })
    }

    /// [`Self::reload`] as the admin API's JSON.
    pub fn reload_json(&self) -> Result<Value, Vec<String>> {
        self.reload()
            .map(|r| serde_json::to_value(r).unwrap_or_default())
    }
}

/// Reloads on `SIGHUP`.
pub struct ReloadOnHangup {
    pub reloader: Arc<Reloader>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ReloadOnHangup {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
            return;
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = hangup.recv() => {
                    let r = self.reloader.clone();
                    match tokio::task::spawn_blocking(move || r.reload()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(errors)) => tracing::error!(?errors, "SIGHUP: the new configuration is refused; nothing changed"),
                        Err(_) => tracing::error!("SIGHUP: reload failed"),
                    }
                }
            }
        }
    }
}
