//! Command-line parsing and the subcommands (`serve`, `status`, `health`, `config`,
//! `sessions`).
//!
//! Parsing uses `lexopt` (tiny, no proc macros). `status` and `health` use [`client`], a
//! bounded HTTP/1.1 client over `std::net`: no runtime, a timeout and a size cap.

mod client;
mod logger;
mod probe;
mod sessions;
mod status;

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use blufio::{Config, Context, DelayedEchoAgent, EchoAgent, Error, Provider};

pub const USAGE: &str = "\
usage: blufio [serve] [--config PATH]
       blufio status [--config PATH] [--json] [--timeout SECS]
       blufio health [--config PATH] [--url URL] [--timeout SECS]
       blufio config show|default|check [--config PATH]
       blufio check-config [--config PATH]
       blufio sessions list|show ID|export ID|delete ID [--config PATH] [--json]
       blufio --version | --help

Commands:
  serve           run the daemon in the foreground (the default)
  status          show the daemon configured in PATH; exit 0 healthy, 1 degraded or a bad
                  answer, 3 not running, 4 gateway token refused
  health          probe /health once (exit 0 when it answers 200); for Docker HEALTHCHECK
  config show     print the effective configuration as TOML, secrets redacted
  config default  print the commented default configuration file
  config check    validate the configuration and exit (also: check-config)
  sessions        the session store in [daemon] state_dir: list the sessions, show one
                  with its messages, export one as JSON (for a backup or another tool),
                  or delete one while the daemon is stopped; exit 1 for an unknown id or
                  a running daemon (delete through DELETE /v1/sessions/{id} then)

Options:
  -c, --config PATH   TOML configuration file (default: built-in defaults)
      --json          status, sessions: print JSON
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
    Sessions {
        config: Option<PathBuf>,
        action: sessions::Action,
        json: bool,
    },
    Help,
    Version,
}

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
            Value(value) if words.len() < 3 => {
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
        ["sessions", rest @ ..] => Command::Sessions {
            config,
            action: sessions::Action::parse(rest)?,
            json,
        },
        other => return Err(format!("unknown command {:?}", other.join(" "))),
    };
    if json && !matches!(command, Command::Status { .. } | Command::Sessions { .. }) {
        return Err("--json applies only to status and sessions".to_owned());
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
                Some(dir) if config.store.enabled => {
                    let store = blufio::check_store(dir)?;
                    // The first start with a store imports spend.json: check it as it would.
                    if blufio::spend_imported(dir) {
                        store
                    } else {
                        let spend = blufio::check_state_dir(dir, std::time::SystemTime::now())?;
                        format!("{store}\n{spend} (imported into the store at start)")
                    }
                }
                Some(dir) => blufio::check_state_dir(dir, std::time::SystemTime::now())?,
                None => "state: no [daemon] state_dir (sessions and today's spend are kept in \
                         memory)"
                    .to_owned(),
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
                if value == blufio::AUTO_MB {
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
            print!(
                "{}",
                models_report(&blufio::Routes::new(&config), config.agent.provider)
            );
            if config.daemon.max_connections > 0 {
                let plan = blufio::check_fd_limit(config.daemon.max_connections);
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
            let logger = logger::init_logger(&config, secrets);
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
        } => status::status(&Config::load(config.as_deref())?, json, timeout),
        Command::Health {
            config,
            url,
            timeout,
        } => probe::health(config, url, timeout),
        Command::ConfigShow(path) => {
            let mut config = Config::load(path.as_deref())?;
            let cgroup_limit = blufio_platform::CgroupReader::new()
                .and_then(|reader| reader.read().ok())
                .and_then(|memory| memory.limit_bytes);
            config.resolve_auto_memory(cgroup_limit);
            print!("{}", config.to_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sessions {
            config,
            action,
            json,
        } => sessions::run(config.as_deref(), &action, json),
        Command::ConfigDefault => {
            print!("{}", blufio::DEFAULT_FILE);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `config check`'s lines about the models: each alias, the upstream serving it and the
/// fallbacks tried after it, in order.
fn models_report(routes: &blufio::Routes, agent: blufio::Provider) -> String {
    if routes.is_empty() {
        return format!(
            "models: none ([agent] provider = {:?}, no [providers])\n",
            agent.as_str()
        );
    }
    let mut out = format!(
        "models (default {}):\n",
        routes.default_model().unwrap_or("none")
    );
    for route in routes.iter() {
        let hops: Vec<String> = route
            .chain
            .iter()
            .enumerate()
            .map(|(index, hop)| {
                let upstream = format!("{}/{} ({})", hop.provider, hop.model, hop.kind.as_str());
                if index == 0 {
                    upstream
                } else {
                    format!("then {} = {upstream}", hop.alias)
                }
            })
            .collect();
        out.push_str(&format!("  {}: {}\n", route.alias, hops.join(", ")));
    }
    out
}
