//! Reads this process's resident memory and standard process statistics, one file per OS.
//!
//! This crate is the only place in blufio that knows which operating system it runs on. It
//! exposes [`RssReader`] (resident set size, read on every memory-monitor tick) and
//! [`ProcessReader`] (the standard `process_*` Prometheus metrics, read on every scrape). On
//! an OS without a source both return `Ok(None)`: callers omit the reading instead of
//! reporting a fake zero. It deliberately caches nothing in statics: every reader is a value
//! owned by whoever created it.
//!
//! ```
//! let reader = blufio_platform::RssReader::new().expect("the reader opens");
//! if let Some(bytes) = reader.resident_bytes().expect("the reading succeeds") {
//!     assert!(bytes > 0);
//! }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod cgroup;
mod fd_limit;
mod file;
#[cfg(all(target_os = "linux", not(feature = "force-fallback")))]
#[path = "linux.rs"]
mod imp;
#[cfg(all(target_os = "macos", not(feature = "force-fallback")))]
#[path = "macos.rs"]
mod imp;
#[cfg(any(
    feature = "force-fallback",
    not(any(target_os = "linux", target_os = "macos"))
))]
#[path = "fallback.rs"]
mod imp;
mod journal;
mod notify;

/// The pure parsers of Linux `/proc` text, public only for the fuzz targets in `fuzz/`; not
/// part of the API.
#[doc(hidden)]
#[cfg(all(target_os = "linux", not(feature = "force-fallback")))]
pub mod proc_text {
    pub use crate::imp::{Stat, Statm, parse_boot_time, parse_stat, parse_statm};
}

use std::io;

pub use crate::{
    cgroup::{
        CgroupMemory, CgroupPaths, CgroupReader, CgroupVersion, parse_bytes, parse_limit,
        parse_proc_cgroup,
    },
    fd_limit::{FdLimits, fd_limits, set_fd_soft_limit},
    file::{open_regular, read_regular, try_lock_exclusive},
    journal::{parse_journal_stream, stderr_is_journal},
    notify::{NotifySocket, monotonic_usec},
};

/// Reads this process's resident set size.
#[derive(Debug)]
pub struct RssReader {
    imp: imp::Reader,
}

impl RssReader {
    /// Opens the reader, doing the one-time set-up (the page size on Linux).
    ///
    /// # Errors
    ///
    /// Returns the OS error when the page size cannot be read.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux reads `sysconf(_SC_PAGESIZE)` once. macOS and other systems need no set-up.
    pub fn new() -> io::Result<RssReader> {
        Ok(RssReader {
            imp: imp::Reader::new()?,
        })
    }

    /// Returns the resident set size in bytes, or `None` where this OS offers no source.
    ///
    /// # Errors
    ///
    /// Returns an error when the source exists but cannot be read or parsed.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux: `/proc/self/statm` field 2 times the page size. macOS: `task_info` with
    /// `MACH_TASK_BASIC_INFO`. Other systems: always `Ok(None)`.
    pub fn resident_bytes(&self) -> io::Result<Option<u64>> {
        self.imp.resident_bytes()
    }

    /// Returns the name of the RSS source, for diagnostics (`"statm"`, `"mach"` or `"none"`).
    pub fn source(&self) -> &'static str {
        imp::SOURCE
    }

    /// Returns the page size this reader multiplies by, where it has one.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux: the kernel's page size from `sysconf`. Elsewhere: `None`.
    pub fn page_size(&self) -> Option<u64> {
        self.imp.page_size()
    }
}

/// One reading of the standard process metrics; a field is `None` where the OS has no source.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    /// Resident set size in bytes (`process_resident_memory_bytes`).
    pub resident_memory_bytes: Option<u64>,
    /// Virtual memory size in bytes (`process_virtual_memory_bytes`).
    pub virtual_memory_bytes: Option<u64>,
    /// User plus system CPU time in seconds (`process_cpu_seconds_total`).
    pub cpu_seconds: Option<f64>,
    /// Number of open file descriptors (`process_open_fds`).
    pub open_fds: Option<u64>,
    /// Soft limit on open file descriptors (`process_max_fds`).
    pub max_fds: Option<u64>,
    /// Process start time in seconds since the Unix epoch (`process_start_time_seconds`).
    pub start_time_seconds: Option<f64>,
}

/// Reads the standard process metrics every Prometheus client exports.
#[derive(Debug)]
pub struct ProcessReader {
    imp: imp::ProcessReader,
}

impl ProcessReader {
    /// Opens the reader (page size and clock tick rate on Linux).
    ///
    /// # Errors
    ///
    /// Returns the OS error when a system constant cannot be read.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux reads `sysconf(_SC_PAGESIZE)` and `sysconf(_SC_CLK_TCK)` once.
    pub fn new() -> io::Result<ProcessReader> {
        Ok(ProcessReader {
            imp: imp::ProcessReader::new()?,
        })
    }

    /// Reads a fresh sample.
    ///
    /// # Errors
    ///
    /// Returns an error when a source exists but cannot be read or parsed.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux: every field, from `/proc/self/stat`, `/proc/self/statm`, `/proc/stat`,
    /// `/proc/self/fd` and `getrlimit`. macOS: memory and CPU from `task_info` and
    /// `getrusage`, `max_fds` from `getrlimit`; no open-fd count or start time. Other
    /// systems: every field `None`.
    pub fn sample(&self) -> io::Result<ProcessSample> {
        self.imp.sample()
    }
}
