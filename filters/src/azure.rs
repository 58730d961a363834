//! `kind: azure`: how an Azure OpenAI resource is addressed.
//!
//! Azure serves the OpenAI wire format (JSON, SSE, usage) under its own URLs and key header:
//! - `api: deployments` (the default): `/openai/deployments/{deployment}/chat/completions
//!   ?api-version=…`, the deployment chosen by the model sent upstream (after `model_map`)
//!   through `deployments`, a model not listed being its own deployment name; calls that
//!   name no model (`GET /v1/models`, files) go to `/openai/{rest}?api-version=…`;
//! - `api: v1`: the v1 API, `/openai/v1/…`, with the model in the body as on OpenAI.
//!
//! The key goes in `api-key`, never `Authorization`.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `channels[].azure`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    #[serde(default)]
    pub api: AzureApi,
    /// The `api-version` query parameter of deployment URLs (required with
    /// `api: deployments`), e.g. `2024-10-21`.
    #[serde(default)]
    pub api_version: Option<String>,
    /// Model (as sent upstream) → deployment name.
    #[serde(default)]
    pub deployments: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AzureApi {
    #[default]
    Deployments,
    V1,
}

/// A validated `azure:` section, ready to build paths with.
#[derive(Debug, Clone)]
pub struct Azure {
    api: AzureApi,
    /// Already percent-encoded for a query string.
    api_version: String,
    deployments: BTreeMap<String, String>,
}

impl Azure {
    /// Checks the section. An error is (the field under `azure`, what is wrong with it).
    pub fn new(cfg: &AzureConfig) -> Result<Azure, (String, String)> {
        let api_version = match (cfg.api, cfg.api_version.as_deref()) {
            (AzureApi::Deployments, None | Some("")) => {
                return Err((
                    "api_version".into(),
                    "is required with `api: deployments` (for example \"2024-10-21\")".into(),
                ))
            }
            (_, v) => v.unwrap_or_default(),
        };
        if !api_version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err((
                "api_version".into(),
                "may hold only letters, digits, `-` and `.`".into(),
            ));
        }
        if let Some((model, _)) = cfg.deployments.iter().find(|(_, d)| !is_name(d)) {
            return Err((
                format!("deployments.{model}"),
                "a deployment name holds only letters, digits, `-`, `_` and `.`".into(),
            ));
        }
        Ok(Azure {
            api: cfg.api,
            api_version: api_version.to_owned(),
            deployments: cfg.deployments.clone(),
        })
    }

    /// The path and query for a client's `/v1/…` call: `base_path` is the channel's URL path,
    /// `query` the client's own query string, `model` the model sent upstream.
    pub fn target(
        &self,
        base_path: &str,
        client_path: &str,
        query: Option<&str>,
        model: Option<&str>,
    ) -> String {
        let rest = client_path.strip_prefix("/v1").unwrap_or(client_path);
        let mut out = String::with_capacity(base_path.len() + rest.len() + 64);
        out.push_str(base_path);
        match self.api {
            AzureApi::V1 => {
                out.push_str("/openai/v1");
                out.push_str(rest);
                if let Some(q) = query.filter(|q| !q.is_empty()) {
                    out.push('?');
                    out.push_str(q);
                }
                return out;
            }
            AzureApi::Deployments => {}
        }
        out.push_str("/openai");
        if let Some(model) = model {
            let deployment = self.deployments.get(model).map_or(model, String::as_str);
            out.push_str("/deployments/");
            push_segment(&mut out, deployment);
        }
        out.push_str(rest);
        out.push_str("?api-version=");
        out.push_str(&self.api_version);
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            out.push('&');
            out.push_str(q);
        }
        out
    }
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s != "."
        && s != ".."
}

/// A path segment, percent-encoded where it is not a plain name (a model name is only
/// ever one the channel serves, but nothing in it may climb out of the deployment path).
pub(crate) fn push_segment(out: &mut String, s: &str) {
    if is_name(s) {
        out.push_str(s);
        return;
    }
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure(api: AzureApi, version: Option<&str>) -> Result<Azure, (String, String)> {
        Azure::new(&AzureConfig {
            api,
            api_version: version.map(str::to_owned),
            deployments: BTreeMap::from([("gpt-4o".into(), "prod-4o".into())]),
        })
    }

    #[test]
    fn deployment_urls_take_the_mapped_deployment_the_version_and_the_client_query() {
        let a = azure(AzureApi::Deployments, Some("2024-10-21")).unwrap();
        assert_eq!(
            a.target("", "/v1/chat/completions", None, Some("gpt-4o")),
            "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
        );
        // Not listed: the model is its own deployment.
        assert_eq!(
            a.target(
                "/base",
                "/v1/embeddings",
                Some("x=1"),
                Some("text-embedding-3-small")
            ),
            "/base/openai/deployments/text-embedding-3-small/embeddings?api-version=2024-10-21&x=1"
        );
        // No model: the resource-level path.
        assert_eq!(
            a.target("", "/v1/files/file-1", None, None),
            "/openai/files/file-1?api-version=2024-10-21"
        );
        // Nothing in a model name climbs out of the deployment segment.
        assert_eq!(
            a.target("", "/v1/chat/completions", None, Some("../x?y")),
            "/openai/deployments/%2E%2E%2Fx%3Fy/chat/completions?api-version=2024-10-21"
        );
    }

    #[test]
    fn the_v1_api_keeps_openai_paths_under_openai_v1() {
        let a = azure(AzureApi::V1, None).unwrap();
        assert_eq!(
            a.target("", "/v1/chat/completions", Some("a=b"), Some("gpt-4o")),
            "/openai/v1/chat/completions?a=b"
        );
    }

    #[test]
    fn bad_sections_are_refused_with_the_field() {
        let (field, why) = azure(AzureApi::Deployments, None).unwrap_err();
        assert_eq!(field, "api_version");
        assert!(why.contains("is required"));
        let (field, _) = azure(AzureApi::Deployments, Some("2024&x=1")).unwrap_err();
        assert_eq!(field, "api_version");
        let bad = Azure::new(&AzureConfig {
            api: AzureApi::V1,
            api_version: None,
            deployments: BTreeMap::from([("m".into(), "a/b".into())]),
        });
        assert_eq!(bad.unwrap_err().0, "deployments.m");
    }
}
