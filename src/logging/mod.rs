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

mod rate_limit;
mod redact;

use std::{
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Mutex,
    time::{Duration, Instant},
};

use log::{Level, LevelFilter, Log, Metadata, Record};

pub use self::{
    rate_limit::{Admission, EPISODE, RateLimiter, Summary},
    redact::redact,
};

/// The log target of records that are written every time, never held back by the
/// per-call-site limiter: `log::error!(target: ALWAYS_TARGET, "reload refused: …")`.
/// Sub-targets (`blufio::always::reload`) are exempt too.
pub const ALWAYS_TARGET: &str = "blufio::always";

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
        crate::sync::lock(&self.limiter)
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const TOKEN: &str = "tok-0123456789abcdef";

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
            log_at(
                &logger,
                Level::Trace,
                "trillium_http",
                &format!("received:\nAuthorization: Bearer {TOKEN}\r\n"),
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
        let lines_at = |wanted: Level| {
            capture
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|(level, _)| *level == wanted)
                .count()
        };
        // Five more errors from new clients under `filter`, set as a reload sets it.
        let flood_at = |filter: LevelFilter, subnet: u8| {
            level.store(filter as usize, std::sync::atomic::Ordering::Relaxed);
            for client in 0..5 {
                log_error(
                    &logger,
                    &format!("memory pressure from 10.0.{subnet}.{client}"),
                );
            }
        };
        for client in 0..37 {
            log_error(&logger, &format!("memory pressure from 10.0.0.{client}"));
        }
        log_at(&logger, Level::Debug, "blufio", "a debug line");
        assert_eq!(lines_at(Level::Debug), 0, "{:?}", capture.lines);
        // Raised to debug by a reload: the held-back detail shows.
        flood_at(LevelFilter::Debug, 1);
        assert_eq!(lines_at(Level::Debug), 5, "{:?}", capture.lines);
        // Back to info: hidden again.
        flood_at(LevelFilter::Info, 2);
        assert_eq!(lines_at(Level::Debug), 5, "{:?}", capture.lines);
        assert_eq!(lines_at(Level::Error), 1, "{:?}", capture.lines);
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
