//! The node's `table` resources: persistent key-value tables that agents read and write through
//! their handles (`get`, `set`, `remove`, `len`, `keys`). Every table of the node lives in one
//! redb table keyed by (table name, key), so a table is a key range and its keys come sorted;
//! each table's entry count is kept beside it, so `len` costs one read.
//!
//! Values are opaque bytes here (the node stores portable values, encoded by the agent's
//! executor); keys and values count in the store's usage (see `usage`).

use std::ops::Bound;

use redb::{CursorError, ReadableTable, ReadableTableMetadata};

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
    /// A table that has no entry here yet and entries in key order (as a moving table comes:
    /// its source reads them in order) are spliced into the tree as one run through a cursor,
    /// which builds each page once; inserted one by one, each entry of a few KB would cost a
    /// fresh leaf page and a rebuilt branch page. Anything else is inserted one by one.
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
            let ascending = entries.windows(2).all(|pair| pair[0].0 < pair[1].0);
            let empty = match table.range(range(name))?.next() {
                Some(entry) => entry?.0.value().0 != name,
                None => true,
            };
            if ascending && empty {
                let mut run = table.lower_bound_mut(Bound::Included((name, "")))?;
                for (key, value) in entries {
                    run.insert_before((name, key.as_str()), value.as_slice())
                        .map_err(|e| match e {
                            CursorError::Storage(e) => StoreError::Storage(e),
                            _ => StoreError::Inconsistent {
                                table: "table_entries",
                                key: format!("{name}/{key}"),
                                what: "a table's entries out of order",
                            },
                        })?;
                    added += key.len() + value.len();
                }
                run.close()?;
                new = i64::try_from(entries.len()).unwrap_or(i64::MAX);
            } else {
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

    /// Every table's name, length, and entries in key order.
    type Contents = Vec<(String, u64, Vec<(String, Option<Vec<u8>>)>)>;

    fn contents(store: &Store) -> Contents {
        NAMES
            .iter()
            .map(|name| {
                let len = store.table_len(name).expect("len");
                let entries = store
                    .table_keys(name, 0, 100)
                    .expect("keys")
                    .into_iter()
                    .map(|key| {
                        let value = store.table_get(name, &key).expect("get");
                        (key, value)
                    })
                    .collect();
                (name.to_string(), len, entries)
            })
            .collect()
    }

    /// Clearing a table in one pass and writing many entries at once leave the store as the
    /// same changes made one entry at a time do: the neighbouring tables, the sizes and the
    /// stored-bytes figure alike. Entries in key order into a table emptied first take the
    /// spliced run (with the empty key, at the very start of the table's range); entries out
    /// of order or with a key twice, and entries into a table that has some, take the inserts
    /// one by one.
    #[test]
    fn a_table_cleared_and_filled_at_once_is_as_one_entry_at_a_time() {
        let (_a, at_once) = filled();
        let (_b, one_by_one) = filled();
        let unordered: Vec<(String, Vec<u8>)> = (0..50)
            .map(|k| (format!("k{k}"), vec![k as u8; k]))
            .collect();
        let ordered: Vec<(String, Vec<u8>)> = std::iter::once((String::new(), vec![1; 5]))
            .chain((0..60).map(|k| (format!("k{k:02}"), vec![k as u8; 3_000])))
            .collect();
        // In order but for a key that comes twice (as a hostile peer may send it): the last
        // value stays, counted once.
        let repeated: Vec<(String, Vec<u8>)> = [("a", 1), ("b", 2), ("b", 3), ("c", 4)]
            .iter()
            .map(|(k, v)| (k.to_string(), vec![*v; 100]))
            .collect();
        at_once
            .batch(|b| {
                b.table_clear("t")?;
                b.table_set_all("t", &ordered)?;
                b.table_set_all("ta", &unordered)?;
                b.table_set_all("t0", &ordered)?;
                b.table_set_all("u", &[])?;
                b.table_clear("u")?;
                b.table_set_all("u", &repeated)?;
                b.table_clear("nothing")
            })
            .expect("at once");
        one_by_one
            .batch(|b| {
                for name in ["t", "u"] {
                    for key in one_by_one_keys(name) {
                        b.table_remove(name, &key)?;
                    }
                }
                for (name, entries) in [
                    ("t", &ordered),
                    ("ta", &unordered),
                    ("t0", &ordered),
                    ("u", &repeated),
                ] {
                    for (key, value) in entries {
                        b.table_set(name, key, value)?;
                    }
                }
                Ok(())
            })
            .expect("one by one");
        assert_eq!(contents(&at_once), contents(&one_by_one));
        assert_eq!(at_once.table_len("t").expect("len"), 61);
        assert_eq!(at_once.table_len("ta").expect("len"), 50);
        assert_eq!(at_once.table_len("t0").expect("len"), 66);
        assert_eq!(at_once.table_len("u").expect("len"), 3);
        assert_eq!(
            at_once.table_get("u", "b").expect("get"),
            Some(vec![3; 100])
        );
        assert_eq!(at_once.stored_bytes(), one_by_one.stored_bytes());
    }

    fn one_by_one_keys(name: &str) -> Vec<String> {
        let i = NAMES.iter().position(|n| *n == name).expect("a name");
        (0..=i).map(|k| format!("k{k}")).collect()
    }
}
