//! `GET /ready`: the readiness probe for load balancers and Kubernetes.
//!
//! 200 while serving; 503 with a JSON reason while starting, while draining after SIGTERM
//! and while new sessions are refused above `memory_limit_mb`. A 503 here is the probe
//! answering, not an error, so it is not counted in `blufio_errors_total`. `/health` stays
//! the liveness probe and answers 200 in all these states.

use std::sync::Arc;

use serde_json::json;
use trillium::{Conn, Handler, Status};

use crate::{context::Context, http::response};

/// Serves `GET /ready`.
#[derive(Debug, Clone)]
pub struct ReadyHandler {
    ctx: Arc<Context>,
}

impl ReadyHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> ReadyHandler {
        ReadyHandler { ctx }
    }
}

impl Handler for ReadyHandler {
    async fn run(&self, conn: Conn) -> Conn {
        match self.ctx.readiness() {
            Ok(()) => response::json(conn, Status::Ok, &json!({ "status": "ready" })),
            Err(reason) => response::json(
                conn,
                Status::ServiceUnavailable,
                &json!({
                    "status": "not_ready",
                    "reason": reason.as_str(),
                    "message": reason.message(),
                }),
            ),
        }
    }
}
