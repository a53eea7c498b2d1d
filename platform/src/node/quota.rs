//! The node's quota on its store (`[limits] max_store_bytes`): what agents and their senders
//! may make the node keep on disk, all together. Agents are bounded one by one elsewhere (the
//! continuation limit, the queue quotas, `max_agents`); this bounds their sum, so that no set of
//! agents can fill the node's disk.
//!
//! The figure checked is [`Store::stored_bytes`] (one atomic read). What adds to the store is
//! admitted only while it fits: a launch, an arriving hop, a queued message, and the checkpoint
//! an agent waiting in `receive` writes when it grew. What frees it (an agent leaving or ending,
//! a message taken) is never refused, so a full node empties as its agents go.

use crate::store::{Store, StoreError};
use crate::wire::{ControlRefusal, HopRefusal, StoreUsage};

/// Most bytes of agents' state a node keeps unless configured (`[limits] max_store_bytes`).
pub const DEFAULT_MAX_STORE_BYTES: u64 = 16 << 30;

/// The store and its quota.
#[derive(Clone)]
pub(crate) struct StoreQuota {
    store: Store,
    max: u64,
}

/// What does not fit in the store's quota: how full it is, what was asked, the quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StoreFull {
    pub(super) stored: u64,
    pub(super) adding: u64,
    pub(super) max: u64,
}

impl From<StoreFull> for HopRefusal {
    fn from(
        StoreFull {
            stored,
            adding,
            max,
        }: StoreFull,
    ) -> Self {
        HopRefusal::StoreFull {
            stored,
            adding,
            max,
        }
    }
}

impl From<StoreFull> for ControlRefusal {
    fn from(
        StoreFull {
            stored,
            adding,
            max,
        }: StoreFull,
    ) -> Self {
        ControlRefusal::StoreFull {
            stored,
            adding,
            max,
        }
    }
}

impl StoreQuota {
    pub(super) fn new(store: Store, max: u64) -> StoreQuota {
        StoreQuota { store, max }
    }

    pub(super) fn store(&self) -> &Store {
        &self.store
    }

    /// How much of the quota is used.
    ///
    /// # Errors
    ///
    /// When the store cannot be read.
    pub(super) fn usage(&self) -> Result<StoreUsage, StoreError> {
        Ok(StoreUsage {
            stored_bytes: self.store.stored_bytes(),
            max_store_bytes: self.max,
            cached_chunks: self.store.cached_chunk_count()?,
        })
    }

    /// Whether `adding` more bytes fit in the quota now.
    pub(crate) fn room_for(&self, adding: u64) -> Result<(), StoreFull> {
        let stored = self.store.stored_bytes();
        if stored.saturating_add(adding) > self.max {
            return Err(StoreFull {
                stored,
                adding,
                max: self.max,
            });
        }
        Ok(())
    }
}
