//! `blufio sessions` on the real binary against a real daemon's store: read beside a running
//! daemon, delete refused while it runs and done once it has stopped, and what the next
//! daemon makes of that.

use std::{net::SocketAddr, path::Path, process::Output, time::Duration};

use blufio_testkit::{
    assert_contains,
    http::{get_with_token, post_json},
    process::{Daemon, free_port, write_config},
    temp::temp_dir,
};
use serde_json::Value;

use crate::support::{self, binary};

const TOKEN: &str = "sessions-cli-token-0123456789";
const STOP_TIMEOUT: Duration = support::EXIT_TIMEOUT;

/// One port for health and gateway, a state directory next to the config, the echo agent.
fn store_config(port: u16) -> String {
    format!(
        "[daemon]\nhealth_port = {port}\nstate_dir = \"state\"\n[gateway]\nport = {port}\n\
         token = \"{TOKEN}\"\n[agent]\nprovider = \"echo\"\n"
    )
}

/// Runs `blufio sessions <args> --config <config>` to the end.
fn sessions(config: &Path, args: &[&str]) -> Output {
    let mut all = vec!["sessions"];
    all.extend_from_slice(args);
    binary().run_config(&all, config)
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// Asserts `output` exited with `code` and returns its stdout.
fn expect_code(output: &Output, code: i32) -> String {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
    stdout(output)
}

fn message(addr: SocketAddr, session: Option<&str>, content: &str) -> Value {
    let body = match session {
        Some(id) => serde_json::json!({"session_id": id, "content": content}),
        None => serde_json::json!({"content": content}),
    };
    let response = post_json(addr, "/v1/messages", TOKEN, &body.to_string());
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

/// The stored sessions `list --json` names, with their message counts, sorted by id (two
/// sessions created in the same second are listed in id order).
fn listed_ids(config: &Path) -> Vec<(String, u64)> {
    let list: Value =
        serde_json::from_str(&expect_code(&sessions(config, &["list", "--json"]), 0)).unwrap();
    let mut ids: Vec<(String, u64)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|session| {
            (
                session["id"].as_str().unwrap().to_owned(),
                session["message_count"].as_u64().unwrap(),
            )
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn sessions_are_read_beside_a_running_daemon_and_deleted_only_once_it_has_stopped() {
    let port = free_port();
    let mut daemon = binary().serve(&store_config(port), "sessions-cli");
    let config = daemon.config().to_owned();
    let addr = daemon.addr();

    let created = post_json(addr, "/v1/sessions", TOKEN, r#"{"system":"Be brief."}"#);
    assert_eq!(created.status, 201, "{}", created.body);
    let kept = created.json()["id"].as_str().unwrap().to_owned();
    message(addr, Some(&kept), "hello there");
    message(addr, Some(&kept), "second \u{1b}[2J message");
    let opened = message(addr, None, "a session of its own");
    let other = opened["session_id"].as_str().unwrap().to_owned();

    // Read-only beside the running daemon: both sessions, with what they exchanged.
    let mut expected = vec![(kept.clone(), 4), (other.clone(), 2)];
    expected.sort();
    assert_eq!(listed_ids(&config), expected);
    let text = expect_code(&sessions(&config, &["list"]), 0);
    assert_contains(&text, &kept);
    assert_contains(&text, "MESSAGES");

    let shown = expect_code(&sessions(&config, &["show", &kept]), 0);
    assert_contains(&shown, &format!("session {kept}"));
    assert_contains(&shown, "    Be brief.");
    assert_contains(&shown, "    hello there");
    // What a client sent cannot drive the operator's terminal.
    assert_contains(&shown, "second \\u{1b}[2J message");
    assert!(!shown.contains('\u{1b}'), "{shown}");

    // The export round-trips what the gateway serves, system prompt in full.
    let exported: Value =
        serde_json::from_str(&expect_code(&sessions(&config, &["export", &kept]), 0)).unwrap();
    let served = get_with_token(addr, &format!("/v1/sessions/{kept}/messages"), TOKEN);
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(exported["messages"], served.json()["messages"]);
    assert_eq!(exported["messages"].as_array().unwrap().len(), 4);
    assert_eq!(exported["messages"][1]["content"], "hello there");
    assert_eq!(exported["session"]["id"], kept.as_str());
    assert_eq!(exported["session"]["system"], "Be brief.");
    let shown_json: Value = serde_json::from_str(&expect_code(
        &sessions(&config, &["show", &kept, "--json"]),
        0,
    ))
    .unwrap();
    assert_eq!(shown_json["messages"], exported["messages"]);
    assert_eq!(shown_json["session"]["system_bytes"], 9);

    // A running daemon owns the store: delete is refused, naming it, and nothing changes.
    let refused = sessions(&config, &["delete", &kept]);
    expect_code(&refused, 1);
    let error = stderr(&refused);
    assert_contains(&error, &format!("pid {}", daemon.pid()));
    assert_contains(&error, &format!("DELETE /v1/sessions/{kept}"));
    assert_eq!(listed_ids(&config).len(), 2);
    let still = get_with_token(addr, &format!("/v1/sessions/{kept}"), TOKEN);
    assert_eq!(still.status, 200, "{}", still.body);

    daemon.stop(STOP_TIMEOUT);
    let deleted = expect_code(&sessions(&config, &["delete", &kept]), 0);
    assert_contains(
        &deleted,
        &format!("deleted session {kept} and its 4 messages"),
    );
    assert_eq!(listed_ids(&config), vec![(other.clone(), 2)]);
    // Nothing left for the daemon's user to trip on: SQLite makes -wal and -shm even for a
    // read, owned by whoever ran it, and they went with the read.
    let state = config.parent().unwrap().join("state");
    for leftover in ["blufio.db-wal", "blufio.db-shm"] {
        assert!(!state.join(leftover).exists(), "{leftover} left behind");
    }
    let again = sessions(&config, &["delete", &kept]);
    expect_code(&again, 1);
    assert_contains(&stderr(&again), &format!("no session {kept}"));

    // The next daemon restores the session left and knows nothing of the deleted one.
    let mut restarted = Daemon::start(&mut binary().serve_command(&config), config.clone());
    let addr = restarted.addr();
    let gone = get_with_token(addr, &format!("/v1/sessions/{kept}"), TOKEN);
    assert_eq!(gone.status, 404, "{}", gone.body);
    let gone = get_with_token(addr, &format!("/v1/sessions/{kept}/messages"), TOKEN);
    assert_eq!(gone.status, 404, "{}", gone.body);
    let left = get_with_token(addr, &format!("/v1/sessions/{other}"), TOKEN);
    assert_eq!(left.status, 200, "{}", left.body);
    restarted.stop(STOP_TIMEOUT);
    // The first daemon's guard removes the directory both used, so it goes last.
    drop(restarted);
    drop(daemon);
}

#[test]
fn sessions_refuses_unknown_and_malformed_ids_with_exit_1() {
    let port = free_port();
    let mut daemon = binary().serve(&store_config(port), "sessions-ids");
    let config = daemon.config().to_owned();
    for verb in ["show", "export", "delete"] {
        let unknown = sessions(&config, &[verb, "0123456789abcdef0123456789abcdef"]);
        // Delete is refused for the running daemon before it looks for the id.
        expect_code(&unknown, 1);
        if verb != "delete" {
            assert_contains(
                &stderr(&unknown),
                "no session 0123456789abcdef0123456789abcdef in ",
            );
        }
        assert!(stdout(&unknown).is_empty(), "{}", stdout(&unknown));
        let malformed = sessions(&config, &[verb, "../../etc/passwd"]);
        expect_code(&malformed, 1);
        assert_contains(
            &stderr(&malformed),
            "\"../../etc/passwd\" is not a session id",
        );
    }
    daemon.stop(STOP_TIMEOUT);
}

#[test]
fn sessions_without_a_store_is_a_configuration_error_naming_the_setting() {
    let dir = temp_dir("sessions-no-store");
    let port = free_port();
    let cases = [
        (
            format!("[daemon]\nhealth_port = {port}\n"),
            "[daemon] state_dir: is not set",
        ),
        (
            format!(
                "[daemon]\nhealth_port = {port}\nstate_dir = \"state\"\n[store]\nenabled = false\n"
            ),
            "[store] enabled: is false",
        ),
    ];
    for (text, expected) in cases {
        let config = write_config(&dir, &text);
        let output = sessions(&config, &["list"]);
        expect_code(&output, 78);
        assert_contains(&stderr(&output), expected);
    }
    // A state directory the daemon never started in has no store yet: said, not created.
    let config = write_config(&dir, &store_config(port));
    let output = sessions(&config, &["delete", "0123456789abcdef0123456789abcdef"]);
    expect_code(&output, 78);
    assert_contains(&stderr(&output), "no session store here");
    assert!(!dir.join("state").exists());
}
