//! The spend state file: the UTC day, its format, reading it at start-up (and for
//! `check-config`), and replacing it atomically.

use std::{
    fs,
    io::{self, Write as _},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{Value, json};

use crate::error::Error;

/// The state file's name inside `[daemon] state_dir`.
pub const STATE_FILE: &str = "spend.json";

pub(super) const SECONDS_PER_DAY: u64 = 86_400;
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Day {
    /// Days since the Unix epoch (UTC).
    pub(super) index: u64,
    pub(super) spent_usd: f64,
}

pub(super) fn day_index(now: SystemTime) -> u64 {
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

pub(super) fn render_state(day: Day) -> String {
    let value: Value = json!({
        "version": 1,
        "utc_day": day.index,
        "spent_usd": day.spent_usd,
    });
    format!("{value}\n")
}

pub(super) fn parse_state(text: &str) -> Result<Day, String> {
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
pub(super) fn read_state(path: &Path) -> Result<Option<Day>, Error> {
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

/// Replaces `path` atomically: temporary file, sync, rename, sync of the directory. A
/// failure leaves no temporary file behind.
pub(super) fn write_state(path: &Path, day: Day) -> io::Result<()> {
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
