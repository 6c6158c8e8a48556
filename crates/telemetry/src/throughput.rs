//! [`THROUGHPUT`](crate::THROUGHPUT): completed requests per second over a
//! sliding window, per model, for the design document's
//! `batch_processing_throughput_rps` gauge.
//!
//! Counts go into one-second slots; the rate is the sum of the slots of
//! the last [`WINDOW_SECONDS`] whole seconds divided by that span, so a
//! burst shows for the length of the window and then leaves it.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Length of the window, seconds.
pub const WINDOW_SECONDS: u64 = 10;

/// Per-model completion counts in one-second slots.
#[derive(Debug)]
pub struct Throughput {
    started: Instant,
    /// model → ring of (second since `started`, count).
    models: Mutex<BTreeMap<String, [(u64, u64); WINDOW_SECONDS as usize]>>,
}

impl Throughput {
    pub fn new(started: Instant) -> Self {
        Throughput {
            started,
            models: Mutex::new(BTreeMap::new()),
        }
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.started).as_secs()
    }

    /// Counts one completed request of `model` at `at`.
    pub fn record(&self, model: &str, at: Instant) {
        let second = self.second(at);
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        if !models.contains_key(model) {
            models.insert(model.to_owned(), [(u64::MAX, 0); WINDOW_SECONDS as usize]);
        }
        if let Some(ring) = models.get_mut(model) {
            let slot = &mut ring[(second % WINDOW_SECONDS) as usize];
            if slot.0 != second {
                *slot = (second, 0);
            }
            slot.1 += 1;
        }
    }

    /// Requests per second of every model seen, over the whole seconds of
    /// the window that ended before `now` (the current second is partial).
    pub fn rates(&self, now: Instant) -> Vec<(String, f64)> {
        let current = self.second(now);
        let first = current.saturating_sub(WINDOW_SECONDS);
        // Early on, the window is as long as the server has run.
        let span = (current - first).max(1) as f64;
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        models
            .iter()
            .map(|(model, ring)| {
                let count: u64 = ring
                    .iter()
                    .filter(|(second, _)| *second >= first && *second < current)
                    .map(|(_, count)| count)
                    .sum();
                (model.clone(), count as f64 / span)
            })
            .collect()
    }

    /// Sets the gauge of every model to its rate at `now`.
    pub fn publish(&self, now: Instant) {
        for (model, rate) in self.rates(now) {
            metrics::gauge!(crate::THROUGHPUT, "model" => model).set(rate);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_rate_counts_whole_seconds_of_the_window() {
        let start = Instant::now();
        let t = Throughput::new(start);
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 20 requests in second 0, 10 in second 1, 5 in the current second 2.
        for i in 0..20 {
            t.record("a", at(i * 10));
        }
        for i in 0..10 {
            t.record("a", at(1_000 + i * 10));
        }
        for i in 0..5 {
            t.record("a", at(2_000 + i));
        }
        t.record("b", at(1_500));
        let rates = t.rates(at(2_500));
        assert_eq!(rates, vec![("a".to_owned(), 15.0), ("b".to_owned(), 0.5)]);
        // Twelve seconds later only the requests of second 2 are left in
        // the window ending at second 12 (seconds 2..12).
        assert_eq!(t.rates(at(12_100))[0], ("a".to_owned(), 0.5));
        // A slot reused a window later starts again from zero.
        t.record("a", at(10_000));
        assert_eq!(t.rates(at(11_000))[0], ("a".to_owned(), 1.6));
    }
}
