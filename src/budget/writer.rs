//! The spend writer: a thread of the budget's own that saves the latest total and retries
//! failed writes.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use super::state::{Day, write_state};
use crate::{error::Error, metrics::ErrorCounter, sync::lock};

/// How often the spend writer retries a failed write while no reply asks it to.
pub const WRITE_RETRY: Duration = Duration::from_secs(5);

/// The spend writer: a thread of the budget's own that saves the latest total, so no disk
/// write (or its `fsync`) ever runs on the daemon's executor.
#[derive(Debug)]
pub(super) struct Writer {
    pub(super) state: Mutex<WriterState>,
    pub(super) wake: Condvar,
}

#[derive(Debug, Default)]
pub(super) struct WriterState {
    /// The latest total not yet saved.
    pub(super) pending: Option<Day>,
    /// A write is under way.
    pub(super) writing: bool,
    /// While writes fail: no attempt before this instant unless a new total arrives.
    pub(super) retry_at: Option<Instant>,
    /// Why the last write failed, while they fail.
    pub(super) failing: Option<String>,
    /// Failed writes so far.
    pub(super) failures: u64,
    /// The budget is gone: write what is pending once, then end.
    pub(super) closed: bool,
}

impl Writer {
    pub(super) fn start(path: PathBuf, errors: ErrorCounter) -> Result<Arc<Writer>, Error> {
        let writer = Arc::new(Writer {
            state: Mutex::new(WriterState::default()),
            wake: Condvar::new(),
        });
        let shared = Arc::clone(&writer);
        std::thread::Builder::new()
            .name("blufio-spend".to_owned())
            .spawn(move || shared.run(&path, &errors))
            .map_err(|source| Error::Io {
                context: "cannot start the spend writer thread".to_owned(),
                source,
            })?;
        Ok(writer)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        lock(&self.state)
    }

    pub(super) fn submit(&self, day: Day) {
        let mut state = self.lock();
        state.pending = Some(day);
        // A new reply is a new chance: a failing disk is tried again at once.
        state.retry_at = None;
        self.wake.notify_all();
    }

    pub(super) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    fn run(&self, path: &Path, errors: &ErrorCounter) {
        loop {
            let day = {
                let mut state = self.lock();
                loop {
                    let now = Instant::now();
                    match (state.pending, state.retry_at) {
                        (Some(_), None) => break,
                        (Some(_), Some(at)) if at <= now || state.closed => break,
                        (Some(_), Some(at)) => {
                            state = self
                                .wake
                                .wait_timeout(state, at - now)
                                .map_or_else(|poisoned| poisoned.into_inner().0, |(s, _)| s);
                        }
                        (None, _) if state.closed => return,
                        (None, _) => {
                            state = self
                                .wake
                                .wait(state)
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                        }
                    }
                }
                state.writing = true;
                state.pending.take()
            };
            let Some(day) = day else { continue };
            let result = write_state(path, day);
            let mut state = self.lock();
            state.writing = false;
            match result {
                Ok(()) => {
                    state.retry_at = None;
                    if let Some(error) = state.failing.take() {
                        log::info!(
                            "today's spend is saved to {} again (the last failure: {error})",
                            path.display()
                        );
                    }
                }
                Err(error) => {
                    errors.increment();
                    state.failures += 1;
                    // A newer total that arrived meanwhile supersedes this one.
                    if state.pending.is_none() {
                        state.pending = Some(day);
                    }
                    state.retry_at = Some(Instant::now() + WRITE_RETRY);
                    if state.failing.is_none() {
                        log::error!(
                            "cannot save today's spend to {}: {error}; it is counted in memory \
                             and retried every {} s, but a restart now would forget it (is \
                             the state directory read-only or full?)",
                            path.display(),
                            WRITE_RETRY.as_secs()
                        );
                    }
                    state.failing = Some(error.to_string());
                    if state.closed {
                        return;
                    }
                }
            }
            self.wake.notify_all();
        }
    }
}

#[cfg(test)]
mod writer_tests {
    use std::{fs, time::SystemTime};

    use metrics::Gauge;

    use super::*;
    use crate::{
        budget::{Budget, STATE_FILE},
        cost::CostConfig,
    };

    #[test]
    fn a_failed_write_leaves_no_temporary_file_is_reported_and_is_retried() {
        let dir = blufio_testkit::temp::temp_dir("budget-failing");
        let now = SystemTime::now();
        let config = CostConfig::default();
        let budget = Budget::open(
            &config,
            Some(&dir),
            Gauge::noop(),
            ErrorCounter::noop(),
            now,
        )
        .unwrap();
        // A non-empty directory where the state file goes: the rename fails, as root too.
        let blocker = dir.join(STATE_FILE);
        fs::create_dir_all(blocker.join("in-the-way")).unwrap();
        budget.spend("m", 0.5, config.daily_budget_usd, now);
        assert!(!async_io::block_on(budget.settle(Duration::from_secs(10))));
        assert!(!budget.persisted());
        assert!(budget.write_error().is_some());
        assert!(!dir.join("spend.json.tmp").exists(), "temporary file left");
        fs::remove_dir_all(&blocker).unwrap();
        // The pending total is written on a later attempt, without another reply.
        let deadline = Instant::now() + WRITE_RETRY + Duration::from_secs(10);
        while !budget.persisted() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(budget.persisted());
        assert!(async_io::block_on(budget.settle(Duration::from_secs(10))));
        let text = fs::read_to_string(&blocker).unwrap();
        assert!(text.contains("\"spent_usd\":0.5"), "{text}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
