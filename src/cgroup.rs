//! The daemon's own cgroup memory limit and usage (container limits, systemd `MemoryMax=`),
//! refreshed with every monitor tick, exported only when known, and the `"auto"` thresholds
//! derived from the limit.
//!
//! The files are read by `blufio_platform::CgroupReader`; this file keeps the latest reading
//! and renders it. It never acts on the reading: shedding stays driven by blufio's own
//! thresholds, which "auto" merely places below the kernel's.

use std::{
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use blufio_platform::{CgroupMemory, CgroupReader};

/// Share of the cgroup limit that `memory_limit_mb = "auto"` takes, in percent.
pub const AUTO_LIMIT_PERCENT: u64 = 75;
/// Share of the cgroup limit that `memory_warn_mb = "auto"` takes, in percent.
pub const AUTO_WARN_PERCENT: u64 = 60;

/// The latest cgroup reading, if this process has a readable cgroup.
#[derive(Debug)]
pub struct CgroupMonitor {
    reader: Option<CgroupReader>,
    latest: Mutex<Option<CgroupMemory>>,
    failing: AtomicBool,
}

impl CgroupMonitor {
    /// Creates the monitor and takes a first reading.
    pub fn new(reader: Option<CgroupReader>) -> CgroupMonitor {
        let monitor = CgroupMonitor {
            reader,
            latest: Mutex::new(None),
            failing: AtomicBool::new(false),
        };
        monitor.refresh();
        monitor
    }

    /// Reads the cgroup files again; returns false when a read failed (logged once per
    /// episode, and the previous reading kept).
    pub fn refresh(&self) -> bool {
        let Some(reader) = &self.reader else {
            return true;
        };
        match reader.read() {
            Ok(memory) => {
                *self.lock() = Some(memory);
                self.failing.store(false, Ordering::Relaxed);
                true
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    log::warn!("cannot read the cgroup memory files: {error}");
                }
                false
            }
        }
    }

    /// Returns the latest reading (`None` without a cgroup).
    pub fn latest(&self) -> Option<CgroupMemory> {
        *self.lock()
    }

    /// Returns the cgroup's hard memory limit, when it has one.
    pub fn limit_bytes(&self) -> Option<u64> {
        self.latest().and_then(|memory| memory.limit_bytes)
    }

    /// Writes `blufio_memory_cgroup_limit_bytes` and `blufio_memory_cgroup_usage_bytes`,
    /// each only when known: a missing limit is absent, never 0.
    pub fn render(&self, out: &mut String) {
        let Some(memory) = self.latest() else {
            return;
        };
        let mut gauge = |name: &str, help: &str, value: Option<u64>| {
            if let Some(value) = value {
                // Writing to a String cannot fail.
                let _ = write!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n\n"
                );
            }
        };
        gauge(
            "blufio_memory_cgroup_limit_bytes",
            "Memory limit of the daemon's cgroup (memory.max or memory.limit_in_bytes), in bytes.",
            memory.limit_bytes,
        );
        gauge(
            "blufio_memory_cgroup_usage_bytes",
            "Memory charged to the daemon's cgroup (memory.current or memory.usage_in_bytes), in bytes.",
            memory.usage_bytes,
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<CgroupMemory>> {
        crate::sync::lock(&self.latest)
    }
}

/// Returns `percent` of `limit_bytes` in whole MiB (at least 1).
pub fn share_mb(limit_bytes: u64, percent: u64) -> u64 {
    let mb = u128::from(limit_bytes) * u128::from(percent) / 100 / (1024 * 1024);
    u64::try_from(mb).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_whole_mib() {
        assert_eq!(share_mb(1 << 30, AUTO_LIMIT_PERCENT), 768);
        assert_eq!(share_mb(1 << 30, AUTO_WARN_PERCENT), 614);
        assert_eq!(share_mb(1000, AUTO_WARN_PERCENT), 1);
    }

    #[test]
    fn no_cgroup_renders_nothing() {
        let monitor = CgroupMonitor::new(None);
        let mut out = String::new();
        monitor.render(&mut out);
        assert!(out.is_empty());
        assert_eq!(monitor.limit_bytes(), None);
    }
}
