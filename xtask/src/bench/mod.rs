//! `cargo xtask bench [--quick] [--gateway-only | --store-only] [--json PATH] [--binary PATH]
//! [--floor PATH] [--env K=V]...`: blufio's footprint and per-request cost measured side by
//! side with a floor, in one interleaved run, its cost as an OpenAI gateway against the direct
//! call, and its cost with the session store against none.
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
//! monitor tick. Then the gateway scenario (`gateway.rs`, alone with `--gateway-only`):
//! `POST /v1/chat/completions` through blufio and straight to a fake upstream in this process
//! (`upstream.rs`), and streamed requests held open, with the targets beside them.
//! Last the session store scenario (`store.rs`, alone with `--store-only`): `POST
//! /v1/messages` throughput and p99, idle RSS and start-up with and without the SQLite store,
//! and start-up and RSS with 10,000 stored sessions.
//!
//! It does not judge the numbers: the table is for people and `--json` for comparing commits.
//! `--quick` is a smoke mode (short rounds, fewer connections, the allocation bench in the
//! debug profile) that proves the bench still works; its figures mean little.
//!
//! This file holds the options and the run, row by row; building the binaries is in `build.rs`,
//! the running sides in `server.rs`, the load in `load.rs` over the client in `client.rs`
//! (streams in `stream.rs`, chunked framing in `chunked.rs`), the gateway in `gateway.rs` over
//! the fake upstream in `upstream.rs` and `reply.rs`, the store in `store.rs` (its database
//! of stored sessions in `stored.rs`), and the tables and JSON in `report.rs`.

mod build;
mod chunked;
mod client;
mod gateway;
mod load;
mod reply;
mod report;
mod server;
mod store;
mod stored;
mod stream;
mod upstream;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::project::{Result, target_dir};
use build::{allocation_bench, build, check_floor_lock, file_size};
use gateway::GatewayPlan;
use load::{
    LoadResult, get, heap_bytes, load, median, message_request, open_idle_connections,
    open_idle_websockets, open_sessions, push_load_rows, request_bytes,
};
use report::{Report, Unit};
use server::{ProcStatus, Server, Side, push_status_rows, raise_nofile_limit, warm_up};
use stored::StorePlan;

/// The bearer token of the benchmarked daemon.
const TOKEN: &str = "bench-token-0123456789";
/// Keep-alive connections of the throughput rows, as in the measurements.
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
    /// The gateway scenario.
    gateway: GatewayPlan,
    /// The session store scenario.
    store: StorePlan,
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
            gateway: GatewayPlan {
                rounds: 4,
                turn: Duration::from_secs(3),
                streams: 1_000,
            },
            store: StorePlan {
                starts: 5,
                settle: Duration::from_secs(1),
                rounds: 4,
                turn: Duration::from_secs(3),
                stored_sessions: 10_000,
                stored_starts: 5,
            },
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
            gateway: GatewayPlan {
                rounds: 2,
                turn: Duration::from_secs(1),
                streams: 200,
            },
            // Part 3 keeps its 10,000 sessions: the fill takes about a second and the
            // start-up on them is the figure the issue bounds.
            store: StorePlan {
                starts: 1,
                settle: Duration::from_millis(500),
                rounds: 1,
                turn: Duration::from_secs(1),
                stored_sessions: 10_000,
                stored_starts: 1,
            },
        }
    }
}

/// Command-line options.
#[derive(Debug, Default)]
struct Options {
    quick: bool,
    /// Runs the gateway scenario only (no floor, no footprint rows).
    gateway_only: bool,
    /// Runs the session store scenario only (no floor, no footprint rows).
    store_only: bool,
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
            "--gateway-only" => options.gateway_only = true,
            "--store-only" => options.store_only = true,
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
    if options.gateway_only && options.store_only {
        return Err(
            "bench: --gateway-only and --store-only exclude each other; without \
                    either, the run has both"
                .into(),
        );
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
    if options.gateway_only {
        // Each held stream takes two descriptors here (the client's and the fake's) and two
        // in blufio, which inherits the limit.
        raise_nofile_limit((plan.gateway.streams * 2 + 1_000) as u64)?;
        gateway::run(&mut report, &binaries, &work_dir, plan.gateway)?;
        report.note(format!(
            "mode {}, gateway only: {:.0} s in all",
            report.mode,
            started.elapsed().as_secs_f64()
        ));
        return finish(&report, &options);
    }
    if options.store_only {
        store::run(&mut report, &binaries, &work_dir, plan.store)?;
        report.note(format!(
            "mode {}, store only: {:.0} s in all",
            report.mode,
            started.elapsed().as_secs_f64()
        ));
        return finish(&report, &options);
    }
    report.push(
        "binary size, default features",
        Unit::Bytes,
        file_size(&binaries.blufio),
        binaries.floor.as_deref().and_then(file_size),
    );
    report.push(
        "binary size, core only (no optional features)",
        Unit::Bytes,
        binaries.core.as_deref().and_then(file_size),
        binaries.floor.as_deref().and_then(file_size),
    );
    let build_time = started.elapsed();

    let wanted_fds = (plan.idle_connections.max(plan.gateway.streams * 2) + 1_000) as u64;
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

    // Last, so their sections follow every footprint row.
    gateway::run(&mut report, &binaries, &work_dir, plan.gateway)?;
    store::run(&mut report, &binaries, &work_dir, plan.store)?;

    report.note(format!(
        "mode {}: {} round(s) of {:.1} s per side and route at {CONNECTIONS} connections; \
         builds took {:.0} s, measuring {:.0} s",
        report.mode,
        plan.rounds,
        plan.turn.as_secs_f64(),
        build_time.as_secs_f64(),
        (started.elapsed() - build_time).as_secs_f64()
    ));
    finish(&report, &options)
}

/// Prints the table and writes the JSON.
fn finish(report: &Report, options: &Options) -> Result<()> {
    print!("{}", report.render_table());
    if let Some(path) = &options.json {
        fs::write(path, report.render_json())
            .map_err(|error| format!("cannot write {}: {error}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|word| (*word).to_owned()).collect()
    }

    #[test]
    fn options_select_the_gateway_alone_and_name_what_is_wrong() {
        let options =
            parse_options(&args(&["--quick", "--gateway-only", "--binary", "b"])).unwrap();
        assert!(options.quick && options.gateway_only);
        assert_eq!(options.binary, Some(PathBuf::from("b")));
        assert!(!parse_options(&[]).unwrap().gateway_only);
        let error = parse_options(&args(&["--gateway"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("`--gateway`"), "{error}");
        let error = parse_options(&args(&["--json"])).unwrap_err().to_string();
        assert!(error.contains("--json needs a path"), "{error}");
    }

    #[test]
    fn options_select_the_store_alone_but_not_with_the_gateway_alone() {
        let options = parse_options(&args(&["--store-only", "--quick"])).unwrap();
        assert!(options.store_only && options.quick && !options.gateway_only);
        assert!(!parse_options(&[]).unwrap().store_only);
        let error = parse_options(&args(&["--store-only", "--gateway-only"]))
            .unwrap_err()
            .to_string();
        assert!(error.contains("exclude each other"), "{error}");
    }

    #[test]
    fn quick_mode_keeps_the_store_scenario_short_but_its_10000_sessions() {
        let (full, quick) = (Plan::full().store, Plan::quick().store);
        assert_eq!(full.stored_sessions, 10_000);
        assert_eq!(quick.stored_sessions, full.stored_sessions);
        // Both sides take a turn per round, after a 0.3 s warm-up each.
        let quick_load = quick.turn * (quick.rounds * 2) as u32;
        assert!(quick_load <= Duration::from_secs(3), "{quick_load:?}");
        assert!(quick.starts <= full.starts && quick.stored_starts <= full.stored_starts);
    }

    #[test]
    fn quick_mode_keeps_the_gateway_scenario_but_smaller() {
        let (full, quick) = (Plan::full().gateway, Plan::quick().gateway);
        assert_eq!(full.streams, 1_000);
        assert!(quick.streams > 0 && quick.streams < full.streams);
        // Every client count runs both sides in each round: the quick scenario's load stays
        // within ten seconds, so the CI step grows by well under a minute.
        let quick_load = quick.turn * (quick.rounds * 2 * gateway::CLIENTS.len()) as u32;
        assert!(quick_load <= Duration::from_secs(10), "{quick_load:?}");
    }
}
