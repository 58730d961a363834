//! `ip_guard`: a pre-auth guard against key guessing, per client address.
//!
//! It counts only **failed authentications** (a missing, unknown, revoked or expired key:
//! the 401s) per address, and refuses an address with 429 before the key lookup once it has
//! failed `failed_auth_per_min` times in the current minute. Successful requests never
//! count, so a busy backend behind one address is never slowed by it; a client guessing keys
//! costs the gateway at most that many store lookups a minute. Counting uses pingora-limits'
//! `Rate` (a count-min sketch over fixed one-minute windows): memory stays fixed however
//! many addresses appear, at the cost of rare over-counting under heavy collision.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora_limits::rate::Rate;

use crate::chain::Phases;
use crate::{Ctx, Filter, GatewayError, Limit, RequestHead};

/// The window failed authentications are counted in.
const WINDOW: Duration = Duration::from_secs(60);

/// `limits.ip:` in the YAML.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpGuardConfig {
    /// Failed authentications allowed from one address per minute before its requests are
    /// refused until the minute ends; 0 turns the guard off.
    pub failed_auth_per_min: u32,
    /// Deprecated and ignored: the guard no longer counts every request. Still accepted so
    /// that existing files load.
    pub rps: Option<u32>,
}

impl Default for IpGuardConfig {
    fn default() -> Self {
        IpGuardConfig {
            failed_auth_per_min: 120,
            rps: None,
        }
    }
}

pub struct IpGuard {
    cfg: IpGuardConfig,
    failures: Rate,
}

/// The refusals that mean "this caller did not present a valid key".
fn is_failed_auth(e: &GatewayError) -> bool {
    matches!(
        e,
        GatewayError::MissingApiKey
            | GatewayError::InvalidApiKey
            | GatewayError::RevokedApiKey
            | GatewayError::ExpiredApiKey
    )
}

impl IpGuard {
    pub fn new(cfg: IpGuardConfig) -> Self {
        IpGuard {
            cfg,
            failures: Rate::new(WINDOW),
        }
    }

    /// `Err` when `ip` has used up its failed authentications for this minute.
    pub fn admit(&self, ip: IpAddr) -> Result<(), GatewayError> {
        if self.cfg.failed_auth_per_min == 0 {
            return Ok(());
        }
        if self.failures.observe(&ip, 0) >= self.cfg.failed_auth_per_min as isize {
            return Err(GatewayError::RateLimited {
                limit: Limit::FailedAuthPerAddress,
                retry_after: WINDOW,
            });
        }
        Ok(())
    }

    /// Counts one failed authentication from `ip`.
    pub fn failed(&self, ip: IpAddr) {
        if self.cfg.failed_auth_per_min != 0 {
            self.failures.observe(&ip, 1);
        }
    }
}

#[async_trait]
impl Filter for IpGuard {
    fn name(&self) -> &'static str {
        "ip_guard"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEAD | Phases::DONE
    }

    async fn on_request_head(
        &self,
        _ctx: &mut Ctx,
        head: &RequestHead<'_>,
    ) -> Result<(), GatewayError> {
        match head.client_ip {
            Some(ip) => self.admit(ip),
            None => Ok(()),
        }
    }

    /// Only the exchange's end knows whether the key was refused.
    async fn on_done(&self, ctx: &mut Ctx) {
        if let (Some(ip), Some(e)) = (ctx.client_ip, &ctx.outcome.error) {
            if is_failed_auth(e) {
                self.failed(ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request through a chain holding the guard (so an undeclared phase would not
    /// run): head, then the outcome the rest of the chain produced.
    async fn request(g: &crate::Chain, ip: &str, outcome: Option<GatewayError>) -> bool {
        let headers = http::HeaderMap::new();
        let ip: IpAddr = ip.parse().unwrap();
        let head = RequestHead {
            method: &http::Method::POST,
            path: "/v1/chat/completions",
            headers: &headers,
            client_ip: Some(ip),
        };
        let mut ctx = Ctx::new("r".into());
        ctx.client_ip = Some(ip);
        let admitted = match g.request_head(&mut ctx, &head).await {
            Ok(()) => {
                ctx.outcome.status = outcome.as_ref().map_or(200, |e| e.status());
                ctx.outcome.error = outcome;
                true
            }
            Err(e) => {
                assert_eq!((e.status(), e.code()), (429, Some("rate_limit_exceeded")));
                ctx.outcome.status = 429;
                ctx.outcome.error = Some(e);
                false
            }
        };
        g.done(&mut ctx).await;
        admitted
    }

    fn guard() -> crate::Chain {
        crate::Chain::new(vec![std::sync::Arc::new(IpGuard::new(IpGuardConfig {
            failed_auth_per_min: 120,
            rps: None,
        }))])
    }

    #[tokio::test]
    async fn a_thousand_valid_requests_from_one_address_are_never_refused() {
        let g = guard();
        for i in 0..1000 {
            assert!(request(&g, "10.0.0.1", None).await, "request {i} refused");
        }
        // Other refusals after a valid key (limits, upstream errors) do not count either.
        for _ in 0..200 {
            let limited = GatewayError::RateLimited {
                limit: Limit::RequestsPerMinute(crate::LimitScope::Key),
                retry_after: Duration::from_secs(1),
            };
            assert!(request(&g, "10.0.0.1", Some(limited)).await);
        }
    }

    #[tokio::test]
    async fn two_hundred_bad_key_attempts_trip_the_guard_for_that_address_only() {
        let g = guard();
        let mut admitted = 0;
        for _ in 0..200 {
            if request(&g, "10.0.0.1", Some(GatewayError::InvalidApiKey)).await {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 120);
        // Tripped: even a valid key from that address waits for the window; others do not.
        assert!(!request(&g, "10.0.0.1", None).await);
        assert!(request(&g, "10.0.0.2", None).await);
        let direct = IpGuard::new(IpGuardConfig {
            failed_auth_per_min: 1,
            rps: None,
        });
        direct.failed("10.0.0.1".parse().unwrap());
        let e = direct.admit("10.0.0.1".parse().unwrap()).unwrap_err();
        assert_eq!(e.retry_after(), Some(WINDOW));
    }

    #[tokio::test]
    async fn zero_means_off() {
        let g = crate::Chain::new(vec![std::sync::Arc::new(IpGuard::new(IpGuardConfig {
            failed_auth_per_min: 0,
            rps: None,
        }))]);
        for _ in 0..500 {
            assert!(request(&g, "10.0.0.1", Some(GatewayError::InvalidApiKey)).await);
        }
    }
}
