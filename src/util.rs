//! Small helpers every subsystem needs the same way: wall-clock
//! milliseconds and a mutex lock that survives a poisoned lock.

use std::sync::{Mutex, MutexGuard};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Lock `m`, taking the data over from a thread that panicked while holding
/// it: every lock in the agent guards state that stays consistent between
/// statements, so a panic elsewhere is no reason to stop serving.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
