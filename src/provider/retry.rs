//! Retrying a call to the upstream: which answers are worth another try (429, 529 and other
//! non-standard statuses, 5xx, connection failures), how long to wait (exponential backoff
//! with jitter, or the upstream's `retry-after`), and when to give up.

use std::time::{Duration, Instant};

use async_io::Timer;
use trillium_client::{Conn, KnownHeaderName};

use crate::{
    agent::AgentError,
    metrics::{UpstreamMetrics, UpstreamOutcome},
};

/// Calls to the upstream for one message, at most (the first try and two retries).
pub const MAX_ATTEMPTS: u32 = 3;
/// The longest wait between two calls; a `retry-after` beyond it is returned to the client.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(20);
/// The first retry waits about this long; each further retry doubles it.
const BACKOFF_BASE: Duration = Duration::from_millis(400);

/// Why a call is retried.
#[derive(Debug, Clone, PartialEq)]
enum RetryCause {
    RateLimited,
    ServerError(u16),
    Overloaded,
    Unreachable(String),
}

impl RetryCause {
    /// Returns the error a client gets when no retry is left (or worth waiting for).
    fn into_error(self, retry_after: Option<Duration>) -> AgentError {
        match self {
            RetryCause::RateLimited => AgentError::RateLimited { retry_after },
            RetryCause::ServerError(status) => AgentError::Upstream(format!("HTTP {status}")),
            RetryCause::Overloaded => {
                AgentError::Upstream("non-standard HTTP status (such as 529 overloaded)".to_owned())
            }
            RetryCause::Unreachable(error) => {
                AgentError::Upstream(format!("cannot reach the provider: {error}"))
            }
        }
    }
}

/// Sends the request `call` builds, at most `attempts` times, retrying 429, 5xx and
/// connection failures; returns a 2xx conn, or [`AgentError::Rejected`] for a status not
/// worth retrying. `provider` names the upstream in the log; each call is counted in
/// `metrics` with the time its answer's head took.
///
/// A wait that would end past `deadline` (when the gateway gives up on the call) is not
/// waited: the failure is returned at once, so a client told `retry-after` gets `429`
/// with it instead of a `504` after a wait that could not succeed.
pub(crate) async fn send(
    provider: &str,
    attempts: u32,
    deadline: Instant,
    metrics: &UpstreamMetrics,
    mut call: impl FnMut() -> Conn,
) -> Result<Conn, AgentError> {
    let mut attempt = 1;
    loop {
        let sent = Instant::now();
        let answer = call().await;
        let latency = Some(sent.elapsed());
        let outcome = match &answer {
            Ok(conn) => UpstreamOutcome::of_status(conn.status().map_or(0, |status| status as u16)),
            Err(trillium_client::Error::InvalidStatus) => UpstreamOutcome::Overloaded,
            Err(_) => UpstreamOutcome::Unreachable,
        };
        metrics.record(
            outcome,
            latency.filter(|_| outcome != UpstreamOutcome::Unreachable),
        );
        let (cause, hint) = match answer {
            Ok(conn) => {
                let status = conn.status().map_or(0, |status| status as u16);
                match status {
                    200..=299 => return Ok(conn),
                    429 => (RetryCause::RateLimited, retry_after(&conn)),
                    500..=599 => (RetryCause::ServerError(status), retry_after(&conn)),
                    _ => return Err(AgentError::Rejected { status }),
                }
            }
            // trillium's status type has no 529 (Anthropic's "overloaded") and other
            // non-standard codes; they fail parsing and are retried like a 5xx.
            Err(trillium_client::Error::InvalidStatus) => (RetryCause::Overloaded, None),
            Err(error) => (RetryCause::Unreachable(error.to_string()), None),
        };
        let delay = backoff(attempt, hint, jitter());
        let past_deadline = Instant::now()
            .checked_add(delay)
            .is_none_or(|end| end >= deadline);
        if attempt >= attempts.min(MAX_ATTEMPTS) || delay > MAX_RETRY_WAIT || past_deadline {
            return Err(cause.into_error(hint.or(past_deadline.then_some(delay))));
        }
        log_retry(provider, &cause, delay, attempt);
        Timer::after(delay).await;
        attempt += 1;
    }
}

/// Logs a retry. Each cause has its own line, so the logger's per-line episode counts
/// ("12 more like this") never add server errors to the rate-limit line.
fn log_retry(provider: &str, cause: &RetryCause, delay: Duration, attempt: u32) {
    let wait = delay.as_millis();
    match cause {
        RetryCause::RateLimited => log::warn!(
            "{provider} upstream rate limited the call (HTTP 429); retrying in {wait} ms \
             (attempt {attempt} of {MAX_ATTEMPTS})"
        ),
        RetryCause::ServerError(status) => log::warn!(
            "{provider} upstream failed with a server error (HTTP {status}); retrying in \
             {wait} ms (attempt {attempt} of {MAX_ATTEMPTS})"
        ),
        RetryCause::Overloaded => log::warn!(
            "{provider} upstream is overloaded (HTTP 529 or another non-standard status); \
             retrying in {wait} ms (attempt {attempt} of {MAX_ATTEMPTS})"
        ),
        RetryCause::Unreachable(error) => log::warn!(
            "{provider} upstream cannot be reached ({error}); retrying in {wait} ms \
             (attempt {attempt} of {MAX_ATTEMPTS})"
        ),
    }
}

/// Reads `retry-after` in seconds (the form both providers send); dates are ignored.
fn retry_after(conn: &Conn) -> Option<Duration> {
    conn.response_headers()
        .get_str(KnownHeaderName::RetryAfter)
        .and_then(|value| value.trim().parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
        .map(|seconds| Duration::from_secs_f64(seconds.min(86_400.0)))
}

/// Returns the wait before call `attempt + 1`: `retry-after` when given, else
/// `BACKOFF_BASE * 2^(attempt-1)` scaled by `jitter` (0.5 to 1.5).
fn backoff(attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    if let Some(wait) = retry_after {
        return wait;
    }
    let exponent = attempt.saturating_sub(1).min(6);
    BACKOFF_BASE
        .saturating_mul(1 << exponent)
        .mul_f64(jitter.clamp(0.5, 1.5))
}

/// Returns a factor between 0.5 and 1.5, so clients retrying together spread out.
fn jitter() -> f64 {
    let mut byte = [0u8; 1];
    match getrandom::fill(&mut byte) {
        Ok(()) => 0.5 + f64::from(byte[0]) / 255.0,
        Err(_) => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after() {
        assert_eq!(backoff(1, None, 1.0), Duration::from_millis(400));
        assert_eq!(backoff(2, None, 1.0), Duration::from_millis(800));
        assert_eq!(backoff(3, None, 0.5), Duration::from_millis(800));
        assert_eq!(
            backoff(30, None, 1.5),
            Duration::from_millis(400 * 64 * 3 / 2)
        );
        assert_eq!(
            backoff(1, Some(Duration::from_secs(3)), 1.0),
            Duration::from_secs(3)
        );
        let factor = jitter();
        assert!((0.5..=1.5).contains(&factor));
    }
}
