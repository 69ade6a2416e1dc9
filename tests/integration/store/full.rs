//! A store that cannot be written: at its `[store] max_mb` (SQLite's own SQLITE_FULL) and on
//! a real full disk (a 2 MiB tmpfs as the state directory, which needs root, as CI runs).
//! A message then fails with 503 `storage_unavailable`, counted in
//! `blufio_errors_total{type="storage"}` and shown in `/v1/health`; `/health` still answers,
//! nothing stored before is lost, and writes work again once there is room.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use super::{Client, EXIT, Home};

/// The text of one filler message: about 60 KB (under `max_message_bytes`), stored twice
/// (the echo agent repeats it).
fn filler(n: usize) -> String {
    format!("filler {n} {}", "0123456789".repeat(6_000))
}

/// Sends filler messages in session `session` (a new one first) until one fails; returns
/// the session, the texts stored before the failure and the failed response. Fails if 40
/// messages (4.8 MB) all fit.
fn fill_until_refused(client: &Client) -> (String, Vec<String>, blufio_testkit::http::Response) {
    let mut session: Option<String> = None;
    let mut stored = Vec::new();
    for n in 0..40 {
        let text = filler(n);
        let response = client.say(session.as_deref(), &text);
        if response.status != 200 {
            let id = session.expect("the first filler message fits");
            return (id, stored, response);
        }
        session = Some(response.json()["session_id"].as_str().unwrap().to_owned());
        stored.extend([text.clone(), text]);
    }
    panic!("40 filler messages all fitted");
}

/// Checks what a daemon whose store is full must show, after exactly one refused message.
fn assert_refused_and_reported(client: &Client, refused: &blufio_testkit::http::Response) {
    refused.assert_error(503, "storage_unavailable");
    assert_eq!(
        client.metric("blufio_errors_total", &[("type", "storage")]),
        Some(1.0),
        "one refused message counts once"
    );
    let health = client.health();
    assert_eq!(health["store"]["ok"], false, "{health}");
    assert!(
        health["store"]["error"]
            .as_str()
            .is_some_and(|error| !error.is_empty()),
        "{health}"
    );
    assert_eq!(client.probe(), 200, "/health answers on");
}

#[test]
fn a_store_at_its_max_mb_refuses_messages_with_503_keeps_what_it_has_and_recovers() {
    let home = Home::new("store-max-mb", "[store]\nmax_mb = 1\n");
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let kept = client.say_ok(None, "keep me")["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (filled, stored, refused) = fill_until_refused(&client);
    assert!(stored.len() >= 4, "{} filler turns fitted", stored.len());
    // The evictor makes room by removing the longest-idle sessions, but not before its
    // first round, 30 s after the start: everything stored is still there now.
    assert_refused_and_reported(&client, &refused);
    assert_eq!(client.texts(&kept), ["keep me", "keep me"]);
    assert_eq!(client.texts(&filled), stored, "no half-stored exchange");

    // Room returns when the filled session is deleted (deleting needs no new pages).
    let deleted = client.call("DELETE", &format!("/v1/sessions/{filled}"), None);
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    client.say_ok(Some(&kept), "written again");
    assert_eq!(
        client.texts(&kept),
        ["keep me", "keep me", "written again", "written again"]
    );
    let health = client.health();
    assert_eq!(health["store"]["ok"], true, "{health}");
    assert_eq!(
        health["store"]["error"],
        serde_json::Value::Null,
        "{health}"
    );
    daemon.shut_down(EXIT);
}

/// A tmpfs mounted for one test, unmounted when dropped (after the daemon using it).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert!(
            String::from_utf8_lossy(&uid.stdout).trim() == "0",
            "this test mounts a {size} tmpfs as a full disk and needs root (CI runs as root): \
             run it as root"
        );
        std::fs::create_dir_all(at).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "cannot mount a tmpfs on {} as root: {}",
            at.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process that has not let go yet cannot keep the mount alive.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `path` with one file until the disk says no more.
fn fill_disk(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 16 * 1024];
    for _ in 0..100_000 {
        if let Err(error) = file.write_all(&chunk).and_then(|()| file.sync_all()) {
            assert_eq!(error.raw_os_error(), Some(28), "ENOSPC: {error}");
            // What does not fit in a whole chunk still fits in smaller writes.
            for _ in 0..16 * 1024 {
                if file
                    .write_all(&[0x5a])
                    .and_then(|()| file.sync_all())
                    .is_err()
                {
                    return;
                }
            }
            return;
        }
    }
    panic!("{} never filled", path.display());
}

#[test]
fn a_full_disk_refuses_messages_with_503_loses_nothing_and_recovers_when_space_returns() {
    let home = Home::new("store-full-disk", "");
    let _mount = Tmpfs::mount(home.state(), "2m");
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let kept = client.say_ok(None, "keep me")["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    client.say_ok(Some(&kept), "and me");
    let ballast = home.state().join("ballast");
    fill_disk(&ballast);

    let mut refused = None;
    let mut stored = vec!["keep me", "keep me", "and me", "and me"]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
    for n in 0..40 {
        let text = format!("on a full disk {n} {}", "x".repeat(4000));
        let response = client.say(Some(&kept), &text);
        if response.status != 200 {
            refused = Some(response);
            break;
        }
        stored.extend([text.clone(), text]);
    }
    let refused = refused.expect("a message fails once the disk is full");
    assert_refused_and_reported(&client, &refused);
    assert_eq!(client.texts(&kept), stored, "nothing stored is lost");

    std::fs::remove_file(&ballast).unwrap();
    client.say_ok(Some(&kept), "space again");
    stored.extend(["space again".to_owned(), "space again".to_owned()]);
    assert_eq!(client.health()["store"]["ok"], true);
    assert_eq!(client.texts(&kept), stored);
    daemon.shut_down(EXIT);

    // And all of it survives a restart.
    let mut daemon = home.start();
    assert_eq!(Client::of(&daemon).texts(&kept), stored);
    daemon.shut_down(EXIT);
}
