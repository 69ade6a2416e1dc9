//! The database thread: takes jobs from the channel, commits every write that arrived
//! meanwhile in one transaction (group commit: one `fsync` for many messages), and answers
//! each job once its transaction is durable.
//!
//! A batch whose transaction fails is rolled back and each of its jobs is run again on its
//! own, so one bad job (or a disk that filled mid-batch) fails only the jobs it must.

use std::time::Instant;

use rusqlite::{Connection, params};

use super::{
    Shared, StoreError, StoredSession, StoredTurn, read,
    statements::{Sql, Statements},
    turn::{kind_name, role_name},
    unix_now,
};
use crate::agent::Turn;

/// The `meta` key set once `spend.json` has been imported.
pub(super) const SPEND_IMPORTED: &str = "spend_json_imported";

/// Time without a failed write after which a failure episode is over.
const QUIET: std::time::Duration = std::time::Duration::from_secs(10);

/// Jobs committed together at most.
const MAX_BATCH: usize = 256;

type Reply<T> = async_channel::Sender<Result<T, StoreError>>;

/// One request to the database thread (kept small: every queue slot is one).
pub(crate) enum Job {
    Create(Box<StoredSession>, Reply<()>),
    Append {
        id: String,
        create: Option<Box<StoredSession>>,
        turns: Vec<StoredTurn>,
        spend: Option<(u64, f64)>,
        reply: Reply<()>,
    },
    Delete(Vec<String>, Reply<()>),
    Spend {
        utc_day: u64,
        spent_usd: f64,
        reply: Reply<()>,
    },
    MarkSpendImported(Reply<()>),
    History {
        id: String,
        max_messages: u64,
        max_bytes: u64,
        reply: Reply<Vec<Turn>>,
    },
    Page {
        id: String,
        after: Option<u64>,
        limit: usize,
        max_bytes: usize,
        reply: Reply<(Vec<StoredTurn>, bool)>,
    },
    Enforce(Reply<Vec<String>>),
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.op())
    }
}

/// A job and when it was queued (its latency counts the wait).
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) job: Job,
    pub(crate) at: Instant,
}

/// What a job produced, before it is handed to its caller.
enum Output {
    Unit,
    Turns(Vec<Turn>),
    Page(Vec<StoredTurn>, bool),
    Ids(Vec<String>),
}

impl Job {
    /// The `op` label of `blufio_store_operation_seconds`.
    pub(crate) fn op(&self) -> &'static str {
        match self {
            Job::Create(..) => "create",
            Job::Append { .. } => "append",
            Job::Delete(..) => "delete",
            Job::Spend { .. } | Job::MarkSpendImported(_) => "spend",
            Job::History { .. } => "history",
            Job::Page { .. } => "page",
            Job::Enforce(_) => "enforce",
        }
    }

    fn writes(&self) -> bool {
        !matches!(self, Job::History { .. } | Job::Page { .. })
    }

    fn execute(
        &self,
        statements: &mut Statements<'_>,
        shared: &Shared,
    ) -> rusqlite::Result<Output> {
        let conn = statements.conn();
        match self {
            Job::Create(session, _) => {
                create(statements, session)?;
                Ok(Output::Unit)
            }
            Job::Append {
                id,
                create: session,
                turns,
                spend,
                ..
            } => {
                if let Some(session) = session {
                    create(statements, session)?;
                }
                append(statements, id, turns)?;
                if let Some((utc_day, spent_usd)) = spend {
                    save_spend(statements, *utc_day, *spent_usd)?;
                }
                Ok(Output::Unit)
            }
            Job::Delete(ids, _) => {
                let mut statement = conn.prepare("DELETE FROM sessions WHERE id = ?1")?;
                for id in ids {
                    statement.execute([id])?;
                }
                Ok(Output::Unit)
            }
            Job::Spend {
                utc_day, spent_usd, ..
            } => {
                save_spend(statements, *utc_day, *spent_usd)?;
                Ok(Output::Unit)
            }
            Job::MarkSpendImported(_) => {
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                    params![SPEND_IMPORTED, unix_now().to_string()],
                )?;
                Ok(Output::Unit)
            }
            Job::History {
                id,
                max_messages,
                max_bytes,
                ..
            } => read::history(conn, id, *max_messages, *max_bytes).map(Output::Turns),
            Job::Page {
                id,
                after,
                limit,
                max_bytes,
                ..
            } => read::page(conn, id, *after, *limit, *max_bytes)
                .map(|(turns, more)| Output::Page(turns, more)),
            Job::Enforce(_) => enforce(conn, shared.max_bytes).map(Output::Ids),
        }
    }

    fn deliver(self, result: Result<Output, StoreError>) {
        // A caller that went away (its client disconnected) no longer needs the answer.
        match self {
            Job::Create(_, reply)
            | Job::Append { reply, .. }
            | Job::Delete(_, reply)
            | Job::Spend { reply, .. }
            | Job::MarkSpendImported(reply) => {
                let _ = reply.try_send(result.map(|_| ()));
            }
            Job::History { reply, .. } => {
                let _ = reply.try_send(result.map(|output| match output {
                    Output::Turns(turns) => turns,
                    _ => Vec::new(),
                }));
            }
            Job::Page { reply, .. } => {
                let _ = reply.try_send(result.map(|output| match output {
                    Output::Page(turns, more) => (turns, more),
                    _ => (Vec::new(), false),
                }));
            }
            Job::Enforce(reply) => {
                let _ = reply.try_send(result.map(|output| match output {
                    Output::Ids(ids) => ids,
                    _ => Vec::new(),
                }));
            }
        }
    }
}

/// Stores a session (once: a second insert of the same id changes nothing). Its message
/// count starts at 0 whatever the record says: appends count the turns they store.
fn create(statements: &mut Statements<'_>, session: &StoredSession) -> rusqlite::Result<()> {
    statements.get(Sql::CreateSession)?.execute(params![
        session.id,
        kind_name(session.kind),
        session.model,
        session.system,
        session.created_at,
        session.last_active_at,
    ])?;
    Ok(())
}

/// Appends turns after the session's last, and marks it active.
fn append(statements: &mut Statements<'_>, id: &str, turns: &[StoredTurn]) -> rusqlite::Result<()> {
    let last_active_at = turns.iter().map(|turn| turn.created_at).max();
    let first_seq: Option<u64> = {
        let statement = statements.get(Sql::CountTurns)?;
        let mut rows = statement.query(params![id, turns.len() as u64, last_active_at])?;
        match rows.next()? {
            Some(row) => Some(row.get(0)?),
            None => None,
        }
    };
    // No row: the session was deleted while its message was answered.
    let Some(first_seq) = first_seq else {
        return Ok(());
    };
    let insert = statements.get(Sql::InsertTurn)?;
    for (offset, turn) in turns.iter().enumerate() {
        insert.execute(params![
            id,
            first_seq + offset as u64,
            role_name(turn.role),
            turn.content,
            turn.created_at,
            turn.model,
            turn.input_tokens,
            turn.output_tokens,
            turn.cost_usd,
        ])?;
    }
    Ok(())
}

fn save_spend(
    statements: &mut Statements<'_>,
    utc_day: u64,
    spent_usd: f64,
) -> rusqlite::Result<()> {
    statements
        .get(Sql::SaveSpend)?
        .execute(params![utc_day, spent_usd])?;
    Ok(())
}

/// Removes sessions idle since before `cutoff` (and WebSocket sessions, whose connections
/// ended with the process that held them); returns how many went.
pub(super) fn expire(conn: &Connection, cutoff: u64) -> rusqlite::Result<u64> {
    let removed = conn.execute(
        "DELETE FROM sessions WHERE kind = 'websocket' OR last_active_at < ?1",
        [cutoff],
    )?;
    Ok(removed as u64)
}

/// Bytes the database's pages hold (free pages left out).
fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: u64 = conn.query_row("PRAGMA page_count", [], |row| row.get(0))?;
    let free: u64 = conn.query_row("PRAGMA freelist_count", [], |row| row.get(0))?;
    let size: u64 = conn.query_row("PRAGMA page_size", [], |row| row.get(0))?;
    Ok(pages.saturating_sub(free) * size)
}

/// Removes the longest-idle sessions until the pages in use are under 90 % of `max_bytes`.
fn enforce(conn: &Connection, max_bytes: u64) -> rusqlite::Result<Vec<String>> {
    let target = max_bytes / 10 * 9;
    let mut removed = Vec::new();
    while used_bytes(conn)? > target {
        let ids: Vec<String> = {
            let mut statement = conn
                .prepare("SELECT id FROM sessions ORDER BY last_active_at, created_at LIMIT 16")?;
            statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?
        };
        if ids.is_empty() {
            break;
        }
        let mut delete = conn.prepare("DELETE FROM sessions WHERE id = ?1")?;
        for id in ids {
            delete.execute([&id])?;
            removed.push(id);
            if used_bytes(conn)? <= target {
                break;
            }
        }
    }
    if !removed.is_empty() {
        // Gives the freed pages back to the filesystem (auto_vacuum is incremental).
        conn.execute_batch("PRAGMA incremental_vacuum")?;
    }
    Ok(removed)
}

/// The thread's loop: until the channel closes and is drained, then the database closes.
pub(super) fn run(conn: Connection, queue: &async_channel::Receiver<Queued>, shared: &Shared) {
    {
        let mut statements = Statements::new(&conn);
        while let Ok(first) = queue.recv_blocking() {
            let mut batch = vec![first];
            take_queued(queue, &mut batch);
            run_batch(&mut statements, batch, shared);
        }
        // The statements go before the connection closes, or it could not.
    }
    if let Err((_, error)) = conn.close() {
        log::warn!("closing the session store: {error}");
    }
    shared
        .done
        .store(true, std::sync::atomic::Ordering::Release);
    shared.closed.notify(usize::MAX);
}

/// Moves jobs from the queue into `batch` while there are any, up to [`MAX_BATCH`].
fn take_queued(queue: &async_channel::Receiver<Queued>, batch: &mut Vec<Queued>) {
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(queued) => batch.push(queued),
            Err(_) => break,
        }
    }
}

/// Runs a batch and answers its jobs; returns how many of them were writes.
fn run_batch(statements: &mut Statements<'_>, batch: Vec<Queued>, shared: &Shared) -> usize {
    let conn = statements.conn();
    let writes = batch.iter().filter(|queued| queued.job.writes()).count();
    if writes == 0 {
        for queued in batch {
            let result = queued.job.execute(statements, shared);
            finish(
                queued,
                result.map_err(|error| shared.failed(&error)),
                shared,
            );
        }
        return 0;
    }
    let together = conn.execute_batch("BEGIN IMMEDIATE").and_then(|()| {
        let mut outputs = Vec::with_capacity(batch.len());
        for queued in &batch {
            outputs.push(queued.job.execute(statements, shared)?);
        }
        conn.execute_batch("COMMIT")?;
        Ok(outputs)
    });
    match together {
        Ok(outputs) => {
            shared.commit();
            shared.metrics.writes.increment(writes as u64);
            shared.succeeded();
            for (queued, output) in batch.into_iter().zip(outputs) {
                finish(queued, Ok(output), shared);
            }
        }
        Err(_) => {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            // One at a time, each in its own transaction: only the jobs that fail alone fail.
            for queued in batch {
                let writes = queued.job.writes();
                let result = if writes {
                    alone(statements, &queued.job, shared)
                } else {
                    queued.job.execute(statements, shared)
                };
                let result = match result {
                    Ok(output) => {
                        if writes {
                            shared.commit();
                            shared.metrics.writes.increment(1);
                            shared.succeeded();
                        }
                        Ok(output)
                    }
                    Err(error) => Err(shared.failed(&error)),
                };
                finish(queued, result, shared);
            }
        }
    }
    shared.update_size();
    writes
}

/// Runs one write job in a transaction of its own.
fn alone(statements: &mut Statements<'_>, job: &Job, shared: &Shared) -> rusqlite::Result<Output> {
    let conn = statements.conn();
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let result = job
        .execute(statements, shared)
        .and_then(|output| conn.execute_batch("COMMIT").map(|()| output));
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn finish(queued: Queued, result: Result<Output, StoreError>, shared: &Shared) {
    shared
        .metrics
        .latency(queued.job.op())
        .record(queued.at.elapsed().as_secs_f64());
    queued.job.deliver(result);
}

impl Shared {
    fn commit(&self) {
        self.metrics.commits.increment(1);
        self.commit_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records a failed operation (a write, or a read of a damaged page): counted, and
    /// logged once per episode; `/v1/health` shows it until a write succeeds.
    fn failed(&self, error: &rusqlite::Error) -> StoreError {
        let detail = error.to_string();
        self.errors.increment();
        let mut episode = crate::sync::lock(&self.episode);
        if episode.is_none() {
            log::error!(
                "the session store {} failed: {detail}; messages fail with \
                 storage_unavailable until a write succeeds (a full disk, a read-only \
                 directory, or a damaged file: `blufio config check` checks every page)",
                self.path.display()
            );
        }
        *episode = Some(Instant::now());
        *crate::sync::lock(&self.failing) = Some(detail.clone());
        StoreError { detail }
    }

    /// Records a successful write: `/v1/health` is ok again at once; the episode ends (one
    /// INFO line) only after [`QUIET`] without a failure, so a store at its cap, where small
    /// writes pass and large ones fail in turn, logs one episode and not one per message.
    fn succeeded(&self) {
        let error = crate::sync::lock(&self.failing).take();
        let mut episode = crate::sync::lock(&self.episode);
        if episode.is_some_and(|last| last.elapsed() >= QUIET) {
            *episode = None;
            log::info!(
                "the session store {} is written again{}",
                self.path.display(),
                error.map_or_else(String::new, |error| format!(" (the last failure: {error})"))
            );
        }
    }
}
