//! The single integration test binary: every test starts real daemons on port 0 and talks
//! to them over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cgroup;
mod chat_completions;
mod cli;
mod gateway;
mod health;
mod hostile_auth;
mod hostile_chat;
mod hostile_connections;
mod hostile_edge;
mod hostile_files;
mod hostile_gateway;
mod hostile_input;
mod hostile_transport;
mod hostile_websocket;
mod isolation;
mod metrics;
mod model_routing;
mod openai_sdk;
mod pressure;
mod prometheus;
mod providers;
mod ready;
mod routing;
mod service;
mod sessions_cli;
// The store's own tests; a build without the `store` feature keeps everything in memory.
#[cfg(feature = "store")]
mod store;
mod support;
mod time;
mod websocket;

use blufio_testkit::fake_provider;
