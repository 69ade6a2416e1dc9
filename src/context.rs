//! The [`Context`]: everything one daemon knows, built once and passed to every task and
//! handler.
//!
//! Nothing here is global: two contexts in one process share no numbers, sessions or
//! shutdown signal. [`ContextBuilder`] is where a host (or a test) plugs in its own heap and
//! RSS sources, shed hooks and agent.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use blufio_platform::{CgroupReader, ProcessReader, RssReader};
use trillium::Swansong;

use crate::{
    agent::Agent,
    budget::{Budget, StoredSpend},
    cgroup::CgroupMonitor,
    client_fault::ClientFaults,
    config::Config,
    connection::{Connections, derived_max_connections},
    error::Error,
    heap::AllocatorHeap,
    live::Live,
    memory::{HeapSource, MemoryMonitor, RssSource, ShedHook, Thresholds},
    metrics::{Metrics, ShedReason},
    notify::{Notifier, NotifySettings},
    provider::{ProviderAgent, Upstreams},
    readiness::{self, NotReady, Phase, PhaseCell},
    runtime::Runtime,
    sessions::{
        Limits, Rejected, SessionCounters, SessionGuard, SessionKind, SessionOptions, Sessions,
    },
    state_dir::StateLock,
    store::{Store, StoreOptions},
};

/// One daemon's state.
pub struct Context {
    /// The configuration it was built from, never changed: what a reload cannot apply
    /// (binds, ports, workers, the provider) is read here; the rest is in [`Context::live`].
    pub config: Config,
    /// Metric handles and the recorder that renders them.
    pub metrics: Metrics,
    /// The memory monitor's sources, latest sample and pressure state.
    pub memory: MemoryMonitor,
    /// Open sessions and admission control.
    pub sessions: Sessions,
    /// The agent that answers messages, if any.
    pub agent: Option<Arc<dyn Agent>>,
    /// The configured model providers and the routes over them (`/v1/chat/completions`,
    /// `/v1/models`); empty without `[providers]` or an `[agent]` model provider.
    pub upstreams: Arc<Upstreams>,
    /// Today's spend against `[cost] daily_budget_usd`.
    pub budget: Budget,
    /// The session store in `[daemon] state_dir` (`None`: sessions live in memory only).
    pub store: Option<Store>,
    /// The graceful-shutdown signal of the listeners: once fired, no new connection is
    /// accepted and in-flight requests drain.
    pub shutdown: Swansong,
    /// Fired just before `shutdown`: tells long-lived work (WebSockets, background tasks) to
    /// finish, so WebSockets can still send their close frames while the listeners run.
    pub closing: Swansong,
    process: Option<ProcessReader>,
    started: Instant,
    started_at: SystemTime,
    /// Notifications to the service manager (a no-op without one).
    pub notifier: Notifier,
    phase: PhaseCell,
    live: RwLock<Arc<Live>>,
    reloaded: event_listener::Event,
    config_path: Option<PathBuf>,
    /// The daemon's own cgroup memory limit and usage.
    pub cgroup: CgroupMonitor,
    /// Open client connections, their limits and the heap charged to them.
    pub connections: Connections,
    /// Failed authentications (throttled) and malformed requests (reported) per client.
    pub client_faults: ClientFaults,
    /// The handle on this daemon's executor (see `crate::runtime`), which the daemon makes
    /// and owns when it starts.
    pub runtime: Runtime,
    /// The hold on `[daemon] state_dir`, so no second daemon writes the same spend file.
    state_lock: Option<StateLock>,
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
            notify: None,
            config_path: None,
            cgroup: None,
        }
    }

    /// Returns the settings as last (re)loaded: what the token check, the session limits,
    /// the memory thresholds, the agent timeout, the log level and the budget read.
    pub fn live(&self) -> Arc<Live> {
        Arc::clone(&crate::sync::read(&self.live))
    }

    /// Replaces the live settings in one step (on reload).
    pub(crate) fn set_live(&self, live: Live) {
        let live = Arc::new(live);
        *crate::sync::write(&self.live) = live;
        self.reloaded.notify(usize::MAX);
    }

    /// Returns the memory thresholds in force: the monitor reads them on every tick, so a
    /// reload applies from the next one.
    pub fn thresholds(&self) -> Thresholds {
        thresholds(&self.live())
    }

    /// Returns the session limits in force: open sessions keep their histories until their
    /// next message after a reload.
    pub fn session_limits(&self) -> Limits {
        session_limits(&self.live())
    }

    /// Returns a listener that resolves at the next reload; WebSockets hold one to compare the
    /// token they authenticated with against the live one as soon as it may have changed.
    /// Listen first, then read [`Context::live`], so no reload falls between the two.
    pub fn next_reload(&self) -> event_listener::EventListener {
        self.reloaded.listen()
    }

    /// Releases `[daemon] state_dir` for another daemon (at the end of a shutdown, once the
    /// spend is written).
    pub(crate) fn release_state_dir(&self) {
        if let Some(lock) = &self.state_lock {
            lock.release();
        }
    }

    /// Returns the configuration file a reload re-reads (`None`: built-in defaults).
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
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
        self.open_session_with(kind, SessionOptions::default())
    }

    /// Opens a session of `kind` that keeps `options`, through admission control.
    ///
    /// # Errors
    ///
    /// Returns [`Rejected`] above `memory_limit_mb` or at `max_sessions`.
    pub fn open_session_with(
        &self,
        kind: SessionKind,
        options: SessionOptions,
    ) -> Result<SessionGuard, Rejected> {
        self.sessions.open_with(
            kind,
            options,
            &self.session_limits(),
            self.memory.rejecting(),
        )
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

    /// Returns where the daemon is in its life.
    pub fn phase(&self) -> Phase {
        self.phase.get()
    }

    /// Moves the daemon to `phase` (draining is final).
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.set(phase);
    }

    /// Returns whether the daemon should get new traffic (`GET /ready`).
    ///
    /// # Errors
    ///
    /// Returns why not: starting, draining, or refusing sessions above the memory limit.
    pub fn readiness(&self) -> Result<(), NotReady> {
        readiness::check(self.phase(), self.memory.rejecting())
    }

    /// Returns a one-line summary for the service manager's status (`STATUS=`).
    pub fn status_line(&self) -> String {
        let mib = |bytes: Option<u64>| {
            bytes.map_or("n/a".to_owned(), |bytes| {
                format!("{:.1} MiB", bytes as f64 / 1048576.0)
            })
        };
        let sample = self.memory.sample();
        let heap = sample.and_then(|s| s.heap).map(|heap| heap.allocated_bytes);
        let rss = sample.and_then(|s| s.rss_bytes);
        let pressure = self.memory.pressure();
        let state = if pressure.rejecting {
            "refusing new sessions"
        } else if pressure.under_pressure {
            "memory pressure"
        } else {
            "ok"
        };
        format!(
            "heap {}, rss {}, {} sessions, {state}",
            mib(heap),
            mib(rss),
            self.sessions.active()
        )
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
    notify: Option<NotifySettings>,
    config_path: Option<PathBuf>,
    cgroup: Option<Option<CgroupReader>>,
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

    /// Notifies the service manager at `settings` (from [`Config::notify_settings`]).
    pub fn with_notify(mut self, settings: Option<NotifySettings>) -> ContextBuilder {
        self.notify = settings;
        self
    }

    /// Names the configuration file a reload (SIGHUP) re-reads.
    pub fn with_config_path(mut self, path: Option<PathBuf>) -> ContextBuilder {
        self.config_path = path;
        self
    }

    /// Reads cgroup memory through `reader` instead of finding this process's cgroup
    /// (`None`: no cgroup).
    pub fn with_cgroup_reader(mut self, reader: Option<CgroupReader>) -> ContextBuilder {
        self.cgroup = Some(reader);
        self
    }

    /// Builds the context.
    ///
    /// # Errors
    ///
    /// Returns an error when a production source or the metrics recorder cannot be set up.
    pub fn build(self) -> Result<Arc<Context>, Error> {
        let mut config = self.config;
        // `CgroupReader::new` looks for this process's cgroup (it is not a default value).
        let reader = match self.cgroup {
            Some(reader) => reader,
            None => CgroupReader::new(),
        };
        let cgroup = CgroupMonitor::new(reader);
        let cgroup_limit = cgroup.limit_bytes();
        let notes = config.resolve_auto_memory(cgroup_limit);
        for note in &notes {
            log::info!("{note}");
        }
        if !notes.is_empty() {
            config.validate("memory thresholds")?;
        }
        if let Some(limit) = cgroup_limit
            && config.memory_limit_bytes() > limit
        {
            log::warn!(
                "memory_limit_mb {} MiB is above the cgroup memory limit {} MiB: the kernel \
                 would kill blufio before it sheds load; lower it or set memory_limit_mb = \"auto\"",
                config.daemon.memory_limit_mb,
                limit / (1024 * 1024)
            );
        }
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
        let runtime = Runtime::new();
        // Locked before the spend file is read, so two daemons never both trust it.
        let state_lock = match &config.daemon.state_dir {
            Some(dir) => Some(StateLock::acquire(dir)?),
            None => None,
        };
        let now = SystemTime::now();
        let opened = match &config.daemon.state_dir {
            Some(dir) if config.store.enabled && cfg!(feature = "store") => Some({
                // A spend.json the first start would import is checked before the store is
                // created, so a refused start leaves no new database behind.
                if !crate::store::spend_imported(dir) {
                    crate::budget::check_state_dir(dir, now)?;
                }
                Store::open(
                    dir,
                    StoreOptions {
                        max_bytes: config.store.max_mb.saturating_mul(1024 * 1024),
                        idle_timeout_secs: config.gateway.session_idle_timeout_secs,
                    },
                    crate::budget::utc_day(now),
                    metrics.store(),
                    metrics.error_handle(crate::metrics::ErrorKind::Storage),
                )?
            }),
            _ => None,
        };
        let budget = Budget::open_with(
            &config.cost,
            config.daemon.state_dir.as_deref(),
            opened.as_ref().map(|opened| StoredSpend {
                store: &opened.store,
                today: opened.spent_today_usd,
                imported: opened.spend_imported,
            }),
            metrics.budget_remaining_usd.clone(),
            metrics.error_handle(crate::metrics::ErrorKind::StateWrite),
            now,
        )?;
        let upstreams = Arc::new(Upstreams::new(&config, &runtime, &metrics)?);
        let agent = match self.agent {
            Some(agent) => Some(agent),
            None if !upstreams.is_empty() => {
                Some(Arc::new(ProviderAgent::new(Arc::clone(&upstreams))) as Arc<dyn Agent>)
            }
            None => None,
        };
        if config.daemon.state_dir.is_none() && agent.is_some() {
            log::warn!(
                "no [daemon] state_dir: sessions, their messages and today's spend are kept in \
                 memory only, and a restart forgets them (and resets the daily budget)"
            );
        }
        let live = Live::from_config(&config);
        let sessions = Sessions::new(SessionCounters {
            active: metrics.active_sessions.clone(),
            history_trimmed: metrics.shed_handle(ShedReason::HistoryTrimmed),
            pressure_evicted: metrics.shed_handle(ShedReason::PressureEvicted),
            idle_timeout: metrics.shed_handle(ShedReason::IdleTimeout),
        });
        let store = opened.map(|opened| {
            sessions.set_stored();
            let restored = opened.sessions.len();
            for record in opened.sessions {
                sessions.restore(record);
            }
            log::info!(
                "session store {}: restored {restored} sessions{}",
                opened.store.path().display(),
                match opened.expired {
                    0 => String::new(),
                    expired => format!(", removed {expired} idle past session_idle_timeout_secs"),
                }
            );
            opened.store
        });
        if let Some(agent) = &agent {
            for model in agent.models() {
                metrics.register_model(&model);
                budget.register_model(&model);
            }
        }
        let max_connections = match config.daemon.max_connections {
            0 => derived_max_connections(
                process
                    .as_ref()
                    .and_then(|reader| reader.sample().ok())
                    .and_then(|sample| sample.max_fds),
            ),
            // A cap the open-file limit cannot hold is raised toward the hard limit or
            // clamped, with a warning naming both numbers.
            configured => crate::fd_limit::fit(configured),
        };
        let connections = Connections::new(
            max_connections,
            config.daemon.max_connections_per_ip,
            metrics.open_connections.clone(),
            metrics.connection_memory_bytes.clone(),
        );
        Ok(Arc::new(Context {
            connections,
            client_faults: ClientFaults::new(),
            memory: MemoryMonitor::new(heap, rss, self.shed_hooks),
            sessions,
            metrics,
            agent,
            upstreams,
            budget,
            store,
            shutdown: Swansong::new(),
            closing: Swansong::new(),
            process,
            started: Instant::now(),
            started_at: SystemTime::now(),
            config,
            notifier: self
                .notify
                .as_ref()
                .map_or_else(Notifier::disabled, Notifier::connect),
            phase: PhaseCell::default(),
            live: RwLock::new(Arc::new(live)),
            reloaded: event_listener::Event::new(),
            config_path: self.config_path,
            cgroup,
            runtime,
            state_lock,
        }))
    }
}

/// Returns the memory thresholds `live` sets.
fn thresholds(live: &Live) -> Thresholds {
    Thresholds {
        warn_bytes: live.memory_warn_bytes(),
        limit_bytes: live.memory_limit_bytes(),
    }
}

/// Returns the session limits `live` sets.
fn session_limits(live: &Live) -> Limits {
    Limits {
        max_sessions: live.max_sessions,
        idle_timeout: std::time::Duration::from_secs(live.session_idle_timeout_secs),
        max_history_messages: live.max_history_messages,
        max_history_bytes: live.max_history_bytes,
    }
}
