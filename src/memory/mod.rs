//! Memory readings and the pressure they put the daemon under: the sources (`source.rs`), the
//! pure state machine (`pressure.rs`) and the [`MemoryMonitor`] that holds the latest sample,
//! the pressure state and the admission flag (`monitor.rs`).
//!
//! A sample is taken before the listeners open and then once per `monitor_interval_secs` by
//! the monitor task (`crate::monitor`); requests only ever read the latest sample, never the
//! allocator.

mod monitor;
mod pressure;
mod source;

pub use self::{
    monitor::{MemoryMonitor, MemorySample, PressureStep, ShedHook},
    pressure::{PressureState, Thresholds, Transition},
    source::{FixedRss, HeapSource, HeapStats, ManualHeap, RssSource},
};
