//! The soak's load mix, one plain thread per kind of load, and the verdict on how the load
//! went.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use super::MAX_FAILED_PERMILLE;
use super::client::{
    auth_header, connect, expect_status, invalid, read_frame, read_head, request, send, session_id,
    status_of, write_frame,
};
use crate::project::Result;

/// One load thread's rounds: answered as expected, failed, and the first failure's reason.
#[derive(Debug)]
pub(super) struct LoadStats {
    pub(super) name: &'static str,
    pub(super) load: Load,
    pub(super) ok: AtomicU64,
    pub(super) failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl LoadStats {
    pub(super) fn new(name: &'static str, load: Load) -> LoadStats {
        LoadStats {
            name,
            load,
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
        }
    }

    pub(super) fn record(&self, round: io::Result<()>) {
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

    pub(super) fn tally(&self) -> LoadTally {
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
pub(super) struct LoadTally {
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
pub(super) fn check_loads(tallies: &[LoadTally]) -> Result<String> {
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

pub(super) type Load = fn(SocketAddr) -> io::Result<()>;

/// The load mix: one thread per entry, each repeating its load with a 20 ms pause.
pub(super) const LOADS: &[(&str, Load)] = &[
    ("probes", probes),
    ("sessions", sessions),
    ("sessions", sessions),
    ("stream", streamed_messages),
    ("messages", one_off_messages),
    ("websocket", websocket),
    ("slow", drip_fed_request),
    ("hostile", hostile),
];

pub(super) fn probes(address: SocketAddr) -> io::Result<()> {
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
pub(super) fn sessions(address: SocketAddr) -> io::Result<()> {
    let mut stream = connect(address)?;
    let id = open_session(&mut stream)?;
    for turn in 0..3 {
        let message =
            format!(r#"{{"session_id":"{id}","content":"soak turn {turn} of a session"}}"#);
        request(&mut stream, "POST", "/v1/messages", &message, 200)?;
    }
    delete_session(&mut stream, &id)
}

/// Creates a session, streams three replies into it (SSE, one connection each, read to the
/// end), deletes it.
pub(super) fn streamed_messages(address: SocketAddr) -> io::Result<()> {
    let mut control = connect(address)?;
    let id = open_session(&mut control)?;
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
    delete_session(&mut control, &id)
}

/// Opens a session on a keep-alive connection and returns its id.
fn open_session(stream: &mut TcpStream) -> io::Result<String> {
    let body = request(stream, "POST", "/v1/sessions", "{}", 201)?;
    session_id(&body).ok_or_else(|| invalid("POST /v1/sessions answered no id"))
}

fn delete_session(stream: &mut TcpStream, id: &str) -> io::Result<()> {
    request(stream, "DELETE", &format!("/v1/sessions/{id}"), "", 204).map(drop)
}

/// A message without a session id opens a session that stays until the idle timeout.
pub(super) fn one_off_messages(address: SocketAddr) -> io::Result<()> {
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
pub(super) fn websocket(address: SocketAddr) -> io::Result<()> {
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
pub(super) fn drip_fed_request(address: SocketAddr) -> io::Result<()> {
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
pub(super) fn hostile(address: SocketAddr) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
