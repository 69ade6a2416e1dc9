//! Where memory readings come from: the allocator's heap statistics ([`HeapSource`]) and the
//! process's resident set ([`RssSource`]), with hand-set sources for tests and hosts.

use std::{
    fmt, io,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use crate::error::Error;

/// Heap statistics from the allocator, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes allocated by the application (jemalloc `stats.allocated`).
    pub allocated_bytes: u64,
    /// Bytes in resident allocator pages (jemalloc `stats.resident`).
    pub resident_bytes: u64,
}

/// A source of heap statistics and the purge that returns free pages to the OS.
pub trait HeapSource: Send + Sync + fmt::Debug {
    /// Reads fresh statistics; `Ok(None)` when the allocator offers none.
    ///
    /// # Errors
    ///
    /// Returns an error when the allocator refuses the read.
    fn read(&self) -> Result<Option<HeapStats>, Error>;
    /// Returns unused pages of every arena to the OS.
    ///
    /// # Errors
    ///
    /// Returns an error when the allocator refuses the purge.
    fn purge(&self) -> Result<(), Error>;
    /// Returns pages that have been free for longer than the allocator's decay time to the
    /// OS. The monitor calls it on every tick, so memory comes back after a burst even when
    /// nothing allocates (jemalloc otherwise decays only as a side effect of allocating).
    /// The default does nothing.
    ///
    /// # Errors
    ///
    /// Returns an error when the allocator refuses the call.
    fn decay(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Returns the allocator's page size, when it has one.
    fn page_size(&self) -> Option<u64>;
    /// Returns the allocator's name, for diagnostics.
    fn name(&self) -> &'static str;
}

/// A source of the process's resident set size.
pub trait RssSource: Send + Sync + fmt::Debug {
    /// Reads the RSS in bytes; `Ok(None)` when this OS offers no source.
    ///
    /// # Errors
    ///
    /// Returns an error when the source exists but cannot be read.
    fn resident_bytes(&self) -> io::Result<Option<u64>>;
    /// Returns the name of the source (`statm`, `mach`, `none`, …).
    fn source(&self) -> &'static str;
}

/// Lets a caller keep a handle on the source it plugs in (to change a test reading, say).
impl<T: HeapSource + ?Sized> HeapSource for std::sync::Arc<T> {
    fn read(&self) -> Result<Option<HeapStats>, Error> {
        (**self).read()
    }

    fn purge(&self) -> Result<(), Error> {
        (**self).purge()
    }

    fn decay(&self) -> Result<(), Error> {
        (**self).decay()
    }

    fn page_size(&self) -> Option<u64> {
        (**self).page_size()
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

impl RssSource for blufio_platform::RssReader {
    fn resident_bytes(&self) -> io::Result<Option<u64>> {
        blufio_platform::RssReader::resident_bytes(self)
    }

    fn source(&self) -> &'static str {
        blufio_platform::RssReader::source(self)
    }
}

/// A heap source whose reading is set by hand: for tests and for hosts that measure memory
/// themselves. It counts purges and can be told to fail.
#[derive(Debug, Default)]
pub struct ManualHeap {
    allocated_bytes: AtomicU64,
    purges: AtomicU64,
    failing: AtomicBool,
}

impl ManualHeap {
    /// Creates a source reporting `allocated_bytes` (resident reads the same).
    pub fn new(allocated_bytes: u64) -> ManualHeap {
        let heap = ManualHeap::default();
        heap.set(allocated_bytes);
        heap
    }

    /// Sets the reading returned from now on.
    pub fn set(&self, allocated_bytes: u64) {
        self.allocated_bytes
            .store(allocated_bytes, Ordering::Relaxed);
    }

    /// Makes every read fail (`true`) or succeed again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// Returns how many purges were requested.
    pub fn purges(&self) -> u64 {
        self.purges.load(Ordering::Relaxed)
    }
}

impl HeapSource for ManualHeap {
    fn read(&self) -> Result<Option<HeapStats>, Error> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(Error::Allocator("simulated read failure".to_owned()));
        }
        let bytes = self.allocated_bytes.load(Ordering::Relaxed);
        Ok(Some(HeapStats {
            allocated_bytes: bytes,
            resident_bytes: bytes,
        }))
    }

    fn purge(&self) -> Result<(), Error> {
        self.purges.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn page_size(&self) -> Option<u64> {
        None
    }

    fn name(&self) -> &'static str {
        "manual"
    }
}

/// An RSS source with a fixed reading (`None` simulates an OS without a source).
#[derive(Debug, Clone, Copy)]
pub struct FixedRss(pub Option<u64>);

impl RssSource for FixedRss {
    fn resident_bytes(&self) -> io::Result<Option<u64>> {
        Ok(self.0)
    }

    fn source(&self) -> &'static str {
        if self.0.is_some() { "fixed" } else { "none" }
    }
}
