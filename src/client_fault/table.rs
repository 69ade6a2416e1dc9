//! The per-client fault table: counting, blocking and the episodes of each client, with the
//! caller's clock.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::{client::*, report::Report};
use crate::metrics::ErrorKind;

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
        reports.extend(self.end_guessing(client, now, quiet));
        reports.extend(self.end_malformed(client, now, quiet));
    }

    /// Ends a guessing episode quiet for `quiet`; only one that reached a block has a report.
    fn end_guessing(&mut self, client: Client, now: Instant, quiet: Duration) -> Option<Report> {
        let guessing = self.guessing.filter(|guessing| {
            (quiet.is_zero() || self.blocked(now).is_none())
                && now.saturating_duration_since(guessing.last) >= quiet
        })?;
        self.guessing = None;
        guessing.announced.then(|| Report::GuessingEnded {
            client,
            failures: guessing.failures,
            refused: guessing.refused,
            lasted: guessing.last.saturating_duration_since(guessing.started),
        })
    }

    /// Ends a malformed-request episode quiet for `quiet`; a single request has no report.
    fn end_malformed(&mut self, client: Client, now: Instant, quiet: Duration) -> Option<Report> {
        let malformed = self
            .malformed
            .filter(|malformed| now.saturating_duration_since(malformed.last) >= quiet)?;
        self.malformed = None;
        (malformed.counts.iter().sum::<u64>() > 1).then(|| Report::MalformedEnded {
            client,
            counts: MALFORMED
                .iter()
                .zip(malformed.counts)
                .filter(|(_, count)| *count > 0)
                .map(|(kind, count)| (*kind, count))
                .collect(),
            lasted: malformed.last.saturating_duration_since(malformed.started),
        })
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::client_fault::client::v4;

    /// An empty table of `capacity` clients, the time it starts at, and a list for reports.
    fn fresh(capacity: usize) -> (FaultTable, Instant, Vec<Report>) {
        (FaultTable::new(capacity), Instant::now(), Vec::new())
    }

    #[test]
    fn ten_failures_in_a_minute_block_the_client_for_a_minute_and_no_other() {
        let (mut table, start, mut reports) = fresh(MAX_CLIENTS);
        let at = |millis: u64| start + Duration::from_millis(millis);
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
        let (mut table, start, mut reports) = fresh(MAX_CLIENTS);
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
        let (mut table, start, mut reports) = fresh(MAX_CLIENTS);
        let at = |secs: u64| start + Duration::from_secs(secs);
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
        let (mut table, start, mut reports) = fresh(MAX_CLIENTS);
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
        let (mut table, start, mut reports) = fresh(MAX_CLIENTS);
        let at = |secs: u64| start + Duration::from_secs(secs);
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
        let (mut table, start, mut reports) = fresh(MAX_CLIENTS);
        for last in 0..50 {
            table.malformed(v4(last), ErrorKind::BadRequest, start, &mut reports);
        }
        assert_eq!(reports.len(), NAMED_LINES_PER_EPISODE as usize);
        let later = table.sweep(start + EPISODE);
        assert!(later.contains(&Report::Omitted { lines: 30 }), "{later:?}");
    }

    #[test]
    fn the_table_stays_bounded_and_evicts_blocked_clients_last() {
        let (mut table, start, mut reports) = fresh(64);
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
}
