//! The batcher end to end with a fake engine, mostly on tokio's paused
//! clock. The paused clock jumps to the next timer whenever the runtime is
//! idle, also while an engine thread works: tests that keep requests
//! queued behind a working engine without wanting them to expire run on
//! the real clock instead.
//!
//! The fake engine answers each row with `[sum of the row, batch size]`, so a
//! test can tell which rows came back to whom and how they were batched.
//!
//! This file holds the fake engine and the helpers every theme uses; the
//! tests are in `batching`, `priorities` and `isolation`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tickserve_engine::{Batch, BatchOutput, DataType, Engine, EngineError, Signature, TensorSpec};
use tokio::time::Instant;

use super::*;

mod batching;
mod isolation;
mod priorities;

/// What a test engine does with a batch; [`TestEngine`] makes it an
/// [`Engine`] with the [`pair_signature`].
pub(crate) trait Answers: std::fmt::Debug + Send + Sync {
    /// [`Engine::kind`].
    const KIND: &'static str;
    fn answer(&self, batch: &Batch) -> Result<BatchOutput, EngineError>;
}

/// A test engine: the [`pair_signature`] and `A`'s answers (reachable
/// through `Deref`).
#[derive(Debug)]
pub(crate) struct TestEngine<A> {
    signature: Signature,
    answers: A,
}

impl<A> TestEngine<A> {
    pub(crate) fn new(answers: A) -> Self {
        TestEngine {
            signature: pair_signature(),
            answers,
        }
    }
}

impl<A> std::ops::Deref for TestEngine<A> {
    type Target = A;
    fn deref(&self) -> &A {
        &self.answers
    }
}

impl<A: Answers> Engine for TestEngine<A> {
    fn kind(&self) -> &'static str {
        A::KIND
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn infer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
        self.answers.answer(batch)
    }
}

#[derive(Debug)]
struct FakeEngine {
    batches: Mutex<Vec<usize>>,
    fail: bool,
    /// Real time each batch takes, to keep the engine busy in tests that
    /// need a backlog.
    busy: Duration,
}

impl FakeEngine {
    fn new(fail: bool) -> Arc<TestEngine<Self>> {
        Self::with_busy(fail, Duration::ZERO)
    }

    fn with_busy(fail: bool, busy: Duration) -> Arc<TestEngine<Self>> {
        Arc::new(TestEngine::new(FakeEngine {
            batches: Mutex::new(Vec::new()),
            fail,
            busy,
        }))
    }

    fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

/// The signature of the test engines: input `x` and output `y`, two FP32
/// values a row.
pub(crate) fn pair_signature() -> Signature {
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        dims: vec![2],
    };
    Signature {
        inputs: vec![spec("x")],
        outputs: vec![spec("y")],
    }
}

impl Answers for FakeEngine {
    const KIND: &'static str = "fake";
    fn answer(&self, batch: &Batch) -> Result<BatchOutput, EngineError> {
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

/// Priority `level` with a timeout of its own.
fn at_within(level: i64, timeout: Duration) -> InferOptions {
    InferOptions {
        timeout: Some(timeout),
        ..at(level)
    }
}

fn row(v: f32) -> Vec<f32> {
    vec![v, 1000.0 * v]
}

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
