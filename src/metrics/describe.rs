//! The help text of every metric, and the standard `process_*` metrics rendered from a
//! fresh sample on each scrape.

use std::fmt::Write as _;

use blufio_platform::ProcessSample;
use metrics::{KeyName, Recorder, SharedString};
use metrics_exporter_prometheus::PrometheusRecorder;

/// Help text, one line per metric name.
const DESCRIPTIONS: &[(&str, &str)] = &[
    ("blufio_messages_total", "Messages received, by channel."),
    (
        "blufio_tokens_total",
        "Model tokens used by the agent, by model and type (input or output).",
    ),
    ("blufio_active_sessions", "Sessions open now."),
    (
        "blufio_budget_remaining_usd",
        "Agent budget left today (UTC day), in US dollars (+Inf when unlimited).",
    ),
    (
        "blufio_response_latency_seconds",
        "Time from receiving a message to sending the reply, in seconds.",
    ),
    (
        "blufio_memory_heap_bytes",
        "Bytes allocated by the application on the heap (jemalloc stats.allocated).",
    ),
    (
        "blufio_memory_resident_bytes",
        "Bytes in physically resident allocator pages (jemalloc stats.resident).",
    ),
    (
        "blufio_memory_rss_bytes",
        "Resident set size of the process at the last memory sample, in bytes.",
    ),
    (
        "blufio_memory_pressure",
        "1 while the heap is above memory_warn_mb (with hysteresis), else 0.",
    ),
    (
        "blufio_admission_rejecting",
        "1 while new sessions are refused because the heap is above memory_limit_mb.",
    ),
    (
        "blufio_memory_purges_total",
        "Allocator purges run under memory pressure.",
    ),
    ("blufio_errors_total", "Errors, by type."),
    (
        "blufio_store_bytes",
        "Bytes of the session store on disk (the database and its write-ahead log).",
    ),
    (
        "blufio_store_commits_total",
        "Transactions the session store committed (each one fsync).",
    ),
    (
        "blufio_store_writes_total",
        "Write operations the session store committed; more than commits means group commit.",
    ),
    (
        "blufio_store_operation_seconds",
        "Time from queueing a session store operation to its answer, by operation, in seconds.",
    ),
    (
        "blufio_upstream_requests_total",
        "Requests sent to each model provider, by outcome (2xx, 429, 4xx, 5xx, 529, unreachable, timeout).",
    ),
    (
        "blufio_upstream_latency_seconds",
        "Time from sending a request to a model provider to its answer's head, in seconds.",
    ),
    (
        "blufio_fallbacks_total",
        "Requests moved from a model alias to the next in its fallback chain, by alias.",
    ),
    (
        "blufio_gateway_overhead_seconds",
        "Time a /v1/chat/completions request spends in blufio itself, without the wait for the upstream, in seconds.",
    ),
    (
        "blufio_time_to_first_token_seconds",
        "Time from a streamed message's arrival to its first text delta, in seconds.",
    ),
    (
        "blufio_sessions_shed_total",
        "Sessions trimmed or closed to free memory or after idling, by reason.",
    ),
    (
        "blufio_open_connections",
        "Client connections open now, all listeners.",
    ),
    (
        "blufio_connection_memory_bytes",
        "Heap attributed to open client connections (a fixed cost each plus buffered head bytes).",
    ),
    (
        "blufio_monitor_ticks_total",
        "Memory monitor ticks run; after a pause (SIGSTOP) it skips missed ticks, never bursts.",
    ),
];

pub(super) fn registry_describe(recorder: &PrometheusRecorder) {
    for (name, help) in DESCRIPTIONS {
        let key = KeyName::from_const_str(name);
        let help = SharedString::const_str(help);
        if name.ends_with("_total") {
            recorder.describe_counter(key, None, help);
        } else if name.ends_with("_seconds") {
            recorder.describe_histogram(key, None, help);
        } else {
            recorder.describe_gauge(key, None, help);
        }
    }
}

/// The standard process metrics: name and help text; `_total` names are counters, the rest
/// gauges.
const PROCESS: [(&str, &str); 6] = [
    (
        "process_cpu_seconds_total",
        "Total user and system CPU time spent in seconds.",
    ),
    ("process_open_fds", "Number of open file descriptors."),
    (
        "process_max_fds",
        "Maximum number of open file descriptors.",
    ),
    (
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
    ),
    (
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
    ),
    (
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
    ),
];

/// Renders the standard process metrics; a field without a reading is left out entirely.
pub(super) fn render_process(sample: &ProcessSample, out: &mut String) {
    let integer = |value: Option<u64>| value.map(|v| v as f64);
    // In the order of `PROCESS`.
    let values = [
        sample.cpu_seconds,
        integer(sample.open_fds),
        integer(sample.max_fds),
        integer(sample.virtual_memory_bytes),
        integer(sample.resident_memory_bytes),
        sample.start_time_seconds,
    ];
    for ((name, help), value) in PROCESS.iter().zip(values) {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        if let Some(value) = value {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
            );
        }
    }
}
