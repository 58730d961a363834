//! Assembles the gateway from a validated config and runs it.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use pingora::apps::HttpServerOptions;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use tollgate_filters::auth::{Auth, KeyCache, KeyLookup};
use tollgate_filters::billing::{
    usd_to_nano, Billing, ModelRate, PriceTable, UnpricedPolicy, Wallets,
};
use tollgate_filters::cache::{Backend as CacheBackend, ResponseCache};
use tollgate_filters::channel::build_channels_with;
use tollgate_filters::ip_guard::IpGuard;
use tollgate_filters::limits::{Limits, LimitsConfig, Shared};
use tollgate_filters::queue::{Queue, Scheduler};
use tollgate_filters::route::{ChannelPicker, Route};
use tollgate_filters::translate::Translate;
use tollgate_filters::usage::UsageFilter;
use tollgate_filters::{Chain, Channels, Filter};

use crate::admin::Admin;
use crate::config::LeaseMode;
use crate::config::{Config, Unpriced};
use crate::connections::Capped;
use crate::leases::{LeaseKeeper, StoreLeases};
use crate::ledger::Ledger;
use crate::maintenance::{refresh_dns, Maintenance};
use crate::metrics::{Metrics, ModelLabels};
use crate::observe::log_writer::BatchWriter;
use crate::observe::{AccessLog, LatencySummary, MetricsFilter};
use crate::pricing_page::PricingPage;
use crate::profiling::CpuMonitor;
use crate::relay::{ClientLimits, Relay};
use crate::reload::{ReloadOnHangup, Reloader};
use crate::service::{Gateway, InFlight, Pipeline};
use crate::shared::entries::RedisEntries;
use crate::shared::{SharedParts, SharedService};
use crate::store::{self, accounts::StoreBalances, keys::StoreKeys, Store};
use crate::tls;

/// Seconds Pingora waits beyond `server.grace_period_s` before it stops the runtimes.
const SHUTDOWN_MARGIN_S: u64 = 10;

/// The shared pieces the filters are built from. A reload ([`crate::reload`]) builds a new
/// set from the old one, replacing what the new YAML changed.
#[derive(Clone)]
pub struct Parts {
    /// The store (SQLite or PostgreSQL).
    pub pool: Store,
    /// Where log lines go (the access log writes its own).
    pub log: BatchWriter,
    pub keys: Arc<KeyCache>,
    pub channels: Channels,
    pub picker: Arc<ChannelPicker>,
    pub prices: Arc<PriceTable>,
    pub wallets: Arc<Wallets>,
    pub ledger: Arc<Ledger>,
    pub metrics: Arc<Metrics>,
    pub summary: Arc<LatencySummary>,
    /// The limits filter, shared with /readyz (tokens counted for requests in flight).
    pub limits: Arc<Limits>,
    /// The admission queue's scheduler: channel slots and concurrency places.
    pub scheduler: Arc<Scheduler>,
    /// The response cache (`cache.responses`), when configured.
    pub cache: Option<Arc<ResponseCache>>,
    /// `redis:`, when configured.
    pub shared: Option<SharedParts>,
}

/// **The filter chain, in request order.** This is the one place it is assembled.
/// Response phases (attempt end, response head, chunks, done) run it in reverse.
pub fn build_chain(cfg: &Config, parts: &Parts, billing: Arc<Billing>) -> Chain {
    if cfg.limits.ip.rps.is_some() {
        tracing::warn!("limits.ip.rps is deprecated and ignored; the guard counts failed authentications (limits.ip.failed_auth_per_min)");
    }
    let mut filters: Vec<Arc<dyn Filter>> = Vec::new();
    // The access log and the metrics come first, so their on_done runs last and sees the
    // final status and billing's settlement. (The log's line goes out after the metrics.)
    if cfg.log.access {
        filters.push(Arc::new(AccessLog::new(
            parts.channels.clone(),
            parts.log.clone(),
            cfg.log.format,
        )));
    }
    if cfg.metrics.enabled {
        filters.push(Arc::new(MetricsFilter::new(
            parts.metrics.clone(),
            parts.summary.clone(),
        )));
    }
    filters.extend::<[Arc<dyn Filter>; 3]>([
        // pre-auth guard: refuses an address after too many failed authentications
        Arc::new(IpGuard::new(cfg.limits.ip)),
        // key → account; status, expiry, IP allow-list; then the model allow-list
        Arc::new(Auth::new(key_lookup(parts), parts.keys.clone())),
        // key and account requests/min before the body; model scopes, tokens/min and media
        // units after it; on_done: gives back what the settlement says was not used
        parts.limits.clone(),
    ]);
    if let Some(cache) = &parts.cache {
        // a stored answer → ctx.cache_hit (no provider, no slot), identical misses coalesced;
        // records complete 2xx answers as they stream past
        filters.push(cache.clone());
    }
    filters.extend::<[Arc<dyn Filter>; 5]>([
        // reads x-tollgate-priority; per attempt: waits for a channel slot and a place under
        // the concurrency caps, by priority, fair share and deadline (before route, which
        // marks the probe of the channel granted)
        Arc::new(
            Queue::new(parts.scheduler.clone(), cfg.pricing.default_max_output)
                .with_shared(parts.limits.shared().cloned()),
        ),
        // model → ordered channel attempts; per attempt: channel health
        Arc::new(Route::new(parts.picker.clone())),
        // worst case → reservation; on_done: the settlement's cost → ledger row
        // (a realtime session's responses are billed one by one through its meter)
        billing,
        // answers in another wire format than the client's (a channel of another kind)
        // rewritten into the client's, event by event; the request is rewritten by the
        // relay per attempt (`translate::request`)
        Arc::new(Translate),
        // nearest the provider: asks for stream usage, reads it from every chunk
        Arc::new(UsageFilter),
    ]);
    Chain::new(filters)
}

/// Where a key the node's own cache does not hold is looked up: the store, behind Redis's
/// shared tier when `redis:` is configured.
fn key_lookup(parts: &Parts) -> Arc<dyn KeyLookup> {
    match &parts.shared {
        Some(sh) => sh.keys.clone(),
        None => store_keys(parts),
    }
}

fn store_keys(parts: &Parts) -> Arc<dyn KeyLookup> {
    Arc::new(StoreKeys {
        pool: parts.pool.clone(),
        lookups: parts.metrics.key_store_lookups.clone(),
    })
}

/// The channel table and the picker over it.
pub fn channel_table(cfg: &Config) -> Result<(Channels, Arc<ChannelPicker>), String> {
    let channels = build_channels_with(
        &cfg.channels,
        cfg.routing.health(),
        cfg.security.private_upstreams,
    )?;
    let picker = Arc::new(ChannelPicker::with_paths(
        channels.clone(),
        cfg.routing.max_attempts,
        &cfg.routes,
    ));
    Ok((channels, picker))
}

/// The response cache of `cache.responses`, if configured; with `backend: redis` its
/// shared tier is `redis:`'s.
pub fn response_cache(cfg: &Config, shared: Option<&SharedParts>) -> Option<Arc<ResponseCache>> {
    cfg.cache.responses.clone().map(|c| {
        let wait = Duration::from_millis(cfg.queue.timeout_ms);
        let redis = (c.backend == CacheBackend::Redis)
            .then_some(shared)
            .flatten();
        let cache = ResponseCache::new(c, wait);
        Arc::new(match redis {
            Some(sh) => {
                let errors = cache.shared_error_counter();
                cache.with_shared(RedisEntries::new(sh.redis.clone(), errors))
            }
            None => cache,
        })
    })
}

/// What one request runs with: the chain and the tables it reads.
pub fn pipeline(cfg: &Config, parts: &Parts) -> Pipeline {
    let billing = Arc::new(Billing::new(
        parts.prices.clone(),
        parts.wallets.clone(),
        parts.ledger.clone(),
        parts.channels.clone(),
    ));
    Pipeline {
        chain: build_chain(cfg, parts, billing.clone()),
        billing: Some(billing),
        limits: Some(parts.limits.clone()),
        channels: parts.channels.clone(),
        picker: parts.picker.clone(),
        max_body_bytes: cfg.server.max_body_bytes,
        connections: cfg.server.connections,
        pricing: cfg.pricing.expose.then(|| PricingPage::new(&parts.prices)),
    }
}

pub fn price_table(cfg: &Config) -> PriceTable {
    let p = &cfg.pricing;
    PriceTable {
        models: p
            .models
            .iter()
            .map(|(m, price)| {
                let rate = ModelRate {
                    default_max_output: price.default_max_output,
                    cache_write: usd_to_nano(price.cache_write.unwrap_or(price.input)),
                    audio_input: usd_to_nano(price.audio_input.unwrap_or(price.input)),
                    audio_output: usd_to_nano(price.audio_output.unwrap_or(price.output)),
                    per_image: price
                        .per_image
                        .iter()
                        .map(|(k, v)| (k.clone(), usd_to_nano(*v)))
                        .collect(),
                    per_audio_second: usd_to_nano(price.per_audio_second),
                    per_1m_characters: usd_to_nano(price.per_1m_characters),
                    ..ModelRate::from_usd(
                        price.input,
                        price.output,
                        price.cached_input,
                        price.per_request,
                    )
                };
                (m.clone(), rate)
            })
            .collect(),
        groups: p
            .groups
            .iter()
            .map(|(g, m)| (g.clone(), (m * 1_000_000.0).round() as u64))
            .collect(),
        unpriced: match p.unpriced {
            Unpriced::Reject => UnpricedPolicy::Reject,
            Unpriced::Free => UnpricedPolicy::Free,
        },
        default_max_output: p.default_max_output,
    }
}

/// The model label values: every model a channel serves or maps, and every priced model.
pub fn model_labels(cfg: &Config) -> ModelLabels {
    let mut names: Vec<String> = cfg
        .channels
        .iter()
        .flat_map(|c| c.models.iter().chain(c.model_map.keys()).cloned())
        .chain(cfg.pricing.models.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    ModelLabels::new(names)
}

pub fn limits_config(cfg: &Config) -> LimitsConfig {
    LimitsConfig {
        default: cfg.limits.default,
        groups: cfg.limits.groups.clone().into_iter().collect(),
        accounts: cfg.limits.accounts.clone().into_iter().collect(),
        account_default: cfg.limits.account_default,
        models: cfg.limits.models.clone().into_iter().collect(),
        default_max_output: cfg.pricing.default_max_output,
    }
}

/// Runs the gateway until SIGTERM (graceful) or SIGINT (immediate). `path` is the YAML a
/// reload (SIGHUP, `POST /admin/reload`) reads again.
pub fn run(
    cfg: Config,
    path: &std::path::Path,
    log: BatchWriter,
    upgrade: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let pool = store::open_and_migrate(&cfg.database)?;
    let metrics = Arc::new(Metrics::with_labels(
        model_labels(&cfg),
        cfg.channels.iter().map(|c| c.name.clone()).collect(),
        cfg.metrics.account_label,
    ));
    let summary = Arc::new(LatencySummary::new(
        Duration::from_secs(cfg.metrics.summary_window_s),
        model_labels(&cfg),
    ));
    let store: Arc<dyn KeyLookup> = Arc::new(StoreKeys {
        pool: pool.clone(),
        lookups: metrics.key_store_lookups.clone(),
    });
    let shared = cfg
        .redis
        .as_ref()
        .map(|r| SharedParts::new(&cfg, r, store))
        .transpose()?;
    // Credit leases: several nodes spend one balance through slices (on with PostgreSQL).
    let leased = match cfg.accounting.leases {
        LeaseMode::Auto => matches!(pool, Store::Postgres(_)),
        LeaseMode::On => true,
        LeaseMode::Off => false,
    };
    let balances = Arc::new(StoreBalances(pool.clone()));
    let lease_store = leased.then(|| {
        Arc::new(StoreLeases {
            store: pool.clone(),
            node: shared
                .as_ref()
                .map_or_else(crate::shared::default_node_id, |s| s.redis.node_id.clone()),
            ttl: Duration::from_secs(cfg.accounting.lease_ttl_s),
            redis: shared.as_ref().map(|s| s.redis.clone()),
        })
    });
    let wallets = Arc::new(match &lease_store {
        Some(l) => Wallets::with_leases(balances, l.clone()),
        None => Wallets::new(balances),
    });
    let ledger = Arc::new(Ledger::start_leased(
        &cfg.database,
        &cfg.accounting,
        wallets.clone(),
        metrics.clone(),
        lease_store.as_ref().map(|l| l.node.clone()),
    )?);
    if let Some(l) = &lease_store {
        tracing::info!(node = %l.node, ttl_s = cfg.accounting.lease_ttl_s, "balance leases on");
    }
    let limits = match &shared {
        Some(sh) => Limits::with_shared(
            limits_config(&cfg),
            Shared {
                backend: sh.limits.clone(),
                on_error: sh.redis.cfg.on_error,
            },
        ),
        None => Limits::new(limits_config(&cfg)),
    };
    let (channels, picker) = channel_table(&cfg)?;
    refresh_dns(&channels);
    metrics.watch_channels(channels.clone());
    let parts = Parts {
        log,
        pool: pool.clone(),
        keys: Arc::new(KeyCache::new(cfg.auth.clone())),
        picker,
        channels: channels.clone(),
        prices: Arc::new(price_table(&cfg)),
        wallets,
        ledger: ledger.clone(),
        metrics: metrics.clone(),
        summary: summary.clone(),
        limits: Arc::new(limits),
        scheduler: Scheduler::new(cfg.queue.clone(), channels.clone()),
        cache: response_cache(&cfg, shared.as_ref()),
        shared,
    };
    for c in parts.scheduler.collectors() {
        metrics.register(c);
    }
    for c in parts.cache.iter().flat_map(|c| c.collectors()) {
        metrics.register(c);
    }
    for c in parts.shared.iter().flat_map(|s| s.collectors()) {
        metrics.register(c);
    }
    let limits = ClientLimits {
        drain_timeout: Duration::from_millis(cfg.accounting.drain_timeout_ms),
        drain_max_bytes: cfg.accounting.drain_max_bytes,
        write_timeout: Duration::from_millis(cfg.server.client_write_timeout_ms),
    };
    let relay = Arc::new(Relay::new(cfg.server.upstream_keepalive_pool_size, limits));
    let in_flight = Arc::new(InFlight::default());
    let first = pipeline(&cfg, &parts);
    tracing::info!(filters = ?first.chain.names(), channels = channels.len(), "filter chain built");
    let pipeline = Arc::new(ArcSwap::from_pointee(first));
    let reloader = Arc::new(Reloader::new(
        path.to_path_buf(),
        cfg.clone(),
        parts.clone(),
        pipeline.clone(),
    ));

    let conf = ServerConf {
        threads: cfg.server.threads,
        // tollgate's own drain (maintenance.rs) ends at grace_period_s and exits after the
        // ledger's last commit; Pingora's clock gets a margin so it never cuts that short.
        grace_period_seconds: Some(cfg.server.grace_period_s + SHUTDOWN_MARGIN_S),
        graceful_shutdown_timeout_seconds: Some(1),
        upstream_keepalive_pool_size: cfg.server.upstream_keepalive_pool_size,
        upgrade_sock: cfg.server.upgrade_sock.clone(),
        ..ServerConf::default()
    };
    // `--upgrade`: the listeners come from the running process over `upgrade_sock`.
    let opt = upgrade.then(|| pingora::server::configuration::Opt {
        upgrade: true,
        ..Default::default()
    });
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let mut http_options = HttpServerOptions::default();
    http_options.h2c = cfg.server.h2c;
    // An HTTP/2 connection with no stream open is closed like an idle kept-alive one.
    http_options.h2_idle_timeout = Some(Duration::from_secs(
        cfg.server.connections.keepalive_timeout_s,
    ));
    let gateway = Gateway {
        pipeline: pipeline.clone(),
        relay,
        metrics: metrics.clone(),
        in_flight: in_flight.clone(),
        http_options,
        h2: cfg.server.h2,
    };
    let app = Capped::new(
        gateway,
        cfg.server.connections.max_connections,
        metrics.clone(),
    );
    let mut proxy = Service::new("tollgate".to_string(), app);
    let mut watched = Vec::new();
    match &cfg.server.tls {
        Some(t) => {
            let l = tls::listener(t, "server.tls", true)?;
            proxy.add_tls_with_settings(&cfg.server.listen, None, l.settings);
            watched.push(l.watched);
        }
        None => proxy.add_tcp(&cfg.server.listen),
    }

    if cfg.profiling.cpu_monitor {
        CpuMonitor::new(cfg.profiling.clone(), metrics.clone()).spawn()?;
    }
    let admin_app = Admin {
        token: cfg.server.admin_token.clone(),
        public_probes: cfg.metrics.public,
        started: std::time::Instant::now(),
        summary,
        profile_hz: cfg.profiling.frequency_hz,
        pool: pool.clone(),
        metrics,
        keys: parts.keys.clone(),
        wallets: parts.wallets.clone(),
        ledger: parts.ledger.clone(),
        in_flight: in_flight.clone(),
        admission: Arc::new(crate::admission::AdmissionView {
            reloader: reloader.clone(),
            limits: parts.limits.clone(),
            wallets: parts.wallets.clone(),
        }),
        shared: parts.shared.clone(),
        reloader: reloader.clone(),
    };
    let mut admin = Service::new("tollgate-admin".to_string(), admin_app);
    match &cfg.server.admin_tls {
        Some(t) => {
            let l = tls::listener(t, "server.admin_tls", false)?;
            admin.add_tls_with_settings(&cfg.server.admin_listen, None, l.settings);
            watched.push(l.watched);
        }
        None => admin.add_tcp(&cfg.server.admin_listen),
    }
    admin.threads = Some(1);

    if let Some(sh) = &parts.shared {
        server.add_service(background_service(
            "tollgate-redis",
            SharedService {
                redis: sh.redis.clone(),
                limits_backend: sh.limits.clone(),
                limits: parts.limits.clone(),
                nodes: sh.nodes.clone(),
                events: sh.events.clone(),
                keys: parts.keys.clone(),
                shared_keys: sh.keys.clone(),
                wallets: parts.wallets.clone(),
                in_flight: in_flight.clone(),
            },
        ));
    }
    let maintenance = background_service(
        "tollgate-maintenance",
        Maintenance {
            channels,
            pool,
            keys: parts.keys,
            in_flight,
            ledger,
            grace: Duration::from_secs(cfg.server.grace_period_s),
            retention_days: cfg.accounting.retention_days,
            leases: lease_store.map(|leases| LeaseKeeper {
                leases,
                wallets: parts.wallets.clone(),
            }),
        },
    );
    server.add_service(background_service(
        "tollgate-reload",
        ReloadOnHangup { reloader },
    ));
    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(maintenance);
    if let Some(reloader) = tls::reloader(watched) {
        server.add_service(background_service("tollgate-tls-reload", reloader));
    }
    tracing::info!(
        listen = %cfg.server.listen,
        admin = %cfg.server.admin_listen,
        tls = cfg.server.tls.is_some(),
        admin_tls = cfg.server.admin_tls.is_some(),
        h2c = cfg.server.h2c,
        "tollgate serving"
    );
    server.run_forever();
}
