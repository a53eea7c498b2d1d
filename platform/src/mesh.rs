//! The embedded mesh: N nodes in one process, joined by channels that carry only bytes.
//!
//! Each node is a thread (agent slices are synchronous Rhai evaluation, and a thread with a
//! large stack keeps deep native recursion in a script safe). A node owns its own compiled
//! [`Program`] — compiled from the source it was handed, checked against the program hash the
//! continuation names — so a hop really is "encode here, decode there".

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_lang::{
    rhai::Dynamic, unknown_node_error, AgentError, DecodeError, Execution, HostEnv, Limits,
    Outcome, Program, ProgramHash, Resume,
};

/// Stack size of a node thread: room for Rhai's native recursion up to the call-depth limit.
const NODE_STACK: usize = 256 << 20;

/// Options of an embedded run.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Number of nodes, named `node-0` .. `node-{n-1}`.
    pub nodes: usize,
    /// Limits every node applies to the agent.
    pub limits: Limits,
}

/// One hop as the trace reports it.
#[derive(Debug, Clone)]
pub struct HopRecord {
    /// Hop number (1 for the first hop).
    pub hop: u64,
    /// Source node.
    pub from: String,
    /// Destination node.
    pub to: String,
    /// Size of the encoded continuation.
    pub bytes: usize,
    /// From suspension at the source to resumption at the destination.
    pub micros: u64,
}

/// Something a node reports to whoever launched the agent.
#[derive(Debug)]
pub enum NodeEvent {
    /// The agent printed a line.
    Print {
        /// Node it printed on.
        node: String,
        /// What it printed.
        text: String,
    },
    /// The agent moved.
    Hop(HopRecord),
    /// The agent finished with a value.
    Finished {
        /// Node it finished on.
        node: String,
        /// Its result.
        value: Dynamic,
        /// Hops it made.
        hops: u64,
    },
    /// The agent failed.
    Failed {
        /// Node it failed on.
        node: String,
        /// Why.
        error: AgentFailure,
    },
}

/// Why an agent ended without a result.
#[derive(Debug, thiserror::Error)]
pub enum AgentFailure {
    /// The script raised an error.
    #[error("{0}")]
    Agent(AgentError),
    /// A continuation could not be decoded at the destination.
    #[error("continuation refused: {0}")]
    Decode(DecodeError),
    /// The program could not be compiled on a node.
    #[error("{0}")]
    Compile(agent_lang::CompileError),
    /// The agent waits for a message that can never come.
    #[error("{0}")]
    Stuck(String),
}

/// A hop in flight: everything the destination gets, as bytes and plain data.
struct Arrival {
    agent_id: String,
    hop: u64,
    from: String,
    continuation: Vec<u8>,
    program_hash: ProgramHash,
    sent: Instant,
}

enum NodeMsg {
    /// Start a new agent of this source here.
    Launch {
        agent_id: String,
        source: Arc<str>,
    },
    /// The source of a program, published by the node that compiled it first: what a node
    /// pulls by hash when an agent of that program arrives.
    Publish {
        hash: ProgramHash,
        source: Arc<str>,
    },
    /// An agent arrives.
    Arrive(Arrival),
    Shutdown,
}

/// The embedded mesh. Dropping it stops every node.
pub struct Mesh {
    names: Vec<String>,
    senders: Vec<Sender<NodeMsg>>,
    threads: Vec<JoinHandle<()>>,
}

struct Node {
    name: String,
    names: Arc<Vec<String>>,
    peers: Vec<Sender<NodeMsg>>,
    events: Sender<NodeEvent>,
    limits: Limits,
    /// Programs this node has compiled, by hash: the code cache.
    programs: HashMap<ProgramHash, Program>,
    /// Source of every program the mesh knows, by hash (what a node would pull).
    sources: HashMap<ProgramHash, Arc<str>>,
}

impl Mesh {
    /// Starts `opts.nodes` nodes; their events go to the returned receiver.
    ///
    /// # Errors
    ///
    /// When a node thread cannot be spawned.
    pub fn start(opts: &MeshOptions) -> std::io::Result<(Mesh, Receiver<NodeEvent>)> {
        let n = opts.nodes.max(1);
        let names: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("node-{i}")).collect());
        let (events_tx, events_rx) = channel();
        let mut senders = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = channel();
            senders.push(tx);
            inboxes.push(rx);
        }
        let mut threads = Vec::with_capacity(n);
        for (i, inbox) in inboxes.into_iter().enumerate() {
            let node = Node {
                name: names[i].clone(),
                names: names.clone(),
                peers: senders.clone(),
                events: events_tx.clone(),
                limits: opts.limits.clone(),
                programs: HashMap::new(),
                sources: HashMap::new(),
            };
            let handle = std::thread::Builder::new()
                .name(names[i].clone())
                .stack_size(NODE_STACK)
                .spawn(move || node.run(inbox))?;
            threads.push(handle);
        }
        Ok((
            Mesh {
                names: names.to_vec(),
                senders,
                threads,
            },
            events_rx,
        ))
    }

    /// Names of the nodes.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Launches an agent with `source` on the first node.
    pub fn launch(&self, agent_id: &str, source: &str) {
        let _ = self.senders[0].send(NodeMsg::Launch {
            agent_id: agent_id.to_string(),
            source: source.into(),
        });
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for s in &self.senders {
            let _ = s.send(NodeMsg::Shutdown);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Where an agent stands on a node between slices.
struct Resident {
    agent_id: String,
    exec: Execution,
    hops: u64,
}

impl Node {
    fn run(mut self, inbox: Receiver<NodeMsg>) {
        while let Ok(msg) = inbox.recv() {
            match msg {
                NodeMsg::Shutdown => break,
                NodeMsg::Launch { agent_id, source } => {
                    let program = match self.program_for_source(&source) {
                        Ok(p) => p,
                        Err(e) => {
                            self.fail(AgentFailure::Compile(e));
                            continue;
                        }
                    };
                    let exec = Execution::new(&program);
                    self.drive(
                        Resident {
                            agent_id,
                            exec,
                            hops: 0,
                        },
                        Resume::Start,
                    );
                }
                NodeMsg::Publish { hash, source } => {
                    self.sources.insert(hash, source);
                }
                NodeMsg::Arrive(a) => {
                    let Some(program) = self.program_for_hash(a.program_hash) else {
                        self.fail(AgentFailure::Stuck(format!(
                            "no node has the code of program {}",
                            a.program_hash
                        )));
                        continue;
                    };
                    match Execution::decode(&program, &a.continuation) {
                        Ok(exec) => {
                            let _ = self.events.send(NodeEvent::Hop(HopRecord {
                                hop: a.hop,
                                from: a.from,
                                to: self.name.clone(),
                                bytes: a.continuation.len(),
                                micros: a.sent.elapsed().as_micros() as u64,
                            }));
                            self.drive(
                                Resident {
                                    agent_id: a.agent_id,
                                    exec,
                                    hops: a.hop,
                                },
                                Resume::Start,
                            );
                        }
                        Err(e) => self.fail(AgentFailure::Decode(e)),
                    }
                }
            }
        }
    }

    fn program_for_source(
        &mut self,
        source: &Arc<str>,
    ) -> Result<Program, agent_lang::CompileError> {
        let program = Program::compile(source, &self.limits)?;
        let hash = program.hash();
        self.sources.insert(hash, source.clone());
        // Every node learns where the code is; a destination compiles it on first arrival.
        for (i, peer) in self.peers.iter().enumerate() {
            if self.names[i] != self.name {
                let _ = peer.send(NodeMsg::Publish {
                    hash,
                    source: source.clone(),
                });
            }
        }
        self.programs.insert(hash, program.clone());
        Ok(program)
    }

    fn program_for_hash(&mut self, hash: ProgramHash) -> Option<Program> {
        if let Some(p) = self.programs.get(&hash) {
            return Some(p.clone());
        }
        let source = self.sources.get(&hash)?.clone();
        let program = Program::compile(&source, &self.limits).ok()?;
        if program.hash() != hash {
            return None;
        }
        self.programs.insert(hash, program.clone());
        Some(program)
    }

    fn env(&self, agent_id: &str, hops: u64) -> HostEnv {
        let events = self.events.clone();
        let node = self.name.clone();
        HostEnv {
            here: self.name.clone(),
            home: self.names[0].clone(),
            nodes: self.names.to_vec(),
            agent_id: agent_id.to_string(),
            hops: hops as i64,
            printer: Arc::new(move |text: &str| {
                let _ = events.send(NodeEvent::Print {
                    node: node.clone(),
                    text: text.to_string(),
                });
            }),
        }
    }

    fn fail(&self, error: AgentFailure) {
        let _ = self.events.send(NodeEvent::Failed {
            node: self.name.clone(),
            error,
        });
    }

    /// Runs the agent here until it leaves, finishes or fails.
    fn drive(&mut self, mut agent: Resident, mut input: Resume) {
        let env = self.env(&agent.agent_id, agent.hops);
        loop {
            match agent.exec.resume(&env, input) {
                Outcome::Finished(value) => {
                    let _ = self.events.send(NodeEvent::Finished { node: self.name.clone(), value, hops: agent.hops });
                    return;
                }
                Outcome::Failed(e) => return self.fail(AgentFailure::Agent(e)),
                Outcome::Migrate { to } => {
                    let sent = Instant::now();
                    let Some(dest) = self.names.iter().position(|n| *n == to) else {
                        input = Resume::Error(unknown_node_error(&to));
                        continue;
                    };
                    let continuation = match agent.exec.encode() {
                        Ok(bytes) => bytes,
                        // The hop is blocked; the agent stays and `migrate` throws.
                        Err(e) => {
                            input = Resume::Error(format!("migrate: {e}"));
                            continue;
                        }
                    };
                    let arrival = Arrival {
                        agent_id: agent.agent_id,
                        hop: agent.hops + 1,
                        from: self.name.clone(),
                        continuation,
                        program_hash: agent.exec.program().hash(),
                        sent,
                    };
                    let _ = self.peers[dest].send(NodeMsg::Arrive(arrival));
                    return;
                }
                Outcome::Receive { timeout_ms } => match timeout_ms {
                    // Nothing can send to an agent in the embedded mesh: a bounded wait just
                    // elapses, an unbounded one could never end.
                    Some(ms) => {
                        std::thread::sleep(Duration::from_millis(ms.min(60_000)));
                        input = Resume::Value(Dynamic::UNIT);
                    }
                    None => {
                        return self.fail(AgentFailure::Stuck(
                            "receive() without a timeout would wait forever: no agent or client can send messages in the embedded mesh (use receive(timeout_ms))".into(),
                        ))
                    }
                },
                _ => return self.fail(AgentFailure::Stuck("unknown outcome".into())),
            }
        }
    }
}
