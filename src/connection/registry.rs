//! [`Connections`]: the registry's limits, counts and memory total as the daemon reads them,
//! and closing connections for the memory monitor and the drain.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use metrics::Gauge;

use super::{
    limits::*,
    tracked::{Counts, Shared, Tracked},
};

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
pub(crate) const IP: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

#[cfg(test)]
pub(crate) const OTHER: std::net::IpAddr =
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

/// A registry for tests, its gauges on a recorder of its own.
#[cfg(test)]
pub(crate) fn registry(max: usize, per_ip: usize) -> Connections {
    use metrics::Recorder;
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let key = metrics::Key::from_static_name("test");
    let metadata = metrics::Metadata::new("test", metrics::Level::INFO, None);
    Connections::new(
        max,
        per_ip,
        recorder.register_gauge(&key, &metadata),
        recorder.register_gauge(&key, &metadata),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connection::tracked::MemoryCharge;

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

    #[test]
    fn dropping_a_guard_releases_its_place_and_memory() {
        let connections = registry(1, 1);
        let guard = connections.admit(Listener::Probes, IP).0.unwrap();
        assert_eq!(connections.memory_bytes(), CONNECTION_BASE_BYTES);
        guard.tracked().set_phase(Phase::Head);
        guard.tracked().note_read_buffer(512);
        guard.tracked().charge(100);
        assert_eq!(
            connections.memory_bytes(),
            CONNECTION_BASE_BYTES + HEAD_STATE_BYTES + 512 + 100
        );
        assert!(connections.admit(Listener::Probes, IP).0.is_err());
        let tracked = Arc::clone(guard.tracked());
        drop(guard);
        assert_eq!(connections.memory_bytes(), 0);
        // A buffer released after its connection closed leaves the total alone.
        tracked.release(100);
        tracked.charge(50);
        assert_eq!(connections.memory_bytes(), 0);
        assert!(connections.admit(Listener::Probes, IP).0.is_ok());
    }

    #[test]
    fn an_upgraded_connection_is_charged_the_websocket_cost_until_it_closes() {
        let connections = registry(10, 10);
        let plain = connections.admit(Listener::Gateway, IP).0.unwrap();
        let socket = connections.admit(Listener::Gateway, IP).0.unwrap();
        socket.tracked().note_read_buffer(4096);
        socket.tracked().set_phase(Phase::Busy);
        socket.tracked().set_phase(Phase::Upgraded);
        // Marked twice on the way (before the 101 and after it): counted once.
        socket.tracked().set_phase(Phase::Upgraded);
        let plain_cost = fixed_cost(Phase::Idle, false);
        assert_eq!(connections.memory_bytes(), plain_cost + UPGRADED_COST_BYTES);
        drop(socket);
        assert_eq!(connections.memory_bytes(), plain_cost);
        drop(plain);
        assert_eq!(connections.memory_bytes(), 0);
    }

    #[test]
    fn the_read_buffer_charge_only_grows_and_phases_set_the_fixed_part() {
        let connections = registry(2, 2);
        let guard = connections.admit(Listener::Gateway, IP).0.unwrap();
        let tracked = guard.tracked();
        tracked.set_phase(Phase::Head);
        tracked.note_read_buffer(1024);
        tracked.note_read_buffer(24);
        assert_eq!(
            tracked.memory_bytes(),
            fixed_cost(Phase::Head, false) + 1024
        );
        tracked.set_phase(Phase::Busy);
        tracked.set_phase(Phase::Idle);
        assert_eq!(tracked.memory_bytes(), fixed_cost(Phase::Idle, true) + 1024);
        assert_eq!(connections.memory_bytes(), tracked.memory_bytes());
    }

    #[test]
    fn a_memory_charge_follows_its_buffer_and_is_released_on_drop() {
        let connections = registry(1, 1);
        let guard = connections.admit(Listener::Gateway, IP).0.unwrap();
        let base = connections.memory_bytes();
        let mut charge = MemoryCharge::new(Some(Arc::clone(guard.tracked())));
        charge.set(4096);
        charge.set(8192);
        assert_eq!(connections.memory_bytes(), base + 8192);
        charge.set(1024);
        assert_eq!(connections.memory_bytes(), base + 1024);
        drop(charge);
        assert_eq!(connections.memory_bytes(), base);
    }

    #[test]
    fn a_response_its_client_stopped_reading_can_be_closed_after_a_second() {
        let connections = registry(10, 10);
        let guard = connections.admit(Listener::Gateway, IP).0.unwrap();
        let tracked = guard.tracked();
        tracked.set_phase(Phase::Busy);
        tracked.set_phase(Phase::Idle);
        tracked.set_responding(true);
        tracked.note_write_blocked();
        assert!(!tracked.write_stalled(), "flow control, for now");
        // Progress within the second forgets the block.
        tracked.note_write_progress();
        assert_eq!(tracked.write_blocked.load(Ordering::Acquire), 0);
        // A block that has lasted a second (backdated here) marks the reader as stalled, and
        // a trickle of progress does not clear it.
        let long_ago = connections
            .shared
            .now_millis()
            .saturating_add(1)
            .saturating_sub(WRITE_BLOCKED_EVICTABLE.as_millis() as u64);
        tracked
            .write_blocked
            .store(long_ago.max(1), Ordering::Release);
        if long_ago == 0 {
            // The registry is younger than a second: wait for the block to age.
            std::thread::sleep(WRITE_BLOCKED_EVICTABLE);
        }
        assert!(tracked.write_stalled());
        tracked.note_write_progress();
        assert!(tracked.write_stalled());
        assert_eq!(connections.shed(1), 1, "shed with the idle ones");
        // The next response starts afresh.
        tracked.set_responding(false);
        tracked.set_responding(true);
        assert!(!tracked.write_stalled());
    }
}
