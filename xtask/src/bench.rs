//! `cargo xtask bench [--quick] [--json PATH] [--binary PATH] [--floor PATH] [--env K=V]...`: blufio's
//! footprint and per-request cost measured side by side with a floor, in one interleaved run.
//!
//! The floor (`benches/floor/`, its own workspace so the normal build never compiles it) is a
//! bare trillium-smol server on jemalloc, built with the root's release profile, answering
//! `/health` and `/metrics` from constants. Absolute numbers on a shared machine move by ±15%
//! from run to run, so every ratio comes from one run in which the two sides alternate (A, B
//! then B, A rounds) with the same connection count and the same warm-up.
//!
//! Rows: binary sizes; idle VmRSS, RssAnon, RssFile and threads; cold start to the first 200
//! (median); `/health` and `/metrics` req/s, p50 and p99 at 64 keep-alive connections from a
//! load generator here that sends each request in one write; `POST /v1/messages` with the echo
//! agent; RSS after the load and after a pause; RSS with 10,000 idle keep-alive connections and
//! 10,000 open sessions; the heap each of 1,000 idle WebSockets holds; and, from `cargo bench
//! --bench alloc` (a counting allocator), the allocations per `/health` and the cost of one
//! monitor tick.
//!
//! It does not judge the numbers: the table is for people and `--json` for comparing commits.
//! `--quick` is a smoke mode (short rounds, fewer connections, the allocation bench in the
//! debug profile) that proves the bench still works; its figures mean little.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::smoke::{free_port, terminate, wait_timeout};
use crate::{Result, cargo, describe, run_output, run_status, target_dir};

/// The bearer token of the benchmarked daemon.
const TOKEN: &str = "bench-token-0123456789";
/// Keep-alive connections of the throughput rows, as in the issue's measurements.
const CONNECTIONS: usize = 64;
/// How long a side may take to answer its first `/health`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Sockets of the load generator wait this long for a response before the run fails.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than blufio's default `monitor_interval_secs` (5 s), so `/health` reports a heap
/// sampled after the change being measured.
const MONITOR_SAMPLE_WAIT: Duration = Duration::from_secs(6);

/// How much of everything one run does.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Interleaved rounds per throughput row.
    rounds: usize,
    /// Length of one side's turn in a round.
    turn: Duration,
    /// Cold starts per side (the median is reported).
    cold_starts: usize,
    /// Idle keep-alive connections held open at once.
    idle_connections: usize,
    /// Sessions opened for the per-session row.
    sessions: usize,
    /// Idle WebSockets held open for the per-socket heap row.
    websockets: usize,
    /// The pause after the load before the "settled" RSS is read.
    settle: Duration,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            rounds: 3,
            turn: Duration::from_secs(4),
            cold_starts: 7,
            idle_connections: 10_000,
            sessions: 10_000,
            websockets: 1_000,
            settle: Duration::from_secs(10),
        }
    }

    fn quick() -> Plan {
        Plan {
            rounds: 1,
            turn: Duration::from_millis(500),
            cold_starts: 5,
            idle_connections: 500,
            sessions: 500,
            websockets: 200,
            settle: Duration::from_secs(1),
        }
    }
}

/// Command-line options.
#[derive(Debug, Default)]
struct Options {
    quick: bool,
    json: Option<PathBuf>,
    binary: Option<PathBuf>,
    floor: Option<PathBuf>,
    /// `KEY=VALUE` pairs set for the blufio side only, to try a run-time knob.
    env: Vec<(String, String)>,
}

fn parse_options(args: &[String]) -> Result<Options> {
    let mut options = Options::default();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut path = |flag: &str| -> Result<PathBuf> {
            Ok(PathBuf::from(
                args.next().ok_or(format!("{flag} needs a path"))?,
            ))
        };
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--json" => options.json = Some(path("--json")?),
            "--binary" => options.binary = Some(path("--binary")?),
            "--floor" => options.floor = Some(path("--floor")?),
            "--env" => {
                let pair = args.next().ok_or("--env needs KEY=VALUE")?;
                let (key, value) = pair
                    .split_once('=')
                    .ok_or(format!("--env needs KEY=VALUE, not `{pair}`"))?;
                options.env.push((key.to_owned(), value.to_owned()));
            }
            other => return Err(format!("bench: unexpected argument `{other}`").into()),
        }
    }
    Ok(options)
}

/// Runs the `bench` task.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let options = parse_options(args)?;
    let plan = if options.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    let started = Instant::now();
    let work_dir = target_dir(root).join("bench");
    fs::create_dir_all(&work_dir)?;
    check_floor_lock(root)?;

    let mut report = Report::new(if options.quick { "quick" } else { "full" });
    let binaries = build(root, &options, &work_dir)?;
    report.push(
        "binary size, default features",
        Unit::Bytes,
        file_size(&binaries.blufio),
        file_size(&binaries.floor),
    );
    report.push(
        "binary size, core only (no optional features)",
        Unit::Bytes,
        binaries.core.as_deref().and_then(file_size),
        file_size(&binaries.floor),
    );
    let build_time = started.elapsed();

    let wanted_fds = (plan.idle_connections + 1_000) as u64;
    let fds = raise_nofile_limit(wanted_fds)?;
    // The children inherit the raised limit; keep headroom for the daemon's own files.
    let idle_connections = plan
        .idle_connections
        .min(usize::try_from(fds.saturating_sub(1_000)).unwrap_or(0));
    if idle_connections < plan.idle_connections {
        eprintln!(
            "bench: the open-files hard limit is {fds}: holding {idle_connections} idle \
             connections instead of {}",
            plan.idle_connections
        );
    }
    let config = work_dir.join("blufio.toml");

    // Cold start: spawn to first 200, alternating sides.
    let mut cold = [Vec::new(), Vec::new()];
    for _ in 0..plan.cold_starts {
        for (index, side) in [Side::Blufio, Side::Floor].into_iter().enumerate() {
            let server = Server::start(side, &binaries, &config, 4_400)?;
            cold[index].push(server.cold_start.as_secs_f64() * 1e3);
            server.stop()?;
        }
    }
    report.push(
        "cold start to first 200, median",
        Unit::Millis,
        median(&cold[0]),
        median(&cold[1]),
    );

    // The long-lived pair. The floor's /metrics body is as long as blufio's.
    let blufio = Server::start(Side::Blufio, &binaries, &config, 0)?;
    let metrics_bytes = get(blufio.addr, "/metrics")?.1;
    let floor = Server::start(Side::Floor, &binaries, &config, metrics_bytes)?;
    let servers = [&blufio, &floor];
    for server in servers {
        warm_up(server.addr)?;
    }
    thread::sleep(Duration::from_secs(1));
    let idle = [blufio.status()?, floor.status()?];
    push_status_rows(&mut report, "idle", &idle);
    report.push(
        "heap in use idle (jemalloc allocated)",
        Unit::Mebibytes,
        heap_bytes(blufio.addr)?,
        None,
    );
    report.push(
        "idle threads",
        Unit::Count,
        Some(idle[0].threads as f64),
        Some(idle[1].threads as f64),
    );

    // Throughput rows: A, B then B, A, so neither side always runs on a warmer machine.
    for (route, path) in [("/health", "/health"), ("/metrics", "/metrics")] {
        let request: Arc<[u8]> = request_bytes("GET", path, "").into();
        let mut results = [LoadResult::default(), LoadResult::default()];
        for round in 0..plan.rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for index in order {
                let request = Arc::clone(&request);
                let result = load(servers[index].addr, CONNECTIONS, plan.turn, move |_| {
                    Ok(request.to_vec())
                })?;
                results[index].merge(result);
            }
        }
        push_load_rows(&mut report, route, Some(&results[0]), Some(&results[1]));
    }
    report.note(format!(
        "/metrics body: {metrics_bytes} bytes on both sides"
    ));

    // The gateway path has no floor: the row is there to catch regressions.
    let mut messages = LoadResult::default();
    for _ in 0..plan.rounds {
        messages.merge(load(blufio.addr, CONNECTIONS, plan.turn, message_request)?);
    }
    push_load_rows(
        &mut report,
        "POST /v1/messages (echo)",
        Some(&messages),
        None,
    );

    let after_load = [blufio.status()?, floor.status()?];
    push_status_rows(&mut report, "after the load", &after_load);
    thread::sleep(plan.settle);
    let settled = [blufio.status()?, floor.status()?];
    push_status_rows(
        &mut report,
        &format!("{} s after the load", plan.settle.as_secs()),
        &settled,
    );
    report.push(
        &format!(
            "heap in use {} s after the load (jemalloc allocated)",
            plan.settle.as_secs()
        ),
        Unit::Mebibytes,
        heap_bytes(blufio.addr)?,
        None,
    );

    blufio.stop()?;
    floor.stop()?;

    // Capacity rows on a fresh pair, so memory the load left in the allocator does not hide
    // what sessions and connections cost.
    let blufio = Server::start(Side::Blufio, &binaries, &config, 0)?;
    let floor = Server::start(Side::Floor, &binaries, &config, metrics_bytes)?;
    let servers = [&blufio, &floor];
    for server in servers {
        warm_up(server.addr)?;
    }
    thread::sleep(Duration::from_secs(1));

    // Open sessions (blufio only).
    let before = blufio.status()?;
    open_sessions(blufio.addr, plan.sessions)?;
    thread::sleep(Duration::from_millis(500));
    let during = blufio.status()?;
    report.push(
        &format!("VmRSS with {} open sessions", plan.sessions),
        Unit::Mebibytes,
        Some(during.vm_rss as f64),
        None,
    );
    report.push(
        &format!("RssAnon with {} open sessions", plan.sessions),
        Unit::Mebibytes,
        Some(during.rss_anon as f64),
        None,
    );
    report.push(
        "VmRSS per open session",
        Unit::Bytes,
        Some(during.vm_rss.saturating_sub(before.vm_rss) as f64 / plan.sessions.max(1) as f64),
        None,
    );
    report.push(
        "RssAnon per open session",
        Unit::Bytes,
        Some(during.rss_anon.saturating_sub(before.rss_anon) as f64 / plan.sessions.max(1) as f64),
        None,
    );
    // Idle keep-alive connections, one side at a time so the load generator's file
    // descriptors suffice.
    let mut per_connection = [None, None];
    let mut per_connection_anon = [None, None];
    let mut with_connections = [ProcStatus::default(), ProcStatus::default()];
    for (index, server) in servers.into_iter().enumerate() {
        let before = server.status()?;
        let connections = open_idle_connections(server.addr, idle_connections)?;
        thread::sleep(Duration::from_secs(1));
        let during = server.status()?;
        drop(connections);
        per_connection[index] = Some(
            during.vm_rss.saturating_sub(before.vm_rss) as f64 / idle_connections.max(1) as f64,
        );
        per_connection_anon[index] = Some(
            during.rss_anon.saturating_sub(before.rss_anon) as f64 / idle_connections.max(1) as f64,
        );
        with_connections[index] = during;
    }
    push_status_rows(
        &mut report,
        &format!("with {idle_connections} idle connections"),
        &with_connections,
    );
    report.push(
        "VmRSS per idle connection",
        Unit::Bytes,
        per_connection[0],
        per_connection[1],
    );
    report.push(
        "RssAnon per idle connection",
        Unit::Bytes,
        per_connection_anon[0],
        per_connection_anon[1],
    );

    // Idle WebSockets (blufio only): heap, not RSS, because that is what the memory monitor
    // weighs against `memory_warn_mb`. Each socket is one session too.
    let websockets = plan.websockets.min(idle_connections);
    thread::sleep(MONITOR_SAMPLE_WAIT);
    let heap_before = heap_bytes(blufio.addr)?;
    let sockets = open_idle_websockets(blufio.addr, websockets)?;
    thread::sleep(MONITOR_SAMPLE_WAIT);
    let heap_during = heap_bytes(blufio.addr)?;
    drop(sockets);
    report.push(
        &format!("idle WebSocket heap per socket ({websockets} sockets, jemalloc allocated)"),
        Unit::Bytes,
        heap_before
            .zip(heap_during)
            .map(|(before, during)| (during - before) / websockets.max(1) as f64),
        None,
    );

    blufio.stop()?;
    floor.stop()?;

    // In-process counts from the counting-allocator bench.
    let counts = allocation_bench(root, options.quick)?;
    for (key, floor_key, measure, unit) in [
        (
            "health_allocations_per_request",
            Some("floor_health_allocations_per_request"),
            "allocations per /health (in-process)",
            Unit::Count,
        ),
        (
            "health_allocated_bytes_per_request",
            Some("floor_health_allocated_bytes_per_request"),
            "bytes allocated per /health (in-process)",
            Unit::Bytes,
        ),
        ("monitor_tick_micros", None, "monitor tick", Unit::Micros),
        (
            "metrics_process_sample_micros",
            None,
            "/metrics: process sample (/proc reads)",
            Unit::Micros,
        ),
        (
            "metrics_render_micros",
            None,
            "/metrics: text rendering",
            Unit::Micros,
        ),
        (
            "metrics_render_allocations",
            None,
            "/metrics: allocations per rendering",
            Unit::Count,
        ),
        (
            "monitor_tick_allocations",
            None,
            "allocations per monitor tick",
            Unit::Count,
        ),
    ] {
        report.push(
            measure,
            unit,
            counts.get(key).copied(),
            floor_key.and_then(|key| counts.get(key).copied()),
        );
    }

    report.note(format!(
        "mode {}: {} round(s) of {:.1} s per side and route at {CONNECTIONS} connections; \
         builds took {:.0} s, measuring {:.0} s",
        report.mode,
        plan.rounds,
        plan.turn.as_secs_f64(),
        build_time.as_secs_f64(),
        (started.elapsed() - build_time).as_secs_f64()
    ));
    print!("{}", report.render_table());
    if let Some(path) = options.json {
        fs::write(&path, report.render_json())
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Building

/// The binaries under test.
#[derive(Debug)]
struct Binaries {
    blufio: PathBuf,
    /// Only measured for its size; `None` when an existing binary was given.
    core: Option<PathBuf>,
    floor: PathBuf,
    /// Extra environment of the blufio side (`--env`).
    env: Vec<(String, String)>,
}

fn build(root: &Path, options: &Options, work_dir: &Path) -> Result<Binaries> {
    let release_dir = target_dir(root).join("release");
    let manifest = fs::read_to_string(root.join("Cargo.toml"))?;
    let (blufio, core) = match &options.binary {
        Some(binary) => (binary.clone(), None),
        None => {
            let default_features = toml_list(&manifest, "features", "default");
            let core_features: Vec<String> = default_features
                .iter()
                .filter(|feature| feature.as_str() == "jemalloc")
                .cloned()
                .collect();
            // Core first, so that target/release/blufio ends up as the default build.
            let core = if core_features.len() == default_features.len() {
                None
            } else {
                let mut command = Command::new(cargo());
                command
                    .current_dir(root)
                    .args(["build", "--release", "--locked", "--bin", "blufio"])
                    .args(["--no-default-features", "--features"])
                    .arg(core_features.join(","));
                run_status(&mut command)?;
                let core = work_dir.join("blufio-core");
                fs::copy(release_dir.join("blufio"), &core)?;
                Some(core)
            };
            let mut command = Command::new(cargo());
            command
                .current_dir(root)
                .args(["build", "--release", "--locked", "--bin", "blufio"]);
            run_status(&mut command)?;
            // A copy, so a build started during the run cannot swap the binary under it.
            let blufio = work_dir.join("blufio");
            fs::copy(release_dir.join("blufio"), &blufio)?;
            // With no optional features besides the allocator the two builds are one.
            let core = core.or_else(|| Some(blufio.clone()));
            (blufio, core)
        }
    };
    let floor = match &options.floor {
        Some(floor) => floor.clone(),
        None => {
            let mut command = Command::new(cargo());
            command
                .current_dir(root)
                .args(["build", "--release", "--locked", "--manifest-path"])
                .arg(root.join("benches/floor/Cargo.toml"))
                .arg("--target-dir")
                .arg(target_dir(root));
            for (key, value) in release_profile(&manifest) {
                command
                    .arg("--config")
                    .arg(format!("profile.release.{key}={value}"));
            }
            run_status(&mut command)?;
            release_dir.join("blufio-floor")
        }
    };
    for binary in [&blufio, &floor] {
        if !binary.is_file() {
            return Err(format!("{} is not a file", binary.display()).into());
        }
    }
    Ok(Binaries {
        blufio,
        core,
        floor,
        env: options.env.clone(),
    })
}

/// Returns the `key = value` lines of `[profile.release]` in a Cargo manifest, so the floor
/// is built exactly like blufio whatever the root's profile says.
fn release_profile(manifest: &str) -> Vec<(String, String)> {
    let mut in_section = false;
    let mut entries = Vec::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == "[profile.release]";
            continue;
        }
        if !in_section || line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.split(" #").next().unwrap_or(value);
            entries.push((key.trim().to_owned(), value.trim().to_owned()));
        }
    }
    entries
}

/// Returns the strings of `key = ["a", "b"]` in `[section]` of a manifest (one line only).
fn toml_list(manifest: &str, section: &str, key: &str) -> Vec<String> {
    let header = format!("[{section}]");
    let mut in_section = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_section = line == header;
            continue;
        }
        if let Some((name, value)) = line.split_once('=')
            && in_section
            && name.trim() == key
        {
            return value
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(|item| item.trim().trim_matches('"').to_owned())
                .filter(|item| !item.is_empty())
                .collect();
        }
    }
    Vec::new()
}

/// Returns every `(name, version)` of the `[[package]]` entries of a Cargo.lock.
fn lock_packages(lock: &str) -> Vec<(String, String)> {
    let mut packages = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        if line == "[[package]]" {
            name = None;
        } else if let Some(value) = line.strip_prefix("name = ") {
            name = Some(value.trim_matches('"').to_owned());
        } else if let Some(value) = line.strip_prefix("version = ")
            && let Some(name) = name.take()
        {
            packages.push((name, value.trim_matches('"').to_owned()));
        }
    }
    packages
}

/// Returns the floor's packages whose version differs from every version of the same crate in
/// blufio's lock file, as `name floor-version (blufio: versions)`.
fn lock_mismatches(root_lock: &str, floor_lock: &str) -> Vec<String> {
    let mut root_versions: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, version) in lock_packages(root_lock) {
        root_versions.entry(name).or_default().push(version);
    }
    lock_packages(floor_lock)
        .into_iter()
        .filter_map(|(name, version)| {
            let versions = root_versions.get(&name)?;
            (!versions.contains(&version))
                .then(|| format!("{name} {version} (blufio: {})", versions.join(", ")))
        })
        .collect()
}

/// Fails unless the floor runs on exactly the crates blufio runs on.
fn check_floor_lock(root: &Path) -> Result<()> {
    let root_lock = fs::read_to_string(root.join("Cargo.lock"))?;
    let floor_path = root.join("benches/floor/Cargo.lock");
    let floor_lock = fs::read_to_string(&floor_path)
        .map_err(|error| format!("cannot read {}: {error}", floor_path.display()))?;
    let mismatches = lock_mismatches(&root_lock, &floor_lock);
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "benches/floor/Cargo.lock differs from Cargo.lock, so the floor would not run on \
             blufio's runtime: {}; update it (cargo update --manifest-path \
             benches/floor/Cargo.toml -p NAME --precise VERSION)",
            mismatches.join("; ")
        )
        .into())
    }
}

fn file_size(path: &Path) -> Option<f64> {
    fs::metadata(path).ok().map(|meta| meta.len() as f64)
}

/// Runs the counting-allocator bench and returns its `key value` lines.
fn allocation_bench(root: &Path, quick: bool) -> Result<BTreeMap<String, f64>> {
    let mut command = Command::new(cargo());
    command.current_dir(root);
    // The bench installs its own counting wrapper around jemalloc, so the library's global
    // allocator (the `jemalloc` feature) must be off; quick mode stays in the debug profile.
    if quick {
        command.args([
            "test",
            "--locked",
            "--bench",
            "alloc",
            "--no-default-features",
        ]);
    } else {
        command.args([
            "bench",
            "--locked",
            "--bench",
            "alloc",
            "--no-default-features",
        ]);
    }
    command.env("BLUFIO_ALLOC_BENCH_QUICK", if quick { "1" } else { "0" });
    let output = run_output(&mut command)?;
    let counts = parse_key_values(&String::from_utf8_lossy(&output.stdout));
    if counts.is_empty() {
        return Err(format!("`{}` printed no measurements", describe(&command)).into());
    }
    Ok(counts)
}

/// Reads `key value` lines; other lines are ignored.
fn parse_key_values(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse().ok()?;
            words.next().is_none().then(|| (key.to_owned(), value))
        })
        .collect()
}

/// Raises this process's soft open-files limit towards `wanted` (children inherit it) and
/// returns the limit now in force.
fn raise_nofile_limit(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()).into());
    }
    let target = (wanted as libc::rlim_t).min(limit.rlim_max);
    if limit.rlim_cur < target {
        limit.rlim_cur = target;
        // SAFETY: setrlimit reads one `rlimit` from the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(format!("setrlimit: {}", io::Error::last_os_error()).into());
        }
    }
    // rlim_t is u64 on the targets this runs on; the cast keeps other libcs compiling.
    #[allow(clippy::unnecessary_cast)]
    Ok(limit.rlim_cur as u64)
}

// ---------------------------------------------------------------------------------------------
// The two sides

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Blufio,
    Floor,
}

/// A running side.
#[derive(Debug)]
struct Server {
    child: Child,
    addr: SocketAddr,
    cold_start: Duration,
}

impl Drop for Server {
    /// A bench that fails midway must not leave its servers running (and their binaries
    /// busy for the next run).
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    /// Starts a side on a free port and waits for its first `200` to `/health`.
    fn start(
        side: Side,
        binaries: &Binaries,
        config: &Path,
        metrics_bytes: usize,
    ) -> Result<Server> {
        let port = free_port()?;
        let mut command = match side {
            Side::Blufio => {
                fs::write(config, blufio_config(port))?;
                let mut command = Command::new(&binaries.blufio);
                command.arg("serve").arg("--config").arg(config);
                command.envs(binaries.env.iter().map(|(key, value)| (key, value)));
                command
            }
            Side::Floor => {
                let mut command = Command::new(&binaries.floor);
                command.arg(port.to_string()).arg(metrics_bytes.to_string());
                command
            }
        };
        // Kept in a file, so a server that exits early can say why.
        let log = config.with_extension(match side {
            Side::Blufio => "blufio.log",
            Side::Floor => "floor.log",
        });
        command
            .env_remove("BLUFIO_LOG")
            .env_remove("BLUFIO_GATEWAY_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let spawned = Instant::now();
        let child = command
            .spawn()
            .map_err(|error| format!("cannot start `{}`: {error}", describe(&command)))?;
        let mut server = Server {
            child,
            addr,
            cold_start: Duration::ZERO,
        };
        loop {
            if let Ok((200, _)) = get(addr, "/health") {
                server.cold_start = spawned.elapsed();
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                let said = fs::read_to_string(&log).unwrap_or_default();
                let said = said.lines().last().unwrap_or("nothing on stderr");
                return Err(
                    format!("`{}` exited early: {status}: {said}", describe(&command)).into(),
                );
            }
            if spawned.elapsed() > STARTUP_TIMEOUT {
                server.stop()?;
                return Err(format!("`{}` did not answer /health", describe(&command)).into());
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    fn status(&self) -> Result<ProcStatus> {
        let path = format!("/proc/{}/status", self.child.id());
        let text =
            fs::read_to_string(&path).map_err(|error| format!("cannot read {path}: {error}"))?;
        Ok(parse_status(&text)?)
    }

    fn stop(mut self) -> Result<()> {
        terminate(&self.child)?;
        if wait_timeout(&mut self.child, Duration::from_secs(15))?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }
}

/// One listener for everything, the echo agent, a token, room for the session row, and
/// connection caps above the idle-connection row (all the load comes from one address).
fn blufio_config(port: u16) -> String {
    format!(
        "[daemon]\nbind = \"127.0.0.1\"\nhealth_port = {port}\nlog_level = \"warn\"\n\
         max_connections = 20000\nmax_connections_per_ip = 20000\n\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\nmax_sessions = 20000\n\n\
         [agent]\nprovider = \"echo\"\n"
    )
}

/// The same warm-up for both sides: connections, allocator arenas, the first responses.
fn warm_up(addr: SocketAddr) -> Result<()> {
    let mut client = Client::connect(addr)?;
    for index in 0..250 {
        let path = if index % 5 == 0 {
            "/metrics"
        } else {
            "/health"
        };
        client.send(&request_bytes("GET", path, ""))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /proc/<pid>/status

/// The memory and thread lines of `/proc/<pid>/status`, memory in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ProcStatus {
    vm_rss: u64,
    rss_anon: u64,
    rss_file: u64,
    threads: u64,
}

/// Parses `/proc/<pid>/status`; every field must be present.
fn parse_status(text: &str) -> std::result::Result<ProcStatus, String> {
    let field = |name: &str| -> std::result::Result<u64, String> {
        let line = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .ok_or(format!("no {name} line in /proc/<pid>/status"))?;
        let mut words = line.split_whitespace();
        let value: u64 = words
            .next()
            .and_then(|value| value.parse().ok())
            .ok_or(format!("malformed {name} line: `{}`", line.trim()))?;
        match words.next() {
            Some("kB") => Ok(value * 1024),
            None => Ok(value),
            Some(unit) => Err(format!("unexpected unit `{unit}` in the {name} line")),
        }
    };
    Ok(ProcStatus {
        vm_rss: field("VmRSS")?,
        rss_anon: field("RssAnon")?,
        rss_file: field("RssFile")?,
        threads: field("Threads")?,
    })
}

fn push_status_rows(report: &mut Report, when: &str, status: &[ProcStatus; 2]) {
    type Read = fn(&ProcStatus) -> u64;
    let rows: [(&str, Read); 3] = [
        ("VmRSS", |status| status.vm_rss),
        ("RssAnon", |status| status.rss_anon),
        ("RssFile", |status| status.rss_file),
    ];
    for (name, read) in rows {
        report.push(
            &format!("{name} {when}"),
            Unit::Mebibytes,
            Some(read(&status[0]) as f64),
            Some(read(&status[1]) as f64),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Load generation

/// Builds a request that a client sends in one write.
fn request_bytes(method: &str, path: &str, body: &str) -> Vec<u8> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: bench\r\n");
    if path.starts_with("/v1") {
        let _ = write!(request, "Authorization: Bearer {TOKEN}\r\n");
    }
    if !body.is_empty() || method == "POST" {
        let _ = write!(
            request,
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    request.push_str("\r\n");
    request.push_str(body);
    request.into_bytes()
}

/// Opens a session for this connection and returns the message request that uses it, so the
/// load does not open a session per message.
fn message_request(client: &mut Client) -> Result<Vec<u8>> {
    let (status, body) = client.send(&request_bytes("POST", "/v1/sessions", ""))?;
    if status != 201 {
        return Err(format!("POST /v1/sessions answered {status}").into());
    }
    let body = String::from_utf8_lossy(body);
    let id = json_string(&body, "id").ok_or("POST /v1/sessions answered no id")?;
    let message = format!(r#"{{"session_id":"{id}","content":"hello from the bench"}}"#);
    Ok(request_bytes("POST", "/v1/messages", &message))
}

/// Returns the string value of `"key":"value"` in compact JSON.
fn json_string<'a>(json: &'a str, key: &str) -> Option<&'a str> {
    let start = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    let length = json[start..].find('"')?;
    Some(&json[start..start + length])
}

/// Latencies and counts of one or more load turns.
#[derive(Debug, Default)]
struct LoadResult {
    /// Latency of every request, in µs.
    latencies: Vec<u32>,
    /// Sum of the turns' wall-clock lengths.
    elapsed: Duration,
}

impl LoadResult {
    fn merge(&mut self, other: LoadResult) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
    }

    fn per_second(&self) -> Option<f64> {
        (!self.elapsed.is_zero()).then(|| self.latencies.len() as f64 / self.elapsed.as_secs_f64())
    }

    /// Returns the latency percentile in ms.
    fn percentile_millis(&self, fraction: f64) -> Option<f64> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        percentile(&sorted, fraction).map(|micros| micros / 1e3)
    }
}

/// Nearest-rank percentile of sorted samples; `None` without samples.
fn percentile(sorted: &[u32], fraction: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    Some(f64::from(sorted[index]))
}

fn median(samples: &[f64]) -> Option<f64> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => None,
        len if len % 2 == 1 => Some(sorted[len / 2]),
        len => Some((sorted[len / 2 - 1] + sorted[len / 2]) / 2.0),
    }
}

/// Runs `connections` keep-alive clients for `duration`, each on its own thread, each sending
/// the request `prepare` returns for its connection, one write per request. Every answer must
/// be 200.
fn load(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    prepare: impl Fn(&mut Client) -> Result<Vec<u8>> + Send + Sync + 'static,
) -> Result<LoadResult> {
    let prepare = Arc::new(prepare);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut client = Client::connect(addr)?;
        let request = prepare(&mut client)?;
        clients.push((client, request));
    }
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = clients
        .into_iter()
        .map(|(mut client, request)| {
            thread::spawn(move || -> std::result::Result<Vec<u32>, String> {
                let mut latencies = Vec::with_capacity(4096);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let (status, _) = client.send(&request).map_err(|error| error.to_string())?;
                    latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
                    if status != 200 {
                        return Err(format!("answered {status}"));
                    }
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut result = LoadResult::default();
    for worker in workers {
        let latencies = worker
            .join()
            .map_err(|_| "a load thread panicked")?
            .map_err(|error| format!("load on {addr}: {error}"))?;
        result.latencies.extend(latencies);
    }
    result.elapsed = started.elapsed();
    Ok(result)
}

fn push_load_rows(
    report: &mut Report,
    route: &str,
    blufio: Option<&LoadResult>,
    floor: Option<&LoadResult>,
) {
    report.push(
        &format!("{route} req/s, {CONNECTIONS} connections"),
        Unit::PerSecond,
        blufio.and_then(LoadResult::per_second),
        floor.and_then(LoadResult::per_second),
    );
    for (name, fraction) in [("p50", 0.50), ("p99", 0.99)] {
        report.push(
            &format!("{route} {name}"),
            Unit::Millis,
            blufio.and_then(|result| result.percentile_millis(fraction)),
            floor.and_then(|result| result.percentile_millis(fraction)),
        );
    }
}

/// Holds `count` keep-alive connections, each after one `/health`, so the server keeps a
/// connection task per socket.
fn open_idle_connections(addr: SocketAddr, count: usize) -> Result<Vec<Client>> {
    let request = request_bytes("GET", "/health", "");
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let mut client = Client::connect(addr)?;
        let (status, _) = client.send(&request)?;
        if status != 200 {
            return Err(format!(
                "/health answered {status} with {} connections open",
                clients.len()
            )
            .into());
        }
        clients.push(client);
    }
    Ok(clients)
}

/// Upgrades `count` connections to `/ws` and leaves them idle, each holding its session.
fn open_idle_websockets(addr: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {TOKEN}\r\n\r\n"
    );
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(request.as_bytes())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        // Byte by byte, so no frame after the head is consumed; the server sends none.
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte)? == 0 {
                return Err("the server closed a /ws upgrade before answering".into());
            }
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            let status = String::from_utf8_lossy(&head[..head.len().min(12)]).into_owned();
            return Err(format!(
                "/ws answered `{status}` with {} sockets open",
                sockets.len()
            )
            .into());
        }
        sockets.push(stream);
    }
    Ok(sockets)
}

/// Opens `count` sessions from 8 connections.
fn open_sessions(addr: SocketAddr, count: usize) -> Result<()> {
    let request: Arc<[u8]> = request_bytes("POST", "/v1/sessions", "").into();
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            let request = Arc::clone(&request);
            thread::spawn(move || -> std::result::Result<(), String> {
                let mut client = Client::connect(addr).map_err(|error| error.to_string())?;
                for _ in (worker..count).step_by(8) {
                    let (status, _) = client.send(&request).map_err(|error| error.to_string())?;
                    if status != 201 {
                        return Err(format!("POST /v1/sessions answered {status}"));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.join().map_err(|_| "a session thread panicked")??;
    }
    Ok(())
}

/// Sends one request on a fresh connection; returns the status and the body length.
/// Returns blufio's `memory_heap_bytes` from `/health` (jemalloc's `stats.allocated` at the
/// last monitor tick): live data, as opposed to pages the allocator keeps.
fn heap_bytes(addr: SocketAddr) -> Result<Option<f64>> {
    let mut client = Client::connect(addr)?;
    let (_, body) = client.send(&request_bytes("GET", "/health", ""))?;
    let body = String::from_utf8_lossy(body);
    Ok(json_number(&body, "memory_heap_bytes"))
}

/// Returns the number value of `"key":123` in compact JSON.
fn json_number(json: &str, key: &str) -> Option<f64> {
    let start = json.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &json[start..];
    let end = rest
        .find(|character: char| !character.is_ascii_digit() && character != '.')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn get(addr: SocketAddr, path: &str) -> Result<(u16, usize)> {
    let mut client = Client::connect(addr)?;
    let (status, body) = client.send(&request_bytes("GET", path, ""))?;
    Ok((status, body.len()))
}

/// A keep-alive HTTP/1.1 client that reads `Content-Length` framed responses into one buffer
/// it reuses, so the load generator itself allocates nothing per request.
#[derive(Debug)]
struct Client {
    stream: TcpStream,
    buffer: Vec<u8>,
    /// Bytes of `buffer` that hold received data.
    filled: usize,
}

impl Client {
    fn connect(addr: SocketAddr) -> Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            stream,
            buffer: vec![0; 16 * 1024],
            filled: 0,
        })
    }

    /// Sends `request` in one write and returns the status and the body.
    fn send(&mut self, request: &[u8]) -> io::Result<(u16, &[u8])> {
        self.stream.write_all(request)?;
        // Nothing is pipelined, so the buffer holds no bytes of a previous response.
        self.filled = 0;
        loop {
            if let Some(head) = parse_head(&self.buffer[..self.filled])? {
                let total = head.length + head.body_length;
                if total > self.buffer.len() {
                    self.buffer.resize(total, 0);
                }
                while self.filled < total {
                    self.read_more()?;
                }
                return Ok((head.status, &self.buffer[head.length..total]));
            }
            if self.filled == self.buffer.len() {
                self.buffer.resize(self.buffer.len() * 2, 0);
            }
            self.read_more()?;
        }
    }

    fn read_more(&mut self) -> io::Result<()> {
        let read = self.stream.read(&mut self.buffer[self.filled..])?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        self.filled += read;
        Ok(())
    }
}

/// The parts of a response head the client needs.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Length of the head including the blank line.
    length: usize,
    body_length: usize,
}

/// Parses a response head once it is complete; `Ok(None)` while more bytes are needed.
fn parse_head(bytes: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = bytes.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(None);
    };
    let invalid = |message: &str| io::Error::new(io::ErrorKind::InvalidData, message.to_owned());
    let head =
        std::str::from_utf8(&bytes[..end]).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("malformed status line"))?;
    let mut body_length = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            body_length = value
                .trim()
                .parse()
                .map_err(|_| invalid("malformed Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "chunked responses are not supported by the bench client",
            ));
        }
    }
    Ok(Some(Head {
        status,
        length: end + 4,
        body_length,
    }))
}

// ---------------------------------------------------------------------------------------------
// The report

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Bytes,
    /// Stored in bytes, shown in MiB.
    Mebibytes,
    Count,
    PerSecond,
    Millis,
    Micros,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Bytes => "B",
            Unit::Mebibytes => "MiB",
            Unit::Count => "count",
            Unit::PerSecond => "1/s",
            Unit::Millis => "ms",
            Unit::Micros => "µs",
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Unit::Bytes | Unit::PerSecond => thousands(value.round() as u64),
            Unit::Mebibytes => format!("{:.2} MiB", value / (1024.0 * 1024.0)),
            Unit::Count => {
                if value.fract() == 0.0 {
                    format!("{value:.0}")
                } else {
                    format!("{value:.2}")
                }
            }
            Unit::Millis => format!("{value:.2} ms"),
            Unit::Micros => format!("{value:.1} µs"),
        }
    }
}

/// Formats 4019024 as `4,019,024`.
fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut text = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

#[derive(Debug, Clone, PartialEq)]
struct Row {
    measure: String,
    unit: Unit,
    blufio: Option<f64>,
    floor: Option<f64>,
}

impl Row {
    /// blufio ÷ floor, when both exist.
    fn ratio(&self) -> Option<f64> {
        match (self.blufio, self.floor) {
            (Some(blufio), Some(floor)) if floor != 0.0 => Some(blufio / floor),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Report {
    mode: &'static str,
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn new(mode: &'static str) -> Report {
        Report {
            mode,
            rows: Vec::new(),
            notes: Vec::new(),
        }
    }

    fn push(&mut self, measure: &str, unit: Unit, blufio: Option<f64>, floor: Option<f64>) {
        self.rows.push(Row {
            measure: measure.to_owned(),
            unit,
            blufio,
            floor,
        });
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// A Markdown table: measure, blufio, floor, blufio ÷ floor.
    fn render_table(&self) -> String {
        let cell =
            |value: Option<f64>, unit: Unit| value.map_or("–".to_owned(), |v| unit.format(v));
        let mut lines = vec![[
            "measure".to_owned(),
            "blufio".to_owned(),
            "floor".to_owned(),
            "blufio ÷ floor".to_owned(),
        ]];
        for row in &self.rows {
            lines.push([
                row.measure.clone(),
                cell(row.blufio, row.unit),
                cell(row.floor, row.unit),
                row.ratio()
                    .map_or("–".to_owned(), |ratio| format!("{ratio:.2}×")),
            ]);
        }
        let mut widths = [0; 4];
        for line in &lines {
            for (width, text) in widths.iter_mut().zip(line) {
                *width = (*width).max(text.chars().count());
            }
        }
        let mut text = String::new();
        for (index, line) in lines.iter().enumerate() {
            text.push('|');
            for (column, (width, cell)) in widths.iter().zip(line).enumerate() {
                let pad = width - cell.chars().count();
                if column == 0 {
                    let _ = write!(text, " {cell}{} |", " ".repeat(pad));
                } else {
                    let _ = write!(text, " {}{cell} |", " ".repeat(pad));
                }
            }
            text.push('\n');
            if index == 0 {
                text.push('|');
                for (column, width) in widths.iter().enumerate() {
                    let dashes = "-".repeat(width + 1);
                    if column == 0 {
                        let _ = write!(text, "{dashes}-|");
                    } else {
                        let _ = write!(text, "{dashes}:|");
                    }
                }
                text.push('\n');
            }
        }
        for note in &self.notes {
            let _ = writeln!(text, "\n{note}");
        }
        text
    }

    /// The same numbers as JSON: `{"mode", "rows": [{"measure", "unit", "blufio", "floor",
    /// "ratio"}], "notes"}`; missing values are `null`.
    fn render_json(&self) -> String {
        let number = |value: Option<f64>| match value {
            Some(value) if value.is_finite() => format!("{value}"),
            _ => "null".to_owned(),
        };
        let mut text = format!(
            "{{\n  \"mode\": {},\n  \"rows\": [\n",
            json_quote(self.mode)
        );
        for (index, row) in self.rows.iter().enumerate() {
            let _ = write!(
                text,
                "    {{\"measure\": {}, \"unit\": {}, \"blufio\": {}, \"floor\": {}, \"ratio\": {}}}",
                json_quote(&row.measure),
                json_quote(row.unit.name()),
                number(row.blufio),
                number(row.floor),
                number(row.ratio())
            );
            text.push_str(if index + 1 < self.rows.len() {
                ",\n"
            } else {
                "\n"
            });
        }
        text.push_str("  ],\n  \"notes\": [");
        let notes: Vec<String> = self.notes.iter().map(|note| json_quote(note)).collect();
        text.push_str(&notes.join(", "));
        text.push_str("]\n}\n");
        text
    }
}

fn json_quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for character in text.chars() {
        match character {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            character if u32::from(character) < 0x20 => {
                let _ = write!(quoted, "\\u{:04x}", u32::from(character));
            }
            character => quoted.push(character),
        }
    }
    quoted.push('"');
    quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tblufio\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  100000 kB\nVmRSS:\t    7300 kB\nRssAnon:\t    1848 kB\n\
        RssFile:\t    5452 kB\nRssShmem:\t       0 kB\nThreads:\t5\nSigQ:\t0/63304\n";

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status = parse_status(STATUS).unwrap();
        assert_eq!(
            status,
            ProcStatus {
                vm_rss: 7300 * 1024,
                rss_anon: 1848 * 1024,
                rss_file: 5452 * 1024,
                threads: 5,
            }
        );
    }

    #[test]
    fn status_without_a_field_is_an_error_naming_it() {
        let text = STATUS.replace("RssAnon", "RssAnonymous");
        let error = parse_status(&text).unwrap_err();
        assert!(error.contains("RssAnon"), "{error}");
        let error = parse_status(&STATUS.replace("7300 kB", "lots kB")).unwrap_err();
        assert!(error.contains("VmRSS"), "{error}");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let sorted: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 0.50), Some(50.0));
        assert_eq!(percentile(&sorted, 0.99), Some(99.0));
        assert_eq!(percentile(&sorted, 1.0), Some(100.0));
        assert_eq!(percentile(&sorted, 0.0), Some(1.0));
        assert_eq!(percentile(&[7], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn load_results_merge_rounds_before_summarising() {
        let mut result = LoadResult {
            latencies: vec![3000, 1000],
            elapsed: Duration::from_secs(1),
        };
        result.merge(LoadResult {
            latencies: vec![2000, 4000],
            elapsed: Duration::from_secs(1),
        });
        assert_eq!(result.per_second(), Some(2.0));
        assert_eq!(result.percentile_millis(0.5), Some(2.0));
        assert_eq!(result.percentile_millis(0.99), Some(4.0));
        assert_eq!(LoadResult::default().per_second(), None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn response_heads_are_parsed_when_complete() {
        let response = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nServer: x\r\n\r\nhello";
        assert_eq!(parse_head(&response[..20]).unwrap(), None);
        let head = parse_head(response).unwrap().unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                length: response.len() - 5,
                body_length: 5
            }
        );
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_head(chunked).is_err());
    }

    #[test]
    fn requests_go_out_in_one_buffer_with_auth_only_for_the_api() {
        let health = String::from_utf8(request_bytes("GET", "/health", "")).unwrap();
        assert_eq!(health, "GET /health HTTP/1.1\r\nHost: bench\r\n\r\n");
        let message = String::from_utf8(request_bytes("POST", "/v1/messages", "{}")).unwrap();
        assert!(message.contains("Authorization: Bearer bench-token-0123456789\r\n"));
        assert!(message.ends_with("Content-Length: 2\r\n\r\n{}"));
    }

    #[test]
    fn session_ids_and_numbers_are_found_in_compact_json() {
        let body = r#"{"id":"9f2c00","created_at":1795825458}"#;
        assert_eq!(json_string(body, "id"), Some("9f2c00"));
        assert_eq!(json_string(body, "missing"), None);
        let health = r#"{"memory_heap_bytes":404968,"memory_rss_bytes":null,"x":1}"#;
        assert_eq!(json_number(health, "memory_heap_bytes"), Some(404_968.0));
        assert_eq!(json_number(health, "memory_rss_bytes"), None);
        assert_eq!(json_number(health, "x"), Some(1.0));
    }

    #[test]
    fn table_shows_units_ratios_and_gaps() {
        let mut report = Report::new("quick");
        report.push(
            "binary size",
            Unit::Bytes,
            Some(4_019_024.0),
            Some(2_332_976.0),
        );
        report.push(
            "idle VmRSS",
            Unit::Mebibytes,
            Some(7.5 * 1048576.0),
            Some(5.0 * 1048576.0),
        );
        report.push("messages", Unit::PerSecond, Some(24_000.0), None);
        report.note("a note".to_owned());
        let table = report.render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("| measure"), "{table}");
        assert!(lines[1].starts_with("|---"), "{table}");
        assert!(lines[2].contains("4,019,024") && lines[2].contains("2,332,976"));
        assert!(lines[2].contains("1.72×"), "{table}");
        assert!(lines[3].contains("7.50 MiB") && lines[3].contains("1.50×"));
        assert!(lines[4].contains("24,000") && lines[4].contains('–'));
        assert!(table.contains("a note"));
        // Every row is as wide as the header.
        let width = lines[0].chars().count();
        assert!(
            lines[..5].iter().all(|line| line.chars().count() == width),
            "{table}"
        );
    }

    #[test]
    fn json_has_the_same_numbers_and_nulls() {
        let mut report = Report::new("full");
        report.push("size \"x\"", Unit::Bytes, Some(4.0), Some(2.0));
        report.push("sessions", Unit::Bytes, Some(100.5), None);
        report.note("took 1 s".to_owned());
        let json = report.render_json();
        assert!(json.contains(r#""mode": "full""#), "{json}");
        assert!(json.contains(
            r#"{"measure": "size \"x\"", "unit": "B", "blufio": 4, "floor": 2, "ratio": 2}"#
        ));
        assert!(
            json.contains(r#""blufio": 100.5, "floor": null, "ratio": null"#),
            "{json}"
        );
        assert!(json.contains(r#""notes": ["took 1 s"]"#), "{json}");
    }

    #[test]
    fn release_profile_and_feature_lists_are_read_from_the_manifest() {
        let manifest = "[features]\ndefault = [\"jemalloc\", \"providers\"]\n\
            jemalloc = [\"dep:x\"]\n\n[profile.release]\nlto = true\nopt-level = \"s\" # small\n\
            strip = \"symbols\"\n\n[profile.dev]\nopt-level = 1\n";
        assert_eq!(
            release_profile(manifest),
            vec![
                ("lto".to_owned(), "true".to_owned()),
                ("opt-level".to_owned(), "\"s\"".to_owned()),
                ("strip".to_owned(), "\"symbols\"".to_owned()),
            ]
        );
        assert_eq!(
            toml_list(manifest, "features", "default"),
            ["jemalloc", "providers"]
        );
        assert!(toml_list(manifest, "features", "absent").is_empty());
    }

    #[test]
    fn floor_lock_must_pin_blufios_versions() {
        let root = "[[package]]\nname = \"trillium\"\nversion = \"1.4.0\"\n\n\
            [[package]]\nname = \"syn\"\nversion = \"1.0.0\"\n\n\
            [[package]]\nname = \"syn\"\nversion = \"2.0.1\"\n";
        let same = "[[package]]\nname = \"trillium\"\nversion = \"1.4.0\"\n\n\
            [[package]]\nname = \"syn\"\nversion = \"2.0.1\"\n\n\
            [[package]]\nname = \"blufio-floor\"\nversion = \"0.1.0\"\n";
        assert!(lock_mismatches(root, same).is_empty());
        let newer = same.replace("1.4.0", "1.5.0");
        assert_eq!(
            lock_mismatches(root, &newer),
            ["trillium 1.5.0 (blufio: 1.4.0)"]
        );
    }

    #[test]
    fn key_value_lines_are_read_and_prose_ignored() {
        let text = "counting allocations\nhealth_allocations_per_request 12.5\nmonitor_tick_micros 3\n\
            a b c\n";
        let values = parse_key_values(text);
        assert_eq!(values.len(), 2);
        assert_eq!(values["health_allocations_per_request"], 12.5);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4_019_024), "4,019,024");
    }
}
