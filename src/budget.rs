//! The daily budget: today's spend (UTC day), whether another call may be made, and the state
//! file that carries the spend across restarts.
//!
//! The state file (`<state_dir>/spend.json`) is replaced atomically: a temporary file is
//! written and synced, renamed over the old one, and the directory is synced, so a crash or a
//! power cut leaves either the old or the new file, never a torn one. A file that exists but
//! cannot be read or parsed stops the daemon from starting: resetting it to zero would hand
//! out a second day's budget, and an operator must look at it. Metrics only mirror this state:
//! `blufio_budget_remaining_usd` is set from here, and `blufio_cost_usd_total{model}` (a float
//! counter the `metrics` types cannot hold) is rendered from here.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use metrics::Gauge;
use serde_json::{Value, json};

use crate::{cost::CostConfig, error::Error};

/// The state file's name inside `[daemon] state_dir`.
pub const STATE_FILE: &str = "spend.json";

/// Distinct models tracked in `blufio_cost_usd_total`; later ones share `model="other"`.
const MAX_MODEL_LABELS: usize = 16;

const SECONDS_PER_DAY: u64 = 86_400;

/// Today's spend against the daily limit.
#[derive(Debug)]
pub struct Budget {
    daily_usd: f64,
    path: Option<PathBuf>,
    day: Mutex<Day>,
    lifetime_by_model: Mutex<BTreeMap<String, f64>>,
    remaining_gauge: Gauge,
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
    /// directory is set (a missing file means nothing spent yet).
    ///
    /// # Errors
    ///
    /// Returns [`Error::State`] when the file exists but cannot be read or parsed, or the
    /// directory cannot be created.
    pub fn open(
        config: &CostConfig,
        state_dir: Option<&Path>,
        remaining_gauge: Gauge,
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
        if let Some(path) = &path {
            match fs::read_to_string(path) {
                Ok(text) => {
                    let stored = parse_state(&text).map_err(|message| Error::State {
                        path: path.clone(),
                        message: format!(
                            "{message}; refusing to start rather than forget today's spend \
                             (fix the file, or delete it to reset the spend to 0)"
                        ),
                    })?;
                    if stored.index == today {
                        day = stored;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => {
                    return Err(Error::State {
                        path: path.clone(),
                        message: format!("cannot read the spend state: {error}"),
                    });
                }
            }
        }
        let budget = Budget {
            daily_usd: config.daily_budget_usd,
            path,
            day: Mutex::new(day),
            lifetime_by_model: Mutex::new(BTreeMap::new()),
            remaining_gauge,
        };
        budget.refresh(now);
        Ok(budget)
    }

    /// Returns the daily limit in US dollars (0: no limit).
    pub fn daily_usd(&self) -> f64 {
        self.daily_usd
    }

    /// Returns the state file, if spend is persisted.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Returns what today has spent so far, in US dollars.
    pub fn spent_today_usd(&self, now: SystemTime) -> f64 {
        self.today(now).spent_usd
    }

    /// Returns what is left today (infinite without a limit).
    pub fn remaining_usd(&self, now: SystemTime) -> f64 {
        if self.daily_usd <= 0.0 {
            return f64::INFINITY;
        }
        (self.daily_usd - self.today(now).spent_usd).max(0.0)
    }

    /// Updates `blufio_budget_remaining_usd` (a new UTC day resets it without any traffic).
    pub fn refresh(&self, now: SystemTime) {
        self.remaining_gauge.set(self.remaining_usd(now));
    }

    /// Returns `Ok` while money is left today.
    ///
    /// # Errors
    ///
    /// Returns [`Exhausted`] with the time until the next UTC midnight.
    pub fn check(&self, now: SystemTime) -> Result<(), Exhausted> {
        self.refresh(now);
        if self.daily_usd > 0.0 && self.today(now).spent_usd >= self.daily_usd {
            return Err(Exhausted {
                retry_after: until_midnight(now),
            });
        }
        Ok(())
    }

    /// Adds `usd` spent on `model` today and persists the new total.
    ///
    /// # Errors
    ///
    /// Returns the I/O error when the state file cannot be written; the spend is counted in
    /// memory all the same.
    pub fn spend(&self, model: &str, usd: f64, now: SystemTime) -> io::Result<()> {
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
        let result = {
            // The lock is held while writing so two replies never race on the temporary file
            // and the file never goes back in time.
            let mut day = lock(&self.day);
            let today = day_index(now);
            if day.index != today {
                *day = Day {
                    index: today,
                    spent_usd: 0.0,
                };
            }
            day.spent_usd += usd;
            match &self.path {
                Some(path) if usd > 0.0 => write_state(path, *day),
                _ => Ok(()),
            }
        };
        self.refresh(now);
        result
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
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

/// Replaces `path` atomically: temporary file, sync, rename, sync of the directory.
fn write_state(path: &Path, day: Day) -> io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    let mut file = fs::File::create(&temporary)?;
    file.write_all(render_state(day).as_bytes())?;
    file.sync_all()?;
    drop(file);
    fs::rename(&temporary, path)?;
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

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "blufio-budget-{name}-{}-{:?}",
            std::process::id(),
            SystemTime::now()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    const NOON: u64 = 20_000 * SECONDS_PER_DAY + 12 * 3600;

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn spending_the_limit_exhausts_until_midnight_and_a_new_day_resets() {
        let budget = Budget::open(&config(1.0), None, gauge(), at(NOON)).unwrap();
        budget.check(at(NOON)).unwrap();
        budget.spend("m", 0.6, at(NOON)).unwrap();
        budget.check(at(NOON)).unwrap();
        budget.spend("m", 0.6, at(NOON)).unwrap();
        assert_eq!(
            budget.check(at(NOON)).unwrap_err().retry_after,
            Duration::from_secs(12 * 3600)
        );
        assert_eq!(budget.remaining_usd(at(NOON)), 0.0);
        budget.check(at(NOON + 12 * 3600)).unwrap();
        assert_eq!(budget.remaining_usd(at(NOON + 12 * 3600)), 1.0);
    }

    #[test]
    fn spend_survives_reopening_the_state_dir() {
        let dir = temp_dir("reopen");
        let budget = Budget::open(&config(1.0), Some(&dir), gauge(), at(NOON)).unwrap();
        budget.spend("m", 1.5, at(NOON)).unwrap();
        drop(budget);
        let text = fs::read_to_string(dir.join(STATE_FILE)).unwrap();
        assert!(text.contains("\"spent_usd\":1.5"), "{text}");
        assert!(!dir.join("spend.json.tmp").exists());
        let budget = Budget::open(&config(1.0), Some(&dir), gauge(), at(NOON + 60)).unwrap();
        assert!(budget.check(at(NOON + 60)).is_err());
        // Yesterday's file means nothing is spent today.
        let budget = Budget::open(&config(1.0), Some(&dir), gauge(), at(NOON + 86_400)).unwrap();
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
            let error = Budget::open(&config(1.0), Some(&dir), gauge(), at(NOON)).unwrap_err();
            assert!(error.is_config());
            let message = error.to_string();
            assert!(message.contains("spend.json"), "{message}");
            assert!(message.contains("refusing to start"), "{message}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cost_counters_render_per_model_with_escaped_labels() {
        let budget = Budget::open(&config(0.0), None, gauge(), at(NOON)).unwrap();
        budget.register_model("a\"b");
        budget.spend("claude", 0.25, at(NOON)).unwrap();
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
        assert_eq!(budget.remaining_usd(at(NOON)), f64::INFINITY);
    }
}
