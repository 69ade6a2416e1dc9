//! The session store's metrics: the database's size on disk, commits and the writes they
//! carried (their ratio is the group commit at work), and each operation's latency from the
//! moment it was queued to its answer.

use metrics::{Counter, Gauge, Histogram};

/// Upper bounds of `blufio_store_operation_seconds`: from a cached read to an SD card's
/// slowest `fsync`.
pub const STORE_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The operations of `blufio_store_operation_seconds{op}`.
pub const STORE_OPS: [&str; 7] = [
    "create", "append", "delete", "spend", "history", "page", "enforce",
];

/// The store's metric handles, registered when the daemon is built.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// `blufio_store_bytes`: the database and its WAL on disk.
    pub bytes: Gauge,
    /// `blufio_store_commits_total`.
    pub commits: Counter,
    /// `blufio_store_writes_total`: write operations committed.
    pub writes: Counter,
    latencies: Vec<(&'static str, Histogram)>,
}

impl StoreMetrics {
    pub(super) fn new(
        bytes: Gauge,
        commits: Counter,
        writes: Counter,
        latencies: Vec<(&'static str, Histogram)>,
    ) -> StoreMetrics {
        StoreMetrics {
            bytes,
            commits,
            writes,
            latencies,
        }
    }

    /// Handles that record nowhere.
    pub fn noop() -> StoreMetrics {
        StoreMetrics::new(Gauge::noop(), Counter::noop(), Counter::noop(), Vec::new())
    }

    /// Returns the latency histogram of `op` (one of [`STORE_OPS`]).
    pub fn latency(&self, op: &str) -> Histogram {
        self.latencies
            .iter()
            .find(|(name, _)| *name == op)
            .map_or_else(Histogram::noop, |(_, histogram)| histogram.clone())
    }
}
