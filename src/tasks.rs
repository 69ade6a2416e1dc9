//! The background tasks: the memory monitor tick and idle-session eviction.
//!
//! Both run on the daemon's own executor and end when `ctx.closing` fires. The monitor keeps
//! an absolute schedule ([`next_tick`]): it does not drift by the time a tick takes, and after
//! the process was stopped (SIGSTOP, a suspended VM) it ticks once and skips the missed ticks
//! instead of running them back to back, as `async_io::Timer::interval` would (it advances by
//! one period per firing, so a late timer fires immediately until it has caught up).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_io::Timer;

use crate::{context::Context, metrics::ErrorKind, monitor};

/// Samples memory every `monitor_interval_secs` until shutdown, refreshing the service
/// manager's status line, and pings its watchdog.
///
/// The watchdog ping comes from this loop, never from a timer of its own: when the monitor
/// or its executor stalls, the pings stop and the service manager restarts the daemon.
pub(crate) async fn monitor(ctx: Arc<Context>) {
    let interval = Duration::from_secs(ctx.config.daemon.monitor_interval_secs);
    // The loop wakes on its own absolute schedule, often enough for the watchdog; the memory
    // tick runs on the wakes that reach the monitor's schedule.
    let wake_every = ctx
        .notifier
        .watchdog_interval()
        .map_or(interval, |watchdog| watchdog.min(interval));
    let start = Instant::now();
    let mut tick_at = next_tick(start, interval, start);
    let mut wake_at = next_tick(start, wake_every, start);
    while ctx.closing.interrupt(Timer::at(wake_at)).await.is_some() {
        let now = Instant::now();
        if now >= tick_at {
            monitor::tick(&ctx);
            ctx.metrics.monitor_ticks.increment(1);
            if !ctx.cgroup.refresh() {
                ctx.metrics.count_error(ErrorKind::MemoryMonitor);
            }
            ctx.notifier.status(&ctx.status_line());
            tick_at = next_tick(start, interval, Instant::now());
        }
        ctx.notifier.watchdog();
        // Lets the installed logger write the counts of repeated errors whose episode ended
        // quietly (see `logging/rate_limit.rs`); a no-op when no logger is installed.
        log::logger().flush();
        // Ends quiet token-guessing and malformed-request episodes with their totals.
        ctx.client_faults.sweep();
        wake_at = next_tick(start, wake_every, Instant::now()).min(tick_at);
    }
    // The daemon is stopping: sum up the token-guessing and malformed-request episodes still
    // open, as the logger does for its held-back counts.
    ctx.client_faults.finish();
}

/// Returns the first instant of the schedule `start + k·period` (k ≥ 1) that is after `now`.
///
/// A tick that ran late or long does not shift later ticks, and ticks missed while the process
/// was stopped are skipped rather than run in a burst.
pub(crate) fn next_tick(start: Instant, period: Duration, now: Instant) -> Instant {
    let period_nanos = period.as_nanos().max(1);
    let elapsed = now.saturating_duration_since(start).as_nanos();
    let ticks = elapsed / period_nanos + 1;
    // 2^64 ns is 584 years, so the product fits; saturate rather than panic regardless.
    let offset = u64::try_from(ticks.saturating_mul(period_nanos)).unwrap_or(u64::MAX);
    start
        .checked_add(Duration::from_nanos(offset))
        .unwrap_or(now + period)
}

/// Closes idle sessions, checking twice per idle timeout (between 250 ms and 30 s).
pub(crate) async fn evict_idle(ctx: Arc<Context>) {
    // Read each round: a reload can change the idle timeout.
    let period = |ctx: &Context| {
        (ctx.session_limits().idle_timeout / 2)
            .clamp(Duration::from_millis(250), Duration::from_secs(30))
    };
    while ctx
        .closing
        .interrupt(Timer::after(period(&ctx)))
        .await
        .is_some()
    {
        let evicted = ctx
            .sessions
            .evict_idle_ids(ctx.session_limits().idle_timeout, Instant::now());
        if let Some(store) = &ctx.store {
            forget(&ctx, store, evicted).await;
        }
    }
}

/// Removes sessions the evictor closed from the store, then keeps the store under its size
/// cap, closing the sessions that removes. A failure is the store's to log and count; the
/// rows left are removed at the next start (they are idle past the timeout) or tick.
async fn forget(ctx: &Context, store: &crate::store::Store, evicted: Vec<String>) {
    if !evicted.is_empty() {
        let _ = store.delete(evicted).await;
    }
    match store.enforce_cap().await {
        Ok(removed) if !removed.is_empty() => {
            for id in &removed {
                ctx.sessions.close(id);
            }
            log::warn!(
                "the session store reached 90 % of [store] max_mb: removed the {} longest-idle \
                 sessions",
                removed.len()
            );
        }
        Ok(_) => {}
        Err(error) => log::debug!("{error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn ticks_stay_on_the_schedule_whatever_each_tick_costs() {
        let start = Instant::now();
        // A tick that fires 5 ms late and takes 300 ms still aims at the next whole second.
        let after_slow_tick = start + SECOND + Duration::from_millis(305);
        assert_eq!(
            next_tick(start, SECOND, after_slow_tick),
            start + 2 * SECOND
        );
        // Over an hour of ticks that each run 40 ms, the schedule has not moved.
        let mut now = start;
        for _ in 0..3600 {
            now = next_tick(start, SECOND, now) + Duration::from_millis(40);
        }
        assert_eq!(next_tick(start, SECOND, now), start + 3601 * SECOND);
    }

    #[test]
    fn a_long_pause_gives_one_tick_then_the_schedule_resumes() {
        let start = Instant::now();
        // Stopped at t = 2.5 s and continued 30 s later: the overdue deadline fires once; the
        // next one is the first slot after the resume, not the 30 missed ones.
        let resumed = start + Duration::from_millis(32_500);
        let next = next_tick(start, SECOND, resumed);
        assert_eq!(next, start + 33 * SECOND);
        assert!(next > resumed);
    }

    #[test]
    fn the_first_tick_is_one_period_after_start() {
        let start = Instant::now();
        assert_eq!(next_tick(start, 5 * SECOND, start), start + 5 * SECOND);
        assert_eq!(
            next_tick(start, 5 * SECOND, start + Duration::from_nanos(1)),
            start + 5 * SECOND
        );
        assert_eq!(
            next_tick(start, 5 * SECOND, start + 5 * SECOND),
            start + 10 * SECOND
        );
    }
}
