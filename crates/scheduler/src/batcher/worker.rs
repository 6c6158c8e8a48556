//! The engine worker threads of the batcher: each blocks on its job
//! channel, runs one chunk of a batch through the engine (with the retry on
//! halves inside [`InFlight::run_chunk`]), records the batch metrics,
//! answers the requests whose rows are complete and reports a [`Done`] back
//! to the batcher task.
//!
//! Between two chunks of a batch the worker reads which classes have work
//! waiting ([`Waiting`], published by the batcher). When none of the
//! classes it serves above the batch's does, it goes on with the next chunk
//! at once and says so in its report; otherwise it hands the rest of the
//! batch back, and the batcher gives the worker the higher work first.
//! Going on without the round trip matters when every core is busy: then
//! the batcher and the worker each wait for a core before the next chunk
//! starts, which cost a 2-thread instance a sixth of its background
//! throughput (docs/scheduling.md).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use metrics::{counter, histogram};
use tickserve_engine::Engine;
use tickserve_telemetry as telemetry;
use tokio::sync::mpsc;

use crate::inflight::{Answered, InFlight};
use crate::priority::ClassSet;
use crate::stats::SchedulerStats;

/// The classes with work waiting (queued requests or parked batches), as
/// the batcher last published them.
#[derive(Debug, Default)]
pub(super) struct Waiting(AtomicU8);

impl Waiting {
    pub(super) fn publish(&self, classes: ClassSet) {
        self.0.store(classes.bits(), Ordering::Release);
    }

    fn get(&self) -> ClassSet {
        ClassSet::from_bits(self.0.load(Ordering::Acquire))
    }
}

/// What a worker reports when a chunk is done.
pub(super) struct Done {
    pub(super) worker: usize,
    /// Rows of the chunk and its engine time; `clean` when it was one
    /// engine call (a split chunk says nothing about engine time).
    pub(super) rows: usize,
    pub(super) took: Duration,
    pub(super) clean: bool,
    pub(super) answered: Vec<Answered>,
    /// The batch, when rows of it remain and the worker hands it back.
    pub(super) rest: Option<InFlight>,
    /// The rows of the next chunk, when the worker went on with it.
    pub(super) continuing: Option<usize>,
}

/// Pins the calling thread to `core`, logging (not failing) when the OS
/// refuses: a worker on any core still serves.
pub(super) fn pin_to(core: Option<usize>, model: &str, worker: usize) {
    let Some(core) = core else { return };
    let pinned = core_affinity::get_core_ids()
        .and_then(|ids| ids.into_iter().find(|id| id.id == core))
        .is_some_and(core_affinity::set_for_current);
    if pinned {
        tracing::debug!(model, worker, core, "engine worker pinned");
    } else {
        tracing::warn!(
            model,
            worker,
            core,
            "cannot pin the engine worker to this core; it runs unpinned"
        );
    }
}

/// What one worker thread serves and shares with the batcher.
pub(super) struct WorkerContext<'a> {
    pub(super) index: usize,
    pub(super) engine: &'a dyn Engine,
    pub(super) model: &'a str,
    pub(super) version: &'a str,
    pub(super) stats: &'a SchedulerStats,
    /// The classes this worker serves.
    pub(super) classes: ClassSet,
    pub(super) waiting: &'a Waiting,
}

pub(super) fn engine_worker(
    context: WorkerContext<'_>,
    job_rx: &std_mpsc::Receiver<InFlight>,
    done_tx: &mpsc::Sender<Done>,
) {
    let WorkerContext {
        index,
        engine,
        model,
        version,
        stats,
        classes,
        waiting,
    } = context;
    let batch_size = histogram!(telemetry::BATCH_SIZE, "model" => model.to_owned(), "version" => version.to_owned());
    let execution = histogram!(telemetry::ENGINE_EXECUTION, "model" => model.to_owned(), "version" => version.to_owned());
    let batches = counter!(telemetry::BATCHES_TOTAL, "model" => model.to_owned(), "version" => version.to_owned());
    let retries = counter!(telemetry::ENGINE_RETRIES_TOTAL, "model" => model.to_owned(), "version" => version.to_owned());
    while let Ok(batch) = job_rx.recv() {
        let mut current = Some(batch);
        while let Some(mut batch) = current.take() {
            let rows = batch.next_chunk();
            let spans = batch.engine_spans(index);
            let run = batch.run_chunk(engine);
            for span in &spans {
                span.record("retries", run.retries);
            }
            // The engine spans end with the engine call, before the answers.
            drop(spans);
            let took = run.engine;
            // Metrics before the answers, so a client that reads them after
            // its response sees its own call.
            execution.record(took.as_secs_f64());
            batch_size.record(rows as f64);
            batches.increment(run.calls as u64);
            retries.increment(run.retries as u64);
            if run.retries > 0 {
                tracing::warn!(
                    model,
                    worker = index,
                    rows,
                    retries = run.retries,
                    "engine call failed; retried on halves"
                );
            }
            let scattering = std::time::Instant::now();
            let compute = batch.compute();
            let answered =
                batch.answer_complete(|a| stats.class(a.priority).record_compute(compute));
            stats.record_batch(rows, run.gather, took, scattering.elapsed());
            let higher_waiting = waiting
                .get()
                .intersects(ClassSet::above(batch.class()).and(classes));
            let (rest, continuing) = if batch.is_finished() {
                (None, None)
            } else if higher_waiting || batch.is_abandoned() {
                (Some(batch), None)
            } else {
                let next = batch.next_chunk();
                current = Some(batch);
                (None, Some(next))
            };
            let done = Done {
                worker: index,
                rows,
                took,
                clean: run.retries == 0,
                answered,
                rest,
                continuing,
            };
            if done_tx.blocking_send(done).is_err() {
                return;
            }
        }
    }
}
