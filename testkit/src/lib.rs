//! The test kit of blufio, shared by the integration tests, the benches and xtask: a raw
//! HTTP client, the real binary as a child process, and fake model providers.

pub mod fake_provider;
pub mod http;
pub mod process;
