//! A channel's health: a windowed breaker with a minimum volume and a half-open probe.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

/// `routing.health`: how a channel's health is judged.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Attempts are judged over windows of this length.
    pub window_s: u64,
    /// No verdict on fewer attempts than this in a window.
    pub min_requests: u32,
    /// At least this many failures in the window...
    pub failure_threshold: u32,
    /// ... and at least this share of the window's attempts failed.
    pub failure_ratio: f64,
    /// A failing channel is tried last for this long, then one probe request decides.
    pub cooldown_s: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            window_s: 30,
            min_requests: 10,
            failure_threshold: 5,
            failure_ratio: 0.5,
            cooldown_s: 30,
        }
    }
}

/// A channel's health: attempts are counted in windows of `window_s`; a window with at
/// least `min_requests` attempts, `failure_threshold` failures and a failure share of
/// `failure_ratio` opens the breaker for `cooldown_s`. After that, the next attempt is a
/// probe (the others still see the channel as cooling while the probe is out): its success
/// closes the breaker, its failure opens it again. One tenant's handful of failing requests
/// stays under `min_requests` and cannot cool a channel down for everyone.
pub struct Health {
    cfg: HealthConfig,
    epoch: Instant,
    /// 0 when closed; else the instant (ns since `epoch`, at least 1) the cooldown ends.
    open_until: AtomicU64,
    /// While half-open: until when the probe handed out is exclusive.
    probe_until: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    start: u64,
    ok: u32,
    failed: u32,
}

impl Health {
    pub fn new(cfg: HealthConfig) -> Health {
        Health {
            cfg,
            epoch: Instant::now(),
            open_until: AtomicU64::new(0),
            probe_until: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
        }
    }

    fn now(&self) -> u64 {
        (self.epoch.elapsed().as_nanos() as u64).max(1)
    }

    fn cooldown_ns(&self) -> u64 {
        self.cfg.cooldown_s.saturating_mul(1_000_000_000)
    }

    /// Whether the picker should put this channel in its normal place (closed, or
    /// half-open with no probe out) rather than last.
    pub fn is_available(&self) -> bool {
        let open = self.open_until.load(Ordering::Relaxed);
        if open == 0 {
            return true;
        }
        let now = self.now();
        now >= open && now >= self.probe_until.load(Ordering::Relaxed)
    }

    /// An attempt is about to use the channel: if it is half-open, this attempt is the
    /// probe (exclusive for one cooldown, so a probe that never reports cannot wedge it).
    pub fn attempt_started(&self) {
        let open = self.open_until.load(Ordering::Relaxed);
        if open != 0 {
            let now = self.now();
            if now >= open {
                self.probe_until
                    .store(now.saturating_add(self.cooldown_ns()), Ordering::Relaxed);
            }
        }
    }

    /// Records an attempt's result. Returns true when this report opened the breaker.
    pub fn report(&self, failed: bool) -> bool {
        let now = self.now();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let open = self.open_until.load(Ordering::Relaxed);
        if open != 0 {
            if now < open {
                // Results of attempts started before the breaker opened.
                return false;
            }
            // Half-open: this is the probe's verdict (or one of its contemporaries').
            *w = Window {
                start: now,
                ..Window::default()
            };
            self.probe_until.store(0, Ordering::Relaxed);
            if failed {
                self.open_until
                    .store(now.saturating_add(self.cooldown_ns()), Ordering::Relaxed);
                return true;
            }
            self.open_until.store(0, Ordering::Relaxed);
            return false;
        }
        if now.saturating_sub(w.start) > self.cfg.window_s.saturating_mul(1_000_000_000) {
            *w = Window {
                start: now,
                ..Window::default()
            };
        }
        if failed {
            w.failed += 1;
        } else {
            w.ok += 1;
        }
        let total = w.ok + w.failed;
        let trips = total >= self.cfg.min_requests
            && w.failed >= self.cfg.failure_threshold
            && f64::from(w.failed) >= self.cfg.failure_ratio * f64::from(total);
        if trips {
            self.open_until
                .store(now.saturating_add(self.cooldown_ns()), Ordering::Relaxed);
            *w = Window {
                start: now,
                ..Window::default()
            };
        }
        trips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(min_requests: u32, cooldown_s: u64) -> Health {
        Health::new(HealthConfig {
            window_s: 60,
            min_requests,
            failure_threshold: 3,
            failure_ratio: 0.5,
            cooldown_s,
        })
    }

    #[test]
    fn a_few_failures_below_the_minimum_volume_never_cool_a_channel() {
        let h = health(10, 60);
        for _ in 0..6 {
            assert!(!h.report(true));
        }
        assert!(h.is_available(), "six failures < min_requests");
    }

    #[test]
    fn a_failing_share_over_enough_volume_opens_the_breaker() {
        let h = health(10, 60);
        for _ in 0..5 {
            h.report(false);
        }
        let opened = (0..5).map(|_| h.report(true)).filter(|&o| o).count();
        assert_eq!(opened, 1);
        assert!(!h.is_available());
    }

    #[test]
    fn mostly_successful_traffic_stays_closed() {
        let h = health(10, 60);
        for i in 0..100 {
            h.report(i % 4 == 0); // 25% failures
        }
        assert!(h.is_available());
    }

    #[test]
    fn after_the_cooldown_one_probe_decides() {
        let h = health(2, 0);
        h.report(true);
        h.report(true);
        h.report(true);
        // Cooldown 0: half-open at once; the probe is free.
        assert!(h.is_available());
        h.attempt_started();
        // The probe lease lasts one cooldown (0 here), so take a real one.
        let h = health(2, 3600);
        for _ in 0..3 {
            h.report(true);
        }
        assert!(!h.is_available());
        // Force half-open: pretend the cooldown ended.
        h.open_until.store(1, Ordering::Relaxed);
        assert!(h.is_available(), "half-open with no probe out");
        h.attempt_started();
        assert!(!h.is_available(), "the probe is out: others keep away");
        assert!(!h.report(false));
        assert!(h.is_available(), "a good probe closes the breaker");
        assert_eq!(h.open_until.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_failed_probe_opens_the_breaker_again() {
        let h = health(2, 3600);
        for _ in 0..3 {
            h.report(true);
        }
        h.open_until.store(1, Ordering::Relaxed);
        h.attempt_started();
        assert!(h.report(true));
        assert!(!h.is_available());
    }
}
