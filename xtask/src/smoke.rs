//! `cargo xtask smoke [--target TRIPLE] [--archive PATH]`: checks that a release archive's
//! binary actually serves on its architecture. It unpacks the binary from the archive `dist`
//! wrote, starts `blufio serve` (under qemu-user for foreign targets) on a free local port,
//! waits for `/health`, checks that `/health` and `/metrics` report non-zero memory, stores a
//! session and a message with the echo agent, sends SIGTERM and expects exit status 0 within
//! 15 s, then starts it again on the same state directory and reads the message back.
//!
//! It speaks just enough HTTP/1.1 to do that, with `Connection: close`, reads the two JSON
//! fields it needs through `json.rs` and two metrics by hand. It does not measure performance;
//! the resident size it prints under qemu includes the emulator.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use blufio_testkit::process::{KillOnDrop, signal, try_free_port, wait_timeout};
use flate2::read::GzDecoder;
use serde_json::Value;

use crate::project::{Result, describe, target_dir};
use crate::target::{BuildEnv, Target};
use crate::{dist, json};

/// qemu-user is slow to start a large binary; native start-up takes milliseconds.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// The daemon's drain deadline plus headroom, matching `TimeoutStopSec` in the systemd unit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(15);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the `smoke` task.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut triple = None;
    let mut archive = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--target" => triple = Some(args.next().ok_or("--target needs a triple")?.clone()),
            "--archive" => {
                archive = Some(PathBuf::from(args.next().ok_or("--archive needs a path")?))
            }
            other => return Err(format!("smoke: unexpected argument `{other}`").into()),
        }
    }
    let build_env = BuildEnv::probe(root)?;
    let triple = triple.unwrap_or_else(|| build_env.host().to_owned());
    let target = Target::new(&triple);
    let archive = match archive {
        Some(archive) => archive,
        None => dist::archive_path(root, &triple)?,
    };
    let runner = target.runner(build_env.host())?;

    let work_dir = target_dir(root).join("smoke").join(&triple);
    if work_dir.exists() {
        fs::remove_dir_all(&work_dir)
            .map_err(|error| format!("cannot remove {}: {error}", work_dir.display()))?;
    }
    fs::create_dir_all(&work_dir)?;
    let binary = extract_binary(&archive, &work_dir.join("blufio"))?;

    let port = try_free_port()?;
    let config = work_dir.join("blufio.toml");
    fs::write(&config, config_text(port, &work_dir.join("state")))?;
    let log = work_dir.join("blufio.log");
    let started = start(&runner, &binary, &config, &log, &triple).and_then(|mut daemon| {
        probe(&mut daemon, port)?;
        let session = store_first_run(port)?;
        stop(&mut daemon)?;
        // The second run on the same state directory: the bundled SQLite of this
        // architecture wrote a database that this build reads back after a restart.
        let mut daemon = start(&runner, &binary, &config, &log, &triple)?;
        wait_healthy(&mut daemon, port)?;
        store_second_run(port, &session)?;
        stop(&mut daemon)
    });
    if let Err(error) = started {
        let output = fs::read_to_string(&log).unwrap_or_default();
        return Err(format!(
            "{triple}: {error}\n--- daemon output ({}) ---\n{output}",
            log.display()
        )
        .into());
    }
    println!("smoke {triple}: ok");
    Ok(())
}

/// Starts `blufio serve` on `config` (under `runner` when it is not empty), appending its
/// output to `log`.
fn start(
    runner: &[String],
    binary: &Path,
    config: &Path,
    log: &Path,
    triple: &str,
) -> Result<KillOnDrop> {
    let log_file = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut command = match runner.split_first() {
        Some((program, runner_args)) => {
            let mut command = Command::new(program);
            command.args(runner_args).arg(binary);
            command
        }
        None => Command::new(binary),
    };
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("BLUFIO_LOG", "info")
        .stdin(Stdio::null())
        // One file description for both streams, so their lines interleave instead of
        // overwriting each other.
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    println!("==> {triple}: {}", describe(&command));
    let child = command
        .spawn()
        .map_err(|error| format!("cannot start `{}`: {error}", describe(&command)))?;
    Ok(KillOnDrop::new(child))
}

/// The gateway token of the smoke configuration.
const TOKEN: &str = "smoke-test-token-0123456789";

/// Opens a session and exchanges one message with the echo agent; returns the session id.
fn store_first_run(port: u16) -> Result<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let created = request(address, "POST", "/v1/sessions", "")?;
    if created.status != 201 {
        return Err(format!("POST /v1/sessions answered {}", created.status).into());
    }
    let body = String::from_utf8_lossy(&created.body).into_owned();
    let id = json::field(&body, "id")
        .and_then(|id| id.as_str().map(str::to_owned))
        .ok_or_else(|| format!("POST /v1/sessions gave no id: {body}"))?;
    let message = format!(r#"{{"session_id":"{id}","content":"{SMOKE_MESSAGE}"}}"#);
    let reply = request(address, "POST", "/v1/messages", &message)?;
    if reply.status != 200 {
        return Err(format!(
            "POST /v1/messages answered {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        )
        .into());
    }
    println!("    store: session {id} has a message");
    Ok(id)
}

/// The message the first run stores and the second reads back.
const SMOKE_MESSAGE: &str = "kept across a restart";

/// Reads the first run's session back after the restart.
fn store_second_run(port: u16, id: &str) -> Result<()> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let page = request(address, "GET", &format!("/v1/sessions/{id}/messages"), "")?;
    let body = String::from_utf8_lossy(&page.body).into_owned();
    let messages = json::field(&body, "messages");
    let kept = messages
        .as_ref()
        .and_then(Value::as_array)
        .is_some_and(|messages| {
            messages.len() == 2
                && messages
                    .iter()
                    .all(|message| message["content"] == SMOKE_MESSAGE)
        });
    if page.status != 200 || !kept {
        return Err(format!(
            "after a restart, GET /v1/sessions/{id}/messages answered {}: {body}",
            page.status
        )
        .into());
    }
    println!("    store: after a restart the session and its 2 messages are there");
    Ok(())
}

fn stop(daemon: &mut KillOnDrop) -> Result<()> {
    signal(daemon.id(), "TERM")?;
    let status = wait_timeout(daemon, SHUTDOWN_TIMEOUT)?
        .ok_or_else(|| format!("the daemon did not exit within {SHUTDOWN_TIMEOUT:?} of SIGTERM"))?;
    if !status.success() {
        return Err(
            format!("the daemon exited with {status} after SIGTERM, expected status 0").into(),
        );
    }
    println!("    SIGTERM: exited with status 0");
    Ok(())
}

fn wait_healthy(daemon: &mut Child, port: u16) -> Result<Response> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let started = Instant::now();
    let health = loop {
        if let Some(status) = daemon.try_wait()? {
            return Err(format!("the daemon exited before answering /health: {status}").into());
        }
        match get(address, "/health") {
            Ok(response) if response.status == 200 => break response,
            Ok(response) if started.elapsed() > STARTUP_TIMEOUT => {
                return Err(format!(
                    "/health still answers {} after {STARTUP_TIMEOUT:?}",
                    response.status
                )
                .into());
            }
            Err(error) if started.elapsed() > STARTUP_TIMEOUT => {
                return Err(
                    format!("/health did not answer within {STARTUP_TIMEOUT:?}: {error}").into(),
                );
            }
            _ => thread::sleep(Duration::from_millis(250)),
        }
    };
    println!(
        "    /health answered after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(health)
}

fn probe(daemon: &mut Child, port: u16) -> Result<()> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let health = wait_healthy(daemon, port)?;
    let body = String::from_utf8_lossy(&health.body).into_owned();
    check_health(&body)?;
    println!("    /health: {}", body.trim());

    let metrics = get(address, "/metrics")?;
    if metrics.status != 200 {
        return Err(format!("/metrics answered {}", metrics.status).into());
    }
    let text = String::from_utf8_lossy(&metrics.body);
    for name in ["process_resident_memory_bytes", "blufio_memory_heap_bytes"] {
        match metric_value(&text, name) {
            Some(value) if value > 0.0 => println!("    /metrics: {name} {value}"),
            Some(value) => {
                return Err(format!("/metrics reports {name} {value}, expected > 0").into());
            }
            None => return Err(format!("/metrics has no {name} sample").into()),
        }
    }

    // Under qemu-user this is the emulator's resident size, guest and translator together.
    if let Some(resident) = vm_rss_kib(daemon.id()) {
        println!("    VmRSS of pid {}: {resident} kB", daemon.id());
    }

    Ok(())
}

fn check_health(body: &str) -> Result<()> {
    if json::field(body, "status") != Some(Value::from("healthy")) {
        return Err(format!("/health is not healthy: {body}").into());
    }
    for field in ["memory_rss_bytes", "memory_heap_bytes"] {
        let value =
            json::field(body, field).ok_or_else(|| format!("/health has no {field}: {body}"))?;
        match value.as_u64() {
            Some(bytes) if bytes > 0 => {}
            _ => return Err(format!("/health reports {field} = {value}, expected > 0").into()),
        }
    }
    Ok(())
}

/// Copies the `blufio` file out of `archive` to `destination` and makes it executable.
fn extract_binary(archive: &Path, destination: &Path) -> Result<PathBuf> {
    let file = File::open(archive).map_err(|error| {
        format!(
            "cannot open {}: {error} (run `cargo xtask dist` first)",
            archive.display()
        )
    })?;
    let mut tar = tar::Archive::new(GzDecoder::new(file));
    let fail = |error: io::Error| format!("cannot read {}: {error}", archive.display());
    for entry in tar.entries().map_err(fail)? {
        let mut entry = entry.map_err(fail)?;
        let is_binary = entry.header().entry_type().is_file()
            && entry
                .path()
                .map_err(fail)?
                .file_name()
                .is_some_and(|name| name == "blufio");
        if is_binary {
            // Only this one file is written, to a fixed name, so archive paths cannot escape.
            let mut out = File::create(destination)?;
            io::copy(&mut entry, &mut out).map_err(fail)?;
            out.sync_all()?;
            fs::set_permissions(destination, fs::Permissions::from_mode(0o755))?;
            return Ok(destination.to_path_buf());
        }
    }
    Err(format!("{} contains no blufio binary", archive.display()).into())
}

/// Returns the daemon configuration used by the smoke test: the echo agent and a state
/// directory, so the session store is exercised on the archive's architecture.
pub fn config_text(port: u16, state_dir: &Path) -> String {
    format!(
        "[daemon]\n\
         bind = \"127.0.0.1\"\n\
         health_port = {port}\n\
         memory_warn_mb = 150\n\
         memory_limit_mb = 200\n\
         monitor_interval_secs = 5\n\
         state_dir = {state_dir:?}\n\
         \n\
         [gateway]\n\
         port = {port}\n\
         token = \"{TOKEN}\"\n\
         \n\
         [agent]\n\
         provider = \"echo\"\n",
        state_dir = state_dir.display().to_string(),
    )
}

/// An HTTP response: status code and decoded body.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

/// Sends `GET path` and reads the whole response; `Connection: close` makes end of stream the
/// end of the response.
/// Sends `method path` with the gateway token and `body` (JSON), and reads the whole
/// response.
fn request(address: SocketAddr, method: &str, path: &str, body: &str) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: blufio-xtask-smoke\r\n\
         Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw).map_err(|error| format!("{method} {path}: {error}").into())
}

pub(crate) fn get(address: SocketAddr, path: &str) -> Result<Response> {
    let mut stream = TcpStream::connect_timeout(&address, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: blufio-xtask-smoke\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw).map_err(|error| format!("GET {path}: {error}").into())
}

fn parse_response(raw: &[u8]) -> std::result::Result<Response, String> {
    let split = raw
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or("the response has no end of head")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("malformed status line `{status_line}`"))?;
    let chunked = lines.any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked {
        decode_chunked(body)?
    } else {
        body.to_vec()
    };
    Ok(Response { status, body })
}

fn decode_chunked(mut raw: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = raw
            .windows(2)
            .position(|window| window == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&raw[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size `{size_text}`"))?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = raw.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(chunk);
        raw = raw.get(size + 2..).ok_or("truncated chunk end")?;
    }
}

/// Returns the value of the first sample of `name` in Prometheus text format.
pub(crate) fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labels) => &labels[labels.find('}')? + 1..],
                None if rest.starts_with([' ', '\t']) => rest,
                None => return None,
            };
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// Returns VmRSS in kB of a process, from /proc/<pid>/status.
pub(crate) fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTH: &str = r#"{"status":"healthy","uptime_secs":3,"memory_heap_bytes":123456,"memory_rss_bytes":null,"active_sessions":0}"#;

    #[test]
    fn health_without_rss_fails() {
        assert!(check_health(HEALTH).is_err());
        let good = HEALTH.replace("null", "4096");
        assert!(check_health(&good).is_ok());
    }

    #[test]
    fn metric_values_are_read_with_and_without_labels() {
        let text = "# HELP process_resident_memory_bytes Resident memory.\n\
                    # TYPE process_resident_memory_bytes gauge\n\
                    process_resident_memory_bytes_total 1\n\
                    process_resident_memory_bytes 8192\n\
                    blufio_memory_heap_bytes{kind=\"allocated\"} 1.5e6\n";
        assert_eq!(
            metric_value(text, "process_resident_memory_bytes"),
            Some(8192.0)
        );
        assert_eq!(
            metric_value(text, "blufio_memory_heap_bytes"),
            Some(1_500_000.0)
        );
        assert_eq!(metric_value(text, "blufio_missing"), None);
    }

    #[test]
    fn responses_are_parsed_plain_and_chunked() {
        let plain = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").unwrap();
        assert_eq!(
            (plain.status, plain.body.as_slice()),
            (200, b"ok".as_slice())
        );
        let chunked = parse_response(
            b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (chunked.status, chunked.body.as_slice()),
            (503, b"abcde".as_slice())
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn config_sets_both_ports() {
        let config = config_text(4321, Path::new("/tmp/smoke"));
        assert!(config.contains("health_port = 4321\n"));
        assert!(config.contains("[gateway]\nport = 4321\n"));
        assert!(config.contains("bind = \"127.0.0.1\"\n"));
        assert!(config.contains("state_dir = \"/tmp/smoke\"\n"));
        assert!(config.contains("provider = \"echo\"\n"));
    }
}
