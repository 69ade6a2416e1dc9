//! The configuration: TOML file, environment and built-in defaults.
//!
//! This is the only file that reads environment variables or configuration files. Every
//! section rejects unknown keys and every field has a default, so `blufio` runs with no file
//! at all. Parse errors name the file, line, column and key; validation errors name the key.

use std::{
    fmt, fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::error::Error;

/// Environment variable that overrides the gateway bearer token.
pub const TOKEN_ENV: &str = "BLUFIO_GATEWAY_TOKEN";
/// Environment variable that overrides the log filter.
pub const LOG_ENV: &str = "BLUFIO_LOG";

/// The whole configuration, as loaded and validated.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[daemon]`: listeners, memory thresholds, monitor and shutdown.
    pub daemon: DaemonConfig,
    /// `[gateway]`: the authenticated API and its bounds.
    pub gateway: GatewayConfig,
    /// `[prometheus]`: the `/metrics` endpoint.
    pub prometheus: PrometheusConfig,
    /// `[agent]`: spending limits for the agent behind `/v1/messages`.
    pub agent: AgentConfig,
    /// Whether port 0 (an ephemeral port) is allowed; only tests and embedding hosts set it.
    #[serde(skip)]
    pub allow_ephemeral_ports: bool,
    /// Serve probes and gateway on two listeners even when both ports are 0 (ephemeral); for
    /// tests and embedding hosts.
    #[serde(skip)]
    pub separate_listeners: bool,
}

/// `[daemon]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// IP address every listener binds to.
    pub bind: String,
    /// Port serving `/health` and `/metrics` (and everything, when equal to the gateway port).
    pub health_port: u16,
    /// Heap size above which blufio is under memory pressure, in MiB.
    pub memory_warn_mb: u64,
    /// Heap size above which new sessions are refused, in MiB.
    pub memory_limit_mb: u64,
    /// Seconds between memory samples.
    pub monitor_interval_secs: u64,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds a client gets to send a request head or body before it is disconnected.
    pub request_timeout_secs: u64,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`); `BLUFIO_LOG` overrides it.
    pub log_level: String,
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
        }
    }
}

/// `[gateway]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Port serving the `/v1` API and `/ws`.
    pub port: u16,
    /// Bearer token, inline. Prefer `token_file` or `BLUFIO_GATEWAY_TOKEN`.
    pub token: Option<Secret>,
    /// File holding the bearer token (surrounding whitespace is ignored).
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
        }
    }
}

/// `[prometheus]` settings.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Which built-in agent answers messages: `none` or `echo`.
    pub provider: Provider,
    /// Money the agent may spend over the daemon's lifetime, in US dollars; 0 means no limit.
    pub budget_usd: f64,
    /// Seconds the agent gets to answer before the client gets 504.
    pub timeout_secs: u64,
    /// Milliseconds the echo agent waits before it answers (at most 60000). For testing: it
    /// keeps requests in flight, e.g. to check that shutdown completes them.
    pub echo_delay_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            provider: Provider::None,
            budget_usd: 10.0,
            timeout_secs: 120,
            echo_delay_ms: 0,
        }
    }
}

/// The built-in agents the binary can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// No agent: `/v1/messages` answers 503 `no_agent`; sessions still work.
    None,
    /// Replies with the message itself (for checking the gateway path).
    Echo,
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

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"<redacted>\")")
    }
}

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
                let text = fs::read_to_string(path).map_err(|source| Error::ConfigRead {
                    path: path.to_owned(),
                    source,
                })?;
                (Config::parse(&text, path)?, path.display().to_string())
            }
            None => (Config::default(), DEFAULTS_ORIGIN.to_owned()),
        };
        config.resolve_token(&origin, env(TOKEN_ENV))?;
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
        std::env::var(LOG_ENV).unwrap_or_else(|_| self.daemon.log_level.clone())
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

    fn resolve_token(&mut self, origin: &str, from_env: Option<String>) -> Result<(), Error> {
        if let Some(token) = from_env.filter(|token| !token.trim().is_empty()) {
            self.gateway.token = Some(Secret(token.trim().to_owned()));
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
            let text = fs::read_to_string(path).map_err(|source| Error::ConfigRead {
                path: path.clone(),
                source,
            })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(invalid(
                    origin,
                    "[gateway] token_file",
                    &format!("{} is empty", path.display()),
                ));
            }
            self.gateway.token = Some(Secret(token.to_owned()));
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
        if daemon.memory_warn_mb >= daemon.memory_limit_mb {
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
        ];
        if let Some((key, _)) = positive.iter().find(|(_, value)| *value == 0) {
            return Err(invalid(origin, key, "must be greater than 0"));
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
        if !(self.agent.budget_usd.is_finite() && self.agent.budget_usd >= 0.0) {
            return Err(invalid(
                origin,
                "[agent] budget_usd",
                "must be a number >= 0",
            ));
        }
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
            && token.expose().trim().is_empty()
        {
            return Err(invalid(origin, "[gateway] token", "must not be empty"));
        }
        Ok(())
    }
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
             token = \"s3cret\"\n[prometheus]\nenabled = false\n",
        )
        .unwrap();
        config.validate("test").unwrap();
        assert_eq!(config.daemon.memory_warn_mb, 300);
        assert_eq!(config.memory_limit_bytes(), 400 * 1024 * 1024);
        assert_eq!(config.health_addr().unwrap().to_string(), "0.0.0.0:9100");
        assert_eq!(config.gateway_addr().unwrap().port(), 8080);
        assert!(!config.single_listener());
        assert!(!config.prometheus.enabled);
        assert_eq!(config.gateway.token.unwrap().expose(), "s3cret");
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
        fs::write(&token_path, "from-file\n").unwrap();
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
        assert_eq!(config.gateway.token.unwrap().expose(), "from-file");
        let config = Config::load_with_env(Some(&config_path), |name| {
            (name == TOKEN_ENV).then(|| "from-env".to_owned())
        })
        .unwrap();
        assert_eq!(config.gateway.token.unwrap().expose(), "from-env");
        fs::remove_dir_all(&dir).unwrap();
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
        assert_eq!(config.agent.budget_usd, defaults.agent.budget_usd);
    }

    #[test]
    fn thresholds_beyond_four_gib_do_not_overflow_on_32_bit() {
        let config = parse("[daemon]\nmemory_warn_mb = 6144\nmemory_limit_mb = 8192\n").unwrap();
        config.validate("f").unwrap();
        assert_eq!(config.memory_limit_bytes(), 8 * 1024 * 1024 * 1024);
        assert_eq!(config.memory_warn_bytes(), 6 * 1024 * 1024 * 1024);
    }

    #[test]
    fn secrets_are_not_printed() {
        let config = parse("[gateway]\ntoken = \"hunter2\"\n").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
