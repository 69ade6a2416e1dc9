//! Reading the store: the rows the daemon restores at start-up, a session's history and
//! pages of its turns, and [`ReadOnly`], the handle `blufio sessions` opens (read-only while
//! a daemon runs: WAL lets it read beside the writer).

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::{
    StoredSession, StoredTurn,
    schema::{self, Unusable},
};
use crate::{
    agent::{Role, Turn},
    error::Error,
    sessions::SessionKind,
};

fn role_of(text: &str) -> rusqlite::Result<Role> {
    match text {
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        other => Err(rusqlite::Error::InvalidColumnType(
            0,
            format!("role {other}"),
            rusqlite::types::Type::Text,
        )),
    }
}

const SESSION_COLUMNS: &str =
    "id, kind, model, system, created_at, last_active_at, message_count FROM sessions";

fn session_row(row: &Row<'_>) -> rusqlite::Result<StoredSession> {
    let kind: String = row.get(1)?;
    Ok(StoredSession {
        id: row.get(0)?,
        kind: if kind == "websocket" {
            SessionKind::WebSocket
        } else {
            SessionKind::Http
        },
        model: row.get(2)?,
        system: row.get(3)?,
        created_at: row.get(4)?,
        last_active_at: row.get(5)?,
        message_count: row.get(6)?,
    })
}

fn turn_row(row: &Row<'_>) -> rusqlite::Result<StoredTurn> {
    Ok(StoredTurn {
        seq: row.get(0)?,
        role: role_of(&row.get::<_, String>(1)?)?,
        content: row.get(2)?,
        created_at: row.get(3)?,
        model: row.get(4)?,
        input_tokens: row.get(5)?,
        output_tokens: row.get(6)?,
        cost_usd: row.get(7)?,
    })
}

/// Every session, oldest first.
pub(super) fn sessions(conn: &Connection) -> rusqlite::Result<Vec<StoredSession>> {
    let mut statement =
        conn.prepare(&format!("SELECT {SESSION_COLUMNS} ORDER BY created_at, id"))?;
    statement.query_map([], session_row)?.collect()
}

fn session(conn: &Connection, id: &str) -> rusqlite::Result<Option<StoredSession>> {
    conn.query_row(
        &format!("SELECT {SESSION_COLUMNS} WHERE id = ?1"),
        [id],
        session_row,
    )
    .optional()
}

pub(super) fn spend(conn: &Connection, utc_day: u64) -> rusqlite::Result<Option<f64>> {
    conn.query_row(
        "SELECT spent_usd FROM spend WHERE utc_day = ?1",
        [utc_day],
        |row| row.get(0),
    )
    .optional()
}

pub(super) fn meta(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
        row.get(0)
    })
    .optional()
}

/// The newest turns within `max_messages` and `max_bytes` of content, oldest first.
pub(super) fn history(
    conn: &Connection,
    id: &str,
    max_messages: u64,
    max_bytes: u64,
) -> rusqlite::Result<Vec<Turn>> {
    let mut statement = conn.prepare(
        "SELECT role, content FROM turns WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let mut rows = statement.query(params![id, max_messages.min(i64::MAX as u64)])?;
    let mut turns = Vec::new();
    let mut bytes = 0u64;
    while let Some(row) = rows.next()? {
        let content: String = row.get(1)?;
        bytes += content.len() as u64;
        if bytes > max_bytes {
            break;
        }
        turns.push(Turn {
            role: role_of(&row.get::<_, String>(0)?)?,
            content,
        });
    }
    turns.reverse();
    Ok(turns)
}

/// A page of turns after `after`, at most `limit` and about `max_bytes` of content.
pub(super) fn page(
    conn: &Connection,
    id: &str,
    after: Option<u64>,
    limit: usize,
    max_bytes: usize,
) -> rusqlite::Result<(Vec<StoredTurn>, bool)> {
    let mut statement = conn.prepare(
        "SELECT seq, role, content, created_at, model, input_tokens, output_tokens, cost_usd \
         FROM turns WHERE session_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
    )?;
    let after = after.map_or(-1, |seq| i64::try_from(seq).unwrap_or(i64::MAX));
    // One row more than the page says whether more follow; -1 is SQLite's "no limit".
    let rows_wanted = i64::try_from(limit).map_or(-1, |limit| limit.saturating_add(1));
    let mut rows = statement.query(params![id, after, rows_wanted])?;
    let mut turns = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        if turns.len() == limit || (bytes >= max_bytes && !turns.is_empty()) {
            return Ok((turns, true));
        }
        let turn = turn_row(row)?;
        bytes += turn.content.len();
        turns.push(turn);
    }
    Ok((turns, false))
}

/// `file:PATH?immutable=1`, escaping what a URI path cannot hold as is; `None` for a path
/// that is not UTF-8 (read the ordinary way then).
fn immutable_uri(path: &Path) -> Option<String> {
    let mut uri = "file:".to_owned();
    for ch in path.to_str()?.chars() {
        match ch {
            '%' => uri.push_str("%25"),
            '?' => uri.push_str("%3f"),
            '#' => uri.push_str("%23"),
            other => uri.push(other),
        }
    }
    uri.push_str("?immutable=1");
    Some(uri)
}

/// A read-only view of a state directory's store, for `blufio sessions` (beside a running
/// daemon or without one).
#[derive(Debug)]
pub struct ReadOnly {
    conn: Connection,
}

impl ReadOnly {
    /// Opens `<dir>/blufio.db` for reading.
    ///
    /// # Errors
    ///
    /// Returns [`Error::State`] naming the file when it is missing, is not a database, or
    /// was written by a newer blufio.
    pub fn open(dir: &Path) -> Result<ReadOnly, Error> {
        let path = dir.join(super::DB_FILE);
        let unusable = |why: Unusable| Error::State {
            path: path.clone(),
            message: why.explain(),
        };
        if !path.exists() {
            return Err(Error::State {
                path,
                message: "no session store here yet (the daemon creates it on its first start \
                          with this state_dir)"
                    .to_owned(),
            });
        }
        let (conn, _) = ReadOnly::open_known(&path).map_err(unusable)?;
        Ok(ReadOnly { conn })
    }

    /// Opens `path` read-only and refuses a schema newer than this build knows; returns the
    /// connection and the file's schema version.
    pub(super) fn open_known(path: &Path) -> Result<(Connection, i64), Unusable> {
        let conn = ReadOnly::open_connection(path)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|error| Unusable::from_sqlite(&error))?;
        if version > schema::LATEST {
            return Err(Unusable::Newer(version));
        }
        Ok((conn, version))
    }

    /// Opens `path` read-only without leaving a file behind.
    ///
    /// In WAL mode SQLite makes the `-wal` and `-shm` files even for a read-only
    /// connection, owned by whoever opens it: run as root (the systemd unit's state directory
    /// belongs to its dynamic user) on a stopped daemon's store, that would leave files the
    /// daemon's user cannot open at its next start. A running daemon keeps its connection,
    /// and so its `-wal`, open; with no `-wal` every committed row is in the database file
    /// itself, which is then read as immutable: no `-wal`, no `-shm`, no lock. A daemon
    /// starting meanwhile writes to a `-wal` of its own, not to that file (until a
    /// checkpoint, far beyond what a start writes).
    pub(super) fn open_connection(path: &Path) -> Result<Connection, Unusable> {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let immutable = if Path::new(&wal).exists() {
            None
        } else {
            immutable_uri(path)
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match &immutable {
            Some(uri) => Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI),
            None => Connection::open_with_flags(path, flags),
        }
        .map_err(|error| Unusable::from_sqlite(&error))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|error| Unusable::from_sqlite(&error))?;
        Ok(conn)
    }

    /// Every stored session, oldest first.
    ///
    /// # Errors
    ///
    /// Returns the SQLite error as text.
    pub fn sessions(&self) -> Result<Vec<StoredSession>, String> {
        sessions(&self.conn).map_err(|error| error.to_string())
    }

    /// One session, if stored.
    ///
    /// # Errors
    ///
    /// Returns the SQLite error as text.
    pub fn session(&self, id: &str) -> Result<Option<StoredSession>, String> {
        session(&self.conn, id).map_err(|error| error.to_string())
    }

    /// A session and every turn of it, in order, read in one transaction so the two agree
    /// even while a daemon appends; `None` when it is not stored.
    ///
    /// # Errors
    ///
    /// Returns the SQLite error as text.
    pub fn conversation(
        &self,
        id: &str,
    ) -> Result<Option<(StoredSession, Vec<StoredTurn>)>, String> {
        let read = || {
            // A read transaction: one snapshot of the database for both queries.
            let tx = self.conn.unchecked_transaction()?;
            let Some(found) = session(&tx, id)? else {
                return Ok(None);
            };
            let (turns, _) = page(&tx, id, None, usize::MAX, usize::MAX)?;
            Ok(Some((found, turns)))
        };
        read().map_err(|error: rusqlite::Error| error.to_string())
    }

    /// Every turn of a session, in order.
    ///
    /// # Errors
    ///
    /// Returns the SQLite error as text.
    pub fn turns(&self, id: &str) -> Result<Vec<StoredTurn>, String> {
        page(&self.conn, id, None, usize::MAX, usize::MAX)
            .map(|(turns, _)| turns)
            .map_err(|error| error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    /// The names in `dir`, sorted.
    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A closed store in `dir` (a name that needs escaping in a URI) with one session of
    /// one turn.
    fn stored(dir: &Path) {
        let mut conn = super::super::open_connection(&dir.join(super::super::DB_FILE), 0).unwrap();
        schema::migrate(&mut conn).unwrap();
        conn.execute(
            "INSERT INTO sessions (id, kind, created_at, last_active_at, message_count) \
             VALUES (?1, 'http', 1, 2, 1)",
            [ID],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO turns (session_id, seq, role, content, created_at) \
             VALUES (?1, 0, 'user', 'hello', 1)",
            [ID],
        )
        .unwrap();
    }

    #[test]
    fn reading_a_closed_store_leaves_no_file_behind() {
        let temp = blufio_testkit::temp::temp_dir("read-closed");
        let dir = temp.join("state 100%?#");
        std::fs::create_dir_all(&dir).unwrap();
        stored(&dir);
        assert_eq!(files_in(&dir), ["blufio.db"]);
        let store = ReadOnly::open(&dir).unwrap();
        assert_eq!(store.sessions().unwrap().len(), 1);
        assert_eq!(store.turns(ID).unwrap()[0].content, "hello");
        let (session, turns) = store.conversation(ID).unwrap().unwrap();
        assert_eq!((session.message_count, turns.len()), (1, 1));
        assert_eq!(store.conversation("0").unwrap(), None);
        drop(store);
        assert_eq!(files_in(&dir), ["blufio.db"]);
    }

    #[test]
    fn reading_beside_an_open_writer_sees_its_commits() {
        let dir = blufio_testkit::temp::temp_dir("read-beside");
        stored(&dir);
        let writer = super::super::open_connection(&dir.join(super::super::DB_FILE), 0).unwrap();
        writer
            .execute(
                "INSERT INTO turns (session_id, seq, role, content, created_at) \
                 VALUES (?1, 1, 'assistant', 'hi', 2)",
                [ID],
            )
            .unwrap();
        // The commit is in the writer's -wal, not yet in the database file.
        let store = ReadOnly::open(&dir).unwrap();
        assert_eq!(store.turns(ID).unwrap().len(), 2);
        drop(writer);
    }
}
