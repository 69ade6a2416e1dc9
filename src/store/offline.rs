//! Writing to a stopped daemon's store from the command line (`blufio sessions delete`).
//!
//! A running daemon owns its database: it holds the rows it restored in memory and would
//! not know a session had vanished under it. So a write here first takes the state
//! directory's lock ([`StateLock`]), the same one a daemon holds for its whole life, and when
//! a daemon holds it, refuses and says which pid (the daemon's own `DELETE
//! /v1/sessions/{id}` is the way then). Reading needs no lock: see [`super::ReadOnly`].
//!
//! It leaves no file behind that the daemon's own user could not open (the systemd unit's
//! state directory belongs to a dynamic user, so the operator runs this as root): SQLite
//! removes the `-wal` and `-shm` files when the connection closes, and a lock file this
//! had to create goes before the lock is released. Nothing here creates a state directory
//! or a database.

use std::{io, path::Path};

use rusqlite::params;

use super::{
    DB_FILE, OfflineDelete,
    schema::{self, Unusable},
};
use crate::{
    error::Error,
    state_dir::{Acquired, LOCK_FILE, StateLock},
};

/// Deletes session `id` and its turns from `<dir>/blufio.db`, unless a daemon holds `dir`.
///
/// # Errors
///
/// Returns [`Error::State`] naming the file when there is no store in `dir` or it cannot be
/// used (not a database, damaged, from a newer blufio), or naming `dir` when its lock cannot
/// be taken; [`Error::Io`] when the delete itself fails (a read-only file, a full disk).
pub fn delete_session(dir: &Path, id: &str) -> Result<OfflineDelete, Error> {
    let path = dir.join(DB_FILE);
    if !path.is_file() {
        return Err(Error::State {
            path,
            message: "no session store here (the daemon creates it on its first start with \
                      this state_dir)"
                .to_owned(),
        });
    }
    let lock_file = dir.join(LOCK_FILE);
    let lock_existed = lock_file.exists();
    let lock = match StateLock::try_acquire(dir)? {
        Acquired::Locked(lock) => lock,
        Acquired::Held { pid } => return Ok(OfflineDelete::DaemonRunning { pid }),
    };
    let deleted = delete_locked(&path, id);
    // A lock file this made would be root's under the systemd unit, and keep the daemon's
    // own user from opening it. Removed while still locked: a daemon starting meanwhile was
    // refused, and one starting after makes a file of its own.
    if !lock_existed {
        let _ = std::fs::remove_file(&lock_file);
    }
    lock.release();
    deleted
}

fn delete_locked(path: &Path, id: &str) -> Result<OfflineDelete, Error> {
    let unusable = |why: Unusable| Error::State {
        path: path.to_owned(),
        message: why.explain(),
    };
    // The daemon's own settings (WAL, synchronous = FULL, foreign keys for the cascade); no
    // size cap, since a delete only frees pages. Migrating is what the next start would do.
    let mut conn = super::open_connection(path, 0).map_err(unusable)?;
    schema::migrate(&mut conn).map_err(unusable)?;
    delete_in(&mut conn, id).map_err(|error| Error::Io {
        context: format!("cannot delete session {id} from {}", path.display()),
        source: io::Error::other(error.to_string()),
    })
    // Dropped here: the last connection to close checkpoints the WAL and removes the -wal
    // and -shm files, so none of them is left owned by the operator either.
}

fn delete_in(conn: &mut rusqlite::Connection, id: &str) -> rusqlite::Result<OfflineDelete> {
    let tx = conn.transaction()?;
    let exists: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM sessions WHERE id = ?1)",
        params![id],
        |row| row.get(0),
    )?;
    if !exists {
        return Ok(OfflineDelete::NotFound);
    }
    let turns: u64 = tx.query_row(
        "SELECT count(*) FROM turns WHERE session_id = ?1",
        params![id],
        |row| row.get(0),
    )?;
    // The turns go with it: `turns.session_id` cascades on delete.
    tx.execute("DELETE FROM sessions WHERE id = ?1", params![id])?;
    tx.commit()?;
    Ok(OfflineDelete::Deleted { turns })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";
    const OTHER: &str = "fedcba9876543210fedcba9876543210";

    /// A store in `dir` with two sessions, `ID` holding two turns and `OTHER` one.
    fn store_with_sessions(dir: &Path) {
        let mut conn = super::super::open_connection(&dir.join(DB_FILE), 0).unwrap();
        schema::migrate(&mut conn).unwrap();
        for id in [ID, OTHER] {
            conn.execute(
                "INSERT INTO sessions (id, kind, model, system, created_at, last_active_at, \
                 message_count) VALUES (?1, 'http', NULL, NULL, 1, 2, 2)",
                params![id],
            )
            .unwrap();
        }
        for (id, seq, role) in [(ID, 0, "user"), (ID, 1, "assistant"), (OTHER, 0, "user")] {
            conn.execute(
                "INSERT INTO turns (session_id, seq, role, content, created_at) \
                 VALUES (?1, ?2, ?3, 'hello', 1)",
                params![id, seq, role],
            )
            .unwrap();
        }
    }

    fn turns_of(dir: &Path, id: &str) -> i64 {
        let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
        conn.query_row(
            "SELECT count(*) FROM turns WHERE session_id = ?1",
            params![id],
            |row| row.get(0),
        )
        .unwrap()
    }

    #[test]
    fn deleting_a_session_takes_its_turns_and_leaves_the_others() {
        let dir = blufio_testkit::temp::temp_dir("offline-delete");
        store_with_sessions(&dir);
        assert_eq!(
            delete_session(&dir, ID).unwrap(),
            OfflineDelete::Deleted { turns: 2 }
        );
        assert_eq!(turns_of(&dir, ID), 0);
        assert_eq!(turns_of(&dir, OTHER), 1);
        assert_eq!(delete_session(&dir, ID).unwrap(), OfflineDelete::NotFound);
        // Nothing left behind (the lock file was not there before), and the directory is
        // free for a daemon.
        assert_eq!(files_in(&dir), [DB_FILE]);
        drop(StateLock::acquire(&dir).unwrap());
    }

    #[test]
    fn a_held_state_directory_is_refused_with_the_holders_pid_and_nothing_deleted() {
        let dir = blufio_testkit::temp::temp_dir("offline-held");
        store_with_sessions(&dir);
        let daemon = StateLock::acquire(&dir).unwrap();
        assert_eq!(
            delete_session(&dir, ID).unwrap(),
            OfflineDelete::DaemonRunning {
                pid: Some(std::process::id())
            }
        );
        assert_eq!(turns_of(&dir, ID), 2);
        daemon.release();
    }

    /// The names in `dir`, sorted.
    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_directory_without_a_store_is_refused_and_left_as_it_was() {
        let dir = blufio_testkit::temp::temp_dir("offline-empty");
        let error = delete_session(&dir, ID).unwrap_err();
        assert!(error.is_config(), "{error}");
        assert!(error.to_string().contains(DB_FILE), "{error}");
        assert!(files_in(&dir).is_empty(), "{:?}", files_in(&dir));
    }
}
