//! The database's schema and its migrations, and the checks that refuse a file blufio must
//! not write to: one that is not a database, is corrupt, or was written by a newer blufio.
//!
//! The schema version is SQLite's `user_version`. [`MIGRATIONS`] holds one script per version;
//! opening applies those the file has not seen yet, each in its own transaction, so a crash
//! during a migration leaves the previous version intact.

use rusqlite::{Connection, ErrorCode};

/// One script per schema version: `MIGRATIONS[0]` takes an empty file to version 1.
pub(crate) const MIGRATIONS: &[&str] = &[
    // Version 1: sessions, their turns, the daily spend and a key-value table.
    "CREATE TABLE sessions (
         id TEXT PRIMARY KEY NOT NULL,
         kind TEXT NOT NULL CHECK (kind IN ('http', 'websocket')),
         model TEXT,
         system TEXT,
         created_at INTEGER NOT NULL,
         last_active_at INTEGER NOT NULL,
         message_count INTEGER NOT NULL DEFAULT 0
     );
     CREATE INDEX sessions_by_activity ON sessions (last_active_at);
     CREATE TABLE turns (
         session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
         seq INTEGER NOT NULL,
         role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
         content TEXT NOT NULL,
         created_at INTEGER NOT NULL,
         model TEXT,
         input_tokens INTEGER,
         output_tokens INTEGER,
         cost_usd REAL,
         PRIMARY KEY (session_id, seq)
     );
     CREATE TABLE spend (
         utc_day INTEGER PRIMARY KEY NOT NULL,
         spent_usd REAL NOT NULL
     );
     CREATE TABLE meta (
         key TEXT PRIMARY KEY NOT NULL,
         value TEXT NOT NULL
     );",
];

/// The schema version this build writes.
pub(crate) const LATEST: i64 = MIGRATIONS.len() as i64;

/// Why a database file cannot be used.
#[derive(Debug)]
pub(crate) enum Unusable {
    /// It is not an SQLite database (or is encrypted, or its header is damaged).
    NotADatabase,
    /// SQLite found damage in it.
    Corrupt(String),
    /// A newer blufio wrote it.
    Newer(i64),
    /// It could not be read or written (permissions, a full disk).
    Io(String),
}

impl Unusable {
    /// Classifies an SQLite error met while opening or reading the file.
    pub(crate) fn from_sqlite(error: &rusqlite::Error) -> Unusable {
        match error.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => Unusable::NotADatabase,
            Some(ErrorCode::DatabaseCorrupt) => Unusable::Corrupt(error.to_string()),
            _ => Unusable::Io(error.to_string()),
        }
    }

    /// Says what is wrong and what the operator can do, for a message naming the file.
    pub(crate) fn explain(&self) -> String {
        match self {
            Unusable::NotADatabase => "is not an SQLite database (or its header is damaged); \
                 refusing to start rather than replace it: restore it from a backup, or move it \
                 aside to start with an empty store"
                .to_owned(),
            Unusable::Corrupt(detail) => format!(
                "is damaged ({detail}); refusing to start rather than lose more of it: restore \
                 it from a backup, or try `sqlite3 blufio.db .recover` into a new file"
            ),
            Unusable::Newer(version) => format!(
                "has schema version {version}, written by a newer blufio (this one knows up to \
                 {LATEST}); run the newer blufio, or restore a backup taken before the upgrade"
            ),
            Unusable::Io(detail) => format!("cannot be opened or read: {detail}"),
        }
    }
}

/// Brings the file to [`LATEST`], one migration per transaction.
///
/// # Errors
///
/// Returns [`Unusable`] when the file is not a database, is newer than this build, or a
/// migration fails.
pub(crate) fn migrate(conn: &mut Connection) -> Result<i64, Unusable> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|error| Unusable::from_sqlite(&error))?;
    if version > LATEST {
        return Err(Unusable::Newer(version));
    }
    if version < 0 {
        return Err(Unusable::Corrupt(format!("schema version {version}")));
    }
    for (index, script) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let next = index as i64 + 1;
        let tx = conn
            .transaction()
            .map_err(|error| Unusable::from_sqlite(&error))?;
        tx.execute_batch(script)
            .and_then(|()| tx.pragma_update(None, "user_version", next))
            .and_then(|()| tx.commit())
            .map_err(|error| Unusable::from_sqlite(&error))?;
    }
    Ok(version)
}

/// Runs SQLite's own consistency check over every page (`PRAGMA quick_check`).
///
/// # Errors
///
/// Returns [`Unusable::Corrupt`] with SQLite's first finding.
pub(crate) fn quick_check(conn: &Connection) -> Result<(), Unusable> {
    let mut statement = conn
        .prepare("PRAGMA quick_check(1)")
        .map_err(|error| Unusable::from_sqlite(&error))?;
    let verdict: String = statement
        .query_row([], |row| row.get(0))
        .map_err(|error| Unusable::from_sqlite(&error))?;
    if verdict == "ok" {
        Ok(())
    } else {
        Err(Unusable::Corrupt(verdict))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn an_empty_file_is_migrated_to_the_latest_version() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), 0);
        assert_eq!(version(&conn), LATEST);
        // Opening again applies nothing.
        assert_eq!(migrate(&mut conn).unwrap(), LATEST);
    }

    /// Migration 1: the tables a version-1 daemon writes take the rows it writes, and a turn
    /// goes with its session.
    #[test]
    fn migration_1_creates_sessions_turns_spend_and_meta() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("PRAGMA foreign_keys = ON").unwrap();
        migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO sessions (id, kind, created_at, last_active_at) VALUES ('a', 'http', 1, 2);
             INSERT INTO turns (session_id, seq, role, content, created_at) VALUES ('a', 0, 'user', 'hi', 2);
             INSERT INTO spend VALUES (20000, 0.5);
             INSERT INTO meta VALUES ('k', 'v');",
        )
        .unwrap();
        let refused = conn.execute(
            "INSERT INTO turns (session_id, seq, role, content, created_at) VALUES ('a', 1, 'system', 'x', 2)",
            [],
        );
        assert!(refused.is_err(), "only user and assistant turns");
        conn.execute("DELETE FROM sessions WHERE id = 'a'", [])
            .unwrap();
        let turns: i64 = conn
            .query_row("SELECT count(*) FROM turns", [], |row| row.get(0))
            .unwrap();
        assert_eq!(turns, 0);
    }

    #[test]
    fn a_file_from_a_newer_version_is_refused_untouched() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", LATEST + 1)
            .unwrap();
        let error = migrate(&mut conn).unwrap_err();
        assert!(matches!(error, Unusable::Newer(v) if v == LATEST + 1));
        assert!(
            error.explain().contains("newer blufio"),
            "{}",
            error.explain()
        );
        assert_eq!(version(&conn), LATEST + 1);
    }
}
