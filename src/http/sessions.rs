//! `/v1/sessions`: create, list, get and delete sessions.
//!
//! Creation goes through admission control: above `memory_limit_mb` or at `max_sessions`
//! it answers 503 with `Retry-After`, and the sessions already open are not touched.

use std::sync::Arc;

use serde_json::{Value, json};
use trillium::{Conn, Handler, KnownHeaderName, Status};
use trillium_router::RouterConnExt;

use crate::{
    context::Context,
    http::{body, response},
    metrics::ErrorKind,
    sessions::{Rejected, SessionInfo, SessionKind, is_session_id},
};

/// What a `/v1/sessions` route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAction {
    /// `POST /v1/sessions`.
    Create,
    /// `GET /v1/sessions`.
    List,
    /// `GET /v1/sessions/:id`.
    Get,
    /// `DELETE /v1/sessions/:id`.
    Delete,
}

/// Serves the `/v1/sessions` routes.
#[derive(Debug, Clone)]
pub struct SessionsHandler {
    ctx: Arc<Context>,
    action: SessionAction,
    /// Lets one list page be built at a time: clients looping on the list then wait parked,
    /// not queued as runnable work ahead of the probes (the executor has two threads).
    listing: Arc<async_lock::Semaphore>,
}

impl SessionsHandler {
    /// Creates the handler for one route.
    pub fn new(ctx: Arc<Context>, action: SessionAction) -> SessionsHandler {
        SessionsHandler {
            ctx,
            action,
            listing: Arc::new(async_lock::Semaphore::new(1)),
        }
    }
}

impl Handler for SessionsHandler {
    async fn run(&self, conn: Conn) -> Conn {
        let ctx = &self.ctx;
        match self.action {
            SessionAction::Create => match create_options(ctx, conn).await {
                Err(conn) => conn,
                Ok(conn) => create(ctx, conn),
            },
            SessionAction::List => {
                let _building = self.listing.acquire().await;
                list(ctx, conn)
            }
            SessionAction::Get => {
                let session = session_id(&conn).and_then(|id| ctx.sessions.get(id));
                match session {
                    Some(session) => {
                        response::json(conn, Status::Ok, &session_json(&session.info()))
                    }
                    None => not_found(ctx, conn),
                }
            }
            SessionAction::Delete => {
                let closed = session_id(&conn).is_some_and(|id| ctx.sessions.close(id));
                if closed {
                    conn.with_status(Status::NoContent).halt()
                } else {
                    not_found(ctx, conn)
                }
            }
        }
    }
}

/// Opens a session through admission control.
fn create(ctx: &Context, conn: Conn) -> Conn {
    match ctx.open_session(SessionKind::Http) {
        Ok(guard) => {
            let info = guard.keep().info();
            response::json(
                conn,
                Status::Created,
                &json!({ "id": info.id, "created_at": info.created_at }),
            )
        }
        Err(rejected) => rejection(ctx, conn, rejected),
    }
}

/// Reads the body of `POST /v1/sessions`: none, or `{}`. A session has no options yet, and a
/// field the daemon would silently ignore (`{"system": "pirate"}`) is refused, as
/// `/v1/messages` refuses one.
async fn create_options(ctx: &Context, conn: Conn) -> Result<Conn, Conn> {
    let headers = conn.request_headers();
    let declared = headers
        .get_str(KnownHeaderName::ContentLength)
        .map(|length| length.trim() == "0");
    let chunked = headers.has_header(KnownHeaderName::TransferEncoding);
    if declared.unwrap_or(!chunked) {
        return Ok(conn);
    }
    body::read_json::<NoOptions>(ctx, conn)
        .await
        .map(|(conn, _)| conn)
}

/// Returns the `{id}` of the path when it has the form of a session id.
fn session_id(conn: &Conn) -> Option<&str> {
    conn.param("id").filter(|id| is_session_id(id))
}

/// The options of a new session: none, so only an empty object is accepted.
///
/// Written by hand because serde's derive for an empty struct also accepts `[]`.
struct NoOptions;

impl<'de> serde::Deserialize<'de> for NoOptions {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(NoOptionsVisitor)
    }
}

struct NoOptionsVisitor;

impl<'de> serde::de::Visitor<'de> for NoOptionsVisitor {
    type Value = NoOptions;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an empty object (a session takes no options)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NoOptions, A::Error> {
        use serde::de::Error as _;

        match map.next_key::<std::borrow::Cow<'de, str>>()? {
            None => Ok(NoOptions),
            Some(key) => Err(A::Error::unknown_field(&key, &[])),
        }
    }
}

/// Sessions a page holds when the client does not say.
pub const DEFAULT_PAGE: usize = 100;
/// Sessions a page holds at most.
pub const MAX_PAGE: usize = 1000;

/// `GET /v1/sessions[?limit=N][&cursor=C]`: one page, oldest first, and the cursor of the
/// next (`null` on the last page).
fn list(ctx: &Context, conn: Conn) -> Conn {
    let query = match PageQuery::parse(conn.querystring()) {
        Ok(query) => query,
        Err(message) => {
            return response::bad_request(ctx, conn, "bad_request", message);
        }
    };
    let after = query
        .after
        .as_ref()
        .map(|(created_at, id)| (*created_at, id.as_str()));
    let (page, more) = ctx.sessions.page(after, query.limit);
    let next = page
        .last()
        .filter(|_| more)
        .map(|last| cursor(last.created_at, &last.id));
    let sessions: Vec<Value> = page.iter().map(session_json).collect();
    response::json(
        conn,
        Status::Ok,
        &json!({ "sessions": sessions, "next": next }),
    )
}

/// The parameters of a list request.
#[derive(Debug, PartialEq)]
struct PageQuery {
    limit: usize,
    after: Option<(u64, String)>,
}

impl PageQuery {
    /// Reads `limit` and `cursor`; other parameters are ignored.
    fn parse(query: &str) -> Result<PageQuery, String> {
        let mut limit = None;
        let mut after = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "limit" if limit.is_some() => return Err("limit is given twice".to_owned()),
                "limit" => {
                    limit = Some(
                        value
                            .parse::<usize>()
                            .ok()
                            .filter(|limit| (1..=MAX_PAGE).contains(limit))
                            .ok_or_else(|| {
                                format!("limit must be a whole number from 1 to {MAX_PAGE}")
                            })?,
                    );
                }
                "cursor" if after.is_some() => return Err("cursor is given twice".to_owned()),
                "cursor" => {
                    after = Some(parse_cursor(value).ok_or_else(|| {
                        "cursor is not one this server returned as `next`".to_owned()
                    })?);
                }
                _ => {}
            }
        }
        Ok(PageQuery {
            limit: limit.unwrap_or(DEFAULT_PAGE),
            after,
        })
    }
}

/// Returns the cursor after a session: its creation time (16 hex digits) and its id. Opaque
/// to clients; stable across restarts of the listing, not across daemon restarts.
fn cursor(created_at: u64, id: &str) -> String {
    format!("{created_at:016x}{id}")
}

fn parse_cursor(text: &str) -> Option<(u64, String)> {
    let (created_at, id) = (text.get(..16)?, text.get(16..)?);
    if !created_at
        .bytes()
        .all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'))
        || !is_session_id(id)
    {
        return None;
    }
    Some((u64::from_str_radix(created_at, 16).ok()?, id.to_owned()))
}

/// Answers a refused session with 503, `Retry-After` and the reason.
pub(crate) fn rejection(ctx: &Context, conn: Conn, rejected: Rejected) -> Conn {
    // Memory is re-sampled every monitor interval; a slot may free up any time.
    let retry_after = match rejected {
        Rejected::MemoryLimit => ctx.config.daemon.monitor_interval_secs,
        Rejected::SessionLimit => 5,
    };
    response::error(
        ctx,
        conn.with_response_header(KnownHeaderName::RetryAfter, retry_after.to_string()),
        Status::ServiceUnavailable,
        ErrorKind::AdmissionRejected,
        rejected.code(),
        rejected,
    )
}

pub(crate) fn not_found(ctx: &Context, conn: Conn) -> Conn {
    response::error(
        ctx,
        conn,
        Status::NotFound,
        ErrorKind::NotFound,
        "session_not_found",
        "no session with that id",
    )
}

fn session_json(info: &SessionInfo) -> Value {
    json!({
        "id": info.id,
        "created_at": info.created_at,
        "last_active_at": info.last_active_at,
        "message_count": info.message_count,
        "history_messages": info.history_messages,
        "history_bytes": info.history_bytes,
        "kind": match info.kind {
            SessionKind::Http => "http",
            SessionKind::WebSocket => "websocket",
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_read_limit_and_cursor_and_refuse_bad_ones() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            PageQuery::parse("").unwrap(),
            PageQuery {
                limit: DEFAULT_PAGE,
                after: None
            }
        );
        let text = cursor(1_795_825_458, id);
        let query = PageQuery::parse(&format!("limit=7&cursor={text}&x=1")).unwrap();
        assert_eq!(query.limit, 7);
        assert_eq!(query.after, Some((1_795_825_458, id.to_owned())));
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=-1",
            "limit=ten",
            "limit=",
            "limit=5&limit=6",
            "cursor=",
            "cursor=zz",
            "cursor=00000000000000000123456789abcdef0123456789abcdeF",
        ] {
            assert!(PageQuery::parse(bad).is_err(), "{bad}");
        }
    }
}
