//! The registry's shared state and [`Connections`]: counts, the memory total and its peak,
//! and closing connections for the memory monitor and the drain.

use std::{
    fmt,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use metrics::Gauge;

use super::{admission::Counts, subtract_saturating, *};

pub(super) struct Shared {
    pub(super) counts: Mutex<Counts>,
    /// The origin of the millisecond timestamps kept in atomics.
    pub(super) epoch: Instant,
    /// Heap charged to all open connections.
    pub(super) bytes: AtomicU64,
    /// The highest `bytes` since the memory monitor last asked ([`Connections::take_peak`]).
    pub(super) peak: AtomicU64,
    pub(super) open_gauge: Gauge,
    pub(super) memory_gauge: Gauge,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(super) fn now_millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Plain counters; a panic elsewhere cannot leave them half-written.
        crate::sync::lock(&self.counts)
    }

    pub(super) fn add(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let total = self
            .bytes
            .fetch_add(bytes, Ordering::AcqRel)
            .saturating_add(bytes);
        self.peak.fetch_max(total, Ordering::AcqRel);
        self.memory_gauge.set(total as f64);
    }

    pub(super) fn subtract(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        // Saturating: a release never exceeds what was charged, but stay safe if it did.
        let previous = subtract_saturating(&self.bytes, bytes);
        self.memory_gauge.set(previous.saturating_sub(bytes) as f64);
    }

    pub(super) fn leave(&self, id: u64, key: (Listener, IpAddr), evicted: bool) {
        let total = {
            let mut counts = self.lock();
            counts.open.remove(&id);
            if evicted {
                counts.evicting = counts.evicting.saturating_sub(1);
                if key.0 == Listener::Gateway {
                    counts.evicting_gateway = counts.evicting_gateway.saturating_sub(1);
                }
            }
            counts.total = counts.total.saturating_sub(1);
            if key.0 == Listener::Gateway {
                counts.gateway = counts.gateway.saturating_sub(1);
            }
            if let Some(count) = counts.per_ip.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.per_ip.remove(&key);
                }
            }
            counts.total
        };
        self.open_gauge.set(total as f64);
    }
}

/// Open connections, their limits and the memory charged to them.
#[derive(Debug)]
pub struct Connections {
    pub(super) shared: Arc<Shared>,
    pub(super) max_connections: usize,
    pub(super) max_per_ip: usize,
}

/// What [`Connections::admit`] reports beside its decision, for the once-per-episode log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Episode {
    /// Nothing to log.
    Quiet,
    /// The first connection of an episode at the limit (refused, or let in by closing
    /// another).
    Started,
    /// Admission resumed below the limit, [`EPISODE_QUIET`] after an episode that lasted
    /// `lasted` (from its first connection refused or closed to make room to its last).
    Ended {
        /// Connections refused during the episode.
        refused: u64,
        /// Connections closed during the episode to make room for new ones.
        evicted: u64,
        /// How long the episode lasted, its quiet end not included.
        lasted: Duration,
    },
}

impl Connections {
    /// Creates an empty registry with its limits and the gauges that mirror it.
    pub fn new(
        max_connections: usize,
        max_per_ip: usize,
        open_gauge: Gauge,
        memory_gauge: Gauge,
    ) -> Connections {
        Connections {
            shared: Arc::new(Shared {
                counts: Mutex::new(Counts::default()),
                epoch: Instant::now(),
                bytes: AtomicU64::new(0),
                peak: AtomicU64::new(0),
                open_gauge,
                memory_gauge,
            }),
            max_connections: max_connections.max(1),
            max_per_ip: max_per_ip.max(1),
        }
    }

    /// Returns the effective `max_connections`.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Returns the effective `max_connections_per_ip`.
    pub fn max_per_ip(&self) -> usize {
        self.max_per_ip
    }

    /// Returns the number of open connections.
    pub fn open(&self) -> usize {
        self.shared.lock().total
    }

    /// Returns how many kept-alive connections wait idle for their next request.
    pub fn idle_kept_alive(&self) -> usize {
        self.shared
            .lock()
            .open
            .values()
            .filter(|tracked| {
                tracked.phase() == Phase::Idle && tracked.requests() > 0 && !tracked.responding()
            })
            .count()
    }

    /// Returns how many connections are writing a response their client has stopped reading
    /// (see [`Tracked::write_stalled`]).
    pub fn stalled_readers(&self) -> usize {
        self.shared
            .lock()
            .open
            .values()
            .filter(|tracked| tracked.write_stalled())
            .count()
    }

    /// Returns how many connections closed to make room have not finished closing.
    pub fn evicting(&self) -> usize {
        self.shared.lock().evicting
    }

    /// Returns the heap charged to open connections, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Acquire)
    }

    /// Returns the highest heap charged to connections since the previous call (or since
    /// start), and starts the next period at the current charge.
    pub fn take_peak(&self) -> u64 {
        let now = self.shared.bytes.load(Ordering::Acquire);
        self.shared.peak.swap(now, Ordering::AcqRel).max(now)
    }

    /// Closes connections until about `bytes` of charged memory is freed: first incomplete
    /// requests (a partial head, or a body being read), oldest first, then idle kept-alive
    /// ones and responses their clients have stopped reading, oldest first. Connections running
    /// a handler, taking in their response, or a WebSocket are left alone. Returns how many
    /// were closed.
    pub fn shed(&self, bytes: u64) -> usize {
        let counts = self.shared.lock();
        let mut freed = 0u64;
        let mut closed = 0;
        let incomplete = |tracked: &Tracked| matches!(tracked.phase(), Phase::Head | Phase::Body);
        // A connection writing its response (a streamed reply) looks idle until its next
        // read, but is not, unless its client has stopped reading.
        let idle = |tracked: &Tracked| {
            tracked.phase() == Phase::Idle && (!tracked.responding() || tracked.write_stalled())
        };
        for wanted in [&incomplete as &dyn Fn(&Tracked) -> bool, &idle] {
            for tracked in counts.open.values() {
                if freed >= bytes {
                    return closed;
                }
                if wanted(tracked) && !tracked.shed.is_closed() {
                    freed = freed.saturating_add(tracked.memory_bytes());
                    tracked.shed.close();
                    closed += 1;
                }
            }
        }
        closed
    }

    /// Closes every connection whose request head is still incomplete, for the drain: such a
    /// request has not reached the daemon, and a slow or abandoned head would otherwise hold
    /// the drain for its whole head deadline. A body being read is a request that reached the
    /// daemon, and is left to finish. Returns how many were closed.
    pub fn close_partial_heads(&self) -> usize {
        let counts = self.shared.lock();
        let mut closed = 0;
        for tracked in counts.open.values() {
            if tracked.phase() == Phase::Head && !tracked.shed.is_closed() {
                tracked.head_closed.store(true, Ordering::Release);
                tracked.shed.close();
                closed += 1;
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::{IP, registry};

    #[test]
    fn the_drain_closes_incomplete_heads_only() {
        let connections = registry(10, 10);
        let [head, body, idle, busy] =
            [Phase::Head, Phase::Body, Phase::Idle, Phase::Busy].map(|phase| {
                let guard = connections.admit(Listener::Gateway, IP).0.unwrap();
                if phase == Phase::Body {
                    guard.tracked().set_phase(Phase::Busy);
                }
                guard.tracked().set_phase(phase);
                guard
            });
        assert_eq!(connections.close_partial_heads(), 1);
        assert!(head.tracked().head_closed() && head.tracked().shed.is_closed());
        for other in [&body, &idle, &busy] {
            assert!(!other.tracked().shed.is_closed());
        }
    }

    #[test]
    fn the_peak_covers_connections_closed_since_the_last_look() {
        let connections = registry(10, 10);
        let guard = connections.admit(Listener::Gateway, IP).0.unwrap();
        guard.tracked().charge(1 << 20);
        let held = connections.memory_bytes();
        assert_eq!(connections.take_peak(), held);
        drop(guard);
        assert_eq!(connections.memory_bytes(), 0);
        assert_eq!(connections.take_peak(), held, "closed since the last look");
        assert_eq!(connections.take_peak(), 0);
    }

    #[test]
    fn shedding_closes_incomplete_requests_oldest_first_and_spares_busy_ones() {
        let connections = registry(10, 10);
        let busy = connections.admit(Listener::Gateway, IP).0.unwrap();
        busy.tracked().set_phase(Phase::Busy);
        let idle = connections.admit(Listener::Gateway, IP).0.unwrap();
        let old_body = connections.admit(Listener::Gateway, IP).0.unwrap();
        old_body.tracked().set_phase(Phase::Busy);
        old_body.tracked().set_phase(Phase::Body);
        let new_head = connections.admit(Listener::Gateway, IP).0.unwrap();
        new_head.tracked().set_phase(Phase::Head);
        assert_eq!(connections.shed(1), 1);
        assert!(old_body.tracked().shed.is_closed());
        assert!(!new_head.tracked().shed.is_closed());
        assert_eq!(connections.shed(1), 1);
        assert!(new_head.tracked().shed.is_closed());
        assert!(!idle.tracked().shed.is_closed(), "idle ones go last");
        assert_eq!(connections.shed(u64::MAX), 1);
        assert!(idle.tracked().shed.is_closed());
        assert!(!busy.tracked().shed.is_closed());
    }
}
