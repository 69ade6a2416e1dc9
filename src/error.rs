//! The library's error type: every failure an operator can see, with a message that says what
//! failed on which input.
//!
//! `Display` names what failed; the cause comes from `source()`, so a caller printing the
//! chain joined by ": " gets one line without repetition.
//!
//! Request-path failures are not here: handlers answer them as JSON (see `http/response.rs`).

use std::{fmt, io, net::SocketAddr, path::PathBuf};

/// Everything that can stop blufio from starting or running.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file could not be read.
    ConfigRead {
        /// The file that was asked for.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// The configuration file is not valid TOML or does not match the schema.
    ConfigSyntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending text.
        line: usize,
        /// 1-based column of the offending text.
        column: usize,
        /// The key involved, when the error points at one.
        key: Option<String>,
        /// What the parser said.
        message: String,
    },
    /// The configuration parses but makes no sense (for example warn >= limit).
    ConfigInvalid {
        /// Where the configuration came from (a file path, or "built-in defaults").
        origin: String,
        /// The `[section] key` that is wrong.
        key: String,
        /// Why it is wrong.
        message: String,
    },
    /// A listener could not be bound.
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// Why binding failed.
        source: io::Error,
    },
    /// A host name in the configuration is not an IP address.
    BadAddress {
        /// The configured text.
        host: String,
    },
    /// An OS facility blufio needs could not be opened (for example the RSS reader).
    Io {
        /// What blufio was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The allocator refused a statistics or purge call.
    Allocator(String),
    /// The metrics recorder could not be set up.
    Metrics(String),
    /// A file the configuration points to (such as `[gateway] token_file`) could not be read.
    FileRead {
        /// What the file is for, as an operator calls it ("token file").
        what: &'static str,
        /// The file, resolved against the configuration file's directory.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// State kept across restarts (the spend file) is unreadable or corrupt; the daemon
    /// refuses to start rather than forget it.
    State {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong and what to do.
        message: String,
    },
}

impl Error {
    /// Returns true when the error is about configuration (exit status 78, `EX_CONFIG`).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::ConfigRead { .. }
                | Error::ConfigSyntax { .. }
                | Error::ConfigInvalid { .. }
                | Error::FileRead { .. }
                | Error::State { .. }
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ConfigRead { path, .. } => {
                write!(f, "cannot read config file {}", path.display())
            }
            Error::ConfigSyntax {
                path,
                line,
                column,
                key,
                message,
            } => {
                write!(f, "{}:{line}:{column}: ", path.display())?;
                if let Some(key) = key {
                    write!(f, "key `{key}`: ")?;
                }
                write!(f, "{message}")
            }
            Error::ConfigInvalid {
                origin,
                key,
                message,
            } => write!(f, "{origin}: {key}: {message}"),
            Error::Bind { addr, .. } => write!(f, "cannot bind {addr}"),
            Error::BadAddress { host } => {
                write!(f, "bind address {host:?} is not an IP address")
            }
            Error::Io { context, .. } => write!(f, "{context}"),
            Error::Allocator(message) => write!(f, "allocator: {message}"),
            Error::Metrics(message) => write!(f, "metrics: {message}"),
            Error::FileRead { what, path, .. } => {
                write!(f, "cannot read {what} {}", path.display())
            }
            Error::State { path, message } => write!(f, "{}: {message}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::ConfigRead { source, .. }
            | Error::Bind { source, .. }
            | Error::Io { source, .. }
            | Error::FileRead { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<io::Error> for Error {
    fn from(source: io::Error) -> Error {
        Error::Io {
            context: "I/O error".to_owned(),
            source,
        }
    }
}
