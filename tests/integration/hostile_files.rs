//! Hostile and broken files: FIFOs and devices where the configuration, token or spend file
//! should be, an unwritable state directory, two daemons sharing one, a reload that changes
//! keys the daemon cannot apply live, and a connection cap above the open-file limit.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use blufio::{Agent, Call, Config, Context, Reply, ReplyFuture, Usage};

use blufio_testkit::assert_contains;
use blufio_testkit::process::{Spawned, free_port};
use blufio_testkit::temp::temp_dir;

use crate::{
    prometheus,
    support::{self, TOKEN},
};

/// What one reply costs with [`PricedAgent`].
const REPLY_USD: f64 = 0.25;

/// How long a daemon may take to drain and exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Answers every message at a fixed price, so spend is written without an upstream.
struct PricedAgent;

impl Agent for PricedAgent {
    fn reply<'a>(&'a self, call: Call<'a>) -> ReplyFuture<'a> {
        Box::pin(async move {
            Ok(Reply {
                content: call.message.to_owned(),
                usage: Some(Usage {
                    model: "priced".to_owned(),
                    input_tokens: 1,
                    output_tokens: 1,
                    cost_usd: REPLY_USD,
                    estimated: false,
                }),
                model: None,
            })
        })
    }
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

fn spawn(command: &mut Command) -> Spawned {
    Spawned::spawn_collecting(
        command
            .env("BLUFIO_LOG", "info")
            .env_remove("BLUFIO_GATEWAY_TOKEN"),
        true,
    )
}

fn serve(config: &Path) -> Spawned {
    spawn(
        support::binary()
            .command()
            .args(["serve", "--config"])
            .arg(config),
    )
}

fn check_config(config: &Path) -> Spawned {
    spawn(
        support::binary()
            .command()
            .args(["check-config", "--config"])
            .arg(config),
    )
}

/// `GET path` with a short read timeout: `None` when nothing answers in time.
fn get_within(addr: SocketAddr, path: &str, limit: Duration) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, limit).ok()?;
    stream.set_read_timeout(Some(limit)).unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    Some(support::parse_response(&raw).status)
}

fn port_config(extra: &str) -> String {
    let port = free_port();
    format!("[daemon]\nhealth_port = {port}\n{extra}\n[gateway]\nport = {port}\n")
}

#[test]
fn a_fifo_as_config_token_or_spend_file_is_refused_with_exit_78_and_never_hangs() {
    let dir = temp_dir("fifos");
    // The configuration file itself.
    let fifo_config = dir.join("fifo.toml");
    mkfifo(&fifo_config);
    // The token file.
    let token_fifo = dir.join("token");
    mkfifo(&token_fifo);
    let token_config = dir.join("token.toml");
    std::fs::write(&token_config, "[gateway]\ntoken_file = \"token\"\n").unwrap();
    // The spend file.
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    mkfifo(&state.join("spend.json"));
    let state_config = dir.join("state.toml");
    std::fs::write(&state_config, port_config("state_dir = \"state\"")).unwrap();

    for (config, expected) in [
        (&fifo_config, "cannot read config file"),
        (&token_config, "cannot read token file"),
        (&state_config, "spend.json"),
    ] {
        for mut child in [check_config(config), serve(config)] {
            let (code, output) = child.finish(Duration::from_secs(10));
            assert_eq!(code, 78, "{config:?}: {output:#?}");
            let error = output.iter().find(|line| line.starts_with("blufio: "));
            let error = error.unwrap_or_else(|| panic!("{config:?}: {output:#?}"));
            assert!(error.contains(expected), "{error}");
            assert_contains(error, "FIFO (named pipe), not a regular file");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_spend_file_linked_to_dev_zero_or_sparse_is_refused_without_reading_it() {
    let dir = temp_dir("endless");
    let zero = dir.join("zero");
    std::fs::create_dir_all(&zero).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("spend.json")).unwrap();
    let sparse = dir.join("sparse");
    std::fs::create_dir_all(&sparse).unwrap();
    // 20 GB of nothing: it costs no disk, and reading it whole would cost 20 GB of memory.
    std::fs::File::create(sparse.join("spend.json"))
        .unwrap()
        .set_len(20 << 30)
        .unwrap();
    for (state, expected) in [
        ("zero", "a character device, not a regular file"),
        ("sparse", "larger than 1048576 bytes"),
    ] {
        let config = dir.join(format!("{state}.toml"));
        std::fs::write(&config, port_config(&format!("state_dir = \"{state}\""))).unwrap();
        let started = Instant::now();
        let (code, output) = serve(&config).finish(Duration::from_secs(10));
        assert_eq!(code, 78, "{output:#?}");
        assert!(
            output.iter().any(|line| line.contains(expected)),
            "{output:#?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reload_meeting_a_fifo_token_file_is_refused_while_health_keeps_answering() {
    let dir = temp_dir("reload-fifo");
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}-0123456789\n")).unwrap();
    let config = dir.join("blufio.toml");
    std::fs::write(
        &config,
        // One worker: a reload that blocked its thread would block every request.
        format!("{}token_file = \"token\"\n", port_config("workers = 1")),
    )
    .unwrap();
    let mut daemon = serve(&config);
    let addr = daemon.wait_for_addr();
    std::fs::remove_file(&token).unwrap();
    mkfifo(&token);

    for attempt in 1..=2 {
        daemon.signal("HUP");
        // Every refused reload is an error line, the second within a minute too.
        let refused = daemon.wait_for_line("reload refused", Duration::from_secs(15));
        assert!(refused.contains("ERROR"), "attempt {attempt}: {refused}");
        assert!(refused.contains("FIFO (named pipe)"), "{refused}");
        assert_eq!(
            get_within(addr, "/health", Duration::from_secs(2)),
            Some(200),
            "attempt {attempt}: /health stalled behind the reload"
        );
    }
    // The running token still opens the gateway.
    let reply = support::request(
        addr,
        "GET",
        "/v1/health",
        &[("Authorization", &format!("Bearer {TOKEN}-0123456789"))],
        None,
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    daemon.stop(STOP_TIMEOUT);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reload_names_every_changed_key_and_applies_the_daily_budget_at_once() {
    let dir = temp_dir("reload-keys");
    let config_path = dir.join("blufio.toml");
    let text = |port: u16, budget: f64, model: &str| {
        format!(
            "[daemon]\nhealth_port = {port}\n[gateway]\nport = {port}\ntoken = \"{TOKEN}\"\n\
             [agent]\nmodel = \"{model}\"\n[cost]\ndaily_budget_usd = {budget:?}\n"
        )
    };
    std::fs::write(&config_path, text(free_port(), 1.0, "first-model")).unwrap();
    let config = Config::load(Some(&config_path)).unwrap();
    let daemon = support::start_with(
        Context::builder(config)
            .with_agent(PricedAgent)
            .with_config_path(Some(config_path.clone())),
    );
    let health = || daemon.authed(TOKEN, "GET", "/v1/health", None).json();
    assert_eq!(health()["budget"]["daily_usd"], 1.0);

    std::fs::write(&config_path, text(free_port(), 5.0, "second-model")).unwrap();
    let report = async_io::block_on(blufio::internals::reload::reload(&daemon.ctx)).unwrap();
    assert_eq!(report.changed, ["[cost] daily_budget_usd"], "{report}");
    for key in ["[agent] model", "[daemon] health_port", "[gateway] port"] {
        assert!(
            report.needs_restart.iter().any(|k| k == key),
            "{key} not named: {report}"
        );
    }
    assert!(!report.to_string().contains("nothing changed"), "{report}");
    assert_eq!(health()["budget"]["daily_usd"], 5.0);
    // The new budget is what admission checks: 8 replies at 0.25 fit in 5 USD, not in 1.
    for _ in 0..8 {
        let reply = daemon.authed(TOKEN, "POST", "/v1/messages", Some(r#"{"content":"hi"}"#));
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unwritable_state_dir_is_reported_leaves_no_temporary_file_and_recovers() {
    let state = temp_dir("unwritable");
    let mut config = support::config_with_token(TOKEN);
    config.daemon.state_dir = Some(state.to_path_buf());
    // The spend file's writer; the session store's failures are in `store_failures.rs`.
    config.store.enabled = false;
    let daemon = support::start_with(Context::builder(config).with_agent(PricedAgent));
    let post = || daemon.authed(TOKEN, "POST", "/v1/messages", Some(r#"{"content":"hi"}"#));
    let health = || daemon.authed(TOKEN, "GET", "/v1/health", None).json();
    let wait_for = |persisted: bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let body = health();
            if body["budget"]["persisted"] == persisted {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "persisted never became {persisted}: {body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(post().status, 200);
    let spend = state.join("spend.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spend.exists() {
        assert!(
            Instant::now() < deadline,
            "the first spend was never written"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_for(true);

    // A non-empty directory where spend.json goes: every rename fails, for root too.
    std::fs::remove_file(&spend).unwrap();
    std::fs::create_dir_all(spend.join("in-the-way")).unwrap();
    assert_eq!(post().status, 200, "the reply is still served and charged");
    let body = wait_for(false);
    assert_eq!(body["budget"]["spent_today_usd"], 2.0 * REPLY_USD, "{body}");
    assert!(
        body["budget"]["state_error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    assert!(
        !state.join("spend.json.tmp").exists(),
        "temporary file left"
    );
    let metrics = prometheus::parse(&daemon.get_ok("/metrics"));
    let failures = metrics
        .value("blufio_errors_total", &[("type", "state_write")])
        .unwrap();
    assert!(failures >= 1.0, "{failures}");

    // Repaired: the pending spend is written without another reply.
    std::fs::remove_dir_all(&spend).unwrap();
    let body = wait_for(true);
    assert_eq!(
        body["budget"]["state_error"],
        serde_json::Value::Null,
        "{body}"
    );
    let text = std::fs::read_to_string(&spend).unwrap();
    assert!(text.contains("\"spent_usd\":0.5"), "{text}");
    daemon.stop();
    std::fs::remove_dir_all(&state).unwrap();
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused_naming_the_directory_and_pid() {
    let dir = temp_dir("shared-state");
    let state = dir.join("state");
    let first_config = dir.join("first.toml");
    std::fs::write(&first_config, port_config("state_dir = \"state\"")).unwrap();
    let second_config = dir.join("second.toml");
    std::fs::write(&second_config, port_config("state_dir = \"state\"")).unwrap();
    let mut first = serve(&first_config);
    first.wait_for_addr();
    let (code, output) = serve(&second_config).finish(Duration::from_secs(10));
    assert_eq!(code, 78, "{output:#?}");
    let error = output
        .iter()
        .find(|line| line.starts_with("blufio: "))
        .unwrap_or_else(|| panic!("{output:#?}"));
    assert!(error.contains(&state.display().to_string()), "{error}");
    // Under qemu-user the pid is the emulator's, which is the child's own.
    assert!(error.contains(&format!("pid {}", first.pid())), "{error}");
    first.stop(STOP_TIMEOUT);
    // Once the first is gone, the directory is free again.
    let mut again = serve(&second_config);
    again.wait_for_addr();
    again.stop(STOP_TIMEOUT);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_daemons_in_one_process_need_two_state_dirs() {
    let dir = temp_dir("in-process-state");
    let config = |name: &str| {
        let mut config = Config::for_tests();
        config.daemon.state_dir = Some(dir.join(name));
        config
    };
    let first = support::start(config("a"));
    let second = support::start(config("b"));
    assert_eq!(first.get("/health").status, 200);
    assert_eq!(second.get("/health").status, 200);
    let error = Context::new(config("a")).unwrap_err();
    assert!(error.is_config(), "exit 78");
    let message = error.to_string();
    assert_contains(&message, &dir.join("a").display().to_string());
    assert!(message.contains("in this process"), "{message}");
    first.stop();
    second.stop();
    // Released by the shutdown: the directory can be used again.
    let third = support::start(config("a"));
    third.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn check_config_reads_the_spend_file_as_start_up_would() {
    let dir = temp_dir("check-state");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let config = dir.join("blufio.toml");
    std::fs::write(&config, port_config("state_dir = \"state\"")).unwrap();

    // Writes the spend file, runs check-config and returns its exit code and output.
    let check_with_spend = |spend: &str| {
        std::fs::write(state.join("spend.json"), spend).unwrap();
        check_config(&config).finish(Duration::from_secs(10))
    };
    let (code, output) = check_with_spend(r#"{"version":1,"utc_day":20000,"spent_u"#);
    assert_eq!(code, 78, "{output:#?}");
    let found = |output: &[String], wanted: fn(&str) -> bool| output.iter().any(|l| wanted(l));
    assert!(
        found(&output, |line| line.contains("spend.json")
            && line.contains("not valid JSON")),
        "{output:#?}"
    );
    let (code, _) = serve(&config).finish(Duration::from_secs(10));
    assert_eq!(code, 78, "start-up agrees");

    let (code, output) = check_with_spend(r#"{"version":1,"utc_day":20000,"spent_usd":1.5}"#);
    assert_eq!(code, 0, "{output:#?}");
    assert!(
        found(&output, |line| line.starts_with("state: ")
            && line.contains("ok")),
        "{output:#?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the binary under `ulimit -n 256` (soft and hard), through cargo's runner when the
/// binary is foreign, as the fd-exhaustion test does.
#[cfg(target_os = "linux")]
fn under_fd_limit(args: &[&str], config: &Path) -> Spawned {
    let binary = support::binary();
    spawn(
        Command::new("bash")
            .args([
                "-c",
                "ulimit -n 256 && exec $RUNNER \"$0\" \"$1\" --config \"$2\"",
            ])
            .arg(binary.path())
            .args(args)
            .arg(config)
            .env("RUNNER", binary.runner()),
    )
}

#[test]
#[cfg(target_os = "linux")]
fn max_connections_past_the_open_file_limit_is_clamped_with_a_warning_naming_both_numbers() {
    let dir = temp_dir("fd-clamp");
    let config = dir.join("blufio.toml");
    std::fs::write(&config, port_config("max_connections = 1000")).unwrap();

    let (code, output) = under_fd_limit(&["check-config"], &config).finish(Duration::from_secs(10));
    assert_eq!(code, 0, "{output:#?}");
    let warning = output
        .iter()
        .find(|line| line.contains("warning"))
        .unwrap_or_else(|| panic!("{output:#?}"));
    assert!(warning.contains("max_connections = 1000"), "{warning}");
    assert!(warning.contains("open-file limit is 256"), "{warning}");
    assert!(warning.contains("at most 192"), "{warning}");

    let mut daemon = under_fd_limit(&["serve"], &config);
    let warning = daemon.wait_for_line("max_connections = 1000", Duration::from_secs(30));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("open-file limit is 256"), "{warning}");
    assert!(warning.contains("at most 192"), "{warning}");
    let addr = daemon.wait_for_addr();
    // Past the clamped cap the daemon refuses with a JSON 503 instead of running out of
    // descriptors: every connection gets an answer or a close, none hangs.
    let flood: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    assert!(flood.len() >= 192, "{}", flood.len());
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(20);
    while get_within(addr, "/health", Duration::from_secs(2)) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "/health never answered after the flood"
        );
    }
    daemon.stop(STOP_TIMEOUT);
    std::fs::remove_dir_all(&dir).unwrap();
}
