//! Log hygiene: a `log::Log` wrapper that redacts secrets and rate-limits repeated warnings
//! and errors, so no log level leaks a token and no flood of clients fills the disk.
//!
//! Every record is redacted before it reaches the inner logger: the values of
//! `Authorization`, `Proxy-Authorization`, `X-Api-Key`, `Api-Key`, `X-Auth-Token` and `Cookie`
//! headers, the word after `Bearer ` or `bearer.` (the WebSocket subprotocol form), and the
//! configured secrets themselves wherever they appear. trillium logs whole request heads at
//! trace level, so this is the only place that can keep them out.
//!
//! Warnings and errors are counted per call site (target, file, line): the first of an
//! episode is written, the rest of the window go out at debug level only, and the next one
//! after the window carries the count ("and 812 more like this in the last 60 s"). A
//! flood of failing clients thus costs one line a minute at `info`, however many clients.
//! [`log::Log::flush`] writes the counts of windows that ended quietly, and
//! [`RedactingLogger::finish`] (at exit) every count still open.
//!
//! Nothing below the configured level is ever written: a held-back record goes out at debug
//! only when the level in force (the `log` facade's maximum, which a reload changes) lets
//! debug through. Records whose target is [`ALWAYS_TARGET`] (or starts with
//! `blufio::always::`) are never held back: they are for events an operator causes and must
//! see every time, such as a refused reload, and are few by nature. Floods from clients must
//! never use it.
//!
//! This module installs nothing: the binary builds the wrapper and installs it, the one
//! process-wide hook blufio has.

use std::{
    collections::HashMap,
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use log::{Level, LevelFilter, Log, Metadata, Record};

/// How long one episode of a repeated warning or error lasts.
pub const EPISODE: Duration = Duration::from_secs(60);

/// Call sites tracked at once; past it, new sites share one slot (the safety net still holds).
const MAX_SITES: usize = 256;

/// Longest example message kept per call site, in bytes.
const MAX_EXAMPLE_BYTES: usize = 300;

/// The log target of records that are written every time, never held back by the
/// per-call-site limiter: `log::error!(target: ALWAYS_TARGET, "reload refused: …")`.
/// Sub-targets (`blufio::always::reload`) are exempt too.
pub const ALWAYS_TARGET: &str = "blufio::always";

/// What replaces a secret.
const REDACTED: &str = "<redacted>";

/// Header names whose values are secrets (matched case-insensitively, also as suffixes, so
/// `authorization` covers `proxy-authorization` and `api-key` covers `x-api-key`).
const SECRET_HEADERS: [&str; 5] = [
    "authorization",
    "api-key",
    "api_key",
    "auth-token",
    "cookie",
];

/// Prefixes after which the next word is a credential.
const SECRET_PREFIXES: [&str; 2] = ["bearer.", "bearer "];

/// A logger that redacts secrets and rate-limits repeated warnings and errors before handing
/// records to `inner`.
pub struct RedactingLogger<L> {
    inner: L,
    secrets: Vec<String>,
    limiter: Mutex<RateLimiter>,
    max_level: Box<dyn Fn() -> LevelFilter + Send + Sync>,
}

impl<L: fmt::Debug> fmt::Debug for RedactingLogger<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedactingLogger")
            .field("inner", &self.inner)
            .field("max_level", &(self.max_level)())
            .finish_non_exhaustive()
    }
}

impl<L: Log> RedactingLogger<L> {
    /// Wraps `inner`; every string in `secrets` (the gateway token, API keys) is replaced
    /// wherever it appears. Empty strings are ignored.
    pub fn new(inner: L, secrets: Vec<String>) -> RedactingLogger<L> {
        RedactingLogger {
            inner,
            secrets: secrets.into_iter().filter(|s| !s.is_empty()).collect(),
            limiter: Mutex::new(RateLimiter::new(EPISODE)),
            max_level: Box::new(log::max_level),
        }
    }

    /// Reads the level in force from `max_level` instead of the `log` facade's maximum
    /// (which `[daemon] log_level` and a reload set); for tests and embedding hosts.
    pub fn with_max_level(
        mut self,
        max_level: impl Fn() -> LevelFilter + Send + Sync + 'static,
    ) -> RedactingLogger<L> {
        self.max_level = Box::new(max_level);
        self
    }

    /// Returns whether a record at `level` may be written under the level in force.
    fn level_allows(&self, level: Level) -> bool {
        level <= (self.max_level)()
    }

    fn emit(&self, record: &Record<'_>, level: Level, text: &str) {
        self.inner.log(
            &Record::builder()
                .args(format_args!("{text}"))
                .level(level)
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    /// Writes the counts of every record still held back, whether or not its window has
    /// ended; called once at exit so no count is lost.
    pub fn finish(&self) {
        let summaries = self.limiter().expired(Instant::now(), Duration::ZERO);
        self.write_summaries(summaries);
        self.inner.flush();
    }

    fn write_summaries(&self, summaries: Vec<Summary>) {
        for summary in summaries {
            if !self.level_allows(summary.level) {
                continue;
            }
            self.inner.log(
                &Record::builder()
                    .args(format_args!("{}", summary.text()))
                    .level(summary.level)
                    .target(&summary.target)
                    .build(),
            );
        }
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        // A panic while holding the lock leaves only counters behind; keep logging.
        self.limiter.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<L: Log> Log for RedactingLogger<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        // The facade's macros check the level before calling, but `log::logger().log(…)`
        // and the demotion below do not.
        if !self.level_allows(record.level()) || !self.inner.enabled(record.metadata()) {
            return;
        }
        let level = record.level();
        if level > Level::Warn || is_always(record.target()) {
            self.emit(
                record,
                level,
                &redact(&record.args().to_string(), &self.secrets),
            );
            return;
        }
        let key = site_key(record);
        let admission = self
            .limiter()
            .admit(key, Instant::now(), level, record.target());
        match admission {
            Admission::First => {
                let text = redact(&record.args().to_string(), &self.secrets);
                self.limiter().set_example(key, &text);
                self.emit(record, level, &text);
            }
            Admission::WithCount { more, elapsed } => {
                let text = redact(&record.args().to_string(), &self.secrets);
                self.limiter().set_example(key, &text);
                let text = format!(
                    "{text} (and {more} more like this in the last {} s)",
                    elapsed.as_secs().max(1)
                );
                self.emit(record, level, &text);
            }
            Admission::Suppressed => {
                // Per-client detail stays available at debug level; it costs the formatting
                // only when debug is on for this target. The inner logger alone cannot say:
                // without `BLUFIO_LOG` it passes every level and the facade's maximum is the
                // configured level, so both are asked.
                let debug = Metadata::builder()
                    .level(Level::Debug)
                    .target(record.target())
                    .build();
                if self.level_allows(Level::Debug) && self.inner.enabled(&debug) {
                    let text = redact(&record.args().to_string(), &self.secrets);
                    self.emit(record, Level::Debug, &text);
                }
            }
        }
    }

    fn flush(&self) {
        let summaries = self.limiter().expired(Instant::now(), EPISODE);
        self.write_summaries(summaries);
        self.inner.flush();
    }
}

/// Returns whether records of `target` bypass the per-call-site limiter.
fn is_always(target: &str) -> bool {
    target
        .strip_prefix(ALWAYS_TARGET)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// Identifies a call site without allocating.
fn site_key(record: &Record<'_>) -> u64 {
    let mut hasher = DefaultHasher::new();
    record.level().hash(&mut hasher);
    record.target().hash(&mut hasher);
    record.file().hash(&mut hasher);
    record.line().hash(&mut hasher);
    hasher.finish()
}

/// What to do with a warning or error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The first of an episode: write it.
    First,
    /// The first after a window in which `more` were held back: write it with the count.
    WithCount {
        /// How many were held back.
        more: u64,
        /// How long the window lasted.
        elapsed: Duration,
    },
    /// Within the window of an earlier one: write it at debug level at most.
    Suppressed,
}

/// A count of held-back records whose window ended without another record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Level of the records counted.
    pub level: Level,
    /// Target of the records counted.
    pub target: String,
    /// How many were held back.
    pub more: u64,
    /// How long the window lasted.
    pub elapsed: Duration,
    /// The first record of the episode, redacted.
    pub example: String,
}

impl Summary {
    /// Returns the line written for the summary.
    pub fn text(&self) -> String {
        format!(
            "{} more like this in the last {} s: {}",
            self.more,
            self.elapsed.as_secs().max(1),
            self.example
        )
    }
}

#[derive(Debug)]
struct Site {
    level: Level,
    target: String,
    window_start: Instant,
    held_back: u64,
    example: String,
}

/// Per-call-site episode counting; pure (the caller passes the time) so it can be tested
/// with a made-up clock.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    sites: HashMap<u64, Site>,
}

impl RateLimiter {
    /// Creates a limiter whose episodes last `window`.
    pub fn new(window: Duration) -> RateLimiter {
        RateLimiter {
            window,
            sites: HashMap::new(),
        }
    }

    /// Decides what happens to a record from call site `key` at `now`.
    pub fn admit(&mut self, key: u64, now: Instant, level: Level, target: &str) -> Admission {
        let key = if self.sites.len() >= MAX_SITES && !self.sites.contains_key(&key) {
            let window = self.window;
            self.sites.retain(|_, site| {
                site.held_back > 0 || now.saturating_duration_since(site.window_start) < window
            });
            if self.sites.len() >= MAX_SITES {
                0
            } else {
                key
            }
        } else {
            key
        };
        let Some(site) = self.sites.get_mut(&key) else {
            self.sites.insert(
                key,
                Site {
                    level,
                    target: target.to_owned(),
                    window_start: now,
                    held_back: 0,
                    example: String::new(),
                },
            );
            return Admission::First;
        };
        let elapsed = now.saturating_duration_since(site.window_start);
        if elapsed < self.window {
            site.held_back = site.held_back.saturating_add(1);
            return Admission::Suppressed;
        }
        let more = std::mem::take(&mut site.held_back);
        site.window_start = now;
        if more == 0 {
            Admission::First
        } else {
            Admission::WithCount { more, elapsed }
        }
    }

    /// Remembers the (redacted) text of the record just admitted, for a later [`Summary`].
    pub fn set_example(&mut self, key: u64, text: &str) {
        if let Some(site) = self.sites.get_mut(&key) {
            let mut end = text.len().min(MAX_EXAMPLE_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            site.example.clear();
            site.example.push_str(&text[..end]);
        }
    }

    /// Returns the counts of sites with records held back whose window is at least
    /// `min_age` old, and starts those sites afresh.
    pub fn expired(&mut self, now: Instant, min_age: Duration) -> Vec<Summary> {
        let mut summaries = Vec::new();
        for site in self.sites.values_mut() {
            let elapsed = now.saturating_duration_since(site.window_start);
            if site.held_back > 0 && elapsed >= min_age {
                summaries.push(Summary {
                    level: site.level,
                    target: site.target.clone(),
                    more: std::mem::take(&mut site.held_back),
                    elapsed,
                    example: site.example.clone(),
                });
                site.window_start = now;
            }
        }
        summaries
    }
}

/// Returns `text` with header credentials, `Bearer` and `bearer.` tokens and every string in
/// `secrets` replaced by `<redacted>`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_owned();
    for secret in secrets {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), REDACTED);
        }
    }
    for name in SECRET_HEADERS {
        text = redact_header_values(&text, name);
    }
    for prefix in SECRET_PREFIXES {
        text = redact_after(&text, prefix);
    }
    text
}

/// Finds `needle` (ASCII, lowercase) in `haystack` ignoring ASCII case, from `from`.
fn find_ignore_case(haystack: &str, needle: &str, from: usize) -> Option<usize> {
    let haystack = haystack.as_bytes();
    let needle = needle.as_bytes();
    (from..=haystack.len().checked_sub(needle.len())?).find(|&start| {
        haystack
            .get(start..start + needle.len())
            .is_some_and(|window| window.eq_ignore_ascii_case(needle))
    })
}

/// Replaces the value after `name` followed by `:` or `=` (optionally quoted): up to the
/// closing quote, or to the end of the line.
fn redact_header_values(text: &str, name: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(start) = find_ignore_case(text, name, search) {
        let mut index = start + name.len();
        search = index;
        // `"authorization": "…"` (JSON or Debug) or `authorization: …` (a head).
        if matches!(bytes.get(index), Some(b'"' | b'\'')) {
            index += 1;
        }
        while bytes.get(index) == Some(&b' ') {
            index += 1;
        }
        if !matches!(bytes.get(index), Some(b':' | b'=')) {
            continue;
        }
        index += 1;
        while bytes.get(index) == Some(&b' ') {
            index += 1;
        }
        let quote = match bytes.get(index) {
            Some(&quote @ (b'"' | b'\'')) => {
                index += 1;
                Some(quote)
            }
            _ => None,
        };
        let value_end = bytes
            .iter()
            .skip(index)
            .position(|&byte| match quote {
                Some(quote) => byte == quote,
                None => byte == b'\r' || byte == b'\n',
            })
            .map_or(bytes.len(), |offset| index + offset);
        if value_end > index {
            out.push_str(&text[copied..index]);
            out.push_str(REDACTED);
            copied = value_end;
        }
        search = value_end.max(search);
    }
    out.push_str(&text[copied..]);
    out
}

/// Replaces the word after `prefix` (up to whitespace, a comma, a semicolon or a quote).
fn redact_after(text: &str, prefix: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut search = 0;
    while let Some(start) = find_ignore_case(text, prefix, search) {
        let index = start + prefix.len();
        let end = bytes
            .iter()
            .skip(index)
            .position(|&byte| byte.is_ascii_whitespace() || b",;\"'".contains(&byte))
            .map_or(bytes.len(), |offset| index + offset);
        if end > index && &text[index..end] != REDACTED {
            out.push_str(&text[copied..index]);
            out.push_str(REDACTED);
            copied = end;
        }
        search = end.max(index);
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const TOKEN: &str = "tok-0123456789abcdef";

    #[test]
    fn request_heads_lose_every_credential() {
        let head = format!(
            "received:\nGET /ws HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Host: localhost\r\nSec-WebSocket-Protocol: blufio.v1, bearer.{TOKEN}\r\n\
             x-api-key: sk-live-1234\r\nProxy-Authorization: Basic dXNlcjpwYXNz\r\n\
             cookie: session=abc\r\n"
        );
        let redacted = redact(&head, &[]);
        for secret in [TOKEN, "sk-live-1234", "dXNlcjpwYXNz", "session=abc"] {
            assert!(!redacted.contains(secret), "{secret} in {redacted}");
        }
        assert!(
            redacted.contains("Authorization: <redacted>\r\n"),
            "{redacted}"
        );
        assert!(
            redacted.contains("blufio.v1, bearer.<redacted>\r\n"),
            "{redacted}"
        );
        assert!(redacted.contains("Host: localhost\r\n"), "{redacted}");
        assert!(
            redacted.starts_with("received:\nGET /ws HTTP/1.1\r\n"),
            "{redacted}"
        );
    }

    #[test]
    fn debug_and_json_forms_and_configured_secrets_are_redacted() {
        let debug = format!(r#"Headers {{ "authorization": "Bearer {TOKEN}", "host": "x" }}"#);
        let redacted = redact(&debug, &[]);
        assert_eq!(
            redacted,
            r#"Headers { "authorization": "<redacted>", "host": "x" }"#
        );
        let bare = format!("invalid token {TOKEN} from 10.0.0.1");
        assert_eq!(
            redact(&bare, &[TOKEN.to_owned()]),
            "invalid token <redacted> from 10.0.0.1"
        );
        assert_eq!(redact("BEARER abc,def", &[]), "BEARER <redacted>,def");
        assert_eq!(redact("no secrets here", &[]), "no secrets here");
        assert_eq!(
            redact("authorization required", &[]),
            "authorization required"
        );
        assert_eq!(redact("ends with bearer.", &[]), "ends with bearer.");
    }

    #[test]
    fn repeated_errors_are_one_line_per_episode_with_a_count() {
        let mut limiter = RateLimiter::new(EPISODE);
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(limiter.admit(1, at(0), Level::Error, "t"), Admission::First);
        limiter.set_example(1, "http error from 10.0.0.1");
        for second in 1..60 {
            assert_eq!(
                limiter.admit(1, at(second), Level::Error, "t"),
                Admission::Suppressed
            );
        }
        // Another call site is its own episode.
        assert_eq!(
            limiter.admit(2, at(30), Level::Error, "t"),
            Admission::First
        );
        assert!(limiter.expired(at(59), EPISODE).is_empty());
        assert_eq!(
            limiter.admit(1, at(61), Level::Error, "t"),
            Admission::WithCount {
                more: 59,
                elapsed: Duration::from_secs(61)
            }
        );
        // The flood goes on and then stops: flush reports the last window.
        for second in 62..70 {
            limiter.admit(1, at(second), Level::Error, "t");
        }
        assert!(limiter.expired(at(100), EPISODE).is_empty());
        let summaries = limiter.expired(at(121), EPISODE);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].more, 8);
        assert_eq!(
            summaries[0].text(),
            "8 more like this in the last 60 s: http error from 10.0.0.1"
        );
        assert!(limiter.expired(at(300), EPISODE).is_empty());
        // At exit every open count is written, however young.
        assert_eq!(
            limiter.admit(1, at(301), Level::Error, "t"),
            Admission::First
        );
        assert_eq!(
            limiter.admit(1, at(301), Level::Error, "t"),
            Admission::Suppressed
        );
        assert_eq!(limiter.expired(at(301), Duration::ZERO)[0].more, 1);
        // After a quiet window the next one starts a new episode.
        assert_eq!(
            limiter.admit(1, at(400), Level::Error, "t"),
            Admission::First
        );
    }

    #[test]
    fn call_sites_beyond_the_cap_share_one_slot() {
        let mut limiter = RateLimiter::new(EPISODE);
        let now = Instant::now();
        for key in 1..=MAX_SITES as u64 {
            limiter.admit(key, now, Level::Warn, "t");
            limiter.admit(key, now, Level::Warn, "t");
        }
        assert_eq!(
            limiter.admit(10_000, now, Level::Warn, "t"),
            Admission::First
        );
        assert_eq!(
            limiter.admit(10_001, now, Level::Warn, "t"),
            Admission::Suppressed
        );
        assert!(limiter.sites.len() <= MAX_SITES + 1);
    }

    /// Collects what reaches the inner logger.
    #[derive(Debug, Default, Clone)]
    struct Capture {
        lines: Arc<Mutex<Vec<(Level, String)>>>,
        max_level: Option<Level>,
    }

    impl Log for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            self.max_level.is_some_and(|max| metadata.level() <= max)
        }
        fn log(&self, record: &Record<'_>) {
            if self.enabled(record.metadata()) {
                self.lines
                    .lock()
                    .unwrap()
                    .push((record.level(), record.args().to_string()));
            }
        }
        fn flush(&self) {}
    }

    fn log_error(logger: &dyn Log, message: &str) {
        // One call site for every record, as a framework's `log::error!` would be.
        logger.log(
            &Record::builder()
                .args(format_args!("{message}"))
                .level(Level::Error)
                .target("trillium_server_common::running_config")
                .file(Some("running_config.rs"))
                .line(Some(277))
                .build(),
        );
    }

    #[test]
    fn the_wrapper_redacts_and_sends_held_back_lines_to_debug() {
        for (max_level, expected_debug) in [(Level::Info, 0), (Level::Trace, 99)] {
            let capture = Capture {
                max_level: Some(max_level),
                ..Capture::default()
            };
            let logger = RedactingLogger::new(capture.clone(), vec![TOKEN.to_owned()])
                .with_max_level(move || max_level.to_level_filter());
            for client in 0..100 {
                log_error(
                    &logger,
                    &format!("http error from 10.0.0.{client}: {TOKEN}"),
                );
            }
            logger.log(
                &Record::builder()
                    .args(format_args!("received:\nAuthorization: Bearer {TOKEN}\r\n"))
                    .level(Level::Trace)
                    .target("trillium_http")
                    .build(),
            );
            let lines = capture.lines.lock().unwrap().clone();
            let errors: Vec<_> = lines.iter().filter(|(l, _)| *l == Level::Error).collect();
            let debug = lines.iter().filter(|(l, _)| *l == Level::Debug).count();
            assert_eq!(errors.len(), 1, "{lines:?}");
            assert_eq!(errors[0].1, "http error from 10.0.0.0: <redacted>");
            assert_eq!(debug, expected_debug, "{lines:?}");
            assert!(
                lines.iter().all(|(_, line)| !line.contains(TOKEN)),
                "{lines:?}"
            );
        }
    }

    fn log_at(logger: &dyn Log, level: Level, target: &str, message: &str) {
        logger.log(
            &Record::builder()
                .args(format_args!("{message}"))
                .level(level)
                .target(target)
                .file(Some("reload.rs"))
                .line(Some(71))
                .build(),
        );
    }

    #[test]
    fn held_back_lines_stay_hidden_below_the_level_in_force_also_after_it_changes() {
        // The inner logger passes every level, as the binary's does without `BLUFIO_LOG`:
        // the level in force is the facade's maximum, which a reload moves.
        let capture = Capture {
            max_level: Some(Level::Trace),
            ..Capture::default()
        };
        let level = Arc::new(std::sync::atomic::AtomicUsize::new(
            LevelFilter::Info as usize,
        ));
        let source = Arc::clone(&level);
        let logger =
            RedactingLogger::new(capture.clone(), Vec::new()).with_max_level(move || match source
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                4 => LevelFilter::Debug,
                _ => LevelFilter::Info,
            });
        let debug_lines = || {
            capture
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|(level, _)| *level == Level::Debug)
                .count()
        };
        for client in 0..37 {
            log_error(&logger, &format!("memory pressure from 10.0.0.{client}"));
        }
        logger.log(
            &Record::builder()
                .args(format_args!("a debug line"))
                .level(Level::Debug)
                .target("blufio")
                .build(),
        );
        assert_eq!(debug_lines(), 0, "{:?}", capture.lines);
        // Raised to debug by a reload: the held-back detail shows.
        level.store(
            LevelFilter::Debug as usize,
            std::sync::atomic::Ordering::Relaxed,
        );
        for client in 0..5 {
            log_error(&logger, &format!("memory pressure from 10.0.1.{client}"));
        }
        assert_eq!(debug_lines(), 5, "{:?}", capture.lines);
        // Back to info: hidden again.
        level.store(
            LevelFilter::Info as usize,
            std::sync::atomic::Ordering::Relaxed,
        );
        for client in 0..5 {
            log_error(&logger, &format!("memory pressure from 10.0.2.{client}"));
        }
        assert_eq!(debug_lines(), 5, "{:?}", capture.lines);
        let errors = capture
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(level, _)| *level == Level::Error)
            .count();
        assert_eq!(errors, 1, "{:?}", capture.lines);
    }

    #[test]
    fn records_for_the_always_target_are_never_held_back() {
        let capture = Capture {
            max_level: Some(Level::Trace),
            ..Capture::default()
        };
        let logger = RedactingLogger::new(capture.clone(), vec![TOKEN.to_owned()])
            .with_max_level(|| LevelFilter::Info);
        for attempt in 0..3 {
            log_at(
                &logger,
                Level::Error,
                ALWAYS_TARGET,
                &format!("reload refused ({attempt}): bad token {TOKEN}"),
            );
            log_at(
                &logger,
                Level::Error,
                "blufio::always::reload",
                &format!("reload refused, sub-target ({attempt})"),
            );
            // Only the exact target and its sub-targets are exempt.
            log_at(
                &logger,
                Level::Error,
                "blufio::alwaysish",
                &format!("limited ({attempt})"),
            );
        }
        let lines = capture.lines.lock().unwrap().clone();
        let errors: Vec<&str> = lines
            .iter()
            .filter(|(level, _)| *level == Level::Error)
            .map(|(_, line)| line.as_str())
            .collect();
        assert_eq!(
            errors,
            [
                "reload refused (0): bad token <redacted>",
                "reload refused, sub-target (0)",
                "limited (0)",
                "reload refused (1): bad token <redacted>",
                "reload refused, sub-target (1)",
                "reload refused (2): bad token <redacted>",
                "reload refused, sub-target (2)",
            ]
        );
        assert!(lines.iter().all(|(level, _)| *level != Level::Debug));
        // Below the level in force, even the exempt target is not written.
        let quiet = Capture {
            max_level: Some(Level::Trace),
            ..Capture::default()
        };
        let logger =
            RedactingLogger::new(quiet.clone(), Vec::new()).with_max_level(|| LevelFilter::Error);
        log_at(&logger, Level::Warn, ALWAYS_TARGET, "a warning");
        assert!(quiet.lines.lock().unwrap().is_empty());
    }
}
