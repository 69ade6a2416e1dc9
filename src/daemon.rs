//! Starting and stopping one daemon: bind the listeners, start the background tasks, drain
//! on shutdown. `main` and the tests both go through [`spawn`].

use std::{
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use async_executor::Task;
use futures_lite::{FutureExt, StreamExt};
use trillium_smol::async_net;

use crate::{
    connection,
    context::Context,
    error::Error,
    http::{self, Scope},
    listener, monitor,
    readiness::Phase,
    reload,
    runtime::{Workers, worker_count},
    tasks,
};

/// How long WebSockets get to send their close frames before the listeners stop.
const CLOSING_BUDGET: Duration = Duration::from_secs(2);

/// How long a shutdown waits for the spend writer to save the last replies' spend.
const SPEND_SETTLE: Duration = Duration::from_secs(5);
/// How long keep-alive connections idle when the drain begins may take to send one more
/// request before they are closed, and how often the drain looks whether any is left.
const LAST_CALL: Duration = Duration::from_millis(250);
const LAST_CALL_STEP: Duration = Duration::from_millis(10);

/// A running daemon: its listeners and background tasks.
#[derive(Debug)]
pub struct Daemon {
    ctx: Arc<Context>,
    health_addr: SocketAddr,
    gateway_addr: SocketAddr,
    tasks: Vec<Task<()>>,
    workers: Option<Workers>,
}

/// Starts a daemon: takes the first memory sample, binds the listeners (so a busy port is an
/// error here, not a panic later), then starts serving and the background tasks.
///
/// The daemon runs on `[daemon] workers` threads of its own.
///
/// # Errors
///
/// Returns [`Error::Bind`] when a port is taken and [`Error::Io`] when a thread cannot start
/// or `ctx` already ran a daemon.
pub fn spawn(ctx: Arc<Context>) -> Result<Daemon, Error> {
    start(ctx, 0)
}

/// [`spawn`], with `lent` of the worker threads supplied by the caller, who runs the
/// executor ([`Workers::executor`]) on them.
fn start(ctx: Arc<Context>, lent: usize) -> Result<Daemon, Error> {
    // The daemon owns its executor; the Context keeps only the weak handle on it.
    let executor = ctx.runtime.start().ok_or_else(|| Error::Io {
        context: "cannot start the daemon: this context already ran a daemon (build a new one)"
            .to_owned(),
        source: std::io::Error::other("a context runs one daemon"),
    })?;
    let threads = worker_count(ctx.config.daemon.workers).saturating_sub(lent);
    let workers = Workers::start(executor, threads).map_err(|source| Error::Io {
        context: "cannot start the worker threads".to_owned(),
        source,
    })?;
    // The first /health must already have real numbers.
    monitor::tick(&ctx);
    let config = &ctx.config;
    if config.gateway.token.is_none() {
        log::warn!(
            "no gateway token configured: /v1 and /ws refuse every request \
             (set [gateway] token_file or BLUFIO_GATEWAY_TOKEN)"
        );
    }

    let (health_addr, gateway_addr) = if config.single_listener() {
        let listener = bind(config.health_addr()?)?;
        let addr = local_addr(&listener)?;
        serve(&ctx, listener, Scope::All)?;
        log::info!("listening on http://{addr} (health, metrics, gateway)");
        (addr, addr)
    } else {
        let probes = bind(config.health_addr()?)?;
        let gateway = bind(config.gateway_addr()?)?;
        let (health_addr, gateway_addr) = (local_addr(&probes)?, local_addr(&gateway)?);
        serve(&ctx, probes, Scope::Probes)?;
        serve(&ctx, gateway, Scope::Gateway)?;
        log::info!("listening on http://{health_addr} (health, metrics)");
        log::info!("listening on http://{gateway_addr} (gateway)");
        (health_addr, gateway_addr)
    };

    // Every listener is bound and the first sample taken: now the daemon is ready.
    ctx.set_phase(Phase::Serving);
    ctx.notifier.ready(&ctx.status_line());

    // The background tasks end once `closing` fires.
    let tasks = [
        ctx.runtime.spawn_task(tasks::monitor(Arc::clone(&ctx))),
        ctx.runtime.spawn_task(tasks::evict_idle(Arc::clone(&ctx))),
    ]
    .into_iter()
    .flatten()
    .collect();

    Ok(Daemon {
        ctx,
        health_addr,
        gateway_addr,
        tasks,
        workers: Some(workers),
    })
}

impl Daemon {
    /// Returns the address serving `/health` and `/metrics`.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// Returns the address serving the `/v1` API and `/ws`.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway_addr
    }

    /// Returns the daemon's context.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Stops accepting connections, lets in-flight requests finish for up to `grace`, and
    /// stops the background tasks. Returns true when everything drained in time.
    pub async fn shut_down(mut self, grace: Duration) -> bool {
        self.ctx.set_phase(Phase::Draining);
        self.ctx.notifier.stopping();
        let deadline = async_io::Timer::after(grace);
        // First long-lived work: background tasks stop and WebSockets send 1001 while the
        // listeners still run; then the listeners stop and in-flight requests drain.
        let closing = self.ctx.closing.shut_down();
        let closed = async {
            closing.await;
            true
        }
        .or(async {
            async_io::Timer::after(grace.min(CLOSING_BUDGET)).await;
            false
        })
        .await;
        // Every response now says `Connection: close`, but a keep-alive connection idle since
        // before the drain may be about to carry one more request: it gets a moment to send
        // it (and have it answered) before the listeners stop and idle connections close.
        let connections = &self.ctx.connections;
        async {
            while connections.idle_kept_alive() > 0 {
                async_io::Timer::after(LAST_CALL_STEP).await;
            }
        }
        .or(async {
            async_io::Timer::after(grace.min(LAST_CALL)).await;
        })
        .await;
        let listeners = self.ctx.shutdown.shut_down();
        // A request whose head has not arrived by now has not reached the daemon: waiting for
        // it would hold the drain for its whole head deadline (a slow-head flood would make
        // every shutdown take the full grace period).
        let heads = connections.close_partial_heads();
        if heads > 0 {
            log::debug!("closing {heads} connections with an incomplete request head");
        }
        let drained = async {
            listeners.await;
            true
        }
        .or(async {
            deadline.await;
            false
        })
        .await;
        for task in std::mem::take(&mut self.tasks) {
            // The tasks end as soon as `closing` fires.
            task.await;
        }
        if let Some(workers) = self.workers.take() {
            // What is still pending past the grace period is dropped with the executor.
            workers.stop().await;
        }
        // The last replies' spend is on disk before the process exits or another daemon
        // takes the state directory.
        if !self.ctx.budget.settle(SPEND_SETTLE).await {
            log::error!(
                "today's spend could not be saved before exit{}",
                self.ctx
                    .budget
                    .write_error()
                    .map_or_else(String::new, |error| format!(": {error}"))
            );
        }
        // The store's thread finishes what is queued and closes the database (checkpointing
        // its write-ahead log) before another daemon may open it.
        if let Some(store) = &self.ctx.store
            && !store.close(SPEND_SETTLE).await
        {
            log::error!(
                "the session store {} did not close in time; what it committed is kept",
                store.path().display()
            );
        }
        self.ctx.release_state_dir();
        closed && drained
    }

    /// Blocking form of [`Daemon::shut_down`].
    pub fn shut_down_blocking(self, grace: Duration) -> bool {
        async_io::block_on(self.shut_down(grace))
    }
}

/// How a daemon run by [`run`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Everything drained within the grace period.
    Drained,
    /// The grace period ended first; the remaining connections were closed.
    GraceExpired,
    /// A second SIGTERM or SIGINT cut the drain short: the caller should exit at once (the
    /// binary exits with status 1).
    Forced,
}

/// Runs a daemon until SIGTERM or SIGINT, then drains it for `[daemon] shutdown_grace_secs`.
/// A second signal stops waiting for the drain and returns [`Stopped::Forced`], for the
/// caller to exit at once. SIGHUP reloads the configuration ([`crate::reload::reload`]);
/// SIGUSR1 and SIGUSR2 are logged and ignored, never fatal.
///
/// # Errors
///
/// Returns an error when the daemon cannot start or signals cannot be registered.
pub fn run(ctx: Arc<Context>) -> Result<Stopped, Error> {
    use async_signal::{Signal, Signals};

    // Registered before the listeners open, so an early signal is neither lost nor fatal.
    let mut signals = Signals::new([
        Signal::Term,
        Signal::Int,
        Signal::Hup,
        Signal::Usr1,
        Signal::Usr2,
    ])
    .map_err(|source| Error::Io {
        context: "cannot register signal handlers".to_owned(),
        source,
    })?;
    let grace = Duration::from_secs(ctx.config.daemon.shutdown_grace_secs);
    // The main thread is one of the workers: it runs the executor while it waits for signals.
    let daemon = start(Arc::clone(&ctx), 1)?;
    let executor = daemon
        .workers
        .as_ref()
        .map(|workers| Arc::clone(workers.executor()));
    let main = async {
        let first = next_stop_signal(&mut signals, Some(&ctx)).await;
        log::info!(
            "received {}; draining for up to {grace:?} (send it again to exit at once)",
            signal_name(first)
        );
        let drain = async { Some(daemon.shut_down(grace).await) };
        let second = async {
            let signal = next_stop_signal(&mut signals, None).await;
            log::warn!(
                "received {} again; exiting without draining",
                signal_name(signal)
            );
            None
        };
        match drain.or(second).await {
            Some(true) => {
                log::info!("shut down cleanly");
                Stopped::Drained
            }
            Some(false) => {
                log::warn!("grace period over; closing remaining connections");
                Stopped::GraceExpired
            }
            None => Stopped::Forced,
        }
    };
    let stopped = match executor {
        Some(executor) => async_io::block_on(executor.run(main)),
        None => async_io::block_on(main),
    };
    Ok(stopped)
}

/// Waits for SIGTERM or SIGINT, reloading on SIGHUP (while `ctx` is given, that is before
/// draining) and logging the signals that are ignored.
async fn next_stop_signal(
    signals: &mut async_signal::Signals,
    ctx: Option<&Arc<Context>>,
) -> Option<std::io::Result<async_signal::Signal>> {
    use async_signal::Signal;

    loop {
        let signal = signals.next().await;
        match signal {
            Some(Ok(Signal::Hup)) => match ctx {
                // A refused reload is logged by `reload` and changes nothing.
                Some(ctx) => {
                    log::info!("received SIGHUP; reloading the configuration");
                    let _ = reload::reload(ctx).await;
                }
                None => log::info!("received SIGHUP while draining; ignored"),
            },
            Some(Ok(Signal::Usr1)) => log::info!("received SIGUSR1; ignored"),
            Some(Ok(Signal::Usr2)) => log::info!("received SIGUSR2; ignored"),
            other => return other,
        }
    }
}

fn signal_name(signal: Option<std::io::Result<async_signal::Signal>>) -> &'static str {
    match signal {
        Some(Ok(async_signal::Signal::Term)) => "SIGTERM",
        Some(Ok(async_signal::Signal::Int)) => "SIGINT",
        _ => "a signal",
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })
}

fn local_addr(listener: &TcpListener) -> Result<SocketAddr, Error> {
    listener.local_addr().map_err(|source| Error::Io {
        context: "cannot read the bound address".to_owned(),
        source,
    })
}

/// Starts serving on `listener` with blufio's own accept loop (`listener/`); it stops when
/// `ctx.shutdown` fires, so no handle is kept.
fn serve(ctx: &Arc<Context>, listener: TcpListener, scope: Scope) -> Result<(), Error> {
    let addr = local_addr(&listener)?;
    let listener = async_net::TcpListener::try_from(listener)
        .map_err(|source| Error::Bind { addr, source })?;
    let kind = match scope {
        Scope::Probes => connection::Listener::Probes,
        Scope::All | Scope::Gateway => connection::Listener::Gateway,
    };
    let ctx = Arc::clone(ctx);
    let runtime = ctx.runtime.clone();
    runtime.spawn_detached(async move {
        let mut handler = http::handler(Arc::clone(&ctx), scope);
        let http_context = listener::http_context(&ctx, &mut handler).await;
        listener::accept_loop(ctx, listener, kind, http_context, Arc::new(handler)).await;
    });
    Ok(())
}
