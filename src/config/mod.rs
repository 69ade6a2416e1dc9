//! The configuration schema: [`Config`] and its sections, [`Secret`], and the constants
//! callers share.
//!
//! Every section rejects unknown keys and every field has a default, so `blufio` runs with no
//! file at all. Reading files and environment variables is in `load.rs` (except `BLUFIO_LOG`
//! and `JOURNAL_STREAM`, read here for the logger and on reload), the checks in
//! `validate.rs` and `provider.rs`, `[providers]`, `[models]` and the checks tying them
//! together in `models.rs`, `"auto"` memory thresholds in `auto_memory.rs`, the TOML output
//! of `blufio config show` in `to_toml.rs`.

mod auto_memory;
mod load;
mod models;
#[cfg(test)]
mod models_tests;
mod provider;
#[cfg(test)]
mod tests;
mod to_toml;
mod validate;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::error::Error;

pub use crate::cost::CostConfig;
#[cfg(test)]
pub(crate) use models::CLOUD_AND_LOCAL;
pub use models::{ModelConfig, ProviderConfig, ProviderKind};
pub use toml::Spanned;

/// Environment variable that overrides the gateway bearer token.
pub const TOKEN_ENV: &str = "BLUFIO_GATEWAY_TOKEN";
/// Environment variable that overrides the log filter.
pub const LOG_ENV: &str = "BLUFIO_LOG";
pub use crate::small_file::MAX_FILE_BYTES;
/// Shortest gateway token accepted, in bytes.
pub const MIN_TOKEN_BYTES: usize = 16;
/// The most `[daemon] workers`; more threads than this only add stacks and allocator caches.
pub const MAX_WORKERS: usize = 64;

/// The whole configuration, as loaded and validated.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[daemon]`: listeners, memory thresholds, monitor and shutdown.
    pub daemon: DaemonConfig,
    /// `[gateway]`: the authenticated API and its bounds.
    pub gateway: GatewayConfig,
    /// `[prometheus]`: the `/metrics` endpoint.
    pub prometheus: PrometheusConfig,
    /// `[agent]`: the agent behind `/v1/messages` and `/ws`.
    pub agent: AgentConfig,
    /// `[providers.NAME]`: the upstream APIs, by name (with where each name is in the file).
    pub providers: BTreeMap<Spanned<String>, ProviderConfig>,
    /// `[models.ALIAS]`: the model names clients ask for (with where each is in the file).
    pub models: BTreeMap<Spanned<String>, ModelConfig>,
    /// `[cost]`: model prices and the daily budget.
    pub cost: CostConfig,
    /// `[store]`: the session store in `[daemon] state_dir`.
    pub store: StoreConfig,
    /// Whether port 0 (an ephemeral port) is allowed; only tests and embedding hosts set it.
    #[serde(skip)]
    pub allow_ephemeral_ports: bool,
    /// Serve probes and gateway on two listeners even when both ports are 0 (ephemeral); for
    /// tests and embedding hosts.
    #[serde(skip)]
    pub separate_listeners: bool,
}

/// `[daemon]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// IP address every listener binds to.
    pub bind: String,
    /// Port serving `/health` and `/metrics` (and everything, when equal to the gateway port).
    pub health_port: u16,
    /// Heap size above which blufio is under memory pressure, in MiB; `"auto"` (read as
    /// [`AUTO_MB`] until the context resolves it) is 60% of the cgroup limit.
    #[serde(deserialize_with = "mb_or_auto")]
    pub memory_warn_mb: u64,
    /// Heap size above which new sessions are refused, in MiB; `"auto"` (read as
    /// [`AUTO_MB`] until the context resolves it) is 75% of the cgroup limit.
    #[serde(deserialize_with = "mb_or_auto")]
    pub memory_limit_mb: u64,
    /// Seconds between memory samples.
    pub monitor_interval_secs: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds a client gets to send a request head or body before it is disconnected.
    pub request_timeout_secs: u64,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`); `BLUFIO_LOG` overrides it.
    pub log_level: String,
    /// Directory for state that must survive restarts (today's spend); none keeps it in
    /// memory only.
    pub state_dir: Option<PathBuf>,
    /// Open client connections across all listeners; `0` derives it from the file-descriptor
    /// soft limit (see [`crate::connection::derived_max_connections`]).
    pub max_connections: usize,
    /// Open client connections from one IP address on one listener.
    pub max_connections_per_ip: usize,
    /// Threads running the daemon's tasks; `0` is one per CPU, at most
    /// [`crate::runtime::AUTO_WORKERS_MAX`].
    pub workers: usize,
}

impl Default for DaemonConfig {
    fn default() -> DaemonConfig {
        DaemonConfig {
            bind: "127.0.0.1".to_owned(),
            health_port: 3000,
            memory_warn_mb: 150,
            memory_limit_mb: 200,
            monitor_interval_secs: 5,
            shutdown_grace_secs: 10,
            request_timeout_secs: 30,
            log_level: "info".to_owned(),
            state_dir: None,
            max_connections: 0,
            max_connections_per_ip: 64,
            workers: 0,
        }
    }
}

/// `[gateway]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Port serving the `/v1` API and `/ws`.
    pub port: u16,
    /// Bearer token, inline. Prefer `token_file` or `BLUFIO_GATEWAY_TOKEN`.
    pub token: Option<Secret>,
    /// File holding the bearer token (one trailing newline is ignored); a relative path is
    /// resolved against the configuration file's directory.
    pub token_file: Option<PathBuf>,
    /// Sessions open at once, at most.
    pub max_sessions: u64,
    /// Seconds without a message after which a session is closed.
    pub session_idle_timeout_secs: u64,
    /// Messages kept per session; the oldest go first.
    pub max_history_messages: u64,
    /// Bytes of message text kept per session; the oldest messages go first.
    pub max_history_bytes: u64,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_message_bytes: u64,
    /// Largest `/v1/chat/completions` body accepted, in bytes (it carries the whole
    /// conversation, so it is allowed more than one message); larger bodies get 413.
    pub max_request_bytes: u64,
    /// Failed authentications per client (IPv4 address or IPv6 /64) within 60 s after which
    /// it gets 429 for 60 s; 0 turns the throttle off (a proxy in front throttles instead).
    pub auth_failure_limit: u32,
    /// The `[models.ALIAS]` answering requests that name none; default: the only model.
    pub default_model: Option<Spanned<String>>,
}

impl Default for GatewayConfig {
    fn default() -> GatewayConfig {
        GatewayConfig {
            port: 3000,
            token: None,
            token_file: None,
            max_sessions: 1000,
            session_idle_timeout_secs: 1800,
            max_history_messages: 50,
            max_history_bytes: 64 * 1024,
            max_message_bytes: 64 * 1024,
            max_request_bytes: 1024 * 1024,
            auth_failure_limit: crate::client_fault::AUTH_FAILURE_LIMIT,
            default_model: None,
        }
    }
}

/// `[prometheus]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusConfig {
    /// Whether `/metrics` is served.
    pub enabled: bool,
}

impl Default for PrometheusConfig {
    fn default() -> PrometheusConfig {
        PrometheusConfig { enabled: true }
    }
}

/// `[store]` settings: sessions, their turns and the daily spend in `<state_dir>/blufio.db`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Whether sessions are stored when `[daemon] state_dir` is set (the spend is kept in
    /// `spend.json` when not).
    pub enabled: bool,
    /// The database's size cap in MiB (0: none): the longest-idle sessions are removed to
    /// stay under it, and a write beyond it fails.
    pub max_mb: u64,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            enabled: true,
            max_mb: 256,
        }
    }
}

/// `[agent]` settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Which built-in agent answers messages: `none`, `echo`, `anthropic` or `openai`.
    pub provider: Provider,
    /// Replaced by `[cost] daily_budget_usd`; refused with a message saying so, because the
    /// old value was a lifetime limit and silently reading it as a daily one would multiply it.
    pub budget_usd: Option<f64>,
    /// Seconds the agent gets to answer before the client gets 504.
    pub timeout_secs: u64,
    /// The provider's API root (`https://api.anthropic.com`, `http://127.0.0.1:11434` for
    /// Ollama); default: the provider's public API.
    pub base_url: Option<String>,
    /// The model to ask; default `claude-sonnet-4-5` for `anthropic`, required for `openai`.
    pub model: Option<String>,
    /// Largest reply, in tokens.
    pub max_tokens: u32,
    /// System prompt sent with every request.
    pub system: Option<String>,
    /// PEM file with the CA certificate(s) to trust instead of the built-in roots (a private
    /// CA in front of a LAN model server).
    pub ca_file: Option<PathBuf>,
    /// File holding the provider API key; `ANTHROPIC_API_KEY` / `OPENAI_API_KEY` win over it.
    pub api_key_file: Option<PathBuf>,
    /// The resolved API key (environment, then `api_key_file`); never read from TOML.
    #[serde(skip)]
    pub api_key: Option<Secret>,
    /// Milliseconds the echo agent waits before it answers (at most 60000). For testing: it
    /// keeps requests in flight, e.g. to check that shutdown completes them.
    pub echo_delay_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            provider: Provider::None,
            budget_usd: None,
            timeout_secs: 120,
            base_url: None,
            model: None,
            max_tokens: 1024,
            system: None,
            ca_file: None,
            api_key_file: None,
            api_key: None,
            echo_delay_ms: 0,
        }
    }
}

/// Environment variable holding the Anthropic API key.
pub const ANTHROPIC_KEY_ENV: &str = "ANTHROPIC_API_KEY";
/// Environment variable holding the OpenAI (or compatible server's) API key.
pub const OPENAI_KEY_ENV: &str = "OPENAI_API_KEY";

/// The built-in agents the binary can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// No agent: `/v1/messages` answers 503 `no_agent`; sessions still work.
    None,
    /// Replies with the message itself (for checking the gateway path).
    Echo,
    /// The Anthropic Messages API.
    Anthropic,
    /// The OpenAI Chat Completions API, as served by OpenAI, Ollama, llama.cpp or vLLM.
    #[serde(rename = "openai")]
    OpenAi,
}

impl Provider {
    /// Returns the name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::None => "none",
            Provider::Echo => "echo",
            Provider::Anthropic => "anthropic",
            Provider::OpenAi => "openai",
        }
    }
}

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// Returns the secret itself; call only where it is compared or sent.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Serializes as `"<redacted>"`: `blufio config show` must never print a secret.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"<redacted>\")")
    }
}

/// The value `"auto"` stands for in `memory_warn_mb` and `memory_limit_mb` until
/// [`Config::resolve_auto_memory`] replaces it.
pub const AUTO_MB: u64 = u64::MAX;

/// Reads a number of MiB or the word `"auto"`.
fn mb_or_auto<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum MbOrAuto {
        Mb(u64),
        Word(String),
    }
    match MbOrAuto::deserialize(deserializer) {
        Ok(MbOrAuto::Mb(mb)) if mb != AUTO_MB => Ok(mb),
        Ok(MbOrAuto::Word(word)) if word == "auto" => Ok(AUTO_MB),
        _ => Err(serde::de::Error::custom(
            "expected a number of MiB or \"auto\"",
        )),
    }
}

/// The commented default configuration file (`blufio.example.toml`, `blufio config
/// default`); a test checks that it parses to [`Config::default`].
pub const DEFAULT_FILE: &str = include_str!("../../blufio.example.toml");

impl Config {
    /// Returns a configuration for tests and embedding hosts: loopback, ephemeral ports (one
    /// listener), no token, defaults elsewhere.
    pub fn for_tests() -> Config {
        let mut config = Config::default();
        config.daemon.health_port = 0;
        config.gateway.port = 0;
        config.allow_ephemeral_ports = true;
        config
    }

    /// Returns the address of the health/metrics listener.
    ///
    /// # Errors
    ///
    /// Returns [`Error::BadAddress`] when `[daemon] bind` is not an IP address.
    pub fn health_addr(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::new(self.bind_ip()?, self.daemon.health_port))
    }

    /// Returns the address of the gateway listener.
    ///
    /// # Errors
    ///
    /// Returns [`Error::BadAddress`] when `[daemon] bind` is not an IP address.
    pub fn gateway_addr(&self) -> Result<SocketAddr, Error> {
        Ok(SocketAddr::new(self.bind_ip()?, self.gateway.port))
    }

    /// Returns true when one listener serves everything.
    pub fn single_listener(&self) -> bool {
        self.daemon.health_port == self.gateway.port && !self.separate_listeners
    }

    /// Returns the warn threshold in bytes.
    pub fn memory_warn_bytes(&self) -> u64 {
        self.daemon.memory_warn_mb.saturating_mul(1024 * 1024)
    }

    /// Returns the limit threshold in bytes.
    pub fn memory_limit_bytes(&self) -> u64 {
        self.daemon.memory_limit_mb.saturating_mul(1024 * 1024)
    }

    fn bind_ip(&self) -> Result<IpAddr, Error> {
        self.daemon.bind.parse().map_err(|_| Error::BadAddress {
            host: self.daemon.bind.clone(),
        })
    }
}

/// Returns `BLUFIO_LOG` when set: it overrides `[daemon] log_level`, also across reloads.
pub fn log_env_override() -> Option<String> {
    std::env::var(LOG_ENV)
        .ok()
        .filter(|value| !value.trim().is_empty())
}

/// Returns `JOURNAL_STREAM` (`<device>:<inode>`), which systemd sets when stderr is the
/// journal.
pub fn journal_stream() -> Option<String> {
    std::env::var("JOURNAL_STREAM").ok()
}

/// Returns the level for a validated `[daemon] log_level` value.
pub fn level_filter(log_level: &str) -> Option<log::LevelFilter> {
    log_level.parse().ok()
}
