//! The benchmark floor: the least a trillium-smol server on jemalloc can do for blufio's two
//! probe routes. `/health` answers a constant of the same size and headers as blufio's,
//! `/metrics` a constant body of the size given on the command line (blufio's own `/metrics`
//! size, measured by `cargo xtask bench`). Everything else is 404.
//!
//! Usage: `blufio-floor PORT [METRICS_BYTES]`. It deliberately has no configuration, logging,
//! deadlines or metrics: it is what blufio would cost if its own work were free.

use trillium::{Body, Conn, KnownHeaderName, Status};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The same shape and length as a typical blufio `/health` answer.
const HEALTH: &str = r#"{"status":"healthy","uptime_secs":3,"memory_heap_bytes":404968,"memory_rss_bytes":7421952,"active_sessions":0}"#;

/// The next argument as a number, if it is one.
fn number<T: std::str::FromStr>(args: &mut impl Iterator<Item = String>) -> Option<T> {
    args.next().and_then(|arg| arg.parse().ok())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = number(&mut args).expect("usage: blufio-floor PORT [METRICS_BYTES]");
    let metrics_bytes: usize = number(&mut args).unwrap_or(4400);
    // Built once at start-up and shared by every request, as a constant would be.
    let metrics: &'static [u8] = Vec::leak(metrics_text(metrics_bytes));

    trillium_smol::config()
        .with_host("127.0.0.1")
        .with_port(port)
        .with_nodelay()
        .run(move |conn: Conn| async move {
            match conn.path() {
                "/health" => conn
                    .with_status(Status::Ok)
                    .with_response_header(KnownHeaderName::ContentType, "application/json")
                    .with_response_header(KnownHeaderName::CacheControl, "no-store")
                    .with_body(HEALTH)
                    .halt(),
                "/metrics" => conn
                    .with_status(Status::Ok)
                    .with_response_header(
                        KnownHeaderName::ContentType,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                    .with_body(Body::new_static(metrics))
                    .halt(),
                _ => conn.with_status(Status::NotFound).halt(),
            }
        });
}

/// Returns `bytes` bytes of Prometheus-looking text.
fn metrics_text(bytes: usize) -> Vec<u8> {
    let line = b"floor_padding_total{type=\"constant\"} 0\n";
    line.iter().copied().cycle().take(bytes).collect()
}
