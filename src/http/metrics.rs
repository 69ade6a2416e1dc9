//! `GET /metrics`: the Prometheus text format.
//!
//! Rendering reads the recorder and a fresh process sample; memory gauges hold the monitor's
//! latest sample. With `[prometheus] enabled = false` the route is never installed.
//!
//! A scrape costs a few hundred allocations and several `/proc` reads, so concurrent scrapers
//! share one rendering ([`SharedRender`]): a scraper takes the newest body whose rendering
//! began after it arrived, and renders only when there is none. Every answer is as fresh as
//! rendering on arrival would give, while a burst of scrapers (or an attacker hammering the
//! public route) costs one rendering per turn instead of one each.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use async_lock::Mutex;
use trillium::{Conn, Handler, KnownHeaderName, Status};

use crate::context::Context;

/// The content type of the Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `GET /metrics`.
#[derive(Debug, Clone)]
pub struct MetricsHandler {
    ctx: Arc<Context>,
    shared: Arc<SharedRender>,
}

impl MetricsHandler {
    /// Creates the handler.
    pub fn new(ctx: Arc<Context>) -> MetricsHandler {
        MetricsHandler {
            ctx,
            shared: Arc::new(SharedRender::default()),
        }
    }
}

impl Handler for MetricsHandler {
    async fn run(&self, conn: Conn) -> Conn {
        let body = self
            .shared
            .body(|| {
                let mut body = String::with_capacity(8 * 1024);
                // A new UTC day refills the budget gauge even when no message arrives.
                self.ctx.budget.refresh(
                    self.ctx.live().daily_budget_usd,
                    std::time::SystemTime::now(),
                );
                self.ctx
                    .metrics
                    .render(&self.ctx.process_sample(), &mut body);
                self.ctx.budget.render(&mut body);
                self.ctx.cgroup.render(&mut body);
                Arc::from(body)
            })
            .await;
        conn.with_status(Status::Ok)
            .with_response_header(KnownHeaderName::ContentType, CONTENT_TYPE)
            .with_body(body)
            .halt()
    }
}

/// One rendering shared by the scrapers that were waiting for it.
#[derive(Debug, Default)]
pub struct SharedRender {
    /// Renderings begun so far; a rendering's number is this count once it has begun.
    started: AtomicU64,
    /// The newest finished rendering: its number and body.
    latest: Mutex<(u64, Arc<str>)>,
}

impl SharedRender {
    /// Returns a body rendered after this call began: the newest one when its rendering began
    /// after the call did, else a new one from `render`.
    pub async fn body(&self, render: impl FnOnce() -> Arc<str>) -> Arc<str> {
        // Any rendering numbered above this began after we arrived.
        let wanted = self.started.load(Ordering::Acquire) + 1;
        let mut latest = self.latest.lock().await;
        if latest.0 >= wanted {
            return Arc::clone(&latest.1);
        }
        // Numbered under the lock, so renderings finish in the order of their numbers.
        let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        let body = render();
        *latest = (number, Arc::clone(&body));
        body
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, sync::Arc};

    use futures_lite::future;

    use super::*;

    #[test]
    fn a_later_scrape_never_gets_an_earlier_rendering() {
        let shared = SharedRender::default();
        let renders = Cell::new(0);
        let render = |text: &str| {
            renders.set(renders.get() + 1);
            Arc::from(text)
        };
        let first = future::block_on(shared.body(|| render("one")));
        let second = future::block_on(shared.body(|| render("two")));
        assert_eq!((&*first, &*second, renders.get()), ("one", "two", 2));
    }

    #[test]
    fn scrapers_waiting_on_a_rendering_share_the_next_one() {
        let shared = SharedRender::default();
        let renders = AtomicU64::new(0);
        let render = || {
            renders.fetch_add(1, Ordering::Relaxed);
            Arc::<str>::from("new")
        };
        // A rendering is under way (numbered and holding the lock)...
        let mut rendering = future::block_on(shared.latest.lock());
        shared.started.fetch_add(1, Ordering::AcqRel);
        // ...when two scrapers arrive: they wait.
        let mut first = std::pin::pin!(shared.body(render));
        let mut second = std::pin::pin!(shared.body(render));
        assert!(future::block_on(future::poll_once(&mut first)).is_none());
        assert!(future::block_on(future::poll_once(&mut second)).is_none());
        // The rendering they did not see begin finishes; they must not get it, and they
        // share one new rendering.
        *rendering = (1, Arc::from("old"));
        drop(rendering);
        assert_eq!(&*future::block_on(first), "new");
        assert_eq!(&*future::block_on(second), "new");
        assert_eq!(renders.load(Ordering::Relaxed), 1);
    }
}
