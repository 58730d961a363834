//! The admin listener: health, readiness, metrics, the latency summary, CPU profiles and the
//! admin API (accounts, keys, usage, prices), all behind `Authorization: Bearer
//! <server.admin_token>` (compared in constant time). With an empty token the listener is
//! open; config validation allows that only on a loopback address. `metrics.public` opens
//! `/metrics`, `/healthz` and `/readyz` (only those) to callers without the token.
//!
//! Money goes in as USD (a JSON number or a decimal string, converted from its decimal text
//! exactly) and comes out as both a decimal string (`*_usd`) and integer nano-USD (`*_nano`).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tollgate_filters::auth::KeyCache;
use tollgate_filters::billing::Wallets;
use tollgate_filters::error_json;

mod body;
mod profile;

use body::{
    account_json, json_object, key_json, key_patch, new_account, new_key, query_map, topup_usd,
};
pub use body::{parse_body, BodyKind};

use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::observe::LatencySummary;
use crate::service::InFlight;
use crate::store::usage::{self, GroupBy, UsageFilter};
use crate::store::{accounts, keys, Store, StoreError};

const MAX_ADMIN_BODY: usize = 64 * 1024;

pub struct Admin {
    pub token: String,
    /// `/metrics`, `/healthz` and `/readyz` answer without the token (`metrics.public`).
    pub public_probes: bool,
    pub started: Instant,
    pub summary: Arc<LatencySummary>,
    /// Default sampling frequency of on-demand profiles (`profiling.frequency_hz`).
    pub profile_hz: u32,
    pub pool: Store,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<KeyCache>,
    pub wallets: Arc<Wallets>,
    pub ledger: Arc<Ledger>,
    pub in_flight: Arc<InFlight>,
    /// The queue, the limits and the reservations, for /readyz.
    pub admission: Arc<crate::admission::AdmissionView>,
    /// `redis:`: pushed changes, the node registry, and Redis's state for /readyz.
    pub shared: Option<crate::shared::SharedParts>,
    /// The live config: prices, channels, and `POST /admin/reload`.
    pub reloader: Arc<crate::reload::Reloader>,
}

/// An admin failure: status, code, message.
struct Fail(StatusCode, &'static str, String);

type Reply = Result<(StatusCode, Value), Fail>;

fn bad(msg: impl Into<String>) -> Fail {
    Fail(StatusCode::BAD_REQUEST, "invalid_request_error", msg.into())
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        match e {
            StoreError::NotFound(m) => Fail(StatusCode::NOT_FOUND, "not_found", m),
            StoreError::Conflict(m) => Fail(StatusCode::CONFLICT, "conflict", m),
            StoreError::Invalid(m) => bad(m),
            StoreError::Unavailable(m) => Fail(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m),
            other => {
                tracing::error!(error = %other, "admin store error");
                Fail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "Internal error.".into(),
                )
            }
        }
    }
}

/// One query through the pool, run off the async workers: waiting for a connection from an
/// exhausted pool (or a slow disk) must not stall the runtime serving other admin requests.
async fn database_ready(pool: &Store) -> Result<(), String> {
    let pool = pool.clone();
    tokio::task::spawn_blocking(move || pool.ping().map_err(|e| format!("database: {e}")))
        .await
        .map_err(|e| format!("database: {e}"))?
}

/// `localhost` or a loopback IP literal, with an optional port. A name that merely starts
/// with `127.` (`127.attacker.example`) is not one: DNS rebinding would point it here.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
        // `name:port`; more than one colon is a bare IPv6 address.
        None if host.matches(':').count() == 1 => host.split(':').next().unwrap_or(""),
        None => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn json_response(status: StatusCode, v: &Value) -> Response<Vec<u8>> {
    body_response(status, serde_json::to_vec(v).unwrap_or_default())
}

fn body_response(status: StatusCode, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

impl Admin {
    fn authorized(&self, session: &ServerSession) -> bool {
        if self.token.is_empty() {
            return true;
        }
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        presented.as_bytes().ct_eq(self.token.as_bytes()).into()
    }

    /// Guards a token-less (loopback-only) admin listener against browsers: a page the
    /// operator opens may POST to 127.0.0.1 (plain forms send no JSON content type) or
    /// rebind a hostile name to it (its `Host` is not a loopback address).
    fn browser_safe(&self, session: &ServerSession) -> bool {
        if !self.token.is_empty() {
            return true;
        }
        let h = &session.req_header().headers;
        let text = |name: http::header::HeaderName| h.get(name).and_then(|v| v.to_str().ok());
        // Browsers always send Origin on cross-origin writes and Sec-Fetch-Site on modern
        // engines; tools (curl, the CLI, SDKs) send neither.
        if h.contains_key(http::header::ORIGIN)
            || text(http::header::HeaderName::from_static("sec-fetch-site"))
                .is_some_and(|v| v != "none")
        {
            return false;
        }
        if !text(http::header::HOST).is_some_and(is_loopback_host) {
            return false;
        }
        let method = &session.req_header().method;
        let has_body = h.contains_key(http::header::TRANSFER_ENCODING)
            || text(http::header::CONTENT_LENGTH).is_some_and(|v| v != "0");
        let json_body =
            text(http::header::CONTENT_TYPE).is_some_and(|v| v.starts_with("application/json"));
        !(matches!(*method, Method::POST | Method::PATCH) && has_body && !json_body)
    }

    async fn ready(&self) -> Result<(), String> {
        if self.in_flight.is_draining() {
            return Err("draining".into());
        }
        if self.ledger.backlogged() {
            return Err(format!(
                "ledger backlogged: {} rows not committed",
                self.ledger.queued_rows()
            ));
        }
        if let Some(sh) = &self.shared {
            // Under `allow` and `local_share` the node serves without Redis; under `deny` it
            // refuses every limited request, so it is not ready.
            if !sh.redis.up() && sh.redis.cfg.on_error == tollgate_filters::limits::OnError::Deny {
                return Err("redis unreachable and redis.on_error is deny".into());
            }
        }
        database_ready(&self.pool).await
    }

    /// `GET /admin/status`: what `tollgate status` shows.
    async fn status(&self) -> Value {
        let (count, covered_s) = self.summary.rate();
        let summary = self.summary.json();
        let channels: Vec<Value> = self
            .reloader
            .channels()
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "up": c.peer().is_some() && c.health.is_available(),
                    "in_use": c.in_use(),
                    "max_concurrency": c.max_concurrency,
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "commit": env!("TOLLGATE_COMMIT"),
            "uptime_s": self.started.elapsed().as_secs(),
            "pid": std::process::id(),
            "ready": self.ready().await.err().map_or(Value::String("ready".into()), Value::String),
            "window_s": self.summary.window().as_secs(),
            "requests_in_window": count,
            "requests_per_s": count as f64 / covered_s,
            "p99_ms": summary["overall"]["total"]["p99_ms"],
            "overhead_p99_ms": summary["overall"]["gateway_overhead"]["p99_ms"],
            "in_flight": self.in_flight.count(),
            "channels": channels,
            "ledger_lag_rows": self.ledger.queued_rows(),
        })
    }

    async fn body(&self, session: &mut ServerSession) -> Result<Value, Fail> {
        let mut buf = BytesMut::new();
        while let Some(chunk) = session
            .read_request_body()
            .await
            .map_err(|_| bad("cannot read the body"))?
        {
            buf.extend_from_slice(&chunk);
            if buf.len() > MAX_ADMIN_BODY {
                return Err(Fail(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    "Body too large.".into(),
                ));
            }
        }
        json_object(&buf)
    }

    /// Runs a blocking store call off the async workers.
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Fail> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || f(&pool))
            .await
            .map_err(|_| {
                Fail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "Internal error.".into(),
                )
            })?
            .map_err(Fail::from)
    }

    /// Applies a key change here at once, and on every other node through Redis.
    async fn key_changed(&self, key_id: i64) {
        self.keys.invalidate_all();
        self.wallets.forget_key(key_id);
        if let Some(sh) = &self.shared {
            sh.key_changed(crate::shared::events::Change::Key(key_id))
                .await;
        }
    }

    async fn route(&self, session: &mut ServerSession, method: &Method, path: &str) -> Reply {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let query = query_map(session.req_header().uri.query());
        match (method.as_str(), segs.as_slice()) {
            ("POST", ["admin", "cache", "keys", "invalidate"]) => {
                self.keys.invalidate_all();
                if let Some(sh) = &self.shared {
                    sh.key_changed(crate::shared::events::Change::Keys).await;
                }
                Ok((StatusCode::OK, json!({"invalidated": true})))
            }
            ("POST", ["admin", "reload"]) => {
                let r = self.reloader.clone();
                match tokio::task::spawn_blocking(move || r.reload_json()).await {
                    Ok(Ok(v)) => Ok((StatusCode::OK, v)),
                    Ok(Err(errors)) => Ok((
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"error": {"message": "The new configuration is refused; nothing changed.", "type": "invalid_request_error", "code": "invalid_config", "errors": errors}}),
                    )),
                    Err(_) => Err(Fail(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal_error",
                        "Internal error.".into(),
                    )),
                }
            }
            ("GET", ["admin", "nodes"]) => {
                let Some(sh) = &self.shared else {
                    // One node, no registry: this one.
                    return Ok((
                        StatusCode::OK,
                        json!({"data": [{"this_node": true, "in_flight": self.in_flight.count()}], "registry": false}),
                    ));
                };
                let nodes = sh.nodes.list().await.map_err(|()| {
                    Fail(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "redis_unavailable",
                        "The node registry (Redis) cannot be reached.".into(),
                    )
                })?;
                Ok((StatusCode::OK, json!({"data": nodes, "registry": true})))
            }
            ("GET", ["admin", "accounts"]) => {
                let list = self.store(accounts::list).await?;
                let data: Vec<Value> = list
                    .iter()
                    .map(|a| account_json(a, self.wallets.account_available(a.id)))
                    .collect();
                Ok((StatusCode::OK, json!({"data": data})))
            }
            ("POST", ["admin", "accounts"]) => {
                let v = self.body(session).await?;
                let (name, group, balance) = new_account(&v)?;
                let a = self
                    .store(move |p| accounts::create(p, &name, &group, balance))
                    .await?;
                Ok((StatusCode::CREATED, account_json(&a, None)))
            }
            ("GET", ["admin", "accounts", name]) => {
                let name = name.to_string();
                let a = self.store(move |p| accounts::get(p, &name)).await?;
                Ok((
                    StatusCode::OK,
                    account_json(&a, self.wallets.account_available(a.id)),
                ))
            }
            ("POST", ["admin", "accounts", name, "topup"]) => {
                let v = self.body(session).await?;
                let usd = topup_usd(&v)?;
                let name = name.to_string();
                // Through the ledger writer, so the book never sees balances out of order.
                let ledger = self.ledger.clone();
                let a = self.store(move |_| ledger.topup(&name, usd)).await?;
                Ok((
                    StatusCode::OK,
                    account_json(&a, self.wallets.account_available(a.id)),
                ))
            }
            ("GET", ["admin", "keys"]) => {
                let account = query.get("account").cloned();
                let list = self
                    .store(move |p| keys::list(p, account.as_deref()))
                    .await?;
                Ok((
                    StatusCode::OK,
                    json!({"data": list.iter().map(key_json).collect::<Vec<_>>()}),
                ))
            }
            ("POST", ["admin", "keys"]) => {
                let v = self.body(session).await?;
                let new = new_key(&v)?;
                let (info, secret) = self.store(move |p| keys::create(p, &new)).await?;
                let mut out = key_json(&info);
                out["key"] = Value::String(secret);
                Ok((StatusCode::CREATED, out))
            }
            ("PATCH", ["admin", "keys", id]) => {
                let id: i64 = id.parse().map_err(|_| bad("key id must be an integer"))?;
                let v = self.body(session).await?;
                let patch = key_patch(&v)?;
                let info = self.store(move |p| keys::update(p, id, &patch)).await?;
                self.key_changed(id).await;
                Ok((StatusCode::OK, key_json(&info)))
            }
            ("DELETE", ["admin", "keys", id]) => {
                let id_s = id.to_string();
                let info = self.store(move |p| keys::revoke(p, &id_s)).await?;
                self.key_changed(info.id).await;
                Ok((StatusCode::OK, key_json(&info)))
            }
            ("GET", ["admin", "usage"]) => {
                let time = |k: &str| {
                    query
                        .get(k)
                        .map(|s| usage::parse_time(s).map_err(bad))
                        .transpose()
                };
                let filter = UsageFilter {
                    account: query.get("account").cloned(),
                    key_id: query
                        .get("key")
                        .map(|k| k.parse().map_err(|_| bad("`key` must be a key id")))
                        .transpose()?,
                    model: query.get("model").cloned(),
                    since: time("since")?,
                    until: time("until")?,
                };
                let by: Option<GroupBy> = query
                    .get("by")
                    .map(|b| b.parse().map_err(bad))
                    .transpose()?;
                let (totals, groups) = self.store(move |p| usage::summary(p, &filter, by)).await?;
                let mut out = serde_json::to_value(&totals).unwrap_or_default();
                if by.is_some() {
                    out["breakdown"] = serde_json::to_value(&groups).unwrap_or_default();
                }
                Ok((StatusCode::OK, out))
            }
            ("GET", ["admin", "metrics", "summary"]) => Ok((StatusCode::OK, self.summary.json())),
            ("POST", ["admin", "metrics", "reset"]) => {
                self.summary.reset();
                Ok((StatusCode::OK, json!({"reset": true})))
            }
            ("GET", ["admin", "status"]) => Ok((StatusCode::OK, self.status().await)),
            ("GET", ["admin", "pricing"]) => {
                let page = crate::pricing_page::PricingPage::new(&self.reloader.prices());
                let group = query.get("group").map(String::as_str);
                let body = page.page(group).ok_or_else(|| bad("unknown group"))?;
                Ok((
                    StatusCode::OK,
                    serde_json::from_slice(&body).unwrap_or_default(),
                ))
            }
            _ => Err(Fail(
                StatusCode::NOT_FOUND,
                "unknown_url",
                "Unknown admin route.".into(),
            )),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let probe = session.req_header().method == Method::GET
            && matches!(
                session.req_header().uri.path(),
                "/metrics" | "/healthz" | "/readyz"
            );
        let open = self.public_probes && probe;
        if !open && (!self.authorized(session) || !self.browser_safe(session)) {
            return body_response(
                StatusCode::UNAUTHORIZED,
                error_json(
                    "A valid admin token is required.",
                    "invalid_request_error",
                    None,
                    Some("invalid_admin_token"),
                )
                .to_vec(),
            );
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => return json_response(StatusCode::OK, &json!({"status": "ok"})),
            ("GET", "/readyz") => {
                return match self.ready().await {
                    Ok(()) => {
                        let channels: serde_json::Map<String, Value> = self
                            .reloader
                            .channels()
                            .iter()
                            .map(|c| (c.name.clone(), json!({"in_use": c.in_use(), "available": c.health.is_available()})))
                            .collect();
                        json_response(
                            StatusCode::OK,
                            &json!({"status": "ready", "channels": channels, "admission": self.admission.json(), "redis": self.shared.as_ref().map(|s| s.redis.readiness())}),
                        )
                    }
                    Err(why) => json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &json!({"status": "unavailable", "reason": why}),
                    ),
                }
            }
            ("GET", "/metrics") => {
                let body = self.metrics.render();
                return Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default();
            }
            ("GET", "/debug/pprof/profile") => {
                let query = query_map(session.req_header().uri.query());
                return self.profile(&query).await;
            }
            _ => {}
        }
        match self.route(session, &method, &path).await {
            Ok((status, v)) => json_response(status, &v),
            Err(Fail(status, code, message)) => body_response(
                status,
                error_json(&message, "invalid_request_error", None, Some(code)).to_vec(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback_host;

    /// The pool is exhausted, so readiness waits ~3 s for a connection: meanwhile the same
    /// single-threaded runtime must go on serving other work (another admin request). (3 s,
    /// not 1: opening the pool waits as long for its first connection, which a loaded CI
    /// machine once took more than a second to make.)
    #[tokio::test(flavor = "current_thread")]
    async fn readiness_waiting_on_the_database_does_not_stall_the_runtime() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let db = crate::config::DatabaseConfig {
            path: Some(dir.path().join("r.db")),
            pool_size: 1,
            busy_timeout_ms: 3000,
            ..Default::default()
        };
        let pool = crate::store::open_and_migrate(&db).unwrap();
        let crate::store::Store::Sqlite(sqlite) = &pool else {
            unreachable!("a path is SQLite")
        };
        let held = sqlite.get().unwrap();
        let ticks = Arc::new(AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::task::yield_now().await;
        assert!(super::database_ready(&pool).await.is_err());
        ticker.abort();
        assert!(
            ticks.load(Ordering::SeqCst) >= 20,
            "the runtime was blocked: {} ticks",
            ticks.load(Ordering::SeqCst)
        );
        drop(held);
        assert!(super::database_ready(&pool).await.is_ok());
    }

    #[test]
    fn only_loopback_literals_and_localhost_pass() {
        for ok in [
            "localhost",
            "localhost:8081",
            "127.0.0.1",
            "127.0.0.1:8081",
            "[::1]:8081",
            "[::1]",
            "127.3.4.5:1",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "127.attacker.example",
            "127.0.0.1.nip.io:8081",
            "example.com",
            "10.0.0.1:8081",
            "[::2]:1",
            "",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
