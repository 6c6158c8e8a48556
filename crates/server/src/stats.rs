//! Per-version inference statistics for Triton's statistics extension
//! (`GET /v2/models/{m}/stats`, gRPC `ModelStatistics`).
//!
//! perf_analyzer reads these before and after each measurement window, so
//! the endpoints must exist; tickserve fills what the protocol-neutral
//! inference path measures (successes, failures, their time, rows and the
//! last inference time) and the requests handed to the scheduler with the
//! time they spent there. The scheduler does not split that time into queue
//! wait and engine execution per request (its Prometheus histograms do, in
//! aggregate), so Triton's `queue` statistic carries the whole scheduler
//! time and the compute statistics are zero. perf_analyzer needs `queue`'s
//! count to grow: it finds the version it measured by it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Lock-free counters updated once per request.
#[derive(Debug, Default)]
pub struct InferStats {
    success_count: AtomicU64,
    success_ns: AtomicU64,
    fail_count: AtomicU64,
    fail_ns: AtomicU64,
    scheduled_count: AtomicU64,
    scheduled_ns: AtomicU64,
    /// Rows inferred (Triton's `inference_count` counts batch rows).
    inference_count: AtomicU64,
    /// Milliseconds since the Unix epoch of the last request.
    last_inference_ms: AtomicU64,
}

/// A consistent-enough copy of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub success_count: u64,
    pub success_ns: u64,
    pub fail_count: u64,
    pub fail_ns: u64,
    /// Requests handed to the scheduler, and their total time there
    /// (queue wait plus batch execution).
    pub scheduled_count: u64,
    pub scheduled_ns: u64,
    pub inference_count: u64,
    pub last_inference_ms: u64,
}

impl InferStats {
    pub fn record(&self, ok: bool, rows: usize, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        if ok {
            self.success_count.fetch_add(1, Ordering::Relaxed);
            self.success_ns.fetch_add(ns, Ordering::Relaxed);
            self.inference_count
                .fetch_add(rows as u64, Ordering::Relaxed);
        } else {
            self.fail_count.fetch_add(1, Ordering::Relaxed);
            self.fail_ns.fetch_add(ns, Ordering::Relaxed);
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_inference_ms.fetch_max(now_ms, Ordering::Relaxed);
    }

    pub fn record_scheduled(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.scheduled_count.fetch_add(1, Ordering::Relaxed);
        self.scheduled_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            success_count: self.success_count.load(Ordering::Relaxed),
            success_ns: self.success_ns.load(Ordering::Relaxed),
            fail_count: self.fail_count.load(Ordering::Relaxed),
            fail_ns: self.fail_ns.load(Ordering::Relaxed),
            scheduled_count: self.scheduled_count.load(Ordering::Relaxed),
            scheduled_ns: self.scheduled_ns.load(Ordering::Relaxed),
            inference_count: self.inference_count.load(Ordering::Relaxed),
            last_inference_ms: self.last_inference_ms.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successes_and_failures_are_counted_apart() {
        let stats = InferStats::default();
        stats.record(true, 4, Duration::from_micros(10));
        stats.record(true, 1, Duration::from_micros(5));
        stats.record(false, 2, Duration::from_micros(1));
        stats.record_scheduled(Duration::from_micros(3));
        let s = stats.snapshot();
        assert_eq!((s.success_count, s.success_ns), (2, 15_000));
        assert_eq!((s.fail_count, s.fail_ns), (1, 1_000));
        assert_eq!(s.inference_count, 5);
        assert_eq!((s.scheduled_count, s.scheduled_ns), (1, 3_000));
        assert!(s.last_inference_ms > 0);
    }
}
