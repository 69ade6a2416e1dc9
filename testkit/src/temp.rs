//! Temporary directories that remove themselves: a test suite or soak run for months on a CI
//! machine or a Pi must not fill /tmp.

use std::{
    ffi::OsStr,
    fmt, fs, io,
    ops::Deref,
    path::{Path, PathBuf},
};

/// A fresh, empty directory under the system temp dir, removed with everything in it when
/// dropped. Bind it to a variable for as long as its files are needed: a temporary dropped
/// at the end of a statement takes the directory with it.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `blufio-test-<pid>-<n>-<name>`, with the first `n` whose directory does not
    /// exist yet, so two calls with one name (or a stale directory of a recycled pid) never
    /// share files, without any counter kept between calls. The name ends the path, as it
    /// did before the guard, so a test that looks for a word in a logged path sees no
    /// number glued to it.
    pub fn new(name: &str) -> io::Result<TempDir> {
        let base = std::env::temp_dir();
        let pid = std::process::id();
        for n in 0u32.. {
            let path = base.join(format!("blufio-test-{pid}-{n}-{name}"));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(error),
            }
        }
        Err(io::Error::other("no free temp dir name"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A directory for one test's files, removed when the returned guard drops; panics if it
/// cannot be made.
pub fn temp_dir(name: &str) -> TempDir {
    TempDir::new(name).unwrap_or_else(|error| panic!("cannot create temp dir {name}: {error}"))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a test that failed halfway may have left anything inside, and a
        // failed removal must not turn into a second panic.
        let _ = fs::remove_dir_all(&self.path);
    }
}

impl Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<OsStr> for TempDir {
    fn as_ref(&self) -> &OsStr {
        self.path.as_os_str()
    }
}

impl fmt::Debug for TempDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.path.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_gets_its_own_directory_and_drop_removes_it() {
        let first = temp_dir("kit");
        let second = temp_dir("kit");
        assert_ne!(first.path(), second.path());
        fs::write(first.join("file"), "x").unwrap();
        fs::create_dir(first.join("sub")).unwrap();
        let path = first.path().to_owned();
        drop(first);
        assert!(!path.exists());
        assert!(second.is_dir());
    }
}
