//! The engine worker threads of the batcher: each blocks on its job
//! channel, runs one chunk of a batch through the engine (with the retry on
//! halves inside [`InFlight::run_chunk`]), records the batch metrics,
//! answers the requests whose rows are complete and reports a [`Done`] back
//! to the batcher task (with the batch, when rows of it remain).

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use metrics::{counter, histogram};
use tickserve_engine::Engine;
use tickserve_telemetry as telemetry;
use tokio::sync::mpsc;

use crate::inflight::{Answered, InFlight};
use crate::os_thread;
use crate::priority::{ClassSet, Priority};
use crate::stats::SchedulerStats;

/// What a worker reports when a chunk is done.
pub(super) struct Done {
    pub(super) worker: usize,
    /// Rows of the chunk and its engine time; `clean` when it was one
    /// engine call (a split chunk says nothing about engine time).
    pub(super) rows: usize,
    pub(super) took: Duration,
    pub(super) clean: bool,
    pub(super) answered: Vec<Answered>,
    /// The batch, when rows of it remain.
    pub(super) rest: Option<InFlight>,
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

/// The niceness an engine worker runs each chunk at: the group's `nice`
/// for background work, the thread's own for a batch led by a class with a
/// latency target. A general worker then yields its core to the front end
/// while it runs a background flood, but not while it serves real-time
/// rows (under real-time overload it runs them too).
pub(super) struct Niceness {
    background: i32,
    targeted: ClassSet,
    base: i32,
    current: i32,
}

impl Niceness {
    /// For the calling thread; `None` when the group sets no niceness or
    /// the OS cannot read it (logged).
    pub(super) fn of_this_thread(
        background: Option<i32>,
        targeted: ClassSet,
        model: &str,
        worker: usize,
    ) -> Option<Niceness> {
        let nice = background?;
        let base = match os_thread::current_nice() {
            Ok(base) => base,
            Err(error) => {
                tracing::warn!(model, worker, %error, "cannot read the engine worker's niceness; it keeps the process's");
                return None;
            }
        };
        if let Err(error) = os_thread::set_current_nice(nice) {
            tracing::warn!(model, worker, nice, %error, "cannot set the engine worker's niceness; it keeps the process's");
            return None;
        }
        // Lowering it again needs CAP_SYS_NICE or a RLIMIT_NICE that allows
        // it: without, the worker stays at `nice` for every batch.
        if let Err(error) = os_thread::set_current_nice(base) {
            tracing::warn!(
                model,
                worker,
                nice,
                %error,
                "the engine worker cannot return to its own niceness (needs CAP_SYS_NICE or RLIMIT_NICE): it runs every batch, real-time ones too, at this niceness"
            );
            return None;
        }
        Some(Niceness {
            background: nice,
            targeted,
            base,
            current: base,
        })
    }

    /// Sets the niceness for a batch led by `class`; logs (does not fail)
    /// when the OS refuses, and then stops trying.
    fn set_for(this: &mut Option<Niceness>, class: Priority, model: &str, worker: usize) {
        let Some(niceness) = this else { return };
        let wanted = if niceness.targeted.contains(class) {
            niceness.base
        } else {
            niceness.background
        };
        if wanted == niceness.current {
            return;
        }
        match os_thread::set_current_nice(wanted) {
            Ok(()) => niceness.current = wanted,
            Err(error) => {
                tracing::warn!(
                    model,
                    worker,
                    nice = wanted,
                    %error,
                    "cannot change the engine worker's niceness; it keeps its current one"
                );
                *this = None;
            }
        }
    }
}

pub(super) fn engine_worker(
    index: usize,
    engine: &dyn Engine,
    (model, version): (&str, &str),
    stats: &SchedulerStats,
    job_rx: &std_mpsc::Receiver<InFlight>,
    done_tx: &mpsc::Sender<Done>,
    mut niceness: Option<Niceness>,
) {
    let batch_size = histogram!(telemetry::BATCH_SIZE, "model" => model.to_owned(), "version" => version.to_owned());
    let execution = histogram!(telemetry::ENGINE_EXECUTION, "model" => model.to_owned(), "version" => version.to_owned());
    let batches = counter!(telemetry::BATCHES_TOTAL, "model" => model.to_owned(), "version" => version.to_owned());
    let retries = counter!(telemetry::ENGINE_RETRIES_TOTAL, "model" => model.to_owned(), "version" => version.to_owned());
    while let Ok(mut batch) = job_rx.recv() {
        Niceness::set_for(&mut niceness, batch.class(), model, index);
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
        let answered = batch.answer_complete(|a| stats.class(a.priority).record_compute(compute));
        stats.record_batch(rows, run.gather, took, scattering.elapsed());
        let rest = (!batch.is_finished()).then_some(batch);
        let done = Done {
            worker: index,
            rows,
            took,
            clean: run.retries == 0,
            answered,
            rest,
        };
        if done_tx.blocking_send(done).is_err() {
            break;
        }
    }
}
