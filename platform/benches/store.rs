//! What the node's store costs: a small agent record committed with and without fsync (against a
//! raw 4 KiB write + fsync of the same disk); agent records with a 100 MB continuation stored,
//! read, listed and carried through the store side of a hop (against the floors: a fresh copy
//! of 100 MB, a raw 100 MB write + fsync); and a small record written next to a 100 MB one.
//!
//! `cargo bench -p platform --bench store` (add a filter, e.g. `-- 100MB`, to run some).

use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use platform::store::{AgentMeta, AgentRecord, AgentState, Arrival, Durability, Store};
use tempfile::TempDir;

const BIG: usize = 100 * 1024 * 1024;

fn record(id: &str, hop: u64, continuation: Vec<u8>) -> AgentRecord {
    AgentRecord {
        meta: AgentMeta {
            id: id.to_owned(),
            package: [3; 32],
            hop,
            hops: hop,
            operations: 0,
            sent: Default::default(),
            home: "12D3KooWHomeNodePeerIdText0000000000000000000000".to_owned(),
            launcher: Some("12D3KooWLauncherPeerIdText00000000000000000000".to_owned()),
            state: AgentState::Ready,
            envelope: vec![9; 300],
            handover: Some(platform::wire::HandoverKey([4; 32])),
            tail: Vec::new(),
            nonce: [5; 16],
            certificate: vec![6; 200],
        },
        continuation,
    }
}

/// Bytes that no layer could shortcut (not all zero, not one repeated byte).
fn bulk(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn open(durability: Durability) -> (TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("tern.redb"), durability).expect("open store");
    (dir, store)
}

fn name(d: Durability) -> &'static str {
    match d {
        Durability::Fsync => "Fsync",
        Durability::NoSync => "NoSync",
    }
}

fn small(c: &mut Criterion) {
    let mut group = c.benchmark_group("small");
    for d in [Durability::NoSync, Durability::Fsync] {
        let (_dir, store) = open(d);
        let rec = record("agent-small", 1, vec![7; 2048]);
        store.batch(|b| b.put_agent(&rec)).expect("put");
        group.bench_function(BenchmarkId::new("put_agent", name(d)), |b| {
            b.iter(|| store.batch(|w| w.put_agent(black_box(&rec))).expect("put"))
        });
        group.bench_function(BenchmarkId::new("agent", name(d)), |b| {
            b.iter(|| store.agent(black_box("agent-small")).expect("read"))
        });
    }
    // The floor under any durable commit: one 4 KiB write and one fdatasync of the same disk.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = File::create(dir.path().join("raw")).expect("raw file");
    file.set_len(1 << 20).expect("set_len");
    file.sync_all().expect("sync");
    let page = [5u8; 4096];
    group.bench_function("raw 4KiB write+fdatasync", |b| {
        b.iter(|| {
            file.write_all_at(&page, 4096).expect("write");
            file.sync_data().expect("sync");
        })
    });
    group.finish();
}

fn big(c: &mut Criterion) {
    let mut group = c.benchmark_group("100MB");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5));
    let continuation = bulk(BIG);
    // The floors: what any read of a 100 MB continuation into a fresh vector costs (one
    // allocation, its page faults, one copy), and what any durable write of it costs.
    group.bench_function("floor: clone (fresh vector + copy)", |b| {
        b.iter(|| black_box(&continuation).clone())
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let file = File::create(dir.path().join("raw")).expect("raw file");
    file.write_all_at(&continuation, 0).expect("write");
    file.sync_all().expect("sync");
    group.bench_function("floor: raw write+fdatasync", |b| {
        b.iter(|| {
            file.write_all_at(&continuation, 0).expect("write");
            file.sync_data().expect("sync");
        })
    });
    for d in [Durability::NoSync, Durability::Fsync] {
        let (_dir, store) = open(d);
        let rec = record("agent-big", 1, continuation.clone());
        store.batch(|b| b.put_agent(&rec)).expect("put");
        group.bench_function(BenchmarkId::new("put_agent (replace)", name(d)), |b| {
            b.iter(|| store.batch(|w| w.put_agent(black_box(&rec))).expect("put"))
        });
        group.bench_function(BenchmarkId::new("agent", name(d)), |b| {
            b.iter(|| store.agent(black_box("agent-big")).expect("read"))
        });
        group.bench_function(BenchmarkId::new("agents", name(d)), |b| {
            b.iter(|| store.agents().expect("list"))
        });
        group.bench_function(BenchmarkId::new("agent_meta", name(d)), |b| {
            b.iter(|| store.agent_meta(black_box("agent-big")).expect("read"))
        });
        group.bench_function(BenchmarkId::new("agent_metas", name(d)), |b| {
            b.iter(|| store.agent_metas().expect("list"))
        });
        // The store side of a hop through this node: the arrival is stored, the departure
        // record replaces it, the acknowledged departure deletes it.
        store
            .batch(|b| b.delete_agent("agent-big"))
            .expect("delete");
        let mut hop = 1;
        let mut r = rec.clone();
        group.bench_function(
            BenchmarkId::new("hop (arrive, leave, depart)", name(d)),
            |b| {
                b.iter(|| {
                    hop += 1;
                    r.hop = hop;
                    r.state = AgentState::Ready;
                    assert_eq!(
                        store.batch(|w| w.accept_arrival(&r)).expect("arrive"),
                        Arrival::New
                    );
                    r.state = AgentState::Leaving {
                        to: "peer".into(),
                        hop: hop + 1,
                        carried: 0,
                        envelope: [9; 32],
                        checkpoint: None,
                    };
                    store.batch(|w| w.put_agent(&r)).expect("leave");
                    store
                        .batch(|w| w.complete_departure("agent-big", "peer"))
                        .expect("depart");
                })
            },
        );
    }
    group.finish();
}

/// A small agent's record written again and again while a 100 MB agent is stored next to it
/// (ids adjacent, the small ones first): the small write must not copy the large continuation.
fn neighbour(c: &mut Criterion) {
    let mut group = c.benchmark_group("next to 100MB");
    let (_dir, store) = open(Durability::NoSync);
    for id in ["agent-a", "agent-c", "agent-d", "agent-e"] {
        store
            .batch(|b| b.put_agent(&record(id, 1, vec![7; 1500])))
            .expect("put");
    }
    store
        .batch(|b| b.put_agent(&record("agent-b", 1, bulk(BIG))))
        .expect("put");
    let small = record("agent-a", 2, vec![8; 1500]);
    group.bench_function("put_agent small/NoSync", |b| {
        b.iter(|| {
            store
                .batch(|w| w.put_agent(black_box(&small)))
                .expect("put")
        })
    });
    group.finish();
}

/// Writes of a small record through `Store::write` from tasks: one task writing one record after
/// another (a time per write), and 64 tasks writing at once (a time per 64 writes, which group
/// commit shares among them).
fn write(c: &mut Criterion) {
    const TASKS: u64 = 64;
    let mut group = c.benchmark_group("write");
    let runtimes = [
        (
            "multi-thread",
            tokio::runtime::Builder::new_multi_thread()
                .build()
                .expect("runtime"),
        ),
        (
            "current-thread",
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime"),
        ),
    ];
    for d in [Durability::NoSync, Durability::Fsync] {
        let (_dir, store) = open(d);
        let rec = Arc::new(record("agent-small", 1, vec![7; 2048]));
        for (flavor, runtime) in &runtimes {
            for tasks in [1, TASKS] {
                let id = format!("put_agent, {tasks} task(s), {flavor}");
                group.bench_function(BenchmarkId::new(id, name(d)), |b| {
                    b.iter_custom(|iters| {
                        runtime.block_on(async {
                            let start = Instant::now();
                            let writers: Vec<_> = (0..tasks)
                                .map(|_| {
                                    let (store, rec) = (store.clone(), rec.clone());
                                    tokio::spawn(async move {
                                        for _ in 0..iters {
                                            let rec = rec.clone();
                                            store.write(move |w| w.put_agent(&rec)).await?;
                                        }
                                        Ok::<_, platform::store::StoreError>(())
                                    })
                                })
                                .collect();
                            for writer in writers {
                                writer.await.expect("task").expect("write");
                            }
                            start.elapsed()
                        })
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, small, big, neighbour, write);
criterion_main!(benches);
