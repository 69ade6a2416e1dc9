//! `/metrics` as Prometheus scrapes it.

use blufio::{Config, Context, FixedRss, ManualHeap};

use crate::{prometheus, support};

const EVERY_METRIC: &[(&str, &str)] = &[
    ("blufio_messages_total", "counter"),
    ("blufio_tokens_total", "counter"),
    ("blufio_active_sessions", "gauge"),
    ("blufio_budget_remaining_usd", "gauge"),
    ("blufio_response_latency_seconds", "histogram"),
    ("blufio_memory_heap_bytes", "gauge"),
    ("blufio_memory_rss_bytes", "gauge"),
    ("blufio_memory_resident_bytes", "gauge"),
    ("blufio_memory_pressure", "gauge"),
    ("blufio_errors_total", "counter"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
];

#[test]
fn metrics_pass_a_strict_parser_and_contain_every_metric() {
    let mut config = Config::for_tests();
    config.cost.daily_budget_usd = 2.5;
    let daemon = support::start(config);
    // Touch a labelled series so tokens render (registered per model by agents).
    daemon.ctx.metrics.register_model("test-model");
    daemon.ctx.metrics.response_latency.record(0.02);
    let response = daemon.get("/metrics");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let exposition = prometheus::parse(&response.body);
    for (name, kind) in EVERY_METRIC {
        if name.starts_with("process_") && !cfg!(target_os = "linux") {
            continue;
        }
        assert_eq!(&exposition.family(name).kind, kind, "{name}");
    }
    assert_eq!(
        exposition.value("blufio_budget_remaining_usd", &[]),
        Some(2.5)
    );
    assert_eq!(
        exposition.value(
            "blufio_tokens_total",
            &[("model", "test-model"), ("type", "input")]
        ),
        Some(0.0)
    );
    assert_eq!(
        exposition.value("blufio_response_latency_seconds_bucket", &[("le", "0.025")]),
        Some(1.0)
    );
    assert_eq!(
        exposition.value("blufio_errors_total", &[("type", "memory_monitor")]),
        Some(0.0)
    );
    assert!(exposition.value("blufio_memory_heap_bytes", &[]).unwrap() > 0.0);
    if cfg!(target_os = "linux") {
        assert!(
            exposition
                .value("process_resident_memory_bytes", &[])
                .unwrap()
                > 0.0
        );
        assert!(exposition.value("process_open_fds", &[]).unwrap() >= 3.0);
    }
    daemon.stop();
}

#[test]
fn handler_errors_are_counted_by_type() {
    let daemon = support::start(Config::for_tests());
    daemon.get("/missing");
    daemon.get("/missing-too");
    assert_eq!(
        support::metric(&daemon, "blufio_errors_total", &[("type", "not_found")]),
        Some(2.0)
    );
    daemon.stop();
}

#[test]
fn failing_heap_reader_counts_an_error_and_keeps_serving() {
    let heap = std::sync::Arc::new(ManualHeap::new(10 * 1024 * 1024));
    let daemon = support::start_with(
        Context::builder(Config::for_tests())
            .with_heap_source(std::sync::Arc::clone(&heap))
            .with_rss_source(FixedRss(Some(4096))),
    );
    heap.set_failing(true);
    daemon.tick();
    daemon.tick();
    // The last good reading is kept, not replaced by a fake zero.
    prometheus::parse(&daemon.get_ok("/metrics")).assert_values(&[
        ("blufio_errors_total", &[("type", "memory_monitor")], 2.0),
        ("blufio_memory_heap_bytes", &[], 10.0 * 1024.0 * 1024.0),
        ("blufio_memory_rss_bytes", &[], 4096.0),
    ]);
    heap.set_failing(false);
    heap.set(11 * 1024 * 1024);
    daemon.tick();
    assert_eq!(
        daemon.get("/health").json()["memory_heap_bytes"],
        11 * 1024 * 1024
    );
    daemon.stop();
}

#[test]
fn disabled_prometheus_answers_404_json() {
    let mut config = Config::for_tests();
    config.prometheus.enabled = false;
    let daemon = support::start(config);
    daemon.get("/metrics").assert_error(404, "metrics_disabled");
    assert_eq!(daemon.get("/health").status, 200);
    daemon.stop();
}
