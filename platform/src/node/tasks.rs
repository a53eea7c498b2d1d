//! The node's tasks: every task a node spawns belongs to it, so that stopping the node stops all
//! of them and a stopped node leaves nothing running behind (no task still holding its store,
//! its streams or its agents).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// The tasks of one node and the signal that stops them.
///
/// A task spawned with [`NodeTasks::spawn`] ends at its next `.await` once the node stops;
/// one spawned with [`NodeTasks::spawn_to_end`] runs to its end (a store write that others
/// await), and the node's stop waits for it. Either way it is tracked: [`NodeTasks::stop`]
/// returns once every task of the node has ended.
#[derive(Clone, Default)]
pub(super) struct NodeTasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl NodeTasks {
    /// Spawns `task` as the node's: it is dropped at its next `.await` once the node stops.
    pub(super) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(UntilStop {
            stop: self.stop.clone().cancelled_owned(),
            task,
        });
    }

    /// Spawns `task` as the node's, to run to its end even when the node stops meanwhile (the
    /// stop waits for it): for short work whose result someone awaits through the handle.
    pub(super) fn spawn_to_end<T: Send + 'static>(
        &self,
        task: impl Future<Output = T> + Send + 'static,
    ) -> tokio::task::JoinHandle<T> {
        self.tracker.spawn(task)
    }

    /// Resolves once the node is told to stop (for loops that must end cleanly rather than be
    /// dropped).
    pub(super) fn stopping(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Tells every task to stop (returns at once).
    pub(super) fn signal_stop(&self) {
        self.stop.cancel();
        self.tracker.close();
    }

    /// Tells every task to stop and waits until all have ended.
    pub(super) async fn stop(&self) {
        self.signal_stop();
        self.tracker.wait().await;
    }

    /// How many of the node's tasks are still running.
    pub(super) fn running(&self) -> usize {
        self.tracker.len()
    }
}

pin_project_lite::pin_project! {
    /// A task that ends when the node stops (looked at first) or when it ends itself.
    ///
    /// A struct rather than an `async` block over `tokio::select!`: an `async` block keeps the
    /// task it captures and, apart, the copy `select!` moves it into, so every task, each
    /// resident agent's runner included, would take twice its size (12 KiB instead of 6 for a
    /// runner; `-Zprint-type-sizes` shows it).
    struct UntilStop<F> {
        #[pin]
        stop: WaitForCancellationFutureOwned,
        #[pin]
        task: F,
    }
}

impl<F: Future<Output = ()>> Future for UntilStop<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if this.stop.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.task.poll(cx)
    }
}
