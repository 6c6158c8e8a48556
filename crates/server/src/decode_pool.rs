//! Background decoding: the bodies of background requests are parsed on
//! threads of their own, at a low niceness, so that the async runtime's
//! threads stay free for the requests a latency target protects.
//!
//! Why: a JSON inference body carries its tensor as text (about 60 KB for
//! the bundled model's 50 × 60 window), and parsing it is most of what the
//! runtime does per request. Under a flood of background requests, every
//! finished batch sets dozens of closed-loop clients sending again at once;
//! a real-time request that arrives then waits for their parses on the
//! runtime before its own even starts, and the runtime threads compete for
//! the cores at the same niceness as the parses they run.
//!
//! A request's class is only known once its body is parsed, so the server
//! decides by connection: a body of at least [`MIN_BODY_BYTES`] on a
//! connection whose previous request belonged to a class without a
//! `target_latency` is decoded here; the first request of a connection,
//! every request after one of a class with a target, and small bodies, on
//! the runtime as before. Clients that keep real-time and
//! background traffic on separate connections (as one client object per
//! class does) never have a real-time request decoded here; one that
//! switches a connection from background to real-time work has that first
//! real-time request decoded here, at the pool's niceness.
//!
//! ```text
//!  HTTP handler ── job (body, headers) ──▶ bounded queue ──▶ decode-N threads (nice)
//!       ▲                                                        │
//!       └──────── decoded requests (oneshot), in groups ◀─────────┘
//! ```
//!
//! A thread that finds more bodies queued decodes up to
//! [`HANDOVER_GROUP`] of them before it hands the results over, so the
//! runtime's threads, idle while the decoding is done elsewhere, are woken
//! once per group rather than once per request (docs/scheduling.md has
//! the measurement).
//!
//! The queue is bounded: when it is full (the decode threads cannot keep
//! up, or the cores are busy with work of a lower niceness) the handler
//! decodes the body itself, as it did before there was a pool, so the pool
//! never holds background work back from admission control and its 429s.
//! A request is never dropped: if the pool has stopped, the handler decodes
//! it itself too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tickserve_scheduler::os_thread;
use tickserve_telemetry as telemetry;
use tokio::sync::{mpsc, oneshot};

use crate::error::ServeError;

/// Jobs that may wait per decode thread: about 50 ms of parsing for the
/// bundled model's 60 KB bodies. Long enough that a closed-loop flood of a
/// few hundred clients, whose bodies wait here while the decode threads
/// yield the cores to real-time work, never spills onto the runtime; short
/// enough that a flood the threads cannot keep up with reaches admission
/// control (and its 429s) within that time.
const QUEUE_PER_THREAD: usize = 1024;

/// Smaller bodies are decoded on the runtime whatever their connection:
/// parsing one (a stream's tick, a few rows) takes a few microseconds, not
/// more than handing it to a decode thread and back.
pub(crate) const MIN_BODY_BYTES: usize = 16 * 1024;

/// The background decode threads (`--background-decode-threads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeConfig {
    /// Threads; 0: every body is decoded on the runtime.
    pub threads: usize,
    /// Their niceness (Linux, −20 to 19).
    pub nice: i32,
}

impl Default for DecodeConfig {
    /// One thread per two cores, at the niceness of the bundled general
    /// engine worker's background batches.
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        DecodeConfig {
            threads: (cores / 2).max(1),
            nice: 10,
        }
    }
}

/// One decode: runs the work, and returns how to hand its result over.
type Job = Box<dyn FnOnce() -> Handover + Send>;

/// Sends a finished decode's result to its request (waking its task).
type Handover = Box<dyn FnOnce() + Send>;

/// Most decodes a thread finishes before it hands their results over.
/// Each handover wakes a request's task on the runtime; when the runtime's
/// threads have gone idle waiting for decodes, the first wake of a group
/// starts one and the others find it running, instead of each paying for
/// waking an idle thread (two context switches, on a VM an exit to the
/// hypervisor). A group is only formed from jobs already queued, so a
/// decode never waits for a later one; it delays a background answer by
/// at most seven decodes (about 0.2 ms for 30 KB bodies).
const HANDOVER_GROUP: usize = 8;

/// A handle on the decode threads; cheap to clone. The threads stop when
/// the last handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct DecodePool {
    jobs: mpsc::Sender<Job>,
}

impl DecodePool {
    /// Starts the threads; `None` when `config.threads` is 0 or none could
    /// start (then every body is decoded on the runtime).
    pub(crate) fn start(config: DecodeConfig) -> Option<Self> {
        Self::with_queue(config, QUEUE_PER_THREAD * config.threads)
    }

    fn with_queue(config: DecodeConfig, capacity: usize) -> Option<Self> {
        if config.threads == 0 {
            return None;
        }
        let (jobs, queue) = mpsc::channel::<Job>(capacity.max(1));
        let queue = Arc::new(Mutex::new(queue));
        let mut started = 0;
        for index in 0..config.threads {
            let queue = Arc::clone(&queue);
            let spawned = std::thread::Builder::new()
                .name(format!("decode-{index}"))
                .spawn(move || decode_thread(&queue, config.nice));
            match spawned {
                Ok(_) => started += 1,
                Err(error) => tracing::error!(%error, "cannot start a background decode thread"),
            }
        }
        (started > 0).then_some(DecodePool { jobs })
    }

    /// Runs `work` on a decode thread (counted in
    /// `tickserve_background_decodes_total`), or on the caller's when the
    /// queue is full, and returns what it returned.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServeError> {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let value = work();
            Box::new(move || {
                let _ = done.send(value);
            })
        });
        match self.jobs.try_send(job) {
            Ok(()) => metrics::counter!(telemetry::BACKGROUND_DECODES_TOTAL).increment(1),
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => {
                job()()
            }
        }
        result.await.map_err(|_| {
            ServeError::Internal("the background decode thread stopped while decoding".into())
        })
    }
}

fn decode_thread(queue: &Mutex<mpsc::Receiver<Job>>, nice: i32) {
    if let Err(error) = os_thread::set_current_nice(nice) {
        tracing::warn!(nice, %error, "cannot set the background decode thread's niceness");
    }
    let mut finished: Vec<Handover> = Vec::with_capacity(HANDOVER_GROUP);
    loop {
        // One thread waits on the queue at a time; it lets go of the lock
        // before running the job.
        let waited = queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .blocking_recv();
        let Some(job) = waited else {
            return;
        };
        finished.extend(run_caught(job));
        while finished.len() < HANDOVER_GROUP {
            let queued = match queue.try_lock() {
                Ok(mut receiver) => receiver.try_recv().ok(),
                Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                    poisoned.into_inner().try_recv().ok()
                }
                // Another thread waits on the queue: it is empty. Waiting
                // for the lock would hold these results until a new job
                // came.
                Err(std::sync::TryLockError::WouldBlock) => None,
            };
            let Some(job) = queued else { break };
            finished.extend(run_caught(job));
        }
        for handover in finished.drain(..) {
            handover();
        }
    }
}

/// Runs one decode. A decoder bug fails its request (the caller sees the
/// result channel close), not the thread.
fn run_caught(job: Job) -> Option<Handover> {
    let handover = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    if handover.is_err() {
        tracing::error!("a background decode panicked; its request failed");
    }
    handover.ok()
}

/// What one connection's previous decoded request was: a request of a
/// class without a latency target ("background") or not. Shared by the
/// connection's requests (HTTP/2 streams included).
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionHistory(Arc<AtomicBool>);

impl ConnectionHistory {
    pub(crate) fn last_was_background(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, background: bool) {
        self.0.store(background, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn work_runs_on_a_decode_thread_at_the_pool_s_niceness() {
        let pool = DecodePool::start(DecodeConfig {
            threads: 2,
            nice: 7,
        })
        .unwrap();
        let (name, nice) = pool
            .run(|| {
                let name = std::thread::current().name().map(str::to_owned);
                (name, os_thread::current_nice().ok())
            })
            .await
            .unwrap();
        assert!(name.unwrap().starts_with("decode-"));
        if cfg!(target_os = "linux") {
            assert_eq!(nice, Some(7));
        }
    }

    #[tokio::test]
    async fn many_jobs_each_come_back_once_with_their_own_result() {
        let pool = DecodePool::start(DecodeConfig {
            threads: 2,
            nice: 0,
        })
        .unwrap();
        let runs: Vec<_> = (0..1000u32)
            .map(|i| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(move || i * 2).await })
            })
            .collect();
        for (i, run) in (0u32..).zip(runs) {
            assert_eq!(run.await.unwrap().unwrap(), i * 2);
        }
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_internal_error_and_the_pool_goes_on() {
        let pool = DecodePool::start(DecodeConfig {
            threads: 1,
            nice: 0,
        })
        .unwrap();
        let failed = pool.run(|| -> u32 { panic!("decoder bug") }).await;
        assert!(matches!(failed, Err(ServeError::Internal(_))), "{failed:?}");
        let name = pool.run(|| std::thread::current().name().map(str::to_owned));
        assert_eq!(name.await.unwrap().as_deref(), Some("decode-0"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_decodes_are_handed_over_together_and_a_lone_one_at_once() {
        let pool = DecodePool::start(DecodeConfig {
            threads: 1,
            nice: 0,
        })
        .unwrap();
        let lone = tokio::time::timeout(Duration::from_secs(10), pool.run(|| 1u32));
        assert_eq!(lone.await.expect("a lone decode waited").unwrap(), 1);

        // The thread held in a first decode while three more queue behind it.
        let ran = Arc::new(AtomicUsize::new(0));
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let first = tokio::spawn({
            let (pool, ran) = (pool.clone(), Arc::clone(&ran));
            async move {
                let counter = Arc::clone(&ran);
                let result = pool.run(move || {
                    started_tx.send(()).unwrap();
                    released.recv().unwrap();
                    counter.fetch_add(1, Ordering::SeqCst);
                });
                result.await.unwrap();
                // By the time the first result arrives, the queued ones ran.
                ran.load(Ordering::SeqCst)
            }
        });
        started.recv().unwrap();
        let queued: Vec<_> = (0..3)
            .map(|_| {
                let (pool, ran) = (pool.clone(), Arc::clone(&ran));
                tokio::spawn(
                    async move { pool.run(move || ran.fetch_add(1, Ordering::SeqCst)).await },
                )
            })
            .collect();
        while pool.jobs.capacity() > QUEUE_PER_THREAD - 3 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), 4);
        for run in queued {
            run.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_runs_the_work_on_the_caller_s_thread() {
        let one = DecodeConfig {
            threads: 1,
            nice: 0,
        };
        let pool = DecodePool::with_queue(one, 1).unwrap();
        // The one thread busy until released, and the one place taken.
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let thread_name = || std::thread::current().name().map(str::to_owned);
        let busy = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(move || {
                    started_tx.send(()).unwrap();
                    released.recv().unwrap();
                    thread_name()
                })
                .await
            }
        });
        started.recv().unwrap();
        let queued = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(thread_name).await }
        });
        // The queued job's place is taken once it is sent.
        while pool.jobs.capacity() > 0 {
            tokio::task::yield_now().await;
        }
        let caller = std::thread::current().id();
        let here = pool.run(move || std::thread::current().id() == caller);
        assert!(here.await.unwrap(), "the work ran on another thread");
        release.send(()).unwrap();
        let decode_0 = Some("decode-0".to_owned());
        assert_eq!(busy.await.unwrap().unwrap(), decode_0);
        assert_eq!(queued.await.unwrap().unwrap(), decode_0);
    }

    #[test]
    fn no_threads_means_no_pool() {
        let off = DecodeConfig {
            threads: 0,
            nice: 10,
        };
        assert!(DecodePool::start(off).is_none());
    }
}
