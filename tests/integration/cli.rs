//! The `blufio` binary as an operator runs it: signals, exit codes and error messages.

use std::{net::TcpListener, process::Stdio, time::Duration};

use blufio_testkit::assert_contains;
use blufio_testkit::{
    http,
    process::{KillOnDrop, free_port, port_config, write_config},
    temp::temp_dir,
};

use crate::support::{self, binary, serve};

/// Health and gateway on `port` with `token`.
fn token_config(port: u16, token: &str) -> String {
    format!("{}token = \"{token}\"\n", port_config(port))
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let port = free_port();
    let config = port_config(port);
    let mut daemon = serve(&config, "sigterm");
    let addr = daemon.addr();
    assert_eq!(
        support::request(addr, "GET", "/health", &[], None).status,
        200
    );
    daemon.signal("TERM");
    let exit = daemon.wait(support::EXIT_TIMEOUT);
    assert_eq!(exit.code(), Some(0), "{exit:?}");
    let log: Vec<String> = daemon.lines().try_iter().collect();
    assert!(
        log.iter().any(|line| line.contains("shut down cleanly")),
        "{log:?}"
    );
}

/// The names of the threads of process `pid` besides its main thread, leaving out the
/// emulator's own when the tests run under qemu-user (which names them after itself).
#[cfg(target_os = "linux")]
fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| task.unwrap().path())
        .filter(|task| !task.ends_with(pid.to_string()))
        .map(|task| {
            let comm = std::fs::read_to_string(task.join("comm")).unwrap();
            comm.trim().to_owned()
        })
        .filter(|name| !name.starts_with("qemu-"))
        .collect();
    names.sort();
    names
}

#[cfg(target_os = "linux")]
#[test]
fn two_workers_are_the_main_thread_and_one_more_even_with_a_provider_client() {
    let port = free_port();
    let dir = temp_dir("threads");
    let key = dir.join("openai.key");
    std::fs::write(&key, "sk-threads-0123456789").unwrap();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nworkers = 2\n[gateway]\nport = {port}\n\
         [agent]\nprovider = \"openai\"\nmodel = \"llama3.2\"\n\
         base_url = \"http://127.0.0.1:9/v1\"\napi_key_file = \"{}\"\n",
        key.display()
    );
    let mut daemon = serve(&config, "threads");
    let addr = daemon.addr();
    for _ in 0..20 {
        assert_eq!(
            support::request(addr, "GET", "/health", &[], None).status,
            200
        );
    }
    // The provider's HTTP client has spawned its pool reapers by now: on the daemon's own
    // executor, so no executor threads beyond the workers (and async-io's reactor thread).
    let names = thread_names(daemon.pid());
    // Stopped before asserting, so a failure leaves no daemon behind.
    daemon.kill();
    // Besides the main thread: one worker and async-io's reactor.
    assert_eq!(names, ["async-io", "blufio-worker-0"]);
}

#[test]
fn status_reports_a_running_daemon_in_plain_and_json_and_exit_3_when_gone() {
    let mut daemon = serve(
        &token_config(free_port(), "status-token-0123456789"),
        "status",
    );
    let addr = daemon.addr();
    let created = support::request(
        addr,
        "POST",
        "/v1/sessions",
        &[
            ("Authorization", "Bearer status-token-0123456789"),
            ("Content-Type", "application/json"),
        ],
        Some("{}"),
    );
    assert_eq!(created.status, 201, "{}", created.body);
    let path = daemon.config().to_owned();
    let output = binary().run_config(&["status"], &path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert_contains(&stdout, &format!("blufio at http://{addr}: healthy"));
    assert!(stdout.contains("% of warn"), "{stdout}");
    assert_contains(&stdout, "thresholds   warn 150.0 MiB, limit 200.0 MiB");
    assert!(stdout.contains("  cgroup       "), "{stdout}");
    assert_contains(&stdout, "admission accepting; readiness ready");
    assert!(stdout.contains("sessions     1 of 1000"), "{stdout}");
    assert_contains(&stdout, "budget       $0.00 of $10.00 spent today (UTC)");
    // Not a terminal: no bar.
    assert!(!stdout.contains("[#"), "{stdout}");
    assert!(!stdout.contains("status-token"));

    let output = binary().run_config(&["status", "--json"], &path);
    assert_eq!(output.status.code(), Some(0));
    let document: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(document["status"], "healthy");
    assert_eq!(document["detailed"], true);
    assert_eq!(document["active_sessions"], 1);
    assert_eq!(document["admission"], "accepting");
    assert_eq!(document["memory_limit_bytes"], 200 * 1024 * 1024);
    assert!(document["memory_heap_bytes"].as_u64().unwrap() > 0);

    daemon.kill();
    let output = binary().run_config(&["status"], &path);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("blufio is not running at"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn status_with_a_wrong_token_exits_4_and_health_probes_once() {
    let mut daemon = serve(
        &token_config(free_port(), "right-token-0123456789"),
        "status-token",
    );
    let addr = daemon.addr();
    let port = addr.port();
    let dir = temp_dir("status-token");
    let wrong = dir.join("wrong.toml");
    std::fs::write(&wrong, token_config(port, "wrong-token-0123456789")).unwrap();
    let output = binary().run_config(&["status"], &wrong);
    assert_eq!(output.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_contains(&stderr, "refused the configured gateway token");
    assert!(!stderr.contains("wrong-token"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    let output = binary().run(&[
        "health",
        "--url",
        &format!("http://{addr}/health"),
        "--timeout",
        "2",
    ]);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).contains(": 200 healthy"));
    let output = binary().run_config(&["health"], &wrong);
    assert_eq!(output.status.code(), Some(0));
    daemon.kill();

    let output = binary().run(&["health", "--url", &format!("http://{addr}/health")]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr)
            .trim()
            .lines()
            .count(),
        1
    );
}

#[test]
fn status_against_a_garbage_stream_stops_at_the_bound() {
    let port = http::stand_in(|mut stream| {
        use std::io::Write;
        let chunk = [b'x'; 65536];
        while stream.write_all(&chunk).is_ok() {}
    });
    let dir = temp_dir("garbage");
    let path = dir.join("blufio.toml");
    std::fs::write(&path, port_config(port)).unwrap();
    let output = binary().run_config(&["status"], &path);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not an HTTP reply"), "{stderr}");
}

#[test]
fn config_default_is_the_example_file_and_show_redacts_secrets() {
    let output = binary().run(&["config", "default"]);
    assert_eq!(output.status.code(), Some(0));
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/blufio.example.toml"))
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&output.stdout), example);

    let dir = temp_dir("config-show");
    let path = write_config(
        &dir,
        "[daemon]\nhealth_port = 9100\n[gateway]\ntoken = \"hunter2-secret-0123\"\n",
    );
    let output = binary().run_config(&["config", "show"], &path);
    assert_eq!(output.status.code(), Some(0));
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(!shown.contains("hunter2"), "{shown}");
    assert!(shown.contains("token = \"<redacted>\""), "{shown}");
    assert!(shown.contains("health_port = 9100"), "{shown}");
    assert!(shown.contains("memory_limit_mb = 200"), "{shown}");
    assert!(shown.contains("[agent]"), "{shown}");

    for command in [&["check-config"][..], &["config", "check"][..]] {
        let output = binary().run_config(command, &path);
        assert_eq!(output.status.code(), Some(0), "{command:?}");
        assert!(String::from_utf8_lossy(&output.stdout).contains(": ok"));
    }
}

#[test]
fn config_typo_names_file_line_and_key_and_exits_78() {
    let dir = temp_dir("typo");
    let path = write_config(&dir, "[daemon]\nhealth_port = 3000\nmemroy_warn_mb = 100\n");
    let output = binary().run_config(&["serve"], &path);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{}:3:1: key `memroy_warn_mb`", path.display());
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn missing_explicit_config_file_exits_78() {
    let output = binary().run(&["--config", "/nonexistent/blufio.toml"]);
    assert_eq!(output.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/blufio.toml"));
}

#[test]
fn busy_port_is_a_one_line_error_naming_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = temp_dir("busy");
    let path = dir.join("blufio.toml");
    std::fs::write(&path, port_config(port)).unwrap();
    let output = binary()
        .command()
        .args(["serve", "--config"])
        .arg(&path)
        .env("BLUFIO_LOG", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_contains(&stderr, &format!("cannot bind 127.0.0.1:{port}"));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn unknown_command_is_a_usage_error() {
    let output = binary().run(&["frobnicate"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn status_exits_1_when_the_daemon_reports_degraded() {
    // A stand-in answering /health the way a daemon under memory pressure does.
    let port = http::stand_in(|mut stream| {
        use std::io::{Read, Write};
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
            request.push(byte[0]);
        }
        let body = r#"{"status":"degraded","uptime_secs":7,"memory_heap_bytes":220000000,"memory_rss_bytes":260000000,"active_sessions":3}"#;
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    });
    let dir = temp_dir("degraded");
    let path = dir.join("blufio.toml");
    std::fs::write(&path, port_config(port)).unwrap();
    let output = binary().run_config(&["status"], &path);
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains(": degraded"), "{stdout}");
    assert!(stdout.contains("sessions     3"), "{stdout}");
}

/// Runs the binary with stderr in a file, optionally announcing that file as the journal,
/// until it has logged that it listens; returns what it wrote.
fn log_lines_with_journal(name: &str, announce_journal: bool) -> String {
    use std::os::unix::fs::MetadataExt;

    let dir = temp_dir(name);
    let port = free_port();
    let config_path = dir.join("blufio.toml");
    std::fs::write(&config_path, port_config(port)).unwrap();
    let log_path = dir.join("stderr.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let identity = log_file.metadata().unwrap();
    let mut command = binary().serve_command(&config_path);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    if announce_journal {
        command.env(
            "JOURNAL_STREAM",
            format!("{}:{}", identity.dev(), identity.ino()),
        );
    } else {
        command.env_remove("JOURNAL_STREAM");
    }
    // Killed when the log is read (on return, or when a failure unwinds).
    let _child = KillOnDrop(command.spawn().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while std::time::Instant::now() < deadline {
        text = std::fs::read_to_string(&log_path).unwrap();
        if text.contains("listening on") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    text
}

#[test]
fn log_lines_carry_syslog_priorities_only_when_stderr_is_the_journal() {
    let journal = log_lines_with_journal("journal-on", true);
    assert!(journal.contains("listening on"), "{journal}");
    let warning = journal
        .lines()
        .find(|line| line.contains("no gateway token configured"))
        .unwrap_or_else(|| panic!("no token warning in {journal}"));
    assert!(warning.starts_with("<4>blufio"), "{warning}");
    let listening = journal
        .lines()
        .find(|line| line.contains("listening on"))
        .unwrap();
    assert!(listening.starts_with("<6>blufio"), "{listening}");

    let terminal = log_lines_with_journal("journal-off", false);
    assert!(terminal.contains("listening on"), "{terminal}");
    assert!(
        terminal.lines().all(|line| !line.starts_with('<')),
        "{terminal}"
    );
}

#[test]
fn config_check_lists_models_and_their_fallback_chains() {
    let dir = temp_dir("config-models");
    std::fs::write(dir.path().join("claude.key"), "sk-ant-test\n").unwrap();
    let path = write_config(
        &dir,
        "[providers.claude]\nkind = \"anthropic\"\napi_key_file = \"claude.key\"\n\
         [providers.pi]\nkind = \"openai\"\nbase_url = \"http://192.168.1.20:11434\"\n\
         [models.sonnet]\nprovider = \"claude\"\nmodel = \"claude-sonnet-4-5\"\n\
         fallback = [\"llama\"]\n[models.llama]\nprovider = \"pi\"\nmodel = \"llama3.2\"\n\
         [gateway]\ndefault_model = \"sonnet\"\n",
    );
    let output = binary().run_config(&["config", "check"], &path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert_contains(
        &stdout,
        "models (default sonnet):\n  llama: pi/llama3.2 (openai)\n  \
         sonnet: claude/claude-sonnet-4-5 (anthropic), then llama = pi/llama3.2 (openai)\n",
    );

    let looped = write_config(
        &dir,
        "[providers.pi]\nkind = \"openai\"\n[models.a]\nprovider = \"pi\"\nfallback = [\"a\"]\n",
    );
    let output = binary().run_config(&["config", "check"], &looped);
    assert_eq!(output.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!(
        "{}:5:13: key `[models.a] fallback`: the fallback chain loops: a -> a",
        looped.display()
    );
    assert_contains(&stderr, &expected);

    let echo = write_config(&dir, "[agent]\nprovider = \"echo\"\n");
    let output = binary().run_config(&["config", "check"], &echo);
    assert_eq!(output.status.code(), Some(0));
    assert_contains(
        &String::from_utf8_lossy(&output.stdout),
        "models: none ([agent] provider = \"echo\", no [providers])\n",
    );
}
