//! How the OS schedules the server's threads, beside the async runtime's
//! own ordering: niceness for engine workers that should yield the cores
//! (`[[instance_group]] nice`), and an opt-in real-time policy for the
//! threads a real-time request passes through (`--realtime-priority`).
//!
//! On a machine whose cores are all busy, a real-time request's latency is
//! mostly its wait for a core at each hop: the runtime thread that reads
//! and decodes it, the batcher thread, the engine worker, the runtime
//! thread that writes the answer. Queue order inside tickserve cannot
//! shorten those waits; the OS scheduler can. With a real-time priority
//! set, the runtime threads, every batcher thread and the workers reserved
//! for classes with a latency target run under `SCHED_FIFO`: they take a
//! core as soon as they are runnable and give it back when they block,
//! while general engine workers, model loading and everything else on the
//! machine use what is left (Linux keeps 5 % of each second for them
//! through `sched_rt_runtime_us`).
//!
//! Linux only; elsewhere the calls fail with `Unsupported` and the callers
//! log it. A thread's policy and niceness are its own (`gettid`), never the
//! whole process's.

use std::sync::OnceLock;

/// The `SCHED_FIFO` priority (1–99) of the request path; unset: none.
static REALTIME_PRIORITY: OnceLock<u8> = OnceLock::new();

/// Sets the process-wide real-time priority of the request path, before
/// any scheduler starts. Later calls are ignored (it is fixed at start).
pub fn set_realtime_priority(priority: u8) {
    let _ = REALTIME_PRIORITY.set(priority);
}

/// The request path's real-time priority, when one is set.
pub fn realtime_priority() -> Option<u8> {
    REALTIME_PRIORITY.get().copied()
}

/// Puts the calling thread under `SCHED_FIFO` at the configured priority,
/// when one is set; logs (does not fail) when the OS refuses, which it
/// does without `CAP_SYS_NICE`: the thread then keeps the normal policy.
pub fn enter_realtime(thread: &str) {
    let Some(priority) = realtime_priority() else {
        return;
    };
    match imp::set_policy(imp::FIFO, i32::from(priority)) {
        Ok(()) => tracing::debug!(thread, priority, "thread runs under SCHED_FIFO"),
        Err(error) => tracing::warn!(
            thread,
            priority,
            %error,
            "cannot give this thread a real-time priority (needs CAP_SYS_NICE); it keeps the normal policy"
        ),
    }
}

/// Returns the calling thread to the normal policy, for blocking work
/// (model loading, warm-up) that a runtime thread under `SCHED_FIFO` must
/// not run at that priority.
pub fn leave_realtime() {
    if realtime_priority().is_some()
        && let Err(error) = imp::set_policy(imp::NORMAL, 0)
    {
        tracing::warn!(%error, "cannot return a blocking thread to the normal policy");
    }
}

/// Sets the calling thread's niceness (−20 to 19).
pub fn set_current_nice(nice: i32) -> std::io::Result<()> {
    imp::set_nice(nice)
}

/// The calling thread's niceness.
pub fn current_nice() -> std::io::Result<i32> {
    imp::nice()
}

#[cfg(target_os = "linux")]
mod imp {
    pub(super) const NORMAL: i32 = libc::SCHED_OTHER;
    pub(super) const FIFO: i32 = libc::SCHED_FIFO;

    fn check(result: i32) -> std::io::Result<()> {
        if result == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    pub(super) fn set_nice(nice: i32) -> std::io::Result<()> {
        // SAFETY: gettid has no preconditions; setpriority reads only its
        // integer arguments. On Linux, PRIO_PROCESS with a thread id sets
        // that thread's niceness alone.
        check(unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) })
    }

    pub(super) fn nice() -> std::io::Result<i32> {
        // SAFETY: errno is this thread's; getpriority reads only its
        // integer arguments. It may return −1 as a value, so errno tells
        // an error apart.
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t);
            if nice == -1 && *libc::__errno_location() != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(nice)
        }
    }

    pub(super) fn set_policy(policy: i32, priority: i32) -> std::io::Result<()> {
        let param = libc::sched_param {
            sched_priority: priority,
        };
        // SAFETY: `param` outlives the call, which only reads it; pid 0 is
        // the calling thread.
        check(unsafe { libc::sched_setscheduler(0, policy, &param) })
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) const NORMAL: i32 = 0;
    pub(super) const FIFO: i32 = 1;

    fn unsupported() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "per-thread scheduling is supported on Linux only",
        )
    }

    pub(super) fn set_nice(_nice: i32) -> std::io::Result<()> {
        Err(unsupported())
    }

    pub(super) fn nice() -> std::io::Result<i32> {
        Err(unsupported())
    }

    pub(super) fn set_policy(_policy: i32, _priority: i32) -> std::io::Result<()> {
        Err(unsupported())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The calling thread's policy, as the OS reports it.
    fn policy() -> i32 {
        // SAFETY: pid 0 is the calling thread; no memory is passed.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn fifo_is_entered_and_left_or_refused_for_want_of_the_capability() {
        // A thread of its own: the policy must not leak into other tests.
        std::thread::spawn(|| match imp::set_policy(imp::FIFO, 1) {
            Ok(()) => {
                assert_eq!(policy(), libc::SCHED_FIFO);
                imp::set_policy(imp::NORMAL, 0).unwrap();
                assert_eq!(policy(), libc::SCHED_OTHER);
            }
            Err(error) => {
                assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
                assert_eq!(policy(), libc::SCHED_OTHER);
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn niceness_is_the_calling_thread_s_alone() {
        std::thread::spawn(|| {
            set_current_nice(12).unwrap();
            assert_eq!(current_nice().unwrap(), 12);
        })
        .join()
        .unwrap();
        assert_ne!(
            current_nice().unwrap(),
            12,
            "another thread's niceness leaked into this one"
        );
    }
}
