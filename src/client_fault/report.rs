//! What the fault table reports, and the text of each log line.

use std::{fmt, time::Duration};

use super::client::*;
use crate::metrics::ErrorKind;

/// What a log line says; [`fmt::Display`] gives its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A client reached [`AUTH_FAILURE_LIMIT`] and is now blocked (WARN).
    GuessingStarted {
        /// The client.
        client: Client,
        /// Failed authentications that started the block.
        failures: u32,
        /// Over how long.
        within: Duration,
    },
    /// A token-guessing episode ended (INFO).
    GuessingEnded {
        /// The client.
        client: Client,
        /// Failed authentications in the episode.
        failures: u64,
        /// Requests answered 429 in the episode.
        refused: u64,
        /// From the first failure to the last fault.
        lasted: Duration,
    },
    /// The first malformed request of an episode (INFO).
    MalformedStarted {
        /// The client.
        client: Client,
        /// What was wrong with it.
        kind: ErrorKind,
    },
    /// A malformed-request episode with more than one request ended (INFO).
    MalformedEnded {
        /// The client.
        client: Client,
        /// Malformed requests per kind, in `MALFORMED` order, zeros left out.
        counts: Vec<(ErrorKind, u64)>,
        /// From the first malformed request to the last.
        lasted: Duration,
    },
    /// Lines about other clients left out in the last episode (INFO).
    Omitted {
        /// How many.
        lines: u64,
    },
}

impl Report {
    /// Returns the level the report is logged at.
    pub fn level(&self) -> log::Level {
        match self {
            Report::GuessingStarted { .. } => log::Level::Warn,
            _ => log::Level::Info,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = |duration: &Duration| duration.as_secs().max(1);
        match self {
            Report::GuessingStarted {
                client,
                failures,
                within,
            } => write!(
                f,
                "token guessing from {client}: {failures} failed authentications in {} s; \
                 answering 429 to its authenticated requests for {} s",
                secs(within),
                AUTH_BLOCK.as_secs()
            ),
            Report::GuessingEnded {
                client,
                failures,
                refused,
                lasted,
            } => write!(
                f,
                "token guessing from {client} stopped: {failures} failed authentications and \
                 {refused} requests answered 429 in {} s",
                secs(lasted)
            ),
            Report::MalformedStarted { client, kind } => write!(
                f,
                "malformed request from {client} ({}); counting its malformed requests for \
                 the next {} s",
                kind.as_str(),
                EPISODE.as_secs()
            ),
            Report::MalformedEnded {
                client,
                counts,
                lasted,
            } => {
                let total: u64 = counts.iter().map(|(_, count)| count).sum();
                write!(
                    f,
                    "malformed requests from {client}: {total} in the last {} s (",
                    secs(lasted)
                )?;
                for (index, (kind, count)) in counts.iter().enumerate() {
                    let separator = if index == 0 { "" } else { ", " };
                    write!(f, "{separator}{} {count}", kind.as_str())?;
                }
                write!(f, ")")
            }
            Report::Omitted { lines } => write!(
                f,
                "{lines} more lines about token guessing or malformed requests from other \
                 addresses left out in the last {} s; see blufio_errors_total",
                EPISODE.as_secs()
            ),
        }
    }
}
