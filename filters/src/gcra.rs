//! The GCRA bucket the per-minute limits are made of, and OpenAI's reset format.

use std::time::Duration;

/// A GCRA bucket holding up to `per_minute` units, refilled continuously.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Gcra {
    /// Theoretical arrival time, as an offset from the limiter's epoch.
    pub(crate) tat: Duration,
}

pub(crate) const WINDOW: Duration = Duration::from_secs(60);

impl Gcra {
    pub(crate) fn interval(per_minute: u32) -> Duration {
        WINDOW / per_minute.max(1)
    }

    /// Takes `n` units at `now`, or says how long until they would fit.
    pub(crate) fn take(&mut self, now: Duration, n: u64, per_minute: u32) -> Result<(), Duration> {
        let t = Self::interval(per_minute);
        let cost = t.saturating_mul(n.min(u32::MAX as u64) as u32);
        let start = self.tat.max(now);
        let new_tat = start + cost;
        // Allowed while the debt stays within one window.
        if new_tat.saturating_sub(now) > WINDOW {
            // (Callers refuse a request larger than the whole bucket before asking.)
            return Err(new_tat.saturating_sub(now) - WINDOW);
        }
        self.tat = new_tat;
        Ok(())
    }

    /// Gives `n` units back (never below `now`).
    pub(crate) fn give_back(&mut self, now: Duration, n: u64, per_minute: u32) {
        let back = Self::interval(per_minute).saturating_mul(n.min(u32::MAX as u64) as u32);
        self.tat = self.tat.saturating_sub(back).max(now);
    }

    pub(crate) fn remaining(&self, now: Duration, per_minute: u32) -> u64 {
        let debt = self.tat.saturating_sub(now);
        let free = WINDOW.saturating_sub(debt);
        (free.as_nanos() / Self::interval(per_minute).as_nanos().max(1)) as u64
    }

    /// Until the bucket is full again.
    pub(crate) fn reset(&self, now: Duration) -> Duration {
        self.tat.saturating_sub(now)
    }
}

/// `6m0s`, `1.5s`, `120ms`: OpenAI's reset format.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return format!("{s}s");
    }
    let whole = d.as_secs();
    format!("{}m{}s", whole / 60, whole % 60)
}
