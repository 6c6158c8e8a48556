//! The dynamic batcher between the protocol front ends and an engine.
//!
//! ```text
//!  HTTP / gRPC handlers ──Scheduler::infer──▶ [bounded channel]
//!        ▲                                         │
//!        │ oneshot per request          batcher task (tokio): BatchQueue
//!        │                                         │ one batch per idle worker
//!        └──── engine worker threads (std::thread) ◀┘ [bounded, 1 per worker]
//! ```
//!
//! * [`Scheduler`] is the cloneable handle the server holds, one per model
//!   version; [`SchedulerCommand`] is what it sends to the task.
//! * The batcher task ([`batcher`]) owns the pure [`queue::BatchQueue`]
//!   and decides *when* a batch leaves: full, or the oldest request's
//!   `max_queue_delay` has run out. It only hands a batch to a worker that
//!   is idle, so requests keep joining the queue while the engine runs.
//! * Engine workers are OS threads: engine calls are long, CPU-bound and
//!   synchronous, and must never block the async runtime.
//!
//! Every channel is bounded, and the queue itself is capped by
//! `max_queue_size`: overload turns into a fast, explicit
//! [`SchedulerError::QueueFull`], never into unbounded memory.

mod batcher;
pub mod queue;

use std::sync::Arc;
use std::time::Duration;

use tickserve_engine::{Engine, EngineError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// How one model version's requests are batched.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Model name, used as the `model` label of metrics and in logs.
    pub model: String,
    /// Most rows in one engine call.
    pub max_batch_size: usize,
    /// Longest the oldest waiting request waits for others to join.
    pub max_queue_delay: Duration,
    /// Most requests waiting at once.
    pub max_queue_size: usize,
    /// Engine worker threads.
    pub instances: usize,
}

/// Why a request was not answered by the engine.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    #[error("the queue of model '{model}' is full ({capacity} requests waiting); retry later")]
    QueueFull { model: String, capacity: usize },
    #[error("model '{model}' is shutting down")]
    ShuttingDown { model: String },
    #[error("request has {rows} rows, more than the model's max_batch_size {max}")]
    TooManyRows { rows: usize, max: usize },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The answer to one request: its own rows of every output, in the order of
/// the engine's signature.
pub type Outputs = Vec<Vec<f32>>;

/// One request on its way to the engine.
#[derive(Debug)]
pub struct Request {
    pub rows: usize,
    /// Row-major values of every input, in signature order.
    pub inputs: Vec<Vec<f32>>,
    pub arrived: Instant,
    pub response_tx: oneshot::Sender<Result<Outputs, SchedulerError>>,
}

impl queue::Pending for Request {
    fn rows(&self) -> usize {
        self.rows
    }

    fn is_wanted(&self) -> bool {
        !self.response_tx.is_closed()
    }
}

/// Messages from [`Scheduler`] handles to the batcher task.
#[derive(Debug)]
pub enum SchedulerCommand {
    Enqueue(Request),
}

/// Cloneable handle to one model version's batcher. The batcher and its
/// engine threads stop once every handle is dropped and the queue is empty.
#[derive(Debug, Clone)]
pub struct Scheduler {
    command_tx: mpsc::Sender<SchedulerCommand>,
    config: Arc<SchedulerConfig>,
}

impl Scheduler {
    /// Starts the batcher task on the current tokio runtime and the engine
    /// worker threads.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn spawn(engine: Arc<dyn Engine>, config: SchedulerConfig) -> Self {
        // Enough room for a burst of a full queue; the batcher drains it
        // continuously, and a full channel is reported as a full queue.
        let (command_tx, command_rx) = mpsc::channel(config.max_queue_size.max(64));
        let config = Arc::new(config);
        batcher::start(engine, Arc::clone(&config), command_rx);
        Scheduler { command_tx, config }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queues `rows` rows and waits for their outputs. Dropping the future
    /// (a client that disconnected) withdraws the request: it is removed
    /// before it reaches the engine.
    pub async fn infer(
        &self,
        rows: usize,
        inputs: Vec<Vec<f32>>,
    ) -> Result<Outputs, SchedulerError> {
        if rows == 0 || rows > self.config.max_batch_size {
            return Err(SchedulerError::TooManyRows {
                rows,
                max: self.config.max_batch_size,
            });
        }
        let (response_tx, response_rx) = oneshot::channel();
        let request = Request {
            rows,
            inputs,
            arrived: Instant::now(),
            response_tx,
        };
        self.command_tx
            .try_send(SchedulerCommand::Enqueue(request))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SchedulerError::QueueFull {
                    model: self.config.model.clone(),
                    capacity: self.config.max_queue_size,
                },
                mpsc::error::TrySendError::Closed(_) => SchedulerError::ShuttingDown {
                    model: self.config.model.clone(),
                },
            })?;
        response_rx.await.unwrap_or_else(|_| {
            Err(SchedulerError::ShuttingDown {
                model: self.config.model.clone(),
            })
        })
    }
}

#[cfg(test)]
mod tests;
