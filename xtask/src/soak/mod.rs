//! `cargo xtask soak --minutes N`: runs the `blufio` binary under mixed load for N minutes and
//! fails if its memory keeps growing.
//!
//! The daemon gets its own free port, a token (through `BLUFIO_GATEWAY_TOKEN`), the echo agent,
//! a daily budget and its own state directory, as a production daemon runs. Before starting
//! it, the soak runs `blufio check-config` on the generated configuration and stops with the
//! daemon's own message if the daemon refuses it: a configuration key the daemon no longer
//! accepts must fail the soak loudly, not as a daemon that exits before listening. A few plain
//! std threads drive a deliberately modest load (the soak checks for leaks, not throughput, and
//! must not starve a shared machine): probes and scrapes, session create/message/delete,
//! streamed (SSE) replies, messages that open sessions left to idle out, WebSockets, drip-fed
//! requests, and hostile clients (garbage lines, an HTTP/2 preface, oversized bodies and
//! heads, abandoned heads). Every second the main thread samples VmRSS from
//! `/proc/<pid>/status` and the heap and resident gauges from `/metrics`, into
//! `target/soak/soak.csv` and a hand-written `target/soak/soak.svg`.
//!
//! The bound, checked after the run: each of RSS and heap, taken as the median of the last ten
//! samples, may exceed its median over the ten samples ending at warm-up by at most
//! max(8 MiB, 25 %). Warm-up is a fifth of the run, at least 30 s (past the session idle
//! timeout, so the population of idle sessions has reached its steady state) and at most two
//! minutes. The run also fails if the daemon dies, stops answering `/metrics`, or does not exit
//! 0 on SIGTERM, and if the load itself went wrong: a kind of load that never succeeded, or more
//! than 1 % of all rounds failed (a soak whose requests are all refused would otherwise pass on
//! flat memory). It does not measure latency or throughput; `benches/gateway.rs` does.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use crate::process::{self, ChildGuard};
use crate::{Result, cargo, describe, run_status, target_dir};
use crate::{json, smoke};

/// The token the load uses; the soak daemon listens on 127.0.0.1 only.
const TOKEN: &str = "soak-token-0123456789abcdef";
/// Allowed growth after warm-up: the larger of this many bytes …
const GROWTH_FLOOR_BYTES: u64 = 8 * 1024 * 1024;
/// … and this percentage of the warm-up value.
const GROWTH_PERCENT: u64 = 25;
/// Samples whose median stands for "after warm-up" and "at the end".
const WINDOW: usize = 10;
/// Timeout of every load request: a stuck daemon shows up as failures, not a hung soak.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed load rounds allowed, per thousand rounds.
const MAX_FAILED_PERMILLE: u64 = 10;
/// `check-config` reads two small files; a minute means it hangs.
const CHECK_CONFIG_TIMEOUT: Duration = Duration::from_secs(60);
/// Start-up takes milliseconds natively; this only bounds a daemon that hangs.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Sessions opened by messages without an id idle out after this long.
const SESSION_IDLE_TIMEOUT_SECS: u64 = 20;

/// Runs `cargo xtask soak [--minutes N] [--seconds N] [--binary PATH] [--only LOAD]`;
/// `--only` runs one kind of load (see `LOADS`), to find which one makes memory grow.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut duration = Duration::from_secs(5 * 60);
    let mut binary: Option<PathBuf> = None;
    let mut only: Option<String> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let mut number = |name: &str| -> Result<u64> {
            let text = value(name)?;
            text.parse()
                .map_err(|_| format!("{name} needs a whole number, not `{text}`").into())
        };
        match arg.as_str() {
            "--minutes" => duration = Duration::from_secs(number("--minutes")?.saturating_mul(60)),
            "--seconds" => duration = Duration::from_secs(number("--seconds")?),
            "--binary" => binary = Some(value("--binary")?.into()),
            "--only" => only = Some(value("--only")?),
            other => return Err(format!("unknown soak argument `{other}`").into()),
        }
    }
    if let Some(only) = &only
        && !LOADS.iter().any(|(name, _)| name == only)
    {
        let names: Vec<&str> = LOADS.iter().map(|(name, _)| *name).collect();
        return Err(format!("unknown load `{only}`; the loads are {}", names.join(", ")).into());
    }
    let binary = match binary {
        Some(binary) => binary,
        None => {
            run_status(Command::new(cargo()).current_dir(root).args([
                "build",
                "--release",
                "--bin",
                "blufio",
            ]))?;
            target_dir(root).join("release/blufio")
        }
    };
    let out_dir = target_dir(root).join("soak");
    fs::create_dir_all(&out_dir)?;
    let state_dir = out_dir.join("state");
    // A previous run's spend must not count against this run's budget.
    if state_dir.exists() {
        fs::remove_dir_all(&state_dir)
            .map_err(|error| format!("cannot remove {}: {error}", state_dir.display()))?;
    }
    let config = out_dir.join("soak.toml");
    fs::write(&config, config_text(process::free_port()?, &state_dir)?)?;
    check_config(
        &binary,
        &config,
        &out_dir.join("check-config.log"),
        CHECK_CONFIG_TIMEOUT,
    )?;
    let mut child = daemon_command(&binary, "serve", &config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {}: {error}", binary.display()))?;
    let stderr = child
        .stderr
        .take()
        .ok_or("the daemon's stderr is not piped")?;
    let mut daemon = ChildGuard::new(child);
    let pid = daemon.id();
    let log = out_dir.join("daemon.log");
    let address = listening_address(stderr, &log, STARTUP_TIMEOUT)?;
    println!(
        "soak: {} (pid {pid}) on {address} for {} s; writing {}",
        binary.display(),
        duration.as_secs(),
        out_dir.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<Arc<LoadStats>> = LOADS
        .iter()
        .filter(|(name, _)| only.as_deref().is_none_or(|only| only == *name))
        .map(|&(name, load)| Arc::new(LoadStats::new(name, load)))
        .collect();
    let workers: Vec<_> = loads
        .iter()
        .map(|stats| {
            let stop = Arc::clone(&stop);
            let stats = Arc::clone(stats);
            thread::Builder::new()
                .name(format!("soak-{}", stats.name))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        stats.record((stats.load)(address));
                        thread::sleep(Duration::from_millis(20));
                    }
                })
        })
        .collect::<io::Result<_>>()?;

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut metric_failures = 0;
    let mut outcome: Result<()> = Ok(());
    while started.elapsed() < duration {
        let second = samples.len() as u64 + 1;
        thread::sleep(
            (started + Duration::from_secs(second)).saturating_duration_since(Instant::now()),
        );
        if let Some(status) = daemon.try_wait()? {
            outcome = Err(format!(
                "the daemon exited during the soak: {status}; the end of {}:\n{}",
                log.display(),
                log_tail(&log)
            )
            .into());
            break;
        }
        let gauges = smoke::get(address, "/metrics").ok().map(|response| {
            let text = String::from_utf8_lossy(&response.body).into_owned();
            let gauge = |name| smoke::metric_value(&text, name).map(|value| value as u64);
            (
                gauge("blufio_memory_heap_bytes"),
                gauge("blufio_memory_resident_bytes"),
            )
        });
        metric_failures = if gauges.is_some() {
            0
        } else {
            metric_failures + 1
        };
        if metric_failures >= 5 {
            outcome = Err("/metrics failed five times in a row".into());
            break;
        }
        let (heap, resident) = gauges.unwrap_or_default();
        let sample = Sample {
            second,
            rss: smoke::vm_rss_kib(pid).map(|kib| kib * 1024),
            heap,
            resident,
            ok: loads
                .iter()
                .map(|stats| stats.ok.load(Ordering::Relaxed))
                .sum(),
            failed: loads
                .iter()
                .map(|stats| stats.failed.load(Ordering::Relaxed))
                .sum(),
        };
        if second.is_multiple_of(60) {
            println!("soak: {}", sample.describe());
        }
        samples.push(sample);
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.join();
    }
    let warmup = warmup_samples(duration);
    fs::write(out_dir.join("soak.csv"), csv(&samples))?;
    fs::write(out_dir.join("soak.svg"), svg(&samples, warmup))?;
    outcome?;
    process::terminate(&daemon)?;
    match process::wait_timeout(&mut daemon, Duration::from_secs(30))? {
        Some(status) if status.success() => {}
        Some(status) => {
            return Err(format!(
                "the daemon exited with {status} on SIGTERM; the end of {}:\n{}",
                log.display(),
                log_tail(&log)
            )
            .into());
        }
        None => return Err("the daemon did not exit within 30 s of SIGTERM".into()),
    }
    let tallies: Vec<LoadTally> = loads.iter().map(|stats| stats.tally()).collect();
    // Both verdicts are printed before either fails the run, so a failed soak shows the whole
    // picture.
    let memory = check_bound(&samples, warmup);
    let load = check_loads(&tallies);
    for verdict in [&memory, &load] {
        match verdict {
            Ok(report) => println!("{report}"),
            Err(error) => println!("{error}"),
        }
    }
    match (memory, load) {
        (Ok(_), Ok(_)) => Ok(()),
        (Err(_), Ok(_)) => Err("the soak failed its memory bound (see above)".into()),
        (Ok(_), Err(_)) => Err("the soak's load went wrong (see above)".into()),
        (Err(_), Err(_)) => {
            Err("the soak failed its memory bound and its load went wrong (see above)".into())
        }
    }
}

/// The command line for the daemon under soak, with the environment every invocation shares
/// (`check-config` must judge exactly what `serve` will run with).
fn daemon_command(binary: &Path, subcommand: &str, config: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .env("BLUFIO_GATEWAY_TOKEN", TOKEN)
        .env("BLUFIO_LOG", "info")
        .stdin(Stdio::null());
    command
}

/// Runs `blufio check-config` on the generated configuration and fails with the daemon's own
/// message when it refuses it, so a key the daemon stopped accepting breaks the soak with a
/// reason instead of a daemon that never listens. Bounded in time: a daemon that hangs
/// reading its configuration fails the soak rather than stalling it.
fn check_config(binary: &Path, config: &Path, log: &Path, timeout: Duration) -> Result<()> {
    let output = fs::File::create(log)?;
    let mut command = daemon_command(binary, "check-config", config);
    command.stdout(output.try_clone()?).stderr(output);
    // A check that overruns its time is killed when the guard drops.
    let mut child = ChildGuard::new(
        command
            .spawn()
            .map_err(|error| format!("cannot start `{}`: {error}", describe(&command)))?,
    );
    match process::wait_timeout(&mut child, timeout)? {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!(
            "the daemon refuses the soak's configuration {} (`{}` exited with {status}); \
             update `config_text` in xtask/src/soak.rs:\n{}",
            config.display(),
            describe(&command),
            log_tail(log)
        )
        .into()),
        None => Err(format!(
            "`{}` did not finish within {} s",
            describe(&command),
            timeout.as_secs()
        )
        .into()),
    }
}

/// Returns the last lines of a log file (at most 4 KiB of it), for error messages.
fn log_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 4096;
    let Ok(mut file) = fs::File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let length = file.metadata().map_or(0, |meta| meta.len());
    let mut text = Vec::new();
    let read = file
        .seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)))
        .and_then(|_| file.take(TAIL_BYTES).read_to_end(&mut text));
    if let Err(error) = read {
        return format!("(cannot read {}: {error})", path.display());
    }
    let text = String::from_utf8_lossy(&text);
    // A cut at the start of the window leaves a partial first line; drop it.
    let text = if length > TAIL_BYTES {
        text.split_once('\n').map_or(&*text, |(_, rest)| rest)
    } else {
        &text
    };
    text.trim_end().to_owned()
}

/// One load thread's rounds: answered as expected, failed, and the first failure's reason.
#[derive(Debug)]
struct LoadStats {
    name: &'static str,
    load: Load,
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl LoadStats {
    fn new(name: &'static str, load: Load) -> LoadStats {
        LoadStats {
            name,
            load,
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    fn record(&self, round: io::Result<()>) {
        match round {
            Ok(()) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self
                    .first_error
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }

    fn tally(&self) -> LoadTally {
        LoadTally {
            name: self.name,
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            first_error: self
                .first_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }
}

/// What one load thread did over the run, for the verdict.
#[derive(Debug, Clone, PartialEq)]
struct LoadTally {
    name: &'static str,
    ok: u64,
    failed: u64,
    first_error: Option<String>,
}

/// Judges the load: every kind of load must have succeeded at least once, and at most
/// `MAX_FAILED_PERMILLE` of all rounds may have failed. Returns the per-load report.
///
/// A soak whose requests are refused (a wrong token, a route that moved, a body the daemon
/// stopped accepting) keeps memory flat and would pass the memory bound while testing nothing.
/// The allowance is a ratio, not zero: on a loaded machine a round can meet the 10 s I/O
/// timeout, and that is not what the soak is looking for.
fn check_loads(tallies: &[LoadTally]) -> Result<String> {
    // Threads running the same load are reported together, in the order of `LOADS`.
    let mut merged: Vec<LoadTally> = Vec::new();
    for tally in tallies {
        match merged.iter_mut().find(|seen| seen.name == tally.name) {
            Some(seen) => {
                seen.ok += tally.ok;
                seen.failed += tally.failed;
                if seen.first_error.is_none() {
                    seen.first_error.clone_from(&tally.first_error);
                }
            }
            None => merged.push(tally.clone()),
        }
    }
    let ok: u64 = merged.iter().map(|tally| tally.ok).sum();
    let failed: u64 = merged.iter().map(|tally| tally.failed).sum();
    let mut report = format!(
        "soak: {ok} load rounds ok, {failed} failed (an unexpected status or an I/O error)"
    );
    let mut failures = Vec::new();
    for tally in &merged {
        let _ = write!(
            report,
            "\nsoak:   {:10} {} ok, {} failed",
            tally.name, tally.ok, tally.failed
        );
        if let Some(error) = &tally.first_error {
            let _ = write!(report, " (first: {error})");
        }
        if tally.ok == 0 {
            failures.push(format!("load `{}` never succeeded", tally.name));
        }
    }
    if failed * 1000 > (ok + failed) * MAX_FAILED_PERMILLE {
        failures.push(format!(
            "{failed} of {} load rounds failed, more than {} %",
            ok + failed,
            MAX_FAILED_PERMILLE as f64 / 10.0
        ));
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(format!("{report}\n{}", failures.join("; ")).into())
    }
}

/// One per-second reading.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    second: u64,
    rss: Option<u64>,
    heap: Option<u64>,
    resident: Option<u64>,
    ok: u64,
    failed: u64,
}

impl Sample {
    fn describe(&self) -> String {
        format!(
            "t={}s rss={} heap={} resident={} ok={} failed={}",
            self.second,
            mib(self.rss),
            mib(self.heap),
            mib(self.resident),
            self.ok,
            self.failed
        )
    }
}

fn mib(bytes: Option<u64>) -> String {
    match bytes {
        Some(bytes) => format!("{:.1}MiB", bytes as f64 / 1048576.0),
        None => "-".to_owned(),
    }
}

/// Samples in the warm-up: a fifth of the run, at most two minutes, and at least until the
/// first sessions left to idle out have been evicted (the idle timeout plus 10 s), so the
/// population of idle sessions has reached its steady state before the bound's reference is
/// taken. A short run still keeps half of its samples after warm-up, and every warm-up holds at
/// least one window.
fn warmup_samples(duration: Duration) -> usize {
    let seconds = duration.as_secs();
    let warmup = (seconds / 5).clamp(SESSION_IDLE_TIMEOUT_SECS + 10, 120);
    (warmup.min(seconds / 2) as usize).max(WINDOW)
}

/// Returns the soak daemon's configuration: one listener on `port` (a port that was free a
/// moment ago), a short idle timeout that evicts the sessions messages without an id open,
/// a short request timeout that closes abandoned heads, and the echo agent under a daily
/// budget with spend kept in `state_dir`, as a production daemon runs. The echo agent is free,
/// so every reply passes the budget check and nothing is charged.
fn config_text(port: u16, state_dir: &Path) -> Result<String> {
    let state_dir = state_dir
        .to_str()
        .ok_or_else(|| format!("the state directory {} is not UTF-8", state_dir.display()))?;
    // Quoted as JSON, which is also a TOML basic string, so any path is quoted correctly.
    let state_dir = json::quote(state_dir);
    Ok(format!(
        "[daemon]\n\
         bind = \"127.0.0.1\"\n\
         health_port = {port}\n\
         monitor_interval_secs = 1\n\
         request_timeout_secs = 5\n\
         state_dir = {state_dir}\n\
         \n\
         [gateway]\n\
         port = {port}\n\
         max_sessions = 200\n\
         session_idle_timeout_secs = {SESSION_IDLE_TIMEOUT_SECS}\n\
         \n\
         [agent]\n\
         provider = \"echo\"\n\
         \n\
         [cost]\n\
         daily_budget_usd = 5.0\n"
    ))
}

/// Waits for the daemon's "listening on" line while a thread copies its whole log to `log`;
/// no polling of the port. Bounded in time, so a daemon that hangs before listening fails the
/// soak instead of stalling it; a daemon that exits fails it with the end of its log.
fn listening_address(stderr: ChildStderr, log: &Path, timeout: Duration) -> Result<SocketAddr> {
    let mut log_file = fs::File::create(log)?;
    let (sender, receiver) = mpsc::channel();
    thread::Builder::new()
        .name("soak-log".to_owned())
        .spawn(move || {
            let mut sender = Some(sender);
            for line in BufReader::new(stderr).lines().map_while(io::Result::ok) {
                let _ = writeln!(log_file, "{line}");
                if let Some(rest) = line.split("listening on http://").nth(1)
                    && let Some(sender) = sender.take()
                {
                    let address = rest.split_whitespace().next().unwrap_or_default();
                    let _ = sender.send(
                        address
                            .parse::<SocketAddr>()
                            .map_err(|_| format!("cannot read the address in `{line}`")),
                    );
                }
            }
        })?;
    match receiver.recv_timeout(timeout) {
        Ok(address) => Ok(address?),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!(
            "the daemon exited before listening; the end of {}:\n{}",
            log.display(),
            log_tail(log)
        )
        .into()),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "the daemon did not say \"listening on\" within {} s; see {}",
            timeout.as_secs(),
            log.display()
        )
        .into()),
    }
}

type Load = fn(SocketAddr) -> io::Result<()>;

/// The load mix: one thread per entry, each repeating its load with a 20 ms pause.
const LOADS: &[(&str, Load)] = &[
    ("probes", probes),
    ("sessions", sessions),
    ("sessions", sessions),
    ("stream", streamed_messages),
    ("messages", one_off_messages),
    ("websocket", websocket),
    ("slow", drip_fed_request),
    ("hostile", hostile),
];

fn probes(address: SocketAddr) -> io::Result<()> {
    for path in ["/health", "/metrics", "/v1/health"] {
        let mut stream = connect(address)?;
        let auth = if path == "/v1/health" {
            auth_header()
        } else {
            String::new()
        };
        send(
            &mut stream,
            &format!("GET {path} HTTP/1.1\r\nHost: soak\r\n{auth}Connection: close\r\n\r\n"),
        )?;
        expect_status(&mut stream, 200)?;
    }
    Ok(())
}

/// Creates a session, sends it three messages over one keep-alive connection, deletes it.
fn sessions(address: SocketAddr) -> io::Result<()> {
    let mut stream = connect(address)?;
    let body = request(&mut stream, "POST", "/v1/sessions", "{}", 201)?;
    let id = session_id(&body).ok_or_else(|| invalid("POST /v1/sessions answered no id"))?;
    for turn in 0..3 {
        let message =
            format!(r#"{{"session_id":"{id}","content":"soak turn {turn} of a session"}}"#);
        request(&mut stream, "POST", "/v1/messages", &message, 200)?;
    }
    request(
        &mut stream,
        "DELETE",
        &format!("/v1/sessions/{id}"),
        "",
        204,
    )?;
    Ok(())
}

/// Creates a session, streams three replies into it (SSE, one connection each, read to the
/// end), deletes it.
fn streamed_messages(address: SocketAddr) -> io::Result<()> {
    let mut control = connect(address)?;
    let body = request(&mut control, "POST", "/v1/sessions", "{}", 201)?;
    let id = session_id(&body).ok_or_else(|| invalid("POST /v1/sessions answered no id"))?;
    for turn in 0..3 {
        let message = format!(
            r#"{{"session_id":"{id}","content":"soak stream {turn} of a session","stream":true}}"#
        );
        let mut stream = connect(address)?;
        send(
            &mut stream,
            &format!(
                "POST /v1/messages HTTP/1.1\r\nHost: soak\r\n{}Content-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{message}",
                auth_header(),
                message.len()
            ),
        )?;
        let head = read_head(&mut stream)?;
        let mut events = Vec::new();
        stream.take(1 << 20).read_to_end(&mut events)?;
        if status_of(&head) != Some(200) {
            return Err(invalid(&format!(
                "streamed POST /v1/messages: {}",
                head.lines().next().unwrap_or("")
            )));
        }
        if !String::from_utf8_lossy(&events).contains("event: done") {
            return Err(invalid("a streamed reply ended without a done event"));
        }
    }
    request(
        &mut control,
        "DELETE",
        &format!("/v1/sessions/{id}"),
        "",
        204,
    )?;
    Ok(())
}

/// A message without a session id opens a session that stays until the idle timeout.
fn one_off_messages(address: SocketAddr) -> io::Result<()> {
    let mut stream = connect(address)?;
    let result = request(
        &mut stream,
        "POST",
        "/v1/messages",
        r#"{"content":"one-off"}"#,
        200,
    );
    // The pause keeps the sessions left to idle out at about 90 (one per 220 ms for the 20 s
    // idle timeout), well under max_sessions: a 503 session_limit counts as a failed round.
    thread::sleep(Duration::from_millis(200));
    result.map(drop)
}

/// Opens /ws, exchanges five messages, closes cleanly.
fn websocket(address: SocketAddr) -> io::Result<()> {
    let mut stream = connect(address)?;
    send(
        &mut stream,
        &format!(
            "GET /ws HTTP/1.1\r\nHost: soak\r\n{}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
            auth_header()
        ),
    )?;
    let head = read_head(&mut stream)?;
    if !head.starts_with("HTTP/1.1 101") {
        return Err(invalid("no 101 Switching Protocols"));
    }
    for turn in 0..5 {
        let text = format!(r#"{{"content":"websocket turn {turn}"}}"#);
        write_frame(&mut stream, 0x1, text.as_bytes())?;
        let (opcode, payload) = read_frame(&mut stream)?;
        if opcode != 0x1 || !String::from_utf8_lossy(&payload).contains("websocket turn") {
            return Err(invalid("unexpected WebSocket reply"));
        }
        thread::sleep(Duration::from_millis(50));
    }
    write_frame(&mut stream, 0x8, &1000u16.to_be_bytes())?;
    let _ = read_frame(&mut stream);
    Ok(())
}

/// Sends a request head in `DRIP_PIECES` pieces 150 ms apart, then reads the answer.
///
/// Not byte by byte: trillium-http 1.6.1 grows its head buffer on every read
/// (`Buffer::expand` doubles a full buffer), so a head dripped one byte per read drives the heap
/// to hundreds of MiB, past any bound, within a second; that is a bug of its own, reproduced
/// by the hostile tests, and would hide every slower leak the soak looks for.
fn drip_fed_request(address: SocketAddr) -> io::Result<()> {
    const DRIP_PIECES: usize = 6;
    let head: &[u8] = b"GET /health HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n";
    let mut stream = connect(address)?;
    stream.set_nodelay(true)?;
    for piece in head.chunks(head.len().div_ceil(DRIP_PIECES)) {
        stream.write_all(piece)?;
        thread::sleep(Duration::from_millis(150));
    }
    expect_status(&mut stream, 200)
}

/// Hostile clients, one of each per round; the daemon must refuse each and keep serving.
fn hostile(address: SocketAddr) -> io::Result<()> {
    let attacks: [&[u8]; 4] = [
        b"GARBAGE GARBAGE GARBAGE\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nHost: soak\r\nContent-Length: 100000000\r\n\r\n{\"content\":\"",
        b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Padding: ",
    ];
    for attack in attacks {
        let mut stream = connect(address)?;
        stream.write_all(attack)?;
        if attack.ends_with(b": ") {
            // A head that grows past any sane size: 128 KiB of one header value.
            let _ = stream.write_all(&[b'a'; 128 * 1024]);
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = stream.take(1 << 20).read_to_end(&mut sink);
    }
    // An abandoned head: the daemon must close it at its request deadline.
    let mut stream = connect(address)?;
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: ")?;
    thread::sleep(Duration::from_millis(200));
    Ok(())
}

fn connect(address: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&address, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Writes a whole request in one write, as curl and browsers do.
///
/// `write!` on an unbuffered stream makes one write per formatted piece (eight for a message
/// head); whether the daemon then reads the head in few or many reads depends on the timing of
/// the machine, and a head read in more than seven reads is closed without a status by the
/// daemon as of this writing (about 3 in 1,000 nine-write heads on loopback). Split heads are
/// the drip load's business, with a fixed number of pieces; the other loads must not depend on
/// scheduling.
fn send(stream: &mut TcpStream, request: &str) -> io::Result<()> {
    stream.write_all(request.as_bytes())
}

fn auth_header() -> String {
    format!("Authorization: Bearer {TOKEN}\r\n")
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Sends one keep-alive request with a JSON body and returns the response body.
fn request(
    stream: &mut TcpStream,
    method: &str,
    path: &str,
    body: &str,
    status: u16,
) -> io::Result<String> {
    send(
        stream,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: soak\r\n{}Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            auth_header(),
            body.len()
        ),
    )?;
    let head = read_head(stream)?;
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    if status_of(&head) != Some(status) {
        return Err(invalid(&format!(
            "{method} {path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn expect_status(stream: &mut TcpStream, status: u16) -> io::Result<()> {
    let head = read_head(stream)?;
    let mut sink = Vec::new();
    let _ = stream.take(1 << 20).read_to_end(&mut sink);
    if status_of(&head) == Some(status) {
        Ok(())
    } else {
        Err(invalid("unexpected status"))
    }
}

fn status_of(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Reads up to and including the blank line that ends a response head.
fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut byte = [0];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 || stream.read(&mut byte)? == 0 {
            return Err(invalid("truncated response head"));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Writes one masked client frame (RFC 6455 §5.2); payloads here are under 64 KiB.
fn write_frame(stream: &mut TcpStream, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        length @ 0..=125 => frame.push(0x80 | length as u8),
        length => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(
                &u16::try_from(length)
                    .map_err(|_| invalid("frame"))?
                    .to_be_bytes(),
            );
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(
        payload
            .iter()
            .zip(mask.iter().cycle())
            .map(|(byte, key)| byte ^ key),
    );
    stream.write_all(&frame)
}

/// Reads one unmasked server frame and returns its opcode and payload.
fn read_frame(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut header = [0; 2];
    stream.read_exact(&mut header)?;
    let length = match header[1] & 0x7f {
        126 => {
            let mut bytes = [0; 2];
            stream.read_exact(&mut bytes)?;
            u64::from(u16::from_be_bytes(bytes))
        }
        127 => {
            let mut bytes = [0; 8];
            stream.read_exact(&mut bytes)?;
            u64::from_be_bytes(bytes)
        }
        length => u64::from(length),
    };
    if length > 1 << 20 {
        return Err(invalid("oversized WebSocket frame"));
    }
    let mut payload = vec![0; length as usize];
    stream.read_exact(&mut payload)?;
    Ok((header[0] & 0x0f, payload))
}

/// Returns the `id` of a `POST /v1/sessions` answer.
fn session_id(answer: &str) -> Option<String> {
    json::string(answer, "id")
}

fn csv(samples: &[Sample]) -> String {
    let mut text =
        String::from("second,rss_bytes,heap_bytes,resident_bytes,requests_ok,requests_failed\n");
    let field = |value: Option<u64>| value.map(|value| value.to_string()).unwrap_or_default();
    for sample in samples {
        // Writing to a String cannot fail.
        let _ = writeln!(
            text,
            "{},{},{},{},{},{}",
            sample.second,
            field(sample.rss),
            field(sample.heap),
            field(sample.resident),
            sample.ok,
            sample.failed
        );
    }
    text
}

/// The series a soak plots and bounds, with the colour of its line.
/// Reads one series' value from a sample.
type Reading = fn(&Sample) -> Option<u64>;

const SERIES: [(&str, Reading, &str); 3] = [
    ("rss", |sample| sample.rss, "#d62728"),
    ("heap", |sample| sample.heap, "#1f77b4"),
    ("resident", |sample| sample.resident, "#2ca02c"),
];

fn svg(samples: &[Sample], warmup: usize) -> String {
    const WIDTH: f64 = 800.0;
    const HEIGHT: f64 = 400.0;
    const MARGIN: f64 = 50.0;
    let last_second = samples.last().map_or(1, |sample| sample.second.max(1)) as f64;
    let top = SERIES
        .iter()
        .flat_map(|(_, value, _)| samples.iter().filter_map(value))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let x = |second: u64| MARGIN + second as f64 / last_second * (WIDTH - 2.0 * MARGIN);
    let y = |bytes: u64| HEIGHT - MARGIN - bytes as f64 / top * (HEIGHT - 2.0 * MARGIN);
    let mut text = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{MARGIN}\" y=\"20\">blufio soak: memory over {last_second} s (max {:.1} MiB)</text>\n\
         <line x1=\"{MARGIN}\" y1=\"{bottom}\" x2=\"{right}\" y2=\"{bottom}\" stroke=\"black\"/>\n\
         <line x1=\"{MARGIN}\" y1=\"{MARGIN}\" x2=\"{MARGIN}\" y2=\"{bottom}\" stroke=\"black\"/>\n",
        top / 1.1 / 1048576.0,
        bottom = HEIGHT - MARGIN,
        right = WIDTH - MARGIN,
    );
    if let Some(sample) = samples.get(warmup.saturating_sub(1)) {
        let _ = writeln!(
            text,
            "<line x1=\"{0:.1}\" y1=\"{MARGIN}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"gray\" \
             stroke-dasharray=\"4\"/><text x=\"{0:.1}\" y=\"{2}\">warm-up</text>",
            x(sample.second),
            HEIGHT - MARGIN,
            MARGIN - 5.0
        );
    }
    for (index, (name, value, colour)) in SERIES.iter().enumerate() {
        let points: Vec<String> = samples
            .iter()
            .filter_map(|sample| Some(format!("{:.1},{:.1}", x(sample.second), y(value(sample)?))))
            .collect();
        let _ = writeln!(
            text,
            "<polyline fill=\"none\" stroke=\"{colour}\" points=\"{}\"/>\n\
             <text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>",
            points.join(" "),
            WIDTH - MARGIN - 60.0,
            MARGIN + 15.0 * index as f64
        );
    }
    let _ = writeln!(
        text,
        "<text x=\"{MARGIN}\" y=\"{}\">0 s</text><text x=\"{}\" y=\"{}\">{last_second} s</text>\n</svg>",
        HEIGHT - MARGIN + 15.0,
        WIDTH - MARGIN - 30.0,
        HEIGHT - MARGIN + 15.0
    );
    text
}

fn median(mut values: Vec<u64>) -> Option<u64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

/// Checks the growth bound for RSS and heap; returns the start/peak/end report.
fn check_bound(samples: &[Sample], warmup: usize) -> Result<String> {
    if samples.len() < warmup + WINDOW {
        return Err(format!(
            "the soak took {} samples, fewer than warm-up ({warmup}) plus {WINDOW}",
            samples.len()
        )
        .into());
    }
    let mut report = String::new();
    let mut failures = Vec::new();
    for (name, value, _) in SERIES {
        let all: Vec<u64> = samples.iter().filter_map(value).collect();
        let (Some(start), Some(peak)) = (all.first(), all.iter().max()) else {
            continue;
        };
        let window = |range: &[Sample]| median(range.iter().filter_map(value).collect());
        let after_warmup = window(&samples[warmup - WINDOW..warmup]);
        let end = window(&samples[samples.len() - WINDOW..]);
        let (Some(after_warmup), Some(end)) = (after_warmup, end) else {
            continue;
        };
        let bound = after_warmup + (after_warmup * GROWTH_PERCENT / 100).max(GROWTH_FLOOR_BYTES);
        let checked = name != "resident";
        let _ = writeln!(
            report,
            "soak: {name:8} start {} after warm-up {} peak {} end {}{}",
            mib(Some(*start)),
            mib(Some(after_warmup)),
            mib(Some(*peak)),
            mib(Some(end)),
            if checked {
                format!(" (bound {})", mib(Some(bound)))
            } else {
                String::new()
            }
        );
        if checked && end > bound {
            failures.push(format!(
                "{name} grew from {} after warm-up to {} at the end, past the bound {}",
                mib(Some(after_warmup)),
                mib(Some(end)),
                mib(Some(bound))
            ));
        }
    }
    if failures.is_empty() {
        Ok(report.trim_end().to_owned())
    } else {
        Err(format!("{report}{}", failures.join("; ")).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss: impl Fn(u64) -> u64, count: u64) -> Vec<Sample> {
        (1..=count)
            .map(|second| Sample {
                second,
                rss: Some(rss(second)),
                heap: Some(4 << 20),
                resident: None,
                ok: second * 10,
                failed: 0,
            })
            .collect()
    }

    #[test]
    fn flat_memory_passes_the_bound() {
        let flat = samples(|second| (20 << 20) + second % 3 * 4096, 100);
        let report = check_bound(&flat, 20).unwrap();
        assert!(report.contains("rss      start 20.0MiB"), "{report}");
        assert!(report.contains("bound 28.0MiB"), "{report}");
    }

    #[test]
    fn growth_past_the_floor_and_percentage_fails() {
        // 20 MiB after warm-up; the bound is 20 + max(8, 5) = 28 MiB. It ends near 30 MiB.
        let leaking = samples(
            |second| (20 << 20) + second.saturating_sub(20) * (128 << 10),
            100,
        );
        let error = check_bound(&leaking, 20).unwrap_err().to_string();
        assert!(error.contains("rss grew from"), "{error}");
        // The same growth on 100 MiB stays within 25 % and passes.
        let large = samples(
            |second| (100 << 20) + second.saturating_sub(20) * (128 << 10),
            100,
        );
        assert!(check_bound(&large, 20).is_ok());
    }

    #[test]
    fn warmup_outlasts_the_session_idle_timeout_and_leaves_half_a_short_run() {
        // One minute: 30 s of warm-up (past the first idle evictions), 30 s measured.
        assert_eq!(warmup_samples(Duration::from_secs(60)), 30);
        // Long runs: a fifth, at most two minutes.
        assert_eq!(warmup_samples(Duration::from_secs(5 * 60)), 60);
        assert_eq!(warmup_samples(Duration::from_secs(30 * 60)), 120);
        // Short runs keep half their samples after warm-up, and at least one window.
        assert_eq!(warmup_samples(Duration::from_secs(40)), 20);
        assert_eq!(warmup_samples(Duration::from_secs(5)), WINDOW);
    }

    #[test]
    fn a_run_shorter_than_warmup_fails() {
        assert!(check_bound(&samples(|_| 1, 15), 10).is_err());
    }

    #[test]
    fn csv_has_a_row_per_sample_and_blanks_for_missing_values() {
        let text = csv(&samples(|second| second * 1024, 3));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0],
            "second,rss_bytes,heap_bytes,resident_bytes,requests_ok,requests_failed"
        );
        assert_eq!(lines[2], "2,2048,4194304,,20,0");
    }

    #[test]
    fn svg_draws_one_polyline_point_per_present_value() {
        let text = svg(&samples(|second| second << 20, 30), 10);
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
        let polylines: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("<polyline"))
            .collect();
        // rss and heap have 30 points each; resident has none.
        assert_eq!(polylines.len(), 3);
        assert_eq!(polylines[0].matches(',').count(), 30);
        assert_eq!(polylines[2].matches(',').count(), 0);
        assert!(text.contains("warm-up"));
    }

    fn tally(name: &'static str, ok: u64, failed: u64) -> LoadTally {
        LoadTally {
            name,
            ok,
            failed,
            first_error: (failed > 0).then(|| format!("{name} broke")),
        }
    }

    #[test]
    fn a_load_that_never_succeeded_fails_the_soak_with_its_first_error() {
        let error = check_loads(&[tally("probes", 500, 0), tally("sessions", 0, 40)])
            .unwrap_err()
            .to_string();
        assert!(error.contains("load `sessions` never succeeded"), "{error}");
        assert!(error.contains("(first: sessions broke)"), "{error}");
    }

    #[test]
    fn failures_above_one_percent_of_rounds_fail_the_soak() {
        // 10 of 1,000 rounds is the allowance; 11 of 1,001 is past it.
        let at_limit = check_loads(&[tally("probes", 990, 10)]).unwrap();
        assert!(
            at_limit.contains("990 load rounds ok, 10 failed"),
            "{at_limit}"
        );
        let error = check_loads(&[tally("probes", 990, 11)])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("11 of 1001 load rounds failed, more than 1 %"),
            "{error}"
        );
    }

    #[test]
    fn threads_running_the_same_load_are_reported_together() {
        let report = check_loads(&[
            tally("sessions", 100, 0),
            tally("probes", 50, 0),
            tally("sessions", 80, 1),
        ])
        .unwrap();
        let lines: Vec<&str> = report.lines().collect();
        assert_eq!(lines.len(), 3, "{report}");
        assert!(
            lines[1].contains("sessions   180 ok, 1 failed (first: sessions broke)"),
            "{report}"
        );
        assert!(lines[2].contains("probes     50 ok, 0 failed"), "{report}");
    }

    #[test]
    fn config_sets_both_ports_a_daily_budget_and_a_quoted_state_dir() {
        let text = config_text(4321, Path::new("/tmp/soak \"state\"\\dir")).unwrap();
        assert!(text.contains("health_port = 4321\n"), "{text}");
        assert!(text.contains("[gateway]\nport = 4321\n"), "{text}");
        assert!(
            text.contains(r#"state_dir = "/tmp/soak \"state\"\\dir""#),
            "{text}"
        );
        // The daily budget lives in [cost]; [agent] budget_usd is refused since it landed.
        assert!(
            text.contains("[agent]\nprovider = \"echo\"\n\n[cost]\ndaily_budget_usd = 5.0\n"),
            "{text}"
        );
    }

    /// A fresh directory per test and process, so parallel tests and runs never share files.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("blufio-soak-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes an executable shell script that stands in for the daemon.
    fn fake_daemon(name: &str, script: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;

        let path = temp_dir(name).join("blufio");
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_refused_configuration_fails_the_soak_with_the_daemons_message() {
        let binary = fake_daemon(
            "refused",
            "echo \"blufio: $3: [agent] budget_usd: was a lifetime limit\" >&2; exit 78",
        );
        let log = binary.with_file_name("check-config.log");
        let error = check_config(
            &binary,
            Path::new("soak.toml"),
            &log,
            Duration::from_secs(60),
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("refuses the soak's configuration"),
            "{error}"
        );
        assert!(error.contains("exit status: 78"), "{error}");
        assert!(
            error.contains("blufio: soak.toml: [agent] budget_usd: was a lifetime limit"),
            "{error}"
        );
        let accepted = fake_daemon("accepted", "test \"$1 $2\" = \"check-config --config\"");
        let log = accepted.with_file_name("check-config.log");
        check_config(
            &accepted,
            Path::new("soak.toml"),
            &log,
            Duration::from_secs(60),
        )
        .unwrap();
    }

    #[test]
    fn a_check_config_that_hangs_fails_the_soak_in_bounded_time() {
        let binary = fake_daemon("hangs", "exec sleep 60");
        let log = binary.with_file_name("check-config.log");
        let started = Instant::now();
        let error = check_config(
            &binary,
            Path::new("soak.toml"),
            &log,
            Duration::from_secs(1),
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("did not finish within 1 s"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    fn piped_stderr(script: &str) -> (Child, ChildStderr) {
        let mut child = Command::new("/bin/sh")
            .args(["-c", script])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        (child, stderr)
    }

    #[test]
    fn the_listening_line_gives_the_address_and_an_early_exit_gives_the_log() {
        let dir = temp_dir("listening");
        let (mut child, stderr) = piped_stderr(
            "echo '[INFO  blufio::daemon] listening on http://127.0.0.1:4321 (health)' >&2",
        );
        let address = listening_address(stderr, &dir.join("up.log"), Duration::from_secs(60));
        assert_eq!(address.unwrap(), "127.0.0.1:4321".parse().unwrap());
        child.wait().unwrap();

        let (mut child, stderr) =
            piped_stderr("echo 'blufio: soak.toml: [cost] nonsense: unknown field' >&2; exit 78");
        let error = listening_address(stderr, &dir.join("down.log"), Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(error.contains("exited before listening"), "{error}");
        assert!(error.contains("[cost] nonsense: unknown field"), "{error}");
        child.wait().unwrap();
    }

    #[test]
    fn session_id_is_read_from_the_json_answer() {
        let body = r#"{"id":"abc123","created_at":5}"#;
        assert_eq!(session_id(body).as_deref(), Some("abc123"));
        // Whitespace and key order are the serializer's choice, not a format change.
        let spaced = "{ \"created_at\": 5,\n  \"id\" : \"abc123\" }";
        assert_eq!(session_id(spaced).as_deref(), Some("abc123"));
        assert_eq!(session_id(r#"{"created_at":5}"#), None);
        assert_eq!(session_id(r#"{"id":7}"#), None);
        assert_eq!(session_id("not json"), None);
    }
}
