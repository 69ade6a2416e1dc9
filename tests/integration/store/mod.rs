//! The session store (`<state_dir>/blufio.db`) proved on the real binary: what a restart, a
//! SIGKILL or memory pressure must not lose, the bad states that must stop start-up, a full
//! store or disk, and the `sqlite3` shell reading the file. This file holds what those tests
//! share: a state directory with the config that serves it, a client for the gateway and
//! the `sqlite3` shell.

mod bad_state;
mod full;
mod pressure;
mod restart;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use blufio_testkit::{
    http::{Response, request},
    process::{Daemon, Spawned, free_port},
    temp::{TempDir, temp_dir},
};
use serde_json::{Value, json};

use crate::{
    prometheus,
    support::{self, TOKEN},
};

/// How long a daemon may take to drain and exit, or to refuse to start.
pub const EXIT: Duration = Duration::from_secs(20);

/// The `[agent]` of most tests: the echo agent, whose reply is the message itself.
pub const ECHO: &str = "[agent]\nprovider = \"echo\"\n";

/// The API key the daemon is given for a fake Anthropic upstream.
pub const API_KEY: &str = "sk-ant-store-test";

/// A directory for one test: the config files and (unless the test mounts its own) the
/// state directory, removed at the end.
pub struct Home {
    dir: TempDir,
    state: PathBuf,
    agent: String,
    extra: String,
}

impl Home {
    /// A home whose state directory is `<dir>/state`, served with the echo agent and `extra`
    /// (whole TOML tables, such as `[store]\nmax_mb = 1`).
    pub fn new(name: &str, extra: &str) -> Home {
        let dir = temp_dir(name);
        let state = dir.join("state");
        Home::on(dir, state, extra)
    }

    /// A home whose state directory is `state` (another home's, or a mount point).
    pub fn on(dir: TempDir, state: PathBuf, extra: &str) -> Home {
        Home {
            dir,
            state,
            agent: ECHO.to_owned(),
            extra: extra.to_owned(),
        }
    }

    /// Serves `agent` (a whole `[agent]` table) instead of the echo agent.
    pub fn with_agent(mut self, agent: &str) -> Home {
        self.agent = agent.to_owned();
        self
    }

    pub fn state(&self) -> &Path {
        &self.state
    }

    /// The database file.
    pub fn db(&self) -> PathBuf {
        self.state.join(blufio::DB_FILE)
    }

    /// Writes `<dir>/<file>` serving the state directory on a port free now; returns it.
    pub fn write_config(&self, file: &str) -> PathBuf {
        let port = free_port();
        let text = format!(
            "[daemon]\nhealth_port = {port}\nstate_dir = {state:?}\nmax_connections_per_ip = 256\n\
             [gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n{agent}{extra}\n",
            state = self.state.display().to_string(),
            agent = self.agent,
            extra = self.extra,
        );
        let path = self.dir.join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn serve_command(&self, config: &Path) -> Command {
        let mut command = support::binary().serve_command(config);
        command.env("ANTHROPIC_API_KEY", API_KEY);
        command
    }

    /// Starts `blufio serve` on a fresh config and waits until it listens.
    pub fn start(&self) -> Daemon {
        let config = self.write_config("blufio.toml");
        Daemon::start(&mut self.serve_command(&config), config)
    }

    /// Starts `blufio serve` from config file `file`, expecting it to exit; returns its exit
    /// code and everything it printed.
    pub fn serve_to_exit(&self, file: &str) -> (i32, Vec<String>) {
        let config = self.write_config(file);
        Spawned::spawn_collecting(&mut self.serve_command(&config), true).finish(EXIT)
    }

    /// Runs `blufio config check` on the config; returns its exit code and output.
    pub fn config_check(&self) -> (i32, Vec<String>) {
        let config = self.write_config("blufio.toml");
        let mut command = support::binary().command();
        command
            .args(["config", "check", "--config"])
            .arg(&config)
            .env("ANTHROPIC_API_KEY", API_KEY)
            .env_remove("BLUFIO_GATEWAY_TOKEN");
        Spawned::spawn_collecting(&mut command, true).finish(EXIT)
    }
}

/// Returns the `blufio: …` error line of a refused start, failing with all of the output
/// when there is none.
pub fn error_line(output: &[String]) -> &str {
    output
        .iter()
        .find(|line| line.starts_with("blufio: "))
        .unwrap_or_else(|| panic!("no `blufio: ` error line in {output:#?}"))
}

/// Asserts that a start or a check was refused with exit 78 and an error naming `db`, and
/// returns the error line.
pub fn assert_refused(what: &str, (code, output): &(i32, Vec<String>), db: &Path) -> String {
    assert_eq!(code, &78, "{what}: {output:#?}");
    assert!(
        !output.iter().any(|line| line.contains("listening on")),
        "{what} started serving: {output:#?}"
    );
    let error = error_line(output).to_owned();
    assert!(
        error.contains(&db.display().to_string()),
        "{what} does not name {}: {error}",
        db.display()
    );
    error
}

/// The gateway of a running daemon, spoken to with `TOKEN`.
#[derive(Debug, Clone, Copy)]
pub struct Client(pub SocketAddr);

impl Client {
    pub fn of(daemon: &Daemon) -> Client {
        Client(daemon.addr())
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        let auth = format!("Bearer {TOKEN}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("Content-Type", "application/json"));
        }
        request(self.0, method, path, &headers, body)
    }

    /// `POST /v1/messages` with `content`, in session `session` (a new one when `None`).
    pub fn say(&self, session: Option<&str>, content: &str) -> Response {
        let body = match session {
            Some(id) => json!({ "session_id": id, "content": content }),
            None => json!({ "content": content }),
        };
        self.call("POST", "/v1/messages", Some(&body.to_string()))
    }

    /// Like [`Client::say`], asserting a 200; returns the reply's JSON.
    pub fn say_ok(&self, session: Option<&str>, content: &str) -> Value {
        let response = self.say(session, content);
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    }

    /// Opens a session with `POST /v1/sessions` (with `body`, if any); returns its id.
    pub fn create(&self, body: Option<&str>) -> String {
        let response = self.call("POST", "/v1/sessions", body);
        assert_eq!(response.status, 201, "{}", response.body);
        response.json()["id"].as_str().unwrap().to_owned()
    }

    /// Every message of session `id`, read three at a time through the `next` cursors.
    pub fn messages(&self, id: &str) -> Vec<Value> {
        let mut messages = Vec::new();
        let mut path = format!("/v1/sessions/{id}/messages?limit=3");
        for _ in 0..10_000 {
            let response = self.call("GET", &path, None);
            assert_eq!(response.status, 200, "GET {path}: {}", response.body);
            let page = response.json();
            let items = page["messages"].as_array().unwrap();
            assert!(items.len() <= 3, "{page}");
            messages.extend(items.iter().cloned());
            match page["next"].as_str() {
                Some(cursor) => {
                    path = format!("/v1/sessions/{id}/messages?limit=3&cursor={cursor}")
                }
                None => return messages,
            }
        }
        panic!("session {id}: no last page after 10,000");
    }

    /// The texts of session `id`'s messages, in order.
    pub fn texts(&self, id: &str) -> Vec<String> {
        self.messages(id)
            .iter()
            .map(|message| message["content"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Every session of `GET /v1/sessions`, through its `next` cursors.
    pub fn sessions(&self) -> Vec<Value> {
        let mut sessions = Vec::new();
        let mut path = "/v1/sessions?limit=2".to_owned();
        for _ in 0..10_000 {
            let response = self.call("GET", &path, None);
            assert_eq!(response.status, 200, "GET {path}: {}", response.body);
            let page = response.json();
            sessions.extend(page["sessions"].as_array().unwrap().iter().cloned());
            match page["next"].as_str() {
                Some(cursor) => path = format!("/v1/sessions?limit=2&cursor={cursor}"),
                None => return sessions,
            }
        }
        panic!("no last page of sessions after 10,000");
    }

    /// `/v1/health` (the detailed one, with `budget` and `store`).
    pub fn health(&self) -> Value {
        let response = self.call("GET", "/v1/health", None);
        assert_eq!(response.status, 200, "{}", response.body);
        response.json()
    }

    /// The status of the plain `/health` probe.
    pub fn probe(&self) -> u16 {
        request(self.0, "GET", "/health", &[], None).status
    }

    /// One series of `/metrics`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let response = request(self.0, "GET", "/metrics", &[], None);
        assert_eq!(response.status, 200, "{}", response.body);
        prometheus::parse(&response.body).value(name, labels)
    }
}

/// Runs the `sqlite3` shell on `db` with `sql`; returns what it printed, trimmed. Fails,
/// never skips, when the shell is missing: the tests that prove the file is a plain SQLite
/// database need it.
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let output = Command::new("sqlite3")
        .arg(db)
        .arg(sql)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "cannot run the sqlite3 shell ({error}): install Debian's sqlite3 package \
                 (apt-get install sqlite3), as CI does"
            )
        });
    assert!(
        output.status.success(),
        "sqlite3 {} {sql:?}: {}",
        db.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The UTC day of now, in days since the Unix epoch, as `spend.json` and the store count.
pub fn utc_today() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400
}
