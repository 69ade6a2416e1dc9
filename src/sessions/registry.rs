//! The registry of open sessions: admission, lookup, the ordered listing index, and the
//! eviction of idle sessions (on their timeout, and under memory pressure).

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use metrics::{Counter, Gauge};

use super::session::{
    Limits, LiveCounter, LiveToken, Session, SessionInfo, SessionKind, SessionOptions,
    SessionRecord, is_session_id,
};

/// Why a new session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The heap is above `memory_limit_mb`.
    MemoryLimit,
    /// `max_sessions` sessions are open.
    SessionLimit,
}

impl Rejected {
    /// Returns the machine-readable error code used in JSON bodies.
    pub fn code(self) -> &'static str {
        match self {
            Rejected::MemoryLimit => "memory_limit",
            Rejected::SessionLimit => "session_limit",
        }
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejected::MemoryLimit => {
                f.write_str("new sessions are refused while memory is above the limit")
            }
            Rejected::SessionLimit => f.write_str("the maximum number of sessions is open"),
        }
    }
}

/// The metric handles the registry counts into, taken from [`crate::metrics::Metrics`] when
/// the registry is built.
#[derive(Debug, Clone)]
pub struct SessionCounters {
    /// `blufio_active_sessions`: follows the number of live sessions.
    pub active: Gauge,
    /// `blufio_sessions_shed_total{reason="history_trimmed"}`.
    pub history_trimmed: Counter,
    /// `blufio_sessions_shed_total{reason="pressure_evicted"}`.
    pub pressure_evicted: Counter,
    /// `blufio_sessions_shed_total{reason="idle_timeout"}`.
    pub idle_timeout: Counter,
}

impl SessionCounters {
    /// Handles that count nowhere (for a registry outside a daemon).
    pub fn noop() -> SessionCounters {
        SessionCounters {
            active: Gauge::noop(),
            history_trimmed: Counter::noop(),
            pressure_evicted: Counter::noop(),
            idle_timeout: Counter::noop(),
        }
    }
}

/// The shed counters a [`Registry`] holds (the gauge lives in its [`LiveCounter`]).
struct ShedCounters {
    history_trimmed: Counter,
    pressure_evicted: Counter,
    idle_timeout: Counter,
}

/// The registry of open sessions.
pub struct Sessions {
    inner: Arc<Registry>,
}

struct Registry {
    map: Mutex<HashMap<String, Arc<Session>>>,
    /// Every open session's listing key (`created_at`, id as a number), so a page of the
    /// list costs its own length, not the registry's. Only [`Sessions::open`] adds to it;
    /// entries of closed sessions are dropped lazily (see [`Sessions::page`]), so no path
    /// that closes a session has to know about it.
    order: Mutex<BTreeSet<(u64, u128)>>,
    live: Arc<LiveCounter>,
    counters: ShedCounters,
    /// HTTP sessions' turns are in the session store too: shedding drops histories from
    /// memory only, and closes no session.
    stored: std::sync::atomic::AtomicBool,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("active", &self.active())
            .finish_non_exhaustive()
    }
}

/// Idle time after which a session counts as idle for shedding under pressure: a minute, or
/// a quarter of the idle timeout when that is shorter.
fn shed_idle_after(limits: &Limits) -> Duration {
    Duration::from_secs(60).min(limits.idle_timeout / 4)
}
/// Messages an idle session keeps when its history is trimmed under pressure.
const SHED_KEEP_MESSAGES: u64 = 2;

impl Sessions {
    /// Creates an empty registry that counts into `counters`.
    pub fn new(counters: SessionCounters) -> Sessions {
        Sessions {
            inner: Arc::new(Registry {
                map: Mutex::new(HashMap::new()),
                order: Mutex::new(BTreeSet::new()),
                live: LiveCounter::new(counters.active),
                counters: ShedCounters {
                    history_trimmed: counters.history_trimmed,
                    pressure_evicted: counters.pressure_evicted,
                    idle_timeout: counters.idle_timeout,
                },
                stored: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Says that HTTP sessions are kept in the session store: under memory pressure their
    /// histories are dropped from memory only (read back when used), and none is closed.
    pub fn set_stored(&self) {
        self.inner
            .stored
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn stored(&self) -> bool {
        self.inner.stored.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reopens a session the store kept (its history stays in the store until used). It
    /// passes no admission check: it was admitted before the restart.
    pub fn restore(&self, record: SessionRecord) {
        let session = Arc::new(Session::restore(record, LiveToken::new(&self.inner.live)));
        let mut map = self.lock();
        if let Some(key) = order_key(session.created_at(), session.id()) {
            lock_order(&self.inner).insert(key);
        }
        map.insert(session.id().to_owned(), session);
    }

    /// Returns the number of live sessions.
    pub fn active(&self) -> u64 {
        self.inner.live.get()
    }

    /// Opens a session unless admission control refuses it. `memory_rejecting` is the memory
    /// monitor's admission flag; `limits` are read from the live configuration by the caller,
    /// so after a reload a lower `max_sessions` closes no session, it only refuses new ones.
    ///
    /// # Errors
    ///
    /// Returns [`Rejected`] above the memory limit or at `max_sessions`.
    pub fn open(
        &self,
        kind: SessionKind,
        limits: &Limits,
        memory_rejecting: bool,
    ) -> Result<SessionGuard, Rejected> {
        self.open_with(kind, SessionOptions::default(), limits, memory_rejecting)
    }

    /// Like [`Sessions::open`], for a session that keeps `options` (checked by the caller
    /// against `max_history_bytes`: the options take their bytes out of the history's).
    ///
    /// # Errors
    ///
    /// Returns [`Rejected`] above the memory limit or at `max_sessions`.
    pub fn open_with(
        &self,
        kind: SessionKind,
        options: SessionOptions,
        limits: &Limits,
        memory_rejecting: bool,
    ) -> Result<SessionGuard, Rejected> {
        if memory_rejecting {
            return Err(Rejected::MemoryLimit);
        }
        let mut map = self.lock();
        // Counting live sessions (not map entries) also covers sessions being torn down.
        if self.active() >= limits.max_sessions {
            return Err(Rejected::SessionLimit);
        }
        let session = Arc::new(Session::new(
            kind,
            options,
            LiveToken::new(&self.inner.live),
        ));
        if let Some(key) = order_key(session.created_at(), session.id()) {
            let mut order = lock_order(&self.inner);
            order.insert(key);
            // Closed sessions' keys are dropped when a page walks past them; without
            // listings they would pile up, so past twice the open sessions they go at once
            // (amortised over the insertions that doubled them).
            if order.len() > map.len().saturating_mul(2).max(1024) {
                order.retain(|(_, id)| map.contains_key(&format!("{id:032x}")));
            }
        }
        map.insert(session.id().to_owned(), Arc::clone(&session));
        Ok(SessionGuard {
            session,
            registry: Some(Arc::clone(&self.inner)),
        })
    }

    /// Returns the session with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    /// Closes the session with this id; returns false when there is none.
    pub fn close(&self, id: &str) -> bool {
        // Dropped outside the lock: the last reference releases the live token.
        let removed = self.lock().remove(id);
        removed.is_some()
    }

    /// Returns snapshots of every session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        let mut infos: Vec<SessionInfo> = sessions.iter().map(|session| session.info()).collect();
        // Ids are unique, so this order is total and an unstable sort gives it exactly.
        infos.sort_unstable_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        infos
    }

    /// Returns up to `limit` snapshots in the order of [`Sessions::list`] (oldest first),
    /// starting after the session keyed `after` (its `created_at` and id), and whether more
    /// follow.
    ///
    /// Walks the ordered index from `after`, so a page costs its own length however many
    /// sessions are open (32 clients looping on a 10,000-session list must not starve the
    /// probes).
    pub fn page(&self, after: Option<(u64, &str)>, limit: usize) -> (Vec<SessionInfo>, bool) {
        let start = match after {
            Some((created_at, id)) => match order_key(created_at, id) {
                Some(key) => Bound::Excluded(key),
                None => return (Vec::new(), false),
            },
            None => Bound::Unbounded,
        };
        let mut selected = Vec::with_capacity(limit.min(1024));
        let mut more = false;
        {
            let map = self.lock();
            let mut order = lock_order(&self.inner);
            let mut closed = Vec::new();
            for key in order.range((start, Bound::Unbounded)) {
                match map.get(&format!("{:032x}", key.1)) {
                    Some(_) if selected.len() == limit => {
                        more = true;
                        break;
                    }
                    Some(session) => selected.push(Arc::clone(session)),
                    None => closed.push(*key),
                }
            }
            for key in closed {
                order.remove(&key);
            }
        }
        let infos = selected.iter().map(|session| session.info()).collect();
        (infos, more)
    }

    /// Closes HTTP sessions idle for `timeout` or longer at `now`; returns how many were
    /// closed.
    pub fn evict_idle(&self, timeout: Duration, now: Instant) -> u64 {
        self.evict_idle_ids(timeout, now).len() as u64
    }

    /// Like [`Sessions::evict_idle`], returning the ids of the sessions closed.
    pub fn evict_idle_ids(&self, timeout: Duration, now: Instant) -> Vec<String> {
        let evicted: Vec<Arc<Session>> = {
            let mut map = self.lock();
            let ids: Vec<String> = map
                .values()
                .filter(|session| {
                    session.kind() == SessionKind::Http && session.idle_for(now) >= timeout
                })
                .map(|session| session.id().to_owned())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        let count = evicted.len() as u64;
        if count > 0 {
            self.inner.counters.idle_timeout.increment(count);
            log::info!("closed {count} sessions idle for more than {timeout:?}");
        }
        evicted
            .iter()
            .map(|session| session.id().to_owned())
            .collect()
    }

    /// Frees memory when pressure starts: trims the histories of idle sessions to their last
    /// messages and closes the longest-idle tenth of idle HTTP sessions. `limits` say when a
    /// session counts as idle at `now` and how many bytes of history it may keep.
    pub fn shed_under_pressure(&self, limits: &Limits, now: Instant) {
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        let mut idle: Vec<(Duration, Arc<Session>)> = sessions
            .into_iter()
            .map(|session| (session.idle_for(now), session))
            .filter(|(idle_for, _)| *idle_for >= shed_idle_after(limits))
            .collect();
        let stored = self.stored();
        let mut trimmed = 0;
        for (_, session) in &idle {
            let dropped = if stored && session.kind() == SessionKind::Http {
                // Its turns are in the store: all of the history goes, and comes back from
                // the store when the session is used again.
                session.unload()
            } else {
                session.trim(SHED_KEEP_MESSAGES, limits.max_history_bytes)
            };
            if dropped {
                trimmed += 1;
            }
        }
        // A stored session is not closed under pressure: that would lose it, and what it
        // held in memory is gone already.
        idle.retain(|(_, session)| session.kind() == SessionKind::Http && !stored);
        // Ties in idle time may close in any order: an unstable sort is enough, and smaller.
        idle.sort_unstable_by_key(|(idle_for, _)| std::cmp::Reverse(*idle_for));
        let to_close = idle.len().div_ceil(10);
        let mut closed = 0;
        {
            let mut map = self.lock();
            for (_, session) in idle.iter().take(to_close) {
                if map.remove(session.id()).is_some() {
                    closed += 1;
                }
            }
        }
        drop(idle);
        self.inner.counters.history_trimmed.increment(trimmed);
        self.inner.counters.pressure_evicted.increment(closed);
        if trimmed > 0 || closed > 0 {
            log::warn!(
                "memory pressure: trimmed {trimmed} idle session histories, closed {closed} idle sessions"
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        crate::sync::lock(&self.inner.map)
    }
}

/// Returns a session's key in the listing order, or `None` for an id that is not 32 hex
/// digits (which no session has).
fn order_key(created_at: u64, id: &str) -> Option<(u64, u128)> {
    // Fixed-width lowercase hex orders as its number does, so the index keeps list order.
    is_session_id(id)
        .then(|| u128::from_str_radix(id, 16).ok())
        .flatten()
        .map(|id| (created_at, id))
}

fn lock_order(registry: &Registry) -> MutexGuard<'_, BTreeSet<(u64, u128)>> {
    crate::sync::lock(&registry.order)
}

/// An open session that closes itself when dropped, unless [`SessionGuard::keep`] hands it
/// to the registry.
#[derive(Debug)]
pub struct SessionGuard {
    session: Arc<Session>,
    registry: Option<Arc<Registry>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Registry")
    }
}

impl SessionGuard {
    /// Returns the session.
    pub fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Leaves the session open in the registry (until deleted or evicted) and returns it.
    pub fn keep(mut self) -> Arc<Session> {
        self.registry = None;
        Arc::clone(&self.session)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.take() {
            let removed = crate::sync::lock(&registry.map).remove(self.session.id());
            drop(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{Role, Turn};

    fn registry(max_sessions: u64) -> (Sessions, Limits) {
        let limits = Limits {
            max_sessions,
            idle_timeout: Duration::from_secs(60),
            max_history_messages: 3,
            max_history_bytes: 10,
        };
        (Sessions::new(SessionCounters::noop()), limits)
    }

    /// Opens an HTTP session and keeps it.
    fn kept(sessions: &Sessions, limits: &Limits) -> Arc<Session> {
        sessions
            .open(SessionKind::Http, limits, false)
            .unwrap()
            .keep()
    }

    #[test]
    fn memory_rejection_refuses_new_sessions() {
        let (sessions, limits) = registry(10);
        assert_eq!(
            sessions.open(SessionKind::Http, &limits, true).unwrap_err(),
            Rejected::MemoryLimit
        );
        assert_eq!(sessions.active(), 0);
    }

    #[test]
    fn session_limit_refuses_and_dropping_a_guard_frees_a_slot() {
        let (sessions, limits) = registry(2);
        let first = sessions.open(SessionKind::Http, &limits, false).unwrap();
        let _second = sessions.open(SessionKind::Http, &limits, false).unwrap();
        assert_eq!(
            sessions
                .open(SessionKind::Http, &limits, false)
                .unwrap_err(),
            Rejected::SessionLimit
        );
        assert_eq!(sessions.active(), 2);
        drop(first);
        assert_eq!(sessions.active(), 1);
        assert!(sessions.open(SessionKind::Http, &limits, false).is_ok());
    }

    #[test]
    fn kept_sessions_stay_until_closed() {
        let (sessions, limits) = registry(10);
        let session = kept(&sessions, &limits);
        let id = session.id().to_owned();
        drop(session);
        assert_eq!(sessions.active(), 1);
        assert!(sessions.get(&id).is_some());
        assert!(sessions.close(&id));
        assert!(!sessions.close(&id));
        assert_eq!(sessions.active(), 0);
    }

    #[test]
    fn pages_walk_every_session_once_in_list_order() {
        let (sessions, limits) = registry(100);
        let guards: Vec<SessionGuard> = (0..23)
            .map(|_| sessions.open(SessionKind::Http, &limits, false).unwrap())
            .collect();
        let all: Vec<String> = sessions.list().into_iter().map(|info| info.id).collect();
        let mut walked = Vec::new();
        let mut after: Option<(u64, String)> = None;
        loop {
            let (page, more) = sessions.page(
                after
                    .as_ref()
                    .map(|(created_at, id)| (*created_at, id.as_str())),
                5,
            );
            assert!(page.len() <= 5);
            after = page.last().map(|info| (info.created_at, info.id.clone()));
            walked.extend(page.into_iter().map(|info| info.id));
            if !more {
                break;
            }
        }
        assert_eq!(walked, all);
        let (page, more) = sessions.page(None, 23);
        assert_eq!((page.len(), more), (23, false));
        // Closed sessions are skipped, and the walk forgets their keys.
        let closed: Vec<String> = all.iter().step_by(2).cloned().collect();
        for id in &closed {
            assert!(sessions.close(id));
        }
        let (page, more) = sessions.page(None, 100);
        assert_eq!((page.len(), more), (11, false));
        assert!(page.iter().all(|info| !closed.contains(&info.id)));
        assert_eq!(lock_order(&sessions.inner).len(), 11);
        drop(guards);
    }

    #[test]
    fn live_count_follows_the_last_reference() {
        let (sessions, limits) = registry(10);
        let session = kept(&sessions, &limits);
        assert!(sessions.close(session.id()));
        assert_eq!(sessions.active(), 1, "an in-flight request still holds it");
        drop(session);
        assert_eq!(sessions.active(), 0);
    }

    #[test]
    fn history_drops_oldest_beyond_message_and_byte_limits() {
        let (sessions, limits) = registry(10);
        let guard = sessions.open(SessionKind::Http, &limits, false).unwrap();
        for text in ["a", "bb", "ccc", "dddd"] {
            guard.session().push(
                Turn {
                    role: Role::User,
                    content: text.to_owned(),
                },
                &limits,
            );
        }
        let history: Vec<String> = guard
            .session()
            .history()
            .into_iter()
            .map(|t| t.content)
            .collect();
        assert_eq!(history, ["bb", "ccc", "dddd"]);
        guard.session().push(
            Turn {
                role: Role::Assistant,
                content: "eeeeeeeee".to_owned(),
            },
            &limits,
        );
        let info = guard.session().info();
        assert_eq!(
            info.history_messages, 1,
            "10-byte limit keeps only the newest"
        );
        assert_eq!(info.history_bytes, 9);
        assert_eq!(info.message_count, 5);
    }

    #[test]
    fn a_sessions_options_take_their_bytes_out_of_its_history_budget() {
        let (sessions, limits) = registry(10);
        let options = SessionOptions {
            model: Some("ab".to_owned()),
            system: Some("12345".to_owned()),
        };
        let guard = sessions
            .open_with(SessionKind::Http, options, &limits, false)
            .unwrap();
        let session = guard.session();
        assert_eq!(
            (session.model(), session.system()),
            (Some("ab"), Some("12345"))
        );
        for text in ["xy", "z", "w"] {
            session.push(
                Turn {
                    role: Role::User,
                    content: text.to_owned(),
                },
                &limits,
            );
        }
        // 10 bytes of budget, 7 taken by the options: 3 bytes of history, not 4.
        let history: Vec<String> = session.history().into_iter().map(|t| t.content).collect();
        assert_eq!(history, ["z", "w"]);
        let info = session.info();
        assert_eq!((info.history_bytes, info.system_bytes), (2, 5));
        assert_eq!(info.model.as_deref(), Some("ab"));
        // Trimming under pressure keeps to the same budget; options beyond it leave nothing.
        assert!(session.trim(10, 8));
        assert_eq!(session.info().history_bytes, 1);
        assert!(session.trim(10, 6));
        assert!(session.history().is_empty());
    }

    #[test]
    fn a_panicking_holder_still_releases_its_session() {
        let (sessions, limits) = registry(10);
        let sessions = Arc::new(sessions);
        let held = Arc::clone(&sessions);
        let result = std::thread::spawn(move || {
            let _guard = held.open(SessionKind::WebSocket, &limits, false).unwrap();
            panic!("handler bug");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(sessions.active(), 0);
        assert!(sessions.list().is_empty());
    }

    #[test]
    fn session_ids_are_random_hex() {
        let (sessions, limits) = registry(10);
        let a = sessions.open(SessionKind::Http, &limits, false).unwrap();
        let b = sessions.open(SessionKind::Http, &limits, false).unwrap();
        assert!(is_session_id(a.session().id()));
        assert_ne!(a.session().id(), b.session().id());
        assert!(!is_session_id("../../etc/passwd"));
    }
}
