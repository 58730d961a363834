//! A channel's `base_url`, parsed once for the connector.

/// A channel's `base_url`, split for the connector. Holds no credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash, e.g. `` or `/openai`.
    pub base_path: String,
}

impl UpstreamUrl {
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let uri: http::Uri = s.parse().map_err(|_| {
            "is not a valid URL (expected http(s)://host[:port][/path])".to_string()
        })?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("must start with http:// or https://".into()),
        };
        let auth = uri.authority().ok_or("has no host")?;
        if auth.as_str().contains('@') {
            return Err("must not carry credentials; put the key in `api_key`".into());
        }
        let host = auth
            .host()
            .trim_matches(|c| c == '[' || c == ']')
            .to_string();
        if host.is_empty() {
            return Err("has no host".into());
        }
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        let port = auth.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            tls,
            host,
            port,
            base_path,
        })
    }

    /// The upstream path for a client path: a base URL ending in `/v1` (as many
    /// OpenAI-compatible providers document it) does not double the `/v1`.
    pub fn upstream_path(&self, client_path: &str) -> String {
        if self.base_path.ends_with("/v1") {
            if let Some(rest) = client_path.strip_prefix("/v1") {
                return format!("{}{}", self.base_path, rest);
            }
        }
        format!("{}{}", self.base_path, client_path)
    }

    /// The `Host` header value.
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_url_paths_and_host_header() {
        let u = UpstreamUrl::parse("https://api.openai.com").unwrap();
        assert_eq!(
            (u.tls, u.port, u.host_header()),
            (true, 443, "api.openai.com".into())
        );
        assert_eq!(
            u.upstream_path("/v1/chat/completions"),
            "/v1/chat/completions"
        );
        let u = UpstreamUrl::parse("http://127.0.0.1:9000/v1/").unwrap();
        assert_eq!(u.upstream_path("/v1/embeddings"), "/v1/embeddings");
        assert_eq!(u.host_header(), "127.0.0.1:9000");
        let u = UpstreamUrl::parse("https://h.example/openai").unwrap();
        assert_eq!(u.upstream_path("/v1/models"), "/openai/v1/models");
    }
}
