//! The daily budget: today's spend (UTC day), whether another call may be made, and the state
//! file that carries the spend across restarts.
//!
//! The state file (`<state_dir>/spend.json`) is replaced atomically: a temporary file is
//! written and synced, renamed over the old one, and the directory is synced, so a crash or a
//! power cut leaves either the old or the new file, never a torn one. The writing happens on
//! a thread of the budget's own (the spend writer), never on the daemon's executor: `spend`
//! only updates memory and wakes the writer, which coalesces what piled up meanwhile. A write
//! that fails (a read-only or full disk) removes its temporary file, is reported once per
//! episode (an ERROR, `blufio_errors_total{type="state_write"}`, `persisted: false` in
//! `/v1/health`) and is retried with the next reply and every few seconds until it succeeds.
//!
//! A file that exists but cannot be read or parsed stops the daemon from starting:
//! resetting it to zero would hand out a second day's budget, and an operator must look at
//! it. It is read like every other file (`small_file::read_capped`): a regular file of at most
//! 1 MiB. Metrics only mirror this state: `blufio_budget_remaining_usd` is set from here, and
//! `blufio_cost_usd_total{model}` (a float counter the `metrics` types cannot hold) is
//! rendered from here.

use crate::sync::lock;
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use metrics::Gauge;
use serde_json::{Value, json};

use crate::{cost::CostConfig, error::Error, metrics::ErrorCounter};

/// The state file's name inside `[daemon] state_dir`.
pub const STATE_FILE: &str = "spend.json";

/// How often the spend writer retries a failed write while no reply asks it to.
pub const WRITE_RETRY: Duration = Duration::from_secs(5);

/// Distinct models tracked in `blufio_cost_usd_total`; later ones share `model="other"`.
const MAX_MODEL_LABELS: usize = 16;

const SECONDS_PER_DAY: u64 = 86_400;

/// Today's spend against the daily limit, which callers pass in from the live settings
/// (`Live::daily_budget_usd`, 0: no limit), so a reload changes it in one place.
#[derive(Debug)]
pub struct Budget {
    path: Option<PathBuf>,
    day: Mutex<Day>,
    lifetime_by_model: Mutex<BTreeMap<String, f64>>,
    remaining_gauge: Gauge,
    writer: Option<Arc<Writer>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Day {
    /// Days since the Unix epoch (UTC).
    index: u64,
    spent_usd: f64,
}

/// The budget is spent until the next UTC midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    /// Time until the next UTC midnight.
    pub retry_after: Duration,
}

impl Budget {
    /// Opens the budget: reads today's spend from `<state_dir>/spend.json` when a state
    /// directory is set (a missing file means nothing spent yet) and starts the thread that
    /// writes it. `state_errors` counts failed writes.
    ///
    /// # Errors
    ///
    /// Returns [`Error::State`] when the file exists but cannot be read or parsed, or the
    /// directory cannot be created, and [`Error::Io`] when the writer thread cannot start.
    pub fn open(
        config: &CostConfig,
        state_dir: Option<&Path>,
        remaining_gauge: Gauge,
        state_errors: ErrorCounter,
        now: SystemTime,
    ) -> Result<Budget, Error> {
        let today = day_index(now);
        let path = state_dir.map(|dir| dir.join(STATE_FILE));
        let mut day = Day {
            index: today,
            spent_usd: 0.0,
        };
        if let Some(dir) = state_dir {
            fs::create_dir_all(dir).map_err(|error| Error::State {
                path: dir.to_owned(),
                message: format!("cannot create the state directory: {error}"),
            })?;
        }
        if let Some(path) = &path
            && let Some(stored) = read_state(path)?
            && stored.index == today
        {
            day = stored;
        }
        let writer = match &path {
            Some(path) => Some(Writer::start(path.clone(), state_errors)?),
            None => None,
        };
        let budget = Budget {
            path,
            day: Mutex::new(day),
            lifetime_by_model: Mutex::new(BTreeMap::new()),
            remaining_gauge,
            writer,
        };
        budget.refresh(config.daily_budget_usd, now);
        Ok(budget)
    }

    /// Returns the state file, if spend is persisted.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Returns true when today's spend is safely in the state file: a state directory is
    /// set and the last write did not fail (a write may be under way).
    pub fn persisted(&self) -> bool {
        self.writer
            .as_ref()
            .is_some_and(|writer| writer.lock().failing.is_none())
    }

    /// Returns why the last write of the state file failed, while it keeps failing.
    pub fn write_error(&self) -> Option<String> {
        self.writer
            .as_ref()
            .and_then(|writer| writer.lock().failing.clone())
    }

    /// Waits (without blocking a thread) until the spend writer has nothing left to write,
    /// or `timeout` passes; returns true when everything is written. While writes fail, one
    /// more is tried at once and its failure ends the wait. Called at shutdown so the last
    /// reply's spend is on disk before the process exits.
    pub async fn settle(&self, timeout: Duration) -> bool {
        let Some(writer) = &self.writer else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        let failures_before = {
            let mut state = writer.lock();
            state.retry_at = None;
            writer.wake.notify_all();
            state.failures
        };
        loop {
            {
                let state = writer.lock();
                if state.pending.is_none() && !state.writing {
                    return true;
                }
                if state.failures > failures_before && !state.writing {
                    return false;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            async_io::Timer::after(Duration::from_millis(5)).await;
        }
    }

    /// Returns what today has spent so far, in US dollars.
    pub fn spent_today_usd(&self, now: SystemTime) -> f64 {
        self.today(now).spent_usd
    }

    /// Returns what is left today of `daily_usd` (infinite without a limit).
    pub fn remaining_usd(&self, daily_usd: f64, now: SystemTime) -> f64 {
        if daily_usd <= 0.0 {
            return f64::INFINITY;
        }
        (daily_usd - self.today(now).spent_usd).max(0.0)
    }

    /// Updates `blufio_budget_remaining_usd` (a new UTC day resets it without any traffic).
    pub fn refresh(&self, daily_usd: f64, now: SystemTime) {
        self.remaining_gauge.set(self.remaining_usd(daily_usd, now));
    }

    /// Returns `Ok` while money is left today of `daily_usd`.
    ///
    /// # Errors
    ///
    /// Returns [`Exhausted`] with the time until the next UTC midnight.
    pub fn check(&self, daily_usd: f64, now: SystemTime) -> Result<(), Exhausted> {
        self.refresh(daily_usd, now);
        if daily_usd > 0.0 && self.today(now).spent_usd >= daily_usd {
            return Err(Exhausted {
                retry_after: until_midnight(now),
            });
        }
        Ok(())
    }

    /// Adds `usd` spent on `model` today and hands the new total to the spend writer; it
    /// never touches the disk itself (a failed write is the writer's to report and retry).
    pub fn spend(&self, model: &str, usd: f64, daily_usd: f64, now: SystemTime) {
        let usd = if usd.is_finite() && usd > 0.0 {
            usd
        } else {
            0.0
        };
        {
            let mut lifetime = lock(&self.lifetime_by_model);
            let label = if lifetime.contains_key(model) || lifetime.len() < MAX_MODEL_LABELS {
                model
            } else {
                "other"
            };
            *lifetime.entry(label.to_owned()).or_insert(0.0) += usd;
        }
        {
            // The writer is handed the total under the day's lock, so the file never goes
            // back in time.
            let mut day = lock(&self.day);
            let today = day_index(now);
            if day.index != today {
                *day = Day {
                    index: today,
                    spent_usd: 0.0,
                };
            }
            day.spent_usd += usd;
            if let Some(writer) = &self.writer
                && usd > 0.0
            {
                writer.submit(*day);
            }
        }
        self.refresh(daily_usd, now);
    }

    /// Registers a model so its cost counter renders as 0 before the first reply.
    pub fn register_model(&self, model: &str) {
        let mut lifetime = lock(&self.lifetime_by_model);
        if lifetime.len() < MAX_MODEL_LABELS {
            lifetime.entry(model.to_owned()).or_insert(0.0);
        }
    }

    /// Renders `blufio_cost_usd_total{model}` (spend since start, by model).
    pub fn render(&self, out: &mut String) {
        let lifetime = lock(&self.lifetime_by_model);
        if lifetime.is_empty() {
            return;
        }
        out.push_str(
            "# HELP blufio_cost_usd_total Money spent on model calls since start, in US \
             dollars, by model.\n# TYPE blufio_cost_usd_total counter\n",
        );
        for (model, usd) in lifetime.iter() {
            // Writing to a String cannot fail.
            let _ = writeln!(
                out,
                "blufio_cost_usd_total{{model=\"{}\"}} {usd}",
                escape_label(model)
            );
        }
        out.push('\n');
    }

    fn today(&self, now: SystemTime) -> Day {
        let day = *lock(&self.day);
        let today = day_index(now);
        if day.index == today {
            day
        } else {
            Day {
                index: today,
                spent_usd: 0.0,
            }
        }
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn day_index(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() / SECONDS_PER_DAY)
}

/// Returns the time until the next UTC midnight (at least one second).
pub fn until_midnight(now: SystemTime) -> Duration {
    let seconds = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    Duration::from_secs((SECONDS_PER_DAY - seconds % SECONDS_PER_DAY).max(1))
}

fn render_state(day: Day) -> String {
    let value: Value = json!({
        "version": 1,
        "utc_day": day.index,
        "spent_usd": day.spent_usd,
    });
    format!("{value}\n")
}

fn parse_state(text: &str) -> Result<Day, String> {
    let value: Value = serde_json::from_str(text)
        .map_err(|error| format!("the spend state is not valid JSON ({error})"))?;
    if value["version"] != 1 {
        return Err("the spend state has an unknown version".to_owned());
    }
    let index = value["utc_day"]
        .as_u64()
        .ok_or("the spend state has no utc_day")?;
    let spent_usd = value["spent_usd"]
        .as_f64()
        .filter(|usd| usd.is_finite() && *usd >= 0.0)
        .ok_or("the spend state has no valid spent_usd")?;
    Ok(Day { index, spent_usd })
}

/// Reads the state file; `None` when there is none yet.
fn read_state(path: &Path) -> Result<Option<Day>, Error> {
    let text = match crate::small_file::read_capped(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(Error::State {
                path: path.to_owned(),
                message: format!(
                    "cannot read the spend state: {error}; refusing to start rather than \
                     forget today's spend (replace it with the regular file blufio wrote, or \
                     delete it to reset the spend to 0)"
                ),
            });
        }
    };
    parse_state(&text)
        .map(Some)
        .map_err(|message| Error::State {
            path: path.to_owned(),
            message: format!(
                "{message}; refusing to start rather than forget today's spend \
                 (fix the file, or delete it to reset the spend to 0)"
            ),
        })
}

/// Checks the state files in `state_dir` as start-up would read them, creating and writing
/// nothing (`blufio check-config`). Returns a line describing what was found.
///
/// # Errors
///
/// Returns [`Error::State`] when start-up would refuse the directory or the spend file.
pub fn check_state_dir(state_dir: &Path, now: SystemTime) -> Result<String, Error> {
    match fs::metadata(state_dir) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(_) => {
            return Err(Error::State {
                path: state_dir.to_owned(),
                message: "[daemon] state_dir is not a directory".to_owned(),
            });
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Ok(format!(
                "state: {} does not exist yet (created at start)",
                state_dir.display()
            ));
        }
        Err(error) => {
            return Err(Error::State {
                path: state_dir.to_owned(),
                message: format!("cannot read the state directory: {error}"),
            });
        }
    }
    let path = state_dir.join(STATE_FILE);
    Ok(match read_state(&path)? {
        Some(day) if day.index == day_index(now) => format!(
            "state: {} ok, ${} spent today",
            path.display(),
            day.spent_usd
        ),
        Some(_) => format!("state: {} ok, nothing spent today", path.display()),
        None => format!("state: {} not written yet", path.display()),
    })
}

/// The spend writer: a thread of the budget's own that saves the latest total, so no disk
/// write (or its `fsync`) ever runs on the daemon's executor.
#[derive(Debug)]
struct Writer {
    state: Mutex<WriterState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct WriterState {
    /// The latest total not yet saved.
    pending: Option<Day>,
    /// A write is under way.
    writing: bool,
    /// While writes fail: no attempt before this instant unless a new total arrives.
    retry_at: Option<Instant>,
    /// Why the last write failed, while they fail.
    failing: Option<String>,
    /// Failed writes so far.
    failures: u64,
    /// The budget is gone: write what is pending once, then end.
    closed: bool,
}

impl Writer {
    fn start(path: PathBuf, errors: ErrorCounter) -> Result<Arc<Writer>, Error> {
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

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        lock(&self.state)
    }

    fn submit(&self, day: Day) {
        let mut state = self.lock();
        state.pending = Some(day);
        // A new reply is a new chance: a failing disk is tried again at once.
        state.retry_at = None;
        self.wake.notify_all();
    }

    fn close(&self) {
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

impl Drop for Budget {
    fn drop(&mut self) {
        if let Some(writer) = &self.writer {
            writer.close();
        }
    }
}

/// Replaces `path` atomically: temporary file, sync, rename, sync of the directory. A
/// failure leaves no temporary file behind.
fn write_state(path: &Path, day: Day) -> io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    // A leftover from a crash (or anything else at that name) goes first; `create_new` then
    // refuses to follow a symlink or to open a FIFO planted there.
    match fs::remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            return Err(io::Error::new(
                error.kind(),
                format!("cannot remove {}: {error}", temporary.display()),
            ));
        }
        _ => {}
    }
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(render_state(day).as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, path));
    if let Err(error) = written {
        let _ = fs::remove_file(&temporary);
        return Err(error);
    }
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauge() -> Gauge {
        Gauge::noop()
    }

    fn config(daily: f64) -> CostConfig {
        CostConfig {
            daily_budget_usd: daily,
            ..CostConfig::default()
        }
    }

    fn temp_dir(name: &str) -> blufio_testkit::temp::TempDir {
        blufio_testkit::temp::temp_dir(&format!("budget-{name}"))
    }

    const NOON: u64 = 20_000 * SECONDS_PER_DAY + 12 * 3600;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn spending_the_limit_exhausts_until_midnight_and_a_new_day_resets() {
        let budget =
            Budget::open(&config(1.0), None, gauge(), ErrorCounter::noop(), at(NOON)).unwrap();
        budget.check(1.0, at(NOON)).unwrap();
        budget.spend("m", 0.6, 1.0, at(NOON));
        budget.check(1.0, at(NOON)).unwrap();
        budget.spend("m", 0.6, 1.0, at(NOON));
        assert_eq!(
            budget.check(1.0, at(NOON)).unwrap_err().retry_after,
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(budget.remaining_usd(1.0, at(NOON)), 0.0);
        budget.check(1.0, at(NOON + 12 * 3600)).unwrap();
        assert_eq!(budget.remaining_usd(1.0, at(NOON + 12 * 3600)), 1.0);
    }

    #[test]
    fn spend_survives_reopening_the_state_dir() {
        let dir = temp_dir("reopen");
        let budget = Budget::open(
            &config(1.0),
            Some(&dir),
            gauge(),
            ErrorCounter::noop(),
            at(NOON),
        )
        .unwrap();
        budget.spend("m", 1.5, 1.0, at(NOON));
        assert!(async_io::block_on(budget.settle(Duration::from_secs(10))));
        assert!(budget.persisted());
        drop(budget);
        let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains("\"spent_usd\":1.5"), "{text}");
        assert!(!dir.join("spend.json.tmp").exists());
        let budget = Budget::open(
            &config(1.0),
            Some(&dir),
            gauge(),
            ErrorCounter::noop(),
            at(NOON + 60),
        )
        .unwrap();
        assert!(budget.check(1.0, at(NOON + 60)).is_err());
        // Yesterday's file means nothing is spent today.
        let budget = Budget::open(
            &config(1.0),
            Some(&dir),
            gauge(),
            ErrorCounter::noop(),
            at(NOON + 86_400),
        )
        .unwrap();
        assert_eq!(budget.spent_today_usd(at(NOON + 86_400)), 0.0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_state_file_refuses_to_open_instead_of_resetting() {
        let dir = temp_dir("corrupt");
        for text in [
            "{\"version\":1,\"utc_day\":20000,\"spent",
            "",
            "{\"version\":2}",
        ] {
            fs::write(dir.join(STATE_FILE), text).unwrap();
            let error = Budget::open(
                &config(1.0),
                Some(&dir),
                gauge(),
                ErrorCounter::noop(),
                at(NOON),
            )
            .unwrap_err();
            assert!(error.is_config());
            let message = error.to_string();
            assert!(message.contains("spend.json"), "{message}");
            assert!(message.contains("refusing to start"), "{message}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cost_counters_render_per_model_with_escaped_labels() {
        let budget =
            Budget::open(&config(0.0), None, gauge(), ErrorCounter::noop(), at(NOON)).unwrap();
        budget.register_model("a\"b");
        budget.spend("claude", 0.25, 0.0, at(NOON));
        let mut out = String::new();
        budget.render(&mut out);
        assert!(
            out.contains("# TYPE blufio_cost_usd_total counter"),
            "{out}"
        );
        assert!(
            out.contains("blufio_cost_usd_total{model=\"claude\"} 0.25"),
            "{out}"
        );
        assert!(
            out.contains("blufio_cost_usd_total{model=\"a\\\"b\"} 0"),
            "{out}"
        );
        assert_eq!(budget.remaining_usd(0.0, at(NOON)), f64::INFINITY);
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;

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
