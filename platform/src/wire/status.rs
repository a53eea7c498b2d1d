//! What a node says of itself when an operator asks (`ClientRequest::Status`, `tern status`):
//! its agents, peers, forwards, store, recent activity, the remote dependencies of its agents
//! and the bytes its protocols carried. Kept apart from the protocols' messages since only the
//! operator's client reads it.

use serde::{Deserialize, Serialize};

/// What `tern status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// This node's name.
    pub name: String,
    /// This node's peer id.
    pub peer_id: String,
    /// Connected tern peers: (name, peer id).
    pub peers: Vec<(String, String)>,
    /// Agents held here.
    pub agents: Vec<AgentStatus>,
    /// Forwarding pointers: (agent, node it left for).
    pub forwards: Vec<(String, String)>,
    /// What happened on the node since it started (absent from nodes that predate it).
    #[serde(default)]
    pub activity: Activity,
    /// How full its store is (absent from nodes that predate it).
    #[serde(default)]
    pub store: StoreUsage,
    /// What its protocols carried (absent from nodes that predate it).
    #[serde(default)]
    pub bytes: WireBytes,
    /// Remote resource bindings in use through it, both ways (absent from nodes that predate
    /// them).
    #[serde(default)]
    pub remote: Vec<RemoteDependency>,
    /// The tables and values that moved with agents (a `move` binding), by name, and where
    /// they are as this node knows: "here", "here, held by AGENT", "arriving with AGENT" or
    /// "gone to NODE" (absent from nodes that predate them).
    #[serde(default)]
    pub moved_resources: Vec<(String, String)>,
}

/// Bytes a node's protocols carried since it started: (sent, received) each, counting what
/// tern's protocols write and read on their streams (not the transport's own bytes).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[allow(missing_docs)] // each is the protocol of its name
pub struct WireBytes {
    pub hop: (u64, u64),
    pub package: (u64, u64),
    pub control: (u64, u64),
    pub client: (u64, u64),
    pub resource: (u64, u64),
}

impl WireBytes {
    /// The bytes sent, by protocol, as `tern run --json` and `tern status --json` give them
    /// (`{"hop": N, "package": N, "control": N, "resource": N}`; the operators' client protocol
    /// is left out: it is not traffic between nodes).
    pub fn sent_json(&self) -> serde_json::Value {
        serde_json::json!({
            "hop": self.hop.0,
            "package": self.package.0,
            "control": self.control.0,
            "resource": self.resource.0,
        })
    }

    /// The sum of two nodes' figures.
    pub fn plus(self, other: WireBytes) -> WireBytes {
        let add = |a: (u64, u64), b: (u64, u64)| (a.0 + b.0, a.1 + b.1);
        WireBytes {
            hop: add(self.hop, other.hop),
            package: add(self.package, other.package),
            control: add(self.control, other.control),
            client: add(self.client, other.client),
            resource: add(self.resource, other.resource),
        }
    }
}

/// A remote resource binding in use through a node (`tern status`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteDependency {
    /// The agent.
    pub agent: String,
    /// The other node: the resource's owner, or where the agent asks from.
    pub node: String,
    /// The resource.
    pub resource: String,
    /// True: an agent elsewhere uses this node's resource; false: an agent here uses the
    /// other node's.
    pub serves: bool,
    /// Seconds since its last request.
    pub seconds_ago: u64,
}

/// How much of its store quota a node uses.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreUsage {
    /// Bytes of agents' state in the store.
    pub stored_bytes: u64,
    /// The node's `max_store_bytes`.
    pub max_store_bytes: u64,
    /// Chunks of other nodes' resources its agents keep by copy-on-reference (absent from
    /// nodes that predate them).
    #[serde(default)]
    pub cached_chunks: u64,
}

/// What happened on a node since it started, from its event stream: counts per kind of event
/// and the latest events.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Activity {
    /// How many events of each kind.
    pub counts: ActivityCounts,
    /// The latest events, oldest first.
    pub recent: Vec<RecentEvent>,
    /// Events the count missed (the node was too busy to fold them in time).
    pub missed: u64,
}

/// How many events of each kind a node saw since it started.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[allow(missing_docs)] // each field counts the event of its name
pub struct ActivityCounts {
    pub peers_up: u64,
    pub peers_down: u64,
    pub names_refused: u64,
    pub agents_launched: u64,
    pub agents_resumed: u64,
    pub agents_finished: u64,
    pub agents_failed: u64,
    pub hops_offered: u64,
    pub hops_stored: u64,
    pub hops_committed: u64,
    pub hops_refused: u64,
    pub hops_failed: u64,
    pub messages_queued: u64,
    pub messages_delivered: u64,
}

/// One event in a [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecentEvent {
    /// When, in unix milliseconds.
    pub at_ms: u64,
    /// What happened.
    pub event: String,
}

/// One agent in a [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    /// Agent id.
    pub id: String,
    /// Package hash (hex).
    pub package: String,
    /// Ready, waiting, leaving ...
    pub state: String,
    /// Hops made.
    pub hops: u64,
}
