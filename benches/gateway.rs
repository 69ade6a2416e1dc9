//! Gateway benchmark: `cargo bench --bench gateway`.
//!
//! Starts the release `blufio` binary with the built-in echo agent, then
//! 1. drives `POST /v1/messages` from 64 concurrent keep-alive clients for a fixed time and
//!    prints messages/s and latency percentiles;
//! 2. opens and closes 10,000 sessions and prints the daemon's RSS before, at the peak and
//!    after (read from `/proc/<pid>/status`, so the load generator's memory is not counted).
//!
//! Environment: `BLUFIO_BENCH_SECS` (default 10), `BLUFIO_BENCH_CLIENTS` (default 64).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use blufio_testkit::{
    http::KeepAlive,
    process::{Binary, Daemon, free_port},
};

const TOKEN: &str = "bench-token-0123456789";

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let seconds: u64 = env_or("BLUFIO_BENCH_SECS", 10);
    let clients: usize = env_or("BLUFIO_BENCH_CLIENTS", 64);
    let mut daemon = start_daemon();
    let (addr, pid) = (daemon.addr(), daemon.pid());

    // Warm up: connections, allocator arenas, the first session.
    run_load(addr, 8, Duration::from_secs(1));
    let idle_rss = rss_kib(pid);

    let (latencies, elapsed) = run_load(addr, clients, Duration::from_secs(seconds));
    let count = latencies.len();
    println!("gateway benchmark: {clients} clients, {seconds} s, echo agent, keep-alive HTTP/1.1");
    println!("  messages        {count}");
    println!(
        "  throughput      {:.0} messages/s",
        count as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  latency         p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    println!(
        "  rss after load  {} KiB (idle before: {idle_rss} KiB)",
        rss_kib(pid)
    );

    let before = rss_kib(pid);
    let ids = open_sessions(addr, 10_000);
    let peak = rss_kib(pid);
    close_sessions(addr, ids);
    let after = rss_kib(pid);
    // One monitor interval later the daemon has had a chance to return pages.
    std::thread::sleep(Duration::from_secs(6));
    let settled = rss_kib(pid);
    println!("sessions: 10,000 opened and closed");
    println!("  rss before      {before} KiB");
    println!("  rss with 10,000 open  {peak} KiB");
    println!("  rss after close {after} KiB ({settled} KiB 6 s later)");
    let health = request(addr, "GET", "/health", None).1;
    println!("  /health         {health}");

    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(30));
    assert!(status.success(), "daemon exited with {status:?}");
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn start_daemon() -> Daemon {
    let port = free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nlog_level = \"warn\"\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\nmax_sessions = 20000\n\
         [agent]\nprovider = \"echo\"\n"
    );
    Binary::new(env!("CARGO_BIN_EXE_blufio"), "").serve(&config, "bench")
}

/// Runs `clients` keep-alive clients for `duration`; returns every latency in ms.
fn run_load(addr: SocketAddr, clients: usize, duration: Duration) -> (Vec<f64>, Duration) {
    let started = Instant::now();
    let deadline = Arc::new(started + duration);
    let workers: Vec<_> = (0..clients)
        .map(|client| {
            let deadline = Arc::clone(&deadline);
            std::thread::spawn(move || {
                let mut connection = KeepAlive::open(addr);
                let mut latencies = Vec::new();
                let body = format!(r#"{{"content": "hello from client {client}"}}"#);
                let mut session: Option<String> = None;
                while Instant::now() < *deadline {
                    let body = match &session {
                        Some(id) => format!(
                            r#"{{"session_id": "{id}", "content": "hello from client {client}"}}"#
                        ),
                        None => body.clone(),
                    };
                    let sent = Instant::now();
                    let (status, reply) =
                        connection.send("POST", "/v1/messages", TOKEN, Some(&body));
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                    if std::env::var("BLUFIO_BENCH_DEBUG").is_ok()
                        && *latencies.last().unwrap() > 200.0
                    {
                        eprintln!(
                            "slow: client {client} request {} took {:.0} ms",
                            latencies.len(),
                            latencies.last().unwrap()
                        );
                    }
                    assert_eq!(status, 200, "{reply}");
                    if session.is_none() {
                        let json: serde_json::Value = serde_json::from_str(&reply).unwrap();
                        session = json["session_id"].as_str().map(str::to_owned);
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<f64> = workers
        .into_iter()
        .flat_map(|worker| worker.join().unwrap())
        .collect();
    let elapsed = started.elapsed();
    latencies.sort_by(f64::total_cmp);
    (latencies, elapsed)
}

fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index]
}

fn open_sessions(addr: SocketAddr, count: usize) -> Vec<String> {
    let workers: Vec<_> = (0..8)
        .map(|worker| {
            std::thread::spawn(move || {
                let mut connection = KeepAlive::open(addr);
                (worker..count)
                    .step_by(8)
                    .map(|_| {
                        let (status, body) = connection.send("POST", "/v1/sessions", TOKEN, None);
                        assert_eq!(status, 201, "{body}");
                        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                        json["id"].as_str().unwrap().to_owned()
                    })
                    .collect::<Vec<String>>()
            })
        })
        .collect();
    workers
        .into_iter()
        .flat_map(|worker| worker.join().unwrap())
        .collect()
}

fn close_sessions(addr: SocketAddr, ids: Vec<String>) {
    let chunks: Vec<Vec<String>> = ids
        .chunks(ids.len().div_ceil(8))
        .map(<[String]>::to_vec)
        .collect();
    let workers: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            std::thread::spawn(move || {
                let mut connection = KeepAlive::open(addr);
                for id in chunk {
                    let (status, _) =
                        connection.send("DELETE", &format!("/v1/sessions/{id}"), TOKEN, None);
                    assert_eq!(status, 204);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    KeepAlive::open(addr).send(method, path, TOKEN, body)
}
