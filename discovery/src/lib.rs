//! How tern nodes find each other and learn each other's names: the libp2p behaviours a node
//! composes for discovery (identify, ping, Kademlia, and mDNS on a LAN).
//!
//! A node's human name travels in identify's agent version (`tern/<version> name=<name>`), so a
//! peer knows the names of the nodes it is connected to without another protocol. Kademlia runs
//! in server mode under a private protocol name (`/tern/kad/1`) so a private mesh forms without
//! external address confirmation; it also holds provider records for packages. mDNS is behind a
//! [`Toggle`](libp2p::swarm::behaviour::toggle::Toggle): it does not see loopback, so tests keep it off.
//!
//! [`InboundStreams`] takes the streams peers open for the node's own protocols and queues
//! them per peer for the node (see its module).
//!
//! [`Directory`] handles the behaviours' events: it keeps the map of peer names ([`PeerNames`],
//! which the node's tasks read), feeds Kademlia the addresses identify learns, and says what the
//! swarm must do in answer ([`SwarmAction`]) and what the node learned ([`Learned`]).
//!
//! ```
//! let key = libp2p::identity::Keypair::generate_ed25519();
//! let discovery = discovery::Discovery::new(&key, "node-0", false).unwrap();
//! # let _ = discovery;
//! assert_eq!(discovery::name_from_agent_version(&discovery::agent_version("node-0")), Some("node-0".to_string()));
//! ```

use std::time::Duration;

mod directory;
mod inbound;

pub use directory::{Directory, Learned, PeerNames, Reaction, SwarmAction};
pub use inbound::{InboundStreams, IncomingStreams, MAX_QUEUED, MAX_QUEUED_PER_PEER};

use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, kad, mdns, ping, StreamProtocol};

/// The identify protocol version all tern nodes share.
pub const PROTOCOL_VERSION: &str = "/tern/1.0.0";

/// Kademlia protocol name of tern meshes.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/kad/1");

/// The identify agent version that carries `name`.
pub fn agent_version(name: &str) -> String {
    format!("tern/{} name={name}", env!("CARGO_PKG_VERSION"))
}

/// The node name carried by an identify agent version, if it is a tern node's.
pub fn name_from_agent_version(agent_version: &str) -> Option<String> {
    let rest = agent_version.strip_prefix("tern/")?;
    let (_, name) = rest.split_once(" name=")?;
    is_valid_name(name).then(|| name.to_string())
}

/// A node name: 1 to 64 characters from `A-Z a-z 0-9 . _ -`.
pub fn is_valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The discovery behaviours of a node.
#[derive(NetworkBehaviour)]
pub struct Discovery {
    /// Exchanges listen addresses, protocols and the node name.
    pub identify: identify::Behaviour,
    /// Keeps liveness information about connections.
    pub ping: ping::Behaviour,
    /// Peer routing and package provider records.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Peers on the local network (off unless configured).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Discovery {
    /// Discovery for the node with `key` and `name`; `mdns` turns LAN discovery on.
    ///
    /// # Errors
    ///
    /// When mDNS is on and its socket cannot be opened.
    pub fn new(key: &Keypair, name: &str, mdns: bool) -> std::io::Result<Discovery> {
        let peer_id = key.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(PROTOCOL_VERSION.to_string(), key.public())
                .with_agent_version(agent_version(name))
                .with_interval(Duration::from_secs(60)),
        );
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(Duration::from_secs(30));
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        kad.set_mode(Some(kad::Mode::Server));
        let mdns = if mdns {
            Some(mdns::tokio::Behaviour::new(
                mdns::Config::default(),
                peer_id,
            )?)
        } else {
            None
        };
        Ok(Discovery {
            identify,
            ping: ping::Behaviour::default(),
            kad,
            mdns: Toggle::from(mdns),
        })
    }
}
