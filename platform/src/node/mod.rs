//! A tern node on libp2p: the swarm, the hop, package and control protocols, and the agents it
//! runs.
//!
//! # Layout
//!
//! [`Node::start`] builds the swarm and hands it to the [`event_loop`], the one task that owns
//! it (after rust-libp2p's file-sharing example: a cloneable handle, an event loop, commands
//! with a oneshot for their answer). Protocols run over libp2p-stream, whose `Control` is
//! cloneable, so each exchange is a task of its own and the swarm task never waits on a peer:
//!
//! - [`accept`]: inbound streams, one task each, bounded per node and per peer;
//! - [`streams`]: outgoing streams kept open and reused between exchanges;
//! - [`hop`]: the exactly-once hop protocol (`depart`, `arrive`, `gate`, `recover`);
//! - [`packages`]: compiled programs and the anonymous package pull;
//! - [`control`]: the control protocol, one handler per request;
//! - [`routing`] and [`mailbox`]: messages, on their way and at the agent;
//! - [`resource_protocol`]: agents' calls on resources of other nodes (`remote` bindings);
//! - [`runner`]: launching agents and running them slice after slice ([`crate::slices`]: off
//!   the runtime, so a busy agent never stalls networking);
//! - [`peers`]: names, keys and ids of this node and its peers;
//! - [`quota`]: the node's quota on its store;
//! - [`events`]: what happens, as typed [`NodeEvent`]s on one broadcast channel;
//! - [`activity`]: the counts and latest events `tern status` shows, folded from that channel;
//! - [`tasks`]: every task the node spawns, stopped with it;
//! - [`fault`]: the crash tests' fault points.
//!
//! Each module owns its state (a struct in `Shared` whose locks are documented where they are
//! declared); durable state lives in the [`Store`].
//!
//! # A hop
//!
//! An agent runs on exactly one node at a time. A hop commits in two overlapping phases: the
//! source writes its departure record ("leaving for dst by envelope E") while the offer and
//! the continuation travel, and the destination stores the agent as *arriving* (durable, not
//! runnable) meanwhile. The hop commits when both records are durable: the source then sends
//! `HopDecision::Commit`, and only then does the destination run the agent (its switch to
//! runnable needs no fsync: after a crash an arriving agent asks the source, whose departure
//! record, or the `departed` hash it leaves, answers). The source deletes its copy only once
//! the destination acknowledged, or said it holds the hop when asked; a source that cannot
//! write its record says `Abort`, and the destination drops the arrival. So the critical path
//! of a durable hop holds one fsync, not two in a row.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_lang::rhai::Dynamic;
use agent_lang::Limits;
use anyhow::Context;
use libp2p::{identity, Multiaddr, PeerId, StreamProtocol};
use security::{PublicKey, SecretKey, TrustPolicy, VerifiedPackage};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::resources::NodeResources;
use crate::store::{AgentMeta, AgentState, Durability, Store, StoreError};
use crate::verifier::BatchVerifier;
use crate::wire::{
    AgentEnd, ControlRefusal, StatusReport, WireBytes, CLIENT_PROTOCOL, CONTROL_PROTOCOL,
    HOP_PROTOCOL, PACKAGE_PROTOCOL, RESOURCE_PROTOCOL,
};

mod accept;
mod activity;
mod control;
mod custody;
mod event_loop;
mod events;
mod fault;
mod hop;
mod mailbox;
mod operators;
mod packages;
mod peers;
pub(crate) mod quota;
mod residual;
mod resource_protocol;
mod routing;
mod runner;
mod sender_rates;
mod streams;
mod tasks;
mod wire_bytes;

pub use events::{NodeEvent, EVENT_BUFFER};
pub use routing::{MailboxLimits, SendError, Undelivered};
use sender_rates::SenderRates;

use accept::{accept_loop, InboundLimits, Protocol};
use activity::ActivityLog;
use event_loop::{EventLoop, NodeBehaviour, SwarmCommand};
use events::Events;
use fault::Faults;
use hop::{ArrivalGate, Departures};
use mailbox::Mailboxes;
use packages::Programs;
use peers::Peers;
pub(crate) use quota::StoreQuota;
pub use quota::DEFAULT_MAX_STORE_BYTES;
use runner::Agents;
use streams::{PeerStream, StreamPool};
use tasks::NodeTasks;
pub use wire_bytes::check_upload_mbit;
use wire_bytes::{CountedStream as NodeStream, WireCounters};

/// [`NodeConfig::max_agents`] unless configured: 10,000 agents waiting in `receive` take about
/// 70 MiB (`bench_mesh`), so this bounds such a node's memory to about 700 MiB.
pub const DEFAULT_MAX_AGENTS: u64 = 100_000;

/// Everything a node is configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Human name, carried by identify; `migrate(name)` uses it.
    pub name: String,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start.
    pub bootstrap: Vec<Multiaddr>,
    /// The node's identity (its libp2p key and the key that signs hop envelopes).
    pub key: SecretKey,
    /// Where the store lives.
    pub data_dir: PathBuf,
    /// mDNS discovery on the LAN.
    pub mdns: bool,
    /// Whether commits wait for the disk.
    pub durability: Durability,
    /// Which authors run here and which peers may push agents.
    pub trust: TrustPolicy,
    /// Limits agents run under.
    pub limits: Limits,
    /// How much mail the node takes for each agent.
    pub mailbox: MailboxLimits,
    /// Most agents stored on the node at once (running, waiting, arriving or leaving): past it,
    /// launches and arriving hops are refused (`NodeFull`).
    pub max_agents: u64,
    /// Most bytes of agents' state the store keeps, all agents together (see [`quota`]).
    pub max_store_bytes: u64,
    /// What the node offers the agents that come to it (`[resources]`).
    pub resources: NodeResources,
    /// The node's upload cap, in Mbit/s: its protocols' outgoing bytes together are paced to it
    /// (None: not capped).
    pub upload_mbit: Option<f64>,
    /// Memory freed by a large hop is kept for the next one while the process's resident memory
    /// is at most this far above its idle size, and given back beyond (`[limits]
    /// keep_freed_bytes`; see [`crate::memory::keep_freed_up_to`]).
    pub keep_freed_bytes: u64,
    /// Node names only one key may take (`[peers]`): another peer announcing one is not named.
    pub pinned_names: HashMap<String, PublicKey>,
    /// A store already open, used instead of the one in `data_dir` (tests give a node a store
    /// on a storage layer of their own, e.g. one that fails on purpose).
    pub store: Option<Store>,
}

impl NodeConfig {
    /// A node on 127.0.0.1 (a port the OS picks), without mDNS or fsync, with the default
    /// limits and no bootstrap peers or pinned names: the mesh of tests and `tern run`.
    pub fn local(name: &str, key: SecretKey, data_dir: PathBuf, trust: TrustPolicy) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            listen: vec![Multiaddr::from(std::net::Ipv4Addr::LOCALHOST)
                .with(libp2p::multiaddr::Protocol::Tcp(0))],
            bootstrap: Vec::new(),
            key,
            data_dir,
            mdns: false,
            durability: Durability::NoSync,
            trust,
            limits: Limits::default(),
            mailbox: MailboxLimits::default(),
            max_agents: DEFAULT_MAX_AGENTS,
            max_store_bytes: DEFAULT_MAX_STORE_BYTES,
            resources: NodeResources::default(),
            upload_mbit: None,
            keep_freed_bytes: crate::memory::DEFAULT_KEEP_FREED,
            pinned_names: HashMap::new(),
            store: None,
        }
    }
}

/// What every part of a running node shares: its identity and configuration, its store, and
/// the state of each module, owned by that module (see each field's type for its locks).
struct Shared {
    /// The node's identity, which also signs hop envelopes.
    key: SecretKey,
    /// This node and its peers by name, id and key.
    peers: Peers,
    store: Store,
    trust: TrustPolicy,
    limits: Limits,
    mailbox: MailboxLimits,
    /// [`NodeConfig::max_agents`].
    max_agents: u64,
    /// [`NodeConfig::max_store_bytes`], over the store.
    quota: StoreQuota,
    /// [`NodeConfig::resources`].
    resources: NodeResources,
    /// Bytes its protocols carried.
    wire: WireCounters,
    /// Remote resource bindings in use through it.
    residuals: residual::Residuals,
    /// How many messages each peer may still deliver.
    sender_rates: SenderRates,
    faults: Faults,
    /// Addresses the node listens on (the event loop adds them). A `std` mutex held to push or
    /// copy them.
    listen: Mutex<Vec<Multiaddr>>,
    programs: Programs,
    agents: Agents,
    mailboxes: Mailboxes,
    inbound: InboundLimits,
    outbound: StreamPool<NodeStream>,
    /// Hops being received right now, and offers their senders gave up on.
    arrivals: ArrivalGate,
    departures: Departures,
    /// Messages whose senders wait for them to follow a leaving agent.
    following: routing::Following,
    /// Custody the homes of agents here confirmed.
    confirmed: custody::ConfirmedCustody,
    /// The handovers of the hops agents arrived here by.
    handovers: custody::Handovers,
    /// Checks the signatures of arriving hops in batches.
    verifier: BatchVerifier,
    events: Events,
    activity: ActivityLog,
    tasks: NodeTasks,
    /// Opens streams to peers (cloneable; no round trip through the swarm's task).
    control: libp2p_stream::Control,
    /// To the swarm's task.
    commands: mpsc::Sender<SwarmCommand>,
}

impl Shared {
    /// A stream to `peer` for one exchange: an idle one, or a new one once it is this
    /// exchange's turn to open one.
    async fn open_stream(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
    ) -> Result<PeerStream, String> {
        self.outbound
            .stream_to(peer, protocol, async |peer, protocol| {
                let counted = Protocol::of(&protocol);
                let stream = self
                    .control
                    .clone()
                    .open_stream(peer, protocol)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(self.wire.count(counted, stream))
            })
            .await
    }
}

/// A handle to a running node. Cloneable; the node stops when [`NodeHandle::shutdown`] or
/// [`NodeHandle::stop`] is called or the last handle is dropped.
#[derive(Clone)]
pub struct NodeHandle {
    shared: Arc<Shared>,
    _stop_on_drop: Arc<StopOnDrop>,
}

/// Tells the node's tasks to stop when the last handle goes.
struct StopOnDrop(NodeTasks);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.signal_stop();
    }
}

/// Locks a `std` mutex of the node.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections cannot leave a broken
    // invariant behind (each is a single insert/remove/read), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The node.
pub struct Node;

impl Node {
    /// Starts a node: opens the store, listens, dials the bootstrap peers, resumes every agent
    /// the store holds.
    ///
    /// # Errors
    ///
    /// The store cannot be opened or a listen address is refused.
    pub async fn start(config: NodeConfig) -> anyhow::Result<NodeHandle> {
        if let Some(mbit) = config.upload_mbit {
            check_upload_mbit(mbit).map_err(anyhow::Error::msg)?;
        }
        if !discovery::is_valid_name(&config.name) {
            anyhow::bail!(
                "invalid node name '{}': use 1 to 64 of A-Z a-z 0-9 . _ -",
                config.name
            );
        }
        config
            .mailbox
            .check()
            .map_err(|e| anyhow::anyhow!("mailbox limits: {e}"))?;
        crate::memory::return_freed_memory_when_idle();
        crate::memory::keep_freed_up_to(config.keep_freed_bytes);
        crate::slices::reserve_stack(config.limits.slice_stack_bytes());
        if !agent_lang::memory_is_metered() {
            tracing::warn!(
                node = %config.name,
                "agents' memory budgets are not enforced: this program's allocator is not \
                 agent_lang::Metered (see platform::jemalloc_for_large_hops!)"
            );
        }
        let store = match config.store {
            Some(store) => store,
            None => {
                let data_dir = config.data_dir.clone();
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&data_dir).with_context(|| {
                        format!("cannot create data directory {}", data_dir.display())
                    })?;
                    Store::open(&data_dir.join("tern.redb"), config.durability)
                        .with_context(|| format!("cannot open the store in {}", data_dir.display()))
                })
                .await
                .context("opening the store")??
            }
        };
        let keypair =
            identity::Keypair::ed25519_from_bytes(config.key.seed()).context("node key")?;
        let peer_id = keypair.public().to_peer_id();
        let discovery =
            discovery::Discovery::new(&keypair, &config.name, config.mdns).context("discovery")?;
        let (inbound, incoming) = discovery::InboundStreams::new(vec![
            HOP_PROTOCOL,
            PACKAGE_PROTOCOL,
            CONTROL_PROTOCOL,
            CLIENT_PROTOCOL,
            RESOURCE_PROTOCOL,
        ]);
        let mut swarm = crate::wire::swarm(keypair, |_| NodeBehaviour {
            limits: event_loop::connection_limits(),
            discovery,
            stream: libp2p_stream::Behaviour::new(),
            inbound,
        })?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let control = swarm.behaviour().stream.new_control();
        let (commands, command_rx) = mpsc::channel(64);
        let pins = config
            .pinned_names
            .iter()
            .map(|(name, key)| {
                let peer = key.peer_id_string().parse::<PeerId>();
                Ok((name.clone(), peer.context("a pinned name's key")?))
            })
            .collect::<anyhow::Result<_>>()?;
        let directory = discovery::Directory::new(peer_id).with_pins(pins);
        let events = Events::default();
        let faults = Faults::from_env();
        let quota = StoreQuota::new(store.clone(), config.max_store_bytes);
        let shared = Arc::new(Shared {
            peers: Peers::new(
                config.name.clone(),
                peer_id,
                config.key.public(),
                directory.names().clone(),
            ),
            key: config.key,
            mailboxes: Mailboxes::new(quota.clone(), faults, events.clone()),
            quota,
            resources: config.resources,
            wire: WireCounters::with_cap(config.upload_mbit),
            residuals: Default::default(),
            store,
            trust: config.trust,
            limits: config.limits,
            sender_rates: SenderRates::new(config.mailbox.max_messages_per_peer_per_second),
            mailbox: config.mailbox,
            max_agents: config.max_agents,
            faults,
            listen: Mutex::default(),
            programs: Programs::default(),
            agents: Agents::default(),
            inbound: InboundLimits::default(),
            outbound: StreamPool::default(),
            arrivals: ArrivalGate::default(),
            departures: Departures::default(),
            following: Default::default(),
            confirmed: custody::ConfirmedCustody::default(),
            handovers: custody::Handovers::default(),
            verifier: BatchVerifier::default(),
            events,
            activity: ActivityLog::default(),
            tasks: NodeTasks::default(),
            control,
            commands,
        });
        let tasks = &shared.tasks;
        tasks.spawn(stop_when_the_store_fails(shared.clone()));
        tasks.spawn(shared.activity.clone().follow(shared.events.subscribe()));
        let (listening_tx, listening_rx) = oneshot::channel();
        tasks.spawn(
            EventLoop::new(swarm, shared.clone(), command_rx, directory, listening_tx).run(),
        );
        tasks.spawn(accept_loop(incoming, shared.clone()));
        if !config.listen.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(10), listening_rx).await;
        }
        let handle = NodeHandle {
            _stop_on_drop: Arc::new(StopOnDrop(shared.tasks.clone())),
            shared,
        };
        for addr in config.bootstrap {
            if let Err(e) = handle.dial(addr.clone()).await {
                tracing::warn!(%addr, "bootstrap dial failed: {e}");
            }
        }
        handle.resume_stored_agents();
        Ok(handle)
    }
}

impl NodeHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.shared.peers.local()
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        self.shared.peers.local_name()
    }

    /// Addresses the node listens on, each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let local = self.shared.peers.local();
        lock(&self.shared.listen)
            .iter()
            .map(|a| a.clone().with(libp2p::multiaddr::Protocol::P2p(local)))
            .collect()
    }

    /// Names of the tern peers this node is connected to, sorted.
    pub fn peer_names(&self) -> Vec<String> {
        self.shared.peers.names().names()
    }

    /// Dials `addr`.
    ///
    /// # Errors
    ///
    /// The node is stopping or the address cannot be dialled.
    pub async fn dial(&self, addr: Multiaddr) -> anyhow::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .commands
            .send(SwarmCommand::Dial(addr, tx))
            .await
            .map_err(|_| anyhow::anyhow!("node stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("node stopped"))?
            .map_err(anyhow::Error::msg)
    }

    /// Launches a verified package here, with this node as the agent's home; returns the agent
    /// id, and where how the agent ended (wherever that happens) will come.
    ///
    /// # Errors
    ///
    /// The trust policy refuses the package, or it cannot be stored or compiled.
    pub fn launch(
        &self,
        package: VerifiedPackage,
        launcher: Option<String>,
    ) -> Result<(String, oneshot::Receiver<AgentEnd>), ControlRefusal> {
        runner::launch(&self.shared, package, launcher)
    }

    /// Sends `message` (a portable value) to `agent`, wherever it is.
    ///
    /// # Errors
    ///
    /// The value cannot travel ([`SendError::NotPortable`]), or no node knows the agent, or it
    /// has finished ([`Undelivered::Refused`]), or the node holding it took the message and
    /// broke off before answering ([`Undelivered::Unconfirmed`]: it may have been delivered).
    pub async fn send(&self, agent: &str, message: &Dynamic) -> Result<(), SendError> {
        let bytes = agent_lang::encode_portable(message)
            .map_err(|e| SendError::NotPortable(e.to_string()))?;
        Ok(routing::route_message(&self.shared, agent, bytes).await?)
    }

    /// Whether `agent` is held here waiting in `receive()` without a timeout, with no message
    /// queued: only a message from outside can wake it.
    pub fn waits_for_a_message(&self, agent: &str) -> bool {
        matches!(
            self.shared.store.agent_meta(agent),
            Ok(Some(AgentMeta {
                state: AgentState::Waiting {
                    timeout_at_ms: None
                },
                ..
            }))
        ) && self.shared.store.message_count(agent).is_ok_and(|n| n == 0)
    }

    /// What this node holds of agent `id`: its record without the continuation (None if it does
    /// not hold it).
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub fn agent(&self, id: &str) -> Result<Option<AgentMeta>, StoreError> {
        self.shared.store.agent_meta(id)
    }

    /// What this node's protocols carried since it started.
    pub fn wire_bytes(&self) -> WireBytes {
        self.shared.wire.snapshot()
    }

    /// This node's status.
    ///
    /// # Errors
    ///
    /// The store cannot be read.
    pub fn status(&self) -> Result<StatusReport, StoreError> {
        operators::status(&self.shared)
    }

    /// What happens on this node from now on, as typed events (see [`NodeEvent`]).
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// Tells the node's tasks to stop and returns at once (agents stay in the store).
    pub fn shutdown(&self) {
        self.shared.tasks.signal_stop();
    }

    /// Stops the node and waits until every task it spawned has ended: its swarm and every
    /// connection closed, no exchange or agent runner left (agents stay in the store).
    pub async fn stop(&self) {
        self.shared.tasks.stop().await;
    }

    /// Resolves once the node is told to stop: by [`NodeHandle::shutdown`], or by itself when
    /// its store fails (then [`NodeHandle::store_failure`] says why).
    pub async fn stopped(&self) {
        self.shared.tasks.stopping().await;
    }

    /// Why the node's store can no longer be written, if it cannot (the node then stops).
    pub fn store_failure(&self) -> Option<String> {
        self.shared.store.failure().borrow().clone()
    }

    /// How many tasks of this node are running (0 once [`NodeHandle::stop`] returned).
    pub fn running_tasks(&self) -> usize {
        self.shared.tasks.running()
    }

    fn resume_stored_agents(&self) {
        let agents = match self.shared.store.agent_metas() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("cannot list stored agents: {e}");
                return;
            }
        };
        for rec in agents {
            let shared = &self.shared;
            match rec.state {
                AgentState::Leaving { .. } => {
                    shared
                        .tasks
                        .spawn(hop::recover_departure(shared.clone(), rec));
                }
                AgentState::Arriving { .. } => {
                    shared
                        .tasks
                        .spawn(hop::ask_hop_decision(shared.clone(), rec));
                }
                _ => runner::spawn_agent(shared, rec.id.clone(), rec.hop),
            }
        }
        // Messages that stayed queued for agents that left (or whose arrival did not commit),
        // whose forwarding this node's restart cut short.
        match self.shared.store.left_behind() {
            Ok(queues) => {
                for (agent, seqs) in queues {
                    routing::forward_left_behind(&self.shared, &agent, seqs);
                }
            }
            Err(e) => tracing::error!("cannot list the messages left behind: {e}"),
        }
    }
}

/// Stops the node once its store fails. Nothing the node does can be kept from then on, and
/// acting without keeping it would break what the store promises (an agent reported ended
/// that runs again after a restart, a hop answered that is not recorded). Every agent stays as
/// it was last stored; a restart (which opens the file again) resumes each from there.
async fn stop_when_the_store_fails(shared: Arc<Shared>) {
    let mut failure = shared.store.failure();
    let cause = match failure.wait_for(Option::is_some).await {
        Ok(cause) => cause.clone().unwrap_or_default(),
        Err(_) => return,
    };
    tracing::error!(
        "the store failed ({cause}): the node stops; its agents stay as they were last \
         stored, and resume from there when it restarts"
    );
    shared.tasks.signal_stop();
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
