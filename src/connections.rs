//! Client connections: their limits (`server.connections`), and the cap on how many may
//! be open at once, enforced before anything is read from a new one.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// `server.connections`: what one client connection may cost before it has proved itself.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Total time to read a request head, from the connection's first byte (or from the
    /// end of the previous request on a kept-alive one).
    pub head_timeout_ms: u64,
    /// Total time to read a request body.
    pub body_timeout_ms: u64,
    /// Longest pause between two reads of a request body.
    pub body_idle_timeout_ms: u64,
    /// How long a kept-alive connection may sit idle between requests.
    pub keepalive_timeout_s: u64,
    /// Open client connections at most; past it a new connection is refused (503) before
    /// anything is read from it.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            head_timeout_ms: 10_000,
            body_timeout_ms: 60_000,
            body_idle_timeout_ms: 10_000,
            keepalive_timeout_s: 60,
            max_connections: 10_000,
        }
    }
}

/// The refusal a connection past `max_connections` gets, written once, then closed.
const REFUSED: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 146\r\nretry-after: 1\r\nx-should-retry: true\r\nconnection: close\r\n\r\n{\"error\":{\"message\":\"The gateway has too many open connections. Retry shortly.\",\"type\":\"server_error\",\"param\":null,\"code\":\"too_many_connections\"}}";

/// Wraps the HTTP app: one permit per open connection, held across its keep-alive life.
pub struct Capped<A> {
    inner: Arc<A>,
    slots: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

impl<A> Capped<A> {
    pub fn new(inner: A, max_connections: usize, metrics: Arc<Metrics>) -> Self {
        Capped {
            inner: Arc::new(inner),
            slots: Arc::new(Semaphore::new(max_connections)),
            metrics,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Capped<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Ok(_permit) = self.slots.clone().try_acquire_owned() else {
            self.metrics.connections_refused.inc();
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                stream.write_all(REFUSED).await?;
                stream.flush().await
            })
            .await;
            return None;
        };
        self.metrics.connections_open.inc();
        let out = ServerApp::process_new(&self.inner, stream, shutdown).await;
        self.metrics.connections_open.dec();
        out
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::REFUSED;

    #[test]
    fn the_refusal_is_well_formed_http_with_an_openai_error() {
        let text = std::str::from_utf8(REFUSED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(len, body.len());
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
    }
}
