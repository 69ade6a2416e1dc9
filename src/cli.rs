//! Command-line parsing and the subcommands (`serve`, `status`, `check-config`).
//!
//! Parsing uses `lexopt` (tiny, no proc macros). `status` is a plain HTTP/1.1 client over
//! `std::net`: it needs no runtime and works against any blufio listening on loopback.

use std::{
    ffi::OsString,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use blufio::{
    Config, Context, Error,
    agent::{DelayedEchoAgent, EchoAgent},
    config::Provider,
};

pub const USAGE: &str = "\
usage: blufio [serve] [--config PATH]
       blufio status [--config PATH]
       blufio check-config [--config PATH]
       blufio --version | --help

Commands:
  serve          run the daemon in the foreground (the default)
  status         show the health of the daemon configured in PATH
  check-config   validate the configuration and exit

Options:
  -c, --config PATH   TOML configuration file (default: built-in defaults)

Environment:
  BLUFIO_GATEWAY_TOKEN   gateway bearer token (overrides the config)
  BLUFIO_LOG             log level: error, warn, info, debug, trace";

pub enum Command {
    Serve(Option<PathBuf>),
    Status(Option<PathBuf>),
    CheckConfig(Option<PathBuf>),
    Help,
    Version,
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_iter(args);
    let mut subcommand: Option<String> = None;
    let mut config = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Short('c') | Long("config") => {
                config = Some(PathBuf::from(parser.value().map_err(|e| e.to_string())?));
            }
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('V') | Long("version") => return Ok(Command::Version),
            Value(value) if subcommand.is_none() => {
                subcommand = Some(
                    value
                        .into_string()
                        .map_err(|value| format!("unknown command {value:?}"))?,
                );
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    match subcommand.as_deref() {
        None | Some("serve") => Ok(Command::Serve(config)),
        Some("status") => Ok(Command::Status(config)),
        Some("check-config") => Ok(Command::CheckConfig(config)),
        Some(other) => Err(format!("unknown command {other:?}")),
    }
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
            println!(
                "memory: warn {} MiB, limit {} MiB; gateway token {}",
                config.daemon.memory_warn_mb,
                config.daemon.memory_limit_mb,
                if config.gateway.token.is_some() {
                    "set"
                } else {
                    "NOT set"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(path) => {
            let config = Config::load(path.as_deref())?;
            init_logger(&config.log_filter());
            let builder = match config.agent.provider {
                Provider::None => Context::builder(config),
                Provider::Echo if config.agent.echo_delay_ms > 0 => {
                    let delay = Duration::from_millis(config.agent.echo_delay_ms);
                    Context::builder(config).with_agent(DelayedEchoAgent::new(delay))
                }
                Provider::Echo => Context::builder(config).with_agent(EchoAgent),
            };
            blufio::run(builder.build()?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(path) => status(&Config::load(path.as_deref())?),
    }
}

/// The one process-wide hook blufio installs: a logger writing to stderr.
fn init_logger(filter: &str) {
    env_logger::Builder::new()
        .parse_filters(filter)
        .format_timestamp(None)
        .target(env_logger::Target::Stderr)
        .init();
}

/// Prints the daemon's health; exit status 0 when healthy, 1 when degraded or unreachable.
fn status(config: &Config) -> Result<ExitCode, Error> {
    let mut addr = config.health_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let (detailed, body) = match config.gateway.token.as_ref() {
        Some(token) => {
            let mut gateway = config.gateway_addr()?;
            gateway.set_ip(addr.ip());
            match get(gateway, "/v1/health", Some(token.expose())) {
                Ok((200, body)) => (true, body),
                _ => (false, fetch_health(addr)?),
            }
        }
        None => (false, fetch_health(addr)?),
    };
    let health: serde_json::Value = serde_json::from_str(&body).map_err(|e| Error::Io {
        context: format!("http://{addr}/health answered something that is not JSON"),
        source: std::io::Error::other(e),
    })?;
    let mib = |value: &serde_json::Value| {
        value.as_u64().map_or("n/a".to_owned(), |bytes| {
            format!("{:.1} MiB", bytes as f64 / 1048576.0)
        })
    };
    let text = |value: &serde_json::Value| {
        value
            .as_str()
            .map_or_else(|| value.to_string(), str::to_owned)
    };
    let status = health["status"].as_str().unwrap_or("unknown");
    println!("blufio at http://{addr}: {status}");
    println!("  uptime          {} s", health["uptime_secs"]);
    println!("  heap            {}", mib(&health["memory_heap_bytes"]));
    println!("  rss             {}", mib(&health["memory_rss_bytes"]));
    println!("  sessions        {}", health["active_sessions"]);
    if detailed {
        println!(
            "  version         {} ({})",
            text(&health["version"]),
            text(&health["target"])
        );
        println!(
            "  thresholds      warn {}, limit {}",
            mib(&health["memory_warn_bytes"]),
            mib(&health["memory_limit_bytes"])
        );
        println!("  admission       {}", text(&health["admission"]));
        println!(
            "  allocator       {} (page size {})",
            text(&health["allocator"]),
            text(&health["allocator_page_size"])
        );
        println!("  agent           {}", text(&health["agent"]));
    }
    Ok(if status == "healthy" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn fetch_health(addr: SocketAddr) -> Result<String, Error> {
    let context = format!("cannot reach blufio at http://{addr}/health");
    match get(addr, "/health", None) {
        Ok((200, body)) => Ok(body),
        Ok((status, _)) => Err(Error::Io {
            context,
            source: std::io::Error::other(format!("status {status}")),
        }),
        Err(source) => Err(Error::Io { context, source }),
    }
}

/// Sends one GET and returns the status code and body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(5);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("truncated HTTP response"))?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed HTTP status line"))?;
    Ok((code, body.to_owned()))
}
