//! The statements every message runs (store a session, append its turns, record the spend),
//! prepared once on the database thread and kept for the life of its connection.
//!
//! Preparing them anew for each message (parsing and planning the SQL) cost more CPU than
//! running them. rusqlite's own statement cache would need its `cache` feature and one more
//! crate; four statements need no cache, only a place to live. Other statements (deletes,
//! reads, the cap) run rarely and are prepared where they run.

use rusqlite::{Connection, Statement};

/// A statement [`Statements`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sql {
    /// Stores a session unless it exists.
    CreateSession,
    /// Counts a message's turns into its session and returns the first turn's number.
    CountTurns,
    /// Stores one turn.
    InsertTurn,
    /// Records a day's spend (the larger total wins).
    SaveSpend,
}

impl Sql {
    fn text(self) -> &'static str {
        match self {
            Sql::CreateSession => {
                "INSERT INTO sessions (id, kind, model, system, created_at, last_active_at, \
                 message_count) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0) ON CONFLICT (id) DO NOTHING"
            }
            Sql::CountTurns => {
                "UPDATE sessions SET message_count = message_count + ?2, \
                 last_active_at = max(last_active_at, coalesce(?3, last_active_at)) \
                 WHERE id = ?1 RETURNING message_count - ?2"
            }
            Sql::InsertTurn => {
                "INSERT INTO turns (session_id, seq, role, content, created_at, model, \
                 input_tokens, output_tokens, cost_usd) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            }
            // Totals arrive from several threads; the larger is the later one within a day.
            Sql::SaveSpend => {
                "INSERT INTO spend (utc_day, spent_usd) VALUES (?1, ?2) ON CONFLICT (utc_day) \
                 DO UPDATE SET spent_usd = max(spent_usd, excluded.spent_usd)"
            }
        }
    }
}

/// The database thread's connection and its statements, each prepared on first use.
pub(super) struct Statements<'conn> {
    conn: &'conn Connection,
    create_session: Option<Statement<'conn>>,
    count_turns: Option<Statement<'conn>>,
    insert_turn: Option<Statement<'conn>>,
    save_spend: Option<Statement<'conn>>,
}

impl<'conn> Statements<'conn> {
    pub(super) fn new(conn: &'conn Connection) -> Statements<'conn> {
        Statements {
            conn,
            create_session: None,
            count_turns: None,
            insert_turn: None,
            save_spend: None,
        }
    }

    /// Returns the connection, for the statements that are not kept.
    pub(super) fn conn(&self) -> &'conn Connection {
        self.conn
    }

    /// Returns `sql`'s statement, preparing it the first time.
    ///
    /// # Errors
    ///
    /// Returns SQLite's error when the statement cannot be prepared (it is tried again on
    /// the next use).
    pub(super) fn get(&mut self, sql: Sql) -> rusqlite::Result<&mut Statement<'conn>> {
        let slot = match sql {
            Sql::CreateSession => &mut self.create_session,
            Sql::CountTurns => &mut self.count_turns,
            Sql::InsertTurn => &mut self.insert_turn,
            Sql::SaveSpend => &mut self.save_spend,
        };
        if slot.is_none() {
            *slot = Some(self.conn.prepare(sql.text())?);
        }
        slot.as_mut().ok_or(rusqlite::Error::InvalidQuery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema;

    #[test]
    fn every_kept_statement_prepares_against_the_latest_schema_once() {
        let mut conn = Connection::open_in_memory().unwrap();
        schema::migrate(&mut conn).unwrap();
        let mut statements = Statements::new(&conn);
        for sql in [
            Sql::CreateSession,
            Sql::CountTurns,
            Sql::InsertTurn,
            Sql::SaveSpend,
        ] {
            let first: *const Statement<'_> = statements.get(sql).unwrap();
            let again: *const Statement<'_> = statements.get(sql).unwrap();
            assert_eq!(first, again, "{sql:?} is prepared once and kept");
        }
    }
}
