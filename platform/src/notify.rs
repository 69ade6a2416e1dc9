//! The service manager's notification socket (`$NOTIFY_SOCKET`, the sd_notify protocol) and
//! the monotonic clock its `MONOTONIC_USEC=` field is read from.
//!
//! It only moves datagrams: which messages to send and when is the daemon's business. It
//! does not link libsystemd and does not read the environment (the caller passes the socket
//! address it got from its configuration).

use std::{ffi::OsStr, io};

/// A datagram socket connected to the service manager's notification socket.
#[derive(Debug)]
pub struct NotifySocket {
    #[cfg(unix)]
    socket: std::os::unix::net::UnixDatagram,
}

impl NotifySocket {
    /// Connects to `address`: a filesystem path, or an abstract-namespace name written with a
    /// leading `@` (as systemd writes it in `$NOTIFY_SOCKET`).
    ///
    /// # Errors
    ///
    /// Returns the OS error when the socket cannot be created or connected, and
    /// `Unsupported` for an abstract address where the OS has no abstract namespace.
    ///
    /// # Platform-specific behavior
    ///
    /// Linux: path and abstract sockets. Other Unix systems: path sockets only. Other
    /// systems: always `Unsupported`.
    pub fn connect(address: &OsStr) -> io::Result<NotifySocket> {
        #[cfg(unix)]
        {
            use std::os::unix::{ffi::OsStrExt, net::UnixDatagram};

            let bytes = address.as_bytes();
            let socket = UnixDatagram::unbound()?;
            match bytes.strip_prefix(b"@") {
                Some(name) => socket.connect_addr(&abstract_address(name)?)?,
                None => socket.connect(address)?,
            }
            Ok(NotifySocket { socket })
        }
        #[cfg(not(unix))]
        {
            let _ = address;
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no notification sockets on this OS",
            ))
        }
    }

    /// Sends one notification (newline-separated `KEY=value` assignments) as one datagram.
    ///
    /// # Errors
    ///
    /// Returns the OS error when the datagram cannot be sent (the manager went away).
    ///
    /// # Platform-specific behavior
    ///
    /// Unix: one `send` on the connected socket. Other systems: never reached, since
    /// [`NotifySocket::connect`] fails there.
    pub fn send(&self, message: &str) -> io::Result<()> {
        #[cfg(unix)]
        {
            let sent = self.socket.send(message.as_bytes())?;
            if sent != message.len() {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "notification datagram truncated",
                ));
            }
            Ok(())
        }
        #[cfg(not(unix))]
        {
            let _ = message;
            Err(io::Error::from(io::ErrorKind::Unsupported))
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;

    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

#[cfg(all(unix, not(any(target_os = "linux", target_os = "android"))))]
fn abstract_address(_name: &[u8]) -> io::Result<std::os::unix::net::SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract notification sockets exist only on Linux",
    ))
}

/// Returns `CLOCK_MONOTONIC` in microseconds, the clock systemd's `MONOTONIC_USEC=` uses.
///
/// # Platform-specific behavior
///
/// Linux and macOS: `clock_gettime(CLOCK_MONOTONIC)`. Other systems: `None`.
pub fn monotonic_usec() -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid, writable timespec and CLOCK_MONOTONIC is always available
        // on these systems; the call writes only into `now`.
        let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        if result != 0 {
            return None;
        }
        let seconds = u64::try_from(now.tv_sec).ok()?;
        let nanos = u64::try_from(now.tv_nsec).ok()?;
        Some(
            seconds
                .saturating_mul(1_000_000)
                .saturating_add(nanos / 1000),
        )
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        None
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buffer = [0u8; 256];
        let length = socket.recv(&mut buffer).unwrap();
        String::from_utf8_lossy(&buffer[..length]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let path = std::env::temp_dir().join(format!("blufio-notify-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        let socket = NotifySocket::connect(path.as_os_str()).unwrap();
        socket.send("READY=1").unwrap();
        assert_eq!(receive(&manager), "READY=1");
        std::fs::remove_file(&path).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;

        let name = format!("blufio-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).unwrap();
        let manager = UnixDatagram::bind_addr(&address).unwrap();
        let socket = NotifySocket::connect(OsStr::new(&format!("@{name}"))).unwrap();
        socket.send("STOPPING=1").unwrap();
        assert_eq!(receive(&manager), "STOPPING=1");
    }

    #[test]
    fn missing_socket_is_an_error() {
        assert!(NotifySocket::connect(OsStr::new("/nonexistent/blufio/notify")).is_err());
    }

    #[test]
    fn monotonic_clock_advances() {
        let first = monotonic_usec().unwrap();
        let second = monotonic_usec().unwrap();
        assert!(first > 0 && second >= first);
    }
}
