//! The sides of the bench as running servers (blufio and the floor, and blufio as an OpenAI
//! gateway in front of the fake upstream): start, warm up, read `/proc/<pid>/status`, stop.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use blufio_testkit::process::{KillOnDrop, signal, try_free_port, wait_timeout};

use super::build::Binaries;
use super::client::Client;
use super::load::{get, median, request_bytes};
use super::report::{Report, Unit};
use super::upstream::SLOW_MODEL;
use super::{STARTUP_TIMEOUT, TOKEN};
use crate::json;
use crate::project::{Result, describe};

/// Raises this process's soft open-files limit towards `wanted` (children inherit it) and
/// returns the limit now in force.
pub(super) fn raise_nofile_limit(wanted: u64) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()).into());
    }
    let target = (wanted as libc::rlim_t).min(limit.rlim_max);
    if limit.rlim_cur < target {
        limit.rlim_cur = target;
        // SAFETY: setrlimit reads one `rlimit` from the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(format!("setrlimit: {}", io::Error::last_os_error()).into());
        }
    }
    // rlim_t is u64 on the targets this runs on; the cast keeps other libcs compiling.
    #[allow(clippy::unnecessary_cast)]
    Ok(limit.rlim_cur as u64)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Blufio,
    Floor,
    /// blufio routing `/v1/chat/completions` to the fake upstream at this address.
    Gateway {
        upstream: SocketAddr,
    },
}

/// A running side.
#[derive(Debug)]
pub(super) struct Server {
    child: KillOnDrop,
    pub(super) addr: SocketAddr,
    pub(super) cold_start: Duration,
}

impl Server {
    /// Starts a side on a free port and waits for its first `200` to `/health`.
    pub(super) fn start(
        side: Side,
        binaries: &Binaries,
        config: &Path,
        metrics_bytes: usize,
    ) -> Result<Server> {
        let port = try_free_port()?;
        let command = match side {
            Side::Blufio => blufio_command(binaries, config, &blufio_config(port, None))?,
            Side::Gateway { upstream } => {
                blufio_command(binaries, config, &gateway_config(port, upstream))?
            }
            Side::Floor => {
                let floor = binaries
                    .floor
                    .as_ref()
                    .ok_or("the floor was not built in this mode")?;
                let mut command = Command::new(floor);
                command.arg(port.to_string()).arg(metrics_bytes.to_string());
                command
            }
        };
        // Kept in a file, so a server that exits early can say why.
        let log = config.with_extension(match side {
            Side::Blufio => "blufio.log",
            Side::Floor => "floor.log",
            Side::Gateway { .. } => "gateway.log",
        });
        Server::launch(command, port, &log)
    }

    /// Starts blufio as [`Side::Blufio`] does, with its session store in `state_dir` (no
    /// store and no state directory with `None`), and waits for its first `200` to
    /// `/health`: by then the store is open and its sessions restored.
    pub(super) fn start_blufio(
        binaries: &Binaries,
        config: &Path,
        state_dir: Option<&Path>,
    ) -> Result<Server> {
        let port = try_free_port()?;
        let command = blufio_command(binaries, config, &blufio_config(port, state_dir))?;
        Server::launch(command, port, &config.with_extension("blufio.log"))
    }

    /// Spawns `command`, its stderr into `log`, and polls `/health` on `port` until it
    /// answers 200.
    fn launch(mut command: Command, port: u16, log: &Path) -> Result<Server> {
        command
            .env_remove("BLUFIO_LOG")
            .env_remove("BLUFIO_GATEWAY_TOKEN")
            // A real key must never travel to the fake upstream.
            .env_remove("OPENAI_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(log)?);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let spawned = Instant::now();
        let child = command
            .spawn()
            .map_err(|error| format!("cannot start `{}`: {error}", describe(&command)))?;
        let mut server = Server {
            child: KillOnDrop::new(child),
            addr,
            cold_start: Duration::ZERO,
        };
        loop {
            if let Ok((200, _)) = get(addr, "/health") {
                server.cold_start = spawned.elapsed();
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                let said = fs::read_to_string(log).unwrap_or_default();
                let said = said.lines().last().unwrap_or("nothing on stderr");
                return Err(
                    format!("`{}` exited early: {status}: {said}", describe(&command)).into(),
                );
            }
            if spawned.elapsed() > STARTUP_TIMEOUT {
                server.stop()?;
                return Err(format!("`{}` did not answer /health", describe(&command)).into());
            }
            thread::sleep(Duration::from_micros(200));
        }
    }

    pub(super) fn status(&self) -> Result<ProcStatus> {
        let path = format!("/proc/{}/status", self.child.id());
        let text =
            fs::read_to_string(&path).map_err(|error| format!("cannot read {path}: {error}"))?;
        Ok(parse_status(&text)?)
    }

    /// Returns the CPU time the server has used so far, user and system, all threads.
    pub(super) fn cpu_time(&self) -> Result<Duration> {
        let path = format!("/proc/{}/stat", self.child.id());
        let text =
            fs::read_to_string(&path).map_err(|error| format!("cannot read {path}: {error}"))?;
        let ticks = parse_stat_cpu_ticks(&text)?;
        // SAFETY: sysconf only reads a constant of the C library.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if per_second <= 0 {
            return Err("sysconf(_SC_CLK_TCK) failed".into());
        }
        Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
    }

    pub(super) fn stop(mut self) -> Result<()> {
        signal(self.child.id(), "TERM")?;
        if wait_timeout(&mut self.child, Duration::from_secs(15))?.is_none() {
            self.child.kill()?;
            self.child.wait()?;
        }
        Ok(())
    }
}

/// Writes `text` to `config` and returns the command that serves it with blufio.
fn blufio_command(binaries: &Binaries, config: &Path, text: &str) -> Result<Command> {
    fs::write(config, text)?;
    let mut command = Command::new(&binaries.blufio);
    command.arg("serve").arg("--config").arg(config);
    command.envs(binaries.env.iter().map(|(key, value)| (key, value)));
    Ok(command)
}

/// One listener for everything, the echo agent, a token, room for the session row, and
/// connection caps above the idle-connection row (all the load comes from one address). With
/// `state_dir`, the session store in it (`[store]` as shipped); without, no state directory,
/// so nothing is stored.
pub(super) fn blufio_config(port: u16, state_dir: Option<&Path>) -> String {
    let (state_dir, store) = match state_dir {
        Some(dir) => (
            format!("state_dir = {}\n", json::quote(&dir.display().to_string())),
            "\n[store]\nenabled = true\n",
        ),
        None => (String::new(), ""),
    };
    format!(
        "[daemon]\nbind = \"127.0.0.1\"\nhealth_port = {port}\nlog_level = \"warn\"\n\
         max_connections = 20000\nmax_connections_per_ip = 20000\n{state_dir}\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\nmax_sessions = 20000\n\n\
         [agent]\nprovider = \"echo\"\n{store}"
    )
}

/// blufio as an OpenAI gateway with one provider, the fake upstream, and two models: `fast`
/// answers at once, `slow` streams are held by the fake until released. Connection caps are
/// raised as for [`blufio_config`], and the monitor samples every second so the heap read
/// after opening the streams is fresh within two.
pub(super) fn gateway_config(port: u16, upstream: SocketAddr) -> String {
    format!(
        "[daemon]\nbind = \"127.0.0.1\"\nhealth_port = {port}\nlog_level = \"warn\"\n\
         max_connections = 20000\nmax_connections_per_ip = 20000\nmonitor_interval_secs = 1\n\n\
         [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\ndefault_model = \"fast\"\n\n\
         [providers.fake]\nkind = \"openai\"\nbase_url = \"http://{upstream}\"\n\n\
         [models.fast]\nprovider = \"fake\"\nmodel = \"fast\"\n\n\
         [models.slow]\nprovider = \"fake\"\nmodel = \"{SLOW_MODEL}\"\n"
    )
}

/// The same warm-up for both sides: connections, allocator arenas, the first responses.
pub(super) fn warm_up(addr: SocketAddr) -> Result<()> {
    let mut client = Client::connect(addr)?;
    for index in 0..250 {
        let path = if index % 5 == 0 {
            "/metrics"
        } else {
            "/health"
        };
        client.send(&request_bytes("GET", path, ""))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// /proc/<pid>/status

/// The memory and thread lines of `/proc/<pid>/status`, memory in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ProcStatus {
    pub(super) vm_rss: u64,
    pub(super) rss_anon: u64,
    pub(super) rss_file: u64,
    pub(super) threads: u64,
}

/// Parses `/proc/<pid>/status`; every field must be present.
pub(super) fn parse_status(text: &str) -> std::result::Result<ProcStatus, String> {
    let field = |name: &str| -> std::result::Result<u64, String> {
        let line = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .ok_or(format!("no {name} line in /proc/<pid>/status"))?;
        let mut words = line.split_whitespace();
        let value: u64 = words
            .next()
            .and_then(|value| value.parse().ok())
            .ok_or(format!("malformed {name} line: `{}`", line.trim()))?;
        match words.next() {
            Some("kB") => Ok(value * 1024),
            None => Ok(value),
            Some(unit) => Err(format!("unexpected unit `{unit}` in the {name} line")),
        }
    };
    Ok(ProcStatus {
        vm_rss: field("VmRSS")?,
        rss_anon: field("RssAnon")?,
        rss_file: field("RssFile")?,
        threads: field("Threads")?,
    })
}

/// Reads `utime + stime` (clock ticks) from `/proc/<pid>/stat`. The command name in
/// parentheses may hold spaces, so the fields are counted from its closing parenthesis.
pub(super) fn parse_stat_cpu_ticks(text: &str) -> std::result::Result<u64, String> {
    let after_name = text
        .rfind(')')
        .map(|end| &text[end + 1..])
        .ok_or("no command name in /proc/<pid>/stat")?;
    // After the name: state (field 3) … utime (field 14), stime (field 15).
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |index: usize, name: &str| -> std::result::Result<u64, String> {
        fields
            .get(index)
            .and_then(|value| value.parse().ok())
            .ok_or(format!("no {name} in /proc/<pid>/stat"))
    };
    Ok(field(11, "utime")? + field(12, "stime")?)
}

pub(super) fn push_status_rows(report: &mut Report, when: &str, status: &[ProcStatus; 2]) {
    type Read = fn(&ProcStatus) -> u64;
    let rows: [(&str, Read); 3] = [
        ("VmRSS", |status| status.vm_rss),
        ("RssAnon", |status| status.rss_anon),
        ("RssFile", |status| status.rss_file),
    ];
    for (name, read) in rows {
        report.push(
            &format!("{name} {when}"),
            Unit::Mebibytes,
            Some(read(&status[0]) as f64),
            Some(read(&status[1]) as f64),
        );
    }
}

/// Removes `dir` if it exists and creates it empty.
pub(super) fn fresh_dir(dir: &Path) -> Result<std::path::PathBuf> {
    if dir.exists() {
        fs::remove_dir_all(dir)
            .map_err(|error| format!("cannot remove {}: {error}", dir.display()))?;
    }
    fs::create_dir_all(dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    Ok(dir.to_path_buf())
}

/// Returns the median of `field` over `samples`.
pub(super) fn median_of(samples: &[ProcStatus], field: impl Fn(&ProcStatus) -> u64) -> Option<f64> {
    let values: Vec<f64> = samples.iter().map(|status| field(status) as f64).collect();
    median(&values)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tblufio\nUmask:\t0022\nState:\tS (sleeping)\n\
        VmPeak:\t  100000 kB\nVmRSS:\t    7300 kB\nRssAnon:\t    1848 kB\n\
        RssFile:\t    5452 kB\nRssShmem:\t       0 kB\nThreads:\t5\nSigQ:\t0/63304\n";

    #[test]
    fn status_fields_are_read_in_bytes() {
        let status = parse_status(STATUS).unwrap();
        assert_eq!(
            status,
            ProcStatus {
                vm_rss: 7300 * 1024,
                rss_anon: 1848 * 1024,
                rss_file: 5452 * 1024,
                threads: 5,
            }
        );
    }

    #[test]
    fn cpu_ticks_are_user_plus_system_after_the_name() {
        let stat = "4906 (blufio (x) y) S 1 4906 4906 0 -1 4194560 1289 0 0 0 1500 270 0 0 20 0 \
            3 0 123456 40000000 2000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Ok(1_770));
        let error = parse_stat_cpu_ticks("4906 (blufio) S 1 2").unwrap_err();
        assert!(error.contains("utime"), "{error}");
    }

    #[test]
    fn status_without_a_field_is_an_error_naming_it() {
        let text = STATUS.replace("RssAnon", "RssAnonymous");
        let error = parse_status(&text).unwrap_err();
        assert!(error.contains("RssAnon"), "{error}");
        let error = parse_status(&STATUS.replace("7300 kB", "lots kB")).unwrap_err();
        assert!(error.contains("VmRSS"), "{error}");
    }
}
