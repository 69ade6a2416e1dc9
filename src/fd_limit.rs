//! Fitting `[daemon] max_connections` to the open-file limit: a cap the process cannot reach
//! turns into accept failures and probes that time out, so the daemon raises its soft limit
//! toward the hard one when that is enough, and otherwise serves fewer connections and says
//! so with both numbers.
//!
//! [`plan`] is the pure decision; [`fit`] applies it at start-up and [`check`] only reports
//! it (`blufio check-config`). A derived cap (`max_connections = 0`) always fits: it is
//! computed from the soft limit in the first place.

use blufio_platform::FdLimits;

use crate::connection::FD_HEADROOM;

/// The smallest cap a clamp leaves, as for the derived default.
const MIN_CONNECTIONS: u64 = 16;

/// What to do about a configured connection cap under an open-file limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdPlan {
    /// The connection cap to serve.
    pub max_connections: usize,
    /// Raise the soft limit to this first.
    pub raise_soft_to: Option<u64>,
    /// Why the cap is lower than configured, naming both numbers.
    pub warning: Option<String>,
}

/// Decides how `configured` connections fit under `limits`.
pub fn plan(configured: usize, limits: Option<FdLimits>) -> FdPlan {
    let unchanged = FdPlan {
        max_connections: configured,
        raise_soft_to: None,
        warning: None,
    };
    let Some(FdLimits {
        soft: Some(soft),
        hard,
    }) = limits
    else {
        return unchanged;
    };
    let needed = (configured as u64).saturating_add(FD_HEADROOM);
    if needed <= soft {
        return unchanged;
    }
    if hard.is_none_or(|hard| needed <= hard) {
        return FdPlan {
            raise_soft_to: Some(needed),
            ..unchanged
        };
    }
    let hard = hard.unwrap_or(soft);
    let fits = hard.saturating_sub(FD_HEADROOM).max(MIN_CONNECTIONS);
    FdPlan {
        max_connections: usize::try_from(fits).unwrap_or(configured).min(configured),
        raise_soft_to: (hard > soft).then_some(hard),
        warning: Some(format!(
            "[daemon] max_connections = {configured} needs about {needed} open files, but the \
             open-file limit is {soft} (hard limit {hard}): serving at most {fits} connections; \
             raise the limit (LimitNOFILE= in the systemd unit, ulimit -n) or lower \
             max_connections"
        )),
    }
}

/// Applies the plan for `configured` connections at start-up: raises the soft limit when
/// that helps, warns when the cap must shrink, and returns the cap to serve.
pub fn fit(configured: usize) -> usize {
    let limits = read_limits();
    let plan = plan(configured, limits);
    if let Some(raise) = plan.raise_soft_to {
        let soft = limits.and_then(|limits| limits.soft).unwrap_or(0);
        match blufio_platform::set_fd_soft_limit(raise) {
            Ok(()) => log::info!(
                "raised the open-file soft limit from {soft} to {raise} for \
                 [daemon] max_connections = {configured}"
            ),
            Err(error) => {
                // Nothing was raised: the cap must fit the soft limit as it is.
                let stuck = plan_for_soft(configured, soft);
                log::warn!(
                    "cannot raise the open-file soft limit from {soft} to {raise}: {error}; {}",
                    stuck.warning.as_deref().unwrap_or("")
                );
                return stuck.max_connections;
            }
        }
    }
    if let Some(warning) = &plan.warning {
        log::warn!("{warning}");
    }
    plan.max_connections
}

/// Returns the plan for `configured` without changing anything, for `check-config`.
pub fn check(configured: usize) -> FdPlan {
    plan(configured, read_limits())
}

fn plan_for_soft(configured: usize, soft: u64) -> FdPlan {
    plan(
        configured,
        Some(FdLimits {
            soft: Some(soft),
            hard: Some(soft),
        }),
    )
}

fn read_limits() -> Option<FdLimits> {
    match blufio_platform::fd_limits() {
        Ok(limits) => limits,
        Err(error) => {
            log::warn!("cannot read the open-file limit: {error}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(soft: u64, hard: Option<u64>) -> Option<FdLimits> {
        Some(FdLimits {
            soft: Some(soft),
            hard,
        })
    }

    #[test]
    fn a_cap_that_fits_is_kept() {
        assert_eq!(plan(100, limits(1024, Some(1024))).max_connections, 100);
        assert_eq!(plan(100, limits(1024, Some(1024))).raise_soft_to, None);
        assert_eq!(plan(5000, None).max_connections, 5000);
    }

    #[test]
    fn the_soft_limit_is_raised_when_the_hard_one_allows() {
        let plan = plan(1000, limits(256, Some(4096)));
        assert_eq!(plan.max_connections, 1000);
        assert_eq!(plan.raise_soft_to, Some(1064));
        assert_eq!(plan.warning, None);
        assert_eq!(
            super::plan(1000, limits(256, None)).raise_soft_to,
            Some(1064)
        );
    }

    #[test]
    fn past_the_hard_limit_the_cap_is_clamped_with_both_numbers() {
        let plan = plan(1000, limits(256, Some(256)));
        assert_eq!(plan.max_connections, 192);
        assert_eq!(plan.raise_soft_to, None);
        let warning = plan.warning.unwrap();
        assert!(warning.contains("max_connections = 1000"), "{warning}");
        assert!(warning.contains("open-file limit is 256"), "{warning}");
        assert!(warning.contains("at most 192"), "{warning}");
        let plan = super::plan(1000, limits(256, Some(512)));
        assert_eq!((plan.max_connections, plan.raise_soft_to), (448, Some(512)));
        assert_eq!(super::plan(1000, limits(20, Some(20))).max_connections, 16);
    }
}
