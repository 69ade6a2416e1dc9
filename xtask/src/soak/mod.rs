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
//!
//! This file holds the options and the run; the daemon's configuration and start are in
//! `daemon.rs`, the load mix in `loads.rs` over the HTTP and WebSocket client in `client.rs`,
//! and the samples, their CSV and SVG and the growth bound in `memory.rs`.

mod client;
mod daemon;
mod loads;
mod memory;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use blufio_testkit::process::{KillOnDrop, signal, try_free_port, wait_timeout};
use blufio_testkit::temp::TempDir;

use crate::project::{Result, cargo, run_status, target_dir};
use daemon::{check_config, config_text, daemon_command, listening_address, log_tail};
use loads::{LOADS, LoadStats, LoadTally, check_loads};
use memory::{Sample, check_bound, csv, svg, warmup_samples};

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
    // A fresh state directory, so no earlier spend counts against this run's budget; declared
    // before the daemon, so it is removed after the daemon is stopped or killed, on every way
    // out of the run (a failure included).
    let state_dir = TempDir::new("soak-state")
        .map_err(|error| format!("cannot create the soak's state directory: {error}"))?;
    let config = out_dir.join("soak.toml");
    fs::write(&config, config_text(try_free_port()?, &state_dir)?)?;
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
    let mut daemon = KillOnDrop::new(child);
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
        let gauges = memory::gauges(address);
        metric_failures = if gauges.is_some() {
            0
        } else {
            metric_failures + 1
        };
        if metric_failures >= 5 {
            outcome = Err("/metrics failed five times in a row".into());
            break;
        }
        let sample = Sample::read(second, pid, gauges.unwrap_or_default(), &loads);
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
    signal(daemon.id(), "TERM")?;
    match wait_timeout(&mut daemon, Duration::from_secs(30))? {
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
