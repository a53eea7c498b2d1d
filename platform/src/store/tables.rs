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

    /// Writes `entries` into table `name`, with one count of its size for all of them (a
    /// table moving here with its agent: thousands of entries).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub(super) fn table_set_all(
        &mut self,
        name: &str,
        entries: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let (mut added, mut removed, mut new) = (0, 0, 0);
        {
            let mut table = self.txn.open_table(TABLE_ENTRIES)?;
            for (key, value) in entries {
                match table.insert((name, key.as_str()), value.as_slice())? {
                    Some(old) => {
                        added += value.len();
                        removed += old.value().len();
                    }
                    None => {
                        added += key.len() + value.len();
                        new += 1;
                    }
                }
            }
        }
        self.count(added, removed);
        if new > 0 {
            self.resize_table(name, new)?;
        }
        Ok(())
    }

    /// Removes every entry of table `name`, in one pass over its keys.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub(super) fn table_clear(&mut self, name: &str) -> Result<(), StoreError> {
        // Every key of `name` sorts before (name + NUL, ""): a NUL sorts first, and no table
        // name holds one.
        let end = format!("{name}\0");
        let (mut removed, mut gone) = (0, 0);
        {
            let mut table = self.txn.open_table(TABLE_ENTRIES)?;
            for entry in table.extract_from_if((name, "")..(end.as_str(), ""), |_, _| true)? {
                let (key, value) = entry?;
                removed += key.value().1.len() + value.value().len();
                gone += 1;
            }
        }
        self.count(0, removed);
        if gone > 0 {
            self.resize_table(name, -gone)?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    /// Tables whose names sort next to "t" (prefixes and extensions of it, around it).
    const NAMES: [&str; 7] = ["s", "t", "t-", "t.", "t0", "ta", "u"];

    fn filled() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync).expect("opens");
        store
            .batch(|b| {
                for (i, name) in NAMES.iter().enumerate() {
                    for k in 0..=i {
                        b.table_set(name, &format!("k{k}"), &vec![7; 10 * k + 1])?;
                    }
                }
                Ok(())
            })
            .expect("filled");
        (dir, store)
    }

    fn contents(store: &Store) -> Vec<(String, u64, Vec<String>)> {
        NAMES
            .iter()
            .map(|name| {
                let len = store.table_len(name).expect("len");
                (
                    name.to_string(),
                    len,
                    store.table_keys(name, 0, 100).expect("keys"),
                )
            })
            .collect()
    }

    /// Clearing a table in one pass and writing many entries at once leave the store as the
    /// same changes made one entry at a time do: the neighbouring tables, the sizes and the
    /// stored-bytes figure alike.
    #[test]
    fn a_table_cleared_and_filled_at_once_is_as_one_entry_at_a_time() {
        let (_a, at_once) = filled();
        let (_b, one_by_one) = filled();
        let entries: Vec<(String, Vec<u8>)> = (0..50)
            .map(|k| (format!("k{k}"), vec![k as u8; k]))
            .collect();
        at_once
            .batch(|b| {
                b.table_clear("t")?;
                b.table_set_all("ta", &entries)?;
                b.table_clear("nothing")
            })
            .expect("at once");
        one_by_one
            .batch(|b| {
                for key in one_by_one_keys("t") {
                    b.table_remove("t", &key)?;
                }
                for (key, value) in &entries {
                    b.table_set("ta", key, value)?;
                }
                Ok(())
            })
            .expect("one by one");
        assert_eq!(contents(&at_once), contents(&one_by_one));
        assert_eq!(at_once.table_len("t").expect("len"), 0);
        assert_eq!(at_once.table_len("ta").expect("len"), 50);
        assert_eq!(at_once.stored_bytes(), one_by_one.stored_bytes());
    }

    fn one_by_one_keys(name: &str) -> Vec<String> {
        let i = NAMES.iter().position(|n| *n == name).expect("a name");
        (0..=i).map(|k| format!("k{k}")).collect()
    }
}
