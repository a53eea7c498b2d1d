//! Agent code, by hash: a node pulls a package once, keeps it for its agents, and serves it to
//! peers that lack it.

use super::schema::PACKAGES;
use super::{Batch, Store, StoreError};

impl Store {
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
}

impl Batch<'_> {
    /// Stores a package under its hash (overwriting is harmless: same hash, same bytes).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_package(&mut self, hash: &[u8; 32], bytes: &[u8]) -> Result<(), StoreError> {
        let old = self
            .txn
            .open_table(PACKAGES)?
            .insert(hash, bytes)?
            .map_or(0, |old| old.value().len());
        self.count(bytes.len(), old);
        Ok(())
    }
}
