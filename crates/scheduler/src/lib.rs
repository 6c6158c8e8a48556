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
//! * The batcher task ([`batcher`]) owns the pure [`queue::PriorityQueue`]
//!   (one FIFO per request class, aging, deadlines) and decides *when* a
//!   batch leaves and *what* it holds (see [`queue`]). It only hands a
//!   batch to a worker that is idle, so requests keep joining the queue
//!   while the engine runs. It also admits or refuses each arrival
//!   against its deadline, expires requests on a timer, fits the engine
//!   time per batch size ([`estimate`]) and runs the adaptive batch-size
//!   controller ([`adaptive`], fed by [`monitor`]).
//! * Engine workers are OS threads: engine calls are long, CPU-bound and
//!   synchronous, and must never block the async runtime. A batch travels
//!   to a worker one engine call (*chunk*) at a time and comes back to the
//!   batcher between chunks, so a request of a higher class waits at most
//!   one chunk ([`batcher`], docs/scheduling.md). Workers may be reserved
//!   for some classes and pinned to cores ([`InstanceGroup`]).
//!
//! Every channel is bounded, and every class queue is capped by its
//! `max_queue_size`: overload turns into a fast, explicit refusal
//! ([`SchedulerError::QueueFull`], [`SchedulerError::DeadlineUnmeetable`])
//! with a computed retry hint, never into unbounded memory.
//! docs/scheduling.md describes the policy for operators.

pub mod adaptive;
mod batcher;
pub mod estimate;
mod inflight;
pub mod monitor;
pub mod os_thread;
pub mod priority;
pub mod queue;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use tickserve_engine::{Engine, EngineError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use adaptive::AdaptiveConfig;
pub use priority::{Aging, ClassPolicy, ClassSet, Priority};
pub use stats::{SchedulerStats, StatsSnapshot};

/// How one model version's requests are scheduled.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Model name, used as the `model` label of metrics and in logs.
    pub model: String,
    /// Model version, the `version` label of metrics: two loaded versions
    /// of one model keep separate series (queue length, batch sizes, …).
    pub version: String,
    /// Most rows in one engine call (and in one request); the adaptive
    /// controller moves the live batch size between its minimum and this.
    pub max_batch_size: usize,
    /// Per-class policy, index 0 = priority 1.
    pub classes: [ClassPolicy; Priority::LEVELS],
    /// Class of a request that names none.
    pub default_priority: Priority,
    pub aging: Aging,
    /// Whether an idle engine starts a batch as soon as waiting is not
    /// useful (measured arrival rate), instead of always waiting for a
    /// full batch or the class delay.
    pub work_conserving: bool,
    /// Engine worker threads serving every class, when `instance_groups`
    /// is empty.
    pub instances: usize,
    /// Engine worker threads by group: each group serves some classes and
    /// may be pinned to cores. Empty: `instances` workers serving all.
    pub instance_groups: Vec<InstanceGroup>,
    /// Whether a batch whose best class has a higher class with a
    /// `target_latency` above it runs in chunks, between which waiting
    /// work of higher classes goes first.
    pub chunking: bool,
    /// Whether the batcher runs on an OS thread (and runtime) of its own
    /// (the default), rather than as a task on the caller's runtime
    /// (tests on tokio's paused clock need the latter).
    pub own_thread: bool,
    /// Rows per chunk. `None`: the most rows the instance's measured
    /// engine time fits into the tightest higher target, less one row's
    /// time (the waiting request's own batch).
    pub chunk_rows: Option<usize>,
    pub adaptive: AdaptiveConfig,
}

/// Engine worker threads reserved for some classes and, optionally,
/// pinned to CPU cores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceGroup {
    /// Worker threads in the group.
    pub count: usize,
    /// The classes its workers take requests of.
    pub classes: ClassSet,
    /// Cores its workers are pinned to, one each, round robin; empty: the
    /// OS places them.
    pub cores: Vec<usize>,
    /// The OS scheduling niceness its workers run background batches at
    /// (Linux: −20 to 19; higher yields the cores to everything else);
    /// batches led by a class with a `target_latency` run at the thread's
    /// own. `None`: the process's.
    pub nice: Option<i32>,
}

/// One engine worker thread: the classes it serves, its core and its
/// niceness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerPlan {
    pub classes: ClassSet,
    pub core: Option<usize>,
    pub nice: Option<i32>,
}

impl WorkerPlan {
    /// Where the worker stands when idle workers are offered work, lowest
    /// first: the most reserved, then, among workers of as many classes,
    /// the one whose background work yields least (`nice`; none counts as
    /// 0). A worker at a high niceness (a scavenger using a core's spare
    /// time) then takes only what the others are too busy for.
    pub(crate) fn offer_rank(&self) -> (usize, i32) {
        (self.classes.len(), self.nice.unwrap_or(0))
    }
}

impl SchedulerConfig {
    /// The seed's defaults for every class, one instance, version "1"
    /// (set [`SchedulerConfig::version`] for any other).
    pub fn new(model: impl Into<String>, max_batch_size: usize) -> Self {
        SchedulerConfig {
            model: model.into(),
            version: "1".to_owned(),
            max_batch_size,
            classes: Priority::ALL.map(ClassPolicy::default_for),
            default_priority: Priority::new(3).unwrap_or(Priority::LOWEST),
            aging: Aging::default(),
            work_conserving: true,
            instances: 1,
            instance_groups: Vec::new(),
            chunking: true,
            own_thread: true,
            chunk_rows: None,
            adaptive: AdaptiveConfig::default(),
        }
    }

    pub fn class(&self, priority: Priority) -> &ClassPolicy {
        &self.classes[priority.index()]
    }

    /// Every engine worker thread to start, in the order they are offered
    /// work ([`WorkerPlan::offer_rank`]): reserved ones first.
    pub fn workers(&self) -> Vec<WorkerPlan> {
        if self.instance_groups.is_empty() {
            return vec![
                WorkerPlan {
                    classes: ClassSet::ALL,
                    core: None,
                    nice: None,
                };
                self.instances.max(1)
            ];
        }
        let mut plans: Vec<WorkerPlan> = self
            .instance_groups
            .iter()
            .flat_map(|group| {
                (0..group.count).map(move |i| WorkerPlan {
                    classes: group.classes,
                    core: (!group.cores.is_empty()).then(|| group.cores[i % group.cores.len()]),
                    nice: group.nice,
                })
            })
            .collect();
        plans.sort_by_key(WorkerPlan::offer_rank);
        plans
    }
}

/// Per-request scheduling options, filled by every protocol front end.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InferOptions {
    /// `None`: the model's default class.
    pub priority: Option<Priority>,
    /// A timeout of the request's own; capped at its class default.
    pub timeout: Option<Duration>,
}

/// Why a request was not answered by the engine.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SchedulerError {
    #[error(
        "the priority {priority} queue of model '{model}' is full ({capacity} requests waiting); retry in {} ms",
        retry_after.as_millis()
    )]
    QueueFull {
        model: String,
        priority: Priority,
        capacity: usize,
        retry_after: Duration,
    },
    #[error(
        "admission refused: a priority {priority} request to model '{model}' cannot meet its {} ms deadline (predicted completion in {} ms from the queue ahead and the measured service rate); retry in {} ms",
        timeout.as_millis(),
        predicted.as_millis(),
        retry_after.as_millis()
    )]
    DeadlineUnmeetable {
        model: String,
        priority: Priority,
        timeout: Duration,
        predicted: Duration,
        retry_after: Duration,
    },
    #[error(
        "request timeout expired: the priority {priority} request to model '{model}' waited its {} ms timeout without reaching the engine",
        timeout.as_millis()
    )]
    TimeoutExpired {
        model: String,
        priority: Priority,
        timeout: Duration,
        retry_after: Duration,
    },
    #[error("priority {0} does not allow a per-request timeout (allow_timeout_override = false)")]
    TimeoutNotAllowed(Priority),
    #[error("timeout must be at least 1 microsecond")]
    ZeroTimeout,
    #[error(
        "load shed: model '{model}' is refusing priority {higher} requests for lack of capacity, so priority {priority} requests are refused first; retry in {} ms",
        retry_after.as_millis()
    )]
    Shed {
        model: String,
        priority: Priority,
        higher: Priority,
        retry_after: Duration,
    },
    #[error("model '{model}' is shutting down")]
    ShuttingDown { model: String },
    #[error("request has {rows} rows, more than the model's max_batch_size {max}")]
    TooManyRows { rows: usize, max: usize },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl SchedulerError {
    /// When the client should retry, for refusals caused by load.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SchedulerError::QueueFull { retry_after, .. }
            | SchedulerError::DeadlineUnmeetable { retry_after, .. }
            | SchedulerError::Shed { retry_after, .. }
            | SchedulerError::TimeoutExpired { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
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
    pub priority: Priority,
    pub arrived: Instant,
    /// The timeout it runs under; `arrived + timeout` is its deadline.
    pub timeout: Duration,
    pub response_tx: oneshot::Sender<Result<Outputs, SchedulerError>>,
    /// How long admission predicted it would wait from `arrived` to the
    /// start of its batch; set by the scheduler (`None` before admission,
    /// or when nothing was ahead of it).
    pub predicted_wait: Option<Duration>,
    /// Its trace spans (docs/operations.md, "Tracing").
    pub spans: RequestSpans,
}

/// The trace spans of one request in the scheduler: a `queue` span open
/// from submission until its batch starts (or until it is refused,
/// expires or is withdrawn), and the span of the request itself, parent of
/// the `engine` span of every engine call its rows are in (created by the
/// worker thread). Disabled, and free, when traces are not exported.
#[derive(Debug)]
pub struct RequestSpans {
    /// The request's span, parent of its `engine` spans.
    pub parent: tracing::Span,
    /// Closed when the request's batch starts.
    pub queue: tracing::Span,
}

impl RequestSpans {
    /// No spans (tests, and requests nobody traces).
    pub fn none() -> Self {
        RequestSpans {
            parent: tracing::Span::none(),
            queue: tracing::Span::none(),
        }
    }

    /// A `queue` span opened now under the current span, which becomes the
    /// parent of the engine spans.
    fn open(priority: Priority, rows: usize) -> Self {
        let parent = tracing::Span::current();
        if parent.is_disabled() {
            // An untraced caller: a queue span would start a trace of its own.
            return RequestSpans::none();
        }
        let queue = tracing::info_span!(
            target: tickserve_telemetry::traces::TRACE_TARGET,
            parent: &parent,
            "queue",
            priority = priority.level(),
            rows,
        );
        RequestSpans { parent, queue }
    }

    /// Closes the `queue` span: the request's batch starts.
    pub(crate) fn end_queue(&mut self) {
        self.queue = tracing::Span::none();
    }
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
    stats: Arc<SchedulerStats>,
}

impl Scheduler {
    /// Starts the batcher (on its own thread, or as a task on the current
    /// tokio runtime: [`SchedulerConfig::own_thread`]) and the engine
    /// worker threads.
    ///
    /// # Panics
    /// Outside a tokio runtime when `own_thread` is false.
    pub fn spawn(engine: Arc<dyn Engine>, config: SchedulerConfig) -> Self {
        // Room for every class's queue at once; the batcher drains it
        // continuously, and a full channel is reported as a full queue.
        let capacity: usize = config.classes.iter().map(|c| c.max_queue_size).sum();
        let (command_tx, command_rx) = mpsc::channel(capacity.max(64));
        let config = Arc::new(config);
        let stats = Arc::new(SchedulerStats::new(config.max_batch_size));
        batcher::start(engine, Arc::clone(&config), Arc::clone(&stats), command_rx);
        Scheduler {
            command_tx,
            config,
            stats,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Counters since start, for the statistics endpoint.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The counters themselves, for the result cache in front of this
    /// scheduler (requests it answers never reach the batcher).
    pub fn counters(&self) -> &SchedulerStats {
        &self.stats
    }

    /// Queues `rows` rows and waits for their outputs. Dropping the future
    /// (a client that disconnected) withdraws the request: it is removed
    /// before it reaches the engine.
    pub async fn infer(
        &self,
        rows: usize,
        inputs: Vec<Vec<f32>>,
        options: InferOptions,
    ) -> Result<Outputs, SchedulerError> {
        if rows == 0 || rows > self.config.max_batch_size {
            return Err(SchedulerError::TooManyRows {
                rows,
                max: self.config.max_batch_size,
            });
        }
        let priority = options.priority.unwrap_or(self.config.default_priority);
        let class = self.config.class(priority);
        let timeout = match options.timeout {
            None => class.default_timeout,
            Some(t) if t.is_zero() => return Err(SchedulerError::ZeroTimeout),
            Some(_) if !class.allow_timeout_override => {
                return Err(SchedulerError::TimeoutNotAllowed(priority));
            }
            Some(t) => t.min(class.default_timeout),
        };
        let (response_tx, response_rx) = oneshot::channel();
        let request = Request {
            rows,
            inputs,
            priority,
            arrived: Instant::now(),
            timeout,
            response_tx,
            predicted_wait: None,
            spans: RequestSpans::open(priority, rows),
        };
        self.command_tx
            .try_send(SchedulerCommand::Enqueue(request))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    self.stats.class(priority).count_rejected_queue_full();
                    SchedulerError::QueueFull {
                        model: self.config.model.clone(),
                        priority,
                        capacity: class.max_queue_size,
                        retry_after: self.stats.retry_hint(),
                    }
                }
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
