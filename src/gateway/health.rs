//! Backend health: active checks (rise/fall) and a passive circuit breaker per server.
//! Pure state machines; the checking loop and the proxy feed them.

use std::time::Duration;

use tokio::time::Instant;

/// Active health: `fall` failed checks in a row take a server out, `rise` passes bring it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Active {
    up: bool,
    streak: u32,
}

impl Default for Active {
    fn default() -> Self {
        Active {
            up: true,
            streak: 0,
        }
    }
}

impl Active {
    pub fn up(&self) -> bool {
        self.up
    }

    /// Records one check; returns `Some(new state)` when it flips.
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed.max(1) {
            self.up = passed;
            self.streak = 0;
            Some(passed)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    /// One probe request may go through; its outcome closes or reopens the breaker.
    HalfOpen,
}

impl BreakerState {
    pub fn as_f64(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// Passive circuit breaker: opens after `failures` consecutive failures, half-opens after
/// `open_for`, and lets one probe through.
#[derive(Debug, Clone, Default)]
pub struct Breaker {
    failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn state(&self, now: Instant, open_for: Duration) -> BreakerState {
        match self.opened_at {
            None => BreakerState::Closed,
            Some(at) if now.saturating_duration_since(at) < open_for => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// May a request go to this server now? (In half-open, only one at a time.)
    pub fn allow(&mut self, now: Instant, open_for: Duration) -> bool {
        match self.state(now, open_for) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !std::mem::replace(&mut self.probing, true),
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
        self.probing = false;
    }

    /// Returns true when this failure opened (or reopened) the breaker.
    pub fn failure(&mut self, now: Instant, threshold: u32) -> bool {
        self.failures += 1;
        if self.probing || (self.opened_at.is_none() && self.failures >= threshold.max(1)) {
            self.opened_at = Some(now);
            self.probing = false;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_takes_a_server_out_and_rise_brings_it_back() {
        let mut h = Active::default();
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), Some(false));
        assert!(!h.up());
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(
            h.record(false, 2, 3),
            None,
            "a failure resets the rise streak"
        );
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn the_breaker_opens_half_opens_and_closes_on_a_good_probe() {
        let open_for = Duration::from_secs(10);
        let mut b = Breaker::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            assert!(!b.failure(t0, 5));
        }
        assert!(b.failure(t0, 5), "the fifth failure opens it");
        assert!(!b.allow(t0 + Duration::from_secs(9), open_for));
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.state(later, open_for), BreakerState::HalfOpen);
        assert!(b.allow(later, open_for), "one probe");
        assert!(!b.allow(later, open_for), "and only one");
        assert!(b.failure(later, 5), "a failed probe reopens");
        assert_eq!(b.state(later, open_for), BreakerState::Open);
        let again = later + open_for;
        assert!(b.allow(again, open_for));
        b.success();
        assert_eq!(b.state(again, open_for), BreakerState::Closed);
    }
}
