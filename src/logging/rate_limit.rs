//! The per-call-site limiter: counts warnings and errors by call site so each episode is
//! written once, with the count of those held back.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use log::Level;

/// How long one episode of a repeated warning or error lasts.
pub const EPISODE: Duration = Duration::from_secs(60);

/// Call sites tracked at once; past it, new sites share one slot (the safety net still holds).
const MAX_SITES: usize = 256;

/// Longest example message kept per call site, in bytes.
const MAX_EXAMPLE_BYTES: usize = 300;

/// What to do with a warning or error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The first of an episode: write it.
    First,
    /// The first after a window in which `more` were held back: write it with the count.
    WithCount {
        /// How many were held back.
        more: u64,
        /// How long the window lasted.
        elapsed: Duration,
    },
    /// Within the window of an earlier one: write it at debug level at most.
    Suppressed,
}

/// A count of held-back records whose window ended without another record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Level of the records counted.
    pub level: Level,
    /// Target of the records counted.
    pub target: String,
    /// How many were held back.
    pub more: u64,
    /// How long the window lasted.
    pub elapsed: Duration,
    /// The first record of the episode, redacted.
    pub example: String,
}

impl Summary {
    /// Returns the line written for the summary.
    pub fn text(&self) -> String {
        format!(
            "{} more like this in the last {} s: {}",
            self.more,
            self.elapsed.as_secs().max(1),
            self.example
        )
    }
}

#[derive(Debug)]
struct Site {
    level: Level,
    target: String,
    window_start: Instant,
    held_back: u64,
    example: String,
}

/// Per-call-site episode counting; pure (the caller passes the time) so it can be tested
/// with a made-up clock.
#[derive(Debug)]
pub struct RateLimiter {
    window: Duration,
    sites: HashMap<u64, Site>,
}

impl RateLimiter {
    /// Creates a limiter whose episodes last `window`.
    pub fn new(window: Duration) -> RateLimiter {
        RateLimiter {
            window,
            sites: HashMap::new(),
        }
    }

    /// Decides what happens to a record from call site `key` at `now`.
    pub fn admit(&mut self, key: u64, now: Instant, level: Level, target: &str) -> Admission {
        let key = if self.sites.len() >= MAX_SITES && !self.sites.contains_key(&key) {
            let window = self.window;
            self.sites.retain(|_, site| {
                site.held_back > 0 || now.saturating_duration_since(site.window_start) < window
            });
            if self.sites.len() >= MAX_SITES {
                0
            } else {
                key
            }
        } else {
            key
        };
        let Some(site) = self.sites.get_mut(&key) else {
            self.sites.insert(
                key,
                Site {
                    level,
                    target: target.to_owned(),
                    window_start: now,
                    held_back: 0,
                    example: String::new(),
                },
            );
            return Admission::First;
        };
        let elapsed = now.saturating_duration_since(site.window_start);
        if elapsed < self.window {
            site.held_back = site.held_back.saturating_add(1);
            return Admission::Suppressed;
        }
        let more = std::mem::take(&mut site.held_back);
        site.window_start = now;
        if more == 0 {
            Admission::First
        } else {
            Admission::WithCount { more, elapsed }
        }
    }

    /// Remembers the (redacted) text of the record just admitted, for a later [`Summary`].
    pub fn set_example(&mut self, key: u64, text: &str) {
        if let Some(site) = self.sites.get_mut(&key) {
            let mut end = text.len().min(MAX_EXAMPLE_BYTES);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            site.example.clear();
            site.example.push_str(&text[..end]);
        }
    }

    /// Returns the counts of sites with records held back whose window is at least
    /// `min_age` old, and starts those sites afresh.
    pub fn expired(&mut self, now: Instant, min_age: Duration) -> Vec<Summary> {
        let mut summaries = Vec::new();
        for site in self.sites.values_mut() {
            let elapsed = now.saturating_duration_since(site.window_start);
            if site.held_back > 0 && elapsed >= min_age {
                summaries.push(Summary {
                    level: site.level,
                    target: site.target.clone(),
                    more: std::mem::take(&mut site.held_back),
                    elapsed,
                    example: site.example.clone(),
                });
                site.window_start = now;
            }
        }
        summaries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_errors_are_one_line_per_episode_with_a_count() {
        let mut limiter = RateLimiter::new(EPISODE);
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        assert_eq!(limiter.admit(1, at(0), Level::Error, "t"), Admission::First);
        limiter.set_example(1, "http error from 10.0.0.1");
        for second in 1..60 {
            assert_eq!(
                limiter.admit(1, at(second), Level::Error, "t"),
                Admission::Suppressed
            );
        }
        // Another call site is its own episode.
        assert_eq!(
            limiter.admit(2, at(30), Level::Error, "t"),
            Admission::First
        );
        assert!(limiter.expired(at(59), EPISODE).is_empty());
        assert_eq!(
            limiter.admit(1, at(61), Level::Error, "t"),
            Admission::WithCount {
                more: 59,
                elapsed: Duration::from_secs(61)
            }
        );
        // The flood goes on and then stops: flush reports the last window.
        for second in 62..70 {
            limiter.admit(1, at(second), Level::Error, "t");
        }
        assert!(limiter.expired(at(100), EPISODE).is_empty());
        let summaries = limiter.expired(at(121), EPISODE);
        assert_eq!(summaries.len(), 1);
        assert_eq!(summaries[0].more, 8);
        assert_eq!(
            summaries[0].text(),
            "8 more like this in the last 60 s: http error from 10.0.0.1"
        );
        assert!(limiter.expired(at(300), EPISODE).is_empty());
        // At exit every open count is written, however young.
        assert_eq!(
            limiter.admit(1, at(301), Level::Error, "t"),
            Admission::First
        );
        assert_eq!(
            limiter.admit(1, at(301), Level::Error, "t"),
            Admission::Suppressed
        );
        assert_eq!(limiter.expired(at(301), Duration::ZERO)[0].more, 1);
        // After a quiet window the next one starts a new episode.
        assert_eq!(
            limiter.admit(1, at(400), Level::Error, "t"),
            Admission::First
        );
    }

    #[test]
    fn call_sites_beyond_the_cap_share_one_slot() {
        let mut limiter = RateLimiter::new(EPISODE);
        let now = Instant::now();
        for key in 1..=MAX_SITES as u64 {
            limiter.admit(key, now, Level::Warn, "t");
            limiter.admit(key, now, Level::Warn, "t");
        }
        assert_eq!(
            limiter.admit(10_000, now, Level::Warn, "t"),
            Admission::First
        );
        assert_eq!(
            limiter.admit(10_001, now, Level::Warn, "t"),
            Admission::Suppressed
        );
        assert!(limiter.sites.len() <= MAX_SITES + 1);
    }
}
