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

    /// The smallest batch that keeps up with `rate` rows/s when each call
    /// also costs `overhead` seconds outside the engine: running a batch of
    /// `n` rows takes `a·n + b + overhead`, during which that many seconds'
    /// rows arrive; the queue does not grow when they are at most `n`, i.e.
    /// `n ≥ rate·(b + overhead) / (1 − rate·a)`. `None` when no batch size
    /// keeps up.
    pub fn rows_to_keep_up(&self, rate: f64, overhead: f64) -> Option<f64> {
        let load = rate * self.a;
        (load < 1.0).then(|| rate * (self.b + overhead) / (1.0 - load))
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

/// How many times longer than predicted admitted requests have lately
/// waited for their batch: at least 1, at most [`MAX_WAIT_SCALE`].
///
/// Admission predicts each request's wait from the engine-time fit and the
/// queue, a point estimate on cores it shares with the protocol front end
/// and anything else on the machine. Each request that starts (or expires)
/// tells how far off its prediction was, and admission scales later
/// predictions by the recent ratio, so that admitted requests meet their
/// deadline when the machine is slower than the fit (docs/scheduling.md,
/// "Overload"). The scale rises fast (half way to a late request's ratio)
/// and falls slowly, so one early start does not undo a slow period.
#[derive(Debug, Clone)]
pub struct WaitScale {
    scale: f64,
}

/// The most the wait scale grows to.
pub const MAX_WAIT_SCALE: f64 = 8.0;
/// Share of the way to a request's ratio the scale moves: up, and down.
const WAIT_SCALE_RISE: f64 = 0.5;
const WAIT_SCALE_FALL: f64 = 0.02;
/// Predicted waits shorter than this say little about the prediction's
/// error (one thread wake-up costs as much) and are not used.
const MIN_CALIBRATING_WAIT: Duration = Duration::from_millis(1);

impl Default for WaitScale {
    fn default() -> Self {
        WaitScale { scale: 1.0 }
    }
}

impl WaitScale {
    pub fn get(&self) -> f64 {
        self.scale
    }

    /// A request predicted to wait `predicted` waited `waited`.
    pub fn calibrate(&mut self, predicted: Option<Duration>, waited: Duration) {
        let Some(predicted) = predicted.filter(|p| *p >= MIN_CALIBRATING_WAIT) else {
            return;
        };
        let ratio = (waited.as_secs_f64() / predicted.as_secs_f64()).min(MAX_WAIT_SCALE);
        let weight = if ratio > self.scale {
            WAIT_SCALE_RISE
        } else {
            WAIT_SCALE_FALL
        };
        self.scale = (self.scale + weight * (ratio - self.scale)).max(1.0);
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
        assert!(m.rows_to_keep_up(100.0, 0.0).unwrap() < 1.0);
        let at_3000 = m.rows_to_keep_up(3000.0, 0.0).unwrap();
        assert!((5.0..6.0).contains(&at_3000), "{at_3000}");
        assert_eq!(m.rows_to_keep_up(4000.0, 0.0), None);
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

    #[test]
    fn the_wait_scale_rises_fast_falls_slowly_and_stays_within_bounds() {
        let mut w = WaitScale::default();
        // Waits at or below the prediction keep it at 1.
        w.calibrate(Some(us(10_000)), us(5_000));
        assert_eq!(w.get(), 1.0);
        // Twice the prediction: half way to 2 at once.
        w.calibrate(Some(us(10_000)), us(20_000));
        assert!((w.get() - 1.5).abs() < 1e-9);
        // Short predictions and requests that were not predicted say nothing.
        w.calibrate(Some(us(500)), us(50_000));
        w.calibrate(None, us(50_000));
        assert!((w.get() - 1.5).abs() < 1e-9);
        // A wildly late request moves it to at most the cap.
        for _ in 0..64 {
            w.calibrate(Some(us(1_000)), us(1_000_000));
        }
        assert!(w.get() <= MAX_WAIT_SCALE && w.get() > MAX_WAIT_SCALE - 0.01);
        // On time again: it falls slowly, then back to 1.
        w.calibrate(Some(us(10_000)), us(10_000));
        assert!(w.get() > 7.8);
        for _ in 0..1000 {
            w.calibrate(Some(us(10_000)), us(5_000));
        }
        assert_eq!(w.get(), 1.0);
    }
}
