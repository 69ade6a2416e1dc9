//! Files blufio reads or locks: opened so that nothing can block the caller, checked to be
//! regular files, read within a byte bound, and locked without waiting.
//!
//! Opening a FIFO for reading blocks until a writer appears, and reading a character device
//! such as `/dev/zero` never ends; a configuration, token or state file that is either would
//! freeze whoever reads it. Here the open never waits (`O_NONBLOCK`), and anything that is
//! not a regular file is refused by name before a byte is read. It does not decide what a
//! file means or how large it may be: the caller passes the bound.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read},
    path::Path,
};

/// Opens `path` with `options` without blocking, and refuses it unless it is a regular file.
///
/// # Errors
///
/// Returns the OS error when the file cannot be opened, and `InvalidInput` naming the kind
/// of file (`a FIFO (named pipe)`, `a directory`, `a character device`…) when it is not a
/// regular file.
///
/// # Platform-specific behavior
///
/// Linux and macOS: opened with `O_NONBLOCK` (so a FIFO opens at once), then `fstat`. Other
/// systems: a plain open, then the file's metadata.
pub fn open_regular(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        use std::os::unix::fs::OpenOptionsExt;

        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() {
        return Ok(file);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {}, not a regular file", kind_name(&kind)),
    ))
}

/// Reads the regular file at `path` whole, refusing it when it holds more than `max_bytes`.
///
/// # Errors
///
/// Returns the errors of [`open_regular`], the read error, and `InvalidData` when the file
/// is larger than `max_bytes` (a sparse file is refused by its size, before reading).
///
/// # Platform-specific behavior
///
/// As [`open_regular`].
pub fn read_regular(path: &Path, max_bytes: u64) -> io::Result<Vec<u8>> {
    let file = open_regular(path, OpenOptions::new().read(true))?;
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {max_bytes} bytes; is it the right file?"),
        )
    };
    if file.metadata()?.len() > max_bytes {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    // The file may grow between the size check and the read.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Takes an exclusive lock on `file` without waiting; `Ok(false)` when another open file
/// holds it, in this process or another.
///
/// The lock belongs to the open file: it lasts until `file` is closed, and a second open of
/// the same path in the same process does not share it.
///
/// # Errors
///
/// Returns the OS error when locking fails for another reason.
///
/// # Platform-specific behavior
///
/// Linux and macOS: `flock(LOCK_EX | LOCK_NB)`. Other systems: always `Ok(true)` (no lock).
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        use std::os::fd::AsRawFd;

        // SAFETY: the descriptor belongs to `file`, which outlives the call; `flock` takes no
        // pointers.
        let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if result == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(false);
        }
        Err(error)
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = file;
        Ok(true)
    }
}

fn kind_name(kind: &std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;

        if kind.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("blufio-platform-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_regular_file_is_read_within_its_bound_and_refused_past_it() {
        let dir = temp_dir("bound");
        let path = dir.join("small");
        std::fs::write(&path, b"12345").unwrap();
        assert_eq!(read_regular(&path, 5).unwrap(), b"12345");
        let error = read_regular(&path, 4).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("larger than 4 bytes"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_is_refused_by_name() {
        let dir = temp_dir("directory");
        let error = read_regular(&dir, 100).unwrap_err();
        assert_eq!(error.to_string(), "is a directory, not a regular file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    fn devices_and_fifos_are_refused_without_blocking() {
        let error = read_regular(Path::new("/dev/zero"), 100).unwrap_err();
        assert_eq!(
            error.to_string(),
            "is a character device, not a regular file"
        );
        let dir = temp_dir("fifo");
        let fifo = dir.join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        // Without O_NONBLOCK this open would wait for a writer forever.
        let error = read_regular(&fifo, 100).unwrap_err();
        assert_eq!(
            error.to_string(),
            "is a FIFO (named pipe), not a regular file"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    fn a_second_open_of_a_locked_file_cannot_lock_it() {
        let dir = temp_dir("lock");
        let path = dir.join("lock");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        let first = open();
        assert!(try_lock_exclusive(&first).unwrap());
        let second = open();
        assert!(!try_lock_exclusive(&second).unwrap());
        drop(first);
        assert!(try_lock_exclusive(&second).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
