//! The logger `blufio serve` installs: env_logger on stderr (with syslog priorities when
//! stderr is the journal) behind the library's redacting, rate-limiting wrapper.

use blufio::{Config, RedactingLogger};

/// The one process-wide hook blufio installs: a logger writing to stderr, behind the wrapper
/// that redacts `secrets` and credentials and rate-limits repeated errors.
///
/// Without `BLUFIO_LOG` the logger itself passes every level and `log::set_max_level` does
/// the filtering, so a reload can raise or lower `[daemon] log_level` live.
pub fn init_logger(
    config: &Config,
    secrets: Vec<String>,
) -> &'static RedactingLogger<env_logger::Logger> {
    let mut builder = env_logger::Builder::new();
    builder
        .format_timestamp(None)
        .target(env_logger::Target::Stderr);
    if blufio::journal_stream().is_some_and(|stream| blufio_platform::stderr_is_journal(&stream)) {
        // The journal reads a syslog priority from each line's `<N>` prefix, so
        // `journalctl -p warning` works; it adds its own timestamps.
        builder.format(|out, record| {
            use std::io::Write;
            writeln!(
                out,
                "<{}>{}: {}",
                syslog_priority(record.level()),
                record.target(),
                record.args()
            )
        });
    }
    let level = match blufio::log_env_override() {
        Some(filter) => {
            builder.parse_filters(&filter);
            None
        }
        None => {
            builder.filter_level(log::LevelFilter::Trace);
            Some(blufio::level_filter(&config.daemon.log_level).unwrap_or(log::LevelFilter::Info))
        }
    };
    // trillium-client traces whole request heads, API keys included; its connection module
    // logs nothing else worth a secret in the log.
    builder.filter_module("trillium_client::conn", log::LevelFilter::Off);
    let inner = builder.build();
    let max_level = level.unwrap_or_else(|| inner.filter());
    // Leaked like `log::set_boxed_logger` would, keeping a handle for `finish` at exit.
    let logger: &'static RedactingLogger<_> =
        Box::leak(Box::new(RedactingLogger::new(inner, secrets)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max_level);
    }
    logger
}

/// Returns the syslog priority the journal files a record under.
fn syslog_priority(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 6,
        log::Level::Debug | log::Level::Trace => 7,
    }
}
