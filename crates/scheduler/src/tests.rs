//! The batcher end to end with a fake engine, mostly on tokio's paused
//! clock. The paused clock jumps to the next timer whenever the runtime is
//! idle, also while an engine thread works: tests that keep requests
//! queued behind a working engine without wanting them to expire run on
//! the real clock instead.
//!
//! The fake engine answers each row with `[sum of the row, batch size]`, so a
//! test can tell which rows came back to whom and how they were batched.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tickserve_engine::{Batch, BatchOutput, DataType, Engine, EngineError, Signature, TensorSpec};
use tokio::time::Instant;

use super::*;

#[derive(Debug)]
struct FakeEngine {
    signature: Signature,
    batches: Mutex<Vec<usize>>,
    fail: bool,
    /// Real time each batch takes, to keep the engine busy in tests that
    /// need a backlog.
    busy: Duration,
}

impl FakeEngine {
    fn new(fail: bool) -> Arc<Self> {
        Self::with_busy(fail, Duration::ZERO)
    }

    fn with_busy(fail: bool, busy: Duration) -> Arc<Self> {
        Arc::new(FakeEngine {
            signature: Signature {
                inputs: vec![TensorSpec {
                    name: "x".into(),
                    datatype: DataType::Fp32,
                    dims: vec![2],
                }],
                outputs: vec![TensorSpec {
                    name: "y".into(),
                    datatype: DataType::Fp32,
                    dims: vec![2],
                }],
            },
            batches: Mutex::new(Vec::new()),
            fail,
            busy,
        })
    }

    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

impl Engine for FakeEngine {
    fn kind(&self) -> &'static str {
        "fake"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        self.batches.lock().unwrap().push(batch.rows);
        std::thread::sleep(self.busy);
        if self.fail {
            return Err(EngineError::Execution("boom".into()));
        }
        let out = batch.inputs[0]
            .chunks(2)
            .flat_map(|row| [row[0] + row[1], batch.rows as f32])
            .collect();
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: vec![out],
        })
    }
}

/// 5 ms delay, 100 places, a 60 s timeout and no latency target in every
/// class (so batches are neither budgeted nor chunked); the adaptive
/// controller off (it would move the batch size on the paused clock's
/// ticks).
fn config(max_batch_size: usize) -> SchedulerConfig {
    let mut config = SchedulerConfig::new("fake", max_batch_size);
    for class in &mut config.classes {
        class.max_queue_delay = Duration::from_millis(5);
        class.max_queue_size = 100;
        class.default_timeout = Duration::from_secs(60);
        class.target_latency = None;
    }
    // On the test's runtime, so that its paused clock drives the batcher.
    config.own_thread = false;
    config.adaptive.enabled = false;
    config
}

/// Without work-conserving dispatch: an idle engine waits for a full batch
/// or the delay, as the first scheduler did.
fn waiting_config(max_batch_size: usize) -> SchedulerConfig {
    let mut config = config(max_batch_size);
    config.work_conserving = false;
    config
}

const NONE: InferOptions = InferOptions {
    priority: None,
    timeout: None,
};

fn at(level: i64) -> InferOptions {
    InferOptions {
        priority: Priority::new(level),
        timeout: None,
    }
}

fn row(v: f32) -> Vec<f32> {
    vec![v, 1000.0 * v]
}

#[tokio::test(start_paused = true)]
async fn a_lone_request_is_dispatched_at_once() {
    // Work-conserving: nobody else is coming, so waiting is useless.
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    let start = Instant::now();
    let out = scheduler.infer(1, vec![row(1.0)], NONE).await.unwrap();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(out, vec![vec![1001.0, 1.0]]);
    assert_eq!(engine.batches(), [1]);
}

#[tokio::test(start_paused = true)]
async fn without_work_conserving_a_lone_request_waits_exactly_the_delay() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    let start = Instant::now();
    let out = scheduler.infer(1, vec![row(1.0)], NONE).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(5));
    assert_eq!(out, vec![vec![1001.0, 1.0]]);
    assert_eq!(engine.batches(), [1]);
}

#[tokio::test(start_paused = true)]
async fn the_delay_counts_from_the_oldest_arrival() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    let start = Instant::now();
    let first = tokio::spawn({
        let s = scheduler.clone();
        async move { (s.infer(1, vec![row(1.0)], NONE).await, Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(3)).await;
    let (second, second_at) = (
        scheduler.infer(1, vec![row(2.0)], NONE).await,
        Instant::now(),
    );
    let (first, first_at) = first.await.unwrap();
    // Both left together 5 ms after the FIRST arrival, not 5 ms after the
    // second one.
    assert_eq!(first_at - start, Duration::from_millis(5));
    assert_eq!(second_at - start, Duration::from_millis(5));
    assert_eq!(first.unwrap(), vec![vec![1001.0, 2.0]]);
    assert_eq!(second.unwrap(), vec![vec![2002.0, 2.0]]);
    assert_eq!(engine.batches(), [2]);
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_leaves_at_once() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(4));
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let s = scheduler.clone();
            tokio::spawn(async move { s.infer(1, vec![row(i as f32)], NONE).await })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let out = h.await.unwrap().unwrap();
        assert_eq!(out, vec![vec![1001.0 * i as f32, 4.0]]);
    }
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "a full batch must not wait for the delay"
    );
    assert_eq!(engine.batches(), [4]);
}

// Real clock: on the paused clock, time jumps to the next timer (a
// request's expiry) whenever the runtime idles while a worker thread runs.
#[tokio::test]
async fn every_request_gets_exactly_its_own_rows_back() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    // Requests of 1, 2 and 3 rows, values that identify request and row.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let s = scheduler.clone();
            let rows = i % 3 + 1;
            tokio::spawn(async move {
                let input: Vec<f32> = (0..rows).flat_map(|r| row((i * 10 + r) as f32)).collect();
                (i, rows, s.infer(rows, vec![input], NONE).await)
            })
        })
        .collect();
    for h in handles {
        let (i, rows, result) = h.await.unwrap();
        let out = result.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), rows * 2);
        for r in 0..rows {
            assert_eq!(out[0][r * 2], 1001.0 * (i * 10 + r) as f32);
        }
    }
    let batches = engine.batches();
    assert_eq!(batches.iter().sum::<usize>(), 24);
    assert!(batches.iter().all(|&b| b <= 8), "{batches:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_client_left_never_reaches_the_engine() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    let abandoned = tokio::spawn({
        let s = scheduler.clone();
        async move {
            s.infer(3, vec![[row(1.0), row(2.0), row(3.0)].concat()], NONE)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    abandoned.abort();
    let _ = abandoned.await;
    let out = scheduler.infer(1, vec![row(7.0)], NONE).await.unwrap();
    assert_eq!(out, vec![vec![7007.0, 1.0]]);
    // Only the surviving request's single row ran.
    assert_eq!(engine.batches(), [1]);
}

#[tokio::test(start_paused = true)]
async fn engine_errors_reach_every_request_of_the_batch() {
    let engine = FakeEngine::new(true);
    let scheduler = Scheduler::spawn(engine.clone(), waiting_config(8));
    let a = tokio::spawn({
        let s = scheduler.clone();
        async move { s.infer(1, vec![row(1.0)], NONE).await }
    });
    let b = scheduler
        .infer(2, vec![[row(1.0), row(2.0)].concat()], NONE)
        .await;
    let a = a.await.unwrap();
    for result in [a, b] {
        assert_eq!(
            result.unwrap_err(),
            SchedulerError::Engine(EngineError::Execution("boom".into()))
        );
    }
    // The failed batch was split in halves down to single rows, each of
    // which failed alone.
    assert_eq!(engine.batches(), [3, 1, 2, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn too_many_rows_are_refused_before_queueing() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), config(4));
    let err = scheduler
        .infer(5, vec![vec![0.0; 10]], NONE)
        .await
        .unwrap_err();
    assert_eq!(err, SchedulerError::TooManyRows { rows: 5, max: 4 });
    assert!(engine.batches().is_empty());
}

// Real clock: on the paused clock, time jumps to the next timer (a
// request's expiry) whenever the runtime idles while a worker thread runs.
#[tokio::test]
async fn a_full_queue_refuses_with_queue_full() {
    // The first batch holds the only worker for 200 ms of real time while
    // the other five requests arrive: two fit in the queue, three do not.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(200));
    let mut cfg = config(1);
    for class in &mut cfg.classes {
        class.max_queue_size = 2;
        class.max_queue_delay = Duration::from_secs(1);
    }
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // Batches of one row run one at a time; fill the engine and the queue.
    let pending: Vec<_> = (0..6)
        .map(|i| {
            let s = scheduler.clone();
            tokio::spawn(async move { s.infer(1, vec![row(i as f32)], NONE).await })
        })
        .collect();
    let mut refused = 0;
    let mut answered = 0;
    for p in pending {
        match p.await.unwrap() {
            Ok(_) => answered += 1,
            Err(SchedulerError::QueueFull {
                capacity: 2,
                retry_after,
                ..
            }) => {
                assert!(retry_after >= Duration::from_millis(1));
                refused += 1
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((answered, refused), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_flushes_the_queue() {
    let engine = FakeEngine::new(false);
    let mut cfg = waiting_config(8);
    for class in &mut cfg.classes {
        class.max_queue_delay = Duration::from_secs(60);
    }
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let start = Instant::now();
    let (tx, rx) = oneshot::channel();
    scheduler
        .command_tx
        .send(SchedulerCommand::Enqueue(Request {
            rows: 1,
            inputs: vec![row(3.0)],
            priority: Priority::LOWEST,
            timeout: Duration::from_secs(3600),
            arrived: Instant::now(),
            response_tx: tx,
        }))
        .await
        .unwrap();
    drop(scheduler);
    let out = rx.await.unwrap().unwrap();
    assert_eq!(out, vec![vec![3003.0, 1.0]]);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "shutdown must not wait out the delay"
    );
}

// --- Priorities, deadlines, admission -------------------------------------

/// Yields (keeping the paused clock still) until `done` holds: the
/// batcher learns that a batch finished from the worker thread, after the
/// client already has its answer.
async fn until(done: impl Fn() -> bool) {
    while !done() {
        tokio::task::yield_now().await;
    }
}

/// Until the batcher has recorded `n` successes of `class` (its latency
/// model has then seen those batches).
async fn until_recorded(s: &Scheduler, class: usize, n: u64) {
    until(|| s.stats().classes[class].success.count >= n).await;
}

/// Sends a request in the background and returns its handle.
fn send(
    s: &Scheduler,
    value: f32,
    options: InferOptions,
) -> tokio::task::JoinHandle<(Result<Outputs, SchedulerError>, Instant)> {
    let s = s.clone();
    tokio::spawn(async move {
        let out = s.infer(1, vec![row(value)], options).await;
        (out, Instant::now())
    })
}

// Real clock: on the paused clock, time jumps to the next timer (a
// request's expiry) whenever the runtime idles while a worker thread runs.
#[tokio::test]
async fn requests_arriving_while_the_engine_is_busy_ride_together_highest_class_first() {
    // The first request occupies the engine for 100 ms of real time; the
    // five that arrive meanwhile leave together once it is free, the
    // real-time one first in the batch although it arrived last.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(100));
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    let first = send(&scheduler, 0.0, at(5));
    tokio::task::yield_now().await;
    let mut later = Vec::new();
    for (i, level) in [5, 4, 3, 2, 1].into_iter().enumerate() {
        later.push(send(&scheduler, (i + 1) as f32, at(level)));
    }
    assert!(first.await.unwrap().0.is_ok());
    for h in later {
        let (out, _) = h.await.unwrap();
        // Second column: the batch size the request rode in.
        assert_eq!(out.unwrap()[0][1], 5.0);
    }
    assert_eq!(engine.batches(), [1, 5]);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_is_answered_by_the_timer_while_a_long_batch_runs() {
    // Triton #7512: the queued request must not wait for the running
    // batch to end before it is told that its timeout expired.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(300));
    let scheduler = Scheduler::spawn(engine.clone(), config(1));
    let start = Instant::now();
    let long = send(&scheduler, 1.0, at(5));
    tokio::task::yield_now().await;
    let queued = send(
        &scheduler,
        2.0,
        InferOptions {
            priority: Priority::new(5),
            timeout: Some(Duration::from_millis(50)),
        },
    );
    let (result, answered) = queued.await.unwrap();
    match result {
        Err(e @ SchedulerError::TimeoutExpired { .. }) => {
            assert!(e.to_string().contains("request timeout expired"), "{e}");
            assert!(e.retry_after().is_some());
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(answered - start, Duration::from_millis(50));
    assert!(long.await.unwrap().0.is_ok());
    // The expired request never ran.
    assert_eq!(engine.batches(), [1]);
    let stats = scheduler.stats();
    assert_eq!(stats.classes[4].expired, 1);
    assert_eq!(stats.classes[4].compute_infer.count, 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_timeout_is_capped_at_its_class_default_and_may_be_forbidden() {
    let engine = FakeEngine::with_busy(false, Duration::from_millis(300));
    let mut cfg = config(1);
    cfg.classes[4].default_timeout = Duration::from_millis(20);
    cfg.classes[0].allow_timeout_override = false;
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let err = scheduler
        .infer(
            1,
            vec![row(1.0)],
            InferOptions {
                priority: Some(Priority::HIGHEST),
                timeout: Some(Duration::from_millis(5)),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err, SchedulerError::TimeoutNotAllowed(Priority::HIGHEST));
    let start = Instant::now();
    let busy = send(&scheduler, 1.0, at(1));
    tokio::task::yield_now().await;
    // Asks for 10 s; its class allows 20 ms.
    let capped = send(
        &scheduler,
        2.0,
        InferOptions {
            priority: Priority::new(5),
            timeout: Some(Duration::from_secs(10)),
        },
    );
    let (result, answered) = capped.await.unwrap();
    assert!(matches!(result, Err(SchedulerError::TimeoutExpired { .. })));
    assert_eq!(answered - start, Duration::from_millis(20));
    assert!(busy.await.unwrap().0.is_ok());
}

#[tokio::test(start_paused = true)]
async fn admission_refuses_a_request_that_cannot_meet_its_deadline() {
    // Teach the latency model that a batch takes ~50 ms, then queue work
    // ahead: a 10 ms request cannot make it and is refused at once, with a
    // retry hint from the measured service rate.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(50));
    let scheduler = Scheduler::spawn(engine.clone(), config(1));
    scheduler.infer(1, vec![row(0.0)], at(3)).await.unwrap();
    until_recorded(&scheduler, 2, 1).await;
    let busy = send(&scheduler, 1.0, at(3));
    until(|| engine.batches().len() == 2).await;
    let start = Instant::now();
    let err = scheduler
        .infer(
            1,
            vec![row(2.0)],
            InferOptions {
                priority: Priority::new(3),
                timeout: Some(Duration::from_millis(10)),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO, "refused at arrival");
    match &err {
        SchedulerError::DeadlineUnmeetable {
            retry_after,
            predicted,
            ..
        } => {
            assert!(*predicted > Duration::from_millis(10), "{err}");
            assert!(*retry_after >= Duration::from_millis(1), "{err}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        err.to_string().contains("cannot meet its 10 ms deadline"),
        "{err}"
    );
    assert!(busy.await.unwrap().0.is_ok());
    assert_eq!(scheduler.stats().classes[2].rejected_deadline, 1);
    assert_eq!(engine.batches(), [1, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_leaves_early_for_the_earliest_deadline() {
    // Waiting mode with a 1 s delay: only the deadline (100 ms, minus the
    // predicted engine time) makes the batch leave.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(10));
    let mut cfg = waiting_config(8);
    for class in &mut cfg.classes {
        class.max_queue_delay = Duration::from_secs(1);
    }
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // Train the model: ~10 ms per batch.
    let warm = send(&scheduler, 0.0, at(3));
    let (out, _) = warm.await.unwrap();
    assert!(out.is_ok());
    until_recorded(&scheduler, 2, 1).await;
    let start = Instant::now();
    let (out, answered) = send(
        &scheduler,
        1.0,
        InferOptions {
            priority: Priority::new(3),
            timeout: Some(Duration::from_millis(100)),
        },
    )
    .await
    .unwrap();
    assert!(out.is_ok(), "{out:?}");
    let waited = answered - start;
    assert!(
        // Left before the deadline by about the measured batch time (10 ms
        // plus scheduling noise on a loaded machine), long before the 1 s
        // delay.
        waited < Duration::from_millis(100) && waited >= Duration::from_millis(50),
        "{waited:?}"
    );
}

// --- Real-time isolation: chunks, budgets, reserved instances, shedding ---

/// Answers each row `[a, b]` with `[a + b, a * b]` (a row's answer does not
/// depend on its batch), records every call (worker thread, first values of
/// its rows) and holds every call until the gate opens.
#[derive(Debug)]
struct GatedEngine {
    signature: Signature,
    calls: Mutex<Vec<(String, Vec<f32>)>>,
    open: Mutex<bool>,
    opened: std::sync::Condvar,
}

impl GatedEngine {
    fn new(open: bool) -> Arc<Self> {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            dims: vec![2],
        };
        Arc::new(GatedEngine {
            signature: Signature {
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            calls: Mutex::new(Vec::new()),
            open: Mutex::new(open),
            opened: std::sync::Condvar::new(),
        })
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    fn close(&self) {
        *self.open.lock().unwrap() = false;
    }

    /// The first value of every row, per call, in call order.
    fn calls(&self) -> Vec<Vec<f32>> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|(_, rows)| rows.clone())
            .collect()
    }

    fn calls_by_thread(&self) -> Vec<(String, Vec<f32>)> {
        self.calls.lock().unwrap().clone()
    }
}

impl Engine for GatedEngine {
    fn kind(&self) -> &'static str {
        "gated"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        let firsts = batch.inputs[0].chunks(2).map(|r| r[0]).collect();
        let thread = std::thread::current().name().unwrap_or("?").to_owned();
        self.calls.lock().unwrap().push((thread, firsts));
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        let out = batch.inputs[0]
            .chunks(2)
            .flat_map(|r| [r[0] + r[1], r[0] * r[1]])
            .collect();
        Ok(BatchOutput {
            rows: batch.rows,
            outputs: vec![out],
        })
    }
}

/// `rows` rows whose first values are `first, first + 1, …`.
fn rows_from(first: f32, rows: usize) -> Vec<f32> {
    (0..rows).flat_map(|i| row(first + i as f32)).collect()
}

fn answer_of(values: &[f32]) -> Vec<f32> {
    values
        .chunks(2)
        .flat_map(|r| [r[0] + r[1], r[0] * r[1]])
        .collect()
}

/// The tests below hold the engine at a gate, so they run on the real
/// clock (on the paused clock, time would jump to the requests' expiry
/// while the engine thread works). The runtime is single-threaded: a task
/// woken before this sleep runs before it ends, so afterwards the batcher
/// has handled everything sent before. Nothing asserts on time.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(1)).await;
}

fn send_rows(
    s: &Scheduler,
    first: f32,
    rows: usize,
    level: i64,
) -> tokio::task::JoinHandle<Result<Outputs, SchedulerError>> {
    let s = s.clone();
    tokio::spawn(async move { s.infer(rows, vec![rows_from(first, rows)], at(level)).await })
}

/// One real-time request through the (closed) gate: a class with a
/// latency target has traffic, so lower classes now run in chunks. The
/// gate is closed again and the engine's record cleared.
async fn real_time_seen(scheduler: &Scheduler, engine: &GatedEngine) {
    let warm = send_rows(scheduler, 0.5, 1, 1);
    settle().await;
    engine.open();
    warm.await.unwrap().unwrap();
    engine.close();
    engine.calls.lock().unwrap().clear();
}

#[tokio::test]
async fn a_real_time_request_runs_between_the_chunks_of_a_background_batch() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(8);
    cfg.classes[0].target_latency = Some(Duration::from_millis(2));
    cfg.chunk_rows = Some(2);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    real_time_seen(&scheduler, &engine).await;
    let background = send_rows(&scheduler, 100.0, 8, 5);
    settle().await;
    until(|| engine.calls().len() == 1).await;
    // The first chunk is in the engine; a real-time request arrives.
    let realtime = send_rows(&scheduler, 1.0, 1, 1);
    settle().await;
    engine.open();
    let realtime = realtime.await.unwrap().unwrap();
    let background = background.await.unwrap().unwrap();
    assert_eq!(
        engine.calls(),
        [
            vec![100.0, 101.0],
            vec![1.0],
            vec![102.0, 103.0],
            vec![104.0, 105.0],
            vec![106.0, 107.0],
        ]
    );
    // Every request got exactly its own rows, as one unchunked call gives.
    assert_eq!(realtime, vec![answer_of(&rows_from(1.0, 1))]);
    assert_eq!(background, vec![answer_of(&rows_from(100.0, 8))]);
}

#[tokio::test]
async fn without_a_target_above_it_a_batch_runs_in_one_call() {
    let engine = GatedEngine::new(true);
    let mut cfg = config(8);
    cfg.chunk_rows = Some(2);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let out = send_rows(&scheduler, 0.0, 8, 5).await.unwrap().unwrap();
    assert_eq!(out, vec![answer_of(&rows_from(0.0, 8))]);
    assert_eq!(engine.calls().len(), 1);
}

#[tokio::test]
async fn background_batches_run_in_chunks_only_while_a_targeted_class_has_traffic() {
    let engine = GatedEngine::new(true);
    let mut cfg = config(8);
    cfg.classes[0].target_latency = Some(Duration::from_millis(2));
    cfg.chunk_rows = Some(2);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // No real-time traffic yet: one call.
    send_rows(&scheduler, 0.0, 8, 5).await.unwrap().unwrap();
    assert_eq!(engine.calls().len(), 1);
    // A real-time request, then the same background work: four chunks.
    send_rows(&scheduler, 50.0, 1, 1).await.unwrap().unwrap();
    let out = send_rows(&scheduler, 0.0, 8, 5).await.unwrap().unwrap();
    assert_eq!(out, vec![answer_of(&rows_from(0.0, 8))]);
    let sizes: Vec<usize> = engine.calls().iter().map(Vec::len).collect();
    assert_eq!(sizes, [8, 1, 2, 2, 2, 2]);
}

#[tokio::test]
async fn chunked_batches_answer_every_request_with_its_rows_once() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(16);
    cfg.classes[0].target_latency = Some(Duration::from_millis(2));
    cfg.chunk_rows = Some(3);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    real_time_seen(&scheduler, &engine).await;
    // One request holds the engine while eleven more (17 rows) queue up;
    // the first ten leave as one batch of 16 rows in chunks of 3, the last
    // one after them.
    let first = send_rows(&scheduler, 0.0, 1, 5);
    settle().await;
    until(|| engine.calls().len() == 1).await;
    let sizes = [1usize, 3, 2, 1, 4, 1, 1, 1, 1, 1, 1];
    let mut handles = Vec::new();
    let mut start = 10.0;
    for rows in sizes {
        handles.push((start, rows, send_rows(&scheduler, start, rows, 5)));
        start += 10.0;
    }
    settle().await;
    engine.open();
    assert!(first.await.unwrap().is_ok());
    for (start, rows, handle) in handles {
        let out = handle.await.unwrap().unwrap();
        assert_eq!(
            out,
            vec![answer_of(&rows_from(start, rows))],
            "request at {start}"
        );
    }
    let calls = engine.calls();
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, [1, 3, 3, 3, 3, 3, 1, 1]);
    // Each queued row went to the engine exactly once.
    let mut seen: Vec<f32> = calls[1..].concat();
    seen.sort_by(f32::total_cmp);
    seen.dedup();
    assert_eq!(seen.len(), 17);
}

#[tokio::test]
async fn a_reserved_instance_never_takes_other_classes() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(4);
    cfg.instance_groups = vec![
        InstanceGroup {
            count: 1,
            classes: ClassSet::ALL,
            cores: Vec::new(),
        },
        InstanceGroup {
            count: 1,
            classes: ClassSet::of([Priority::HIGHEST, Priority::new(2).unwrap()]),
            cores: Vec::new(),
        },
    ];
    let plans = cfg.workers();
    assert_eq!(plans.len(), 2);
    assert_eq!(plans[0].classes.len(), 2, "reserved workers come first");
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // Rows carry their class in the hundreds: 100 + i for priority 1, …
    let mut handles = Vec::new();
    for round in 0..6 {
        for level in 1..=5 {
            let first = (level * 100 + round * 10) as f32;
            handles.push(send_rows(&scheduler, first, 1 + round as usize % 2, level));
        }
        settle().await;
    }
    engine.open();
    for handle in handles {
        assert!(handle.await.unwrap().is_ok());
    }
    let calls = engine.calls_by_thread();
    let reserved: Vec<_> = calls.iter().filter(|(t, _)| t == "engine-0").collect();
    assert!(
        !reserved.is_empty(),
        "the reserved worker served: {calls:?}"
    );
    for (_, rows) in reserved {
        assert!(
            rows.iter().all(|&v| v < 300.0),
            "reserved worker ran {rows:?}"
        );
    }
    assert!(
        calls
            .iter()
            .any(|(t, rows)| t == "engine-1" && rows.iter().any(|&v| v >= 300.0))
    );
}

#[tokio::test]
async fn while_real_time_requests_are_refused_background_ones_are_shed() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(1);
    cfg.classes[0].max_queue_size = 1;
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let running = send_rows(&scheduler, 1.0, 1, 1);
    settle().await;
    until(|| engine.calls().len() == 1).await;
    let queued = send_rows(&scheduler, 2.0, 1, 1);
    let waiting_background = send_rows(&scheduler, 9.0, 1, 4);
    settle().await;
    let refused = scheduler.infer(1, vec![row(3.0)], at(1)).await;
    assert!(
        matches!(refused, Err(SchedulerError::QueueFull { .. })),
        "{refused:?}"
    );
    // Background work already waiting is shed with the refusal…
    let shed = waiting_background.await.unwrap().unwrap_err();
    assert!(matches!(shed, SchedulerError::Shed { .. }), "{shed:?}");
    // …and new background work while the window lasts.
    let shed = scheduler.infer(1, vec![row(4.0)], at(5)).await.unwrap_err();
    assert!(matches!(shed, SchedulerError::Shed { .. }), "{shed:?}");
    assert!(shed.to_string().contains("priority 1"), "{shed}");
    assert!(shed.retry_after().is_some());
    engine.open();
    assert!(running.await.unwrap().is_ok());
    assert!(queued.await.unwrap().is_ok());
    assert_eq!(scheduler.stats().classes[4].rejected_queue_full, 1);
    assert_eq!(scheduler.stats().classes[3].rejected_queue_full, 1);
    // The queued background request never ran.
    assert!(engine.calls().iter().all(|rows| rows != &[9.0]));
}

// Paused clock: time moves only by `advance` and when every task idles;
// the gate keeps the engine busy without any timer.
#[tokio::test(start_paused = true)]
async fn admission_counts_how_long_the_queue_ahead_has_waited() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(1);
    cfg.classes[2].default_timeout = Duration::from_millis(100);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let running = send_rows(&scheduler, 1.0, 1, 3);
    settle().await;
    until(|| engine.calls().len() == 1).await;
    let _queued = send_rows(&scheduler, 2.0, 1, 3);
    settle().await;
    // No batch has been measured: only the queue's age speaks. The queued
    // request has waited 56 ms of its 100: a newcomer would wait at least
    // as long, more than half of its own 100 ms.
    tokio::time::advance(Duration::from_millis(55)).await;
    let refused = scheduler.infer(1, vec![row(3.0)], at(3)).await.unwrap_err();
    match &refused {
        SchedulerError::DeadlineUnmeetable { predicted, .. } => {
            assert!(*predicted >= Duration::from_millis(56), "{refused}")
        }
        other => panic!("expected a deadline refusal, got {other:?}"),
    }
    // The class's own deadline was refused: lower classes are shed.
    let shed = scheduler.infer(1, vec![row(4.0)], at(5)).await.unwrap_err();
    assert!(matches!(shed, SchedulerError::Shed { .. }), "{shed:?}");
    // A higher class is not held up by the queue below it: admitted.
    let _realtime = send_rows(&scheduler, 5.0, 1, 1);
    settle().await;
    let stats = scheduler.stats();
    assert_eq!(
        (
            stats.classes[0].rejected_deadline,
            stats.classes[0].rejected_queue_full
        ),
        (0, 0)
    );
    engine.open();
    assert!(running.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_the_client_shortened_sheds_nothing() {
    let engine = GatedEngine::new(false);
    let mut cfg = config(1);
    cfg.classes[2].default_timeout = Duration::from_millis(100);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let running = send_rows(&scheduler, 1.0, 1, 3);
    settle().await;
    until(|| engine.calls().len() == 1).await;
    let _queued = send_rows(&scheduler, 2.0, 1, 3);
    settle().await;
    tokio::time::advance(Duration::from_millis(30)).await;
    let short = InferOptions {
        priority: Priority::new(3),
        timeout: Some(Duration::from_millis(40)),
    };
    let refused = scheduler.infer(1, vec![row(3.0)], short).await.unwrap_err();
    assert!(
        matches!(refused, SchedulerError::DeadlineUnmeetable { .. }),
        "{refused:?}"
    );
    // Background work is still admitted. (Queued requests are not awaited:
    // on the paused clock they could expire while the engine thread runs.)
    let _background = send_rows(&scheduler, 4.0, 1, 5);
    settle().await;
    let stats = scheduler.stats();
    assert_eq!(stats.classes[2].rejected_deadline, 1);
    assert_eq!(
        (
            stats.classes[4].rejected_deadline,
            stats.classes[4].rejected_queue_full
        ),
        (0, 0)
    );
    engine.open();
    assert!(running.await.unwrap().is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_idle_reserved_worker_does_not_hide_a_batch_due_on_a_general_one() {
    // Waiting mode: a lone background request leaves after its 5 ms class
    // delay. The reserved worker, idle and first in line, has nothing due;
    // the general worker's batch must still be woken for at 5 ms (not at
    // the request's 60 s expiry).
    let engine = FakeEngine::new(false);
    let mut cfg = waiting_config(8);
    cfg.instance_groups = vec![
        InstanceGroup {
            count: 1,
            classes: ClassSet::of([Priority::HIGHEST]),
            cores: Vec::new(),
        },
        InstanceGroup {
            count: 1,
            classes: ClassSet::ALL,
            cores: Vec::new(),
        },
    ];
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let start = Instant::now();
    let (out, answered) = send(&scheduler, 1.0, at(5)).await.unwrap();
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(answered - start, Duration::from_millis(5));
}
