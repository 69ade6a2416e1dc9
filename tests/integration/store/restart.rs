//! What the store keeps across a restart of the real binary: every session with its id,
//! message count and history, the day's spend, a reply received just before a SIGKILL, and
//! `spend.json` imported once; and the database is a plain SQLite file the `sqlite3` shell
//! reads while the daemon runs and after it stops.

use std::collections::BTreeMap;

use blufio_testkit::fake_provider::{self, FakeProvider, Scripted};
use serde_json::Value;

use super::{Client, EXIT, Home, sqlite3, utc_today};

/// What one Anthropic reply costs here: one input token at 250,000 USD per million.
const REPLY_USD: f64 = 0.25;

/// The id → message count of every listed session.
fn counts(client: &Client) -> BTreeMap<String, u64> {
    client
        .sessions()
        .iter()
        .map(|session| {
            (
                session["id"].as_str().unwrap().to_owned(),
                session["message_count"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn spent_today(client: &Client) -> f64 {
    client.health()["budget"]["spent_today_usd"]
        .as_f64()
        .unwrap()
}

#[test]
fn a_restart_finds_every_session_history_and_the_days_spend_and_continues_each_conversation() {
    let fake = FakeProvider::start();
    let agent = format!(
        "[agent]\nprovider = \"anthropic\"\nbase_url = \"{}\"\ntimeout_secs = 20\n",
        fake.url()
    );
    let home = Home::new(
        "store-restart",
        "[cost.models.\"claude-sonnet-4-5\"]\ninput_usd_per_mtok = 250000.0\n\
         output_usd_per_mtok = 0.0\n",
    )
    .with_agent(&agent);
    let mut daemon = home.start();
    let client = Client::of(&daemon);

    // Three conversations of different lengths (one with a system prompt) and a session
    // opened with nothing said in it yet.
    let briefed = client.create(Some(r#"{"system": "be brief"}"#));
    let empty = client.create(None);
    let mut expected: BTreeMap<String, Vec<String>> = BTreeMap::new();
    expected.insert(briefed.clone(), Vec::new());
    expected.insert(empty.clone(), Vec::new());
    let mut replies = 0;
    for (conversation, length) in [(0, 3), (1, 1), (2, 4)] {
        let mut session = (conversation == 0).then(|| briefed.clone());
        for turn in 0..length {
            let question = format!("question {turn} of conversation {conversation}");
            let answer = format!("answer {turn} of conversation {conversation}");
            fake.push([Scripted::ok(&fake_provider::anthropic_reply(&answer, 1, 0))]);
            let reply = client.say_ok(session.as_deref(), &question);
            assert_eq!(reply["content"], answer, "{reply}");
            replies += 1;
            let id = reply["session_id"].as_str().unwrap().to_owned();
            expected
                .entry(id.clone())
                .or_default()
                .extend([question, answer]);
            session = Some(id);
        }
    }
    assert_eq!(expected.len(), 4);
    let before_counts = counts(&client);
    let before_messages: BTreeMap<String, Vec<Value>> = expected
        .keys()
        .map(|id| (id.clone(), client.messages(id)))
        .collect();
    assert_eq!(spent_today(&client), replies as f64 * REPLY_USD);
    daemon.shut_down(EXIT);

    let mut daemon = home.start();
    let client = Client::of(&daemon);
    assert_eq!(
        counts(&client),
        before_counts,
        "the same sessions and counts"
    );
    for (id, texts) in &expected {
        assert_eq!(before_counts[id], texts.len() as u64, "session {id}");
        let messages = client.messages(id);
        assert_eq!(messages, before_messages[id], "session {id}, every field");
        let read: Vec<&str> = messages
            .iter()
            .map(|message| message["content"].as_str().unwrap())
            .collect();
        assert_eq!(read, *texts, "session {id}: the same text in order");
        for (seq, message) in messages.iter().enumerate() {
            assert_eq!(message["seq"], seq as u64, "{message}");
            let role = if seq % 2 == 0 { "user" } else { "assistant" };
            assert_eq!(message["role"], role, "{message}");
            assert!(message["created_at"].as_u64().unwrap() > 0, "{message}");
        }
        if let Some(answer) = messages.get(1) {
            assert_eq!(answer["input_tokens"], 1, "{answer}");
            assert_eq!(answer["cost_usd"], REPLY_USD, "{answer}");
        }
    }
    assert_eq!(
        spent_today(&client),
        replies as f64 * REPLY_USD,
        "the day's spend"
    );

    // Each conversation goes on where it stopped: the upstream is sent the whole history
    // (and the system prompt) read back from the store, and the new turns are numbered
    // after the stored ones.
    for (id, texts) in &expected {
        fake.push([Scripted::ok(&fake_provider::anthropic_reply("later", 1, 0))]);
        let reply = client.say_ok(Some(id), "and after the restart?");
        assert_eq!(reply["session_id"], id.as_str());
        let sent = fake.requests().last().unwrap().body.clone();
        let history = sent["messages"].as_array().unwrap();
        assert_eq!(history.len(), texts.len() + 1, "{sent}");
        let sent_text = sent["messages"].to_string();
        for text in texts {
            assert!(sent_text.contains(text.as_str()), "{text} not sent: {sent}");
        }
        if *id == briefed {
            assert_eq!(sent["system"], "be brief", "{sent}");
        }
        let messages = client.messages(id);
        assert_eq!(messages.len(), texts.len() + 2);
        let next = texts.len() as u64;
        assert_eq!(messages[texts.len()]["seq"], next);
        assert_eq!(messages[texts.len()]["content"], "and after the restart?");
        assert_eq!(messages[texts.len() + 1]["seq"], next + 1);
        assert_eq!(messages[texts.len() + 1]["content"], "later");
    }
    assert_eq!(
        spent_today(&client),
        (replies + expected.len()) as f64 * REPLY_USD
    );
    daemon.shut_down(EXIT);
}

#[test]
fn a_reply_received_just_before_a_sigkill_is_in_the_session_after_the_restart() {
    let home = Home::new("store-sigkill", "");
    let mut session: Option<String> = None;
    let mut said: Vec<String> = Vec::new();
    for round in 0..3 {
        let mut daemon = home.start();
        let client = Client::of(&daemon);
        if let Some(id) = &session {
            assert_eq!(client.texts(id), said, "after SIGKILL {round}");
        }
        let text = format!(
            "the last words before kill {round}: {}",
            "x".repeat(round * 500)
        );
        let reply = client.say_ok(session.as_deref(), &text);
        // The reply is in hand: kill at once, with no chance to flush anything more.
        daemon.kill();
        assert_eq!(reply["content"], text.as_str());
        session = Some(reply["session_id"].as_str().unwrap().to_owned());
        said.extend([text.clone(), text]);
    }
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let id = session.unwrap();
    assert_eq!(client.texts(&id), said);
    let listed = client.sessions();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["message_count"], said.len() as u64);
    daemon.shut_down(EXIT);
}

#[test]
fn replies_to_concurrent_clients_all_survive_a_sigkill_right_after_the_last() {
    const CLIENTS: usize = 8;
    const MESSAGES: usize = 4;
    let home = Home::new("store-sigkill-concurrent", "");
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let writes = || {
        client
            .metric("blufio_store_writes_total", &[])
            .unwrap_or(0.0)
    };
    let commits = || {
        client
            .metric("blufio_store_commits_total", &[])
            .unwrap_or(0.0)
    };
    let (writes_before, commits_before) = (writes(), commits());
    let conversations: Vec<(String, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|n| {
                scope.spawn(move || {
                    let mut session: Option<String> = None;
                    let mut said = Vec::new();
                    for m in 0..MESSAGES {
                        let text = format!("client {n} message {m}");
                        let reply = client.say_ok(session.as_deref(), &text);
                        session = Some(reply["session_id"].as_str().unwrap().to_owned());
                        said.extend([text.clone(), text]);
                    }
                    (session.unwrap(), said)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // One write per message; commits group them (one per message at most).
    let (writes_after, commits_after) = (writes(), commits());
    daemon.kill();
    assert_eq!(writes_after - writes_before, (CLIENTS * MESSAGES) as f64);
    let commits = commits_after - commits_before;
    assert!(
        (1.0..=(CLIENTS * MESSAGES) as f64).contains(&commits),
        "{commits} commits"
    );

    let mut daemon = home.start();
    let client = Client::of(&daemon);
    assert_eq!(client.sessions().len(), CLIENTS);
    for (id, said) in &conversations {
        assert_eq!(client.texts(id), *said, "session {id}");
    }
    daemon.shut_down(EXIT);
}

#[test]
fn a_streamed_reply_whose_done_event_arrived_before_a_sigkill_is_in_the_session_after_the_restart()
{
    let home = Home::new("store-sigkill-stream", "");
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let text = "streamed, then killed";
    let body = serde_json::json!({ "content": text, "stream": true }).to_string();
    let response = client.call("POST", "/v1/messages", Some(&body));
    daemon.kill();
    assert_eq!(response.status, 200, "{}", response.body);
    let done = response
        .body
        .split("\n\n")
        .find_map(|event| event.strip_prefix("event: done\ndata: "))
        .unwrap_or_else(|| panic!("no done event: {}", response.body));
    let done: Value = serde_json::from_str(done).unwrap();
    assert_eq!(done["content"], text, "{done}");
    let id = done["session_id"].as_str().unwrap();

    let mut daemon = home.start();
    assert_eq!(Client::of(&daemon).texts(id), [text, text]);
    daemon.shut_down(EXIT);
}

#[test]
fn the_sqlite3_shell_reads_the_database_while_the_daemon_runs_and_after_it_stops() {
    let home = Home::new("store-shell", "");
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let first = client.say_ok(None, "one")["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for text in ["two", "three"] {
        client.say_ok(Some(&first), text);
    }
    let second = client.create(None);
    client.say_ok(Some(&second), "four");
    client.say_ok(Some(&second), "five");
    let db = home.db();

    // While the daemon runs: every committed turn is visible, and the file checks clean.
    assert_eq!(sqlite3(&db, "select count(*) from turns"), "10");
    assert_eq!(sqlite3(&db, "select count(*) from sessions"), "2");
    assert_eq!(sqlite3(&db, "pragma integrity_check"), "ok");
    assert_eq!(sqlite3(&db, "pragma journal_mode"), "wal");
    // 2: incremental, so that the size cap can give pages back to the filesystem.
    assert_eq!(sqlite3(&db, "pragma auto_vacuum"), "2");
    assert_eq!(
        sqlite3(
            &db,
            &format!(
                "select group_concat(content, ',') from (select content from turns where session_id = '{first}' order by seq)"
            )
        ),
        "one,one,two,two,three,three"
    );
    // The shell's reads leave the daemon writing as before.
    client.say_ok(Some(&second), "six");
    assert_eq!(sqlite3(&db, "select count(*) from turns"), "12");

    daemon.shut_down(EXIT);
    assert_eq!(sqlite3(&db, "select count(*) from turns"), "12");
    assert_eq!(
        sqlite3(
            &db,
            &format!("select message_count from sessions where id = '{second}'")
        ),
        "6"
    );
    assert_eq!(sqlite3(&db, "pragma integrity_check"), "ok");
}

#[test]
fn spend_json_is_imported_on_the_first_start_with_the_store_and_never_read_again() {
    let home = Home::new("store-spend-import", "");
    std::fs::create_dir_all(home.state()).unwrap();
    let spend = home.state().join("spend.json");
    let today = utc_today();
    std::fs::write(
        &spend,
        format!(r#"{{"version":1,"utc_day":{today},"spent_usd":1.5}}"#),
    )
    .unwrap();

    let mut daemon = home.start();
    assert_eq!(
        Client::of(&daemon).health()["budget"]["spent_today_usd"],
        1.5
    );
    daemon.shut_down(EXIT);
    assert_eq!(
        sqlite3(
            &home.db(),
            &format!("select spent_usd from spend where utc_day = {today}")
        ),
        "1.5"
    );

    // A spend.json changed afterwards (an old backup restored, another tool) is not read.
    let changed = format!(r#"{{"version":1,"utc_day":{today},"spent_usd":7.25}}"#);
    std::fs::write(&spend, &changed).unwrap();
    let mut daemon = home.start();
    assert_eq!(
        Client::of(&daemon).health()["budget"]["spent_today_usd"],
        1.5
    );
    daemon.shut_down(EXIT);
    assert_eq!(
        std::fs::read_to_string(&spend).unwrap(),
        changed,
        "left alone"
    );
}

#[test]
fn a_session_idle_past_the_timeout_is_removed_from_the_store_at_start_and_the_others_restored() {
    let home = Home::new("store-expired", "");
    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let stale = client.say_ok(None, "long ago")["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fresh = client.say_ok(None, "just now")["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.shut_down(EXIT);
    // As if the stale session had last been used an hour ago (the timeout is 30 minutes).
    let db = home.db();
    sqlite3(
        &db,
        &format!("update sessions set last_active_at = last_active_at - 3600 where id = '{stale}'"),
    );

    let mut daemon = home.start();
    let client = Client::of(&daemon);
    let listed: Vec<String> = client
        .sessions()
        .iter()
        .map(|session| session["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, std::slice::from_ref(&fresh));
    let gone = client.call("GET", &format!("/v1/sessions/{stale}/messages"), None);
    assert_eq!(gone.status, 404, "{}", gone.body);
    assert_eq!(client.texts(&fresh), ["just now", "just now"]);
    assert!(
        daemon
            .startup
            .iter()
            .any(|line| line.contains("removed 1 idle past session_idle_timeout_secs")),
        "{:#?}",
        daemon.startup
    );
    assert_eq!(
        sqlite3(
            &db,
            &format!("select count(*) from turns where session_id = '{stale}'")
        ),
        "0",
        "its turns went with it"
    );
    daemon.shut_down(EXIT);
}
