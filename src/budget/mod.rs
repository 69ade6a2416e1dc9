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

mod state;
mod writer;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use metrics::Gauge;

pub use state::{STATE_FILE, check_state_dir, until_midnight};
pub use writer::WRITE_RETRY;

/// Returns the UTC day of `now`, in days since the Unix epoch.
pub fn utc_day(now: SystemTime) -> u64 {
    day_index(now)
}

use crate::{cost::CostConfig, error::Error, metrics::ErrorCounter, sync::lock};
use state::{Day, day_index, read_state};
use writer::Writer;

/// The spend the session store holds, for [`Budget::open_with`].
#[derive(Debug, Clone, Copy)]
pub struct StoredSpend<'a> {
    /// The store the spend is kept in.
    pub store: &'a crate::store::Store,
    /// Today's total as stored, if any.
    pub today: Option<f64>,
    /// Whether `spend.json` was imported on an earlier start.
    pub imported: bool,
}

/// Distinct models tracked in `blufio_cost_usd_total`; later ones share `model="other"`.
const MAX_MODEL_LABELS: usize = 16;

/// Today's spend against the daily limit, which callers pass in from the live settings
/// (`Live::daily_budget_usd`, 0: no limit), so a reload changes it in one place.
#[derive(Debug)]
pub struct Budget {
    path: Option<PathBuf>,
    day: Mutex<Day>,
    lifetime_by_model: Mutex<BTreeMap<String, f64>>,
    remaining_gauge: Gauge,
    writer: Option<Arc<Writer>>,
    /// With a session store, the spend is saved there instead (no writer thread): each
    /// total is queued to the store's thread, and each message's commit carries it too.
    store: Option<crate::store::Store>,
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
        Budget::open_with(config, state_dir, None, remaining_gauge, state_errors, now)
    }

    /// Like [`Budget::open`], keeping the spend in the session `store` instead of
    /// `spend.json` when one is given. The first start with a store imports today's total
    /// from `spend.json` (then leaves the file alone, never reading it again).
    ///
    /// # Errors
    ///
    /// As [`Budget::open`]; the store's own errors are [`Error::State`] too.
    pub fn open_with(
        config: &CostConfig,
        state_dir: Option<&Path>,
        store: Option<StoredSpend<'_>>,
        remaining_gauge: Gauge,
        state_errors: ErrorCounter,
        now: SystemTime,
    ) -> Result<Budget, Error> {
        if let (Some(store), Some(dir)) = (store, state_dir) {
            return Budget::open_in_store(config, dir, store, remaining_gauge, state_errors, now);
        }
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
            store: None,
        };
        budget.refresh(config.daily_budget_usd, now);
        Ok(budget)
    }

    // Without the `store` feature a `Store` has no value, so the body cannot run.
    #[cfg_attr(
        not(feature = "store"),
        allow(
            unreachable_code,
            unused_variables,
            unused_assignments,
            clippy::needless_pass_by_value
        )
    )]
    fn open_in_store(
        config: &CostConfig,
        dir: &Path,
        stored: StoredSpend<'_>,
        remaining_gauge: Gauge,
        state_errors: ErrorCounter,
        now: SystemTime,
    ) -> Result<Budget, Error> {
        let today = day_index(now);
        let mut day = Day {
            index: today,
            spent_usd: stored.today.unwrap_or(0.0),
        };
        let store_error = |error: crate::store::StoreError| Error::State {
            path: stored.store.path().to_owned(),
            message: format!("cannot import spend.json: {}", error.detail),
        };
        if !stored.imported {
            let file = dir.join(STATE_FILE);
            if let Some(old) = read_state(&file)? {
                if old.index == today && old.spent_usd > day.spent_usd {
                    day.spent_usd = old.spent_usd;
                }
                stored
                    .store
                    .save_spend_blocking(old.index, old.spent_usd)
                    .map_err(store_error)?;
                log::info!(
                    "imported the spend of {} into {}; {STATE_FILE} is no longer read",
                    file.display(),
                    stored.store.path().display()
                );
            }
            stored
                .store
                .mark_spend_imported_blocking()
                .map_err(store_error)?;
        }
        // Counted by the store, as `blufio_errors_total{type="storage"}`.
        drop(state_errors);
        let budget = Budget {
            path: Some(stored.store.path().to_owned()),
            day: Mutex::new(day),
            lifetime_by_model: Mutex::new(BTreeMap::new()),
            remaining_gauge,
            writer: None,
            store: Some(stored.store.clone()),
        };
        budget.refresh(config.daily_budget_usd, now);
        Ok(budget)
    }

    /// Returns today's total and its UTC day (days since the epoch), for a store write.
    pub fn today_total(&self, now: SystemTime) -> (u64, f64) {
        let day = self.today(now);
        (day.index, day.spent_usd)
    }

    /// Returns where the spend is saved (the state file or the store), if it is.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Returns true when today's spend is safely in the state file: a state directory is
    /// set and the last write did not fail (a write may be under way).
    pub fn persisted(&self) -> bool {
        if let Some(store) = &self.store {
            return store.failing().is_none();
        }
        self.writer
            .as_ref()
            .is_some_and(|writer| writer.lock().failing.is_none())
    }

    /// Returns why the last write of the state file failed, while it keeps failing.
    pub fn write_error(&self) -> Option<String> {
        if let Some(store) = &self.store {
            return store.failing();
        }
        self.writer
            .as_ref()
            .and_then(|writer| writer.lock().failing.clone())
    }

    /// Waits (without blocking a thread) until the spend writer has nothing left to write,
    /// or `timeout` passes; returns true when everything is written. While writes fail, one
    /// more is tried at once and its failure ends the wait. Called at shutdown so the last
    /// reply's spend is on disk before the process exits.
    pub async fn settle(&self, timeout: Duration) -> bool {
        if let Some(store) = &self.store {
            let day = self.today(SystemTime::now());
            let saved = store.save_spend(day.index, day.spent_usd);
            return futures_lite::FutureExt::or(async { saved.await.is_ok() }, async {
                async_io::Timer::after(timeout).await;
                false
            })
            .await;
        }
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
            if let Some(store) = &self.store
                && usd > 0.0
            {
                store.submit_spend(day.index, day.spent_usd);
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

impl Drop for Budget {
    fn drop(&mut self) {
        if let Some(writer) = &self.writer {
            writer.close();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::{state::SECONDS_PER_DAY, *};

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
