//! How the relay opens connections to a provider: the channel's `http2` mode, the ALPN it
//! offers, and the gate that makes concurrent streams share HTTP/2 connections.

use std::sync::atomic::{AtomicBool, Ordering};

use pingora_core::upstreams::peer::ALPN;
use serde::Deserialize;

/// `channels[].http2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http2Mode {
    #[default]
    Auto,
    On,
    Off,
}

/// What the relay needs to share HTTP/2 connections to one provider.
///
/// Pingora opens a new connection whenever no pooled one has a free stream, so a burst
/// of requests arriving together would each open their own. While a channel may speak
/// h2, new connections are opened one at a time behind `gate`: the requests waiting
/// there find the new connection's free streams instead. Once the provider has chosen
/// HTTP/1.1 by ALPN, `h1_only` is set and the gate is no longer taken.
#[derive(Debug)]
pub struct Dial {
    /// ALPN `h2` may be offered (or h2c spoken) on new connections.
    pub h2: bool,
    pub gate: tokio::sync::Mutex<()>,
    pub h1_only: AtomicBool,
}

impl Dial {
    pub fn new(h2: bool) -> Dial {
        Dial {
            h2,
            gate: tokio::sync::Mutex::new(()),
            h1_only: AtomicBool::new(false),
        }
    }

    /// Whether new connections must go through the gate.
    pub fn gated(&self) -> bool {
        self.h2 && !self.h1_only.load(Ordering::Relaxed)
    }

    /// The provider answered a new connection in HTTP/1.1: stop gating.
    pub fn learned_h1(&self) {
        self.h1_only.store(true, Ordering::Relaxed);
    }
}

/// The ALPN a channel offers: `auto` is h2-then-h1 on TLS and HTTP/1.1 in plain text;
/// `on` is h2 only (by ALPN on TLS, prior knowledge in plain text).
pub(crate) fn alpn_for(mode: Http2Mode, tls: bool) -> ALPN {
    match (mode, tls) {
        (Http2Mode::Off, _) | (Http2Mode::Auto, false) => ALPN::H1,
        (Http2Mode::Auto, true) => ALPN::H2H1,
        (Http2Mode::On, _) => ALPN::H2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http2_mode_picks_the_alpn_offered() {
        assert_eq!(alpn_for(Http2Mode::Auto, true), ALPN::H2H1);
        assert_eq!(alpn_for(Http2Mode::Auto, false), ALPN::H1);
        assert_eq!(alpn_for(Http2Mode::On, false), ALPN::H2);
        assert_eq!(alpn_for(Http2Mode::On, true), ALPN::H2);
        assert_eq!(alpn_for(Http2Mode::Off, true), ALPN::H1);
    }
}
