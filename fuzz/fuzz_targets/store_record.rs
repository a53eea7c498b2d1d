//! The store's `agents` values are read back after every restart and on every hop; a record
//! corrupted on disk (or written by a buggy build) must give `StoreError::Decode` or
//! `StoreError::Inconsistent`, never a panic, and must not make the node reserve memory for
//! lengths it only claims. Both readers run: the metadata alone (`Store::agent_meta`, status,
//! duplicate checks) and the whole record (`Store::agent`, what a restart resumes). They read
//! the same CBOR, so a record whose whole decodes has metadata that decodes, and the same.
//!
//! The `results` table's values (an `AgentEnd` each, read by `tern result`) are decoded here
//! too, with the call the node makes, and so are the records of moved resources: a
//! `table_places` value (where a resource is) and a `moved_datasets` value (the lengths and
//! hash of a dataset kept in the store).
#![no_main]

use libfuzzer_sys::fuzz_target;
use platform::store::{AgentRecord, MovedDataset, ResourcePlace};
use platform::wire::AgentEnd;

fuzz_target!(|data: &[u8]| {
    let (meta, whole) = tern_fuzz::bounded("agents value", data.len(), 128, || {
        AgentRecord::decode_agent_value(data)
    });
    if let Ok((whole_meta, _)) = &whole {
        match &meta {
            Ok(m) => assert_eq!(m, whole_meta, "the two readers disagree on the metadata"),
            Err(e) => panic!("the record decodes whole but its metadata does not: {e}"),
        }
    }
    let _ = tern_fuzz::bounded("results value", data.len(), 128, || {
        ciborium::from_reader::<AgentEnd, _>(data)
    });
    let _ = tern_fuzz::bounded("table_places value", data.len(), 128, || {
        ResourcePlace::decode_place_value(data)
    });
    let _ = tern_fuzz::bounded("moved_datasets value", data.len(), 128, || {
        MovedDataset::decode_record_value(data)
    });
});
