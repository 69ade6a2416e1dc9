//! The test kit of blufio, shared by the integration tests, the benches and xtask: a raw
//! HTTP client, the real binary as a child process, and fake model providers.

pub mod fake_provider;
pub mod http;
pub mod process;

/// Asserts that `haystack` contains `needle`, showing the whole haystack when it does not.
#[track_caller]
pub fn assert_contains(haystack: &str, needle: &str) {
    assert!(haystack.contains(needle), "{haystack}");
}
