//! `GET /metrics`: the Prometheus text format.
//!
//! Rendering reads the recorder and a fresh process sample; memory gauges hold the monitor's
//! latest sample. With `[prometheus] enabled = false` the route is never installed.

use std::sync::Arc;

use trillium::{Conn, Handler, KnownHeaderName, Status};

use crate::context::Context;

/// The content type of the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics`.
#[derive(Debug, Clone)]
pub struct MetricsHandler {
    ctx: Arc<Context>,
}

impl MetricsHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> MetricsHandler {
        MetricsHandler { ctx }
    }
}

impl Handler for MetricsHandler {
    async fn run(&self, conn: Conn) -> Conn {
        let mut body = String::with_capacity(8 * 1024);
        // A new UTC day refills the budget gauge even when no message arrives.
        self.ctx.budget.refresh(std::time::SystemTime::now());
        self.ctx
            .metrics
            .render(&self.ctx.process_sample(), &mut body);
        self.ctx.budget.render(&mut body);
        self.ctx.cgroup.render(&mut body);
        conn.with_status(Status::Ok)
            .with_response_header(KnownHeaderName::ContentType, CONTENT_TYPE)
            .with_body(body)
            .halt()
    }
}
