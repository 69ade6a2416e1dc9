//! The session registry and admission control.
//!
//! Every live [`Session`] holds a count token, so `blufio_active_sessions` and `/health`'s
//! `active_sessions` equal the number of live sessions by construction: deletes, evictions,
//! dropped WebSockets and panicking handlers all release the token when the last reference
//! goes. New sessions pass [`Sessions::open`], which refuses them above the memory limit or at
//! `max_sessions` without touching the sessions already open.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    fmt,
    ops::Bound,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use metrics::Gauge;

pub use crate::agent::{Role, Turn};
use crate::{config::GatewayConfig, context::Context, metrics::ShedReason};

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

/// How a session is held open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// Created over HTTP; open until deleted or evicted.
    Http,
    /// A WebSocket connection; open while the connection is.
    WebSocket,
}

/// A snapshot of a session for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The session id.
    pub id: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Time of the last message, seconds since the Unix epoch.
    pub last_active_at: u64,
    /// Messages exchanged (both directions), including trimmed ones.
    pub message_count: u64,
    /// Bytes of message text kept in the history.
    pub history_bytes: u64,
    /// Messages kept in the history.
    pub history_messages: u64,
    /// How the session is held open.
    pub kind: SessionKind,
}

/// One conversation: an id, its bounded history and its activity times.
pub struct Session {
    id: String,
    kind: SessionKind,
    created_at: u64,
    state: Mutex<SessionState>,
    _live: LiveToken,
}

struct SessionState {
    last_active: Instant,
    last_active_at: u64,
    history: VecDeque<Turn>,
    history_bytes: u64,
    message_count: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Returns the session id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Returns how the session is held open.
    pub fn kind(&self) -> SessionKind {
        self.kind
    }

    /// Returns a copy of the history, oldest first.
    pub fn history(&self) -> Vec<Turn> {
        self.lock().history.iter().cloned().collect()
    }

    /// Returns a snapshot for listings.
    pub fn info(&self) -> SessionInfo {
        let state = self.lock();
        SessionInfo {
            id: self.id.clone(),
            created_at: self.created_at,
            last_active_at: state.last_active_at,
            message_count: state.message_count,
            history_bytes: state.history_bytes,
            history_messages: state.history.len() as u64,
            kind: self.kind,
        }
    }

    /// Appends a message, dropping the oldest ones beyond the limits, and marks the session
    /// active.
    pub fn push(&self, turn: Turn, limits: &Limits) {
        let mut state = self.lock();
        state.history_bytes += turn.content.len() as u64;
        state.history.push_back(turn);
        state.message_count += 1;
        state.last_active = Instant::now();
        state.last_active_at = unix_now();
        trim(
            &mut state,
            limits.max_history_messages,
            limits.max_history_bytes,
        );
    }

    /// Marks the session active without adding a message.
    pub fn touch(&self) {
        let mut state = self.lock();
        state.last_active = Instant::now();
        state.last_active_at = unix_now();
    }

    fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.lock().last_active)
    }

    fn lock(&self) -> MutexGuard<'_, SessionState> {
        crate::sync::lock(&self.state)
    }
}

fn trim(state: &mut SessionState, max_messages: u64, max_bytes: u64) -> bool {
    let mut trimmed = false;
    while state.history.len() as u64 > max_messages || state.history_bytes > max_bytes {
        match state.history.pop_front() {
            Some(turn) => {
                state.history_bytes -= turn.content.len() as u64;
                trimmed = true;
            }
            None => break,
        }
    }
    trimmed
}

/// Per-session bounds from `[gateway]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sessions open at once, at most.
    pub max_sessions: u64,
    /// Idle time after which a session is closed.
    pub idle_timeout: Duration,
    /// Messages kept per session.
    pub max_history_messages: u64,
    /// Bytes of message text kept per session.
    pub max_history_bytes: u64,
}

impl Limits {
    /// Reads the limits from `[gateway]`.
    pub fn from_config(gateway: &GatewayConfig) -> Limits {
        Limits {
            max_sessions: gateway.max_sessions,
            idle_timeout: Duration::from_secs(gateway.session_idle_timeout_secs),
            max_history_messages: gateway.max_history_messages,
            max_history_bytes: gateway.max_history_bytes,
        }
    }
}

/// Counts live sessions; one token per [`Session`], released on drop.
struct LiveToken {
    counter: Arc<LiveCounter>,
}

struct LiveCounter {
    count: AtomicU64,
    gauge: Gauge,
}

impl LiveToken {
    fn new(counter: &Arc<LiveCounter>) -> LiveToken {
        counter.count.fetch_add(1, Ordering::AcqRel);
        counter.gauge.increment(1.0);
        LiveToken {
            counter: Arc::clone(counter),
        }
    }
}

impl Drop for LiveToken {
    fn drop(&mut self) {
        self.counter.count.fetch_sub(1, Ordering::AcqRel);
        self.counter.gauge.decrement(1.0);
    }
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
    // Behind a lock so a reload can change them while sessions are open.
    limits: Mutex<Limits>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("active", &self.active())
            .field("limits", &self.limits())
            .finish()
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
    /// Creates an empty registry whose live count drives `gauge`.
    pub fn new(limits: Limits, gauge: Gauge) -> Sessions {
        Sessions {
            inner: Arc::new(Registry {
                map: Mutex::new(HashMap::new()),
                order: Mutex::new(BTreeSet::new()),
                live: Arc::new(LiveCounter {
                    count: AtomicU64::new(0),
                    gauge,
                }),
                limits: Mutex::new(limits),
            }),
        }
    }

    /// Returns the number of live sessions.
    pub fn active(&self) -> u64 {
        self.inner.live.count.load(Ordering::Acquire)
    }

    /// Returns the limits.
    pub fn limits(&self) -> Limits {
        *crate::sync::lock(&self.inner.limits)
    }

    /// Replaces the limits (on reload); open sessions keep their histories until their next
    /// message, and a lower `max_sessions` closes no session, it only refuses new ones.
    pub fn set_limits(&self, limits: Limits) {
        *crate::sync::lock(&self.inner.limits) = limits
    }

    /// Opens a session unless admission control refuses it. `memory_rejecting` is the memory
    /// monitor's admission flag.
    ///
    /// # Errors
    ///
    /// Returns [`Rejected`] above the memory limit or at `max_sessions`.
    pub fn open(
        &self,
        kind: SessionKind,
        memory_rejecting: bool,
    ) -> Result<SessionGuard, Rejected> {
        if memory_rejecting {
            return Err(Rejected::MemoryLimit);
        }
        let mut map = self.lock();
        // Counting live sessions (not map entries) also covers sessions being torn down.
        if self.active() >= self.limits().max_sessions {
            return Err(Rejected::SessionLimit);
        }
        let now = unix_now();
        let session = Arc::new(Session {
            id: new_session_id(),
            kind,
            created_at: now,
            state: Mutex::new(SessionState {
                last_active: Instant::now(),
                last_active_at: now,
                history: VecDeque::new(),
                history_bytes: 0,
                message_count: 0,
            }),
            _live: LiveToken::new(&self.inner.live),
        });
        if let Some(key) = order_key(now, &session.id) {
            let mut order = lock_order(&self.inner);
            order.insert(key);
            // Closed sessions' keys are dropped when a page walks past them; without
            // listings they would pile up, so past twice the open sessions they go at once
            // (amortised over the insertions that doubled them).
            if order.len() > map.len().saturating_mul(2).max(1024) {
                order.retain(|(_, id)| map.contains_key(&format!("{id:032x}")));
            }
        }
        map.insert(session.id.clone(), Arc::clone(&session));
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
        infos.sort_by(|a, b| {
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

    /// Closes HTTP sessions idle longer than the idle timeout; returns how many were closed.
    pub fn evict_idle(&self, ctx: &Context) -> u64 {
        let now = Instant::now();
        let timeout = self.limits().idle_timeout;
        let evicted: Vec<Arc<Session>> = {
            let mut map = self.lock();
            let ids: Vec<String> = map
                .values()
                .filter(|session| {
                    session.kind == SessionKind::Http && session.idle_for(now) >= timeout
                })
                .map(|session| session.id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        let count = evicted.len() as u64;
        if count > 0 {
            ctx.metrics.count_shed(ShedReason::IdleTimeout, count);
            log::info!("closed {count} sessions idle for more than {timeout:?}");
        }
        count
    }

    /// Frees memory when pressure starts: trims the histories of idle sessions to their last
    /// messages and closes the longest-idle tenth of idle HTTP sessions.
    pub fn shed_under_pressure(&self, ctx: &Context) {
        let now = Instant::now();
        let sessions: Vec<Arc<Session>> = self.lock().values().cloned().collect();
        let mut idle: Vec<(Duration, Arc<Session>)> = sessions
            .into_iter()
            .map(|session| (session.idle_for(now), session))
            .filter(|(idle_for, _)| *idle_for >= shed_idle_after(&self.limits()))
            .collect();
        let mut trimmed = 0;
        for (_, session) in &idle {
            let mut state = session.lock();
            if trim(
                &mut state,
                SHED_KEEP_MESSAGES,
                self.limits().max_history_bytes,
            ) {
                trimmed += 1;
            }
        }
        idle.retain(|(_, session)| session.kind == SessionKind::Http);
        idle.sort_by_key(|(idle_for, _)| std::cmp::Reverse(*idle_for));
        let to_close = idle.len().div_ceil(10);
        let mut closed = 0;
        {
            let mut map = self.lock();
            for (_, session) in idle.iter().take(to_close) {
                if map.remove(&session.id).is_some() {
                    closed += 1;
                }
            }
        }
        drop(idle);
        ctx.metrics.count_shed(ShedReason::HistoryTrimmed, trimmed);
        ctx.metrics.count_shed(ShedReason::PressureEvicted, closed);
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
            let removed = crate::sync::lock(&registry.map).remove(&self.session.id);
            drop(removed);
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Returns 128 random bits as 32 hex digits: unguessable, so one client cannot reach
/// another's session by counting.
fn new_session_id() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        // The OS random source failing is not something a request can fix; fall back to a
        // time-and-counter mix so the daemon keeps serving (ids stay unique, not secret).
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        bytes = nanos.to_le_bytes();
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Returns true when `id` has the shape of a session id (32 lowercase hex digits).
pub fn is_session_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max_sessions: u64) -> (Sessions, metrics::Gauge) {
        let gauge = metrics::Gauge::noop();
        let limits = Limits {
            max_sessions,
            idle_timeout: Duration::from_secs(60),
            max_history_messages: 3,
            max_history_bytes: 10,
        };
        (Sessions::new(limits, gauge.clone()), gauge)
    }

    #[test]
    fn memory_rejection_refuses_new_sessions() {
        let (sessions, _) = registry(10);
        assert_eq!(
            sessions.open(SessionKind::Http, true).unwrap_err(),
            Rejected::MemoryLimit
        );
        assert_eq!(sessions.active(), 0);
    }

    #[test]
    fn session_limit_refuses_and_dropping_a_guard_frees_a_slot() {
        let (sessions, _) = registry(2);
        let first = sessions.open(SessionKind::Http, false).unwrap();
        let _second = sessions.open(SessionKind::Http, false).unwrap();
        assert_eq!(
            sessions.open(SessionKind::Http, false).unwrap_err(),
            Rejected::SessionLimit
        );
        assert_eq!(sessions.active(), 2);
        drop(first);
        assert_eq!(sessions.active(), 1);
        assert!(sessions.open(SessionKind::Http, false).is_ok());
    }

    #[test]
    fn kept_sessions_stay_until_closed() {
        let (sessions, _) = registry(10);
        let session = sessions.open(SessionKind::Http, false).unwrap().keep();
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
        let (sessions, _) = registry(100);
        let guards: Vec<SessionGuard> = (0..23)
            .map(|_| sessions.open(SessionKind::Http, false).unwrap())
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
        let (sessions, _) = registry(10);
        let session = sessions.open(SessionKind::Http, false).unwrap().keep();
        assert!(sessions.close(session.id()));
        assert_eq!(sessions.active(), 1, "an in-flight request still holds it");
        drop(session);
        assert_eq!(sessions.active(), 0);
    }

    #[test]
    fn history_drops_oldest_beyond_message_and_byte_limits() {
        let (sessions, _) = registry(10);
        let guard = sessions.open(SessionKind::Http, false).unwrap();
        let limits = sessions.limits();
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
    fn a_panicking_holder_still_releases_its_session() {
        let (sessions, _) = registry(10);
        let sessions = Arc::new(sessions);
        let held = Arc::clone(&sessions);
        let result = std::thread::spawn(move || {
            let _guard = held.open(SessionKind::WebSocket, false).unwrap();
            panic!("handler bug");
        })
        .join();
        assert!(result.is_err());
        assert_eq!(sessions.active(), 0);
        assert!(sessions.list().is_empty());
    }

    #[test]
    fn session_ids_are_random_hex() {
        let (sessions, _) = registry(10);
        let a = sessions.open(SessionKind::Http, false).unwrap();
        let b = sessions.open(SessionKind::Http, false).unwrap();
        assert!(is_session_id(a.session().id()));
        assert_ne!(a.session().id(), b.session().id());
        assert!(!is_session_id("../../etc/passwd"));
    }
}
