//! TLS on the listeners and the HTTP/2 limits for clients.
//!
//! Each TLS listener gets a rustls config from Pingora's [`TlsSettings`] with tollgate's own
//! certificate resolver ([`reload::LiveCert`]), so certificates are swapped while the
//! listener runs. TLS 1.2 and 1.3 only (Pingora's rustls listener allows nothing older),
//! with rustls' `ring` suites: AES-GCM and ChaCha20-Poly1305 with ECDHE, nothing else.
//! The main listener offers ALPN `h2` and `http/1.1`; the admin listener HTTP/1.1 only.

pub mod cert;
pub mod reload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pingora::listeners::tls::TlsSettings;
use pingora::protocols::http::v2::server::H2Options;
use pingora::tls::WebPkiClientVerifier;
use serde::Deserialize;

use crate::config::ConfigError;
use reload::{CertReloader, LiveCert, Watched};

/// `server.tls` / `server.admin_tls`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it signed (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// How often the files are checked for a change, in seconds; 0 reloads on SIGHUP only.
    #[serde(default = "d_reload")]
    pub reload_interval_s: u64,
}

fn d_reload() -> u64 {
    5
}

/// `server.h2`: limits for HTTP/2 client connections (over TLS, or h2c).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct H2Limits {
    /// Streams (requests) one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Largest decoded header list one request may carry, in bytes.
    pub max_header_list_bytes: u32,
}

impl Default for H2Limits {
    fn default() -> Self {
        H2Limits {
            max_concurrent_streams: 100,
            max_header_list_bytes: crate::service::MAX_REQUEST_HEAD_BYTES as u32,
        }
    }
}

impl H2Limits {
    /// The options Pingora hands to the h2 server handshake.
    pub fn options(&self) -> H2Options {
        let mut o = pingora::protocols::http::v2::server::default_h2_options();
        o.max_concurrent_streams(self.max_concurrent_streams);
        o.max_header_list_size(self.max_header_list_bytes);
        o
    }
}

/// One listener's TLS, ready for Pingora, and what keeps its certificate current.
pub struct ListenerTls {
    pub settings: TlsSettings,
    pub watched: Watched,
}

/// Builds a listener's TLS from its config; `field` is `server.tls` or `server.admin_tls`.
/// `h2` offers ALPN `h2` before `http/1.1`.
pub fn listener(
    cfg: &TlsConfig,
    field: &'static str,
    h2: bool,
) -> Result<ListenerTls, ConfigError> {
    let loaded = cert::load(cfg, field, SystemTime::now())?;
    let live = Arc::new(LiveCert::new(loaded.key));
    let mut settings = TlsSettings::intermediate("", "").map_err(|e| ConfigError {
        path: field.into(),
        line: None,
        message: e.to_string(),
    })?;
    settings.set_cert_resolver(live.clone());
    if h2 {
        settings.enable_h2();
    }
    if let Some(ca) = &cfg.client_ca {
        let ca_field = format!("{field}.client_ca");
        let roots = cert::load_roots(ca, &ca_field)?;
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), cert::provider())
                .build()
                .map_err(|e| ConfigError {
                    path: ca_field,
                    line: None,
                    message: format!("cannot verify clients with it: {e}"),
                })?;
        settings.set_client_cert_verifier(verifier);
    }
    Ok(ListenerTls {
        settings,
        watched: Watched {
            field,
            cfg: cfg.clone(),
            live,
            seen: loaded.fingerprint,
        },
    })
}

/// The reloader for the TLS listeners, when there are any. It polls at the shortest
/// interval any of them asks for.
pub fn reloader(watched: Vec<Watched>) -> Option<CertReloader> {
    if watched.is_empty() {
        return None;
    }
    let interval = watched
        .iter()
        .map(|w| w.cfg.reload_interval_s)
        .filter(|s| *s > 0)
        .min()
        .map(Duration::from_secs);
    Some(CertReloader {
        watched: std::sync::Mutex::new(watched),
        interval,
    })
}

/// What `check-config` says about the TLS files: every listener's problems, with fields.
pub fn check_files(tls: Option<&TlsConfig>, admin_tls: Option<&TlsConfig>) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (field, cfg) in [("server.tls", tls), ("server.admin_tls", admin_tls)] {
        let Some(cfg) = cfg else { continue };
        if let Err(e) = cert::load(cfg, field, SystemTime::now()) {
            errors.push(e);
        }
        if let Some(ca) = &cfg.client_ca {
            if let Err(e) = cert::load_roots(ca, &format!("{field}.client_ca")) {
                errors.push(e);
            }
        }
    }
    errors
}
