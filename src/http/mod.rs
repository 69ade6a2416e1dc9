//! The HTTP surface: routing only. Each route's behaviour lives in its own file.
//!
//! | route | auth | file |
//! |---|---|---|
//! | `GET, HEAD /health` | none | `health.rs` |
//! | `GET, HEAD /metrics` | none | `metrics.rs` |
//! | `GET /v1/health` | bearer | `health.rs` |
//!
//! Unknown paths get 404 and known paths with another method 405 with `Allow`, both as JSON.

pub mod auth;
pub mod health;
pub mod metrics;
pub(crate) mod response;

use std::sync::Arc;

use trillium::{Conn, Handler, Method, Status};
use trillium_router::Router;

use crate::{context::Context, metrics::ErrorKind};

use self::{
    auth::BearerAuthHandler,
    health::{DetailedHealthHandler, HealthHandler},
    metrics::MetricsHandler,
};

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything: the single-listener setup.
    All,
    /// `/health` and `/metrics` only: the probe listener when ports differ.
    Probes,
    /// The authenticated API only: the gateway listener when ports differ.
    Gateway,
}

/// Returns the handler for a listener serving `scope`.
pub fn handler(ctx: Arc<Context>, scope: Scope) -> impl Handler {
    let mut router = Router::new().with_method_not_allowed();
    if scope != Scope::Gateway {
        router = router.any(
            &[Method::Get, Method::Head],
            "/health",
            HealthHandler::new(Arc::clone(&ctx)),
        );
        router = if ctx.config.prometheus.enabled {
            router.any(
                &[Method::Get, Method::Head],
                "/metrics",
                MetricsHandler::new(Arc::clone(&ctx)),
            )
        } else {
            router.any(
                &[Method::Get, Method::Head],
                "/metrics",
                MetricsDisabledHandler {
                    ctx: Arc::clone(&ctx),
                },
            )
        };
    }
    if scope != Scope::Probes {
        let auth = BearerAuthHandler::new(Arc::clone(&ctx));
        router = router.get(
            "/v1/health",
            (auth.clone(), DetailedHealthHandler::new(Arc::clone(&ctx))),
        );
    }
    (router, FallbackHandler { ctx })
}

/// Answers what the router did not: 405 (status and `Allow` already set by the router) or
/// 404, as JSON.
#[derive(Debug)]
struct FallbackHandler {
    ctx: Arc<Context>,
}

impl Handler for FallbackHandler {
    async fn run(&self, conn: Conn) -> Conn {
        if conn.status() == Some(Status::MethodNotAllowed) {
            let method = conn.method();
            return response::error(
                &self.ctx,
                conn,
                Status::MethodNotAllowed,
                ErrorKind::MethodNotAllowed,
                "method_not_allowed",
                format!("{method} is not allowed here; see the Allow header"),
            );
        }
        let path = conn.path().chars().take(200).collect::<String>();
        response::error(
            &self.ctx,
            conn,
            Status::NotFound,
            ErrorKind::NotFound,
            "not_found",
            format!("no route for {path}"),
        )
    }
}

/// Serves `/metrics` with `[prometheus] enabled = false`: a 404 that says why.
#[derive(Debug)]
struct MetricsDisabledHandler {
    ctx: Arc<Context>,
}

impl Handler for MetricsDisabledHandler {
    async fn run(&self, conn: Conn) -> Conn {
        response::error(
            &self.ctx,
            conn,
            Status::NotFound,
            ErrorKind::NotFound,
            "metrics_disabled",
            "metrics are disabled ([prometheus] enabled = false)",
        )
    }
}
