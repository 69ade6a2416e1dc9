//! Command-line parsing and the subcommands (`serve`, `status`, `health`, `config`).
//!
//! Parsing uses `lexopt` (tiny, no proc macros). `status` and `health` use `blufio::client`,
//! a bounded HTTP/1.1 client over `std::net`: no runtime, a timeout and a size cap.

use std::{
    ffi::OsString,
    io::IsTerminal,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use blufio::{
    Config, Context, Error,
    agent::{DelayedEchoAgent, EchoAgent},
    client::{self, ProbeError},
    config::Provider,
    logging::RedactingLogger,
};
use serde_json::Value;

pub const USAGE: &str = "\
usage: blufio [serve] [--config PATH]
       blufio status [--config PATH] [--json] [--timeout SECS]
       blufio health [--config PATH] [--url URL] [--timeout SECS]
       blufio config show|default|check [--config PATH]
       blufio check-config [--config PATH]
       blufio --version | --help

Commands:
  serve           run the daemon in the foreground (the default)
  status          show the daemon configured in PATH; exit 0 healthy, 1 degraded or a bad
                  answer, 3 not running, 4 gateway token refused
  health          probe /health once (exit 0 when it answers 200); for Docker HEALTHCHECK
  config show     print the effective configuration as TOML, secrets redacted
  config default  print the commented default configuration file
  config check    validate the configuration and exit (also: check-config)

Options:
  -c, --config PATH   TOML configuration file (default: built-in defaults)
      --json          status: print the machine-readable document
      --url URL       health: probe this http:// URL instead of the configured /health
      --timeout SECS  status and health: give up after SECS seconds (default 5)

Environment:
  BLUFIO_GATEWAY_TOKEN   gateway bearer token (overrides the config)
  BLUFIO_LOG             log level: error, warn, info, debug, trace";

pub enum Command {
    Serve(Option<PathBuf>),
    Status {
        config: Option<PathBuf>,
        json: bool,
        timeout: Duration,
    },
    Health {
        config: Option<PathBuf>,
        url: Option<String>,
        timeout: Duration,
    },
    CheckConfig(Option<PathBuf>),
    ConfigShow(Option<PathBuf>),
    ConfigDefault,
    Help,
    Version,
}

/// Exit status of `status` when nothing listens (as `systemctl status` uses it).
const EXIT_NOT_RUNNING: u8 = 3;
/// Exit status of `status` when the daemon refuses the configured gateway token.
const EXIT_TOKEN_REFUSED: u8 = 4;

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_iter(args);
    let mut words: Vec<String> = Vec::new();
    let mut config = None;
    let mut json = false;
    let mut url = None;
    let mut timeout = Duration::from_secs(5);
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('c') | Long("config") => {
                config = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
            }
            Long("json") => json = true,
            Long("url") => {
                url = Some(
                    parser
                        .value()
                        .map_err(|e| e.to_string())?
                        .into_string()
                        .map_err(|value| format!("--url {value:?} is not UTF-8"))?,
                );
            }
            Long("timeout") => {
                let value = parser.value().map_err(|e| e.to_string())?;
                let seconds = value
                    .to_str()
                    .and_then(|text| text.parse::<f64>().ok())
                    .filter(|seconds| seconds.is_finite() && *seconds > 0.0 && *seconds <= 3600.0)
                    .ok_or_else(|| {
                        format!("--timeout {value:?}: expected seconds between 0 and 3600")
                    })?;
                timeout = Duration::from_secs_f64(seconds);
            }
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Value(value) if words.len() < 2 => {
                words.push(
                    value
                        .into_string()
                        .map_err(|value| format!("unknown command {value:?}"))?,
                );
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    let command = match words.as_slice() {
        [] | ["serve"] => Command::Serve(config),
        ["status"] => Command::Status {
            config,
            json,
            timeout,
        },
        ["health"] => Command::Health {
            config,
            url: url.clone(),
            timeout,
        },
        ["check-config"] | ["config", "check"] => Command::CheckConfig(config),
        ["config", "show"] => Command::ConfigShow(config),
        ["config", "default"] => Command::ConfigDefault,
        ["config"] => return Err("config needs show, default or check".to_owned()),
        other => return Err(format!("unknown command {:?}", other.join(" "))),
    };
    if json && !matches!(command, Command::Status { .. }) {
        return Err("--json applies only to status".to_owned());
    }
    if url.is_some() && !matches!(command, Command::Health { .. }) {
        return Err("--url applies only to health".to_owned());
    }
    Ok(command)
}

pub fn execute(command: Command) -> Result<ExitCode, Error> {
    match command {
        Command::Help => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("blufio {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig(path) => {
            let config = Config::load(path.as_deref())?;
            // The state files are read as start-up reads them: a corrupt spend file fails
            // here, not at the next restart.
            let state = match &config.daemon.state_dir {
                Some(dir) => blufio::budget::check_state_dir(dir, std::time::SystemTime::now())?,
                None => "state: no [daemon] state_dir (today's spend is kept in memory)".to_owned(),
            };
            let origin = path.map_or("built-in defaults".to_owned(), |p| p.display().to_string());
            println!("{origin}: ok");
            println!(
                "listening on {} (health, metrics){}",
                config.health_addr()?,
                if config.single_listener() {
                    " and gateway".to_owned()
                } else {
                    format!(", {} (gateway)", config.gateway_addr()?)
                }
            );
            let mb = |value: u64| {
                if value == blufio::config::AUTO_MB {
                    "auto".to_owned()
                } else {
                    format!("{value} MiB")
                }
            };
            println!(
                "memory: warn {}, limit {}; gateway token {}",
                mb(config.daemon.memory_warn_mb),
                mb(config.daemon.memory_limit_mb),
                if config.gateway.token.is_some() {
                    "set"
                } else {
                    "NOT set"
                }
            );
            println!("{state}");
            if config.daemon.max_connections > 0 {
                let plan = blufio::fd_limit::check(config.daemon.max_connections);
                if let Some(soft) = plan.raise_soft_to {
                    println!(
                        "connections: max_connections {} (the open-file soft limit is raised \
                         to {soft} at start)",
                        config.daemon.max_connections
                    );
                }
                if let Some(warning) = plan.warning {
                    eprintln!("blufio: warning: {warning}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(path) => {
            let config = Config::load(path.as_deref())?;
            // The logger redacts both credentials wherever they would appear.
            let secrets = config
                .gateway
                .token
                .iter()
                .chain(config.agent.api_key.iter())
                .map(|secret| secret.expose().to_owned())
                .collect();
            let logger = init_logger(&config, secrets);
            let builder = match config.agent.provider {
                Provider::None => Context::builder(config),
                Provider::Echo if config.agent.echo_delay_ms > 0 => {
                    let delay = Duration::from_millis(config.agent.echo_delay_ms);
                    Context::builder(config).with_agent(DelayedEchoAgent::new(delay))
                }
                Provider::Echo => Context::builder(config).with_agent(EchoAgent),
                // The context builds the provider agent from the configuration.
                Provider::Anthropic | Provider::OpenAi => Context::builder(config),
            };
            let builder = builder
                .with_notify(Config::notify_settings())
                .with_config_path(path);
            let outcome = blufio::run(builder.build()?);
            // Writes the counts of repeated errors still held back.
            logger.finish();
            // A second signal asked to exit without draining.
            match outcome? {
                blufio::Stopped::Forced => Ok(ExitCode::from(1)),
                blufio::Stopped::Drained | blufio::Stopped::GraceExpired => Ok(ExitCode::SUCCESS),
            }
        }
        Command::Status {
            config,
            json,
            timeout,
        } => status(&Config::load(config.as_deref())?, json, timeout),
        Command::Health {
            config,
            url,
            timeout,
        } => health(config, url, timeout),
        Command::ConfigShow(path) => {
            let mut config = Config::load(path.as_deref())?;
            let cgroup_limit = blufio_platform::CgroupReader::new()
                .and_then(|reader| reader.read().ok())
                .and_then(|memory| memory.limit_bytes);
            config.resolve_auto_memory(cgroup_limit);
            print!("{}", config.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::ConfigDefault => {
            print!("{}", blufio::config::DEFAULT_FILE);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The one process-wide hook blufio installs: a logger writing to stderr, behind the wrapper
/// that redacts `secrets` and credentials and rate-limits repeated errors.
///
/// Without `BLUFIO_LOG` the logger itself passes every level and `log::set_max_level` does
/// the filtering, so a reload can raise or lower `[daemon] log_level` live.
fn init_logger(
    config: &Config,
    secrets: Vec<String>,
) -> &'static RedactingLogger<env_logger::Logger> {
    let mut builder = env_logger::Builder::new();
    builder
        .format_timestamp(None)
        .target(env_logger::Target::Stderr);
    if blufio::config::journal_stream()
        .is_some_and(|stream| blufio_platform::stderr_is_journal(&stream))
    {
        // The journal reads a syslog priority from each line's `<N>` prefix, so
        // `journalctl -p warning` works; it adds its own timestamps.
        builder.format(|out, record| {
            use std::io::Write;
            writeln!(
                out,
                "<{}>{}: {}",
                syslog_priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    let level = match blufio::config::log_env_override() {
        Some(filter) => {
            builder.parse_filters(&filter);
            None
        }
        None => {
            builder.filter_level(log::LevelFilter::Trace);
            Some(
                blufio::config::level_filter(&config.daemon.log_level)
                    .unwrap_or(log::LevelFilter::Info),
            )
        }
    };
    // trillium-client traces whole request heads, API keys included; its connection module
    // logs nothing else worth a secret in the log.
    builder.filter_module("trillium_client::conn", log::LevelFilter::Off);
    let inner = builder.build();
    let max_level = level.unwrap_or_else(|| inner.filter());
    // Leaked like `log::set_boxed_logger` would, keeping a handle for `finish` at exit.
    let logger: &'static RedactingLogger<_> =
        Box::leak(Box::new(RedactingLogger::new(inner, secrets)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max_level);
    }
    logger
}

/// Returns the syslog priority the journal files a record under.
fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}

/// Returns `addr` with an unspecified IP (`0.0.0.0`, `::`) replaced by loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// A failed probe: the exit status and the one line that explains it.
type Failure = (u8, String);

fn probe(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<client::Reply, Failure> {
    client::get(addr, path, token, timeout).map_err(|error| match error {
        ProbeError::Unreachable(_) => (
            EXIT_NOT_RUNNING,
            format!("blufio is not running at http://{addr} ({error})"),
        ),
        _ => (1, format!("http://{addr}{path}: {error}")),
    })
}

/// Fetches `/v1/health` with the configured token, or `/health` without one (or when the
/// daemon has no token itself). Returns whether the answer is the detailed one.
fn fetch(config: &Config, timeout: Duration) -> Result<(bool, SocketAddr, Value), Failure> {
    let health_addr = loopback(config.health_addr().map_err(|e| (1, e.to_string()))?);
    let gateway_addr = loopback(config.gateway_addr().map_err(|e| (1, e.to_string()))?);
    if let Some(token) = config.gateway.token.as_ref() {
        let reply = probe(gateway_addr, "/v1/health", Some(token.expose()), timeout)?;
        if reply.status == 401 {
            return Err((
                EXIT_TOKEN_REFUSED,
                format!(
                    "http://{gateway_addr} refused the configured gateway token (401); \
                     check [gateway] token_file or BLUFIO_GATEWAY_TOKEN"
                ),
            ));
        }
        if reply.status == 200 {
            return parse_health(gateway_addr, &reply).map(|body| (true, gateway_addr, body));
        }
    }
    let reply = probe(health_addr, "/health", None, timeout)?;
    if reply.status != 200 {
        return Err((
            1,
            format!("http://{health_addr}/health answered {}", reply.status),
        ));
    }
    parse_health(health_addr, &reply).map(|body| (false, health_addr, body))
}

fn parse_health(addr: SocketAddr, reply: &client::Reply) -> Result<Value, Failure> {
    serde_json::from_str::<Value>(&reply.body)
        .ok()
        .filter(|body| body["status"].is_string())
        .ok_or_else(|| {
            (
                1,
                format!("http://{addr} answered something that is not blufio's health JSON"),
            )
        })
}

/// Prints the daemon's state. Exit status: 0 healthy, 1 degraded or an unusable answer,
/// 3 nothing listening, 4 the gateway token refused; a failure is one line on stderr.
fn status(config: &Config, json: bool, timeout: Duration) -> Result<ExitCode, Error> {
    let (detailed, address, health) = match fetch(config, timeout) {
        Ok(found) => found,
        Err((code, line)) => {
            eprintln!("blufio status: {line}");
            return Ok(ExitCode::from(code));
        }
    };
    let healthy = health["status"] == "healthy";
    if json {
        let mut document = health;
        if let Value::Object(fields) = &mut document {
            fields.insert("detailed".to_owned(), Value::Bool(detailed));
            fields.insert(
                "address".to_owned(),
                Value::String(format!("http://{address}")),
            );
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&document).unwrap_or_default()
        );
    } else {
        let tty = std::io::stdout().is_terminal();
        print!("{}", render_status(&health, address, detailed, tty));
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

/// One memory line: the value, its share of warn and limit, and a bar on a terminal.
fn memory_line(label: &str, value: &Value, thresholds: Option<(u64, u64)>, tty: bool) -> String {
    let Some(bytes) = value.as_u64() else {
        return format!("  {label:<12} n/a\n");
    };
    let mut line = format!("  {label:<12} {:>10}", mib(bytes));
    if let Some((warn, limit)) = thresholds {
        let percent = |of: u64| bytes as f64 * 100.0 / of.max(1) as f64;
        line.push_str(&format!(
            "  {:>3.0}% of warn, {:>3.0}% of limit",
            percent(warn),
            percent(limit)
        ));
        if tty {
            let filled = ((percent(limit) / 5.0).round() as usize).min(20);
            line.push_str(&format!(
                "  [{}{}]",
                "#".repeat(filled),
                "-".repeat(20 - filled)
            ));
        }
    }
    line.push('\n');
    line
}

/// The human view of `blufio status`.
fn render_status(health: &Value, address: SocketAddr, detailed: bool, tty: bool) -> String {
    let mut out = String::new();
    let thresholds = health["memory_warn_bytes"]
        .as_u64()
        .zip(health["memory_limit_bytes"].as_u64());
    let state = health["status"].as_str().unwrap_or("unknown");
    out.push_str(&format!("blufio at http://{address}: {state}\n"));
    if detailed {
        out.push_str(&format!(
            "  version      {} ({})\n",
            text(&health["version"]),
            text(&health["target"])
        ));
    }
    out.push_str(&format!("  uptime       {} s\n", health["uptime_secs"]));
    out.push_str(&memory_line(
        "heap",
        &health["memory_heap_bytes"],
        thresholds,
        tty,
    ));
    if detailed {
        out.push_str(&memory_line(
            "resident",
            &health["memory_resident_bytes"],
            thresholds,
            tty,
        ));
    }
    out.push_str(&memory_line(
        "rss",
        &health["memory_rss_bytes"],
        thresholds,
        tty,
    ));
    if !detailed {
        out.push_str(&format!("  sessions     {}\n", health["active_sessions"]));
        out.push_str(
            "  (thresholds, cgroup, errors and budget need the gateway token in the config)\n",
        );
        return out;
    }
    if let Some((warn, limit)) = thresholds {
        out.push_str(&format!(
            "  thresholds   warn {}, limit {}\n",
            mib(warn),
            mib(limit)
        ));
    }
    let cgroup = match (
        health["memory_cgroup_limit_bytes"].as_u64(),
        health["memory_cgroup_usage_bytes"].as_u64(),
    ) {
        (Some(limit), Some(usage)) => format!(
            "limit {}, usage {} ({:.0}%)",
            mib(limit),
            mib(usage),
            usage as f64 * 100.0 / limit.max(1) as f64
        ),
        (None, Some(usage)) => format!("no limit, usage {}", mib(usage)),
        (Some(limit), None) => format!("limit {}", mib(limit)),
        (None, None) => "none".to_owned(),
    };
    out.push_str(&format!("  cgroup       {cgroup}\n"));
    out.push_str(&format!(
        "  pressure     {}; admission {}; readiness {}\n",
        if health["memory_pressure"] == true {
            "yes"
        } else {
            "no"
        },
        text(&health["admission"]),
        text(&health["ready"])
    ));
    out.push_str(&format!(
        "  sessions     {} of {}\n",
        health["active_sessions"], health["max_sessions"]
    ));
    let errors: Vec<String> = health["errors"]
        .as_object()
        .map(|errors| {
            errors
                .iter()
                .filter(|(_, count)| count.as_u64().unwrap_or(0) > 0)
                .map(|(kind, count)| format!("{kind} {count}"))
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&format!(
        "  errors       {}\n",
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        }
    ));
    let spent = health["budget"]["spent_today_usd"].as_f64().unwrap_or(0.0);
    let budget = health["budget"]["daily_usd"].as_f64().unwrap_or(0.0);
    out.push_str(&if budget > 0.0 {
        format!(
            "  budget       ${} of ${} spent today (UTC)\n",
            usd(spent),
            usd(budget)
        )
    } else {
        format!(
            "  budget       ${} spent today (UTC), no limit\n",
            usd(spent)
        )
    });
    out.push_str(&format!(
        "  allocator    {} (page size {})\n",
        text(&health["allocator"]),
        text(&health["allocator_page_size"])
    ));
    out.push_str(&format!("  agent        {}\n", text(&health["agent"])));
    out.push_str(&upstream_lines(
        &health["upstream"],
        std::time::SystemTime::now(),
    ));
    out
}

/// The provider, its model and its last error, from `/v1/health`'s `upstream`.
fn upstream_lines(upstream: &Value, now: std::time::SystemTime) -> String {
    if !upstream.is_object() {
        return String::new();
    }
    let mut out = format!(
        "  upstream     {}, model {}, API key {}\n",
        text(&upstream["provider"]),
        text(&upstream["model"]),
        text(&upstream["api_key"])
    );
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let ago = |at: &Value| {
        at.as_u64()
            .map(|at| format!("{} s ago", now.saturating_sub(at)))
    };
    let success = ago(&upstream["last_success_at_unix"]);
    match upstream["last_error"].as_str() {
        Some(error) => out.push_str(&format!(
            "  last error   {}: {error}{}\n",
            ago(&upstream["last_error_at_unix"]).unwrap_or_else(|| "at an unknown time".to_owned()),
            success.map_or_else(
                || " (no call has succeeded yet)".to_owned(),
                |success| format!(" (last success {success})")
            )
        )),
        None => out.push_str(&format!(
            "  last error   none{}\n",
            success.map_or_else(String::new, |success| format!(" (last success {success})"))
        )),
    }
    out
}

/// Formats dollars with cents, and with three significant digits below a dollar (down to
/// micro-dollars, the precision of `/v1/health`), so small spends do not show as `0.00`.
fn usd(amount: f64) -> String {
    if !amount.is_finite() || amount <= 0.0 {
        return "0.00".to_owned();
    }
    if amount >= 0.995 {
        return format!("{amount:.2}");
    }
    let magnitude = amount.log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(2, 6) as usize;
    let text = format!("{amount:.decimals$}");
    // Keep cents, drop zeros beyond them: 0.0500 is shown as 0.05.
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let trimmed = fraction.trim_end_matches('0');
    let fraction = if trimmed.len() < 2 {
        fraction.get(..2).unwrap_or(fraction)
    } else {
        trimmed
    };
    format!("{whole}.{fraction}")
}

/// Probes `/health` once: exit 0 when it answers 200, else 1 with one line on stderr.
fn health(
    config: Option<PathBuf>,
    url: Option<String>,
    timeout: Duration,
) -> Result<ExitCode, Error> {
    let (addr, path) = match url {
        Some(url) => match client::parse_url(&url) {
            Ok(target) => target,
            Err(message) => {
                eprintln!("blufio health: {message}");
                return Ok(ExitCode::from(2));
            }
        },
        None => (
            loopback(Config::load(config.as_deref())?.health_addr()?),
            "/health".to_owned(),
        ),
    };
    match client::get(addr, &path, None, timeout) {
        Ok(reply) if reply.status == 200 => {
            let state = serde_json::from_str::<Value>(&reply.body)
                .ok()
                .and_then(|body| body["status"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "ok".to_owned());
            println!("http://{addr}{path}: 200 {state}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(reply) => {
            eprintln!(
                "blufio health: http://{addr}{path} answered {}",
                reply.status
            );
            Ok(ExitCode::from(1))
        }
        Err(error) => {
            eprintln!("blufio health: http://{addr}{path}: {error}");
            Ok(ExitCode::from(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_keep_three_significant_digits_below_one() {
        for (amount, shown) in [
            (0.0, "0.00"),
            (0.000_593_999_999_999_999_9, "0.000594"),
            (0.000_000_4, "0.00"),
            (0.05, "0.05"),
            (0.123_456, "0.123"),
            (0.999, "1.00"),
            (10.0, "10.00"),
            (1234.5678, "1234.57"),
            (f64::NAN, "0.00"),
        ] {
            assert_eq!(usd(amount), shown, "{amount}");
        }
    }
}
