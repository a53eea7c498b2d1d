//! The node's crash-safe embedded store: everything a node must still know after a crash lives
//! in one redb database file, so that a restarted node resumes its agents and no hop is lost or
//! made twice.
//!
//! # Layout
//!
//! [`Store`] is the handle every task of a node shares, and its reads; [`Batch`] is what a write
//! sees. One concept per file, each adding its reads to `Store` and its writes to `Batch`:
//!
//! - `schema`: the tables, which are the on-disk format (schema 2), and the check on open;
//! - `records`: agent records ([`AgentRecord`], [`AgentMeta`], [`AgentState`]) and how an
//!   `agents` value encodes them;
//! - `chunks`: continuations of 4 KiB or more, kept apart from their records in chunks that fill
//!   1 MiB pages;
//! - `packages`: agent code, by hash;
//! - `hops`: both sides of a hop ([`Batch::accept_arrival`], [`Batch::complete_departure`], ...),
//!   the hops seen, departures and forwarding pointers;
//! - `mailbox`: the per-agent message queues;
//! - `directory`: on the home node, where its agents are and how they ended;
//! - `group_commit`: the queue and the leader behind [`Store::write`];
//! - `usage`: the bytes agents take in the store ([`Store::stored_bytes`]);
//! - `tables`: the node's `table` resources ([`Store::table_get`], [`Batch::table_set`], ...);
//! - `moved_resources`: where the resources bound by move are ([`ResourcePlace`]), and the
//!   values among them; `moved_datasets`: the files of the datasets among them;
//! - `resource_cache`: the chunks of other nodes' resources read by copy-on-reference;
//! - `error`: [`StoreError`].
//!
//! # Writing
//!
//! Every write is a closure over a [`Batch`]: what it writes is committed together, or, if it
//! returns an error, not at all. Operations that must be atomic together go in one closure. The
//! closure runs one of two ways:
//!
//! - [`Store::write`] (async): **group commit**. Concurrent writes share one transaction and one
//!   commit (one fsync): the way the node writes from its tasks.
//! - [`Store::batch`] (blocking): one transaction and one commit of its own, on the calling
//!   thread. For synchronous code: start-up ([`Store::open`]), tests, benchmarks, and the node's
//!   few synchronous paths (launching an agent, queueing a message for an agent held here,
//!   keeping a result, restoring an agent after a failed hop).
//!
//! `batch` is the blocking form of `write`, not a second API: the same closure over the same
//! [`Batch`]. It stays because a synchronous caller gains nothing from a group (it waits for its
//! own commit either way) and would pay for what the group needs: a `Send + 'static` closure (it
//! may run on another thread, in another write's group), an executor to await it, and errors
//! that are another write's ([`StoreError::BatchAborted`]). So tests write with `batch`, and
//! use `write` only where group commit itself is tested.
//!
//! In a store with [`Durability::Fsync`], neither holds a thread that runs a tokio runtime's
//! tasks for long, but for `batch` on a current-thread runtime. The store times its synced
//! commits ([`DiskSpeed`]). On a multi-thread runtime (the node's), while they average under
//! [`SLOW_DISK`] (1 ms), a commit runs where it is called, as a task's poll of that length
//! would: handing a worker's tasks to another thread costs more than that on a small machine
//! (measured on the 2-core test VM: +250 µs per durable hop, +65 %, waking a thread there takes
//! 100 µs or more). On a slower disk, `batch` runs inside [`tokio::task::block_in_place`], which
//! hands the worker's other tasks to another thread meanwhile, and so does the group `write`
//! leads. On a current-thread runtime, `write` hands its group to a blocking thread
//! (`group_commit` has the details). `batch` cannot: a current-thread runtime has no other
//! thread for its tasks, so there `batch` blocks them all, and async code uses `write`. In a
//! store with [`Durability::NoSync`], no commit waits for the disk (none fsyncs), and both
//! commit on the calling thread.
//!
//! The writers are the node's protocol handlers (arrivals, departures, packages, locations,
//! messages) and its scheduler (agent records after each slice, results).
//!
//! ## Durability
//!
//! With [`Durability::Fsync`] a commit is redb's default one-phase commit: it writes the pages
//! it changed and the header, then calls `fdatasync` once (plus once more when the file grows).
//! Crash safety comes from page checksums, verified when the file is opened after a crash; redb's
//! two-phase commit and quick-repair (both off by default, and left off) would each add an
//! fsync or more per commit without making a commit more durable.
//!
//! [`Store::write_unsynced`] is for changes a crash may lose because recovery redoes them (an
//! arrival turning runnable once its hop committed): its group commits without an fsync unless
//! another write of the group needs one, and becomes durable with the next synced commit.
//!
//! # Concurrency
//!
//! [`Store`] is a cheap `Clone` around one shared `Arc` (the `redb::Database` and the write
//! queue), shared by every task of a node; opening the same file twice in one process fails, so
//! share clones instead. Readers never block and never wait for writers (MVCC snapshots). redb
//! allows one write transaction at a time, and a commit with [`Durability::Fsync`] waits for the
//! disk, so writes are where contention is: [`Store::batch`] waits in
//! [`redb::Database::begin_write`] until the write before it has committed (fsync included),
//! while [`Store::write`] joins the group being formed. Reads run on the calling thread, which
//! waits for the disk when a page is not in the cache: where `batch` would wait (inside
//! [`tokio::task::block_in_place`] on a slow disk under [`Durability::Fsync`], so that a node's
//! other tasks go on meanwhile), and where they are otherwise.
//!
//! # Examples
//!
//! ```
//! use platform::store::{Durability, Store};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(&dir.path().join("tern.redb"), Durability::NoSync)?;
//! // Queue a message and hand back the result of an agent in one commit.
//! store.batch(|b| {
//!     b.push_message("agent-1", b"hello")?;
//!     b.put_result("agent-1", b"done")
//! })?;
//! assert_eq!(store.messages("agent-1")?, vec![b"hello".to_vec()]);
//! assert_eq!(store.result("agent-1")?.as_deref(), Some(&b"done"[..]));
//! # Ok(()) }
//! ```

mod chunks;
mod directory;
mod error;
mod group_commit;
mod hops;
mod mailbox;
mod moved_datasets;
mod moved_resources;
mod packages;
mod records;
mod resource_cache;
mod schema;
mod tables;
mod usage;

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::runtime::{Handle, RuntimeFlavor};

pub use error::StoreError;
pub use group_commit::MAX_GROUP;
pub use hops::{Arrival, ArrivalView, HopSeen};
pub use mailbox::QueueSize;
pub use moved_datasets::MovedDataset;
pub use moved_resources::{HeldResource, ResourceContents, ResourcePlace, TableEntries};
pub use records::{AgentMeta, AgentRecord, AgentState};

/// Whether a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is on disk when it returns (redb's `Durability::Immediate`): the setting for
    /// real nodes, and what exactly-once hops rely on across power loss.
    Fsync,
    /// Commits return without an fsync (redb's `Durability::None`). The file stays consistent,
    /// and a clean close makes everything durable, but a crash or power loss rolls back to the
    /// last durable commit: for tests, benchmarks and the embedded `tern run` mesh.
    NoSync,
}

impl From<Durability> for redb::Durability {
    fn from(d: Durability) -> Self {
        match d {
            Durability::Fsync => redb::Durability::Immediate,
            Durability::NoSync => redb::Durability::None,
        }
    }
}

/// The node's durable state; see the [module docs](self) for how it is written.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

/// What every clone of a [`Store`] shares.
struct Shared {
    db: Database,
    durability: Durability,
    /// Why the store can no longer be written, once it cannot: after an i/o error redb refuses
    /// every later operation until the file is opened again (`StorageError::PreviousIo`).
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// The group-commit queue of [`Store::write`]. A std mutex: it is held only to push or pop
    /// writes and flip the leader flag, never across a transaction or an `.await`.
    writes: Mutex<group_commit::Writes>,
    /// How long this store's synced commits take, which decides where they wait.
    disk: DiskSpeed,
    /// The bytes agents take in the store, as last committed (see `usage`).
    stored: AtomicU64,
    /// Which of the resource tables a hop looks into have held anything.
    occupied: Occupied,
}

/// Whether the two resource tables every departure looks into for the leaving agent's entries
/// (`table_places`, `resource_cache`) have held anything since the store was opened, or did
/// then. Nearly every agent binds nothing by move or copy-on-reference, and its hops skip
/// both tables while they are empty. Set, never cleared, by the transaction that first writes
/// one; write transactions run one at a time, so one that reads `false` finds the table empty.
#[derive(Debug, Default)]
struct Occupied {
    resource_places: AtomicBool,
    cached_chunks: AtomicBool,
}

impl Batch<'_> {
    /// Notes which of the tables of [`Occupied`] hold anything now (as the store opens).
    fn note_occupied_resource_tables(&mut self) -> Result<(), StoreError> {
        use redb::ReadableTableMetadata;
        if !self.txn.open_table(schema::RESOURCE_PLACES)?.is_empty()? {
            self.occupied.resource_places.store(true, Ordering::Relaxed);
        }
        if !self.txn.open_table(schema::RESOURCE_CACHE)?.is_empty()? {
            self.occupied.cached_chunks.store(true, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("durability", &self.shared.durability)
            .finish_non_exhaustive()
    }
}

/// Bytes of redb's page cache. Its default, 1 GiB, kept every page written (a 100 MB
/// continuation stayed cached after its agent left, and each large hop filled fresh memory);
/// the metadata of 10,000 agents takes about 10 MiB. Every large continuation stored passes
/// through it, so its size adds to a node's peak: with 64 MiB, an agent of a 64 MiB budget
/// hopping back and forth took each node 214–270 MiB above idle, with 32 MiB 179–189 MiB
/// (`bench_mesh hostile`).
const STORE_CACHE: usize = 32 << 20;

impl Store {
    /// Opens the database at `path`, creating the file (not its directory) if it is missing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Open`] if the file cannot be opened (including when it is already open in
    /// this or another process), [`StoreError::Schema`] if it holds another schema.
    pub fn open(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE)
            .create(path)?;
        Store::on(db, durability)
    }

    /// Opens the database kept by `backend` (redb's storage layer: a file, memory, or, in
    /// tests, a layer that fails on purpose to show what the node does when its disk does).
    ///
    /// # Errors
    ///
    /// As [`Store::open`].
    pub fn open_on(
        backend: impl redb::StorageBackend,
        durability: Durability,
    ) -> Result<Store, StoreError> {
        let db = redb::Builder::new()
            .set_cache_size(STORE_CACHE)
            .create_with_backend(backend)?;
        Store::on(db, durability)
    }

    fn on(db: Database, durability: Durability) -> Result<Store, StoreError> {
        let store = Store {
            shared: Arc::new(Shared {
                db,
                durability,
                failure: tokio::sync::watch::Sender::new(None),
                writes: Mutex::default(),
                disk: DiskSpeed::default(),
                stored: AtomicU64::new(0),
                occupied: Occupied::default(),
            }),
        };
        let stored = store.batch(|b| {
            b.create_tables()?;
            b.count_stored_if_missing()?;
            b.note_occupied_resource_tables()?;
            b.stored()
        })?;
        store.shared.stored.store(stored, Ordering::Relaxed);
        Ok(store)
    }

    /// The bytes agents take in this store, as last committed: packages, agent records and
    /// continuations, queued messages and results (the `usage` module says what is left out).
    /// One atomic read, for quota checks.
    pub fn stored_bytes(&self) -> u64 {
        self.shared.stored.load(Ordering::Relaxed)
    }

    /// Why the store can no longer be written (`None` while it can): once a transaction could
    /// not begin or commit for an i/o error, none will until the file is opened again. What was
    /// committed before stays; the node stops on it (see `NodeHandle::stopped`).
    pub fn failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.shared.failure.subscribe()
    }

    /// The durability this store commits with.
    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Runs `f` in one write transaction of its own, on the calling thread: everything it writes
    /// is committed together (one commit, one fsync), or, if it returns an error, nothing is.
    /// Blocks until any other write transaction has committed, then while its own commits (an
    /// fsync under [`Durability::Fsync`]). Under `Fsync`, on a worker of a multi-thread runtime
    /// it blocks inside [`tokio::task::block_in_place`], so that the worker's other tasks go on
    /// elsewhere; on a current-thread runtime it blocks the runtime, so async code there uses
    /// [`Store::write`] (as async code everywhere should: its writes share commits).
    ///
    /// # Errors
    ///
    /// The error `f` returned, or the store's own when the transaction cannot begin or commit.
    ///
    /// # Examples
    ///
    /// ```
    /// # use platform::store::{Durability, Store};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync).unwrap();
    /// // The source side of a hop on the agent's home node: leave a pointer, track it.
    /// store.batch(|b| {
    ///     b.complete_departure("agent-1", "peer-b")?;
    ///     b.set_location("agent-1", "peer-b")
    /// }).unwrap();
    /// assert_eq!(store.location("agent-1").unwrap().as_deref(), Some("peer-b"));
    /// ```
    pub fn batch<T>(
        &self,
        f: impl FnOnce(&mut Batch<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let run = || {
            let txn = self.shared.begin(true)?;
            let mut batch = Batch::new(&txn, &self.shared.occupied);
            let result = f(&mut batch).and_then(|value| Ok((value, batch.settle()?)));
            match result {
                Ok((value, stored)) => {
                    self.shared.commit(txn, true)?;
                    self.shared.committed(stored);
                    Ok(value)
                }
                Err(e) => {
                    // The closure's error is the one worth reporting; a failed abort changes
                    // nothing on disk either way.
                    let _ = txn.abort();
                    Err(e)
                }
            }
        };
        match Handle::try_current().map(|runtime| self.shared.disk_wait(&runtime)) {
            Ok(DiskWait::InPlace) => tokio::task::block_in_place(run),
            // `Elsewhere` too: the caller waits for the outcome on this thread either way.
            Err(_) | Ok(DiskWait::Here | DiskWait::Elsewhere) => run(),
        }
    }

    /// Runs `f` on a snapshot of the store, on the calling thread, waiting where
    /// [`Store::batch`] would, since a page not in the cache is read from the disk.
    fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let run = || f(&self.shared.db.begin_read()?);
        match Handle::try_current().map(|runtime| self.shared.disk_wait(&runtime)) {
            Ok(DiskWait::InPlace) => tokio::task::block_in_place(run),
            Err(_) | Ok(DiskWait::Here | DiskWait::Elsewhere) => run(),
        }
    }
}

impl Shared {
    /// A write transaction with the store's durability, or none (`synced` false).
    fn begin(&self, synced: bool) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write().inspect_err(|e| {
            if let redb::TransactionError::Storage(e) = e {
                self.note_failure(e);
            }
        })?;
        let durability = if synced {
            self.durability
        } else {
            Durability::NoSync
        };
        txn.set_durability(durability.into())?;
        Ok(txn)
    }

    /// Records that the store failed, if `e` says its file did.
    fn note_failure(&self, e: &redb::StorageError) {
        if matches!(
            e,
            redb::StorageError::Io(_) | redb::StorageError::PreviousIo
        ) {
            let cause = e.to_string();
            self.failure.send_if_modified(|failure| {
                let first = failure.is_none();
                if first {
                    tracing::error!("the store failed: {cause}");
                    *failure = Some(cause);
                }
                first
            });
        }
    }
}

/// Where a transaction on a thread of a tokio runtime waits for the disk.
enum DiskWait {
    /// Where it is: the disk is fast, or the store never waits for it to write (see
    /// [`Shared::disk_wait`]).
    Here,
    /// Inside [`tokio::task::block_in_place`], which hands the worker's other tasks to another
    /// thread meanwhile.
    InPlace,
    /// Not on this thread, which may be a current-thread runtime's only one: nothing can free
    /// it for its tasks.
    Elsewhere,
}

impl Shared {
    /// Where a transaction on the calling thread, which `runtime` may run tasks on, waits for the
    /// disk.
    fn disk_wait(&self, runtime: &Handle) -> DiskWait {
        match (self.durability, runtime.runtime_flavor()) {
            // A commit without an fsync hands its pages to the OS's page cache and returns: it
            // waits for the disk no more than a read does, and no writer of this store waits for
            // the disk before it. Moving it off the worker would cost more than the commit
            // (block_in_place: +40 % for a small write).
            (Durability::NoSync, _) => DiskWait::Here,
            // A disk that syncs in well under a millisecond holds a worker no longer than a
            // task's poll may: handing the worker's tasks to another thread costs more (on the
            // 2-core test machine, +250 µs, +65 %, per durable hop, whether by block_in_place or
            // spawn_blocking: waking a thread there takes 100 µs or more).
            (Durability::Fsync, RuntimeFlavor::MultiThread) if !self.disk.is_slow() => {
                DiskWait::Here
            }
            (Durability::Fsync, RuntimeFlavor::MultiThread) => DiskWait::InPlace,
            (Durability::Fsync, _) => DiskWait::Elsewhere,
        }
    }

    /// Takes the bytes stored after a commit, if it changed them.
    fn committed(&self, stored: Option<u64>) {
        if let Some(stored) = stored {
            self.stored.store(stored, Ordering::Relaxed);
        }
    }

    /// Commits `txn`, timing it if it syncs.
    fn commit(&self, txn: WriteTransaction, synced: bool) -> Result<(), redb::CommitError> {
        let committed = if synced && self.durability == Durability::Fsync {
            let started = Instant::now();
            let committed = txn.commit();
            self.disk.record(started.elapsed());
            committed
        } else {
            txn.commit()
        };
        if let Err(redb::CommitError::Storage(e)) = &committed {
            self.note_failure(e);
        }
        committed
    }
}

/// Synced commits that take longer than this, on average, are a slow disk: they are waited for
/// off the runtime's workers.
const SLOW_DISK: Duration = Duration::from_millis(1);

/// How long this store's synced commits take: a moving average over about the last eight, in
/// microseconds (0 until the first).
#[derive(Default)]
struct DiskSpeed {
    micros: AtomicU64,
}

impl DiskSpeed {
    fn record(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let old = self.micros.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            old.saturating_mul(7).saturating_add(sample) / 8
        };
        self.micros.store(new, Ordering::Relaxed);
    }

    fn is_slow(&self) -> bool {
        self.micros.load(Ordering::Relaxed) > SLOW_DISK.as_micros() as u64
    }
}

/// A write transaction, as the closures given to [`Store::write`] and [`Store::batch`] see it:
/// everything written through it is committed together. Its reads see the transaction's own
/// writes.
pub struct Batch<'txn> {
    txn: &'txn WriteTransaction,
    /// How much this transaction changed the bytes stored (see `usage`).
    grew: i64,
    occupied: &'txn Occupied,
}

impl<'txn> Batch<'txn> {
    fn new(txn: &'txn WriteTransaction, occupied: &'txn Occupied) -> Self {
        Batch {
            txn,
            grew: 0,
            occupied,
        }
    }
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    fn fsync_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("tern.redb"), Durability::Fsync).unwrap();
        (dir, store)
    }

    /// A closure that lets a task of `runtime` run and says whether it did within 10 s.
    fn other_task_ran(runtime: &tokio::runtime::Runtime) -> impl FnOnce() -> bool + Send + 'static {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (ran_tx, ran_rx) = mpsc::channel::<()>();
        runtime.spawn(async move {
            if started_rx.await.is_ok() {
                let _ = ran_tx.send(());
            }
        });
        move || {
            let _ = started_tx.send(());
            ran_rx.recv_timeout(Duration::from_secs(10)).is_ok()
        }
    }

    /// Whether, while a write from a task of `runtime` commits, another task of it runs.
    fn write_lets_tasks_run(store: &Store, runtime: &tokio::runtime::Runtime) -> bool {
        let wait = other_task_ran(runtime);
        let writer = store.clone();
        let write = runtime.spawn(async move {
            writer
                .write(move |b| {
                    let ran = wait();
                    b.put_result("written", b"r")?;
                    Ok(ran)
                })
                .await
        });
        runtime.block_on(write).unwrap().unwrap()
    }

    #[test]
    fn disk_speed_is_a_moving_average_of_synced_commits() {
        let speed = DiskSpeed::default();
        assert!(!speed.is_slow(), "no commit yet");
        speed.record(Duration::from_millis(4));
        assert!(speed.is_slow(), "the first commit sets the average");
        for _ in 0..40 {
            speed.record(Duration::from_micros(200));
        }
        assert!(!speed.is_slow(), "fast commits bring it back");
        speed.record(Duration::from_millis(3));
        assert!(
            !speed.is_slow(),
            "one slow commit among fast ones is not a slow disk"
        );
    }

    #[test]
    fn synced_commits_are_timed_and_unsynced_ones_are_not() {
        let (_dir, store) = fsync_store();
        let before = store.shared.disk.micros.load(Ordering::Relaxed);
        let txn = store.shared.begin(false).unwrap();
        store.shared.commit(txn, false).unwrap();
        assert_eq!(store.shared.disk.micros.load(Ordering::Relaxed), before);
        // Opening committed once, synced; a commit takes at least a microsecond.
        assert!(before > 0, "open's synced commit was not timed");
    }

    #[test]
    fn on_a_slow_disk_a_commit_waits_off_the_worker_and_on_a_fast_one_where_it_is() {
        let (_dir, store) = fsync_store();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        // Fast: the commit runs where it is called.
        store.shared.disk.micros.store(100, Ordering::Relaxed);
        let shared = Arc::clone(&store.shared);
        let wait = runtime.block_on(async move {
            tokio::spawn(async move { shared.disk_wait(&Handle::current()) })
                .await
                .unwrap()
        });
        assert!(matches!(wait, DiskWait::Here));

        // Slow: a write and a batch let the worker's other tasks run while they commit (the
        // runtime has one worker: had they held it, the other task could not run).
        store.shared.disk.micros.store(50_000, Ordering::Relaxed);
        assert!(
            write_lets_tasks_run(&store, &runtime),
            "a write held the worker"
        );
        store.shared.disk.micros.store(50_000, Ordering::Relaxed);
        let wait = other_task_ran(&runtime);
        let writer = store.clone();
        let batch = runtime.spawn(async move {
            writer.batch(|b| {
                let ran = wait();
                b.put_result("batched", b"r")?;
                Ok(ran)
            })
        });
        assert!(
            runtime.block_on(batch).unwrap().unwrap(),
            "a batch held the worker"
        );
        assert!(store.result("written").unwrap().is_some());
        assert!(store.result("batched").unwrap().is_some());
    }

    #[test]
    fn a_write_on_a_current_thread_runtime_waits_for_the_disk_off_its_thread() {
        // The runtime has one thread for tasks: if a write waited on it, the other task could
        // not run until the write was done.
        let (_dir, store) = fsync_store();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(
            write_lets_tasks_run(&store, &runtime),
            "a write held the runtime's thread"
        );
        assert!(store.result("written").unwrap().is_some());
    }
}
