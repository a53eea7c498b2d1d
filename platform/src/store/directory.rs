//! What a home node knows of the agents launched from it: where each one is now (`locations`),
//! whose custody it last confirmed (`custody`), and how it ended (`results`), kept for whoever
//! launched it.

use redb::ReadableTable;
use security::{CustodyPoint, EnvelopeHash, PublicKey};

use super::schema::{CUSTODY, LOCATIONS, RESULTS};
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

    /// On the home node: the custody of agent `id` it last confirmed (None: not launched here,
    /// or launched before custody was kept).
    ///
    /// # Errors
    ///
    /// When the read fails, or the entry holds no valid key
    /// ([`StoreError::Inconsistent`]).
    ///
    /// A holder's key that `known` returns for its bytes is taken as it is rather than
    /// decompressed again (a home reads it at every arrival of its agents, in
    /// [`Store::arrival_view`], and with every report).
    pub fn custody(
        &self,
        id: &str,
        known: impl Fn(&[u8; 32]) -> Option<PublicKey>,
    ) -> Result<Option<CustodyPoint>, StoreError> {
        self.read(|txn| custody_in(&txn.open_table(CUSTODY)?, id, known))
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

    /// [`Store::custody`], as this transaction sees it.
    ///
    /// # Errors
    ///
    /// As [`Store::custody`].
    pub fn custody(
        &mut self,
        id: &str,
        known: impl Fn(&[u8; 32]) -> Option<PublicKey>,
    ) -> Result<Option<CustodyPoint>, StoreError> {
        custody_in(&self.txn.open_table(CUSTODY)?, id, known)
    }

    /// On the home node: records the custody of agent `id` it confirmed.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn set_custody(&mut self, id: &str, at: &CustodyPoint) -> Result<(), StoreError> {
        let envelope = at.envelope.map_or([0; 32], |h| *h.as_bytes());
        self.txn
            .open_table(CUSTODY)?
            .insert(id, (at.hop, at.holder.to_bytes(), envelope))?;
        Ok(())
    }

    /// Keeps how agent `id` ended, for whoever launched it (replaces an earlier result).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_result(&mut self, id: &str, result: &[u8]) -> Result<(), StoreError> {
        let old = self
            .txn
            .open_table(RESULTS)?
            .insert(id, result)?
            .map_or(0, |old| old.value().len());
        self.count(result.len(), old);
        Ok(())
    }
}

pub(super) fn custody_in(
    table: &impl ReadableTable<&'static str, (u64, [u8; 32], [u8; 32])>,
    id: &str,
    known: impl Fn(&[u8; 32]) -> Option<PublicKey>,
) -> Result<Option<CustodyPoint>, StoreError> {
    let Some(entry) = table.get(id)? else {
        return Ok(None);
    };
    let (hop, holder, envelope) = entry.value();
    let holder = match known(&holder) {
        Some(key) if key.to_bytes() == holder => key,
        _ => PublicKey::from_bytes(&holder).map_err(|_| StoreError::Inconsistent {
            table: "custody",
            key: id.to_string(),
            what: "the holder is not a public key",
        })?,
    };
    Ok(Some(CustodyPoint {
        hop,
        holder,
        envelope: (envelope != [0; 32]).then_some(EnvelopeHash(envelope)),
    }))
}
