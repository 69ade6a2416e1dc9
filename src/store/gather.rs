//! How long a batch of writes waits for more before it commits: the pure decision behind
//! the database thread's group commit, and its table of cases.
//!
//! Committing whatever is queued the moment the thread is free splits a steady load into two
//! halves that take turns: while one half's commit is syncing, the other half queues; when
//! it ends, the queued half commits at once, and the half just answered comes back during
//! that commit. With 64 clients that is 32 writes per `fsync`, and each client waits for two
//! commits per message. Waiting a moment for the writers the last commit answered merges the
//! halves: all 64 in one `fsync`, and one commit per message.
//!
//! The wait is bounded by half the last commit's duration (on a disk that syncs in 0.1 ms
//! it is at most 50 µs) and by [`MAX_WAIT`], and it happens only while the last commit saw
//! more than one writer, so a lone client never waits. When the load drops, one batch waits
//! in vain, once, for at most that bound.

use std::time::Duration;

/// The longest a batch waits for more writers.
pub(super) const MAX_WAIT: Duration = Duration::from_millis(2);

/// What the last commit showed of the load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Pace {
    /// The writes it answered plus the jobs already waiting when it ended: the writers in
    /// flight, each of whom is likely to send another write soon.
    pub(super) writers: usize,
    /// How long its transaction took, the `fsync` included.
    pub(super) took: Duration,
}

/// Decides whether a batch holding `batched` jobs (`writes` of them writes) waits for more
/// before it commits: `Some((jobs, wait))` to wait until it holds `jobs` or `wait` has
/// passed, `None` to commit now. `max_batch` bounds the batch.
pub(super) fn gather(
    pace: Pace,
    batched: usize,
    writes: usize,
    max_batch: usize,
) -> Option<(usize, Duration)> {
    // Reads alone commit nothing, and a single writer has nobody to wait for.
    if writes == 0 || pace.writers < 2 {
        return None;
    }
    let jobs = pace.writers.min(max_batch);
    let wait = (pace.took / 2).min(MAX_WAIT);
    (batched < jobs && !wait.is_zero()).then_some((jobs, wait))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A case: its name, the last commit's pace, the jobs batched, the writes among them and
    /// the decision.
    type Case = (&'static str, Pace, usize, usize, Option<(usize, Duration)>);

    fn pace(writers: usize, took: Duration) -> Pace {
        Pace { writers, took }
    }

    #[test]
    fn a_batch_waits_for_the_writers_of_the_last_commit_within_half_its_duration() {
        let cases: &[Case] = &[
            ("first batch", Pace::default(), 1, 1, None),
            ("a lone client never waits", pace(1, 5 * MS), 1, 1, None),
            ("reads alone never wait", pace(64, 5 * MS), 3, 0, None),
            (
                "the queued half waits for the half just answered",
                pace(64, 4 * MS),
                32,
                32,
                Some((64, 2 * MS)),
            ),
            (
                "the first writer back waits for the others",
                pace(64, 3 * MS),
                1,
                1,
                Some((64, 1500 * Duration::from_micros(1))),
            ),
            ("a full batch commits now", pace(64, 4 * MS), 64, 64, None),
            (
                "an SD card's slow sync waits no longer than the bound",
                pace(8, 40 * MS),
                2,
                2,
                Some((8, MAX_WAIT)),
            ),
            (
                "a fast disk waits half its sync",
                pace(8, Duration::from_micros(100)),
                2,
                2,
                Some((8, Duration::from_micros(50))),
            ),
            (
                "more writers than a batch holds wait for a full batch",
                pace(1000, 5 * MS),
                10,
                10,
                Some((256, 2 * MS)),
            ),
            (
                "a commit of no time has nothing to wait for",
                pace(8, Duration::ZERO),
                1,
                1,
                None,
            ),
        ];
        for (case, pace, batched, writes, expected) in cases {
            assert_eq!(gather(*pace, *batched, *writes, 256), *expected, "{case}");
        }
    }
}
