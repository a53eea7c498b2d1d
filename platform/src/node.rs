//! A tern node on libp2p: the swarm, the hop, package and control protocols, and the agents it
//! runs.
//!
//! Shape (after rust-libp2p's file-sharing example): [`Node::start`] spawns one task that owns
//! the `Swarm` and answers `SwarmCommand`s; protocols run over libp2p-stream, whose `Control`
//! is cloneable, so each exchange is its own task and the swarm task never blocks on a peer.
//! Agent slices run off the runtime ([`crate::slices`]), so a busy agent never stalls
//! networking. Durable state lives in the [`Store`].
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agent_lang::rhai::Dynamic;
use agent_lang::{unknown_node_error, Execution, HostEnv, Limits, Outcome, Program, Resume};
use futures::future::{BoxFuture, Shared as SharedFuture};
use futures::{FutureExt, StreamExt};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity, Multiaddr, PeerId, Swarm};
use security::{
    verify_hop, AgentId, HopCheck, HopEnvelope, HopFields, Package, PackageHash, PublicKey,
    SecretKey, TrustPolicy, VerifiedPackage, FIRST_HOP,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::store::{
    AgentMeta, AgentRecord, AgentState, Arrival, Batch, Durability, Store, StoreError,
};
use crate::verifier::BatchVerifier;
use crate::wire::{
    next_frame_start, push_frame, read_bulk, read_frame, read_frame_after, write_bulk, write_frame,
    write_frames, AgentEnd, AgentStatus, ControlReply, ControlRequest, HopDecision, HopOffer,
    HopReply, PackageReply, PackageRequest, StatusReport, CONTROL_PROTOCOL, HOP_PROTOCOL,
    INLINE_CONTINUATION, MAX_FRAME, PACKAGE_PROTOCOL,
};

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
    /// Where to report each hop this node sends (for `tern run --trace`).
    pub hop_log: Option<mpsc::UnboundedSender<HopRecord>>,
}

/// One hop as a trace reports it.
#[derive(Debug, Clone)]
pub struct HopRecord {
    /// Hop number.
    pub hop: u64,
    /// Source node name.
    pub from: String,
    /// Destination node name.
    pub to: String,
    /// Size of the continuation.
    pub bytes: usize,
    /// From the agent's suspension at the source to the agent stored at the destination (the
    /// one-way transit of the offer excluded: the two clocks are not compared).
    pub micros: u64,
}

/// Where a test wants a node to die during a hop (fault injection; never set outside tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Source: once its departure record is durable (the offer is out), before its Commit.
    SourceAfterLeaving,
    /// Source: once its departure record is durable, before anything of the hop was sent.
    SourceBeforeOffer,
    /// Source: after the destination acknowledged, before deleting its copy.
    SourceAfterAck,
    /// Destination: after storing the agent as arriving, before applying the source's decision.
    DestinationAfterStore,
    /// Any node: after an agent took a message off its queue in `receive`.
    AfterReceive,
    /// Any node: after it queued a message for an agent it holds, before answering the sender.
    AfterQueue,
}

/// Reads the fault point from `TERN_FAULT` (only the end-to-end crash tests set it).
fn fault_from_env() -> Option<FaultPoint> {
    match std::env::var("TERN_FAULT").ok()?.as_str() {
        "source-after-leaving" => Some(FaultPoint::SourceAfterLeaving),
        "source-before-offer" => Some(FaultPoint::SourceBeforeOffer),
        "source-after-ack" => Some(FaultPoint::SourceAfterAck),
        "destination-after-store" => Some(FaultPoint::DestinationAfterStore),
        "after-receive" => Some(FaultPoint::AfterReceive),
        "after-queue" => Some(FaultPoint::AfterQueue),
        _ => None,
    }
}

#[derive(NetworkBehaviour)]
struct NodeBehaviour {
    discovery: discovery::Discovery,
    stream: libp2p_stream::Behaviour,
}

/// Requests to the task that owns the swarm.
enum SwarmCommand {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    /// Announce (Kademlia provider record) that this node serves the package with this hash.
    Provide([u8; 32]),
    /// Find nodes that announced the package with this hash.
    FindProviders([u8; 32], oneshot::Sender<Vec<PeerId>>),
}

/// See `Shared::peer_facts`.
#[derive(Clone)]
struct PeerFacts {
    key: PublicKey,
    text: String,
}

#[derive(Default)]
struct KnownPeers {
    by_peer: HashMap<PeerId, PeerFacts>,
    by_key: HashMap<[u8; 32], PublicKey>,
}

/// A compiled package this node can run.
#[derive(Clone)]
struct Loaded {
    package: VerifiedPackage,
    program: Program,
}

struct Shared {
    name: String,
    key: SecretKey,
    public: PublicKey,
    peer_id: PeerId,
    /// `peer_id` as text (the form the store and the wire use).
    me: String,
    store: Store,
    trust: TrustPolicy,
    limits: Limits,
    fault: Option<FaultPoint>,
    hop_log: Option<mpsc::UnboundedSender<HopRecord>>,
    /// Connected tern peers and their names (from identify).
    peers: Mutex<HashMap<PeerId, String>>,
    listen: Mutex<Vec<Multiaddr>>,
    programs: Mutex<HashMap<[u8; 32], Arc<Loaded>>>,
    /// Launchers waiting for agents of this home node to end.
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<AgentEnd>>>>,
    /// Runner tasks on this node, by (agent, hop envelope number): an agent that comes back
    /// while the runner that sent it away is still finishing gets a runner of its own.
    running: Mutex<HashSet<(String, u64)>>,
    /// Wakes agents waiting in `receive` when a message is queued for them.
    mailboxes: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    /// Bounds the exchanges handled at once, so a flood of peers cannot exhaust the node.
    streams: Semaphore,
    /// Exchanges each peer may have handled at once: one peer cannot take every permit of
    /// `streams` and starve the others (its extra exchanges wait on its own semaphore).
    peer_streams: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
    /// Peers' ed25519 keys and id texts, worked out once.
    peer_facts: Mutex<KnownPeers>,
    /// Idle hop and control streams to peers, for the next exchange.
    idle_streams: StreamPool,
    /// Hops being received right now and offers their senders gave up on.
    arrivals: Mutex<ArrivalGate>,
    /// Hashes of the hop envelopes this node signed lately: an agent that comes back presents
    /// one as its custody, and its signature needs no check.
    signed: Mutex<HashSet<[u8; 32]>>,
    /// Checks the signatures of arriving hops in batches.
    verifier: BatchVerifier,
    /// Departure records being written, by envelope hash: a destination asking whether such a
    /// hop committed waits for the record.
    departures: Mutex<HashMap<[u8; 32], DepartureRecorded>>,
    control: libp2p_stream::Control,
    commands: mpsc::Sender<SwarmCommand>,
}

/// A handle to a running node. Cloneable; the node stops when [`NodeHandle::shutdown`] is
/// called or the last handle is dropped.
#[derive(Clone)]
pub struct NodeHandle {
    shared: Arc<Shared>,
    stop: Arc<tokio::sync::watch::Sender<bool>>,
}

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
        use anyhow::Context;
        if !discovery::is_valid_name(&config.name) {
            anyhow::bail!(
                "invalid node name '{}': use 1 to 64 of A-Z a-z 0-9 . _ -",
                config.name
            );
        }
        crate::memory::return_freed_memory_when_idle();
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        let store = Store::open(&config.data_dir.join("tern.redb"), config.durability)
            .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
        let keypair =
            identity::Keypair::ed25519_from_bytes(config.key.seed()).context("node key")?;
        let peer_id = keypair.public().to_peer_id();
        let discovery =
            discovery::Discovery::new(&keypair, &config.name, config.mdns).context("discovery")?;
        let mut swarm = crate::wire::swarm(keypair, |_| NodeBehaviour {
            discovery,
            stream: libp2p_stream::Behaviour::new(),
        })?;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let mut control = swarm.behaviour().stream.new_control();
        let incoming_hops = control.accept(HOP_PROTOCOL).context("hop protocol")?;
        let incoming_packages = control
            .accept(PACKAGE_PROTOCOL)
            .context("package protocol")?;
        let incoming_control = control
            .accept(CONTROL_PROTOCOL)
            .context("control protocol")?;
        let (commands, command_rx) = mpsc::channel(64);
        let shared = Arc::new(Shared {
            name: config.name.clone(),
            public: config.key.public(),
            key: config.key,
            peer_id,
            me: peer_id.to_string(),
            store,
            trust: config.trust,
            limits: config.limits,
            fault: fault_from_env(),
            hop_log: config.hop_log,
            peers: Mutex::new(HashMap::new()),
            listen: Mutex::new(Vec::new()),
            programs: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            running: Mutex::new(HashSet::new()),
            mailboxes: Mutex::new(HashMap::new()),
            streams: Semaphore::new(256),
            peer_streams: Mutex::new(HashMap::new()),
            peer_facts: Mutex::new(KnownPeers::default()),
            idle_streams: StreamPool::default(),
            arrivals: Mutex::new(ArrivalGate::default()),
            signed: Mutex::new(HashSet::new()),
            verifier: BatchVerifier::default(),
            departures: Mutex::new(HashMap::new()),
            control,
            commands,
        });
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (listening_tx, listening_rx) = oneshot::channel();
        tokio::spawn(swarm_loop(
            swarm,
            shared.clone(),
            command_rx,
            stop_rx.clone(),
            Some(listening_tx),
        ));
        tokio::spawn(accept_loop(
            incoming_hops,
            shared.clone(),
            stop_rx.clone(),
            Protocol::Hop,
        ));
        tokio::spawn(accept_loop(
            incoming_packages,
            shared.clone(),
            stop_rx.clone(),
            Protocol::Package,
        ));
        tokio::spawn(accept_loop(
            incoming_control,
            shared.clone(),
            stop_rx.clone(),
            Protocol::Control,
        ));
        if !config.listen.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(10), listening_rx).await;
        }
        let handle = NodeHandle {
            shared,
            stop: Arc::new(stop_tx),
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
        self.shared.peer_id
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Addresses the node listens on, each ending in `/p2p/<peer id>`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        lock(&self.shared.listen)
            .iter()
            .map(|a| {
                a.clone()
                    .with(libp2p::multiaddr::Protocol::P2p(self.shared.peer_id))
            })
            .collect()
    }

    /// Names of the tern peers this node is connected to.
    pub fn peer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.shared.peers).values().cloned().collect();
        v.sort();
        v
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

    /// Launches a verified, admitted package here; returns the agent id. `end` (if given)
    /// receives how the agent ended, wherever that happens.
    ///
    /// # Errors
    ///
    /// The trust policy refuses the package, or it cannot be stored or compiled.
    pub fn launch(
        &self,
        package: VerifiedPackage,
        launcher: Option<String>,
    ) -> Result<(String, oneshot::Receiver<AgentEnd>), String> {
        launch(&self.shared, package, launcher)
    }

    /// Sends `message` (a portable value) to `agent`, wherever it is.
    ///
    /// # Errors
    ///
    /// The value cannot travel, or no node knows the agent, or it has finished.
    pub async fn send(&self, agent: &str, message: &Dynamic) -> Result<(), String> {
        let bytes = agent_lang::encode_portable(message).map_err(|e| e.to_string())?;
        route_message(&self.shared, agent, bytes).await
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

    /// This node's status.
    pub fn status(&self) -> StatusReport {
        status(&self.shared)
    }

    /// Stops the node's tasks (agents stay in the store).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
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
            let shared = self.shared.clone();
            match rec.state {
                AgentState::Leaving { .. } => {
                    tokio::spawn(recover_departure(shared, rec));
                }
                AgentState::Arriving { .. } => {
                    tokio::spawn(ask_hop_decision(shared, rec));
                }
                _ => spawn_agent(&shared, rec.id.clone(), rec.hop),
            }
        }
    }
}

async fn swarm_loop(
    mut swarm: Swarm<NodeBehaviour>,
    shared: Arc<Shared>,
    mut commands: mpsc::Receiver<SwarmCommand>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut listening: Option<oneshot::Sender<()>>,
) {
    let mut pending_dials: HashMap<
        libp2p::swarm::ConnectionId,
        oneshot::Sender<Result<(), String>>,
    > = HashMap::new();
    let mut pending_providers: HashMap<
        libp2p::kad::QueryId,
        (oneshot::Sender<Vec<PeerId>>, HashSet<PeerId>),
    > = HashMap::new();
    let mut last_bootstrap: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            command = commands.recv() => match command {
                None => break,
                Some(SwarmCommand::Dial(addr, reply)) => {
                    let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id().address(addr).build();
                    let id = opts.connection_id();
                    match swarm.dial(opts) {
                        Ok(()) => { pending_dials.insert(id, reply); }
                        Err(e) => { let _ = reply.send(Err(e.to_string())); }
                    }
                }
                Some(SwarmCommand::Provide(hash)) => {
                    if let Err(e) = swarm.behaviour_mut().discovery.kad.start_providing(libp2p::kad::RecordKey::new(&hash)) {
                        tracing::warn!("cannot announce a package: {e}");
                    }
                }
                Some(SwarmCommand::FindProviders(hash, reply)) => {
                    let id = swarm.behaviour_mut().discovery.kad.get_providers(libp2p::kad::RecordKey::new(&hash));
                    pending_providers.insert(id, (reply, HashSet::new()));
                }
            },
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { address, .. } => {
                    lock(&shared.listen).push(address);
                    if let Some(tx) = listening.take() { let _ = tx.send(()); }
                }
                SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, .. } => {
                    if let Some(reply) = pending_dials.remove(&connection_id) { let _ = reply.send(Ok(())); }
                    if endpoint.is_dialer() {
                        swarm.add_peer_address(peer_id, endpoint.get_remote_address().clone());
                    }
                }
                SwarmEvent::OutgoingConnectionError { connection_id, error, .. } => {
                    if let Some(reply) = pending_dials.remove(&connection_id) { let _ = reply.send(Err(error.to_string())); }
                }
                SwarmEvent::ConnectionClosed { peer_id, num_established: 0, .. } => {
                    lock(&shared.peers).remove(&peer_id);
                    lock(&shared.peer_streams).remove(&peer_id);
                    shared.idle_streams.forget(&peer_id);
                }
                SwarmEvent::Behaviour(NodeBehaviourEvent::Discovery(discovery::DiscoveryEvent::Identify(
                    identify::Event::Received { peer_id, info, .. },
                ))) => {
                    if let Some(name) = discovery::name_from_agent_version(&info.agent_version) {
                        lock(&shared.peers).insert(peer_id, name);
                        for addr in info.listen_addrs {
                            swarm.behaviour_mut().discovery.kad.add_address(&peer_id, addr.clone());
                            swarm.add_peer_address(peer_id, addr);
                        }
                        // Learn the rest of the mesh from the new peer's routing table.
                        if last_bootstrap.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                            last_bootstrap = Some(tokio::time::Instant::now());
                            let _ = swarm.behaviour_mut().discovery.kad.bootstrap();
                        }
                    }
                }
                SwarmEvent::Behaviour(NodeBehaviourEvent::Discovery(discovery::DiscoveryEvent::Kad(
                    libp2p::kad::Event::RoutingUpdated { peer, addresses, .. },
                // A private mesh is small: connect to every tern node Kademlia finds, so
                // `nodes()` names them all.
                ))) if peer != shared.peer_id && !swarm.is_connected(&peer) => {
                    let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer).addresses(addresses.into_vec()).build();
                    let _ = swarm.dial(opts);
                }
                SwarmEvent::Behaviour(NodeBehaviourEvent::Discovery(discovery::DiscoveryEvent::Kad(
                    libp2p::kad::Event::OutboundQueryProgressed { id, result: libp2p::kad::QueryResult::GetProviders(result), step, .. },
                ))) => {
                    let done = match result {
                        Ok(libp2p::kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                            if let Some((_, found)) = pending_providers.get_mut(&id) { found.extend(providers); }
                            step.last
                        }
                        _ => true,
                    };
                    if done {
                        if let Some((reply, found)) = pending_providers.remove(&id) {
                            let _ = reply.send(found.into_iter().filter(|p| *p != shared.peer_id).collect());
                        }
                    }
                }
                SwarmEvent::Behaviour(NodeBehaviourEvent::Discovery(discovery::DiscoveryEvent::Mdns(
                    libp2p::mdns::Event::Discovered(found),
                ))) => {
                    for (peer, addr) in found {
                        if peer != shared.peer_id && !lock(&shared.peers).contains_key(&peer) {
                            let _ = swarm.dial(addr);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Exchanges of one peer handled at once (see `Shared::peer_streams`).
const MAX_STREAMS_PER_PEER: usize = 32;

#[derive(Clone, Copy)]
enum Protocol {
    Hop,
    Package,
    Control,
}

/// What an exchange holds while it is handled: a permit of its peer's and one of the node's.
/// Idle reused streams hold none.
struct ExchangePermits<'a> {
    per_peer: Arc<Semaphore>,
    all: &'a Semaphore,
}

impl ExchangePermits<'_> {
    /// None once the node is shutting down.
    async fn acquire(
        &self,
    ) -> Option<(
        tokio::sync::SemaphorePermit<'_>,
        tokio::sync::SemaphorePermit<'_>,
    )> {
        let peer = self.per_peer.acquire().await.ok()?;
        let all = self.all.acquire().await.ok()?;
        Some((peer, all))
    }

    /// The next request on a reused stream and the permits its exchange holds; None once the
    /// peer closed the stream (or left it idle) or the node is shutting down. The permits are
    /// taken once the request begins, so idle streams hold none.
    async fn next_request<T: serde::de::DeserializeOwned>(
        &self,
        stream: &mut libp2p::Stream,
    ) -> Result<Option<(T, impl Sized + '_)>, crate::wire::WireError> {
        let Some(first) = next_frame_start(stream).await? else {
            return Ok(None);
        };
        let Some(permits) = self.acquire().await else {
            return Ok(None);
        };
        let request = read_frame_after(stream, first, MAX_FRAME).await?;
        Ok(Some((request, permits)))
    }
}

async fn accept_loop(
    mut incoming: libp2p_stream::IncomingStreams,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    protocol: Protocol,
) {
    loop {
        let next = tokio::select! {
            _ = stop.changed() => break,
            next = incoming.next() => next,
        };
        let Some((peer, stream)) = next else { break };
        // libp2p-stream drops inbound streams when this loop lags: hand each to its own task.
        let shared = shared.clone();
        let per_peer = lock(&shared.peer_streams)
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_STREAMS_PER_PEER)))
            .clone();
        tokio::spawn(async move {
            let permits = ExchangePermits {
                per_peer,
                all: &shared.streams,
            };
            let result = match protocol {
                Protocol::Hop => handle_hop(&shared, peer, stream, &permits).await,
                Protocol::Package => handle_package(&shared, stream, &permits).await,
                Protocol::Control => handle_control(&shared, peer, stream, &permits).await,
            };
            if let Err(e) = result {
                tracing::warn!(%peer, "exchange failed: {e}");
            }
        });
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Streams kept open to peers between exchanges. A hop or control exchange takes one (or opens
/// a new one) and gives it back once it got its answer; the receiving side serves exchange
/// after exchange on a stream until it is closed or idle for `wire::STREAM_IDLE`.
///
/// New streams to a peer are opened one at a time, each once the previous one got its first
/// answer: libp2p-stream hands inbound streams to the receiver through a queue of one and drops
/// what does not fit, so a burst of new streams (many agents leaving at once) would mostly be
/// dropped.
#[derive(Default)]
struct StreamPool {
    /// Oldest first: a stream is taken from the back (the most recently used, least likely
    /// to have been closed by the other side) and expired ones leave from the front.
    idle: Mutex<HashMap<(PeerId, libp2p::StreamProtocol), VecDeque<IdleStream>>>,
    opening: Mutex<HashMap<(PeerId, libp2p::StreamProtocol), OpeningTurn>>,
}

/// Held by the exchange whose turn it is to open a new stream to a peer.
type OpeningTurn = Arc<tokio::sync::Mutex<()>>;

/// A stream for one exchange.
struct PeerStream {
    stream: libp2p::Stream,
    /// It served an exchange before (and may have died with its connection since).
    reused: bool,
    /// A new stream holds its peer's opening turn until the first answer arrives on it.
    opening: Option<tokio::sync::OwnedMutexGuard<()>>,
}

/// A stream and since when it has been idle.
type IdleStream = (std::time::Instant, libp2p::Stream);

/// Idle streams kept per peer and protocol.
const IDLE_STREAMS_PER_PEER: usize = 128;
/// An idle stream older than this is dropped rather than reused: the other side closes its end
/// after `wire::STREAM_IDLE`, and this stays well inside that.
const IDLE_STREAM_REUSE: Duration = Duration::from_secs(10);

impl StreamPool {
    fn take(&self, peer: PeerId, protocol: &libp2p::StreamProtocol) -> Option<libp2p::Stream> {
        let mut idle = lock(&self.idle);
        let streams = idle.get_mut(&(peer, protocol.clone()))?;
        let (since, stream) = streams.pop_back()?;
        if since.elapsed() < IDLE_STREAM_REUSE {
            return Some(stream);
        }
        // The most recent one expired, so all did.
        streams.clear();
        None
    }

    fn put(&self, peer: PeerId, protocol: libp2p::StreamProtocol, stream: libp2p::Stream) {
        let mut idle = lock(&self.idle);
        let streams = idle.entry((peer, protocol)).or_default();
        let now = std::time::Instant::now();
        while streams
            .front()
            .is_some_and(|(since, _)| now.duration_since(*since) >= IDLE_STREAM_REUSE)
        {
            streams.pop_front();
        }
        if streams.len() < IDLE_STREAMS_PER_PEER {
            streams.push_back((now, stream));
        }
    }

    /// The connection to `peer` closed: its streams are dead.
    fn forget(&self, peer: &PeerId) {
        lock(&self.idle).retain(|(p, _), _| p != peer);
        lock(&self.opening).retain(|(p, _), _| p != peer);
    }

    fn opening_turn(&self, peer: PeerId, protocol: &libp2p::StreamProtocol) -> OpeningTurn {
        lock(&self.opening)
            .entry((peer, protocol.clone()))
            .or_default()
            .clone()
    }
}

/// A stream to `peer` for one exchange: an idle one, or a new one once it is this exchange's
/// turn to open one.
async fn stream_to(
    shared: &Shared,
    peer: PeerId,
    protocol: libp2p::StreamProtocol,
) -> Result<PeerStream, String> {
    let reused = |stream| PeerStream {
        stream,
        reused: true,
        opening: None,
    };
    if let Some(stream) = shared.idle_streams.take(peer, &protocol) {
        return Ok(reused(stream));
    }
    let turn = shared
        .idle_streams
        .opening_turn(peer, &protocol)
        .lock_owned()
        .await;
    // Another exchange may have given its stream back meanwhile.
    if let Some(stream) = shared.idle_streams.take(peer, &protocol) {
        return Ok(reused(stream));
    }
    let stream = shared
        .control
        .clone()
        .open_stream(peer, protocol)
        .await
        .map_err(|e| e.to_string())?;
    Ok(PeerStream {
        stream,
        reused: false,
        opening: Some(turn),
    })
}

/// What the destination knows of hops in progress, so that a source asking about a hop whose
/// acknowledgement it lost (`ControlRequest::HopStatus`) gets an answer that stays true.
#[derive(Default)]
struct ArrivalGate {
    /// (agent, hop) being received now: the answer about them waits.
    arriving: HashSet<(String, u64)>,
    /// Envelope hashes of offers answered "not held": if one still comes in, it is refused.
    abandoned: HashMap<[u8; 32], std::time::Instant>,
}

/// How long an abandoned offer is remembered (far longer than any stream stays open).
const ABANDONED_MEMORY: Duration = Duration::from_secs(600);

/// Holds (agent, hop) in `ArrivalGate::arriving` while a hop is received.
struct Arriving<'a> {
    shared: &'a Shared,
    key: (String, u64),
}

impl Drop for Arriving<'_> {
    fn drop(&mut self) {
        lock(&self.shared.arrivals).arriving.remove(&self.key);
    }
}

/// Enters the receipt of (agent, hop) with this envelope: waits while another receipt of the
/// same hop is in progress (a sender's retry); refuses an offer its sender gave up on.
async fn enter_arrival<'a>(
    shared: &'a Shared,
    key: (String, u64),
    envelope: [u8; 32],
) -> Result<Arriving<'a>, String> {
    loop {
        {
            let mut gate = lock(&shared.arrivals);
            if gate.abandoned.contains_key(&envelope) {
                return Err("the sender gave up on this hop".into());
            }
            if gate.arriving.insert(key.clone()) {
                return Ok(Arriving { shared, key });
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether this node holds (agent, hop), once no receipt of that hop is in progress; a "no"
/// shuts out the offer with envelope hash `envelope` for good.
async fn hop_held(shared: &Shared, agent: String, hop: u64, envelope: Option<[u8; 32]>) -> bool {
    let key = (agent, hop);
    let deadline = tokio::time::Instant::now() + 2 * crate::wire::IO_TIMEOUT;
    loop {
        {
            let mut gate = lock(&shared.arrivals);
            if !gate.arriving.contains(&key) || tokio::time::Instant::now() > deadline {
                let held = shared.store.has_seen(&key.0, key.1).unwrap_or(false);
                if !held {
                    if let Some(hash) = envelope {
                        gate.abandoned
                            .retain(|_, since| since.elapsed() < ABANDONED_MEMORY);
                        gate.abandoned.insert(hash, std::time::Instant::now());
                    }
                }
                return held;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn die_if(shared: &Shared, point: FaultPoint) {
    if shared.fault == Some(point) {
        tracing::error!("fault injection: dying at {point:?}");
        std::process::exit(86);
    }
}

impl Shared {
    /// Compiles (once) the package with this hash from the store.
    fn loaded(&self, hash: &[u8; 32]) -> Result<Arc<Loaded>, String> {
        if let Some(l) = lock(&self.programs).get(hash) {
            return Ok(l.clone());
        }
        let bytes = self
            .store
            .package(hash)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("package {} is not on this node", hex(hash)))?;
        let package = Package::from_bytes(&bytes)
            .and_then(Package::verify)
            .map_err(|e| e.to_string())?;
        let limits = crate::package_files::limits_for(&package, self.limits.clone());
        let program = Program::compile(package.source(), &limits).map_err(|e| e.to_string())?;
        let loaded = Arc::new(Loaded { package, program });
        lock(&self.programs).insert(*hash, loaded.clone());
        Ok(loaded)
    }

    /// What the node knows of a peer (its key, its id as text), learned once.
    fn peer_facts(&self, peer: &PeerId) -> Option<PeerFacts> {
        if let Some(facts) = lock(&self.peer_facts).by_peer.get(peer) {
            return Some(facts.clone());
        }
        let facts = PeerFacts {
            key: PublicKey::from_peer_id_bytes(&peer.to_bytes()).ok()?,
            text: peer.to_string(),
        };
        let mut known = lock(&self.peer_facts);
        if known.by_peer.len() >= 4096 {
            // Peers come and go; a long-lived node does not keep every key it ever saw.
            *known = KnownPeers::default();
        }
        known.by_peer.insert(*peer, facts.clone());
        known.by_key.insert(facts.key.to_bytes(), facts.key);
        Some(facts)
    }

    /// The ed25519 key of a peer (every tern node has one: its peer id inlines it).
    fn key_of(&self, peer: &PeerId) -> Option<PublicKey> {
        self.peer_facts(peer).map(|f| f.key)
    }

    /// A peer id as text (the form records and the wire use).
    fn text_of(&self, peer: &PeerId) -> String {
        self.peer_facts(peer)
            .map_or_else(|| peer.to_string(), |f| f.text)
    }

    /// The key with these bytes, if it is this node's or a known peer's.
    fn known_key(&self, bytes: &[u8; 32]) -> Option<PublicKey> {
        if self.public.to_bytes() == *bytes {
            return Some(self.public);
        }
        lock(&self.peer_facts).by_key.get(bytes).copied()
    }

    /// The name of a node given by its peer id as text (its text when it has no known name).
    fn name_of(&self, peer: &str) -> String {
        if peer == self.me {
            return self.name.clone();
        }
        peer.parse::<PeerId>()
            .ok()
            .and_then(|p| lock(&self.peers).get(&p).cloned())
            .unwrap_or_else(|| peer.to_string())
    }

    /// [`Shared::name_of`] a peer.
    fn name_of_peer(&self, peer: &PeerId) -> String {
        if *peer == self.peer_id {
            return self.name.clone();
        }
        let name = lock(&self.peers).get(peer).cloned();
        name.unwrap_or_else(|| self.text_of(peer))
    }

    fn node_names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.peers).values().cloned().collect();
        names.push(self.name.clone());
        names.sort();
        names.dedup();
        names
    }

    /// A node name or peer id to a peer.
    fn resolve(&self, to: &str) -> Option<PeerId> {
        if to == self.name {
            return Some(self.peer_id);
        }
        if let Some((p, _)) = lock(&self.peers).iter().find(|(_, n)| n.as_str() == to) {
            return Some(*p);
        }
        to.parse::<PeerId>().ok()
    }

    fn env(&self, rec: &AgentRecord) -> HostEnv {
        let node = self.name.clone();
        let agent = rec.id.clone();
        HostEnv {
            here: self.name.clone(),
            home: self.name_of(&rec.home),
            nodes: self.node_names(),
            agent_id: rec.id.clone(),
            hops: rec.hops as i64,
            printer: Arc::new(move |text: &str| {
                tracing::info!(target: "tern::agent", "[{node} {agent}] {text}");
                eprintln!("[{node} {agent}] {text}");
            }),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn launch(
    shared: &Arc<Shared>,
    package: VerifiedPackage,
    launcher: Option<String>,
) -> Result<(String, oneshot::Receiver<AgentEnd>), String> {
    shared
        .trust
        .admit_package(&package)
        .map_err(|e| format!("package refused: {e}"))?;
    let hash = package.hash();
    shared
        .store
        .batch(|b| b.put_package(hash.as_bytes(), &package.to_bytes()))
        .map_err(|e| e.to_string())?;
    shared.loaded(hash.as_bytes())?;
    let id = AgentId::generate().to_string();
    let (tx, rx) = oneshot::channel();
    lock(&shared.waiters)
        .entry(id.clone())
        .or_default()
        .push(tx);
    let rec = AgentRecord {
        meta: AgentMeta {
            id: id.clone(),
            package: *hash.as_bytes(),
            hop: 0,
            hops: 0,
            home: shared.me.clone(),
            launcher,
            state: AgentState::Ready,
            envelope: Vec::new(),
        },
        continuation: Vec::new(),
    };
    shared
        .store
        .batch(|b| b.put_agent(&rec))
        .map_err(|e| e.to_string())?;
    let _ = shared.store.batch(|b| b.set_location(&id, &shared.me));
    spawn_agent(shared, id.clone(), 0);
    Ok((id, rx))
}

fn status(shared: &Shared) -> StatusReport {
    let mut peers: Vec<(String, String)> = lock(&shared.peers)
        .iter()
        .map(|(p, n)| (n.clone(), p.to_string()))
        .collect();
    peers.sort();
    let agents = shared
        .store
        .agent_metas()
        .unwrap_or_default()
        .into_iter()
        .map(|r| AgentStatus {
            id: r.id,
            package: hex(&r.package),
            state: match r.state {
                AgentState::Ready => "running".into(),
                AgentState::Waiting { .. } => "waiting".into(),
                AgentState::Answered { .. } => "running".into(),
                AgentState::Leaving { to, hop, .. } => {
                    format!("leaving for {} (hop {hop})", shared.name_of(&to))
                }
                AgentState::Arriving { from, .. } => {
                    format!("arriving from {} (hop {})", shared.name_of(&from), r.hop)
                }
            },
            hops: r.hops,
        })
        .collect();
    let forwards = shared
        .store
        .forwards()
        .unwrap_or_default()
        .into_iter()
        .map(|(a, to)| (a, shared.name_of(&to)))
        .collect();
    StatusReport {
        name: shared.name.clone(),
        peer_id: shared.me.clone(),
        peers,
        agents,
        forwards,
    }
}

/// Starts the runner task of a stored agent (once per arrival).
fn spawn_agent(shared: &Arc<Shared>, id: String, hop: u64) {
    spawn_runner(shared, id, hop, None, None);
}

/// Starts the runner of a stored agent; `first` (if any) is what its pending primitive
/// returns; `state` (if any) is the agent as the hop that just stored it decoded it, which
/// spares reading it back.
fn spawn_runner(
    shared: &Arc<Shared>,
    id: String,
    hop: u64,
    first: Option<Resume>,
    state: Option<Runnable>,
) {
    let key = (id, hop);
    if !lock(&shared.running).insert(key.clone()) {
        return;
    }
    let shared = shared.clone();
    tokio::spawn(async move {
        let state = match state {
            Some(state) => Some(state),
            None => load_runnable(&shared, &key.0, key.1).await,
        };
        if let Some(state) = state {
            run_agent(&shared, state, first).await;
        }
        lock(&shared.running).remove(&key);
    });
}

/// A stored agent, ready to run: its record, its program, and its execution if it is decoded
/// already (a hop decodes small continuations before storing them; large ones, and those read
/// back from the store, are decoded by their runner).
struct Runnable {
    rec: AgentRecord,
    exec: Option<Execution>,
    loaded: Arc<Loaded>,
}

/// Reads the agent stored for this arrival; None if it is gone (or was replaced by a later
/// arrival). An agent whose package cannot be loaded ends with a node failure.
async fn load_runnable(shared: &Arc<Shared>, id: &str, arrival: u64) -> Option<Runnable> {
    let rec = match shared.store.agent(id) {
        // (An agent stored as arriving runs once its hop committed.)
        Ok(Some(AgentRecord {
            meta:
                AgentMeta {
                    state: AgentState::Arriving { .. },
                    ..
                },
            ..
        })) => return None,
        Ok(Some(r)) if r.hop == arrival => r,
        Ok(_) => return None,
        Err(e) => {
            tracing::error!(agent = id, "cannot read agent: {e}");
            return None;
        }
    };
    let loaded = match shared.loaded(&rec.package) {
        Ok(l) => l,
        Err(e) => {
            finish(shared, &rec, node_failure(shared, e)).await;
            return None;
        }
    };
    Some(Runnable {
        rec,
        exec: None,
        loaded,
    })
}

/// An agent end for a failure of the node rather than of the script.
fn node_failure(shared: &Shared, error: String) -> AgentEnd {
    AgentEnd::Failed {
        error,
        node: shared.name.clone(),
        position: None,
        unread: 0,
    }
}

/// The source's side of a completed hop, in one transaction: drop our copy and leave a
/// forwarding pointer (and, on the agent's home node, record where it went) — unless the agent
/// has already come back (a newer arrival replaced the departure record), in which case the
/// record is the new arrival's and stays.
///
/// (The write waits for the disk. Recovery could redo it, but tried unsynced, it made the next
/// hop slower: redb's next synced commit then writes out what the unsynced one deferred.)
async fn complete_departure(
    shared: &Arc<Shared>,
    id: &str,
    to: &str,
    hop: u64,
    carried: usize,
) -> Result<(), String> {
    let (agent, dest, me) = (id.to_string(), to.to_string(), shared.me.clone());
    let queued = shared
        .store
        .write(move |b| {
            let Some(left) = b.complete_departure_by(&agent, hop, &dest)? else {
                return Ok(Vec::new());
            };
            if left.home == me {
                b.set_location(&agent, &dest)?;
            }
            b.take_messages(&agent)
        })
        .await
        .map_err(|e| format!("migrate: {e}"))?;
    // The first `carried` travelled with the agent; those that arrived while it was in flight
    // follow it.
    forward_queued(shared, id, queued.into_iter().skip(carried).collect());
    Ok(())
}

/// What became of an agent's hop attempt.
enum HopResult {
    /// The agent lives on the destination now.
    Left,
    /// It migrated to this very node: carry on.
    Stayed,
}

/// Runs a stored agent until it leaves, finishes or fails. `first` is what its pending
/// primitive returns (a recovered, interrupted hop); otherwise a waiting agent goes back to
/// waiting and any other resumes with `()`.
async fn run_agent(shared: &Arc<Shared>, state: Runnable, first: Option<Resume>) {
    let Runnable {
        mut rec,
        exec,
        loaded,
    } = state;
    let decoded = match exec {
        Some(exec) => Ok(exec),
        None if rec.continuation.is_empty() => Ok(Execution::new(&loaded.program)),
        None => Execution::decode(&loaded.program, &rec.continuation),
    };
    let mut exec = match decoded {
        Ok(exec) => exec,
        Err(e) => {
            let failure = node_failure(shared, format!("stored continuation: {e}"));
            return finish(shared, &rec, failure).await;
        }
    };
    let mut input = match (first, &rec.state) {
        (Some(input), _) => input,
        (None, AgentState::Waiting { timeout_at_ms }) => {
            let left = timeout_at_ms.map(|t| t.saturating_sub(now_ms()));
            match receive(shared, &mut rec, &exec, &loaded, left).await {
                Ok(v) => Resume::Value(v),
                Err(e) => Resume::Error(e),
            }
        }
        (None, AgentState::Answered { value }) => {
            match agent_lang::decode_portable(&loaded.program, value) {
                Ok(v) => Resume::Value(v),
                Err(e) => Resume::Error(format!("receive: bad message: {e}")),
            }
        }
        (None, _) => Resume::Start,
    };
    loop {
        let env = shared.env(&rec);
        let slice = crate::slices::run(move || {
            let outcome = exec.resume(&env, input);
            (exec, outcome)
        })
        .await;
        let (e, outcome) = match slice {
            Ok(r) => r,
            Err(join) => {
                return finish(
                    shared,
                    &rec,
                    node_failure(shared, format!("agent slice crashed: {join}")),
                )
                .await
            }
        };
        exec = e;
        match outcome {
            Outcome::Finished(v) => {
                let json = agent_lang::to_json(&v).to_string();
                let end = AgentEnd::Finished {
                    json,
                    node: shared.name.clone(),
                    hops: rec.hops,
                    unread: 0,
                };
                return finish(shared, &rec, end).await;
            }
            Outcome::Failed(err) => {
                return finish(shared, &rec, failed_end(&shared.name, err)).await
            }
            Outcome::Migrate { to } => match hop(shared, &mut rec, &exec, &loaded, &to).await {
                Ok(HopResult::Left) => return,
                Ok(HopResult::Stayed) => input = Resume::Start,
                Err(message) => input = Resume::Error(message),
            },
            Outcome::Receive { timeout_ms } => {
                input = match receive(shared, &mut rec, &exec, &loaded, timeout_ms).await {
                    Ok(v) => Resume::Value(v),
                    Err(e) => Resume::Error(e),
                }
            }
            Outcome::Send { to, value } => {
                input = match agent_lang::encode_portable(&value) {
                    Ok(bytes) => match route_message(shared, &to, bytes).await {
                        Ok(()) => Resume::Value(Dynamic::UNIT),
                        Err(e) => Resume::Error(format!("send: {e}")),
                    },
                    Err(e) => Resume::Error(format!("send: {e}")),
                }
            }
            _ => return finish(shared, &rec, node_failure(shared, "unknown outcome".into())).await,
        }
    }
}

/// The agent ended here: drop it, keep the result, tell its home (which tells the launcher).
async fn finish(shared: &Arc<Shared>, rec: &AgentRecord, end: AgentEnd) {
    // Messages still queued were delivered and never received: the end says how many (taken in
    // the transaction that deletes the agent, so a message is either counted here or refused
    // to its sender as sent to a finished agent).
    let id = rec.id.clone();
    let ending = end.clone();
    let end = shared
        .store
        .write(move |b| {
            let unread = b.take_messages(&id)?.len() as u64;
            let end = ending.with_unread(unread);
            b.delete_agent(&id)?;
            b.put_result(&id, &ciborium_bytes(&end))?;
            Ok(end)
        })
        .await
        .unwrap_or(end);
    if end.unread() > 0 {
        let unread = end.unread();
        tracing::warn!(agent = %rec.id, "the agent ended with {unread} unread message(s)");
    }
    if rec.home == shared.me {
        deliver_end(shared, &rec.id, end);
        return;
    }
    let Ok(home) = rec.home.parse::<PeerId>() else {
        return;
    };
    // The home may be briefly unreachable: retry for a while; the result stays stored here.
    for attempt in 0..20u64 {
        match control_request(
            shared,
            home,
            &ControlRequest::Ended {
                agent: rec.id.clone(),
                end: end.clone(),
            },
        )
        .await
        {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(agent = %rec.id, "cannot report the end to the home node (attempt {attempt}): {e}");
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
        }
    }
}

fn failed_end(node: &str, err: agent_lang::AgentError) -> AgentEnd {
    AgentEnd::Failed {
        error: err.message,
        node: node.to_string(),
        position: err.position.map(|(l, c)| (l as u64, c as u64)),
        unread: 0,
    }
}

fn ciborium_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = ciborium::into_writer(v, &mut out);
    out
}

fn deliver_end(shared: &Shared, agent: &str, end: AgentEnd) {
    let _ = shared
        .store
        .batch(|b| b.put_result(agent, &ciborium_bytes(&end)));
    if let Some(waiters) = lock(&shared.waiters).remove(agent) {
        for w in waiters {
            let _ = w.send(end.clone());
        }
    }
}

async fn control_request(
    shared: &Shared,
    peer: PeerId,
    request: &ControlRequest,
) -> Result<ControlReply, ControlFailure> {
    loop {
        let mut s = stream_to(shared, peer, CONTROL_PROTOCOL)
            .await
            .map_err(ControlFailure::NotSent)?;
        if let Err(e) = write_frame(&mut s.stream, request).await {
            // A reused stream that cannot be written to died with its connection before the
            // request went out: open a fresh one.
            if s.reused {
                continue;
            }
            return Err(ControlFailure::NotSent(e.to_string()));
        }
        match read_frame(&mut s.stream, MAX_FRAME).await {
            Ok(reply) => {
                shared.idle_streams.put(peer, CONTROL_PROTOCOL, s.stream);
                return Ok(reply);
            }
            // A peer that serves one request per stream closed the idle one: afresh. (tern
            // nodes answer every request they read, so the request was not handled.)
            Err(crate::wire::WireError::Io(e))
                if s.reused && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(ControlFailure::Unanswered(e.to_string())),
        }
    }
}

/// Why a control request got no reply.
#[derive(Debug)]
enum ControlFailure {
    /// The request did not go out.
    NotSent(String),
    /// It went out and no answer came: the peer may have carried it out.
    Unanswered(String),
}

impl std::fmt::Display for ControlFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent(e) => write!(f, "{e}"),
            Self::Unanswered(e) => write!(f, "no answer ({e})"),
        }
    }
}

/// Moves the agent to `to`, exactly once. On any failure before the destination owns the agent,
/// the agent stays here and `migrate` throws the returned message.
async fn hop(
    shared: &Arc<Shared>,
    rec: &mut AgentRecord,
    exec: &Execution,
    loaded: &Loaded,
    to: &str,
) -> Result<HopResult, String> {
    let Some(dest) = shared.resolve(to) else {
        return Err(unknown_node_error(to));
    };
    if dest == shared.peer_id {
        rec.hops += 1;
        return Ok(HopResult::Stayed);
    }
    let dest_key = shared
        .key_of(&dest)
        .ok_or_else(|| format!("migrate: {to} has no ed25519 identity"))?;
    let started = std::time::Instant::now();
    let continuation = exec
        .encode_into(Vec::with_capacity(exec.encoded_len_hint()))
        .map_err(|e| format!("migrate: {e}"))?;
    let previous = if rec.envelope.is_empty() {
        None
    } else {
        Some(
            HopEnvelope::decode_known(&rec.envelope, |k| shared.known_key(k))
                .map_err(|e| format!("migrate: stored envelope: {e}"))?,
        )
    };
    let agent_id: AgentId = rec
        .id
        .parse()
        .map_err(|_| "migrate: agent id is not an envelope id".to_string())?;
    let next_hop = previous.as_ref().map_or(FIRST_HOP, |p| p.fields().hop + 1);
    let envelope = HopEnvelope::sign(
        HopFields {
            agent_id,
            hop: next_hop,
            package_hash: loaded.package.hash(),
            continuation_hash: continuation_hash(&continuation),
            previous: previous.as_ref().map(HopEnvelope::hash),
            from: shared.public,
            to: dest_key,
            time_ms: now_ms(),
        },
        &shared.key,
    )
    .map_err(|e| format!("migrate: {e}"))?;
    let envelope_hash = *envelope.hash().as_bytes();
    {
        let mut signed = lock(&shared.signed);
        if signed.len() >= 65_536 {
            // Agents that come back after this only cost one more signature check.
            signed.clear();
        }
        signed.insert(envelope_hash);
    }
    // The messages queued so far travel with the agent.
    let carried = shared
        .store
        .messages(&rec.id)
        .map_err(|e| format!("migrate: {e}"))?;
    // Durably "leaving for dest at hop h", written while the offer travels and the destination
    // stores the agent as arriving: the destination runs it only after this record is durable
    // (`HopDecision::Commit`, or asked after a crash), so the two commits overlap and a crash
    // at any point leaves one live copy.
    // (The continuation is moved, never copied: it may be 100 MB.)
    let leaving_state = |checkpoint| AgentState::Leaving {
        to: shared.text_of(&dest),
        hop: next_hop,
        carried: carried.len() as u64,
        envelope: envelope_hash,
        checkpoint,
    };
    // A large continuation is not written again while it travels (that write would compete
    // with sending it): the record keeps the agent's last checkpoint, from which it resumes
    // if the hop does not happen.
    let kept = if continuation.len() >= KEEP_CHECKPOINT_FROM {
        match shared.store.agent_meta(&rec.id) {
            Ok(Some(stored)) => Some(AgentMeta {
                state: leaving_state(Some(Box::new(stored.state.clone()))),
                ..stored
            }),
            _ => None,
        }
    } else {
        None
    };
    let leaving = Arc::new(AgentRecord {
        meta: AgentMeta {
            state: leaving_state(None),
            ..rec.meta.clone()
        },
        continuation,
    });
    let recorded: DepartureRecorded = {
        let (store, record, kept) = (shared.store.clone(), leaving.clone(), kept.clone());
        let write = move |b: &mut Batch<'_>| match &kept {
            None => b.put_agent(&record),
            Some(meta) if b.put_agent_meta(meta)? => Ok(()),
            Some(_) => Err(StoreError::Inconsistent {
                table: "agents",
                key: record.id.clone(),
                what: "the departing agent is no longer stored",
            }),
        };
        tokio::spawn(async move { store.write(write).await })
            .map(|written| match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot record the departure: {e}")),
                Err(e) => Err(format!("cannot record the departure: {e}")),
            })
            .boxed()
            .shared()
    };
    lock(&shared.departures).insert(envelope_hash, recorded.clone());
    let continuation = &leaving.continuation;
    let inline = continuation.len() <= INLINE_CONTINUATION;
    let dest_text = shared.text_of(&dest);
    let offer = HopOffer {
        envelope: envelope.encode(),
        previous: rec.envelope.clone(),
        continuation_len: continuation.len() as u64,
        inline: if inline {
            continuation.clone()
        } else {
            Vec::new()
        },
        hops: rec.hops + 1,
        prepared_micros: started.elapsed().as_micros() as u64,
        messages: carried
            .iter()
            .cloned()
            .map(serde_bytes::ByteBuf::from)
            .collect(),
        home: rec.home.clone(),
        launcher: rec.launcher.clone(),
    };
    let sent = SentHop {
        dest,
        agent: &rec.id,
        hop: next_hop,
        envelope: Some(envelope_hash),
    };
    if shared.fault == Some(FaultPoint::SourceBeforeOffer) && recorded.clone().await.is_ok() {
        die_if(shared, FaultPoint::SourceBeforeOffer);
    }
    if inline && shared.store.durability() == Durability::NoSync {
        // Without fsync the record costs little: written first, it lets the decision travel
        // with the offer (one message instead of two, and one write at the destination).
        let _ = recorded.clone().await;
    }
    let outcome = send_hop(shared, &sent, &offer, continuation, &recorded).await;
    let result = match (outcome, recorded.await) {
        (SendOutcome::Owned, Ok(())) => {
            die_if(shared, FaultPoint::SourceAfterAck);
            let completed =
                complete_departure(shared, &rec.id, &dest_text, next_hop, carried.len()).await;
            if let Err(e) = completed {
                // The destination owns the agent: it must not run here again. The departure
                // record stays; recovery (now, or after a restart) completes it.
                tracing::error!(agent = %rec.id, "hop to {to} done, but not recorded here: {e}");
                let record = kept.clone().unwrap_or_else(|| leaving.meta.clone());
                tokio::spawn(recover_departure(shared.clone(), record));
            }
            Ok(HopResult::Left)
        }
        (SendOutcome::Unknown(reason), Ok(())) => {
            // The destination could not even be asked: keep the departure record; recovery
            // settles it when the destination answers.
            tracing::warn!(agent = %rec.id, "hop to {to} unsettled: {reason}");
            let record = kept.clone().unwrap_or_else(|| leaving.meta.clone());
            tokio::spawn(recover_departure(shared.clone(), record));
            Ok(HopResult::Left)
        }
        // The destination does not hold the agent, or holds it only as arriving and hears
        // that the hop did not commit (the departure record is not there): it stays here.
        (SendOutcome::NotTaken(reason), _) => {
            stay(shared, rec, kept.is_some());
            Err(format!("migrate: cannot move to {to}: {reason}"))
        }
        (_, Err(e)) => {
            stay(shared, rec, kept.is_some());
            Err(format!("migrate: {e}"))
        }
    };
    // Only now: until the store says how the hop ended, a destination asking about it must
    // wait for the record.
    lock(&shared.departures).remove(&envelope_hash);
    if continuation.len() >= KEEP_CHECKPOINT_FROM {
        crate::memory::after_large_hop();
    }
    result
}

/// From this size on, a departure record keeps the agent's last checkpoint rather than its
/// continuation at `migrate` (see `AgentState::Leaving`): writing it again would cost as much as
/// sending it. So a crash of the source during such a hop that does not go through resumes the
/// agent from that checkpoint (as a crash between checkpoints does), not at `migrate`.
pub const KEEP_CHECKPOINT_FROM: usize = 1 << 20;

/// BLAKE3 of a continuation: a large one hashed on every core (while it is hashed, the hop
/// waits and nothing else of it runs).
fn continuation_hash(continuation: &[u8]) -> [u8; 32] {
    if continuation.len() < 1 << 20 {
        return *blake3::hash(continuation).as_bytes();
    }
    *blake3::Hasher::new()
        .update_rayon(continuation)
        .finalize()
        .as_bytes()
}

/// A hop that did not happen: the agent's record goes back to what it was before (only its
/// metadata, when the departure record kept its continuation).
fn stay(shared: &Shared, rec: &AgentRecord, continuation_kept: bool) {
    let restored = if continuation_kept {
        shared
            .store
            .batch(|b| b.put_agent_meta(&rec.meta))
            .map(drop)
    } else {
        shared.store.batch(|b| b.put_agent(rec))
    };
    if let Err(e) = restored {
        tracing::error!(agent = %rec.id, "cannot restore the agent after a failed hop: {e}");
    }
}

/// The source's departure record being written (see `hop`): `Ok` once it is durable.
type DepartureRecorded = SharedFuture<BoxFuture<'static, Result<(), String>>>;

enum SendOutcome {
    /// The destination acknowledged (or already had it).
    Owned,
    /// The destination did not take the agent.
    NotTaken(String),
    /// The continuation may have arrived, and the destination could not be asked.
    Unknown(String),
}

/// The hop being sent, as the destination knows it.
struct SentHop<'a> {
    dest: PeerId,
    agent: &'a str,
    hop: u64,
    /// BLAKE3 of its envelope (None when settling a departure found in the store).
    envelope: Option<[u8; 32]>,
}

/// How one attempt to send a hop over a stream ended.
enum HopExchange {
    /// The destination answered; `reusable`: the stream is fit for the next exchange.
    Answered(SendOutcome, bool),
    /// Nothing of the agent reached the destination.
    NotSent(String),
    /// The agent may have reached it.
    Unknown(String),
}

async fn send_hop(
    shared: &Shared,
    sent: &SentHop<'_>,
    offer: &HopOffer,
    continuation: &[u8],
    recorded: &DepartureRecorded,
) -> SendOutcome {
    // Attempts are retried: libp2p-stream drops inbound streams when the destination's accept
    // queue is full, and a reused stream may have died with its connection. Resending the
    // same offer is safe (the destination stores it once); giving up is only safe once the
    // destination has shut out every copy that may still be on its way.
    let mut attempt = 0u64;
    let mut maybe_delivered = false;
    loop {
        attempt += 1;
        let failure = match stream_to(shared, sent.dest, HOP_PROTOCOL).await {
            Err(e) => format!("unreachable ({e})"),
            Ok(mut s) => {
                let reused = s.reused;
                match hop_exchange(shared, &mut s, offer, continuation, recorded).await {
                    HopExchange::Answered(outcome, reusable) => {
                        if reusable {
                            shared.idle_streams.put(sent.dest, HOP_PROTOCOL, s.stream);
                        }
                        return outcome;
                    }
                    HopExchange::NotSent(e) if reused => {
                        // Most likely the connection closed under an idle stream: afresh.
                        attempt -= 1;
                        e
                    }
                    HopExchange::NotSent(e) => e,
                    // The stream broke after the offer went out: ask, then try again.
                    HopExchange::Unknown(e) => {
                        maybe_delivered = true;
                        match resolve_departure(shared, sent, false).await {
                            Some(true) => return SendOutcome::Owned,
                            Some(false) => e,
                            None => return SendOutcome::Unknown(e),
                        }
                    }
                }
            }
        };
        if attempt >= 6 {
            if !maybe_delivered {
                return SendOutcome::NotTaken(failure);
            }
            return match resolve_departure(shared, sent, true).await {
                Some(true) => SendOutcome::Owned,
                Some(false) => SendOutcome::NotTaken(failure),
                None => SendOutcome::Unknown(failure),
            };
        }
        tokio::time::sleep(Duration::from_millis(10 * attempt * attempt)).await;
    }
}

/// One attempt at a hop on one stream: the offer (with the continuation inline when it is
/// small, else Ready and the raw continuation), the source's decision once its departure record
/// is written, then the destination's answer.
async fn hop_exchange(
    shared: &Shared,
    s: &mut PeerStream,
    offer: &HopOffer,
    continuation: &[u8],
    recorded: &DepartureRecorded,
) -> HopExchange {
    let stream = &mut s.stream;
    let answered = |reply| match reply {
        HopReply::Stored | HopReply::Duplicate => HopExchange::Answered(SendOutcome::Owned, true),
        HopReply::Refused(r) => {
            HopExchange::Answered(SendOutcome::NotTaken(format!("refused: {r}")), true)
        }
        HopReply::Ready => HopExchange::Answered(
            SendOutcome::NotTaken("protocol error: Ready out of turn".into()),
            false,
        ),
    };
    if !offer.inline.is_empty() && matches!(recorded.peek(), Some(Ok(()))) {
        // The departure record is written already (see `hop`): the offer and the decision to
        // commit go out together, and the destination stores the agent runnable at once.
        die_if(shared, FaultPoint::SourceAfterLeaving);
        let mut frames = Vec::with_capacity(offer.inline.len() + 1024);
        let pushed = push_frame(&mut frames, offer)
            .and_then(|()| push_frame(&mut frames, &HopDecision::Commit));
        if let Err(e) = pushed {
            return HopExchange::NotSent(e.to_string());
        }
        if let Err(e) = write_frames(stream, &frames).await {
            return HopExchange::Unknown(e.to_string());
        }
        let reply = read_frame::<_, HopReply>(stream, MAX_FRAME).await;
        s.opening = None;
        return match reply {
            Ok(reply) => answered(reply),
            Err(e) => HopExchange::Unknown(e.to_string()),
        };
    }
    if let Err(e) = write_frame(stream, offer).await {
        // An inline offer may have arrived whole, a raw one cannot have.
        return if offer.inline.is_empty() {
            HopExchange::NotSent(e.to_string())
        } else {
            HopExchange::Unknown(e.to_string())
        };
    }
    if offer.inline.is_empty() {
        let reply = read_frame::<_, HopReply>(stream, MAX_FRAME).await;
        // Answered (or not at all): the next new stream to this peer may be opened.
        s.opening = None;
        match reply {
            Err(e) => return HopExchange::NotSent(e.to_string()),
            Ok(HopReply::Ready) => {}
            Ok(reply) => return answered(reply),
        }
        // Until the bytes are all out, the destination holds nothing.
        if let Err(e) = write_bulk(stream, continuation).await {
            return HopExchange::NotSent(e.to_string());
        }
    }
    let decision = match recorded.clone().await {
        Ok(()) => {
            die_if(shared, FaultPoint::SourceAfterLeaving);
            HopDecision::Commit
        }
        Err(e) => HopDecision::Abort(e),
    };
    if let Err(e) = write_frame(stream, &decision).await {
        return match decision {
            HopDecision::Commit => HopExchange::Unknown(e.to_string()),
            HopDecision::Abort(why) => HopExchange::Answered(SendOutcome::NotTaken(why), false),
        };
    }
    let reply = read_frame::<_, HopReply>(stream, MAX_FRAME).await;
    s.opening = None;
    match (reply, decision) {
        (Ok(reply), HopDecision::Abort(why)) => match answered(reply) {
            HopExchange::Answered(_, reusable) => {
                HopExchange::Answered(SendOutcome::NotTaken(why), reusable)
            }
            other => other,
        },
        (Ok(reply), HopDecision::Commit) => answered(reply),
        (Err(_), HopDecision::Abort(why)) => {
            HopExchange::Answered(SendOutcome::NotTaken(why), false)
        }
        (Err(e), HopDecision::Commit) => HopExchange::Unknown(e.to_string()),
    }
}

/// Asks the destination whether it holds the hop; with `give_up`, a "no" also shuts out any
/// copy of the offer still on its way. None: it could not be asked.
async fn resolve_departure(shared: &Shared, sent: &SentHop<'_>, give_up: bool) -> Option<bool> {
    for attempt in 0..5u64 {
        match control_request(
            shared,
            sent.dest,
            &ControlRequest::HopStatus {
                agent: sent.agent.to_string(),
                hop: sent.hop,
                envelope: sent.envelope.filter(|_| give_up),
            },
        )
        .await
        {
            Ok(ControlReply::HopHeld(held)) => return Some(held),
            _ => tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await,
        }
    }
    None
}

/// Settles a departure whose outcome is unknown (after a lost acknowledgement or a restart):
/// asks the destination until it answers; if it holds the agent, drop ours, else resume ours.
async fn recover_departure(shared: Arc<Shared>, rec: AgentMeta) {
    let AgentState::Leaving {
        to,
        hop,
        carried,
        checkpoint,
        ..
    } = rec.state.clone()
    else {
        return;
    };
    let Ok(dest) = to.parse::<PeerId>() else {
        let restored = AgentMeta {
            state: checkpoint.map_or(AgentState::Ready, |state| *state),
            ..rec.clone()
        };
        let _ = shared
            .store
            .write(move |b| b.put_agent_meta(&restored))
            .await;
        return spawn_agent(&shared, rec.id.clone(), rec.hop);
    };
    let mut delay = Duration::from_millis(200);
    loop {
        let sent = SentHop {
            dest,
            agent: &rec.id,
            hop,
            envelope: None,
        };
        if let Some(held) = resolve_departure(&shared, &sent, true).await {
            if held {
                let _ = complete_departure(&shared, &rec.id, &to, hop, carried as usize).await;
            } else {
                // Back to the state before the hop (only the state changes: the stored
                // continuation stays as it is). At `migrate`, the agent resumes and `migrate`
                // throws; at its last checkpoint, it resumes from there.
                let (state, first) = match checkpoint {
                    Some(state) => (*state, None),
                    None => {
                        let interrupted = format!(
                            "migrate: the hop to {} was interrupted",
                            shared.name_of(&to)
                        );
                        (AgentState::Ready, Some(Resume::Error(interrupted)))
                    }
                };
                let back = AgentMeta {
                    state,
                    ..rec.clone()
                };
                let stored = back.clone();
                let _ = shared.store.write(move |b| b.put_agent_meta(&stored)).await;
                spawn_runner(&shared, back.id, back.hop, first, None);
            }
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Waits for the agent's next message (or the timeout), without holding a thread. Each step
/// is a checkpoint of the agent suspended at this `receive`, and `rec` becomes it: while it
/// waits, stored as Waiting (a restarted node resumes it waiting); once a message is here, as
/// Answered by it, in the transaction that takes the message off the queue (a crash after that
/// resumes it with that message: none is lost or received twice). An agent holding a value
/// that cannot be stored gets no checkpoint here (a crash resumes it from its last one).
async fn receive(
    shared: &Arc<Shared>,
    rec: &mut AgentRecord,
    exec: &Execution,
    loaded: &Loaded,
    timeout_ms: Option<u64>,
) -> Result<Dynamic, String> {
    let notify = lock(&shared.mailboxes)
        .entry(rec.id.clone())
        .or_default()
        .clone();
    let deadline = timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut here = match exec.encode() {
        Ok(continuation) => AtReceive::Encoded(continuation),
        Err(e) => {
            tracing::debug!(agent = %rec.id, "receive without a checkpoint: {e}");
            AtReceive::Unstorable
        }
    };
    loop {
        match shared.store.message_count(&rec.id) {
            Ok(0) => {}
            Ok(_) => {
                if let Some(message) = take_message(shared, rec, &mut here).await? {
                    return agent_lang::decode_portable(&loaded.program, &message)
                        .map_err(|e| format!("receive: bad message: {e}"));
                }
            }
            Err(e) => return Err(format!("receive: {e}")),
        }
        if let AtReceive::Encoded(continuation) = std::mem::replace(&mut here, AtReceive::Stored) {
            let timeout_at_ms = timeout_ms.map(|ms| now_ms().saturating_add(ms));
            let state = AgentState::Waiting { timeout_at_ms };
            let checkpoint = AgentRecord::from_parts(
                AgentMeta {
                    state,
                    ..rec.meta.clone()
                },
                continuation,
            );
            let stored = shared
                .store
                .write(move |b| b.put_agent(&checkpoint).map(|()| checkpoint))
                .await;
            *rec = stored.map_err(|e| format!("receive: {e}"))?;
            // A message may have come in before the record said Waiting: look again.
            continue;
        }
        match deadline {
            Some(d) => {
                if tokio::time::timeout_at(d, notify.notified()).await.is_err() {
                    // Timed out: `receive` returns `()`, and the checkpoint says so.
                    if let AtReceive::Stored = here {
                        let unit = agent_lang::encode_portable(&Dynamic::UNIT)
                            .map_err(|e| format!("receive: {e}"))?;
                        let answered = AgentMeta {
                            state: AgentState::Answered { value: unit },
                            ..rec.meta.clone()
                        };
                        let stored = shared
                            .store
                            .write(move |b| b.put_agent_meta(&answered).map(|_| answered.state))
                            .await;
                        rec.state = stored.map_err(|e| format!("receive: {e}"))?;
                    }
                    return Ok(Dynamic::UNIT);
                }
            }
            None => notify.notified().await,
        }
    }
}

/// The checkpoint `receive` can make of the agent at this `receive`.
enum AtReceive {
    /// Its continuation here, not stored yet.
    Encoded(Vec<u8>),
    /// `rec` is its Waiting record here: only the state changes.
    Stored,
    /// It holds a value that cannot be stored: no checkpoint.
    Unstorable,
}

/// Takes the agent's next message off its queue and, in the same transaction, stores the agent
/// as Answered by it (as `here` allows); `rec` becomes that record. None, with `here` as it
/// was, if the queue is empty.
async fn take_message(
    shared: &Shared,
    rec: &mut AgentRecord,
    here: &mut AtReceive,
) -> Result<Option<Vec<u8>>, String> {
    let checkpoint = std::mem::replace(here, AtReceive::Unstorable);
    let (id, meta) = (rec.id.clone(), rec.meta.clone());
    let (message, checkpoint) = shared
        .store
        .write(move |b| {
            let Some(message) = b.pop_message(&id)? else {
                return Ok((None, Err(checkpoint)));
            };
            let answered = AgentMeta {
                state: AgentState::Answered {
                    value: message.clone(),
                },
                ..meta
            };
            let stored = match checkpoint {
                AtReceive::Encoded(continuation) => {
                    let record = AgentRecord::from_parts(answered, continuation);
                    b.put_agent(&record)?;
                    Some((record.meta.state, Some(record.continuation)))
                }
                AtReceive::Stored => {
                    b.put_agent_meta(&answered)?;
                    Some((answered.state, None))
                }
                AtReceive::Unstorable => None,
            };
            Ok((Some(message), Ok(stored)))
        })
        .await
        .map_err(|e| format!("receive: {e}"))?;
    match (message, checkpoint) {
        (Some(message), Ok(stored)) => {
            die_if(shared, FaultPoint::AfterReceive);
            if let Some((state, continuation)) = stored {
                rec.state = state;
                if let Some(continuation) = continuation {
                    rec.continuation = continuation;
                }
            }
            Ok(Some(message))
        }
        (_, Err(unchanged)) => {
            *here = unchanged;
            Ok(None)
        }
        (None, Ok(_)) => Ok(None),
    }
}

/// What this node can do with a message for `agent`.
enum Delivery {
    /// Queued here (the agent is here, or leaving from here).
    Queued,
    /// The agent is elsewhere: this peer knows more.
    Forward(PeerId),
    /// The agent finished.
    Finished,
    /// This node knows nothing of the agent.
    Unknown,
}

/// Queues the message if the agent is here (without waking it: see [`Wake`]), or says where
/// to forward it.
fn deliver_here(shared: &Shared, agent: &str, message: &[u8]) -> Result<Delivery, String> {
    let d = shared
        .store
        .batch(|b| {
            if b.agent_meta(agent)?.is_some() {
                b.push_message(agent, message)?;
                return Ok(Delivery::Queued);
            }
            Ok(Delivery::Unknown)
        })
        .map_err(|e| e.to_string())?;
    if let Delivery::Queued = d {
        return Ok(d);
    }
    let me = shared.peer_id.to_string();
    let next = shared.store.forward(agent).ok().flatten().or_else(|| {
        shared
            .store
            .location(agent)
            .ok()
            .flatten()
            .filter(|l| *l != me)
    });
    if let Some(peer) = next.and_then(|p| p.parse::<PeerId>().ok()) {
        return Ok(Delivery::Forward(peer));
    }
    if shared.store.result(agent).ok().flatten().is_some() {
        return Ok(Delivery::Finished);
    }
    Ok(Delivery::Unknown)
}

/// A message delivered: if it was queued on this node, the agent it is for, to wake once
/// whoever sent the message has been answered. Waking first would let the agent take the
/// message, and its node die, before the sender learns that it was delivered.
#[must_use]
struct Wake(Option<String>);

impl Wake {
    fn wake(self, shared: &Shared) {
        if let Some(agent) = self.0 {
            lock(&shared.mailboxes)
                .entry(agent)
                .or_default()
                .notify_one();
        }
    }
}

/// Delivers a message to `agent` wherever it is: here, along forwarding pointers, or — when
/// this node knows nothing of it — by asking every connected peer.
async fn route_message(shared: &Arc<Shared>, agent: &str, message: Vec<u8>) -> Result<(), String> {
    route(shared, agent, message, 16, false)
        .await
        .map(|wake| wake.wake(shared))
        .map_err(|e| e.to_string())
}

/// Why [`route`] did not deliver a message.
#[derive(Debug)]
enum Undelivered {
    /// It was not delivered, for this reason.
    Refused(String),
    /// (To a probe) this node knows nothing of the agent.
    NotHere,
    /// It went to the node holding the agent (this one says where) and no answer came back:
    /// it may have been delivered, so it is not sent anywhere else.
    Unconfirmed(String),
}

impl std::fmt::Display for Undelivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(e) => write!(f, "{e}"),
            Self::NotHere => write!(f, "not here"),
            Self::Unconfirmed(e) => write!(f, "{e}; the message may have been delivered"),
        }
    }
}

/// What a peer's answer to a forwarded `Deliver` says.
fn forwarded(
    shared: &Shared,
    peer: PeerId,
    answer: Result<ControlReply, ControlFailure>,
) -> Result<Wake, Undelivered> {
    match answer {
        Ok(ControlReply::Delivered) => Ok(Wake(None)),
        Ok(ControlReply::NotHere) => Err(Undelivered::NotHere),
        Ok(ControlReply::Error(e)) => Err(Undelivered::Refused(e)),
        Ok(ControlReply::Unconfirmed(e)) => Err(Undelivered::Unconfirmed(e)),
        Ok(other) => Err(Undelivered::Refused(format!("unexpected reply {other:?}"))),
        Err(ControlFailure::NotSent(e)) => Err(Undelivered::Refused(e)),
        Err(ControlFailure::Unanswered(e)) => Err(Undelivered::Unconfirmed(format!(
            "{} took the message and then broke off ({e})",
            shared.name_of_peer(&peer)
        ))),
    }
}

async fn route(
    shared: &Arc<Shared>,
    agent: &str,
    message: Vec<u8>,
    ttl: u8,
    probe: bool,
) -> Result<Wake, Undelivered> {
    match deliver_here(shared, agent, &message).map_err(Undelivered::Refused)? {
        Delivery::Queued => Ok(Wake(Some(agent.to_string()))),
        Delivery::Finished => Err(Undelivered::Refused(format!("agent {agent} has finished"))),
        Delivery::Forward(peer) if ttl > 0 => {
            let request = ControlRequest::Deliver {
                agent: agent.to_string(),
                message,
                ttl: ttl - 1,
                probe: false,
            };
            match forwarded(shared, peer, control_request(shared, peer, &request).await) {
                // (Only a probe is answered so; the pointer led nowhere.)
                Err(Undelivered::NotHere) => Err(Undelivered::Refused(format!(
                    "{} does not know agent {agent}",
                    shared.name_of_peer(&peer)
                ))),
                other => other,
            }
        }
        Delivery::Forward(_) => Err(Undelivered::Refused(format!(
            "agent {agent}: too many forwarding steps"
        ))),
        Delivery::Unknown if probe => Err(Undelivered::NotHere),
        Delivery::Unknown => {
            let peers: Vec<PeerId> = lock(&shared.peers).keys().copied().collect();
            let mut known_error = None;
            for peer in peers {
                let request = ControlRequest::Deliver {
                    agent: agent.to_string(),
                    message: message.clone(),
                    ttl: ttl.saturating_sub(1),
                    probe: true,
                };
                let answer = control_request(shared, peer, &request).await;
                if matches!(answer, Err(ControlFailure::NotSent(_))) {
                    // Unreachable: it cannot be holding the agent for us.
                    continue;
                }
                match forwarded(shared, peer, answer) {
                    Ok(wake) => return Ok(wake),
                    // Asking another peer could deliver it twice.
                    Err(e @ Undelivered::Unconfirmed(_)) => return Err(e),
                    // The peer knows the agent but cannot deliver (e.g. it finished).
                    Err(Undelivered::Refused(e)) => known_error = Some(e),
                    Err(Undelivered::NotHere) => {}
                }
            }
            Err(Undelivered::Refused(
                known_error.unwrap_or_else(|| format!("no agent {agent} in the mesh")),
            ))
        }
    }
}

/// Forwards the messages queued for an agent that has just left to where it went.
fn forward_queued(shared: &Arc<Shared>, agent: &str, messages: Vec<Vec<u8>>) {
    if messages.is_empty() {
        return;
    }
    let shared = shared.clone();
    let agent = agent.to_string();
    tokio::spawn(async move {
        for m in messages {
            if let Err(e) = route_message(&shared, &agent, m).await {
                tracing::warn!(%agent, "a queued message could not follow the agent: {e}");
            }
        }
    });
}

/// Destination side of hops: offer after offer on one stream, until the source closes it.
async fn handle_hop(
    shared: &Arc<Shared>,
    peer: PeerId,
    mut stream: libp2p::Stream,
    permits: &ExchangePermits<'_>,
) -> Result<(), crate::wire::WireError> {
    while let Some((offer, _permits)) = permits.next_request::<HopOffer>(&mut stream).await? {
        match receive_hop(shared, peer, &mut stream, offer).await {
            Ok(arrived) => {
                let acknowledged = write_frame(&mut stream, &HopReply::Stored).await;
                // Stored is stored: the agent runs here even if the acknowledgement is lost
                // (the source then learns of the hop through `HopStatus`).
                tell_home_location(shared, &arrived.rec, &peer);
                let (id, hop) = (arrived.rec.id.clone(), arrived.rec.hop);
                spawn_runner(shared, id, hop, None, Some(arrived));
                acknowledged?;
            }
            Err(Refusal::Reply(reply)) => write_frame(&mut stream, &reply).await?,
            Err(Refusal::Wire(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Why a hop was not received: an answer for the source, or a broken stream.
enum Refusal {
    Reply(HopReply),
    Wire(crate::wire::WireError),
}

impl From<crate::wire::WireError> for Refusal {
    fn from(e: crate::wire::WireError) -> Self {
        Refusal::Wire(e)
    }
}

fn refused(why: String) -> Refusal {
    Refusal::Reply(HopReply::Refused(why))
}

/// Checks an offer, takes the continuation (inline, or raw after Ready), verifies it, stores the
/// agent as arriving while the source's decision travels, and makes it runnable on `Commit`.
async fn receive_hop(
    shared: &Arc<Shared>,
    peer: PeerId,
    stream: &mut libp2p::Stream,
    offer: HopOffer,
) -> Result<Runnable, Refusal> {
    let received = std::time::Instant::now();
    let inline = !offer.inline.is_empty();
    let checked = match check_offer(shared, peer, &offer).await {
        Ok(checked) => checked,
        // The source's decision follows an inline offer whatever the answer.
        Err(refusal) if inline => return Err(after_decision(stream, refusal).await),
        Err(refusal) => return Err(refusal),
    };
    let (continuation, continuation_hash) = if inline {
        let hash = *blake3::hash(&offer.inline).as_bytes();
        (offer.inline, hash)
    } else {
        write_frame(stream, &HopReply::Ready).await?;
        read_bulk(stream, offer.continuation_len as usize).await?
    };
    // From here on the source's decision follows, whatever the answer.
    let CheckedOffer {
        envelope,
        previous,
        sender,
        loaded,
        _arriving,
    } = checked;
    let fields = envelope.fields().clone();
    let envelope_hash = *envelope.hash().as_bytes();
    // An agent coming back presents the envelope this node signed when it sent it away.
    let signed_here = previous
        .as_ref()
        .is_some_and(|p| lock(&shared.signed).contains(p.hash().as_bytes()));
    let hash = fields.package_hash;
    // The signature is checked with those of the hops arriving at the same time.
    let signature_checked = if envelope.fields().from == sender {
        let others_arriving = lock(&shared.arrivals).arriving.len() > 1;
        shared
            .verifier
            .check(envelope.clone(), others_arriving)
            .await
    } else {
        None
    };
    let check = HopCheck::new(&sender, &shared.public, &hash, &continuation_hash)
        .with_previous(previous.as_ref())
        .with_previous_known_genuine(signed_here)
        .with_signature_checked(signature_checked);
    if let Err(e) = verify_hop(envelope, &check) {
        tracing::warn!(%peer, "refused a hop: {e}");
        return Err(after_decision(stream, refused(format!("hop envelope: {e}"))).await);
    }
    // A small continuation is decoded before it is accepted; a large one (whose hash and
    // envelope were checked) by its runner, so the acknowledgement does not wait for it.
    let exec = if inline {
        match Execution::decode(&loaded.program, &continuation) {
            Ok(exec) => Some(exec),
            Err(e) => {
                let refusal = refused(format!("continuation: {e}"));
                return Err(after_decision(stream, refusal).await);
            }
        }
    } else {
        None
    };
    let messages = offer.messages;
    let rec = AgentRecord {
        meta: AgentMeta {
            id: fields.agent_id.to_string(),
            package: *hash.as_bytes(),
            hop: fields.hop,
            hops: offer.hops,
            home: offer.home,
            launcher: offer.launcher,
            state: AgentState::Arriving {
                from: shared.text_of(&peer),
                envelope: envelope_hash,
                carried: messages.len() as u64,
            },
            envelope: offer.envelope,
        },
        continuation,
    };
    // Stored durably while the source's departure record is written and its decision travels;
    // runnable at once if the decision to commit is already here when the write runs (the
    // decision is read first, so one that came with the offer is).
    let commit_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let decision = {
        let commit_seen = commit_seen.clone();
        async move {
            let decision = read_frame::<_, HopDecision>(stream, MAX_FRAME).await;
            if let Ok(HopDecision::Commit) = decision {
                commit_seen.store(true, std::sync::atomic::Ordering::Release);
            }
            decision
        }
    };
    let me = shared.me.clone();
    let mut rec = rec;
    let store = shared.store.write(move |b| {
        // An arrival of this hop number by another envelope still waits for its decision: its
        // source gave it up (the source is offering this one), so it goes.
        if let Some(AgentMeta {
            state: AgentState::Arriving { envelope: old, .. },
            hop,
            ..
        }) = b.agent_meta(&rec.id)?
        {
            if hop == rec.hop && old != envelope_hash {
                b.abort_arrival(&rec.id, &old)?;
            }
        }
        let committed = commit_seen.load(std::sync::atomic::Ordering::Acquire);
        if committed {
            rec.state = AgentState::Ready;
        }
        let arrival = b.accept_arrival(&rec)?;
        if let Arrival::New = arrival {
            for m in &messages {
                b.push_message(&rec.id, m)?;
            }
            if committed && rec.home == me {
                b.set_location(&rec.id, &me)?;
            }
        }
        Ok((arrival, rec, committed))
    });
    let (decision, stored) = tokio::join!(decision, store);
    let (rec, committed) = match stored {
        Ok((Arrival::New, rec, committed)) => (rec, committed),
        Ok((Arrival::Duplicate, ..)) => {
            decision?;
            return Err(Refusal::Reply(HopReply::Duplicate));
        }
        Err(e) => {
            decision?;
            return Err(refused(format!("cannot store the agent: {e}")));
        }
    };
    die_if(shared, FaultPoint::DestinationAfterStore);
    match decision {
        Ok(HopDecision::Commit) => {}
        Ok(HopDecision::Abort(why)) => {
            settle_arrival(shared, &rec.meta, false).await;
            return Err(refused(format!("the source gave up the hop: {why}")));
        }
        Err(e) => {
            // The decision is lost with the stream: ask the source for it.
            tokio::spawn(ask_hop_decision(shared.clone(), rec.meta.clone()));
            return Err(Refusal::Wire(e));
        }
    }
    let rec = if committed {
        rec
    } else {
        match commit_arrival(shared, &rec.id, &envelope_hash).await {
            Some(meta) => AgentRecord {
                meta: AgentMeta {
                    state: meta.state,
                    ..rec.meta
                },
                ..rec
            },
            None => return Err(refused("the arrival was dropped meanwhile".into())),
        }
    };
    if rec.continuation.len() >= KEEP_CHECKPOINT_FROM {
        crate::memory::after_large_hop();
    }
    // Reported by the destination, before the agent runs here: a trace line never races the
    // agent's end.
    if let Some(log) = &shared.hop_log {
        let _ = log.send(HopRecord {
            hop: rec.hop,
            from: shared.name_of_peer(&peer),
            to: shared.name.clone(),
            bytes: rec.continuation.len(),
            micros: offer.prepared_micros + received.elapsed().as_micros() as u64,
        });
    }
    Ok(Runnable { rec, exec, loaded })
}

/// An offer that passed the checks made before its continuation is taken.
struct CheckedOffer<'a> {
    envelope: HopEnvelope,
    previous: Option<HopEnvelope>,
    sender: PublicKey,
    loaded: Arc<Loaded>,
    /// Holds the hop in `ArrivalGate::arriving` until the offer is settled.
    _arriving: Arriving<'a>,
}

/// The checks of an offer made before its continuation is taken: the sender, the envelope, the
/// hop not seen before, the size, the package (pulled if missing) and its author.
async fn check_offer<'a>(
    shared: &'a Arc<Shared>,
    peer: PeerId,
    offer: &HopOffer,
) -> Result<CheckedOffer<'a>, Refusal> {
    let Some(sender) = shared.key_of(&peer) else {
        return Err(refused("sender has no ed25519 identity".into()));
    };
    if !shared.trust.accepts_push_from(&sender) {
        tracing::warn!(%peer, "refused a pushed agent: peer not in accept_from");
        return Err(refused(format!(
            "this node does not accept agents from {peer}"
        )));
    }
    let known = |k: &[u8; 32]| shared.known_key(k);
    let envelope = HopEnvelope::decode_known(&offer.envelope, known)
        .map_err(|e| refused(format!("envelope: {e}")))?;
    let previous = if offer.previous.is_empty() {
        None
    } else {
        Some(
            HopEnvelope::decode_known(&offer.previous, known)
                .map_err(|e| refused(format!("previous envelope: {e}")))?,
        )
    };
    let fields = envelope.fields();
    let agent = fields.agent_id.to_string();
    let arriving = enter_arrival(
        shared,
        (agent.clone(), fields.hop),
        *envelope.hash().as_bytes(),
    )
    .await
    .map_err(refused)?;
    // An agent that lives here cannot arrive here. Only a departure record (the agent is in
    // flight, and may be coming back before the departure completed) gives way to an arrival,
    // and an arrival of the same hop by another envelope (given up by its source) to this one.
    let (here, seen) = shared
        .store
        .arrival_view(&agent, fields.hop)
        .map_err(|e| refused(format!("store: {e}")))?;
    let replaces = here.as_ref().is_some_and(|m| {
        m.hop == fields.hop
            && matches!(m.state, AgentState::Arriving { .. })
            && !m.arriving_by(envelope.hash().as_bytes())
    });
    if !replaces && seen {
        return Err(Refusal::Reply(HopReply::Duplicate));
    }
    match here {
        None
        | Some(AgentMeta {
            state: AgentState::Leaving { .. },
            ..
        }) => {}
        Some(_) if replaces => {}
        Some(_) => {
            tracing::warn!(%peer, agent, "refused a hop of an agent that lives here");
            return Err(refused("this agent lives on this node".into()));
        }
    }
    if offer.continuation_len > shared.limits.max_continuation_bytes as u64 {
        return Err(refused(format!(
            "continuation of {} bytes is over this node's limit",
            offer.continuation_len
        )));
    }
    if !offer.inline.is_empty() && offer.inline.len() as u64 != offer.continuation_len {
        return Err(refused(format!(
            "the inline continuation has {} bytes, the offer announces {}",
            offer.inline.len(),
            offer.continuation_len
        )));
    }
    // Pull the code if this node lacks it (receiver-initiated, anonymous), then admit it.
    let hash = fields.package_hash;
    ensure_package(shared, peer, &hash).await.map_err(refused)?;
    let loaded = shared.loaded(hash.as_bytes()).map_err(refused)?;
    if let Err(e) = shared.trust.admit_package(&loaded.package) {
        return Err(refused(format!("package refused: {e}")));
    }
    Ok(CheckedOffer {
        envelope,
        previous,
        sender,
        loaded,
        _arriving: arriving,
    })
}

/// Takes the source's decision that follows the continuation, then gives `refusal`: the stream
/// stays in step for the next offer.
async fn after_decision(stream: &mut libp2p::Stream, refusal: Refusal) -> Refusal {
    if let Refusal::Reply(_) = refusal {
        if let Err(e) = read_frame::<_, HopDecision>(stream, MAX_FRAME).await {
            return Refusal::Wire(e);
        }
    }
    refusal
}

/// The hop committed: the agent stored as arriving by this envelope becomes runnable (an
/// unsynced write: a crash before it is durable leaves the agent arriving, and a restart asks
/// the source again). Its metadata as now stored; None if it is not arriving by this hop.
async fn commit_arrival(shared: &Shared, id: &str, envelope: &[u8; 32]) -> Option<AgentMeta> {
    let (agent, envelope, me) = (id.to_string(), *envelope, shared.me.clone());
    let committed = shared
        .store
        .write_unsynced(move |b| {
            let Some(meta) = b.commit_arrival(&agent, &envelope)? else {
                return Ok(None);
            };
            // (On the agent's home node, its location with it.)
            if meta.home == me {
                b.set_location(&agent, &me)?;
            }
            Ok(Some(meta))
        })
        .await;
    match committed {
        Ok(meta) => meta,
        Err(e) => {
            // Stored as arriving, and committed: it runs; a restart would ask the source again.
            tracing::error!(agent = id, "cannot record that the hop committed: {e}");
            shared
                .store
                .agent_meta(id)
                .ok()
                .flatten()
                .map(|m| AgentMeta {
                    state: AgentState::Ready,
                    ..m
                })
        }
    }
}

/// Applies the source's decision to an agent stored as arriving: runs it if the hop committed,
/// else drops it (and forwards what was queued for it since it arrived).
async fn settle_arrival(shared: &Arc<Shared>, meta: &AgentMeta, committed: bool) {
    let AgentState::Arriving { envelope, .. } = meta.state else {
        return;
    };
    if committed {
        if commit_arrival(shared, &meta.id, &envelope).await.is_some() {
            spawn_agent(shared, meta.id.clone(), meta.hop);
        }
        return;
    }
    let agent = meta.id.clone();
    match shared
        .store
        .write(move |b| b.abort_arrival(&agent, &envelope))
        .await
    {
        Ok(Some(queued)) => forward_queued(shared, &meta.id, queued),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(agent = %meta.id, "cannot drop an arrival that did not commit: {e}")
        }
    }
}

/// Settles an agent stored as arriving whose source's decision was lost (a broken stream, a
/// restart): asks the source until it answers.
async fn ask_hop_decision(shared: Arc<Shared>, meta: AgentMeta) {
    let AgentState::Arriving {
        ref from, envelope, ..
    } = meta.state
    else {
        return;
    };
    let Ok(source) = from.parse::<PeerId>() else {
        tracing::error!(agent = %meta.id, "arrival from an unreadable peer id {from:?}: dropped");
        return settle_arrival(&shared, &meta, false).await;
    };
    let request = ControlRequest::HopCommitted {
        agent: meta.id.clone(),
        envelope,
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match control_request(&shared, source, &request).await {
            Ok(ControlReply::HopCommitted(committed)) => {
                return settle_arrival(&shared, &meta, committed).await
            }
            Ok(other) => {
                tracing::warn!(agent = %meta.id, "the source answered {other:?} about a hop")
            }
            Err(e) => tracing::debug!(agent = %meta.id, "cannot ask the source about a hop: {e}"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The source's answer to [`ControlRequest::HopCommitted`]: whether the departure record of the
/// hop with this envelope hash is durable (waiting for it while it is written). None when the
/// store cannot be read.
async fn hop_committed(shared: &Shared, agent: &str, envelope: &[u8; 32]) -> Option<bool> {
    let recording = lock(&shared.departures).get(envelope).cloned();
    if let Some(recorded) = recording {
        return Some(recorded.await.is_ok());
    }
    // The hop's outcome is in the store: still leaving by it, or departed by it.
    match shared.store.agent_meta(agent).ok()? {
        Some(AgentMeta {
            state: AgentState::Leaving { envelope: e, .. },
            ..
        }) if e == *envelope => Some(true),
        _ => Some(shared.store.departed(agent).ok()? == Some(*envelope)),
    }
}

/// Updates the agent's location at its home node (best effort; forwarding pointers cover gaps).
/// A home that sent the agent here recorded where it went when the hop completed.
/// (An agent arriving at its home is recorded there with the arrival.)
fn tell_home_location(shared: &Arc<Shared>, rec: &AgentRecord, from: &PeerId) {
    if rec.home == shared.me {
        return;
    }
    let Ok(home) = rec.home.parse::<PeerId>() else {
        return;
    };
    if home == *from {
        return;
    }
    let shared = shared.clone();
    let request = ControlRequest::Location {
        agent: rec.id.clone(),
        node: shared.me.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = control_request(&shared, home, &request).await {
            tracing::debug!("cannot tell the home node where the agent is (forwarding pointers still lead there): {e}");
        }
    });
}

/// Makes sure the package with `hash` is in the store: pulled (anonymously, receiver-initiated)
/// from `peer` — the node offering the hop — or else from any node that announced it.
async fn ensure_package(shared: &Shared, peer: PeerId, hash: &PackageHash) -> Result<(), String> {
    if lock(&shared.programs).contains_key(hash.as_bytes()) {
        return Ok(());
    }
    if shared
        .store
        .has_package(hash.as_bytes())
        .map_err(|e| e.to_string())?
    {
        return Ok(());
    }
    let first = pull_package(shared, peer, hash).await;
    let bytes = match first {
        Ok(bytes) => bytes,
        Err(first_error) => {
            let (tx, rx) = oneshot::channel();
            let _ = shared
                .commands
                .send(SwarmCommand::FindProviders(*hash.as_bytes(), tx))
                .await;
            let providers = tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let mut pulled = None;
            for provider in providers.into_iter().filter(|p| *p != peer) {
                if let Ok(bytes) = pull_package(shared, provider, hash).await {
                    pulled = Some(bytes);
                    break;
                }
            }
            pulled.ok_or(first_error)?
        }
    };
    let key = *hash.as_bytes();
    shared
        .store
        .write(move |b| b.put_package(&key, &bytes))
        .await
        .map_err(|e| e.to_string())?;
    let _ = shared
        .commands
        .send(SwarmCommand::Provide(*hash.as_bytes()))
        .await;
    Ok(())
}

/// Downloads and verifies a package from one peer; checks its hash and the trust policy.
async fn pull_package(
    shared: &Shared,
    peer: PeerId,
    hash: &PackageHash,
) -> Result<Vec<u8>, String> {
    // A download is idempotent: a stream that broke (libp2p-stream drops inbound streams that
    // arrive while the peer's accept queue is full) is tried again.
    let mut attempt = 0u64;
    let reply = loop {
        attempt += 1;
        match request_package(shared, peer, hash).await {
            Ok(reply) => break reply,
            Err(crate::wire::WireError::Io(e)) if attempt < 3 => {
                tracing::debug!(%peer, "package pull failed, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(20 * attempt * attempt)).await;
            }
            Err(e) => return Err(format!("package pull: {e}")),
        }
    };
    let bytes = match reply {
        PackageReply::Found(b) => b,
        PackageReply::NotFound => {
            return Err("package pull: the peer does not have the package".into())
        }
        PackageReply::Refused => {
            return Err("package pull: the peer does not serve packages".into())
        }
    };
    let package = Package::from_bytes(&bytes)
        .and_then(Package::verify)
        .map_err(|e| format!("pulled package: {e}"))?;
    if package.hash() != *hash {
        return Err("pulled package has another hash".into());
    }
    shared
        .trust
        .admit_package(&package)
        .map_err(|e| format!("package refused: {e}"))?;
    Ok(bytes)
}

async fn request_package(
    shared: &Shared,
    peer: PeerId,
    hash: &PackageHash,
) -> Result<PackageReply, crate::wire::WireError> {
    let mut stream = shared
        .control
        .clone()
        .open_stream(peer, PACKAGE_PROTOCOL)
        .await
        .map_err(|e| crate::wire::WireError::Io(std::io::Error::other(e.to_string())))?;
    let request = PackageRequest {
        hash: *hash.as_bytes(),
    };
    write_frame(&mut stream, &request).await?;
    read_frame(&mut stream, MAX_FRAME).await
}

async fn handle_package(
    shared: &Shared,
    mut stream: libp2p::Stream,
    permits: &ExchangePermits<'_>,
) -> Result<(), crate::wire::WireError> {
    let Some(_permits) = permits.acquire().await else {
        return Ok(());
    };
    let request: PackageRequest = read_frame(&mut stream, 1024).await?;
    let reply = if !shared.trust.serve_packages {
        PackageReply::Refused
    } else {
        match shared.store.package(&request.hash) {
            Ok(Some(bytes)) => PackageReply::Found(bytes),
            _ => PackageReply::NotFound,
        }
    };
    write_frame(&mut stream, &reply).await
}

/// Serves control requests on a stream, one after the other, until the peer closes it.
async fn handle_control(
    shared: &Arc<Shared>,
    peer: PeerId,
    mut stream: libp2p::Stream,
    permits: &ExchangePermits<'_>,
) -> Result<(), crate::wire::WireError> {
    while let Some((request, _permits)) = permits.next_request(&mut stream).await? {
        answer_control(shared, peer, &mut stream, request).await?;
    }
    Ok(())
}

async fn answer_control(
    shared: &Arc<Shared>,
    peer: PeerId,
    stream: &mut libp2p::Stream,
    request: ControlRequest,
) -> Result<(), crate::wire::WireError> {
    match request {
        ControlRequest::Launch { package, wait } => {
            let verified = match Package::from_bytes(&package).and_then(Package::verify) {
                Ok(p) => p,
                Err(e) => {
                    return write_frame(stream, &ControlReply::Error(format!("package: {e}"))).await
                }
            };
            match launch(shared, verified, Some(peer.to_string())) {
                Ok((agent, end)) => {
                    write_frame(
                        stream,
                        &ControlReply::Launched {
                            agent: agent.clone(),
                        },
                    )
                    .await?;
                    if wait {
                        if let Ok(end) = end.await {
                            write_frame(stream, &ControlReply::Ended(end)).await?;
                        }
                    }
                    Ok(())
                }
                Err(e) => write_frame(stream, &ControlReply::Error(e)).await,
            }
        }
        ControlRequest::Deliver {
            agent,
            message,
            ttl,
            probe,
        } => {
            let (reply, wake) = match route(shared, &agent, message, ttl, probe).await {
                Ok(wake) => (ControlReply::Delivered, wake),
                Err(Undelivered::NotHere) => (ControlReply::NotHere, Wake(None)),
                Err(Undelivered::Unconfirmed(e)) => (ControlReply::Unconfirmed(e), Wake(None)),
                Err(Undelivered::Refused(e)) => (ControlReply::Error(e), Wake(None)),
            };
            if wake.0.is_some() {
                die_if(shared, FaultPoint::AfterQueue);
            }
            let answered = write_frame(stream, &reply).await;
            wake.wake(shared);
            answered
        }
        ControlRequest::Result { agent } => {
            let reply = match shared.store.result(&agent) {
                Ok(Some(bytes)) => match ciborium::from_reader::<AgentEnd, _>(bytes.as_slice()) {
                    Ok(end) => ControlReply::Ended(end),
                    Err(e) => ControlReply::Error(format!("stored result is unreadable: {e}")),
                },
                Ok(None) => {
                    ControlReply::Error(format!("no result for agent {agent} on this node (yet)"))
                }
                Err(e) => ControlReply::Error(e.to_string()),
            };
            write_frame(stream, &reply).await
        }
        ControlRequest::Location { agent, node } => {
            let _ = shared
                .store
                .write(move |b| b.set_location(&agent, &node))
                .await;
            write_frame(stream, &ControlReply::Ok).await
        }
        ControlRequest::Status => write_frame(stream, &ControlReply::Status(status(shared))).await,
        ControlRequest::Ended { agent, end } => {
            deliver_end(shared, &agent, end);
            write_frame(stream, &ControlReply::Ok).await
        }
        ControlRequest::HopStatus {
            agent,
            hop,
            envelope,
        } => {
            let held = hop_held(shared, agent, hop, envelope).await;
            write_frame(stream, &ControlReply::HopHeld(held)).await
        }
        ControlRequest::HopCommitted { agent, envelope } => {
            let reply = match hop_committed(shared, &agent, &envelope).await {
                Some(committed) => ControlReply::HopCommitted(committed),
                None => ControlReply::Error("cannot read the store".into()),
            };
            write_frame(stream, &reply).await
        }
    }
}
