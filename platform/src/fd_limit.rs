//! The open-file limit (`RLIMIT_NOFILE`): reading it, and raising the soft limit toward the
//! hard one when the configured connection cap needs more descriptors.
//!
//! What to ask for is the daemon's decision; this only makes the calls.

use std::io;

/// The soft and hard limits on open file descriptors; `None` stands for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    /// The limit in force (`ulimit -n`).
    pub soft: Option<u64>,
    /// The most the soft limit may be raised to without privileges (`ulimit -Hn`).
    pub hard: Option<u64>,
}

/// Reads the open-file limits; `Ok(None)` where the OS has none to read.
///
/// # Errors
///
/// Returns the OS error when `getrlimit` fails.
///
/// # Platform-specific behavior
///
/// Linux and macOS: `getrlimit(RLIMIT_NOFILE)`. Other systems: always `Ok(None)`.
pub fn fd_limits() -> io::Result<Option<FdLimits>> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        let limit = nofile_limit()?;
        // `rlim_t` is 32 bits on some 32-bit targets and 64 on others.
        #[allow(clippy::useless_conversion)]
        let value = |raw: libc::rlim_t| (raw != libc::RLIM_INFINITY).then(|| u64::from(raw));
        Ok(Some(FdLimits {
            soft: value(limit.rlim_cur),
            hard: value(limit.rlim_max),
        }))
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        Ok(None)
    }
}

/// Sets the soft open-file limit to `soft`, keeping the hard limit.
///
/// # Errors
///
/// Returns the OS error when `setrlimit` refuses (above the hard limit, or above
/// `OPEN_MAX` on macOS), and `Unsupported` where the OS has no such limit.
///
/// # Platform-specific behavior
///
/// Linux and macOS: `setrlimit(RLIMIT_NOFILE)`. Other systems: always `Unsupported`.
pub fn set_fd_soft_limit(soft: u64) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        let mut limit = nofile_limit()?;
        limit.rlim_cur = libc::rlim_t::try_from(soft)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "limit out of range"))?;
        // SAFETY: `limit` is a valid `rlimit` that outlives the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = soft;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "no open-file limit on this OS",
        ))
    }
}

/// Reads `RLIMIT_NOFILE`.
#[cfg(any(target_os = "linux", target_os = "macos"))]
fn nofile_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` that outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    fn limits_are_read_and_the_soft_one_can_be_set_to_itself() {
        let limits = fd_limits().unwrap().unwrap();
        if let (Some(soft), Some(hard)) = (limits.soft, limits.hard) {
            assert!(soft <= hard);
        }
        if let Some(soft) = limits.soft {
            set_fd_soft_limit(soft).unwrap();
            assert_eq!(fd_limits().unwrap().unwrap(), limits);
        }
    }
}
