//! The settings a reload applies at once ([`Live`]), apart from the [`Config`] the daemon
//! started with, which never changes: binds, ports, workers, the provider and every other key
//! need a restart.

use std::path::PathBuf;

use crate::config::{Config, Secret};

/// Declares [`Live`] once: each field with the configuration key it comes from and how it is
/// read from a [`Config`], so the list of keys a reload applies ([`Live::KEYS`]) and the
/// comparison that names the changed ones ([`Live::changed_keys`]) cannot drift from the
/// fields. Fields are listed in key order, so changed keys are named in that order.
macro_rules! live_settings {
    ($config:ident => $(
        $(#[$doc:meta])*
        $field:ident: $type:ty = $key:literal, $read:expr;
    )*) => {
        /// The live part of the configuration, taken whole from one validated [`Config`]
        /// and replaced whole by a reload (SIGHUP). Every other key needs a restart.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Live {
            $($(#[$doc])* pub $field: $type,)*
        }

        impl Live {
            /// The keys a reload applies at once, as `[section] key`, in key order.
            pub const KEYS: &[&str] = &[$($key),*];

            /// Takes the live settings of `config`.
            pub fn from_config($config: &Config) -> Live {
                Live { $($field: $read,)* }
            }

            /// Returns the keys whose value differs in `new`, in key order (the token is
            /// compared by value and named without it).
            pub fn changed_keys(&self, new: &Live) -> Vec<String> {
                let mut keys = Vec::new();
                $(
                    if self.$field != new.$field {
                        keys.push($key.to_owned());
                    }
                )*
                keys
            }
        }
    };
}

live_settings! { config =>
    /// Seconds the agent gets to answer before the client gets 504.
    agent_timeout_secs: u64 = "[agent] timeout_secs", config.agent.timeout_secs;
    /// Money the agent may spend per UTC day, in US dollars (0: no limit).
    daily_budget_usd: f64 = "[cost] daily_budget_usd", config.cost.daily_budget_usd;
    /// The `[daemon] log_level` filter (`BLUFIO_LOG` wins over it).
    log_level: String = "[daemon] log_level", config.daemon.log_level.clone();
    /// Heap size above which new sessions are refused, in MiB (resolved, never auto).
    memory_limit_mb: u64 = "[daemon] memory_limit_mb", config.daemon.memory_limit_mb;
    /// Heap size above which blufio is under memory pressure, in MiB (resolved, never auto).
    memory_warn_mb: u64 = "[daemon] memory_warn_mb", config.daemon.memory_warn_mb;
    /// Failed authentications per client within 60 s before it gets 429 (0: no throttle).
    auth_failure_limit: u32 = "[gateway] auth_failure_limit", config.gateway.auth_failure_limit;
    /// Bytes of message text kept per session.
    max_history_bytes: u64 = "[gateway] max_history_bytes", config.gateway.max_history_bytes;
    /// Messages kept per session.
    max_history_messages: u64 = "[gateway] max_history_messages",
        config.gateway.max_history_messages;
    /// Sessions open at once, at most.
    max_sessions: u64 = "[gateway] max_sessions", config.gateway.max_sessions;
    /// Seconds without a message after which a session is closed.
    session_idle_timeout_secs: u64 = "[gateway] session_idle_timeout_secs",
        config.gateway.session_idle_timeout_secs;
    /// The bearer token the gateway accepts (`None`: the gateway answers 503).
    token: Option<Secret> = "[gateway] token", config.gateway.token.clone();
    /// Where the token was read from, if from a file.
    token_file: Option<PathBuf> = "[gateway] token_file", config.gateway.token_file.clone();
}

impl Live {
    /// Returns the warn threshold in bytes.
    pub fn memory_warn_bytes(&self) -> u64 {
        self.memory_warn_mb.saturating_mul(1024 * 1024)
    }

    /// Returns the limit threshold in bytes.
    pub fn memory_limit_bytes(&self) -> u64 {
        self.memory_limit_mb.saturating_mul(1024 * 1024)
    }
}
