//! The connection registry: how many client connections are open (in total, per listener
//! and per IP), what phase each one is in, and how much heap they are charged for.
//!
//! It decides admission at accept time (`max_connections`, `max_connections_per_ip`, and a
//! reserve on the probe listener so `/health` answers during a flood on the gateway), and it
//! lets the memory monitor attribute heap to connections and close them (oldest incomplete
//! head first) instead of touching sessions. It does not read or write sockets: that is
//! `listener.rs`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use metrics::Gauge;

/// Heap charged to every open connection besides its buffered head bytes: the request buffer,
/// the connection task and the transport. Measured: 2,000 connections each holding a partial
/// head raised jemalloc's `stats.allocated` by about 20 KB apiece (issue 7).
pub const CONNECTION_COST_BYTES: u64 = 20 * 1024;

/// Heap charged to an upgraded WebSocket instead of [`CONNECTION_COST_BYTES`]: its task, its
/// buffers and transport, and its session. Measured: 1,000 idle sockets raised jemalloc's
/// `stats.allocated` by about 7.6 KB apiece (release build), against 17.6 KB for an idle
/// keep-alive connection. Messages being assembled are charged on top, as they arrive.
pub const UPGRADED_COST_BYTES: u64 = 8 * 1024;

/// Connections the probe listener may open beyond the gateway's share of `max_connections`.
pub const PROBE_RESERVE: usize = 16;

/// File descriptors left to the daemon's own files (logs, `/proc` reads, listeners, the
/// allocator) when `max_connections` is derived from the soft limit.
pub const FD_HEADROOM: u64 = 64;

/// The derived default never exceeds this: about 80 MiB of connection memory at the cost above,
/// which a 1 GB VPS can afford.
pub const MAX_DERIVED_CONNECTIONS: u64 = 4096;

/// Returns the default `max_connections` for a file-descriptor soft limit: the limit minus
/// [`FD_HEADROOM`] (at least 16), at most [`MAX_DERIVED_CONNECTIONS`]. Without a known limit,
/// 1,024 minus the headroom.
pub fn derived_max_connections(fd_soft_limit: Option<u64>) -> usize {
    let limit = fd_soft_limit.unwrap_or(1024);
    let derived = limit
        .saturating_sub(FD_HEADROOM)
        .clamp(16, MAX_DERIVED_CONNECTIONS);
    usize::try_from(derived).unwrap_or(16)
}

/// Which listener a connection arrived on, for the probe reserve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Listener {
    /// `/health` and `/metrics` only.
    Probes,
    /// The gateway, or the single listener serving everything.
    Gateway,
}

/// Why a connection was refused at accept time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` (minus the probe reserve, on the gateway) is reached.
    Global,
    /// `max_connections_per_ip` is reached for this address on this listener.
    PerIp,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Global => "max_connections",
            Refusal::PerIp => "max_connections_per_ip",
        })
    }
}

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Open, no byte of the next request yet (new or kept alive).
    Idle = 0,
    /// Some bytes of a request head arrived; the head deadline runs.
    Head = 1,
    /// The head is parsed and a handler runs; the body deadline runs.
    Busy = 2,
    /// Upgraded to a WebSocket; only the stall deadline (and pings) apply.
    Upgraded = 3,
}

/// One open connection as the registry and the memory monitor see it.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    phase: AtomicU8,
    head_bytes: AtomicU64,
    requests: AtomicU64,
    registry: Arc<Shared>,
    shed: async_channel::Sender<()>,
}

impl Tracked {
    /// Returns the current phase.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            1 => Phase::Head,
            2 => Phase::Busy,
            3 => Phase::Upgraded,
            _ => Phase::Idle,
        }
    }

    /// Returns how many requests have reached a handler on this connection.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    /// Moves to `phase`; leaving the head phase releases the head bytes it was charged.
    pub fn set_phase(&self, phase: Phase) {
        if phase == Phase::Busy {
            self.requests.fetch_add(1, Ordering::AcqRel);
        }
        let previous = self.phase.swap(phase as u8, Ordering::AcqRel);
        if previous == Phase::Head as u8 && phase != Phase::Head {
            let released = self.head_bytes.swap(0, Ordering::AcqRel);
            self.registry.release_bytes(released);
        }
        let upgraded = Phase::Upgraded as u8;
        if (previous == upgraded) != (phase == Phase::Upgraded) {
            if phase == Phase::Upgraded {
                self.registry.upgraded.fetch_add(1, Ordering::AcqRel);
            } else {
                self.registry.upgraded.fetch_sub(1, Ordering::AcqRel);
            }
            self.registry.publish_memory(self.registry.lock().total);
        }
    }

    /// Charges `bytes` of a request head that trillium buffers until the head is complete.
    pub fn add_head_bytes(&self, bytes: u64) {
        self.head_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.registry.charge_bytes(bytes);
    }

    /// Charges `bytes` the connection holds outside a head (a WebSocket message being
    /// assembled); the caller releases them with [`Tracked::release_bytes`].
    pub fn charge_bytes(&self, bytes: u64) {
        self.registry.charge_bytes(bytes);
    }

    /// Releases `bytes` charged with [`Tracked::charge_bytes`].
    pub fn release_bytes(&self, bytes: u64) {
        self.registry.release_bytes(bytes);
    }
}

/// Holds a connection's place in the registry; dropping it releases the place.
#[derive(Debug)]
pub struct ConnectionGuard {
    tracked: Arc<Tracked>,
    key: (Listener, IpAddr),
    shed: async_channel::Receiver<()>,
}

impl ConnectionGuard {
    /// Returns the shared per-connection state (for the transport and the handler loop).
    pub fn tracked(&self) -> &Arc<Tracked> {
        &self.tracked
    }

    /// Resolves when the memory monitor sheds this connection.
    pub async fn shed(&self) {
        // The sender is closed (never sent on) to shed: `recv` then fails at once.
        let _ = self.shed.recv().await;
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.tracked.set_phase(Phase::Idle);
        self.tracked.registry.leave(self.tracked.id, self.key);
    }
}

#[derive(Debug, Default)]
struct Counts {
    next_id: u64,
    total: usize,
    gateway: usize,
    per_ip: HashMap<(Listener, IpAddr), usize>,
    open: BTreeMap<u64, Arc<Tracked>>,
    refusing: Option<(Instant, u64)>,
}

struct Shared {
    counts: Mutex<Counts>,
    head_bytes: AtomicU64,
    /// Open connections in [`Phase::Upgraded`], charged [`UPGRADED_COST_BYTES`] each.
    upgraded: AtomicU64,
    open_gauge: Gauge,
    memory_gauge: Gauge,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("head_bytes", &self.head_bytes)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Plain counters; a panic elsewhere cannot leave them half-written.
        match self.counts.lock() {
            Ok(counts) => counts,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn charge_bytes(&self, bytes: u64) {
        self.head_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.publish_memory(self.lock().total);
    }

    fn release_bytes(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        // Saturating: a release never exceeds what was charged, but stay safe if it did.
        let _ = self
            .head_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(bytes))
            });
        self.publish_memory(self.lock().total);
    }

    fn memory_bytes(&self, open: usize) -> u64 {
        let upgraded = self.upgraded.load(Ordering::Acquire).min(open as u64);
        (open as u64 - upgraded)
            .saturating_mul(CONNECTION_COST_BYTES)
            .saturating_add(upgraded.saturating_mul(UPGRADED_COST_BYTES))
            .saturating_add(self.head_bytes.load(Ordering::Acquire))
    }

    fn publish_memory(&self, open: usize) {
        self.memory_gauge.set(self.memory_bytes(open) as f64);
    }

    fn leave(&self, id: u64, key: (Listener, IpAddr)) {
        let total = {
            let mut counts = self.lock();
            counts.open.remove(&id);
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
        self.publish_memory(total);
    }
}

/// Open connections, their limits and the memory charged to them.
#[derive(Debug)]
pub struct Connections {
    shared: Arc<Shared>,
    max_connections: usize,
    max_per_ip: usize,
}

/// What [`Connections::admit`] reports beside its decision, for the once-per-episode log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Episode {
    /// Nothing to log.
    Quiet,
    /// The first refusal of an episode.
    Started,
    /// Admission resumed after `refused` refusals lasting `lasted`.
    Ended {
        /// Connections refused during the episode.
        refused: u64,
        /// How long the episode lasted.
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
                head_bytes: AtomicU64::new(0),
                upgraded: AtomicU64::new(0),
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

    /// Returns the heap charged to open connections, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        let open = self.shared.lock().total;
        self.shared.memory_bytes(open)
    }

    /// Admits a connection from `ip` on `listener`, or refuses it.
    ///
    /// The gateway may use `max_connections` minus [`PROBE_RESERVE`]; the probe listener the
    /// whole of it, so a flood on the gateway leaves room for `/health`.
    ///
    /// # Errors
    ///
    /// Returns the [`Refusal`] (and whether an episode of refusals starts) past a limit.
    pub fn admit(
        &self,
        listener: Listener,
        ip: IpAddr,
    ) -> (Result<ConnectionGuard, Refusal>, Episode) {
        let mut counts = self.shared.lock();
        let gateway_cap = self
            .max_connections
            .saturating_sub(PROBE_RESERVE.min(self.max_connections / 2))
            .max(1);
        let key = (listener, ip);
        let refusal = if counts.total >= self.max_connections
            || (listener == Listener::Gateway && counts.gateway >= gateway_cap)
        {
            Some(Refusal::Global)
        } else if counts.per_ip.get(&key).copied().unwrap_or(0) >= self.max_per_ip {
            Some(Refusal::PerIp)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            let episode = match &mut counts.refusing {
                Some((_, refused)) => {
                    *refused += 1;
                    Episode::Quiet
                }
                None => {
                    counts.refusing = Some((Instant::now(), 1));
                    Episode::Started
                }
            };
            return (Err(refusal), episode);
        }
        let episode = match counts.refusing.take() {
            Some((started, refused)) => Episode::Ended {
                refused,
                lasted: started.elapsed(),
            },
            None => Episode::Quiet,
        };
        counts.next_id += 1;
        let id = counts.next_id;
        counts.total += 1;
        if listener == Listener::Gateway {
            counts.gateway += 1;
        }
        *counts.per_ip.entry(key).or_insert(0) += 1;
        let (sender, receiver) = async_channel::bounded(1);
        let tracked = Arc::new(Tracked {
            id,
            phase: AtomicU8::new(Phase::Idle as u8),
            head_bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            registry: Arc::clone(&self.shared),
            shed: sender,
        });
        counts.open.insert(id, Arc::clone(&tracked));
        let total = counts.total;
        drop(counts);
        self.shared.open_gauge.set(total as f64);
        self.shared.publish_memory(total);
        (
            Ok(ConnectionGuard {
                tracked,
                key,
                shed: receiver,
            }),
            episode,
        )
    }

    /// Closes connections until about `bytes` of charged memory is freed: first those with
    /// an incomplete head, oldest first, then idle kept-alive ones, oldest first. Connections
    /// running a request or a WebSocket are left alone. Returns how many were closed.
    pub fn shed(&self, bytes: u64) -> usize {
        let counts = self.shared.lock();
        let mut freed = 0u64;
        let mut closed = 0;
        for wanted in [Phase::Head, Phase::Idle] {
            for tracked in counts.open.values() {
                if freed >= bytes {
                    return closed;
                }
                if tracked.phase() == wanted && !tracked.shed.is_closed() {
                    freed = freed.saturating_add(
                        CONNECTION_COST_BYTES + tracked.head_bytes.load(Ordering::Acquire),
                    );
                    tracked.shed.close();
                    closed += 1;
                }
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize, per_ip: usize) -> Connections {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let key = metrics::Key::from_static_name("test");
        let metadata = metrics::Metadata::new("test", metrics::Level::INFO, None);
        use metrics::Recorder;
        Connections::new(
            max,
            per_ip,
            recorder.register_gauge(&key, &metadata),
            recorder.register_gauge(&key, &metadata),
        )
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
    const OTHER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    #[test]
    fn derived_limit_leaves_headroom_and_is_capped() {
        assert_eq!(derived_max_connections(Some(1024)), 960);
        assert_eq!(derived_max_connections(Some(256)), 192);
        assert_eq!(derived_max_connections(Some(20)), 16);
        assert_eq!(derived_max_connections(Some(1 << 20)), 4096);
        assert_eq!(derived_max_connections(None), 960);
    }

    #[test]
    fn per_ip_cap_refuses_one_address_but_not_another() {
        let connections = registry(100, 2);
        let _a = connections.admit(Listener::Gateway, IP).0.unwrap();
        let _b = connections.admit(Listener::Gateway, IP).0.unwrap();
        let (third, episode) = connections.admit(Listener::Gateway, IP);
        assert_eq!(third.unwrap_err(), Refusal::PerIp);
        assert_eq!(episode, Episode::Started);
        let (other, episode) = connections.admit(Listener::Gateway, OTHER);
        assert!(other.is_ok());
        assert!(matches!(episode, Episode::Ended { refused: 1, .. }));
    }

    #[test]
    fn gateway_leaves_a_reserve_for_probes() {
        let connections = registry(40, 100);
        let held: Vec<_> = (0..40)
            .map_while(|_| connections.admit(Listener::Gateway, IP).0.ok())
            .collect();
        assert_eq!(held.len(), 40 - PROBE_RESERVE);
        assert!(connections.admit(Listener::Probes, IP).0.is_ok());
    }

    #[test]
    fn dropping_a_guard_releases_its_place_and_memory() {
        let connections = registry(1, 1);
        let guard = connections.admit(Listener::Probes, IP).0.unwrap();
        guard.tracked().set_phase(Phase::Head);
        guard.tracked().add_head_bytes(100);
        assert_eq!(connections.memory_bytes(), CONNECTION_COST_BYTES + 100);
        assert!(connections.admit(Listener::Probes, IP).0.is_err());
        drop(guard);
        assert_eq!(connections.memory_bytes(), 0);
        assert!(connections.admit(Listener::Probes, IP).0.is_ok());
    }

    #[test]
    fn an_upgraded_connection_is_charged_the_websocket_cost_until_it_closes() {
        let connections = registry(10, 10);
        let plain = connections.admit(Listener::Gateway, IP).0.unwrap();
        let socket = connections.admit(Listener::Gateway, IP).0.unwrap();
        socket.tracked().set_phase(Phase::Busy);
        socket.tracked().set_phase(Phase::Upgraded);
        // Marked twice on the way (before the 101 and after it): counted once.
        socket.tracked().set_phase(Phase::Upgraded);
        assert_eq!(
            connections.memory_bytes(),
            CONNECTION_COST_BYTES + UPGRADED_COST_BYTES
        );
        drop(socket);
        assert_eq!(connections.memory_bytes(), CONNECTION_COST_BYTES);
        drop(plain);
        assert_eq!(connections.memory_bytes(), 0);
    }

    #[test]
    fn shedding_closes_incomplete_heads_oldest_first_and_spares_busy_ones() {
        let connections = registry(10, 10);
        let busy = connections.admit(Listener::Gateway, IP).0.unwrap();
        busy.tracked().set_phase(Phase::Busy);
        let old_head = connections.admit(Listener::Gateway, IP).0.unwrap();
        old_head.tracked().set_phase(Phase::Head);
        let new_head = connections.admit(Listener::Gateway, IP).0.unwrap();
        new_head.tracked().set_phase(Phase::Head);
        assert_eq!(connections.shed(1), 1);
        assert!(old_head.tracked().shed.is_closed());
        assert!(!new_head.tracked().shed.is_closed());
        assert_eq!(connections.shed(u64::MAX), 1);
        assert!(!busy.tracked().shed.is_closed());
    }
}
