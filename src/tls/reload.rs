//! Certificates that change without a restart: each listener's rustls config asks a
//! [`LiveCert`] for its certificate on every handshake, and a background task swaps in a
//! new one when the files change (polled) or on `SIGHUP`. A new pair that fails the checks
//! of [`super::cert::load`] is refused with an error in the log; the old one keeps serving.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, ResolvesServerCert};

use super::cert;
use super::TlsConfig;

/// The certificate a listener serves now; swapped whole, read once per handshake.
#[derive(Debug)]
pub struct LiveCert {
    current: ArcSwap<CertifiedKey>,
}

impl LiveCert {
    pub fn new(key: Arc<CertifiedKey>) -> LiveCert {
        LiveCert {
            current: ArcSwap::new(key),
        }
    }

    pub fn swap(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// One listener's files and the certificate they feed.
pub struct Watched {
    /// The config path, `server.tls` or `server.admin_tls`, for the log.
    pub field: &'static str,
    pub cfg: TlsConfig,
    pub live: Arc<LiveCert>,
    /// The bytes last looked at (served or refused), so an unchanged pair is not reloaded
    /// and a refused one is not reported again until it changes.
    pub seen: Vec<u8>,
}

impl Watched {
    /// Reloads when the files differ from what was last seen. Returns whether a new
    /// certificate went live.
    pub fn check(&mut self) -> bool {
        let (cert_pem, key_pem) = match cert::read_pair(&self.cfg, self.field) {
            Ok(pair) => pair,
            Err(e) => {
                // A file being replaced can be missing for a moment; say so once per change.
                if !self.seen.is_empty() {
                    tracing::error!(field = %e.path, error = %e.message, "TLS reload: cannot read the files; still serving the previous certificate");
                    self.seen.clear();
                }
                return false;
            }
        };
        let mut fingerprint = cert_pem.clone();
        fingerprint.extend_from_slice(&key_pem);
        if fingerprint == self.seen {
            return false;
        }
        self.seen = fingerprint;
        match cert::from_pem(&cert_pem, &key_pem, self.field, SystemTime::now()) {
            Ok(loaded) => {
                self.live.swap(loaded.key);
                tracing::info!(
                    field = self.field,
                    not_after = loaded.not_after,
                    "TLS reload: new certificate serving"
                );
                true
            }
            Err(e) => {
                tracing::error!(field = %e.path, error = %e.message, "TLS reload: new certificate refused; still serving the previous one");
                false
            }
        }
    }
}

/// The background task: polls every `interval` (when set) and reloads on `SIGHUP`.
pub struct CertReloader {
    pub watched: std::sync::Mutex<Vec<Watched>>,
    pub interval: Option<Duration>,
}

impl CertReloader {
    fn check_all(&self) {
        for w in self
            .watched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
        {
            w.check();
        }
    }
}

#[async_trait]
impl BackgroundService for CertReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload by polling only");
                None
            }
        };
        let mut tick = self.interval.map(|every| {
            let mut t = tokio::time::interval(every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async { hup.as_mut()?.recv().await } => {
                    tracing::info!("SIGHUP: checking the TLS certificates");
                    self.check_all();
                }
                _ = async { tick.as_mut().expect("guarded").tick().await }, if tick.is_some() => {
                    self.check_all();
                }
            }
        }
    }
}
