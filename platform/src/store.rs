//! The node's crash-safe embedded store: everything a node must still know after a crash lives
//! in one redb database file, so that a restarted node resumes its agents and no hop is lost or
//! made twice.
//!
//! # Tables
//!
//! The table names and types below are the on-disk format (schema 1, recorded in `meta`).
//!
//! | table       | key                 | value                    | why |
//! |-------------|---------------------|--------------------------|-----|
//! | `packages`  | `[u8; 32]` hash     | package bytes            | code is pulled once per node, by hash, and served to peers that lack it |
//! | `agents`    | agent id            | CBOR [`AgentRecord`]     | the agents resident here: what a restart resumes |
//! | `seen`      | (agent id, hop)     | `()`                     | hops this node accepted: makes arrivals exactly once |
//! | `forwards`  | agent id            | destination peer id      | forwarding pointers left by departed agents |
//! | `locations` | agent id            | peer id                  | on the home node, where each agent it launched is now |
//! | `messages`  | (agent id, seq)     | message bytes            | per-agent FIFO queues; `seq` orders them |
//! | `results`   | agent id            | result bytes             | how agents ended, kept for whoever launched them |
//! | `meta`      | name                | `u64`                    | `schema` version and `next_message_seq` |
//!
//! Packages, messages and results are opaque bytes to the store; only agent records are decoded
//! here. A record that does not decode is reported as [`StoreError::Decode`] naming the table and
//! key, never a panic.
//!
//! # Concurrency
//!
//! [`Store`] is a cheap `Clone` around one `Arc<redb::Database>`, shared by every task of a node;
//! opening the same file twice in one process fails, so share clones instead. redb allows one
//! write transaction at a time: any clone may write, and [`redb::Database::begin_write`] blocks the
//! calling thread until the previous writer has committed (which, with [`Durability::Fsync`],
//! includes its fsync). The writers are the node's protocol handlers (arrivals, departures,
//! packages, locations, messages) and its scheduler (agent records after each slice, results).
//! No lock of ours is added on top: every public operation is one transaction, and operations
//! that must be atomic together go through [`Store::batch`]. Readers never block and never wait
//! for writers (MVCC snapshots). Because a write can block for an fsync, async code should call
//! the store from a blocking context (`tokio::task::spawn_blocking`) on hot paths.
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

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};

const PACKAGES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("packages");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const SEEN: TableDefinition<(&str, u64), ()> = TableDefinition::new("seen");
const FORWARDS: TableDefinition<&str, &str> = TableDefinition::new("forwards");
const LOCATIONS: TableDefinition<&str, &str> = TableDefinition::new("locations");
const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The on-disk format this code reads and writes.
const SCHEMA: u64 = 1;
const META_SCHEMA: &str = "schema";
const META_NEXT_SEQ: &str = "next_message_seq";

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

/// An agent resident on this node, as a restart finds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
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
    /// The encoded continuation; empty when the agent has not started yet.
    #[serde(with = "serde_bytes")]
    pub continuation: Vec<u8>,
    /// The envelope of the hop that brought the agent here; empty on its home node.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
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
    /// A hop in progress, recorded before the hop is offered: after a crash, ask `to` whether it
    /// holds `hop` before resuming the agent here.
    Leaving {
        /// Destination peer id text.
        to: String,
        /// The hop number being made.
        hop: u64,
        /// How many of the agent's queued messages (the oldest) travel with this hop; the rest
        /// arrived later and are forwarded once the hop completes.
        #[serde(default)]
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
    db: Arc<Database>,
    durability: Durability,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the database at `path`, creating the file (not its directory) if it is missing.
    ///
    /// # Errors
    ///
    /// [`StoreError::Open`] if the file cannot be opened (including when it is already open in
    /// this or another process), [`StoreError::Schema`] if it holds another schema.
    pub fn open(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        let db = Database::create(path)?;
        let store = Store {
            db: Arc::new(db),
            durability,
        };
        // Create every table up front so that read transactions always find them.
        store.batch(|b| {
            b.txn.open_table(PACKAGES)?;
            b.txn.open_table(AGENTS)?;
            b.txn.open_table(SEEN)?;
            b.txn.open_table(FORWARDS)?;
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
        self.durability
    }

    /// Runs `f` in one write transaction: everything it writes is committed together (one
    /// commit, one fsync), or, if it returns an error, nothing is.
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
        let mut txn = self.db.begin_write()?;
        txn.set_durability(self.durability.into())?;
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

    fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.db.begin_read()?)
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

    /// Stores (or replaces) an agent record.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError> {
        self.batch(|b| b.put_agent(rec))
    }

    /// The agent with this id, if it is resident here.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, or when the read fails.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(AGENTS)?;
            let v = t.get(id)?;
            v.map(|v| decode_agent(id, v.value())).transpose()
        })
    }

    /// Every agent resident here, ordered by id: what a restart resumes and status shows.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] naming the first record that is corrupt, or when the read fails.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(AGENTS)?;
            t.iter()?
                .map(|entry| {
                    let (k, v) = entry?;
                    decode_agent(k.value(), v.value())
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

    /// Whether this node accepted hop `hop` of agent `id` (answers a source recovering from a
    /// crash in the middle of that hop).
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn has_seen(&self, id: &str, hop: u64) -> Result<bool, StoreError> {
        self.read(|txn| Ok(txn.open_table(SEEN)?.get((id, hop))?.is_some()))
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

/// Writes made inside [`Store::batch`]: the same operations as [`Store`], committed together.
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

    /// The agent with this id, as this transaction sees it (for read-modify-write).
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, or when the read fails.
    pub fn agent(&mut self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let t = self.txn.open_table(AGENTS)?;
        let v = t.get(id)?;
        v.map(|v| decode_agent(id, v.value())).transpose()
    }

    /// See [`Store::put_agent`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_agent(&mut self, rec: &AgentRecord) -> Result<(), StoreError> {
        let bytes = encode_agent(rec)?;
        self.txn
            .open_table(AGENTS)?
            .insert(rec.id.as_str(), bytes.as_slice())?;
        Ok(())
    }

    /// See [`Store::delete_agent`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn delete_agent(&mut self, id: &str) -> Result<(), StoreError> {
        self.txn.open_table(AGENTS)?.remove(id)?;
        Ok(())
    }

    /// The destination side of a hop: if this node already accepted hop `rec.hop` of agent
    /// `rec.id`, or a later one (the offer is stale: the agent has moved past it), returns
    /// [`Arrival::Duplicate`] and writes nothing. Otherwise stores the agent, remembers
    /// (`rec.id`, `rec.hop`) as seen, drops any forwarding pointer for the agent (it lives here
    /// again) and returns [`Arrival::New`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn accept_arrival(&mut self, rec: &AgentRecord) -> Result<Arrival, StoreError> {
        let id = rec.id.as_str();
        let mut seen = self.txn.open_table(SEEN)?;
        let already = seen
            .range((id, rec.hop)..=(id, u64::MAX))?
            .next()
            .transpose()?
            .is_some();
        if already {
            return Ok(Arrival::Duplicate);
        }
        seen.insert((id, rec.hop), ())?;
        drop(seen);
        self.put_agent(rec)?;
        self.txn.open_table(FORWARDS)?.remove(id)?;
        Ok(Arrival::New)
    }

    /// The source side of a hop once the destination acknowledged it: deletes the agent and
    /// records the forwarding pointer `id -> to`. Messages queued for the agent stay queued;
    /// take them in the same batch to forward them.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn complete_departure(&mut self, id: &str, to: &str) -> Result<(), StoreError> {
        self.delete_agent(id)?;
        self.txn.open_table(FORWARDS)?.insert(id, to)?;
        Ok(())
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

fn encode_agent(rec: &AgentRecord) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    ciborium::into_writer(rec, &mut out).map_err(|source| StoreError::Encode {
        table: "agents",
        key: rec.id.clone(),
        source,
    })?;
    Ok(out)
}

fn decode_agent(key: &str, bytes: &[u8]) -> Result<AgentRecord, StoreError> {
    ciborium::from_reader(bytes).map_err(|source| StoreError::Decode {
        table: "agents",
        key: key.to_owned(),
        source,
    })
}
