//! The [`Context`]: everything one daemon knows, built once and passed to every task and
//! handler.
//!
//! Nothing here is global: two contexts in one process share no numbers, sessions or
//! shutdown signal. [`ContextBuilder`] is where a host (or a test) plugs in its own heap and
//! RSS sources, shed hooks and agent.

use std::{
    fmt,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use blufio_platform::{ProcessReader, RssReader};
use trillium::Swansong;

use crate::{
    agent::Agent,
    config::Config,
    connection::{Connections, derived_max_connections},
    error::Error,
    heap::AllocatorHeap,
    memory::{HeapSource, MemoryMonitor, RssSource, ShedHook, Thresholds},
    metrics::Metrics,
    sessions::{Limits, Rejected, SessionGuard, SessionKind, Sessions},
};

/// One daemon's state.
pub struct Context {
    /// The configuration it was built from.
    pub config: Config,
    /// Metric handles and the recorder that renders them.
    pub metrics: Metrics,
    /// The memory monitor's sources, latest sample and pressure state.
    pub memory: MemoryMonitor,
    /// Open sessions and admission control.
    pub sessions: Sessions,
    /// The agent that answers messages, if any.
    pub agent: Option<Arc<dyn Agent>>,
    /// The graceful-shutdown signal of the listeners: once fired, no new connection is
    /// accepted and in-flight requests drain.
    pub shutdown: Swansong,
    /// Fired just before `shutdown`: tells long-lived work (WebSockets, background tasks) to
    /// finish, so WebSockets can still send their close frames while the listeners run.
    pub closing: Swansong,
    process: Option<ProcessReader>,
    started: Instant,
    started_at: SystemTime,
    /// Open client connections, their limits and the heap charged to them.
    pub connections: Connections,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .field("memory", &self.memory)
            .field("sessions", &self.sessions)
            .field("agent", &self.agent.is_some())
            .finish_non_exhaustive()
    }
}

impl Context {
    /// Builds a context with the production sources (the global allocator and the platform
    /// RSS reader) and no agent.
    ///
    /// # Errors
    ///
    /// Returns an error when a source or the metrics recorder cannot be set up.
    pub fn new(config: Config) -> Result<Arc<Context>, Error> {
        Context::builder(config).build()
    }

    /// Starts building a context from `config`.
    pub fn builder(config: Config) -> ContextBuilder {
        ContextBuilder {
            config,
            heap: None,
            rss: None,
            shed_hooks: Vec::new(),
            agent: None,
        }
    }

    /// Opens a session through admission control.
    ///
    /// # Errors
    ///
    /// Returns [`Rejected`] above `memory_limit_mb` or at `max_sessions`.
    pub fn try_open_session(&self) -> Result<SessionGuard, Rejected> {
        self.open_session(SessionKind::Http)
    }

    /// Opens a session of `kind` through admission control.
    ///
    /// # Errors
    ///
    /// Returns [`Rejected`] above `memory_limit_mb` or at `max_sessions`.
    pub fn open_session(&self, kind: SessionKind) -> Result<SessionGuard, Rejected> {
        self.sessions.open(kind, self.memory.rejecting())
    }

    /// Returns seconds since the context was built.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Returns the start time in seconds since the Unix epoch.
    pub fn started_at_unix(&self) -> f64 {
        self.started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |elapsed| elapsed.as_secs_f64())
    }

    /// Reads the standard process metrics now (on each scrape), leaving out what fails.
    pub fn process_sample(&self) -> blufio_platform::ProcessSample {
        let Some(reader) = &self.process else {
            return blufio_platform::ProcessSample::default();
        };
        match reader.sample() {
            Ok(sample) => sample,
            Err(error) => {
                log::warn!("cannot read process metrics: {error}");
                self.metrics
                    .count_error(crate::metrics::ErrorKind::Internal);
                blufio_platform::ProcessSample::default()
            }
        }
    }

    /// Returns true while under memory pressure, refusing new sessions, or with the resident
    /// set above `memory_limit_mb`.
    pub fn degraded(&self) -> bool {
        let pressure = self.memory.pressure();
        pressure.under_pressure || pressure.rejecting || self.memory.rss_over_limit()
    }
}

/// Assembles a [`Context`]; anything not supplied gets the production default.
pub struct ContextBuilder {
    config: Config,
    heap: Option<Box<dyn HeapSource>>,
    rss: Option<Box<dyn RssSource>>,
    shed_hooks: Vec<(String, ShedHook)>,
    agent: Option<Arc<dyn Agent>>,
}

impl fmt::Debug for ContextBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ContextBuilder {
    /// Uses `heap` instead of the global allocator's statistics.
    pub fn with_heap_source(mut self, heap: impl HeapSource + 'static) -> ContextBuilder {
        self.heap = Some(Box::new(heap));
        self
    }

    /// Uses `rss` instead of the platform reader.
    pub fn with_rss_source(mut self, rss: impl RssSource + 'static) -> ContextBuilder {
        self.rss = Some(Box::new(rss));
        self
    }

    /// Adds a hook run when memory pressure starts (drop a cache, for example).
    pub fn with_shed_hook(
        mut self,
        name: impl Into<String>,
        hook: impl Fn() + Send + Sync + 'static,
    ) -> ContextBuilder {
        self.shed_hooks.push((name.into(), Box::new(hook)));
        self
    }

    /// Answers `/v1/messages` and WebSocket messages with `agent`.
    pub fn with_agent(mut self, agent: impl Agent) -> ContextBuilder {
        self.agent = Some(Arc::new(agent));
        self
    }

    /// Builds the context.
    ///
    /// # Errors
    ///
    /// Returns an error when a production source or the metrics recorder cannot be set up.
    pub fn build(self) -> Result<Arc<Context>, Error> {
        let config = self.config;
        let heap = match self.heap {
            Some(heap) => heap,
            None => Box::new(AllocatorHeap::new()?),
        };
        let rss = match self.rss {
            Some(rss) => rss,
            None => Box::new(RssReader::new().map_err(|source| Error::Io {
                context: "cannot open the RSS reader".to_owned(),
                source,
            })?),
        };
        let process = match ProcessReader::new() {
            Ok(reader) => Some(reader),
            Err(error) => {
                log::warn!("process metrics unavailable: {error}");
                None
            }
        };
        let metrics = Metrics::new()?;
        let budget = config.agent.budget_usd;
        metrics
            .budget_remaining_usd
            .set(if budget > 0.0 { budget } else { f64::INFINITY });
        let thresholds = Thresholds {
            warn_bytes: config.memory_warn_bytes(),
            limit_bytes: config.memory_limit_bytes(),
        };
        let sessions = Sessions::new(
            Limits::from_config(&config.gateway),
            metrics.active_sessions.clone(),
        );
        if let Some(agent) = &self.agent {
            for model in agent.models() {
                metrics.register_model(&model);
            }
        }
        let max_connections = match config.daemon.max_connections {
            0 => derived_max_connections(
                process
                    .as_ref()
                    .and_then(|reader| reader.sample().ok())
                    .and_then(|sample| sample.max_fds),
            ),
            configured => configured,
        };
        let connections = Connections::new(
            max_connections,
            config.daemon.max_connections_per_ip,
            metrics.open_connections.clone(),
            metrics.connection_memory_bytes.clone(),
        );
        Ok(Arc::new(Context {
            connections,
            memory: MemoryMonitor::new(heap, rss, thresholds, self.shed_hooks),
            sessions,
            metrics,
            agent: self.agent,
            shutdown: Swansong::new(),
            closing: Swansong::new(),
            process,
            started: Instant::now(),
            started_at: SystemTime::now(),
            config,
        }))
    }
}
