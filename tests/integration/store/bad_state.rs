//! State the daemon must refuse rather than reset or share: a second daemon on a state
//! directory in use, and a `blufio.db` that is damaged, not a database at all, or from a
//! newer schema. Each stops `serve` and `config check` with exit 78 and a message naming the
//! file (or the directory), and leaves the file as it was.

use std::path::Path;

use super::{Client, EXIT, Home, assert_refused, error_line, sqlite3};

/// Fills the store with `sessions` conversations of two exchanges of about 2 KiB each, so
/// that the file spans many pages, then stops the daemon cleanly.
fn fill_and_stop(home: &Home, sessions: usize) {
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    for session in 0..sessions {
        let text = format!("{session} {}", "page filler ".repeat(170));
        let id = client.say_ok(None, &text)["session_id"]
            .as_str()
            .unwrap()
            .to_owned();
        client.say_ok(Some(&id), &text);
    }
    daemon.shut_down(EXIT);
}

/// The database's page size, from its header (big-endian at offset 16; 1 means 65536).
fn page_size(db: &Path) -> u64 {
    let header = std::fs::read(db).unwrap();
    match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        size => u64::from(size),
    }
}

/// Overwrites pages `first..=last` (numbered from 1, as SQLite numbers them) with zeroes.
fn zero_pages(db: &Path, first: u64, last: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let size = page_size(db);
    let mut file = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    file.seek(SeekFrom::Start((first - 1) * size)).unwrap();
    let zeroes = vec![0u8; ((last - first + 1) * size) as usize];
    file.write_all(&zeroes).unwrap();
    file.sync_all().unwrap();
}

/// The number of pages in the file.
fn pages(db: &Path) -> u64 {
    std::fs::metadata(db).unwrap().len() / page_size(db)
}

/// Asserts that both `serve` and `config check` refuse the store with exit 78, naming the
/// file and saying `why`, and that neither changed it.
fn assert_both_refuse(home: &Home, why: &str) {
    let db = home.db();
    let before = std::fs::read(&db).unwrap();
    let serve = home.serve_to_exit("blufio.toml");
    let error = assert_refused("serve", &serve, &db);
    assert!(error.contains(why), "serve: {error}");
    let check = home.config_check();
    let error = assert_refused("config check", &check, &db);
    assert!(error.contains(why), "config check: {error}");
    assert!(
        std::fs::read(&db).unwrap() == before,
        "the refused file was changed"
    );
}

#[test]
fn a_second_daemon_on_the_same_state_dir_exits_78_naming_it_and_the_first_pid_and_the_first_serves_on()
 {
    let home = Home::new("store-second-daemon", "");
    let mut first = home.start();
    let client = Client::of(&first);
    let id = client.say_ok(None, "before the second")["session_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let second = Home::on(
        blufio_testkit::temp::temp_dir("store-second-daemon-config"),
        home.state().to_owned(),
        "",
    );
    let (code, output) = second.serve_to_exit("second.toml");
    assert_eq!(code, 78, "{output:#?}");
    let error = error_line(&output);
    assert!(
        error.contains(&home.state().display().to_string()),
        "{error}"
    );
    // Under qemu-user the pid is the emulator's, which is the child's own.
    assert!(error.contains(&format!("pid {}", first.pid())), "{error}");

    // The first is untouched: it answers, stores and reads back as before.
    assert_eq!(client.probe(), 200);
    assert_eq!(client.health()["store"]["ok"], true);
    client.say_ok(Some(&id), "after the second");
    assert_eq!(
        client.texts(&id),
        [
            "before the second",
            "before the second",
            "after the second",
            "after the second"
        ]
    );
    first.shut_down(EXIT);
    assert_eq!(sqlite3(&home.db(), "select count(*) from turns"), "4");
}

#[test]
fn a_database_with_zeroed_pages_stops_serve_and_config_check_with_exit_78_naming_the_file() {
    let home = Home::new("store-zeroed", "");
    fill_and_stop(&home, 12);
    let db = home.db();
    let wal = home.state().join("blufio.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "a clean stop leaves everything in the main file"
    );
    let count = pages(&db);
    assert!(count >= 8, "only {count} pages");
    zero_pages(&db, 2, count);
    assert_both_refuse(&home, "damaged");
}

/// A store whose middle page (a page of turns: the start-up reads nothing from it, since
/// the root, the schema and the sessions table come first in the file) is zeroed.
fn zeroed_in_the_middle(name: &str) -> Home {
    let home = Home::new(name, "");
    fill_and_stop(&home, 12);
    let db = home.db();
    let middle = pages(&db) / 2;
    zero_pages(&db, middle, middle);
    home
}

#[test]
fn config_check_finds_a_zeroed_page_in_the_middle_of_the_turns_and_exits_78() {
    let home = zeroed_in_the_middle("store-zeroed-middle-check");
    let db = home.db();
    let before = std::fs::read(&db).unwrap();
    let error = assert_refused("config check", &home.config_check(), &db);
    assert!(error.contains("damaged"), "{error}");
    assert!(std::fs::read(&db).unwrap() == before, "config check wrote");
}

#[test]
fn serve_refuses_a_zeroed_page_in_the_middle_of_the_turns_with_exit_78() {
    let home = zeroed_in_the_middle("store-zeroed-middle-serve");
    assert_both_refuse(&home, "damaged");
}

#[test]
fn a_file_of_garbage_where_the_database_goes_stops_serve_and_config_check_with_exit_78() {
    let home = Home::new("store-garbage", "");
    std::fs::create_dir_all(home.state()).unwrap();
    // 16 KiB of deterministic noise (a linear congruential generator).
    let mut seed: u32 = 0x2545_f491;
    let garbage: Vec<u8> = (0..16 * 1024)
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 24) as u8
        })
        .collect();
    std::fs::write(home.db(), &garbage).unwrap();
    assert_both_refuse(&home, "not an SQLite database");
}

#[test]
fn a_database_from_a_newer_schema_stops_serve_and_config_check_with_exit_78_and_is_kept() {
    let home = Home::new("store-newer", "");
    fill_and_stop(&home, 2);
    let db = home.db();
    assert_eq!(
        sqlite3(&db, "pragma user_version = 99; pragma user_version"),
        "99"
    );
    assert_both_refuse(&home, "schema version 99");
    assert_eq!(sqlite3(&db, "select count(*) from turns"), "8");
}
