//! The [`MemoryMonitor`]: the heap and RSS sources, the latest sample, the pressure state
//! and the admission flag that requests read.

use std::{
    fmt,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    pressure::{PressureState, Thresholds, Transition},
    source::{HeapSource, HeapStats, RssSource},
};
use crate::error::Error;

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

/// Something that can free memory when pressure starts (a cache that can be dropped).
pub type ShedHook = Box<dyn Fn() + Send + Sync>;

/// What one [`MemoryMonitor::record_sample`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PressureStep {
    /// The state from now on.
    pub pressure: PressureState,
    /// What changed.
    pub transition: Transition,
    /// Pressure is on and due a warning: it began now, or the last warning is old enough.
    pub warn: bool,
}

/// How often a warning repeats while pressure lasts.
const PRESSURE_WARNING_INTERVAL: Duration = Duration::from_secs(300);

/// The memory monitor's sources and state, owned by the daemon's `Context`; each tick of
/// the monitor task (`crate::monitor::tick`) reads and updates it.
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

    /// Reads the heap and the RSS now, returning pages past their decay time to the OS
    /// first. A failing read is logged and reported through `count_error`, and the previous
    /// reading of that source is kept, so one bad read changes nothing else.
    pub fn read(&self, count_error: impl Fn()) -> MemorySample {
        let previous = self.lock().sample;
        if let Err(error) = self.heap.decay() {
            log::error!("memory monitor: allocator decay failed: {error}");
            count_error();
        }
        let heap = match self.heap.read() {
            Ok(heap) => heap,
            Err(error) => {
                log::error!("memory monitor: heap read failed: {error}");
                count_error();
                previous.and_then(|sample| sample.heap)
            }
        };
        let rss_bytes = match self.rss.resident_bytes() {
            Ok(rss) => {
                if self.rss_failing.swap(false, Ordering::AcqRel) {
                    log::warn!("memory monitor: RSS reads work again");
                }
                rss
            }
            Err(error) => {
                // Once per episode: out of file descriptors, every tick would fail the same way.
                if !self.rss_failing.swap(true, Ordering::AcqRel) {
                    log::error!(
                        "memory monitor: RSS read failed: {error} (logged once until it recovers)"
                    );
                }
                count_error();
                previous.and_then(|sample| sample.rss_bytes)
            }
        };
        MemorySample {
            heap,
            rss_bytes,
            taken_at: Instant::now(),
        }
    }

    /// Keeps `period_peak`, the highest heap charged to connections in the sampling period
    /// just ended, and returns the previous period's.
    pub fn take_connection_peak(&self, period_peak: u64) -> u64 {
        std::mem::replace(&mut self.lock().connection_peak, period_peak)
    }

    /// Sets whether the resident set is above `memory_limit_mb`; returns the previous value.
    pub fn set_rss_over_limit(&self, over: bool) -> bool {
        self.rss_over_limit.swap(over, Ordering::AcqRel)
    }

    /// Keeps `sample` as the latest, steps the pressure state machine on `session_heap` (the
    /// heap less what is charged to connections; no reading leaves the state as it is) and
    /// sets the admission flag.
    pub fn record_sample(
        &self,
        sample: MemorySample,
        session_heap: Option<u64>,
        thresholds: Thresholds,
    ) -> PressureStep {
        let now = sample.taken_at;
        let step = {
            let mut state = self.lock();
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
            PressureStep {
                pressure,
                transition,
                warn,
            }
        };
        self.rejecting
            .store(step.pressure.rejecting, Ordering::Release);
        step
    }

    /// Returns unused pages of every arena to the OS.
    ///
    /// # Errors
    ///
    /// Returns an error when the allocator refuses the purge.
    pub fn purge(&self) -> Result<(), Error> {
        self.heap.purge()
    }

    /// Runs the hooks registered to free memory when pressure starts.
    pub fn run_shed_hooks(&self) {
        for (name, hook) in &self.shed_hooks {
            log::debug!("memory pressure: running shed hook {name}");
            hook();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MonitorState> {
        // The state is plain data; a panic elsewhere cannot leave it half-written.
        crate::sync::lock(&self.state)
    }
}
