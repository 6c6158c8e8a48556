//! Locking for the cache's mutexes.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex` even when poisoned: a panic while holding one of the
/// cache's locks leaves plain data behind (a table, the breaker, the last
/// error), and the cache keeps serving rather than failing every request
/// after it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
