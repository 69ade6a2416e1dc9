//! Reloading the configuration without a restart (SIGHUP, `systemctl reload`).
//!
//! The configuration file and the token file are read again and validated in full; an
//! invalid file is refused with the same file:line:column message as at start-up and the
//! running configuration stays. The gateway token, memory thresholds, session limits, the
//! agent timeout and the log level change live, without dropping a connection or a session.
//! Settings bound to a listener or fixed at start-up are reported as needing a restart and
//! keep their running values. The log level is the `log` facade's maximum level, the one
//! process-wide setting here: a host embedding several daemons shares it.

use std::fmt;

use crate::{
    config::{self, Config},
    context::Context,
    error::Error,
    memory::Thresholds,
    sessions::Limits,
};

/// What a reload changed and what it could not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys that took effect.
    pub changed: Vec<&'static str>,
    /// Keys whose new value needs a restart; the running value is kept.
    pub needs_restart: Vec<&'static str>,
}

impl fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.changed.is_empty() {
            f.write_str("nothing changed")?;
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
/// # Errors
///
/// Returns the configuration error when the new file is invalid; nothing changes then.
pub fn reload(ctx: &Context) -> Result<ReloadReport, Error> {
    ctx.notifier.reloading();
    let origin = ctx
        .config_path()
        .map_or("built-in defaults".to_owned(), |path| {
            path.display().to_string()
        });
    let outcome = match Config::load(ctx.config_path()) {
        Ok(new) => {
            let report = apply(ctx, new);
            log::info!("reloaded {origin}: {report}");
            for key in &report.needs_restart {
                log::warn!("reload: {key} changed; needs restart (running value kept)");
            }
            Ok(report)
        }
        Err(error) => {
            log::error!("reload refused, the running configuration stays: {error}");
            Err(error)
        }
    };
    ctx.notifier.ready(&ctx.status_line());
    outcome
}

/// Applies `new` over the running configuration; pure bookkeeping plus the live setters.
fn apply(ctx: &Context, mut new: Config) -> ReloadReport {
    let running = ctx.live();
    let mut report = ReloadReport::default();
    // Flags a test or embedding host set in code are not in any file.
    new.allow_ephemeral_ports = running.allow_ephemeral_ports;
    new.separate_listeners = running.separate_listeners;
    for note in new.resolve_auto_memory(ctx.cgroup.limit_bytes()) {
        log::info!("{note}");
    }

    let mut keep = |key: &'static str, differs: bool| {
        if differs {
            report.needs_restart.push(key);
        }
    };
    keep("[daemon] bind", new.daemon.bind != running.daemon.bind);
    keep(
        "[daemon] health_port",
        new.daemon.health_port != running.daemon.health_port,
    );
    keep("[gateway] port", new.gateway.port != running.gateway.port);
    keep(
        "[daemon] monitor_interval_secs",
        new.daemon.monitor_interval_secs != running.daemon.monitor_interval_secs,
    );
    keep(
        "[daemon] shutdown_grace_secs",
        new.daemon.shutdown_grace_secs != running.daemon.shutdown_grace_secs,
    );
    keep(
        "[daemon] request_timeout_secs",
        new.daemon.request_timeout_secs != running.daemon.request_timeout_secs,
    );
    keep(
        "[daemon] workers",
        new.daemon.workers != running.daemon.workers,
    );
    keep(
        "[gateway] max_message_bytes",
        new.gateway.max_message_bytes != running.gateway.max_message_bytes,
    );
    keep(
        "[prometheus] enabled",
        new.prometheus.enabled != running.prometheus.enabled,
    );
    keep(
        "[agent] provider",
        new.agent.provider != running.agent.provider,
    );
    keep(
        "[agent] budget_usd",
        new.agent.budget_usd != running.agent.budget_usd,
    );
    new.daemon.bind.clone_from(&running.daemon.bind);
    new.daemon.health_port = running.daemon.health_port;
    new.gateway.port = running.gateway.port;
    new.daemon.monitor_interval_secs = running.daemon.monitor_interval_secs;
    new.daemon.shutdown_grace_secs = running.daemon.shutdown_grace_secs;
    new.daemon.request_timeout_secs = running.daemon.request_timeout_secs;
    new.gateway.max_message_bytes = running.gateway.max_message_bytes;
    new.daemon.workers = running.daemon.workers;
    new.prometheus.enabled = running.prometheus.enabled;
    new.agent.provider = running.agent.provider;
    new.agent.budget_usd = running.agent.budget_usd;

    let mut changed = |key: &'static str, differs: bool| {
        if differs {
            report.changed.push(key);
        }
    };
    changed(
        "[gateway] token",
        new.gateway.token != running.gateway.token,
    );
    changed(
        "[daemon] memory_warn_mb",
        new.daemon.memory_warn_mb != running.daemon.memory_warn_mb,
    );
    changed(
        "[daemon] memory_limit_mb",
        new.daemon.memory_limit_mb != running.daemon.memory_limit_mb,
    );
    changed(
        "[gateway] max_sessions",
        new.gateway.max_sessions != running.gateway.max_sessions,
    );
    changed(
        "[gateway] session_idle_timeout_secs",
        new.gateway.session_idle_timeout_secs != running.gateway.session_idle_timeout_secs,
    );
    changed(
        "[gateway] max_history_messages",
        new.gateway.max_history_messages != running.gateway.max_history_messages,
    );
    changed(
        "[gateway] max_history_bytes",
        new.gateway.max_history_bytes != running.gateway.max_history_bytes,
    );
    changed(
        "[agent] timeout_secs",
        new.agent.timeout_secs != running.agent.timeout_secs,
    );
    changed(
        "[daemon] log_level",
        new.daemon.log_level != running.daemon.log_level,
    );

    ctx.memory.set_thresholds(Thresholds {
        warn_bytes: new.memory_warn_bytes(),
        limit_bytes: new.memory_limit_bytes(),
    });
    ctx.sessions.set_limits(Limits::from_config(&new.gateway));
    if config::log_env_override().is_none()
        && let Some(level) = config::level_filter(&new.daemon.log_level)
    {
        log::set_max_level(level);
    }
    ctx.set_live(new);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_says_what_changed_and_what_needs_a_restart() {
        let report = ReloadReport {
            changed: vec!["[gateway] token"],
            needs_restart: vec!["[gateway] port"],
        };
        assert_eq!(
            report.to_string(),
            "changed [gateway] token; needs restart (running value kept): [gateway] port"
        );
        assert_eq!(ReloadReport::default().to_string(), "nothing changed");
    }
}
