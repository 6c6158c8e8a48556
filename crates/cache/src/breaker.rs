//! The circuit breaker in front of Redis, as pure state.
//!
//! Closed: every operation is allowed; `failure_threshold` consecutive
//! failures open it. Open: nothing goes to Redis for `open_for`; then one
//! probe is let through (half-open). The probe's success closes the
//! breaker, its failure opens it again. A probe that never reports (its
//! task was dropped) is replaced by a new one after another `open_for`.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// Value of the circuit-state gauge: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    state: BreakerState,
    failures: u32,
    since: Instant,
    failure_threshold: u32,
    open_for: Duration,
}

impl Breaker {
    pub fn new(failure_threshold: u32, open_for: Duration) -> Self {
        Breaker {
            state: BreakerState::Closed,
            failures: 0,
            since: Instant::now(),
            failure_threshold: failure_threshold.max(1),
            open_for,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether an operation may go to Redis now.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open | BreakerState::HalfOpen
                if now.saturating_duration_since(self.since) >= self.open_for =>
            {
                self.state = BreakerState::HalfOpen;
                self.since = now;
                true
            }
            BreakerState::Open | BreakerState::HalfOpen => false,
        }
    }

    /// Records a success; returns the previous state when it changed.
    pub fn success(&mut self, now: Instant) -> Option<BreakerState> {
        self.failures = 0;
        let previous = self.state;
        (previous != BreakerState::Closed).then(|| {
            self.state = BreakerState::Closed;
            self.since = now;
            previous
        })
    }

    /// Records a failure; returns the previous state when it changed.
    pub fn failure(&mut self, now: Instant) -> Option<BreakerState> {
        self.failures = self.failures.saturating_add(1);
        let previous = self.state;
        let trip = match previous {
            BreakerState::Closed => self.failures >= self.failure_threshold,
            BreakerState::HalfOpen => true,
            BreakerState::Open => false,
        };
        trip.then(|| {
            self.state = BreakerState::Open;
            self.since = now;
            previous
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_after_the_pause_and_closes_on_success() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Breaker::new(3, ms(100));
        assert!(b.allow(t0));
        assert_eq!(b.failure(t0), None);
        assert_eq!(b.success(t0), None, "a success resets the count");
        b.failure(t0);
        b.failure(t0);
        assert_eq!(b.failure(t0), Some(BreakerState::Closed));
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(t0 + ms(99)));
        assert!(b.allow(t0 + ms(100)), "one probe after the pause");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.allow(t0 + ms(101)), "only one probe at a time");
        assert_eq!(b.failure(t0 + ms(110)), Some(BreakerState::HalfOpen));
        assert!(!b.allow(t0 + ms(150)));
        assert!(b.allow(t0 + ms(210)));
        assert_eq!(b.success(t0 + ms(211)), Some(BreakerState::HalfOpen));
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(t0 + ms(212)));
    }

    #[test]
    fn a_lost_probe_is_replaced() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Breaker::new(1, ms(100));
        b.failure(t0);
        assert!(b.allow(t0 + ms(100)));
        assert!(!b.allow(t0 + ms(150)));
        assert!(b.allow(t0 + ms(200)));
    }
}
