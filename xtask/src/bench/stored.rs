//! Part 3 of the store scenario (`store.rs`): a database of 10,000 sessions of 20 turns,
//! written by the `sqlite3` shell into the schema the daemon itself created, then the
//! daemon's start-up on it, checked for every session and one history.
//!
//! The rows are filled with recursive CTEs in one transaction (about a second), not through
//! the API, which would take a minute of messages. The schema comes from the daemon, so the
//! fill only has to match the columns of `src/store/schema.rs`; a mismatch fails the fill or
//! the checks, never passes silently.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::build::Binaries;
use super::client::Client;
use super::load::{median, request_bytes};
use super::report::{Report, Target, Unit};
use super::server::Server;
use super::server::{fresh_dir, median_of};
use crate::json;
use crate::project::{Result, describe};

/// Turns per stored session in part 3.
pub(super) const STORED_TURNS: usize = 20;
/// Bytes of every message's content, sent and stored.
pub(super) const MESSAGE_BYTES: usize = 100;
/// The store scenario's start-up target with stored sessions (the issue's).
pub(super) const STARTUP_TARGET_MS: f64 = 1_000.0;

/// How much of the store scenario (`store.rs` and this file) a run does.
#[derive(Debug, Clone, Copy)]
pub(super) struct StorePlan {
    /// Starts per side for the idle rows (medians).
    pub(super) starts: usize,
    /// The pause after a start-up before the idle VmRSS is read.
    pub(super) settle: Duration,
    /// Rounds of the message load; each side takes one turn per round.
    pub(super) rounds: usize,
    /// Length of one side's turn.
    pub(super) turn: Duration,
    /// Sessions in the database of part 3.
    pub(super) stored_sessions: usize,
    /// Start-ups on that database (the median is reported).
    pub(super) stored_starts: usize,
}

/// Builds the database of part 3, starts the daemon on it and adds the rows.
pub(super) fn run(
    report: &mut Report,
    binaries: &Binaries,
    work_dir: &Path,
    plan: StorePlan,
    idle_rss: Option<f64>,
) -> Result<()> {
    let count = plan.stored_sessions;
    let state_dir = fresh_dir(&work_dir.join("store-sessions"))?;
    let config = work_dir.join("store-sessions.toml");
    // The daemon creates the schema; the fill matches the version it wrote.
    Server::start_blufio(binaries, &config, Some(&state_dir))?.stop()?;
    let database = state_dir.join("blufio.db");
    if !database.is_file() {
        return Err(format!("blufio did not create {}", database.display()).into());
    }
    let filled = Instant::now();
    fill(&database, &fill_sql(count, STORED_TURNS, unix_now()?))?;
    let fill_time = filled.elapsed();
    let database_bytes = fs::metadata(&database)?.len();

    let mut startup_ms = Vec::new();
    let mut statuses = Vec::new();
    for _ in 0..plan.stored_starts {
        let server = Server::start_blufio(binaries, &config, Some(&state_dir))?;
        startup_ms.push(server.cold_start.as_secs_f64() * 1e3);
        let active = active_sessions(server.addr)?;
        if active != Some(count as f64) {
            return Err(format!(
                "blufio restored {active:?} sessions of the {count} in {}",
                database.display()
            )
            .into());
        }
        thread::sleep(plan.settle);
        statuses.push(server.status()?);
        check_one_history(server.addr)?;
        server.stop()?;
    }
    let rss = median_of(&statuses, |status| status.vm_rss);
    report.push(
        &format!("database of {count} sessions × {STORED_TURNS} turns"),
        Unit::Mebibytes,
        Some(database_bytes as f64),
        None,
    );
    report.push_row(
        &format!("start-up with {count} stored sessions, median"),
        Unit::Millis,
        median(&startup_ms),
        None,
        Some(Target::at_most(STARTUP_TARGET_MS)),
    );
    report.push(
        &format!("VmRSS after start-up with {count} sessions restored, median"),
        Unit::Mebibytes,
        rss,
        None,
    );
    report.push(
        &format!("RssAnon after start-up with {count} sessions restored, median"),
        Unit::Mebibytes,
        median_of(&statuses, |status| status.rss_anon),
        None,
    );
    report.push(
        "VmRSS per restored session (over idle with an empty store)",
        Unit::Bytes,
        rss.zip(idle_rss)
            .map(|(rss, idle)| (rss - idle) / count.max(1) as f64),
        None,
    );
    report.note(format!(
        "store: {count} sessions of {STORED_TURNS} turns written by the sqlite3 shell in \
         {:.2} s; {} start-up(s) on them, each checked for every session and one history",
        fill_time.as_secs_f64(),
        plan.stored_starts
    ));
    Ok(())
}

/// Returns the SQL that adds `sessions` HTTP sessions of `turns` turns each, last active at
/// `now`, in one transaction: random 32-hex-digit ids as blufio makes them, turns
/// alternating user and assistant (the assistant's with a model, tokens and a cost),
/// `MESSAGE_BYTES` bytes of content each, numbered from 0 as blufio numbers them.
fn fill_sql(sessions: usize, turns: usize, now: u64) -> String {
    let created = now.saturating_sub(turns as u64);
    format!(
        "BEGIN;
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {sessions})
INSERT INTO sessions (id, kind, model, system, created_at, last_active_at, message_count)
SELECT lower(hex(randomblob(16))), 'http', NULL, NULL, {created}, {now}, {turns} FROM n;
WITH RECURSIVE t(seq) AS (SELECT 0 UNION ALL SELECT seq + 1 FROM t WHERE seq + 1 < {turns})
INSERT INTO turns (session_id, seq, role, content, created_at, model, input_tokens,
                   output_tokens, cost_usd)
SELECT s.id, t.seq,
       CASE t.seq % 2 WHEN 0 THEN 'user' ELSE 'assistant' END,
       printf('%-{MESSAGE_BYTES}s', 'turn ' || t.seq || ' of session ' || s.id),
       {created} + t.seq,
       CASE t.seq % 2 WHEN 0 THEN NULL ELSE 'echo' END,
       CASE t.seq % 2 WHEN 0 THEN NULL ELSE 30 END,
       CASE t.seq % 2 WHEN 0 THEN NULL ELSE 30 END,
       CASE t.seq % 2 WHEN 0 THEN NULL ELSE 0.0 END
FROM sessions AS s, t;
COMMIT;
"
    )
}

/// Runs `sql` on `database` with the `sqlite3` shell, failing on its first error.
fn fill(database: &Path, sql: &str) -> Result<()> {
    let script = database.with_extension("fill.sql");
    fs::write(&script, sql)?;
    let mut command = Command::new("sqlite3");
    command
        .arg("-bail")
        .arg(database)
        .arg(format!(".read {}", script.display()));
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run `{}`: {error}", describe(&command)))?;
    if !output.status.success() {
        return Err(format!(
            "`{}` failed: {}: {}",
            describe(&command),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// Whether the `sqlite3` shell can be run.
pub(super) fn has_sqlite3() -> bool {
    Command::new("sqlite3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Returns `active_sessions` from `/health`.
fn active_sessions(addr: SocketAddr) -> Result<Option<f64>> {
    let mut client = Client::connect(addr)?;
    let (_, body) = client.send(&request_bytes("GET", "/health", ""))?;
    Ok(json::number(
        &String::from_utf8_lossy(body),
        "active_sessions",
    ))
}

/// Checks that the first listed session's messages come back from the store, all of them.
fn check_one_history(addr: SocketAddr) -> Result<()> {
    let mut client = Client::connect(addr)?;
    let (status, body) = client.send(&request_bytes("GET", "/v1/sessions?limit=1", ""))?;
    let body = String::from_utf8_lossy(body);
    let id = json::field(&body, "sessions")
        .and_then(|sessions| sessions.get(0)?.get("id")?.as_str().map(str::to_owned))
        .ok_or(format!(
            "GET /v1/sessions answered {status} without a session: {body}"
        ))?;
    let path = format!("/v1/sessions/{id}/messages?limit=100");
    let (status, body) = client.send(&request_bytes("GET", &path, ""))?;
    let body = String::from_utf8_lossy(body);
    let messages =
        json::field(&body, "messages").and_then(|messages| messages.as_array().map(Vec::len));
    if status != 200 || messages != Some(STORED_TURNS) {
        return Err(format!(
            "GET {path} answered {status} with {messages:?} messages, not {STORED_TURNS}"
        )
        .into());
    }
    Ok(())
}

fn unix_now() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fill_makes_the_asked_sessions_and_turns_active_now() {
        let sql = fill_sql(10_000, 20, 1_800_000_000);
        assert!(sql.starts_with("BEGIN;") && sql.trim_end().ends_with("COMMIT;"));
        assert!(sql.contains("WHERE i + 1 < 10000)"), "{sql}");
        assert!(sql.contains("WHERE seq + 1 < 20)"), "{sql}");
        assert!(sql.contains("1799999980, 1800000000, 20 FROM n"), "{sql}");
        assert!(sql.contains("printf('%-100s'"), "{sql}");
    }
}
