//! The batcher task and the engine worker threads.
//!
//! The task owns the [`PriorityQueue`], the list of idle workers, the
//! per-instance engine-time models and the arrival-rate estimate. It wakes
//! for: a new request (admitted or refused at once), a worker that
//! finished (its batch time refits that instance's model), the earliest
//! request deadline (expired requests are answered 503 there, even while
//! every worker is busy: the timer does not depend on batch formation,
//! Triton #7512), the moment the next batch is due, and the adaptive
//! controller's tick. Workers run the engine, answer every request of the
//! batch through its oneshot, and report back.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use tickserve_engine::{Batch, Engine, EngineError};
use tickserve_telemetry as telemetry;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::adaptive::Observation;
use crate::estimate::{LatencyModel, RateEstimator};
use crate::monitor::ResourceMonitor;
use crate::priority::Priority;
use crate::queue::{PriorityQueue, Taken};
use crate::stats::SchedulerStats;
use crate::{Request, SchedulerCommand, SchedulerConfig, SchedulerError};

/// A batch on its way to a worker thread.
struct WorkerJob {
    requests: Vec<Request>,
    rows: usize,
}

/// What a worker reports when its batch is done.
struct Done {
    worker: usize,
    rows: usize,
    took: Duration,
    /// Class, arrival and success of every request it answered.
    answered: Vec<(Priority, Instant, bool)>,
}

/// Batches the latency fit looks back on, per instance.
const MODEL_WINDOW: usize = 64;
/// Time constant of the arrival-rate estimate.
const RATE_TAU: Duration = Duration::from_millis(50);
/// Priority-1 latencies kept per controller interval (bounded memory).
const P99_WINDOW: usize = 4096;

pub(crate) fn start(
    engine: Arc<dyn Engine>,
    config: Arc<SchedulerConfig>,
    stats: Arc<SchedulerStats>,
    command_rx: mpsc::Receiver<SchedulerCommand>,
) {
    let instances = config.instances.max(1);
    // Workers report "done" here; one slot per worker is enough as each
    // sends at most once per job.
    let (done_tx, done_rx) = mpsc::channel(instances);
    let mut workers = Vec::with_capacity(instances);
    for index in 0..instances {
        // Capacity 1: a worker is only given a job when it is idle.
        let (job_tx, job_rx) = std_mpsc::sync_channel::<WorkerJob>(1);
        let engine = Arc::clone(&engine);
        let done_tx = done_tx.clone();
        let model = config.model.clone();
        let stats = Arc::clone(&stats);
        let spawned = std::thread::Builder::new()
            .name(format!("engine-{index}"))
            .spawn(move || engine_worker(index, &*engine, &model, &stats, &job_rx, &done_tx));
        match spawned {
            Ok(_) => workers.push(job_tx),
            Err(e) => {
                tracing::error!(model = %config.model, error = %e, "cannot start engine thread")
            }
        }
    }
    let monitor = config.adaptive.enabled.then(ResourceMonitor::global);
    let batcher = Batcher::new(config, stats, workers, monitor);
    tokio::spawn(batcher.run(command_rx, done_rx));
}

/// Metric handles of one class.
struct ClassMetrics {
    queue_length: Gauge,
    queue_wait: Histogram,
    rejected_queue_full: Counter,
    rejected_deadline: Counter,
    expired: Counter,
}

struct Batcher {
    config: Arc<SchedulerConfig>,
    stats: Arc<SchedulerStats>,
    queue: PriorityQueue<Request>,
    workers: Vec<std_mpsc::SyncSender<WorkerJob>>,
    idle: Vec<usize>,
    /// Per worker: when its running batch is predicted to finish.
    busy_until: Vec<Option<Instant>>,
    models: Vec<LatencyModel>,
    arrivals: RateEstimator,
    live_max: usize,
    monitor: Option<Arc<ResourceMonitor>>,
    highest_latencies: Vec<Duration>,
    class_metrics: Vec<ClassMetrics>,
    dropped: Counter,
    live_max_gauge: Gauge,
}

impl Batcher {
    fn new(
        config: Arc<SchedulerConfig>,
        stats: Arc<SchedulerStats>,
        workers: Vec<std_mpsc::SyncSender<WorkerJob>>,
        monitor: Option<Arc<ResourceMonitor>>,
    ) -> Self {
        let model = config.model.clone();
        let class_metrics = Priority::ALL
            .iter()
            .map(|p| {
                let label = p.label();
                let rejected = |reason: &'static str| {
                    counter!(telemetry::REJECTIONS_TOTAL, "model" => model.clone(), "priority" => label, "reason" => reason)
                };
                ClassMetrics {
                    queue_length: gauge!(telemetry::QUEUE_LENGTH, "model" => model.clone(), "priority" => label),
                    queue_wait: histogram!(telemetry::QUEUE_WAIT, "model" => model.clone(), "priority" => label),
                    rejected_queue_full: rejected(telemetry::rejection::QUEUE_FULL),
                    rejected_deadline: rejected(telemetry::rejection::DEADLINE),
                    expired: rejected(telemetry::rejection::TIMEOUT_EXPIRED),
                }
            })
            .collect();
        let queue = PriorityQueue::new(
            config.classes.clone().map(|c| c.max_queue_delay),
            config.classes.clone().map(|c| c.max_queue_size),
            config.aging,
        );
        let live_max_gauge = gauge!(telemetry::ADAPTIVE_BATCH_SIZE, "model" => model.clone());
        live_max_gauge.set(config.max_batch_size as f64);
        let n = workers.len();
        Batcher {
            live_max: config.max_batch_size.max(1),
            stats,
            queue,
            idle: (0..n).rev().collect(),
            busy_until: vec![None; n],
            models: vec![LatencyModel::new(MODEL_WINDOW); n.max(1)],
            workers,
            arrivals: RateEstimator::new(RATE_TAU),
            monitor,
            highest_latencies: Vec::new(),
            class_metrics,
            dropped: counter!(telemetry::DROPPED_TOTAL, "model" => model),
            live_max_gauge,
            config,
        }
    }

    /// The engine-time model of `worker`, or of any instance that has
    /// samples (instances run the same engine).
    fn model_for(&self, worker: Option<usize>) -> &LatencyModel {
        worker
            .and_then(|w| self.models.get(w))
            .filter(|m| m.has_samples())
            .or_else(|| self.models.iter().find(|m| m.has_samples()))
            .unwrap_or(&self.models[0])
    }

    /// Rows per second all instances serve at the live batch size; `None`
    /// before the first batch has been measured.
    fn service_rate(&self) -> Option<f64> {
        let full = self.model_for(None).predict(self.live_max).as_secs_f64();
        (full > 0.0).then(|| self.workers.len().max(1) as f64 * self.live_max as f64 / full)
    }

    /// How long until some worker is free (zero when one is idle).
    fn until_a_worker_is_free(&self, now: Instant) -> Duration {
        if !self.idle.is_empty() {
            return Duration::ZERO;
        }
        self.busy_until
            .iter()
            .flatten()
            .map(|t| t.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::ZERO)
    }

    /// Time to work off `rows` queued rows, plus the running batches.
    fn drain_time(&self, now: Instant, rows: usize) -> Option<Duration> {
        let rate = self.service_rate()?;
        Some(self.until_a_worker_is_free(now) + Duration::from_secs_f64(rows as f64 / rate))
    }

    /// Retry-After for a refused client: when the queue as it stands now
    /// would be worked off at the measured service rate.
    fn retry_after(&self, now: Instant, priority: Priority) -> Duration {
        self.drain_time(now, self.queue.rows())
            .unwrap_or(self.config.class(priority).max_queue_delay)
            .max(Duration::from_millis(1))
    }

    /// Rows worth waiting for before an idle engine starts.
    fn fill_rows(&self, now: Instant, worker: usize) -> usize {
        if !self.config.work_conserving {
            return self.live_max;
        }
        let rate = self.arrivals.rate(now);
        match self.model_for(Some(worker)).rows_to_keep_up(rate) {
            Some(rows) => (rows.ceil() as usize).clamp(1, self.live_max),
            None => self.live_max,
        }
    }

    fn admit(&mut self, request: Request) {
        let now = Instant::now();
        let priority = request.priority;
        self.arrivals.record(now, request.rows);
        let class_stats = self.stats.class(priority);
        let metrics = &self.class_metrics[priority.index()];
        let deadline = request.arrived + request.timeout;
        // Admission: the rows of this and every higher class go first; if
        // working them off plus this request's own batch ends past the
        // deadline, answer now rather than late.
        let ahead = self.queue.rows_at_or_above(priority);
        if let Some(wait) = self.drain_time(now, ahead) {
            let own = self.model_for(None).predict(request.rows);
            let finish = now + wait + own;
            if finish > deadline {
                class_stats.count_rejected_deadline();
                metrics.rejected_deadline.increment(1);
                let error = SchedulerError::DeadlineUnmeetable {
                    model: self.config.model.clone(),
                    priority,
                    timeout: request.timeout,
                    predicted: finish.saturating_duration_since(request.arrived),
                    retry_after: self.retry_after(now, priority),
                };
                let _ = request.response_tx.send(Err(error));
                return;
            }
        }
        let arrived = request.arrived;
        if let Err(request) = self.queue.push(request, priority, arrived, deadline) {
            class_stats.count_rejected_queue_full();
            metrics.rejected_queue_full.increment(1);
            let error = SchedulerError::QueueFull {
                model: self.config.model.clone(),
                priority,
                capacity: self.config.class(priority).max_queue_size,
                retry_after: self.retry_after(now, priority),
            };
            let _ = request.response_tx.send(Err(error));
        }
    }

    fn answer_expired(&self, now: Instant, expired: Vec<(Request, Priority)>) {
        for (request, priority) in expired {
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
        if let Some(model) = self.models.get_mut(done.worker) {
            model.record(done.rows, done.took);
        }
        if let Some(slot) = self.busy_until.get_mut(done.worker) {
            *slot = None;
        }
        self.idle.push(done.worker);
        for (priority, arrived, ok) in done.answered {
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
    }

    /// Hands due batches to idle workers. `flush`: nothing new can arrive,
    /// so do not wait for anyone.
    fn dispatch(&mut self, flush: bool) {
        while let Some(&worker) = self.idle.last() {
            let now = Instant::now();
            if self.queue.is_empty() {
                break;
            }
            if !flush {
                let fill = self.fill_rows(now, worker);
                let exec = self
                    .model_for(Some(worker))
                    .predict(self.queue.rows().min(self.live_max));
                match self.queue.next_dispatch(now, fill, exec) {
                    Some(at) if at <= now => {}
                    _ => break,
                }
            }
            let Taken {
                items,
                rows,
                dropped,
                expired,
            } = self.queue.take(now, self.live_max);
            self.dropped.increment(dropped.len() as u64);
            self.answer_expired(now, expired);
            if items.is_empty() {
                continue;
            }
            let mut requests = Vec::with_capacity(items.len());
            for chosen in items {
                let waited = now.saturating_duration_since(chosen.arrived);
                self.class_metrics[chosen.priority.index()]
                    .queue_wait
                    .record(waited.as_secs_f64());
                self.stats.class(chosen.priority).record_queue(waited);
                requests.push(chosen.item);
            }
            self.idle.pop();
            let predicted = self.model_for(Some(worker)).predict(rows);
            self.busy_until[worker] = Some(now + predicted);
            if let Err(
                std_mpsc::TrySendError::Full(job) | std_mpsc::TrySendError::Disconnected(job),
            ) = self.workers[worker].try_send(WorkerJob { requests, rows })
            {
                // The worker thread died (it never panics on an engine
                // error); answer its job rather than lose it.
                tracing::error!(model = %self.config.model, worker, "engine worker is gone");
                fail(
                    job.requests,
                    &SchedulerError::Engine(EngineError::Execution(
                        "engine worker thread is gone".into(),
                    )),
                );
            }
        }
    }

    fn adapt(&mut self) {
        let mut latencies = std::mem::take(&mut self.highest_latencies);
        let p99_highest = (!latencies.is_empty()).then(|| {
            latencies.sort_unstable();
            latencies[(latencies.len() * 99).div_ceil(100).saturating_sub(1)]
        });
        let seen = Observation {
            cpu: self.monitor.as_ref().and_then(|m| m.cpu()),
            gpu: None,
            memory: self.monitor.as_ref().and_then(|m| m.memory()),
            p99_highest,
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
            self.class_metrics[p.index()]
                .queue_length
                .set(self.queue.len_of(p) as f64);
        }
        self.stats
            .set_retry_hint(self.retry_after(now, self.config.default_priority));
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
                fail(
                    self.queue.drain(),
                    &SchedulerError::Engine(EngineError::Execution(
                        "no engine thread is running".into(),
                    )),
                );
            }
            self.publish(now);
            if !open && self.queue.is_empty() {
                break;
            }
            let next_expiry = self.queue.next_expiry();
            let next_batch = self.idle.last().and_then(|&w| {
                let now = Instant::now();
                let exec = self
                    .model_for(Some(w))
                    .predict(self.queue.rows().min(self.live_max));
                self.queue.next_dispatch(now, self.fill_rows(now, w), exec)
            });
            tokio::select! {
                // A finished batch first: the engine being free changes
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

fn engine_worker(
    index: usize,
    engine: &dyn Engine,
    model: &str,
    stats: &SchedulerStats,
    job_rx: &std_mpsc::Receiver<WorkerJob>,
    done_tx: &mpsc::Sender<Done>,
) {
    let batch_size = histogram!(telemetry::BATCH_SIZE, "model" => model.to_owned());
    let execution = histogram!(telemetry::ENGINE_EXECUTION, "model" => model.to_owned());
    let batches = counter!(telemetry::BATCHES_TOTAL, "model" => model.to_owned());
    let input_count = engine.signature().inputs.len();
    while let Ok(WorkerJob { requests, rows }) = job_rx.recv() {
        let gathering = std::time::Instant::now();
        // Gather every request's rows into one contiguous buffer per input.
        let mut inputs: Vec<Vec<f32>> = (0..input_count).map(|_| Vec::new()).collect();
        for request in &requests {
            for (gathered, own) in inputs.iter_mut().zip(&request.inputs) {
                gathered.extend_from_slice(own);
            }
        }
        let batch = Batch { rows, inputs };
        let started = std::time::Instant::now();
        // A panicking engine must not take the worker (and every later
        // request) down with it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.infer(&batch)))
            .unwrap_or_else(|_| Err(EngineError::Execution("the engine panicked".into())));
        let took = started.elapsed();
        let scattering = std::time::Instant::now();
        execution.record(took.as_secs_f64());
        batch_size.record(rows as f64);
        batches.increment(1);
        let mut answered = Vec::with_capacity(requests.len());
        match result {
            Ok(output) if output.rows == rows => {
                let mut offset = 0;
                for request in requests {
                    let own: Vec<Vec<f32>> = output
                        .outputs
                        .iter()
                        .map(|values| {
                            let width = values.len() / rows;
                            values[offset * width..(offset + request.rows) * width].to_vec()
                        })
                        .collect();
                    offset += request.rows;
                    stats.class(request.priority).record_compute(took);
                    answered.push((request.priority, request.arrived, true));
                    // The client may have gone meanwhile; nothing to do then.
                    let _ = request.response_tx.send(Ok(own));
                }
            }
            Ok(output) => {
                answered.extend(requests.iter().map(|r| (r.priority, r.arrived, false)));
                fail(
                    requests,
                    &SchedulerError::Engine(EngineError::Execution(format!(
                        "engine returned {} rows for a batch of {rows}",
                        output.rows
                    ))),
                )
            }
            Err(error) => {
                tracing::warn!(model, worker = index, %error, "batch failed");
                answered.extend(requests.iter().map(|r| (r.priority, r.arrived, false)));
                fail(requests, &SchedulerError::Engine(error));
            }
        }
        stats.record_batch(rows, started - gathering, took, scattering.elapsed());
        let done = Done {
            worker: index,
            rows,
            took,
            answered,
        };
        if done_tx.blocking_send(done).is_err() {
            break;
        }
    }
}
