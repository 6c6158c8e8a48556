//! Online estimates the batcher decides with: engine time per batch size
//! (a least-squares fit of `latency ≈ a·n + b` over recent batches, as
//! BentoML's adaptive batcher does, serving-systems.md §9.2) and the
//! arrival rate. Plain state, fed by the batcher, tested without a runtime.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Recent batches of one engine instance and the line through them.
#[derive(Debug, Clone)]
pub struct LatencyModel {
    samples: VecDeque<(f64, f64)>,
    window: usize,
    /// Seconds per row and seconds per batch.
    a: f64,
    b: f64,
}

impl LatencyModel {
    pub fn new(window: usize) -> Self {
        LatencyModel {
            samples: VecDeque::with_capacity(window),
            window: window.max(2),
            a: 0.0,
            b: 0.0,
        }
    }

    pub fn has_samples(&self) -> bool {
        !self.samples.is_empty()
    }

    /// Records one batch of `rows` rows that took `took`, and refits.
    pub fn record(&mut self, rows: usize, took: Duration) {
        if self.samples.len() == self.window {
            self.samples.pop_front();
        }
        self.samples.push_back((rows as f64, took.as_secs_f64()));
        self.fit();
    }

    fn fit(&mut self) {
        let n = self.samples.len() as f64;
        let (sx, sy) = self
            .samples
            .iter()
            .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
        let (mx, my) = (sx / n, sy / n);
        let (sxx, sxy) = self.samples.iter().fold((0.0, 0.0), |(sxx, sxy), (x, y)| {
            (sxx + (x - mx) * (x - mx), sxy + (x - mx) * (y - my))
        });
        if sxx < 1e-9 {
            // One batch size only: assume time proportional to rows, which
            // over-estimates larger batches (the safe side for deadlines).
            self.a = if mx > 0.0 { my / mx } else { 0.0 };
            self.b = 0.0;
        } else {
            let a = (sxy / sxx).max(0.0);
            self.a = a;
            self.b = (my - a * mx).max(0.0);
        }
    }

    /// Predicted engine time of a batch of `rows` rows; zero before the
    /// first batch.
    pub fn predict(&self, rows: usize) -> Duration {
        Duration::from_secs_f64((self.a * rows as f64 + self.b).max(0.0))
    }

    /// The most rows one engine call may hold and still be predicted to
    /// finish within `budget` (at least 1); `None` before the first batch.
    pub fn rows_within(&self, budget: Duration) -> Option<usize> {
        if !self.has_samples() {
            return None;
        }
        if self.a <= 0.0 {
            return Some(usize::MAX);
        }
        let rows = (budget.as_secs_f64() - self.b) / self.a;
        Some(if rows >= 1.0 {
            rows.floor() as usize
        } else {
            1
        })
    }

    /// `(a, b)`: seconds per row and fixed seconds per batch.
    pub fn coefficients(&self) -> (f64, f64) {
        (self.a, self.b)
    }

    /// The smallest batch that keeps up with `rate` rows/s: running a batch
    /// of `n` rows takes `a·n + b`, during which `rate·(a·n + b)` rows
    /// arrive; the queue does not grow when that is at most `n`, i.e.
    /// `n ≥ rate·b / (1 − rate·a)`. `None` when no batch size keeps up.
    pub fn rows_to_keep_up(&self, rate: f64) -> Option<f64> {
        let load = rate * self.a;
        (load < 1.0).then(|| rate * self.b / (1.0 - load))
    }
}

/// Arrivals per second, exponentially decayed with time constant `tau`:
/// each arrival adds `1/tau`, and the sum decays by `e^(−Δt/tau)`.
#[derive(Debug, Clone)]
pub struct RateEstimator {
    tau: f64,
    rate: f64,
    at: Option<Instant>,
}

impl RateEstimator {
    pub fn new(tau: Duration) -> Self {
        RateEstimator {
            tau: tau.as_secs_f64().max(1e-6),
            rate: 0.0,
            at: None,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        match self.at {
            Some(at) => {
                let dt = now.saturating_duration_since(at).as_secs_f64();
                self.rate * (-dt / self.tau).exp()
            }
            None => 0.0,
        }
    }

    /// Records `count` arrivals at `now`.
    pub fn record(&mut self, now: Instant, count: usize) {
        self.rate = self.decayed(now) + count as f64 / self.tau;
        self.at = Some(now);
    }

    /// The rate at `now`, per second.
    pub fn rate(&self, now: Instant) -> f64 {
        self.decayed(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(v: u64) -> Duration {
        Duration::from_micros(v)
    }

    #[test]
    fn the_fit_recovers_a_line() {
        let mut m = LatencyModel::new(64);
        assert_eq!(m.predict(32), Duration::ZERO);
        for n in [1usize, 4, 8, 16, 32, 1, 32] {
            m.record(n, us(300 + 270 * n as u64));
        }
        let (a, b) = m.coefficients();
        assert!((a - 270e-6).abs() < 1e-9, "{a}");
        assert!((b - 300e-6).abs() < 1e-9, "{b}");
        assert_eq!(m.predict(10).as_micros(), 3000);
    }

    #[test]
    fn rows_within_a_budget_follow_the_fit() {
        let mut m = LatencyModel::new(8);
        assert_eq!(m.rows_within(us(2000)), None);
        m.record(1, us(400));
        m.record(32, us(9000));
        // a ≈ 277 µs/row, b ≈ 123 µs: 6 rows take ≈ 1787 µs, 7 ≈ 2065 µs.
        assert_eq!(m.rows_within(us(2000)), Some(6));
        // A budget below one row still runs one row.
        assert_eq!(m.rows_within(us(10)), Some(1));
    }

    #[test]
    fn one_batch_size_only_predicts_proportionally() {
        let mut m = LatencyModel::new(8);
        m.record(1, us(600));
        m.record(1, us(600));
        assert_eq!(m.predict(4).as_micros(), 2400);
    }

    #[test]
    fn the_window_forgets_old_batches() {
        let mut m = LatencyModel::new(2);
        m.record(1, us(10_000));
        m.record(1, us(100));
        m.record(1, us(100));
        assert_eq!(m.predict(1).as_micros(), 100);
    }

    #[test]
    fn keeping_up_needs_bigger_batches_as_the_rate_grows() {
        let mut m = LatencyModel::new(8);
        m.record(1, us(600));
        m.record(32, us(9000));
        // a ≈ 271 µs/row, b ≈ 329 µs.
        assert!(m.rows_to_keep_up(100.0).unwrap() < 1.0);
        let at_3000 = m.rows_to_keep_up(3000.0).unwrap();
        assert!((5.0..6.0).contains(&at_3000), "{at_3000}");
        assert_eq!(m.rows_to_keep_up(4000.0), None);
    }

    #[test]
    fn the_rate_estimate_follows_a_steady_stream_and_decays() {
        let t0 = Instant::now();
        let mut r = RateEstimator::new(Duration::from_millis(100));
        for i in 0..1000u64 {
            r.record(t0 + Duration::from_millis(i), 1);
        }
        let steady = r.rate(t0 + Duration::from_millis(999));
        assert!((900.0..1100.0).contains(&steady), "{steady}");
        let later = r.rate(t0 + Duration::from_millis(1999));
        assert!(later < 1.0, "{later}");
    }
}
