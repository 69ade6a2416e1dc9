//! The gateway's upstream metrics: requests to each provider by outcome and their latency,
//! fallbacks from one model alias to the next, and the time a request spends in blufio
//! itself. Each provider's and each fallback step's handles are registered once, when the
//! daemon is built from its configuration, so their label sets are bounded by it.

use metrics::{Counter, Histogram};

/// What became of one request to an upstream (`status` of `blufio_upstream_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// A 2xx answer.
    Success,
    /// 429.
    RateLimited,
    /// Another 4xx: a refusal that retrying will not change.
    Refused,
    /// A 5xx.
    ServerError,
    /// 529 or another status outside HTTP's registry (Anthropic's "overloaded").
    Overloaded,
    /// No answer: the connection failed.
    Unreachable,
    /// No answer in time.
    Timeout,
}

impl UpstreamOutcome {
    /// Every outcome, in label order.
    pub const ALL: [UpstreamOutcome; 7] = [
        UpstreamOutcome::Success,
        UpstreamOutcome::RateLimited,
        UpstreamOutcome::Refused,
        UpstreamOutcome::ServerError,
        UpstreamOutcome::Overloaded,
        UpstreamOutcome::Unreachable,
        UpstreamOutcome::Timeout,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamOutcome::Success => "2xx",
            UpstreamOutcome::RateLimited => "429",
            UpstreamOutcome::Refused => "4xx",
            UpstreamOutcome::ServerError => "5xx",
            UpstreamOutcome::Overloaded => "529",
            UpstreamOutcome::Unreachable => "unreachable",
            UpstreamOutcome::Timeout => "timeout",
        }
    }

    /// The outcome of an answer with `status`.
    pub fn of_status(status: u16) -> UpstreamOutcome {
        match status {
            200..=299 => UpstreamOutcome::Success,
            429 => UpstreamOutcome::RateLimited,
            500..=599 if status != 529 => UpstreamOutcome::ServerError,
            400..=499 => UpstreamOutcome::Refused,
            _ => UpstreamOutcome::Overloaded,
        }
    }
}

/// The handles of one provider: its requests by outcome and the latency of its answers.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    requests: Vec<(UpstreamOutcome, Counter)>,
    latency: Histogram,
}

impl UpstreamMetrics {
    pub(super) fn new(requests: Vec<(UpstreamOutcome, Counter)>, latency: Histogram) -> Self {
        UpstreamMetrics { requests, latency }
    }

    /// Handles that count nothing, for tests and for agents built outside a daemon.
    pub fn noop() -> UpstreamMetrics {
        UpstreamMetrics {
            requests: Vec::new(),
            latency: Histogram::noop(),
        }
    }

    /// Counts one request to the upstream and, when it answered, how long that took.
    pub fn record(&self, outcome: UpstreamOutcome, latency: Option<std::time::Duration>) {
        if let Some((_, counter)) = self.requests.iter().find(|(kind, _)| *kind == outcome) {
            counter.increment(1);
        }
        if let Some(latency) = latency {
            self.latency.record(latency.as_secs_f64());
        }
    }
}

/// Upper bounds of the `blufio_gateway_overhead_seconds` buckets: blufio's own share of a
/// request is meant to be well under a millisecond.
pub const OVERHEAD_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
];

/// The fallback counters of every step of every chain, registered at build.
#[derive(Debug, Clone, Default)]
pub struct FallbackCounters(Vec<((String, String), Counter)>);

impl FallbackCounters {
    pub(super) fn push(&mut self, from: &str, to: &str, counter: Counter) {
        if self.get(from, to).is_none() {
            self.0.push(((from.to_owned(), to.to_owned()), counter));
        }
    }

    fn get(&self, from: &str, to: &str) -> Option<&Counter> {
        self.0
            .iter()
            .find(|((a, b), _)| a == from && b == to)
            .map(|(_, counter)| counter)
    }

    /// Counts one move from alias `from` to alias `to`.
    pub fn count(&self, from: &str, to: &str) {
        if let Some(counter) = self.get(from, to) {
            counter.increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_fall_into_their_outcome_labels() {
        let label = |status| UpstreamOutcome::of_status(status).as_str();
        assert_eq!(label(200), "2xx");
        assert_eq!(label(429), "429");
        assert_eq!(label(404), "4xx");
        assert_eq!(label(503), "5xx");
        assert_eq!(label(529), "529");
        assert_eq!(label(0), "529");
    }
}
