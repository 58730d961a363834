//! The one error type a request can end with, and its OpenAI-shaped rendering.
//!
//! Every rejection tollgate makes is a [`GatewayError`]. The service renders it in one place
//! ([`GatewayError::body`] plus [`GatewayError::headers`]), so the status, the `code` the SDKs
//! switch on and the retry hints can never drift apart.

use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;

/// Why a request was refused or failed.
///
/// Messages never carry a provider URL or a provider key: upstream failures are reported by
/// kind only.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("Missing API key. Send it as `Authorization: Bearer sk-tg-...`.")]
    MissingApiKey,
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    #[error("This API key has been revoked.")]
    RevokedApiKey,
    #[error("This API key has expired.")]
    ExpiredApiKey,
    #[error("This API key may not use the model `{}`.", echo_name(.0))]
    ModelNotAllowed(String),
    #[error("The model `{}` has no price configured on this gateway.", echo_name(.0))]
    Unpriced(String),
    #[error("Requests from this address are not allowed for this API key.")]
    IpNotAllowed,
    #[error("The model `{}` does not exist or is not served by this gateway.", echo_name(.0))]
    ModelNotFound(String),
    #[error("Unknown route {0}.")]
    RouteNotFound(String),
    #[error("Method {0} is not allowed on this route.")]
    MethodNotAllowed(String),
    #[error("The request body exceeds the limit of {limit} bytes.")]
    RequestTooLarge { limit: usize },
    #[error("The request body was not received in time.")]
    RequestTimeout,
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("Rate limit reached for {}. Retry after {}ms.", limit.what(), retry_after.as_millis())]
    RateLimited { limit: Limit, retry_after: Duration },
    #[error("Request too large for this key's tokens per minute: limit {limit}, requested {requested}. Lower max_tokens or the prompt.")]
    OverTokenLimit { limit: u32, requested: u64 },
    #[error("You exceeded your current quota: the account balance does not cover this request.")]
    InsufficientQuota,
    /// Also OpenAI's `insufficient_quota`; a variant of its own so the two refusals are
    /// counted apart (`tollgate_ratelimited_total{reason="budget"}`).
    #[error("This API key has reached its budget.")]
    KeyBudgetExceeded,
    #[error("The upstream provider is rate limiting this gateway. Retry later.")]
    UpstreamRateLimited { retry_after: Option<Duration> },
    #[error("The upstream provider failed to answer ({0}).")]
    UpstreamFailed(&'static str),
    #[error("The upstream provider did not answer in time.")]
    UpstreamTimeout,
    #[error("No upstream channel is available for this model right now.")]
    NoChannelAvailable,
    #[error("The gateway is shutting down.")]
    ShuttingDown,
    #[error("The gateway's usage ledger is behind; retry shortly.")]
    LedgerBacklogged,
    /// The shared limits (Redis) cannot be reached and `redis.on_error` is `deny`.
    #[error("The gateway cannot check its shared rate limits right now; retry shortly.")]
    LimitsUnavailable,
    #[error("Internal gateway error.")]
    Internal,
    /// The request waited in the admission queue until its deadline.
    #[error("The request waited {}ms in the queue for {what} and reached its deadline. Retry after {}ms.", waited.as_millis(), retry_after.as_millis())]
    QueueTimeout {
        what: &'static str,
        waited: Duration,
        retry_after: Duration,
    },
    /// The admission queue for this model's channels is at `queue.max_depth`.
    #[error("The queue for this model is full ({depth} waiting). Retry after {}ms.", retry_after.as_millis())]
    QueueFull { depth: usize, retry_after: Duration },
    /// The client closed its connection before an answer (nothing is written).
    #[error("The client closed the connection.")]
    ClientGone,
}

/// Which limit refused a request: a per-minute dimension in the scope that was tightest,
/// a concurrency cap, or the per-address guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    RequestsPerMinute(LimitScope),
    TokensPerMinute(LimitScope),
    ImagesPerMinute(LimitScope),
    AudioSecondsPerMinute(LimitScope),
    Concurrency,
    /// The pre-auth guard: too many failed authentications from one address.
    FailedAuthPerAddress,
}

/// Where a per-minute limit is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitScope {
    Key,
    Account,
    Model,
    KeyModel,
}

impl Limit {
    /// The words the error message uses.
    pub fn what(self) -> &'static str {
        use Limit::*;
        use LimitScope::*;
        match self {
            RequestsPerMinute(Key) => "requests per minute",
            RequestsPerMinute(Account) => "requests per minute on this account",
            RequestsPerMinute(Model) => "requests per minute on this model",
            RequestsPerMinute(KeyModel) => "requests per minute for this key on this model",
            TokensPerMinute(Key) => "tokens per minute",
            TokensPerMinute(Account) => "tokens per minute on this account",
            TokensPerMinute(Model) => "tokens per minute on this model",
            TokensPerMinute(KeyModel) => "tokens per minute for this key on this model",
            ImagesPerMinute(Key) => "images per minute",
            ImagesPerMinute(Account) => "images per minute on this account",
            ImagesPerMinute(Model) => "images per minute on this model",
            ImagesPerMinute(KeyModel) => "images per minute for this key on this model",
            AudioSecondsPerMinute(Key) => "audio seconds per minute",
            AudioSecondsPerMinute(Account) => "audio seconds per minute on this account",
            AudioSecondsPerMinute(Model) => "audio seconds per minute on this model",
            AudioSecondsPerMinute(KeyModel) => {
                "audio seconds per minute for this key on this model"
            }
            Concurrency => "concurrent requests",
            FailedAuthPerAddress => "failed authentications from this address",
        }
    }
}

/// Most characters of a client-supplied name (a model) echoed back in an error message.
pub const MAX_ECHOED_NAME_CHARS: usize = 64;

/// `name`, cut to [`MAX_ECHOED_NAME_CHARS`] characters (on a char boundary) with `…` after
/// it when cut: an error never reflects an unbounded client string back.
pub fn echo_name(name: &str) -> std::borrow::Cow<'_, str> {
    match name.char_indices().nth(MAX_ECHOED_NAME_CHARS) {
        None => std::borrow::Cow::Borrowed(name),
        Some((cut, _)) => std::borrow::Cow::Owned(format!("{}…", &name[..cut])),
    }
}

/// The JSON body, exactly `{"error": {"message", "type", "param", "code"}}`.
#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`: the one place it
/// is serialized, for the gateway's own errors, rebuilt provider errors and the admin API.
pub fn error_json(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Bytes {
    let envelope = Envelope {
        error: Body {
            message,
            kind,
            param,
            code,
        },
    };
    // Serializing plain strings into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
}

impl GatewayError {
    /// Shorthand for a 400 with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            MissingApiKey | InvalidApiKey | RevokedApiKey | ExpiredApiKey => 401,
            ModelNotAllowed(_) | IpNotAllowed | Unpriced(_) => 403,
            ModelNotFound(_) | RouteNotFound(_) => 404,
            MethodNotAllowed(_) => 405,
            RequestTooLarge { .. } => 413,
            RequestTimeout => 408,
            InvalidRequest { .. } => 400,
            RateLimited { .. } | InsufficientQuota | KeyBudgetExceeded | OverTokenLimit { .. } => {
                429
            }
            QueueTimeout { .. } | QueueFull { .. } => 429,
            ClientGone => 499,
            UpstreamRateLimited { .. } => 429,
            UpstreamFailed(_) => 502,
            NoChannelAvailable | ShuttingDown | LedgerBacklogged | LimitsUnavailable => 503,
            UpstreamTimeout => 504,
            Internal => 500,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        use GatewayError::*;
        match self {
            MissingApiKey | InvalidApiKey | RevokedApiKey | ExpiredApiKey => {
                "invalid_request_error"
            }
            ModelNotAllowed(_) | IpNotAllowed | Unpriced(_) => "permission_error",
            ModelNotFound(_) | RouteNotFound(_) | MethodNotAllowed(_) => "invalid_request_error",
            RequestTooLarge { .. } | InvalidRequest { .. } | RequestTimeout => {
                "invalid_request_error"
            }
            RateLimited {
                limit: Limit::TokensPerMinute(_),
                ..
            } => "tokens",
            OverTokenLimit { .. } => "tokens",
            RateLimited { .. } | UpstreamRateLimited { .. } => "requests",
            QueueTimeout { .. } | QueueFull { .. } => "requests",
            ClientGone => "invalid_request_error",
            InsufficientQuota | KeyBudgetExceeded => "insufficient_quota",
            UpstreamFailed(_) | UpstreamTimeout | NoChannelAvailable | ShuttingDown => {
                "upstream_error"
            }
            LedgerBacklogged | LimitsUnavailable => "server_error",
            Internal => "server_error",
        }
    }

    /// OpenAI's `error.code`: the field the SDKs and users switch on.
    pub fn code(&self) -> Option<&'static str> {
        use GatewayError::*;
        Some(match self {
            MissingApiKey | InvalidApiKey | RevokedApiKey | ExpiredApiKey => "invalid_api_key",
            ModelNotAllowed(_) => "model_not_allowed",
            IpNotAllowed => "ip_not_allowed",
            Unpriced(_) => "model_not_priced",
            ModelNotFound(_) => "model_not_found",
            RouteNotFound(_) => "unknown_url",
            MethodNotAllowed(_) => "method_not_allowed",
            RequestTooLarge { .. } => "request_too_large",
            RequestTimeout => "request_timeout",
            InvalidRequest { .. } => "invalid_request_error",
            RateLimited { .. } | UpstreamRateLimited { .. } | OverTokenLimit { .. } => {
                "rate_limit_exceeded"
            }
            InsufficientQuota | KeyBudgetExceeded => "insufficient_quota",
            UpstreamFailed(_) => "upstream_error",
            UpstreamTimeout => "upstream_timeout",
            NoChannelAvailable => "no_channel_available",
            ShuttingDown => "shutting_down",
            LedgerBacklogged => "ledger_backlogged",
            LimitsUnavailable => "limits_unavailable",
            Internal => "internal_error",
            QueueTimeout { .. } => "queue_timeout",
            QueueFull { .. } => "queue_full",
            ClientGone => "client_closed_request",
        })
    }

    pub fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::InvalidRequest { param, .. } => *param,
            GatewayError::ModelNotFound(_)
            | GatewayError::ModelNotAllowed(_)
            | GatewayError::Unpriced(_) => Some("model"),
            _ => None,
        }
    }

    /// Why tollgate refused the request under a limit of its own, as the low-cardinality
    /// `reason` of `tollgate_ratelimited_total`: `rpm`, `tpm`, `concurrency`, `ip`, `quota`
    /// (the account balance) or `budget` (the key's). `None` for every other error,
    /// including a provider's own 429.
    pub fn limit_reason(&self) -> Option<&'static str> {
        use GatewayError::*;
        Some(match self {
            RateLimited { limit, .. } => match limit {
                Limit::RequestsPerMinute(_) => "rpm",
                Limit::TokensPerMinute(_) => "tpm",
                Limit::ImagesPerMinute(_) => "images",
                Limit::AudioSecondsPerMinute(_) => "audio",
                Limit::Concurrency => "concurrency",
                Limit::FailedAuthPerAddress => "ip",
            },
            QueueTimeout { .. } => "queue_timeout",
            QueueFull { .. } => "queue_full",
            OverTokenLimit { .. } => "tpm",
            InsufficientQuota => "quota",
            KeyBudgetExceeded => "budget",
            _ => return None,
        })
    }

    /// Every value [`GatewayError::limit_reason`] can return.
    pub const LIMIT_REASONS: [&'static str; 10] = [
        "rpm",
        "tpm",
        "images",
        "audio",
        "concurrency",
        "ip",
        "quota",
        "budget",
        "queue_timeout",
        "queue_full",
    ];

    /// How long a client should wait before retrying, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GatewayError::RateLimited { retry_after, .. } => Some(*retry_after),
            GatewayError::UpstreamRateLimited { retry_after } => *retry_after,
            GatewayError::QueueTimeout { retry_after, .. }
            | GatewayError::QueueFull { retry_after, .. } => Some(*retry_after),
            GatewayError::NoChannelAvailable
            | GatewayError::LedgerBacklogged
            | GatewayError::LimitsUnavailable => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// `x-should-retry`: the SDKs obey it above everything else. `false` where a retry can
    /// never succeed, so clients do not hammer the gateway.
    pub fn should_retry(&self) -> Option<bool> {
        use GatewayError::*;
        match self {
            InvalidApiKey | RevokedApiKey | ExpiredApiKey | MissingApiKey => Some(false),
            ModelNotAllowed(_) | IpNotAllowed | Unpriced(_) => Some(false),
            InsufficientQuota | KeyBudgetExceeded => Some(false),
            OverTokenLimit { .. } => Some(false),
            RequestTooLarge { .. } | InvalidRequest { .. } | ModelNotFound(_) => Some(false),
            RateLimited { .. } | UpstreamRateLimited { .. } | LedgerBacklogged => Some(true),
            LimitsUnavailable => Some(true),
            QueueTimeout { .. } | QueueFull { .. } => Some(true),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        error_json(&self.to_string(), self.kind(), self.param(), self.code())
    }

    /// Headers that go with the body (besides `content-type` and `content-length`).
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::with_capacity(3);
        if let Some(wait) = self.retry_after() {
            // Retry-After takes whole seconds; round up so a client never comes back early.
            let secs = wait.as_millis().div_ceil(1000).max(1);
            out.push(("retry-after", secs.to_string()));
            out.push(("retry-after-ms", wait.as_millis().max(1).to_string()));
        }
        if let Some(retry) = self.should_retry() {
            out.push(("x-should-retry", retry.to_string()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(e: &GatewayError) -> serde_json::Value {
        serde_json::from_slice(&e.body()).unwrap()
    }

    #[test]
    fn body_has_openai_shape_with_null_param() {
        let v = json(&GatewayError::InvalidApiKey);
        let err = &v["error"];
        assert_eq!(err["code"], "invalid_api_key");
        assert_eq!(err["type"], "invalid_request_error");
        assert!(err["param"].is_null());
        assert!(err["message"]
            .as_str()
            .unwrap()
            .contains("Incorrect API key"));
        assert_eq!(v.as_object().unwrap().len(), 1);
        assert_eq!(err.as_object().unwrap().len(), 4);
    }

    #[test]
    fn statuses_and_codes_follow_the_contract() {
        let cases = [
            (GatewayError::InvalidApiKey, 401, "invalid_api_key"),
            (
                GatewayError::ModelNotAllowed("m".into()),
                403,
                "model_not_allowed",
            ),
            (GatewayError::IpNotAllowed, 403, "ip_not_allowed"),
            (
                GatewayError::ModelNotFound("m".into()),
                404,
                "model_not_found",
            ),
            (
                GatewayError::RequestTooLarge { limit: 1 },
                413,
                "request_too_large",
            ),
            (GatewayError::invalid("bad"), 400, "invalid_request_error"),
            (GatewayError::InsufficientQuota, 429, "insufficient_quota"),
            (GatewayError::UpstreamFailed("x"), 502, "upstream_error"),
            (
                GatewayError::NoChannelAvailable,
                503,
                "no_channel_available",
            ),
            (GatewayError::UpstreamTimeout, 504, "upstream_timeout"),
            (GatewayError::LedgerBacklogged, 503, "ledger_backlogged"),
        ];
        for (e, status, code) in cases {
            assert_eq!(e.status(), status, "{e:?}");
            assert_eq!(e.code(), Some(code), "{e:?}");
        }
    }

    #[test]
    fn rate_limit_carries_retry_after_rounded_up() {
        let e = GatewayError::RateLimited {
            limit: Limit::RequestsPerMinute(LimitScope::Key),
            retry_after: Duration::from_millis(1200),
        };
        let h = e.headers();
        assert!(h.contains(&("retry-after", "2".to_string())));
        assert!(h.contains(&("retry-after-ms", "1200".to_string())));
        assert!(h.contains(&("x-should-retry", "true".to_string())));
    }

    #[test]
    fn model_errors_never_echo_more_than_64_chars_of_the_name() {
        let long = "é".repeat(10_000);
        for e in [
            GatewayError::ModelNotFound(long.clone()),
            GatewayError::ModelNotAllowed(long.clone()),
            GatewayError::Unpriced(long.clone()),
        ] {
            let v = json(&e);
            let msg = v["error"]["message"].as_str().unwrap();
            let shown = format!("{}…", "é".repeat(MAX_ECHOED_NAME_CHARS));
            assert!(msg.contains(&shown), "{msg}");
            assert!(msg.chars().count() < MAX_ECHOED_NAME_CHARS + 80, "{msg}");
        }
        // Short names are shown whole.
        assert!(GatewayError::ModelNotFound("gpt-4o".into())
            .to_string()
            .contains("`gpt-4o`"));
    }

    #[test]
    fn each_refusal_under_a_limit_has_one_reason_and_other_errors_none() {
        let limited = |limit| GatewayError::RateLimited {
            limit,
            retry_after: Duration::from_secs(1),
        };
        let cases = [
            (limited(Limit::RequestsPerMinute(LimitScope::Key)), "rpm"),
            (limited(Limit::TokensPerMinute(LimitScope::Account)), "tpm"),
            (limited(Limit::Concurrency), "concurrency"),
            (limited(Limit::FailedAuthPerAddress), "ip"),
            (
                GatewayError::OverTokenLimit {
                    limit: 1,
                    requested: 2,
                },
                "tpm",
            ),
            (GatewayError::InsufficientQuota, "quota"),
            (GatewayError::KeyBudgetExceeded, "budget"),
        ];
        for (e, reason) in cases {
            assert_eq!(e.limit_reason(), Some(reason), "{e:?}");
            assert!(GatewayError::LIMIT_REASONS.contains(&reason));
        }
        // Budget and balance refusals keep OpenAI's code, which the SDKs map.
        assert_eq!(
            GatewayError::KeyBudgetExceeded.code(),
            Some("insufficient_quota")
        );
        assert_eq!(
            limited(Limit::TokensPerMinute(LimitScope::Model)).kind(),
            "tokens"
        );
        assert_eq!(
            GatewayError::UpstreamRateLimited { retry_after: None }.limit_reason(),
            None
        );
        assert_eq!(GatewayError::InvalidApiKey.limit_reason(), None);
    }

    #[test]
    fn hopeless_errors_tell_sdks_not_to_retry() {
        for e in [
            GatewayError::InsufficientQuota,
            GatewayError::KeyBudgetExceeded,
            GatewayError::RevokedApiKey,
            GatewayError::ModelNotAllowed("m".into()),
        ] {
            assert!(e
                .headers()
                .contains(&("x-should-retry", "false".to_string())));
        }
    }
}
