//! `GET /health` (public liveness and a memory summary) and `GET /v1/health` (authenticated
//! details for operators and `blufio status`).
//!
//! Both read the monitor's latest sample; neither touches the allocator. `/health` answers
//! 200 even under pressure (`"status": "degraded"`): liveness must not fail because of load.
//! `/health` is what probes hit every few seconds, so its body is written straight into one
//! buffer (one allocation per request) rather than built as a JSON value.

use std::{fmt::Write as _, sync::Arc};

use serde_json::{Map, Value, json};
use trillium::{Conn, Handler, KnownHeaderName, Status};

use crate::{context::Context, cost::micro_usd, http::response};

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
        let mut body = String::with_capacity(SUMMARY_CAPACITY);
        write_summary(&self.ctx, &mut body);
        // The same headers as every other JSON answer (`response::json`).
        conn.with_status(Status::Ok)
            .with_response_header(KnownHeaderName::ContentType, "application/json")
            .with_response_header(KnownHeaderName::CacheControl, "no-store")
            .with_body(body)
            .halt()
    }
}

/// Room for the longest `/health` body (every number at `u64::MAX`), so writing it never
/// reallocates.
const SUMMARY_CAPACITY: usize = 192;

/// Writes the five fields of `/health` as compact JSON, in the order of [`summary`].
fn write_summary(ctx: &Context, out: &mut String) {
    let sample = ctx.memory.sample();
    let heap = sample
        .and_then(|sample| sample.heap)
        .map(|heap| heap.allocated_bytes);
    let rss = sample.and_then(|sample| sample.rss_bytes);
    let status = if ctx.degraded() {
        "degraded"
    } else {
        "healthy"
    };
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        r#"{{"status":"{status}","uptime_secs":{},"memory_heap_bytes":"#,
        ctx.uptime_secs()
    );
    write_optional(out, heap);
    out.push_str(r#","memory_rss_bytes":"#);
    write_optional(out, rss);
    let _ = write!(out, r#","active_sessions":{}}}"#, ctx.sessions.active());
}

fn write_optional(out: &mut String, value: Option<u64>) {
    match value {
        Some(value) => {
            let _ = write!(out, "{value}");
        }
        None => out.push_str("null"),
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

/// The five fields of `/health`, in order (the start of `/v1/health`).
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
    let thresholds = ctx.thresholds();
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
        "max_sessions": ctx.session_limits().max_sessions,
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
    if let Some(store) = &ctx.store {
        let error = store.failing();
        body.insert(
            "store".into(),
            json!({
                "path": store.path(),
                "ok": error.is_none(),
                "error": error,
            }),
        );
    }
    if let Some(upstream) = ctx.agent.as_ref().and_then(|agent| agent.upstream()) {
        body.insert("upstream".into(), upstream_json(&upstream));
    }
    let providers = ctx.upstreams.statuses();
    if !providers.is_empty() {
        let providers = providers
            .iter()
            .map(|(name, status)| {
                let mut entry = upstream_json(status);
                if let Value::Object(map) = &mut entry {
                    map.insert("name".into(), json!(name));
                }
                entry
            })
            .collect();
        body.insert("providers".into(), Value::Array(providers));
    }
    Value::Object(body)
}

/// Today's spend; `remaining_usd` is null without a limit.
fn budget(ctx: &Context) -> Value {
    let now = std::time::SystemTime::now();
    let daily_usd = ctx.live().daily_budget_usd;
    let remaining = ctx.budget.remaining_usd(daily_usd, now);
    json!({
        "daily_usd": micro_usd(daily_usd),
        "spent_today_usd": micro_usd(ctx.budget.spent_today_usd(now)),
        "remaining_usd": remaining.is_finite().then(|| micro_usd(remaining)),
        "persisted": ctx.budget.persisted(),
        "state_error": ctx.budget.write_error(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, FixedRss, ManualHeap};

    fn context(rss: Option<u64>) -> Arc<Context> {
        let ctx = Context::builder(Config::for_tests())
            .with_heap_source(ManualHeap::new(404_968))
            .with_rss_source(FixedRss(rss))
            .build()
            .unwrap();
        crate::monitor::tick(&ctx);
        ctx
    }

    #[test]
    fn written_summary_equals_the_json_value_and_fits_its_buffer() {
        for rss in [Some(u64::MAX), None] {
            let ctx = context(rss);
            let mut written = String::with_capacity(SUMMARY_CAPACITY);
            write_summary(&ctx, &mut written);
            assert_eq!(written, Value::Object(summary(&ctx)).to_string());
            assert_eq!(written.capacity(), SUMMARY_CAPACITY, "{written}");
        }
    }
}
