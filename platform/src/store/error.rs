//! What can go wrong in the store: one enum for every operation, since most can fail in most of
//! these ways (a read can meet a corrupt record, a write can fail to commit).

use super::schema::SCHEMA;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("cannot open the store database")]
    Open(#[from] redb::DatabaseError),
    /// A transaction could not begin.
    #[error("cannot begin a store transaction")]
    Transaction(#[from] redb::TransactionError),
    /// A table could not be opened.
    #[error("cannot open a store table")]
    Table(#[from] redb::TableError),
    /// Reading or writing the file failed.
    #[error("store i/o failed")]
    Storage(#[from] redb::StorageError),
    /// The durability of a transaction could not be set.
    #[error("cannot set the store durability")]
    Durability(#[from] redb::SetDurabilityError),
    /// A commit failed; nothing of its transaction was stored.
    #[error("cannot commit to the store")]
    Commit(#[from] redb::CommitError),
    /// The file was written by another version of tern.
    #[error("store schema {found} is not supported (expected {SCHEMA})")]
    Schema {
        /// The schema recorded in the file.
        found: u64,
    },
    /// A stored value does not decode.
    #[error("cannot decode {table} entry {key:?}")]
    Decode {
        /// The table holding the value.
        table: &'static str,
        /// Its key, as text.
        key: String,
        /// What the decoder said.
        #[source]
        source: ciborium::de::Error<std::io::Error>,
    },
    /// [`Store::write`](super::Store::write) only: this write shared its transaction with
    /// others, and the transaction was abandoned for a reason outside this write (named in the
    /// message): another write before it in the group failed or panicked, or the transaction
    /// could not begin or commit. Nothing this write did was stored, so running it again is
    /// safe.
    #[error("store write abandoned: {0}")]
    BatchAborted(String),
    /// [`Store::write`](super::Store::write) only: the write's closure panicked. Nothing of its
    /// transaction was stored; the panic is not resumed.
    #[error("store write panicked: {0}")]
    Panicked(String),
    /// [`Store::write`](super::Store::write) only: the store stopped writing before it could
    /// report this write's outcome (a bug in the store panicked mid-commit): whether it was
    /// stored is unknown.
    #[error("store write interrupted before its outcome was known")]
    Interrupted,
    /// Entries that must go together do not: an agent in `agents` without its continuation, or
    /// a continuation with a chunk missing. Only a bug or a change made to the file outside
    /// tern leaves the store so.
    #[error("inconsistent {table} entry {key:?}: {what}")]
    Inconsistent {
        /// The table that lacks an entry.
        table: &'static str,
        /// The key, as text.
        key: String,
        /// What is wrong.
        what: &'static str,
    },
    /// A value could not be encoded.
    #[error("cannot encode {table} entry {key:?}")]
    Encode {
        /// The table the value was meant for.
        table: &'static str,
        /// Its key, as text.
        key: String,
        /// What the encoder said.
        #[source]
        source: ciborium::ser::Error<std::io::Error>,
    },
}

/// Decodes the CBOR value `bytes` stored in `table` under `key`, naming both if it does not
/// decode.
pub(super) fn decode_cbor<T: serde::de::DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|source| StoreError::Decode {
        table,
        key: key.to_owned(),
        source,
    })
}
