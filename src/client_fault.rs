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

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{logging, metrics::ErrorKind};

/// Failed authentications from one client within [`AUTH_WINDOW`] that start a block, by
/// default (`[gateway] auth_failure_limit`).
pub const AUTH_FAILURE_LIMIT: u32 = 10;

/// The window failed authentications are counted in.
pub const AUTH_WINDOW: Duration = Duration::from_secs(60);

/// How long a blocked client gets `429` for every authenticated request.
pub const AUTH_BLOCK: Duration = Duration::from_secs(60);

/// How long a client must stay quiet for its episode to end.
pub const EPISODE: Duration = logging::EPISODE;

/// Clients tracked at once (about 100 bytes each).
pub const MAX_CLIENTS: usize = 4096;

/// Lines naming a client written per [`EPISODE`], over all clients.
pub const NAMED_LINES_PER_EPISODE: u32 = 20;

/// The faults counted as malformed requests, in the order they are reported.
const MALFORMED: [ErrorKind; 6] = [
    ErrorKind::BadRequest,
    ErrorKind::PayloadTooLarge,
    ErrorKind::HeaderTooLarge,
    ErrorKind::UriTooLong,
    ErrorKind::Http2Refused,
    ErrorKind::WebSocketProtocol,
];

/// Returns whether `kind` is a malformed request (a client that does not speak the protocol),
/// as opposed to one that merely asked for something absent or was refused for load.
pub fn is_malformed(kind: ErrorKind) -> bool {
    MALFORMED.contains(&kind)
}

/// One client: an IPv4 address, or an IPv6 address reduced to its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Client(IpAddr);

impl Client {
    /// Returns the client `ip` belongs to (an IPv4-mapped IPv6 address is its IPv4 address).
    pub fn of(ip: IpAddr) -> Client {
        match ip {
            IpAddr::V4(_) => Client(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(IpAddr::V4(v4)),
                None => Client(IpAddr::V6(Ipv6Addr::from_bits(
                    v6.to_bits() & !u128::from(u64::MAX),
                ))),
            },
        }
    }
}

impl fmt::Display for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// What a log line says; [`fmt::Display`] gives its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A client reached [`AUTH_FAILURE_LIMIT`] and is now blocked (WARN).
    GuessingStarted {
        /// The client.
        client: Client,
        /// Failed authentications that started the block.
        failures: u32,
        /// Over how long.
        within: Duration,
    },
    /// A token-guessing episode ended (INFO).
    GuessingEnded {
        /// The client.
        client: Client,
        /// Failed authentications in the episode.
        failures: u64,
        /// Requests answered 429 in the episode.
        refused: u64,
        /// From the first failure to the last fault.
        lasted: Duration,
    },
    /// The first malformed request of an episode (INFO).
    MalformedStarted {
        /// The client.
        client: Client,
        /// What was wrong with it.
        kind: ErrorKind,
    },
    /// A malformed-request episode with more than one request ended (INFO).
    MalformedEnded {
        /// The client.
        client: Client,
        /// Malformed requests per kind, in `MALFORMED` order, zeros left out.
        counts: Vec<(ErrorKind, u64)>,
        /// From the first malformed request to the last.
        lasted: Duration,
    },
    /// Lines about other clients left out in the last episode (INFO).
    Omitted {
        /// How many.
        lines: u64,
    },
}

impl Report {
    /// Returns the level the report is logged at.
    pub fn level(&self) -> log::Level {
        match self {
            Report::GuessingStarted { .. } => log::Level::Warn,
            _ => log::Level::Info,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |duration: &Duration| duration.as_secs().max(1);
        match self {
            Report::GuessingStarted {
                client,
                failures,
                within,
            } => write!(
                f,
                "token guessing from {client}: {failures} failed authentications in {} s; \
                 answering 429 to its authenticated requests for {} s",
                secs(within),
                AUTH_BLOCK.as_secs()
            ),
            Report::GuessingEnded {
                client,
                failures,
                refused,
                lasted,
            } => write!(
                f,
                "token guessing from {client} stopped: {failures} failed authentications and \
                 {refused} requests answered 429 in {} s",
                secs(lasted)
            ),
            Report::MalformedStarted { client, kind } => write!(
                f,
                "malformed request from {client} ({}); counting its malformed requests for \
                 the next {} s",
                kind.as_str(),
                EPISODE.as_secs()
            ),
            Report::MalformedEnded {
                client,
                counts,
                lasted,
            } => {
                let total: u64 = counts.iter().map(|(_, count)| count).sum();
                write!(
                    f,
                    "malformed requests from {client}: {total} in the last {} s (",
                    secs(lasted)
                )?;
                for (index, (kind, count)) in counts.iter().enumerate() {
                    let separator = if index == 0 { "" } else { ", " };
                    write!(f, "{separator}{} {count}", kind.as_str())?;
                }
                write!(f, ")")
            }
            Report::Omitted { lines } => write!(
                f,
                "{lines} more lines about token guessing or malformed requests from other \
                 addresses left out in the last {} s; see blufio_errors_total",
                EPISODE.as_secs()
            ),
        }
    }
}

/// What to answer a request from a blocked client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// Seconds until the block ends (at least 1), for `Retry-After`.
    pub retry_after_secs: u64,
}

/// One client's faults. Only `Copy` fields: no allocation per client.
#[derive(Debug, Clone, Copy)]
struct Entry {
    last_fault: Instant,
    window_start: Instant,
    window_failures: u32,
    blocked_until: Option<Instant>,
    guessing: Option<Guessing>,
    malformed: Option<Malformed>,
}

#[derive(Debug, Clone, Copy)]
struct Guessing {
    started: Instant,
    last: Instant,
    failures: u64,
    refused: u64,
    /// Whether the episode reached a block and was logged; failures below the limit (a
    /// mistyped token) end without a line.
    announced: bool,
}

#[derive(Debug, Clone, Copy)]
struct Malformed {
    started: Instant,
    last: Instant,
    counts: [u64; MALFORMED.len()],
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            last_fault: now,
            window_start: now,
            window_failures: 0,
            blocked_until: None,
            guessing: None,
            malformed: None,
        }
    }

    fn blocked(&self, now: Instant) -> Option<Instant> {
        self.blocked_until.filter(|until| *until > now)
    }

    /// Ends the episodes that have been quiet for [`EPISODE`], returning their reports.
    fn end_quiet_episodes(&mut self, client: Client, now: Instant, reports: &mut Vec<Report>) {
        self.end_episodes(client, now, EPISODE, reports);
    }

    /// Ends the episodes quiet for at least `quiet` (and, for guessing, no longer blocked,
    /// unless `quiet` is zero: at exit everything ends).
    fn end_episodes(
        &mut self,
        client: Client,
        now: Instant,
        quiet: Duration,
        reports: &mut Vec<Report>,
    ) {
        if let Some(guessing) = self.guessing
            && (quiet.is_zero() || self.blocked(now).is_none())
            && now.saturating_duration_since(guessing.last) >= quiet
        {
            self.guessing = None;
            if !guessing.announced {
                return self.end_malformed(client, now, quiet, reports);
            }
            reports.push(Report::GuessingEnded {
                client,
                failures: guessing.failures,
                refused: guessing.refused,
                lasted: guessing.last.saturating_duration_since(guessing.started),
            });
        }
        self.end_malformed(client, now, quiet, reports);
    }

    fn end_malformed(
        &mut self,
        client: Client,
        now: Instant,
        quiet: Duration,
        reports: &mut Vec<Report>,
    ) {
        if let Some(malformed) = self.malformed
            && now.saturating_duration_since(malformed.last) >= quiet
        {
            self.malformed = None;
            if malformed.counts.iter().sum::<u64>() > 1 {
                reports.push(Report::MalformedEnded {
                    client,
                    counts: MALFORMED
                        .iter()
                        .zip(malformed.counts)
                        .filter(|(_, count)| *count > 0)
                        .map(|(kind, count)| (*kind, count))
                        .collect(),
                    lasted: malformed.last.saturating_duration_since(malformed.started),
                });
            }
        }
    }

    /// Returns whether nothing about this client needs remembering any more.
    fn forgettable(&self, now: Instant) -> bool {
        self.guessing.is_none()
            && self.malformed.is_none()
            && self.blocked(now).is_none()
            && now.saturating_duration_since(self.window_start) >= AUTH_WINDOW
    }
}

/// The per-client fault table; pure, so it can be tested with a made-up clock.
#[derive(Debug)]
pub struct FaultTable {
    clients: HashMap<Client, Entry>,
    capacity: usize,
    named_window_start: Option<Instant>,
    named_in_window: u32,
    omitted: u64,
}

impl FaultTable {
    /// Creates a table of at most `capacity` clients.
    pub fn new(capacity: usize) -> FaultTable {
        FaultTable {
            clients: HashMap::new(),
            capacity: capacity.max(1),
            named_window_start: None,
            named_in_window: 0,
            omitted: 0,
        }
    }

    /// Returns how many clients are tracked.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Returns whether no client is tracked.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Returns how many clients are blocked at `now`.
    pub fn blocked_count(&self, now: Instant) -> usize {
        self.clients
            .values()
            .filter(|entry| entry.blocked(now).is_some())
            .count()
    }

    /// Checks a request to an authenticated route from `client` before its token is looked
    /// at: `Some` while the client is blocked (the request is counted as refused).
    pub fn check(&mut self, client: Client, now: Instant) -> Option<Blocked> {
        let entry = self.clients.get_mut(&client)?;
        let until = entry.blocked(now)?;
        entry.last_fault = now;
        if let Some(guessing) = &mut entry.guessing {
            guessing.refused = guessing.refused.saturating_add(1);
            guessing.last = now;
        }
        Some(Blocked {
            retry_after_secs: until
                .saturating_duration_since(now)
                .as_secs_f64()
                .ceil()
                .max(1.0) as u64,
        })
    }

    /// Records a failed authentication from `client`: `Some` when it is the `limit`th within
    /// [`AUTH_WINDOW`] and starts a block, with the report to log.
    pub fn auth_failed(
        &mut self,
        client: Client,
        now: Instant,
        limit: u32,
        reports: &mut Vec<Report>,
    ) -> Option<Blocked> {
        let entry = self.entry(client, now, reports);
        entry.last_fault = now;
        if now.saturating_duration_since(entry.window_start) >= AUTH_WINDOW {
            entry.window_start = now;
            entry.window_failures = 0;
        }
        entry.window_failures = entry.window_failures.saturating_add(1);
        let guessing = entry.guessing.get_or_insert(Guessing {
            started: now,
            last: now,
            failures: 0,
            refused: 0,
            announced: false,
        });
        guessing.failures = guessing.failures.saturating_add(1);
        guessing.last = now;
        if entry.window_failures < limit {
            return None;
        }
        let announce = !std::mem::replace(&mut guessing.announced, true);
        // A new window starts with the block: once it ends, the client gets another `limit`
        // tries before the next one.
        let within = now.saturating_duration_since(entry.window_start);
        let failures = entry.window_failures;
        entry.blocked_until = Some(now + AUTH_BLOCK);
        entry.window_start = now;
        entry.window_failures = 0;
        if announce {
            let report = Report::GuessingStarted {
                client,
                failures,
                within,
            };
            self.name(report, now, reports);
        }
        Some(Blocked {
            retry_after_secs: AUTH_BLOCK.as_secs(),
        })
    }

    /// Records a malformed request of `kind` from `client` (other kinds are ignored).
    pub fn malformed(
        &mut self,
        client: Client,
        kind: ErrorKind,
        now: Instant,
        reports: &mut Vec<Report>,
    ) {
        let Some(index) = MALFORMED.iter().position(|malformed| *malformed == kind) else {
            return;
        };
        let entry = self.entry(client, now, reports);
        entry.last_fault = now;
        let started = entry.malformed.is_none();
        let malformed = entry.malformed.get_or_insert(Malformed {
            started: now,
            last: now,
            counts: [0; MALFORMED.len()],
        });
        malformed.last = now;
        if let Some(count) = malformed.counts.get_mut(index) {
            *count = count.saturating_add(1);
        }
        if started {
            self.name(Report::MalformedStarted { client, kind }, now, reports);
        }
    }

    /// Ends every episode quiet for [`EPISODE`], forgets clients with nothing left to
    /// remember, and returns what to log.
    pub fn sweep(&mut self, now: Instant) -> Vec<Report> {
        let mut ended = Vec::new();
        for (client, entry) in &mut self.clients {
            entry.end_quiet_episodes(*client, now, &mut ended);
        }
        self.clients.retain(|_, entry| !entry.forgettable(now));
        let mut reports = Vec::new();
        for report in ended {
            self.name(report, now, &mut reports);
        }
        self.roll_named_window(now, &mut reports);
        reports
    }

    /// Ends every open episode (at exit) and returns what to log, within the line budget.
    pub fn finish(&mut self, now: Instant) -> Vec<Report> {
        let mut ended = Vec::new();
        for (client, entry) in &mut self.clients {
            entry.end_episodes(*client, now, Duration::ZERO, &mut ended);
        }
        let mut reports = Vec::new();
        for report in ended {
            self.name(report, now, &mut reports);
        }
        let lines = std::mem::take(&mut self.omitted);
        if lines > 0 {
            reports.push(Report::Omitted { lines });
        }
        reports
    }

    /// Returns `client`'s entry, first ending its quiet episodes and making room.
    fn entry(&mut self, client: Client, now: Instant, reports: &mut Vec<Report>) -> &mut Entry {
        if !self.clients.contains_key(&client) && self.clients.len() >= self.capacity {
            self.make_room(now);
        }
        let mut ended = Vec::new();
        if let Some(entry) = self.clients.get_mut(&client) {
            entry.end_quiet_episodes(client, now, &mut ended);
        }
        for report in ended {
            self.name(report, now, reports);
        }
        self.clients
            .entry(client)
            .or_insert_with(|| Entry::new(now))
    }

    /// Frees at least one slot, and a sixteenth of the table when it has to evict, so a flood
    /// of new addresses pays for one pass over the table every few hundred of them.
    fn make_room(&mut self, now: Instant) {
        self.clients.retain(|_, entry| !entry.forgettable(now));
        if self.clients.len() < self.capacity {
            return;
        }
        let mut by_age: Vec<(bool, Instant, Client)> = self
            .clients
            .iter()
            .map(|(client, entry)| (entry.blocked(now).is_some(), entry.last_fault, *client))
            .collect();
        let evict = (self.capacity / 16).max(1);
        // Unblocked clients first (false < true), then the longest quiet.
        by_age.select_nth_unstable(evict - 1);
        for (_, _, client) in by_age.iter().take(evict) {
            self.clients.remove(client);
        }
    }

    /// Adds `report` to `reports` unless this episode's budget of named lines is spent.
    fn name(&mut self, report: Report, now: Instant, reports: &mut Vec<Report>) {
        self.roll_named_window(now, reports);
        if self.named_in_window < NAMED_LINES_PER_EPISODE {
            self.named_in_window += 1;
            reports.push(report);
        } else {
            self.omitted = self.omitted.saturating_add(1);
        }
    }

    /// Starts a new budget window once [`EPISODE`] has passed, reporting what was left out.
    fn roll_named_window(&mut self, now: Instant, reports: &mut Vec<Report>) {
        let start = *self.named_window_start.get_or_insert(now);
        if now.saturating_duration_since(start) < EPISODE {
            return;
        }
        self.named_window_start = Some(now);
        self.named_in_window = 0;
        let lines = std::mem::take(&mut self.omitted);
        if lines > 0 {
            reports.push(Report::Omitted { lines });
        }
    }
}

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
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
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

    fn v4(last: u8) -> Client {
        Client::of(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
    }

    #[test]
    fn every_refusal_of_a_request_the_client_got_wrong_is_malformed_and_absence_is_not() {
        for kind in [
            ErrorKind::BadRequest,
            ErrorKind::PayloadTooLarge,
            ErrorKind::HeaderTooLarge,
            ErrorKind::UriTooLong,
            ErrorKind::Http2Refused,
            ErrorKind::WebSocketProtocol,
        ] {
            assert!(is_malformed(kind), "{}", kind.as_str());
        }
        for kind in [
            ErrorKind::NotFound,
            ErrorKind::MethodNotAllowed,
            ErrorKind::Unauthorized,
            ErrorKind::ConnectionLimit,
        ] {
            assert!(!is_malformed(kind), "{}", kind.as_str());
        }
    }

    #[test]
    fn ten_failures_in_a_minute_block_the_client_for_a_minute_and_no_other() {
        let mut table = FaultTable::new(MAX_CLIENTS);
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);
        let mut reports = Vec::new();
        for attempt in 0..9 {
            assert_eq!(
                table.auth_failed(v4(5), at(attempt * 100), AUTH_FAILURE_LIMIT, &mut reports),
                None
            );
            assert_eq!(table.check(v4(5), at(attempt * 100)), None);
        }
        assert!(reports.is_empty(), "{reports:?}");
        assert_eq!(
            table.auth_failed(v4(5), at(900), AUTH_FAILURE_LIMIT, &mut reports),
            Some(Blocked {
                retry_after_secs: 60
            })
        );
        assert_eq!(
            reports,
            [Report::GuessingStarted {
                client: v4(5),
                failures: 10,
                within: Duration::from_millis(900)
            }]
        );
        assert_eq!(
            reports[0].to_string(),
            "token guessing from 127.0.0.5: 10 failed authentications in 1 s; answering 429 \
             to its authenticated requests for 60 s"
        );
        assert_eq!(reports[0].level(), log::Level::Warn);
        // Blocked whatever it sends; Retry-After counts down.
        assert_eq!(
            table.check(v4(5), at(30_900)),
            Some(Blocked {
                retry_after_secs: 30
            })
        );
        assert_eq!(
            table.check(v4(5), at(60_500)),
            Some(Blocked {
                retry_after_secs: 1
            })
        );
        // Another address, even one failing itself, is unaffected.
        assert_eq!(table.check(v4(6), at(1_000)), None);
        assert_eq!(
            table.auth_failed(v4(6), at(1_000), AUTH_FAILURE_LIMIT, &mut reports),
            None
        );
        // The block ends after a minute however hard the client knocked, and the next
        // failures are counted afresh (no second WARN within the same episode).
        assert_eq!(table.check(v4(5), at(60_900)), None);
        assert_eq!(table.blocked_count(at(60_900)), 0);
        reports.clear();
        for attempt in 0..9 {
            assert_eq!(
                table.auth_failed(
                    v4(5),
                    at(61_000 + attempt),
                    AUTH_FAILURE_LIMIT,
                    &mut reports
                ),
                None
            );
        }
        assert!(
            table
                .auth_failed(v4(5), at(61_010), AUTH_FAILURE_LIMIT, &mut reports)
                .is_some()
        );
        assert!(reports.is_empty(), "{reports:?}");
    }

    #[test]
    fn failures_spread_over_more_than_a_minute_never_block() {
        let mut table = FaultTable::new(MAX_CLIENTS);
        let start = Instant::now();
        let mut reports = Vec::new();
        for attempt in 0..100 {
            let now = start + Duration::from_secs(attempt * 7);
            assert_eq!(
                table.auth_failed(v4(7), now, AUTH_FAILURE_LIMIT, &mut reports),
                None,
                "{attempt}"
            );
        }
        assert!(reports.is_empty(), "{reports:?}");
        // Mistyped tokens leave no line when their episode ends, and are forgotten.
        let quiet = start + Duration::from_secs(99 * 7 + 60);
        assert_eq!(table.sweep(quiet), []);
        assert!(table.is_empty());
    }

    #[test]
    fn an_episode_ends_with_its_totals_once_the_client_has_been_quiet_for_a_minute() {
        let mut table = FaultTable::new(MAX_CLIENTS);
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut reports = Vec::new();
        for _ in 0..10 {
            table.auth_failed(v4(5), at(0), AUTH_FAILURE_LIMIT, &mut reports);
        }
        for second in 1..=20 {
            for _ in 0..1000 {
                assert!(table.check(v4(5), at(second)).is_some());
            }
        }
        assert_eq!(table.sweep(at(70)), []);
        assert_eq!(table.blocked_count(at(70)), 0);
        let ended = table.sweep(at(80));
        assert_eq!(
            ended,
            [Report::GuessingEnded {
                client: v4(5),
                failures: 10,
                refused: 20_000,
                lasted: Duration::from_secs(20)
            }]
        );
        assert_eq!(
            ended[0].to_string(),
            "token guessing from 127.0.0.5 stopped: 10 failed authentications and 20000 \
             requests answered 429 in 20 s"
        );
        // Nothing left to remember: the client is forgotten.
        assert!(table.is_empty());
    }

    #[test]
    fn at_exit_every_open_episode_is_summed_up() {
        let mut table = FaultTable::new(MAX_CLIENTS);
        let start = Instant::now();
        let mut reports = Vec::new();
        for _ in 0..12 {
            table.auth_failed(v4(5), start, AUTH_FAILURE_LIMIT, &mut reports);
        }
        assert!(table.check(v4(5), start).is_some());
        table.malformed(v4(6), ErrorKind::BadRequest, start, &mut reports);
        table.malformed(v4(6), ErrorKind::BadRequest, start, &mut reports);
        // Mistyped, not guessing: nothing to say.
        table.auth_failed(v4(7), start, AUTH_FAILURE_LIMIT, &mut reports);
        let mut ended = table.finish(start + Duration::from_secs(1));
        ended.sort_by_key(|report| report.to_string());
        assert_eq!(
            ended,
            [
                Report::MalformedEnded {
                    client: v4(6),
                    counts: vec![(ErrorKind::BadRequest, 2)],
                    lasted: Duration::ZERO
                },
                Report::GuessingEnded {
                    client: v4(5),
                    failures: 12,
                    refused: 1,
                    lasted: Duration::ZERO
                },
            ]
        );
    }

    #[test]
    fn malformed_requests_are_one_line_per_episode_then_counts_per_kind() {
        let mut table = FaultTable::new(MAX_CLIENTS);
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut reports = Vec::new();
        for second in 0..30 {
            for _ in 0..10 {
                table.malformed(v4(5), ErrorKind::BadRequest, at(second), &mut reports);
            }
        }
        table.malformed(v4(5), ErrorKind::HeaderTooLarge, at(30), &mut reports);
        // Not a malformed request.
        table.malformed(v4(5), ErrorKind::NotFound, at(30), &mut reports);
        assert_eq!(
            reports,
            [Report::MalformedStarted {
                client: v4(5),
                kind: ErrorKind::BadRequest
            }]
        );
        assert!(table.sweep(at(60)).is_empty());
        let ended = table.sweep(at(90));
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(
            ended[0].to_string(),
            "malformed requests from 127.0.0.5: 301 in the last 30 s (bad_request 300, \
             header_too_large 1)"
        );
        // A single malformed request needs no second line.
        reports.clear();
        table.malformed(v4(8), ErrorKind::Http2Refused, at(100), &mut reports);
        assert_eq!(reports.len(), 1);
        assert!(table.sweep(at(200)).is_empty());
    }

    #[test]
    fn lines_naming_clients_are_capped_per_minute_and_the_rest_counted() {
        let mut table = FaultTable::new(MAX_CLIENTS);
        let start = Instant::now();
        let mut reports = Vec::new();
        for last in 0..50 {
            table.malformed(v4(last), ErrorKind::BadRequest, start, &mut reports);
        }
        assert_eq!(reports.len(), NAMED_LINES_PER_EPISODE as usize);
        let later = table.sweep(start + EPISODE);
        assert!(later.contains(&Report::Omitted { lines: 30 }), "{later:?}");
    }

    #[test]
    fn the_table_stays_bounded_and_evicts_blocked_clients_last() {
        let mut table = FaultTable::new(64);
        let start = Instant::now();
        let mut reports = Vec::new();
        for _ in 0..AUTH_FAILURE_LIMIT {
            table.auth_failed(v4(1), start, AUTH_FAILURE_LIMIT, &mut reports);
        }
        for index in 0..10_000u32 {
            let [_, b, c, d] = (0x0a00_0000 + index).to_be_bytes();
            let client = Client::of(IpAddr::V4(Ipv4Addr::new(10, b, c, d)));
            let now = start + Duration::from_millis(u64::from(index));
            table.auth_failed(client, now, AUTH_FAILURE_LIMIT, &mut reports);
            assert!(table.len() <= 64);
        }
        assert!(
            table
                .check(v4(1), start + Duration::from_secs(11))
                .is_some()
        );
    }

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

    #[test]
    fn an_ipv6_client_is_its_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.5".parse().unwrap();
        assert_eq!(Client::of(a), Client::of(b));
        assert_ne!(Client::of(a), Client::of(c));
        assert_eq!(Client::of(a).to_string(), "2001:db8:1:2::/64");
        assert_eq!(Client::of(mapped), v4(5));
    }
}
