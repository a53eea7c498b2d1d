//! Writes valid inputs for every fuzz target into `fuzz/corpus/<target>/`, made with the
//! crates' own encoders: libFuzzer mutates these instead of discovering the formats byte by
//! byte (a continuation names its program's 32-byte hash; envelopes and packages carry keys
//! that must decompress).
//!
//! Run from `fuzz/`: `cargo run --release -p tern-fuzz-seeds`. Keys come from fixed seeds, so
//! the output is the same each time (the files are named by their content's hash).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_lang::rhai::{Array, Dynamic, FnPtr, Map};
use agent_lang::{
    decode_portable, encode_portable, Execution, HostEnv, Limits, Outcome, Program, Resume,
};
use platform::store::{AgentMeta, AgentState, MovedDataset, ResourcePlace};
use platform::wire::{
    push_frame, Activity, ActivityCounts, AgentEnd, AgentStatus, ClientRequest, ControlRefusal,
    ControlReply, ControlRequest, CustodyLink, HandoverKey, HopDecision, HopHandover, HopOffer,
    HopRefusal, HopReply, PackageReply, PackageRequest, RecentEvent, ResourceOp, ResourceReply,
    ResourceRequest, StatusReport,
};
use security::{
    AgentId, CustodyCertificate, CustodyPoint, EnvelopeHash, HopEnvelope, HopFields, Manifest,
    Package, PackageLimits, ResourceDecl, ResourcePolicy, SecretKey, FIRST_HOP,
};

/// The fuzz targets' limits (`tern_fuzz::limits`): the program hash does not depend on them,
/// but the seeds are made under the same ones.
fn limits() -> Limits {
    Limits::default()
        .with_max_operations(20_000)
        .with_max_string_size(1 << 16)
        .with_max_array_size(1 << 12)
        .with_max_map_size(1 << 12)
        .with_max_continuation_bytes(1 << 20)
}

const TRAVELLER: &str = include_str!("../../programs/traveller.rhai");
const RECEIVER: &str = include_str!("../../programs/receiver.rhai");

struct Corpus {
    dir: PathBuf,
    written: usize,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Corpus {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        Corpus { dir, written: 0 }
    }

    fn put(&mut self, bytes: &[u8]) {
        let name = format!("seed-{}", &blake3::hash(bytes).to_hex()[..16]);
        std::fs::write(self.dir.join(name), bytes).expect("write a seed");
        self.written += 1;
    }
}

impl Drop for Corpus {
    fn drop(&mut self) {
        println!("{}: {} seeds", self.dir.display(), self.written);
    }
}

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

fn envelopes() -> Vec<HopEnvelope> {
    let (a, b, c) = (key(1), key(2), key(3));
    let first = HopEnvelope::sign(
        HopFields {
            agent_id: AgentId([7; 16]),
            hop: FIRST_HOP,
            package_hash: security::PackageHash([9; 32]),
            continuation_hash: [5; 32],
            previous: None,
            from: a.public(),
            to: b.public(),
            time_ms: 1_767_225_600_000,
        },
        &a,
    )
    .expect("sign the first hop");
    let second = HopEnvelope::sign(
        HopFields {
            agent_id: AgentId([7; 16]),
            hop: FIRST_HOP + 1,
            package_hash: security::PackageHash([9; 32]),
            continuation_hash: [6; 32],
            previous: Some(first.hash()),
            from: b.public(),
            to: c.public(),
            time_ms: 1_767_225_600_250,
        },
        &b,
    )
    .expect("sign the second hop");
    let far = HopEnvelope::sign(
        HopFields {
            agent_id: AgentId([0xff; 16]),
            hop: u64::MAX,
            package_hash: security::PackageHash([0; 32]),
            continuation_hash: [0xff; 32],
            previous: Some(EnvelopeHash([0xaa; 32])),
            from: c.public(),
            to: a.public(),
            time_ms: u64::MAX,
        },
        &c,
    )
    .expect("sign a hop at the edges");
    vec![first, second, far]
}

/// Custody certificates (by the home, key 1) of the points the envelopes lead to, and of the
/// launch.
fn certificates(envelopes: &[HopEnvelope]) -> Vec<Vec<u8>> {
    let home = key(1);
    let mut points = vec![CustodyPoint::launched(home.public())];
    points.extend(envelopes.iter().map(|e| CustodyPoint {
        hop: e.fields().hop,
        holder: e.fields().to,
        envelope: Some(e.hash()),
    }));
    points
        .into_iter()
        .map(|point| CustodyCertificate::sign(AgentId([7; 16]), point, &home).encode())
        .collect()
}

fn packages() -> Vec<Package> {
    let author = key(4);
    let plain = Manifest {
        name: "hello".into(),
        version: "1.0.0".into(),
        author: author.public(),
        created_ms: 1_767_225_600_000,
        resources: vec![],
        capabilities: vec![],
        limits: PackageLimits::default(),
    };
    let full = Manifest {
        name: "traveller".into(),
        version: "2.3.4-beta".into(),
        author: author.public(),
        created_ms: 0,
        resources: vec![
            ResourceDecl::new("data", ResourcePolicy::Rebind),
            ResourceDecl::new("log", ResourcePolicy::Copy),
            ResourceDecl::new("db", ResourcePolicy::Remote),
            ResourceDecl::new("token", ResourcePolicy::Move),
        ],
        capabilities: vec!["net".into(), "clock".into()],
        limits: PackageLimits {
            max_operations: Some(1_000_000),
            max_call_depth: Some(32),
            max_string_size: Some(1 << 20),
            max_array_size: Some(1 << 16),
            max_map_size: Some(1 << 10),
            max_continuation_bytes: Some(1 << 24),
            max_total_operations: Some(1 << 40),
            max_memory_bytes: Some(1 << 26),
            max_messages_sent: Some(1000),
            max_message_bytes_sent: Some(1 << 20),
        },
    };
    vec![
        Package::sign(plain, "print(\"hi\");".into(), &author).expect("sign"),
        Package::sign(full, TRAVELLER.into(), &author).expect("sign"),
    ]
}

/// Runs `program` from its start, taking every suspension's encoded continuation, until it
/// ends or `max` slices ran.
/// The continuations of `program` at each of its first `max` suspensions, the values it sent
/// or ended with, and the messages it sent as it wrote them (closures by their portable names).
fn continuations(program: &Program, max: usize) -> (Vec<Vec<u8>>, Vec<Dynamic>, Vec<Vec<u8>>) {
    let mut env = HostEnv {
        resources: agent_lang::no_resources(),
        here: "node-0".into(),
        home: "node-0".into(),
        nodes: (0..3).map(|i| format!("node-{i}")).collect(),
        agent_id: "agent-seeds".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    };
    let mut exec = Execution::new(program);
    let mut input = Resume::Start;
    let (mut bytes, mut sent, mut messages) = (Vec::new(), Vec::new(), Vec::new());
    for slice in 0..max {
        let outcome = exec.resume(&env, input);
        input = match outcome {
            Outcome::Migrate { to } => {
                env.here = to;
                env.hops += 1;
                Resume::Start
            }
            Outcome::Receive { .. } if slice % 3 == 0 => Resume::Start,
            Outcome::Receive { .. } => Resume::Value(Dynamic::from(format!("message {slice}"))),
            Outcome::Send { message, .. } => {
                sent.push(decode_portable(program, &message).expect("its own message decodes"));
                messages.push(message);
                Resume::Start
            }
            Outcome::Finished(v) => {
                println!("the fixture finished after {slice} slices: {v}");
                sent.push(v);
                break;
            }
            other => panic!("the fixture stopped: {other:?}"),
        };
        let encoded = exec.encode().expect("a suspended fixture encodes");
        // Travel as the node does: decode against the program, resume that.
        exec = Execution::decode(program, &encoded).expect("its own continuation decodes");
        bytes.push(encoded);
    }
    (bytes, sent, messages)
}

fn portable_values() -> Vec<Dynamic> {
    let mut map = Map::new();
    map.insert("k".into(), Dynamic::from_int(-7));
    map.insert("list".into(), Dynamic::from_array(vec![Dynamic::UNIT; 3]));
    let mut deep = Dynamic::from_int(1);
    for _ in 0..40 {
        deep = Dynamic::from_array(vec![deep]);
    }
    let numbers: Array = (0..300)
        .map(|i| Dynamic::from_int(i * 997 - 150_000))
        .collect();
    vec![
        Dynamic::UNIT,
        Dynamic::from_bool(true),
        Dynamic::from_int(i64::MIN),
        Dynamic::from_int(i64::MAX),
        Dynamic::from_float(f64::NAN),
        Dynamic::from_float(1.5),
        Dynamic::from_char('ß'),
        Dynamic::from("a string".to_string()),
        Dynamic::from_blob(vec![0, 1, 2, 255]),
        Dynamic::from_map(map),
        Dynamic::from_array(numbers),
        deep,
        Dynamic::from(FnPtr::new("twice").expect("a valid name")),
        Dynamic::from(agent_lang::Resource {
            name: "shard".into(),
            kind: agent_lang::ResourceKind::Dataset,
            bound_at: "node-1".into(),
            copy: None,
        }),
        Dynamic::from(agent_lang::Resource {
            name: "copied".into(),
            kind: agent_lang::ResourceKind::Dataset,
            bound_at: "node-1".into(),
            copy: Some(std::sync::Arc::new(agent_lang::Copied::Dataset(
                agent_lang::CopiedDataset::new(vec![b"one\ntwo\n".to_vec(), b"three".to_vec()]),
            ))),
        }),
    ]
}

/// A table, a value and a dataset moving with an agent, of `messages` as values.
fn moved_resources(messages: &[Vec<u8>]) -> platform::wire::MovedResources {
    use platform::wire::{MovedContents, MovedResource};
    let value = messages.first().cloned().unwrap_or_default();
    platform::wire::MovedResources(vec![
        MovedResource {
            name: "counts".into(),
            contents: MovedContents::Table(
                messages
                    .iter()
                    .enumerate()
                    .map(|(k, m)| (format!("key-{k}"), serde_bytes::ByteBuf::from(m.clone())))
                    .collect(),
            ),
        },
        MovedResource {
            name: "settings".into(),
            contents: MovedContents::Value(serde_bytes::ByteBuf::from(value)),
        },
        MovedResource {
            name: "shard".into(),
            contents: MovedContents::Dataset(vec![
                serde_bytes::ByteBuf::from(b"alpha\nbeta".to_vec()),
                serde_bytes::ByteBuf::new(),
            ]),
        },
    ])
}

fn frame<T: serde::Serialize>(which: u8, messages: &[T]) -> Vec<u8> {
    let mut out = vec![which];
    for m in messages {
        push_frame(&mut out, m).expect("a frame");
    }
    out
}

fn agent_value(meta: &AgentMeta, continuation: Option<&[u8]>) -> Vec<u8> {
    let mut value = ciborium::Value::serialized(meta).expect("the metadata as a CBOR value");
    let tag = match (continuation, &mut value) {
        (Some(c), ciborium::Value::Map(fields)) => {
            fields.push((
                ciborium::Value::Text("continuation".into()),
                ciborium::Value::Bytes(c.to_vec()),
            ));
            0
        }
        (None, _) => 1,
        _ => unreachable!("a struct serializes as a map"),
    };
    let mut out = vec![tag];
    ciborium::into_writer(&value, &mut out).expect("encode a record");
    out
}

fn main() {
    // As `tern_fuzz::RHAI_HASHING_SEED`: closures get the names the fuzz targets give them.
    agent_lang::rhai::config::hashing::set_hashing_seed(Some([0x7465_726e, 0x6675_7a7a, 1, 2]))
        .expect("the hashing seed is not set yet");
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let envelopes = envelopes();
    let wires: Vec<Vec<u8>> = envelopes.iter().map(HopEnvelope::encode).collect();

    {
        let mut c = Corpus::new(&root, "envelope");
        for w in &wires {
            c.put(w);
        }
    }
    let certificates = certificates(&envelopes);
    {
        let mut c = Corpus::new(&root, "certificate");
        for cert in &certificates {
            c.put(cert);
        }
    }
    let packages = packages();
    {
        let mut c = Corpus::new(&root, "package");
        for p in &packages {
            c.put(&p.to_bytes());
        }
    }
    let traveller = Program::compile(TRAVELLER, &limits()).expect("the traveller compiles");
    let (travelling, ..) = continuations(&traveller, 200);
    {
        let mut c = Corpus::new(&root, "continuation");
        for bytes in &travelling {
            c.put(bytes);
        }
    }
    let receiver = Program::compile(RECEIVER, &limits()).expect("the receiver compiles");
    let (_, sent, as_sent) = continuations(&receiver, 4);
    let mut messages = Vec::new();
    {
        let mut c = Corpus::new(&root, "portable_value");
        for bytes in &as_sent {
            c.put(bytes);
        }
        for value in sent.iter().chain(&portable_values()) {
            let bytes = encode_portable(value).expect("a portable value");
            c.put(&bytes);
            messages.push(bytes);
        }
        // Each element of the receiver's message on its own too.
        if let Some(items) = sent.first().and_then(|v| v.read_lock::<Array>()) {
            for item in items.iter() {
                c.put(&encode_portable(item).expect("a portable value"));
            }
        }
    }

    let small = travelling
        .iter()
        .min_by_key(|b| b.len())
        .expect("continuations");
    let custody: Vec<CustodyLink> = wires
        .iter()
        .map(|w| CustodyLink {
            envelope: w.clone(),
            handover: HandoverKey([5; 32]),
        })
        .collect();
    let offer = |i: usize, inline: &[u8]| HopOffer {
        envelope: wires[i].clone(),
        previous: if i == 0 { vec![] } else { wires[i - 1].clone() },
        previous_handover: (i > 0).then_some(HandoverKey([4; 32])),
        continuation_len: inline.len() as u64,
        inline: inline.to_vec(),
        hops: i as u64 + 1,
        operations: 12_345,
        sent: platform::wire::MessagesSent {
            count: i as u64,
            bytes: 100 * i as u64,
        },
        prepared_micros: 80,
        messages: messages
            .iter()
            .take(3 * i)
            .map(|m| serde_bytes::ByteBuf::from(m.clone()))
            .collect(),
        custody: custody[..i].to_vec(),
        home: key(1).public().peer_id_string(),
        nonce: [3; 16],
        certificate: if i == 0 {
            vec![]
        } else {
            certificates[i - 1].clone()
        },
        launcher: (i == 1).then(|| key(4).public().peer_id_string()),
        // The second hop carries a table moving with the agent (`moved_resources`).
        tables_len: if i == 1 {
            moved_resources(&messages)
                .encode()
                .expect("tables encode")
                .len() as u64
        } else {
            0
        },
    };
    let finished = AgentEnd::Finished {
        json: "{\"total\":12}".into(),
        node: "node-2".into(),
        hops: 9,
        unread: 1,
    };
    let failed = AgentEnd::Failed {
        error: "index out of bounds".into(),
        node: "node-1".into(),
        position: Some((12, 5)),
        unread: 0,
    };
    let agent = "0707070707070707070707070707070707".to_string();
    {
        let mut c = Corpus::new(&root, "wire_frames");
        c.put(&frame(
            0,
            &[offer(0, small), offer(1, &[]), offer(2, small)],
        ));
        c.put(&frame(
            1,
            &[
                HopReply::Ready,
                HopReply::Duplicate,
                HopReply::Stored,
                HopReply::Refused(HopRefusal::Conflict { hop: 3 }),
                HopReply::Refused(HopRefusal::LengthMismatch {
                    inline: 1,
                    announced: 2,
                }),
                HopReply::Refused(HopRefusal::BadMessage {
                    index: 4,
                    reason: "trailing bytes".into(),
                }),
                HopReply::Refused(HopRefusal::ArrivalDropped),
            ],
        ));
        c.put(&frame(
            2,
            &[HopDecision::Commit, HopDecision::Abort("disk full".into())],
        ));
        c.put(&frame(8, &[HopHandover(HandoverKey([6; 32]))]));
        c.put(&frame(10, &[moved_resources(&messages)]));
        c.put(&frame(
            3,
            &[
                ControlRequest::Ended {
                    agent: agent.clone(),
                    end: finished.clone(),
                    custody: custody.clone(),
                },
                ControlRequest::Deliver {
                    agent: agent.clone(),
                    message: messages[0].clone(),
                    ttl: 16,
                    probe: false,
                    wait_ms: 10_000,
                },
                ControlRequest::Location {
                    agent: agent.clone(),
                    custody: custody[..1].to_vec(),
                },
                ControlRequest::HopStatus {
                    agent: agent.clone(),
                    hop: 2,
                    envelope: Some(*envelopes[1].hash().as_bytes()),
                    give_up: true,
                },
                ControlRequest::HopCommitted {
                    agent: agent.clone(),
                    envelope: [3; 32],
                },
                ControlRequest::Departed {
                    agent: agent.clone(),
                    envelope: envelopes[0].encode(),
                },
            ],
        ));
        let status = StatusReport {
            name: "node-0".into(),
            peer_id: key(1).public().peer_id_string(),
            peers: vec![("node-1".into(), key(2).public().peer_id_string())],
            agents: vec![AgentStatus {
                id: agent.clone(),
                package: "09".repeat(32),
                state: "ready".into(),
                hops: 3,
            }],
            forwards: vec![(agent.clone(), "node-2".into())],
            store: platform::wire::StoreUsage {
                stored_bytes: 4096,
                max_store_bytes: 1 << 30,
                cached_chunks: 3,
            },
            bytes: platform::wire::WireBytes {
                hop: (1000, 900),
                resource: (5, 7),
                ..Default::default()
            },
            remote: vec![platform::wire::RemoteDependency {
                agent: agent.clone(),
                node: "node-1".into(),
                resource: "shard".into(),
                serves: false,
                seconds_ago: 3,
            }],
            moved_resources: vec![("counts".into(), format!("here, held by {agent}"))],
            activity: Activity {
                counts: ActivityCounts {
                    peers_up: 2,
                    hops_committed: 7,
                    ..ActivityCounts::default()
                },
                recent: vec![RecentEvent {
                    at_ms: 1_767_225_600_000,
                    event: "hop committed".into(),
                }],
                missed: 0,
            },
        };
        c.put(&frame(
            4,
            &[
                ControlReply::Launched {
                    agent: agent.clone(),
                },
                ControlReply::Ended(failed.clone()),
                ControlReply::Status(Box::new(status)),
                ControlReply::HopHeld(true),
                ControlReply::HopCommitted(false),
                ControlReply::HandedOver(Some(HandoverKey([7; 32]))),
                ControlReply::HandedOver(None),
                ControlReply::Delivered,
                ControlReply::NotHere,
                ControlReply::Ok,
                ControlReply::CustodyConfirmed(certificates[1].clone()),
            ],
        ));
        c.put(&frame(
            4,
            &[
                ControlReply::Refused(ControlRefusal::QueueFull {
                    agent: agent.clone(),
                    messages: 10,
                    bytes: 1 << 20,
                }),
                ControlReply::Refused(ControlRefusal::RateLimited { per_second: 50 }),
                ControlReply::Unconfirmed("connection reset".into()),
            ],
        ));
        c.put(&frame(
            5,
            &[
                ClientRequest::Launch {
                    package: packages[0].to_bytes(),
                    wait: true,
                },
                ClientRequest::Status,
                ClientRequest::Result {
                    agent: agent.clone(),
                },
                ClientRequest::Send {
                    agent: agent.clone(),
                    message: messages[1].clone(),
                },
            ],
        ));
        c.put(&frame(6, &[PackageRequest { hash: [9; 32] }]));
        let resource = |op| ResourceRequest {
            agent: agent.clone(),
            package: [9; 32],
            resource: "shard".into(),
            op,
        };
        c.put(&frame(
            9,
            &[
                resource(ResourceOp::Describe),
                resource(ResourceOp::Lines {
                    start: 3,
                    count: 1000,
                }),
                resource(ResourceOp::Read {
                    offset: 1 << 40,
                    len: 4096,
                }),
                resource(ResourceOp::Set {
                    key: "k".into(),
                    value: serde_bytes::ByteBuf::from(messages[0].clone()),
                }),
                resource(ResourceOp::Keys {
                    start: 0,
                    count: u64::MAX,
                }),
                resource(ResourceOp::Value),
            ],
        ));
        c.put(&frame(
            10,
            &[
                ResourceReply::Done {
                    value: messages[0].clone(),
                    done: false,
                },
                ResourceReply::Failed("no such resource".into()),
            ],
        ));
        c.put(&frame(
            7,
            &[
                PackageReply::Found(packages[0].to_bytes()),
                PackageReply::NotFound,
                PackageReply::Refused,
            ],
        ));
    }

    {
        let mut c = Corpus::new(&root, "store_record");
        let meta = |state: AgentState, hop: u64| AgentMeta {
            id: agent.clone(),
            package: [9; 32],
            hop,
            hops: hop + 1,
            operations: 99_999,
            sent: platform::wire::MessagesSent {
                count: hop,
                bytes: 10 * hop,
            },
            home: key(1).public().peer_id_string(),
            launcher: (hop % 2 == 1).then(|| key(4).public().peer_id_string()),
            state,
            envelope: if hop == 0 { vec![] } else { wires[0].clone() },
            handover: (hop > 0).then_some(HandoverKey([8; 32])),
            tail: custody[..hop.min(2) as usize].to_vec(),
            nonce: [hop as u8; 16],
            certificate: if hop % 2 == 0 {
                vec![]
            } else {
                certificates[0].clone()
            },
        };
        let states = [
            AgentState::Ready,
            AgentState::Waiting {
                timeout_at_ms: Some(1_767_225_600_000),
            },
            AgentState::Waiting {
                timeout_at_ms: None,
            },
            AgentState::Leaving {
                to: key(2).public().peer_id_string(),
                hop: 2,
                carried: 1,
                envelope: [4; 32],
                checkpoint: Some(Box::new(AgentState::Waiting {
                    timeout_at_ms: None,
                })),
            },
            AgentState::Answered {
                value: messages[0].clone(),
            },
            AgentState::Arriving {
                from: key(3).public().peer_id_string(),
                envelope: [8; 32],
                carried: 2,
            },
        ];
        for (i, state) in states.into_iter().enumerate() {
            let m = meta(state, i as u64);
            c.put(&agent_value(&m, Some(small)));
            c.put(&agent_value(&m, None));
        }
        c.put(&agent_value(&meta(AgentState::Ready, 1), Some(&[])));
        for end in [&finished, &failed] {
            let mut out = Vec::new();
            ciborium::into_writer(end, &mut out).expect("encode a result");
            c.put(&out);
        }
        let places = [
            ResourcePlace::Here { holder: None },
            ResourcePlace::Here {
                holder: Some(agent.clone()),
            },
            ResourcePlace::Gone {
                to: key(2).public().peer_id_string(),
            },
            ResourcePlace::Arriving {
                holder: agent.clone(),
                before: Some(Box::new(ResourcePlace::Gone {
                    to: key(3).public().peer_id_string(),
                })),
            },
        ];
        for place in &places {
            let mut out = Vec::new();
            ciborium::into_writer(place, &mut out).expect("encode a place");
            c.put(&out);
        }
        let dataset = MovedDataset {
            lens: vec![0, 48, 1 << 20],
            hash: [6; 32],
        };
        let mut out = Vec::new();
        ciborium::into_writer(&dataset, &mut out).expect("encode a moved dataset");
        c.put(&out);
    }
}
