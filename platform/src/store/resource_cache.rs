//! Chunks of other nodes' resources that agents read here by copy-on-reference, kept as each
//! agent's own: a chunk is stored under (agent, the resource's key, chunk number), counts in
//! the store's usage (so the store quota bounds it), and goes with its agent when the agent
//! leaves this node or ends (the node's `depart` and `end_here`), in the same transaction.

use std::sync::atomic::Ordering;

use redb::{ReadableTable, ReadableTableMetadata};

use super::schema::RESOURCE_CACHE;
use super::{Batch, Store, StoreError};

impl Store {
    /// Chunk `chunk` of resource `resource` as agent `agent` keeps it here, if it does.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn cached_chunk(
        &self,
        agent: &str,
        resource: &str,
        chunk: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(RESOURCE_CACHE)?
                .get((agent, resource, chunk))?
                .map(|v| v.value().to_vec()))
        })
    }

    /// How many chunks agents keep here, all together (for tests and status).
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn cached_chunk_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(RESOURCE_CACHE)?.len()?))
    }
}

impl Batch<'_> {
    /// Keeps `bytes` as chunk `chunk` of resource `resource` for agent `agent`.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn cache_chunk(
        &mut self,
        agent: &str,
        resource: &str,
        chunk: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        self.occupied.cached_chunks.store(true, Ordering::Relaxed);
        let old = self
            .txn
            .open_table(RESOURCE_CACHE)?
            .insert((agent, resource, chunk), bytes)?
            .map(|v| v.value().len());
        match old {
            Some(old) => self.count(bytes.len(), old),
            None => self.count(resource.len() + bytes.len(), 0),
        }
        Ok(())
    }

    /// Drops every chunk agent `agent` keeps here.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn drop_cached_chunks(&mut self, agent: &str) -> Result<(), StoreError> {
        if !self.occupied.cached_chunks.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut cache = self.txn.open_table(RESOURCE_CACHE)?;
        let mut held = Vec::new();
        for entry in cache.range((agent, "", 0)..)? {
            let (key, value) = entry?;
            let (holder, resource, chunk) = key.value();
            if holder != agent {
                break;
            }
            held.push((resource.to_string(), chunk, value.value().len()));
        }
        let mut removed = 0;
        for (resource, chunk, len) in held {
            cache.remove((agent, resource.as_str(), chunk))?;
            removed += resource.len() + len;
        }
        self.count(0, removed);
        Ok(())
    }
}
