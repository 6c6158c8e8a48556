//! The batcher task and the engine worker threads.
//!
//! The task owns the [`PriorityQueue`], the idle workers, the batches
//! parked between two chunks, the per-instance engine-time models and the
//! arrival-rate estimate. It wakes for: a new request (admitted or refused
//! at once), a worker that finished a chunk (its time refits that
//! instance's model; the batch comes back if rows remain), the earliest
//! request deadline (expired requests are answered 503 there, even while
//! every worker is busy: the timer does not depend on batch formation,
//! Triton #7512), the moment the next batch is due, and the adaptive
//! controller's tick.
//!
//! Real-time isolation comes from three rules (docs/scheduling.md):
//! * a batch led by a class with a latency target is padded with lower
//!   classes only while the fit predicts it still meets that target
//!   ([`BatchLimits`]);
//! * a batch of lower classes runs in chunks sized so that one chunk plus
//!   a one-row batch fit the tightest higher target; between chunks an
//!   idle worker takes waiting work of a strictly higher class first;
//! * workers may be reserved for some classes ([`WorkerPlan`]); an idle
//!   reserved worker is offered work before a general one, and among
//!   workers of the same classes the one at the lowest niceness first;
//! * under overload lower classes are refused first: while a class is
//!   refused for capacity, lower classes are shed at admission and their
//!   queued requests answered 429 at once.
//!
//! The task runs on an OS thread of its own (unless
//! [`SchedulerConfig::own_thread`] is off, as in tests on the paused
//! clock), so request decoding on the server's runtime never delays a
//! dispatch. Workers run the engine ([`InFlight::run_chunk`]), answer each request
//! whose rows are complete through its oneshot, and report back; their
//! loop is in `worker`.

use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use tickserve_engine::{Engine, EngineError};
use tickserve_telemetry as telemetry;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::adaptive::{KeepUp, Observation};
use crate::estimate::{LatencyModel, RateEstimator, WaitScale};
use crate::inflight::{Answered, InFlight};
use crate::monitor::ResourceMonitor;
use crate::priority::{ClassSet, Priority};
use crate::queue::{BatchLimits, PriorityQueue, Taken};
use crate::stats::SchedulerStats;
use crate::{Request, SchedulerCommand, SchedulerConfig, SchedulerError, WorkerPlan};

mod admission;
mod worker;

use worker::{Done, Niceness, engine_worker, pin_to};

/// Batches the latency fit looks back on, per instance.
const MODEL_WINDOW: usize = 64;
/// Time constant of the arrival-rate estimate.
const RATE_TAU: Duration = Duration::from_millis(50);
/// Weight of the newest sample in the per-call overhead average.
const OVERHEAD_WEIGHT: f64 = 0.05;
/// Priority-1 latencies kept per controller interval (bounded memory).
const P99_WINDOW: usize = 4096;
/// How long after a refusal of a class the classes below it are shed.
const SHED_WINDOW: Duration = Duration::from_secs(1);
/// How long after the last request of a class with a latency target the
/// batches below it keep running in chunks. Without such traffic, chunks
/// would only cost throughput.
const CHUNKING_WINDOW: Duration = Duration::from_secs(10);

pub(crate) fn start(
    engine: Arc<dyn Engine>,
    config: Arc<SchedulerConfig>,
    stats: Arc<SchedulerStats>,
    command_rx: mpsc::Receiver<SchedulerCommand>,
) {
    let plans = config.workers();
    let targeted = ClassSet::of(
        Priority::ALL
            .into_iter()
            .filter(|&class| config.class(class).target_latency.is_some()),
    );
    // Workers report "done" here; one slot per worker is enough as each
    // sends at most once per job.
    let (done_tx, done_rx) = mpsc::channel(plans.len().max(1));
    let mut workers = Vec::with_capacity(plans.len());
    for (index, plan) in plans.into_iter().enumerate() {
        // Capacity 1: a worker is only given a job when it is idle.
        let (job_tx, job_rx) = std_mpsc::sync_channel::<InFlight>(1);
        let engine = Arc::clone(&engine);
        let done_tx = done_tx.clone();
        let (model, version) = (config.model.clone(), config.version.clone());
        let stats = Arc::clone(&stats);
        // Reserved for classes that all have a latency target: on the
        // real-time path (crate::os_thread).
        let realtime = plan.classes.len() < Priority::LEVELS && targeted.covers(plan.classes);
        let spawned = std::thread::Builder::new()
            .name(format!("engine-{index}"))
            .spawn(move || {
                pin_to(plan.core, &model, index);
                let niceness = Niceness::of_this_thread(plan.nice, targeted, &model, index);
                if realtime {
                    crate::os_thread::enter_request_path("engine worker");
                }
                engine_worker(
                    index,
                    &*engine,
                    (&model, &version),
                    &stats,
                    &job_rx,
                    &done_tx,
                    niceness,
                );
            });
        match spawned {
            Ok(_) => workers.push(Worker {
                jobs: job_tx,
                plan,
                busy_until: None,
                sent_at: None,
            }),
            Err(e) => {
                tracing::error!(model = %config.model, error = %e, "cannot start engine thread")
            }
        }
    }
    let monitor = config.adaptive.enabled.then(ResourceMonitor::global);
    let own_thread = config.own_thread;
    let model = config.model.clone();
    let batcher = Batcher::new(config, stats, workers, monitor);
    let task = batcher.run(command_rx, done_rx);
    if !own_thread {
        tokio::spawn(task);
        return;
    }
    // Its own OS thread and runtime: under load the protocol front end
    // fills the server's runtime with request decoding, and a batcher
    // polled behind it would leave the engine idle between batches.
    let spawned = std::thread::Builder::new()
        .name(format!("batcher-{model}"))
        .spawn(move || {
            crate::os_thread::enter_request_path("batcher");
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(runtime) => runtime.block_on(task),
                Err(e) => tracing::error!(model, error = %e, "cannot start the batcher runtime"),
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the batcher thread");
    }
}

/// An engine worker thread as the batcher sees it.
struct Worker {
    jobs: std_mpsc::SyncSender<InFlight>,
    plan: WorkerPlan,
    /// When its running chunk is predicted to finish; `None` when idle.
    busy_until: Option<Instant>,
    /// When its running chunk was sent to it.
    sent_at: Option<Instant>,
}

/// Orders idle workers as they are offered work
/// ([`WorkerPlan::offer_rank`]). Stable: among equal ranks the worker idle
/// longest stays first.
fn sort_in_offer_order(idle: &mut [usize], workers: &[Worker]) {
    idle.sort_by_key(|&w| workers[w].plan.offer_rank());
}

/// Metric handles of one class.
struct ClassMetrics {
    queue_length: Gauge,
    queue_wait: Histogram,
    rejected_queue_full: Counter,
    rejected_deadline: Counter,
    rejected_shed: Counter,
    expired: Counter,
    wait_scale: Gauge,
}

struct Batcher {
    config: Arc<SchedulerConfig>,
    stats: Arc<SchedulerStats>,
    queue: PriorityQueue<Request>,
    workers: Vec<Worker>,
    /// Idle workers in offer order ([`WorkerPlan::offer_rank`]): a class
    /// with a reserved instance goes there before taking a general one,
    /// and a scavenger at a high niceness gets work last.
    idle: Vec<usize>,
    /// Chunked batches between two chunks.
    parked: Vec<InFlight>,
    /// Whether the last parked batch resumed ahead of waiting higher
    /// classes was starving (so the next one is not: see `next_work`).
    resumed_starving_last: bool,
    /// Per class: its latency target.
    targets: [Option<Duration>; Priority::LEVELS],
    /// Per class: when a request of it was last refused for capacity.
    refused_at: [Option<Instant>; Priority::LEVELS],
    /// Per class: when a request of it last arrived.
    arrived_at: [Option<Instant>; Priority::LEVELS],
    models: Vec<LatencyModel>,
    /// Per class: its arrival rate, rows/s.
    arrivals: [RateEstimator; Priority::LEVELS],
    /// Per worker and class: the share of that class's rows the worker is
    /// expected to run ([`class_shares`]).
    shares: Vec<[f64; Priority::LEVELS]>,
    /// Per class: rows that arrived (admitted or not) since the controller
    /// last ran, and when that was.
    interval_rows: [usize; Priority::LEVELS],
    interval_start: Instant,
    /// Average time a chunk takes from dispatch to its report beyond its
    /// engine time, seconds (see `Batcher::service_rate`).
    call_overhead: f64,
    /// Per class: how many times longer than predicted its admitted
    /// requests have lately waited (a lower class's waits grow with the
    /// higher classes' traffic, which says nothing about the engine).
    wait_scales: [WaitScale; Priority::LEVELS],
    live_max: usize,
    monitor: Option<Arc<ResourceMonitor>>,
    highest_latencies: Vec<Duration>,
    class_metrics: Vec<ClassMetrics>,
    dropped: Counter,
    live_max_gauge: Gauge,
    chunk_rows_gauge: Gauge,
}

impl Batcher {
    fn new(
        config: Arc<SchedulerConfig>,
        stats: Arc<SchedulerStats>,
        workers: Vec<Worker>,
        monitor: Option<Arc<ResourceMonitor>>,
    ) -> Self {
        let (model, version) = (config.model.clone(), config.version.clone());
        let class_metrics = Priority::ALL
            .iter()
            .map(|p| {
                let label = p.label();
                let rejected = |reason: &'static str| {
                    counter!(telemetry::REJECTIONS_TOTAL, "model" => model.clone(), "version" => version.clone(), "priority" => label, "reason" => reason)
                };
                ClassMetrics {
                    queue_length: gauge!(telemetry::QUEUE_LENGTH, "model" => model.clone(), "version" => version.clone(), "priority" => label),
                    queue_wait: histogram!(telemetry::QUEUE_WAIT, "model" => model.clone(), "version" => version.clone(), "priority" => label),
                    rejected_queue_full: rejected(telemetry::rejection::QUEUE_FULL),
                    rejected_deadline: rejected(telemetry::rejection::DEADLINE),
                    rejected_shed: rejected(telemetry::rejection::SHED),
                    expired: rejected(telemetry::rejection::TIMEOUT_EXPIRED),
                    wait_scale: gauge!(telemetry::ADMISSION_WAIT_SCALE, "model" => model.clone(), "version" => version.clone(), "priority" => label),
                }
            })
            .collect();
        let queue = PriorityQueue::new(
            config.classes.clone().map(|c| c.max_queue_delay),
            config.classes.clone().map(|c| c.max_queue_size),
            config.aging,
        );
        let live_max_gauge = gauge!(telemetry::ADAPTIVE_BATCH_SIZE, "model" => model.clone(), "version" => version.clone());
        live_max_gauge.set(config.max_batch_size as f64);
        let n = workers.len();
        let plans: Vec<ClassSet> = workers.iter().map(|w| w.plan.classes).collect();
        let mut idle: Vec<usize> = (0..n).collect();
        sort_in_offer_order(&mut idle, &workers);
        Batcher {
            live_max: config.max_batch_size.max(1),
            stats,
            queue,
            idle,
            parked: Vec::new(),
            resumed_starving_last: false,
            targets: config.classes.clone().map(|c| c.target_latency),
            refused_at: [None; Priority::LEVELS],
            arrived_at: [None; Priority::LEVELS],
            models: vec![LatencyModel::new(MODEL_WINDOW); n.max(1)],
            workers,
            arrivals: std::array::from_fn(|_| RateEstimator::new(RATE_TAU)),
            shares: class_shares(&plans),
            interval_rows: [0; Priority::LEVELS],
            interval_start: Instant::now(),
            call_overhead: 0.0,
            wait_scales: std::array::from_fn(|_| WaitScale::default()),
            monitor,
            highest_latencies: Vec::new(),
            class_metrics,
            dropped: counter!(telemetry::DROPPED_TOTAL, "model" => model.clone(), "version" => version.clone()),
            live_max_gauge,
            chunk_rows_gauge: gauge!(telemetry::CHUNK_ROWS, "model" => model, "version" => version),
            config,
        }
    }

    /// Index of the engine-time model for `worker`: its own, or that of any
    /// instance that has samples (instances run the same engine).
    fn model_index(&self, worker: Option<usize>) -> usize {
        worker
            .filter(|&w| self.models.get(w).is_some_and(LatencyModel::has_samples))
            .or_else(|| self.models.iter().position(LatencyModel::has_samples))
            .unwrap_or(0)
    }

    fn model_for(&self, worker: Option<usize>) -> &LatencyModel {
        &self.models[self.model_index(worker)]
    }

    /// Rows/s that `worker` is expected to run: its share of each class's
    /// arrivals, given per class as `rate_of`.
    fn worker_rate(&self, worker: usize, rate_of: impl Fn(usize) -> f64) -> f64 {
        self.shares.get(worker).map_or(0.0, |shares| {
            shares
                .iter()
                .enumerate()
                .map(|(class, share)| share * rate_of(class))
                .sum()
        })
    }

    /// Rows worth waiting for before an idle engine starts: from the
    /// arrivals of the classes this worker runs, so a worker reserved for
    /// real-time classes does not wait for rows that the flood of a class
    /// it does not serve makes likely.
    fn fill_rows(&self, now: Instant, worker: usize) -> usize {
        if !self.config.work_conserving {
            return self.live_max;
        }
        let rate = self.worker_rate(worker, |class| self.arrivals[class].rate(now));
        match self
            .model_for(Some(worker))
            .rows_to_keep_up(rate, self.call_overhead)
        {
            Some(rows) => (rows.ceil() as usize).clamp(1, self.live_max),
            None => self.live_max,
        }
    }

    fn answer_expired(&mut self, now: Instant, expired: Vec<(Request, Priority)>) {
        for (request, priority) in expired {
            self.wait_scales[request.priority.index()].calibrate(
                request.predicted_wait,
                now.saturating_duration_since(request.arrived),
            );
            self.stats.class(priority).count_expired();
            self.class_metrics[priority.index()].expired.increment(1);
            let error = SchedulerError::TimeoutExpired {
                model: self.config.model.clone(),
                priority,
                timeout: request.timeout,
                retry_after: self.retry_after(now, priority),
            };
            let _ = request.response_tx.send(Err(error));
        }
    }

    fn finished(&mut self, done: Done) {
        let now = Instant::now();
        if let Some(sent) = self.workers.get(done.worker).and_then(|w| w.sent_at) {
            let overhead = now
                .saturating_duration_since(sent)
                .saturating_sub(done.took);
            self.call_overhead += OVERHEAD_WEIGHT * (overhead.as_secs_f64() - self.call_overhead);
        }
        if done.clean
            && let Some(model) = self.models.get_mut(done.worker)
        {
            model.record(done.rows, done.took);
        }
        if let Some(worker) = self.workers.get_mut(done.worker) {
            worker.busy_until = None;
            worker.sent_at = None;
            self.idle.push(done.worker);
            sort_in_offer_order(&mut self.idle, &self.workers);
        }
        for Answered {
            priority,
            arrived,
            ok,
        } in done.answered
        {
            let took = now.saturating_duration_since(arrived);
            let class = self.stats.class(priority);
            if ok {
                class.record_success(took);
            } else {
                class.record_fail(took);
            }
            if priority == Priority::HIGHEST && self.highest_latencies.len() < P99_WINDOW {
                self.highest_latencies.push(took);
            }
        }
        if let Some(rest) = done.rest {
            self.parked.push(rest);
        }
    }

    /// Rows per engine call for a batch whose best class is `class`: the
    /// most rows that fit the tightest target of a higher class, less one
    /// row's time (the waiting request's own batch). A batch with no
    /// targeted class above it that sent a request within
    /// [`CHUNKING_WINDOW`] runs in one call.
    fn chunk_rows(
        &self,
        now: Instant,
        class: Priority,
        rows: usize,
        model: &LatencyModel,
    ) -> usize {
        if !self.config.chunking {
            return rows;
        }
        let active = |p: &Priority| {
            self.arrived_at[p.index()]
                .is_some_and(|at| now.saturating_duration_since(at) < CHUNKING_WINDOW)
        };
        let tightest = Priority::ALL[..class.index()]
            .iter()
            .filter(|p| active(p))
            .filter_map(|p| self.targets[p.index()])
            .min();
        let Some(target) = tightest else {
            return rows;
        };
        let chunk = match self.config.chunk_rows {
            Some(chunk) => chunk,
            None => model
                .rows_within(target.saturating_sub(model.predict(1)))
                .unwrap_or(rows),
        };
        let chunk = chunk.clamp(1, rows.max(1));
        self.chunk_rows_gauge.set(chunk as f64);
        chunk
    }

    /// The parked batch `worker` should resume: highest class, then
    /// oldest, among those whose classes it serves.
    fn resumable(&self, classes: ClassSet) -> Option<usize> {
        self.parked
            .iter()
            .enumerate()
            .filter(|(_, b)| classes.covers(b.classes()))
            .min_by_key(|(_, b)| (b.class(), b.oldest()))
            .map(|(i, _)| i)
    }

    /// What an idle `worker` runs next, if anything is due: waiting work of
    /// a class strictly higher than every parked batch it could resume,
    /// else the parked batch, else a new batch when one is due.
    fn next_work(&mut self, worker: usize, now: Instant, flush: bool) -> Option<InFlight> {
        let classes = self.workers[worker].plan.classes;
        if let Some(index) = self.resumable(classes) {
            let parked = &self.parked[index];
            let waiting = self.queue.best_waiting(now, classes);
            let higher_waits = waiting.is_some_and(|w| w < parked.class());
            // Starvation guard for parked batches: one whose oldest request
            // has gained every aging level resumes ahead of higher classes,
            // every other time (at most half the engine).
            let starving = now.saturating_duration_since(parked.oldest())
                >= self.config.aging.fully_aged_after();
            let resume = !higher_waits || (starving && !self.resumed_starving_last);
            if higher_waits {
                self.resumed_starving_last = resume;
            }
            if resume {
                return Some(self.parked.swap_remove(index));
            }
            return self.take_batch(worker, now);
        }
        if self.queue.is_empty_in(classes) {
            return None;
        }
        if !flush && self.batch_due(worker, now).is_none_or(|at| at > now) {
            return None;
        }
        self.take_batch(worker, now)
    }

    /// When a new batch for `worker` is due, from the waiting requests of
    /// its classes; `None` when none wait.
    fn batch_due(&self, worker: usize, now: Instant) -> Option<Instant> {
        let classes = self.workers[worker].plan.classes;
        let exec = self
            .model_for(Some(worker))
            .predict(self.queue.rows_in(classes).min(self.live_max));
        self.queue
            .next_dispatch_in(now, classes, self.fill_rows(now, worker), exec)
    }

    /// A new batch from the queue for `worker`: only its classes, at most
    /// the live batch size, lower classes only within the latency budget.
    fn take_batch(&mut self, worker: usize, now: Instant) -> Option<InFlight> {
        let classes = self.workers[worker].plan.classes;
        let index = self.model_index(Some(worker));
        loop {
            let Taken {
                items,
                rows,
                dropped,
                expired,
            } = {
                let model = &self.models[index];
                let predict = |rows: usize| model.predict(rows);
                let limits = BatchLimits {
                    max_rows: self.live_max,
                    classes,
                    targets: self.targets,
                    predict: &predict,
                };
                self.queue.take_within(now, &limits)
            };
            self.dropped.increment(dropped.len() as u64);
            self.answer_expired(now, expired);
            if items.is_empty() {
                if self.queue.is_empty_in(classes) {
                    return None;
                }
                continue;
            }
            let mut requests = Vec::with_capacity(items.len());
            for chosen in items {
                let waited = now.saturating_duration_since(chosen.arrived);
                self.class_metrics[chosen.priority.index()]
                    .queue_wait
                    .record(waited.as_secs_f64());
                self.stats.class(chosen.priority).record_queue(waited);
                let mut request = chosen.item;
                self.wait_scales[request.priority.index()]
                    .calibrate(request.predicted_wait, waited);
                request.spans.end_queue();
                requests.push(request);
            }
            let class = requests
                .iter()
                .map(|r| r.priority)
                .min()
                .unwrap_or(Priority::LOWEST);
            let chunk = self.chunk_rows(now, class, rows, &self.models[index]);
            return Some(InFlight::new(requests, chunk));
        }
    }

    /// Drops parked batches nobody waits for any more.
    fn drop_abandoned(&mut self) {
        let before = self.parked.len();
        self.parked.retain(|b| !b.is_abandoned());
        self.dropped.increment((before - self.parked.len()) as u64);
    }

    /// Hands due work to idle workers. `flush`: nothing new can arrive, so
    /// do not wait for anyone.
    fn dispatch(&mut self, flush: bool) {
        self.drop_abandoned();
        'next: loop {
            let now = Instant::now();
            for position in 0..self.idle.len() {
                let worker = self.idle[position];
                if let Some(batch) = self.next_work(worker, now, flush) {
                    self.idle.remove(position);
                    self.send(worker, batch, now);
                    continue 'next;
                }
            }
            break;
        }
    }

    fn send(&mut self, worker: usize, batch: InFlight, now: Instant) {
        let predicted = self.model_for(Some(worker)).predict(batch.next_chunk());
        self.workers[worker].busy_until = Some(now + predicted);
        self.workers[worker].sent_at = Some(now);
        if let Err(std_mpsc::TrySendError::Full(job) | std_mpsc::TrySendError::Disconnected(job)) =
            self.workers[worker].jobs.try_send(batch)
        {
            // The worker thread died (it never panics on an engine error);
            // answer its job rather than lose it.
            tracing::error!(model = %self.config.model, worker, "engine worker is gone");
            fail(
                job.into_requests(),
                &SchedulerError::Engine(EngineError::Execution(
                    "engine worker thread is gone".into(),
                )),
            );
        }
    }

    /// Which batch sizes keep up with the rows that arrived since the
    /// last call: the largest floor over the workers, each with its own
    /// engine-time fit and its share of the classes it serves (a worker
    /// reserved for real-time classes sees only their rows, a general one
    /// the flood); `None` before the engine time has been measured. Starts
    /// the next interval.
    fn keep_up(&mut self, now: Instant) -> Option<KeepUp> {
        let elapsed = now.saturating_duration_since(self.interval_start);
        let rows = std::mem::take(&mut self.interval_rows);
        self.interval_start = now;
        if !self.model_for(None).has_samples() || elapsed.is_zero() {
            return None;
        }
        let seconds = elapsed.as_secs_f64();
        (0..self.workers.len())
            .map(|worker| {
                let rate = self.worker_rate(worker, |class| rows[class] as f64 / seconds);
                match self
                    .model_for(Some(worker))
                    .rows_to_keep_up(rate, self.call_overhead)
                {
                    Some(rows) => KeepUp::From(rows.ceil() as usize),
                    None => KeepUp::Never,
                }
            })
            .max_by_key(|keep_up| match keep_up {
                KeepUp::From(rows) => *rows,
                KeepUp::Never => usize::MAX,
            })
    }

    fn adapt(&mut self) {
        let mut latencies = std::mem::take(&mut self.highest_latencies);
        let p99_highest = (!latencies.is_empty()).then(|| {
            latencies.sort_unstable();
            latencies[(latencies.len() * 99).div_ceil(100).saturating_sub(1)]
        });
        // Memory: the host's, or a GPU's when fuller (the engine's batches
        // live there on a GPU).
        let memory = self
            .monitor
            .as_ref()
            .and_then(|m| match (m.memory(), m.gpu_memory()) {
                (Some(host), Some(gpu)) => Some(host.max(gpu)),
                (host, gpu) => host.or(gpu),
            });
        let seen = Observation {
            cpu: self.monitor.as_ref().and_then(|m| m.cpu()),
            gpu: self.monitor.as_ref().and_then(|m| m.gpu()),
            memory,
            p99_highest,
            keep_up: self.keep_up(Instant::now()),
        };
        let (next, why) =
            self.config
                .adaptive
                .step(self.live_max, self.config.max_batch_size, &seen);
        if next != self.live_max {
            tracing::debug!(model = %self.config.model, from = self.live_max, to = next, ?why, ?seen, "adaptive batch size");
        }
        self.live_max = next;
        self.stats.set_live_batch_size(next);
        self.live_max_gauge.set(next as f64);
    }

    fn publish(&self, now: Instant) {
        for p in Priority::ALL {
            let waiting = self.queue.len_of(p);
            let metrics = &self.class_metrics[p.index()];
            metrics.queue_length.set(waiting as f64);
            metrics.wait_scale.set(self.wait_scales[p.index()].get());
            self.stats.class(p).set_queue_length(waiting);
        }
        self.stats
            .set_retry_hint(self.retry_after(now, self.config.default_priority));
    }

    /// Whether nothing is queued, parked or running.
    fn is_quiet(&self) -> bool {
        self.queue.is_empty() && self.parked.is_empty() && self.idle.len() == self.workers.len()
    }

    async fn run(
        mut self,
        mut command_rx: mpsc::Receiver<SchedulerCommand>,
        mut done_rx: mpsc::Receiver<Done>,
    ) {
        let mut open = true;
        let mut tick =
            tokio::time::interval(self.config.adaptive.interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            let expired = self.queue.expire(now);
            self.answer_expired(now, expired);
            self.dispatch(!open);
            if self.workers.is_empty() {
                // No engine thread could start: refuse everything that waits.
                let error = SchedulerError::Engine(EngineError::Execution(
                    "no engine thread is running".into(),
                ));
                fail(self.queue.drain(), &error);
                for batch in self.parked.drain(..) {
                    fail(batch.into_requests(), &error);
                }
            }
            self.publish(now);
            if !open && self.is_quiet() {
                break;
            }
            let next_expiry = self.queue.next_expiry();
            // The earliest moment any idle worker has a batch due (a
            // reserved worker may have nothing while a general one waits).
            let now = Instant::now();
            let next_batch = self
                .idle
                .iter()
                .filter_map(|&w| self.batch_due(w, now))
                .min();
            tokio::select! {
                // A finished chunk first: the engine being free changes
                // every other decision.
                biased;
                Some(done) = done_rx.recv() => self.finished(done),
                command = command_rx.recv(), if open => match command {
                    Some(SchedulerCommand::Enqueue(request)) => self.admit(request),
                    None => open = false,
                },
                () = sleep_until(next_expiry), if next_expiry.is_some() => {}
                () = sleep_until(next_batch), if next_batch.is_some() => {}
                _ = tick.tick(), if self.config.adaptive.enabled => self.adapt(),
            }
        }
        tracing::debug!(model = %self.config.model, "batcher stopped");
    }
}

/// Per worker and class: the share of the class's rows the worker is
/// expected to run. A class's rows go to the workers with the fewest
/// classes among those that serve it, evenly: idle workers are offered
/// work most reserved first, so a class with a reserved worker runs there
/// and a general worker sees the classes no reserved worker covers.
fn class_shares(plans: &[ClassSet]) -> Vec<[f64; Priority::LEVELS]> {
    let mut shares = vec![[0.0; Priority::LEVELS]; plans.len()];
    for class in Priority::ALL {
        let narrowest = plans
            .iter()
            .filter(|plan| plan.contains(class))
            .map(|plan| plan.len())
            .min();
        let Some(narrowest) = narrowest else { continue };
        let takers: Vec<usize> = (0..plans.len())
            .filter(|&w| plans[w].contains(class) && plans[w].len() == narrowest)
            .collect();
        for &w in &takers {
            shares[w][class.index()] = 1.0 / takers.len() as f64;
        }
    }
    shares
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

fn fail(requests: Vec<Request>, error: &SchedulerError) {
    for request in requests {
        let _ = request.response_tx.send(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests;
