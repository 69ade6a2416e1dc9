//! The connection registry: how many client connections are open (in total, per listener
//! and per IP), what phase each one is in, and how much heap they are charged for.
//!
//! It decides admission at accept time (`max_connections`, `max_connections_per_ip`, and a
//! reserve on the probe listener so `/health` answers during a flood on the gateway; at the
//! limit, room made by closing the oldest incomplete head of the busiest address, or a
//! response its client has stopped reading), and it
//! lets the memory monitor attribute heap to connections and close them (oldest incomplete
//! head first) instead of touching sessions. It does not read or write sockets: that is
//! `listener.rs`.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use metrics::Gauge;

/// Heap every open connection holds before any request byte arrives: the connection task (its
/// future, with trillium-http's nested keep-alive futures inline), the boxed transport stack
/// and the registry entry.
///
/// This and the costs below are the rise of jemalloc's `stats.allocated` over 1,000
/// connections held in each state, less the read buffer charged separately, rounded up; debug
/// and release builds measured within 2% of each other: open with no byte 11.7 KB; a partial
/// head 17.0 KB, or 32.9 KB with a 6,000-byte header (an 8 KiB buffer); idle kept-alive
/// 17.7 KB, 18.0 KB once its next head has started; reading a declared 64 KiB body of which
/// nothing arrived 24.8 KB.
pub const CONNECTION_BASE_BYTES: u64 = 12 * 1024;

/// Heap a connection holds from the first byte of a request head on, beyond its base and its
/// read buffer: trillium-http's parsing state and header maps, which it keeps between
/// keep-alive requests.
pub const HEAD_STATE_BYTES: u64 = 6 * 1024;

/// Heap a connection holds while a request runs, beyond its base and its read buffer: the
/// parsed `Conn`, its header maps and state, the handler's future.
pub const REQUEST_STATE_BYTES: u64 = 12 * 1024;

/// Heap charged to an upgraded WebSocket in all (its read buffer and the frames of a message
/// being assembled on top): its own task, buffers, transport and session, since the
/// connection's task ends at the upgrade. Measured: 1,000 idle sockets raised jemalloc's
/// `stats.allocated` by about 7.6 KB apiece (release build), against 17.6 KB for an idle
/// keep-alive connection.
pub const UPGRADED_COST_BYTES: u64 = 8 * 1024;

/// Returns the fixed part of a connection's charge in `phase` (`served`: it has answered a
/// request before): what it holds besides its read buffer and explicit charges (body and
/// WebSocket buffers), from the measurements above.
pub fn fixed_cost(phase: Phase, served: bool) -> u64 {
    match (phase, served) {
        (Phase::Upgraded, _) => UPGRADED_COST_BYTES,
        (Phase::Idle, false) => CONNECTION_BASE_BYTES,
        (Phase::Idle | Phase::Head, _) => CONNECTION_BASE_BYTES + HEAD_STATE_BYTES,
        (Phase::Busy | Phase::Body, _) => CONNECTION_BASE_BYTES + REQUEST_STATE_BYTES,
    }
}

/// Connections the probe listener may open beyond the gateway's share of `max_connections`.
pub const PROBE_RESERVE: usize = 16;

/// Connections that may be closing at once to make room for new ones (they still hold a file
/// descriptor until they have closed): at most this many beyond `max_connections`, well
/// inside [`FD_HEADROOM`].
pub const EVICTION_SLACK: usize = 16;

/// How long a response write may wait on a client that reads nothing before its connection
/// counts as holding a slot for nothing: closed at the connection limit (with idle kept-alive
/// connections) and shed under memory pressure. Ordinary flow control clears within
/// milliseconds on a live client; a pipelining client that never reads stays blocked until
/// the stall deadline, and any trickle of progress would otherwise restart that deadline.
pub const WRITE_BLOCKED_EVICTABLE: Duration = Duration::from_secs(1);

/// How long the registry must stay below the connection limit before an episode at the limit
/// ends: a flood that is closed and re-dials keeps dipping below the limit for moments, and is
/// one episode, not hundreds.
pub const EPISODE_QUIET: Duration = Duration::from_secs(5);

/// File descriptors left to the daemon's own files (logs, `/proc` reads, listeners, the
/// allocator) when `max_connections` is derived from the soft limit.
pub const FD_HEADROOM: u64 = 64;

/// The derived default never exceeds this: 48 to 72 MiB of idle connections at the costs
/// above, which a 1 GB VPS can afford.
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
    /// A handler is reading the request body: as much an incomplete request as a partial
    /// head, so it is shed with them. The body deadline that started with [`Phase::Busy`]
    /// runs on.
    Body = 4,
}

/// One open connection as the registry and the memory monitor see it.
///
/// Its memory charge has three parts: a fixed cost for its phase ([`fixed_cost`]), the read
/// buffer trillium-http holds for it (as observed by the transport), and explicit charges
/// from handlers for the buffers they hold (a request body, WebSocket frames). Charges come
/// from the connection's own task; once the connection has left the registry they are
/// ignored, so a buffer dropped after its connection cannot unbalance the total.
#[derive(Debug)]
pub struct Tracked {
    id: u64,
    key: (Listener, IpAddr),
    evicted: AtomicBool,
    /// Set when the drain closes this connection's incomplete head.
    head_closed: AtomicBool,
    responding: AtomicBool,
    /// When the current response's write first blocked for long, in milliseconds since the
    /// registry's epoch, plus one; 0 while it is not blocked.
    write_blocked: AtomicU64,
    phase: AtomicU8,
    requests: AtomicU64,
    fixed_bytes: AtomicU64,
    buffer_bytes: AtomicU64,
    charged_bytes: AtomicU64,
    closed: AtomicBool,
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
            4 => Phase::Body,
            _ => Phase::Idle,
        }
    }

    /// Marks whether a response is being written: the phase is already `Idle` then (the
    /// handler has returned), yet the connection is not waiting for anything from the client.
    pub fn set_responding(&self, responding: bool) {
        // Each response starts, and ends, unblocked.
        self.write_blocked.store(0, Ordering::Release);
        self.responding.store(responding, Ordering::Release);
    }

    /// Records that a write to the client could not proceed (its buffers are full).
    pub fn note_write_blocked(&self) {
        if self.write_blocked.load(Ordering::Acquire) == 0 {
            let now = self.registry.now_millis().saturating_add(1);
            let _ =
                self.write_blocked
                    .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Records that a write to the client made progress. A short block is flow control and
    /// is forgotten; one that lasted [`WRITE_BLOCKED_EVICTABLE`] marks the response's reader
    /// as stalled until the response ends, since a client that never reads can still let a few
    /// bytes through now and then.
    pub fn note_write_progress(&self) {
        let since = self.write_blocked.load(Ordering::Acquire);
        if since != 0 && !self.blocked_long(since) {
            let _ =
                self.write_blocked
                    .compare_exchange(since, 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Returns whether a response is being written to a client that has not taken any of it
    /// for [`WRITE_BLOCKED_EVICTABLE`]: the connection holds its slot for nothing.
    pub fn write_stalled(&self) -> bool {
        self.responding()
            && self.phase() == Phase::Idle
            && self.blocked_long(self.write_blocked.load(Ordering::Acquire))
    }

    fn blocked_long(&self, since: u64) -> bool {
        since != 0
            && self
                .registry
                .now_millis()
                .saturating_add(1)
                .saturating_sub(since)
                >= WRITE_BLOCKED_EVICTABLE.as_millis() as u64
    }

    /// Returns whether the drain closed this connection while its head was incomplete.
    pub fn head_closed(&self) -> bool {
        self.head_closed.load(Ordering::Acquire)
    }

    /// Returns whether a response is being written (see [`Tracked::set_responding`]).
    pub fn responding(&self) -> bool {
        self.responding.load(Ordering::Acquire)
    }

    /// Returns the client's address.
    pub fn ip(&self) -> IpAddr {
        self.key.1
    }

    /// Returns whether admission closed this connection to make room for another.
    pub fn evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }

    /// Returns how many requests have reached a handler on this connection.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    /// Moves to `phase`, and to the fixed charge that goes with it.
    pub fn set_phase(&self, phase: Phase) {
        let served = if phase == Phase::Busy {
            self.requests.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            self.requests() > 0
        };
        self.phase.store(phase as u8, Ordering::Release);
        self.set_part(&self.fixed_bytes, fixed_cost(phase, served));
        if phase == Phase::Upgraded {
            // trillium-http's head buffer goes with the connection's task at the upgrade; what
            // the socket reads into from now on is noted afresh.
            self.set_part(&self.buffer_bytes, 0);
        }
    }

    /// Records that the buffer the connection's request heads are read into has (at least)
    /// `capacity` bytes. trillium-http grows that buffer and never shrinks it while the
    /// connection lives, so the charge only ever rises.
    pub fn note_read_buffer(&self, capacity: u64) {
        if capacity > self.buffer_bytes.load(Ordering::Acquire) {
            self.set_part(&self.buffer_bytes, capacity);
        }
    }

    /// Charges `bytes` of heap that a handler holds for this connection (a body being read,
    /// WebSocket buffers). Pair every charge with a [`Tracked::release`], or use a
    /// [`MemoryCharge`].
    pub fn charge(&self, bytes: u64) {
        if bytes == 0 || self.closed.load(Ordering::Acquire) {
            return;
        }
        self.charged_bytes.fetch_add(bytes, Ordering::AcqRel);
        self.registry.add(bytes);
    }

    /// Releases `bytes` charged with [`Tracked::charge`].
    pub fn release(&self, bytes: u64) {
        if bytes == 0 || self.closed.load(Ordering::Acquire) {
            return;
        }
        let previous = self
            .charged_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(bytes))
            })
            .unwrap_or(0);
        self.registry.subtract(previous.min(bytes));
    }

    /// Returns the heap this connection is charged for, in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.fixed_bytes.load(Ordering::Acquire)
            + self.buffer_bytes.load(Ordering::Acquire)
            + self.charged_bytes.load(Ordering::Acquire)
    }

    fn set_part(&self, part: &AtomicU64, bytes: u64) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let previous = part.swap(bytes, Ordering::AcqRel);
        if bytes > previous {
            self.registry.add(bytes - previous);
        } else {
            self.registry.subtract(previous - bytes);
        }
    }

    /// Leaves the registry's memory total: everything charged is released, later charges are
    /// ignored.
    fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let held = self.fixed_bytes.swap(0, Ordering::AcqRel)
            + self.buffer_bytes.swap(0, Ordering::AcqRel)
            + self.charged_bytes.swap(0, Ordering::AcqRel);
        self.registry.subtract(held);
    }
}

/// Heap charged to a connection for one growing buffer, released when dropped.
#[derive(Debug)]
pub struct MemoryCharge {
    tracked: Option<Arc<Tracked>>,
    bytes: u64,
}

impl MemoryCharge {
    /// Starts charging to `tracked` (nothing is charged without a connection).
    pub fn new(tracked: Option<Arc<Tracked>>) -> MemoryCharge {
        MemoryCharge { tracked, bytes: 0 }
    }

    /// Sets the charge to `bytes` (a buffer's capacity after it grew or shrank).
    pub fn set(&mut self, bytes: u64) {
        if let Some(tracked) = &self.tracked {
            if bytes > self.bytes {
                tracked.charge(bytes - self.bytes);
            } else {
                tracked.release(self.bytes - bytes);
            }
        }
        self.bytes = bytes;
    }
}

impl Drop for MemoryCharge {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// A connection's memory account as request handlers find it in the conn's state (see
/// `listener.rs`), to charge the buffers they hold for it.
#[derive(Debug, Clone)]
pub struct ConnectionMemory(pub Arc<Tracked>);

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
        self.tracked.close();
        self.tracked
            .registry
            .leave(self.tracked.id, self.key, self.tracked.evicted());
    }
}

#[derive(Debug, Default)]
struct Counts {
    next_id: u64,
    total: usize,
    gateway: usize,
    per_ip: HashMap<(Listener, IpAddr), usize>,
    open: BTreeMap<u64, Arc<Tracked>>,
    /// Connections evicted but not closed yet (in total, and on the gateway): they still
    /// hold a descriptor, but no longer count against the limits.
    evicting: usize,
    evicting_gateway: usize,
    at_limit: Option<AtLimit>,
}

/// An episode at the connection limit, for the once-per-episode log.
#[derive(Debug)]
struct AtLimit {
    started: Instant,
    /// The latest connection refused or let in by closing another.
    last: Instant,
    refused: u64,
    evicted: u64,
}

impl Counts {
    /// Picks the connection to close so that a new one on `listener` fits: one that costs its
    /// sender little and holds a slot for nothing, an incomplete head or a connection that has
    /// sent nothing yet, from the address holding the most connections, oldest first; an idle
    /// kept-alive connection (or one whose client has stopped reading its response, see
    /// [`WRITE_BLOCKED_EVICTABLE`]) only when none is left. Never a request in progress, a
    /// response being taken in by its client or a WebSocket, and never a connection already
    /// being closed.
    fn eviction_candidate(&self, listener: Listener) -> Option<&Arc<Tracked>> {
        let busiest = self
            .per_ip
            .iter()
            .filter(|((kind, _), _)| *kind == listener)
            .map(|(_, count)| *count)
            .max()?;
        let mut best: Option<(usize, u8, &Arc<Tracked>)> = None;
        // `open` is ordered by id, that is by age: the first of a rank is the oldest.
        for tracked in self.open.values() {
            if tracked.key.0 != listener || tracked.shed.is_closed() {
                continue;
            }
            let rank = match tracked.phase() {
                // A response its client has stopped reading frees nothing by being kept.
                Phase::Idle if tracked.write_stalled() => 1,
                Phase::Idle if tracked.responding() => continue,
                Phase::Head => 0,
                Phase::Idle if tracked.requests() == 0 => 0,
                Phase::Idle => 1,
                Phase::Busy | Phase::Body | Phase::Upgraded => continue,
            };
            let count = self.per_ip.get(&tracked.key).copied().unwrap_or(0);
            let better = best.is_none_or(|(best_count, best_rank, _)| {
                (count, std::cmp::Reverse(rank)) > (best_count, std::cmp::Reverse(best_rank))
            });
            if better {
                best = Some((count, rank, tracked));
                if count == busiest && rank == 0 {
                    break;
                }
            }
        }
        best.map(|(_, _, tracked)| tracked)
    }
}

struct Shared {
    counts: Mutex<Counts>,
    /// The origin of the millisecond timestamps kept in atomics.
    epoch: Instant,
    /// Heap charged to all open connections.
    bytes: AtomicU64,
    /// The highest `bytes` since the memory monitor last asked ([`Connections::take_peak`]).
    peak: AtomicU64,
    open_gauge: Gauge,
    memory_gauge: Gauge,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn now_millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        // Plain counters; a panic elsewhere cannot leave them half-written.
        crate::sync::lock(&self.counts)
    }

    fn add(&self, bytes: u64) {
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

    fn subtract(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        // Saturating: a release never exceeds what was charged, but stay safe if it did.
        let previous = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(bytes))
            })
            .unwrap_or(0);
        self.memory_gauge.set(previous.saturating_sub(bytes) as f64);
    }

    fn leave(&self, id: u64, key: (Listener, IpAddr), evicted: bool) {
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
    shared: Arc<Shared>,
    max_connections: usize,
    max_per_ip: usize,
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

    /// Admits a connection from `ip` on `listener`, or refuses it.
    ///
    /// The gateway may use `max_connections` minus [`PROBE_RESERVE`]; the probe listener the
    /// whole of it, so a flood on the gateway leaves room for `/health`. At that limit a new
    /// connection still gets in by closing one that holds a slot for nothing (see
    /// [`Counts::eviction_candidate`]): otherwise a flood of slow heads on the single port
    /// would refuse every probe and client while it lasts. Closing takes a moment, so at most
    /// [`EVICTION_SLACK`] connections may be open beyond the limit meanwhile.
    ///
    /// # Errors
    ///
    /// Returns the [`Refusal`] (and whether an episode at the limit starts) past a limit with
    /// nothing to close.
    pub fn admit(
        &self,
        listener: Listener,
        ip: IpAddr,
    ) -> (Result<ConnectionGuard, Refusal>, Episode) {
        self.admit_at(listener, ip, Instant::now())
    }

    fn admit_at(
        &self,
        listener: Listener,
        ip: IpAddr,
        now: Instant,
    ) -> (Result<ConnectionGuard, Refusal>, Episode) {
        let mut counts = self.shared.lock();
        let gateway_cap = self
            .max_connections
            .saturating_sub(PROBE_RESERVE.min(self.max_connections / 2))
            .max(1);
        let key = (listener, ip);
        let at_limit = counts.total.saturating_sub(counts.evicting) >= self.max_connections
            || (listener == Listener::Gateway
                && counts.gateway.saturating_sub(counts.evicting_gateway) >= gateway_cap);
        let refusal = if counts.per_ip.get(&key).copied().unwrap_or(0) >= self.max_per_ip {
            Some(Refusal::PerIp)
        } else if !at_limit {
            None
        } else if counts.evicting < EVICTION_SLACK
            && let Some(victim) = counts.eviction_candidate(listener)
        {
            victim.evicted.store(true, Ordering::Release);
            victim.shed.close();
            counts.evicting += 1;
            if listener == Listener::Gateway {
                counts.evicting_gateway += 1;
            }
            None
        } else {
            Some(Refusal::Global)
        };
        let episode = if at_limit || refusal.is_some() {
            let evicted = u64::from(refusal.is_none());
            let refused = u64::from(refusal.is_some());
            match &mut counts.at_limit {
                Some(episode) => {
                    episode.evicted += evicted;
                    episode.refused += refused;
                    episode.last = now;
                    Episode::Quiet
                }
                None => {
                    counts.at_limit = Some(AtLimit {
                        started: now,
                        last: now,
                        refused,
                        evicted,
                    });
                    Episode::Started
                }
            }
        } else {
            match counts
                .at_limit
                .take_if(|episode| now.saturating_duration_since(episode.last) >= EPISODE_QUIET)
            {
                Some(episode) => Episode::Ended {
                    refused: episode.refused,
                    evicted: episode.evicted,
                    lasted: episode.last.saturating_duration_since(episode.started),
                },
                None => Episode::Quiet,
            }
        };
        if let Some(refusal) = refusal {
            return (Err(refusal), episode);
        }
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
            key,
            evicted: AtomicBool::new(false),
            head_closed: AtomicBool::new(false),
            responding: AtomicBool::new(false),
            write_blocked: AtomicU64::new(0),
            phase: AtomicU8::new(Phase::Idle as u8),
            requests: AtomicU64::new(0),
            fixed_bytes: AtomicU64::new(0),
            buffer_bytes: AtomicU64::new(0),
            charged_bytes: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            registry: Arc::clone(&self.shared),
            shed: sender,
        });
        counts.open.insert(id, Arc::clone(&tracked));
        let total = counts.total;
        drop(counts);
        tracked.set_phase(Phase::Idle);
        self.shared.open_gauge.set(total as f64);
        (
            Ok(ConnectionGuard {
                tracked,
                key,
                shed: receiver,
            }),
            episode,
        )
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
        assert_eq!(
            episode,
            Episode::Quiet,
            "the episode ends only after a quiet period"
        );
    }

    #[test]
    fn a_flood_that_keeps_dipping_below_the_limit_is_one_episode() {
        let connections = registry(100, 1);
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let held = connections
            .admit_at(Listener::Gateway, IP, at(0))
            .0
            .unwrap();
        let (refused, episode) = connections.admit_at(Listener::Gateway, IP, at(10));
        assert!(refused.is_err());
        assert_eq!(episode, Episode::Started);
        // Below the limit for moments between refusals, for 20 seconds: one episode.
        for tick in 1..=200 {
            let (admitted, episode) =
                connections.admit_at(Listener::Gateway, OTHER, at(10 + tick * 100));
            assert_eq!(episode, Episode::Quiet, "at {tick}");
            drop(admitted);
            let (refused, episode) =
                connections.admit_at(Listener::Gateway, IP, at(60 + tick * 100));
            assert!(refused.is_err());
            assert_eq!(episode, Episode::Quiet, "at {tick}");
        }
        let last = at(60 + 200 * 100);
        // Not quite quiet long enough yet.
        let (_, episode) = connections.admit_at(
            Listener::Gateway,
            OTHER,
            last + EPISODE_QUIET - Duration::from_millis(1),
        );
        assert_eq!(episode, Episode::Quiet);
        let (_, episode) = connections.admit_at(Listener::Gateway, OTHER, last + EPISODE_QUIET);
        assert_eq!(
            episode,
            Episode::Ended {
                refused: 201,
                evicted: 0,
                lasted: last - at(10),
            }
        );
        drop(held);
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

    /// Admits a connection that is running a request, which nothing may close.
    fn busy(connections: &Connections, listener: Listener, ip: IpAddr) -> Option<ConnectionGuard> {
        let guard = connections.admit(listener, ip).0.ok()?;
        guard.tracked().set_phase(Phase::Busy);
        Some(guard)
    }

    #[test]
    fn gateway_leaves_a_reserve_for_probes() {
        let connections = registry(40, 100);
        let held: Vec<_> = (0..40)
            .map_while(|_| busy(&connections, Listener::Gateway, IP))
            .collect();
        assert_eq!(held.len(), 40 - PROBE_RESERVE);
        assert!(connections.admit(Listener::Probes, IP).0.is_ok());
    }

    #[test]
    fn at_the_limit_the_oldest_head_of_the_busiest_address_makes_room() {
        let connections = registry(40, 100);
        let cap = 40 - PROBE_RESERVE;
        let busy_ones: Vec<_> = (0..cap - 5)
            .map_while(|_| busy(&connections, Listener::Gateway, OTHER))
            .collect();
        let streaming = connections.admit(Listener::Gateway, OTHER).0.unwrap();
        streaming.tracked().set_phase(Phase::Busy);
        streaming.tracked().set_phase(Phase::Idle);
        streaming.tracked().set_responding(true);
        let kept_alive = connections.admit(Listener::Gateway, IP).0.unwrap();
        kept_alive.tracked().set_phase(Phase::Busy);
        kept_alive.tracked().set_phase(Phase::Idle);
        let [old_head, new_head, nothing_yet] = [(); 3].map(|_| {
            let guard = connections.admit(Listener::Gateway, OTHER).0.unwrap();
            guard.tracked().set_phase(Phase::Head);
            guard
        });
        nothing_yet.tracked().set_phase(Phase::Idle);
        // The limit is reached: a newcomer closes the oldest head of the busiest address.
        let (first, episode) = connections.admit(Listener::Gateway, IP);
        first.as_ref().unwrap().tracked().set_phase(Phase::Busy);
        assert_eq!(episode, Episode::Started);
        assert!(old_head.tracked().evicted() && old_head.tracked().shed.is_closed());
        assert!(!new_head.tracked().shed.is_closed());
        // Then the next oldest connection that sent nothing worth keeping, heads and silent
        // ones alike, before the kept-alive one of the quieter address.
        let mut newcomers = vec![first.unwrap()];
        for next in [&new_head, &nothing_yet, &kept_alive] {
            newcomers.push(busy(&connections, Listener::Gateway, IP).unwrap());
            assert!(next.tracked().evicted());
        }
        // Requests in progress and responses being written are never closed: with nothing left
        // to close, 503.
        assert_eq!(
            connections.admit(Listener::Gateway, IP).0.unwrap_err(),
            Refusal::Global
        );
        assert!(busy_ones.iter().all(|guard| !guard.tracked().evicted()));
        assert!(!streaming.tracked().evicted());
    }

    #[test]
    fn eviction_never_lets_more_than_the_slack_past_the_limit() {
        let connections = registry(40, 100);
        let mut held: Vec<_> = (0..200)
            .map_while(|_| connections.admit(Listener::Gateway, IP).0.ok())
            .collect();
        // None of the evicted ones has closed yet.
        assert_eq!(held.len(), 40 - PROBE_RESERVE + EVICTION_SLACK);
        assert!(connections.admit(Listener::Gateway, IP).0.is_err());
        // Once they close, room is made again.
        held.retain(|guard| !guard.tracked().evicted());
        assert!(connections.admit(Listener::Gateway, IP).0.is_ok());
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
