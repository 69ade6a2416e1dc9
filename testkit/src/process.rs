//! The real `blufio` binary as a child process: a command that honours cargo's runner, a
//! spawned process whose stderr lines arrive on a channel and which is killed on drop, and a
//! daemon that is that process plus the address it logged.

use std::{
    io,
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::temp::{TempDir, temp_dir};

/// How long a daemon may take to log its listening address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the `blufio` binary is, and the runner (qemu-user under `cargo xtask test-cross`)
/// that must run it when it is foreign to the host kernel.
#[derive(Clone, Debug)]
pub struct Binary {
    path: PathBuf,
    runner: String,
}

impl Binary {
    /// The binary at `path` (the test crate's `env!("CARGO_BIN_EXE_blufio")`), run through
    /// `runner` (the value of cargo's runner variable for the target; empty for none).
    pub fn new(path: impl Into<PathBuf>, runner: impl Into<String>) -> Binary {
        Binary {
            path: path.into(),
            runner: runner.into(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The runner command line, empty when the binary runs natively.
    pub fn runner(&self) -> &str {
        &self.runner
    }

    /// A command running the binary (through the runner if there is one).
    pub fn command(&self) -> Command {
        let mut parts = self.runner.split_whitespace();
        match parts.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(parts).arg(&self.path);
                command
            }
            None => Command::new(&self.path),
        }
    }

    /// Runs `blufio <args>` to the end.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Runs `blufio <args> --config <config>` to the end, without a token from the environment.
    pub fn run_config(&self, args: &[&str], config: &Path) -> Output {
        self.command()
            .args(args)
            .arg("--config")
            .arg(config)
            .env_remove("BLUFIO_GATEWAY_TOKEN")
            .output()
            .unwrap()
    }

    /// `blufio serve --config <path>` logging at info, without a token from the environment.
    pub fn serve_command(&self, config: &Path) -> Command {
        let mut command = self.command();
        command
            .args(["serve", "--config"])
            .arg(config)
            .env("BLUFIO_LOG", "info")
            .env_remove("BLUFIO_GATEWAY_TOKEN");
        command
    }

    /// Writes `config` to a fresh temp dir named after `name`, serves it and waits until the
    /// daemon logs its address; the dir goes when the daemon drops.
    pub fn serve(&self, config: &str, name: &str) -> Daemon {
        let dir = temp_dir(name);
        let path = write_config(&dir, config);
        Daemon::start(&mut self.serve_command(&path), path).keeping(dir)
    }
}

/// Writes `blufio.toml` with `text` into `dir` and returns its path.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("blufio.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The smallest config: health and gateway on one `port`.
pub fn port_config(port: u16) -> String {
    format!("[daemon]\nhealth_port = {port}\n[gateway]\nport = {port}\n")
}

/// Picks a port the OS says is free right now; panics if none can be bound.
pub fn free_port() -> u16 {
    try_free_port().unwrap_or_else(|error| panic!("{error}"))
}

/// Returns a port that was free a moment ago: bind port 0, read the port, release it.
pub fn try_free_port() -> io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|error| {
        io::Error::new(error.kind(), format!("cannot bind 127.0.0.1:0: {error}"))
    })?;
    Ok(listener.local_addr()?.port())
}

/// Sends a signal by name (`TERM`, `HUP`, `STOP`, …) to `pid` through `kill`, which needs no
/// unsafe code here (std can only send SIGKILL).
pub fn signal(pid: u32, name: &str) -> io::Result<()> {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "kill -{name} {pid} failed: {status}"
        )))
    }
}

/// Waits for a child to exit; `None` if it is still running after `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
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

/// A child process that is killed (and reaped) when dropped, so a failing test or task leaves
/// no process behind (nor its binary busy for the next run).
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn new(child: Child) -> KillOnDrop {
        KillOnDrop(child)
    }
}

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A spawned child whose stderr (and, if asked, stdout) lines arrive on a channel, read by
/// threads so the child never blocks on a full pipe.
#[derive(Debug)]
pub struct Spawned {
    child: KillOnDrop,
    lines: mpsc::Receiver<String>,
}

impl Spawned {
    /// Spawns `command` with stdin and stdout closed and stderr collected.
    pub fn spawn(command: &mut Command) -> Spawned {
        Spawned::spawn_collecting(command, false)
    }

    /// Spawns `command`; with `stdout` its standard output lines are collected too.
    pub fn spawn_collecting(command: &mut Command, stdout: bool) -> Spawned {
        command
            .stdin(Stdio::null())
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let (sender, lines) = mpsc::channel();
        let mut streams: Vec<Box<dyn Read + Send>> = vec![Box::new(child.stderr.take().unwrap())];
        if let Some(out) = child.stdout.take() {
            streams.push(Box::new(out));
        }
        for stream in streams {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Spawned {
            child: KillOnDrop(child),
            lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child.0
    }

    /// The lines read so far and still to come.
    pub fn lines(&self) -> &mpsc::Receiver<String> {
        &self.lines
    }

    /// Waits for a line containing `pattern` and returns it; panics with the lines seen.
    pub fn wait_for_line(&self, pattern: &str, timeout: Duration) -> String {
        let mut seen = Vec::new();
        match self.find_line(|line| line.contains(pattern), timeout, &mut seen) {
            Some(line) => line,
            None => panic!("no line containing {pattern:?}; saw {seen:?}"),
        }
    }

    /// Collects lines up to and including the first that contains `marker`; panics with the
    /// lines seen after `timeout`.
    pub fn lines_until(&self, marker: &str, timeout: Duration) -> Vec<String> {
        let mut seen = Vec::new();
        match self.find_line(|line| line.contains(marker), timeout, &mut seen) {
            Some(line) => {
                seen.push(line);
                seen
            }
            None => panic!("no line with {marker:?} within {timeout:?}; saw {seen:#?}"),
        }
    }

    /// Reads lines until `found` accepts one (returned) or `timeout` passes (`None`); every
    /// other line is pushed onto `seen`.
    pub fn find_line(
        &self,
        mut found: impl FnMut(&str) -> bool,
        timeout: Duration,
        seen: &mut Vec<String>,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if found(&line) => return Some(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        None
    }

    /// Sends a signal by name (`TERM`, `HUP`, `STOP`, …); panics if `kill` fails.
    pub fn signal(&self, name: &str) {
        if let Err(error) = signal(self.pid(), name) {
            panic!("kill -{name}: {error}");
        }
    }

    /// Waits for the child to exit; kills it and panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        match wait_timeout(&mut self.child.0, timeout).unwrap() {
            Some(status) => status,
            None => {
                self.child.0.kill().unwrap();
                panic!("process did not exit within {timeout:?}");
            }
        }
    }

    /// Waits for the exit (killing the child and failing, with its output, after `timeout`,
    /// so a hang fails the test instead of hanging the suite) and returns the exit code (-1
    /// for a signal) with every line not yet read.
    pub fn finish(&mut self, timeout: Duration) -> (i32, Vec<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return (status.code().unwrap_or(-1), self.rest());
            }
            if Instant::now() > deadline {
                let _ = self.child.0.kill();
                let _ = self.child.0.wait();
                panic!("still running after {timeout:?}: {:#?}", self.rest());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM, asserts a clean exit (code 0) and returns the lines not yet read.
    pub fn stop(&mut self, timeout: Duration) -> Vec<String> {
        self.signal("TERM");
        let (code, output) = self.finish(timeout);
        assert_eq!(code, 0, "{output:#?}");
        output
    }

    /// The lines still to come from an exited child: its pipes are closed, so the readers
    /// end soon (bounded in case a grandchild holds a pipe open).
    fn rest(&self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            lines.push(line);
        }
        lines
    }

    /// Waits for the "listening on http://ADDR" line and returns the address.
    pub fn wait_for_addr(&self) -> SocketAddr {
        listening_addr(&self.wait_for_line("listening on http://", START_TIMEOUT)).unwrap()
    }

    /// Kills the child now and reaps it.
    pub fn kill(&mut self) {
        self.child.0.kill().unwrap();
        self.child.0.wait().unwrap();
    }
}

/// A `blufio serve` child that has logged the address it listens on.
#[derive(Debug)]
pub struct Daemon {
    process: Spawned,
    /// The temp dir of its files, removed after the process (declared first) is killed.
    dir: Option<TempDir>,
    addr: SocketAddr,
    config: PathBuf,
    /// The lines logged before the address, in order.
    pub startup: Vec<String>,
}

impl Daemon {
    /// Spawns `command` (serving `config`) and waits for its "listening on" line.
    pub fn start(command: &mut Command, config: PathBuf) -> Daemon {
        Daemon::listening(Spawned::spawn(command), config)
    }

    /// Waits until `process` logs its listening address.
    pub fn listening(process: Spawned, config: PathBuf) -> Daemon {
        let mut startup = Vec::new();
        let line = process
            .find_line(
                |line| line.contains("listening on http://"),
                START_TIMEOUT,
                &mut startup,
            )
            .unwrap_or_else(|| panic!("daemon logs its address; got {startup:?}"));
        let addr = listening_addr(&line).unwrap();
        startup.push(line);
        Daemon {
            process,
            dir: None,
            addr,
            config,
            startup,
        }
    }

    /// Keeps `dir` (its config, state, …) until the daemon drops, then removes it.
    pub fn keeping(mut self, dir: TempDir) -> Daemon {
        self.dir = Some(dir);
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends SIGTERM, asserts a clean exit and returns everything the daemon logged, from
    /// its first line.
    pub fn shut_down(&mut self, timeout: Duration) -> Vec<String> {
        let rest = self.process.stop(timeout);
        let mut all = self.startup.clone();
        all.extend(rest);
        all
    }

    /// The config file it serves (tests of reloads rewrite it).
    pub fn config(&self) -> &Path {
        &self.config
    }
}

impl Deref for Daemon {
    type Target = Spawned;

    fn deref(&self) -> &Spawned {
        &self.process
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Spawned {
        &mut self.process
    }
}

/// The address in a "listening on http://ADDR …" log line.
pub fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("listening on http://").nth(1)?;
    rest.split(' ').next()?.parse().ok()
}
