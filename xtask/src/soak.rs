//! `cargo xtask soak --minutes N`: runs the `blufio` binary under mixed load for N minutes and
//! fails if its memory keeps growing.
//!
//! The daemon gets its own free port, a token (through `BLUFIO_GATEWAY_TOKEN`) and the echo
//! agent. A few plain std threads drive a deliberately modest load (the soak checks for leaks,
//! not throughput, and must not starve a shared machine): probes and scrapes, session
//! create/message/delete, messages that open sessions left to idle out, WebSockets, drip-fed
//! requests, and hostile clients (garbage lines, an HTTP/2 preface, oversized bodies and
//! heads, abandoned heads). Every second the main thread samples VmRSS from
//! `/proc/<pid>/status` and the heap and resident gauges from `/metrics`, into
//! `target/soak/soak.csv` and a hand-written `target/soak/soak.svg`.
//!
//! The bound, checked after the run: each of RSS and heap, taken as the median of the last ten
//! samples, may exceed its median over the ten samples ending at warm-up by at most
//! max(8 MiB, 25 %). Warm-up is a fifth of the run, at most two minutes. The run also fails
//! if the daemon dies, stops answering `/metrics`, or does not exit 0 on SIGTERM.
//! It does not measure latency or throughput; `benches/gateway.rs` does.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::smoke;
use crate::{Result, cargo, run_status, target_dir};

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
        match arg.as_str() {
            "--minutes" => duration = Duration::from_secs(value("--minutes")?.parse::<u64>()? * 60),
            "--seconds" => duration = Duration::from_secs(value("--seconds")?.parse()?),
            "--binary" => binary = Some(value("--binary")?.into()),
            "--only" => only = Some(value("--only")?),
            other => return Err(format!("unknown soak argument `{other}`").into()),
        }
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
    let config = out_dir.join("soak.toml");
    fs::write(
        &config,
        CONFIG.replace("PORT", &smoke::free_port()?.to_string()),
    )?;
    let mut child = Command::new(&binary)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("BLUFIO_GATEWAY_TOKEN", TOKEN)
        .env("BLUFIO_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("cannot start {}: {error}", binary.display()))?;
    let stderr = child
        .stderr
        .take()
        .ok_or("the daemon's stderr is not piped")?;
    let mut daemon = Daemon(child);
    let pid = daemon.0.id();
    let address = listening_address(stderr, &out_dir.join("daemon.log"))?;
    println!(
        "soak: {} (pid {pid}) on {address} for {} s; writing {}",
        binary.display(),
        duration.as_secs(),
        out_dir.display()
    );

    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(LoadStats::default());
    let workers: Vec<_> = LOADS
        .iter()
        .filter(|(name, _)| only.as_deref().is_none_or(|only| only == *name))
        .map(|&(name, load)| {
            let stop = Arc::clone(&stop);
            let stats = Arc::clone(&stats);
            thread::Builder::new()
                .name(format!("soak-{name}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match load(address) {
                            Ok(()) => stats.ok.fetch_add(1, Ordering::Relaxed),
                            Err(_) => stats.failed.fetch_add(1, Ordering::Relaxed),
                        };
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
        if let Some(status) = daemon.0.try_wait()? {
            outcome = Err(format!("the daemon exited during the soak: {status}").into());
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
            ok: stats.ok.load(Ordering::Relaxed),
            failed: stats.failed.load(Ordering::Relaxed),
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
    smoke::terminate(&daemon.0)?;
    match smoke::wait_timeout(&mut daemon.0, Duration::from_secs(30))? {
        Some(status) if status.success() => {}
        Some(status) => return Err(format!("the daemon exited with {status} on SIGTERM").into()),
        None => return Err("the daemon did not exit within 30 s of SIGTERM".into()),
    }
    let report = check_bound(&samples, warmup)?;
    println!(
        "soak: {} load rounds ok, {} failed (an unexpected status or an I/O error)",
        stats.ok.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed)
    );
    println!("{report}");
    Ok(())
}

/// Requests answered and requests that failed or were refused.
#[derive(Debug, Default)]
struct LoadStats {
    ok: AtomicU64,
    failed: AtomicU64,
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

/// Samples in the warm-up: a fifth of the run, at most two minutes, at least one window.
fn warmup_samples(duration: Duration) -> usize {
    ((duration.as_secs() / 5).min(120) as usize).max(WINDOW)
}

/// The soak daemon's configuration: one listener on `PORT` (a port that was free a moment
/// ago). A short idle timeout evicts the sessions that messages without an id open during the
/// run, and a short request timeout closes abandoned heads.
const CONFIG: &str = "[daemon]\n\
    bind = \"127.0.0.1\"\n\
    health_port = PORT\n\
    monitor_interval_secs = 1\n\
    request_timeout_secs = 5\n\
    \n\
    [gateway]\n\
    port = PORT\n\
    max_sessions = 200\n\
    session_idle_timeout_secs = 20\n\
    \n\
    [agent]\n\
    provider = \"echo\"\n\
    budget_usd = 0.0\n";

/// The daemon under soak; dropping it kills the process if the soak failed before shutdown.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for the daemon's "listening on" line, then copies the rest of its log to `log` in
/// a thread; no polling of the port.
fn listening_address(stderr: ChildStderr, log: &Path) -> Result<SocketAddr> {
    let mut log_file = fs::File::create(log)?;
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line?;
        writeln!(log_file, "{line}")?;
        let Some(rest) = line.split("listening on http://").nth(1) else {
            continue;
        };
        let address = rest
            .split_whitespace()
            .next()
            .and_then(|address| address.parse().ok())
            .ok_or_else(|| format!("cannot read the address in `{line}`"))?;
        thread::spawn(move || {
            for line in lines.map_while(io::Result::ok) {
                let _ = writeln!(log_file, "{line}");
            }
        });
        return Ok(address);
    }
    Err(format!("the daemon exited before listening; see {}", log.display()).into())
}

type Load = fn(SocketAddr) -> io::Result<()>;

/// The load mix: one thread per entry, each repeating its load with a 20 ms pause.
const LOADS: &[(&str, Load)] = &[
    ("probes", probes),
    ("sessions", sessions),
    ("sessions", sessions),
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
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: soak\r\n{auth}Connection: close\r\n\r\n"
        )?;
        expect_status(&mut stream, 200)?;
    }
    Ok(())
}

/// Creates a session, sends it three messages over one keep-alive connection, deletes it.
fn sessions(address: SocketAddr) -> io::Result<()> {
    let mut stream = connect(address)?;
    let body = request(&mut stream, "POST", "/v1/sessions", "", 201)?;
    let id = json_string(&body, "id").ok_or_else(|| invalid("no session id"))?;
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
    // Past max_sessions the daemon answers 503; that is admission working, not a failure.
    thread::sleep(Duration::from_millis(200));
    result.map(drop)
}

/// Opens /ws, exchanges five messages, closes cleanly.
fn websocket(address: SocketAddr) -> io::Result<()> {
    let mut stream = connect(address)?;
    write!(
        stream,
        "GET /ws HTTP/1.1\r\nHost: soak\r\n{}Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        auth_header()
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
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: soak\r\n{}Content-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        auth_header(),
        body.len()
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

/// Returns the string value of `"key":"value"` in a flat JSON object.
fn json_string(json: &str, key: &str) -> Option<String> {
    let quoted = format!("\"{key}\":\"");
    let start = json.find(&quoted)? + quoted.len();
    let end = json[start..].find('"')?;
    Some(json[start..start + end].to_owned())
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

    #[test]
    fn json_string_reads_the_session_id() {
        let body = r#"{"id":"abc123","created_at":5}"#;
        assert_eq!(json_string(body, "id").as_deref(), Some("abc123"));
        assert_eq!(json_string(body, "missing"), None);
    }
}
