//! One session: its id, its options (model and system prompt, fixed when it is opened),
//! bounded history and activity times, and the per-session limits.
//!
//! A session's options count against its history budget (`max_history_bytes`): the history
//! keeps what the options leave, so a client pins no more memory through a system prompt
//! than through history.

use std::{
    collections::VecDeque,
    fmt,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use metrics::Gauge;

use crate::{agent::Turn, config::GatewayConfig};

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
    /// The model alias the session asks for, when it names one.
    pub model: Option<String>,
    /// Bytes of the session's own system prompt (0 without one).
    pub system_bytes: u64,
}

/// What a session is opened with and keeps for its lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// The model alias for messages that name none; `None`: the default model.
    pub model: Option<String>,
    /// The system prompt sent with every message, instead of the model's configured one.
    pub system: Option<String>,
}

impl SessionOptions {
    /// Returns the bytes the options hold, which count against the history budget.
    pub fn bytes(&self) -> u64 {
        let model = self.model.as_ref().map_or(0, String::len);
        let system = self.system.as_ref().map_or(0, String::len);
        (model + system) as u64
    }
}

/// One conversation: an id, its options, its bounded history and its activity times.
pub struct Session {
    id: String,
    kind: SessionKind,
    created_at: u64,
    /// Boxed, and `None` without options: most sessions have none and pay one pointer for
    /// them, not two empty `Option<String>`s (48 bytes; 470 KiB over 10,000 sessions).
    options: Option<Box<SessionOptions>>,
    state: Mutex<SessionState>,
    _live: LiveToken,
}

struct SessionState {
    last_active: Instant,
    last_active_at: u64,
    history: VecDeque<Turn>,
    history_bytes: u64,
    message_count: u64,
    /// Whether `history` holds the session's newest turns. False for a session restored
    /// from the store (until its next message reads them back) and for one whose history
    /// was dropped from memory under pressure; its turns are then in the store only.
    loaded: bool,
    /// Whether the session store has a row for it (a session opened by its first message
    /// gets one with that message's turns).
    in_store: bool,
}

/// A session as the store keeps it: what a restart restores.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// The session id.
    pub id: String,
    /// How it was held open.
    pub kind: SessionKind,
    /// Its model alias, if it names one.
    pub model: Option<String>,
    /// Its own system prompt, if it has one.
    pub system: Option<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Time of the last message, seconds since the Unix epoch.
    pub last_active_at: u64,
    /// Messages exchanged (both directions).
    pub message_count: u64,
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

    /// Returns the model alias the session asks for, if it names one.
    pub fn model(&self) -> Option<&str> {
        self.options.as_ref()?.model.as_deref()
    }

    /// Returns the session's own system prompt, if it has one.
    pub fn system(&self) -> Option<&str> {
        self.options.as_ref()?.system.as_deref()
    }

    /// Returns a copy of the history, oldest first.
    pub fn history(&self) -> Vec<Turn> {
        self.lock().history.iter().cloned().collect()
    }

    /// Returns the history memory holds and the number of its first message in the session
    /// (messages before it were trimmed).
    pub fn numbered_history(&self) -> (u64, Vec<Turn>) {
        let state = self.lock();
        let first = state
            .message_count
            .saturating_sub(state.history.len() as u64);
        (first, state.history.iter().cloned().collect())
    }

    /// Returns the history when memory holds it, `None` when it must be read back from the
    /// store first.
    pub fn loaded_history(&self) -> Option<Vec<Turn>> {
        let state = self.lock();
        state
            .loaded
            .then(|| state.history.iter().cloned().collect())
    }

    /// Puts a history read back from the store into memory (unless a concurrent reader did
    /// first), trimmed to `limits`.
    pub fn fill(&self, turns: Vec<Turn>, limits: &Limits) {
        let budget = self.history_budget(limits.max_history_bytes);
        let mut state = self.lock();
        if state.loaded {
            return;
        }
        state.history_bytes = turns.iter().map(|turn| turn.content.len() as u64).sum();
        state.history = turns.into();
        state.loaded = true;
        trim(&mut state, limits.max_history_messages, budget);
    }

    /// Drops the history from memory (its turns stay in the store); returns whether it held
    /// any.
    pub fn unload(&self) -> bool {
        let mut state = self.lock();
        let held = !state.history.is_empty();
        state.history = VecDeque::new();
        state.history_bytes = 0;
        state.loaded = false;
        held
    }

    /// Returns whether the session store has the session.
    pub fn in_store(&self) -> bool {
        self.lock().in_store
    }

    /// Records that the session store has the session.
    pub fn mark_in_store(&self) {
        self.lock().in_store = true;
    }

    /// Returns what the store keeps of the session.
    pub fn record(&self) -> SessionRecord {
        let state = self.lock();
        SessionRecord {
            id: self.id.clone(),
            kind: self.kind,
            model: self.model().map(str::to_owned),
            system: self.system().map(str::to_owned),
            created_at: self.created_at,
            last_active_at: state.last_active_at,
            message_count: state.message_count,
        }
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
            model: self.model().map(str::to_owned),
            system_bytes: self.system().map_or(0, |system| system.len() as u64),
        }
    }

    /// Appends a message, dropping the oldest ones beyond the limits (the options' bytes
    /// taken out of `max_history_bytes`), and marks the session active.
    ///
    /// A history that is not in memory stays out of it: the turn is in the store, and the
    /// next message reads the newest back.
    pub fn push(&self, turn: Turn, limits: &Limits) {
        let mut state = self.lock();
        state.message_count += 1;
        state.last_active = Instant::now();
        state.last_active_at = unix_now();
        if !state.loaded {
            return;
        }
        state.history_bytes += turn.content.len() as u64;
        state.history.push_back(turn);
        trim(
            &mut state,
            limits.max_history_messages,
            self.history_budget(limits.max_history_bytes),
        );
    }

    /// Marks the session active without adding a message.
    pub fn touch(&self) {
        let mut state = self.lock();
        state.last_active = Instant::now();
        state.last_active_at = unix_now();
    }

    /// Opens a session of `kind` with `options`, counted by `live` while any reference to it
    /// remains.
    pub(super) fn new(kind: SessionKind, options: SessionOptions, live: LiveToken) -> Session {
        let now = unix_now();
        Session {
            id: new_session_id(),
            kind,
            created_at: now,
            options: (options != SessionOptions::default()).then(|| Box::new(options)),
            state: Mutex::new(SessionState {
                last_active: Instant::now(),
                last_active_at: now,
                history: VecDeque::new(),
                history_bytes: 0,
                message_count: 0,
                loaded: true,
                in_store: false,
            }),
            _live: live,
        }
    }

    /// Rebuilds a stored session, its history left in the store until it is used.
    pub(super) fn restore(record: SessionRecord, live: LiveToken) -> Session {
        let now = unix_now();
        let idle = Duration::from_secs(now.saturating_sub(record.last_active_at));
        let instant = Instant::now();
        let options = SessionOptions {
            model: record.model,
            system: record.system,
        };
        Session {
            id: record.id,
            kind: record.kind,
            created_at: record.created_at,
            options: (options != SessionOptions::default()).then(|| Box::new(options)),
            state: Mutex::new(SessionState {
                last_active: instant.checked_sub(idle).unwrap_or(instant),
                last_active_at: record.last_active_at,
                history: VecDeque::new(),
                history_bytes: 0,
                message_count: record.message_count,
                loaded: false,
                in_store: true,
            }),
            _live: live,
        }
    }

    /// Returns the creation time, seconds since the Unix epoch.
    pub(super) fn created_at(&self) -> u64 {
        self.created_at
    }

    pub(super) fn idle_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.lock().last_active)
    }

    /// Drops the oldest messages beyond `max_messages` or `max_bytes` (less the options'
    /// bytes); returns whether any went.
    pub(super) fn trim(&self, max_messages: u64, max_bytes: u64) -> bool {
        trim(
            &mut self.lock(),
            max_messages,
            self.history_budget(max_bytes),
        )
    }

    /// Returns the bytes of history the session may keep under `max_bytes`: what its options
    /// leave. Options are bounded by `max_history_bytes` when the session opens; a reload
    /// that lowers it below them leaves the session no history, never more than the bound.
    fn history_budget(&self, max_bytes: u64) -> u64 {
        max_bytes.saturating_sub(self.options.as_ref().map_or(0, |options| options.bytes()))
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
pub(super) struct LiveToken {
    counter: Arc<LiveCounter>,
}

pub(super) struct LiveCounter {
    count: AtomicU64,
    gauge: Gauge,
}

impl LiveCounter {
    /// Creates a count of zero that also drives `gauge`.
    pub(super) fn new(gauge: Gauge) -> Arc<LiveCounter> {
        Arc::new(LiveCounter {
            count: AtomicU64::new(0),
            gauge,
        })
    }

    /// Returns the number of live sessions.
    pub(super) fn get(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

impl LiveToken {
    pub(super) fn new(counter: &Arc<LiveCounter>) -> LiveToken {
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
