//! The node's crash-safe embedded store: everything a node must still know after a crash lives
//! in one redb database file, so that a restarted node resumes its agents and no hop is lost or
//! made twice.
//!
//! # Tables
//!
//! The table names and types below are the on-disk format (schema 2, recorded in `meta`). A file
//! of another schema is refused with [`StoreError::Schema`]; there is no migration (schema 1, which
//! kept the continuation inside the CBOR agent record, never held deployed data).
//!
//! | table                 | key                     | value                    | why |
//! |-----------------------|-------------------------|--------------------------|-----|
//! | `packages`            | `[u8; 32]` hash         | package bytes            | code is pulled once per node, by hash, and served to peers that lack it |
//! | `agents`              | agent id                | tag byte, CBOR [`AgentMeta`] (+ short continuation) | the agents resident here: what a restart resumes and status lists |
//! | `continuation_chunks` | (agent id, `u32` chunk) | continuation bytes       | continuations of 4 KiB or more, in chunks of 4 KiB to 1 MiB |
//! | `seen`                | (agent id, hop)         | `()`                     | hops this node accepted: makes arrivals exactly once (per agent, the last committed one and any later arriving) |
//! | `forwards`            | agent id                | destination peer id      | forwarding pointers left by departed agents |
//! | `departed`            | agent id                | `[u8; 32]` envelope hash | the hop an agent last left by: a destination still holding it as arriving after a crash asks whether that hop committed |
//! | `locations`           | agent id                | peer id                  | on the home node, where each agent it launched is now |
//! | `messages`            | (agent id, seq)         | message bytes            | per-agent FIFO queues; `seq` orders them |
//! | `results`             | agent id                | result bytes             | how agents ended, kept for whoever launched them |
//! | `meta`                | name                    | `u64`                    | `schema` version and `next_message_seq` |
//!
//! Packages, messages, results and continuations are opaque bytes to the store; only agent
//! records are decoded here. A record that does not decode is reported as
//! [`StoreError::Decode`] naming the table and key, and an agent whose continuation is missing
//! as [`StoreError::Inconsistent`], never a panic.
//!
//! ## Continuations
//!
//! An agent's continuation may be 100 MB or more, and most of what reads or writes its record
//! does not need it; so an `agents` value is one tag byte, saying where the continuation is,
//! then the CBOR [`AgentMeta`]:
//!
//! - tag 0: the continuation is shorter than 4 KiB (or empty) and is in the CBOR, as a
//!   `continuation` byte string after the metadata fields: one table, one value, as cheap as a
//!   record without a continuation;
//! - tag 1: the continuation is 4 KiB or longer and is in `continuation_chunks`, as raw bytes,
//!   under the agent's id and chunk numbers 0, 1, ... with no gap.
//!
//! [`Batch::put_agent`] and [`Batch::delete_agent`] write and remove both parts in the same
//! transaction, so they are stored and dropped together. So:
//!
//! - A large continuation is copied once into redb's pages when stored and once out of them
//!   when read (into a vector allocated once), never CBOR-encoded or decoded.
//! - Whatever needs only the metadata ([`Store::agent_meta`], [`Store::agent_metas`],
//!   [`Batch::agent_meta`]) never touches a large continuation, and [`Batch::put_agent_meta`]
//!   changes the metadata without rewriting the continuation.
//! - Chunks fill 1 MiB pages. Whole, a 100 MB value would take a 128 MiB page (redb gives a
//!   value a page of a power-of-two size), zeroed and written in full; chunks waste at most a
//!   few bytes a page, and their pages are reused one by one as agents come and go.
//! - Every chunk is at least 4 KiB and nothing else is in their table, so each chunk has a leaf
//!   page of its own, and a write never copies a neighbour's chunk. (In one table with small
//!   values, a leaf holding a 100 MB value and a small one costs 100 MB of copying per write
//!   of the small one: 120 ms here.)
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
//! disk, so writes are where contention is. There are two ways to write:
//!
//! - [`Store::write`] (async, the hot path): **group commit**. Concurrent writes share one
//!   transaction and one commit (one fsync). Each write is queued, with a oneshot for its result,
//!   on a `std::sync::Mutex<VecDeque>` (held only to push or pop, never across a transaction or an
//!   `.await`, so a std mutex is right). If no write is being led, the caller becomes the
//!   *leader*: on its own thread, with no hop to another task when uncontended, it takes up to
//!   [`MAX_GROUP`] queued writes, runs them in queue order in one transaction, commits once and
//!   sends every write its result. Everyone else is a *follower* and just awaits its oneshot.
//!   When writes contend (some joined the previous leader's queue), a new leader first yields
//!   one turn to the runtime, so that the tasks ready to run queue their writes into its group:
//!   with 200 agents hopping, that alone took a benchmark from ~5,800 to ~8,500 hops/s (groups
//!   averaged 1.3 writes, now about 9), while an uncontended write still commits at once. A
//!   leader inside a tokio runtime leads one group only (its own write is always the first of
//!   it): if more writes queued meanwhile, it hands leadership to a `spawn_blocking` thread, which
//!   drains the queue until it is empty, so that no caller of `write` is held up serving others
//!   under sustained load (without a runtime, the leader drains the queue itself). The leader flag lives under the same mutex as the queue: a write that is
//!   queued as the leader finds the queue empty either is taken by it or finds no leader and
//!   leads itself, so no write is left behind. See [`Store::write`] for what a failure does to the
//!   other writes of its group.
//! - [`Store::batch`] and the one-shot methods ([`Store::put_agent`], ...): synchronous, one
//!   transaction and one commit per call, on the calling thread, which
//!   [`redb::Database::begin_write`] blocks until the previous writer has committed (fsync
//!   included). For tests, start-up and rare paths; async code on a hot path uses `write`.
//!
//! The writers are the node's protocol handlers (arrivals, departures, packages, locations,
//! messages) and its scheduler (agent records after each slice, results). Operations that must be
//! atomic together go in one `write` or `batch` closure.
//!
//! # Examples
//!
//! ```
//! use platform::store::{Arrival, Durability, Store};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(&dir.path().join("tern.redb"), Durability::NoSync)?;
//! store.put_package(&[7; 32], b"package bytes")?;
//! // Queue a message and hand back the result of an agent in one commit.
//! store.batch(|b| {
//!     b.push_message("agent-1", b"hello")?;
//!     b.put_result("agent-1", b"done")
//! })?;
//! assert_eq!(store.take_messages("agent-1")?, vec![b"hello".to_vec()]);
//! assert_eq!(store.result("agent-1")?.as_deref(), Some(&b"done"[..]));
//! # Ok(()) }
//! ```

use std::any::Any;
use std::collections::VecDeque;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const PACKAGES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("packages");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const CHUNKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("continuation_chunks");
const SEEN: TableDefinition<(&str, u64), ()> = TableDefinition::new("seen");
const FORWARDS: TableDefinition<&str, &str> = TableDefinition::new("forwards");
const DEPARTED: TableDefinition<&str, [u8; 32]> = TableDefinition::new("departed");
const LOCATIONS: TableDefinition<&str, &str> = TableDefinition::new("locations");
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The on-disk format this code reads and writes.
const SCHEMA: u64 = 2;
const META_SCHEMA: &str = "schema";
const META_NEXT_SEQ: &str = "next_message_seq";

/// The first byte of an `agents` value when the continuation is inline, in the CBOR.
const INLINE: u8 = 0;
/// The first byte of an `agents` value when the continuation is in `continuation_chunks`.
const CHUNKED: u8 = 1;
/// Continuations this long or longer go to `continuation_chunks`, shorter ones inline. redb
/// gives a leaf holding one pair at least this long a page of its own, so no chunk shares a
/// leaf.
const LARGE: usize = 4096;
/// The page a full chunk fills (redb allocates pages of 4 KiB times a power of two).
const CHUNK_PAGE: usize = 1 << 20;
/// What a leaf page holding one chunk needs besides the chunk and its agent id: the page header,
/// the key and value ends, the key's length prefix and chunk number (21 bytes), with room to
/// spare.
const CHUNK_OVERHEAD: usize = 64;

/// The most writes [`Store::write`] puts in one transaction. Writes are closures, so their size
/// is unknown; this bounds how long one commit keeps results waiting and how much one failing
/// write can take down with it.
pub const MAX_GROUP: usize = 256;

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

/// An agent resident on this node, as a restart finds it: its metadata and its continuation.
/// The metadata's fields read through the record (`rec.id` is `rec.meta.id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    /// Everything but the continuation.
    pub meta: AgentMeta,
    /// The encoded continuation; empty when the agent has not started yet.
    pub continuation: Vec<u8>,
}

impl std::ops::Deref for AgentRecord {
    type Target = AgentMeta;

    fn deref(&self) -> &AgentMeta {
        &self.meta
    }
}

impl std::ops::DerefMut for AgentRecord {
    fn deref_mut(&mut self) -> &mut AgentMeta {
        &mut self.meta
    }
}

impl AgentRecord {
    /// The record made of `meta` and `continuation` (moved, not copied).
    pub fn from_parts(meta: AgentMeta, continuation: Vec<u8>) -> AgentRecord {
        AgentRecord { meta, continuation }
    }
}

/// An agent's record without its continuation: what status listings, duplicate checks and
/// state changes need, read without touching the continuation (which may be 100 MB).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMeta {
    /// The agent's id, unique in the mesh.
    pub id: String,
    /// Hash of the agent's package (its code), a key of the `packages` table.
    #[serde(with = "serde_bytes")]
    pub package: [u8; 32],
    /// Number of the hop envelope that brought the agent here (0 on its home node before its
    /// first hop): the custody sequence duplicates are detected by.
    pub hop: u64,
    /// Hops the agent has made, as `hops()` reports them (a `migrate` to the node it is on
    /// counts, but needs no envelope).
    #[serde(default)]
    pub hops: u64,
    /// The agent's home node (peer id text), which tracks where it is.
    pub home: String,
    /// Who to send the result to (peer id text), if anyone.
    pub launcher: Option<String>,
    /// What to do with the agent after a restart.
    pub state: AgentState,
    /// The envelope of the hop that brought the agent here; empty on its home node.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
}

impl AgentMeta {
    /// Whether the agent is stored as arriving by the hop with this envelope hash.
    pub fn arriving_by(&self, hash: &[u8; 32]) -> bool {
        matches!(&self.state, AgentState::Arriving { envelope, .. } if envelope == hash)
    }
}

/// The CBOR of an `agents` value, borrowed from an [`AgentRecord`] or an [`AgentMeta`] to be
/// encoded without copying; decodes as a [`StoredAgent`], or as an [`AgentMeta`] (same field
/// names, the continuation ignored).
#[derive(Serialize)]
struct MetaRef<'a> {
    id: &'a str,
    #[serde(with = "serde_bytes")]
    package: &'a [u8; 32],
    hop: u64,
    hops: u64,
    home: &'a str,
    launcher: Option<&'a str>,
    state: &'a AgentState,
    #[serde(with = "serde_bytes")]
    envelope: &'a [u8],
    /// The continuation when it is inline.
    #[serde(with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    continuation: Option<&'a [u8]>,
}

impl<'a> MetaRef<'a> {
    fn new(m: &'a AgentMeta, continuation: Option<&'a [u8]>) -> Self {
        MetaRef {
            id: &m.id,
            package: &m.package,
            hop: m.hop,
            hops: m.hops,
            home: &m.home,
            launcher: m.launcher.as_deref(),
            state: &m.state,
            envelope: &m.envelope,
            continuation,
        }
    }

    fn of_record(r: &'a AgentRecord, continuation: Option<&'a [u8]>) -> Self {
        MetaRef {
            id: &r.id,
            package: &r.package,
            hop: r.hop,
            hops: r.hops,
            home: &r.home,
            launcher: r.launcher.as_deref(),
            state: &r.state,
            envelope: &r.envelope,
            continuation,
        }
    }
}

/// The CBOR of an `agents` value, decoded whole.
#[derive(Deserialize)]
struct StoredAgent {
    id: String,
    #[serde(with = "serde_bytes")]
    package: [u8; 32],
    hop: u64,
    #[serde(default)]
    hops: u64,
    home: String,
    launcher: Option<String>,
    state: AgentState,
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
    #[serde(default, with = "serde_bytes")]
    continuation: Option<Vec<u8>>,
}

impl StoredAgent {
    fn into_parts(self) -> (AgentMeta, Option<Vec<u8>>) {
        let meta = AgentMeta {
            id: self.id,
            package: self.package,
            hop: self.hop,
            hops: self.hops,
            home: self.home,
            launcher: self.launcher,
            state: self.state,
            envelope: self.envelope,
        };
        (meta, self.continuation)
    }
}

/// What an agent was doing when its record was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    /// Runnable: resume it.
    Ready,
    /// Blocked in `receive`, until a message arrives or the deadline (ms since the Unix epoch).
    Waiting {
        /// When `receive` gives up, if ever.
        timeout_at_ms: Option<u64>,
    },
    /// A hop in progress, recorded while the hop is offered: after a crash, ask `to` whether it
    /// holds `hop` before resuming the agent here. Once this record is durable, the hop commits
    /// as soon as the destination holds it.
    Leaving {
        /// Destination peer id text.
        to: String,
        /// The hop number being made.
        hop: u64,
        /// How many of the agent's queued messages (the oldest) travel with this hop; the rest
        /// arrived later and are forwarded once the hop completes.
        #[serde(default)]
        carried: u64,
        /// BLAKE3 of the hop's envelope: the destination asks about the hop by it.
        #[serde(default, with = "serde_bytes")]
        envelope: [u8; 32],
        /// None: the stored continuation is the agent's at `migrate` (if the hop does not
        /// happen, it resumes there and `migrate` throws). Some: the record kept the agent's
        /// last checkpoint instead (a large continuation is not written again while it
        /// travels), and this is the state it was stored in: if the hop does not happen, the
        /// agent resumes from that checkpoint, as after any crash between checkpoints.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<Box<AgentState>>,
    },
    /// Suspended at `receive`, which returned this message (the portable encoding of a value):
    /// resume it with that. Written in the transaction that takes the message off the queue,
    /// so a crash after it neither loses nor repeats the message.
    Answered {
        /// The message.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Stored by a hop whose source may not have recorded its departure durably yet: not
    /// runnable until the source says the hop committed (its departure record is durable), and
    /// dropped if it says it did not.
    Arriving {
        /// Source peer id text: whom to ask after a crash.
        from: String,
        /// BLAKE3 of the hop's envelope.
        #[serde(with = "serde_bytes")]
        envelope: [u8; 32],
        /// How many of the agent's queued messages (the oldest) came with the hop (copies of the
        /// source's, dropped if the hop does not commit).
        carried: u64,
    },
}

/// What [`Store::accept_arrival`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a duplicate arrival must not be run"]
pub enum Arrival {
    /// The agent is stored: acknowledge the hop and run it.
    New,
    /// This hop (or a later one of the same agent) was already accepted here; nothing was
    /// written. Acknowledge without running it again.
    Duplicate,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open the store database")]
    Open(#[from] redb::DatabaseError),
    /// A transaction could not begin.
    #[error("cannot begin a store transaction")]
    Transaction(#[from] redb::TransactionError),
    /// A table could not be opened.
    #[error("cannot open a store table")]
    Table(#[from] redb::TableError),
    /// Reading or writing the file failed.
    #[error("store i/o failed")]
    Storage(#[from] redb::StorageError),
    /// The durability of a transaction could not be set.
    #[error("cannot set the store durability")]
    Durability(#[from] redb::SetDurabilityError),
    /// A commit failed; nothing of its transaction was stored.
    #[error("cannot commit to the store")]
    Commit(#[from] redb::CommitError),
    /// The file was written by another version of tern.
    #[error("store schema {found} is not supported (expected {SCHEMA})")]
    Schema {
        /// The schema recorded in the file.
        found: u64,
    },
    /// A stored value does not decode.
    #[error("cannot decode {table} entry {key:?}")]
    Decode {
        /// The table holding the value.
        table: &'static str,
        /// Its key, as text.
        key: String,
        /// What the decoder said.
        #[source]
        source: ciborium::de::Error<std::io::Error>,
    },
    /// [`Store::write`] only: this write shared its transaction with others, and the
    /// transaction was abandoned for a reason outside this write (named in the message): another
    /// write before it in the group failed or panicked, or the transaction could not begin or
    /// commit. Nothing this write did was stored, so running it again is safe.
    #[error("store write abandoned: {0}")]
    BatchAborted(String),
    /// [`Store::write`] only: the write's closure panicked. Nothing of its transaction was
    /// stored; the panic is not resumed.
    #[error("store write panicked: {0}")]
    Panicked(String),
    /// [`Store::write`] only: the store stopped writing before it could report this write's
    /// outcome (a bug in the store panicked mid-commit): whether it was stored is unknown.
    #[error("store write interrupted before its outcome was known")]
    Interrupted,
    /// Entries that must go together do not: an agent in `agents` without its continuation, or
    /// a continuation with a chunk missing. Only a bug or a change made to the file outside
    /// tern leaves the store so.
    #[error("inconsistent {table} entry {key:?}: {what}")]
    Inconsistent {
        /// The table that lacks an entry.
        table: &'static str,
        /// The key, as text.
        key: String,
        /// What is wrong.
        what: &'static str,
    },
    /// A value could not be encoded.
    #[error("cannot encode {table} entry {key:?}")]
    Encode {
        /// The table the value was meant for.
        table: &'static str,
        /// Its key, as text.
        key: String,
        /// What the encoder said.
        #[source]
        source: ciborium::ser::Error<std::io::Error>,
    },
}

/// The node's durable state; see the [module docs](self) for the tables and who writes.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

/// What every clone of a [`Store`] shares.
struct Shared {
    db: Database,
    durability: Durability,
    /// The group-commit queue of [`Store::write`]. A std mutex: it is held only to push or pop
    /// writes and flip the leader flag, never across a transaction or an `.await`.
    writes: Mutex<Writes>,
}

/// Writes waiting for a transaction, and whether someone is leading them.
#[derive(Default)]
struct Writes {
    queue: VecDeque<Box<dyn Job>>,
    /// A leader is running (or about to run) groups. Invariant: when false, `queue` is empty;
    /// whoever queues a write while it is false becomes the leader in the same critical section.
    leading: bool,
    /// A write was queued while a leader ran, since the last leadership was taken.
    joined: bool,
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
/// the metadata of 10,000 agents takes about 10 MiB.
const STORE_CACHE: usize = 64 << 20;

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
        let store = Store {
            shared: Arc::new(Shared {
                db,
                durability,
                writes: Mutex::default(),
            }),
        };
        // Create every table up front so that read transactions always find them.
        store.batch(|b| {
            b.txn.open_table(PACKAGES)?;
            b.txn.open_table(AGENTS)?;
            b.txn.open_table(CHUNKS)?;
            b.txn.open_table(SEEN)?;
            b.txn.open_table(FORWARDS)?;
            b.txn.open_table(DEPARTED)?;
            b.txn.open_table(LOCATIONS)?;
            b.txn.open_table(MESSAGES)?;
            b.txn.open_table(RESULTS)?;
            let mut meta = b.txn.open_table(META)?;
            let found = meta.get(META_SCHEMA)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA)?;
                }
                Some(SCHEMA) => {}
                Some(found) => return Err(StoreError::Schema { found }),
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// The durability this store commits with.
    pub fn durability(&self) -> Durability {
        self.shared.durability
    }

    /// Runs `f` in one write transaction of its own, on the calling thread: everything it writes
    /// is committed together (one commit, one fsync), or, if it returns an error, nothing is.
    /// Blocks until any other write transaction has committed; async code on a hot path should
    /// use [`Store::write`] instead.
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
        let txn = self.shared.begin(true)?;
        let result = f(&mut Batch { txn: &txn });
        match result {
            Ok(value) => {
                txn.commit()?;
                Ok(value)
            }
            Err(e) => {
                // The closure's error is the one worth reporting; a failed abort changes nothing
                // on disk either way.
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    /// Runs `op` in a write transaction shared with the other writes queued at the same time
    /// (group commit; see the [module docs](self#concurrency)): one commit, one fsync for the
    /// whole group. Writes run one after another in the order they were queued, and each sees
    /// what the writes before it in the group wrote (an arrival then a departure of the same
    /// agent compose). `write` returns once the group has committed (or failed).
    ///
    /// Uncontended, the write runs and commits on the caller's thread, like [`Store::batch`];
    /// either way the commit blocks the thread that leads it, a tokio worker included.
    ///
    /// A write still runs if its future is dropped once it was first polled (it is queued
    /// then): its outcome is discarded, and the other writes are unaffected.
    ///
    /// `op` must not write through the store itself ([`Store::batch`], [`Store::put_agent`],
    /// ..., or wait for another `write`): it runs inside the group's transaction, and redb
    /// allows one at a time, so that would deadlock. Write through the [`Batch`] instead.
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
    /// (those are values, like [`Arrival::Duplicate`]). [`StoreError::Interrupted`] reports a
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
            // Runs at least the group holding this write before returning, so the await below
            // never waits on a leader that is this very task. When writes contend (some joined
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

    fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.shared.db.begin_read()?)
    }

    /// Stores a package under its hash (overwriting is harmless: same hash, same bytes).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_package(&self, hash: &[u8; 32], bytes: &[u8]) -> Result<(), StoreError> {
        self.batch(|b| b.put_package(hash, bytes))
    }

    /// The package with this hash, if this node has it.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn package(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(PACKAGES)?;
            Ok(t.get(hash)?.map(|v| v.value().to_vec()))
        })
    }

    /// Whether this node has the package with this hash.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn has_package(&self, hash: &[u8; 32]) -> Result<bool, StoreError> {
        self.read(|txn| Ok(txn.open_table(PACKAGES)?.get(hash)?.is_some()))
    }

    /// Stores (or replaces) an agent record: its metadata and its continuation, in one commit.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.batch(|b| b.put_agent(rec))
    }

    /// Replaces the metadata of a stored agent, keeping its continuation as stored (a state
    /// change without rewriting a continuation that did not change); see
    /// [`Batch::put_agent_meta`]. Returns false, having written nothing, if agent `meta.id` is
    /// not stored here.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_agent_meta(&self, meta: &AgentMeta) -> Result<bool, StoreError> {
        self.batch(|b| b.put_agent_meta(meta))
    }

    /// The agent with this id, if it is resident here. Its continuation is copied once, from
    /// the store's pages into the record.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, [`StoreError::Inconsistent`] if its
    /// continuation is missing, or when the read fails.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.read(|txn| {
            let agents = txn.open_table(AGENTS)?;
            let Some(v) = agents.get(id)? else {
                return Ok(None);
            };
            match decode_agent(id, v.value())? {
                (meta, Some(inline)) => Ok(Some(AgentRecord::from_parts(meta, inline))),
                (meta, None) => {
                    let continuation = read_chunks(&txn.open_table(CHUNKS)?, id)?;
                    Ok(Some(AgentRecord::from_parts(meta, continuation)))
                }
            }
        })
    }

    /// The metadata of the agent with this id, if it is resident here, without reading its
    /// continuation: for status, duplicate checks and everything else that does not run it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, or when the read fails.
    pub fn agent_meta(&self, id: &str) -> Result<Option<AgentMeta>, StoreError> {
        self.read(|txn| get_meta(&txn.open_table(AGENTS)?, id))
    }

    /// Every agent resident here, ordered by id, continuations included: what a restart
    /// resumes. [`Store::agent_metas`] lists them without their continuations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] naming the first record that is corrupt,
    /// [`StoreError::Inconsistent`] naming the first agent whose continuation is missing, or
    /// when the read fails.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(|txn| {
            let chunks = txn.open_table(CHUNKS)?;
            txn.open_table(AGENTS)?
                .iter()?
                .map(|entry| {
                    let (k, v) = entry?;
                    let (meta, inline) = decode_agent(k.value(), v.value())?;
                    let continuation = match inline {
                        Some(inline) => inline,
                        None => read_chunks(&chunks, k.value())?,
                    };
                    Ok(AgentRecord::from_parts(meta, continuation))
                })
                .collect()
        })
    }

    /// The metadata of every agent resident here, ordered by id, without their continuations:
    /// what status shows, and what a restart needs to decide what to resume.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] naming the first record that is corrupt, or when the read fails.
    pub fn agent_metas(&self) -> Result<Vec<AgentMeta>, StoreError> {
        self.read(|txn| {
            txn.open_table(AGENTS)?
                .iter()?
                .map(|entry| {
                    let (k, v) = entry?;
                    decode_meta(k.value(), v.value())
                })
                .collect()
        })
    }

    /// Removes an agent record (absent is fine).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn delete_agent(&self, id: &str) -> Result<(), StoreError> {
        self.batch(|b| b.delete_agent(id))
    }

    /// The destination side of a hop, in one transaction; see [`Batch::accept_arrival`].
    ///
    /// # Errors
    ///
    /// When the write fails; then the hop was not accepted.
    pub fn accept_arrival(&self, rec: &AgentRecord) -> Result<Arrival, StoreError> {
        self.batch(|b| b.accept_arrival(rec))
    }

    /// Whether this node accepted hop `hop` of agent `id`, or a later one (answers a source
    /// recovering from a crash in the middle of that hop).
    ///
    /// A later one answers too because only the last committed hop of an agent is remembered
    /// (with any later one still arriving): the table stays one entry per agent instead of
    /// growing with every hop. That is the answer the source needs: it asks about hop `hop` only
    /// while its durable departure record says it offered that hop here, and then the agent can
    /// have gone past `hop` only if this node took it.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn has_seen(&self, id: &str, hop: u64) -> Result<bool, StoreError> {
        self.read(|txn| seen_from(&txn.open_table(SEEN)?, id, hop))
    }

    /// The hops of agent `id` this node remembers accepting, oldest first (diagnostics: see
    /// [`Store::has_seen`] for which are kept).
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn remembered_hops(&self, id: &str) -> Result<Vec<u64>, StoreError> {
        self.read(|txn| {
            let seen = txn.open_table(SEEN)?;
            let mut hops = Vec::new();
            for entry in seen.range((id, 0)..=(id, u64::MAX))? {
                hops.push(entry?.0.value().1);
            }
            Ok(hops)
        })
    }

    /// What an offer of hop `hop` of agent `id` is checked against, from one snapshot: the
    /// agent's metadata if it is stored here, and [`Store::has_seen`].
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the read fails.
    pub fn arrival_view(
        &self,
        id: &str,
        hop: u64,
    ) -> Result<(Option<AgentMeta>, bool), StoreError> {
        self.read(|txn| {
            let meta = get_meta(&txn.open_table(AGENTS)?, id)?;
            let seen = seen_from(&txn.open_table(SEEN)?, id, hop)?;
            Ok((meta, seen))
        })
    }

    /// The source side of a hop after the destination acknowledged it, in one transaction; see
    /// [`Batch::complete_departure`].
    ///
    /// # Errors
    ///
    /// When the write fails; then the agent is still here.
    pub fn complete_departure(&self, id: &str, to: &str) -> Result<(), StoreError> {
        self.batch(|b| b.complete_departure(id, to))
    }

    /// BLAKE3 of the envelope of the hop agent `id` last left this node by, if it ever did.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn departed(&self, id: &str) -> Result<Option<[u8; 32]>, StoreError> {
        self.read(|txn| Ok(txn.open_table(DEPARTED)?.get(id)?.map(|v| v.value())))
    }

    /// Where agent `id` went from here, if it left.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn forward(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(FORWARDS)?
                .get(id)?
                .map(|v| v.value().to_owned()))
        })
    }

    /// Every forwarding pointer, as (agent id, destination), ordered by id.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn forwards(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(FORWARDS)?;
            t.iter()?
                .map(|entry| {
                    let (k, v) = entry?;
                    Ok((k.value().to_owned(), v.value().to_owned()))
                })
                .collect()
        })
    }

    /// On the home node: records that agent `id` is now on `node`.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn set_location(&self, id: &str, node: &str) -> Result<(), StoreError> {
        self.batch(|b| b.set_location(id, node))
    }

    /// On the home node: where agent `id` was last reported.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn location(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(LOCATIONS)?
                .get(id)?
                .map(|v| v.value().to_owned()))
        })
    }

    /// Appends a message to agent `id`'s queue and returns its sequence number.
    ///
    /// # Errors
    ///
    /// When the write fails; then the message is not queued.
    pub fn push_message(&self, id: &str, message: &[u8]) -> Result<u64, StoreError> {
        self.batch(|b| b.push_message(id, message))
    }

    /// Removes and returns the oldest message queued for agent `id`.
    ///
    /// # Errors
    ///
    /// When the write fails; then the message stays queued.
    pub fn pop_message(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.batch(|b| b.pop_message(id))
    }

    /// Removes and returns every message queued for agent `id`, oldest first.
    ///
    /// # Errors
    ///
    /// When the write fails; then the messages stay queued.
    pub fn take_messages(&self, id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.batch(|b| b.take_messages(id))
    }

    /// The messages queued for agent `id`, oldest first, left in place (a hop carries them).
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn messages(&self, id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(MESSAGES)?;
            let mut out = Vec::new();
            for entry in t.range(queue(id))? {
                out.push(entry?.1.value().to_vec());
            }
            Ok(out)
        })
    }

    /// How many messages are queued for agent `id`.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn message_count(&self, id: &str) -> Result<usize, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(MESSAGES)?;
            let mut n = 0;
            for entry in t.range(queue(id))? {
                entry?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// Keeps how agent `id` ended, for whoever launched it (replaces an earlier result).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_result(&self, id: &str, result: &[u8]) -> Result<(), StoreError> {
        self.batch(|b| b.put_result(id, result))
    }

    /// How agent `id` ended, if it did and the result was kept here.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn result(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(RESULTS)?
                .get(id)?
                .map(|v| v.value().to_vec()))
        })
    }
}

impl Shared {
    /// A write transaction with the store's durability, or none (`synced` false).
    fn begin(&self, synced: bool) -> Result<WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        let durability = if synced {
            self.durability
        } else {
            Durability::NoSync
        };
        txn.set_durability(durability.into())?;
        Ok(txn)
    }

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
        let txn = match self.begin(group.iter().any(|job| job.synced())) {
            Ok(txn) => txn,
            Err(e) => {
                let cause = format!("its transaction could not begin: {}", chain(&e));
                for job in group.drain(..) {
                    job.abandon(StoreError::BatchAborted(cause.clone()));
                }
                return;
            }
        };
        let mut batch = Batch { txn: &txn };
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
        match txn.commit() {
            Ok(()) => {
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
    /// Runs groups until the queue is empty. A leader on a caller's thread (`hand_off`) runs one
    /// group (which holds its caller's write) and then, if more writes are queued and a tokio
    /// runtime is at hand, lets a blocking thread go on, so that its caller is not kept serving
    /// others under sustained load.
    fn lead(mut self, hand_off: bool) {
        while let Some(mut group) = self.take_group() {
            self.shared.commit_group(&mut group);
            self.requeue(group);
            if hand_off {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    if !self.release_if_idle() {
                        runtime.spawn_blocking(move || self.lead(false));
                    }
                    return;
                }
            }
        }
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

/// A leader that leads (on the current thread) when it is dropped.
struct LeadOnDrop(Option<Leader>);

impl Drop for LeadOnDrop {
    fn drop(&mut self) {
        if let Some(leader) = self.0.take() {
            leader.lead(true);
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

/// Writes made inside [`Store::batch`] or [`Store::write`]: the same operations as [`Store`],
/// committed together.
pub struct Batch<'txn> {
    txn: &'txn WriteTransaction,
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch").finish_non_exhaustive()
    }
}

impl Batch<'_> {
    /// See [`Store::put_package`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_package(&mut self, hash: &[u8; 32], bytes: &[u8]) -> Result<(), StoreError> {
        self.txn.open_table(PACKAGES)?.insert(hash, bytes)?;
        Ok(())
    }

    /// The agent with this id, as this transaction sees it (for read-modify-write). Reads the
    /// continuation: use [`Batch::agent_meta`] when the metadata is enough.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, [`StoreError::Inconsistent`] if its
    /// continuation is missing, or when the read fails.
    pub fn agent(&mut self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let agents = self.txn.open_table(AGENTS)?;
        let Some(v) = agents.get(id)? else {
            return Ok(None);
        };
        match decode_agent(id, v.value())? {
            (meta, Some(inline)) => Ok(Some(AgentRecord::from_parts(meta, inline))),
            (meta, None) => {
                let continuation = read_chunks(&self.txn.open_table(CHUNKS)?, id)?;
                Ok(Some(AgentRecord::from_parts(meta, continuation)))
            }
        }
    }

    /// The metadata of the agent with this id, as this transaction sees it, without reading its
    /// continuation.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, or when the read fails.
    pub fn agent_meta(&mut self, id: &str) -> Result<Option<AgentMeta>, StoreError> {
        get_meta(&self.txn.open_table(AGENTS)?, id)
    }

    /// See [`Store::put_agent`]. The continuation replaces the stored one whole (the old one is
    /// dropped, never read or copied).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_agent(&mut self, rec: &AgentRecord) -> Result<(), StoreError> {
        let id = rec.id.as_str();
        let large = rec.continuation.len() >= LARGE;
        let value = if large {
            encode_agent(CHUNKED, &MetaRef::of_record(rec, None))?
        } else {
            encode_agent(INLINE, &MetaRef::of_record(rec, Some(&rec.continuation)))?
        };
        let old_inline = self
            .txn
            .open_table(AGENTS)?
            .insert(id, value.as_slice())?
            .map(|old| old.value().first() == Some(&INLINE));
        // The old chunks go first, so that redb never copies them (a replacement in place
        // copies the old value, or its whole page), and none is left behind by a shorter
        // continuation.
        if large || old_inline == Some(false) {
            let mut chunks = self.txn.open_table(CHUNKS)?;
            remove_chunks(&mut chunks, id)?;
            if large {
                let lens = chunk_lens(rec.continuation.len(), chunk_capacity(id));
                let mut rest = rec.continuation.as_slice();
                for (n, len) in (0u32..).zip(lens) {
                    let (chunk, tail) = rest.split_at(len);
                    chunks.insert((id, n), chunk)?;
                    rest = tail;
                }
            }
        }
        Ok(())
    }

    /// Replaces the metadata of agent `meta.id` and keeps its continuation as stored: a state
    /// change (such as back to [`AgentState::Ready`] after an interrupted hop) without rewriting
    /// a continuation that did not change. Returns false, having written nothing, if the agent
    /// is not stored (this never stores an agent without a continuation).
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn put_agent_meta(&mut self, meta: &AgentMeta) -> Result<bool, StoreError> {
        let id = meta.id.as_str();
        let mut agents = self.txn.open_table(AGENTS)?;
        let value = {
            let Some(old) = agents.get(id)? else {
                return Ok(false);
            };
            match decode_agent(id, old.value())?.1 {
                Some(inline) => encode_agent(INLINE, &MetaRef::new(meta, Some(&inline)))?,
                None => encode_agent(CHUNKED, &MetaRef::new(meta, None))?,
            }
        };
        agents.insert(id, value.as_slice())?;
        Ok(true)
    }

    /// See [`Store::delete_agent`]: removes its record and its continuation.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn delete_agent(&mut self, id: &str) -> Result<(), StoreError> {
        let old_inline = self
            .txn
            .open_table(AGENTS)?
            .remove(id)?
            .map(|old| old.value().first() == Some(&INLINE));
        if old_inline == Some(false) {
            remove_chunks(&mut self.txn.open_table(CHUNKS)?, id)?;
        }
        Ok(())
    }

    /// The destination side of a hop: if this node already accepted hop `rec.hop` of agent
    /// `rec.id`, or a later one (the offer is stale: the agent has moved past it), returns
    /// [`Arrival::Duplicate`] and writes nothing. Otherwise stores the agent, remembers
    /// (`rec.id`, `rec.hop`) as seen (forgetting the agent's older hops if it arrives runnable:
    /// see [`Store::has_seen`]), drops any forwarding pointer for the agent (it lives here
    /// again) and returns [`Arrival::New`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn accept_arrival(&mut self, rec: &AgentRecord) -> Result<Arrival, StoreError> {
        let id = rec.id.as_str();
        let mut seen = self.txn.open_table(SEEN)?;
        if seen_from(&seen, id, rec.hop)? {
            return Ok(Arrival::Duplicate);
        }
        seen.insert((id, rec.hop), ())?;
        if rec.state == AgentState::Ready {
            forget_hops_before(&mut seen, id, rec.hop)?;
        }
        drop(seen);
        self.put_agent(rec)?;
        self.txn.open_table(FORWARDS)?.remove(id)?;
        Ok(Arrival::New)
    }

    /// The source side of a hop once the destination acknowledged it: deletes the agent and
    /// records the forwarding pointer `id -> to` (and, if its record was
    /// [`AgentState::Leaving`], the hop's envelope hash as [`Store::departed`]). Messages queued
    /// for the agent stay queued; take them in the same batch to forward them.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn complete_departure(&mut self, id: &str, to: &str) -> Result<(), StoreError> {
        let meta = self.agent_meta(id)?;
        self.depart(id, meta.as_ref(), to)
    }

    /// [`Batch::complete_departure`] of hop `hop` only: if agent `id` is stored as
    /// [`AgentState::Leaving`] by that hop, completes its departure and returns its metadata as
    /// it was; otherwise writes nothing and returns None.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn complete_departure_by(
        &mut self,
        id: &str,
        hop: u64,
        to: &str,
    ) -> Result<Option<AgentMeta>, StoreError> {
        let meta = self.agent_meta(id)?;
        match &meta {
            Some(AgentMeta {
                state: AgentState::Leaving { hop: leaving, .. },
                ..
            }) if *leaving == hop => {
                self.depart(id, meta.as_ref(), to)?;
                Ok(meta)
            }
            _ => Ok(None),
        }
    }

    /// Deletes agent `id`, whose metadata this transaction read as `meta`, leaving a forwarding
    /// pointer to `to` (and the envelope hash of its departure, if it was leaving).
    fn depart(&mut self, id: &str, meta: Option<&AgentMeta>, to: &str) -> Result<(), StoreError> {
        if let Some(AgentMeta {
            state: AgentState::Leaving { envelope, .. },
            ..
        }) = meta
        {
            self.txn.open_table(DEPARTED)?.insert(id, envelope)?;
        }
        self.delete_agent(id)?;
        self.txn.open_table(FORWARDS)?.insert(id, to)?;
        Ok(())
    }

    /// The hop with envelope hash `envelope` committed: agent `id`, stored by it as
    /// [`AgentState::Arriving`], becomes [`AgentState::Ready`], and any forwarding pointer of
    /// the agent goes (it lives here again). Returns its metadata as now stored, or None,
    /// having written nothing, if the agent is not stored as arriving by that hop.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn commit_arrival(
        &mut self,
        id: &str,
        envelope: &[u8; 32],
    ) -> Result<Option<AgentMeta>, StoreError> {
        match self.agent_meta(id)? {
            Some(meta) if meta.arriving_by(envelope) => {
                let ready = AgentMeta {
                    state: AgentState::Ready,
                    ..meta
                };
                self.put_agent_meta(&ready)?;
                self.txn.open_table(FORWARDS)?.remove(id)?;
                forget_hops_before(&mut self.txn.open_table(SEEN)?, id, ready.hop)?;
                Ok(Some(ready))
            }
            _ => Ok(None),
        }
    }

    /// The hop with envelope hash `envelope` did not commit: agent `id`, stored by it as
    /// [`AgentState::Arriving`], is dropped with the messages that came with it, and its hop is
    /// forgotten (so that a later offer of that hop number is not taken for a duplicate).
    /// Returns the messages queued for the agent since it arrived (to forward), or None, having
    /// written nothing, if the agent is not stored as arriving by that hop.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn abort_arrival(
        &mut self,
        id: &str,
        envelope: &[u8; 32],
    ) -> Result<Option<Vec<Vec<u8>>>, StoreError> {
        let meta = match self.agent_meta(id)? {
            Some(meta) if meta.arriving_by(envelope) => meta,
            _ => return Ok(None),
        };
        let AgentState::Arriving { carried, .. } = meta.state else {
            return Ok(None);
        };
        self.delete_agent(id)?;
        self.txn.open_table(SEEN)?.remove((id, meta.hop))?;
        let queued = self.take_messages(id)?;
        Ok(Some(
            queued
                .into_iter()
                .skip(usize::try_from(carried).unwrap_or(usize::MAX))
                .collect(),
        ))
    }

    /// See [`Store::set_location`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn set_location(&mut self, id: &str, node: &str) -> Result<(), StoreError> {
        self.txn.open_table(LOCATIONS)?.insert(id, node)?;
        Ok(())
    }

    /// See [`Store::push_message`]. Sequence numbers come from one counter for the whole store,
    /// so they never repeat, even after a queue was emptied.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn push_message(&mut self, id: &str, message: &[u8]) -> Result<u64, StoreError> {
        let mut meta = self.txn.open_table(META)?;
        let seq = meta.get(META_NEXT_SEQ)?.map_or(0, |v| v.value());
        meta.insert(META_NEXT_SEQ, seq + 1)?;
        self.txn.open_table(MESSAGES)?.insert((id, seq), message)?;
        Ok(seq)
    }

    /// See [`Store::pop_message`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn pop_message(&mut self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut t = self.txn.open_table(MESSAGES)?;
        let oldest = match t.range(queue(id))?.next() {
            Some(entry) => {
                let (k, v) = entry?;
                Some((k.value().1, v.value().to_vec()))
            }
            None => None,
        };
        let Some((seq, message)) = oldest else {
            return Ok(None);
        };
        t.remove((id, seq))?;
        Ok(Some(message))
    }

    /// See [`Store::take_messages`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn take_messages(&mut self, id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut t = self.txn.open_table(MESSAGES)?;
        // Every entry must be read from the iterator to be removed, which `collect` does.
        let taken = t
            .extract_from_if(queue(id), |_, _| true)?
            .map(|entry| entry.map(|(_, v)| v.value().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(taken)
    }

    /// See [`Store::put_result`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_result(&mut self, id: &str, result: &[u8]) -> Result<(), StoreError> {
        self.txn.open_table(RESULTS)?.insert(id, result)?;
        Ok(())
    }
}

/// The keys of agent `id`'s message queue, oldest first.
fn queue(id: &str) -> std::ops::RangeInclusive<(&str, u64)> {
    (id, 0)..=(id, u64::MAX)
}

/// An `agents` value: `tag`, then the CBOR of `meta`.
fn encode_agent(tag: u8, meta: &MetaRef<'_>) -> Result<Vec<u8>, StoreError> {
    // Room for the fields and their names, so that the vector is allocated once.
    let room = 256
        + meta.id.len()
        + meta.home.len()
        + meta.launcher.map_or(0, str::len)
        + meta.envelope.len()
        + meta.continuation.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(room);
    out.push(tag);
    ciborium::into_writer(meta, &mut out).map_err(|source| StoreError::Encode {
        table: "agents",
        key: meta.id.to_owned(),
        source,
    })?;
    Ok(out)
}

/// The tag and the CBOR of an `agents` value.
fn split_tag<'v>(key: &str, bytes: &'v [u8]) -> Result<(u8, &'v [u8]), StoreError> {
    match bytes.split_first() {
        Some((&tag, cbor)) if tag == INLINE || tag == CHUNKED => Ok((tag, cbor)),
        _ => Err(StoreError::Decode {
            table: "agents",
            key: key.to_owned(),
            source: ciborium::de::Error::Semantic(None, "unknown record tag".to_owned()),
        }),
    }
}

fn decode_error(key: &str) -> impl FnOnce(ciborium::de::Error<std::io::Error>) -> StoreError + '_ {
    move |source| StoreError::Decode {
        table: "agents",
        key: key.to_owned(),
        source,
    }
}

/// The metadata of an `agents` value (an inline continuation is skipped, not copied).
fn decode_meta(key: &str, bytes: &[u8]) -> Result<AgentMeta, StoreError> {
    let (_, cbor) = split_tag(key, bytes)?;
    ciborium::from_reader(cbor).map_err(decode_error(key))
}

/// The metadata of an `agents` value, and its continuation if it is inline (`None`: in chunks).
fn decode_agent(key: &str, bytes: &[u8]) -> Result<(AgentMeta, Option<Vec<u8>>), StoreError> {
    let (tag, cbor) = split_tag(key, bytes)?;
    let stored: StoredAgent = ciborium::from_reader(cbor).map_err(decode_error(key))?;
    let (meta, continuation) = stored.into_parts();
    match (tag, continuation) {
        (INLINE, None) => Err(StoreError::Inconsistent {
            table: "agents",
            key: key.to_owned(),
            what: "the record has no continuation",
        }),
        (INLINE, inline) => Ok((meta, inline)),
        // A continuation in the CBOR of a chunked record is not the agent's.
        (_, _) => Ok((meta, None)),
    }
}

/// Whether `seen` holds hop `hop` of agent `id` or a later one.
fn seen_from(
    seen: &impl ReadableTable<(&'static str, u64), ()>,
    id: &str,
    hop: u64,
) -> Result<bool, StoreError> {
    Ok(seen
        .range((id, hop)..=(id, u64::MAX))?
        .next()
        .transpose()?
        .is_some())
}

/// Hop `hop` of agent `id` committed here: the hops it accepted before need no remembering
/// (see [`Store::has_seen`]).
fn forget_hops_before(
    seen: &mut redb::Table<'_, (&'static str, u64), ()>,
    id: &str,
    hop: u64,
) -> Result<(), StoreError> {
    seen.retain_in((id, 0)..(id, hop), |_, ()| false)?;
    Ok(())
}

fn get_meta(
    agents: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<AgentMeta>, StoreError> {
    agents
        .get(id)?
        .map(|v| decode_meta(id, v.value()))
        .transpose()
}

/// The chunk keys of agent `id`'s continuation, in order.
fn chunk_keys(id: &str) -> std::ops::RangeInclusive<(&str, u32)> {
    (id, 0)..=(id, u32::MAX)
}

/// Agent `id`'s chunked continuation, copied once out of the store's pages: each chunk
/// straight into its place in a vector allocated once.
fn read_chunks(
    chunks: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    id: &str,
) -> Result<Vec<u8>, StoreError> {
    // The guards borrow the pages (no copy yet); their total length sizes the vector.
    let mut guards = Vec::new();
    for (n, entry) in (0u32..).zip(chunks.range(chunk_keys(id))?) {
        let (k, v) = entry?;
        if k.value().1 != n {
            return Err(StoreError::Inconsistent {
                table: "continuation_chunks",
                key: id.to_owned(),
                what: "a chunk of the continuation is missing",
            });
        }
        guards.push(v);
    }
    if guards.is_empty() {
        return Err(StoreError::Inconsistent {
            table: "continuation_chunks",
            key: id.to_owned(),
            what: "the agent's continuation is missing",
        });
    }
    let mut out = Vec::with_capacity(guards.iter().map(|g| g.value().len()).sum());
    for g in &guards {
        out.extend_from_slice(g.value());
    }
    Ok(out)
}

/// Removes every chunk of agent `id`'s continuation (none is fine).
fn remove_chunks(
    chunks: &mut redb::Table<'_, (&'static str, u32), &'static [u8]>,
    id: &str,
) -> Result<(), StoreError> {
    chunks.retain_in(chunk_keys(id), |_, _| false)?;
    Ok(())
}

/// The most bytes of agent `id`'s continuation one chunk holds: what fills a 1 MiB page.
fn chunk_capacity(id: &str) -> usize {
    // An id too long to leave half the page (never in practice) only costs space.
    CHUNK_PAGE
        .saturating_sub(CHUNK_OVERHEAD + id.len())
        .max(CHUNK_PAGE / 2)
}

/// The chunk lengths of a continuation of `len` bytes (at least [`LARGE`]) cut in chunks of at
/// most `capacity` bytes (at least twice [`LARGE`]): full chunks, then the rest, except that a
/// rest shorter than [`LARGE`] is shared with the last full chunk, so that every chunk is at
/// least [`LARGE`] long (and has a leaf page of its own).
fn chunk_lens(len: usize, capacity: usize) -> Vec<usize> {
    debug_assert!(len >= LARGE && capacity >= 2 * LARGE);
    let mut lens = vec![capacity; len / capacity];
    match len % capacity {
        0 => {}
        rest if rest >= LARGE || lens.is_empty() => lens.push(rest),
        rest => {
            let pair = capacity + rest;
            if let Some(last) = lens.last_mut() {
                *last = pair - pair / 2;
            }
            lens.push(pair / 2);
        }
    }
    lens
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_fill_pages_and_none_is_short() {
        let cap = chunk_capacity("agent");
        assert!(cap + CHUNK_OVERHEAD + "agent".len() <= CHUNK_PAGE);
        for len in [
            LARGE,
            LARGE + 1,
            cap - 1,
            cap,
            cap + 1,
            cap + LARGE - 1,
            cap + LARGE,
            2 * cap,
            2 * cap + 1,
            100 * 1024 * 1024,
            100 * 1024 * 1024 + 17,
        ] {
            let lens = chunk_lens(len, cap);
            assert_eq!(lens.iter().sum::<usize>(), len, "{len}: {lens:?}");
            assert!(
                lens.iter().all(|&l| (LARGE..=cap).contains(&l)),
                "{len}: {lens:?}"
            );
            assert_eq!(lens.len(), len.div_ceil(cap), "{len}: {lens:?}");
        }
        // A very long id still leaves chunks no shorter than half a page.
        assert_eq!(chunk_capacity(&"x".repeat(CHUNK_PAGE)), CHUNK_PAGE / 2);
    }
}
