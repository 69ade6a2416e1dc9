//! The memory monitor: samples heap and RSS, runs the pressure state machine, purges and
//! sheds under pressure, and flips admission control above the limit.
//!
//! A sample is taken before the listeners open and then once per `monitor_interval_secs` by
//! a background task; requests only ever read the latest sample, never the allocator.

use std::{
    fmt, io,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{context::Context, error::Error, metrics::ErrorKind};

/// Heap statistics from the allocator, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes allocated by the application (jemalloc `stats.allocated`).
    pub allocated_bytes: u64,
    /// Bytes in resident allocator pages (jemalloc `stats.resident`).
    pub resident_bytes: u64,
}

/// A source of heap statistics and the purge that returns free pages to the OS.
pub trait HeapSource: Send + Sync + fmt::Debug {
    /// Reads fresh statistics; `Ok(None)` when the allocator offers none.
    ///
    /// # Errors
    ///
    /// Returns an error when the allocator refuses the read.
    fn read(&self) -> Result<Option<HeapStats>, Error>;
    /// Returns unused pages of every arena to the OS.
    ///
    /// # Errors
    ///
    /// Returns an error when the allocator refuses the purge.
    fn purge(&self) -> Result<(), Error>;
    /// Returns pages that have been free for longer than the allocator's decay time to the
    /// OS. The monitor calls it on every tick, so memory comes back after a burst even when
    /// nothing allocates (jemalloc otherwise decays only as a side effect of allocating).
    /// The default does nothing.
    ///
    /// # Errors
    ///
    /// Returns an error when the allocator refuses the call.
    fn decay(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Returns the allocator's page size, when it has one.
    fn page_size(&self) -> Option<u64>;
    /// Returns the allocator's name, for diagnostics.
    fn name(&self) -> &'static str;
}

/// A source of the process's resident set size.
pub trait RssSource: Send + Sync + fmt::Debug {
    /// Reads the RSS in bytes; `Ok(None)` when this OS offers no source.
    ///
    /// # Errors
    ///
    /// Returns an error when the source exists but cannot be read.
    fn resident_bytes(&self) -> io::Result<Option<u64>>;
    /// Returns the name of the source (`statm`, `mach`, `none`, …).
    fn source(&self) -> &'static str;
}

/// Lets a caller keep a handle on the source it plugs in (to change a test reading, say).
impl<T: HeapSource + ?Sized> HeapSource for std::sync::Arc<T> {
    fn read(&self) -> Result<Option<HeapStats>, Error> {
        (**self).read()
    }

    fn purge(&self) -> Result<(), Error> {
        (**self).purge()
    }

    fn decay(&self) -> Result<(), Error> {
        (**self).decay()
    }

    fn page_size(&self) -> Option<u64> {
        (**self).page_size()
    }

    fn name(&self) -> &'static str {
        (**self).name()
    }
}

impl RssSource for blufio_platform::RssReader {
    fn resident_bytes(&self) -> io::Result<Option<u64>> {
        blufio_platform::RssReader::resident_bytes(self)
    }

    fn source(&self) -> &'static str {
        blufio_platform::RssReader::source(self)
    }
}

/// A heap source whose reading is set by hand: for tests and for hosts that measure memory
/// themselves. It counts purges and can be told to fail.
#[derive(Debug, Default)]
pub struct ManualHeap {
    allocated_bytes: AtomicU64,
    purges: AtomicU64,
    failing: AtomicBool,
}

impl ManualHeap {
    /// Creates a source reporting `allocated_bytes` (resident reads the same).
    pub fn new(allocated_bytes: u64) -> ManualHeap {
        let heap = ManualHeap::default();
        heap.set(allocated_bytes);
        heap
    }

    /// Sets the reading returned from now on.
    pub fn set(&self, allocated_bytes: u64) {
        self.allocated_bytes
            .store(allocated_bytes, Ordering::Relaxed);
    }

    /// Makes every read fail (`true`) or succeed again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// Returns how many purges were requested.
    pub fn purges(&self) -> u64 {
        self.purges.load(Ordering::Relaxed)
    }
}

impl HeapSource for ManualHeap {
    fn read(&self) -> Result<Option<HeapStats>, Error> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(Error::Allocator("simulated read failure".to_owned()));
        }
        let bytes = self.allocated_bytes.load(Ordering::Relaxed);
        Ok(Some(HeapStats {
            allocated_bytes: bytes,
            resident_bytes: bytes,
        }))
    }

    fn purge(&self) -> Result<(), Error> {
        self.purges.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn page_size(&self) -> Option<u64> {
        None
    }

    fn name(&self) -> &'static str {
        "manual"
    }
}

/// An RSS source with a fixed reading (`None` simulates an OS without a source).
#[derive(Debug, Clone, Copy)]
pub struct FixedRss(pub Option<u64>);

impl RssSource for FixedRss {
    fn resident_bytes(&self) -> io::Result<Option<u64>> {
        Ok(self.0)
    }

    fn source(&self) -> &'static str {
        if self.0.is_some() { "fixed" } else { "none" }
    }
}

/// The latest memory reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySample {
    /// Heap statistics, when the allocator offers them.
    pub heap: Option<HeapStats>,
    /// Resident set size, when the OS offers it.
    pub rss_bytes: Option<u64>,
    /// When the sample was taken.
    pub taken_at: Instant,
}

/// Memory thresholds in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Above this heap size blufio is under pressure.
    pub warn_bytes: u64,
    /// Above this heap size new sessions are refused.
    pub limit_bytes: u64,
}

/// The pressure and admission state; it changes only through [`PressureState::next`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PressureState {
    /// The heap went above the warn threshold and has not yet fallen below 90% of it.
    pub under_pressure: bool,
    /// The heap went above the limit and has not yet fallen below 90% of it.
    pub rejecting: bool,
}

/// What changed in one step of the state machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transition {
    /// Pressure began: purge and shed now.
    pub entered_pressure: bool,
    /// Pressure ended.
    pub left_pressure: bool,
    /// New sessions are refused from now on.
    pub started_rejecting: bool,
    /// New sessions are accepted again.
    pub stopped_rejecting: bool,
}

impl PressureState {
    /// Computes the next state for a heap reading.
    ///
    /// Each flag switches on above its threshold and off only below 90% of it, so a heap
    /// hovering at the threshold does not flap the gauge, the log or admission.
    pub fn next(self, heap_bytes: u64, thresholds: Thresholds) -> (PressureState, Transition) {
        let below_90_percent =
            |threshold: u64| u128::from(heap_bytes) * 10 < u128::from(threshold) * 9;
        let under_pressure = if self.under_pressure {
            !below_90_percent(thresholds.warn_bytes)
        } else {
            heap_bytes > thresholds.warn_bytes
        };
        let rejecting = if self.rejecting {
            !below_90_percent(thresholds.limit_bytes)
        } else {
            heap_bytes > thresholds.limit_bytes
        };
        let next = PressureState {
            under_pressure,
            rejecting,
        };
        let transition = Transition {
            entered_pressure: under_pressure && !self.under_pressure,
            left_pressure: !under_pressure && self.under_pressure,
            started_rejecting: rejecting && !self.rejecting,
            stopped_rejecting: !rejecting && self.rejecting,
        };
        (next, transition)
    }
}

/// Something that can free memory when pressure starts (a cache that can be dropped).
pub type ShedHook = Box<dyn Fn() + Send + Sync>;

/// How often a warning repeats while pressure lasts.
const PRESSURE_WARNING_INTERVAL: Duration = Duration::from_secs(300);

/// The memory monitor's sources and state, owned by the [`Context`].
pub struct MemoryMonitor {
    heap: Box<dyn HeapSource>,
    rss: Box<dyn RssSource>,
    shed_hooks: Vec<(String, ShedHook)>,
    state: Mutex<MonitorState>,
    rejecting: AtomicBool,
    rss_over_limit: AtomicBool,
    rss_failing: AtomicBool,
}

#[derive(Debug, Clone, Copy)]
struct MonitorState {
    sample: Option<MemorySample>,
    pressure: PressureState,
    last_warning: Option<Instant>,
    /// The highest heap charged to connections in the previous sampling period.
    connection_peak: u64,
}

impl fmt::Debug for MemoryMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryMonitor")
            .field("heap", &self.heap)
            .field("rss", &self.rss)
            .field("shed_hooks", &self.shed_hooks.len())
            .finish_non_exhaustive()
    }
}

impl MemoryMonitor {
    /// Creates a monitor with no sample yet.
    pub fn new(
        heap: Box<dyn HeapSource>,
        rss: Box<dyn RssSource>,
        shed_hooks: Vec<(String, ShedHook)>,
    ) -> MemoryMonitor {
        MemoryMonitor {
            heap,
            rss,
            shed_hooks,
            state: Mutex::new(MonitorState {
                sample: None,
                pressure: PressureState::default(),
                last_warning: None,
                connection_peak: 0,
            }),
            rejecting: AtomicBool::new(false),
            rss_over_limit: AtomicBool::new(false),
            rss_failing: AtomicBool::new(false),
        }
    }

    /// Returns true while the resident set is above `memory_limit_mb` (heap aside): the
    /// daemon then reports itself degraded and purges on every tick until it falls back.
    pub fn rss_over_limit(&self) -> bool {
        self.rss_over_limit.load(Ordering::Acquire)
    }

    /// Returns the latest sample (`None` only before the first tick).
    pub fn sample(&self) -> Option<MemorySample> {
        self.lock().sample
    }

    /// Returns the pressure and admission state.
    pub fn pressure(&self) -> PressureState {
        self.lock().pressure
    }

    /// Returns true while new sessions are refused for memory; a single atomic load.
    pub fn rejecting(&self) -> bool {
        self.rejecting.load(Ordering::Acquire)
    }

    /// Returns the allocator's name and page size.
    pub fn allocator(&self) -> (&'static str, Option<u64>) {
        (self.heap.name(), self.heap.page_size())
    }

    /// Returns the RSS source's name.
    pub fn rss_source(&self) -> &'static str {
        self.rss.source()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MonitorState> {
        // The state is plain data; a panic elsewhere cannot leave it half-written.
        crate::sync::lock(&self.state)
    }
}

/// Takes one sample and acts on it: the body of every monitor tick.
///
/// A failing reader is counted in `blufio_errors_total{type="memory_monitor"}` and logged;
/// the previous reading of that source is kept, so one bad read changes nothing else.
pub fn tick(ctx: &Context) {
    let monitor = &ctx.memory;
    let metrics = &ctx.metrics;
    let previous = monitor.lock().sample;
    let thresholds = ctx.thresholds();

    if let Err(error) = monitor.heap.decay() {
        log::error!("memory monitor: allocator decay failed: {error}");
        metrics.count_error(ErrorKind::MemoryMonitor);
    }
    let heap = match monitor.heap.read() {
        Ok(heap) => heap,
        Err(error) => {
            log::error!("memory monitor: heap read failed: {error}");
            metrics.count_error(ErrorKind::MemoryMonitor);
            previous.and_then(|sample| sample.heap)
        }
    };
    let rss_bytes = match monitor.rss.resident_bytes() {
        Ok(rss) => {
            if monitor.rss_failing.swap(false, Ordering::AcqRel) {
                log::warn!("memory monitor: RSS reads work again");
            }
            rss
        }
        Err(error) => {
            // Once per episode: out of file descriptors, every tick would fail the same way.
            if !monitor.rss_failing.swap(true, Ordering::AcqRel) {
                log::error!(
                    "memory monitor: RSS read failed: {error} (logged once until it recovers)"
                );
            }
            metrics.count_error(ErrorKind::MemoryMonitor);
            previous.and_then(|sample| sample.rss_bytes)
        }
    };
    let now = Instant::now();
    let sample = MemorySample {
        heap,
        rss_bytes,
        taken_at: now,
    };
    if let Some(heap) = heap {
        metrics.set_heap(heap.allocated_bytes, heap.resident_bytes);
    }
    if let Some(rss) = rss_bytes {
        metrics.set_rss(rss);
    }

    // Heap charged to open connections is their cause's, not the sessions': it must neither
    // trip admission nor make the monitor trim or close authenticated users' sessions. When it
    // is what pushes the heap past the warn threshold, connections are shed instead.
    let connection_bytes = ctx.connections.memory_bytes();
    // A connection that closed shortly before this reading may still be in it (its frees sit
    // in a thread cache, or raced the read), and one shed on the previous tick may be gone
    // from the registry before its memory is: subtract the highest charge of this period and
    // the previous one, so the sessions see that memory as the connections' for one more tick.
    let period_peak = ctx.connections.take_peak();
    let previous_peak = std::mem::replace(&mut monitor.lock().connection_peak, period_peak);
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
    let rss_over_limit = rss_bytes.is_some_and(|rss| rss > thresholds.limit_bytes);
    let rss_over_warn = rss_bytes.is_some_and(|rss| rss > thresholds.warn_bytes);
    let was_over = monitor
        .rss_over_limit
        .swap(rss_over_limit, Ordering::AcqRel);
    if rss_over_limit && !was_over {
        log::warn!(
            "resident memory {} MiB is above memory_limit_mb {} MiB; purging on every tick",
            rss_bytes.unwrap_or(0) / (1024 * 1024),
            thresholds.limit_bytes / (1024 * 1024)
        );
    }

    let (pressure, transition, warn) = {
        let mut state = monitor.lock();
        state.sample = Some(sample);
        let (pressure, transition) = match session_heap {
            Some(session_heap) => state.pressure.next(session_heap, thresholds),
            None => (state.pressure, Transition::default()),
        };
        state.pressure = pressure;
        let warn = pressure.under_pressure
            && (transition.entered_pressure
                || state
                    .last_warning
                    .is_none_or(|last| now.duration_since(last) >= PRESSURE_WARNING_INTERVAL));
        if warn {
            state.last_warning = Some(now);
        }
        (pressure, transition, warn)
    };
    monitor
        .rejecting
        .store(pressure.rejecting, Ordering::Release);
    metrics
        .memory_pressure
        .set(if pressure.under_pressure { 1.0 } else { 0.0 });
    metrics
        .admission_rejecting
        .set(if pressure.rejecting { 1.0 } else { 0.0 });

    let heap_mib = session_heap.unwrap_or(0) / (1024 * 1024);
    if warn {
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
    if warn {
        relieve(ctx);
    } else if rss_over_warn {
        // Resident memory can stay high after a burst long after the heap has shrunk (freed
        // pages the allocator keeps): returning them is the relief, not shedding sessions.
        purge(ctx);
    }
    metrics.run_upkeep();
}

/// Frees what can be freed: shed sessions and registered caches, then purge every arena.
fn relieve(ctx: &Context) {
    ctx.sessions
        .shed_under_pressure(&ctx.session_limits(), Instant::now());
    for (name, hook) in &ctx.memory.shed_hooks {
        log::debug!("memory pressure: running shed hook {name}");
        hook();
    }
    purge(ctx);
}

/// Returns unused pages of every arena to the OS.
fn purge(ctx: &Context) {
    let started = Instant::now();
    match ctx.memory.heap.purge() {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const THRESHOLDS: Thresholds = Thresholds {
        warn_bytes: 150 * MIB,
        limit_bytes: 200 * MIB,
    };

    fn run(readings_mib: &[u64]) -> Vec<(PressureState, Transition)> {
        let mut state = PressureState::default();
        readings_mib
            .iter()
            .map(|mib| {
                let (next, transition) = state.next(mib * MIB, THRESHOLDS);
                state = next;
                (next, transition)
            })
            .collect()
    }

    #[test]
    fn pressure_enters_above_warn() {
        let steps = run(&[100, 150, 151]);
        assert!(!steps[0].0.under_pressure);
        assert!(
            !steps[1].0.under_pressure,
            "at the threshold is not above it"
        );
        assert!(steps[2].0.under_pressure);
        assert!(steps[2].1.entered_pressure);
    }

    #[test]
    fn pressure_holds_until_below_ninety_percent() {
        // 90% of 150 MiB is 135 MiB.
        let steps = run(&[160, 140, 136, 135, 134]);
        assert!(steps[1].0.under_pressure && !steps[1].1.left_pressure);
        assert!(steps[2].0.under_pressure);
        assert!(
            steps[3].0.under_pressure,
            "exactly 90% still counts as pressure"
        );
        assert!(!steps[4].0.under_pressure);
        assert!(steps[4].1.left_pressure);
        assert_eq!(steps.iter().filter(|s| s.1.entered_pressure).count(), 1);
    }

    #[test]
    fn admission_rejects_above_limit_and_recovers_below_ninety_percent() {
        let steps = run(&[201, 190, 179]);
        assert!(steps[0].0.rejecting && steps[0].1.started_rejecting);
        assert!(steps[0].0.under_pressure);
        assert!(steps[1].0.rejecting);
        assert!(!steps[2].0.rejecting && steps[2].1.stopped_rejecting);
    }

    #[test]
    fn readings_beyond_four_gib_compare_correctly() {
        let thresholds = Thresholds {
            warn_bytes: 5 * 1024 * MIB,
            limit_bytes: 6 * 1024 * MIB,
        };
        let (state, _) = PressureState::default().next(5 * 1024 * MIB + 1, thresholds);
        assert!(state.under_pressure && !state.rejecting);
        let (state, _) = state.next(7 * 1024 * MIB, thresholds);
        assert!(state.rejecting);
    }

    #[test]
    fn hovering_at_the_threshold_does_not_flap() {
        let steps = run(&[151, 149, 151, 149, 151]);
        assert_eq!(steps.iter().filter(|s| s.1.entered_pressure).count(), 1);
        assert_eq!(steps.iter().filter(|s| s.1.left_pressure).count(), 0);
    }
}
