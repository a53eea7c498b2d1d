//! Group commit: concurrent [`Store::write`]s share one transaction and one commit (one fsync),
//! so that a node's many tasks writing at once pay for one flush between them.
//!
//! Each write is queued, with a oneshot for its result, on a `std::sync::Mutex<VecDeque>` (held
//! only to push or pop, never across a transaction or an `.await`, so a std mutex is right). If
//! no write is being led, the caller becomes the *leader*: it takes up to [`MAX_GROUP`] queued
//! writes, runs them in queue order in one transaction, commits once and sends every write its
//! result. Everyone else is a *follower* and just awaits its oneshot. The leader flag lives
//! under the same mutex as the queue: a write that is queued as the leader finds the queue empty
//! either is taken by it or finds no leader and leads itself, so no write is left behind. See
//! [`Store::write`] for what a failure does to the other writes of its group.
//!
//! When writes contend (some joined the previous leader's queue), a new leader first yields one
//! turn to the runtime, so that the tasks ready to run queue their writes into its group: with
//! 200 agents hopping, that alone took a benchmark from ~5,800 to ~8,500 hops/s (groups averaged
//! 1.3 writes, now about 9), while an uncontended write still commits at once.
//!
//! # Where the leader waits for the disk
//!
//! Outside any runtime, nothing else would run the queue: the caller's thread drains it. Inside
//! one, a leader leads the group holding its own write (the first of the queue) and no more: if
//! more writes queued meanwhile, it hands the leadership to a `spawn_blocking` thread, which
//! drains the queue until it is empty, so that no caller of `write` is held up serving others
//! under sustained load. Where that first group runs depends on whether it may wait for the
//! disk:
//!
//! - In a store with [`Durability::Fsync`], a commit waits for the disk (and `begin_write` for
//!   the commit before it). On a multi-thread runtime (the node's), the group runs on the
//!   caller's thread: where it is while the store's synced commits are fast (the module docs of
//!   the store say why and what "fast" is), inside [`tokio::task::block_in_place`] otherwise,
//!   which hands the worker's other tasks to another thread meanwhile. Either way there is no
//!   hop to another task, so an uncontended write commits at once. On a current-thread
//!   runtime, `block_in_place` cannot free the runtime's one thread, so the leadership goes to
//!   a `spawn_blocking` thread at once, and the caller awaits its result like a follower.
//! - In a store with [`Durability::NoSync`] (tests, benchmarks, the `tern run` mesh), a commit
//!   hands its pages to the OS and waits for no fsync, its own or another writer's: the group
//!   runs on the caller's thread, as a read would. `block_in_place` there cost more than the
//!   commit (a small uncontended write took 21 µs instead of 15).
//!
//! A runtime shutting down may refuse the `spawn_blocking` thread: the writes it would have run
//! are then abandoned ([`StoreError::BatchAborted`]), never left waiting.
//!
//! [`Durability::Fsync`]: super::Durability::Fsync
//! [`Durability::NoSync`]: super::Durability::NoSync

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, MutexGuard, PoisonError};

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use super::{Batch, DiskWait, Shared, Store, StoreError};

/// The most writes [`Store::write`] puts in one transaction. Writes are closures, so their size
/// is unknown; this bounds how long one commit keeps results waiting and how much one failing
/// write can take down with it.
pub const MAX_GROUP: usize = 256;

/// Writes waiting for a transaction, and whether someone is leading them.
#[derive(Default)]
pub(super) struct Writes {
    queue: VecDeque<Box<dyn Job>>,
    /// A leader is running (or about to run) groups. Invariant: when false, `queue` is empty;
    /// whoever queues a write while it is false becomes the leader in the same critical section.
    leading: bool,
    /// A write was queued while a leader ran, since the last leadership was taken.
    joined: bool,
}

impl Store {
    /// Runs `op` in a write transaction shared with the other writes queued at the same time
    /// (group commit): one commit, one fsync for the whole group. Writes run one after another
    /// in the order they were queued, and each sees what the writes before it in the group wrote
    /// (an arrival then a departure of the same agent compose). `write` returns once the group
    /// has committed (or failed).
    ///
    /// Groups wait for the disk off the threads that run a runtime's tasks. With
    /// [`Durability::Fsync`](super::Durability::Fsync), on a multi-thread runtime the group
    /// holding this write runs on the caller's thread inside [`tokio::task::block_in_place`]
    /// (the worker's other tasks move to another thread meanwhile) unless another write leads
    /// it, and the groups after it on a blocking thread; on a current-thread runtime every group
    /// runs on a blocking thread. With [`Durability::NoSync`](super::Durability::NoSync), the
    /// group holding this write commits on the caller's thread (it waits for no disk), and the
    /// groups after it on a blocking thread. Outside any runtime, every group runs on the
    /// caller's thread.
    ///
    /// A write still runs if its future is dropped once it was first polled (it is queued
    /// then): its outcome is discarded, and the other writes are unaffected.
    ///
    /// `op` must not write through the store itself ([`Store::batch`], or wait for another
    /// `write`): it runs inside the group's transaction, and redb allows one at a time, so that
    /// would deadlock. Write through the [`Batch`] instead.
    ///
    /// # Errors
    ///
    /// A redb transaction cannot be partly rolled back (savepoints cannot be taken once it has
    /// written), so one failing write takes the writes before it in its group down with it:
    ///
    /// - If `op` returns an error, `write` returns that error, and nothing of the transaction is
    ///   stored. The writes before it in the group get [`StoreError::BatchAborted`] naming the
    ///   cause; the writes after it had not run yet and go on in the next transaction,
    ///   unaffected.
    /// - If `op` panics, `write` returns [`StoreError::Panicked`] with the panic message (the
    ///   panic is caught, not resumed), and the group is treated as above.
    /// - If the transaction cannot begin or commit, every write of the group gets
    ///   [`StoreError::BatchAborted`] naming the cause.
    ///
    /// So `op`'s own error always comes back as is, and `BatchAborted` always means nothing
    /// this write did was stored, through no fault of its own: running it again is safe. An
    /// `op` should return `Err` only for real failures, not for outcomes its caller expects
    /// (those are values, like [`Arrival::Duplicate`](super::Arrival::Duplicate)). [`StoreError::Interrupted`] reports a
    /// write whose outcome was lost to a bug in the store.
    ///
    /// # Examples
    ///
    /// ```
    /// # use platform::store::{Durability, Store};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync)?;
    /// let tasks: Vec<_> = (0..8)
    ///     .map(|i| {
    ///         let store = store.clone();
    ///         tokio::spawn(async move {
    ///             store.write(move |b| b.push_message("agent-1", &[i])).await
    ///         })
    ///     })
    ///     .collect();
    /// for task in tasks {
    ///     task.await??;
    /// }
    /// assert_eq!(store.message_count("agent-1")?, 8);
    /// # Ok(()) }
    /// ```
    pub async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Batch<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue_write(op, true).await
    }

    /// [`Store::write`] for a change a crash may lose, because recovery redoes it (an arrival
    /// turning runnable, a completed departure): its group commits without waiting for the
    /// disk, unless another write of the group needs the store's durability. It becomes durable
    /// with the next commit that waits for the disk; a crash before that loses it and every
    /// unsynced write after it, never part of one, and never a synced write.
    ///
    /// # Errors
    ///
    /// As [`Store::write`].
    pub async fn write_unsynced<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Batch<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.queue_write(op, false).await
    }

    async fn queue_write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&mut Batch<'_>) -> Result<T, StoreError> + Send + 'static,
        synced: bool,
    ) -> Result<T, StoreError> {
        let (reply, outcome) = oneshot::channel();
        if let Some((leader, contended)) =
            self.shared.enqueue(Box::new(Queued { op, reply, synced }))
        {
            // Runs (or hands to a blocking thread) at least the group holding this write before
            // returning, so the await below never waits on a leader that is this very task. When writes contend (some joined
            // the previous leader's queue), it first lets the tasks ready to run queue theirs,
            // which then join this group: one commit for all. It leads even if this future is
            // dropped meanwhile.
            let leading = LeadOnDrop(Some(leader));
            if contended {
                tokio::task::yield_now().await;
            }
            drop(leading);
        }
        outcome.await.unwrap_or(Err(StoreError::Interrupted))
    }
}

impl Shared {
    fn lock_writes(&self) -> MutexGuard<'_, Writes> {
        // Nothing panics while the lock is held (queue operations only), so a poisoned lock
        // still guards a consistent queue.
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `job`; returns the leadership if nobody was leading, and whether writes joined
    /// a leader's queue since the last leadership was taken (the store is busy).
    fn enqueue(self: &Arc<Self>, job: Box<dyn Job>) -> Option<(Leader, bool)> {
        let mut writes = self.lock_writes();
        writes.queue.push_back(job);
        if writes.leading {
            writes.joined = true;
            return None;
        }
        writes.leading = true;
        let leader = Leader {
            shared: Arc::clone(self),
            active: true,
        };
        Some((leader, std::mem::take(&mut writes.joined)))
    }

    /// Runs `group` in one transaction and reports to each write. Writes that did not run
    /// because an earlier one failed are left in `group`, in order, for the next transaction.
    fn commit_group(&self, group: &mut VecDeque<Box<dyn Job>>) {
        let synced = group.iter().any(|job| job.synced());
        let txn = match self.begin(synced) {
            Ok(txn) => txn,
            Err(e) => {
                let cause = format!("its transaction could not begin: {}", chain(&e));
                for job in group.drain(..) {
                    job.abandon(StoreError::BatchAborted(cause.clone()));
                }
                return;
            }
        };
        let mut batch = Batch::new(&txn, &self.occupied);
        let mut wrote: Vec<Finish> = Vec::with_capacity(group.len());
        while let Some(job) = group.pop_front() {
            match job.run(&mut batch) {
                Ran::Wrote(finish) => wrote.push(finish),
                Ran::Failed(cause) => {
                    // The failing write's own error is what matters; a failed abort changes
                    // nothing on disk either way.
                    let _ = txn.abort();
                    for finish in wrote {
                        finish(Err(StoreError::BatchAborted(cause.clone())));
                    }
                    return;
                }
            }
        }
        let stored = match batch.settle() {
            Ok(stored) => stored,
            Err(e) => {
                let _ = txn.abort();
                let cause = format!("its usage could not be counted: {}", chain(&e));
                for finish in wrote {
                    finish(Err(StoreError::BatchAborted(cause.clone())));
                }
                return;
            }
        };
        match self.commit(txn, synced) {
            Ok(()) => {
                self.committed(stored);
                for finish in wrote {
                    finish(Ok(()));
                }
            }
            Err(e) => {
                let cause = format!(
                    "its transaction could not commit: {}",
                    chain(&StoreError::from(e))
                );
                for finish in wrote {
                    finish(Err(StoreError::BatchAborted(cause.clone())));
                }
            }
        }
    }
}

/// The right to run groups of queued writes; at most one exists per store at a time. Dropping
/// an active leader (a panic in the store's own code, or a hand-off the runtime never ran)
/// releases the leadership and abandons the queued writes, so the store is never wedged.
struct Leader {
    shared: Arc<Shared>,
    /// Whether this leader still holds the leadership.
    active: bool,
}

impl Leader {
    /// Leads from the thread of the write that took the leadership, never waiting for the disk
    /// where a runtime's tasks would wait with it (see the module docs).
    fn lead(mut self) {
        let Ok(runtime) = Handle::try_current() else {
            return self.drain();
        };
        let ran = match self.shared.disk_wait(&runtime) {
            DiskWait::Here => self.run_group(),
            DiskWait::InPlace => tokio::task::block_in_place(|| self.run_group()),
            DiskWait::Elsewhere => {
                // A refused hand-off drops the leader, which abandons the queue.
                drop(runtime.spawn_blocking(move || self.drain()));
                return;
            }
        };
        if ran && !self.release_if_idle() {
            drop(runtime.spawn_blocking(move || self.drain()));
        }
    }

    /// Runs groups until the queue is empty.
    fn drain(mut self) {
        while self.run_group() {}
    }

    /// Runs the oldest queued writes as one group; false, with the leadership released, if no
    /// write is queued.
    fn run_group(&mut self) -> bool {
        let Some(mut group) = self.take_group() else {
            return false;
        };
        self.shared.commit_group(&mut group);
        self.requeue(group);
        true
    }

    /// The next group to run, oldest first; `None`, with the leadership released, if no write
    /// is queued.
    fn take_group(&mut self) -> Option<VecDeque<Box<dyn Job>>> {
        let mut writes = self.shared.lock_writes();
        if writes.queue.is_empty() {
            writes.leading = false;
            self.active = false;
            return None;
        }
        let n = writes.queue.len().min(MAX_GROUP);
        Some(writes.queue.drain(..n).collect())
    }

    /// Releases the leadership if no write is queued; says whether it did.
    fn release_if_idle(&mut self) -> bool {
        let mut writes = self.shared.lock_writes();
        if writes.queue.is_empty() {
            writes.leading = false;
            self.active = false;
        }
        !self.active
    }

    /// Puts writes that have not run back at the front of the queue, in their order.
    fn requeue(&self, group: VecDeque<Box<dyn Job>>) {
        if group.is_empty() {
            return;
        }
        let mut writes = self.shared.lock_writes();
        for job in group.into_iter().rev() {
            writes.queue.push_front(job);
        }
    }
}

/// A leader that leads when it is dropped.
struct LeadOnDrop(Option<Leader>);

impl Drop for LeadOnDrop {
    fn drop(&mut self) {
        if let Some(leader) = self.0.take() {
            leader.lead();
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let orphans = {
            let mut writes = self.shared.lock_writes();
            writes.leading = false;
            std::mem::take(&mut writes.queue)
        };
        // Reported outside the lock: nothing of theirs ran, and their closures are dropped here.
        for job in orphans {
            job.abandon(StoreError::BatchAborted(
                "the store stopped writing before it ran".to_owned(),
            ));
        }
    }
}

/// A queued [`Store::write`], with its result type erased.
trait Job: Send {
    /// Runs the write in the group's transaction; catches its panic.
    fn run(self: Box<Self>, batch: &mut Batch<'_>) -> Ran;
    /// Reports that the write was not run and why.
    fn abandon(self: Box<Self>, error: StoreError);
    /// Whether its commit must have the store's durability.
    fn synced(&self) -> bool;
}

/// Reports the commit's outcome to a write that succeeded in its transaction.
type Finish = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What running a queued write did.
enum Ran {
    /// It succeeded; its value waits for the commit.
    Wrote(Finish),
    /// It failed or panicked, and its caller has been told; the cause, for the others.
    Failed(String),
}

struct Queued<F, T> {
    op: F,
    /// Sending fails only when the caller stopped waiting; its outcome is then discarded.
    reply: oneshot::Sender<Result<T, StoreError>>,
    synced: bool,
}

impl<F, T> Job for Queued<F, T>
where
    F: FnOnce(&mut Batch<'_>) -> Result<T, StoreError> + Send,
    T: Send + 'static,
{
    fn run(self: Box<Self>, batch: &mut Batch<'_>) -> Ran {
        let Queued { op, reply, .. } = *self;
        // The transaction a panic may leave half-written is aborted, so no broken state is
        // observed afterwards.
        match panic::catch_unwind(AssertUnwindSafe(|| op(batch))) {
            Ok(Ok(value)) => Ran::Wrote(Box::new(move |outcome: Result<(), StoreError>| {
                let _ = reply.send(outcome.map(|()| value));
            })),
            Ok(Err(e)) => {
                let cause = format!("another write in its transaction failed: {}", chain(&e));
                let _ = reply.send(Err(e));
                Ran::Failed(cause)
            }
            Err(payload) => {
                let message = panic_message(payload.as_ref());
                let cause = format!("another write in its transaction panicked: {message}");
                let _ = reply.send(Err(StoreError::Panicked(message)));
                Ran::Failed(cause)
            }
        }
    }

    fn abandon(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }

    fn synced(&self) -> bool {
        self.synced
    }
}

/// `e` and its sources, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}
