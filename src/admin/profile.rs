//! `GET /debug/pprof/profile`: an on-demand CPU profile of the whole process.

use std::time::Duration;

use http::{Response, StatusCode};
use tollgate_filters::error_json;

use super::{body_response, Admin};
use crate::profiling::{self, ProfileError};

impl Admin {
    /// `GET /debug/pprof/profile?seconds=N[&format=svg][&hz=F]`: a CPU profile of the
    /// whole process, as pprof protobuf (default) or a flamegraph SVG.
    pub(super) async fn profile(
        &self,
        query: &std::collections::HashMap<String, String>,
    ) -> Response<Vec<u8>> {
        let fail = |status: StatusCode, code: &str, msg: &str| {
            body_response(
                status,
                error_json(msg, "invalid_request_error", None, Some(code)).to_vec(),
            )
        };
        let seconds = match query.get("seconds").map(|s| s.parse::<u64>()) {
            None => 30,
            Some(Ok(n)) if (1..=profiling::MAX_PROFILE_S).contains(&n) => n,
            _ => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "`seconds` must be an integer from 1 to 300",
                )
            }
        };
        let hz = match query.get("hz").map(|s| s.parse::<u32>()) {
            None => self.profile_hz,
            Some(Ok(n)) if (1..=1000).contains(&n) => n,
            _ => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "`hz` must be an integer from 1 to 1000",
                )
            }
        };
        let svg = match query.get("format").map(String::as_str) {
            None | Some("pb") | Some("proto") | Some("protobuf") => false,
            Some("svg") | Some("flamegraph") => true,
            Some(_) => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "`format` must be `pb` or `svg`",
                )
            }
        };
        let taken = tokio::task::spawn_blocking(move || {
            let p = profiling::capture(Duration::from_secs(seconds), hz)?;
            if svg {
                p.svg()
            } else {
                p.protobuf()
            }
        })
        .await;
        match taken {
            Ok(Ok(body)) => Response::builder()
                .status(StatusCode::OK)
                .header(
                    http::header::CONTENT_TYPE,
                    if svg {
                        "image/svg+xml"
                    } else {
                        "application/octet-stream"
                    },
                )
                .header(
                    http::header::CONTENT_DISPOSITION,
                    if svg {
                        "inline; filename=\"profile.svg\""
                    } else {
                        "attachment; filename=\"profile.pb\""
                    },
                )
                .header(http::header::CONTENT_LENGTH, body.len())
                .body(body)
                .unwrap_or_default(),
            Ok(Err(ProfileError::Busy)) => fail(
                StatusCode::CONFLICT,
                "profile_in_progress",
                "A CPU profile is already being taken; retry when it is done.",
            ),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "CPU profile failed");
                fail(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    "The CPU profile failed.",
                )
            }
            Err(_) => fail(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "The CPU profile failed.",
            ),
        }
    }
}
