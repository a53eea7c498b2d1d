//! The store's tables, which are its on-disk format, and the check that a file holds this format.
//!
//! The table names and types below are the on-disk format (schema 4, recorded in `meta`). A
//! schema 3 file is upgraded when opened (its `seen` table kept no envelope hashes: its hops
//! move to `seen_envelopes` with zeros, which match any envelope), and a schema 2 file too (it
//! also lacked `queued`, which is filled from `messages`); `custody` is created when missing
//! (agents launched before it have no custody record, and their homes refuse their reports),
//! and so are the tables of `table` resources, `table_places`, `moved_values`,
//! `moved_datasets`, `moved_dataset_chunks` and `resource_cache`;
//! a file of another schema is refused with [`StoreError::Schema`] (schema 1, which kept the
//! continuation inside the CBOR agent record, never held deployed data).
//!
//! | table                 | key                     | value                    | why |
//! |-----------------------|-------------------------|--------------------------|-----|
//! | `packages`            | `[u8; 32]` hash         | package bytes            | code is pulled once per node, by hash, and served to peers that lack it |
//! | `agents`              | agent id                | tag byte, CBOR [`AgentMeta`](super::AgentMeta) (+ short continuation) | the agents resident here: what a restart resumes and status lists |
//! | `continuation_chunks` | (agent id, `u32` chunk) | continuation bytes       | continuations of 4 KiB or more, in chunks of 4 KiB to 1 MiB |
//! | `seen_envelopes`      | (agent id, hop)         | `[u8; 32]` envelope hash | hops this node accepted, by which envelope: makes arrivals exactly once, and tells a retry (same envelope) from a conflicting claim (another) (per agent, the last committed one and any later arriving) |
//! | `forwards`            | agent id                | destination peer id      | forwarding pointers left by departed agents |
//! | `departed`            | agent id                | `[u8; 32]` envelope hash | the hop an agent last left by: a destination still holding it as arriving after a crash asks whether that hop committed |
//! | `locations`           | agent id                | peer id                  | on the home node, where each agent it launched is now |
//! | `custody`             | agent id                | (`u64` hop, `[u8; 32]` holder key, `[u8; 32]` envelope hash or zeros) | on the home node, the custody of each agent it launched that it last confirmed: location and end reports must lead on from it |
//! | `messages`            | (agent id, seq)         | message bytes            | per-agent FIFO queues; `seq` orders them |
//! | `queued`              | agent id                | (`u64` messages, `u64` bytes) | the size of each non-empty queue, kept with it: a quota check costs one read |
//! | `results`             | agent id                | result bytes             | how agents ended, kept for whoever launched them |
//! | `resource_tables`     | (table name, key)       | value bytes              | the node's `table` resources, each a key range (see `tables`) |
//! | `resource_table_sizes`| table name              | `u64` entries            | each non-empty table's entry count: `len()` costs one read |
//! | `table_places`        | resource name           | CBOR [`ResourcePlace`](super::ResourcePlace) | where each table or value that moves with agents is: here (held by an agent or not), arriving with one, or gone (see `moved_resources`) |
//! | `moved_values`        | resource name           | encoded value            | the `value` resources bound by move that are here (see `moved_resources`) |
//! | `moved_datasets`      | resource name           | CBOR [`MovedDataset`](super::MovedDataset) | the `dataset` resources bound by move that are here: their files' lengths and hash (see `moved_datasets`) |
//! | `moved_dataset_chunks`| (resource name, `u32` file, `u32` chunk) | file bytes | their files, in chunks of about 1 MiB |
//! | `resource_cache`      | (agent id, resource, `u64` chunk) | chunk bytes    | chunks of other nodes' resources that agents read here by copy-on-reference, each agent's own until it leaves or ends (see `resource_cache`) |
//! | `meta`                | name                    | `u64`                    | `schema` version, `next_message_seq` and `stored_bytes` (see `usage`) |
//!
//! Packages, messages, results and continuations are opaque bytes to the store; only agent
//! records are decoded (in `records`). A record that does not decode is reported as
//! [`StoreError::Decode`] naming the table and key, and an agent whose continuation is missing
//! as [`StoreError::Inconsistent`], never a panic.

use redb::{ReadableTable, TableDefinition};

use super::{Batch, StoreError};

pub(super) const PACKAGES: TableDefinition<[u8; 32], &[u8]> = TableDefinition::new("packages");
pub(super) const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
pub(super) const CHUNKS: TableDefinition<(&str, u32), &[u8]> =
    TableDefinition::new("continuation_chunks");
pub(super) const SEEN: TableDefinition<(&str, u64), [u8; 32]> =
    TableDefinition::new("seen_envelopes");
/// `seen` before schema 4, without the envelope hashes.
const SEEN_3: TableDefinition<(&str, u64), ()> = TableDefinition::new("seen");
pub(super) const FORWARDS: TableDefinition<&str, &str> = TableDefinition::new("forwards");
pub(super) const DEPARTED: TableDefinition<&str, [u8; 32]> = TableDefinition::new("departed");
pub(super) const LOCATIONS: TableDefinition<&str, &str> = TableDefinition::new("locations");
pub(super) const CUSTODY: TableDefinition<&str, (u64, [u8; 32], [u8; 32])> =
    TableDefinition::new("custody");
pub(super) const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
pub(super) const QUEUED: TableDefinition<&str, (u64, u64)> = TableDefinition::new("queued");
pub(super) const RESULTS: TableDefinition<&str, &[u8]> = TableDefinition::new("results");
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const TABLE_ENTRIES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("resource_tables");
pub(super) const TABLE_SIZES: TableDefinition<&str, u64> =
    TableDefinition::new("resource_table_sizes");
pub(super) const RESOURCE_CACHE: TableDefinition<(&str, &str, u64), &[u8]> =
    TableDefinition::new("resource_cache");
pub(super) const RESOURCE_PLACES: TableDefinition<&str, &[u8]> =
    TableDefinition::new("table_places");
pub(super) const MOVED_VALUES: TableDefinition<&str, &[u8]> = TableDefinition::new("moved_values");
pub(super) const MOVED_DATASETS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("moved_datasets");
pub(super) const MOVED_DATASET_CHUNKS: TableDefinition<(&str, u32, u32), &[u8]> =
    TableDefinition::new("moved_dataset_chunks");

/// The on-disk format this code reads and writes.
pub(super) const SCHEMA: u64 = 4;
const META_SCHEMA: &str = "schema";
/// The `meta` entry holding the next message's sequence number.
pub(super) const META_NEXT_SEQ: &str = "next_message_seq";

impl Batch<'_> {
    /// Creates every table that is missing, so that read transactions always find them, and
    /// records the schema of a new file.
    ///
    /// # Errors
    ///
    /// [`StoreError::Schema`] if the file holds another schema, or when the write fails.
    pub(super) fn create_tables(&mut self) -> Result<(), StoreError> {
        self.txn.open_table(PACKAGES)?;
        self.txn.open_table(AGENTS)?;
        self.txn.open_table(CHUNKS)?;
        self.txn.open_table(SEEN)?;
        self.txn.open_table(CUSTODY)?;
        self.txn.open_table(FORWARDS)?;
        self.txn.open_table(DEPARTED)?;
        self.txn.open_table(LOCATIONS)?;
        self.txn.open_table(MESSAGES)?;
        self.txn.open_table(QUEUED)?;
        self.txn.open_table(RESULTS)?;
        self.txn.open_table(TABLE_ENTRIES)?;
        self.txn.open_table(TABLE_SIZES)?;
        self.txn.open_table(RESOURCE_CACHE)?;
        self.txn.open_table(RESOURCE_PLACES)?;
        self.txn.open_table(MOVED_VALUES)?;
        self.txn.open_table(MOVED_DATASETS)?;
        self.txn.open_table(MOVED_DATASET_CHUNKS)?;
        let found = self
            .txn
            .open_table(META)?
            .get(META_SCHEMA)?
            .map(|v| v.value());
        match found {
            None => {}
            Some(SCHEMA) => return Ok(()),
            Some(2) => {
                self.count_queues()?;
                self.keep_seen_hops()?;
            }
            Some(3) => self.keep_seen_hops()?,
            Some(found) => return Err(StoreError::Schema { found }),
        }
        self.txn.open_table(META)?.insert(META_SCHEMA, SCHEMA)?;
        Ok(())
    }

    /// Schema 3 to 4: the hops accepted so far, with no envelope hash (zeros: any envelope of
    /// such a hop counts as the one accepted, as every one did before).
    fn keep_seen_hops(&mut self) -> Result<(), StoreError> {
        let old = self.txn.open_table(SEEN_3)?;
        let mut seen = self.txn.open_table(SEEN)?;
        for entry in old.iter()? {
            let (key, _) = entry?;
            let (id, hop) = key.value();
            seen.insert((id, hop), [0; 32])?;
        }
        drop(old);
        self.txn.delete_table(SEEN_3)?;
        Ok(())
    }

    /// Schema 2 to 3: the size of every queue, from the queues themselves.
    fn count_queues(&mut self) -> Result<(), StoreError> {
        let messages = self.txn.open_table(MESSAGES)?;
        let mut queued = self.txn.open_table(QUEUED)?;
        let mut sizes: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for entry in messages.iter()? {
            let (k, v) = entry?;
            let size = sizes.entry(k.value().0.to_string()).or_default();
            size.0 += 1;
            size.1 += v.value().len() as u64;
        }
        for (agent, size) in sizes {
            queued.insert(agent.as_str(), size)?;
        }
        Ok(())
    }
}
