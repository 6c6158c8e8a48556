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

/// 5 ms delay, 100 places and a 60 s timeout in every class; the adaptive controller off
/// (it would move the batch size on the paused clock's ticks).
fn config(max_batch_size: usize) -> SchedulerConfig {
    let mut config = SchedulerConfig::new("fake", max_batch_size);
    for class in &mut config.classes {
        class.max_queue_delay = Duration::from_millis(5);
        class.max_queue_size = 100;
        class.default_timeout = Duration::from_secs(60);
    }
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
    assert_eq!(engine.batches(), [3]);
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
