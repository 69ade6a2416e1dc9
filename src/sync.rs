//! Lock access that survives a poisoned lock.
//!
//! Everything blufio keeps behind a `Mutex` or `RwLock` is plain data (counters, maps,
//! readings) that a panic elsewhere cannot leave half-written, and a daemon that must run
//! for months cannot let one contained panic turn every later request into another. So a
//! poisoned lock is taken as it is.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, recovering the guard if a holder panicked.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes a read guard on `rwlock`, recovering it if a writer panicked.
pub(crate) fn read<T: ?Sized>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Takes the write guard on `rwlock`, recovering it if a holder panicked.
pub(crate) fn write<T: ?Sized>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
