//! The background tasks: the memory monitor tick and idle-session eviction.
//!
//! Both run on the daemon's own executor and end when `ctx.closing` fires.

use std::{sync::Arc, time::Duration};

use async_io::Timer;

use crate::{context::Context, memory};

/// Samples memory every `monitor_interval_secs` until shutdown.
pub(crate) async fn monitor(ctx: Arc<Context>) {
    let interval = Duration::from_secs(ctx.config.daemon.monitor_interval_secs);
    while ctx
        .closing
        .interrupt(Timer::after(interval))
        .await
        .is_some()
    {
        memory::tick(&ctx);
        // Lets the installed logger write the counts of repeated errors whose episode ended
        // quietly (see `logging.rs`); a no-op when no logger is installed.
        log::logger().flush();
    }
}

/// Closes idle sessions, checking twice per idle timeout (between 250 ms and 30 s).
pub(crate) async fn evict_idle(ctx: Arc<Context>) {
    let period = (ctx.sessions.limits().idle_timeout / 2)
        .clamp(Duration::from_millis(250), Duration::from_secs(30));
    while ctx.closing.interrupt(Timer::after(period)).await.is_some() {
        ctx.sessions.evict_idle(&ctx);
    }
}
