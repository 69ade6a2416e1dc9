//! Reloading the configuration without a restart (SIGHUP, `systemctl reload`).
//!
//! The configuration file and the token file are read again, on a thread of their own and
//! within a time bound, and validated in full; an invalid or unreadable file is refused with
//! the same message as at start-up and the running configuration stays. The old and new
//! configurations are compared key by key as serialized values, so every changed key is
//! named: the settings of [`Live`] (the gateway token, memory thresholds, session limits, the
//! agent timeout, the log level and the daily budget) are swapped in one step, without
//! dropping a connection or a session; every other key is reported as needing a restart and
//! keeps the value the daemon started with (`Context::config`, never changed). The log
//! level is the `log` facade's maximum level, the one process-wide setting here: a host
//! embedding several daemons shares it.

use std::{collections::BTreeMap, fmt, path::Path, time::Duration};

use serde_json::Value;

use crate::{
    config::{self, Config},
    context::Context,
    error::Error,
    live::Live,
    logging,
};

/// How long reading and validating the files may take before the reload is refused. A
/// regular file on a local disk takes microseconds; this bounds a hung network mount.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What a reload changed and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys whose new value took effect.
    pub changed: Vec<String>,
    /// Keys whose new value needs a restart; the running value is kept.
    pub needs_restart: Vec<String>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changed.is_empty() && self.needs_restart.is_empty() {
            return f.write_str("nothing changed");
        }
        if self.changed.is_empty() {
            f.write_str("nothing applied")?;
        } else {
            write!(f, "changed {}", self.changed.join(", "))?;
        }
        if !self.needs_restart.is_empty() {
            write!(
                f,
                "; needs restart (running value kept): {}",
                self.needs_restart.join(", ")
            )?;
        }
        Ok(())
    }
}

/// Re-reads the configuration file the daemon started from and applies what can change live,
/// telling the service manager `RELOADING=1` before and `READY=1` after.
///
/// The files are read on a thread of their own, within [`LOAD_TIMEOUT`], so a file that
/// stalls never stalls the executor (and with it `/health`, the gateway and every
/// WebSocket). Every refused reload is logged as an error, never rate-limited.
///
/// # Errors
///
/// Returns the configuration error when the new file is invalid or cannot be read in
/// time; nothing changes then.
pub async fn reload(ctx: &Context) -> Result<ReloadReport, Error> {
    ctx.notifier.reloading();
    let origin = ctx
        .config_path()
        .map_or("built-in defaults".to_owned(), |path| {
            path.display().to_string()
        });
    let outcome = match load_off_executor(ctx.config_path()).await {
        Ok(new) => {
            let report = apply(ctx, new);
            log::info!("reloaded {origin}: {report}");
            if !report.needs_restart.is_empty() {
                log::warn!(
                    target: logging::ALWAYS_TARGET,
                    "reload: changed but needs a restart (running value kept): {}",
                    report.needs_restart.join(", ")
                );
            }
            Ok(report)
        }
        Err(error) => {
            log::error!(
                target: logging::ALWAYS_TARGET,
                "reload refused, the running configuration stays: {}",
                chain(&error)
            );
            Err(error)
        }
    };
    ctx.notifier.ready(&ctx.status_line());
    outcome
}

/// Loads the configuration on a thread of its own and waits for it without blocking.
async fn load_off_executor(path: Option<&Path>) -> Result<Config, Error> {
    use futures_lite::FutureExt;

    let (sender, receiver) = async_channel::bounded(1);
    let owned = path.map(Path::to_path_buf);
    let spawned = std::thread::Builder::new()
        .name("blufio-reload".to_owned())
        .spawn(move || {
            let _ = sender.try_send(Config::load(owned.as_deref()));
        });
    let named = |source: std::io::Error| Error::ConfigRead {
        path: path.map_or_else(|| "built-in defaults".into(), Path::to_path_buf),
        source,
    };
    if let Err(source) = spawned {
        return Err(named(source));
    }
    async {
        receiver
            .recv()
            .await
            .unwrap_or_else(|_| Err(named(std::io::Error::other("the reading thread failed"))))
    }
    .or(async {
        async_io::Timer::after(LOAD_TIMEOUT).await;
        Err(named(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "reading took longer than {} s (a hung mount?)",
                LOAD_TIMEOUT.as_secs()
            ),
        )))
    })
    .await
}

/// Returns the error and its causes on one line, as `main` prints them.
fn chain(error: &Error) -> String {
    let mut line = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line
}

/// Applies `new` over the running configuration: names every changed key, swaps in the live
/// settings and keeps the started value of the rest.
fn apply(ctx: &Context, mut new: Config) -> ReloadReport {
    // Flags a test or embedding host set in code are not in any file.
    new.allow_ephemeral_ports = ctx.config.allow_ephemeral_ports;
    new.separate_listeners = ctx.config.separate_listeners;
    for note in new.resolve_auto_memory(ctx.cgroup.limit_bytes()) {
        log::info!("{note}");
    }
    let report = compare(&ctx.config, &ctx.live(), &new);
    let live = Live::from_config(&new);
    if config::log_env_override().is_none()
        && let Some(level) = config::level_filter(&live.log_level)
    {
        log::set_max_level(level);
    }
    ctx.set_live(live);
    // The remaining-budget gauge follows a new limit at once, not at the next message.
    ctx.budget
        .refresh(ctx.live().daily_budget_usd, std::time::SystemTime::now());
    report
}

/// Names every key `new` changes: the live ones against the `running` live settings, every
/// other one (needing a restart) against the configuration the daemon `started` with.
fn compare(started: &Config, running: &Live, new: &Config) -> ReloadReport {
    ReloadReport {
        changed: running.changed_keys(&Live::from_config(new)),
        needs_restart: changed_keys(started, new)
            .into_iter()
            .filter(|key| !Live::KEYS.contains(&key.as_str()))
            .collect(),
    }
}

/// Returns every key whose value differs, found by comparing the two configurations as
/// serialized values key by key, so a key added to `Config` later cannot be silently
/// ignored. Secrets serialize redacted (and the API key not at all), so they are compared
/// apart, by value, and named without it.
fn changed_keys(running: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let (before, after) = (leaves(running), leaves(new));
    for key in before
        .keys()
        .chain(after.keys().filter(|k| !before.contains_key(*k)))
    {
        if before.get(key) != after.get(key) {
            keys.push(key.clone());
        }
    }
    if running.gateway.token != new.gateway.token && !keys.iter().any(|k| k == "[gateway] token") {
        keys.push("[gateway] token".to_owned());
    }
    if running.agent.api_key != new.agent.api_key {
        keys.push("[agent] api_key (from api_key_file or the environment)".to_owned());
    }
    // Each provider's key by value: a rotated key file is a change even when the path is not.
    let names = running
        .providers
        .keys()
        .chain(new.providers.keys())
        .map(|name| name.get_ref())
        .collect::<std::collections::BTreeSet<_>>();
    for name in names {
        let key = |config: &Config| {
            config
                .providers
                .get(name.as_str())
                .and_then(|provider| provider.api_key.clone())
        };
        if key(running) != key(new) {
            keys.push(format!(
                "[providers.{name}] api_key (from api_key_file or the environment)"
            ));
        }
    }
    keys
}

/// Flattens a configuration into `[section] key` → value; nested tables (such as
/// `[cost.models."name"]`) become dotted keys.
fn leaves(config: &Config) -> BTreeMap<String, Value> {
    fn walk(section: &str, path: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(fields) if !fields.is_empty() => {
                for (key, value) in fields {
                    let quoted = if key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        key.clone()
                    } else {
                        format!("{key:?}")
                    };
                    let path = if path.is_empty() {
                        quoted
                    } else {
                        format!("{path}.{quoted}")
                    };
                    walk(section, &path, value, out);
                }
            }
            _ => {
                out.insert(format!("[{section}] {path}"), value.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    if let Ok(Value::Object(sections)) = serde_json::to_value(config) {
        for (section, fields) in &sections {
            if let Value::Object(fields) = fields {
                for (key, value) in fields {
                    walk(section, key, value, &mut out);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn report_says_what_changed_and_what_needs_a_restart() {
        let report = ReloadReport {
            changed: vec!["[gateway] token".to_owned()],
            needs_restart: vec!["[gateway] port".to_owned()],
        };
        assert_eq!(
            report.to_string(),
            "changed [gateway] token; needs restart (running value kept): [gateway] port"
        );
        assert_eq!(ReloadReport::default().to_string(), "nothing changed");
    }

    #[test]
    fn every_changed_key_is_named_as_applied_or_needing_a_restart() {
        let running = Config::default();
        let mut new = Config::default();
        new.cost.daily_budget_usd = 7.5;
        new.agent.model = Some("other-model".to_owned());
        new.agent.system = Some("be brief".to_owned());
        new.daemon.max_connections = 10;
        new.cost.models.insert(
            "llama3.2".to_owned(),
            crate::cost::ModelPrice {
                input_usd_per_mtok: 1.0,
                output_usd_per_mtok: 2.0,
            },
        );
        new.gateway.token = Some(Secret::new("a-new-token-0123456789"));
        new.agent.api_key = Some(Secret::new("sk-new"));
        let provider = |key: &str| crate::config::ProviderConfig {
            kind: crate::config::ProviderKind::Anthropic,
            base_url: None,
            api_key_file: Some("/etc/blufio/claude.key".into()),
            api_key_env: None,
            ca_file: None,
            timeout_secs: None,
            api_key: Some(Secret::new(key)),
        };
        let name = || crate::config::Spanned::new(0..0, "claude".to_owned());
        let mut running = running;
        running.providers.insert(name(), provider("sk-ant-old"));
        new.providers.insert(name(), provider("sk-ant-rotated"));
        let report = compare(&running, &Live::from_config(&running), &new);
        assert_eq!(
            report.changed,
            ["[cost] daily_budget_usd", "[gateway] token"],
            "{report}"
        );
        for key in [
            "[agent] model",
            "[agent] system",
            "[daemon] max_connections",
            "[cost] models.\"llama3.2\".input_usd_per_mtok",
            "[cost] models.\"llama3.2\".output_usd_per_mtok",
            "[agent] api_key (from api_key_file or the environment)",
            "[providers.claude] api_key (from api_key_file or the environment)",
        ] {
            assert!(
                report.needs_restart.iter().any(|k| k == key),
                "{key}: {report}"
            );
        }
        let text = report.to_string();
        assert!(
            !text.contains("a-new-token") && !text.contains("sk-new") && !text.contains("sk-ant"),
            "{text}"
        );
    }

    #[test]
    fn the_live_keys_are_exactly_the_ones_applied() {
        let running = Config::default();
        let mut new = Config::default();
        new.gateway.token = Some(Secret::new("a-new-token-0123456789"));
        new.gateway.token_file = Some("/etc/blufio/token".into());
        new.daemon.memory_warn_mb = 1;
        new.daemon.memory_limit_mb = 2;
        new.daemon.log_level = "debug".to_owned();
        new.gateway.max_sessions = 3;
        new.gateway.session_idle_timeout_secs = 4;
        new.gateway.max_history_messages = 5;
        new.gateway.max_history_bytes = 6;
        new.agent.timeout_secs = 7;
        new.cost.daily_budget_usd = 8.0;
        new.gateway.auth_failure_limit = 9;
        let changed = changed_keys(&running, &new);
        let mut sorted = changed.clone();
        sorted.sort();
        let mut expected: Vec<String> = Live::KEYS.iter().map(|key| (*key).to_owned()).collect();
        expected.sort();
        assert_eq!(
            sorted, expected,
            "a live key without a test value, or the reverse"
        );
        let applied = Live::from_config(&new);
        let mut carried = Live::from_config(&running).changed_keys(&applied);
        carried.sort();
        assert_eq!(carried, expected, "Live::from_config misses a key");
        let again = compare(&running, &applied, &new);
        assert!(
            again.changed.is_empty() && again.needs_restart.is_empty(),
            "applying misses {again}"
        );
    }
}
