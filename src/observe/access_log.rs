//! `access_log`: one structured line per request, as a filter, through `tracing` (target
//! `access`). The subscriber writes through a batching writer (`log_writer`): a request
//! thread formats the line and appends it to a buffer; a background thread writes the
//! buffer out every 50 ms.
//!
//! The line carries the key's display prefix, never the secret (tollgate never holds the
//! secret past the hash lookup).

use std::sync::Mutex;

use async_trait::async_trait;
use serde::Deserialize;
use tollgate_filters::{Channels, Ctx, Filter, Phases};

use super::log_writer::{BatchWriter, FlushGuard};

use super::{ms, Timings};
use crate::store::money::format_usd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line, event fields at the top level.
    Json,
}

/// `log:` in the YAML.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Every log line, access log included.
    pub format: LogFormat,
    /// The access log (one line per request).
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            access: true,
        }
    }
}

/// Keeps the background writer alive; [`flush`] drains it before the process exits.
static WRITER: Mutex<Option<FlushGuard>> = Mutex::new(None);

/// Installs the process's `tracing` subscriber: `level` (a filter directive; `RUST_LOG`
/// overrides it), in `cfg.format`, written to stdout off the calling threads.
pub fn init(level: &str, cfg: &LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (writer, guard) = BatchWriter::new(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .try_init(),
    };
    if installed.is_ok() {
        *WRITER.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }
}

/// Writes out every queued line. Call before `std::process::exit`.
pub fn flush() {
    drop(WRITER.lock().unwrap_or_else(|p| p.into_inner()).take());
}

pub struct AccessLog {
    channels: Channels,
}

impl AccessLog {
    pub fn new(channels: Channels) -> Self {
        AccessLog { channels }
    }
}

#[async_trait]
impl Filter for AccessLog {
    fn name(&self) -> &'static str {
        "access_log"
    }

    fn phases(&self) -> Phases {
        Phases::DONE
    }

    async fn on_done(&self, ctx: &mut Ctx) {
        let t = Timings::of(ctx);
        let channel = ctx
            .outcome
            .channel
            .and_then(|i| self.channels.get(i))
            .map_or("-", |c| c.name.as_str());
        let key = ctx.key.as_deref();
        let usage = ctx.settlement.usage;
        let charged = ctx.charged_nano.unwrap_or(0);
        tracing::info!(
            target: "access",
            request_id = %ctx.request_id,
            route = ctx.endpoint.label(),
            key = key.map_or("-", |k| k.prefix.as_str()),
            account = key.map_or("-", |k| k.account.as_str()),
            model = ctx.model().unwrap_or("-"),
            stream = ctx.facts.as_ref().is_some_and(|f| f.stream),
            channel,
            status = ctx.outcome.status,
            attempts = ctx.outcome.attempts,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            cached_tokens = usage.cached_tokens,
            estimated = ctx.settlement.estimated.map_or("-", |r| r.label()),
            cost_usd = %format_usd(charged),
            cost_nano = charged,
            latency_ms = ms(t.total),
            upstream_ms = ms(t.upstream),
            gateway_ms = ms(t.gateway),
            ttft_ms = t.ttft.map_or(-1.0, ms),
            client_gone = ctx.outcome.client_gone,
            error = ctx.outcome.error.as_ref().and_then(|e| e.code()).unwrap_or("-"),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Arc;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn one_json_line_per_request_with_the_key_prefix_only() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || out.clone())
            .finish();
        let log = AccessLog::new(Arc::from(Vec::new()));
        let mut ctx = Ctx::new("req_1".into());
        ctx.key = Some(Arc::new(tollgate_filters::auth::KeyRecord {
            prefix: "sk-tg-ab12cd".into(),
            account: "acme".into(),
            ..Default::default()
        }));
        ctx.outcome.status = 200;
        ctx.charged_nano = Some(1_250_000);
        let _guard = tracing::subscriber::set_default(subscriber);
        log.on_done(&mut ctx).await;
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["request_id"], "req_1");
        assert_eq!(v["key"], "sk-tg-ab12cd");
        assert_eq!(v["account"], "acme");
        assert_eq!(v["status"], 200);
        assert_eq!(v["cost_usd"], "0.00125");
        assert_eq!(v["cost_nano"], 1_250_000);
    }
}
