//! The single integration test binary: every test starts real daemons on port 0 and talks
//! to them over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod gateway;
mod health;
mod isolation;
mod metrics;
mod pressure;
mod prometheus;
mod routing;
mod support;
mod time;
mod websocket;
