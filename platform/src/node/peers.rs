//! What the node knows of its peers and of itself as a peer: names (the map the discovery
//! crate keeps from identify), ed25519 keys and id texts, and the resolution of a node name to a
//! peer.

use std::collections::HashMap;
use std::sync::Mutex;

use discovery::PeerNames;
use libp2p::PeerId;
use security::PublicKey;

use super::lock;

/// A peer's key and its id as text, worked out once (each costs a decode or an encode).
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

/// Peers known to this node beyond a cache's size are forgotten (and worked out again when met):
/// peers come and go, and a long-lived node does not keep every key it ever saw.
const KNOWN_PEERS: usize = 4096;

/// This node and its peers, by name, id and key.
pub(super) struct Peers {
    /// This node's name.
    name: String,
    /// This node's peer id.
    local: PeerId,
    /// `local` as text (the form the store and the wire use).
    local_text: String,
    /// This node's key.
    public: PublicKey,
    /// Names of the connected tern peers (written by the swarm's task, through the discovery
    /// directory).
    names: PeerNames,
    /// Keys and id texts of peers met. A `std` mutex held for one map operation, never across
    /// an `.await`.
    facts: Mutex<KnownPeers>,
}

impl Peers {
    pub(super) fn new(name: String, local: PeerId, public: PublicKey, names: PeerNames) -> Peers {
        Peers {
            name,
            local,
            local_text: local.to_string(),
            public,
            names,
            facts: Mutex::default(),
        }
    }

    /// This node's name.
    pub(super) fn local_name(&self) -> &str {
        &self.name
    }

    /// This node's peer id.
    pub(super) fn local(&self) -> PeerId {
        self.local
    }

    /// This node's key.
    pub(super) fn local_key(&self) -> &PublicKey {
        &self.public
    }

    /// This node's peer id as text.
    pub(super) fn local_text(&self) -> &str {
        &self.local_text
    }

    /// The names of the connected tern peers.
    pub(super) fn names(&self) -> &PeerNames {
        &self.names
    }

    fn facts(&self, peer: &PeerId) -> Option<PeerFacts> {
        if let Some(facts) = lock(&self.facts).by_peer.get(peer) {
            return Some(facts.clone());
        }
        let facts = PeerFacts {
            key: PublicKey::from_peer_id_bytes(&peer.to_bytes()).ok()?,
            text: peer.to_string(),
        };
        let mut known = lock(&self.facts);
        if known.by_peer.len() >= KNOWN_PEERS {
            *known = KnownPeers::default();
        }
        known.by_peer.insert(*peer, facts.clone());
        known.by_key.insert(facts.key.to_bytes(), facts.key);
        Some(facts)
    }

    /// The ed25519 key of a peer (every tern node has one: its peer id inlines it).
    pub(super) fn key_of(&self, peer: &PeerId) -> Option<PublicKey> {
        self.facts(peer).map(|f| f.key)
    }

    /// A peer id as text (the form records and the wire use).
    pub(super) fn text_of(&self, peer: &PeerId) -> String {
        self.facts(peer)
            .map_or_else(|| peer.to_string(), |f| f.text)
    }

    /// The key with these bytes, if it is this node's or a known peer's.
    pub(super) fn known_key(&self, bytes: &[u8; 32]) -> Option<PublicKey> {
        if self.public.to_bytes() == *bytes {
            return Some(self.public);
        }
        lock(&self.facts).by_key.get(bytes).copied()
    }

    /// The name of a node given by its peer id as text (that text when it has no known name).
    pub(super) fn name_of(&self, peer: &str) -> String {
        if peer == self.local_text {
            return self.name.clone();
        }
        peer.parse::<PeerId>()
            .ok()
            .and_then(|p| self.names.name(&p))
            .unwrap_or_else(|| peer.to_string())
    }

    /// The name of a peer (its id as text when it has no known name).
    pub(super) fn name_of_peer(&self, peer: &PeerId) -> String {
        if *peer == self.local {
            return self.name.clone();
        }
        self.names.name(peer).unwrap_or_else(|| self.text_of(peer))
    }

    /// The names of every node of the mesh this node knows, itself included, sorted.
    pub(super) fn node_names(&self) -> Vec<String> {
        let mut names = self.names.names();
        names.push(self.name.clone());
        names.sort();
        names.dedup();
        names
    }

    /// A node name or peer id to a peer: this node, the one peer that announced the name, or
    /// the peer with that id. A name that two connected peers announce resolves to neither.
    pub(super) fn resolve(&self, to: &str) -> Result<PeerId, Unresolved> {
        if to == self.name {
            return Ok(self.local);
        }
        match self.names.claimants(to).as_slice() {
            [one] => Ok(*one),
            [] => to.parse::<PeerId>().map_err(|_| Unresolved::Unknown),
            several => Err(Unresolved::Contested(several.to_vec())),
        }
    }
}

/// Why a node name does not resolve to a peer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Unresolved {
    /// No connected peer has that name (and it is not a peer id).
    Unknown,
    /// Several connected peers announce it (sorted).
    Contested(Vec<PeerId>),
}
