//! One tick of the memory monitor: sample, relieve connections, step pressure, shed and purge.
//! The monitor task (`tasks::monitor`) runs it on its schedule; `spawn` runs it once before
//! the listeners open, so the first `/health` already has real numbers.

use std::time::Instant;

use crate::{
    context::Context,
    memory::{MemorySample, Thresholds},
    metrics::ErrorKind,
};

/// Takes one sample and acts on it: the body of every monitor tick.
///
/// A failing reader is counted in `blufio_errors_total{type="memory_monitor"}` and logged;
/// the previous reading of that source is kept, so one bad read changes nothing else.
pub fn tick(ctx: &Context) {
    let monitor = &ctx.memory;
    let metrics = &ctx.metrics;
    let thresholds = ctx.thresholds();

    let sample = monitor.read(|| metrics.count_error(ErrorKind::MemoryMonitor));
    let MemorySample {
        heap, rss_bytes, ..
    } = sample;
    if let Some(heap) = heap {
        metrics.set_heap(heap.allocated_bytes, heap.resident_bytes);
    }
    if let Some(rss) = rss_bytes {
        metrics.set_rss(rss);
    }

    let session_heap = relieve_connections(ctx, &sample, thresholds);
    let rss_over_limit = rss_bytes.is_some_and(|rss| rss > thresholds.limit_bytes);
    let rss_over_warn = rss_bytes.is_some_and(|rss| rss > thresholds.warn_bytes);
    let was_over = monitor.set_rss_over_limit(rss_over_limit);
    if rss_over_limit && !was_over {
        log::warn!(
            "resident memory {} MiB is above memory_limit_mb {} MiB; purging on every tick",
            rss_bytes.unwrap_or(0) / (1024 * 1024),
            thresholds.limit_bytes / (1024 * 1024)
        );
    }

    let step = monitor.record_sample(sample, session_heap, thresholds);
    let (pressure, transition) = (step.pressure, step.transition);
    metrics
        .memory_pressure
        .set(if pressure.under_pressure { 1.0 } else { 0.0 });
    metrics
        .admission_rejecting
        .set(if pressure.rejecting { 1.0 } else { 0.0 });

    let heap_mib = session_heap.unwrap_or(0) / (1024 * 1024);
    if step.warn {
        log::warn!(
            "memory pressure: heap {heap_mib} MiB is above memory_warn_mb {} MiB; purging and shedding",
            thresholds.warn_bytes / (1024 * 1024)
        );
    }
    if transition.started_rejecting {
        log::warn!(
            "memory limit: heap {heap_mib} MiB is above memory_limit_mb {} MiB; refusing new sessions",
            thresholds.limit_bytes / (1024 * 1024)
        );
    }
    if transition.stopped_rejecting {
        log::info!("memory limit: heap {heap_mib} MiB; accepting new sessions again");
    }
    if transition.left_pressure {
        log::info!("memory pressure over: heap {heap_mib} MiB");
    }
    if step.warn {
        relieve(ctx);
    } else if rss_over_warn {
        // Resident memory can stay high after a burst long after the heap has shrunk (freed
        // pages the allocator keeps): returning them is the relief, not shedding sessions.
        purge(ctx);
    }
    metrics.run_upkeep();
}

/// Closes connections when the heap charged to them pushes it past the warn threshold, and
/// returns the heap left to the sessions (`None` without a heap reading).
fn relieve_connections(
    ctx: &Context,
    sample: &MemorySample,
    thresholds: Thresholds,
) -> Option<u64> {
    let heap = sample.heap;
    // Heap charged to open connections is their cause's, not the sessions': it must neither
    // trip admission nor make the monitor trim or close authenticated users' sessions. When it
    // is what pushes the heap past the warn threshold, connections are shed instead.
    let connection_bytes = ctx.connections.memory_bytes();
    // A connection that closed shortly before this reading may still be in it (its frees sit
    // in a thread cache, or raced the read), and one shed on the previous tick may be gone
    // from the registry before its memory is: subtract the highest charge of this period and
    // the previous one, so the sessions see that memory as the connections' for one more tick.
    let period_peak = ctx.connections.take_peak();
    let previous_peak = ctx.memory.take_connection_peak(period_peak);
    let attributed = connection_bytes.max(period_peak).max(previous_peak);
    let session_heap = heap.map(|heap| heap.allocated_bytes.saturating_sub(attributed));
    if let Some(heap) = heap
        && heap.allocated_bytes > thresholds.warn_bytes
        && connection_bytes > 0
    {
        let target = thresholds.warn_bytes / 10 * 9;
        let excess = heap.allocated_bytes.saturating_sub(target);
        let closed = ctx.connections.shed(excess.min(connection_bytes));
        if closed > 0 {
            log::warn!(
                "memory pressure from connections: heap {} MiB, {} MiB charged to {} open \
                 connections; closing {closed} (incomplete requests first)",
                heap.allocated_bytes / (1024 * 1024),
                connection_bytes / (1024 * 1024),
                ctx.connections.open(),
            );
        }
    }
    session_heap
}

/// Frees what can be freed: shed sessions and registered caches, then purge every arena.
fn relieve(ctx: &Context) {
    ctx.sessions
        .shed_under_pressure(&ctx.session_limits(), Instant::now());
    ctx.memory.run_shed_hooks();
    purge(ctx);
}

/// Returns unused pages of every arena to the OS.
fn purge(ctx: &Context) {
    let started = Instant::now();
    match ctx.memory.purge() {
        Ok(()) => {
            ctx.metrics.memory_purges.increment(1);
            log::debug!("purged all arenas in {:?}", started.elapsed());
        }
        Err(error) => {
            log::error!("memory monitor: {error}");
            ctx.metrics.count_error(ErrorKind::MemoryMonitor);
        }
    }
}
