//! Two daemons in one process share nothing: the proof that blufio has no global state.

use std::sync::Arc;

use blufio::{Config, Context, FixedRss, ManualHeap, internals::metrics::Channel};

use crate::{prometheus, support};

const MIB: u64 = 1024 * 1024;

#[test]
fn two_daemons_in_one_process_never_see_each_others_numbers() {
    let calm_heap = Arc::new(ManualHeap::new(10 * MIB));
    let pressed_heap = Arc::new(ManualHeap::new(10 * MIB));
    let calm = support::start_with(
        Context::builder(Config::for_tests())
            .with_heap_source(Arc::clone(&calm_heap))
            .with_rss_source(FixedRss(Some(1000 * 4096))),
    );
    let pressed = support::start_with(
        Context::builder(Config::for_tests())
            .with_heap_source(Arc::clone(&pressed_heap))
            .with_rss_source(FixedRss(Some(2000 * 4096))),
    );
    assert_ne!(calm.addr(), pressed.addr());

    pressed_heap.set(180 * MIB);
    pressed.tick();
    calm.tick();
    for _ in 0..3 {
        pressed.ctx.metrics.count_message(Channel::Http);
    }
    let _session = pressed.ctx.try_open_session().unwrap();
    pressed.get("/not-here");

    assert_eq!(pressed.get("/health").json()["status"], "degraded");
    assert_eq!(calm.get("/health").json()["status"], "healthy");
    assert_eq!(pressed.get("/health").json()["active_sessions"], 1);
    assert_eq!(calm.get("/health").json()["active_sessions"], 0);

    let pressed_metrics = prometheus::parse(&pressed.get_ok("/metrics"));
    let calm_metrics = prometheus::parse(&calm.get_ok("/metrics"));
    let http = [("channel", "http")];
    let not_found = [("type", "not_found")];
    // Each series: what the pressed daemon shows, what the calm one shows.
    for (name, labels, pressed_value, calm_value) in [
        ("blufio_messages_total", &http[..], 3.0, 0.0),
        ("blufio_memory_pressure", &[][..], 1.0, 0.0),
        (
            "blufio_memory_rss_bytes",
            &[][..],
            2000.0 * 4096.0,
            1000.0 * 4096.0,
        ),
        ("blufio_errors_total", &not_found[..], 1.0, 0.0),
    ] {
        assert_eq!(
            pressed_metrics.value(name, labels),
            Some(pressed_value),
            "{name}"
        );
        assert_eq!(calm_metrics.value(name, labels), Some(calm_value), "{name}");
    }
    assert_eq!(pressed_heap.purges(), 1);
    assert_eq!(calm_heap.purges(), 0);

    // Stopping one leaves the other serving.
    pressed.stop();
    assert_eq!(calm.get("/health").status, 200);
    calm.stop();
}

#[test]
fn a_daemon_s_tasks_run_on_its_own_executor_and_stop_with_it() {
    use std::time::Duration;

    let ctx = Context::new(Config::for_tests()).unwrap();
    let daemon = blufio::spawn(Arc::clone(&ctx)).unwrap();
    // One executor per context: a second daemon on it is refused.
    let again = blufio::spawn(Arc::clone(&ctx)).unwrap_err();
    assert!(
        again.to_string().contains("already ran a daemon"),
        "{again}"
    );

    // Host work spawned on the daemon's runtime runs on its workers...
    let (sender, receiver) = async_channel::bounded::<&str>(1);
    let held = sender.clone();
    ctx.runtime.spawn_detached(async move {
        sender.send("ran").await.unwrap();
    });
    assert_eq!(async_io::block_on(receiver.recv()), Ok("ran"));
    // ...and what is still pending at shutdown is dropped with the executor.
    ctx.runtime.spawn_detached(async move {
        let _held = held;
        futures_lite::future::pending::<()>().await;
    });
    assert!(daemon.shut_down_blocking(Duration::from_secs(5)));
    assert!(async_io::block_on(receiver.recv()).is_err());
}
