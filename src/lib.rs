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
//! A host builds a [`Context`] with [`Context::builder`], plugs in its own [`Agent`] and
//! memory sources ([`HeapSource`], [`RssSource`]), and starts it with [`spawn`]:
//!
//! ```
//! use std::{
//!     io::{Read, Write},
//!     net::TcpStream,
//!     sync::Arc,
//!     time::Duration,
//! };
//!
//! use blufio::{Agent, Call, Config, Context, FixedRss, ManualHeap, Reply, ReplyFuture};
//!
//! /// Answers every message with the number of turns before it and its length in bytes.
//! struct Counter;
//!
//! impl Agent for Counter {
//!     fn reply<'a>(&'a self, call: Call<'a>) -> ReplyFuture<'a> {
//!         let content = format!("{} turns, {} bytes", call.history.len(), call.message.len());
//!         Box::pin(async move { Ok(Reply { content, usage: None, model: None }) })
//!     }
//! }
//!
//! let ctx = Context::builder(Config::for_tests())
//!     .with_agent(Counter)
//!     .with_heap_source(Arc::new(ManualHeap::new(10 * 1024 * 1024)))
//!     .with_rss_source(FixedRss(Some(32 * 1024 * 1024)))
//!     .build()?;
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
//!
//! The modules are private; `internals` (hidden from the docs) reaches them for the fuzz
//! targets, integration tests and benches, and is no stable API.
#![deny(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]
#![deny(clippy::dbg_macro, clippy::unwrap_used)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod agent;
mod budget;
mod cgroup;
mod client_fault;
mod config;
mod connection;
mod context;
mod cost;
mod daemon;
mod deadline;
mod error;
mod fd_limit;
mod gateway;
mod heap;
mod http;
mod listener;
mod live;
mod logging;
mod memory;
mod metrics;
mod monitor;
mod notify;
mod openai_api;
mod provider;
mod read_buffer;
mod readiness;
mod reload;
mod request_target;
mod routes;
mod runtime;
mod sessions;
mod small_file;
mod state_dir;
#[cfg(feature = "store")]
mod store;
#[cfg(not(feature = "store"))]
#[path = "store_disabled.rs"]
mod store;
mod sync;
mod tasks;
mod transport;

// What a host embedding daemons needs: the context and its builder, the configuration, the
// daemon's lifecycle, the agent and memory-source traits.
pub use crate::{
    agent::{
        Agent, AgentError, BoxFuture, Call, DelayedEchoAgent, DeltaSender, Disconnected, EchoAgent,
        Reply, ReplyFuture, Role, StreamProgress, Turn, UpstreamStatus, Usage,
    },
    config::{
        AgentConfig, Config, DaemonConfig, GatewayConfig, ModelConfig, PrometheusConfig, Provider,
        ProviderConfig, ProviderKind, Secret, Spanned, StoreConfig,
    },
    context::{Context, ContextBuilder},
    cost::{CostConfig, ModelPrice},
    daemon::{Daemon, Stopped, run, spawn},
    error::Error,
    live::Live,
    logging::RedactingLogger,
    memory::{FixedRss, HeapSource, HeapStats, ManualHeap, RssSource},
    notify::NotifySettings,
    sessions::{Rejected, Session, SessionGuard, SessionKind, SessionRecord, is_session_id},
    store::{
        DB_FILE, OfflineDelete, ReadOnly, StoreError, StoredSession, StoredTurn,
        check as check_store, delete_session as delete_stored_session, spend_imported,
    },
};

// What the `blufio` command line needs besides: `check-config`'s report and the logger's
// environment.
pub use crate::{
    budget::check_state_dir,
    config::{AUTO_MB, DEFAULT_FILE, journal_stream, level_filter, log_env_override},
    fd_limit::{FdPlan, check as check_fd_limit},
    routes::{Route, Routes, Target},
};

/// The crate's modules, for the fuzz targets, integration tests and benches only: not a
/// stable API.
#[doc(hidden)]
pub mod internals {
    /// Re-exports each named module's public items under the same name, so
    /// `blufio::internals::memory::tick` reaches `crate::memory::tick`.
    macro_rules! reexport {
        ($($module:ident),* $(,)?) => {
            $(
                #[allow(missing_docs)]
                pub mod $module {
                    pub use crate::$module::*;
                }
            )*
        };
    }

    reexport!(
        agent,
        budget,
        cgroup,
        client_fault,
        config,
        connection,
        context,
        cost,
        deadline,
        error,
        fd_limit,
        gateway,
        heap,
        live,
        http,
        logging,
        memory,
        metrics,
        monitor,
        notify,
        openai_api,
        provider,
        read_buffer,
        readiness,
        reload,
        request_target,
        runtime,
        sessions,
        state_dir,
    );
}

#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The process-wide allocator: the one global thing in blufio, so the memory monitor can
/// read heap statistics and purge arenas.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
