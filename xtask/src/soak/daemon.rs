//! The daemon under soak: its configuration, the `check-config` run that vets it, starting
//! it and waiting for its "listening on" line, and the tail of its log for error messages.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use blufio_testkit::process::{KillOnDrop, wait_timeout};

use super::{SESSION_IDLE_TIMEOUT_SECS, TOKEN};
use crate::json;
use crate::project::{Result, describe};

/// The command line for the daemon under soak, with the environment every invocation shares
/// (`check-config` must judge exactly what `serve` will run with).
pub(super) fn daemon_command(binary: &Path, subcommand: &str, config: &Path) -> Command {
    let mut command = Command::new(binary);
    command
        .arg(subcommand)
        .arg("--config")
        .arg(config)
        .env("BLUFIO_GATEWAY_TOKEN", TOKEN)
        .env("BLUFIO_LOG", "info")
        .stdin(Stdio::null());
    command
}

/// Runs `blufio check-config` on the generated configuration and fails with the daemon's own
/// message when it refuses it, so a key the daemon stopped accepting breaks the soak with a
/// reason instead of a daemon that never listens. Bounded in time: a daemon that hangs
/// reading its configuration fails the soak rather than stalling it.
pub(super) fn check_config(
    binary: &Path,
    config: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<()> {
    let output = fs::File::create(log)?;
    let mut command = daemon_command(binary, "check-config", config);
    command.stdout(output.try_clone()?).stderr(output);
    // A check that overruns its time is killed when the guard drops.
    let mut child = KillOnDrop::new(
        command
            .spawn()
            .map_err(|error| format!("cannot start `{}`: {error}", describe(&command)))?,
    );
    match wait_timeout(&mut child, timeout)? {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!(
            "the daemon refuses the soak's configuration {} (`{}` exited with {status}); \
             update `config_text` in xtask/src/soak/daemon.rs:\n{}",
            config.display(),
            describe(&command),
            log_tail(log)
        )
        .into()),
        None => Err(format!(
            "`{}` did not finish within {} s",
            describe(&command),
            timeout.as_secs()
        )
        .into()),
    }
}

/// Returns the last lines of a log file (at most 4 KiB of it), for error messages.
pub(super) fn log_tail(path: &Path) -> String {
    const TAIL_BYTES: u64 = 4096;
    let Ok(mut file) = fs::File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let length = file.metadata().map_or(0, |meta| meta.len());
    let mut text = Vec::new();
    let read = file
        .seek(SeekFrom::Start(length.saturating_sub(TAIL_BYTES)))
        .and_then(|_| file.take(TAIL_BYTES).read_to_end(&mut text));
    if let Err(error) = read {
        return format!("(cannot read {}: {error})", path.display());
    }
    let text = String::from_utf8_lossy(&text);
    // A cut at the start of the window leaves a partial first line; drop it.
    let text = if length > TAIL_BYTES {
        text.split_once('\n').map_or(&*text, |(_, rest)| rest)
    } else {
        &text
    };
    text.trim_end().to_owned()
}

/// Returns the soak daemon's configuration: one listener on `port` (a port that was free a
/// moment ago), a short idle timeout that evicts the sessions messages without an id open,
/// a short request timeout that closes abandoned heads, and the echo agent under a daily
/// budget with spend kept in `state_dir`, as a production daemon runs. The echo agent is free,
/// so every reply passes the budget check and nothing is charged.
pub(super) fn config_text(port: u16, state_dir: &Path) -> Result<String> {
    let state_dir = state_dir
        .to_str()
        .ok_or_else(|| format!("the state directory {} is not UTF-8", state_dir.display()))?;
    // Quoted as JSON, which is also a TOML basic string, so any path is quoted correctly.
    let state_dir = json::quote(state_dir);
    Ok(format!(
        "[daemon]\n\
         bind = \"127.0.0.1\"\n\
         health_port = {port}\n\
         monitor_interval_secs = 1\n\
         request_timeout_secs = 5\n\
         state_dir = {state_dir}\n\
         \n\
         [gateway]\n\
         port = {port}\n\
         max_sessions = 200\n\
         session_idle_timeout_secs = {SESSION_IDLE_TIMEOUT_SECS}\n\
         \n\
         [agent]\n\
         provider = \"echo\"\n\
         \n\
         [cost]\n\
         daily_budget_usd = 5.0\n"
    ))
}

/// Waits for the daemon's "listening on" line while a thread copies its whole log to `log`;
/// no polling of the port. Bounded in time, so a daemon that hangs before listening fails the
/// soak instead of stalling it; a daemon that exits fails it with the end of its log.
pub(super) fn listening_address(
    stderr: ChildStderr,
    log: &Path,
    timeout: Duration,
) -> Result<SocketAddr> {
    let mut log_file = fs::File::create(log)?;
    let (sender, receiver) = mpsc::channel();
    thread::Builder::new()
        .name("soak-log".to_owned())
        .spawn(move || {
            let mut sender = Some(sender);
            for line in BufReader::new(stderr).lines().map_while(io::Result::ok) {
                let _ = writeln!(log_file, "{line}");
                if let Some(rest) = line.split("listening on http://").nth(1)
                    && let Some(sender) = sender.take()
                {
                    let address = rest.split_whitespace().next().unwrap_or_default();
                    let _ = sender.send(
                        address
                            .parse::<SocketAddr>()
                            .map_err(|_| format!("cannot read the address in `{line}`")),
                    );
                }
            }
        })?;
    match receiver.recv_timeout(timeout) {
        Ok(address) => Ok(address?),
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!(
            "the daemon exited before listening; the end of {}:\n{}",
            log.display(),
            log_tail(log)
        )
        .into()),
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "the daemon did not say \"listening on\" within {} s; see {}",
            timeout.as_secs(),
            log.display()
        )
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Child;
    use std::time::Instant;

    use blufio_testkit::temp::{TempDir, temp_dir};

    use super::*;

    #[test]
    fn config_sets_both_ports_a_daily_budget_and_a_quoted_state_dir() {
        let text = config_text(4321, Path::new("/tmp/soak \"state\"\\dir")).unwrap();
        assert!(text.contains("health_port = 4321\n"), "{text}");
        assert!(text.contains("[gateway]\nport = 4321\n"), "{text}");
        assert!(
            text.contains(r#"state_dir = "/tmp/soak \"state\"\\dir""#),
            "{text}"
        );
        // The daily budget lives in [cost]; [agent] budget_usd is refused since it landed.
        assert!(
            text.contains("[agent]\nprovider = \"echo\"\n\n[cost]\ndaily_budget_usd = 5.0\n"),
            "{text}"
        );
    }

    /// Writes an executable shell script that stands in for the daemon, in a fresh temp dir
    /// that lives as long as the returned guard.
    fn fake_daemon(name: &str, script: &str) -> (TempDir, PathBuf) {
        use std::os::unix::fs::PermissionsExt;

        let dir = temp_dir(&format!("soak-{name}"));
        let path = dir.join("blufio");
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        (dir, path)
    }

    /// Runs `check_config` on a fake daemon, logging next to it.
    fn check_fake_config(binary: &Path, timeout: Duration) -> Result<()> {
        let log = binary.with_file_name("check-config.log");
        check_config(binary, Path::new("soak.toml"), &log, timeout)
    }

    #[test]
    fn a_refused_configuration_fails_the_soak_with_the_daemons_message() {
        let (_dir, binary) = fake_daemon(
            "refused",
            "echo \"blufio: $3: [agent] budget_usd: was a lifetime limit\" >&2; exit 78",
        );
        let error = check_fake_config(&binary, Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        for expected in [
            "refuses the soak's configuration",
            "exit status: 78",
            "blufio: soak.toml: [agent] budget_usd: was a lifetime limit",
        ] {
            assert!(error.contains(expected), "{error}");
        }
        let (_accepted_dir, accepted) =
            fake_daemon("accepted", "test \"$1 $2\" = \"check-config --config\"");
        check_fake_config(&accepted, Duration::from_secs(60)).unwrap();
    }

    #[test]
    fn a_check_config_that_hangs_fails_the_soak_in_bounded_time() {
        let (_dir, binary) = fake_daemon("hangs", "exec sleep 60");
        let started = Instant::now();
        let error = check_fake_config(&binary, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(error.contains("did not finish within 1 s"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    fn piped_stderr(script: &str) -> (Child, ChildStderr) {
        let mut child = Command::new("/bin/sh")
            .args(["-c", script])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        (child, stderr)
    }

    #[test]
    fn the_listening_line_gives_the_address_and_an_early_exit_gives_the_log() {
        let dir = temp_dir("soak-listening");
        let (mut child, stderr) = piped_stderr(
            "echo '[INFO  blufio::daemon] listening on http://127.0.0.1:4321 (health)' >&2",
        );
        let address = listening_address(stderr, &dir.join("up.log"), Duration::from_secs(60));
        assert_eq!(address.unwrap(), "127.0.0.1:4321".parse().unwrap());
        child.wait().unwrap();

        let (mut child, stderr) =
            piped_stderr("echo 'blufio: soak.toml: [cost] nonsense: unknown field' >&2; exit 78");
        let error = listening_address(stderr, &dir.join("down.log"), Duration::from_secs(60))
            .unwrap_err()
            .to_string();
        assert!(error.contains("exited before listening"), "{error}");
        assert!(error.contains("[cost] nonsense: unknown field"), "{error}");
        child.wait().unwrap();
    }
}
