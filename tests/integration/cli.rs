//! The `blufio` binary as an operator runs it: signals, exit codes and error messages.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use crate::support;

const BINARY: &str = env!("CARGO_BIN_EXE_blufio");

/// Returns a command running the `blufio` binary. Under `cargo xtask test-cross` the binary
/// is foreign: cargo's runner variable for this target (qemu-user) is inherited from cargo, so
/// it is used here too, since the host kernel cannot execute the binary by itself.
fn blufio() -> Command {
    let runner_var = format!(
        "CARGO_TARGET_{}_RUNNER",
        env!("BLUFIO_TARGET").to_uppercase().replace('-', "_")
    );
    let runner = std::env::var(runner_var).unwrap_or_default();
    let mut parts = runner.split_whitespace();
    match parts.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(parts).arg(BINARY);
            command
        }
        None => Command::new(BINARY),
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blufio-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Picks a port the OS says is free right now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the binary and waits for its "listening on" log line (no sleeping and retrying).
#[allow(clippy::zombie_processes)] // The caller waits for the child.
pub(crate) fn start_binary(
    config: &str,
    name: &str,
) -> (Child, std::net::SocketAddr, mpsc::Receiver<String>) {
    let dir = temp_dir(name);
    let path = dir.join("blufio.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = blufio()
        .args(["serve", "--config"])
        .arg(&path)
        .env("BLUFIO_LOG", "info")
        .env_remove("BLUFIO_GATEWAY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (sender, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .expect("daemon logs its address");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            let addr = rest.split(' ').next().unwrap().parse().unwrap();
            return (child, addr, lines);
        }
    }
}

pub(crate) fn wait(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("daemon did not exit within 15 s");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let port = free_port();
    let config = format!("[daemon]\nhealth_port = {port}\n[gateway]\nport = {port}\n");
    let (mut child, addr, lines) = start_binary(&config, "sigterm");
    assert_eq!(
        support::request(addr, "GET", "/health", &[], None).status,
        200
    );
    // SAFETY-free: `kill` the command sends SIGTERM to the child's pid.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait(&mut child);
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    let log: Vec<String> = lines.try_iter().collect();
    assert!(
        log.iter().any(|line| line.contains("shut down cleanly")),
        "{log:?}"
    );
}

#[test]
fn status_reports_a_running_daemon_and_fails_for_a_missing_one() {
    let port = free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\n[gateway]\nport = {port}\ntoken = \"status-token\"\n"
    );
    let (mut child, _addr, _lines) = start_binary(&config, "status");
    let path = temp_dir("status").join("blufio.toml");
    let output = blufio()
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains(": healthy"), "{stdout}");
    assert!(stdout.contains("admission       accepting"), "{stdout}");
    assert!(!stdout.contains("status-token"));
    child.kill().unwrap();
    child.wait().unwrap();

    let output = blufio()
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach blufio"));
}

#[test]
fn config_typo_names_file_line_and_key_and_exits_78() {
    let dir = temp_dir("typo");
    let path = dir.join("blufio.toml");
    std::fs::write(
        &path,
        "[daemon]\nhealth_port = 3000\nmemroy_warn_mb = 100\n",
    )
    .unwrap();
    let output = blufio()
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{}:3:1: key `memroy_warn_mb`", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn missing_explicit_config_file_exits_78() {
    let output = blufio()
        .args(["--config", "/nonexistent/blufio.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/blufio.toml"));
}

#[test]
fn busy_port_is_a_one_line_error_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = temp_dir("busy");
    let path = dir.join("blufio.toml");
    std::fs::write(
        &path,
        format!("[daemon]\nhealth_port = {port}\n[gateway]\nport = {port}\n"),
    )
    .unwrap();
    let output = blufio()
        .args(["serve", "--config"])
        .arg(&path)
        .env("BLUFIO_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot bind 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn unknown_command_is_a_usage_error() {
    let output = blufio().arg("frobnicate").output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}
