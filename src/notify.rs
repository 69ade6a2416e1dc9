//! Notifications to the service manager (systemd's sd_notify protocol): `READY=1` once every
//! listener is bound, `STATUS=` from the monitor, `WATCHDOG=1` from the monitor loop itself,
//! `STOPPING=1` on drain and `RELOADING=1` around a reload.
//!
//! Without a notification socket every call is a no-op that logs nothing. The socket itself
//! is `blufio_platform::NotifySocket`; the environment is read in `config/`, never here.

use std::{
    ffi::OsString,
    fmt,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use blufio_platform::NotifySocket;

/// Where and how often to notify, as the service manager asked through the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySettings {
    /// The notification socket: a path, or `@name` for the abstract namespace.
    pub socket: OsString,
    /// The watchdog timeout (`WATCHDOG_USEC`), when a watchdog is armed for this process.
    pub watchdog_timeout: Option<Duration>,
}

impl NotifySettings {
    /// Interprets the service manager's variables: `NOTIFY_SOCKET`, `WATCHDOG_USEC` and
    /// `WATCHDOG_PID` (the watchdog applies only when that pid is absent or `own_pid`).
    /// Returns `None` without a socket, so nothing is ever sent.
    pub fn from_vars(
        notify_socket: Option<OsString>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Option<NotifySettings> {
        let socket = notify_socket.filter(|socket| !socket.is_empty())?;
        let for_us = watchdog_pid.is_none_or(|pid| pid.trim().parse::<u32>() == Ok(own_pid));
        let watchdog_timeout = watchdog_usec
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Some(NotifySettings {
            socket,
            watchdog_timeout,
        })
    }
}

/// Sends notifications, or nothing when there is no service manager.
pub struct Notifier {
    socket: Option<NotifySocket>,
    watchdog_timeout: Option<Duration>,
    send_failed: AtomicBool,
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Notifier")
            .field("connected", &self.socket.is_some())
            .field("watchdog_timeout", &self.watchdog_timeout)
            .finish()
    }
}

impl Notifier {
    /// Returns a notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            socket: None,
            watchdog_timeout: None,
            send_failed: AtomicBool::new(false),
        }
    }

    /// Connects to the socket in `settings`; when that fails, logs one warning and returns a
    /// notifier that sends nothing (the daemon runs fine without its manager's attention).
    pub fn connect(settings: &NotifySettings) -> Notifier {
        match NotifySocket::connect(&settings.socket) {
            Ok(socket) => Notifier {
                socket: Some(socket),
                watchdog_timeout: settings.watchdog_timeout,
                send_failed: AtomicBool::new(false),
            },
            Err(error) => {
                log::warn!(
                    "cannot open the service manager's notification socket {}: {error}",
                    settings.socket.to_string_lossy()
                );
                Notifier::disabled()
            }
        }
    }

    /// Returns how often the monitor loop must ping the watchdog (half its timeout), if armed.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.socket.as_ref()?;
        self.watchdog_timeout.map(|timeout| timeout / 2)
    }

    /// Says the daemon is serving, with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// Replaces the status line shown by `systemctl status`.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    /// Pings the watchdog; call it only from the monitor loop, so a stall stops the pings.
    pub fn watchdog(&self) {
        if self.watchdog_timeout.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// Says draining has begun.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining");
    }

    /// Says a reload has begun; `MONOTONIC_USEC=` is what `Type=notify-reload` (systemd 253
    /// and later) requires, and older managers ignore it.
    pub fn reloading(&self) {
        let clock = blufio_platform::monotonic_usec()
            .map(|usec| format!("\nMONOTONIC_USEC={usec}"))
            .unwrap_or_default();
        self.send(&format!("RELOADING=1{clock}\nSTATUS=reloading"));
    }

    fn send(&self, message: &str) {
        let Some(socket) = &self.socket else {
            return;
        };
        match socket.send(message) {
            Ok(()) => {
                if self.send_failed.swap(false, Ordering::Relaxed) {
                    log::info!("service manager notifications work again");
                }
            }
            Err(error) => {
                // One line per episode: a vanished manager must not flood the log.
                if !self.send_failed.swap(true, Ordering::Relaxed) {
                    log::warn!("cannot notify the service manager: {error}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_socket_means_no_settings() {
        assert_eq!(NotifySettings::from_vars(None, Some("1000"), None, 7), None);
        assert_eq!(
            NotifySettings::from_vars(Some(OsString::new()), None, None, 7),
            None
        );
    }

    #[test]
    fn watchdog_applies_only_to_our_pid() {
        let socket = || Some(OsString::from("/run/notify"));
        let ours = NotifySettings::from_vars(socket(), Some("4000000"), Some("7"), 7).unwrap();
        assert_eq!(ours.watchdog_timeout, Some(Duration::from_secs(4)));
        let any = NotifySettings::from_vars(socket(), Some("4000000"), None, 7).unwrap();
        assert_eq!(any.watchdog_timeout, Some(Duration::from_secs(4)));
        let other = NotifySettings::from_vars(socket(), Some("4000000"), Some("8"), 7).unwrap();
        assert_eq!(other.watchdog_timeout, None);
        let junk = NotifySettings::from_vars(socket(), Some("soon"), None, 7).unwrap();
        assert_eq!(junk.watchdog_timeout, None);
        assert_eq!(junk.socket, OsString::from("/run/notify"));
    }

    #[test]
    fn disabled_notifier_has_no_watchdog() {
        let notifier = Notifier::disabled();
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.ready("x");
        notifier.watchdog();
    }
}
