//! What happens on a node, as typed events on one broadcast channel: `tern run --trace`,
//! `tern status`, the tests and the benchmarks read it, and so will the live view and
//! placement. Nothing in the node waits for a subscriber: a subscriber that falls behind by
//! more than [`EVENT_BUFFER`] events is told how many it missed.

use libp2p::PeerId;
use tokio::sync::broadcast;

use crate::wire::{AgentEnd, HopRefusal};

/// Events kept for a subscriber that has not read them yet.
pub const EVENT_BUFFER: usize = 4096;

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
    /// Publishes the event `make` builds, built only if anyone listens (events sit on the hot
    /// path of every hop).
    pub(super) fn emit(&self, make: impl FnOnce() -> NodeEvent) {
        if self.sender.receiver_count() > 0 {
            // A subscriber that left meanwhile is not an error.
            let _ = self.sender.send(make());
        }
    }

    /// A new subscriber: it sees every event from now on.
    pub(super) fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.sender.subscribe()
    }
}
