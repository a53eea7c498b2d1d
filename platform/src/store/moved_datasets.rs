//! The files of the `dataset` resources that are here by a move (the `move` binding): a
//! dataset's files move with the agent that holds it, in the transactions of its hops
//! (`moved_resources`), so at its destination they are kept in the store, not on disk. A
//! dataset of the node's configuration is copied in when an agent first holds it; its own
//! files, the operator's, are never written.
//!
//! Each file is kept in chunks of [`DATASET_CHUNK`] bytes under (resource, file, chunk), and the
//! dataset's record (`moved_datasets`) gives the files' lengths and the hash of their bytes,
//! which names this copy of the dataset (an opened copy is kept by that name: see
//! `resources::MovedDatasets`).

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::error::decode_cbor;
use super::schema::{MOVED_DATASETS, MOVED_DATASET_CHUNKS};
use super::{Batch, Store, StoreError};

/// Bytes of one chunk of a file (the last of a file may be shorter): with its key, a chunk fills
/// a 1 MiB page.
const DATASET_CHUNK: usize = (1 << 20) - 256;

/// A dataset that is here by a move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedDataset {
    /// The lengths of its files, in order.
    pub lens: Vec<u64>,
    /// The BLAKE3 hash of its files' bytes, each file's length first.
    pub hash: [u8; 32],
}

impl MovedDataset {
    /// Decodes `bytes` as a `moved_datasets` value with the store's own decoder. It exists for
    /// fuzzing (`fuzz/`, target `store_record`), which needs the decoder without a database;
    /// the node never calls it.
    #[doc(hidden)]
    pub fn decode_record_value(bytes: &[u8]) -> Result<MovedDataset, StoreError> {
        decode("", bytes)
    }
}

fn decode(name: &str, bytes: &[u8]) -> Result<MovedDataset, StoreError> {
    decode_cbor("moved_datasets", name, bytes)
}

fn missing(name: &str) -> StoreError {
    StoreError::Inconsistent {
        table: "moved_dataset_chunks",
        key: name.to_owned(),
        what: "a chunk of a moved dataset is missing or short",
    }
}

/// Dataset `name` of `datasets` (the `moved_datasets` table), if it is here by a move.
pub(super) fn moved_dataset_in(
    datasets: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<MovedDataset>, StoreError> {
    match datasets.get(name)? {
        Some(bytes) => Ok(Some(decode(name, bytes.value())?)),
        None => Ok(None),
    }
}

impl Store {
    /// Dataset `name`, if it is here by a move.
    ///
    /// # Errors
    ///
    /// When the read fails or the record does not decode.
    pub fn moved_dataset(&self, name: &str) -> Result<Option<MovedDataset>, StoreError> {
        self.read(|txn| moved_dataset_in(&txn.open_table(MOVED_DATASETS)?, name))
    }

    /// Fills `buf` from byte `offset` of file `file` of dataset `name` (here by a move).
    ///
    /// # Errors
    ///
    /// When the read fails, or the file holds fewer bytes ([`StoreError::Inconsistent`]).
    pub fn read_moved_dataset(
        &self,
        name: &str,
        file: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        self.read(|txn| {
            let chunks = txn.open_table(MOVED_DATASET_CHUNKS)?;
            let mut done = 0;
            while done < buf.len() {
                let at = offset + done as u64;
                let chunk = u32::try_from(at / DATASET_CHUNK as u64).map_err(|_| missing(name))?;
                let within = (at % DATASET_CHUNK as u64) as usize;
                let stored = chunks
                    .get((name, file, chunk))?
                    .ok_or_else(|| missing(name))?;
                let bytes = stored.value();
                let part = bytes.get(within..).filter(|p| !p.is_empty());
                let part = part.ok_or_else(|| missing(name))?;
                let n = part.len().min(buf.len() - done);
                buf[done..done + n].copy_from_slice(&part[..n]);
                done += n;
            }
            Ok(())
        })
    }

    /// The bytes of each file of dataset `name` (here by a move), in order.
    ///
    /// # Errors
    ///
    /// As [`Store::read_moved_dataset`]; [`StoreError::Inconsistent`] if it is not here.
    pub fn moved_dataset_files(&self, name: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let dataset = self.moved_dataset(name)?.ok_or_else(|| missing(name))?;
        (0u32..)
            .zip(&dataset.lens)
            .map(|(file, &len)| {
                let mut bytes = vec![0; usize::try_from(len).map_err(|_| missing(name))?];
                self.read_moved_dataset(name, file, 0, &mut bytes)?;
                Ok(bytes)
            })
            .collect()
    }
}

impl Batch<'_> {
    /// Keeps `files` as dataset `name`, here by a move (replacing what was kept of it).
    pub(super) fn put_moved_dataset(
        &mut self,
        name: &str,
        files: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        self.drop_moved_dataset(name)?;
        let mut hasher = blake3::Hasher::new();
        let mut added = 0;
        {
            let mut chunks = self.txn.open_table(MOVED_DATASET_CHUNKS)?;
            for (file, bytes) in (0u32..).zip(files) {
                hasher.update(&(bytes.len() as u64).to_le_bytes());
                hasher.update(bytes);
                for (chunk, part) in (0u32..).zip(bytes.chunks(DATASET_CHUNK)) {
                    chunks.insert((name, file, chunk), part)?;
                    added += part.len();
                }
            }
        }
        let record = MovedDataset {
            lens: files.iter().map(|f| f.len() as u64).collect(),
            hash: *hasher.finalize().as_bytes(),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&record, &mut bytes).map_err(|source| StoreError::Encode {
            table: "moved_datasets",
            key: name.to_owned(),
            source,
        })?;
        self.txn
            .open_table(MOVED_DATASETS)?
            .insert(name, bytes.as_slice())?;
        self.count(added, 0);
        Ok(())
    }

    /// Drops what is kept of dataset `name`, if anything.
    pub(super) fn drop_moved_dataset(&mut self, name: &str) -> Result<(), StoreError> {
        if self.txn.open_table(MOVED_DATASETS)?.remove(name)?.is_none() {
            return Ok(());
        }
        let mut removed = 0;
        {
            let mut chunks = self.txn.open_table(MOVED_DATASET_CHUNKS)?;
            let range = (name, 0u32, 0u32)..=(name, u32::MAX, u32::MAX);
            for entry in chunks.extract_from_if(range, |_, _| true)? {
                removed += entry?.1.value().len();
            }
        }
        self.count(0, removed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Durability;

    #[test]
    fn a_moved_dataset_reads_back_across_its_chunks_and_goes_whole() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open(&dir.path().join("s.redb"), Durability::NoSync).expect("opens");
        let big: Vec<u8> = (0..DATASET_CHUNK * 2 + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        let files = vec![b"first".to_vec(), Vec::new(), big.clone()];
        let before = store.stored_bytes();
        store
            .batch(|b| b.put_moved_dataset("d", &files))
            .expect("puts");
        assert_eq!(store.stored_bytes(), before + 5 + big.len() as u64);
        let record = store.moved_dataset("d").expect("read").expect("kept");
        assert_eq!(record.lens, [5, 0, big.len() as u64]);
        assert_eq!(store.moved_dataset_files("d").expect("read"), files);
        // A read across a chunk's end, and one past the file's end.
        let mut buf = vec![0; 100];
        let at = DATASET_CHUNK as u64 - 50;
        store
            .read_moved_dataset("d", 2, at, &mut buf)
            .expect("reads");
        assert_eq!(buf, big[at as usize..at as usize + 100]);
        let past = store.read_moved_dataset("d", 2, big.len() as u64 - 10, &mut buf);
        assert!(
            matches!(past, Err(StoreError::Inconsistent { .. })),
            "{past:?}"
        );
        // Another copy of the same name replaces it; dropped, it is gone whole.
        store
            .batch(|b| b.put_moved_dataset("d", &[b"other".to_vec()]))
            .expect("puts");
        let other = store.moved_dataset("d").expect("read").expect("kept");
        assert_ne!(other.hash, record.hash);
        assert_eq!(store.stored_bytes(), before + 5);
        store.batch(|b| b.drop_moved_dataset("d")).expect("drops");
        assert_eq!(store.moved_dataset("d").expect("read"), None);
        assert_eq!(store.stored_bytes(), before);
    }
}
