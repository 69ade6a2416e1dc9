//! The connection registry: how many client connections are open (in total, per listener
//! and per IP), what phase each one is in, and how much heap they are charged for.
//!
//! It decides admission at accept time (`max_connections`, `max_connections_per_ip`, and a
//! reserve on the probe listener so `/health` answers during a flood on the gateway; at the
//! limit, room made by closing the oldest incomplete head of the busiest address, or a
//! response its client has stopped reading), and it
//! lets the memory monitor attribute heap to connections and close them (oldest incomplete
//! head first) instead of touching sessions. It does not read or write sockets: that is
//! `listener/`.

mod admission;
mod limits;
mod registry;
mod tracked;

pub use limits::{
    CONNECTION_BASE_BYTES, EPISODE_QUIET, EVICTION_SLACK, FD_HEADROOM, HEAD_STATE_BYTES, Listener,
    MAX_DERIVED_CONNECTIONS, PROBE_RESERVE, Phase, REQUEST_STATE_BYTES, Refusal,
    UPGRADED_COST_BYTES, WRITE_BLOCKED_EVICTABLE, derived_max_connections, fixed_cost,
};
pub use registry::{Connections, Episode};
pub use tracked::{ConnectionGuard, ConnectionMemory, MemoryCharge, Tracked};

#[cfg(test)]
pub(crate) use registry::{IP, OTHER, registry};
