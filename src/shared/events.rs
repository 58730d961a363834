//! Pushed changes over Redis pub/sub: an admin change on one node reaches every node within
//! a second, instead of waiting for a cache's TTL.
//!
//! One channel per deployment, `{ns}:events`. A message is one line: `key:{id}` (a key was
//! created, revoked, or had its limits, models or budget changed: every node empties its key
//! cache and forgets the key's budget book) or `keys` (empty the key cache). A node that
//! (re)subscribes empties its key cache too, since it may have missed messages meanwhile.
//! Without Redis, the SQLite key-change counter poll does the same on one machine.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tollgate_filters::auth::KeyCache;
use tollgate_filters::billing::Wallets;

use super::keys::SharedKeys;
use super::{Op, Redis};

/// A change another node announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Key(i64),
    Keys,
}

impl Change {
    fn encode(&self) -> String {
        match self {
            Change::Key(id) => format!("key:{id}"),
            Change::Keys => "keys".into(),
        }
    }

    fn decode(s: &str) -> Option<Change> {
        match s.split_once(':') {
            Some(("key", id)) => id.parse().ok().map(Change::Key),
            None if s == "keys" => Some(Change::Keys),
            _ => None,
        }
    }
}

/// Publishes this node's changes and applies everyone's.
pub struct Events {
    redis: Arc<Redis>,
    channel: String,
}

impl Events {
    pub fn new(redis: Arc<Redis>) -> Arc<Events> {
        let channel = redis.key("events");
        Arc::new(Events { redis, channel })
    }

    /// Announces `change` to every node (this one applies it itself, at once).
    pub async fn publish(&self, change: Change) {
        let (channel, msg) = (self.channel.clone(), change.encode());
        let _ = self
            .redis
            .call(Op::Publish, |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(msg)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// Subscribes and applies changes until the process ends; resubscribes after a failure.
    pub async fn run(
        self: Arc<Self>,
        keys: Arc<KeyCache>,
        wallets: Arc<Wallets>,
        shared_keys: Arc<SharedKeys>,
    ) {
        let apply = |c: Change| match c {
            Change::Key(id) => {
                keys.invalidate_all();
                wallets.forget_key(id);
            }
            Change::Keys => keys.invalidate_all(),
        };
        loop {
            let connect = tokio::time::timeout(
                Duration::from_secs(2),
                self.redis.client().get_async_pubsub(),
            )
            .await;
            let mut pubsub = match connect {
                Ok(Ok(p)) => p,
                _ => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if pubsub.subscribe(&self.channel).await.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            // Anything may have changed while this node was not listening.
            shared_keys.refresh_generation().await;
            apply(Change::Keys);
            tracing::debug!(channel = %self.channel, "subscribed to pushed changes");
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                let text: String = msg.get_payload().unwrap_or_default();
                if let Some(change) = Change::decode(&text) {
                    tracing::debug!(?change, "pushed change");
                    // The shared tier's new generation first, so the next miss does not
                    // read an entry from before the change.
                    shared_keys.refresh_generation().await;
                    apply(change);
                }
            }
            tracing::warn!("pushed changes: subscription lost; resubscribing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_and_junk_is_ignored() {
        for c in [Change::Key(42), Change::Keys] {
            assert_eq!(Change::decode(&c.encode()), Some(c));
        }
        assert_eq!(Change::decode("key:x"), None);
        assert_eq!(Change::decode("price:1"), None);
    }
}
