//! Datasets that are here by a move, read from the node's store (`store::moved_datasets`), and
//! kept open between reads: an opened dataset builds its line index once, so each copy that
//! moved here is opened once, and known by the hash of its files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::dataset::{Dataset, DatasetError, DatasetFiles, FileAt};
use crate::store::{MovedDataset, Store};

/// A dataset here by a move, opened: the hash of the copy it is, and the dataset.
type Opened = ([u8; 32], Arc<Dataset>);

/// The datasets of a node that are here by a move, opened, by name.
#[derive(Debug, Default, Clone)]
pub(crate) struct MovedDatasets {
    opened: Arc<Mutex<HashMap<String, Opened>>>,
}

impl MovedDatasets {
    /// The copy `record` of dataset `name` of `store` (here by a move), opened: again only if
    /// another copy came since it was last opened.
    pub(crate) fn open(&self, store: &Store, name: &str, record: &MovedDataset) -> Arc<Dataset> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((hash, dataset)) = opened.get(name) {
            if *hash == record.hash {
                return dataset.clone();
            }
        }
        let files = StoredFiles {
            store: store.clone(),
            name: name.to_string(),
        };
        let dataset = Arc::new(Dataset::of(Box::new(files), &record.lens));
        opened.insert(name.to_string(), (record.hash, dataset.clone()));
        dataset
    }
}

/// The files of a dataset kept in the store.
#[derive(Debug)]
struct StoredFiles {
    store: Store,
    name: String,
}

impl DatasetFiles for StoredFiles {
    fn open(&self, file: usize) -> Result<Box<dyn FileAt + '_>, DatasetError> {
        Ok(Box::new(StoredFile { files: self, file }))
    }

    fn name(&self, file: usize) -> PathBuf {
        PathBuf::from(format!("moved dataset '{}', file {file}", self.name))
    }
}

struct StoredFile<'a> {
    files: &'a StoredFiles,
    file: usize,
}

impl FileAt for StoredFile<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DatasetError> {
        let failed = |e: &dyn std::fmt::Display| DatasetError::Io {
            path: self.files.name(self.file),
            source: std::io::Error::other(e.to_string()),
        };
        let file = u32::try_from(self.file).map_err(|e| failed(&e))?;
        self.files
            .store
            .read_moved_dataset(&self.files.name, file, offset, buf)
            .map_err(|e| failed(&e))
    }
}
