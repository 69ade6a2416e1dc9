//! Child processes the tasks start: a guard that kills a child left running, SIGTERM, a bounded
//! wait, and a free local port to start a daemon on.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::ops::{Deref, DerefMut};
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use crate::project::Result;

/// A child process that is killed and reaped when dropped, unless it has already exited: a
/// task that fails midway must not leave its daemons running (and their binaries busy for the
/// next run).
#[derive(Debug)]
pub struct ChildGuard(Child);

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard(child)
    }
}

impl Deref for ChildGuard {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Returns a port that was free a moment ago: bind port 0, read the port, release it.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|error| format!("cannot bind 127.0.0.1:0: {error}"))?;
    Ok(listener.local_addr()?.port())
}

/// Sends SIGTERM to a child (std can only send SIGKILL).
pub fn terminate(child: &Child) -> Result<()> {
    let pid = libc::pid_t::try_from(child.id())?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours; the pid is our own
    // child, which has not been reaped yet, so it cannot name a recycled process.
    let result = unsafe { libc::kill(pid, libc::SIGTERM) };
    if result == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot send SIGTERM to pid {pid}: {}",
            io::Error::last_os_error()
        )
        .into())
    }
}

/// Waits for a child to exit; `None` if it is still running after `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if started.elapsed() > timeout {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}
