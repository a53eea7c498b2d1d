//! The node's embedded store through its public API: every table round trips, data survives a
//! reopen, hops are accepted once, batches are all-or-nothing, corruption is an error.

use std::path::{Path, PathBuf};

use platform::store::{AgentRecord, AgentState, Arrival, Durability, Store, StoreError};
use tempfile::TempDir;

fn temp_store(durability: Durability) -> (TempDir, PathBuf, Store) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.redb");
    let store = Store::open(&path, durability).unwrap();
    (dir, path, store)
}

fn agent(id: &str, hop: u64) -> AgentRecord {
    AgentRecord {
        id: id.to_string(),
        package: [3; 32],
        hop,
        hops: hop,
        home: "12D3KooWHome".to_string(),
        launcher: Some("12D3KooWLauncher".to_string()),
        state: AgentState::Ready,
        continuation: vec![1, 2, 3, hop as u8],
        envelope: vec![9; 40],
    }
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
    store.put_package(&hash, b"source and manifest").unwrap();
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
    };
    let mut fresh = agent("a", 0);
    fresh.continuation.clear();
    fresh.envelope.clear();
    for rec in [&leaving, &fresh, &waiting] {
        store.put_agent(rec).unwrap();
    }
    assert_eq!(store.agent("b").unwrap().as_ref(), Some(&waiting));
    assert_eq!(
        store.agents().unwrap(),
        vec![fresh.clone(), waiting.clone(), leaving.clone()]
    );

    // Replacing a record keeps one record per id.
    let resumed = AgentRecord {
        state: AgentState::Ready,
        ..leaving.clone()
    };
    store.put_agent(&resumed).unwrap();
    assert_eq!(store.agent("c").unwrap(), Some(resumed));
    assert_eq!(store.agents().unwrap().len(), 3);

    store.delete_agent("b").unwrap();
    store.delete_agent("not-there").unwrap();
    assert_eq!(store.agent("b").unwrap(), None);
    assert_eq!(store.agents().unwrap().len(), 2);
}

#[test]
fn forwards_locations_and_results_round_trip() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    assert_eq!(store.forward("a").unwrap(), None);
    assert!(store.forwards().unwrap().is_empty());
    assert_eq!(store.location("a").unwrap(), None);
    assert_eq!(store.result("a").unwrap(), None);

    store.complete_departure("b", "peer-2").unwrap();
    store.complete_departure("a", "peer-1").unwrap();
    assert_eq!(store.forward("a").unwrap().as_deref(), Some("peer-1"));
    assert_eq!(
        store.forwards().unwrap(),
        vec![
            ("a".to_string(), "peer-1".to_string()),
            ("b".to_string(), "peer-2".to_string())
        ]
    );

    store.set_location("a", "peer-1").unwrap();
    store.set_location("a", "peer-3").unwrap();
    assert_eq!(store.location("a").unwrap().as_deref(), Some("peer-3"));

    store.put_result("a", b"first").unwrap();
    store.put_result("a", b"\x00\xffresult").unwrap();
    assert_eq!(
        store.result("a").unwrap().as_deref(),
        Some(&b"\x00\xffresult"[..])
    );
}

#[test]
fn data_survives_reopen() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    store.put_package(&[1; 32], b"pkg").unwrap();
    store.put_agent(&agent("a", 1)).unwrap();
    assert_eq!(store.accept_arrival(&agent("b", 3)).unwrap(), Arrival::New);
    store.complete_departure("c", "peer-9").unwrap();
    store.set_location("a", "peer-1").unwrap();
    store.push_message("a", b"m").unwrap();
    store.put_result("d", b"r").unwrap();
    let clone = store.clone();
    drop(store);
    drop(clone);

    let store = Store::open(&path, Durability::Fsync).unwrap();
    assert_eq!(
        store.package(&[1; 32]).unwrap().as_deref(),
        Some(&b"pkg"[..])
    );
    assert_eq!(store.agents().unwrap(), vec![agent("a", 1), agent("b", 3)]);
    assert!(store.has_seen("b", 3).unwrap());
    assert_eq!(
        store.accept_arrival(&agent("b", 3)).unwrap(),
        Arrival::Duplicate
    );
    assert_eq!(store.forward("c").unwrap().as_deref(), Some("peer-9"));
    assert_eq!(store.location("a").unwrap().as_deref(), Some("peer-1"));
    assert_eq!(store.take_messages("a").unwrap(), vec![b"m".to_vec()]);
    assert_eq!(store.result("d").unwrap().as_deref(), Some(&b"r"[..]));
}

#[test]
fn no_sync_commits_survive_a_clean_close() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    store.put_agent(&agent("a", 0)).unwrap();
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
    assert!(!store.has_seen("a", 3).unwrap());
    assert_eq!(store.accept_arrival(&rec).unwrap(), Arrival::New);
    assert!(store.has_seen("a", 3).unwrap());
    assert_eq!(store.agent("a").unwrap().as_ref(), Some(&rec));

    // The duplicate writes nothing, even after the agent changed here.
    let ran = AgentRecord {
        continuation: vec![42],
        ..rec.clone()
    };
    store.put_agent(&ran).unwrap();
    assert_eq!(store.accept_arrival(&rec).unwrap(), Arrival::Duplicate);
    assert_eq!(store.agent("a").unwrap(), Some(ran));

    // An older hop of the same agent is stale; a later one, or another agent, is new.
    assert_eq!(
        store.accept_arrival(&agent("a", 1)).unwrap(),
        Arrival::Duplicate
    );
    assert!(!store.has_seen("a", 1).unwrap());
    assert_eq!(store.accept_arrival(&agent("a", 5)).unwrap(), Arrival::New);
    assert_eq!(store.accept_arrival(&agent("a2", 3)).unwrap(), Arrival::New);
    assert!(store.has_seen("a", 3).unwrap() && store.has_seen("a", 5).unwrap());
    assert!(!store.has_seen("a", 4).unwrap());
}

#[test]
fn complete_departure_removes_agent_and_leaves_forward() {
    let (_dir, _path, store) = temp_store(Durability::NoSync);
    let mut rec = agent("a", 1);
    rec.state = AgentState::Leaving {
        to: "peer-b".into(),
        hop: 2,
        carried: 0,
    };
    store.put_agent(&rec).unwrap();
    store.put_agent(&agent("other", 0)).unwrap();
    store.push_message("a", b"for a").unwrap();

    store.complete_departure("a", "peer-b").unwrap();
    assert_eq!(store.agent("a").unwrap(), None);
    assert_eq!(store.agents().unwrap(), vec![agent("other", 0)]);
    assert_eq!(store.forward("a").unwrap().as_deref(), Some("peer-b"));
    // Queued messages stay, for the node to forward.
    assert_eq!(store.take_messages("a").unwrap(), vec![b"for a".to_vec()]);

    // Idempotent: a repeated acknowledgement after a crash changes nothing.
    store.complete_departure("a", "peer-b").unwrap();
    assert_eq!(store.forward("a").unwrap().as_deref(), Some("peer-b"));

    // When the agent comes back, it lives here again and the pointer goes.
    assert_eq!(store.accept_arrival(&agent("a", 7)).unwrap(), Arrival::New);
    assert_eq!(store.forward("a").unwrap(), None);
    assert_eq!(store.agent("a").unwrap(), Some(agent("a", 7)));
}

#[test]
fn message_fifo_order_across_reopen() {
    let (_dir, path, store) = temp_store(Durability::Fsync);
    let mut seqs = Vec::new();
    for i in 0..5u8 {
        seqs.push(store.push_message("a", &[i]).unwrap());
        store.push_message("b", &[100 + i]).unwrap();
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(store.message_count("a").unwrap(), 5);
    assert_eq!(store.pop_message("a").unwrap(), Some(vec![0]));
    drop(store);

    let store = Store::open(&path, Durability::Fsync).unwrap();
    assert_eq!(store.pop_message("a").unwrap(), Some(vec![1]));
    // Sequence numbers keep growing after a reopen.
    let after = store.push_message("a", &[5]).unwrap();
    assert!(after > *seqs.last().unwrap());
    assert_eq!(
        store.take_messages("a").unwrap(),
        vec![vec![2], vec![3], vec![4], vec![5]]
    );
    assert_eq!(store.pop_message("a").unwrap(), None);
    assert!(store.take_messages("a").unwrap().is_empty());
    assert_eq!(store.message_count("a").unwrap(), 0);
    // Another agent's queue, and ids that are prefixes of each other, stay apart.
    store.push_message("", b"empty id").unwrap();
    store.push_message("bb", b"bb").unwrap();
    assert_eq!(
        store.take_messages("b").unwrap(),
        (100..105).map(|i| vec![i]).collect::<Vec<_>>()
    );
    assert_eq!(store.take_messages("").unwrap(), vec![b"empty id".to_vec()]);
    assert_eq!(store.take_messages("bb").unwrap(), vec![b"bb".to_vec()]);
}

#[test]
fn batch_commits_everything_together() {
    let (_dir, _path, store) = temp_store(Durability::Fsync);
    store.put_agent(&agent("a", 1)).unwrap();
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
    assert!(store.has_seen("z", 1).unwrap());
    assert_eq!(store.take_messages("a").unwrap(), vec![b"m2".to_vec()]);
    assert_eq!(store.forward("gone").unwrap().as_deref(), Some("peer-2"));
    assert!(seq > 0);
}

#[test]
fn batch_error_leaves_nothing_written() {
    let (_dir, _path, store) = temp_store(Durability::Fsync);
    store.put_agent(&agent("a", 1)).unwrap();
    store.push_message("a", b"kept").unwrap();

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
    assert_eq!(store.take_messages("a").unwrap(), vec![b"kept".to_vec()]);
    assert!(!store.has_seen("z", 1).unwrap());
    assert_eq!(store.forward("a").unwrap(), None);
    assert_eq!(store.location("a").unwrap(), None);
    assert_eq!(store.result("a").unwrap(), None);
    // The store still works after the aborted batch.
    assert_eq!(store.accept_arrival(&agent("z", 1)).unwrap(), Arrival::New);
}

#[test]
fn corrupt_agent_record_is_an_error_not_a_panic() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    store.put_agent(&agent("good", 0)).unwrap();
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
    store.put_agent(&agent("bad", 1)).unwrap();
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
}

#[test]
fn ten_thousand_agents_stored_and_listed() {
    let (_dir, path, store) = temp_store(Durability::NoSync);
    for i in 0..10_000u64 {
        store
            .put_agent(&agent(&format!("agent-{i:05}"), i))
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
                    .map(|i| store.push_message("a", &[t, i]).unwrap())
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
    let messages = store.take_messages("a").unwrap();
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
