//! Memory pressure and admission control, end to end with an injected heap reading.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use blufio::{Config, Context, FixedRss, ManualHeap, Rejected};

use crate::{prometheus, support};

const MIB: u64 = 1024 * 1024;

fn start(heap: &Arc<ManualHeap>, shed_calls: &Arc<AtomicU64>) -> support::TestDaemon {
    let calls = Arc::clone(shed_calls);
    support::start_with(
        Context::builder(Config::for_tests())
            .with_heap_source(Arc::clone(heap))
            .with_rss_source(FixedRss(Some(50 * MIB)))
            .with_shed_hook("test-cache", move || {
                calls.fetch_add(1, Ordering::SeqCst);
            }),
    )
}

#[test]
fn pressure_is_visible_in_health_and_metrics_and_purges_and_sheds() {
    let heap = Arc::new(ManualHeap::new(100 * MIB));
    let shed_calls = Arc::new(AtomicU64::new(0));
    let daemon = start(&heap, &shed_calls);
    assert_eq!(daemon.get("/health").json()["status"], "healthy");

    heap.set(160 * MIB);
    daemon.tick();
    let health = daemon.get("/health").json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["memory_heap_bytes"], 160 * MIB);
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(exposition.value("blufio_memory_pressure", &[]), Some(1.0));
    assert_eq!(
        exposition.value("blufio_memory_purges_total", &[]),
        Some(1.0)
    );
    assert_eq!(heap.purges(), 1);
    assert_eq!(shed_calls.load(Ordering::SeqCst), 1);

    // Still above 90% of the warn threshold: pressure holds, no second purge.
    heap.set(140 * MIB);
    daemon.tick();
    assert_eq!(daemon.get("/health").json()["status"], "degraded");
    assert_eq!(heap.purges(), 1);

    heap.set(100 * MIB);
    daemon.tick();
    assert_eq!(daemon.get("/health").json()["status"], "healthy");
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(exposition.value("blufio_memory_pressure", &[]), Some(0.0));
    daemon.stop();
}

#[test]
fn above_the_limit_new_sessions_are_refused_and_existing_ones_survive() {
    let heap = Arc::new(ManualHeap::new(100 * MIB));
    let daemon = start(&heap, &Arc::new(AtomicU64::new(0)));
    let existing = daemon.ctx.try_open_session().unwrap();

    heap.set(210 * MIB);
    daemon.tick();
    assert_eq!(
        daemon.ctx.try_open_session().unwrap_err(),
        Rejected::MemoryLimit
    );
    assert!(daemon.ctx.sessions.get(existing.session().id()).is_some());
    let health = daemon.get("/health").json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["active_sessions"], 1);

    heap.set(120 * MIB);
    daemon.tick();
    let reopened = daemon.ctx.try_open_session().unwrap();
    assert_eq!(daemon.get("/health").json()["active_sessions"], 2);
    drop(reopened);
    drop(existing);
    let exposition = prometheus::parse(&daemon.get_ok("/metrics"));
    assert_eq!(exposition.value("blufio_active_sessions", &[]), Some(0.0));
    assert_eq!(daemon.get("/health").json()["active_sessions"], 0);
    daemon.stop();
}
