//! jemalloc glue: heap statistics and the all-arenas purge, behind the `jemalloc` feature.
//!
//! Without the feature, [`AllocatorHeap`] reports no heap reading and purging does nothing,
//! so blufio still builds and runs on the system allocator. This is the only file allowed
//! `unsafe`, for the raw `mallctl` calls that `tikv-jemalloc-ctl` cannot express.

use std::fmt;

use crate::{
    error::Error,
    memory::{HeapSource, HeapStats},
};

/// Reads heap statistics from the global allocator (jemalloc when the feature is on).
pub struct AllocatorHeap {
    #[cfg(feature = "jemalloc")]
    epoch: tikv_jemalloc_ctl::epoch_mib,
    #[cfg(feature = "jemalloc")]
    allocated: tikv_jemalloc_ctl::stats::allocated_mib,
    #[cfg(feature = "jemalloc")]
    resident: tikv_jemalloc_ctl::stats::resident_mib,
    page_size: Option<u64>,
}

impl fmt::Debug for AllocatorHeap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AllocatorHeap")
            .field("allocator", &self.name())
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// `MALLCTL_ARENAS_ALL`: jemalloc's pseudo-index meaning "every arena".
#[cfg(feature = "jemalloc")]
const PURGE_ALL_ARENAS: &[u8] = b"arena.4096.purge\0";
/// Decay-based purging of every arena (returns what has been free past the decay time).
#[cfg(feature = "jemalloc")]
const DECAY_ALL_ARENAS: &[u8] = b"arena.4096.decay\0";

/// jemalloc's options, baked into the binary (measured with `cargo xtask bench`; see the
/// README's Performance section):
///
/// - `narenas:1`: one arena instead of four per CPU. blufio runs a handful of threads, and
///   each extra arena keeps its own partly used pages: about 0.4 MiB less RssAnon at idle.
/// - `dirty_decay_ms:1000,muzzy_decay_ms:0`: freed pages go back to the OS about a second
///   after they were last used instead of ten, and are released at once rather than kept
///   "muzzy"; together with [`HeapSource::decay`] on every monitor tick, the daemon returns
///   to near its idle size within one tick after a burst.
///
/// jemalloc reads this before `main` and then the `_RJEM_MALLOC_CONF` environment variable,
/// whose options override these (for example `_RJEM_MALLOC_CONF=narenas:4`).
#[cfg(feature = "jemalloc")]
pub const MALLOC_CONF: &str = "narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0";

#[cfg(feature = "jemalloc")]
const MALLOC_CONF_C: &[u8] = b"narenas:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// The `malloc_conf` symbol jemalloc looks up (prefixed `_rjem_` as tikv-jemalloc-sys builds
/// it); jemalloc's own definition is weak, so this one wins.
#[cfg(feature = "jemalloc")]
// SAFETY: jemalloc reads this as a `const char *` to a NUL-terminated string, once, before
// or at its first allocation; `Option<&u8>` has that layout, and the bytes are static and
// never written. No other item in the program has this name.
#[allow(unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static JEMALLOC_MALLOC_CONF: Option<&'static u8> = Some(&MALLOC_CONF_C[0]);

impl AllocatorHeap {
    /// Looks up the allocator's statistics entries once, so each tick is a few cheap reads.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Allocator`] when jemalloc refuses the lookups.
    #[cfg(feature = "jemalloc")]
    pub fn new() -> Result<AllocatorHeap, Error> {
        let error = |what: &str, e: tikv_jemalloc_ctl::Error| {
            Error::Allocator(format!("cannot look up {what}: {e}"))
        };
        // SAFETY: `arenas.page` is a read-only `size_t` entry, matching the requested type.
        #[allow(unsafe_code)]
        let page_size = unsafe { tikv_jemalloc_ctl::raw::read::<usize>(b"arenas.page\0") }
            .map_err(|e| error("arenas.page", e))?;
        Ok(AllocatorHeap {
            epoch: tikv_jemalloc_ctl::epoch::mib().map_err(|e| error("epoch", e))?,
            allocated: tikv_jemalloc_ctl::stats::allocated::mib()
                .map_err(|e| error("stats.allocated", e))?,
            resident: tikv_jemalloc_ctl::stats::resident::mib()
                .map_err(|e| error("stats.resident", e))?,
            page_size: Some(page_size as u64),
        })
    }

    /// Returns a reader for the system allocator, which offers no statistics.
    ///
    /// # Errors
    ///
    /// Never fails; the signature matches the jemalloc build.
    #[cfg(not(feature = "jemalloc"))]
    pub fn new() -> Result<AllocatorHeap, Error> {
        Ok(AllocatorHeap { page_size: None })
    }
}

impl HeapSource for AllocatorHeap {
    #[cfg(feature = "jemalloc")]
    fn read(&self) -> Result<Option<HeapStats>, Error> {
        // Statistics are cached by jemalloc until the epoch advances (about 13 µs), which is
        // why this runs on the monitor tick and never per request.
        self.epoch
            .advance()
            .map_err(|e| Error::Allocator(format!("epoch advance failed: {e}")))?;
        let allocated = self
            .allocated
            .read()
            .map_err(|e| Error::Allocator(format!("stats.allocated read failed: {e}")))?;
        let resident = self
            .resident
            .read()
            .map_err(|e| Error::Allocator(format!("stats.resident read failed: {e}")))?;
        Ok(Some(HeapStats {
            allocated_bytes: allocated as u64,
            resident_bytes: resident as u64,
        }))
    }

    #[cfg(not(feature = "jemalloc"))]
    fn read(&self) -> Result<Option<HeapStats>, Error> {
        Ok(None)
    }

    #[cfg(feature = "jemalloc")]
    fn purge(&self) -> Result<(), Error> {
        arena_command(PURGE_ALL_ARENAS)
    }

    #[cfg(not(feature = "jemalloc"))]
    fn purge(&self) -> Result<(), Error> {
        Ok(())
    }

    #[cfg(feature = "jemalloc")]
    fn decay(&self) -> Result<(), Error> {
        arena_command(DECAY_ALL_ARENAS)
    }

    fn page_size(&self) -> Option<u64> {
        self.page_size
    }

    fn name(&self) -> &'static str {
        if cfg!(feature = "jemalloc") {
            "jemalloc"
        } else {
            "system"
        }
    }
}

/// Runs a jemalloc `arena.<i>.<command>` entry; `name` is NUL-terminated.
#[cfg(feature = "jemalloc")]
fn arena_command(name: &[u8]) -> Result<(), Error> {
    // `tikv_jemalloc_ctl::raw::write` would pass a non-null new value, which these entries
    // reject with EPERM: they must be called with all four pointers null.
    // SAFETY: `name` is NUL-terminated (the constants above); null old/new pointers with zero
    // lengths are how `arena.<i>.purge` and `arena.<i>.decay` are called.
    #[allow(unsafe_code)]
    let code = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if code == 0 {
        Ok(())
    } else {
        let name = String::from_utf8_lossy(name.strip_suffix(b"\0").unwrap_or(name));
        Err(Error::Allocator(format!(
            "{name} failed with error code {code}"
        )))
    }
}

#[cfg(all(test, feature = "jemalloc"))]
mod tests {
    use super::*;

    #[test]
    fn jemalloc_reports_growth_and_purge_succeeds() {
        let heap = AllocatorHeap::new().unwrap();
        let before = heap.read().unwrap().unwrap();
        let block = vec![1u8; 8 * 1024 * 1024];
        let during = heap.read().unwrap().unwrap();
        assert!(during.allocated_bytes >= before.allocated_bytes + 4 * 1024 * 1024);
        drop(block);
        heap.purge().unwrap();
        heap.decay().unwrap();
        assert!(heap.page_size().unwrap() >= 4096);
    }

    #[test]
    fn baked_malloc_conf_is_the_one_jemalloc_runs_with() {
        assert_eq!(MALLOC_CONF_C, format!("{MALLOC_CONF}\0").as_bytes());
        // SAFETY: `opt.*` entries are read-only; `narenas` is an `unsigned`, the decay times
        // are `ssize_t`.
        #[allow(unsafe_code)]
        let (narenas, dirty, muzzy) = unsafe {
            (
                tikv_jemalloc_ctl::raw::read::<u32>(b"opt.narenas\0").unwrap(),
                tikv_jemalloc_ctl::raw::read::<isize>(b"opt.dirty_decay_ms\0").unwrap(),
                tikv_jemalloc_ctl::raw::read::<isize>(b"opt.muzzy_decay_ms\0").unwrap(),
            )
        };
        // The test runner may set `_RJEM_MALLOC_CONF`, which is meant to win.
        if std::env::var_os("_RJEM_MALLOC_CONF").is_none() {
            assert_eq!((narenas, dirty, muzzy), (1, 1000, 0));
        }
    }
}
