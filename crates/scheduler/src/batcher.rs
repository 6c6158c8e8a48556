//! The batcher task and the engine worker threads.
//!
//! The task owns the [`BatchQueue`] and the list of idle workers. It wakes
//! for three things: a new request, a worker that finished, and the oldest
//! request's deadline. Each time, it hands due batches to idle workers.
//! Workers run the engine, answer every request of the batch through its
//! oneshot, and report back that they are idle.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use metrics::{counter, gauge, histogram};
use tickserve_engine::{Batch, Engine, EngineError};
use tickserve_telemetry as telemetry;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::queue::{BatchQueue, Taken};
use crate::{Request, SchedulerCommand, SchedulerConfig, SchedulerError};

/// A batch on its way to a worker thread.
struct WorkerJob {
    requests: Vec<Request>,
    rows: usize,
}

pub(crate) fn start(
    engine: Arc<dyn Engine>,
    config: Arc<SchedulerConfig>,
    command_rx: mpsc::Receiver<SchedulerCommand>,
) {
    let instances = config.instances.max(1);
    // Workers report "idle again" here; one slot per worker is enough as
    // each sends at most once per job.
    let (idle_tx, idle_rx) = mpsc::channel(instances);
    let mut workers = Vec::with_capacity(instances);
    for index in 0..instances {
        // Capacity 1: a worker is only given a job when it is idle.
        let (job_tx, job_rx) = std_mpsc::sync_channel::<WorkerJob>(1);
        let engine = Arc::clone(&engine);
        let idle_tx = idle_tx.clone();
        let model = config.model.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("engine-{index}"))
            .spawn(move || engine_worker(index, &*engine, &model, &job_rx, &idle_tx));
        match spawned {
            Ok(_) => workers.push(job_tx),
            Err(e) => {
                tracing::error!(model = %config.model, error = %e, "cannot start engine thread")
            }
        }
    }
    tokio::spawn(batching_task(config, command_rx, idle_rx, workers));
}

async fn batching_task(
    config: Arc<SchedulerConfig>,
    mut command_rx: mpsc::Receiver<SchedulerCommand>,
    mut idle_rx: mpsc::Receiver<usize>,
    workers: Vec<std_mpsc::SyncSender<WorkerJob>>,
) {
    let model = config.model.clone();
    let mut queue: BatchQueue<Request> = BatchQueue::new(
        config.max_batch_size,
        config.max_queue_delay,
        config.max_queue_size,
    );
    let mut idle: Vec<usize> = (0..workers.len()).rev().collect();
    let mut open = true;
    let queue_length = gauge!(telemetry::QUEUE_LENGTH, "model" => model.clone());
    let queue_wait = histogram!(telemetry::QUEUE_WAIT, "model" => model.clone());
    let dropped = counter!(telemetry::DROPPED_TOTAL, "model" => model.clone());

    loop {
        // Dispatch while a worker is idle and a batch is due. Once every
        // handle is gone nothing new can arrive, so the rest is flushed
        // without waiting out the delay.
        while let Some(&worker) = idle.last() {
            let now = Instant::now();
            if queue.is_empty() || (open && !queue.is_due(now)) {
                break;
            }
            let Taken {
                items,
                rows,
                dropped: gone,
            } = queue.take();
            dropped.increment(gone.len() as u64);
            if items.is_empty() {
                continue;
            }
            let mut requests = Vec::with_capacity(items.len());
            for (request, arrived) in items {
                queue_wait.record(now.saturating_duration_since(arrived).as_secs_f64());
                requests.push(request);
            }
            idle.pop();
            if let Err(
                std_mpsc::TrySendError::Full(job) | std_mpsc::TrySendError::Disconnected(job),
            ) = workers[worker].try_send(WorkerJob { requests, rows })
            {
                // The worker thread died (it never panics on an engine
                // error); answer its job rather than lose it.
                tracing::error!(model = %model, worker, "engine worker is gone");
                fail(
                    job.requests,
                    &SchedulerError::Engine(EngineError::Execution(
                        "engine worker thread is gone".into(),
                    )),
                );
            }
        }
        queue_length.set(queue.len() as f64);
        if !open && queue.is_empty() {
            break;
        }
        if workers.is_empty() {
            // No engine thread could start: refuse everything that waits.
            let Taken {
                items, dropped: _, ..
            } = queue.take();
            fail(
                items.into_iter().map(|(r, _)| r).collect(),
                &SchedulerError::Engine(EngineError::Execution(
                    "no engine thread is running".into(),
                )),
            );
            if !open && queue.is_empty() {
                break;
            }
        }
        let deadline = if idle.is_empty() {
            None
        } else {
            queue.deadline()
        };
        tokio::select! {
            command = command_rx.recv(), if open => match command {
                Some(SchedulerCommand::Enqueue(request)) => {
                    let arrived = request.arrived;
                    // Refusals are counted by the front end, with the
                    // request's other outcomes.
                    if let Err(request) = queue.push(request, arrived) {
                        let _ = request.response_tx.send(Err(SchedulerError::QueueFull {
                            model: model.clone(),
                            capacity: config.max_queue_size,
                        }));
                    }
                }
                None => open = false,
            },
            Some(worker) = idle_rx.recv() => idle.push(worker),
            () = sleep_until(deadline), if deadline.is_some() => {}
        }
    }
    tracing::debug!(model = %model, "batcher stopped");
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
    job_rx: &std_mpsc::Receiver<WorkerJob>,
    idle_tx: &mpsc::Sender<usize>,
) {
    let batch_size = histogram!(telemetry::BATCH_SIZE, "model" => model.to_owned());
    let execution = histogram!(telemetry::ENGINE_EXECUTION, "model" => model.to_owned());
    let batches = counter!(telemetry::BATCHES_TOTAL, "model" => model.to_owned());
    let input_count = engine.signature().inputs.len();
    while let Ok(WorkerJob { requests, rows }) = job_rx.recv() {
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
        execution.record(started.elapsed().as_secs_f64());
        batch_size.record(rows as f64);
        batches.increment(1);
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
                    // The client may have gone meanwhile; nothing to do then.
                    let _ = request.response_tx.send(Ok(own));
                }
            }
            Ok(output) => fail(
                requests,
                &SchedulerError::Engine(EngineError::Execution(format!(
                    "engine returned {} rows for a batch of {rows}",
                    output.rows
                ))),
            ),
            Err(error) => {
                tracing::warn!(model, worker = index, %error, "batch failed");
                fail(requests, &SchedulerError::Engine(error));
            }
        }
        if idle_tx.blocking_send(index).is_err() {
            break;
        }
    }
}
