//! `GET /health` (public liveness and a memory summary) and `GET /v1/health` (authenticated
//! details for operators and `blufio status`).
//!
//! Both read the monitor's latest sample; neither touches the allocator. `/health` answers
//! 200 even under pressure (`"status": "degraded"`): liveness must not fail because of load.

use std::sync::Arc;

use serde_json::{Map, Value, json};
use trillium::{Conn, Handler, Status};

use crate::{context::Context, http::response};

/// Serves `GET /health`.
#[derive(Debug, Clone)]
pub struct HealthHandler {
    ctx: Arc<Context>,
}

impl HealthHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> HealthHandler {
        HealthHandler { ctx }
    }
}

impl Handler for HealthHandler {
    async fn run(&self, conn: Conn) -> Conn {
        response::json(conn, Status::Ok, &Value::Object(summary(&self.ctx)))
    }
}

/// Serves `GET /v1/health`.
#[derive(Debug, Clone)]
pub struct DetailedHealthHandler {
    ctx: Arc<Context>,
}

impl DetailedHealthHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> DetailedHealthHandler {
        DetailedHealthHandler { ctx }
    }
}

impl Handler for DetailedHealthHandler {
    async fn run(&self, conn: Conn) -> Conn {
        response::json(conn, Status::Ok, &details(&self.ctx))
    }
}

/// The five fields of `/health`, in order.
fn summary(ctx: &Context) -> Map<String, Value> {
    let sample = ctx.memory.sample();
    let heap = sample.and_then(|sample| sample.heap);
    let mut body = Map::new();
    let status = if ctx.degraded() {
        "degraded"
    } else {
        "healthy"
    };
    body.insert("status".into(), json!(status));
    body.insert("uptime_secs".into(), json!(ctx.uptime_secs()));
    body.insert(
        "memory_heap_bytes".into(),
        json!(heap.map(|heap| heap.allocated_bytes)),
    );
    body.insert(
        "memory_rss_bytes".into(),
        json!(sample.and_then(|sample| sample.rss_bytes)),
    );
    body.insert("active_sessions".into(), json!(ctx.sessions.active()));
    body
}

fn details(ctx: &Context) -> Value {
    let mut body = summary(ctx);
    let sample = ctx.memory.sample();
    let pressure = ctx.memory.pressure();
    let thresholds = ctx.memory.thresholds();
    let (allocator, allocator_page_size) = ctx.memory.allocator();
    let errors: Map<String, Value> = ctx
        .metrics
        .error_counts()
        .into_iter()
        .map(|(kind, count)| (kind.as_str().to_owned(), json!(count)))
        .collect();
    let extra = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "target": env!("BLUFIO_TARGET"),
        "started_at_unix": ctx.started_at_unix(),
        "memory_resident_bytes": sample.and_then(|s| s.heap).map(|heap| heap.resident_bytes),
        "memory_warn_bytes": thresholds.warn_bytes,
        "memory_limit_bytes": thresholds.limit_bytes,
        "memory_pressure": pressure.under_pressure,
        "admission": if pressure.rejecting { "rejecting" } else { "accepting" },
        "rss_source": ctx.memory.rss_source(),
        "allocator": allocator,
        "allocator_page_size": allocator_page_size,
        "last_sample_age_secs": sample.map(|s| s.taken_at.elapsed().as_secs_f64()),
        "monitor_interval_secs": ctx.config.daemon.monitor_interval_secs,
        "max_sessions": ctx.sessions.limits().max_sessions,
        "agent": if ctx.agent.is_some() { "configured" } else { "none" },
        "errors": errors,
        "memory_cgroup_limit_bytes": ctx.cgroup.limit_bytes(),
        "memory_cgroup_usage_bytes": ctx.cgroup.latest().and_then(|m| m.usage_bytes),
        "ready": ctx.readiness().err().map_or("ready", |reason| reason.as_str()),
    });
    if let Value::Object(extra) = extra {
        body.extend(extra);
    }
    body.insert("budget".into(), budget(ctx));
    if let Some(upstream) = ctx.agent.as_ref().and_then(|agent| agent.upstream()) {
        body.insert("upstream".into(), upstream_json(&upstream));
    }
    Value::Object(body)
}

/// Today's spend; `remaining_usd` is null without a limit.
fn budget(ctx: &Context) -> Value {
    let now = std::time::SystemTime::now();
    let remaining = ctx.budget.remaining_usd(now);
    json!({
        "daily_usd": ctx.budget.daily_usd(),
        "spent_today_usd": ctx.budget.spent_today_usd(now),
        "remaining_usd": remaining.is_finite().then_some(remaining),
        "persisted": ctx.budget.path().is_some(),
    })
}

/// The provider's state: never the key, only whether one is set.
fn upstream_json(upstream: &crate::agent::UpstreamStatus) -> Value {
    let unix = |at: Option<std::time::SystemTime>| {
        at.and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|since| since.as_secs())
    };
    json!({
        "provider": upstream.provider,
        "model": upstream.model,
        "api_key": if upstream.api_key_set { "set" } else { "unset" },
        "last_error": upstream.last_error,
        "last_error_at_unix": unix(upstream.last_error_at),
        "last_success_at_unix": unix(upstream.last_success_at),
    })
}
