//! The state directory's lock: one daemon per `[daemon] state_dir`, for the life of the
//! process.
//!
//! Two daemons sharing a state directory would overwrite each other's spend without a word
//! (the README's `/var/lib/blufio` is the natural setting for both). The first takes an
//! exclusive `flock` on `<state_dir>/blufio.lock` and writes its pid there; a second, in
//! another process or in the same one, is refused with the directory and that pid. The lock
//! is the kernel's, so it goes away with the process however it ends, and a stale lock file
//! left by a crash locks nothing. It does not protect the directory from other programs.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    sync::Mutex,
};

use crate::error::Error;

/// The lock file's name inside `[daemon] state_dir`.
pub const LOCK_FILE: &str = "blufio.lock";

/// Longest pid line read back from a lock file held by someone else.
const MAX_PID_BYTES: u64 = 32;

/// What [`StateLock::try_acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// The directory is ours until the lock is released.
    Locked(StateLock),
    /// Another process (or another daemon in this one) holds it.
    Held {
        /// The holder's pid, as it wrote it into the lock file.
        pid: Option<u32>,
    },
}

/// An exclusive hold on a state directory; released by [`StateLock::release`] or on drop.
#[derive(Debug)]
pub struct StateLock {
    dir: PathBuf,
    file: Mutex<Option<File>>,
}

impl StateLock {
    /// Creates `dir` if needed and locks it for this daemon.
    ///
    /// # Errors
    ///
    /// Returns [`Error::State`] naming the directory, and the pid that holds it when another
    /// daemon does, or what failed otherwise.
    pub fn acquire(dir: &Path) -> Result<StateLock, Error> {
        match StateLock::try_acquire(dir)? {
            Acquired::Locked(lock) => Ok(lock),
            Acquired::Held { pid } => {
                let holder = match pid {
                    Some(pid) if pid == std::process::id() => {
                        format!("another daemon in this process (pid {pid})")
                    }
                    Some(pid) => format!("another blufio (pid {pid})"),
                    None => "another blufio".to_owned(),
                };
                Err(Error::State {
                    path: dir.to_owned(),
                    message: format!(
                        "the state directory is in use by {holder}, which holds {LOCK_FILE}; \
                         two daemons sharing it would overwrite each other's spend: give each \
                         its own [daemon] state_dir"
                    ),
                })
            }
        }
    }

    /// Creates `dir` if needed and locks it, or says who holds it: for a caller that
    /// explains the refusal in its own terms (`blufio sessions delete`).
    ///
    /// # Errors
    ///
    /// Returns [`Error::State`] naming the directory when it cannot be created, or the lock
    /// file opened or locked.
    pub fn try_acquire(dir: &Path) -> Result<Acquired, Error> {
        let state_error = |message: String| Error::State {
            path: dir.to_owned(),
            message,
        };
        fs::create_dir_all(dir)
            .map_err(|error| state_error(format!("cannot create the state directory: {error}")))?;
        let path = dir.join(LOCK_FILE);
        let mut file = blufio_platform::open_regular(
            &path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
        )
        .map_err(|error| state_error(format!("cannot open {LOCK_FILE}: {error}")))?;
        let locked = blufio_platform::try_lock_exclusive(&file)
            .map_err(|error| state_error(format!("cannot lock {LOCK_FILE}: {error}")))?;
        if !locked {
            let mut text = String::new();
            let _ = (&mut file).take(MAX_PID_BYTES).read_to_string(&mut text);
            return Ok(Acquired::Held {
                pid: text.trim().parse::<u32>().ok(),
            });
        }
        // The pid is for the operator and for the refusal above; the lock is the flock.
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(error) = written {
            log::warn!("cannot write the pid into {}: {error}", path.display());
        }
        Ok(Acquired::Locked(StateLock {
            dir: dir.to_owned(),
            file: Mutex::new(Some(file)),
        }))
    }

    /// Returns the locked directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Releases the lock (at the end of a shutdown) so another daemon may take the directory.
    pub fn release(&self) {
        let mut file = crate::sync::lock(&self.file);
        // Closing the file releases the flock.
        file.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_directory_is_refused_until_released() {
        let dir = blufio_testkit::temp::temp_dir("state-lock");
        let first = StateLock::acquire(&dir).unwrap();
        let pid = fs::read_to_string(dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        let message = StateLock::acquire(&dir).unwrap_err().to_string();
        assert!(message.starts_with(&dir.display().to_string()), "{message}");
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        first.release();
        let again = StateLock::acquire(&dir).unwrap();
        drop(again);
    }
}
