//! The test kit of blufio, shared by the integration tests, the benches and xtask: a raw
//! HTTP client, the real binary as a child process, fake model providers, temp dirs that
//! remove themselves and hand-made WebSocket frames.

pub mod fake_provider;
pub mod http;
pub mod process;
pub mod temp;
pub mod ws;

/// Asserts that `haystack` contains `needle`, showing the whole haystack when it does not.
#[track_caller]
pub fn assert_contains(haystack: &str, needle: &str) {
    assert!(haystack.contains(needle), "{haystack}");
}
