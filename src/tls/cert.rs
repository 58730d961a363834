//! Reading a listener's certificate chain and key from PEM files, and checking them the
//! way `check-config`, start-up and every reload do: readable, a certificate and a key in
//! them, the key belonging to the certificate, and the certificate valid now.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use pingora::tls::sign::CertifiedKey;
use pingora::tls::{CertificateDer, CryptoProvider, PrivateKeyDer, RootCertStore};
use rustls_pki_types::pem::PemObject;

use super::TlsConfig;
use crate::config::ConfigError;

/// A certificate or key problem, with the field it belongs to (`server.tls.key`, …).
pub type Refused = ConfigError;

fn refused(field: String, message: impl Into<String>) -> Refused {
    ConfigError {
        path: field,
        line: None,
        message: message.into(),
    }
}

/// What was read from the files: the content, for telling a change apart, and the key
/// ready for rustls.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The end-entity certificate's `notAfter`, seconds since the Unix epoch.
    pub not_after: i64,
    /// The two files' bytes, so a poll can tell whether anything changed.
    pub fingerprint: Vec<u8>,
}

/// Reads both files and their fingerprint, without judging them.
pub fn read_pair(cfg: &TlsConfig, field: &str) -> Result<(Vec<u8>, Vec<u8>), Refused> {
    let read = |p: &Path, sub: &str| {
        std::fs::read(p).map_err(|e| {
            refused(
                format!("{field}.{sub}"),
                format!("cannot read `{}`: {e}", p.display()),
            )
        })
    };
    Ok((read(&cfg.cert, "cert")?, read(&cfg.key, "key")?))
}

/// Reads and checks a listener's certificate and key; `field` is its config path
/// (`server.tls`). The key material is never put into an error.
pub fn load(cfg: &TlsConfig, field: &str, now: SystemTime) -> Result<Loaded, Refused> {
    let (cert_pem, key_pem) = read_pair(cfg, field)?;
    let loaded = from_pem(&cert_pem, &key_pem, field, now)?;
    Ok(loaded)
}

/// Checks PEM bytes as [`load`] does.
pub fn from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
    field: &str,
    now: SystemTime,
) -> Result<Loaded, Refused> {
    let cert_field = format!("{field}.cert");
    let key_field = format!("{field}.key");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| refused(cert_field.clone(), format!("is not valid PEM: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(refused(cert_field, "holds no PEM certificate"));
    };
    let (not_before, not_after) = validity(leaf).map_err(|m| refused(cert_field.clone(), m))?;
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if now_s > not_after {
        return Err(refused(
            cert_field,
            format!("expired on {}", rfc3339(not_after)),
        ));
    }
    if now_s < not_before {
        return Err(refused(
            cert_field,
            format!("is not valid before {}", rfc3339(not_before)),
        ));
    }
    // The parser's own error text never quotes the key.
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| refused(key_field.clone(), "holds no readable PEM private key"))?;
    let provider = provider();
    let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
        pingora::tls::RusTlsError::InconsistentKeys(_) => refused(
            key_field.clone(),
            format!("does not match the certificate in {field}.cert"),
        ),
        _ => refused(key_field.clone(), "is not a usable private key"),
    })?;
    let mut fingerprint = cert_pem.to_vec();
    fingerprint.extend_from_slice(key_pem);
    Ok(Loaded {
        key: Arc::new(certified),
        not_after,
        fingerprint,
    })
}

/// Reads a PEM bundle of CA certificates for client-certificate verification.
pub fn load_roots(path: &Path, field: &str) -> Result<RootCertStore, Refused> {
    let pem = std::fs::read(path).map_err(|e| {
        refused(
            field.into(),
            format!("cannot read `{}`: {e}", path.display()),
        )
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| refused(field.into(), format!("is not valid PEM: {e}")))?;
        roots.add(cert).map_err(|e| {
            refused(
                field.into(),
                format!("holds an unusable CA certificate: {e}"),
            )
        })?;
    }
    if roots.is_empty() {
        return Err(refused(field.into(), "holds no PEM certificate"));
    }
    Ok(roots)
}

/// The crypto provider Pingora's listeners use (ring), installed once per process.
pub fn provider() -> Arc<CryptoProvider> {
    pingora::tls::install_default_crypto_provider();
    CryptoProvider::get_default()
        .cloned()
        .expect("installed just above")
}

/// A certificate's validity window, seconds since the Unix epoch.
fn validity(der: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|_| "holds a certificate that cannot be parsed".to_string())?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

fn rfc3339(unix_s: i64) -> String {
    chrono::DateTime::from_timestamp(unix_s, 0)
        .map_or_else(|| unix_s.to_string(), |t| t.to_rfc3339())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair(not_after_days: i64) -> (String, String) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(30);
        params.not_after = now + time::Duration::days(not_after_days);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_matching_pair_loads_and_a_mismatched_key_is_refused_on_the_key_field() {
        let (cert, key) = pair(30);
        let (_, other_key) = pair(30);
        let now = SystemTime::now();
        assert!(from_pem(cert.as_bytes(), key.as_bytes(), "server.tls", now).is_ok());
        let e = from_pem(cert.as_bytes(), other_key.as_bytes(), "server.tls", now)
            .err()
            .unwrap();
        assert_eq!(e.path, "server.tls.key");
        assert!(e.message.contains("does not match"), "{}", e.message);
        assert!(!e.message.contains("PRIVATE KEY"));
    }

    #[test]
    fn an_expired_or_not_yet_valid_certificate_is_refused_on_the_cert_field() {
        let (cert, key) = pair(-1);
        let e = from_pem(
            cert.as_bytes(),
            key.as_bytes(),
            "server.admin_tls",
            SystemTime::now(),
        )
        .err()
        .unwrap();
        assert_eq!(e.path, "server.admin_tls.cert");
        assert!(e.message.starts_with("expired on"), "{}", e.message);
        let (cert, key) = pair(30);
        let past = SystemTime::now() - Duration::from_secs(90 * 86_400);
        let e = from_pem(cert.as_bytes(), key.as_bytes(), "server.tls", past)
            .err()
            .unwrap();
        assert!(
            e.message.starts_with("is not valid before"),
            "{}",
            e.message
        );
    }

    #[test]
    fn files_without_pem_are_refused_with_their_field() {
        let (cert, _) = pair(30);
        let now = SystemTime::now();
        let e = from_pem(b"nothing", b"", "server.tls", now).err().unwrap();
        assert_eq!(e.path, "server.tls.cert");
        let e = from_pem(cert.as_bytes(), b"nothing", "server.tls", now)
            .err()
            .unwrap();
        assert_eq!(e.path, "server.tls.key");
    }
}
