//! Whether standard error is connected to the systemd journal.
//!
//! systemd sets `JOURNAL_STREAM=<device>:<inode>` for a service whose stderr is the journal;
//! a process compares it with its own stderr, because the variable is inherited by children
//! whose stderr may have been redirected elsewhere. Only then do log lines carry syslog
//! priority prefixes (`<3>`); on a terminal they would be noise.

/// Returns true when `journal_stream` (the value of `JOURNAL_STREAM`) names this process's
/// standard error.
///
/// # Platform-specific behavior
///
/// Unix compares the device and inode of file descriptor 2. Other systems: always false.
pub fn stderr_is_journal(journal_stream: &str) -> bool {
    match (parse_journal_stream(journal_stream), stderr_identity()) {
        (Some(expected), Some(actual)) => expected == actual,
        _ => false,
    }
}

/// Parses `JOURNAL_STREAM`'s `<device>:<inode>` (both decimal).
pub fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (device, inode) = value.trim().split_once(':')?;
    Some((device.parse().ok()?, inode.parse().ok()?))
}

#[cfg(unix)]
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::{fd::AsFd, unix::fs::MetadataExt};

    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let metadata = std::fs::File::from(fd).metadata().ok()?;
    Some((metadata.dev(), metadata.ino()))
}

#[cfg(not(unix))]
fn stderr_identity() -> Option<(u64, u64)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_parses_device_and_inode() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8:12345\n"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(parse_journal_stream(""), None);
    }

    #[test]
    fn a_journal_stream_naming_another_file_is_not_stderr() {
        assert!(!stderr_is_journal("0:0"));
        assert!(!stderr_is_journal("garbage"));
    }
}
