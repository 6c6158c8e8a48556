//! Work offered to helper threads that may be asleep, busy or slow to
//! wake, so that a call never waits for a helper that has not started.
//!
//! Why: a helper that has been idle for a while is parked, and waking it
//! can take longer than the whole call. On the 2-vCPU development VM, after
//! a 1 ms idle gap the helper started a median ~0.5 ms after a one-row call
//! began (`--example idle_gaps`), while the call itself takes ~0.4 ms on
//! one thread. A rayon scope waits for every job it spawned, started or
//! not, so such a call took as long as the wake-up.
//!
//! How: [`run_offering`] hands each job to the pool and runs the caller's
//! own share. Then, job by job, the caller takes back any job no helper
//! has claimed yet and runs it itself, and waits only for jobs a helper is
//! already running. A late helper finds its job gone and returns. Either
//! way each job runs exactly once, and a call costs at most what one
//! thread would take, plus the offer.
//!
//! Waking is the other half of the cost, so [`Spin`] keeps the helpers
//! awake for a while after each call (like ONNX Runtime's intra-op
//! spinning): the next call's jobs are then taken within microseconds.
//!
//! Soundness: a job borrows from the caller's stack (`'a`), but the pool
//! needs `'static` jobs, so the job's lifetime is erased while it sits in
//! the shared slot. The slot is emptied exactly once, under its lock: by a
//! helper, which runs the job, drops it, and only then sets `done`; or by
//! the caller. [`run_offering`] does not return, or unwind past its guard,
//! until every slot is empty and every job a helper took is `done`. So no
//! job, and nothing it borrows, is touched after `'a` ends, and the guard
//! is private, so it cannot be leaked to skip that wait.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// A job for one helper: it borrows from the caller for `'a`.
pub(crate) type Job<'a> = Box<dyn FnOnce() + Send + 'a>;

/// How long the caller spins before it parks while a helper finishes: the
/// one-row pipeline's helper usually ends some steps (~10–90 µs) after the
/// caller, and parking and being woken cost ~45 µs on the development VM.
const SPIN_BEFORE_PARKING: Duration = Duration::from_micros(200);

/// How long a parked caller sleeps before it looks again, should an
/// unpark be missed (it cannot be: the helper unparks after `done`).
const PARK_TIMEOUT: Duration = Duration::from_millis(1);

/// One offered job, shared between the caller and the pool.
struct Slot {
    /// The job until someone takes it. `'static` only while in the slot;
    /// see the module's soundness note.
    job: Mutex<Option<Job<'static>>>,
    /// No helper uses the job any more: one took it, ran it and dropped
    /// it, or the caller took it back.
    done: AtomicBool,
    /// ... and it panicked.
    panicked: AtomicBool,
    /// The calling thread, unparked when `done` is set.
    caller: Thread,
}

impl Slot {
    fn take(&self) -> Option<Job<'static>> {
        self.job
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Takes the job back for the caller, if no helper has taken it.
    fn withdraw(&self) -> Option<Job<'static>> {
        let job = self.take();
        if job.is_some() {
            self.done.store(true, Ordering::Relaxed);
        }
        job
    }

    /// Runs on a helper: the job, if the caller has not taken it back.
    fn run_on_helper(&self) {
        let Some(job) = self.take() else {
            return;
        };
        // The job is consumed (and dropped) inside the call, panic or not.
        let panicked = std::panic::catch_unwind(AssertUnwindSafe(job)).is_err();
        self.panicked.store(panicked, Ordering::Relaxed);
        self.done.store(true, Ordering::Release);
        self.caller.unpark();
    }

    /// Waits until the helper that took the job has finished it.
    fn wait_done(&self) {
        let started = Instant::now();
        let mut spins = 0u32;
        while !self.done.load(Ordering::Acquire) {
            spins = spins.wrapping_add(1);
            // Reading the clock costs more than a spin: look every 64.
            if !spins.is_multiple_of(64) || started.elapsed() < SPIN_BEFORE_PARKING {
                std::hint::spin_loop();
            } else {
                std::thread::park_timeout(PARK_TIMEOUT);
            }
        }
    }
}

/// Takes back, or waits for, every offered job when dropped: on the normal
/// path everything is already settled; on an unwind out of the caller's
/// share this keeps the borrowed data alive until no helper uses it.
struct Settle(Vec<Arc<Slot>>);

impl Drop for Settle {
    fn drop(&mut self) {
        for slot in &self.0 {
            if slot.withdraw().is_none() {
                slot.wait_done();
            }
        }
    }
}

/// Runs `mine` on the calling thread while offering `jobs` to `pool`, then
/// runs here every job no helper claimed, in order, and waits for those
/// that helpers are running. Returns `mine`'s result and whether any job
/// panicked (a job's panic does not unwind into the caller; a panic in
/// `mine` does, after the jobs are settled).
pub(crate) fn run_offering<'a, R>(
    pool: &rayon::ThreadPool,
    jobs: Vec<Job<'a>>,
    mine: impl FnOnce() -> R,
) -> (R, bool) {
    let caller = std::thread::current();
    let slots: Vec<Arc<Slot>> = jobs
        .into_iter()
        .map(|job| {
            // SAFETY: only the lifetime changes. The job leaves the slot
            // (and is run and dropped, or dropped) before `Settle` lets
            // this function return or unwind, i.e. within `'a`; see the
            // module's soundness note.
            let job: Job<'static> = unsafe { std::mem::transmute::<Job<'a>, Job<'static>>(job) };
            Arc::new(Slot {
                job: Mutex::new(Some(job)),
                done: AtomicBool::new(false),
                panicked: AtomicBool::new(false),
                caller: caller.clone(),
            })
        })
        .collect();
    let settle = Settle(slots);
    for slot in &settle.0 {
        let slot = Arc::clone(slot);
        pool.spawn(move || slot.run_on_helper());
    }
    let result = mine();
    let mut panicked = false;
    for slot in &settle.0 {
        match slot.withdraw() {
            Some(job) => {
                panicked |= std::panic::catch_unwind(AssertUnwindSafe(job)).is_err();
            }
            None => {
                slot.wait_done();
                panicked |= slot.panicked.load(Ordering::Relaxed);
            }
        }
    }
    drop(settle);
    (result, panicked)
}

/// Keeps helper threads spinning for a while after a call, so that the
/// next call's jobs are taken at once instead of after a wake-up (a median
/// ~0.5 ms after a 1 ms idle gap on the development VM).
#[derive(Debug)]
pub(crate) struct Spin {
    /// How long a helper spins after a call; zero parks it at once.
    duration: Duration,
    /// Calls started so far: a spinning helper stops when this changes.
    calls: Arc<AtomicU64>,
}

impl Spin {
    pub(crate) fn new(duration: Duration) -> Self {
        Spin {
            duration,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A call that offers jobs is starting: spinning helpers stop and turn
    /// to the pool's queue. Returns the call's number for [`Spin::after`].
    pub(crate) fn call_starts(&self) -> u64 {
        self.calls.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Call `call` has ended: `helpers` helpers spin until the next call
    /// starts or the spin time is up.
    pub(crate) fn after(&self, pool: &rayon::ThreadPool, helpers: usize, call: u64) {
        if self.duration.is_zero() {
            return;
        }
        for _ in 0..helpers {
            let calls = Arc::clone(&self.calls);
            let duration = self.duration;
            pool.spawn(move || {
                let started = Instant::now();
                // Yielding, not pausing: on a machine with as many busy
                // threads as cores, a pure spin kept the server's own
                // threads waiting for the core (p99 1.0 → 2.4 ms through
                // the server on the 2-vCPU VM); a yield hands the core to
                // any runnable thread and returns at once when there is
                // none.
                while calls.load(Ordering::Relaxed) == call && started.elapsed() < duration {
                    std::thread::yield_now();
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// Blocks the pool's only thread until the returned sender is used
    /// (or dropped).
    fn occupy(pool: &rayon::ThreadPool) -> mpsc::Sender<()> {
        let (release, blocked) = mpsc::channel::<()>();
        let (started, running) = mpsc::channel::<()>();
        pool.spawn(move || {
            started.send(()).unwrap_or(());
            blocked.recv().unwrap_or(());
        });
        running.recv().unwrap();
        release
    }

    #[test]
    fn every_job_runs_exactly_once_with_helpers_free() {
        let pool = pool(2);
        for _ in 0..200 {
            let runs: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
            let jobs: Vec<Job<'_>> = runs
                .iter()
                .map(|r| {
                    Box::new(move || {
                        r.fetch_add(1, Ordering::Relaxed);
                    }) as Job<'_>
                })
                .collect();
            let (value, panicked) = run_offering(&pool, jobs, || 7);
            assert_eq!(value, 7);
            assert!(!panicked);
            assert!(runs.iter().all(|r| r.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn the_caller_runs_jobs_no_helper_claimed_without_waiting_for_one() {
        let pool = pool(1);
        let release = occupy(&pool);
        let here = std::thread::current().id();
        let mut ran_on = None;
        let jobs: Vec<Job<'_>> = vec![Box::new(|| ran_on = Some(std::thread::current().id()))];
        // The only helper is blocked until after this returns: a wait for
        // it would never end.
        let ((), panicked) = run_offering(&pool, jobs, || ());
        release.send(()).unwrap();
        assert!(!panicked);
        assert_eq!(ran_on, Some(here));
    }

    #[test]
    fn a_helper_job_that_panics_is_reported_not_unwound() {
        let pool = pool(1);
        let (started, running) = mpsc::channel::<()>();
        let jobs: Vec<Job<'_>> = vec![Box::new(move || {
            started.send(()).unwrap_or(());
            panic!("job fails");
        })];
        // The caller's share waits until a helper has the job, so the
        // helper (not the caller) runs it.
        let (value, panicked) = run_offering(&pool, jobs, || running.recv().is_ok());
        assert!(value);
        assert!(panicked);
    }

    #[test]
    fn a_panic_in_the_callers_share_waits_for_the_helpers_first() {
        let pool = pool(1);
        let finished = AtomicBool::new(false);
        let (started, running) = mpsc::channel::<()>();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let jobs: Vec<Job<'_>> = vec![Box::new(|| {
                started.send(()).unwrap_or(());
                std::thread::sleep(Duration::from_millis(50));
                finished.store(true, Ordering::Relaxed);
            })];
            run_offering(&pool, jobs, || {
                running.recv().unwrap_or(());
                panic!("caller fails");
            })
        }));
        assert!(outcome.is_err());
        // The unwind waited for the helper's job, which borrows `finished`.
        assert!(finished.load(Ordering::Relaxed));
    }
}
