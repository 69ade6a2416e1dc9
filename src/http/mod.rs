//! The HTTP surface: routing only. Each route's behaviour lives in its own file.
//!
//! | route | auth | file |
//! |---|---|---|
//! | `GET, HEAD /health` | none | `health.rs` |
//! | `GET, HEAD /metrics` | none | `metrics.rs` |
//! | `GET, HEAD /ready` | none | `ready.rs` |
//! | `GET /v1/health` | bearer | `health.rs` |
//! | `POST, GET /v1/sessions`, `GET, DELETE /v1/sessions/:id` | bearer | `sessions.rs` |
//! | `POST /v1/messages` | bearer | `messages.rs` |
//! | `GET /ws` | bearer (header or subprotocol) | `ws.rs` |
//! | `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/:id` | bearer (OpenAI-shaped errors) | `chat.rs` |
//!
//! Unknown paths get 404 and known paths with another method 405 with `Allow`, both as JSON.
//! The three probe routes are matched before trillium-router ([`handler`]); the rest go
//! through it.

pub mod auth;
mod body;
pub mod chat;
pub mod health;
pub mod messages;
pub mod metrics;
pub mod ready;
pub(crate) mod response;
pub mod session_messages;
pub mod sessions;
mod stream;
pub mod ws;
mod ws_limit;

use std::sync::Arc;

use trillium::{Conn, Handler, KnownHeaderName, Method, Status};
use trillium_router::Router;

use crate::{context::Context, metrics::ErrorKind};

use self::{
    auth::BearerAuthHandler,
    chat::{ChatCompletionsHandler, ModelsHandler},
    health::{DetailedHealthHandler, HealthHandler},
    messages::MessagesHandler,
    metrics::MetricsHandler,
    ready::ReadyHandler,
    session_messages::SessionMessagesHandler,
    sessions::{SessionAction, SessionsHandler},
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
    let probes = (scope != Scope::Gateway).then(|| ProbeRoutes::new(&ctx));
    let mut router = Router::new().with_method_not_allowed();
    if scope != Scope::Probes {
        let auth = BearerAuthHandler::new(Arc::clone(&ctx));
        let sessions = |action| (auth.clone(), SessionsHandler::new(Arc::clone(&ctx), action));
        router = router
            .get(
                "/v1/health",
                (auth.clone(), DetailedHealthHandler::new(Arc::clone(&ctx))),
            )
            .post("/v1/sessions", sessions(SessionAction::Create))
            .get("/v1/sessions", sessions(SessionAction::List))
            .get("/v1/sessions/:id", sessions(SessionAction::Get))
            .delete("/v1/sessions/:id", sessions(SessionAction::Delete))
            .get(
                "/v1/sessions/:id/messages",
                (auth.clone(), SessionMessagesHandler::new(Arc::clone(&ctx))),
            )
            .post(
                "/v1/messages",
                (auth.clone(), MessagesHandler::new(Arc::clone(&ctx))),
            )
            .post(
                "/v1/chat/completions",
                (
                    auth.clone().with_openai_errors(),
                    ChatCompletionsHandler::new(Arc::clone(&ctx)),
                ),
            )
            .get(
                "/v1/models",
                (
                    auth.clone().with_openai_errors(),
                    ModelsHandler::new(Arc::clone(&ctx)),
                ),
            )
            .get(
                "/v1/models/:id",
                (
                    auth.clone().with_openai_errors(),
                    ModelsHandler::new(Arc::clone(&ctx)),
                ),
            )
            .get(
                "/ws",
                (
                    auth.clone().with_subprotocol(),
                    ws::handler(Arc::clone(&ctx)),
                ),
            );
    }
    (ServerHeaderHandler, probes, router, FallbackHandler { ctx })
}

/// `/health`, `/ready` and `/metrics`, matched by plain comparison before the router: they
/// are what load balancers, orchestrators and Prometheus call every few seconds, they take
/// no parameters, and the router's per-request state and boxed handler futures were half of
/// what a `/health` request allocated. Another method gets the router's 405 with `Allow`.
#[derive(Debug)]
struct ProbeRoutes {
    health: HealthHandler,
    ready: ReadyHandler,
    metrics: Result<MetricsHandler, MetricsDisabledHandler>,
}

impl ProbeRoutes {
    fn new(ctx: &Arc<Context>) -> ProbeRoutes {
        ProbeRoutes {
            health: HealthHandler::new(Arc::clone(ctx)),
            ready: ReadyHandler::new(Arc::clone(ctx)),
            metrics: if ctx.config.prometheus.enabled {
                Ok(MetricsHandler::new(Arc::clone(ctx)))
            } else {
                Err(MetricsDisabledHandler {
                    ctx: Arc::clone(ctx),
                })
            },
        }
    }
}

impl Handler for ProbeRoutes {
    async fn run(&self, conn: Conn) -> Conn {
        let path = conn.path();
        if !matches!(path, "/health" | "/ready" | "/metrics") {
            return conn;
        }
        if !matches!(conn.method(), Method::Get | Method::Head) {
            // What the router does for a known path: the fallback writes the JSON.
            return conn
                .with_status(Status::MethodNotAllowed)
                .with_response_header(KnownHeaderName::Allow, "GET, HEAD");
        }
        match (path, &self.metrics) {
            ("/health", _) => self.health.run(conn).await,
            ("/ready", _) => self.ready.run(conn).await,
            (_, Ok(metrics)) => metrics.run(conn).await,
            (_, Err(disabled)) => disabled.run(conn).await,
        }
    }
}

/// Names the server without versions: a version banner only helps pick an exploit.
#[derive(Debug)]
struct ServerHeaderHandler;

impl Handler for ServerHeaderHandler {
    async fn run(&self, conn: Conn) -> Conn {
        conn.with_response_header(KnownHeaderName::Server, "blufio")
    }
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
