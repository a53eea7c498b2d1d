//! How many bytes the store holds for agents, kept with it: the figure a node's store quota
//! (`[limits] max_store_bytes`) is checked against, in one atomic read, so that a launch, an
//! arrival or a queued message is admitted without a scan of the store.
//!
//! Counted: the values of `packages`, `agents`, `continuation_chunks`, `messages` and
//! `results`, the keys and values of `resource_tables`, and the values and resource keys of
//! `resource_cache`, which are what agents and their senders can make grow. Not counted: the
//! other keys, the bookkeeping tables (hops seen, locations, custody, queue sizes, the places of
//! moved tables), and redb's own pages and free space, which are bounded by the counted ones, by
//! the number of agents, or (`resource_places`) by the table names that trusted packages bind by
//! move. The figure is therefore a little under the file's size, never over what the agents made
//! it hold.
//!
//! Every write that adds or removes such a value says so to its [`Batch`]; the batch writes the
//! new total to `meta` once, just before its transaction commits, so the figure on disk is always
//! that of the data beside it. A file written before the figure existed is counted once, when
//! it is opened.

use redb::ReadableTable;

use super::schema::{
    AGENTS, CHUNKS, MESSAGES, META, MOVED_DATASET_CHUNKS, MOVED_VALUES, PACKAGES, RESOURCE_CACHE,
    RESULTS, TABLE_ENTRIES,
};
use super::{Batch, StoreError};

/// The `meta` entry holding the counted bytes.
const META_STORED: &str = "stored_bytes";

impl Batch<'_> {
    /// Records that this transaction wrote `added` bytes of counted values and removed
    /// `removed`.
    pub(super) fn count(&mut self, added: usize, removed: usize) {
        self.grew = self
            .grew
            .saturating_add(added as i64)
            .saturating_sub(removed as i64);
    }

    /// Writes the new total to `meta` if this transaction changed it, and returns it (None if it
    /// did not): called once per transaction, before it commits.
    ///
    /// # Errors
    ///
    /// When the read or the write fails.
    pub(super) fn settle(&mut self) -> Result<Option<u64>, StoreError> {
        if self.grew == 0 {
            return Ok(None);
        }
        let mut meta = self.txn.open_table(META)?;
        let before = meta.get(META_STORED)?.map_or(0, |v| v.value());
        let after = before.saturating_add_signed(self.grew);
        meta.insert(META_STORED, after)?;
        self.grew = 0;
        Ok(Some(after))
    }

    /// The total as committed before this transaction.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub(super) fn stored(&self) -> Result<u64, StoreError> {
        Ok(self
            .txn
            .open_table(META)?
            .get(META_STORED)?
            .map_or(0, |v| v.value()))
    }

    /// Counts the bytes of a file that has no total yet (written before it existed, or new).
    ///
    /// # Errors
    ///
    /// When a read or the write fails.
    pub(super) fn count_stored_if_missing(&mut self) -> Result<(), StoreError> {
        if self.txn.open_table(META)?.get(META_STORED)?.is_some() {
            return Ok(());
        }
        fn sum<K: redb::Key + 'static>(
            table: impl ReadableTable<K, &'static [u8]>,
        ) -> Result<u64, StoreError> {
            let mut total = 0u64;
            for entry in table.iter()? {
                total = total.saturating_add(entry?.1.value().len() as u64);
            }
            Ok(total)
        }
        let mut total = sum(self.txn.open_table(PACKAGES)?)?
            + sum(self.txn.open_table(AGENTS)?)?
            + sum(self.txn.open_table(CHUNKS)?)?
            + sum(self.txn.open_table(MESSAGES)?)?
            + sum(self.txn.open_table(RESULTS)?)?
            + sum(self.txn.open_table(MOVED_VALUES)?)?
            + sum(self.txn.open_table(MOVED_DATASET_CHUNKS)?)?;
        for entry in self.txn.open_table(TABLE_ENTRIES)?.iter()? {
            let (k, v) = entry?;
            total = total.saturating_add((k.value().1.len() + v.value().len()) as u64);
        }
        for entry in self.txn.open_table(RESOURCE_CACHE)?.iter()? {
            let (k, v) = entry?;
            total = total.saturating_add((k.value().1.len() + v.value().len()) as u64);
        }
        self.txn.open_table(META)?.insert(META_STORED, total)?;
        Ok(())
    }
}
