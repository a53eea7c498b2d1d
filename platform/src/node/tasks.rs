//! The node's tasks: every task a node spawns belongs to it, so that stopping the node stops all
//! of them and a stopped node leaves nothing running behind (no task still holding its store,
//! its streams or its agents).

use std::future::Future;

use tokio_util::sync::CancellationToken;
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
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                () = stop.cancelled() => {}
                () = task => {}
            }
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
