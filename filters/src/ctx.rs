//! The per-request context carried through every phase.
//!
//! Fields are written by one party and read by others; each says who writes it. Filters
//! keep state only they read in [`Ctx::ext`], keyed by type.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};

use crate::auth::KeyRecord;
use crate::billing::{estimate_completion, Reservation, Usage};
use crate::limits::LimitHold;
use crate::queue::{Admission, ChannelSlot};
use crate::route::PlannedAttempt;
use crate::wire::Wire;
use crate::{GatewayError, RequestFacts};

/// What a filter may look at before the body is read.
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub client_ip: Option<IpAddr>,
}

/// Which API a request is for, from its path. Also the low-cardinality route label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
    /// Anthropic's Messages API, `/v1/messages`.
    Messages,
    /// Anthropic's `/v1/messages/count_tokens`.
    CountTokens,
    /// Gemini's native `/v1beta/models/{model}:generateContent` (and
    /// `:streamGenerateContent`).
    GeminiGenerate,
    /// OpenAI's Realtime API, a websocket at `/v1/realtime?model=…`.
    Realtime,
    /// `/v1/images/generations`, `edits`, `variations`.
    Images,
    /// `/v1/audio/transcriptions`, `translations`, `speech`.
    Audio,
    Models,
    OtherV1,
    #[default]
    Unknown,
}

impl Endpoint {
    pub fn of(path: &str) -> Endpoint {
        match path {
            "/v1/chat/completions" => Endpoint::Chat,
            "/v1/completions" => Endpoint::Completions,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/responses" => Endpoint::Responses,
            "/v1/messages" => Endpoint::Messages,
            "/v1/messages/count_tokens" => Endpoint::CountTokens,
            "/v1/realtime" => Endpoint::Realtime,
            p if p.starts_with("/v1/images/") => Endpoint::Images,
            p if p.starts_with("/v1/audio/") => Endpoint::Audio,
            p if gemini_model(p).is_some() => Endpoint::GeminiGenerate,
            p if p == "/v1/models" || p.starts_with("/v1/models/") => Endpoint::Models,
            p if p.starts_with("/v1/") => Endpoint::OtherV1,
            _ => Endpoint::Unknown,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
            Endpoint::GeminiGenerate => "gemini_generate",
            Endpoint::Realtime => "realtime",
            Endpoint::Images => "images",
            Endpoint::Audio => "audio",
            Endpoint::Models => "models",
            Endpoint::OtherV1 => "other_v1",
            Endpoint::Unknown => "unknown",
        }
    }

    /// Whether the endpoint streams generated text whose usage the provider reports only
    /// when asked (`stream_options.include_usage`).
    pub fn takes_stream_options(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }

    /// The wire format the client speaks on this endpoint.
    pub fn wire(self) -> Wire {
        match self {
            Endpoint::Messages | Endpoint::CountTokens => Wire::Anthropic,
            Endpoint::GeminiGenerate => Wire::Gemini,
            _ => Wire::OpenAi,
        }
    }

    /// Whether a channel serving `wire` can answer this endpoint: natively, or through
    /// translation (chat ↔ Anthropic messages ↔ Gemini generateContent). Anthropic's
    /// `count_tokens` has no translation; OpenAI's other endpoints (embeddings, images,
    /// audio, files, ...) exist only on OpenAI-format channels.
    pub fn served_by(self, wire: Wire) -> bool {
        match (self, wire) {
            (Endpoint::Chat, _) => true,
            (Endpoint::Messages, Wire::OpenAi | Wire::Anthropic) => true,
            (Endpoint::CountTokens, Wire::Anthropic) => true,
            (Endpoint::GeminiGenerate, Wire::Gemini) => true,
            (Endpoint::Messages | Endpoint::CountTokens | Endpoint::GeminiGenerate, _) => false,
            (_, wire) => wire == Wire::OpenAi,
        }
    }
}

/// The model named by a Gemini native path, `/v1beta/models/{model}:generateContent` or
/// `…:streamGenerateContent`, with whether it streams.
pub fn gemini_model(path: &str) -> Option<(&str, bool)> {
    let rest = path.strip_prefix("/v1beta/models/")?;
    let (model, method) = rest.rsplit_once(':')?;
    let stream = match method {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return None,
    };
    (!model.is_empty() && !model.contains('/')).then_some((model, stream))
}

/// Usage as the provider reported it, filled by the `usage` filter while the body passes.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageReport {
    /// The last usage reported (cumulative reports: the last wins).
    pub usage: Option<Usage>,
    /// Bytes of generated text seen (for an estimate when usage never comes).
    pub text_bytes: u64,
    /// The provider sent an error event mid-stream.
    pub saw_error: bool,
    /// Seconds of audio the provider reported transcribing.
    pub audio_seconds: Option<u64>,
}

/// Why a settlement had to estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateReason {
    /// The upstream broke off the response.
    Cut,
    /// The client left and draining for the usage hit its time or byte limit.
    DrainLimit,
    /// The response ended normally without usage.
    NoUsage,
}

impl EstimateReason {
    pub fn label(self) -> &'static str {
        match self {
            EstimateReason::Cut => "cut",
            EstimateReason::DrainLimit => "drain_limit",
            EstimateReason::NoUsage => "no_usage",
        }
    }
}

/// What a request used, decided once when the exchange ends. Billing charges it and limits
/// count it, so the two always agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settlement {
    /// Reported usage, or an estimate (then `usage.estimated` is set and `estimated` says
    /// why), or zero when nothing was served.
    pub usage: Usage,
    pub estimated: Option<EstimateReason>,
    /// A 2xx response was relayed: the provider did work for this request.
    pub served: bool,
}

impl Settlement {
    pub fn tokens(&self) -> u64 {
        self.usage
            .prompt_tokens
            .saturating_add(self.usage.completion_tokens)
    }
}

/// How the exchange ended, filled by the relay.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The status sent to the client (0 if nothing was sent).
    pub status: u16,
    /// The channel that served the response (an index into the channel table).
    pub channel: Option<usize>,
    /// Upstream attempts made, including failed ones.
    pub attempts: u32,
    /// Time from the first upstream byte being requested to the response header.
    pub upstream_header_time: Option<Duration>,
    /// All the time spent waiting on providers: every attempt's exchange up to its response
    /// head, plus reading the committed response's body. The request's total less this is
    /// the time spent inside tollgate (`tollgate_gateway_overhead_seconds`).
    pub upstream_time: Duration,
    /// Time to the first body byte sent to the client.
    pub first_byte: Option<Duration>,
    pub error: Option<GatewayError>,
    /// The client went away before the response was complete.
    pub client_gone: bool,
    /// The upstream broke off the response body.
    pub upstream_cut: bool,
    /// Draining for usage after the client left stopped at its time or byte limit.
    pub drain_limited: bool,
}

/// Headers filters add to whatever response the client gets. A filter sets its own names;
/// setting a name again replaces that filter's earlier value, never another's header.
#[derive(Debug, Clone, Default)]
pub struct ResponseHeaders(Vec<(&'static str, String)>);

impl ResponseHeaders {
    /// `name` is a lower-case constant (it becomes a header name without being parsed).
    pub fn set(&mut self, name: &'static str, value: String) {
        debug_assert!(
            http::HeaderName::from_bytes(name.as_bytes()).is_ok_and(|n| n.as_str() == name),
            "`{name}` is not a lower-case header name"
        );
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.0.iter().map(|(n, v)| (*n, v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A request answered from the response cache instead of a provider. Written by `cache`
/// in `on_request_body`; the service writes `body` instead of forwarding, billing prices
/// `usage` by `bill_ppm`, and the settlement takes `usage` as reported.
#[derive(Debug, Clone)]
pub struct CacheHit {
    /// `application/json` or `text/event-stream`: the form the client asked for.
    pub content_type: &'static str,
    /// The answer, already in that form.
    pub body: Vec<bytes::Bytes>,
    /// The usage the original answer reported.
    pub usage: Usage,
    /// The share of the full price charged, in parts per million (0: free).
    pub bill_ppm: u64,
}

/// One request's state. Created when the request head arrives, dropped after `logging`.
pub struct Ctx {
    /// tollgate's own id: returned as `x-request-id` and the ledger's key.
    pub request_id: String,
    pub started: Instant,
    pub client_ip: Option<IpAddr>,
    /// Written by the service: the request path, and the endpoint it names.
    pub path: String,
    pub endpoint: Endpoint,
    /// Written by `auth`.
    pub key: Option<Arc<KeyRecord>>,
    /// Written by the service after the one body parse.
    pub facts: Option<RequestFacts>,
    /// Written by the service: the request body as the client sent it (empty without one).
    pub body: bytes::Bytes,
    /// Written by `cache`: the request is answered from the response cache.
    pub cache_hit: Option<CacheHit>,
    /// Written by `route`: the upstream attempts, in order.
    pub plan: Vec<PlannedAttempt>,
    /// Written by the relay when it commits to a channel: the model name sent upstream,
    /// when `model_map` renamed it.
    pub upstream_model: Option<String>,
    /// Written by the relay when it commits to a channel: the wire format of the answer
    /// (the channel's), which `translate` turns into the client's (`endpoint.wire()`).
    pub upstream_wire: Wire,
    /// Written by `usage` from the request: ask the provider for stream usage the client
    /// did not ask for. The relay applies it per channel (`inject_stream_usage`).
    pub inject_stream_usage: bool,
    /// Written by the relay: the committed attempt carried the injected `stream_options`.
    pub stream_usage_injected: bool,
    /// Written by `billing`.
    pub reservation: Option<Reservation>,
    /// Written by `limits`.
    pub limit_hold: Option<LimitHold>,
    /// Written by `queue` per attempt: the channel concurrency slot this request holds.
    pub channel_slot: Option<ChannelSlot>,
    /// Written by `queue`: priority, deadline, time waited, the concurrency place held.
    pub admission: Option<Admission>,
    /// Written by `usage` while the response passes.
    pub usage: UsageReport,
    /// Written once, by [`Ctx::settle`], when the exchange is over.
    pub settlement: Settlement,
    /// Written by `billing` in its `on_done`: nano-USD charged for the settlement (what the
    /// ledger row carries). Metrics and the access log read it; `None` when not billed.
    pub charged_nano: Option<i64>,
    pub response_headers: ResponseHeaders,
    pub outcome: Outcome,
    /// State private to one filter, keyed by its type.
    pub ext: http::Extensions,
}

impl Ctx {
    pub fn new(request_id: String) -> Self {
        Ctx {
            request_id,
            started: Instant::now(),
            client_ip: None,
            path: String::new(),
            endpoint: Endpoint::Unknown,
            key: None,
            facts: None,
            body: bytes::Bytes::new(),
            cache_hit: None,
            plan: Vec::new(),
            upstream_model: None,
            upstream_wire: Wire::OpenAi,
            inject_stream_usage: false,
            stream_usage_injected: false,
            reservation: None,
            limit_hold: None,
            channel_slot: None,
            admission: None,
            usage: UsageReport::default(),
            settlement: Settlement::default(),
            charged_nano: None,
            response_headers: ResponseHeaders::default(),
            outcome: Outcome::default(),
            ext: http::Extensions::new(),
        }
    }

    /// The model the client asked for, if the body has been read.
    pub fn model(&self) -> Option<&str> {
        self.facts.as_ref().map(|f| f.model.as_str())
    }

    /// Decides what the request used, once, from what the provider reported and how the
    /// exchange ended. A usage object with nothing in it (an endpoint whose counts are not
    /// known) counts as no usage. A relayed 2xx without usage is estimated: the prompt
    /// estimate plus text bytes / 4, never above the request's own output cap.
    pub fn settle(&mut self) {
        let served = (200..300).contains(&self.outcome.status);
        if self.endpoint == Endpoint::CountTokens {
            // Counting a prompt's tokens generates nothing and providers charge nothing
            // for it: its answer (`{"input_tokens": n}`) is the count, not usage.
            self.settlement = Settlement {
                served,
                ..Settlement::default()
            };
            return;
        }
        let reported = self
            .usage
            .usage
            .filter(|u| u.prompt_tokens > 0 || u.completion_tokens > 0);
        self.settlement = match (reported, served, &self.facts) {
            (Some(u), _, _) => Settlement {
                usage: Usage {
                    estimated: false,
                    ..u
                },
                estimated: None,
                served,
            },
            (None, true, Some(f)) => Settlement {
                usage: Usage {
                    prompt_tokens: f.prompt_tokens_estimate,
                    completion_tokens: estimate_completion(
                        self.usage.text_bytes,
                        f.output_cap(),
                        f.choices,
                    ),
                    cached_tokens: 0,
                    cache_write_tokens: 0,
                    audio_prompt_tokens: 0,
                    audio_completion_tokens: 0,
                    estimated: true,
                },
                estimated: Some(if self.outcome.drain_limited {
                    EstimateReason::DrainLimit
                } else if self.outcome.upstream_cut {
                    EstimateReason::Cut
                } else {
                    EstimateReason::NoUsage
                }),
                served,
            },
            _ => Settlement {
                served,
                ..Settlement::default()
            },
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_with(status: u16, usage: Option<Usage>, text_bytes: u64) -> Ctx {
        let mut ctx = Ctx::new("r".into());
        ctx.facts = Some(RequestFacts {
            model: "m".into(),
            prompt_tokens_estimate: 10,
            max_output_tokens: Some(100),
            choices: 1,
            ..RequestFacts::default()
        });
        ctx.outcome.status = status;
        ctx.usage.usage = usage;
        ctx.usage.text_bytes = text_bytes;
        ctx
    }

    #[test]
    fn reported_usage_is_settled_as_is() {
        let u = Usage {
            prompt_tokens: 7,
            completion_tokens: 3,
            cached_tokens: 0,
            cache_write_tokens: 0,
            audio_prompt_tokens: 0,
            audio_completion_tokens: 0,
            estimated: false,
        };
        let mut ctx = ctx_with(200, Some(u), 0);
        ctx.settle();
        assert_eq!(ctx.settlement.usage, u);
        assert_eq!(ctx.settlement.estimated, None);
        assert!(ctx.settlement.served);
        assert_eq!(ctx.settlement.tokens(), 10);
    }

    #[test]
    fn a_served_response_without_usage_is_estimated_with_its_reason() {
        let mut ctx = ctx_with(200, None, 41);
        ctx.outcome.upstream_cut = true;
        ctx.settle();
        assert_eq!(ctx.settlement.usage.prompt_tokens, 10);
        assert_eq!(ctx.settlement.usage.completion_tokens, 11);
        assert!(ctx.settlement.usage.estimated);
        assert_eq!(ctx.settlement.estimated, Some(EstimateReason::Cut));
        // A zero usage object is no usage.
        let mut ctx = ctx_with(200, Some(Usage::default()), 4);
        ctx.settle();
        assert_eq!(ctx.settlement.estimated, Some(EstimateReason::NoUsage));
    }

    #[test]
    fn counting_tokens_settles_to_zero() {
        let mut ctx = ctx_with(200, None, 40);
        ctx.endpoint = Endpoint::CountTokens;
        ctx.settle();
        assert_eq!(ctx.settlement.usage, Usage::default());
        assert_eq!(ctx.settlement.estimated, None);
        assert!(ctx.settlement.served);
    }

    #[test]
    fn nothing_served_settles_to_zero() {
        let mut ctx = ctx_with(502, None, 100);
        ctx.settle();
        assert_eq!(ctx.settlement, Settlement::default());
    }

    #[test]
    fn response_headers_are_added_and_a_name_is_replaced_only_by_itself() {
        let mut h = ResponseHeaders::default();
        h.set("x-a", "1".into());
        h.set("x-b", "2".into());
        h.set("x-a", "3".into());
        assert_eq!(h.iter().collect::<Vec<_>>(), [("x-a", "3"), ("x-b", "2")]);
    }

    #[test]
    fn endpoints_and_labels() {
        assert_eq!(Endpoint::of("/v1/chat/completions").label(), "chat");
        assert_eq!(Endpoint::of("/v1/models/gpt").label(), "models");
        assert_eq!(Endpoint::of("/v1/files/x").label(), "other_v1");
        assert_eq!(Endpoint::of("/x").label(), "unknown");
        assert!(Endpoint::Chat.takes_stream_options());
        assert!(!Endpoint::Embeddings.takes_stream_options());
        assert_eq!(Endpoint::of("/v1/messages").label(), "messages");
        assert_eq!(Endpoint::of("/v1/messages").wire(), Wire::Anthropic);
        assert_eq!(
            Endpoint::of("/v1/messages/count_tokens"),
            Endpoint::CountTokens
        );
        assert_eq!(
            Endpoint::of("/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
            Endpoint::GeminiGenerate
        );
        assert_eq!(
            Endpoint::of("/v1beta/models/x:embedContent"),
            Endpoint::Unknown
        );
        assert_eq!(
            gemini_model("/v1beta/models/gemini-2.0-flash:generateContent"),
            Some(("gemini-2.0-flash", false))
        );
        assert_eq!(gemini_model("/v1beta/models/a/b:generateContent"), None);
    }

    #[test]
    fn endpoints_are_served_natively_or_through_translation() {
        use Wire::*;
        assert!(Endpoint::Chat.served_by(Anthropic) && Endpoint::Chat.served_by(Gemini));
        assert!(Endpoint::Messages.served_by(OpenAi) && Endpoint::Messages.served_by(Anthropic));
        assert!(!Endpoint::Messages.served_by(Gemini));
        assert!(Endpoint::CountTokens.served_by(Anthropic));
        assert!(!Endpoint::CountTokens.served_by(OpenAi));
        assert!(Endpoint::Embeddings.served_by(OpenAi));
        assert!(!Endpoint::Embeddings.served_by(Anthropic));
        assert!(!Endpoint::GeminiGenerate.served_by(OpenAi));
        assert!(Endpoint::OtherV1.served_by(OpenAi) && !Endpoint::OtherV1.served_by(Gemini));
    }
}
