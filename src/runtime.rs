//! The daemon's own executor and the threads that drive it.
//!
//! Every task of one daemon (the accept loops, one task per connection, the background
//! tasks, trillium-client's pool reapers) runs on an `async-executor` owned by that daemon
//! and driven by `[daemon] workers` threads; [`crate::run`] lends the main thread as one of
//! them. Nothing goes to smol's process-wide executor, so a daemon's threads are its own,
//! two daemons in one process share none, and the tasks still pending when a daemon is shut
//! down are dropped with its executor instead of lingering.
//!
//! [`Runtime`] is the handle given to trillium and trillium-client. It holds the executor
//! weakly: tasks keep handles to it, and a strong one would keep the executor (and with it
//! every pending task) alive through the cycle. The daemon makes the executor when it starts
//! (`Runtime::start`) and owns it; the handle exists from the Context's build, so what is
//! built before (the provider's client) can already hold it.

use std::{
    fmt,
    future::Future,
    io,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::{Arc, OnceLock, Weak},
    task::{Context as TaskContext, Poll},
    thread,
    time::Duration,
};

use async_executor::{Executor, Task};
use futures_lite::{FutureExt, Stream, StreamExt};
use trillium_server_common::{DroppableFuture, RuntimeTrait};

/// The most worker threads `[daemon] workers = 0` picks: the daemon's per-request work is
/// small and every extra thread costs a stack and an allocator cache, so two keep a core
/// free for the host on larger machines while still overlapping a slow handler.
pub const AUTO_WORKERS_MAX: usize = 2;

/// Returns how many worker threads `configured` means (`0`: one per CPU, at most
/// [`AUTO_WORKERS_MAX`]).
pub fn worker_count(configured: usize) -> usize {
    match configured {
        0 => thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, AUTO_WORKERS_MAX),
        n => n,
    }
}

/// A handle on one daemon's executor, for trillium, trillium-client and host code that wants
/// to run work next to the daemon's. Once the daemon is shut down, spawning drops the future.
#[derive(Clone)]
pub struct Runtime {
    // Set once, by the daemon that starts on this handle's context.
    executor: Arc<OnceLock<Weak<Executor<'static>>>>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field(
                "running",
                &self
                    .executor
                    .get()
                    .is_some_and(|weak| weak.strong_count() > 0),
            )
            .finish()
    }
}

impl Runtime {
    /// Makes a handle with no executor yet: spawning drops the future until a daemon
    /// [starts](Runtime::start) on it.
    pub(crate) fn new() -> Runtime {
        Runtime {
            executor: Arc::new(OnceLock::new()),
        }
    }

    /// Makes the executor this handle (and every clone of it) spawns on from now on, for
    /// the daemon starting to own; `None` when one was made before, since a context runs
    /// one daemon.
    pub(crate) fn start(&self) -> Option<Arc<Executor<'static>>> {
        let executor = Arc::new(Executor::new());
        self.executor
            .set(Arc::downgrade(&executor))
            .ok()
            .map(|()| executor)
    }

    /// Runs `future` on the daemon's executor without a handle on its outcome. A panic in it
    /// ends that task only.
    pub fn spawn_detached(&self, future: impl Future<Output = ()> + Send + 'static) {
        if let Some(executor) = self.executor() {
            executor.spawn(future).detach();
        }
    }

    /// Runs `future` on the daemon's executor; `None` before the daemon starts and once it
    /// is shut down.
    pub(crate) fn spawn_task<T: Send + 'static>(
        &self,
        future: impl Future<Output = T> + Send + 'static,
    ) -> Option<Task<T>> {
        self.executor().map(|executor| executor.spawn(future))
    }

    fn executor(&self) -> Option<Arc<Executor<'static>>> {
        self.executor.get().and_then(Weak::upgrade)
    }
}

impl RuntimeTrait for Runtime {
    fn spawn<Fut>(
        &self,
        fut: Fut,
    ) -> DroppableFuture<impl Future<Output = Option<Fut::Output>> + Send + 'static>
    where
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        // The executor hands a task's panic to whoever awaits it; here that is `None`.
        let task = DetachOnDrop(self.spawn_task(fut));
        DroppableFuture::new(
            async move { AssertUnwindSafe(task).catch_unwind().await.ok().flatten() },
        )
    }

    async fn delay(&self, duration: Duration) {
        async_io::Timer::after(duration).await;
    }

    fn interval(&self, period: Duration) -> impl Stream<Item = ()> + Send + 'static {
        async_io::Timer::interval(period).map(|_| ())
    }

    fn block_on<Fut: Future>(&self, fut: Fut) -> Fut::Output {
        async_io::block_on(fut)
    }
}

impl From<Runtime> for trillium_server_common::Runtime {
    fn from(runtime: Runtime) -> Self {
        Arc::new(runtime).into()
    }
}

/// A task that keeps running when its handle is dropped (the contract of
/// [`RuntimeTrait::spawn`]); `async-executor` cancels on drop.
struct DetachOnDrop<T>(Option<Task<T>>);

impl<T> Future for DetachOnDrop<T> {
    type Output = Option<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<T>> {
        match self.0.as_mut() {
            Some(task) => Pin::new(task).poll(cx).map(Some),
            None => Poll::Ready(None),
        }
    }
}

impl<T> Drop for DetachOnDrop<T> {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.detach();
        }
    }
}

/// The threads driving one executor. Dropping it (or [`Workers::stop`]) ends them.
pub(crate) struct Workers {
    executor: Arc<Executor<'static>>,
    stop: async_channel::Sender<()>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Workers {
    /// Starts `threads` threads running `executor` until stopped.
    pub(crate) fn start(executor: Arc<Executor<'static>>, threads: usize) -> io::Result<Workers> {
        let (stop, stopped) = async_channel::bounded::<()>(1);
        let mut workers = Workers {
            executor,
            stop,
            threads: Vec::with_capacity(threads),
        };
        for index in 0..threads {
            let executor = Arc::clone(&workers.executor);
            let stopped = stopped.clone();
            let handle = thread::Builder::new()
                .name(format!("blufio-worker-{index}"))
                .spawn(move || {
                    // `recv` fails once the sender is closed or dropped.
                    let _ = async_io::block_on(executor.run(stopped.recv()));
                })?;
            workers.threads.push(handle);
        }
        Ok(workers)
    }

    /// Returns the executor, for a caller lending its own thread to it.
    pub(crate) fn executor(&self) -> &Arc<Executor<'static>> {
        &self.executor
    }

    /// Stops the threads and waits for them, without blocking an executor thread that
    /// awaits this. Tasks still pending are dropped with the executor.
    pub(crate) async fn stop(mut self) {
        self.stop.close();
        for handle in std::mem::take(&mut self.threads) {
            if handle.thread().id() == thread::current().id() {
                continue;
            }
            while !handle.is_finished() {
                async_io::Timer::after(Duration::from_millis(5)).await;
            }
            let _ = handle.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_workers_are_one_per_cpu_up_to_the_cap() {
        let cpus = thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(worker_count(0), cpus.min(AUTO_WORKERS_MAX));
        assert_eq!(worker_count(3), 3);
    }

    #[test]
    fn a_spawned_task_runs_on_the_workers_and_its_panic_is_none() {
        let runtime = Runtime::new();
        let executor = runtime.start().unwrap();
        let workers = Workers::start(executor, 1).unwrap();
        let answer = async_io::block_on(RuntimeTrait::spawn(&runtime, async { 42 }));
        assert_eq!(answer, Some(42));
        let panicked = async_io::block_on(RuntimeTrait::spawn(&runtime, async {
            panic!("contained");
        }));
        assert_eq!(panicked, None::<()>);
        // The worker survived the panic.
        let again = async_io::block_on(RuntimeTrait::spawn(&runtime, async { 7 }));
        assert_eq!(again, Some(7));
        async_io::block_on(workers.stop());
    }

    #[test]
    fn after_the_executor_is_gone_spawning_drops_the_future() {
        let runtime = Runtime::new();
        drop(runtime.start());
        assert_eq!(
            async_io::block_on(RuntimeTrait::spawn(&runtime, async { 1 })),
            None
        );
        runtime.spawn_detached(async { unreachable!("never polled") });
    }

    #[test]
    fn stopping_ends_the_threads_and_drops_pending_tasks() {
        let runtime = Runtime::new();
        let executor = runtime.start().unwrap();
        let workers = Workers::start(executor, 2).unwrap();
        let (held, dropped) = async_channel::bounded::<()>(1);
        runtime.spawn_detached(async move {
            let _held = held;
            futures_lite::future::pending::<()>().await;
        });
        async_io::block_on(workers.stop());
        // The pending task (and the sender it held) went with the executor.
        assert!(async_io::block_on(dropped.recv()).is_err());
    }
}
