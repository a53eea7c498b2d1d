//! The node's embedded store through its public API: every table round trips, data survives a
//! reopen, hops are accepted once, batches are all-or-nothing, corruption is an error, and
//! group-committed writes land in order, report to the right caller and survive failing,
//! panicking and cancelled neighbours.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc;
use std::task::Context;
use std::time::{Duration, Instant};

use futures::task::noop_waker_ref;
use platform::store::{
    AgentMeta, AgentRecord, AgentState, Arrival, Durability, HopSeen, QueueSize, Store, StoreError,
    MAX_GROUP,
};
use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
use tempfile::TempDir;

fn temp_store(durability: Durability) -> (TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.redb");
    let store = Store::open(&path, durability).unwrap();
    (dir, path, store)
}

fn agent(id: &str, hop: u64) -> AgentRecord {
    AgentRecord {
        meta: AgentMeta {
            id: id.to_string(),
            package: [3; 32],
            hop,
            hops: hop,
            operations: 0,
            sent: Default::default(),
            home: "12D3KooWHome".to_string(),
            launcher: Some("12D3KooWLauncher".to_string()),
            state: AgentState::Ready,
            envelope: vec![9; 40],
            handover: Some(platform::wire::HandoverKey([4; 32])),
            tail: vec![platform::wire::CustodyLink {
                envelope: vec![8; 40],
                handover: platform::wire::HandoverKey([5; 32]),
            }],
            nonce: [5; 16],
            certificate: vec![6; 30],
        },
        continuation: vec![1, 2, 3, hop as u8],
    }
}

/// The store's tables, for looking at the file under the store.
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const CHUNKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("continuation_chunks");

const MB: usize = 1024 * 1024;

/// `len` bytes starting with `mark`, in a pattern whose period (a prime) matches no chunk size,
/// so that chunks out of order, missing or left over from an older continuation change them.
fn continuation(mark: u8, len: usize) -> Vec<u8> {
    let block: Vec<u8> = (0..65_521u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let mut out = Vec::with_capacity(len);
    out.push(mark);
    while out.len() < len {
        let n = block.len().min(len - out.len());
        out.extend_from_slice(&block[..n]);
    }
    out.truncate(len);
    out
}

fn agent_with(id: &str, hop: u64, continuation: Vec<u8>) -> AgentRecord {
    AgentRecord {
        continuation,
        ..agent(id, hop)
    }
}

/// Asserts equality without printing 100 MB when it fails.
#[track_caller]
fn assert_same(found: Option<&AgentRecord>, expected: &AgentRecord) {
    let Some(found) = found else {
        panic!("agent {} is missing", expected.id);
    };
    assert_eq!(found.meta, expected.meta);
    assert_eq!(
        found.continuation.len(),
        expected.continuation.len(),
        "{}",
        expected.id
    );
    assert!(
        found.continuation == expected.continuation,
        "{}",
        expected.id
    );
}

/// What the file holds for agent `id`, read with a raw redb handle once the store is closed: the
/// first byte of its record (0: continuation inline, 1: in chunks) and its chunks' lengths.
fn raw_agent(path: &Path, id: &str) -> (Option<u8>, Vec<usize>) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let tag = txn
        .open_table(AGENTS)
        .unwrap()
        .get(id)
        .unwrap()
        .map(|v| v.value()[0]);
    let chunks = txn
        .open_table(CHUNKS)
        .unwrap()
        .range((id, 0)..=(id, u32::MAX))
        .unwrap()
        .map(|e| e.unwrap().1.value().len())
        .collect();
    (tag, chunks)
}

/// Writes `value` under `key` in `table` with a raw redb handle, as corruption would.
fn write_raw(path: &Path, table: &str, key: &str, value: &[u8]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let def: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new(table);
        txn.open_table(def).unwrap().insert(key, value).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn packages_round_trip() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let hash = [0xab; 32];
    assert!(!store.has_package(&hash).unwrap());
    assert_eq!(store.package(&hash).unwrap(), None);
    store
        .batch(|b| b.put_package(&hash, b"source and manifest"))
        .unwrap();
    assert!(store.has_package(&hash).unwrap());
    assert_eq!(
        store.package(&hash).unwrap().as_deref(),
        Some(&b"source and manifest"[..])
    );
    assert!(!store.has_package(&[0xac; 32]).unwrap());
}

#[test]
fn agents_round_trip() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    assert_eq!(store.agent("a").unwrap(), None);
    assert!(store.agents().unwrap().is_empty());

    let mut waiting = agent("b", 2);
    waiting.state = AgentState::Waiting {
        timeout_at_ms: Some(1_700_000_000_000),
    };
    waiting.launcher = None;
    let mut leaving = agent("c", 4);
    leaving.state = AgentState::Leaving {
        to: "12D3KooWDest".into(),
        hop: 5,
        carried: 0,
        envelope: [9; 32],
        checkpoint: None,
    };
    let mut fresh = agent("a", 0);
    fresh.continuation.clear();
    fresh.envelope.clear();
    for rec in [&leaving, &fresh, &waiting] {
        store.batch(|b| b.put_agent(rec)).unwrap();
    }
    assert_eq!(store.agent("b").unwrap().as_ref(), Some(&waiting));
    assert_eq!(
        store.agents().unwrap(),
        vec![fresh.clone(), waiting.clone(), leaving.clone()]
    );

    // Replacing a record keeps one record per id.
    let mut resumed = leaving.clone();
    resumed.state = AgentState::Ready;
    store.batch(|b| b.put_agent(&resumed)).unwrap();
    assert_eq!(store.agent("c").unwrap(), Some(resumed));
    assert_eq!(store.agents().unwrap().len(), 3);

    store.batch(|b| b.delete_agent("b")).unwrap();
    store.batch(|b| b.delete_agent("not-there")).unwrap();
    assert_eq!(store.agent("b").unwrap(), None);
    assert_eq!(store.agents().unwrap().len(), 2);
}

#[test]
fn continuations_of_every_size_round_trip() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    let sizes = [
        0,
        1,
        100,
        4095,
        4096,
        4097,
        MB - 100,
        MB,
        MB + 1,
        MB + 4095,
        2 * MB + 5000,
        100 * MB,
    ];
    let recs: Vec<AgentRecord> = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            agent_with(
                &format!("agent-{i:02}"),
                i as u64,
                continuation(i as u8, len),
            )
        })
        .collect();
    for rec in &recs {
        store.batch(|b| b.put_agent(rec)).unwrap();
    }
    for rec in &recs {
        assert_same(store.agent(&rec.id).unwrap().as_ref(), rec);
        assert_eq!(store.agent_meta(&rec.id).unwrap(), Some(rec.meta.clone()));
    }
    let listed = store.agents().unwrap();
    assert_eq!(listed.len(), recs.len());
    for (found, rec) in listed.iter().zip(&recs) {
        assert_same(Some(found), rec);
    }
    assert_eq!(
        store.agent_metas().unwrap(),
        recs.iter().map(|r| r.meta.clone()).collect::<Vec<_>>()
    );
    // A batch reads what the transaction sees, its own writes included.
    store
        .batch(|b| {
            assert_same(b.agent("agent-11")?.as_ref(), &recs[11]);
            let replaced = agent_with("agent-11", 99, continuation(0xee, 3 * MB + 7));
            b.put_agent(&replaced)?;
            assert_same(b.agent("agent-11")?.as_ref(), &replaced);
            assert_eq!(b.agent_meta("agent-11")?, Some(replaced.meta.clone()));
            b.put_agent(&recs[11])
        })
        .unwrap();

    // Each continuation replaced by one of another size: nothing of the old one is left.
    let resized: Vec<AgentRecord> = recs
        .iter()
        .enumerate()
        .map(|(i, rec)| {
            let len = sizes[(i + 5) % sizes.len()];
            agent_with(&rec.id, rec.hop + 1, continuation(0x80 | i as u8, len))
        })
        .collect();
    for rec in &resized {
        store.batch(|b| b.put_agent(rec)).unwrap();
    }
    drop(store);
    for (i, rec) in resized.iter().enumerate() {
        let (tag, chunks) = raw_agent(&path, &rec.id);
        let len = rec.continuation.len();
        if len < 4096 {
            assert_eq!((tag, chunks.len()), (Some(0), 0), "{i}");
        } else {
            assert_eq!(tag, Some(1), "{i}");
            assert_eq!(chunks.iter().sum::<usize>(), len, "{i}");
            assert!(
                chunks.iter().all(|&c| (4096..=MB).contains(&c)),
                "{i}: {chunks:?}"
            );
        }
    }
    let store = Store::open(&path, Durability::NoSync).unwrap();
    for rec in &resized {
        assert_same(store.agent(&rec.id).unwrap().as_ref(), rec);
    }
}

#[test]
fn large_continuations_survive_reopen_and_hops() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    let big = agent_with("big", 3, continuation(1, 100 * MB));
    assert_eq!(
        store.batch(|b| b.accept_arrival(&big)).unwrap(),
        Arrival::New
    );
    // A duplicate offer with another continuation writes nothing.
    let other = agent_with("big", 3, continuation(2, 5 * MB));
    assert_eq!(
        store.batch(|b| b.accept_arrival(&other)).unwrap(),
        Arrival::Duplicate
    );
    drop(store);

    let store = Store::open(&path, Durability::Fsync).unwrap();
    assert_same(store.agent("big").unwrap().as_ref(), &big);
    // The departure record, then the acknowledged departure.
    let leaving = AgentRecord {
        meta: AgentMeta {
            state: AgentState::Leaving {
                to: "peer-b".into(),
                hop: 4,
                carried: 0,
                envelope: [9; 32],
                checkpoint: None,
            },
            ..big.meta.clone()
        },
        continuation: continuation(3, 100 * MB + 1),
    };
    store.batch(|b| b.put_agent(&leaving)).unwrap();
    assert_same(store.agent("big").unwrap().as_ref(), &leaving);
    store
        .batch(|b| b.complete_departure("big", "peer-b"))
        .unwrap();
    assert_eq!(store.agent("big").unwrap(), None);
    assert_eq!(store.agent_meta("big").unwrap(), None);
    assert_eq!(store.forward("big").unwrap().as_deref(), Some("peer-b"));
    drop(store);
    assert_eq!(raw_agent(&path, "big"), (None, vec![]));
}

#[test]
fn metadata_reads_and_writes_leave_the_continuation_alone() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let big = agent_with("big", 2, continuation(5, 3 * MB + 11));
    let small = agent_with("small", 1, continuation(6, 10));
    store.batch(|b| b.put_agent(&big)).unwrap();
    store.batch(|b| b.put_agent(&small)).unwrap();
    assert_eq!(store.agent_meta("none").unwrap(), None);
    assert_eq!(store.agent_meta("big").unwrap(), Some(big.meta.clone()));
    assert_eq!(
        store.agent_metas().unwrap(),
        vec![big.meta.clone(), small.meta.clone()]
    );

    // A state change keeps the continuation as stored.
    let ready = AgentMeta {
        state: AgentState::Waiting {
            timeout_at_ms: Some(7),
        },
        hops: 9,
        operations: 0,
        sent: Default::default(),
        ..big.meta.clone()
    };
    assert!(store.batch(|b| b.put_agent_meta(&ready)).unwrap());
    let expected = AgentRecord::from_parts(ready.clone(), big.continuation.clone());
    assert_same(store.agent("big").unwrap().as_ref(), &expected);
    assert!(store
        .batch(|b| {
            let mut meta = b.agent_meta("small")?.expect("small");
            meta.state = AgentState::Ready;
            meta.hop = 4;
            b.put_agent_meta(&meta)
        })
        .unwrap());
    let small_now = store.agent("small").unwrap().unwrap();
    assert_eq!(
        (small_now.hop, &small_now.continuation),
        (4, &small.continuation)
    );

    // An agent that is not stored is not created without its continuation.
    let absent = AgentMeta {
        id: "absent".into(),
        ..ready.clone()
    };
    assert!(!store.batch(|b| b.put_agent_meta(&absent)).unwrap());
    assert_eq!(store.agent_meta("absent").unwrap(), None);
    assert!(matches!(store.agent("absent"), Ok(None)));

    // The parts make the record again.
    let (meta, cont) = (big.meta.clone(), big.continuation.clone());
    assert_eq!(AgentRecord::from_parts(meta, cont), big);
}

#[test]
fn delete_removes_the_record_and_its_continuation() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    for (id, len) in [("a", 0), ("b", 100), ("c", 2 * MB + 3), ("d", 5000)] {
        store
            .batch(|b| b.put_agent(&agent_with(id, 1, continuation(1, len))))
            .unwrap();
    }
    store.batch(|b| b.delete_agent("a")).unwrap();
    store.batch(|b| b.delete_agent("c")).unwrap();
    store.batch(|b| b.complete_departure("d", "peer")).unwrap();
    store.batch(|b| b.delete_agent("nothing")).unwrap();
    assert_eq!(
        store
            .agent_metas()
            .unwrap()
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>(),
        vec!["b"]
    );
    drop(store);
    assert_eq!(raw_agent(&path, "a"), (None, vec![]));
    assert_eq!(raw_agent(&path, "c"), (None, vec![]));
    assert_eq!(raw_agent(&path, "d"), (None, vec![]));
    assert_eq!(raw_agent(&path, "b"), (Some(0), vec![]));
}

#[test]
fn a_failed_batch_or_write_stores_neither_record_nor_continuation() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    let kept = agent_with("kept", 1, continuation(1, 2 * MB + 9));
    let gone = agent_with("gone", 1, continuation(2, 50));
    store.batch(|b| b.put_agent(&kept)).unwrap();
    store.batch(|b| b.put_agent(&gone)).unwrap();

    let err = store
        .batch(|b| {
            b.put_agent(&agent_with("new", 1, continuation(3, 100 * MB)))?;
            assert_eq!(
                b.accept_arrival(&agent_with("arrived", 1, continuation(4, 5000)))?,
                Arrival::New
            );
            b.put_agent(&agent_with("kept", 2, continuation(5, 10)))?;
            b.delete_agent("gone")?;
            Err::<(), _>(StoreError::Schema { found: 0 })
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Schema { found: 0 }), "{err:?}");

    // The same through a group-committed write.
    let runtime = multi_thread_runtime();
    let err = runtime
        .block_on(store.write(|b| {
            b.put_agent(&agent_with("new", 1, continuation(3, 3 * MB)))?;
            b.complete_departure("kept", "peer")?;
            Err::<(), _>(StoreError::Schema { found: 0 })
        }))
        .unwrap_err();
    assert!(matches!(err, StoreError::Schema { found: 0 }), "{err:?}");

    assert_eq!(store.agent("new").unwrap(), None);
    assert_eq!(store.agent("arrived").unwrap(), None);
    assert_same(store.agent("kept").unwrap().as_ref(), &kept);
    assert_same(store.agent("gone").unwrap().as_ref(), &gone);
    drop(store);
    assert_eq!(raw_agent(&path, "new"), (None, vec![]));
    assert_eq!(raw_agent(&path, "arrived"), (None, vec![]));
    assert_eq!(raw_agent(&path, "kept").1.iter().sum::<usize>(), 2 * MB + 9);
}

#[test]
fn each_chunk_has_a_leaf_page_of_its_own() {
    // Small and large continuations, with ids interleaved and written in mixed order: no leaf
    // of the chunk table ever holds two entries, so writing a small continuation never
    // rewrites a page holding a large one.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.redb");
    for round in 0..5u8 {
        let store = Store::open(&path, Durability::NoSync).unwrap();
        for i in [5u32, 0, 9, 2, 7, 1, 8, 3, 6, 4] {
            // First all small (they share leaves), then large ones among them.
            let len = match (round > 0, (i + u32::from(round)) % 3) {
                (false, _) | (true, 0) => 10 + i as usize,
                (true, 1) => 4096 + i as usize,
                (true, _) => MB + 4000 * i as usize,
            };
            store
                .batch(|b| {
                    b.put_agent(&agent_with(
                        &format!("agent-{i}"),
                        1,
                        continuation(round, len),
                    ))
                })
                .unwrap();
        }
        if round == 2 {
            store.batch(|b| b.delete_agent("agent-4")).unwrap();
        }
        drop(store);
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let chunks = txn.open_table(CHUNKS).unwrap();
        assert_eq!(
            chunks.stats().unwrap().leaf_pages(),
            chunks.len().unwrap(),
            "round {round}"
        );
    }
}

#[test]
fn a_missing_continuation_is_an_error_not_an_empty_one() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    store
        .batch(|b| b.put_agent(&agent_with("gap", 1, continuation(1, 3 * MB))))
        .unwrap();
    store
        .batch(|b| b.put_agent(&agent_with("none", 1, continuation(2, 5000))))
        .unwrap();
    drop(store);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut chunks = txn.open_table(CHUNKS).unwrap();
            chunks.remove(("gap", 1)).unwrap();
            chunks.remove(("none", 0)).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path, Durability::NoSync).unwrap();
    for id in ["gap", "none"] {
        match store.agent(id) {
            Err(StoreError::Inconsistent { table, key, .. }) => {
                assert_eq!((table, key.as_str()), ("continuation_chunks", id));
            }
            other => panic!("expected an inconsistency for {id}, got {other:?}"),
        }
        // The metadata is still readable, and the agent can be stored again.
        assert!(store.agent_meta(id).unwrap().is_some());
    }
    assert!(matches!(
        store.agents(),
        Err(StoreError::Inconsistent { .. })
    ));
    assert_eq!(store.agent_metas().unwrap().len(), 2);
    let fixed = agent_with("gap", 2, continuation(3, 2 * MB));
    store.batch(|b| b.put_agent(&fixed)).unwrap();
    assert_same(store.agent("gap").unwrap().as_ref(), &fixed);
    let small = agent_with("none", 2, continuation(4, 10));
    store.batch(|b| b.put_agent(&small)).unwrap();
    assert_same(store.agent("none").unwrap().as_ref(), &small);

    // A record marked as holding its continuation inline, without one.
    drop(store);
    let mut value = vec![0];
    ciborium::into_writer(&agent("inline", 1).meta.clone(), &mut value).unwrap();
    write_raw(&path, "agents", "inline", &value);
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert!(matches!(
        store.agent("inline"),
        Err(StoreError::Inconsistent {
            table: "agents",
            ..
        })
    ));
    assert_eq!(
        store.agent_meta("inline").unwrap(),
        Some(agent("inline", 1).meta.clone())
    );
}

#[test]
fn forwards_locations_and_results_round_trip() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    assert_eq!(store.forward("a").unwrap(), None);
    assert!(store.forwards().unwrap().is_empty());
    assert_eq!(store.location("a").unwrap(), None);
    assert_eq!(store.result("a").unwrap(), None);

    store
        .batch(|b| b.complete_departure("b", "peer-2"))
        .unwrap();
    store
        .batch(|b| b.complete_departure("a", "peer-1"))
        .unwrap();
    assert_eq!(store.forward("a").unwrap().as_deref(), Some("peer-1"));
    assert_eq!(
        store.forwards().unwrap(),
        vec![
            ("a".to_string(), "peer-1".to_string()),
            ("b".to_string(), "peer-2".to_string())
        ]
    );

    store.batch(|b| b.set_location("a", "peer-1")).unwrap();
    store.batch(|b| b.set_location("a", "peer-3")).unwrap();
    assert_eq!(store.location("a").unwrap().as_deref(), Some("peer-3"));

    store.batch(|b| b.put_result("a", b"first")).unwrap();
    store
        .batch(|b| b.put_result("a", b"\x00\xffresult"))
        .unwrap();
    assert_eq!(
        store.result("a").unwrap().as_deref(),
        Some(&b"\x00\xffresult"[..])
    );
}

#[test]
fn data_survives_reopen() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    store.batch(|b| b.put_package(&[1; 32], b"pkg")).unwrap();
    store.batch(|b| b.put_agent(&agent("a", 1))).unwrap();
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("b", 3))).unwrap(),
        Arrival::New
    );
    store
        .batch(|b| b.complete_departure("c", "peer-9"))
        .unwrap();
    store.batch(|b| b.set_location("a", "peer-1")).unwrap();
    store.batch(|b| b.push_message("a", b"m")).unwrap();
    store.batch(|b| b.put_result("d", b"r")).unwrap();
    let clone = store.clone();
    drop(store);
    drop(clone);

    let store = Store::open(&path, Durability::Fsync).unwrap();
    assert_eq!(
        store.package(&[1; 32]).unwrap().as_deref(),
        Some(&b"pkg"[..])
    );
    assert_eq!(store.agents().unwrap(), vec![agent("a", 1), agent("b", 3)]);
    assert!(store.has_seen("b", 3, None).unwrap());
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("b", 3))).unwrap(),
        Arrival::Duplicate
    );
    assert_eq!(store.forward("c").unwrap().as_deref(), Some("peer-9"));
    assert_eq!(store.location("a").unwrap().as_deref(), Some("peer-1"));
    assert_eq!(
        store.batch(|b| b.take_messages("a")).unwrap(),
        vec![b"m".to_vec()]
    );
    assert_eq!(store.result("d").unwrap().as_deref(), Some(&b"r"[..]));
}

#[test]
fn no_sync_commits_survive_a_clean_close() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    store.batch(|b| b.put_agent(&agent("a", 0))).unwrap();
    drop(store);
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert_eq!(store.agent("a").unwrap(), Some(agent("a", 0)));
}

#[test]
fn opening_an_open_file_again_is_an_error() {
    let (_dir, path, _store) = temp_store(Durability::NoSync);
    assert!(matches!(
        Store::open(&path, Durability::NoSync),
        Err(StoreError::Open(_))
    ));
}

#[test]
fn accept_arrival_twice_is_duplicate() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let rec = agent("a", 3);
    assert!(!store.has_seen("a", 3, None).unwrap());
    assert_eq!(
        store.batch(|b| b.accept_arrival(&rec)).unwrap(),
        Arrival::New
    );
    assert!(store.has_seen("a", 3, None).unwrap());
    assert_eq!(store.agent("a").unwrap().as_ref(), Some(&rec));

    // The duplicate writes nothing, even after the agent changed here.
    let ran = AgentRecord {
        continuation: vec![42],
        ..rec.clone()
    };
    store.batch(|b| b.put_agent(&ran)).unwrap();
    assert_eq!(
        store.batch(|b| b.accept_arrival(&rec)).unwrap(),
        Arrival::Duplicate
    );
    assert_eq!(store.agent("a").unwrap(), Some(ran));

    // An older hop of the same agent is a conflict; a later one, or another agent, is new.
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("a", 1))).unwrap(),
        Arrival::Conflict
    );
    assert_eq!(store.remembered_hops("a").unwrap(), [3]);
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("a", 5))).unwrap(),
        Arrival::New
    );
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("a2", 3))).unwrap(),
        Arrival::New
    );
    // Hop 5 committed here (the agent arrived runnable): hop 3 is forgotten, and "seen" means
    // that hop or a later one.
    assert_eq!(store.remembered_hops("a").unwrap(), [5]);
    assert!((1..=5).all(|h| store.has_seen("a", h, None).unwrap()));
    assert!(!store.has_seen("a", 6, None).unwrap());
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("a", 4))).unwrap(),
        Arrival::Conflict
    );

    // The same hop by another envelope is a conflicting claim, and writes nothing.
    let other = AgentRecord {
        meta: AgentMeta {
            envelope: vec![8; 40],
            ..agent("a", 5).meta
        },
        continuation: vec![66],
    };
    assert_eq!(
        store.batch(|b| b.accept_arrival(&other)).unwrap(),
        Arrival::Conflict
    );
    assert_eq!(store.agent("a").unwrap(), Some(agent("a", 5)));

    // What an offer is checked against, in one read: the agent here (if any) and the hop seen,
    // by which envelope.
    let here = store.agent_meta("a").unwrap();
    assert!(here.is_some());
    let (by, other) = (*blake3::hash(&[9; 40]).as_bytes(), [1; 32]);
    let view = |id, hop, envelope: &[u8; 32]| {
        let view = store.arrival_view(id, hop, envelope, |_| None).unwrap();
        assert_eq!(view.resident, store.agent_count().unwrap());
        (view.here, view.seen)
    };
    assert_eq!(view("a", 5, &by), (here.clone(), HopSeen::ByThisEnvelope));
    assert_eq!(
        view("a", 5, &other),
        (here.clone(), HopSeen::ByAnotherEnvelope)
    );
    assert_eq!(view("a", 4, &other), (here.clone(), HopSeen::Later));
    assert_eq!(view("a", 6, &by), (here, HopSeen::No));
    assert_eq!(view("nobody", 3, &by), (None, HopSeen::No));
    // On the agent's home, the same read gives the custody it confirmed.
    assert_eq!(
        store.arrival_view("a", 6, &by, |_| None).unwrap().custody,
        None
    );
    let point = security::CustodyPoint {
        hop: 5,
        holder: security::SecretKey::from_seed([3; 32]).public(),
        envelope: Some(security::EnvelopeHash(by)),
    };
    store.batch(|b| b.set_custody("a", &point)).unwrap();
    let view = store.arrival_view("a", 6, &by, |_| None).unwrap();
    assert_eq!(view.custody, Some(point));
    assert_eq!(view.seen, HopSeen::No);
    assert!(store.has_seen("a", 5, Some(&by)).unwrap());
    assert!(!store.has_seen("a", 5, Some(&other)).unwrap());
}

#[test]
fn only_the_last_committed_hop_of_an_agent_is_remembered() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    // Hops committed at once (the agent arrives runnable): one entry, however many hops.
    for hop in 1..=100 {
        assert_eq!(
            store.batch(|b| b.accept_arrival(&agent("a", hop))).unwrap(),
            Arrival::New
        );
    }
    assert_eq!(store.remembered_hops("a").unwrap(), [100]);

    // A hop still arriving is remembered next to it; aborted, it alone is forgotten; committed,
    // the older one is.
    let arriving = |envelope| {
        let mut rec = agent("a", 101);
        rec.state = AgentState::Arriving {
            from: "peer-b".into(),
            envelope,
            carried: 0,
        };
        rec
    };
    assert_eq!(
        store
            .batch(|b| b.accept_arrival(&arriving([1; 32])))
            .unwrap(),
        Arrival::New
    );
    assert_eq!(store.remembered_hops("a").unwrap(), [100, 101]);
    store
        .batch(|b| b.abort_arrival("a", &[1; 32]))
        .unwrap()
        .unwrap();
    assert_eq!(store.remembered_hops("a").unwrap(), [100]);
    assert_eq!(
        store
            .batch(|b| b.accept_arrival(&arriving([2; 32])))
            .unwrap(),
        Arrival::New
    );
    assert!(store
        .batch(|b| b.commit_arrival("a", &[2; 32]))
        .unwrap()
        .is_some());
    assert_eq!(store.remembered_hops("a").unwrap(), [101]);
    assert!(store.has_seen("a", 100, None).unwrap() && !store.has_seen("a", 102, None).unwrap());
}

/// Agent `id` stored at hop 1, leaving for "peer-b" by hop 2 (envelope hash `[9; 32]`).
fn leaving_for_peer_b(id: &str) -> AgentRecord {
    let mut rec = agent(id, 1);
    rec.state = AgentState::Leaving {
        to: "peer-b".into(),
        hop: 2,
        carried: 0,
        envelope: [9; 32],
        checkpoint: None,
    };
    rec
}

#[test]
fn complete_departure_removes_agent_and_leaves_forward() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let rec = leaving_for_peer_b("a");
    store.batch(|b| b.put_agent(&rec)).unwrap();
    store.batch(|b| b.put_agent(&agent("other", 0))).unwrap();
    store.batch(|b| b.push_message("a", b"for a")).unwrap();

    assert_eq!(store.departed("a").unwrap(), None);
    store
        .batch(|b| b.complete_departure("a", "peer-b"))
        .unwrap();
    assert_eq!(store.agent("a").unwrap(), None);
    assert_eq!(store.agents().unwrap(), vec![agent("other", 0)]);
    assert_eq!(store.forward("a").unwrap().as_deref(), Some("peer-b"));
    // The hop it left by, for a destination that asks whether it committed.
    assert_eq!(store.departed("a").unwrap(), Some([9; 32]));
    // Queued messages stay, for the node to forward.
    assert_eq!(
        store.batch(|b| b.take_messages("a")).unwrap(),
        vec![b"for a".to_vec()]
    );

    // Idempotent: a repeated acknowledgement after a crash changes nothing.
    store
        .batch(|b| b.complete_departure("a", "peer-b"))
        .unwrap();
    assert_eq!(store.forward("a").unwrap().as_deref(), Some("peer-b"));

    // When the agent comes back, it lives here again and the pointer goes.
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("a", 7))).unwrap(),
        Arrival::New
    );
    assert_eq!(store.forward("a").unwrap(), None);
    assert_eq!(store.agent("a").unwrap(), Some(agent("a", 7)));
}

#[test]
fn complete_departure_by_completes_only_the_hop_named() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let rec = leaving_for_peer_b("a");
    store.batch(|b| b.put_agent(&rec)).unwrap();
    store.batch(|b| b.put_agent(&agent("ready", 2))).unwrap();

    // Another hop, an agent that is not leaving, or none at all: nothing is written.
    for (id, hop) in [("a", 3), ("ready", 2), ("missing", 2)] {
        let done = store
            .batch(|b| b.complete_departure_by(id, hop, "peer-b"))
            .unwrap();
        assert_eq!(done, None, "{id} at hop {hop}");
        assert_eq!(store.forward(id).unwrap(), None);
    }
    assert_eq!(store.agent("a").unwrap(), Some(rec.clone()));

    // The hop it is leaving by: completed, and its metadata as it was comes back.
    let done = store
        .batch(|b| b.complete_departure_by("a", 2, "peer-b"))
        .unwrap();
    assert_eq!(done, Some(rec.meta.clone()));
    assert_eq!(store.agent("a").unwrap(), None);
    assert_eq!(store.forward("a").unwrap().as_deref(), Some("peer-b"));
    assert_eq!(store.departed("a").unwrap(), Some([9; 32]));
}

/// A departure removes the messages its offer carried and leaves those that came after the
/// hop read the queue: they stay queued, for an agent no longer here, until they are taken one
/// by one to be forwarded (or put back, when they could not go out), and a restarted node
/// finds them.
#[test]
fn a_departure_leaves_the_messages_that_came_after_its_offer() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    store
        .batch(|b| b.put_agent(&leaving_for_peer_b("a")))
        .unwrap();
    let carried = store.batch(|b| b.push_message("a", b"carried")).unwrap();
    let late = store.batch(|b| b.push_message("a", b"late")).unwrap();
    let later = store.batch(|b| b.push_message("a", b"later")).unwrap();
    assert!(carried < late && late < later);
    let left = store
        .batch(|b| {
            b.complete_departure_by("a", 2, "peer-b")?;
            b.drop_oldest_messages("a", 1)
        })
        .unwrap();
    assert_eq!(left, vec![late, later]);
    assert_eq!(store.agent("a").unwrap(), None);
    assert_eq!(store.message_count("a").unwrap(), 2);
    drop(store);
    let store = Store::open(&path, Durability::Fsync).unwrap();
    assert_eq!(
        store.left_behind().unwrap(),
        vec![("a".to_string(), vec![late, later])]
    );
    assert_eq!(
        store.batch(|b| b.take_message("a", later)).unwrap(),
        Some(b"later".to_vec())
    );
    assert_eq!(store.batch(|b| b.take_message("a", later)).unwrap(), None);
    assert_eq!(store.messages("a").unwrap(), vec![b"late".to_vec()]);
    assert_eq!(store.message_count("a").unwrap(), 1);
    // Put back (it could not be sent), in its place; never over another.
    store
        .batch(|b| b.put_message("a", later, b"later"))
        .unwrap();
    assert_eq!(
        store.messages("a").unwrap(),
        vec![b"late".to_vec(), b"later".to_vec()]
    );
    assert!(store.batch(|b| b.put_message("a", late, b"other")).is_err());
    assert_eq!(
        store.batch(|b| b.take_message("a", later)).unwrap(),
        Some(b"later".to_vec())
    );
    assert_eq!(store.message_count("a").unwrap(), 1);
    assert_eq!(
        store.batch(|b| b.take_message("a", late)).unwrap(),
        Some(b"late".to_vec())
    );
    assert_eq!(store.message_count("a").unwrap(), 0);
    assert!(store.left_behind().unwrap().is_empty());
}

/// The agent comes back from peer-b (hop 3) before this node completed its departure by hop 2:
/// the arrival completes it. The message it took along comes back in the offer and is queued
/// once; the one that came while it was away stays, before it; the late completion finds the
/// new arrival and does nothing.
#[test]
fn an_agent_back_before_its_departure_completed_has_each_message_once() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let mut rec = leaving_for_peer_b("a");
    if let AgentState::Leaving { carried, .. } = &mut rec.state {
        *carried = 1;
    }
    store
        .batch(|b| b.push_message("a", b"taken along"))
        .unwrap();
    store.batch(|b| b.put_agent(&rec)).unwrap();
    store.batch(|b| b.push_message("a", b"came later")).unwrap();

    let back = agent("a", 3);
    store
        .batch(|b| {
            assert_eq!(b.accept_arrival(&back)?, Arrival::New);
            b.complete_return("a", &[9; 32], "peer-b", 1)?;
            // The offer's message.
            b.push_message("a", b"taken along").map(drop)
        })
        .unwrap();
    assert_eq!(store.departed("a").unwrap(), Some([9; 32]));
    assert_eq!(
        store
            .batch(|b| b.complete_departure_by("a", 2, "peer-b"))
            .unwrap(),
        None
    );
    assert_eq!(store.agent("a").unwrap(), Some(back));
    assert_eq!(store.forward("a").unwrap(), None);
    assert_eq!(
        store.messages("a").unwrap(),
        vec![b"came later".to_vec(), b"taken along".to_vec()]
    );
    assert_eq!(store.message_count("a").unwrap(), 2);
}

#[test]
fn message_fifo_order_across_reopen() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    let mut seqs = Vec::new();
    for i in 0..5u8 {
        seqs.push(store.batch(|b| b.push_message("a", &[i])).unwrap());
        store.batch(|b| b.push_message("b", &[100 + i])).unwrap();
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(store.message_count("a").unwrap(), 5);
    assert_eq!(store.batch(|b| b.pop_message("a")).unwrap(), Some(vec![0]));
    drop(store);

    let store = Store::open(&path, Durability::Fsync).unwrap();
    assert_eq!(store.batch(|b| b.pop_message("a")).unwrap(), Some(vec![1]));
    // Sequence numbers keep growing after a reopen.
    let after = store.batch(|b| b.push_message("a", &[5])).unwrap();
    assert!(after > *seqs.last().unwrap());
    assert_eq!(
        store.batch(|b| b.take_messages("a")).unwrap(),
        vec![vec![2], vec![3], vec![4], vec![5]]
    );
    assert_eq!(store.batch(|b| b.pop_message("a")).unwrap(), None);
    assert!(store.batch(|b| b.take_messages("a")).unwrap().is_empty());
    assert_eq!(store.message_count("a").unwrap(), 0);
    // Another agent's queue, and ids that are prefixes of each other, stay apart.
    store.batch(|b| b.push_message("", b"empty id")).unwrap();
    store.batch(|b| b.push_message("bb", b"bb")).unwrap();
    assert_eq!(
        store.batch(|b| b.take_messages("b")).unwrap(),
        (100..105).map(|i| vec![i]).collect::<Vec<_>>()
    );
    assert_eq!(
        store.batch(|b| b.take_messages("")).unwrap(),
        vec![b"empty id".to_vec()]
    );
    assert_eq!(
        store.batch(|b| b.take_messages("bb")).unwrap(),
        vec![b"bb".to_vec()]
    );
}

#[test]
fn queue_sizes_follow_every_push_pop_and_take() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    let size = |store: &Store, id: &str| store.batch(|b| b.queued(id)).unwrap();
    assert_eq!(size(&store, "a"), QueueSize::default());
    store.batch(|b| b.push_message("a", &[1; 10])).unwrap();
    store.batch(|b| b.push_message("a", &[2; 30])).unwrap();
    store.batch(|b| b.push_message("ab", &[3; 7])).unwrap();
    let two = QueueSize {
        messages: 2,
        bytes: 40,
    };
    assert_eq!(size(&store, "a"), two);
    assert_eq!(store.message_count("a").unwrap(), 2);
    // A failed batch leaves the sizes as they were.
    let failed = store.batch(|b| {
        b.push_message("a", &[9; 100])?;
        Err::<(), _>(StoreError::Schema { found: 0 })
    });
    assert!(failed.is_err());
    assert_eq!(size(&store, "a"), two);
    store.batch(|b| b.pop_message("a")).unwrap();
    assert_eq!(
        size(&store, "a"),
        QueueSize {
            messages: 1,
            bytes: 30
        }
    );
    drop(store);
    let store = Store::open(&path, Durability::NoSync).unwrap();
    store.batch(|b| b.take_messages("a")).unwrap();
    assert_eq!(size(&store, "a"), QueueSize::default());
    assert_eq!(
        size(&store, "ab"),
        QueueSize {
            messages: 1,
            bytes: 7
        }
    );
    store.batch(|b| b.pop_message("ab")).unwrap();
    assert_eq!(size(&store, "ab"), QueueSize::default());
}

/// A schema 2 file (no `queued` table) opens as schema 3, its queues counted.
#[test]
fn a_schema_2_file_is_upgraded_with_its_queues_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
            let mut meta = txn.open_table(meta).unwrap();
            meta.insert("schema", 2).unwrap();
            meta.insert("next_message_seq", 3).unwrap();
            let messages: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
            let mut messages = txn.open_table(messages).unwrap();
            messages.insert(("a", 0), [1u8; 5].as_slice()).unwrap();
            messages.insert(("b", 1), [2u8; 6].as_slice()).unwrap();
            messages.insert(("a", 2), [3u8; 7].as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert_eq!(
        store.batch(|b| b.queued("a")).unwrap(),
        QueueSize {
            messages: 2,
            bytes: 12
        }
    );
    assert_eq!(store.message_count("b").unwrap(), 1);
    assert_eq!(
        store.batch(|b| b.pop_message("a")).unwrap(),
        Some(vec![1; 5])
    );
    drop(store);
    // Once upgraded, it opens as schema 4 without counting again.
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert_eq!(store.message_count("a").unwrap(), 1);
}

/// A schema 3 file kept the hops it accepted without their envelopes: they stay seen, by any
/// envelope (as before), and the old table goes.
#[test]
fn a_schema_3_file_keeps_its_seen_hops() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.redb");
    let old_seen: TableDefinition<(&str, u64), ()> = TableDefinition::new("seen");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
            txn.open_table(meta).unwrap().insert("schema", 3).unwrap();
            let mut seen = txn.open_table(old_seen).unwrap();
            seen.insert(("a", 4), ()).unwrap();
        }
        txn.commit().unwrap();
    }
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert!(store.has_seen("a", 4, Some(&[5; 32])).unwrap());
    assert!(store.has_seen("a", 2, None).unwrap());
    assert!(!store.has_seen("a", 5, None).unwrap());
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("a", 4))).unwrap(),
        Arrival::Duplicate
    );
    drop(store);
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(txn.open_table(old_seen).is_err(), "the old table is gone");
}

#[test]
fn batch_commits_everything_together() {
    let (_dir, _path, store) = temp_store(Durability::Fsync);
    store.batch(|b| b.put_agent(&agent("a", 1))).unwrap();
    let seq = store
        .batch(|b| {
            let mut rec = b.agent("a")?.expect("agent a");
            rec.hop += 1;
            b.put_agent(&rec)?;
            b.put_package(&[5; 32], b"p")?;
            b.put_result("a", b"r")?;
            b.set_location("a", "peer-1")?;
            assert_eq!(b.accept_arrival(&agent("z", 1))?, Arrival::New);
            assert_eq!(b.accept_arrival(&agent("z", 1))?, Arrival::Duplicate);
            b.push_message("a", b"m1")?;
            let seq = b.push_message("a", b"m2")?;
            assert_eq!(b.pop_message("a")?, Some(b"m1".to_vec()));
            b.complete_departure("gone", "peer-2")?;
            Ok(seq)
        })
        .unwrap();
    assert_eq!(store.agent("a").unwrap().map(|r| r.hop), Some(2));
    assert!(store.has_package(&[5; 32]).unwrap());
    assert_eq!(store.result("a").unwrap().as_deref(), Some(&b"r"[..]));
    assert_eq!(store.location("a").unwrap().as_deref(), Some("peer-1"));
    assert!(store.has_seen("z", 1, None).unwrap());
    assert_eq!(
        store.batch(|b| b.take_messages("a")).unwrap(),
        vec![b"m2".to_vec()]
    );
    assert_eq!(store.forward("gone").unwrap().as_deref(), Some("peer-2"));
    assert!(seq > 0);
}

#[test]
fn batch_error_leaves_nothing_written() {
    let (_dir, _path, store) = temp_store(Durability::Fsync);
    store.batch(|b| b.put_agent(&agent("a", 1))).unwrap();
    store.batch(|b| b.push_message("a", b"kept")).unwrap();

    let err = store
        .batch(|b| {
            b.put_package(&[5; 32], b"p")?;
            b.delete_agent("a")?;
            b.put_agent(&agent("new", 0))?;
            assert_eq!(b.take_messages("a")?, vec![b"kept".to_vec()]);
            b.push_message("a", b"lost")?;
            assert_eq!(b.accept_arrival(&agent("z", 1))?, Arrival::New);
            b.complete_departure("a", "peer-2")?;
            b.set_location("a", "peer-2")?;
            b.put_result("a", b"r")?;
            Err::<(), _>(StoreError::Schema { found: 0 })
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Schema { found: 0 }), "{err:?}");

    assert!(!store.has_package(&[5; 32]).unwrap());
    assert_eq!(store.agents().unwrap(), vec![agent("a", 1)]);
    assert_eq!(
        store.batch(|b| b.take_messages("a")).unwrap(),
        vec![b"kept".to_vec()]
    );
    assert!(!store.has_seen("z", 1, None).unwrap());
    assert_eq!(store.forward("a").unwrap(), None);
    assert_eq!(store.location("a").unwrap(), None);
    assert_eq!(store.result("a").unwrap(), None);
    // The store still works after the aborted batch.
    assert_eq!(
        store.batch(|b| b.accept_arrival(&agent("z", 1))).unwrap(),
        Arrival::New
    );
}

#[test]
fn corrupt_agent_record_is_an_error_not_a_panic() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    store.batch(|b| b.put_agent(&agent("good", 0))).unwrap();
    drop(store);
    write_raw(&path, "agents", "bad", b"\xff\x00garbage");

    let store = Store::open(&path, Durability::NoSync).unwrap();
    for err in [store.agent("bad").unwrap_err(), store.agents().unwrap_err()] {
        match &err {
            StoreError::Decode { table, key, .. } => {
                assert_eq!((*table, key.as_str()), ("agents", "bad"));
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert_eq!(err.to_string(), "cannot decode agents entry \"bad\"");
        assert!(std::error::Error::source(&err).is_some());
    }
    // Valid CBOR of the wrong shape is an error too.
    drop(store);
    write_raw(&path, "agents", "bad", b"\x01");
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert!(matches!(store.agent("bad"), Err(StoreError::Decode { .. })));
    // Other records are still readable, and the bad one can be replaced.
    assert_eq!(store.agent("good").unwrap(), Some(agent("good", 0)));
    store.batch(|b| b.put_agent(&agent("bad", 1))).unwrap();
    assert_eq!(store.agents().unwrap().len(), 2);
}

#[test]
fn unknown_schema_is_refused() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    drop(store);
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            txn.open_table(def).unwrap().insert("schema", 99).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = Store::open(&path, Durability::NoSync).unwrap_err();
    assert!(matches!(err, StoreError::Schema { found: 99 }), "{err:?}");

    // Schema 1 kept continuations inside the agent records: refused too, not misread.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
            txn.open_table(def).unwrap().insert("schema", 1).unwrap();
        }
        txn.commit().unwrap();
    }
    let err = Store::open(&path, Durability::NoSync).unwrap_err();
    assert!(matches!(err, StoreError::Schema { found: 1 }), "{err:?}");
}

#[test]
fn ten_thousand_agents_stored_and_listed() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    for i in 0..10_000u64 {
        store
            .batch(|b| b.put_agent(&agent(&format!("agent-{i:05}"), i)))
            .unwrap();
    }
    let all = store.agents().unwrap();
    assert_eq!(all.len(), 10_000);
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, r)| r.id == format!("agent-{i:05}") && r.hop == i as u64));
    drop(store);
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert_eq!(store.agents().unwrap().len(), 10_000);
}

#[test]
fn clones_write_from_many_threads() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Store>();

    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..100u8)
                    .map(|i| store.batch(|b| b.push_message("a", &[t, i])).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 400);
    let messages = store.batch(|b| b.take_messages("a")).unwrap();
    assert_eq!(messages.len(), 400);
    // Each thread's messages come out in the order that thread pushed them.
    for t in 0..4u8 {
        let mine: Vec<u8> = messages
            .iter()
            .filter(|m| m[0] == t)
            .map(|m| m[1])
            .collect();
        assert_eq!(mine, (0..100).collect::<Vec<_>>());
    }
}

fn multi_thread_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

type WriteFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

/// Starts `store.write(op)` and polls it once, which queues it (or runs it, if no write is
/// being led); the future is returned to be awaited or dropped.
fn queue_write<T: Send + 'static>(
    store: &Store,
    op: impl FnOnce(&mut platform::store::Batch<'_>) -> Result<T, StoreError> + Send + 'static,
) -> WriteFuture<T> {
    let store = store.clone();
    let mut fut: WriteFuture<T> = Box::pin(async move { store.write(op).await });
    let polled = fut
        .as_mut()
        .poll(&mut Context::from_waker(noop_waker_ref()));
    assert!(polled.is_pending(), "the write should wait for the leader");
    fut
}

/// A write that holds the store's write leadership: its op blocks until [`Self::finish`].
/// Writes made meanwhile queue up and run together in the next transaction.
struct BlockedLeader {
    release: mpsc::Sender<()>,
    done: mpsc::Receiver<()>,
}

impl BlockedLeader {
    /// Starts the blocking write on a plain thread with no runtime (the leader then drains the
    /// queue itself), or as a task on `runtime` (the leader then hands the rest of the queue to
    /// a blocking thread).
    fn start(store: &Store, runtime: Option<&tokio::runtime::Runtime>) -> BlockedLeader {
        let (started_tx, started_rx) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        let store = store.clone();
        let task = async move {
            let write = store.write(move |b| {
                started_tx.send(()).unwrap();
                let _ = release_rx.recv();
                b.put_result("leader", b"done")
            });
            write.await.unwrap();
            done_tx.send(()).unwrap();
        };
        match runtime {
            Some(runtime) => drop(runtime.spawn(task)),
            None => drop(std::thread::spawn(|| futures::executor::block_on(task))),
        }
        started_rx.recv().unwrap();
        BlockedLeader { release, done }
    }

    fn finish(self) {
        self.release.send(()).unwrap();
        self.done.recv().unwrap();
    }
}

/// The leader modes [`BlockedLeader::start`] knows.
fn leader_modes() -> [Option<tokio::runtime::Runtime>; 2] {
    [None, Some(multi_thread_runtime())]
}

#[test]
fn write_futures_are_send() {
    fn assert_send<F: Future + Send>(_: F) {}
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    assert_send(store.write(|b| b.put_result("a", b"r")));
}

#[test]
fn concurrent_writes_all_land_in_order_and_answer_their_caller() {
    const TASKS: u8 = 64;
    const OPS: u8 = 50;
    for durability in [Durability::NoSync, Durability::Fsync] {
        let (_dir, _path, store) = temp_store(durability);
        let runtime = multi_thread_runtime();
        let results = runtime.block_on(async {
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        let mut seqs = Vec::new();
                        for i in 0..OPS {
                            let (who, seq) = store
                                .write(move |b| {
                                    let seq = b.push_message("a", &[t, i])?;
                                    Ok(((t, i), seq))
                                })
                                .await
                                .unwrap();
                            assert_eq!(who, (t, i), "a result went to the wrong caller");
                            seqs.push(seq);
                        }
                        seqs
                    })
                })
                .collect();
            let mut all = Vec::new();
            for task in tasks {
                all.push(task.await.unwrap());
            }
            all
        });
        let messages = store.batch(|b| b.take_messages("a")).unwrap();
        assert_eq!(messages.len(), usize::from(TASKS) * usize::from(OPS));
        for t in 0..TASKS {
            let mine: Vec<u8> = messages
                .iter()
                .filter(|m| m[0] == t)
                .map(|m| m[1])
                .collect();
            assert_eq!(mine, (0..OPS).collect::<Vec<_>>(), "task {t}");
            // Sequence numbers are handed out in queue order, so each task's grow.
            let seqs = &results[usize::from(t)];
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        }
        let mut seqs: Vec<u64> = results.into_iter().flatten().collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), messages.len());
    }
}

#[test]
fn writes_in_one_group_see_each_other() {
    for runtime in leader_modes() {
        let (_dir, _path, store) = temp_store(Durability::Fsync);
        let leader = BlockedLeader::start(&store, runtime.as_ref());
        // Queued behind the blocked leader: they run together in the next transaction.
        let arrive = queue_write(&store, |b| b.accept_arrival(&agent("x", 1)));
        let depart = queue_write(&store, |b| {
            let here = b.agent("x")?.is_some();
            b.complete_departure("x", "peer-2")?;
            Ok(here)
        });
        let after = queue_write(&store, |b| Ok((b.agent("x")?, b.push_message("x", b"m")?)));
        leader.finish();

        futures::executor::block_on(async {
            assert_eq!(arrive.await.unwrap(), Arrival::New);
            assert!(depart.await.unwrap(), "the departure saw the arrival");
            let (rec, _seq) = after.await.unwrap();
            assert_eq!(rec, None);
        });
        assert_eq!(store.agent("x").unwrap(), None);
        assert!(store.has_seen("x", 1, None).unwrap());
        assert_eq!(store.forward("x").unwrap().as_deref(), Some("peer-2"));
        assert_eq!(
            store.result("leader").unwrap().as_deref(),
            Some(&b"done"[..])
        );
    }
}

#[test]
fn a_failing_write_aborts_the_writes_before_it_and_not_those_after() {
    for runtime in leader_modes() {
        let (_dir, _path, store) = temp_store(Durability::Fsync);
        let leader = BlockedLeader::start(&store, runtime.as_ref());
        let before = queue_write(&store, |b| {
            b.put_result("before", b"r")?;
            b.push_message("q", b"lost")
        });
        let failing = queue_write(&store, |b| {
            b.put_result("failing", b"r")?;
            Err::<(), _>(StoreError::Schema { found: 7 })
        });
        let after = queue_write(&store, |b| b.put_result("after", b"r"));
        leader.finish();

        futures::executor::block_on(async {
            match before.await {
                Err(StoreError::BatchAborted(cause)) => {
                    assert!(cause.contains("another write"), "{cause}");
                    assert!(cause.contains("schema 7"), "{cause}");
                }
                other => panic!("expected BatchAborted, got {other:?}"),
            }
            let err = failing.await.unwrap_err();
            assert!(matches!(err, StoreError::Schema { found: 7 }), "{err:?}");
            after.await.unwrap();
        });
        assert_eq!(store.result("before").unwrap(), None);
        assert_eq!(store.result("failing").unwrap(), None);
        assert_eq!(store.message_count("q").unwrap(), 0);
        assert_eq!(store.result("after").unwrap().as_deref(), Some(&b"r"[..]));

        // Later writes, alone or grouped, still work.
        futures::executor::block_on(store.write(|b| b.put_result("later", b"r"))).unwrap();
        assert!(store.result("later").unwrap().is_some());
    }
}

#[test]
fn an_uncontended_failing_write_returns_its_own_error() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let err = futures::executor::block_on(store.write(|b| {
        b.put_result("a", b"r")?;
        Err::<(), _>(StoreError::Schema { found: 3 })
    }))
    .unwrap_err();
    assert!(matches!(err, StoreError::Schema { found: 3 }), "{err:?}");
    assert_eq!(store.result("a").unwrap(), None);
    futures::executor::block_on(store.write(|b| b.put_result("a", b"r"))).unwrap();
    assert!(store.result("a").unwrap().is_some());
}

#[test]
fn a_panicking_write_does_not_wedge_the_store() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    // Alone: the panicking caller led its own group.
    let err = futures::executor::block_on(store.write(|b| -> Result<(), StoreError> {
        b.put_result("alone", b"r")?;
        panic!("boom alone")
    }))
    .unwrap_err();
    match err {
        StoreError::Panicked(message) => assert_eq!(message, "boom alone"),
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert_eq!(store.result("alone").unwrap(), None);
    futures::executor::block_on(store.write(|b| b.put_result("next", b"r"))).unwrap();

    // In a group: the writes before it are abandoned, those after it run.
    for runtime in leader_modes() {
        let leader = BlockedLeader::start(&store, runtime.as_ref());
        let before = queue_write(&store, |b| b.put_result("before", b"r"));
        let panicking = queue_write(&store, |_| -> Result<(), StoreError> {
            panic!("boom {}", 42)
        });
        let after = queue_write(&store, |b| b.put_result("after", b"r"));
        leader.finish();
        futures::executor::block_on(async {
            match before.await {
                Err(StoreError::BatchAborted(cause)) => {
                    assert!(cause.contains("boom 42"), "{cause}")
                }
                other => panic!("expected BatchAborted, got {other:?}"),
            }
            match panicking.await {
                Err(StoreError::Panicked(message)) => assert_eq!(message, "boom 42"),
                other => panic!("expected Panicked, got {other:?}"),
            }
            after.await.unwrap();
        });
        assert_eq!(store.result("before").unwrap(), None);
        assert!(store.result("after").unwrap().is_some());
        assert!(store.result("next").unwrap().is_some());
    }
}

#[test]
fn a_dropped_write_still_runs_and_others_are_unaffected() {
    for runtime in leader_modes() {
        let (_dir, _path, store) = temp_store(Durability::NoSync);
        let leader = BlockedLeader::start(&store, runtime.as_ref());
        let first = queue_write(&store, |b| b.push_message("q", b"1"));
        let dropped = queue_write(&store, |b| b.push_message("q", b"2"));
        let last = queue_write(&store, |b| b.push_message("q", b"3"));
        drop(dropped);
        leader.finish();
        futures::executor::block_on(async {
            first.await.unwrap();
            last.await.unwrap();
        });
        assert_eq!(
            store.messages("q").unwrap(),
            vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]
        );
    }
}

/// Once writes contended, the next write to find no leader waits one turn before leading (so
/// that writes ready meanwhile join its group); dropped during that turn, it still runs, and
/// so do the writes that joined it.
#[test]
fn a_write_dropped_while_it_waits_to_lead_still_runs_with_those_that_joined_it() {
    for runtime in leader_modes() {
        let (_dir, _path, store) = temp_store(Durability::NoSync);
        let leader = BlockedLeader::start(&store, runtime.as_ref());
        let joined = queue_write(&store, |b| b.push_message("q", b"1"));
        leader.finish();
        futures::executor::block_on(joined).unwrap();
        // The store is busy now: this write leads after one turn, and is dropped during it.
        let waiting = queue_write(&store, |b| b.push_message("q", b"2"));
        let behind = queue_write(&store, |b| b.push_message("q", b"3"));
        drop(waiting);
        futures::executor::block_on(behind).unwrap();
        assert_eq!(
            store.messages("q").unwrap(),
            vec![b"1".to_vec(), b"2".to_vec(), b"3".to_vec()]
        );
    }
}

#[test]
fn more_writes_than_a_group_holds_all_commit() {
    for runtime in leader_modes() {
        let (_dir, _path, store) = temp_store(Durability::NoSync);
        let leader = BlockedLeader::start(&store, runtime.as_ref());
        let n = MAX_GROUP * 2 + 3;
        let writes: Vec<_> = (0..n)
            .map(|i| queue_write(&store, move |b| b.push_message("q", &i.to_be_bytes())))
            .collect();
        leader.finish();
        futures::executor::block_on(async {
            for w in writes {
                w.await.unwrap();
            }
        });
        let expected: Vec<Vec<u8>> = (0..n).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(store.messages("q").unwrap(), expected);
    }
}

#[test]
fn a_hand_off_refused_by_a_shut_down_runtime_does_not_wedge_the_store() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let (started_tx, started_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let leader_store = store.clone();
    let leader = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        runtime.shutdown_background();
        // The leader finds a runtime, but its blocking pool refuses the hand-off.
        let _entered = handle.enter();
        futures::executor::block_on(leader_store.write(move |b| {
            started_tx.send(()).unwrap();
            let _ = release_rx.recv();
            b.put_result("leader", b"done")
        }))
        .unwrap();
    });
    started_rx.recv().unwrap();
    let queued = queue_write(&store, |b| b.put_result("queued", b"r"));
    release_tx.send(()).unwrap();
    leader.join().unwrap();
    // The queued write was never run, and says so.
    match futures::executor::block_on(queued) {
        Err(StoreError::BatchAborted(cause)) => assert!(cause.contains("stopped"), "{cause}"),
        other => panic!("expected BatchAborted, got {other:?}"),
    }
    assert_eq!(store.result("queued").unwrap(), None);
    assert!(store.result("leader").unwrap().is_some());
    // The leadership was released with it.
    futures::executor::block_on(store.write(|b| b.put_result("after", b"r"))).unwrap();
    assert!(store.result("after").unwrap().is_some());
}

#[test]
fn a_write_refused_a_blocking_thread_by_a_shut_down_current_thread_runtime_is_abandoned() {
    let (_dir, _path, store) = temp_store(Durability::Fsync);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    runtime.shutdown_background();
    // With fsync, on a current-thread runtime the leader hands even its own write to a
    // blocking thread, which this runtime refuses: the write says it was not run.
    let entered = handle.enter();
    match futures::executor::block_on(store.write(|b| b.put_result("refused", b"r"))) {
        Err(StoreError::BatchAborted(cause)) => assert!(cause.contains("stopped"), "{cause}"),
        other => panic!("expected BatchAborted, got {other:?}"),
    }
    drop(entered);
    assert_eq!(store.result("refused").unwrap(), None);
    // The leadership was released with it.
    futures::executor::block_on(store.write(|b| b.put_result("after", b"r"))).unwrap();
    assert!(store.result("after").unwrap().is_some());
}

#[test]
fn writes_queued_while_a_leader_commits_are_not_lost() {
    // Many short rounds of a few racing writers: a write queued just as the leader finds the
    // queue empty must still be committed (a lost wake-up would hang a round).
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let runtime = multi_thread_runtime();
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(60);
        for round in 0..2_000u32 {
            let tasks: Vec<_> = (0..4u32)
                .map(|t| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store
                            .write(move |b| b.put_result(&format!("{round}-{t}"), b"r"))
                            .await
                    })
                })
                .collect();
            for task in tasks {
                tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: a write hung"))
                    .unwrap()
                    .unwrap();
            }
            assert!(Instant::now() < deadline, "too slow at round {round}");
        }
    });
    // Writers from plain threads with no runtime, mixed with sync batches, too.
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..500u32 {
                    if i % 5 == 0 {
                        store
                            .batch(|b| b.put_result(&format!("sync-{t}-{i}"), b"r"))
                            .unwrap();
                    } else {
                        futures::executor::block_on(
                            store.write(move |b| b.put_result(&format!("t-{t}-{i}"), b"r")),
                        )
                        .unwrap();
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(store.result("1999-3").unwrap().is_some());
    assert!(store.result("t-3-499").unwrap().is_some());
    assert!(store.result("sync-3-495").unwrap().is_some());
}

/// Throughput of `batch` on `spawn_blocking` against group-committed `write`, for many tasks
/// writing at once. Run with
/// `cargo test --release -p platform --test store -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check"]
fn measure_batch_against_write() {
    for (tasks, durability) in [
        (1, Durability::NoSync),
        (64, Durability::NoSync),
        (1, Durability::Fsync),
        (64, Durability::Fsync),
    ] {
        let ops = match durability {
            Durability::NoSync => 12_800,
            Durability::Fsync => 1_280,
        };
        let ops_per_task = ops / tasks;
        for via_write in [false, true] {
            let (_dir, _path, store) = temp_store(durability);
            let runtime = multi_thread_runtime();
            let started = Instant::now();
            runtime.block_on(async {
                let handles: Vec<_> = (0..tasks)
                    .map(|t| {
                        let store = store.clone();
                        tokio::spawn(async move {
                            for i in 0..ops_per_task {
                                // About what a hop writes: a record and a queued message.
                                let rec = agent(&format!("agent-{t}"), i as u64);
                                let op = move |b: &mut platform::store::Batch<'_>| {
                                    b.put_agent(&rec)?;
                                    b.push_message(&rec.id, &[0; 64])
                                };
                                if via_write {
                                    store.write(op).await.unwrap();
                                } else {
                                    let store = store.clone();
                                    tokio::task::spawn_blocking(move || store.batch(op))
                                        .await
                                        .unwrap()
                                        .unwrap();
                                }
                            }
                        })
                    })
                    .collect();
                for handle in handles {
                    handle.await.unwrap();
                }
            });
            let elapsed = started.elapsed();
            println!(
                "{durability:?} {tasks:>2} tasks {:>23}: {ops} ops in {elapsed:.2?} = {:.0} ops/s",
                if via_write {
                    "write (group commit)"
                } else {
                    "batch in spawn_blocking"
                },
                ops as f64 / elapsed.as_secs_f64()
            );
        }
    }
}

/// Agent `id` arriving by hop `hop` with envelope hash `envelope`, stored as an arrival would
/// be: the record, and the messages that came with it.
fn arrive(store: &Store, id: &str, hop: u64, envelope: [u8; 32], carried: &[&[u8]]) -> Arrival {
    let mut rec = agent(id, hop);
    rec.state = AgentState::Arriving {
        from: "12D3KooWSource".into(),
        envelope,
        carried: carried.len() as u64,
    };
    store
        .batch(|b| {
            let arrival = b.accept_arrival(&rec)?;
            for m in carried {
                b.push_message(id, m)?;
            }
            Ok(arrival)
        })
        .unwrap()
}

#[test]
fn an_arrival_commits_or_is_dropped_by_its_envelope_only() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let (first, second, other) = ([1; 32], [2; 32], [7; 32]);
    store
        .batch(|b| b.complete_departure("a", "peer-c"))
        .unwrap();
    assert_eq!(arrive(&store, "a", 2, first, &[b"carried"]), Arrival::New);
    let later = store
        .batch(|b| b.push_message("a", b"arrived later"))
        .unwrap();
    let meta = store.agent_meta("a").unwrap().unwrap();
    assert!(meta.arriving_by(&first) && !meta.arriving_by(&other));

    // Another hop's decision changes nothing.
    assert_eq!(
        store.batch(|b| b.commit_arrival("a", &other)).unwrap(),
        None
    );
    assert_eq!(store.batch(|b| b.abort_arrival("a", &other)).unwrap(), None);
    assert_eq!(store.agent_meta("a").unwrap(), Some(meta));

    // Dropped: the record, the messages that came with it, and the hop, which may arrive again;
    // what was queued since stays behind, to be forwarded.
    let queued = store.batch(|b| b.abort_arrival("a", &first)).unwrap();
    assert_eq!(queued, Some(vec![later]));
    assert_eq!(store.agent("a").unwrap(), None);
    assert_eq!(
        store.messages("a").unwrap(),
        vec![b"arrived later".to_vec()]
    );
    assert_eq!(
        store.left_behind().unwrap(),
        vec![("a".to_string(), vec![later])]
    );
    assert_eq!(
        store.batch(|b| b.take_message("a", later)).unwrap(),
        Some(b"arrived later".to_vec())
    );
    assert_eq!(store.message_count("a").unwrap(), 0);
    assert!(!store.has_seen("a", 2, None).unwrap());

    // The same hop number again, by another envelope: committed, it is runnable, its hop seen,
    // and it lives here (no forwarding pointer).
    assert_eq!(arrive(&store, "a", 2, second, &[]), Arrival::New);
    let ready = store.batch(|b| b.commit_arrival("a", &second)).unwrap();
    let ready = ready.expect("committed");
    assert_eq!(ready.state, AgentState::Ready);
    assert_eq!(store.agent_meta("a").unwrap(), Some(ready));
    assert_eq!(
        store.agent("a").unwrap().unwrap().continuation,
        vec![1, 2, 3, 2]
    );
    assert!(store.has_seen("a", 2, None).unwrap());
    assert_eq!(store.forward("a").unwrap(), None);
    // Settled: a late decision about it changes nothing.
    assert_eq!(
        store.batch(|b| b.commit_arrival("a", &second)).unwrap(),
        None
    );
    assert_eq!(
        store.batch(|b| b.abort_arrival("a", &second)).unwrap(),
        None
    );
    assert_eq!(arrive(&store, "a", 2, second, &[]), Arrival::Duplicate);
}

#[test]
fn unsynced_writes_land_and_survive_a_clean_close() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    multi_thread_runtime().block_on(async {
        store
            .write_unsynced(|b| b.put_result("a", b"unsynced"))
            .await
            .unwrap();
        assert_eq!(
            store.result("a").unwrap().as_deref(),
            Some(&b"unsynced"[..])
        );
        // In one group with a synced write, or just before it.
        let (x, y) = tokio::join!(
            store.write_unsynced(|b| b.put_result("b", b"unsynced")),
            store.write(|b| b.put_result("c", b"synced")),
        );
        x.unwrap();
        y.unwrap();
    });
    drop(store);
    let store = Store::open(&path, Durability::Fsync).unwrap();
    for (id, value) in [("a", "unsynced"), ("b", "unsynced"), ("c", "synced")] {
        assert_eq!(store.result(id).unwrap().as_deref(), Some(value.as_bytes()));
    }
}

/// The bytes the store counts (`Store::stored_bytes`), recounted from the file with a raw redb
/// handle once the store is closed: what the counted tables hold, and the total the store
/// recorded beside them.
fn raw_stored_bytes(path: &Path) -> (u64, Option<u64>) {
    /// The values of a table, and the part of each key that `key_len` says is counted.
    fn sum<K: redb::Key + 'static>(
        txn: &redb::ReadTransaction,
        name: &str,
        key_len: impl Fn(K::SelfType<'_>) -> usize,
    ) -> u64 {
        let def: TableDefinition<K, &[u8]> = TableDefinition::new(name);
        let table = txn.open_table(def).unwrap();
        let mut total = 0;
        for entry in redb::ReadableTable::iter(&table).unwrap() {
            let (k, v) = entry.unwrap();
            total += (key_len(k.value()) + v.value().len()) as u64;
        }
        total
    }
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_read().unwrap();
    let counted = sum::<[u8; 32]>(&txn, "packages", |_| 0)
        + sum::<&str>(&txn, "agents", |_| 0)
        + sum::<(&str, u32)>(&txn, "continuation_chunks", |_| 0)
        + sum::<(&str, u64)>(&txn, "messages", |_| 0)
        + sum::<&str>(&txn, "results", |_| 0)
        + sum::<(&str, &str)>(&txn, "resource_tables", |k| k.1.len())
        + sum::<(&str, &str, u64)>(&txn, "resource_cache", |k| k.1.len());
    let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
    let recorded = txn
        .open_table(meta)
        .unwrap()
        .get("stored_bytes")
        .unwrap()
        .map(|v| v.value());
    (counted, recorded)
}

#[test]
fn stored_bytes_follow_every_write_and_are_counted_for_an_older_file() {
    let (_dir, path, mut store) = temp_store(Durability::NoSync);
    let runtime = multi_thread_runtime();
    // A small deterministic generator: the same mix of writes on every run.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut most = 0;
    for step in 0..120 {
        let id = format!("agent-{}", next(6));
        // Inline and chunked continuations, and lengths around the chunk boundaries.
        let len = [10, 4000, 4096, 70_000, MB + 5, 3 * MB][next(6) as usize];
        let rec = agent_with(&id, step, continuation(step as u8, len));
        let message = vec![7u8; next(3000) as usize];
        let op = next(14);
        let wrote = match op {
            0 | 1 => store.batch(|b| b.put_agent(&rec)),
            2 => store.batch(|b| b.delete_agent(&id)),
            3 => store.batch(|b| {
                let mut meta = rec.meta.clone();
                meta.launcher = Some("x".repeat(next(500) as usize));
                b.put_agent_meta(&meta).map(drop)
            }),
            4 => store.batch(|b| b.push_message(&id, &message).map(drop)),
            5 => store.batch(|b| b.pop_message(&id).map(drop)),
            6 => runtime.block_on(store.write({
                let id = id.clone();
                move |b| b.take_messages(&id).map(drop)
            })),
            7 => store.batch(|b| b.put_result(&id, &message)),
            8 => store.batch(|b| b.put_package(&[next(3) as u8; 32], &message)),
            10 => store.batch(|b| b.table_set(&format!("t{}", next(2)), &id, &message)),
            11 => store.batch(|b| b.table_remove(&format!("t{}", next(2)), &id).map(drop)),
            12 => store.batch(|b| b.cache_chunk(&id, "node-0\0shard\0lines", next(3), &message)),
            13 => store.batch(|b| b.drop_cached_chunks(&id)),
            // A write that fails after writing: nothing of it counts.
            _ => store.batch(|b| {
                b.put_agent(&rec)?;
                b.push_message(&id, &message)?;
                Err(StoreError::Schema { found: 0 })
            }),
        };
        assert_eq!(wrote.is_err(), op == 9, "step {step}: {wrote:?}");
        most = most.max(store.stored_bytes());
        if step % 10 == 9 {
            let before = store.stored_bytes();
            drop(store);
            assert_eq!(
                raw_stored_bytes(&path),
                (before, Some(before)),
                "step {step}"
            );
            store = Store::open(&path, Durability::NoSync).unwrap();
            assert_eq!(store.stored_bytes(), before);
        }
    }
    assert!(most > 3 * MB as u64, "the mix stored little: {most}");
    let before = store.stored_bytes();
    drop(store);
    // A file written before the total existed is counted when it is opened.
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let meta: TableDefinition<&str, u64> = TableDefinition::new("meta");
        txn.open_table(meta)
            .unwrap()
            .remove("stored_bytes")
            .unwrap();
    }
    txn.commit().unwrap();
    drop(db);
    assert_eq!(raw_stored_bytes(&path), (before, None));
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert_eq!(store.stored_bytes(), before);
}

#[test]
fn resource_tables_keep_their_entries_sorted_counted_and_apart() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    store
        .batch(|b| {
            for key in ["b", "a", "c", ""] {
                b.table_set("counts", key, key.as_bytes())?;
            }
            b.table_set("counts", "a", b"again")?;
            // A table whose name sorts right after: its keys are not the first table's.
            b.table_set("counts2", "a", b"other")?;
            b.table_set("count", "z", b"before")
        })
        .unwrap();
    assert_eq!(store.table_len("counts").unwrap(), 4);
    assert_eq!(
        store.table_get("counts", "a").unwrap().as_deref(),
        Some(&b"again"[..])
    );
    assert_eq!(store.table_get("counts", "zz").unwrap(), None);
    assert_eq!(
        store.table_keys("counts", 0, 10).unwrap(),
        ["", "a", "b", "c"]
    );
    assert_eq!(store.table_keys("counts", 1, 2).unwrap(), ["a", "b"]);
    assert_eq!(
        store.table_keys("counts", 9, 2).unwrap(),
        Vec::<String>::new()
    );
    let removed = store.batch(|b| b.table_remove("counts", "b")).unwrap();
    assert_eq!(removed.as_deref(), Some(&b"b"[..]));
    assert_eq!(
        store.batch(|b| b.table_remove("counts", "b")).unwrap(),
        None
    );
    drop(store);
    let store = Store::open(&path, Durability::NoSync).unwrap();
    assert_eq!(store.table_len("counts").unwrap(), 3);
    assert_eq!(store.table_keys("counts2", 0, 10).unwrap(), ["a"]);
    assert_eq!(store.table_count().unwrap(), 3);
    store
        .batch(|b| {
            for key in ["", "a", "c"] {
                b.table_remove("counts", key)?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(store.table_len("counts").unwrap(), 0);
    assert_eq!(store.table_count().unwrap(), 2);
}
