//! The task that owns the libp2p `Swarm`: it reacts to each swarm event in a method of its own
//! and carries out the commands other parts of the node send it (dial, announce a package, find
//! its providers). Nothing else touches the swarm, and nothing here waits on a peer or the disk:
//! every exchange with a peer runs in a task of its own (opened with libp2p-stream, or taken by
//! the accept loop from `discovery::IncomingStreams`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use discovery::{Directory, DiscoveryEvent, Learned, SwarmAction};
use futures::StreamExt;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{kad, Multiaddr, PeerId, Swarm};
use tokio::sync::{mpsc, oneshot};

use super::events::NodeEvent;
use super::{lock, Shared};

/// The behaviours of a node's swarm: the connection limits (first, so that a connection they
/// deny reaches no other behaviour), discovery (identify, ping, Kademlia, mDNS) and the streams
/// tern's own protocols run on: opened with libp2p-stream, accepted by `InboundStreams`.
#[derive(NetworkBehaviour)]
pub(super) struct NodeBehaviour {
    pub(super) limits: libp2p::connection_limits::Behaviour,
    pub(super) discovery: discovery::Discovery,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) inbound: discovery::InboundStreams,
}

/// Connections one peer may hold with a node at once. An honest node needs one (two for a
/// moment when both sides dial at once); more would only let one identity multiply the
/// stream limits each connection brings.
pub(super) const MAX_CONNECTIONS_PER_PEER: u32 = 4;

/// Incoming connections still in their handshake (noise, yamux) at once: bounds what a flood of
/// TCP connections can make the node compute and hold before any key is known.
pub(super) const MAX_PENDING_INCOMING: u32 = 128;

/// Incoming connections established at once, all peers together.
pub(super) const MAX_ESTABLISHED_INCOMING: u32 = 2048;

/// The connection limits of a node's swarm.
pub(super) fn connection_limits() -> libp2p::connection_limits::Behaviour {
    libp2p::connection_limits::Behaviour::new(
        libp2p::connection_limits::ConnectionLimits::default()
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
            .with_max_established_incoming(Some(MAX_ESTABLISHED_INCOMING)),
    )
}

/// Requests to the task that owns the swarm, each with where to send its answer.
pub(super) enum SwarmCommand {
    /// Dial an address; the answer comes once a connection is up or the dial failed.
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    /// Announce (Kademlia provider record) that this node serves the package with this hash.
    Provide([u8; 32]),
    /// Find nodes that announced the package with this hash.
    FindProviders([u8; 32], oneshot::Sender<Vec<PeerId>>),
}

/// Owns the swarm and reacts to its events and to commands, until the node stops or every
/// command sender is gone.
pub(super) struct EventLoop {
    swarm: Swarm<NodeBehaviour>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<SwarmCommand>,
    /// The node's view of the mesh, kept from discovery events (its name map is shared with
    /// the node's other tasks).
    directory: Directory,
    /// Dials waiting for their connection.
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<(), String>>>,
    /// Provider queries waiting for their last step, with the providers found so far.
    pending_providers: HashMap<kad::QueryId, (oneshot::Sender<Vec<PeerId>>, HashSet<PeerId>)>,
    /// Told once the first listen address is up (`Node::start` waits for it).
    listening: Option<oneshot::Sender<()>>,
}

impl EventLoop {
    pub(super) fn new(
        swarm: Swarm<NodeBehaviour>,
        shared: Arc<Shared>,
        commands: mpsc::Receiver<SwarmCommand>,
        directory: Directory,
        listening: oneshot::Sender<()>,
    ) -> EventLoop {
        EventLoop {
            swarm,
            shared,
            commands,
            directory,
            pending_dials: HashMap::new(),
            pending_providers: HashMap::new(),
            listening: Some(listening),
        }
    }

    /// Runs until the node stops (the swarm, and every connection, closes with it).
    pub(super) async fn run(mut self) {
        let tasks = self.shared.tasks.clone();
        loop {
            tokio::select! {
                () = tasks.stopping() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        }
    }

    fn on_command(&mut self, command: SwarmCommand) {
        match command {
            SwarmCommand::Dial(addr, reply) => {
                let opts = libp2p::swarm::dial_opts::DialOpts::unknown_peer_id()
                    .address(addr)
                    .build();
                let id = opts.connection_id();
                match self.swarm.dial(opts) {
                    Ok(()) => {
                        self.pending_dials.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            SwarmCommand::Provide(hash) => {
                let kad = &mut self.swarm.behaviour_mut().discovery.kad;
                if let Err(e) = kad.start_providing(kad::RecordKey::new(&hash)) {
                    tracing::warn!("cannot announce a package: {e}");
                }
            }
            SwarmCommand::FindProviders(hash, reply) => {
                let kad = &mut self.swarm.behaviour_mut().discovery.kad;
                let id = kad.get_providers(kad::RecordKey::new(&hash));
                self.pending_providers.insert(id, (reply, HashSet::new()));
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => self.on_new_listen_addr(address),
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                if endpoint.is_dialer() {
                    self.swarm
                        .add_peer_address(peer_id, endpoint.get_remote_address().clone());
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => self.on_disconnected(peer_id),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Discovery(event)) => self.on_discovery(event),
            _ => {}
        }
    }

    fn on_new_listen_addr(&mut self, address: Multiaddr) {
        lock(&self.shared.listen).push(address);
        if let Some(tx) = self.listening.take() {
            let _ = tx.send(());
        }
    }

    /// The last connection to `peer` closed: it is no longer a peer, and its streams are dead.
    fn on_disconnected(&mut self, peer: PeerId) {
        let named = self.directory.on_disconnected(&peer).is_some();
        self.shared.inbound.forget(&peer);
        self.shared.sender_rates.collect();
        self.shared.outbound.forget(&peer);
        if named {
            self.shared.events.emit(NodeEvent::PeerDown { peer });
        }
    }

    fn on_discovery(&mut self, event: DiscoveryEvent) {
        let swarm = &mut self.swarm;
        // (Only a routing update asks, about its own peer.)
        let routed = match &event {
            DiscoveryEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                Some((*peer, swarm.is_connected(peer)))
            }
            _ => None,
        };
        let connected = |peer: &PeerId| routed.is_some_and(|(p, c)| p == *peer && c);
        let reaction =
            self.directory
                .on_event(&mut swarm.behaviour_mut().discovery, event, connected);
        for action in reaction.actions {
            match action {
                SwarmAction::AddPeerAddress(peer, addr) => {
                    swarm.add_peer_address(peer, addr);
                }
                SwarmAction::Dial(opts) => {
                    let _ = swarm.dial(opts);
                }
            }
        }
        match reaction.learned {
            Some(Learned::PeerNamed { peer, name }) => {
                self.shared.events.emit(NodeEvent::PeerUp { peer, name });
            }
            Some(Learned::NameRefused { peer, name }) => {
                tracing::warn!(%peer, "refused the name '{name}': it is pinned to another key");
                self.shared
                    .events
                    .emit(NodeEvent::NameRefused { peer, name });
            }
            Some(Learned::Providers {
                query,
                providers,
                done,
            }) => {
                if let Some((_, found)) = self.pending_providers.get_mut(&query) {
                    found.extend(providers);
                }
                if done {
                    if let Some((reply, found)) = self.pending_providers.remove(&query) {
                        let _ = reply.send(found.into_iter().collect());
                    }
                }
            }
            None => {}
        }
    }
}
