//! `GET /ready`: 200 while serving, 503 with a JSON reason above the memory limit and once
//! draining has begun; `/health` stays 200 throughout.

use std::{sync::Arc, time::Duration};

use blufio::{Config, Context, FixedRss, ManualHeap, internals::readiness::NotReady};

use crate::support;

const MIB: u64 = 1024 * 1024;

#[test]
fn ready_is_200_while_serving_and_503_above_the_memory_limit() {
    let heap = Arc::new(ManualHeap::new(10 * MIB));
    let daemon = support::start_with(
        Context::builder(Config::for_tests())
            .with_heap_source(Arc::clone(&heap))
            .with_rss_source(FixedRss(Some(50 * MIB))),
    );
    let ready = daemon.get("/ready");
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["status"], "ready");
    assert_eq!(ready.header("content-type"), Some("application/json"));

    heap.set(250 * MIB);
    daemon.tick();
    let refused = daemon.get("/ready");
    assert_eq!(refused.status, 503, "{}", refused.body);
    let body = refused.json();
    assert_eq!(body["status"], "not_ready");
    assert_eq!(body["reason"], "memory_limit");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    // Liveness is not readiness: /health still answers 200, only degraded.
    let health = daemon.get("/health");
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "degraded");

    // Back under 90% of the limit: ready again, and HEAD works for probes that use it.
    heap.set(100 * MIB);
    daemon.tick();
    assert_eq!(daemon.get("/ready").status, 200);
    let head = support::send_raw(
        daemon.addr(),
        b"HEAD /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);
    daemon.stop();
}

#[test]
fn ready_needs_no_token_on_a_gateway_with_one() {
    let daemon = support::start(support::config_with_token("ready-token"));
    assert_eq!(daemon.get("/ready").status, 200);
    daemon.stop();
}

#[test]
fn readiness_reports_draining_once_shutdown_begins() {
    let ctx = Context::new(Config::for_tests()).unwrap();
    assert_eq!(ctx.readiness(), Err(NotReady::Starting));
    let daemon = blufio::spawn(Arc::clone(&ctx)).unwrap();
    assert_eq!(ctx.readiness(), Ok(()));
    assert!(daemon.shut_down_blocking(Duration::from_secs(5)));
    assert_eq!(ctx.readiness(), Err(NotReady::Draining));
}

#[test]
fn ready_is_503_starting_before_spawn_has_bound_every_listener() {
    // The routes served on their own, from a context `spawn` has not started: the state a
    // probe sees between the first listener opening and the daemon being ready.
    let ctx = Context::new(Config::for_tests()).unwrap();
    let handle = trillium_smol::config()
        .with_host("127.0.0.1")
        .with_port(0)
        .without_signals()
        .spawn(blufio::internals::http::handler(
            Arc::clone(&ctx),
            blufio::internals::http::Scope::All,
        ));
    let info = async_io::block_on(handle.info());
    let addr = *info.tcp_socket_addr().expect("a TCP listener");
    let response = support::request(addr, "GET", "/ready", &[], None);
    assert_eq!(response.status, 503, "{}", response.body);
    assert_eq!(response.json()["reason"], "starting");
    assert_eq!(
        support::request(addr, "GET", "/health", &[], None).status,
        200
    );
    async_io::block_on(handle.shut_down());
}
