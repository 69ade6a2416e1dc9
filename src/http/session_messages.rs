//! `GET /v1/sessions/{id}/messages[?limit=N][&cursor=C]`: a session's messages in order,
//! a page at a time, and the cursor of the next page (`null` on the last).
//!
//! A session the store keeps is read from the store, so every message since it opened is
//! there however much of its history memory holds; others are read from the history in
//! memory (the newest messages within `[gateway]` bounds; `created_at` is then null). A page
//! stops at `limit` messages or once it holds 1 MiB of text, so one request cannot make the
//! daemon build a response of the whole conversation.

use std::sync::Arc;

use serde_json::{Value, json};
use trillium::{Conn, Handler, Status};

use crate::{
    context::Context,
    http::{
        response,
        sessions::{DEFAULT_PAGE, not_found, parse_limit, session_id, storage_unavailable},
    },
    sessions::SessionKind,
    store::StoredTurn,
};

/// Bytes of message text after which a page ends (it always holds one message).
pub const MAX_PAGE_TEXT: usize = 1024 * 1024;

/// Serves `GET /v1/sessions/:id/messages`.
#[derive(Debug, Clone)]
pub struct SessionMessagesHandler {
    ctx: Arc<Context>,
}

impl SessionMessagesHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> SessionMessagesHandler {
        SessionMessagesHandler { ctx }
    }
}

impl Handler for SessionMessagesHandler {
    async fn run(&self, conn: Conn) -> Conn {
        page(&self.ctx, conn).await
    }
}

/// Answers one page of a session's messages.
async fn page(ctx: &Context, conn: Conn) -> Conn {
    let Some(session) = session_id(&conn).and_then(|id| ctx.sessions.get(id)) else {
        return not_found(ctx, conn);
    };
    let query = match MessagesQuery::parse(conn.querystring()) {
        Ok(query) => query,
        Err(message) => return response::bad_request(ctx, conn, "bad_request", message),
    };
    let store = ctx
        .store
        .as_ref()
        .filter(|_| session.kind() == SessionKind::Http);
    let (turns, more) = match store {
        // Nothing is stored before the session's first message (or its creation) commits.
        Some(_) if !session.in_store() => (Vec::new(), false),
        Some(store) => {
            match store
                .page(session.id(), query.after, query.limit, MAX_PAGE_TEXT)
                .await
            {
                Ok(page) => page,
                Err(error) => {
                    log::warn!("{error}");
                    return storage_unavailable(conn);
                }
            }
        }
        None => from_memory(&session, &query),
    };
    let next = turns
        .last()
        .filter(|_| more)
        .map(|turn| turn.seq.to_string());
    let messages: Vec<Value> = turns
        .iter()
        .map(|turn| {
            let mut value = turn.to_json();
            if store.is_none()
                && let Value::Object(map) = &mut value
            {
                map.insert("created_at".into(), Value::Null);
            }
            value
        })
        .collect();
    response::json(
        conn,
        Status::Ok,
        &json!({ "messages": messages, "next": next }),
    )
}

/// A page of the history memory holds, numbered as the store numbers turns.
fn from_memory(
    session: &crate::sessions::Session,
    query: &MessagesQuery,
) -> (Vec<StoredTurn>, bool) {
    let (first_seq, history) = session.numbered_history();
    let mut turns = Vec::new();
    let mut bytes = 0;
    for (offset, turn) in history.into_iter().enumerate() {
        let seq = first_seq + offset as u64;
        if query.after.is_some_and(|after| seq <= after) {
            continue;
        }
        if turns.len() == query.limit || (bytes >= MAX_PAGE_TEXT && !turns.is_empty()) {
            return (turns, true);
        }
        bytes += turn.content.len();
        turns.push(StoredTurn {
            seq,
            role: turn.role,
            content: turn.content,
            created_at: 0,
            model: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
        });
    }
    (turns, false)
}

/// The parameters of a messages request.
#[derive(Debug, PartialEq)]
struct MessagesQuery {
    limit: usize,
    after: Option<u64>,
}

impl MessagesQuery {
    /// Reads `limit` (1 to 1000) and `cursor` (a `next` this server returned); other
    /// parameters are ignored.
    fn parse(query: &str) -> Result<MessagesQuery, String> {
        let mut limit = None;
        let mut after = None;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "limit" if limit.is_some() => return Err("limit is given twice".to_owned()),
                "limit" => limit = Some(parse_limit(value)?),
                "cursor" if after.is_some() => return Err("cursor is given twice".to_owned()),
                "cursor" => {
                    after = Some(
                        value
                            .parse::<u64>()
                            .ok()
                            .filter(|_| value.bytes().all(|byte| byte.is_ascii_digit()))
                            .ok_or_else(|| {
                                "cursor is not one this server returned as `next`".to_owned()
                            })?,
                    );
                }
                _ => {}
            }
        }
        Ok(MessagesQuery {
            limit: limit.unwrap_or(DEFAULT_PAGE),
            after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_queries_read_limit_and_cursor_and_refuse_bad_ones() {
        assert_eq!(
            MessagesQuery::parse("").unwrap(),
            MessagesQuery {
                limit: DEFAULT_PAGE,
                after: None
            }
        );
        assert_eq!(
            MessagesQuery::parse("limit=3&cursor=41&x=1").unwrap(),
            MessagesQuery {
                limit: 3,
                after: Some(41)
            }
        );
        for bad in [
            "limit=0",
            "limit=1001",
            "cursor=",
            "cursor=-1",
            "cursor=+4",
            "cursor=abc",
            "cursor=1&cursor=2",
        ] {
            assert!(MessagesQuery::parse(bad).is_err(), "{bad}");
        }
    }
}
