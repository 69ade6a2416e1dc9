//! The background tasks: the memory monitor tick and idle-session eviction.
//!
//! Both run on the daemon's own executor and end when `ctx.closing` fires.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_io::Timer;

use crate::{context::Context, memory, metrics::ErrorKind};

/// Samples memory every `monitor_interval_secs` until shutdown, refreshing the service
/// manager's status line, and pings its watchdog.
///
/// The watchdog ping comes from this loop, never from a timer of its own: when the monitor
/// or its executor stalls, the pings stop and the service manager restarts the daemon.
pub(crate) async fn monitor(ctx: Arc<Context>) {
    let interval = Duration::from_secs(ctx.config.daemon.monitor_interval_secs);
    let period = ctx
        .notifier
        .watchdog_interval()
        .map_or(interval, |watchdog| watchdog.min(interval));
    let mut next_tick = Instant::now() + interval;
    while ctx.closing.interrupt(Timer::after(period)).await.is_some() {
        if Instant::now() >= next_tick {
            memory::tick(&ctx);
            if !ctx.cgroup.refresh() {
                ctx.metrics.count_error(ErrorKind::MemoryMonitor);
            }
            ctx.notifier.status(&ctx.status_line());
            next_tick = Instant::now() + interval;
        }
        ctx.notifier.watchdog();
        // Lets the installed logger write the counts of repeated errors whose episode ended
        // quietly (see `logging.rs`); a no-op when no logger is installed.
        log::logger().flush();
    }
}

/// Closes idle sessions, checking twice per idle timeout (between 250 ms and 30 s).
pub(crate) async fn evict_idle(ctx: Arc<Context>) {
    // Read each round: a reload can change the idle timeout.
    let period = |ctx: &Context| {
        (ctx.sessions.limits().idle_timeout / 2)
            .clamp(Duration::from_millis(250), Duration::from_secs(30))
    };
    while ctx
        .closing
        .interrupt(Timer::after(period(&ctx)))
        .await
        .is_some()
    {
        ctx.sessions.evict_idle(&ctx);
    }
}
