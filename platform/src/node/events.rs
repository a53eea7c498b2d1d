//! What happens on a node, as typed events on one broadcast channel: `tern run --trace`,
//! `tern status`, the tests and the benchmarks read it, and so will the live view and
//! placement. Nothing in the node waits for a subscriber: a subscriber that falls behind by
//! more than [`EVENT_BUFFER`] events is told how many it missed.

use libp2p::PeerId;
use tokio::sync::broadcast;

use crate::wire::{AgentEnd, HopRefusal};

/// Events kept for a subscriber that has not read them yet.
pub const EVENT_BUFFER: usize = 4096;

/// Characters of an agent's result that an event's text shows.
const RESULT_SHOWN: usize = 80;

/// One thing that happened on a node.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A tern peer is connected and said its name.
    PeerUp {
        /// The peer.
        peer: PeerId,
        /// Its node name.
        name: String,
    },
    /// The last connection to a peer closed.
    PeerDown {
        /// The peer.
        peer: PeerId,
    },
    /// A peer announced a node name pinned to another key (`[peers]`): it was not named.
    NameRefused {
        /// The peer.
        peer: PeerId,
        /// The name it claimed.
        name: String,
    },
    /// An agent was launched here (this node is its home).
    AgentLaunched {
        /// The agent.
        agent: String,
        /// Its package's hash, in hex.
        package: String,
    },
    /// This node offered a hop of an agent to another node.
    HopOffered {
        /// The agent.
        agent: String,
        /// The hop number.
        hop: u64,
        /// The destination's name.
        to: String,
        /// The continuation's size.
        bytes: usize,
    },
    /// This node stored an agent arriving by a committed hop, just before running it.
    HopStored {
        /// The agent.
        agent: String,
        /// The hop number.
        hop: u64,
        /// The source's name.
        from: String,
        /// This node's name.
        to: String,
        /// The continuation's size.
        bytes: usize,
        /// From the agent's suspension at the source to the agent stored here (the one-way
        /// transit of the offer excluded: the two clocks are not compared).
        micros: u64,
    },
    /// The destination owns the agent: this node, its source, dropped its copy.
    HopCommitted {
        /// The agent.
        agent: String,
        /// The hop number.
        hop: u64,
        /// The destination's name.
        to: String,
    },
    /// This node refused a hop offered to it.
    HopRefused {
        /// The agent, as the offer claims it (None when the refusal came before its envelope
        /// was read).
        agent: Option<String>,
        /// The hop number, as the offer claims it.
        hop: Option<u64>,
        /// The source's name.
        from: String,
        /// Why.
        reason: HopRefusal,
    },
    /// A hop from this node did not happen: the agent stays here and `migrate` throws.
    HopFailed {
        /// The agent.
        agent: String,
        /// The destination as the agent named it.
        to: String,
        /// Why, as `migrate` throws it.
        reason: String,
    },
    /// An agent started or resumed running here (after a launch, an arrival or a restart).
    AgentResumed {
        /// The agent.
        agent: String,
        /// The hop it arrived here by (0 on its home node before it first left).
        hop: u64,
    },
    /// A message was queued for an agent held here.
    MessageQueued {
        /// The receiving agent.
        agent: String,
    },
    /// An agent took a message off its queue in `receive`.
    MessageDelivered {
        /// The receiving agent.
        agent: String,
    },
    /// An agent ended here.
    AgentEnded {
        /// The agent.
        agent: String,
        /// How.
        end: AgentEnd,
    },
}

impl std::fmt::Display for NodeEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PeerUp { peer, name } => write!(f, "peer {name} up ({peer})"),
            Self::PeerDown { peer } => write!(f, "peer {peer} down"),
            Self::NameRefused { peer, name } => {
                write!(
                    f,
                    "refused the name {name} to {peer}: pinned to another key"
                )
            }
            Self::AgentLaunched { agent, package } => {
                let short = &package[..package.len().min(16)];
                write!(f, "launched {agent} (package {short})")
            }
            Self::HopOffered {
                agent,
                hop,
                to,
                bytes,
            } => write!(f, "offered hop {hop} of {agent} to {to} ({bytes} bytes)"),
            Self::HopStored {
                agent,
                hop,
                from,
                bytes,
                micros,
                ..
            } => write!(
                f,
                "stored hop {hop} of {agent} from {from} ({bytes} bytes, {micros} µs)"
            ),
            Self::HopCommitted { agent, hop, to } => {
                write!(f, "hop {hop} of {agent} committed: {to} holds it")
            }
            Self::HopRefused {
                agent,
                hop,
                from,
                reason,
            } => match (agent, hop) {
                (Some(agent), Some(hop)) => {
                    write!(f, "refused hop {hop} of {agent} from {from}: {reason}")
                }
                _ => write!(f, "refused a hop from {from}: {reason}"),
            },
            Self::HopFailed { agent, to, reason } => {
                write!(f, "hop of {agent} to {to} failed: {reason}")
            }
            Self::AgentResumed { agent, hop: 0 } => write!(f, "{agent} running"),
            Self::AgentResumed { agent, hop } => {
                write!(f, "{agent} running (arrived by hop {hop})")
            }
            Self::MessageQueued { agent } => write!(f, "message queued for {agent}"),
            Self::MessageDelivered { agent } => write!(f, "{agent} received a message"),
            Self::AgentEnded { agent, end } => match end {
                AgentEnd::Finished { json, node, .. } => {
                    // A result can be large: its beginning says enough here.
                    match json.char_indices().nth(RESULT_SHOWN) {
                        Some((cut, _)) => {
                            write!(f, "{agent} finished on {node}: {}…", &json[..cut])
                        }
                        None => write!(f, "{agent} finished on {node}: {json}"),
                    }
                }
                AgentEnd::Failed { error, node, .. } => {
                    write!(f, "{agent} failed on {node}: {error}")
                }
            },
        }
    }
}

/// The sending side of a node's events (a cheap `Clone`: every part of the node that reports
/// holds one).
#[derive(Clone)]
pub(super) struct Events {
    sender: broadcast::Sender<NodeEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            sender: broadcast::Sender::new(EVENT_BUFFER),
        }
    }
}

impl Events {
    /// Publishes `event` (the node's own [`super::activity`] log always listens).
    pub(super) fn emit(&self, event: NodeEvent) {
        // No subscriber (the node stopping, a unit test) is not an error.
        let _ = self.sender.send(event);
    }

    /// A new subscriber: it sees every event from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.sender.subscribe()
    }
}
