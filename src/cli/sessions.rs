//! `blufio sessions list|show|export|delete`: the operator's view of the session store in
//! `[daemon] state_dir`, beside a running daemon or without one.
//!
//! Reading goes through [`blufio::ReadOnly`] (WAL lets it read while the daemon writes), so
//! `list`, `show` and `export` never change the file. `delete` writes, so it goes through
//! [`blufio::delete_stored_session`], which takes the state directory's lock and refuses
//! while a daemon holds it. Text output escapes control characters: the content is what
//! clients sent, and must not be able to drive the operator's terminal.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde_json::{Value, json};

use blufio::{Config, Error, OfflineDelete, ReadOnly, Role, StoredSession, StoredTurn};

/// What `blufio sessions` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// One line (or JSON object) per stored session.
    List,
    /// One session and its messages.
    Show(String),
    /// One session and its messages as JSON, the system prompt in full.
    Export(String),
    /// Remove one session and its messages (the daemon stopped).
    Delete(String),
}

impl Action {
    /// Reads the words after `sessions`.
    pub fn parse(words: &[&str]) -> Result<Action, String> {
        match words {
            ["list"] => Ok(Action::List),
            ["show", id] => Ok(Action::Show((*id).to_owned())),
            ["export", id] => Ok(Action::Export((*id).to_owned())),
            ["delete", id] => Ok(Action::Delete((*id).to_owned())),
            [] => Err("sessions needs list, show ID, export ID or delete ID".to_owned()),
            [verb @ ("show" | "export" | "delete")] => Err(format!("sessions {verb} needs an ID")),
            other => Err(format!("unknown command \"sessions {}\"", other.join(" "))),
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            Action::List => None,
            Action::Show(id) | Action::Export(id) | Action::Delete(id) => Some(id),
        }
    }
}

/// Runs `action` on the store of the configuration at `path`.
///
/// # Errors
///
/// Returns a configuration error (exit 78) when there is no store to read: no `[daemon]
/// state_dir`, `[store] enabled = false`, or a database that cannot be used. An unknown or
/// malformed id, or a daemon holding the directory for `delete`, is reported here and
/// exits 1.
pub fn run(path: Option<&Path>, action: &Action, json: bool) -> Result<ExitCode, Error> {
    let config = Config::load(path)?;
    let dir = store_dir(&config, path)?;
    if let Some(id) = action.id()
        && !blufio::is_session_id(id)
    {
        return Ok(fail(&format!(
            "{id:?} is not a session id (32 lowercase hexadecimal digits, as the gateway \
             gives them)"
        )));
    }
    let mut out = Vec::new();
    let code = match action {
        Action::List => {
            let sessions = ReadOnly::open(&dir)?.sessions().map_err(read_error(&dir))?;
            if json {
                let list: Vec<Value> = sessions
                    .iter()
                    .map(|session| session.to_json(false))
                    .collect();
                writeln!(out, "{}", Value::Array(list))?;
            } else {
                out.extend(list_text(&sessions).into_bytes());
            }
            ExitCode::SUCCESS
        }
        Action::Show(id) | Action::Export(id) => {
            let read = ReadOnly::open(&dir)?.conversation(id);
            let Some((session, turns)) = read.map_err(read_error(&dir))? else {
                return Ok(not_found(id, &dir));
            };
            if let Action::Show(_) = action
                && !json
            {
                out.extend(show_text(&session, &turns).into_bytes());
            } else {
                // `export` always, `show --json` too: the system prompt whole for a backup,
                // only its length for a look.
                let full = matches!(action, Action::Export(_));
                writeln!(out, "{}", conversation_json(&session, &turns, full))?;
            }
            ExitCode::SUCCESS
        }
        Action::Delete(id) => match blufio::delete_stored_session(&dir, id)? {
            OfflineDelete::Deleted { turns } => {
                if json {
                    writeln!(out, "{}", json!({"deleted": id, "messages": turns}))?;
                } else {
                    let noun = if turns == 1 { "message" } else { "messages" };
                    writeln!(out, "deleted session {id} and its {turns} {noun}")?;
                }
                ExitCode::SUCCESS
            }
            OfflineDelete::NotFound => not_found(id, &dir),
            OfflineDelete::DaemonRunning { pid } => {
                let daemon = pid.map_or("a blufio daemon".to_owned(), |pid| {
                    format!("the blufio daemon (pid {pid})")
                });
                fail(&format!(
                    "{} is in use by {daemon}, which is running: nothing was deleted; delete \
                     the session through it with DELETE /v1/sessions/{id}, or stop it first",
                    dir.display()
                ))
            }
        },
    };
    write_stdout(&out)?;
    Ok(code)
}

/// The state directory whose store is read, or why there is none.
fn store_dir(config: &Config, path: Option<&Path>) -> Result<PathBuf, Error> {
    let origin = path.map_or("built-in defaults".to_owned(), |p| p.display().to_string());
    if !config.store.enabled {
        return Err(Error::ConfigInvalid {
            origin,
            key: "[store] enabled".to_owned(),
            message: "is false: this daemon keeps no session store, so there are no stored \
                      sessions to read"
                .to_owned(),
        });
    }
    config
        .daemon
        .state_dir
        .clone()
        .ok_or_else(|| Error::ConfigInvalid {
            origin,
            key: "[daemon] state_dir".to_owned(),
            message: "is not set: sessions are kept in memory only, so there is no store to \
                      read; pass the daemon's configuration with --config"
                .to_owned(),
        })
}

fn read_error(dir: &Path) -> impl Fn(String) -> Error + '_ {
    move |detail| Error::Io {
        context: format!("cannot read {}", dir.join(blufio::DB_FILE).display()),
        source: io::Error::other(detail),
    }
}

fn not_found(id: &str, dir: &Path) -> ExitCode {
    fail(&format!(
        "no session {id} in {}",
        dir.join(blufio::DB_FILE).display()
    ))
}

/// Says why on stderr, as `main` does for errors, and exits 1 (a runtime failure).
fn fail(message: &str) -> ExitCode {
    eprintln!("blufio: {message}");
    ExitCode::from(1)
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) is not an error.
fn write_stdout(bytes: &[u8]) -> Result<(), Error> {
    let mut stdout = io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != io::ErrorKind::BrokenPipe => Err(Error::Io {
            context: "cannot write to standard output".to_owned(),
            source: error,
        }),
        _ => Ok(()),
    }
}

/// `{"session": {...}, "messages": [...]}`, the messages as the gateway serves them.
fn conversation_json(session: &StoredSession, turns: &[StoredTurn], full: bool) -> Value {
    json!({
        "session": session.to_json(full),
        "messages": turns.iter().map(StoredTurn::to_json).collect::<Vec<_>>(),
    })
}

fn list_text(sessions: &[StoredSession]) -> String {
    if sessions.is_empty() {
        return "no stored sessions\n".to_owned();
    }
    let mut out = format!(
        "{:<32}  {:<19}  {:<19}  {:>8}  MODEL\n",
        "ID", "CREATED (UTC)", "LAST ACTIVE (UTC)", "MESSAGES"
    );
    for session in sessions {
        out.push_str(&format!(
            "{:<32}  {}  {}  {:>8}  {}\n",
            session.id,
            utc(session.created_at),
            utc(session.last_active_at),
            session.message_count,
            printable(session.model.as_deref().unwrap_or("-")),
        ));
    }
    out
}

fn show_text(session: &StoredSession, turns: &[StoredTurn]) -> String {
    let mut out = format!("session {}\n", session.id);
    let mut field = |name: &str, value: String| out.push_str(&format!("  {name:<12}{value}\n"));
    field(
        "model",
        printable(session.model.as_deref().unwrap_or("(the default)")),
    );
    field("created", format!("{} UTC", utc(session.created_at)));
    field(
        "last active",
        format!("{} UTC", utc(session.last_active_at)),
    );
    field("messages", session.message_count.to_string());
    match &session.system {
        Some(system) => out.push_str(&format!("  system\n{}", indented(system))),
        None => out.push_str("  system      (none)\n"),
    }
    for turn in turns {
        let mut head = format!(
            "\n[{}] {} at {} UTC",
            turn.seq,
            match turn.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            },
            utc(turn.created_at)
        );
        if let Some(model) = &turn.model {
            head.push_str(&format!(", {}", printable(model)));
        }
        if let (Some(input), Some(output)) = (turn.input_tokens, turn.output_tokens) {
            head.push_str(&format!(", {input} tokens in, {output} out"));
        }
        if let Some(cost) = turn.cost_usd {
            head.push_str(&format!(", ${cost:.6}"));
        }
        out.push_str(&head);
        out.push('\n');
        out.push_str(&indented(&turn.content));
    }
    out
}

/// `text` made safe for a terminal, each line indented by four spaces.
fn indented(text: &str) -> String {
    printable(text)
        .lines()
        .map(|line| format!("    {line}\n"))
        .collect()
}

/// `text` with every control character but newline and tab escaped (`\u{1b}`), so stored
/// content cannot move the cursor, retitle the window or clear the operator's screen.
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if ch.is_control() && ch != '\n' && ch != '\t' {
            out.extend(ch.escape_default());
        } else {
            out.push(ch);
        }
    }
    out
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(secs: u64) -> String {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shifted so eras start on 0000-03-01: a leap day is then the last day of its year.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_epoch_seconds_across_leap_days_and_centuries() {
        for (secs, text) in [
            (0, "1970-01-01 00:00:00"),
            (951_782_400, "2000-02-29 00:00:00"),
            (951_868_799, "2000-02-29 23:59:59"),
            (951_868_800, "2000-03-01 00:00:00"),
            (1_796_332_361, "2026-12-03 21:12:41"),
            (4_107_542_400, "2100-03-01 00:00:00"),
            (4_107_542_399, "2100-02-28 23:59:59"),
        ] {
            assert_eq!(utc(secs), text, "{secs}");
        }
    }

    #[test]
    fn printable_escapes_terminal_controls_but_keeps_lines_tabs_and_unicode() {
        assert_eq!(
            printable("a\u{1b}[2Jb\r\n\tc\u{7}é\u{9b}"),
            "a\\u{1b}[2Jb\\r\n\tc\\u{7}é\\u{9b}"
        );
    }

    #[test]
    fn show_text_lists_each_turn_with_its_usage_and_indents_the_content() {
        let session = StoredSession {
            id: "0123456789abcdef0123456789abcdef".to_owned(),
            kind: blufio::SessionKind::Http,
            model: None,
            system: Some("Be brief.".to_owned()),
            created_at: 0,
            last_active_at: 60,
            message_count: 2,
        };
        let turn = |seq, role, content: &str| StoredTurn {
            seq,
            role,
            content: content.to_owned(),
            created_at: 60,
            model: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
        };
        let mut reply = turn(1, Role::Assistant, "re: hi\nthere");
        reply.model = Some("echo".to_owned());
        reply.input_tokens = Some(3);
        reply.output_tokens = Some(4);
        let text = show_text(&session, &[turn(0, Role::User, "hi"), reply]);
        assert_eq!(
            text,
            "session 0123456789abcdef0123456789abcdef\n  model       (the default)\n  \
             created     1970-01-01 00:00:00 UTC\n  last active 1970-01-01 00:01:00 UTC\n  \
             messages    2\n  system\n    Be brief.\n\n[0] user at 1970-01-01 00:01:00 UTC\n    \
             hi\n\n[1] assistant at 1970-01-01 00:01:00 UTC, echo, 3 tokens in, 4 out\n    \
             re: hi\n    there\n"
        );
    }

    #[test]
    fn sessions_actions_need_their_id_and_refuse_extra_words() {
        assert_eq!(Action::parse(&["list"]), Ok(Action::List));
        assert_eq!(
            Action::parse(&["show", "abc"]),
            Ok(Action::Show("abc".to_owned()))
        );
        assert_eq!(
            Action::parse(&["export", "abc"]),
            Ok(Action::Export("abc".to_owned()))
        );
        assert_eq!(
            Action::parse(&["delete", "abc"]),
            Ok(Action::Delete("abc".to_owned()))
        );
        assert_eq!(
            Action::parse(&[]).unwrap_err(),
            "sessions needs list, show ID, export ID or delete ID"
        );
        assert_eq!(
            Action::parse(&["delete"]).unwrap_err(),
            "sessions delete needs an ID"
        );
        assert_eq!(
            Action::parse(&["list", "abc"]).unwrap_err(),
            "unknown command \"sessions list abc\""
        );
        assert_eq!(
            Action::parse(&["drop", "abc"]).unwrap_err(),
            "unknown command \"sessions drop abc\""
        );
    }

    fn parse(args: &[&str]) -> Result<super::super::Command, String> {
        super::super::parse(
            std::iter::once("blufio")
                .chain(args.iter().copied())
                .map(Into::into),
        )
    }

    #[test]
    fn sessions_parses_its_action_with_config_and_json_anywhere() {
        let command = parse(&["sessions", "--json", "show", "abc", "-c", "blufio.toml"]);
        assert!(
            matches!(
                command,
                Ok(super::super::Command::Sessions { config: Some(ref path), action: Action::Show(ref id), json: true })
                    if path == Path::new("blufio.toml") && id == "abc"
            ),
            "{:?}",
            command.err()
        );
        assert!(matches!(
            parse(&["sessions", "list"]),
            Ok(super::super::Command::Sessions {
                config: None,
                action: Action::List,
                json: false
            })
        ));
    }

    #[test]
    fn sessions_refuses_a_missing_action_or_id_and_stray_arguments() {
        for (args, expected) in [
            (
                &["sessions"][..],
                "sessions needs list, show ID, export ID or delete ID",
            ),
            (&["sessions", "export"][..], "sessions export needs an ID"),
            (
                &["sessions", "list", "--url", "http://x"][..],
                "--url applies only to health",
            ),
            (&["sessions", "show", "a", "b"][..], "unexpected argument"),
            (
                &["config", "show", "--json"][..],
                "--json applies only to status and sessions",
            ),
        ] {
            let error = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} parsed"));
            assert!(error.contains(expected), "{args:?}: {error}");
        }
    }
}
