//! Faults clients commit, per address: failed authentication, which is throttled, and
//! malformed requests, which are reported. Neither left a line at `info` before, and token
//! guessing was free: one connection could try tens of thousands of tokens a second.
//!
//! - **Token guessing.** `[gateway] auth_failure_limit` ([`AUTH_FAILURE_LIMIT`] by default)
//!   failed authentications from one client within [`AUTH_WINDOW`] block it for [`AUTH_BLOCK`]: every request it sends to an authenticated
//!   route is answered `429` with `Retry-After` and `Connection: close`, without looking at
//!   its token (an answer that depended on the token would keep the guessing going at the
//!   speed of new connections). Blocks do not grow while the client keeps knocking, so a
//!   legitimate user behind the same address gets back in [`AUTH_BLOCK`] after the guessing
//!   stops. A successful authentication does not forgive earlier failures: on an address
//!   shared by a user and a guesser (NAT, a reverse proxy), the user's requests would
//!   otherwise wipe the guesser's count and lift the throttle; failures simply age out.
//! - **Malformed requests** (unparseable heads, bad JSON, oversized heads or bodies, HTTP/2,
//!   broken WebSocket framing) are counted per kind.
//!
//! A client is an IPv4 address or an IPv6 /64, the block one subscriber usually gets, so an
//! attacker cannot step around the throttle by rotating through its own /64. Each client's
//! faults are one *episode* from the first until [`EPISODE`] passes with no fault: a
//! token-guessing episode starts with one WARN naming the client and the count and ends with
//! one INFO line of totals; a malformed-request episode starts with one INFO line and ends
//! with the counts per kind. At most [`NAMED_LINES_PER_EPISODE`] such lines are written per
//! [`EPISODE`] over all clients; past that, one line counts what was left out, so a botnet
//! costs a few lines a minute, not one per address.
//!
//! The table is bounded at [`MAX_CLIENTS`]: clients whose episode has ended are dropped
//! first, then the oldest unblocked ones, and only then the oldest blocked ones.
//! [`FaultTable`] is the pure core (the caller passes the time); [`ClientFaults`] wraps it in
//! a lock for the daemon and writes its reports to the log.

mod client;
mod report;
mod table;

use std::{
    net::IpAddr,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

pub use client::{
    AUTH_BLOCK, AUTH_FAILURE_LIMIT, AUTH_WINDOW, Blocked, Client, EPISODE, MAX_CLIENTS,
    NAMED_LINES_PER_EPISODE, is_malformed,
};
pub use report::Report;
pub use table::FaultTable;

use crate::{logging, metrics::ErrorKind};

/// The daemon's fault table behind a lock, with a lock-free answer for the common case of no
/// blocked client, and logging of its reports.
#[derive(Debug)]
pub struct ClientFaults {
    table: Mutex<FaultTable>,
    base: Instant,
    /// When the latest block ends, in milliseconds after `base`: past it no client is
    /// blocked, and authenticated requests skip the lock.
    blocks_end_millis: AtomicU64,
}

impl Default for ClientFaults {
    fn default() -> ClientFaults {
        ClientFaults::new()
    }
}

impl ClientFaults {
    /// Creates an empty table of at most [`MAX_CLIENTS`] clients.
    pub fn new() -> ClientFaults {
        ClientFaults {
            table: Mutex::new(FaultTable::new(MAX_CLIENTS)),
            base: Instant::now(),
            blocks_end_millis: AtomicU64::new(0),
        }
    }

    fn millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX)
    }

    fn table(&self) -> MutexGuard<'_, FaultTable> {
        // A panic while holding the lock leaves only counters behind; keep going.
        crate::sync::lock(&self.table)
    }

    /// Checks a request to an authenticated route from `ip` before its token is looked at.
    pub fn check(&self, ip: IpAddr) -> Option<Blocked> {
        let now = Instant::now();
        if self.millis(now) >= self.blocks_end_millis.load(Ordering::Acquire) {
            return None;
        }
        self.table().check(Client::of(ip), now)
    }

    /// Records a failed authentication from `ip`; `Some` when it is the `limit`th within
    /// [`AUTH_WINDOW`] and starts a block. A `limit` of 0 turns the throttle off.
    pub fn auth_failed(&self, ip: IpAddr, limit: u32) -> Option<Blocked> {
        if limit == 0 {
            return None;
        }
        let now = Instant::now();
        let mut reports = Vec::new();
        let blocked = {
            let mut table = self.table();
            let blocked = table.auth_failed(Client::of(ip), now, limit, &mut reports);
            if blocked.is_some() {
                let end = self.millis(now + AUTH_BLOCK).saturating_add(1);
                self.blocks_end_millis.fetch_max(end, Ordering::AcqRel);
            }
            blocked
        };
        write(&reports);
        blocked
    }

    /// Records a malformed request of `kind` from `ip` (kinds that are not malformed requests
    /// are ignored).
    pub fn malformed(&self, ip: IpAddr, kind: ErrorKind) {
        if !is_malformed(kind) {
            return;
        }
        let mut reports = Vec::new();
        self.table()
            .malformed(Client::of(ip), kind, Instant::now(), &mut reports);
        write(&reports);
    }

    /// Ends quiet episodes and logs their totals; run from the monitor tick.
    pub fn sweep(&self) {
        let reports = self.table().sweep(Instant::now());
        write(&reports);
    }

    /// Logs the totals of every episode still open; run once when the daemon stops, so an
    /// attack that lasted until shutdown is still summed up.
    pub fn finish(&self) {
        let reports = self.table().finish(Instant::now());
        write(&reports);
    }
}

/// Logs `reports`. They bypass the per-call-site limiter ([`logging::ALWAYS_TARGET`]): the
/// table already writes at most [`NAMED_LINES_PER_EPISODE`] a minute, and the limiter would
/// name only the first client of each minute.
fn write(reports: &[Report]) {
    for report in reports {
        log::log!(target: logging::ALWAYS_TARGET, report.level(), "{report}");
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn a_limit_of_zero_turns_the_throttle_off() {
        let faults = ClientFaults::new();
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
        for _ in 0..100 {
            assert_eq!(faults.auth_failed(ip, 0), None);
            assert_eq!(faults.check(ip), None);
        }
        for _ in 1..3 {
            assert_eq!(faults.auth_failed(ip, 3), None);
        }
        assert!(faults.auth_failed(ip, 3).is_some());
        assert!(faults.check(ip).is_some());
        assert_eq!(faults.check(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))), None);
    }
}
