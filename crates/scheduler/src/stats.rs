//! Counters behind the statistics endpoint (Triton's `/stats` shape,
//! serving-systems.md §6, plus per-class counts). Atomics, written by the
//! batcher and the engine workers, read by [`SchedulerStats::snapshot`];
//! Prometheus metrics are recorded separately through `metrics`.
//!
//! Only what the scheduler sees is counted here; the server's result cache
//! keeps its own counters for requests it answers without the queue.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::priority::Priority;

/// A count and the total time of the counted events, Triton's `{count, ns}`
/// (also the server's counters for requests the result cache answers).
#[derive(Debug, Default)]
pub struct Timed {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Timed {
    /// One event that took `took`.
    pub fn add(&self, took: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.add_ns(took);
    }

    /// Time only, no event: added to an event counted elsewhere.
    pub fn add_ns(&self, took: Duration) {
        self.ns.fetch_add(
            took.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn read(&self) -> Timing {
        Timing {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// `{count, ns}` as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    pub count: u64,
    pub ns: u64,
}

/// Counters of one request class.
#[derive(Debug, Default)]
pub struct ClassStats {
    success: Timed,
    fail: Timed,
    queue: Timed,
    compute: Timed,
    rejected_queue_full: AtomicU64,
    rejected_deadline: AtomicU64,
    expired: AtomicU64,
    /// Requests waiting, as the batcher last published it.
    queue_length: AtomicUsize,
}

impl ClassStats {
    pub fn set_queue_length(&self, waiting: usize) {
        self.queue_length.store(waiting, Ordering::Relaxed);
    }

    pub fn count_rejected_queue_full(&self) {
        self.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_rejected_deadline(&self) {
        self.rejected_deadline.fetch_add(1, Ordering::Relaxed);
    }
    pub fn count_expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn record_success(&self, took: Duration) {
        self.success.add(took);
    }
    pub(crate) fn record_fail(&self, took: Duration) {
        self.fail.add(took);
    }
    pub(crate) fn record_queue(&self, waited: Duration) {
        self.queue.add(waited);
    }
    pub(crate) fn record_compute(&self, took: Duration) {
        self.compute.add(took);
    }
}

#[derive(Debug, Default)]
struct BatchSizeStats {
    input: Timed,
    infer: Timed,
    output: Timed,
}

/// Every counter of one model version.
#[derive(Debug)]
pub struct SchedulerStats {
    classes: [ClassStats; Priority::LEVELS],
    /// Index = batch size (rows); 0 unused.
    batches: Vec<BatchSizeStats>,
    inference_count: AtomicU64,
    execution_count: AtomicU64,
    last_inference_ms: AtomicU64,
    live_batch_size: AtomicUsize,
    retry_hint_ns: AtomicU64,
}

/// One class's counters as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassSnapshot {
    pub priority: Priority,
    pub success: Timing,
    pub fail: Timing,
    pub queue: Timing,
    pub compute_infer: Timing,
    pub rejected_queue_full: u64,
    pub rejected_deadline: u64,
    pub expired: u64,
    /// Requests waiting now.
    pub queue_length: usize,
}

/// One batch size's counters as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSnapshot {
    pub batch_size: usize,
    pub compute_input: Timing,
    pub compute_infer: Timing,
    pub compute_output: Timing,
}

/// Everything the statistics endpoint shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Rows run by the engine.
    pub inference_count: u64,
    /// Engine calls.
    pub execution_count: u64,
    /// Milliseconds since the epoch of the last engine call; 0 for never.
    pub last_inference_ms: u64,
    pub live_batch_size: usize,
    pub classes: Vec<ClassSnapshot>,
    /// Only sizes that ran.
    pub batches: Vec<BatchSnapshot>,
}

impl SchedulerStats {
    pub fn new(max_batch_size: usize) -> Self {
        SchedulerStats {
            classes: Default::default(),
            batches: (0..=max_batch_size)
                .map(|_| BatchSizeStats::default())
                .collect(),
            inference_count: AtomicU64::new(0),
            execution_count: AtomicU64::new(0),
            last_inference_ms: AtomicU64::new(0),
            live_batch_size: AtomicUsize::new(max_batch_size),
            retry_hint_ns: AtomicU64::new(Duration::from_millis(1).as_nanos() as u64),
        }
    }

    pub fn class(&self, priority: Priority) -> &ClassStats {
        &self.classes[priority.index()]
    }

    pub(crate) fn record_batch(
        &self,
        rows: usize,
        input: Duration,
        infer: Duration,
        output: Duration,
    ) {
        self.inference_count
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.execution_count.fetch_add(1, Ordering::Relaxed);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_inference_ms.store(now_ms, Ordering::Relaxed);
        if let Some(b) = self.batches.get(rows) {
            b.input.add(input);
            b.infer.add(infer);
            b.output.add(output);
        }
    }

    pub(crate) fn set_live_batch_size(&self, size: usize) {
        self.live_batch_size.store(size, Ordering::Relaxed);
    }

    pub(crate) fn set_retry_hint(&self, hint: Duration) {
        self.retry_hint_ns.store(
            hint.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// The batcher's latest estimate of when a refused client should retry.
    pub fn retry_hint(&self) -> Duration {
        Duration::from_nanos(self.retry_hint_ns.load(Ordering::Relaxed))
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            inference_count: self.inference_count.load(Ordering::Relaxed),
            execution_count: self.execution_count.load(Ordering::Relaxed),
            last_inference_ms: self.last_inference_ms.load(Ordering::Relaxed),
            live_batch_size: self.live_batch_size.load(Ordering::Relaxed),
            classes: Priority::ALL
                .iter()
                .map(|&priority| {
                    let c = self.class(priority);
                    ClassSnapshot {
                        priority,
                        success: c.success.read(),
                        fail: c.fail.read(),
                        queue: c.queue.read(),
                        compute_infer: c.compute.read(),
                        rejected_queue_full: c.rejected_queue_full.load(Ordering::Relaxed),
                        rejected_deadline: c.rejected_deadline.load(Ordering::Relaxed),
                        expired: c.expired.load(Ordering::Relaxed),
                        queue_length: c.queue_length.load(Ordering::Relaxed),
                    }
                })
                .collect(),
            batches: self
                .batches
                .iter()
                .enumerate()
                .filter(|(_, b)| b.infer.count.load(Ordering::Relaxed) > 0)
                .map(|(batch_size, b)| BatchSnapshot {
                    batch_size,
                    compute_input: b.input.read(),
                    compute_infer: b.infer.read(),
                    compute_output: b.output.read(),
                })
                .collect(),
        }
    }
}
