//! What the store keeps and answers, as the rest of the daemon sees it: a stored turn, a
//! stored session, their JSON, the store's options, what it held when it opened, what an
//! offline delete did, and the store's error. Shared with builds without the `store`
//! feature, which keep nothing but name the same types.

use serde_json::{Value, json};

use super::Store;

use crate::{
    agent::Role,
    cost::micro_usd,
    sessions::{SessionKind, SessionRecord},
};

/// A session as stored.
pub type StoredSession = SessionRecord;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    /// What SQLite or the OS said (for the log and `/v1/health`; never sent to clients).
    pub detail: String,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the session store failed: {}", self.detail)
    }
}

impl StoredSession {
    /// Returns the JSON `blufio sessions` prints (the system prompt as its length only,
    /// unless `full`).
    pub fn to_json(&self, full: bool) -> Value {
        let mut value = json!({
            "id": self.id,
            "kind": kind_name(self.kind),
            "model": self.model,
            "created_at": self.created_at,
            "last_active_at": self.last_active_at,
            "message_count": self.message_count,
        });
        if let Value::Object(map) = &mut value {
            if full {
                map.insert("system".into(), json!(self.system));
            } else {
                map.insert(
                    "system_bytes".into(),
                    json!(self.system.as_ref().map_or(0, String::len)),
                );
            }
        }
        value
    }
}

/// One stored turn of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTurn {
    /// Its place in the session, from 0 (set by the store on append).
    pub seq: u64,
    /// Who said it.
    pub role: Role,
    /// The text.
    pub content: String,
    /// When, seconds since the Unix epoch.
    pub created_at: u64,
    /// The model alias that answered (assistant turns).
    pub model: Option<String>,
    /// Prompt tokens of the exchange (assistant turns, when the provider said).
    pub input_tokens: Option<u64>,
    /// Reply tokens (assistant turns, when the provider said).
    pub output_tokens: Option<u64>,
    /// What the exchange cost in US dollars (assistant turns, when known).
    pub cost_usd: Option<f64>,
}

impl StoredTurn {
    /// Returns the JSON of `GET /v1/sessions/{id}/messages` and `blufio sessions export`.
    pub fn to_json(&self) -> Value {
        let mut value = json!({
            "seq": self.seq,
            "role": role_name(self.role),
            "content": self.content,
            "created_at": self.created_at,
        });
        if let Value::Object(map) = &mut value {
            if let Some(model) = &self.model {
                map.insert("model".into(), json!(model));
            }
            if let Some(tokens) = self.input_tokens {
                map.insert("input_tokens".into(), json!(tokens));
            }
            if let Some(tokens) = self.output_tokens {
                map.insert("output_tokens".into(), json!(tokens));
            }
            if let Some(cost) = self.cost_usd {
                map.insert("cost_usd".into(), json!(micro_usd(cost)));
            }
        }
        value
    }
}

pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

pub(crate) fn kind_name(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Http => "http",
        SessionKind::WebSocket => "websocket",
    }
}

/// What the store keeps for a session that `[gateway]` bounds: see `Store::open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// The database's size cap in bytes (0: none). Writes beyond it fail; the evictor
    /// removes the longest-idle sessions to stay under it.
    pub max_bytes: u64,
    /// Sessions idle this long (seconds) are removed when the store opens.
    pub idle_timeout_secs: u64,
}

/// What the store held when it opened.
#[derive(Debug)]
pub struct Opened {
    /// The store, its thread running.
    pub store: Store,
    /// Every HTTP session still within its idle timeout, oldest first.
    pub sessions: Vec<StoredSession>,
    /// Sessions removed at open for being idle past the timeout.
    pub expired: u64,
    /// The spend stored for `today` (days since the epoch), if any.
    pub spent_today_usd: Option<f64>,
    /// Whether `spend.json` was imported already (on an earlier start).
    pub spend_imported: bool,
}

/// What `delete_session` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfflineDelete {
    /// The session and its turns are gone, in one transaction.
    Deleted {
        /// How many turns went with it.
        turns: u64,
    },
    /// The store holds no session with that id; nothing changed.
    NotFound,
    /// A daemon holds the state directory; nothing changed.
    DaemonRunning {
        /// The pid the daemon wrote into its lock file.
        pid: Option<u32>,
    },
}
