//! Readiness: whether this daemon should get new traffic (`GET /ready`), as opposed to
//! liveness (`GET /health`, which stays 200 under load).
//!
//! Not ready while starting (before every listener is bound), while draining after SIGTERM,
//! and while refusing new sessions above `memory_limit_mb`.

use std::sync::atomic::{AtomicU8, Ordering};

/// Where the daemon is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Built, listeners not all bound yet.
    Starting,
    /// Every listener bound; serving.
    Serving,
    /// Shutdown has begun; in-flight work drains.
    Draining,
}

/// Why the daemon is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// The listeners are not all bound yet.
    Starting,
    /// Shutdown has begun.
    Draining,
    /// New sessions are refused above `memory_limit_mb`.
    MemoryLimit,
}

impl NotReady {
    /// Returns the machine-readable reason (the `reason` field of `/ready`).
    pub fn as_str(self) -> &'static str {
        match self {
            NotReady::Starting => "starting",
            NotReady::Draining => "draining",
            NotReady::MemoryLimit => "memory_limit",
        }
    }

    /// Returns a sentence for operators.
    pub fn message(self) -> &'static str {
        match self {
            NotReady::Starting => "the daemon is starting",
            NotReady::Draining => "the daemon is shutting down",
            NotReady::MemoryLimit => "memory is above memory_limit_mb; new sessions are refused",
        }
    }
}

/// Decides readiness from the phase and admission state.
///
/// # Errors
///
/// Returns the reason the daemon should get no new traffic.
pub fn check(phase: Phase, rejecting_sessions: bool) -> Result<(), NotReady> {
    match phase {
        Phase::Starting => Err(NotReady::Starting),
        Phase::Draining => Err(NotReady::Draining),
        Phase::Serving if rejecting_sessions => Err(NotReady::MemoryLimit),
        Phase::Serving => Ok(()),
    }
}

/// The phase, shared between the daemon's threads.
#[derive(Debug, Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    /// Returns the current phase.
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }

    /// Moves to `phase`; draining is final.
    pub fn set(&self, phase: Phase) {
        let value = match phase {
            Phase::Starting => 0,
            Phase::Serving => 1,
            Phase::Draining => 2,
        };
        self.0.fetch_max(value, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_serving_and_accepting() {
        assert_eq!(check(Phase::Starting, false), Err(NotReady::Starting));
        assert_eq!(check(Phase::Serving, false), Ok(()));
        assert_eq!(check(Phase::Serving, true), Err(NotReady::MemoryLimit));
        assert_eq!(check(Phase::Draining, false), Err(NotReady::Draining));
    }

    #[test]
    fn draining_is_final() {
        let phase = PhaseCell::default();
        assert_eq!(phase.get(), Phase::Starting);
        phase.set(Phase::Serving);
        phase.set(Phase::Draining);
        phase.set(Phase::Serving);
        assert_eq!(phase.get(), Phase::Draining);
    }
}
