//! The store through its handle and its thread, on a real file: what is committed, what a
//! reopening finds, group commit, a full database and the cap.

use std::{thread, time::Duration};

use futures_lite::future::block_on;

use super::*;
use crate::{agent::Role, sessions::SessionKind};

fn options(max_bytes: u64) -> StoreOptions {
    StoreOptions {
        max_bytes,
        idle_timeout_secs: 3600,
    }
}

fn open(dir: &Path, max_bytes: u64) -> Opened {
    Store::open(
        dir,
        options(max_bytes),
        20_000,
        StoreMetrics::noop(),
        ErrorCounter::noop(),
    )
    .unwrap()
}

fn record(id: &str, last_active_at: u64) -> StoredSession {
    StoredSession {
        id: id.to_owned(),
        kind: SessionKind::Http,
        model: Some("m".to_owned()),
        system: None,
        created_at: last_active_at,
        last_active_at,
        message_count: 0,
    }
}

fn turn(role: Role, content: &str) -> StoredTurn {
    StoredTurn {
        seq: 0,
        role,
        content: content.to_owned(),
        created_at: unix_now(),
        model: None,
        input_tokens: None,
        output_tokens: None,
        cost_usd: None,
    }
}

fn id(n: u32) -> String {
    format!("{n:032x}")
}

#[test]
fn appended_turns_and_spend_are_found_after_reopening() {
    let dir = blufio_testkit::temp::temp_dir("store-reopen");
    let opened = open(&dir, 0);
    assert!(opened.sessions.is_empty());
    let store = opened.store;
    block_on(async {
        store.create(record(&id(1), unix_now())).await.unwrap();
        for n in 0..3 {
            let turns = vec![
                turn(Role::User, &format!("question {n}")),
                turn(Role::Assistant, &format!("answer {n}")),
            ];
            store
                .append(&id(1), None, turns, Some((20_000, 0.25 * f64::from(n + 1))))
                .await
                .unwrap();
        }
        // A session the store has not seen is created by its first append.
        let turns = vec![turn(Role::User, "hi"), turn(Role::Assistant, "hello")];
        store
            .append(&id(2), Some(record(&id(2), unix_now())), turns, None)
            .await
            .unwrap();
        assert!(store.close(Duration::from_secs(10)).await);
    });
    let opened = open(&dir, 0);
    let ids: Vec<&str> = opened.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [id(1), id(2)]);
    assert_eq!(opened.sessions[0].message_count, 6);
    assert_eq!(opened.sessions[0].model.as_deref(), Some("m"));
    assert_eq!(opened.spent_today_usd, Some(0.75));
    let store = opened.store;
    block_on(async {
        let (page, more) = store.page(&id(1), None, 4, usize::MAX).await.unwrap();
        let seqs: Vec<u64> = page.iter().map(|turn| turn.seq).collect();
        assert_eq!((seqs, more), (vec![0, 1, 2, 3], true));
        let (rest, more) = store.page(&id(1), Some(3), 4, usize::MAX).await.unwrap();
        assert_eq!(rest.len(), 2);
        assert!(!more);
        assert_eq!(rest[1].content, "answer 2");
        assert_eq!(rest[1].role, Role::Assistant);
        // A page stops once it holds its bytes (one turn at least).
        let (small, more) = store.page(&id(1), None, 100, 1).await.unwrap();
        assert_eq!((small.len(), more), (1, true));
        // The newest turns within the bounds, oldest first.
        let history = store.history(&id(1), 3, 1000).await.unwrap();
        let texts: Vec<&str> = history.iter().map(|t| t.content.as_str()).collect();
        assert_eq!(texts, ["answer 1", "question 2", "answer 2"]);
        let history = store.history(&id(1), 100, 18).await.unwrap();
        assert_eq!(
            history.len(),
            2,
            "18 bytes hold `question 2` and `answer 2` only"
        );
        store.delete(vec![id(1)]).await.unwrap();
        let (gone, _) = store.page(&id(1), None, 10, usize::MAX).await.unwrap();
        assert!(gone.is_empty(), "a deleted session's turns go with it");
        assert!(store.close(Duration::from_secs(10)).await);
    });
    let opened = open(&dir, 0);
    assert_eq!(opened.sessions.len(), 1);
}

#[test]
fn sessions_idle_past_the_timeout_and_websocket_sessions_are_removed_at_open() {
    let dir = blufio_testkit::temp::temp_dir("store-expire");
    let store = open(&dir, 0).store;
    block_on(async {
        store.create(record(&id(1), unix_now())).await.unwrap();
        store
            .create(record(&id(2), unix_now() - 7200))
            .await
            .unwrap();
        let mut socket = record(&id(3), unix_now());
        socket.kind = SessionKind::WebSocket;
        store.create(socket).await.unwrap();
        assert!(store.close(Duration::from_secs(10)).await);
    });
    let opened = open(&dir, 0);
    assert_eq!(opened.expired, 2);
    let ids: Vec<&str> = opened.sessions.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [id(1)]);
}

#[test]
fn concurrent_writes_share_commits() {
    let dir = blufio_testkit::temp::temp_dir("store-group");
    let store = open(&dir, 0).store;
    let writers: Vec<_> = (0..16)
        .map(|n| {
            let store = store.clone();
            thread::spawn(move || {
                block_on(async {
                    store.create(record(&id(n), unix_now())).await.unwrap();
                    for _ in 0..20 {
                        let turns = vec![turn(Role::User, "q"), turn(Role::Assistant, "a")];
                        store.append(&id(n), None, turns, None).await.unwrap();
                    }
                });
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let conn = Connection::open(dir.join(DB_FILE)).unwrap();
    let turns: u64 = conn
        .query_row("SELECT count(*) FROM turns", [], |row| row.get(0))
        .unwrap();
    assert_eq!(turns, 16 * 20 * 2);
    let commits = store.shared.commits_so_far();
    // 336 writes: 16 threads waiting on one commit each time share it.
    assert!(commits < 336, "{commits} commits for 336 writes");
    assert!(block_on(store.close(Duration::from_secs(10))));
}

#[test]
fn a_full_database_fails_writes_keeps_what_it_has_and_recovers_when_space_is_freed() {
    let dir = blufio_testkit::temp::temp_dir("store-full");
    let store = open(&dir, 256 * 1024).store;
    let big = "x".repeat(16 * 1024);
    block_on(async {
        store.create(record(&id(1), unix_now() - 10)).await.unwrap();
        let mut failed = None;
        for n in 0..64 {
            let turns = vec![turn(Role::User, &big), turn(Role::Assistant, &big)];
            if let Err(error) = store.append(&id(1), None, turns, None).await {
                failed = Some(n);
                assert!(error.detail.contains("full"), "{}", error.detail);
                break;
            }
        }
        let failed = failed.expect("a 256 KiB database filled up");
        assert!(store.failing().is_some());
        // What was committed before is all there.
        let (page, _) = store.page(&id(1), None, 1000, usize::MAX).await.unwrap();
        assert_eq!(page.len(), failed * 2);
        // The cap removes the longest-idle session, and writes succeed again.
        store.create(record(&id(2), unix_now())).await.ok();
        let removed = store.enforce_cap().await.unwrap();
        assert_eq!(removed, [id(1)]);
        store.create(record(&id(3), unix_now())).await.unwrap();
        assert!(store.failing().is_none());
        assert!(store.close(Duration::from_secs(10)).await);
    });
}

#[test]
fn a_file_that_is_not_a_database_is_refused_untouched() {
    let dir = blufio_testkit::temp::temp_dir("store-garbage");
    let path = dir.join(DB_FILE);
    let garbage = b"this is not a database, it is an operator's notes".repeat(100);
    std::fs::write(&path, &garbage).unwrap();
    let error = Store::open(
        &dir,
        options(0),
        20_000,
        StoreMetrics::noop(),
        ErrorCounter::noop(),
    )
    .unwrap_err();
    assert!(error.is_config());
    let message = error.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("not an SQLite database"), "{message}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}
