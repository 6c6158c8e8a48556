//! The batcher end to end with a fake engine, on tokio's paused clock.
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

fn config(max_batch_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        model: "fake".into(),
        max_batch_size,
        max_queue_delay: Duration::from_millis(5),
        max_queue_size: 100,
        instances: 1,
    }
}

fn row(v: f32) -> Vec<f32> {
    vec![v, 1000.0 * v]
}

#[tokio::test(start_paused = true)]
async fn a_lone_request_waits_exactly_the_delay() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    let start = Instant::now();
    let out = scheduler.infer(1, vec![row(1.0)]).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_millis(5));
    assert_eq!(out, vec![vec![1001.0, 1.0]]);
    assert_eq!(engine.batches(), [1]);
}

#[tokio::test(start_paused = true)]
async fn the_delay_counts_from_the_oldest_arrival() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    let start = Instant::now();
    let first = tokio::spawn({
        let s = scheduler.clone();
        async move { (s.infer(1, vec![row(1.0)]).await, Instant::now()) }
    });
    tokio::time::sleep(Duration::from_millis(3)).await;
    let (second, second_at) = (scheduler.infer(1, vec![row(2.0)]).await, Instant::now());
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
    let scheduler = Scheduler::spawn(engine.clone(), config(4));
    let start = Instant::now();
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let s = scheduler.clone();
            tokio::spawn(async move { s.infer(1, vec![row(i as f32)]).await })
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

#[tokio::test(start_paused = true)]
async fn every_request_gets_exactly_its_own_rows_back() {
    let engine = FakeEngine::new(false);
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    // Requests of 1, 2 and 3 rows, values that identify request and row.
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let s = scheduler.clone();
            let rows = i % 3 + 1;
            tokio::spawn(async move {
                let input: Vec<f32> = (0..rows).flat_map(|r| row((i * 10 + r) as f32)).collect();
                (i, rows, s.infer(rows, vec![input]).await)
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
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    let abandoned = tokio::spawn({
        let s = scheduler.clone();
        async move {
            s.infer(3, vec![[row(1.0), row(2.0), row(3.0)].concat()])
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    abandoned.abort();
    let _ = abandoned.await;
    let out = scheduler.infer(1, vec![row(7.0)]).await.unwrap();
    assert_eq!(out, vec![vec![7007.0, 1.0]]);
    // Only the surviving request's single row ran.
    assert_eq!(engine.batches(), [1]);
}

#[tokio::test(start_paused = true)]
async fn engine_errors_reach_every_request_of_the_batch() {
    let engine = FakeEngine::new(true);
    let scheduler = Scheduler::spawn(engine.clone(), config(8));
    let a = tokio::spawn({
        let s = scheduler.clone();
        async move { s.infer(1, vec![row(1.0)]).await }
    });
    let b = scheduler
        .infer(2, vec![[row(1.0), row(2.0)].concat()])
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
    let err = scheduler.infer(5, vec![vec![0.0; 10]]).await.unwrap_err();
    assert_eq!(err, SchedulerError::TooManyRows { rows: 5, max: 4 });
    assert!(engine.batches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_with_queue_full() {
    // The first batch holds the only worker for 200 ms of real time while
    // the other five requests arrive: two fit in the queue, three do not.
    let engine = FakeEngine::with_busy(false, Duration::from_millis(200));
    let mut cfg = config(1);
    cfg.max_queue_size = 2;
    cfg.max_queue_delay = Duration::from_secs(1);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    // Batches of one row run one at a time; fill the engine and the queue.
    let pending: Vec<_> = (0..6)
        .map(|i| {
            let s = scheduler.clone();
            tokio::spawn(async move { s.infer(1, vec![row(i as f32)]).await })
        })
        .collect();
    let mut refused = 0;
    let mut answered = 0;
    for p in pending {
        match p.await.unwrap() {
            Ok(_) => answered += 1,
            Err(SchedulerError::QueueFull { capacity: 2, .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((answered, refused), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn dropping_every_handle_flushes_the_queue() {
    let engine = FakeEngine::new(false);
    let mut cfg = config(8);
    cfg.max_queue_delay = Duration::from_secs(60);
    let scheduler = Scheduler::spawn(engine.clone(), cfg);
    let start = Instant::now();
    let (tx, rx) = oneshot::channel();
    scheduler
        .command_tx
        .send(SchedulerCommand::Enqueue(Request {
            rows: 1,
            inputs: vec![row(3.0)],
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
