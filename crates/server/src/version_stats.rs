//! Triton's statistics of one model version: the scheduler's counters
//! plus what the result cache step adds ([`CacheStats`]), and the
//! per-version totals both statistics endpoints answer from
//! ([`TritonTotals`]). Plain counters, below the registry and the models
//! that hold them; `triton.rs` renders them as Triton's JSON and gRPC's
//! `ModelStatistics` reads the totals.

use std::time::Duration;

use tickserve_scheduler::stats::{Timed, Timing};
use tickserve_scheduler::{Priority, StatsSnapshot};

/// Per-class counts the result cache adds to the scheduler's.
#[derive(Debug, Default)]
struct CacheClass {
    success: Timed,
    fail: Timed,
    queue: Timed,
}

/// Triton's statistics of one version that the scheduler cannot see,
/// kept by the cache step (crate::cached): requests answered without the
/// queue, and Triton's `cache_hit` / `cache_miss`.
#[derive(Debug, Default)]
pub struct CacheStats {
    classes: [CacheClass; Priority::LEVELS],
    cache_hit: Timed,
    cache_miss: Timed,
}

impl CacheStats {
    /// A request the result cache answered without the queue (every row
    /// cached, or computed by an identical request in flight). As in
    /// Triton, it counts in `success` (or `fail`) and `queue` (for the time
    /// it `waited` for rows in flight; zero for a pure cache hit), never in
    /// the compute counters, `inference_count` or `execution_count`.
    pub fn record_answered_without_queue(
        &self,
        priority: Priority,
        took: Duration,
        waited: Duration,
        ok: bool,
    ) {
        let class = &self.classes[priority.index()];
        if ok {
            class.success.add(took);
            class.queue.add(waited);
        } else {
            class.fail.add(took);
        }
    }

    /// Triton's `cache_hit`: a request answered wholly from the cache and
    /// the time its lookup and assembly took.
    pub fn record_cache_hit(&self, took: Duration) {
        self.cache_hit.add(took);
    }

    /// Triton's `cache_miss`: a request with rows missing from the cache
    /// and the time spent looking them up and storing the computed ones.
    /// As Triton does, that time is added to the request's `success`
    /// duration (the scheduler timed only its queue-to-answer part), or to
    /// nothing when `queued` is false (the caller timed it all).
    pub fn record_cache_miss(&self, priority: Priority, took: Duration, queued: bool) {
        self.cache_miss.add(took);
        if queued {
            self.classes[priority.index()].success.add_ns(took);
        }
    }

    /// The scheduler's counters with these added.
    pub fn merge(&self, mut scheduler: StatsSnapshot) -> TritonStats {
        for class in &mut scheduler.classes {
            let own = &self.classes[class.priority.index()];
            let plus = |a: Timing, b: Timing| Timing {
                count: a.count + b.count,
                ns: a.ns + b.ns,
            };
            class.success = plus(class.success, own.success.read());
            class.fail = plus(class.fail, own.fail.read());
            class.queue = plus(class.queue, own.queue.read());
        }
        TritonStats {
            scheduler,
            cache_hit: self.cache_hit.read(),
            cache_miss: self.cache_miss.read(),
        }
    }
}

/// Everything the statistics endpoints show of one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TritonStats {
    /// The scheduler's counters, with the cache's per-class counts added.
    pub scheduler: StatsSnapshot,
    /// Requests answered wholly from the result cache, and the time to
    /// look their rows up and assemble the answer.
    pub cache_hit: Timing,
    /// Requests with at least one row not in the cache, and the time spent
    /// looking up and storing rows (not the engine's time).
    pub cache_miss: Timing,
}

fn sum(items: impl Iterator<Item = Timing>) -> Timing {
    items.fold(Timing::default(), |a, b| Timing {
        count: a.count + b.count,
        ns: a.ns + b.ns,
    })
}

/// Triton's per-version `inference_stats` totals, summed over the
/// priority classes and batch sizes of [`TritonStats`]. The HTTP
/// and gRPC statistics both answer from these.
///
/// With the result cache, Triton's rules hold: a request answered from the
/// cache counts in `success`, `queue` and `cache_hit`, never in the
/// compute counters; a request with rows the engine had to compute counts
/// in `cache_miss` as well as in the usual ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TritonTotals {
    pub success: Timing,
    pub fail: Timing,
    pub queue: Timing,
    pub compute_input: Timing,
    pub compute_infer: Timing,
    pub compute_output: Timing,
    pub cache_hit: Timing,
    pub cache_miss: Timing,
}

impl TritonTotals {
    pub fn of(stats: &TritonStats) -> Self {
        let TritonStats {
            scheduler: stats,
            cache_hit,
            cache_miss,
        } = stats;
        let classes = &stats.classes;
        let compute_infer = sum(classes.iter().map(|c| c.compute_infer));
        // Triton counts every compute phase per request, and perf_analyzer
        // refuses statistics whose three compute counts differ: the
        // gathering and scattering time, measured per batch, is reported
        // over the same request count as the engine time.
        let per_request = |batch_total: Timing| Timing {
            count: compute_infer.count,
            ns: batch_total.ns,
        };
        TritonTotals {
            success: sum(classes.iter().map(|c| c.success)),
            fail: sum(classes.iter().map(|c| c.fail)),
            queue: sum(classes.iter().map(|c| c.queue)),
            compute_input: per_request(sum(stats.batches.iter().map(|b| b.compute_input))),
            compute_infer,
            compute_output: per_request(sum(stats.batches.iter().map(|b| b.compute_output))),
            cache_hit: *cache_hit,
            cache_miss: *cache_miss,
        }
    }
}
