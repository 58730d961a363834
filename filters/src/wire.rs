//! The wire formats tollgate speaks, to clients and to providers.
//!
//! A client's format follows from its route (`/v1/messages` is Anthropic's Messages API,
//! `/v1beta/models/{model}:generateContent` Gemini's, everything else under `/v1/` OpenAI's);
//! a provider's from its channel's `kind`. When the two differ the request and its answer
//! are translated ([`crate::translate`]); errors always reach the client in its own format.

use bytes::Bytes;
use serde_json::json;

use crate::error::error_json;

/// The wire format a client speaks or a channel serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Wire {
    /// OpenAI's API (chat completions, embeddings, ...), also Azure's and every
    /// OpenAI-compatible provider's.
    #[default]
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
    /// Gemini's native `generateContent` API.
    Gemini,
}

impl Wire {
    pub fn label(self) -> &'static str {
        match self {
            Wire::OpenAi => "openai",
            Wire::Anthropic => "anthropic",
            Wire::Gemini => "gemini",
        }
    }

    /// An error body in this format, from the parts of an OpenAI error (`kind` is OpenAI's
    /// `type`), for a response with `status`.
    pub fn error_body(
        self,
        status: u16,
        message: &str,
        kind: &str,
        param: Option<&str>,
        code: Option<&str>,
    ) -> Bytes {
        match self {
            Wire::OpenAi => error_json(message, kind, param, code),
            // `{"type":"error","error":{"type","message"}}`, typed by status as Anthropic
            // types its own errors (its SDKs pick the exception class by status).
            Wire::Anthropic => {
                let body = json!({
                    "type": "error",
                    "error": {"type": anthropic_error_type(status), "message": message},
                });
                Bytes::from(body.to_string())
            }
            // Google's `{"error":{"code","message","status"}}`.
            Wire::Gemini => {
                let body = json!({
                    "error": {"code": status, "message": message, "status": google_status(status)},
                });
                Bytes::from(body.to_string())
            }
        }
    }

    /// An OpenAI-shaped error body (as tollgate renders its own and rebuilds providers')
    /// re-expressed in this format.
    pub fn reshape_error(self, status: u16, openai_body: Bytes) -> Bytes {
        if self == Wire::OpenAi {
            return openai_body;
        }
        let v: serde_json::Value = serde_json::from_slice(&openai_body).unwrap_or_default();
        let e = &v["error"];
        let message = e["message"].as_str().unwrap_or("error");
        let kind = e["type"].as_str().unwrap_or("api_error");
        self.error_body(
            status,
            message,
            kind,
            e["param"].as_str(),
            e["code"].as_str(),
        )
    }
}

/// Anthropic's error `type` for a status.
fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Google's canonical status name for an HTTP status.
fn google_status(status: u16) -> &'static str {
    match status {
        400 | 405 | 413 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        402 | 429 => "RESOURCE_EXHAUSTED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        408 | 504 => "DEADLINE_EXCEEDED",
        409 => "ABORTED",
        503 => "UNAVAILABLE",
        400..=499 => "FAILED_PRECONDITION",
        _ => "INTERNAL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(b: Bytes) -> serde_json::Value {
        serde_json::from_slice(&b).unwrap()
    }

    #[test]
    fn errors_take_each_clients_shape() {
        let openai = error_json(
            "Incorrect API key.",
            "invalid_request_error",
            None,
            Some("x"),
        );
        assert_eq!(Wire::OpenAi.reshape_error(401, openai.clone()), openai);
        assert_eq!(
            parse(Wire::Anthropic.reshape_error(401, openai.clone())),
            json!({"type":"error","error":{"type":"authentication_error","message":"Incorrect API key."}})
        );
        assert_eq!(
            parse(Wire::Gemini.reshape_error(429, openai)),
            json!({"error":{"code":429,"message":"Incorrect API key.","status":"RESOURCE_EXHAUSTED"}})
        );
        for (status, kind) in [
            (400, "invalid_request_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
        ] {
            let b = parse(Wire::Anthropic.error_body(status, "m", "x", None, None));
            assert_eq!(b["error"]["type"], kind, "status {status}");
            assert_eq!(b["type"], "error");
        }
    }
}
