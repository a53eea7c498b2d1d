//! What the store and the node do when the disk fails or the power goes (issue 12, item 7 and
//! its test plan), on a simulated disk (`tern_tests::disk`): a committed write survives a power
//! loss at any later point, a write cut anywhere leaves all of itself or nothing, and a node
//! whose disk fails stops without reporting an end it could not store; restarted, it runs the
//! agent on from what was stored and reports the end once.

use std::time::Duration;

use platform::node::{Node, NodeConfig};
use platform::store::{AgentMeta, AgentRecord, AgentState, Durability, Store};
use platform::wire::AgentEnd;
use security::SecretKey;
use tern_tests::disk::SimulatedDisk;
use tern_tests::{eventually, package};

fn agent(id: &str, continuation_len: usize) -> AgentRecord {
    AgentRecord::from_parts(
        AgentMeta {
            id: id.to_string(),
            package: [3; 32],
            hop: 1,
            hops: 1,
            operations: 7,
            sent: Default::default(),
            home: "12D3KooWHome".to_string(),
            launcher: None,
            state: AgentState::Ready,
            envelope: vec![9; 40],
            handover: None,
            tail: Vec::new(),
            nonce: [5; 16],
            certificate: Vec::new(),
        },
        (0..continuation_len).map(|i| (i % 251) as u8).collect(),
    )
}

/// The agents a store holds, with their continuations' lengths, sorted.
fn held(store: &Store) -> Vec<(String, usize)> {
    let mut v: Vec<_> = store
        .agents()
        .unwrap()
        .into_iter()
        .map(|r| (r.id.clone(), r.continuation.len()))
        .collect();
    v.sort();
    v
}

/// Power lost at every point of a commit, keeping any subset of what was not synced yet (some
/// writes torn): the store opens, every write committed before is there, and the commit in
/// flight is there whole or not at all; once it returned, it is there whatever the disk kept.
#[test]
fn a_power_loss_anywhere_keeps_what_was_committed_and_nothing_half_written() {
    let disk = SimulatedDisk::new();
    let store = Store::open_on(disk.clone(), Durability::Fsync).unwrap();
    for (id, len) in [("a", 100), ("b", 300_000), ("c", 10)] {
        store.batch(|b| b.put_agent(&agent(id, len))).unwrap();
    }
    let before = held(&store);
    // In flight: one agent replaced by a larger one (its continuation moves to chunks), one
    // deleted, one added, and a result kept: all or nothing.
    disk.record();
    store
        .batch(|b| {
            b.put_agent(&agent("a", 2_000_000))?;
            b.delete_agent("b")?;
            b.put_agent(&agent("d", 5000))?;
            b.put_result("b", b"ended")
        })
        .unwrap();
    let after = held(&store);
    drop(store);
    let events = disk.recorded();
    assert!(events > 3, "a commit asked the disk only {events} things");
    let mut seen = [0usize; 2];
    for at in 0..=events {
        for seed in 0..8 {
            let lost = disk.after_power_loss(at, seed);
            let store = Store::open_on(lost, Durability::Fsync)
                .unwrap_or_else(|e| panic!("power lost at {at}/{events}, seed {seed}: {e}"));
            let now = held(&store);
            let result = store.result("b").unwrap();
            if now == before && result.is_none() {
                seen[0] += 1;
            } else if now == after && result.as_deref() == Some(&b"ended"[..]) {
                seen[1] += 1;
            } else {
                panic!("power lost at {at}/{events}, seed {seed}: {now:?}, result {result:?}");
            }
            if at == events {
                assert_eq!(now, after, "committed, then lost at seed {seed}");
            }
        }
    }
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    eprintln!("{events} events in the commit; power lost {seen:?} times before / after it");
}

/// The disk fails while an agent waits: the node cannot store the agent's next state nor its
/// end, so it reports no end and stops. Started again on the same disk, now working, it runs
/// the agent on from its last stored state and ends it once.
#[test]
fn a_node_whose_disk_fails_stops_and_its_agent_ends_once_after_a_restart() {
    let rt = tern_tests::runtime();
    rt.block_on(async {
        let disk = SimulatedDisk::new();
        let dir = tempfile::tempdir().unwrap();
        let (package, trust) = package("let m = receive(300); [m, 42]");
        let key = SecretKey::generate();
        let config = |store| NodeConfig {
            store: Some(store),
            ..NodeConfig::local("solo", key.clone(), dir.path().to_path_buf(), trust.clone())
        };
        let store = Store::open_on(disk.clone(), Durability::Fsync).unwrap();
        let node = Node::start(config(store)).await.unwrap();
        let (id, mut end) = node.launch(package, None).unwrap();
        let waiting = || {
            matches!(
                node.agent(&id),
                Ok(Some(AgentMeta {
                    state: AgentState::Waiting { .. },
                    ..
                }))
            )
        };
        eventually(waiting).await;
        disk.fail(true);
        // Its timeout comes: neither the answer nor the end can be stored, and the node stops.
        tokio::time::timeout(Duration::from_secs(10), node.stopped())
            .await
            .expect("the node stops when its disk fails");
        assert!(node.store_failure().is_some());
        node.stop().await;
        assert!(end.try_recv().is_err(), "an end was reported");
        drop(node);

        disk.fail(false);
        let store = Store::open_on(disk.clone(), Durability::Fsync).unwrap();
        let reader = store.clone();
        let node = Node::start(config(store)).await.unwrap();
        eventually(|| matches!(reader.result(&id), Ok(Some(_)))).await;
        let stored = reader.result(&id).unwrap().unwrap();
        let end: AgentEnd = ciborium::from_reader(stored.as_slice()).unwrap();
        match end {
            AgentEnd::Finished { json, .. } => assert_eq!(json, "[null,42]"),
            other => panic!("{other:?}"),
        }
        assert!(node.agent(&id).unwrap().is_none());
        node.stop().await;
    });
}
