//! The node's `table` resources: persistent key-value tables that agents read and write through
//! their handles (`get`, `set`, `remove`, `len`, `keys`). Every table of the node lives in one
//! redb table keyed by (table name, key), so a table is a key range and its keys come sorted;
//! each table's entry count is kept beside it, so `len` costs one read.
//!
//! Values are opaque bytes here (the node stores portable values, encoded by the agent's
//! executor); keys and values count in the store's usage (see `usage`).

use redb::{ReadableTable, ReadableTableMetadata};

use super::schema::{TABLE_ENTRIES, TABLE_SIZES};
use super::{Batch, Store, StoreError};

/// The keys of table `name`, in order.
fn range(name: &str) -> std::ops::RangeFrom<(&str, &str)> {
    (name, "")..
}

impl Store {
    /// The value under `key` in table `name`, if there is one.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn table_get(&self, name: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(TABLE_ENTRIES)?
                .get((name, key))?
                .map(|v| v.value().to_vec()))
        })
    }

    /// How many entries table `name` holds.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn table_len(&self, name: &str) -> Result<u64, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(TABLE_SIZES)?
                .get(name)?
                .map_or(0, |v| v.value()))
        })
    }

    /// Up to `count` keys of table `name` in sorted order, from the `start`-th.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn table_keys(
        &self,
        name: &str,
        start: u64,
        count: u64,
    ) -> Result<Vec<String>, StoreError> {
        self.read(|txn| {
            let entries = txn.open_table(TABLE_ENTRIES)?;
            let mut keys = Vec::new();
            let start = usize::try_from(start).unwrap_or(usize::MAX);
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            for entry in entries.range(range(name))?.skip(start).take(count) {
                let (k, _) = entry?;
                let (table, key) = k.value();
                if table != name {
                    break;
                }
                keys.push(key.to_string());
            }
            Ok(keys)
        })
    }

    /// Calls `each` with every entry of table `name` in key order, as one snapshot, until it
    /// returns `false`.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn table_each(
        &self,
        name: &str,
        mut each: impl FnMut(&str, &[u8]) -> bool,
    ) -> Result<(), StoreError> {
        self.read(|txn| {
            let entries = txn.open_table(TABLE_ENTRIES)?;
            for entry in entries.range(range(name))? {
                let (k, v) = entry?;
                let (table, key) = k.value();
                if table != name || !each(key, v.value()) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// How many tables hold entries (for tests and status).
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn table_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(TABLE_SIZES)?.len()?))
    }
}

impl Batch<'_> {
    /// Sets `key` of table `name` to `value`.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn table_set(&mut self, name: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let old = self
            .txn
            .open_table(TABLE_ENTRIES)?
            .insert((name, key), value)?
            .map(|v| v.value().len());
        match old {
            Some(old) => self.count(value.len(), old),
            None => {
                self.count(key.len() + value.len(), 0);
                self.resize_table(name, 1)?;
            }
        }
        Ok(())
    }

    /// Removes `key` from table `name`: the value it had, if any.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn table_remove(&mut self, name: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let old = self
            .txn
            .open_table(TABLE_ENTRIES)?
            .remove((name, key))?
            .map(|v| v.value().to_vec());
        if let Some(old) = &old {
            self.count(0, key.len() + old.len());
            self.resize_table(name, -1)?;
        }
        Ok(old)
    }

    fn resize_table(&mut self, name: &str, by: i64) -> Result<(), StoreError> {
        let mut sizes = self.txn.open_table(TABLE_SIZES)?;
        let now = sizes.get(name)?.map_or(0, |v| v.value());
        match now.saturating_add_signed(by) {
            0 => sizes.remove(name)?,
            n => sizes.insert(name, n)?,
        };
        Ok(())
    }
}
