//! The session store scenario of issue 16: the same release binary with `[daemon] state_dir`
//! and `[store] enabled = true`, and without a state directory (nothing stored), in one run.
//!
//! 1. Idle VmRSS and start-up time (spawn to the first `/health` 200) of each, alternating
//!    starts, medians: what the store costs a daemon that serves nothing.
//! 2. `POST /v1/messages` with the echo agent at 64 keep-alive clients over 256 sessions
//!    opened first (client `c` sends to sessions `c`, `c + 64`, …, so no two clients share a
//!    session), the sides taking turns in rounds: req/s and their ratio, p50, p99, CPU per
//!    message, and from the store side's `/metrics` the commits and writes of the load, whose
//!    quotient shows the group commit at work.
//! 3. A database of 10,000 sessions of 20 turns (100-byte messages): the daemon creates the
//!    schema on an empty state directory and is stopped, the `sqlite3` shell fills the tables
//!    with recursive CTEs (every session active now, so none expires), then the daemon is
//!    started on it: start-up time with every session restored, checked through `/health`'s
//!    `active_sessions` and one session's messages, and VmRSS after the start-up
//!    (`stored.rs`).
//!
//! The issue's targets are printed beside the figures; the bench fails on none of them, only
//! on a wrong answer. Without the `sqlite3` shell part 3 is left out with a note.

use std::net::SocketAddr;
use std::path::Path;
use std::thread;
use std::time::Duration;

use super::CONNECTIONS;
use super::build::Binaries;
use super::client::Client;
use super::gateway::metric_value;
use super::load::{LoadResult, load_cycling, median, request_bytes};
use super::report::{Report, Target, Unit};
use super::server::{ProcStatus, Server, fresh_dir, median_of};
use super::stored::{MESSAGE_BYTES, StorePlan};
use crate::json;
use crate::project::Result;

/// Sessions the message load is spread over.
const LOAD_SESSIONS: usize = 256;
/// The issue's targets.
const THROUGHPUT_RATIO_TARGET: f64 = 0.5;
const IDLE_RSS_GROWTH_TARGET_BYTES: f64 = 1024.0 * 1024.0;
/// The store's counters in `/metrics` (`src/metrics/`).
const COMMITS: &str = "blufio_store_commits_total";
const WRITES: &str = "blufio_store_writes_total";
const APPEND_SUM: &str = r#"blufio_store_operation_seconds_sum{op="append"}"#;
const APPEND_COUNT: &str = r#"blufio_store_operation_seconds_count{op="append"}"#;
const STORE_BYTES: &str = "blufio_store_bytes";

/// Runs the scenario and adds its section to `report`.
pub(super) fn run(
    report: &mut Report,
    binaries: &Binaries,
    work_dir: &Path,
    plan: StorePlan,
) -> Result<()> {
    report.section(
        "session store (issue 16): blufio with [daemon] state_dir and [store], and without a \
         state_dir",
        "no store",
    );
    let state_dir = fresh_dir(&work_dir.join("store-state"))?;
    let configs = [work_dir.join("store.toml"), work_dir.join("no-store.toml")];
    let dirs = [Some(state_dir.as_path()), None];
    let start = |index: usize| Server::start_blufio(binaries, &configs[index], dirs[index]);

    // Part 1: idle, alternating which side starts first.
    let mut startup_ms = [Vec::new(), Vec::new()];
    let mut idle: [Vec<ProcStatus>; 2] = [Vec::new(), Vec::new()];
    for round in 0..plan.starts {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for index in order {
            let server = start(index)?;
            startup_ms[index].push(server.cold_start.as_secs_f64() * 1e3);
            thread::sleep(plan.settle);
            idle[index].push(server.status()?);
            server.stop()?;
        }
    }
    let idle_rss = idle
        .each_ref()
        .map(|samples| median_of(samples, |status| status.vm_rss));
    let idle_anon = idle
        .each_ref()
        .map(|samples| median_of(samples, |status| status.rss_anon));
    let idle_file = idle
        .each_ref()
        .map(|samples| median_of(samples, |status| status.rss_file));
    let idle_threads = idle
        .each_ref()
        .map(|samples| median_of(samples, |status| status.threads));
    report.push(
        "start-up, spawn to first /health 200 (empty store), median",
        Unit::Millis,
        median(&startup_ms[0]),
        median(&startup_ms[1]),
    );
    report.push(
        &format!(
            "VmRSS idle ({:.1} s after start-up), median",
            plan.settle.as_secs_f64()
        ),
        Unit::Mebibytes,
        idle_rss[0],
        idle_rss[1],
    );
    report.push(
        "RssAnon idle, median",
        Unit::Mebibytes,
        idle_anon[0],
        idle_anon[1],
    );
    // Apart, because file pages (SQLite's code in the binary, the WAL index) are clean and
    // given back under memory pressure, and anonymous pages are not.
    report.push(
        "RssFile idle, median",
        Unit::Mebibytes,
        idle_file[0],
        idle_file[1],
    );
    report.push(
        "RssAnon idle growth (store − no store)",
        Unit::Mebibytes,
        idle_anon[0]
            .zip(idle_anon[1])
            .map(|(store, none)| store - none),
        None,
    );
    report.push_row(
        "VmRSS idle growth (store − no store)",
        Unit::Mebibytes,
        idle_rss[0]
            .zip(idle_rss[1])
            .map(|(store, none)| store - none),
        None,
        Some(Target::at_most(IDLE_RSS_GROWTH_TARGET_BYTES)),
    );
    report.push(
        "idle threads",
        Unit::Count,
        idle_threads[0],
        idle_threads[1],
    );

    // Part 2: the message load on a long-lived pair.
    let servers = [start(0)?, start(1)?];
    message_load(report, &servers, plan)?;
    for server in servers {
        server.stop()?;
    }

    // Part 3: many stored sessions.
    if !super::stored::has_sqlite3() {
        report.note(
            "store: the `sqlite3` shell is not installed, so the rows with stored sessions \
             were left out (Debian: apt-get install sqlite3)"
                .to_owned(),
        );
    } else {
        super::stored::run(report, binaries, work_dir, plan, idle_rss[0])?;
    }
    report.note(format!(
        "store: {} start(s) per side for the idle rows; {} round(s) of {:.1} s per side at \
         {CONNECTIONS} clients over {LOAD_SESSIONS} sessions, {MESSAGE_BYTES}-byte messages; \
         the same release binary on both sides",
        plan.starts,
        plan.rounds,
        plan.turn.as_secs_f64(),
    ));
    Ok(())
}

/// Opens the sessions, warms both sides up, then runs the rounds and adds the rows.
fn message_load(report: &mut Report, servers: &[Server; 2], plan: StorePlan) -> Result<()> {
    let mut requests = Vec::with_capacity(2);
    for server in servers {
        let ids = open_sessions(server.addr, LOAD_SESSIONS)?;
        requests.push(client_requests(&ids, CONNECTIONS));
    }
    let prepare = |index: usize| {
        let requests = requests[index].clone();
        move |client: usize, _: &mut Client| {
            requests
                .get(client)
                .cloned()
                .ok_or_else(|| format!("no sessions for client {client}").into())
        }
    };
    // The same warm-up for both: connections, the allocator, SQLite's page cache.
    for (index, server) in servers.iter().enumerate() {
        load_cycling(
            server.addr,
            CONNECTIONS,
            Duration::from_millis(300),
            prepare(index),
        )?;
    }
    let before = scrape(servers[0].addr)?;
    let mut results = [LoadResult::default(), LoadResult::default()];
    let mut cpu = [Duration::ZERO; 2];
    for round in 0..plan.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for index in order {
            let cpu_before = servers[index].cpu_time()?;
            let result = load_cycling(servers[index].addr, CONNECTIONS, plan.turn, prepare(index))?;
            cpu[index] += servers[index].cpu_time()?.saturating_sub(cpu_before);
            results[index].merge(result);
        }
    }
    let after = scrape(servers[0].addr)?;
    let after_status = [servers[0].status()?, servers[1].status()?];

    let route = "POST /v1/messages (echo)";
    report.push_row(
        &format!("{route} req/s, {CONNECTIONS} clients"),
        Unit::PerSecond,
        results[0].per_second(),
        results[1].per_second(),
        Some(Target::ratio_at_least(THROUGHPUT_RATIO_TARGET)),
    );
    for (name, fraction) in [("p50", 0.50), ("p99", 0.99)] {
        report.push(
            &format!("{route} {name}"),
            Unit::Millis,
            results[0].percentile_millis(fraction),
            results[1].percentile_millis(fraction),
        );
    }
    let per_message = |index: usize| {
        let count = results[index].count();
        (count > 0).then(|| cpu[index].as_secs_f64() * 1e6 / count as f64)
    };
    report.push(
        "blufio CPU per message",
        Unit::Micros,
        per_message(0),
        per_message(1),
    );
    let delta = |name: &str| Some(metric_value(&after, name)? - metric_value(&before, name)?);
    let (commits, writes) = (delta(COMMITS), delta(WRITES));
    let seconds = results[0].elapsed().map(|elapsed| elapsed.as_secs_f64());
    report.push("store commits during the load", Unit::Count, commits, None);
    report.push(
        "store writes (jobs committed) during the load",
        Unit::Count,
        writes,
        None,
    );
    report.push(
        "writes per commit (group commit)",
        Unit::Count,
        writes
            .zip(commits)
            .filter(|(_, commits)| *commits > 0.0)
            .map(|(writes, commits)| writes / commits),
        None,
    );
    report.push(
        "commits per second (fsyncs)",
        Unit::PerSecond,
        commits
            .zip(seconds)
            .map(|(commits, seconds)| commits / seconds),
        None,
    );
    report.push(
        "append: queue and commit, mean",
        Unit::Millis,
        delta(APPEND_SUM)
            .zip(delta(APPEND_COUNT))
            .filter(|(_, count)| *count > 0.0)
            .map(|(sum, count)| sum * 1e3 / count),
        None,
    );
    report.push(
        "database and WAL after the load",
        Unit::Mebibytes,
        metric_value(&after, STORE_BYTES),
        None,
    );
    report.push(
        "VmRSS after the load",
        Unit::Mebibytes,
        Some(after_status[0].vm_rss as f64),
        Some(after_status[1].vm_rss as f64),
    );
    Ok(())
}

/// Gives client `client` of `clients` the message requests of sessions `client`,
/// `client + clients`, …, so every session is used and no two clients share one.
fn client_requests(ids: &[String], clients: usize) -> Vec<Vec<Vec<u8>>> {
    let content = "m".repeat(MESSAGE_BYTES);
    (0..clients)
        .map(|client| {
            ids.iter()
                .skip(client)
                .step_by(clients.max(1))
                .map(|id| {
                    let body = format!(r#"{{"session_id":"{id}","content":"{content}"}}"#);
                    request_bytes("POST", "/v1/messages", &body)
                })
                .collect()
        })
        .collect()
}

/// Opens `count` sessions and returns their ids.
fn open_sessions(addr: SocketAddr, count: usize) -> Result<Vec<String>> {
    let mut client = Client::connect(addr)?;
    let request = request_bytes("POST", "/v1/sessions", "");
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let (status, body) = client.send(&request)?;
        if status != 201 {
            return Err(format!("POST /v1/sessions answered {status}").into());
        }
        let id = json::string(&String::from_utf8_lossy(body), "id")
            .ok_or("POST /v1/sessions answered no id")?;
        ids.push(id);
    }
    Ok(ids)
}

/// Reads `/metrics`.
fn scrape(addr: SocketAddr) -> Result<String> {
    let mut client = Client::connect(addr)?;
    let (status, body) = client.send(&request_bytes("GET", "/metrics", ""))?;
    if status != 200 {
        return Err(format!("/metrics answered {status}").into());
    }
    Ok(String::from_utf8_lossy(body).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(index: usize) -> String {
        format!("{index:032x}")
    }

    #[test]
    fn every_session_goes_to_exactly_one_client() {
        let ids: Vec<String> = (0..LOAD_SESSIONS).map(id).collect();
        let requests = client_requests(&ids, CONNECTIONS);
        assert_eq!(requests.len(), CONNECTIONS);
        let mut seen = Vec::new();
        for (client, requests) in requests.iter().enumerate() {
            assert_eq!(
                requests.len(),
                LOAD_SESSIONS / CONNECTIONS,
                "client {client}"
            );
            for request in requests {
                let text = String::from_utf8(request.clone()).unwrap();
                assert!(text.starts_with("POST /v1/messages HTTP/1.1\r\n"));
                let body: serde_json::Value =
                    serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
                assert_eq!(body["content"].as_str().unwrap().len(), MESSAGE_BYTES);
                seen.push(body["session_id"].as_str().unwrap().to_owned());
            }
        }
        seen.sort();
        assert_eq!(seen, ids);
    }

    #[test]
    fn fewer_sessions_than_clients_leave_the_rest_without_requests() {
        let requests = client_requests(&[id(1), id(2)], 4);
        let counts: Vec<usize> = requests.iter().map(Vec::len).collect();
        assert_eq!(counts, [1, 1, 0, 0]);
    }

    #[test]
    fn labelled_store_series_are_read_from_the_exposition() {
        let text = "# TYPE blufio_store_operation_seconds histogram\n\
            blufio_store_operation_seconds_sum{op=\"create\"} 0.5\n\
            blufio_store_operation_seconds_sum{op=\"append\"} 1.25\n\
            blufio_store_operation_seconds_count{op=\"append\"} 500\n\
            blufio_store_commits_total 40\n";
        assert_eq!(metric_value(text, APPEND_SUM), Some(1.25));
        assert_eq!(metric_value(text, APPEND_COUNT), Some(500.0));
        assert_eq!(metric_value(text, COMMITS), Some(40.0));
        assert_eq!(metric_value(text, WRITES), None);
    }
}
