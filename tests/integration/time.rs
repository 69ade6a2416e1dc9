//! Time: the monitor's schedule across a SIGSTOP, a million latency observations between
//! scrapes, and SIGTERM with requests in flight, against the real binary and allocator.

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use crate::support;

fn monitor_ticks(addr: SocketAddr) -> u64 {
    let body = support::request(addr, "GET", "/metrics", &[], None).body;
    body.lines()
        .find_map(|line| line.strip_prefix("blufio_monitor_ticks_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no blufio_monitor_ticks_total in {body}"))
}

#[test]
fn the_monitor_skips_ticks_missed_while_stopped_instead_of_bursting() {
    let port = support::free_port();
    let config = format!(
        "[daemon]\nhealth_port = {port}\nmonitor_interval_secs = 1\n[gateway]\nport = {port}\n"
    );
    let mut daemon = support::serve(&config, "sigstop");
    let addr = daemon.addr();
    let before = monitor_ticks(addr);
    daemon.signal("STOP");
    thread::sleep(Duration::from_secs(4));
    daemon.signal("CONT");
    // The first request after SIGCONT is served once the process runs again; by then the
    // overdue tick has fired once. Four missed ticks run back to back would show here.
    thread::sleep(Duration::from_millis(300));
    let after_resume = monitor_ticks(addr);
    assert!(
        after_resume - before <= 2,
        "{} ticks in ~0.3 s of running time around a 4 s stop: the monitor burst",
        after_resume - before
    );
    // The schedule then continues at one tick per second.
    let resumed = Instant::now();
    thread::sleep(Duration::from_millis(2_500));
    let later = monitor_ticks(addr);
    let expected = resumed.elapsed().as_secs();
    assert!(
        (expected.saturating_sub(1)..=expected + 1).contains(&(later - after_resume)),
        "{} ticks in {:?}",
        later - after_resume,
        resumed.elapsed()
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait(support::EXIT_TIMEOUT).code(), Some(0));
}

/// Bytes this thread allocated minus bytes it freed, from jemalloc's per-thread counters, so
/// tests running in parallel do not disturb the measurement.
#[cfg(feature = "jemalloc")]
fn thread_net_allocated() -> i64 {
    use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp};

    let allocated = allocatedp::read().unwrap().get();
    let deallocated = deallocatedp::read().unwrap().get();
    allocated as i64 - deallocated as i64
}

#[cfg(feature = "jemalloc")]
#[test]
fn a_million_latency_observations_without_a_scrape_keep_the_heap_flat() {
    use blufio::{Config, Context, internals::monitor};

    const BOUND: i64 = 256 * 1024;
    let ctx = Context::builder(Config::for_tests()).build().unwrap();
    let observe = |count: u32| {
        for index in 0..count {
            ctx.metrics
                .response_latency
                .record(f64::from(index % 1000) / 1000.0);
        }
    };
    observe(10_000);
    monitor::tick(&ctx);
    let start = thread_net_allocated();

    // Without upkeep the exporter queues every observation: the bound is one a leak breaks.
    observe(200_000);
    let queued = thread_net_allocated() - start;
    assert!(
        queued > 4 * BOUND,
        "200k queued observations took only {queued} bytes"
    );
    monitor::tick(&ctx);
    // Upkeep keeps the buffers it grew for that backlog; measure from here.
    let start = thread_net_allocated();

    // A million observations with the monitor's upkeep every 100,000 (far fewer than a busy
    // daemon records in a monitor interval) and no scrape.
    for _ in 0..10 {
        observe(100_000);
        monitor::tick(&ctx);
    }
    let grown = thread_net_allocated() - start;
    assert!(
        grown < BOUND,
        "the heap grew by {grown} bytes over 1,000,000 observations"
    );
    let mut rendered = String::new();
    ctx.metrics
        .render(&blufio_platform::ProcessSample::default(), &mut rendered);
    assert!(
        rendered.contains("blufio_response_latency_seconds_count 1210000"),
        "every observation is counted"
    );
}

#[test]
fn sigterm_with_64_clients_mid_request_completes_every_request_and_exits_zero() {
    let mut daemon = support::serve_drain(1500, "sigterm-64");
    let addr = daemon.addr();
    let bearer = format!("Bearer {}", support::TOKEN);
    let mut clients = Vec::new();
    for index in 0..48 {
        let bearer = bearer.clone();
        clients.push(thread::spawn(move || {
            let body = format!(r#"{{"content":"http client {index}"}}"#);
            let response = support::request(
                addr,
                "POST",
                "/v1/messages",
                &[("Authorization", &bearer)],
                Some(&body),
            );
            assert_eq!(response.status, 200, "{}", response.body);
            assert_eq!(response.json()["content"], format!("http client {index}"));
        }));
    }
    for index in 0..16 {
        let bearer = bearer.clone();
        clients.push(thread::spawn(move || {
            let (mut client, _) = support::ws_connect(addr, &[("Authorization", &bearer)])
                .unwrap_or_else(|(status, _)| panic!("websocket refused with {status}"));
            let text = format!(r#"{{"content":"ws client {index}"}}"#);
            let reply = support::ws_exchange(&mut client, &text);
            assert_eq!(reply["content"], format!("ws client {index}"), "{reply}");
        }));
    }
    // Every client holds a session from the moment its request is read; 64 means all 64 are
    // in flight inside the agent's delay.
    let started = Instant::now();
    loop {
        let health = support::request(addr, "GET", "/health", &[], None).json();
        if health["active_sessions"] == 64 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "{health}");
        thread::sleep(Duration::from_millis(10));
    }
    daemon.signal("TERM");
    for client in clients {
        client.join().expect("every started request completes");
    }
    assert_eq!(daemon.wait(support::EXIT_TIMEOUT).code(), Some(0));
}
