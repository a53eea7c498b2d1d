//! What a home node knows of the agents launched from it: where each one is now (`locations`),
//! and how it ended (`results`), kept for whoever launched it.

use super::schema::{LOCATIONS, RESULTS};
use super::{Batch, Store, StoreError};

impl Store {
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

impl Batch<'_> {
    /// On the home node: records that agent `id` is now on `node`.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn set_location(&mut self, id: &str, node: &str) -> Result<(), StoreError> {
        self.txn.open_table(LOCATIONS)?.insert(id, node)?;
        Ok(())
    }

    /// Keeps how agent `id` ended, for whoever launched it (replaces an earlier result).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_result(&mut self, id: &str, result: &[u8]) -> Result<(), StoreError> {
        self.txn.open_table(RESULTS)?.insert(id, result)?;
        Ok(())
    }
}
