//! The pressure and admission state machine: pure, fed one heap reading at a time.

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
