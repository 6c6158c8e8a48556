//! How the OS schedules the server's threads, beside the async runtime's
//! own ordering: niceness for engine workers that should yield the cores
//! (`[[instance_group]] nice`), a short time slice for the threads a
//! real-time request passes through (`--request-slice`, on by default), and
//! an opt-in real-time policy for the same threads (`--realtime-priority`).
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
//! Without privileges, Linux 6.12 and later still let a thread ask for a
//! shorter slice of the fair scheduler (EEVDF's `sched_runtime`): its
//! virtual deadline comes sooner, so when it wakes on a busy core it
//! preempts a thread with the default slice (an engine worker, a load
//! generator) instead of queueing behind it, while its share of the CPU
//! stays that of its niceness. The request path's threads ask for one
//! (default 100 µs); older kernels ignore the request.
//!
//! Linux only; elsewhere the calls fail with `Unsupported` and the callers
//! log it. A thread's policy and niceness are its own (`gettid`), never the
//! whole process's.

use std::sync::OnceLock;
use std::time::Duration;

/// The `SCHED_FIFO` priority (1–99) of the request path; unset: none.
static REALTIME_PRIORITY: OnceLock<u8> = OnceLock::new();

/// The fair-scheduler slice of the request path; unset or zero: the
/// kernel's default.
static REQUEST_SLICE: OnceLock<Duration> = OnceLock::new();

/// The shortest and longest slice Linux accepts (it clamps to these).
pub const SLICE_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_micros(100)..=Duration::from_millis(100);

/// Sets the process-wide slice of the request path's threads, before any
/// scheduler starts; zero keeps the kernel's default. Later calls are
/// ignored (it is fixed at start).
pub fn set_request_slice(slice: Duration) {
    let _ = REQUEST_SLICE.set(slice);
}

/// The request path's slice, when one is set (non-zero).
pub fn request_slice() -> Option<Duration> {
    REQUEST_SLICE.get().copied().filter(|s| !s.is_zero())
}

/// Sets the process-wide real-time priority of the request path, before
/// any scheduler starts. Later calls are ignored (it is fixed at start).
pub fn set_realtime_priority(priority: u8) {
    let _ = REALTIME_PRIORITY.set(priority);
}

/// The request path's real-time priority, when one is set.
pub fn realtime_priority() -> Option<u8> {
    REALTIME_PRIORITY.get().copied()
}

/// Makes the calling thread one of the request path's: it asks for the
/// configured slice, then enters `SCHED_FIFO` at the configured priority,
/// each when one is set. Logs (does not fail) when the OS refuses, which
/// it does for `SCHED_FIFO` without `CAP_SYS_NICE`: the thread then keeps
/// the normal policy.
pub fn enter_request_path(thread: &str) {
    if let Some(slice) = request_slice() {
        match imp::set_slice(slice) {
            Ok(()) => tracing::debug!(thread, ?slice, "thread asks for a short slice"),
            Err(error) => {
                tracing::warn!(thread, ?slice, %error, "cannot set this thread's time slice")
            }
        }
    }
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

/// Returns the calling thread to the normal policy and the kernel's
/// default slice, for blocking work (model loading, warm-up) that a
/// runtime thread must not run as part of the request path.
pub fn leave_request_path() {
    if realtime_priority().is_some()
        && let Err(error) = imp::set_policy(imp::NORMAL, 0)
    {
        tracing::warn!(%error, "cannot return a blocking thread to the normal policy");
    }
    if request_slice().is_some()
        && let Err(error) = imp::set_slice(Duration::ZERO)
    {
        tracing::warn!(%error, "cannot return a blocking thread to the default slice");
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

    /// `struct sched_attr` of `sched_setattr(2)`, first version (56 bytes).
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        /// For the fair policies (Linux 6.12+): the requested slice, ns.
        pub(super) runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }

    pub(super) fn attributes() -> std::io::Result<SchedAttr> {
        let mut attr = SchedAttr::default();
        let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
        // SAFETY: the kernel writes at most `size` bytes into `attr`, a
        // `repr(C)` struct of that size; pid 0 is the calling thread.
        let result = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut SchedAttr,
                size,
                0,
            )
        };
        check(result as i32)?;
        Ok(attr)
    }

    /// Keeps the thread's policy, priority and niceness; changes only the
    /// slice (zero: the kernel's default).
    pub(super) fn set_slice(slice: std::time::Duration) -> std::io::Result<()> {
        let mut attr = attributes()?;
        attr.size = std::mem::size_of::<SchedAttr>() as u32;
        attr.flags = 0;
        attr.runtime = u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: the kernel only reads `attr`, which outlives the call;
        // pid 0 is the calling thread.
        let result =
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
        check(result as i32)
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

    pub(super) fn set_slice(_slice: std::time::Duration) -> std::io::Result<()> {
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

    /// Whether the running kernel honours a fair thread's own slice
    /// (Linux 6.12 and later).
    fn kernel_has_custom_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .expect("Linux reports its release");
        let mut numbers = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        let major = numbers.next().unwrap_or(0);
        let minor = numbers.next().unwrap_or(0);
        (major, minor) >= (6, 12)
    }

    #[test]
    fn a_thread_asks_for_its_own_slice_and_keeps_its_niceness() {
        std::thread::spawn(|| {
            set_current_nice(3).unwrap();
            let default = imp::attributes().unwrap().runtime;
            imp::set_slice(Duration::from_micros(200)).unwrap();
            let attr = imp::attributes().unwrap();
            if kernel_has_custom_slices() {
                assert_eq!(attr.runtime, 200_000);
            }
            assert_eq!(current_nice().unwrap(), 3, "the slice reset the niceness");
            assert_eq!(policy(), libc::SCHED_OTHER);
            imp::set_slice(Duration::ZERO).unwrap();
            assert_eq!(imp::attributes().unwrap().runtime, default);
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
