//! Every check of a loaded configuration; an error names the offending key.

use super::{AUTO_MB, Config, MAX_WORKERS, MIN_TOKEN_BYTES};
use crate::error::Error;

impl Config {
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
            ("[gateway] max_request_bytes", gateway.max_request_bytes),
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
        self.agent
            .check_provider()
            .map_err(|(key, message)| invalid(origin, key, &message))?;
        self.check_routing()
            .map_err(|problem| invalid(origin, &problem.key, &problem.message))?;
        super::models::check_provider_keys(self)
            .map_err(|(key, message)| invalid(origin, &key, &message))?;
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
pub(super) fn check_token(token: &str) -> Result<(), String> {
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

pub(super) fn invalid(origin: &str, key: &str, message: &str) -> Error {
    Error::ConfigInvalid {
        origin: origin.to_owned(),
        key: key.to_owned(),
        message: message.to_owned(),
    }
}
