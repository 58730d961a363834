//! `access_log`: one structured line per request, as a filter, through `tracing` (target
//! `access`). The subscriber writes through a batching writer (`log_writer`): a request
//! thread formats the line and appends it to a buffer; a background thread writes the
//! buffer out every 50 ms.
//!
//! The line carries the key's display prefix, never the secret (tollgate never holds the
//! secret past the hash lookup).

use std::cell::RefCell;
use std::fmt::Write;
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
/// overrides it), in `cfg.format`, written to stdout off the calling threads. Returns the
/// writer, for the access log's own lines.
pub fn init(level: &str, cfg: &LogConfig) -> BatchWriter {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let (writer, guard) = BatchWriter::new(std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
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
    if installed.is_err() {
        eprintln!(
            "a log subscriber was already installed; tollgate's log settings are not applied"
        );
    }
    // Kept either way: the access log writes through this writer too.
    *WRITER.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    writer
}

/// Writes out every queued line. Call before `std::process::exit`.
pub fn flush() {
    drop(WRITER.lock().unwrap_or_else(|p| p.into_inner()).take());
}

/// The access log. Its line is formatted here, field by field, into a buffer kept per
/// thread, and appended to the log writer: the same shape as a `tracing` line of target
/// `access` in the configured format, at a fraction of the cost (no field visitor, no
/// `Debug` formatting, no allocation). `log.access` alone turns it on or off, whatever
/// `log_level` says.
pub struct AccessLog {
    channels: Channels,
    out: BatchWriter,
    json: bool,
}

impl AccessLog {
    pub fn new(channels: Channels, out: BatchWriter, format: LogFormat) -> Self {
        AccessLog {
            channels,
            out,
            json: format == LogFormat::Json,
        }
    }

    fn render(&self, line: &mut Line<'_>, ctx: &Ctx) {
        let t = Timings::of(ctx);
        let channel = ctx
            .outcome
            .channel
            .and_then(|i| self.channels.get(i))
            .map_or("-", |c| c.name.as_str());
        let key = ctx.key.as_deref();
        let usage = ctx.settlement.usage;
        let charged = ctx.charged_nano.unwrap_or(0);
        line.str("request_id", &ctx.request_id);
        line.str("route", ctx.endpoint.label());
        line.str("key", key.map_or("-", |k| k.prefix.as_str()));
        line.str("account", key.map_or("-", |k| k.account.as_str()));
        line.str("model", ctx.model().unwrap_or("-"));
        line.bool("stream", ctx.facts.as_ref().is_some_and(|f| f.stream));
        line.str("channel", channel);
        line.int("status", ctx.outcome.status);
        line.int("attempts", ctx.outcome.attempts);
        line.int("prompt_tokens", usage.prompt_tokens);
        line.int("completion_tokens", usage.completion_tokens);
        line.int("cached_tokens", usage.cached_tokens);
        line.str(
            "estimated",
            ctx.settlement.estimated.map_or("-", |r| r.label()),
        );
        line.str("cost_usd", &format_usd(charged));
        line.int("cost_nano", charged);
        line.ms("latency_ms", ms(t.total));
        line.ms("upstream_ms", ms(t.upstream));
        line.ms("gateway_ms", ms(t.gateway));
        line.ms("ttft_ms", t.ttft.map_or(-1.0, ms));
        // What the response cache did (`hit`, `miss`, `bypass`), `-` when it was not asked.
        line.str(
            "cache",
            ctx.response_headers
                .iter()
                .find(|(k, _)| *k == tollgate_filters::cache::CACHE_HEADER)
                .map_or("-", |(_, v)| v),
        );
        line.bool("client_gone", ctx.outcome.client_gone);
        line.str(
            "error",
            ctx.outcome
                .error
                .as_ref()
                .and_then(|e| e.code())
                .unwrap_or("-"),
        );
    }
}

thread_local! {
    static LINE: RefCell<String> = RefCell::new(String::with_capacity(1024));
}

/// One line being written: `tracing`'s text (`key=value`, strings quoted and escaped) or
/// JSON (one object, event fields at the top level) layout.
struct Line<'a> {
    out: &'a mut String,
    json: bool,
}

impl Line<'_> {
    fn start(&mut self) {
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        if self.json {
            let _ = write!(
                self.out,
                r#"{{"timestamp":"{now}","level":"INFO","message":"request","target":"access""#
            );
        } else {
            let _ = write!(self.out, "{now}  INFO request");
        }
    }

    fn end(&mut self) {
        self.out.push_str(if self.json { "}\n" } else { "\n" });
    }

    fn key(&mut self, k: &str) {
        if self.json {
            let _ = write!(self.out, r#","{k}":"#);
        } else {
            let _ = write!(self.out, " {k}=");
        }
    }

    /// A string, escaped: account names and models come from users.
    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        if self.json {
            // Writing JSON into a String cannot fail.
            let _ = serde_json::to_writer(string_writer(self.out), v);
        } else {
            let _ = write!(self.out, "{v:?}");
        }
    }

    fn int(&mut self, k: &str, v: impl itoa::Integer) {
        self.key(k);
        self.out.push_str(itoa::Buffer::new().format(v));
    }

    fn ms(&mut self, k: &str, v: f64) {
        self.key(k);
        let _ = write!(self.out, "{v}");
    }

    fn bool(&mut self, k: &str, v: bool) {
        self.key(k);
        self.out.push_str(if v { "true" } else { "false" });
    }
}

/// `serde_json` writes to an `io::Write`; a `String` takes only its UTF-8.
fn string_writer(s: &mut String) -> impl std::io::Write + '_ {
    struct W<'a>(&'a mut String);
    impl std::io::Write for W<'_> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            // serde_json writes valid UTF-8 pieces (escapes and whole characters).
            let text = std::str::from_utf8(b)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            self.0.push_str(text);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    W(s)
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
        LINE.with_borrow_mut(|out| {
            out.clear();
            let mut line = Line {
                out,
                json: self.json,
            };
            line.start();
            self.render(&mut line, ctx);
            line.end();
            self.out.append(out.as_bytes());
        });
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

    /// The lines one request writes, in `format`.
    async fn lines(format: LogFormat, account: &str) -> String {
        let buf = Buf::default();
        let (out, guard) = BatchWriter::new(buf.clone());
        let log = AccessLog::new(Arc::from(Vec::new()), out, format);
        let mut ctx = Ctx::new("req_1".into());
        ctx.key = Some(Arc::new(tollgate_filters::auth::KeyRecord {
            prefix: "sk-tg-ab12cd".into(),
            account: account.into(),
            ..Default::default()
        }));
        ctx.outcome.status = 200;
        ctx.charged_nano = Some(1_250_000);
        log.on_done(&mut ctx).await;
        drop(guard);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[tokio::test]
    async fn one_json_line_per_request_with_the_key_prefix_only() {
        let text = lines(LogFormat::Json, "acme \"corp\"\nINFO forged").await;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(v["target"], "access");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "request");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["request_id"], "req_1");
        assert_eq!(v["key"], "sk-tg-ab12cd");
        assert_eq!(v["account"], "acme \"corp\"\nINFO forged");
        assert_eq!(v["status"], 200);
        assert_eq!(v["stream"], false);
        assert_eq!(v["cost_usd"], "0.00125");
        assert_eq!(v["cost_nano"], 1_250_000);
        assert_eq!(v["ttft_ms"], -1.0);
        assert_eq!(v["error"], "-");
        assert_eq!(v["cache"], "-");
    }

    #[tokio::test]
    async fn the_text_line_quotes_and_escapes_what_users_named() {
        let text = lines(LogFormat::Text, "acme\nINFO forged").await;
        assert_eq!(
            text.lines().count(),
            1,
            "a name cannot start a line: {text}"
        );
        assert!(
            text.contains("  INFO request request_id=\"req_1\""),
            "{text}"
        );
        assert!(text.contains(r#"account="acme\nINFO forged""#), "{text}");
        assert!(text.contains(" status=200 "), "{text}");
        assert!(
            text.contains(r#" cost_usd="0.00125" cost_nano=1250000 "#),
            "{text}"
        );
    }
}
