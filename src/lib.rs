//! blufio: a small, hardened daemon that serves `/health`, Prometheus `/metrics` and an
//! authenticated gateway, and watches its own memory so it can run for months on a small VPS
//! or a Raspberry Pi.
//!
//! The crate is a library first. Everything one daemon knows lives in a [`Context`] built
//! once and passed explicitly, so a host program can embed any number of daemons, plug in
//! its own memory sources and agent, and start them with [`spawn`]. The `blufio` binary is a
//! thin command line over [`run`]. Nothing here is global except the allocator (jemalloc,
//! behind the default `jemalloc` feature).
//!
//! ```
//! use std::{io::{Read, Write}, net::TcpStream, time::Duration};
//!
//! let ctx = blufio::Context::new(blufio::Config::for_tests())?;
//! let daemon = blufio::spawn(ctx)?;
//! let mut stream = TcpStream::connect(daemon.health_addr())?;
//! stream.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
//! let mut response = String::new();
//! stream.read_to_string(&mut response)?;
//! assert!(response.starts_with("HTTP/1.1 200"));
//! assert!(response.contains(r#""status":"healthy""#));
//! assert!(daemon.shut_down_blocking(Duration::from_secs(5)));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(clippy::dbg_macro, clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod agent;
pub mod budget;
pub mod cgroup;
pub mod client;
pub mod client_fault;
pub mod config;
pub mod connection;
pub mod context;
pub mod cost;
mod daemon;
pub mod deadline;
pub mod error;
pub mod fd_limit;
pub mod gateway;
pub mod heap;
pub mod http;
mod listener;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod provider;
pub mod read_buffer;
pub mod readiness;
pub mod reload;
pub mod request_target;
pub mod runtime;
pub mod sessions;
mod small_file;
pub mod state_dir;
mod sync;
mod tasks;
mod transport;

pub use crate::{
    agent::{Agent, AgentError, Reply, Usage},
    config::Config,
    context::{Context, ContextBuilder},
    daemon::{Daemon, run, spawn},
    error::Error,
    memory::{FixedRss, HeapSource, ManualHeap, RssSource},
    sessions::{Rejected, SessionGuard},
};

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The process-wide allocator: the one global thing in blufio, so the memory monitor can
/// read heap statistics and purge arenas.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
