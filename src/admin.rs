//! The admin listener: health, readiness, metrics and key-cache control, all behind
//! `Authorization: Bearer <server.admin_token>` (compared in constant time).
//!
//! With an empty token the listener is open; config validation only allows that on a
//! loopback address.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use subtle::ConstantTimeEq;
use tollgate_filters::auth::KeyCache;

use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::service::InFlight;
use crate::store::Pool;

pub struct Admin {
    token: String,
    pool: Pool,
    metrics: Arc<Metrics>,
    keys: Arc<KeyCache>,
    in_flight: Arc<InFlight>,
    relay: Arc<Relay>,
}

impl Admin {
    pub fn new(
        token: String,
        pool: Pool,
        metrics: Arc<Metrics>,
        keys: Arc<KeyCache>,
        in_flight: Arc<InFlight>,
        relay: Arc<Relay>,
    ) -> Self {
        Admin {
            token,
            pool,
            metrics,
            keys,
            in_flight,
            relay,
        }
    }

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

    fn ready(&self) -> Result<(), String> {
        if self.in_flight.is_draining() {
            return Err("draining".into());
        }
        let conn = self.pool.get().map_err(|e| format!("database: {e}"))?;
        conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
            .map_err(|e| format!("database: {e}"))?;
        Ok(())
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Vec<u8>> {
    let body = serde_json::to_vec(&v).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .unwrap_or_default()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    json(
        status,
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": code}}),
    )
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        if !self.authorized(session) {
            return error(
                StatusCode::UNAUTHORIZED,
                "invalid_admin_token",
                "A valid admin token is required.",
            );
        }
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_owned();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => json(StatusCode::OK, serde_json::json!({"status": "ok"})),
            ("GET", "/readyz") => match self.ready() {
                Ok(()) => {
                    let channels: serde_json::Map<String, serde_json::Value> = self
                        .relay
                        .channels_in_use()
                        .into_iter()
                        .map(|(n, used)| (n.to_string(), serde_json::json!({"in_use": used})))
                        .collect();
                    json(
                        StatusCode::OK,
                        serde_json::json!({"status": "ready", "channels": channels}),
                    )
                }
                Err(why) => json(
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({"status": "unavailable", "reason": why}),
                ),
            },
            ("GET", "/metrics") => {
                let body = self.metrics.render();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .header(http::header::CONTENT_LENGTH, body.len())
                    .body(body)
                    .unwrap_or_default()
            }
            ("POST", "/admin/cache/keys/invalidate") => {
                self.keys.invalidate_all();
                json(StatusCode::OK, serde_json::json!({"invalidated": true}))
            }
            _ => error(StatusCode::NOT_FOUND, "unknown_url", "Unknown admin route."),
        }
    }
}
