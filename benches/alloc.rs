//! Allocation and monitor-tick costs: `cargo bench --bench alloc --no-default-features`.
//!
//! The library's own global allocator (the `jemalloc` feature) is off, and this bench installs
//! a counting wrapper around jemalloc instead, so it counts every allocation the process makes.
//! It starts one daemon in-process on port 0 and prints `key value` lines that
//! `cargo xtask bench` reads:
//!
//! - `health_allocations_per_request`, `health_allocated_bytes_per_request`: the daemon's
//!   allocations per `GET /health` on a warm keep-alive connection (the client here reuses
//!   one buffer and allocates nothing while counting);
//! - `floor_health_allocations_per_request`, `floor_health_allocated_bytes_per_request`: the
//!   same for a bare trillium-smol handler answering a constant (as `benches/floor` does), so
//!   the difference is what blufio's own code allocates;
//! - `monitor_tick_micros`, `monitor_tick_allocations`: one `monitor::tick` (jemalloc epoch
//!   and stats, `/proc/self/statm`, gauges, pressure step), as the monitor runs it.
//!
//! - `metrics_process_sample_micros`, `metrics_render_micros`, `metrics_render_allocations`:
//!   the two halves of a `/metrics` scrape, the `/proc` reads and the text rendering.
//!
//! With the `jemalloc` feature on it only says how to run it. `BLUFIO_ALLOC_BENCH_QUICK=1`
//! runs fewer iterations.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(not(feature = "jemalloc"))]
mod counting {
    use std::alloc::{GlobalAlloc, Layout};
    use std::sync::atomic::{AtomicU64, Ordering};

    use tikv_jemallocator::Jemalloc;

    /// Allocations (including reallocations) since the start; process-wide by nature, like
    /// the allocator it wraps.
    pub static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
    /// Bytes requested by those allocations.
    pub static BYTES: AtomicU64 = AtomicU64::new(0);

    /// jemalloc with two relaxed counters in front.
    pub struct Counting;

    // SAFETY: every call is forwarded unchanged to jemalloc, which upholds the contract.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            // SAFETY: forwarded with the caller's layout.
            unsafe { Jemalloc.alloc(layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
            // SAFETY: forwarded with the caller's layout.
            unsafe { Jemalloc.alloc_zeroed(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from this allocator with `layout`.
            unsafe { Jemalloc.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
            // SAFETY: `ptr` came from this allocator with `layout`.
            unsafe { Jemalloc.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: Counting = Counting;

    /// Returns (allocations, bytes) so far.
    pub fn snapshot() -> (u64, u64) {
        (
            ALLOCATIONS.load(Ordering::Relaxed),
            BYTES.load(Ordering::Relaxed),
        )
    }
}

#[cfg(feature = "jemalloc")]
fn main() {
    eprintln!("run it as `cargo bench --bench alloc --no-default-features`");
}

#[cfg(not(feature = "jemalloc"))]
fn main() {
    use std::time::{Duration, Instant};

    let quick = std::env::var("BLUFIO_ALLOC_BENCH_QUICK").is_ok_and(|value| value == "1");
    let (requests, ticks): (u32, u32) = if quick { (200, 200) } else { (5_000, 20_000) };

    let ctx = blufio::Context::builder(blufio::Config::for_tests())
        .with_heap_source(JemallocHeap::new())
        .build()
        .unwrap();
    let daemon = blufio::spawn(std::sync::Arc::clone(&ctx)).unwrap();

    let (allocations, bytes) = count_health(daemon.health_addr(), requests);
    println!("counting allocations in-process over {requests} /health requests and {ticks} ticks");
    println!("health_allocations_per_request {allocations:.2}");
    println!("health_allocated_bytes_per_request {bytes:.0}");

    let floor = trillium_smol::config()
        .with_host("127.0.0.1")
        .with_port(0)
        .without_signals()
        .with_nodelay()
        .spawn(|conn: trillium::Conn| async move {
            conn.with_status(trillium::Status::Ok)
                .with_response_header(trillium::KnownHeaderName::ContentType, "application/json")
                .with_response_header(trillium::KnownHeaderName::CacheControl, "no-store")
                .with_body(FLOOR_HEALTH)
                .halt()
        });
    let floor_addr = *async_io::block_on(floor.info()).tcp_socket_addr().unwrap();
    let (allocations, bytes) = count_health(floor_addr, requests);
    println!("floor_health_allocations_per_request {allocations:.2}");
    println!("floor_health_allocated_bytes_per_request {bytes:.0}");
    async_io::block_on(floor.shut_down());

    for _ in 0..100 {
        blufio::internals::monitor::tick(&ctx);
    }
    measure("monitor_tick", ticks, || {
        blufio::internals::monitor::tick(&ctx)
    });

    // What one /metrics scrape costs before any HTTP: the /proc reads and the rendering.
    let renders = ticks / 10;
    let started = Instant::now();
    for _ in 0..renders {
        std::hint::black_box(ctx.process_sample());
    }
    println!(
        "metrics_process_sample_micros {:.2}",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(renders)
    );
    let sample = ctx.process_sample();
    let mut body = String::with_capacity(8 * 1024);
    measure("metrics_render", renders, || {
        body.clear();
        ctx.metrics.render(&sample, &mut body);
    });
    assert!(daemon.shut_down_blocking(Duration::from_secs(5)));
}

#[cfg(not(feature = "jemalloc"))]
/// Runs `body` `runs` times and prints its mean time and allocations per run as
/// `{name}_micros` and `{name}_allocations`.
fn measure(name: &str, runs: u32, mut body: impl FnMut()) {
    let (allocations, _) = counting::snapshot();
    let started = std::time::Instant::now();
    for _ in 0..runs {
        body();
    }
    let elapsed = started.elapsed();
    let (allocations_after, _) = counting::snapshot();
    println!(
        "{name}_micros {:.2}",
        elapsed.as_secs_f64() * 1e6 / f64::from(runs)
    );
    println!(
        "{name}_allocations {:.2}",
        (allocations_after - allocations) as f64 / f64::from(runs)
    );
}

/// What `benches/floor` answers to `/health`.
#[cfg(not(feature = "jemalloc"))]
const FLOOR_HEALTH: &str = r#"{"status":"healthy","uptime_secs":3,"memory_heap_bytes":404968,"memory_rss_bytes":7421952,"active_sessions":0}"#;

/// Returns (allocations, bytes) per `GET /health` on one warm keep-alive connection.
#[cfg(not(feature = "jemalloc"))]
fn count_health(addr: std::net::SocketAddr, requests: u32) -> (f64, f64) {
    use std::{
        io::{Read, Write},
        net::TcpStream,
    };

    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    let request = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut buffer = [0u8; 4096];
    let mut get = |stream: &mut TcpStream| {
        stream.write_all(request).unwrap();
        // The response head and its ~110-byte body arrive well inside one buffer; read until
        // the body's closing brace.
        let mut filled = 0;
        loop {
            let read = stream.read(&mut buffer[filled..]).unwrap();
            assert!(read > 0, "the server closed the connection");
            filled += read;
            if buffer[..filled].ends_with(b"}") {
                assert!(buffer.starts_with(b"HTTP/1.1 200"));
                break;
            }
        }
    };
    for _ in 0..200 {
        get(&mut stream);
    }
    let (allocations, bytes) = counting::snapshot();
    for _ in 0..requests {
        get(&mut stream);
    }
    let (allocations_after, bytes_after) = counting::snapshot();
    (
        (allocations_after - allocations) as f64 / f64::from(requests),
        (bytes_after - bytes) as f64 / f64::from(requests),
    )
}

/// The library's jemalloc heap source, which is compiled out without the `jemalloc` feature:
/// the same epoch advance and two statistics reads per tick.
#[cfg(not(feature = "jemalloc"))]
struct JemallocHeap {
    epoch: tikv_jemalloc_ctl::epoch_mib,
    allocated: tikv_jemalloc_ctl::stats::allocated_mib,
    resident: tikv_jemalloc_ctl::stats::resident_mib,
}

#[cfg(not(feature = "jemalloc"))]
impl std::fmt::Debug for JemallocHeap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JemallocHeap")
    }
}

#[cfg(not(feature = "jemalloc"))]
impl JemallocHeap {
    fn new() -> JemallocHeap {
        JemallocHeap {
            epoch: tikv_jemalloc_ctl::epoch::mib().unwrap(),
            allocated: tikv_jemalloc_ctl::stats::allocated::mib().unwrap(),
            resident: tikv_jemalloc_ctl::stats::resident::mib().unwrap(),
        }
    }
}

#[cfg(not(feature = "jemalloc"))]
impl blufio::HeapSource for JemallocHeap {
    fn read(&self) -> Result<Option<blufio::HeapStats>, blufio::Error> {
        let error = |e: tikv_jemalloc_ctl::Error| blufio::Error::Allocator(e.to_string());
        self.epoch.advance().map_err(error)?;
        Ok(Some(blufio::HeapStats {
            allocated_bytes: self.allocated.read().map_err(error)? as u64,
            resident_bytes: self.resident.read().map_err(error)? as u64,
        }))
    }

    fn purge(&self) -> Result<(), blufio::Error> {
        Ok(())
    }

    fn page_size(&self) -> Option<u64> {
        None
    }

    fn name(&self) -> &'static str {
        "jemalloc"
    }
}
