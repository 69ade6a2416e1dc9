//! The configuration: TOML file, environment and built-in defaults.
//!
//! This is the only file that reads environment variables or configuration files. Every
//! section rejects unknown keys and every field has a default, so `blufio` runs with no file
//! at all. Parse errors name the file, line, column and key; validation errors name the key.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{error::Error, notify::NotifySettings};

pub use crate::cost::CostConfig;

/// Environment variable that overrides the gateway bearer token.
pub const TOKEN_ENV: &str = "BLUFIO_GATEWAY_TOKEN";
/// Environment variable that overrides the log filter.
pub const LOG_ENV: &str = "BLUFIO_LOG";
pub use crate::small_file::MAX_FILE_BYTES;
use crate::small_file::read_capped;
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
    /// `[cost]`: model prices and the daily budget.
    pub cost: CostConfig,
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
    /// Failed authentications per client (IPv4 address or IPv6 /64) within 60 s after which
    /// it gets 429 for 60 s; 0 turns the throttle off (a proxy in front throttles instead).
    pub auth_failure_limit: u32,
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
            auth_failure_limit: crate::client_fault::AUTH_FAILURE_LIMIT,
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
pub const DEFAULT_FILE: &str = include_str!("../blufio.example.toml");

/// Where a configuration comes from, for error messages.
const DEFAULTS_ORIGIN: &str = "built-in defaults";

impl Config {
    /// Loads the configuration: the file at `path` when given (it must exist), else built-in
    /// defaults, then the environment (`BLUFIO_GATEWAY_TOKEN`), then validates it.
    ///
    /// # Errors
    ///
    /// Returns a configuration error naming the file, line, column and key.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        Config::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// Like [`Config::load`], reading environment variables through `env` (for tests).
    ///
    /// # Errors
    ///
    /// Returns a configuration error naming the file, line, column and key.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, Error> {
        let (mut config, origin) = match path {
            Some(path) => {
                let text = read_capped(path).map_err(|source| Error::ConfigRead {
                    path: path.to_owned(),
                    source,
                })?;
                let mut config = Config::parse(&text, path)?;
                config.resolve_paths(path);
                (config, path.display().to_string())
            }
            None => (Config::default(), DEFAULTS_ORIGIN.to_owned()),
        };
        config.resolve_token(&origin, env(TOKEN_ENV))?;
        let key_env = match config.agent.provider {
            Provider::Anthropic => env(ANTHROPIC_KEY_ENV),
            Provider::OpenAi => env(OPENAI_KEY_ENV),
            Provider::None | Provider::Echo => None,
        };
        config.resolve_api_key(&origin, key_env)?;
        config.validate(&origin)?;
        Ok(config)
    }

    /// Parses TOML text; `path` is only used in error messages.
    ///
    /// # Errors
    ///
    /// Returns [`Error::ConfigSyntax`] with the line, column and key of the problem.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        toml::from_str(text).map_err(|error: toml::de::Error| {
            let offset = error.span().map_or(0, |span| span.start);
            let (line, column) = line_and_column(text, offset);
            Error::ConfigSyntax {
                path: path.to_owned(),
                line,
                column,
                key: key_at(text, offset),
                message: error.message().trim().to_owned(),
            }
        })
    }

    /// Parses and validates TOML text as [`Config::load`] does, without the environment: the
    /// whole path from file text to a `Config` the daemon accepts, and what the config fuzz
    /// target runs. `path` names the file in errors.
    ///
    /// # Errors
    ///
    /// Returns a configuration error naming the file, line, column and key.
    pub fn parse_validated(text: &str, path: &Path) -> Result<Config, Error> {
        let mut config = Config::parse(text, path)?;
        let origin = path.display().to_string();
        config.resolve_token(&origin, None)?;
        config.validate(&origin)?;
        Ok(config)
    }

    /// Returns a configuration for tests and embedding hosts: loopback, ephemeral ports (one
    /// listener), no token, defaults elsewhere.
    pub fn for_tests() -> Config {
        let mut config = Config::default();
        config.daemon.health_port = 0;
        config.gateway.port = 0;
        config.allow_ephemeral_ports = true;
        config
    }

    /// Returns the log filter: `BLUFIO_LOG` when set, else `[daemon] log_level`.
    pub fn log_filter(&self) -> String {
        log_env_override().unwrap_or_else(|| self.daemon.log_level.clone())
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

    /// Returns where to send service-manager notifications, from `NOTIFY_SOCKET`,
    /// `WATCHDOG_USEC` and `WATCHDOG_PID`; `None` when not run by a manager that asks for them.
    pub fn notify_settings() -> Option<NotifySettings> {
        NotifySettings::from_vars(
            std::env::var_os("NOTIFY_SOCKET"),
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    /// Replaces `"auto"` thresholds: 75% (limit) and 60% (warn) of `cgroup_limit_bytes`, or
    /// the defaults (200 and 150 MiB) without a cgroup limit. A warn threshold that would not
    /// be below the limit becomes 80% of it. Returns one line per replaced value.
    pub fn resolve_auto_memory(&mut self, cgroup_limit_bytes: Option<u64>) -> Vec<String> {
        let defaults = DaemonConfig::default();
        let daemon = &mut self.daemon;
        let mut notes = Vec::new();
        let source = cgroup_limit_bytes.map_or("no cgroup limit: default".to_owned(), |bytes| {
            format!("cgroup limit {} MiB", bytes / (1024 * 1024))
        });
        if daemon.memory_limit_mb == AUTO_MB {
            daemon.memory_limit_mb = cgroup_limit_bytes.map_or(defaults.memory_limit_mb, |bytes| {
                crate::cgroup::share_mb(bytes, crate::cgroup::AUTO_LIMIT_PERCENT)
            });
            notes.push(format!(
                "memory_limit_mb = \"auto\": {} MiB ({source})",
                daemon.memory_limit_mb
            ));
        }
        if daemon.memory_warn_mb == AUTO_MB {
            let warn = cgroup_limit_bytes.map_or(defaults.memory_warn_mb, |bytes| {
                crate::cgroup::share_mb(bytes, crate::cgroup::AUTO_WARN_PERCENT)
            });
            daemon.memory_warn_mb = if warn < daemon.memory_limit_mb {
                warn
            } else {
                (daemon.memory_limit_mb * 4 / 5).max(1)
            };
            notes.push(format!(
                "memory_warn_mb = \"auto\": {} MiB ({source})",
                daemon.memory_warn_mb
            ));
        }
        notes
    }

    /// Renders the configuration as TOML, secrets redacted (`blufio config show`).
    pub fn to_toml(&self) -> String {
        let value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        let mut out = String::new();
        let Some(sections) = value.as_object() else {
            return out;
        };
        for (section, fields) in sections {
            let Some(fields) = fields.as_object() else {
                continue;
            };
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in fields {
                match value {
                    // TOML has no null: an unset optional key is shown as a comment.
                    serde_json::Value::Null => out.push_str(&format!("# {key} is not set\n")),
                    // JSON strings, numbers and booleans are valid TOML values as written.
                    _ => out.push_str(&format!("{key} = {value}\n")),
                }
            }
        }
        out
    }

    fn bind_ip(&self) -> Result<IpAddr, Error> {
        self.daemon.bind.parse().map_err(|_| Error::BadAddress {
            host: self.daemon.bind.clone(),
        })
    }

    /// Makes relative paths in the file relative to the file's own directory, so the daemon
    /// finds them whatever its working directory (systemd starts it in `/`).
    fn resolve_paths(&mut self, config_path: &Path) {
        let base = config_path.parent().unwrap_or(Path::new(""));
        if let Some(token_file) = &mut self.gateway.token_file
            && token_file.is_relative()
        {
            *token_file = base.join(&*token_file);
        }
        for path in [
            &mut self.agent.api_key_file,
            &mut self.agent.ca_file,
            &mut self.daemon.state_dir,
        ]
        .into_iter()
        .flatten()
        {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }

    fn resolve_token(&mut self, origin: &str, from_env: Option<String>) -> Result<(), Error> {
        if let Some(token) = from_env.filter(|token| !token.is_empty()) {
            check_token(&token).map_err(|problem| {
                invalid("environment", TOKEN_ENV, &format!("the token {problem}"))
            })?;
            self.gateway.token = Some(Secret(token));
            return Ok(());
        }
        if let Some(path) = &self.gateway.token_file {
            if self.gateway.token.is_some() {
                return Err(invalid(
                    origin,
                    "[gateway] token_file",
                    "set either token or token_file, not both",
                ));
            }
            let text = read_capped(path).map_err(|source| Error::FileRead {
                what: "token file",
                path: path.clone(),
                source,
            })?;
            // Editors and `echo` end files with a newline; anything else is part of the token.
            let token = text.strip_suffix('\n').map_or(text.as_str(), |rest| {
                rest.strip_suffix('\r').unwrap_or(rest)
            });
            check_token(token).map_err(|problem| {
                invalid(
                    origin,
                    "[gateway] token_file",
                    &format!("the token in {} {problem}", path.display()),
                )
            })?;
            self.gateway.token = Some(Secret(token.to_owned()));
        }
        Ok(())
    }

    fn resolve_api_key(&mut self, origin: &str, from_env: Option<String>) -> Result<(), Error> {
        if let Some(key) = from_env.filter(|key| !key.trim().is_empty()) {
            self.agent.api_key = Some(Secret(key.trim().to_owned()));
            return Ok(());
        }
        if let Some(path) = &self.agent.api_key_file {
            let text = read_capped(path).map_err(|source| Error::FileRead {
                what: "API key file",
                path: path.clone(),
                source,
            })?;
            let key = text.trim();
            if key.is_empty() {
                return Err(invalid(
                    origin,
                    "[agent] api_key_file",
                    &format!("{} is empty", path.display()),
                ));
            }
            self.agent.api_key = Some(Secret(key.to_owned()));
        }
        Ok(())
    }

    /// Checks that the values make sense together.
    ///
    /// # Errors
    ///
    /// Returns [`Error::ConfigInvalid`] naming the first offending key.
    pub fn validate(&self, origin: &str) -> Result<(), Error> {
        let daemon = &self.daemon;
        let gateway = &self.gateway;
        self.bind_ip().map_err(|_| {
            invalid(
                origin,
                "[daemon] bind",
                "must be an IP address such as 127.0.0.1 or ::",
            )
        })?;
        if !self.allow_ephemeral_ports {
            if daemon.health_port == 0 {
                return Err(invalid(origin, "[daemon] health_port", "must not be 0"));
            }
            if gateway.port == 0 {
                return Err(invalid(origin, "[gateway] port", "must not be 0"));
            }
        }
        if daemon.memory_warn_mb == 0 {
            return Err(invalid(
                origin,
                "[daemon] memory_warn_mb",
                "must be greater than 0",
            ));
        }
        if daemon.memory_warn_mb >= daemon.memory_limit_mb
            && daemon.memory_warn_mb != AUTO_MB
            && daemon.memory_limit_mb != AUTO_MB
        {
            return Err(invalid(
                origin,
                "[daemon] memory_warn_mb",
                &format!(
                    "must be below memory_limit_mb ({} >= {})",
                    daemon.memory_warn_mb, daemon.memory_limit_mb
                ),
            ));
        }
        let positive = [
            (
                "[daemon] monitor_interval_secs",
                daemon.monitor_interval_secs,
            ),
            ("[daemon] request_timeout_secs", daemon.request_timeout_secs),
            ("[agent] timeout_secs", self.agent.timeout_secs),
            ("[gateway] max_sessions", gateway.max_sessions),
            (
                "[gateway] session_idle_timeout_secs",
                gateway.session_idle_timeout_secs,
            ),
            (
                "[gateway] max_history_messages",
                gateway.max_history_messages,
            ),
            ("[gateway] max_history_bytes", gateway.max_history_bytes),
            ("[gateway] max_message_bytes", gateway.max_message_bytes),
            (
                "[daemon] max_connections_per_ip",
                daemon.max_connections_per_ip as u64,
            ),
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(origin, key, "must be greater than 0"));
        }
        if daemon.workers > MAX_WORKERS {
            return Err(invalid(
                origin,
                "[daemon] workers",
                &format!("must be at most {MAX_WORKERS} (0 picks one per CPU)"),
            ));
        }
        if daemon.monitor_interval_secs > 3600 {
            return Err(invalid(
                origin,
                "[daemon] monitor_interval_secs",
                "must be at most 3600",
            ));
        }
        if self.agent.echo_delay_ms > 60_000 {
            return Err(invalid(
                origin,
                "[agent] echo_delay_ms",
                "must be at most 60000",
            ));
        }
        if self.agent.budget_usd.is_some() {
            return Err(invalid(
                origin,
                "[agent] budget_usd",
                "was a lifetime limit and is replaced by the daily limit [cost] daily_budget_usd; \
                 move the value there (it now resets every UTC midnight)",
            ));
        }
        self.cost
            .validate()
            .map_err(|(key, message)| invalid(origin, &key, &message))?;
        crate::provider::validate(&self.agent)
            .map_err(|(key, message)| invalid(origin, key, &message))?;
        if !matches!(
            daemon.log_level.as_str(),
            "off" | "error" | "warn" | "info" | "debug" | "trace"
        ) {
            return Err(invalid(
                origin,
                "[daemon] log_level",
                "must be one of off, error, warn, info, debug, trace",
            ));
        }
        if let Some(token) = &gateway.token
            && let Err(problem) = check_token(token.expose())
        {
            return Err(invalid(
                origin,
                "[gateway] token",
                &format!("the token {problem}"),
            ));
        }
        Ok(())
    }
}

/// Checks a gateway token; the error completes "the token …" and never quotes the token.
///
/// A token travels in an `Authorization` header and in a `bearer.<token>` WebSocket
/// subprotocol, so it must be printable ASCII without spaces; a control character, NUL or
/// line break would be accepted here and then match no request ever.
fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("is empty".to_owned());
    }
    if let Some((index, byte)) = token
        .bytes()
        .enumerate()
        .find(|(_, byte)| !byte.is_ascii_graphic())
    {
        let what = match byte {
            0 => "a NUL byte",
            b' ' | b'\t' => "whitespace",
            b'\r' | b'\n' => "a line break",
            byte if byte.is_ascii_control() => "a control character",
            _ => "a non-ASCII character",
        };
        return Err(format!(
            "contains {what} at byte {index}; use printable ASCII without spaces"
        ));
    }
    if token.len() < MIN_TOKEN_BYTES {
        return Err(format!(
            "is {} bytes long; use at least {MIN_TOKEN_BYTES} (for example `openssl rand -hex 32`)",
            token.len()
        ));
    }
    Ok(())
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

fn invalid(origin: &str, key: &str, message: &str) -> Error {
    Error::ConfigInvalid {
        origin: origin.to_owned(),
        key: key.to_owned(),
        message: message.to_owned(),
    }
}

/// Converts a byte offset into a 1-based line and column (in characters).
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Finds the key on the line containing `offset` (`key = value`), if that line has one.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    let line = text.get(line_start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("blufio.toml"))
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn parse_validated_rejects_what_load_rejects() {
        let path = Path::new("/etc/blufio.toml");
        let error = Config::parse_validated(
            "[daemon]\nmemory_warn_mb = 300\nmemory_limit_mb = 200\n",
            path,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("/etc/blufio.toml"), "{error}");
        assert!(error.contains("memory_warn_mb"), "{error}");
        let config = Config::parse_validated("[gateway]\nmax_sessions = 7\n", path).unwrap();
        assert_eq!(config.gateway.max_sessions, 7);
    }

    #[test]
    fn defaults_are_150_200_3000() {
        let config = Config::load_with_env(None, no_env).unwrap();
        assert_eq!(config.daemon.memory_warn_mb, 150);
        assert_eq!(config.daemon.memory_limit_mb, 200);
        assert_eq!(config.daemon.health_port, 3000);
        assert_eq!(config.daemon.monitor_interval_secs, 5);
        assert_eq!(config.daemon.bind, "127.0.0.1");
        assert!(config.prometheus.enabled);
        assert!(config.gateway.token.is_none());
        assert!(config.single_listener());
    }

    #[test]
    fn custom_values_are_read() {
        let config = parse(
            "[daemon]\nmemory_warn_mb = 300\nmemory_limit_mb = 400\nhealth_port = 9100\n\
             monitor_interval_secs = 2\nbind = \"0.0.0.0\"\n[gateway]\nport = 8080\n\
             token = \"s3cret-s3cret-s3cret\"\n[prometheus]\nenabled = false\n",
        )
        .unwrap();
        config.validate("test").unwrap();
        assert_eq!(config.daemon.memory_warn_mb, 300);
        assert_eq!(config.memory_limit_bytes(), 400 * 1024 * 1024);
        assert_eq!(config.health_addr().unwrap().to_string(), "0.0.0.0:9100");
        assert_eq!(config.gateway_addr().unwrap().port(), 8080);
        assert!(!config.single_listener());
        assert!(!config.prometheus.enabled);
        assert_eq!(
            config.gateway.token.unwrap().expose(),
            "s3cret-s3cret-s3cret"
        );
    }

    #[test]
    fn unknown_key_names_file_line_column_and_key() {
        let error = parse("[daemon]\nhealth_port = 3000\nmemroy_warn_mb = 100\n").unwrap_err();
        let message = error.to_string();
        assert!(error.is_config());
        assert!(
            message.starts_with("blufio.toml:3:1: key `memroy_warn_mb`"),
            "{message}"
        );
        assert!(message.contains("unknown field"), "{message}");
    }

    #[test]
    fn unknown_section_is_rejected() {
        let message = parse("[deamon]\nhealth_port = 1\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("blufio.toml:1:"), "{message}");
        assert!(message.contains("deamon"), "{message}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let message = parse("[daemon]\n\nmemory_warn_mb = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with("blufio.toml:3:18: key `memory_warn_mb`"),
            "{message}"
        );
    }

    #[test]
    fn warn_at_or_above_limit_is_invalid() {
        let config = parse("[daemon]\nmemory_warn_mb = 200\nmemory_limit_mb = 200\n").unwrap();
        let message = config.validate("blufio.toml").unwrap_err().to_string();
        assert_eq!(
            message,
            "blufio.toml: [daemon] memory_warn_mb: must be below memory_limit_mb (200 >= 200)"
        );
    }

    #[test]
    fn zero_interval_and_port_zero_are_invalid() {
        let config = parse("[daemon]\nmonitor_interval_secs = 0\n").unwrap();
        assert!(
            config
                .validate("f")
                .unwrap_err()
                .to_string()
                .contains("monitor_interval_secs")
        );
        let config = parse("[daemon]\nhealth_port = 0\n").unwrap();
        assert!(
            config
                .validate("f")
                .unwrap_err()
                .to_string()
                .contains("health_port")
        );
        let mut config = parse("[daemon]\nhealth_port = 0\n[gateway]\nport = 0\n").unwrap();
        config.allow_ephemeral_ports = true;
        config.validate("f").unwrap();
    }

    #[test]
    fn bad_bind_address_and_log_level_are_invalid() {
        let config = parse("[daemon]\nbind = \"localhost\"\n").unwrap();
        assert!(
            config
                .validate("f")
                .unwrap_err()
                .to_string()
                .contains("[daemon] bind")
        );
        let config = parse("[daemon]\nlog_level = \"loud\"\n").unwrap();
        assert!(
            config
                .validate("f")
                .unwrap_err()
                .to_string()
                .contains("log_level")
        );
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let error =
            Config::load_with_env(Some(Path::new("/nonexistent/blufio.toml")), no_env).unwrap_err();
        assert!(error.is_config());
        assert!(error.to_string().contains("/nonexistent/blufio.toml"));
    }

    #[test]
    fn token_comes_from_env_then_file() {
        let dir = std::env::temp_dir().join(format!("blufio-config-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let token_path = dir.join("token");
        fs::write(&token_path, "from-file-0123456789\n").unwrap();
        let config_path = dir.join("blufio.toml");
        fs::write(
            &config_path,
            format!(
                "[gateway]\ntoken_file = {:?}\n",
                token_path.display().to_string()
            ),
        )
        .unwrap();
        let config = Config::load_with_env(Some(&config_path), no_env).unwrap();
        assert_eq!(
            config.gateway.token.unwrap().expose(),
            "from-file-0123456789"
        );
        let config = Config::load_with_env(Some(&config_path), |name| {
            (name == TOKEN_ENV).then(|| "from-env-0123456789".to_owned())
        })
        .unwrap();
        assert_eq!(
            config.gateway.token.unwrap().expose(),
            "from-env-0123456789"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn provider_key_comes_from_env_then_api_key_file() {
        let dir = std::env::temp_dir().join(format!("blufio-config-key-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let key_path = dir.join("api_key");
        fs::write(&key_path, "sk-from-file\n").unwrap();
        let config_path = dir.join("blufio.toml");
        fs::write(
            &config_path,
            format!(
                "[agent]\nprovider = \"anthropic\"\napi_key_file = {:?}\n",
                key_path.display().to_string()
            ),
        )
        .unwrap();
        let config = Config::load_with_env(Some(&config_path), no_env).unwrap();
        assert_eq!(config.agent.api_key.unwrap().expose(), "sk-from-file");
        let config = Config::load_with_env(Some(&config_path), |name| {
            (name == ANTHROPIC_KEY_ENV).then(|| "sk-from-env".to_owned())
        })
        .unwrap();
        assert_eq!(
            config.agent.api_key.clone().unwrap().expose(),
            "sk-from-env"
        );
        assert!(!format!("{config:?}").contains("sk-from-env"));
        // The other provider's variable is not read.
        let error = Config::load_with_env(Some(&config_path), |name| {
            (name == OPENAI_KEY_ENV).then(|| "sk-other".to_owned())
        })
        .map(|config| config.agent.api_key.unwrap().expose().to_owned())
        .unwrap();
        assert_eq!(error, "sk-from-file");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_old_lifetime_budget_key_is_refused_with_directions() {
        let config = parse("[agent]\nbudget_usd = 5.0\n").unwrap();
        let message = config.validate("f").unwrap_err().to_string();
        assert!(message.contains("[agent] budget_usd"), "{message}");
        assert!(message.contains("[cost] daily_budget_usd"), "{message}");
    }

    #[test]
    fn cost_prices_parse_per_model() {
        let config = parse(
            "[cost]\ndaily_budget_usd = 2.5\n[cost.models.\"llama3.2\"]\n\
             input_usd_per_mtok = 0.1\noutput_usd_per_mtok = 0.2\n",
        )
        .unwrap();
        config.validate("f").unwrap();
        assert_eq!(config.cost.daily_budget_usd, 2.5);
        assert_eq!(config.cost.price("llama3.2").output_usd_per_mtok, 0.2);
        let message = parse("[cost.models.\"x\"]\ninput_usd_per_mtok = 1\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("output_usd_per_mtok"), "{message}");
    }

    #[test]
    fn example_config_is_valid_and_equals_the_defaults() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/blufio.example.toml"));
        let config = Config::load_with_env(Some(path), no_env).unwrap();
        let defaults = Config::default();
        assert_eq!(
            format!("{:?}", config.daemon),
            format!("{:?}", defaults.daemon)
        );
        assert_eq!(
            format!("{:?}", config.gateway),
            format!("{:?}", defaults.gateway)
        );
        assert_eq!(config.cost.daily_budget_usd, defaults.cost.daily_budget_usd);
    }

    #[test]
    fn thresholds_beyond_four_gib_do_not_overflow_on_32_bit() {
        let config = parse("[daemon]\nmemory_warn_mb = 6144\nmemory_limit_mb = 8192\n").unwrap();
        config.validate("f").unwrap();
        assert_eq!(config.memory_limit_bytes(), 8 * 1024 * 1024 * 1024);
        assert_eq!(config.memory_warn_bytes(), 6 * 1024 * 1024 * 1024);
    }

    #[test]
    fn auto_thresholds_follow_the_cgroup_limit_or_the_defaults() {
        let text = "[daemon]\nmemory_warn_mb = \"auto\"\nmemory_limit_mb = \"auto\"\n";
        let mut config = parse(text).unwrap();
        config.validate("f").unwrap();
        let notes = config.resolve_auto_memory(Some(1 << 30));
        assert_eq!(config.daemon.memory_limit_mb, 768);
        assert_eq!(config.daemon.memory_warn_mb, 614);
        assert_eq!(notes.len(), 2);
        assert!(notes[0].contains("cgroup limit 1024 MiB"), "{notes:?}");
        config.validate("f").unwrap();

        let mut config = parse(text).unwrap();
        config.resolve_auto_memory(None);
        assert_eq!(config.daemon.memory_limit_mb, 200);
        assert_eq!(config.daemon.memory_warn_mb, 150);

        // An explicit limit below the cgroup's 60%: warn goes to 80% of the limit.
        let mut config =
            parse("[daemon]\nmemory_warn_mb = \"auto\"\nmemory_limit_mb = 100\n").unwrap();
        config.resolve_auto_memory(Some(1 << 30));
        assert_eq!(config.daemon.memory_warn_mb, 80);
        config.validate("f").unwrap();
    }

    #[test]
    fn memory_thresholds_reject_other_words() {
        let message = parse("[daemon]\nmemory_limit_mb = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(message.contains("memory_limit_mb"), "{message}");
        assert!(message.contains("auto"), "{message}");
    }

    #[test]
    fn config_show_is_valid_toml_without_secrets() {
        let mut config =
            parse("[gateway]\ntoken = \"hunter2\"\n[daemon]\nbind = \"::\"\n").unwrap();
        config.gateway.token_file = None;
        let text = config.to_toml();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("token = \"<redacted>\""), "{text}");
        assert!(text.contains("# token_file is not set"), "{text}");
        let again = parse(&text).unwrap();
        assert_eq!(again.daemon.bind, "::");
        assert_eq!(format!("{:?}", again.agent), format!("{:?}", config.agent));
    }

    #[test]
    fn default_file_is_the_example_file() {
        let example =
            fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/blufio.example.toml"))
                .unwrap();
        assert_eq!(DEFAULT_FILE, example);
        let config = parse(DEFAULT_FILE).unwrap();
        assert_eq!(
            config.to_toml(),
            Config::default().to_toml(),
            "blufio.example.toml differs from Config::default()"
        );
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = parse("[gateway]\ntoken = \"hunter2\"\n").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blufio-config-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn token_rules_reject_control_characters_whitespace_and_short_tokens() {
        assert!(check_token("0123456789abcdef").is_ok());
        assert!(check_token("~!@#$%^&*()_+-=[]{}|;:,.<>/?0123").is_ok());
        let cases = [
            ("", "is empty"),
            ("short", "is 5 bytes long; use at least 16"),
            ("0123456789\0abcdef", "contains a NUL byte at byte 10"),
            ("0123456789\nabcdef", "contains a line break at byte 10"),
            ("0123456789 abcdef", "contains whitespace at byte 10"),
            (" 0123456789abcdef", "contains whitespace at byte 0"),
            (
                "0123456789\x1babcdef",
                "contains a control character at byte 10",
            ),
            (
                "0123456789\u{e9}abcdef",
                "contains a non-ASCII character at byte 10",
            ),
        ];
        for (token, expected) in cases {
            let problem = check_token(token).unwrap_err();
            assert!(problem.starts_with(expected), "{token:?}: {problem}");
        }
    }

    #[test]
    fn token_errors_name_their_source_and_never_the_token() {
        let config = parse("[gateway]\ntoken = \"tiny-secret\"\n").unwrap();
        let message = config.validate("blufio.toml").unwrap_err().to_string();
        assert!(
            message.starts_with("blufio.toml: [gateway] token: the token is 11 bytes long"),
            "{message}"
        );
        assert!(!message.contains("tiny-secret"), "{message}");

        let error = Config::load_with_env(None, |name| {
            (name == TOKEN_ENV).then(|| "multi\nline-secret-value".to_owned())
        })
        .unwrap_err();
        let message = error.to_string();
        assert!(error.is_config());
        assert!(
            message
                .starts_with("environment: BLUFIO_GATEWAY_TOKEN: the token contains a line break"),
            "{message}"
        );
        assert!(!message.contains("secret"), "{message}");
    }

    #[test]
    fn token_file_is_relative_to_the_config_and_loses_one_trailing_newline() {
        let dir = temp_dir("relative");
        fs::write(dir.join("token"), "relative-token-0123456789\r\n").unwrap();
        let config_path = dir.join("blufio.toml");
        fs::write(&config_path, "[gateway]\ntoken_file = \"token\"\n").unwrap();
        let config = Config::load_with_env(Some(&config_path), no_env).unwrap();
        assert_eq!(
            config.gateway.token.unwrap().expose(),
            "relative-token-0123456789"
        );
        assert_eq!(config.gateway.token_file, Some(dir.join("token")));

        // A second newline is not "the" trailing newline: the token would never match.
        fs::write(dir.join("token"), "relative-token-0123456789\n\n").unwrap();
        let message = Config::load_with_env(Some(&config_path), no_env)
            .unwrap_err()
            .to_string();
        let expected = format!(
            "[gateway] token_file: the token in {} contains a line break at byte 25",
            dir.join("token").display()
        );
        assert!(message.contains(&expected), "{message}");
        assert!(!message.contains("relative-token"), "{message}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unreadable_token_file_is_named_as_a_token_file() {
        let dir = temp_dir("unreadable");
        let config_path = dir.join("blufio.toml");
        fs::write(&config_path, "[gateway]\ntoken_file = \"missing\"\n").unwrap();
        let error = Config::load_with_env(Some(&config_path), no_env).unwrap_err();
        assert!(error.is_config());
        assert_eq!(
            error.to_string(),
            format!("cannot read token file {}", dir.join("missing").display())
        );
        assert!(std::error::Error::source(&error).is_some());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn devices_and_files_past_one_mib_are_refused_without_reading_them_whole() {
        let error = Config::load_with_env(Some(Path::new("/dev/zero")), no_env).unwrap_err();
        assert!(error.is_config());
        let cause = std::error::Error::source(&error).unwrap().to_string();
        assert!(cause.contains("not a regular file"), "{cause}");

        let dir = temp_dir("big-token");
        let token_path = dir.join("token");
        fs::write(&token_path, vec![b'a'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let config_path = dir.join("blufio.toml");
        fs::write(&config_path, "[gateway]\ntoken_file = \"token\"\n").unwrap();
        let error = Config::load_with_env(Some(&config_path), no_env).unwrap_err();
        assert!(
            error.to_string().starts_with("cannot read token file"),
            "{error}"
        );
        let cause = std::error::Error::source(&error).unwrap().to_string();
        assert!(cause.contains("larger than"), "{cause}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
