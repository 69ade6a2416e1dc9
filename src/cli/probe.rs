//! Reaching a running daemon: the `health` command and the fetch `status` renders, with the
//! exit status each failure maps to.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use blufio::{Config, Error};
use serde_json::Value;

use super::client::{self, ProbeError};

/// Exit status of `status` when nothing listens (as `systemctl status` uses it).
const EXIT_NOT_RUNNING: u8 = 3;
/// Exit status of `status` when the daemon refuses the configured gateway token.
const EXIT_TOKEN_REFUSED: u8 = 4;

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
pub type Failure = (u8, String);

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
pub fn fetch(config: &Config, timeout: Duration) -> Result<(bool, SocketAddr, Value), Failure> {
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

/// Probes `/health` once: exit 0 when it answers 200, else 1 with one line on stderr.
pub fn health(
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
