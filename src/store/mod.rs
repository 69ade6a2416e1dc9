//! The embedded SQLite store: sessions, their turns and the daily spend in
//! `<state_dir>/blufio.db`, so a restart (an upgrade, a power cut, the OOM killer) forgets
//! nothing a client was told.
//!
//! The database lives on a thread of its own ([`worker`]), fed through a bounded channel:
//! the executor only ever awaits an answer, so a slow disk (an SD card) slows the writes
//! that wait for it, never `/health`, `/metrics` or the accept loop. Writes that arrive
//! while a commit is under way are committed together with one `fsync` (group commit).
//! `synchronous = FULL` in WAL mode makes a commit durable through a power cut, and a
//! message's turns are committed before its reply is returned.
//!
//! Nothing is reset silently: a file that is not a database, is damaged or was written by a
//! newer blufio stops start-up ([`Error::State`], exit 78) with what to do. A write that
//! fails (a full disk, a read-only directory) fails its request with `storage_unavailable`,
//! counts `blufio_errors_total{type="storage"}` and shows in `/v1/health`; the next write
//! tries again, so the daemon recovers when space returns.

mod offline;
mod read;
mod schema;
mod statements;
mod turn;
mod worker;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use rusqlite::{Connection, OpenFlags};

pub use self::{
    offline::delete_session,
    read::ReadOnly,
    turn::{OfflineDelete, Opened, StoreError, StoreOptions, StoredSession, StoredTurn},
};
use self::{
    schema::Unusable,
    worker::{Job, Queued},
};
use crate::{
    agent::Turn,
    error::Error,
    metrics::{ErrorCounter, StoreMetrics},
};

/// The database's file name inside `[daemon] state_dir`.
pub const DB_FILE: &str = "blufio.db";

/// Jobs waiting for the database thread, at most; senders wait (parked, not blocking a
/// thread) beyond it, which is the back-pressure a slow disk puts on writers. As many as a
/// commit takes; the queue's slots are allocated (and touched) up front, so 1,024 of them
/// would cost 200 KiB of idle memory.
const QUEUE: usize = 256;

/// The handle on the database thread; cloned freely.
#[derive(Debug, Clone)]
pub struct Store {
    jobs: async_channel::Sender<Queued>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    path: PathBuf,
    /// Why the last write failed, while writes fail.
    failing: Mutex<Option<String>>,
    /// The last failure of the current failure episode (logged once), if one is under way.
    episode: Mutex<Option<Instant>>,
    errors: ErrorCounter,
    metrics: StoreMetrics,
    max_bytes: u64,
    /// Fires when the thread has closed the database.
    closed: event_listener::Event,
    done: std::sync::atomic::AtomicBool,
    /// Commits so far (the counter's value, readable without the recorder).
    commit_count: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (creating it if needed) `<dir>/blufio.db`, migrates it, removes sessions idle
    /// past the timeout and reads what is left, then starts the database thread.
    ///
    /// `today` is the UTC day (days since the epoch) whose spend is read back.
    ///
    /// # Errors
    ///
    /// Returns [`Error::State`] naming the file when it is not a database, is damaged, was
    /// written by a newer blufio or cannot be opened, and [`Error::Io`] when the thread
    /// cannot start.
    pub fn open(
        dir: &Path,
        options: StoreOptions,
        today: u64,
        metrics: StoreMetrics,
        errors: ErrorCounter,
    ) -> Result<Opened, Error> {
        let path = dir.join(DB_FILE);
        let unusable = |why: Unusable| Error::State {
            path: path.clone(),
            message: why.explain(),
        };
        let mut conn = open_connection(&path, options.max_bytes).map_err(unusable)?;
        // Every page, before anything is trusted or written: damage found later would fail
        // requests one by one instead of stopping here with what to do. 76 ms for 10,000
        // sessions of 20 turns (44 MB) on the bench machine; a cold SD card reads slower.
        schema::quick_check(&conn).map_err(unusable)?;
        schema::migrate(&mut conn).map_err(unusable)?;
        let now = unix_now();
        let cutoff = now.saturating_sub(options.idle_timeout_secs);
        let expired = worker::expire(&conn, cutoff)
            .map_err(|error| unusable(Unusable::from_sqlite(&error)))?;
        let sessions =
            read::sessions(&conn).map_err(|error| unusable(Unusable::from_sqlite(&error)))?;
        let spent_today_usd =
            read::spend(&conn, today).map_err(|error| unusable(Unusable::from_sqlite(&error)))?;
        let spend_imported = read::meta(&conn, worker::SPEND_IMPORTED)
            .map_err(|error| unusable(Unusable::from_sqlite(&error)))?
            .is_some();
        let (jobs, queue) = async_channel::bounded(QUEUE);
        let shared = Arc::new(Shared {
            path: path.clone(),
            failing: Mutex::new(None),
            episode: Mutex::new(None),
            errors,
            metrics,
            max_bytes: options.max_bytes,
            closed: event_listener::Event::new(),
            done: std::sync::atomic::AtomicBool::new(false),
            commit_count: std::sync::atomic::AtomicU64::new(0),
        });
        shared.update_size();
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("blufio-store".to_owned())
            .spawn(move || worker::run(conn, &queue, &thread_shared))
            .map_err(|source| Error::Io {
                context: "cannot start the store thread".to_owned(),
                source,
            })?;
        Ok(Opened {
            store: Store { jobs, shared },
            sessions,
            expired,
            spent_today_usd,
            spend_imported,
        })
    }

    /// Returns the database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Returns why writes fail, while they do.
    pub fn failing(&self) -> Option<String> {
        crate::sync::lock(&self.shared.failing).clone()
    }

    /// Stores a new session.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the write fails.
    pub async fn create(&self, session: StoredSession) -> Result<(), StoreError> {
        self.ask(|reply| Job::Create(Box::new(session), reply))
            .await
    }

    /// Appends `turns` to session `id` (numbered after those it has) and records `spend`
    /// (the day and its total), in one transaction; `create` stores the session first when
    /// the store does not have it yet. A session deleted meanwhile gets nothing, and that is
    /// not an error.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the commit fails: nothing of it is stored then.
    pub async fn append(
        &self,
        id: &str,
        create: Option<StoredSession>,
        turns: Vec<StoredTurn>,
        spend: Option<(u64, f64)>,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.ask(|reply| Job::Append {
            id,
            create: create.map(Box::new),
            turns,
            spend,
            reply,
        })
        .await
    }

    /// Deletes sessions and their turns.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the write fails.
    pub async fn delete(&self, ids: Vec<String>) -> Result<(), StoreError> {
        self.ask(|reply| Job::Delete(ids, reply)).await
    }

    /// Returns the newest turns of session `id` that fit `max_messages` and `max_bytes`,
    /// oldest first: what its history holds in memory.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the read fails.
    pub async fn history(
        &self,
        id: &str,
        max_messages: u64,
        max_bytes: u64,
    ) -> Result<Vec<Turn>, StoreError> {
        let id = id.to_owned();
        self.ask(|reply| Job::History {
            id,
            max_messages,
            max_bytes,
            reply,
        })
        .await
    }

    /// Returns up to `limit` turns of session `id` after turn `after` (from the first when
    /// `None`), stopping early once `max_bytes` of content are in the page (one turn at
    /// least), and whether more follow.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the read fails.
    pub async fn page(
        &self,
        id: &str,
        after: Option<u64>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<StoredTurn>, bool), StoreError> {
        let id = id.to_owned();
        self.ask(|reply| Job::Page {
            id,
            after,
            limit,
            max_bytes,
            reply,
        })
        .await
    }

    /// Removes the longest-idle sessions until the database is under 90 % of its cap;
    /// returns their ids, for the registry to close them too.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the write fails.
    pub async fn enforce_cap(&self) -> Result<Vec<String>, StoreError> {
        if self.shared.max_bytes == 0 {
            return Ok(Vec::new());
        }
        self.ask(Job::Enforce).await
    }

    /// Records the spend of `utc_day` (a total: a smaller one than stored is ignored), from
    /// a thread that may block (the spend writer).
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the write fails.
    pub fn save_spend_blocking(&self, utc_day: u64, spent_usd: f64) -> Result<(), StoreError> {
        futures_lite::future::block_on(self.ask(|reply| Job::Spend {
            utc_day,
            spent_usd,
            reply,
        }))
    }

    /// Records the spend of `utc_day` (a total), waiting for the commit.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the write fails.
    pub async fn save_spend(&self, utc_day: u64, spent_usd: f64) -> Result<(), StoreError> {
        self.ask(|reply| Job::Spend {
            utc_day,
            spent_usd,
            reply,
        })
        .await
    }

    /// Queues the spend of `utc_day` (a total) without waiting. When the queue is full the
    /// total is dropped: the next one, or the next message's commit, carries a larger one.
    pub fn submit_spend(&self, utc_day: u64, spent_usd: f64) {
        let (reply, _unanswered) = async_channel::bounded(1);
        let _ = self.jobs.try_send(Queued {
            job: Job::Spend {
                utc_day,
                spent_usd,
                reply,
            },
            at: Instant::now(),
        });
    }

    /// Records that `spend.json` was imported (or that there was none), so it is never read
    /// again.
    ///
    /// # Errors
    ///
    /// Returns [`StoreError`] when the write fails.
    pub fn mark_spend_imported_blocking(&self) -> Result<(), StoreError> {
        futures_lite::future::block_on(self.ask(Job::MarkSpendImported))
    }

    /// Lets the thread finish the jobs queued and close the database (checkpointing the
    /// WAL), waiting up to `timeout`; returns whether it closed in time.
    pub async fn close(&self, timeout: std::time::Duration) -> bool {
        let listener = self.shared.closed.listen();
        self.jobs.close();
        if self.shared.done.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        futures_lite::FutureExt::or(
            async {
                listener.await;
                true
            },
            async {
                async_io::Timer::after(timeout).await;
                false
            },
        )
        .await
            || self.shared.done.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn ask<T>(
        &self,
        job: impl FnOnce(async_channel::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (reply, answer) = async_channel::bounded(1);
        let queued = Queued {
            job: job(reply),
            at: Instant::now(),
        };
        if self.jobs.send(queued).await.is_err() {
            return Err(StoreError {
                detail: "the store is closed".to_owned(),
            });
        }
        answer.recv().await.unwrap_or_else(|_| {
            Err(StoreError {
                detail: "the store thread stopped".to_owned(),
            })
        })
    }
}

impl Shared {
    /// Returns the commits made so far (for tests of group commit).
    #[cfg(test)]
    fn commits_so_far(&self) -> u64 {
        self.commit_count.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets `blufio_store_bytes` from the database and WAL files' sizes.
    fn update_size(&self) {
        let size = |path: &Path| std::fs::metadata(path).map_or(0, |meta| meta.len());
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let bytes = size(&self.path) + size(Path::new(&wal));
        self.metrics.bytes.set(bytes as f64);
    }
}

/// Opens the file with the settings every blufio connection uses.
fn open_connection(path: &Path, max_bytes: u64) -> Result<Connection, Unusable> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags(path, flags).map_err(|error| Unusable::from_sqlite(&error))?;
    configure(&conn, max_bytes).map_err(|error| Unusable::from_sqlite(&error))?;
    Ok(conn)
}

fn configure(conn: &Connection, max_bytes: u64) -> rusqlite::Result<()> {
    // Lets the cap give pages back to the filesystem. Set on a new file only: the pragma
    // writes the header of an existing one, and a file that start-up then refuses (a newer
    // schema, damage) must be left exactly as it was found.
    let pages: u64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
    if pages == 0 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!("the session store runs in journal mode {mode}, not WAL");
    }
    // FULL: in WAL mode a commit is synced before it returns, so it survives a power cut.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Pages cached: 512 KiB, not SQLite's 2 MiB; on a Pi the page cache is resident memory.
    conn.pragma_update(None, "cache_size", -512)?;
    // The WAL is truncated back to 4 MiB after a checkpoint instead of keeping its peak.
    conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if max_bytes > 0 {
        let page_size: u64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
        conn.pragma_update(
            None,
            "max_page_count",
            (max_bytes / page_size.max(512)).max(16),
        )?;
    }
    Ok(())
}

/// Checks the store in `dir` for `blufio config check`: that it opens, has a schema this
/// build can use, and passes SQLite's page-by-page check. Never writes (a running daemon
/// may hold it). Returns a line saying what was found.
///
/// # Errors
///
/// Returns [`Error::State`] naming the file and what to do.
pub fn check(dir: &Path) -> Result<String, Error> {
    let path = dir.join(DB_FILE);
    if !path.exists() {
        return Ok(format!(
            "store: {} not created yet (created at start)",
            path.display()
        ));
    }
    let unusable = |why: Unusable| Error::State {
        path: path.clone(),
        message: why.explain(),
    };
    let (conn, version) = ReadOnly::open_known(&path).map_err(unusable)?;
    schema::quick_check(&conn).map_err(unusable)?;
    let sessions: i64 = if version >= 1 {
        conn.query_row("SELECT count(*) FROM sessions", [], |row| row.get(0))
            .map_err(|error| unusable(Unusable::from_sqlite(&error)))?
    } else {
        0
    };
    Ok(format!(
        "store: {} ok (schema {version}, {sessions} sessions, every page checked)",
        path.display()
    ))
}

/// Returns whether the store in `dir` has imported `spend.json` (false without a store):
/// until it has, the next start reads that file, so `blufio config check` checks it too.
pub fn spend_imported(dir: &Path) -> bool {
    let path = dir.join(DB_FILE);
    path.exists()
        && ReadOnly::open_connection(&path)
            .ok()
            .and_then(|conn| read::meta(&conn, worker::SPEND_IMPORTED).ok().flatten())
            .is_some()
}

/// Returns seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

#[cfg(test)]
mod tests;
