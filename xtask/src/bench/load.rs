//! The load generator: keep-alive clients on threads for the throughput rows, and the idle
//! connections, WebSockets and sessions of the capacity rows.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::client::Client;
use super::report::{Report, Unit};
use super::{CONNECTIONS, IO_TIMEOUT, TOKEN};
use crate::json;
use crate::project::Result;

/// Builds a request that a client sends in one write.
pub(super) fn request_bytes(method: &str, path: &str, body: &str) -> Vec<u8> {
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
pub(super) fn message_request(client: &mut Client) -> Result<Vec<u8>> {
    let (status, body) = client.send(&request_bytes("POST", "/v1/sessions", ""))?;
    if status != 201 {
        return Err(format!("POST /v1/sessions answered {status}").into());
    }
    let body = String::from_utf8_lossy(body);
    let id = json::string(&body, "id").ok_or("POST /v1/sessions answered no id")?;
    let message = format!(r#"{{"session_id":"{id}","content":"hello from the bench"}}"#);
    Ok(request_bytes("POST", "/v1/messages", &message))
}

/// Latencies and counts of one or more load turns.
#[derive(Debug, Default)]
pub(super) struct LoadResult {
    /// Latency of every request, in µs.
    latencies: Vec<u32>,
    /// Sum of the turns' wall-clock lengths.
    elapsed: Duration,
}

impl LoadResult {
    #[cfg(test)]
    pub(super) fn new(latencies: Vec<u32>, elapsed: Duration) -> LoadResult {
        LoadResult { latencies, elapsed }
    }

    /// Returns the turns' summed wall-clock length, `None` before any turn.
    pub(super) fn elapsed(&self) -> Option<Duration> {
        (!self.elapsed.is_zero()).then_some(self.elapsed)
    }

    /// Returns how many requests were answered.
    pub(super) fn count(&self) -> usize {
        self.latencies.len()
    }

    pub(super) fn merge(&mut self, other: LoadResult) {
        self.latencies.extend(other.latencies);
        self.elapsed += other.elapsed;
    }

    pub(super) fn per_second(&self) -> Option<f64> {
        (!self.elapsed.is_zero()).then(|| self.latencies.len() as f64 / self.elapsed.as_secs_f64())
    }

    /// Returns the latency percentile in ms.
    pub(super) fn percentile_millis(&self, fraction: f64) -> Option<f64> {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        percentile(&sorted, fraction).map(|micros| micros / 1e3)
    }
}

/// Nearest-rank percentile of sorted samples; `None` without samples.
pub(super) fn percentile(sorted: &[u32], fraction: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    let index = rank.clamp(1, sorted.len()) - 1;
    Some(f64::from(sorted[index]))
}

pub(super) fn median(samples: &[f64]) -> Option<f64> {
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
pub(super) fn load(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    prepare: impl Fn(&mut Client) -> Result<Vec<u8>>,
) -> Result<LoadResult> {
    load_cycling(addr, connections, duration, move |_, client| {
        Ok(vec![prepare(client)?])
    })
}

/// Like [`load`], but connection `index` sends the requests `prepare(index, client)` returns
/// in turn, round and round (such as messages to several sessions).
pub(super) fn load_cycling(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    prepare: impl Fn(usize, &mut Client) -> Result<Vec<Vec<u8>>>,
) -> Result<LoadResult> {
    let mut clients = Vec::with_capacity(connections);
    for index in 0..connections {
        let mut client = Client::connect(addr)?;
        let requests = prepare(index, &mut client)?;
        if requests.is_empty() {
            return Err(format!("no request for connection {index}").into());
        }
        clients.push((client, requests));
    }
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = clients
        .into_iter()
        .map(|(mut client, requests)| {
            thread::spawn(move || -> std::result::Result<Vec<u32>, String> {
                let mut latencies = Vec::with_capacity(4096);
                for request in requests.iter().cycle() {
                    if Instant::now() >= deadline {
                        break;
                    }
                    let sent = Instant::now();
                    let (status, _) = client.send(request).map_err(|error| error.to_string())?;
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

pub(super) fn push_load_rows(
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
pub(super) fn open_idle_connections(addr: SocketAddr, count: usize) -> Result<Vec<Client>> {
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
pub(super) fn open_idle_websockets(addr: SocketAddr, count: usize) -> Result<Vec<TcpStream>> {
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
pub(super) fn open_sessions(addr: SocketAddr, count: usize) -> Result<()> {
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

/// Returns blufio's `memory_heap_bytes` from `/health` (jemalloc's `stats.allocated` at the
/// last monitor tick): live data, as opposed to pages the allocator keeps.
pub(super) fn heap_bytes(addr: SocketAddr) -> Result<Option<f64>> {
    let mut client = Client::connect(addr)?;
    let (_, body) = client.send(&request_bytes("GET", "/health", ""))?;
    let body = String::from_utf8_lossy(body);
    Ok(json::number(&body, "memory_heap_bytes"))
}

/// Sends one request on a fresh connection; returns the status and the body length.
pub(super) fn get(addr: SocketAddr, path: &str) -> Result<(u16, usize)> {
    let mut client = Client::connect(addr)?;
    let (status, body) = client.send(&request_bytes("GET", path, ""))?;
    Ok((status, body.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn requests_go_out_in_one_buffer_with_auth_only_for_the_api() {
        let health = String::from_utf8(request_bytes("GET", "/health", "")).unwrap();
        assert_eq!(health, "GET /health HTTP/1.1\r\nHost: bench\r\n\r\n");
        let message = String::from_utf8(request_bytes("POST", "/v1/messages", "{}")).unwrap();
        assert!(message.contains("Authorization: Bearer bench-token-0123456789\r\n"));
        assert!(message.ends_with("Content-Length: 2\r\n\r\n{}"));
    }
}
