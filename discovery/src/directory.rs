//! The node's view of the mesh built from discovery events: which tern peers are connected and
//! what they are called, and what the swarm must do when a behaviour learns of a peer (the
//! behaviours cannot dial or record addresses on the swarm themselves).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use libp2p::swarm::dial_opts::DialOpts;
use libp2p::{identify, kad, mdns, Multiaddr, PeerId};

use crate::{name_from_agent_version, Discovery, DiscoveryEvent};

/// The names of the tern peers a node is connected to, as each announced it in identify.
///
/// A cheap `Clone` around one shared map: the swarm's task writes it (through [`Directory`]),
/// every other task of the node reads it. A `std` `RwLock`, held only to read or change one
/// entry and never across an `.await`: readers (every hop resolves a name) do not wait for each
/// other.
#[derive(Clone, Default, Debug)]
pub struct PeerNames {
    names: Arc<RwLock<HashMap<PeerId, String>>>,
}

impl PeerNames {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<PeerId, String>> {
        // Every critical section is one map operation: a panic inside cannot leave it broken.
        self.names.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<PeerId, String>> {
        self.names.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The name `peer` announced, if it is a connected tern peer.
    pub fn name(&self, peer: &PeerId) -> Option<String> {
        self.read().get(peer).cloned()
    }

    /// The connected peer that announced `name`, if exactly one did.
    pub fn peer(&self, name: &str) -> Option<PeerId> {
        match self.claimants(name).as_slice() {
            [one] => Some(*one),
            _ => None,
        }
    }

    /// Every connected peer that announced `name`, sorted: more than one is a conflict that
    /// only pinning the name to a key settles (see [`Directory::with_pins`]).
    pub fn claimants(&self, name: &str) -> Vec<PeerId> {
        let mut peers: Vec<PeerId> = self
            .read()
            .iter()
            .filter(|(_, n)| n.as_str() == name)
            .map(|(p, _)| *p)
            .collect();
        peers.sort();
        peers
    }

    /// Whether `peer` is a connected tern peer.
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.read().contains_key(peer)
    }

    /// The connected tern peers.
    pub fn peers(&self) -> Vec<PeerId> {
        self.read().keys().copied().collect()
    }

    /// The names of the connected tern peers, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.read().values().cloned().collect();
        names.sort();
        names
    }

    /// (name, peer) of every connected tern peer, sorted by name.
    pub fn list(&self) -> Vec<(String, PeerId)> {
        let mut list: Vec<(String, PeerId)> =
            self.read().iter().map(|(p, n)| (n.clone(), *p)).collect();
        list.sort();
        list
    }

    /// How many tern peers are connected.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no tern peer is connected.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

/// What the swarm must do in answer to a discovery event.
#[derive(Debug)]
pub enum SwarmAction {
    /// Remember this address of this peer (for dialling it later).
    AddPeerAddress(PeerId, Multiaddr),
    /// Dial.
    Dial(DialOpts),
}

/// What the node learned from a discovery event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learned {
    /// A tern peer announced its name (first time, or a new one).
    PeerNamed {
        /// The peer.
        peer: PeerId,
        /// Its name.
        name: String,
    },
    /// A peer announced a name pinned to another key: it is not named.
    NameRefused {
        /// The peer.
        peer: PeerId,
        /// The name it announced.
        name: String,
    },
    /// Providers of a record a query of this node asked for.
    Providers {
        /// The query.
        query: kad::QueryId,
        /// Providers found by this step (this node excluded).
        providers: Vec<PeerId>,
        /// The query is over: no more steps follow.
        done: bool,
    },
}

/// The answer to one discovery event.
#[derive(Debug, Default)]
pub struct Reaction {
    /// What the swarm must do.
    pub actions: Vec<SwarmAction>,
    /// What the node learned.
    pub learned: Option<Learned>,
}

/// After a new peer is named, the routing table is refreshed from it (Kademlia bootstrap), at
/// most once per this interval: a mesh of many nodes starting together would otherwise run one
/// bootstrap per peer.
const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(2);

/// The node's view of the mesh, kept from discovery events by the swarm's task.
#[derive(Debug)]
pub struct Directory {
    local: PeerId,
    names: PeerNames,
    /// Names only one key may take (`[peers]` in the node's configuration).
    pins: HashMap<String, PeerId>,
    last_bootstrap: Option<Instant>,
}

impl Directory {
    /// The directory of the node `local`.
    pub fn new(local: PeerId) -> Directory {
        Directory {
            local,
            names: PeerNames::default(),
            pins: HashMap::new(),
            last_bootstrap: None,
        }
    }

    /// Pins names to peers: a pinned name is given only to its peer, and another peer that
    /// announces it is not named at all.
    pub fn with_pins(mut self, pins: HashMap<String, PeerId>) -> Directory {
        self.pins = pins;
        self
    }

    /// The peer-name map (a handle on the same map, for the node's other tasks).
    pub fn names(&self) -> &PeerNames {
        &self.names
    }

    /// Reacts to an event of the discovery behaviours: keeps the names, feeds Kademlia what
    /// identify learned, and says what the swarm must do. `connected` says whether the swarm
    /// is connected to a peer.
    pub fn on_event(
        &mut self,
        discovery: &mut Discovery,
        event: DiscoveryEvent,
        connected: impl Fn(&PeerId) -> bool,
    ) -> Reaction {
        match event {
            DiscoveryEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.on_identified(discovery, peer_id, info)
            }
            // A private mesh is small: connect to every tern node Kademlia finds, so that each
            // node knows the names of all.
            DiscoveryEvent::Kad(kad::Event::RoutingUpdated {
                peer, addresses, ..
            }) if peer != self.local && !connected(&peer) => Reaction {
                actions: vec![SwarmAction::Dial(
                    DialOpts::peer_id(peer)
                        .addresses(addresses.into_vec())
                        .build(),
                )],
                learned: None,
            },
            DiscoveryEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                let (providers, done) = match result {
                    Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) => {
                        (providers, step.last)
                    }
                    _ => (HashSet::new(), true),
                };
                Reaction {
                    actions: Vec::new(),
                    learned: Some(Learned::Providers {
                        query: id,
                        providers: providers.into_iter().filter(|p| *p != self.local).collect(),
                        done,
                    }),
                }
            }
            DiscoveryEvent::Mdns(mdns::Event::Discovered(found)) => Reaction {
                actions: found
                    .into_iter()
                    .filter(|(peer, _)| *peer != self.local && !self.names.contains(peer))
                    .map(|(_, addr)| {
                        SwarmAction::Dial(DialOpts::unknown_peer_id().address(addr).build())
                    })
                    .collect(),
                learned: None,
            },
            _ => Reaction::default(),
        }
    }

    fn on_identified(
        &mut self,
        discovery: &mut Discovery,
        peer: PeerId,
        info: identify::Info,
    ) -> Reaction {
        // Only tern nodes are named (and become destinations); anything else is ignored.
        let Some(name) = name_from_agent_version(&info.agent_version) else {
            return Reaction::default();
        };
        if self.pins.get(&name).is_some_and(|owner| *owner != peer) {
            // An impostor (or a misconfigured node): not a destination, not a peer to learn
            // the mesh from; a name it had before goes too.
            let _ = self.names.write().remove(&peer);
            return Reaction {
                actions: Vec::new(),
                learned: Some(Learned::NameRefused { peer, name }),
            };
        }
        let mut actions = Vec::with_capacity(info.listen_addrs.len());
        for addr in info.listen_addrs {
            discovery.kad.add_address(&peer, addr.clone());
            actions.push(SwarmAction::AddPeerAddress(peer, addr));
        }
        // Learn the rest of the mesh from the new peer's routing table.
        if self
            .last_bootstrap
            .is_none_or(|t| t.elapsed() > BOOTSTRAP_INTERVAL)
        {
            self.last_bootstrap = Some(Instant::now());
            let _ = discovery.kad.bootstrap();
        }
        let previous = self.names.write().insert(peer, name.clone());
        Reaction {
            actions,
            learned: (previous.as_deref() != Some(name.as_str()))
                .then_some(Learned::PeerNamed { peer, name }),
        }
    }

    /// The last connection to `peer` closed: it is no longer a named peer. Its name, if it had
    /// one.
    pub fn on_disconnected(&mut self, peer: &PeerId) -> Option<String> {
        self.names.write().remove(peer)
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;
    use libp2p::swarm::ConnectionId;

    use super::*;
    use crate::agent_version;

    fn node(name: &str) -> (Discovery, Directory) {
        let key = Keypair::generate_ed25519();
        let discovery = Discovery::new(&key, name, false).expect("discovery without mdns");
        (discovery, Directory::new(key.public().to_peer_id()))
    }

    fn identified(agent_version: &str, addrs: &[&str]) -> (PeerId, DiscoveryEvent) {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let info = identify::Info {
            public_key: key.public(),
            protocol_version: crate::PROTOCOL_VERSION.into(),
            agent_version: agent_version.into(),
            listen_addrs: addrs
                .iter()
                .map(|a| a.parse().expect("test address"))
                .collect(),
            protocols: Vec::new(),
            observed_addr: "/ip4/127.0.0.1/tcp/1".parse().expect("test address"),
            signed_peer_record: None,
        };
        let event = identify::Event::Received {
            connection_id: ConnectionId::new_unchecked(1),
            peer_id: peer,
            info,
        };
        (peer, DiscoveryEvent::Identify(event))
    }

    #[test]
    fn a_tern_peer_is_named_and_its_addresses_recorded() {
        let (mut discovery, mut directory) = node("a");
        let (peer, event) = identified(&agent_version("b"), &["/ip4/127.0.0.1/tcp/4001"]);
        let reaction = directory.on_event(&mut discovery, event, |_| true);
        assert_eq!(
            reaction.learned,
            Some(Learned::PeerNamed {
                peer,
                name: "b".into()
            })
        );
        assert!(matches!(
            reaction.actions.as_slice(),
            [SwarmAction::AddPeerAddress(p, _)] if *p == peer
        ));
        let names = directory.names();
        assert_eq!(names.name(&peer).as_deref(), Some("b"));
        assert_eq!(names.peer("b"), Some(peer));
        assert_eq!(names.names(), vec!["b".to_string()]);
        assert_eq!(names.list(), vec![("b".to_string(), peer)]);
    }

    #[test]
    fn a_peer_that_is_not_a_tern_node_is_not_named() {
        let (mut discovery, mut directory) = node("a");
        for version in [
            "rust-libp2p/0.57",
            "tern/0.1.0 name=",
            "tern/0.1.0 name=a b",
        ] {
            let (peer, event) = identified(version, &["/ip4/127.0.0.1/tcp/4001"]);
            let reaction = directory.on_event(&mut discovery, event, |_| true);
            assert!(
                reaction.learned.is_none() && reaction.actions.is_empty(),
                "{version}"
            );
            assert!(!directory.names().contains(&peer));
        }
        assert!(directory.names().is_empty());
    }

    #[test]
    fn the_same_name_again_is_not_news_and_a_disconnection_forgets_it() {
        let (mut discovery, mut directory) = node("a");
        let (peer, event) = identified(&agent_version("b"), &[]);
        assert!(directory
            .on_event(&mut discovery, event, |_| true)
            .learned
            .is_some());
        let again = identify::Event::Received {
            connection_id: ConnectionId::new_unchecked(2),
            peer_id: peer,
            info: match identified(&agent_version("b"), &[]).1 {
                DiscoveryEvent::Identify(identify::Event::Received { info, .. }) => info,
                _ => unreachable!("identified builds an identify event"),
            },
        };
        let reaction =
            directory.on_event(&mut discovery, DiscoveryEvent::Identify(again), |_| true);
        assert!(reaction.learned.is_none());
        assert_eq!(directory.names().len(), 1);
        assert_eq!(directory.on_disconnected(&peer).as_deref(), Some("b"));
        assert_eq!(directory.on_disconnected(&peer), None);
        assert!(directory.names().peer("b").is_none());
    }

    #[test]
    fn a_name_two_peers_announce_resolves_to_neither() {
        let (mut discovery, mut directory) = node("a");
        let (first, event) = identified(&agent_version("b"), &[]);
        directory.on_event(&mut discovery, event, |_| true);
        assert_eq!(directory.names().peer("b"), Some(first));
        let (second, event) = identified(&agent_version("b"), &[]);
        directory.on_event(&mut discovery, event, |_| true);
        assert_eq!(directory.names().peer("b"), None);
        let mut both = vec![first, second];
        both.sort();
        assert_eq!(directory.names().claimants("b"), both);
        // One leaves: the name is the other's again.
        directory.on_disconnected(&first);
        assert_eq!(directory.names().peer("b"), Some(second));
    }

    #[test]
    fn a_pinned_name_is_given_only_to_its_key() {
        let (mut discovery, directory) = node("a");
        let (owner, owner_event) = identified(&agent_version("b"), &[]);
        let mut directory = directory.with_pins(HashMap::from([("b".to_string(), owner)]));
        let (impostor, event) = identified(&agent_version("b"), &["/ip4/127.0.0.1/tcp/9"]);
        let reaction = directory.on_event(&mut discovery, event, |_| true);
        assert_eq!(
            reaction.learned,
            Some(Learned::NameRefused {
                peer: impostor,
                name: "b".into()
            })
        );
        assert!(reaction.actions.is_empty());
        assert!(!directory.names().contains(&impostor));
        assert_eq!(directory.names().peer("b"), None);
        directory.on_event(&mut discovery, owner_event, |_| true);
        assert_eq!(directory.names().peer("b"), Some(owner));
        assert_eq!(directory.names().claimants("b"), vec![owner]);
    }

    #[test]
    fn mdns_dials_only_peers_not_yet_named_and_never_itself() {
        let (mut discovery, mut directory) = node("a");
        let (named, event) = identified(&agent_version("b"), &[]);
        directory.on_event(&mut discovery, event, |_| true);
        let new = Keypair::generate_ed25519().public().to_peer_id();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().expect("test address");
        let found = vec![
            (named, addr.clone()),
            (new, addr.clone()),
            (directory.local, addr),
        ];
        let reaction = directory.on_event(
            &mut discovery,
            DiscoveryEvent::Mdns(mdns::Event::Discovered(found)),
            |_| false,
        );
        assert_eq!(reaction.actions.len(), 1);
        assert!(matches!(reaction.actions[0], SwarmAction::Dial(_)));
    }
}
