//! What the registry counts by: the limits and per-phase costs, which listener a connection
//! came in on, why one is refused, and where it is in its request cycle.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Heap every open connection holds before any request byte arrives: the connection task (its
/// future, with trillium-http's nested keep-alive futures inline), the boxed transport stack
/// and the registry entry.
///
/// This and the costs below are the rise of jemalloc's `stats.allocated` over 1,000
/// connections held in each state, less the read buffer charged separately, rounded up; debug
/// and release builds measured within 2% of each other: open with no byte 11.7 KB; a partial
/// head 17.0 KB, or 32.9 KB with a 6,000-byte header (an 8 KiB buffer); idle kept-alive
/// 17.7 KB, 18.0 KB once its next head has started; reading a declared 64 KiB body of which
/// nothing arrived 24.8 KB. With the OpenAI routes and a model per message (a larger router
/// and message handler), that request measures 26.0 KB on x86_64 and 25.6 KB on aarch64
/// under qemu, buffers included, against a charge of 26.5 KiB (`hostile_connections`).
pub const CONNECTION_BASE_BYTES: u64 = 12 * 1024;

/// Heap a connection holds from the first byte of a request head on, beyond its base and its
/// read buffer: trillium-http's parsing state and header maps, which it keeps between
/// keep-alive requests.
pub const HEAD_STATE_BYTES: u64 = 6 * 1024;

/// Heap a connection holds while a request runs, beyond its base and its read buffer: the
/// parsed `Conn`, its header maps and state, the handler's future.
pub const REQUEST_STATE_BYTES: u64 = 13 * 1024;

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

/// Subtracts `bytes` from `counter`, stopping at zero; returns the value before.
pub(super) fn subtract_saturating(counter: &AtomicU64, bytes: u64) -> u64 {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            Some(held.saturating_sub(bytes))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_limit_leaves_headroom_and_is_capped() {
        assert_eq!(derived_max_connections(Some(1024)), 960);
        assert_eq!(derived_max_connections(Some(256)), 192);
        assert_eq!(derived_max_connections(Some(20)), 16);
        assert_eq!(derived_max_connections(Some(1 << 20)), 4096);
        assert_eq!(derived_max_connections(None), 960);
    }
}
