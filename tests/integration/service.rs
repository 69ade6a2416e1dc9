//! The daemon under a service manager, through the real binary: sd_notify messages on a real
//! Unix datagram socket standing in for systemd (path and abstract), the watchdog, SIGHUP
//! reloads over live connections, and signals that must not kill it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixDatagram,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use blufio::{Config, Context, FixedRss, ManualHeap, NotifySettings};
use blufio_testkit::process::{Spawned, write_config};

use crate::support::{self, EXIT_TIMEOUT, binary, free_port, port_config, temp_dir};

const MIB: u64 = 1024 * 1024;

/// Starts `blufio serve` on `config_path` with no service-manager variables but `env`, and
/// `BLUFIO_LOG` set to `log` (unset when empty).
fn start_service(config_path: &Path, env: &[(&str, &str)], log: &str) -> Spawned {
    let mut command = binary().serve_command(config_path);
    command
        .env_remove("BLUFIO_LOG")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
    if !log.is_empty() {
        command.env("BLUFIO_LOG", log);
    }
    command.envs(env.iter().copied());
    Spawned::spawn(&mut command)
}

/// Waits for a log line containing `needle` and returns it.
fn expect_log(service: &Spawned, needle: &str) -> String {
    service.wait_for_line(needle, Duration::from_secs(20))
}

/// Waits until the kernel reports the child stopped (state `T` in `/proc/<pid>/stat`).
fn wait_until_stopped(service: &Spawned) {
    let path = format!("/proc/{}/stat", service.pid());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(&path).unwrap();
        let state = stat.rsplit(')').next().unwrap().split_whitespace().next();
        if state == Some("T") {
            return;
        }
        assert!(Instant::now() < deadline, "the child never stopped: {stat}");
        std::thread::yield_now();
    }
}

/// A datagram socket standing in for systemd's notification socket.
struct Manager {
    socket: UnixDatagram,
}

impl Manager {
    fn bind_path(path: &Path) -> Manager {
        let _ = std::fs::remove_file(path);
        Manager {
            socket: UnixDatagram::bind(path).unwrap(),
        }
    }

    #[cfg(target_os = "linux")]
    fn bind_abstract(name: &str) -> Manager {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
        Manager {
            socket: UnixDatagram::bind_addr(&address).unwrap(),
        }
    }

    /// Returns the next message, or `None` after `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buffer = [0u8; 4096];
        let length = self.socket.recv(&mut buffer).ok()?;
        Some(String::from_utf8_lossy(&buffer[..length]).into_owned())
    }

    /// Waits for a message containing `needle`, returning it and what came before.
    fn expect(&self, needle: &str) -> (String, Vec<String>) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut before = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(message) if message.contains(needle) => return (message, before),
                Some(message) => before.push(message),
                None => break,
            }
        }
        panic!("no notification containing {needle:?}; got {before:?}");
    }

    /// Returns everything already queued.
    fn drain(&self) -> Vec<String> {
        std::iter::from_fn(|| self.next(Duration::from_millis(1))).collect()
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn ready_after_bind_then_watchdog_status_reload_and_stopping() {
    let dir = temp_dir("notify-path");
    let manager = Manager::bind_path(&dir.join("notify.sock"));
    let port = free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nmonitor_interval_secs = 1\n[gateway]\nport = {port}\n"
    );
    let path = write_config(&dir, &config);
    let socket = dir.join("notify.sock");
    let daemon = start_service(
        &path,
        &[
            ("NOTIFY_SOCKET", socket.to_str().unwrap()),
            ("WATCHDOG_USEC", "600000"),
        ],
        "info",
    );

    let (ready, before) = manager.expect("READY=1");
    assert!(before.is_empty(), "READY must come first: {before:?}");
    assert!(ready.contains("STATUS=heap "), "{ready}");
    // READY=1 means every listener is bound: the probe answers at once, no retrying.
    assert_eq!(
        support::request(addr(port), "GET", "/ready", &[], None).status,
        200
    );

    // The watchdog at half of WATCHDOG_USEC (300 ms): about 6 pings in 2 s, and the
    // monitor's STATUS= line along the way.
    let started = Instant::now();
    let mut messages = Vec::new();
    while started.elapsed() < Duration::from_secs(2) {
        if let Some(message) = manager.next(Duration::from_millis(100)) {
            messages.push(message);
        }
    }
    let pings = messages.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        (4..=9).contains(&pings),
        "{pings} pings in 2 s: {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("STATUS=heap ")),
        "{messages:?}"
    );

    // A stopped process stops pinging; it resumes when continued.
    daemon.signal("STOP");
    wait_until_stopped(&daemon);
    manager.drain();
    assert_eq!(manager.next(Duration::from_millis(900)), None);
    daemon.signal("CONT");
    manager.expect("WATCHDOG=1");

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    daemon.signal("HUP");
    let (reloading, _) = manager.expect("RELOADING=1");
    let usec: u64 = reloading
        .lines()
        .find_map(|line| line.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC= in RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    manager.expect("READY=1");
    expect_log(&daemon, "reloaded");

    // SIGUSR1 and SIGUSR2 are logged and ignored, never fatal.
    daemon.signal("USR1");
    expect_log(&daemon, "received SIGUSR1; ignored");
    daemon.signal("USR2");
    expect_log(&daemon, "received SIGUSR2; ignored");
    assert_eq!(
        support::request(addr(port), "GET", "/health", &[], None).status,
        200
    );

    daemon.signal("TERM");
    manager.expect("STOPPING=1");
    let mut daemon = daemon;
    let exit = daemon.wait(EXIT_TIMEOUT);
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

#[cfg(target_os = "linux")]
#[test]
fn notifies_an_abstract_socket() {
    let name = format!("blufio-test-notify-{}", std::process::id());
    let manager = Manager::bind_abstract(&name);
    let dir = temp_dir("notify-abstract");
    let port = free_port();
    let path = write_config(&dir, &port_config(port));
    let daemon = start_service(&path, &[("NOTIFY_SOCKET", &format!("@{name}"))], "info");
    manager.expect("READY=1");
    // No WATCHDOG_USEC: no watchdog pings, only the status line.
    daemon.signal("TERM");
    let (_, before) = manager.expect("STOPPING=1");
    assert!(before.iter().all(|m| !m.contains("WATCHDOG")), "{before:?}");
    let mut daemon = daemon;
    assert_eq!(daemon.wait(EXIT_TIMEOUT).code(), Some(0));
}

#[test]
fn bind_failure_never_sends_ready() {
    let dir = temp_dir("notify-bind");
    let manager = Manager::bind_path(&dir.join("notify.sock"));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = write_config(&dir, &port_config(port));
    let socket = dir.join("notify.sock");
    let mut daemon = start_service(&path, &[("NOTIFY_SOCKET", socket.to_str().unwrap())], "off");
    assert_eq!(daemon.wait(EXIT_TIMEOUT).code(), Some(1));
    let messages = manager.drain();
    assert!(
        messages.iter().all(|m| !m.contains("READY=1")),
        "{messages:?}"
    );
}

#[test]
fn without_notify_socket_nothing_is_logged_about_it() {
    let dir = temp_dir("notify-none");
    let port = free_port();
    let path = write_config(&dir, &port_config(port));
    let daemon = start_service(&path, &[], "debug");
    expect_log(&daemon, "listening on");
    let mut daemon = daemon;
    daemon.signal("TERM");
    assert_eq!(daemon.wait(EXIT_TIMEOUT).code(), Some(0));
    let log: Vec<String> = daemon.lines().try_iter().collect();
    assert!(log.iter().all(|line| !line.contains("notif")), "{log:?}");
}

#[test]
fn a_stalled_monitor_stops_the_watchdog() {
    let dir = temp_dir("watchdog-stall");
    let path = dir.join("notify.sock");
    let manager = Manager::bind_path(&path);
    let heap = Arc::new(ManualHeap::new(10 * MIB));
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    let (entered, hook_entered) = std::sync::mpsc::channel::<()>();
    let entered = std::sync::Mutex::new(entered);
    let mut config = Config::for_tests();
    config.daemon.monitor_interval_secs = 1;
    let daemon = support::start_with(
        Context::builder(config)
            .with_heap_source(Arc::clone(&heap))
            .with_rss_source(FixedRss(Some(20 * MIB)))
            // A shed hook that hangs: the monitor loop is stuck inside its tick.
            .with_shed_hook("hangs", move || {
                let _ = entered.lock().unwrap().send(());
                let _ = released.lock().unwrap().recv();
            })
            .with_notify(Some(NotifySettings {
                socket: path.clone().into_os_string(),
                watchdog_timeout: Some(Duration::from_millis(400)),
            })),
    );
    manager.expect("READY=1");
    manager.expect("WATCHDOG=1");
    manager.expect("WATCHDOG=1");

    // Pressure makes the next tick run the hanging hook: the pings stop.
    heap.set(170 * MIB);
    hook_entered
        .recv_timeout(Duration::from_secs(10))
        .expect("the monitor runs the shed hook");
    manager.drain();
    // Five ping periods of silence while the monitor is stuck.
    assert_eq!(manager.next(Duration::from_secs(1)), None);
    // The HTTP side still answers: only the monitor is stuck, and that is what the
    // watchdog is for.
    assert_eq!(daemon.get("/health").status, 200);

    release.send(()).unwrap();
    manager.expect("WATCHDOG=1");
    heap.set(10 * MIB);
    daemon.stop();
}

/// One keep-alive HTTP/1.1 connection: requests go out one at a time on the same socket.
struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        KeepAlive { stream }
    }

    fn send(&mut self, method: &str, path: &str, token: &str) -> (u16, String) {
        let body = if method == "POST" { "{}" } else { "" };
        write!(
            self.stream,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.stream
                .read_exact(&mut byte)
                .expect("connection kept open");
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }
}

#[test]
fn sighup_rotates_the_token_without_dropping_a_connection_or_session() {
    let dir = temp_dir("reload-token");
    let token_path = dir.join("token");
    std::fs::write(&token_path, "old-token-1234567890\n").unwrap();
    let port = free_port();
    let config = |extra: &str| {
        format!(
            "[daemon]\nhealth_port = {port}\n{extra}[gateway]\nport = {port}\ntoken_file = {:?}\n",
            token_path.display().to_string()
        )
    };
    let path = write_config(&dir, &config(""));
    let mut daemon = start_service(&path, &[], "info");
    expect_log(&daemon, "listening on");

    let mut connection = KeepAlive::connect(addr(port));
    let (status, body) = connection.send("POST", "/v1/sessions", "old-token-1234567890");
    assert_eq!(status, 201, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    std::fs::write(&token_path, "new-token-0987654321\n").unwrap();
    std::fs::write(&path, config("memory_warn_mb = 120\n")).unwrap();
    daemon.signal("HUP");
    let line = expect_log(&daemon, "reloaded");
    assert!(line.contains("[gateway] token"), "{line}");
    assert!(line.contains("[daemon] memory_warn_mb"), "{line}");
    assert!(
        !line.contains("token-"),
        "the token itself is never logged: {line}"
    );

    // Same connection, same session: the new token works, the old one is refused.
    let (status, body) =
        connection.send("GET", &format!("/v1/sessions/{id}"), "new-token-0987654321");
    assert_eq!(status, 200, "{body}");
    let (status, _) = connection.send("GET", &format!("/v1/sessions/{id}"), "old-token-1234567890");
    assert_eq!(status, 401);
    let (status, body) = connection.send("GET", "/v1/health", "new-token-0987654321");
    assert_eq!(status, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["memory_warn_bytes"], 120 * MIB);
    assert_eq!(health["active_sessions"], 1);
    daemon.stop(EXIT_TIMEOUT);
}

#[test]
fn sighup_with_an_invalid_file_keeps_the_running_config() {
    let dir = temp_dir("reload-invalid");
    let port = free_port();
    let good = format!(
        "[daemon]\nhealth_port = {port}\n[gateway]\nport = {port}\ntoken = \"kept-token-123456\"\n"
    );
    let path = write_config(&dir, &good);
    let mut daemon = start_service(&path, &[], "info");
    expect_log(&daemon, "listening on");

    std::fs::write(&path, format!("{good}memroy_warn_mb = 1\n")).unwrap();
    daemon.signal("HUP");
    let line = expect_log(&daemon, "reload refused");
    let expected = format!("{}:6:1: key `memroy_warn_mb`", path.display());
    assert!(line.contains(&expected), "{line}");

    let health = support::request(
        addr(port),
        "GET",
        "/v1/health",
        &[("Authorization", "Bearer kept-token-123456")],
        None,
    );
    assert_eq!(health.status, 200, "{}", health.body);
    daemon.stop(EXIT_TIMEOUT);
}

#[test]
fn sighup_reports_a_port_change_as_needing_a_restart() {
    let dir = temp_dir("reload-port");
    let port = free_port();
    let path = write_config(&dir, &port_config(port));
    let mut daemon = start_service(&path, &[], "info");
    expect_log(&daemon, "listening on");
    let other = free_port();
    std::fs::write(
        &path,
        format!("[daemon]\nhealth_port = {other}\n[gateway]\nport = {other}\n"),
    )
    .unwrap();
    daemon.signal("HUP");
    let line = expect_log(&daemon, "needs restart");
    assert!(line.contains("[daemon] health_port"), "{line}");
    assert_eq!(
        support::request(addr(port), "GET", "/health", &[], None).status,
        200
    );
    daemon.stop(EXIT_TIMEOUT);
}

#[test]
fn sighup_changes_the_log_level_live() {
    let dir = temp_dir("reload-log");
    let manager = Manager::bind_path(&dir.join("notify.sock"));
    let socket = dir.join("notify.sock");
    let port = free_port();
    let config = |level: &str| {
        format!(
            "[daemon]\nhealth_port = {port}\nlog_level = \"{level}\"\n[gateway]\nport = {port}\n"
        )
    };
    let path = write_config(&dir, &config("warn"));
    // No BLUFIO_LOG: the file's log_level rules, and a reload changes it.
    let mut daemon = start_service(&path, &[("NOTIFY_SOCKET", socket.to_str().unwrap())], "");
    manager.expect("READY=1");

    std::fs::write(&path, config("info")).unwrap();
    daemon.signal("HUP");
    expect_log(&daemon, "changed [daemon] log_level");

    manager.expect("READY=1");
    std::fs::write(&path, config("error")).unwrap();
    manager.drain();
    daemon.signal("HUP");
    manager.expect("RELOADING=1");
    manager.expect("READY=1");
    // At "error", the info line about SIGUSR1 is not written; the refused reload (an error)
    // that follows is.
    daemon.signal("USR1");
    std::fs::write(&path, "[daemon]\nlog_level = 3\n").unwrap();
    daemon.signal("HUP");
    let mut seen = Vec::new();
    let refused = loop {
        let line = daemon
            .lines()
            .recv_timeout(Duration::from_secs(20))
            .expect("the refused reload is logged");
        if line.contains("reload refused") {
            break line;
        }
        seen.push(line);
    };
    assert!(refused.contains("log_level"), "{refused}");
    assert!(
        seen.iter().all(|line| !line.contains("SIGUSR1")),
        "{seen:?}"
    );
    daemon.stop(EXIT_TIMEOUT);
}
