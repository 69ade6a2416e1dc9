//! Hostile clients against authentication and the log: token guessing is throttled per
//! address and reported once per episode, malformed requests leave one line per episode, and
//! nothing below the configured log level is ever printed.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{
    cli::{blufio, free_port, temp_dir, wait},
    support,
};

const TOKEN: &str = "hostile-auth-token-0123456789";

/// Starts the binary with `config` and without `BLUFIO_LOG`, so `[daemon] log_level` (and a
/// reload of it) is what filters the log; returns the child, its address, its stderr lines
/// and the config path (rewritten by reload tests).
#[allow(clippy::zombie_processes)] // The caller waits for the child.
fn start_configured_binary(
    config: &str,
    name: &str,
) -> (Child, SocketAddr, mpsc::Receiver<String>, PathBuf) {
    let path = temp_dir(name).join("blufio.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = blufio()
        .args(["serve", "--config"])
        .arg(&path)
        .env_remove("BLUFIO_LOG")
        .env_remove("BLUFIO_GATEWAY_TOKEN")
        .env_remove("JOURNAL_STREAM")
        .env_remove("OPENAI_API_KEY")
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("daemon logs its address");
        if let Some(rest) = line.split("listening on http://").nth(1) {
            let addr = rest.split(' ').next().unwrap().parse().unwrap();
            return (child, addr, lines, path);
        }
    }
}

/// Collects stderr lines up to and including the first that contains `marker` (bounded).
fn lines_until(lines: &mpsc::Receiver<String>, marker: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(remaining) {
            Ok(line) => {
                let done = line.contains(marker);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {marker:?} within 30 s; saw {seen:#?}"),
        }
    }
}

fn signal(child: &Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Sends `count` messages at once; each fails against the dead upstream after retries, so
/// the provider's retry warning repeats from one call site.
fn fail_messages(addr: SocketAddr, count: usize) {
    let auth = format!("Bearer {TOKEN}");
    std::thread::scope(|scope| {
        for _ in 0..count {
            scope.spawn(|| {
                let response = support::request(
                    addr,
                    "POST",
                    "/v1/messages",
                    &[
                        ("Authorization", auth.as_str()),
                        ("Content-Type", "application/json"),
                    ],
                    Some(r#"{"content": "hello"}"#),
                );
                assert!(response.status >= 500, "{response:?}");
            });
        }
    });
}

fn debug_lines(lines: &[String]) -> Vec<&String> {
    lines
        .iter()
        .filter(|line| line.starts_with("[DEBUG") || line.starts_with("[TRACE"))
        .collect()
}

#[test]
fn repeated_warnings_print_nothing_below_the_configured_level_before_and_after_a_reload() {
    let port = free_port();
    let dead_upstream = free_port();
    let dir = temp_dir("log-level");
    let key = dir.join("openai.key");
    std::fs::write(&key, "sk-log-level-0123456789").unwrap();
    let config = |level: &str| {
        format!(
            "[daemon]\nlog_level = \"{level}\"\nhealth_port = {port}\n\
             [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n\
             [agent]\nprovider = \"openai\"\nmodel = \"m\"\ntimeout_secs = 30\n\
             base_url = \"http://127.0.0.1:{dead_upstream}/v1\"\napi_key_file = \"{}\"\n",
            key.display()
        )
    };
    let (mut child, addr, lines, path) = start_configured_binary(&config("info"), "log-level");

    // At info: the retry warning repeats (three messages, two retries each), and its
    // held-back repeats must not come out as DEBUG lines.
    fail_messages(addr, 3);
    std::fs::write(&path, config("debug")).unwrap();
    signal(&child, "-HUP");
    let at_info = lines_until(&lines, "reloaded");
    assert!(
        at_info
            .iter()
            .any(|line| line.starts_with("[WARN") && line.contains("retrying")),
        "{at_info:#?}"
    );
    assert_eq!(debug_lines(&at_info), Vec::<&String>::new(), "{at_info:#?}");

    // Raised to debug by a reload, debug lines do show (so the check above can fail).
    fail_messages(addr, 2);
    std::fs::write(&path, config("info")).unwrap();
    signal(&child, "-HUP");
    let at_debug = lines_until(&lines, "reloaded");
    assert!(!debug_lines(&at_debug).is_empty(), "{at_debug:#?}");

    // Lowered to info again by a reload: hidden again.
    fail_messages(addr, 3);
    signal(&child, "-TERM");
    let after = lines_until(&lines, "shut down");
    let exit = wait(&mut child);
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    assert_eq!(debug_lines(&after), Vec::<&String>::new(), "{after:#?}");
}
