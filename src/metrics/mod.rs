//! Typed metric handles on a Prometheus recorder owned by one daemon, and `/metrics` rendering.
//!
//! The recorder is built locally and never installed as the process-wide `metrics` recorder,
//! so two daemons in one process keep separate numbers. Every handle is registered once at
//! start-up with its help text; hot paths touch a handle (an atomic), never a name lookup.
//! The standard `process_*` metrics are rendered from a fresh [`ProcessSample`] on each
//! scrape, since `process_cpu_seconds_total` is a float counter the `metrics` types cannot hold.

mod describe;
mod labels;
mod store;
mod upstream;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use blufio_platform::ProcessSample;
use metrics::{Counter, Gauge, Histogram, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::error::Error;

pub use labels::{Channel, ErrorCounter, ErrorKind, ShedReason, TokenType};
pub use store::{STORE_BUCKETS, STORE_OPS, StoreMetrics};
pub use upstream::{FallbackCounters, OVERHEAD_BUCKETS, UpstreamMetrics, UpstreamOutcome};

use describe::{registry_describe, render_process};

/// Upper bounds of the response latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Distinct model names tracked in `blufio_tokens_total`; later ones share `model="other"`.
const MAX_MODEL_LABELS: usize = 16;

/// The daemon's metric handles and the recorder that renders them.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    messages_http: Counter,
    messages_ws: Counter,
    /// `blufio_active_sessions`.
    pub active_sessions: Gauge,
    /// `blufio_budget_remaining_usd`.
    pub budget_remaining_usd: Gauge,
    /// `blufio_response_latency_seconds`.
    pub response_latency: Histogram,
    // Per-instance cells, not statics: each Context's Metrics registers these gauges on its own
    // recorder at the first reading, so a source that never reads exports nothing (not 0).
    memory_heap_bytes: OnceLock<Gauge>,
    memory_resident_bytes: OnceLock<Gauge>,
    memory_rss_bytes: OnceLock<Gauge>,
    /// `blufio_memory_pressure`.
    pub memory_pressure: Gauge,
    /// `blufio_admission_rejecting`.
    pub admission_rejecting: Gauge,
    /// `blufio_memory_purges_total`.
    pub memory_purges: Counter,
    errors: Vec<(ErrorKind, Counter, Arc<AtomicU64>)>,
    shed_trimmed: Counter,
    shed_pressure: Counter,
    shed_idle: Counter,
    tokens: Mutex<HashMap<(String, TokenType), Counter>>,
    /// `blufio_time_to_first_token_seconds` (streamed replies).
    pub time_to_first_token: Histogram,
    /// `blufio_open_connections`.
    pub open_connections: Gauge,
    /// `blufio_connection_memory_bytes`.
    pub connection_memory_bytes: Gauge,
    /// `blufio_monitor_ticks_total`.
    pub monitor_ticks: Counter,
    /// `blufio_gateway_overhead_seconds`.
    pub gateway_overhead: Histogram,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

const METADATA: Metadata<'static> = Metadata::new("blufio", metrics::Level::INFO, None);

impl Metrics {
    /// Builds a private recorder and registers every metric with its help text.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Metrics`] when the histogram buckets are rejected.
    pub fn new() -> Result<Metrics, Error> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("blufio_response_latency_seconds".to_owned()),
                LATENCY_BUCKETS,
            )
            .map_err(|error| Error::Metrics(error.to_string()))?
            .set_buckets_for_metric(
                Matcher::Full("blufio_time_to_first_token_seconds".to_owned()),
                LATENCY_BUCKETS,
            )
            .map_err(|error| Error::Metrics(error.to_string()))?
            .set_buckets_for_metric(
                Matcher::Full("blufio_upstream_latency_seconds".to_owned()),
                LATENCY_BUCKETS,
            )
            .map_err(|error| Error::Metrics(error.to_string()))?
            .set_buckets_for_metric(
                Matcher::Full("blufio_gateway_overhead_seconds".to_owned()),
                OVERHEAD_BUCKETS,
            )
            .map_err(|error| Error::Metrics(error.to_string()))?
            .set_buckets_for_metric(
                Matcher::Full("blufio_store_operation_seconds".to_owned()),
                STORE_BUCKETS,
            )
            .map_err(|error| Error::Metrics(error.to_string()))?
            .build_recorder();
        let handle = recorder.handle();
        let registry = Registry {
            recorder: &recorder,
        };

        let metrics = Metrics {
            messages_http: registry.counter("blufio_messages_total", &[("channel", "http")]),
            messages_ws: registry.counter("blufio_messages_total", &[("channel", "ws")]),
            active_sessions: registry.gauge("blufio_active_sessions"),
            budget_remaining_usd: registry.gauge("blufio_budget_remaining_usd"),
            response_latency: registry.histogram("blufio_response_latency_seconds"),
            memory_heap_bytes: OnceLock::new(),
            memory_resident_bytes: OnceLock::new(),
            memory_rss_bytes: OnceLock::new(),
            memory_pressure: registry.gauge("blufio_memory_pressure"),
            admission_rejecting: registry.gauge("blufio_admission_rejecting"),
            memory_purges: registry.counter("blufio_memory_purges_total", &[]),
            errors: ErrorKind::ALL
                .iter()
                .map(|kind| {
                    let counter =
                        registry.counter("blufio_errors_total", &[("type", kind.as_str())]);
                    (*kind, counter, Arc::new(AtomicU64::new(0)))
                })
                .collect(),
            shed_trimmed: registry.counter(
                "blufio_sessions_shed_total",
                &[("reason", "history_trimmed")],
            ),
            shed_pressure: registry.counter(
                "blufio_sessions_shed_total",
                &[("reason", "pressure_evicted")],
            ),
            shed_idle: registry
                .counter("blufio_sessions_shed_total", &[("reason", "idle_timeout")]),
            tokens: Mutex::new(HashMap::new()),
            time_to_first_token: registry.histogram("blufio_time_to_first_token_seconds"),
            open_connections: registry.gauge("blufio_open_connections"),
            connection_memory_bytes: registry.gauge("blufio_connection_memory_bytes"),
            monitor_ticks: registry.counter("blufio_monitor_ticks_total", &[]),
            gateway_overhead: registry.histogram("blufio_gateway_overhead_seconds"),
            recorder,
            handle,
        };
        registry_describe(&metrics.recorder);
        // Descriptions become visible to the renderer only after upkeep.
        metrics.handle.run_upkeep();
        Ok(metrics)
    }

    /// Sets `blufio_memory_heap_bytes` and `blufio_memory_resident_bytes`. They are
    /// registered on the first reading, so an allocator without statistics exports nothing
    /// rather than a fake zero.
    pub fn set_heap(&self, allocated_bytes: u64, resident_bytes: u64) {
        self.lazy_gauge(&self.memory_heap_bytes, "blufio_memory_heap_bytes")
            .set(allocated_bytes as f64);
        self.lazy_gauge(&self.memory_resident_bytes, "blufio_memory_resident_bytes")
            .set(resident_bytes as f64);
    }

    /// Sets `blufio_memory_rss_bytes`, registered on the first reading (see [`Metrics::set_heap`]).
    pub fn set_rss(&self, rss_bytes: u64) {
        self.lazy_gauge(&self.memory_rss_bytes, "blufio_memory_rss_bytes")
            .set(rss_bytes as f64);
    }

    fn lazy_gauge<'a>(&self, cell: &'a OnceLock<Gauge>, name: &'static str) -> &'a Gauge {
        cell.get_or_init(|| {
            Registry {
                recorder: &self.recorder,
            }
            .gauge(name)
        })
    }

    /// Counts one message on `channel`.
    pub fn count_message(&self, channel: Channel) {
        match channel {
            Channel::Http => self.messages_http.increment(1),
            Channel::WebSocket => self.messages_ws.increment(1),
        }
    }

    /// Counts one error of `kind`.
    pub fn count_error(&self, kind: ErrorKind) {
        if let Some((_, counter, count)) = self
            .errors
            .iter()
            .find(|(candidate, _, _)| *candidate == kind)
        {
            counter.increment(1);
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns a handle that counts errors of `kind` from outside the daemon's tasks (the
    /// spend writer's thread), in the same counter as [`Metrics::count_error`].
    pub fn error_handle(&self, kind: ErrorKind) -> ErrorCounter {
        let (counter, count) = self
            .errors
            .iter()
            .find(|(candidate, _, _)| *candidate == kind)
            .map_or_else(
                || (Counter::noop(), Arc::new(AtomicU64::new(0))),
                |(_, counter, count)| (counter.clone(), Arc::clone(count)),
            );
        ErrorCounter { counter, count }
    }

    /// Returns every error kind with its count so far (for `/v1/health`).
    pub fn error_counts(&self) -> Vec<(ErrorKind, u64)> {
        self.errors
            .iter()
            .map(|(kind, _, count)| (*kind, count.load(Ordering::Relaxed)))
            .collect()
    }

    /// Counts `count` sessions shed for `reason`.
    pub fn count_shed(&self, reason: ShedReason, count: u64) {
        match reason {
            ShedReason::HistoryTrimmed => self.shed_trimmed.increment(count),
            ShedReason::PressureEvicted => self.shed_pressure.increment(count),
            ShedReason::IdleTimeout => self.shed_idle.increment(count),
        }
    }

    /// Returns the counter of sessions shed for `reason`, for the session registry to hold.
    pub fn shed_handle(&self, reason: ShedReason) -> Counter {
        match reason {
            ShedReason::HistoryTrimmed => self.shed_trimmed.clone(),
            ShedReason::PressureEvicted => self.shed_pressure.clone(),
            ShedReason::IdleTimeout => self.shed_idle.clone(),
        }
    }

    /// Adds `count` tokens of `token_type` for `model`.
    ///
    /// The model becomes a label value; after a small fixed number of distinct models the rest
    /// are counted as `model="other"`, so a misbehaving agent cannot grow the series without
    /// bound.
    pub fn count_tokens(&self, model: &str, token_type: TokenType, count: u64) {
        let mut tokens = crate::sync::lock(&self.tokens);
        let known = tokens.contains_key(&(model.to_owned(), token_type));
        let distinct_models = tokens.len() / 2;
        let model = if known || distinct_models < MAX_MODEL_LABELS {
            model
        } else {
            "other"
        };
        let counter = tokens
            .entry((model.to_owned(), token_type))
            .or_insert_with(|| {
                Registry {
                    recorder: &self.recorder,
                }
                .counter(
                    "blufio_tokens_total",
                    &[("model", model), ("type", token_type.as_str())],
                )
            });
        counter.increment(count);
    }

    /// Registers the input and output token counters for `model` so they render as 0 before
    /// the first message.
    pub fn register_model(&self, model: &str) {
        self.count_tokens(model, TokenType::Input, 0);
        self.count_tokens(model, TokenType::Output, 0);
    }

    /// Registers and returns the handles of the upstream `provider` (a configured name).
    pub fn upstream(&self, provider: &str) -> UpstreamMetrics {
        let registry = Registry {
            recorder: &self.recorder,
        };
        let requests = UpstreamOutcome::ALL
            .iter()
            .map(|outcome| {
                let labels = [("provider", provider), ("status", outcome.as_str())];
                (
                    *outcome,
                    registry.counter("blufio_upstream_requests_total", &labels),
                )
            })
            .collect();
        let latency = self.recorder.register_histogram(
            &Registry::key("blufio_upstream_latency_seconds", &[("provider", provider)]),
            &METADATA,
        );
        UpstreamMetrics::new(requests, latency)
    }

    /// Registers and returns the session store's handles (only a daemon with a store
    /// exports them).
    pub fn store(&self) -> StoreMetrics {
        let registry = Registry {
            recorder: &self.recorder,
        };
        let latencies = STORE_OPS
            .iter()
            .map(|op| {
                let histogram = self.recorder.register_histogram(
                    &Registry::key("blufio_store_operation_seconds", &[("op", op)]),
                    &METADATA,
                );
                (*op, histogram)
            })
            .collect();
        StoreMetrics::new(
            registry.gauge("blufio_store_bytes"),
            registry.counter("blufio_store_commits_total", &[]),
            registry.counter("blufio_store_writes_total", &[]),
            latencies,
        )
    }

    /// Registers and returns `blufio_fallbacks_total{from,to}` for each `(from, to)` step.
    pub fn fallbacks<'a>(
        &self,
        steps: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> FallbackCounters {
        let registry = Registry {
            recorder: &self.recorder,
        };
        let mut counters = FallbackCounters::default();
        for (from, to) in steps {
            let counter = registry.counter("blufio_fallbacks_total", &[("from", from), ("to", to)]);
            counters.push(from, to, counter);
        }
        counters
    }

    /// Drains histogram buffers; the memory monitor calls this on every tick so buffers do not
    /// grow while nobody scrapes.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Renders the Prometheus text format: the recorder's metrics, then the process metrics.
    pub fn render(&self, process: &ProcessSample, out: &mut String) {
        out.push_str(&self.handle.render());
        render_process(process, out);
    }
}

/// Registers handles on one recorder through the `metrics::Recorder` trait.
struct Registry<'a> {
    recorder: &'a PrometheusRecorder,
}

impl Registry<'_> {
    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(key, value)| Label::new(*key, value.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        let counter = self
            .recorder
            .register_counter(&Self::key(name, labels), &METADATA);
        // Registering alone does not make a counter render; touching it does.
        counter.increment(0);
        counter
    }

    fn gauge(&self, name: &'static str) -> Gauge {
        let gauge = self
            .recorder
            .register_gauge(&Self::key(name, &[]), &METADATA);
        gauge.set(0.0);
        gauge
    }

    fn histogram(&self, name: &'static str) -> Histogram {
        self.recorder
            .register_histogram(&Self::key(name, &[]), &METADATA)
    }
}
