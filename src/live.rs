//! The settings a reload applies at once ([`Live`]), apart from the [`Config`] the daemon
//! started with, which never changes: binds, ports, workers, the provider and every other key
//! need a restart.

use std::{collections::BTreeMap, path::PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, Secret};

/// The live part of the configuration, taken whole from one validated [`Config`] and
/// replaced whole by a reload (SIGHUP).
///
/// Each field serializes under the configuration key it comes from, so this type alone says
/// which keys a reload applies ([`Live::keys`]); every other changed key needs a restart.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Live {
    /// The bearer token the gateway accepts (`None`: the gateway answers 503).
    #[serde(rename = "[gateway] token")]
    pub token: Option<Secret>,
    /// Where the token was read from, if from a file.
    #[serde(rename = "[gateway] token_file")]
    pub token_file: Option<PathBuf>,
    /// Failed authentications per client within 60 s before it gets 429 (0: no throttle).
    #[serde(rename = "[gateway] auth_failure_limit")]
    pub auth_failure_limit: u32,
    /// Heap size above which blufio is under memory pressure, in MiB (resolved, never auto).
    #[serde(rename = "[daemon] memory_warn_mb")]
    pub memory_warn_mb: u64,
    /// Heap size above which new sessions are refused, in MiB (resolved, never auto).
    #[serde(rename = "[daemon] memory_limit_mb")]
    pub memory_limit_mb: u64,
    /// The `[daemon] log_level` filter (`BLUFIO_LOG` wins over it).
    #[serde(rename = "[daemon] log_level")]
    pub log_level: String,
    /// Sessions open at once, at most.
    #[serde(rename = "[gateway] max_sessions")]
    pub max_sessions: u64,
    /// Seconds without a message after which a session is closed.
    #[serde(rename = "[gateway] session_idle_timeout_secs")]
    pub session_idle_timeout_secs: u64,
    /// Messages kept per session.
    #[serde(rename = "[gateway] max_history_messages")]
    pub max_history_messages: u64,
    /// Bytes of message text kept per session.
    #[serde(rename = "[gateway] max_history_bytes")]
    pub max_history_bytes: u64,
    /// Seconds the agent gets to answer before the client gets 504.
    #[serde(rename = "[agent] timeout_secs")]
    pub agent_timeout_secs: u64,
    /// Money the agent may spend per UTC day, in US dollars (0: no limit).
    #[serde(rename = "[cost] daily_budget_usd")]
    pub daily_budget_usd: f64,
}

impl Live {
    /// Takes the live settings of `config`.
    pub fn from_config(config: &Config) -> Live {
        let (daemon, gateway) = (&config.daemon, &config.gateway);
        Live {
            token: gateway.token.clone(),
            token_file: gateway.token_file.clone(),
            auth_failure_limit: gateway.auth_failure_limit,
            memory_warn_mb: daemon.memory_warn_mb,
            memory_limit_mb: daemon.memory_limit_mb,
            log_level: daemon.log_level.clone(),
            max_sessions: gateway.max_sessions,
            session_idle_timeout_secs: gateway.session_idle_timeout_secs,
            max_history_messages: gateway.max_history_messages,
            max_history_bytes: gateway.max_history_bytes,
            agent_timeout_secs: config.agent.timeout_secs,
            daily_budget_usd: config.cost.daily_budget_usd,
        }
    }

    /// Returns the keys a reload applies at once, as `[section] key`.
    pub fn keys() -> Vec<String> {
        Live::from_config(&Config::default())
            .values()
            .into_keys()
            .collect()
    }

    /// Returns the keys whose value differs in `new`, in key order. The token serializes
    /// redacted, so it is compared apart, by value, and named without it.
    pub fn changed_keys(&self, new: &Live) -> Vec<String> {
        let (before, after) = (self.values(), new.values());
        let mut keys: Vec<String> = before
            .into_iter()
            .filter(|(key, value)| after.get(key) != Some(value))
            .map(|(key, _)| key)
            .collect();
        let token = "[gateway] token";
        if self.token != new.token && !keys.iter().any(|key| key == token) {
            keys.push(token.to_owned());
        }
        keys
    }

    /// Returns the warn threshold in bytes.
    pub fn memory_warn_bytes(&self) -> u64 {
        self.memory_warn_mb.saturating_mul(1024 * 1024)
    }

    /// Returns the limit threshold in bytes.
    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit_mb.saturating_mul(1024 * 1024)
    }

    /// Returns each key with its serialized value (the token redacted).
    fn values(&self) -> BTreeMap<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(fields)) => fields.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    }
}
