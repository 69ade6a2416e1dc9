//! `/v1/sessions`: create, list, get and delete sessions.
//!
//! Creation takes optional `model` and `system` for the session's lifetime (a model the
//! daemon does not route is 404 and opens nothing; options beyond `max_history_bytes` are
//! 400) and goes through admission control: above `memory_limit_mb` or at `max_sessions`
//! it answers 503 with `Retry-After`, and the sessions already open are not touched.

use std::sync::Arc;

use serde_json::{Value, json};
use trillium::{Conn, Handler, KnownHeaderName, Status};
use trillium_router::RouterConnExt;

use crate::{
    context::Context,
    gateway,
    http::{body, response},
    metrics::ErrorKind,
    sessions::{Rejected, SessionInfo, SessionKind, SessionOptions, is_session_id},
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
                Ok((conn, options)) => create(ctx, conn, options).await,
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
                let Some(session) = session_id(&conn).and_then(|id| ctx.sessions.get(id)) else {
                    return not_found(ctx, conn);
                };
                // Out of the store first: a session closed in memory but still stored would
                // come back at the next start.
                if let Some(store) = &ctx.store
                    && session.in_store()
                    && store.delete(vec![session.id().to_owned()]).await.is_err()
                {
                    return storage_unavailable(conn);
                }
                if ctx.sessions.close(session.id()) {
                    conn.with_status(Status::NoContent).halt()
                } else {
                    not_found(ctx, conn)
                }
            }
        }
    }
}

/// Opens a session with `options`, once they are within bounds and name a model the daemon
/// serves, through admission control.
async fn create(ctx: &Context, conn: Conn, options: SessionOptions) -> Conn {
    // The options count against the history budget (see `sessions/session.rs`), so they
    // may take all of it but no more: a session pins at most `max_history_bytes` of text.
    let max_bytes = ctx.session_limits().max_history_bytes;
    if options.bytes() > max_bytes {
        return response::bad_request(
            ctx,
            conn,
            "bad_request",
            format!(
                "the session's system prompt and model take {} bytes; at most {max_bytes} \
                 are allowed ([gateway] max_history_bytes)",
                options.bytes()
            ),
        );
    }
    if let Some(model) = options.model.as_deref()
        && let Err(error) = gateway::check_model(ctx, Some(model))
    {
        return response::error(
            ctx,
            conn,
            Status::NotFound,
            error.kind(),
            error.code(),
            error,
        );
    }
    match ctx.open_session_with(SessionKind::Http, options) {
        Ok(guard) => {
            // Stored before the client learns the id, so the id survives a restart.
            if let Some(store) = &ctx.store {
                if store.create(guard.session().record()).await.is_err() {
                    // Dropping the guard closes the session again.
                    return storage_unavailable(conn);
                }
                guard.session().mark_in_store();
            }
            let info = guard.keep().info();
            let mut body = json!({ "id": info.id, "created_at": info.created_at });
            if let (Some(model), Value::Object(map)) = (info.model, &mut body) {
                map.insert("model".into(), json!(model));
            }
            response::json(conn, Status::Created, &body)
        }
        Err(rejected) => rejection(ctx, conn, rejected),
    }
}

/// Reads the body of `POST /v1/sessions`: none, `{}`, or `{"model", "system"}`. A field the
/// daemon would silently ignore (`{"temperature": 0}`) is refused, as `/v1/messages`
/// refuses one.
async fn create_options(ctx: &Context, conn: Conn) -> Result<(Conn, SessionOptions), Conn> {
    let headers = conn.request_headers();
    let declared = headers
        .get_str(KnownHeaderName::ContentLength)
        .map(|length| length.trim() == "0");
    let chunked = headers.has_header(KnownHeaderName::TransferEncoding);
    if declared.unwrap_or(!chunked) {
        return Ok((conn, SessionOptions::default()));
    }
    body::read_json::<NewSession>(ctx, conn)
        .await
        .map(|(conn, NewSession(options))| (conn, options))
}

/// Returns the `{id}` of the path when it has the form of a session id.
pub(crate) fn session_id(conn: &Conn) -> Option<&str> {
    conn.param("id").filter(|id| is_session_id(id))
}

/// The body of `POST /v1/sessions`: an object with an optional non-empty string `model`
/// and an optional non-empty string `system` (`null` for either is the same as leaving it
/// out), and no other field.
///
/// Written by hand because serde's derive also accepts a JSON array in field order
/// (`["llama", "be terse"]`), a second, undocumented wire format.
struct NewSession(SessionOptions);

impl<'de> serde::Deserialize<'de> for NewSession {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(NewSessionVisitor)
    }
}

struct NewSessionVisitor;

impl<'de> serde::de::Visitor<'de> for NewSessionVisitor {
    type Value = NewSession;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object with optional `model` and `system`")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NewSession, A::Error> {
        use serde::de::Error as _;

        const FIELDS: &[&str] = &["model", "system"];
        let mut model: Option<Option<String>> = None;
        let mut system: Option<Option<String>> = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "model" if model.is_some() => return Err(A::Error::duplicate_field("model")),
                "model" => model = Some(gateway::non_empty(map.next_value()?, "a model alias")?),
                "system" if system.is_some() => return Err(A::Error::duplicate_field("system")),
                "system" => {
                    system = Some(gateway::non_empty(map.next_value()?, "a system prompt")?);
                }
                other => return Err(A::Error::unknown_field(other, FIELDS)),
            }
        }
        Ok(NewSession(SessionOptions {
            model: model.flatten(),
            system: system.flatten(),
        }))
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

/// Reads a page's `limit`: a whole number from 1 to [`MAX_PAGE`].
pub(crate) fn parse_limit(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|limit| (1..=MAX_PAGE).contains(limit))
        .ok_or_else(|| format!("limit must be a whole number from 1 to {MAX_PAGE}"))
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
                "limit" => limit = Some(parse_limit(value)?),
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

/// Answers 503 `storage_unavailable` when the session store cannot be written (not counted
/// here: the store counts each failed write in `blufio_errors_total{type="storage"}`).
pub(crate) fn storage_unavailable(conn: Conn) -> Conn {
    response::json(
        conn.with_response_header(KnownHeaderName::RetryAfter, "5"),
        Status::ServiceUnavailable,
        &json!({
            "error": "storage_unavailable",
            "message": "the session store cannot be written right now (see /v1/health); \
                        nothing was changed, try again later",
        }),
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
    let mut session = json!({
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
    });
    if let Value::Object(map) = &mut session {
        if let Some(model) = &info.model {
            map.insert("model".into(), json!(model));
        }
        if info.system_bytes > 0 {
            map.insert("system_bytes".into(), json!(info.system_bytes));
        }
    }
    session
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(text: &str) -> Result<SessionOptions, String> {
        serde_json::from_str::<NewSession>(text)
            .map(|NewSession(options)| options)
            .map_err(|error| error.to_string())
    }

    #[test]
    fn session_options_are_an_object_of_model_and_system_and_nothing_else() {
        assert_eq!(options("{}"), Ok(SessionOptions::default()));
        assert_eq!(
            options(r#"{"model": "llama", "system": "be terse"}"#),
            Ok(SessionOptions {
                model: Some("llama".to_owned()),
                system: Some("be terse".to_owned()),
            })
        );
        assert_eq!(
            options(r#"{"model": null, "system": "x"}"#),
            Ok(SessionOptions {
                model: None,
                system: Some("x".to_owned()),
            })
        );
        let unknown = options(r#"{"model": "llama", "temperature": 0}"#).unwrap_err();
        assert!(unknown.contains("unknown field `temperature`"), "{unknown}");
        let duplicate = options(r#"{"system": "a", "system": "b"}"#).unwrap_err();
        assert!(
            duplicate.contains("duplicate field `system`"),
            "{duplicate}"
        );
        let empty = options(r#"{"system": ""}"#).unwrap_err();
        assert!(empty.contains("expected a system prompt"), "{empty}");
        // Serde's derive would take an array in field order; this parser takes only objects.
        for bad in [
            r#"["llama", "be terse"]"#,
            "[]",
            r#""llama""#,
            r#"{"model": 7}"#,
        ] {
            assert!(options(bad).is_err(), "{bad}");
        }
    }

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
