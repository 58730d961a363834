//! `ip_guard`: a pre-auth flood guard per client address.
//!
//! It runs before the key lookup so that a flood of requests (with or without valid keys)
//! is refused for the price of one hash-sketch update. Counting uses pingora-limits' `Rate`
//! (a count-min sketch over one-second windows): memory stays fixed however many addresses
//! appear, at the cost of rare over-counting under heavy collision.

use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use pingora_limits::rate::Rate;

use crate::chain::Phases;
use crate::{Ctx, Filter, GatewayError, RequestHead};

/// `limits.ip:` settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct IpGuardConfig {
    /// Requests per second allowed from one address; 0 turns the guard off.
    pub rps: u32,
}

pub struct IpGuard {
    cfg: IpGuardConfig,
    rate: Rate,
}

impl IpGuard {
    pub fn new(cfg: IpGuardConfig) -> Self {
        IpGuard {
            cfg,
            rate: Rate::new(Duration::from_secs(1)),
        }
    }

    /// Counts one request from `ip`; `Err` when it is over the limit.
    pub fn admit(&self, ip: IpAddr) -> Result<(), GatewayError> {
        if self.cfg.rps == 0 {
            return Ok(());
        }
        let seen = self.rate.observe(&ip, 1);
        if seen > self.cfg.rps as isize {
            return Err(GatewayError::RateLimited {
                what: "requests from this address",
                retry_after: Duration::from_secs(1),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Filter for IpGuard {
    fn name(&self) -> &'static str {
        "ip_guard"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST_HEAD
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_per_second_budget_per_address() {
        let g = IpGuard::new(IpGuardConfig { rps: 5 });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let admitted = (0..20).filter(|_| g.admit(a).is_ok()).count();
        assert_eq!(admitted, 5);
        assert!(g.admit(b).is_ok());
        let err = g.admit(a).unwrap_err();
        assert_eq!(err.status(), 429);
        assert_eq!(err.code(), Some("rate_limit_exceeded"));
    }

    #[test]
    fn zero_means_off() {
        let g = IpGuard::new(IpGuardConfig { rps: 0 });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert!((0..1000).all(|_| g.admit(a).is_ok()));
    }
}
