//! One open connection as the registry sees it ([`Tracked`]: phase, memory charge, eviction
//! marks), the handles that hold and charge it, and the state all of them share with the
//! registry (counts and the memory total).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
    },
    time::Instant,
};

use metrics::Gauge;

use super::limits::*;

/// One open connection as the registry and the memory monitor see it.
///
/// Its memory charge has three parts: a fixed cost for its phase ([`fixed_cost`]), the read
/// buffer trillium-http holds for it (as observed by the transport), and explicit charges
/// from handlers for the buffers they hold (a request body, WebSocket frames). Charges come
/// from the connection's own task; once the connection has left the registry they are
/// ignored, so a buffer dropped after its connection cannot unbalance the total.
#[derive(Debug)]
pub struct Tracked {
    pub(super) id: u64,
    pub(super) key: (Listener, IpAddr),
    pub(super) evicted: AtomicBool,
    /// Set when the drain closes this connection's incomplete head.
    pub(super) head_closed: AtomicBool,
    pub(super) responding: AtomicBool,
    /// When the current response's write first blocked for long, in milliseconds since the
    /// registry's epoch, plus one; 0 while it is not blocked.
    pub(super) write_blocked: AtomicU64,
    pub(super) phase: AtomicU8,
    pub(super) requests: AtomicU64,
    pub(super) fixed_bytes: AtomicU64,
    pub(super) buffer_bytes: AtomicU64,
    pub(super) charged_bytes: AtomicU64,
    pub(super) closed: AtomicBool,
    pub(super) registry: Arc<Shared>,
    pub(super) shed: async_channel::Sender<()>,
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
        let previous = subtract_saturating(&self.charged_bytes, bytes);
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
    pub(super) fn close(&self) {
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
/// `listener/connection.rs`), to charge the buffers they hold for it.
#[derive(Debug, Clone)]
pub struct ConnectionMemory(pub Arc<Tracked>);

/// Holds a connection's place in the registry; dropping it releases the place.
#[derive(Debug)]
pub struct ConnectionGuard {
    pub(super) tracked: Arc<Tracked>,
    pub(super) key: (Listener, IpAddr),
    pub(super) shed: async_channel::Receiver<()>,
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
pub(super) struct Counts {
    pub(super) next_id: u64,
    pub(super) total: usize,
    pub(super) gateway: usize,
    pub(super) per_ip: HashMap<(Listener, IpAddr), usize>,
    pub(super) open: BTreeMap<u64, Arc<Tracked>>,
    /// Connections evicted but not closed yet (in total, and on the gateway): they still
    /// hold a descriptor, but no longer count against the limits.
    pub(super) evicting: usize,
    pub(super) evicting_gateway: usize,
    pub(super) at_limit: Option<AtLimit>,
}

/// An episode at the connection limit, for the once-per-episode log.
#[derive(Debug)]
pub(super) struct AtLimit {
    pub(super) started: Instant,
    /// The latest connection refused or let in by closing another.
    pub(super) last: Instant,
    pub(super) refused: u64,
    pub(super) evicted: u64,
}

#[derive(Debug)]
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
