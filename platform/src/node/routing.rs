//! Message routing: a message for an agent is queued where the agent is, or followed along
//! forwarding pointers and the home node's location record, or, when this node knows nothing of
//! the agent, asked for at every peer.

use std::sync::Arc;

use libp2p::PeerId;

use super::control::{control_request, ControlFailure};
use super::mailbox::Wake;
use super::Shared;
use crate::store::QueueSize;
use crate::wire::{
    ControlRefusal, ControlReply, ControlRequest, MAX_CARRIED_BYTES, MAX_CARRIED_MESSAGES,
    MESSAGE_TTL,
};

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

/// How much mail a node takes for each agent: messages are checked against these before they
/// are queued, so a sender cannot make an agent's queue too large to travel with it, or
/// queue what the agent cannot decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxLimits {
    /// Largest message, in bytes (encoded).
    pub max_message_bytes: u64,
    /// Most messages queued for one agent.
    pub max_queued_messages: u64,
    /// Most bytes of messages queued for one agent.
    pub max_queued_bytes: u64,
    /// Most messages one peer may deliver to this node a second (a burst of as many).
    pub max_messages_per_peer_per_second: std::num::NonZeroU32,
}

impl Default for MailboxLimits {
    fn default() -> Self {
        MailboxLimits {
            max_message_bytes: 1 << 20,
            max_queued_messages: 1024,
            max_queued_bytes: 8 << 20,
            max_messages_per_peer_per_second: const { std::num::NonZeroU32::new(1000).unwrap() },
        }
    }
}

impl MailboxLimits {
    /// Checks that an agent's queue within these limits can travel in a hop offer.
    ///
    /// # Errors
    ///
    /// A limit above what a hop offer carries ([`MAX_CARRIED_MESSAGES`],
    /// [`MAX_CARRIED_BYTES`]), or a message larger than a queue.
    pub fn check(&self) -> Result<(), String> {
        if self.max_queued_messages > MAX_CARRIED_MESSAGES as u64 {
            return Err(format!(
                "max_queued_messages = {} is over {MAX_CARRIED_MESSAGES}, the most a hop carries",
                self.max_queued_messages
            ));
        }
        if self.max_queued_bytes > MAX_CARRIED_BYTES {
            return Err(format!(
                "max_queued_bytes = {} is over {MAX_CARRIED_BYTES}, the most a hop carries",
                self.max_queued_bytes
            ));
        }
        if self.max_message_bytes > self.max_queued_bytes {
            return Err(format!(
                "max_message_bytes = {} is over max_queued_bytes = {}",
                self.max_message_bytes, self.max_queued_bytes
            ));
        }
        Ok(())
    }

    /// Whether one more message of `bytes` fits in a queue of `size`.
    fn fits(&self, size: QueueSize, bytes: u64) -> bool {
        size.messages < self.max_queued_messages
            && size.bytes.saturating_add(bytes) <= self.max_queued_bytes
    }
}

/// Queues the message if the agent is here (without waking it: see [`Wake`]), or says where
/// to forward it. A message is refused if it is larger than this node takes, if the agent's
/// queue is full, or if it does not decode for the agent's program. A store that cannot be
/// read is an error, never "unknown here".
fn deliver_here(shared: &Shared, agent: &str, message: &[u8]) -> Result<Delivery, ControlRefusal> {
    let store_failed = |e: crate::store::StoreError| ControlRefusal::Store(e.to_string());
    let limits = shared.mailbox;
    let bytes = message.len() as u64;
    if bytes > limits.max_message_bytes {
        return Err(ControlRefusal::MessageTooLarge {
            bytes,
            max: limits.max_message_bytes,
        });
    }
    if let Some(meta) = shared.store.agent_meta(agent).map_err(store_failed)? {
        // Checked before it is queued: a message the agent cannot decode would end it at its
        // next `receive`. (The check walks the bytes; it builds no value.)
        let loaded = shared
            .loaded(&meta.package)
            .map_err(ControlRefusal::Package)?;
        if let Err(e) = agent_lang::check_portable(&loaded.program, message) {
            return Err(ControlRefusal::BadMessage {
                agent: agent.to_string(),
                reason: e.to_string(),
            });
        }
        shared.quota.room_for(bytes)?;
        let queued = shared
            .store
            .batch(|b| {
                // (The agent may have left since it was looked up.)
                if b.agent_meta(agent)?.is_none() {
                    return Ok(None);
                }
                let size = b.queued(agent)?;
                if !limits.fits(size, bytes) {
                    return Ok(Some(Err(size)));
                }
                b.push_message(agent, message)?;
                Ok(Some(Ok(())))
            })
            .map_err(store_failed)?;
        match queued {
            Some(Ok(())) => return Ok(Delivery::Queued),
            Some(Err(size)) => {
                return Err(ControlRefusal::QueueFull {
                    agent: agent.to_string(),
                    messages: size.messages,
                    bytes: size.bytes,
                })
            }
            None => {}
        }
    }
    let next = match shared.store.forward(agent).map_err(store_failed)? {
        Some(to) => Some(to),
        None => shared
            .store
            .location(agent)
            .map_err(store_failed)?
            .filter(|l| l != shared.peers.local_text()),
    };
    if let Some(peer) = next.and_then(|p| p.parse::<PeerId>().ok()) {
        return Ok(Delivery::Forward(peer));
    }
    if shared.store.result(agent).map_err(store_failed)?.is_some() {
        return Ok(Delivery::Finished);
    }
    Ok(Delivery::Unknown)
}

/// Delivers a message to `agent` wherever it is: here, along forwarding pointers, or — when
/// this node knows nothing of it — by asking every connected peer.
pub(super) async fn route_message(
    shared: &Arc<Shared>,
    agent: &str,
    message: Vec<u8>,
) -> Result<(), Undelivered> {
    route(shared, agent, message, MESSAGE_TTL, false)
        .await
        .map(|wake| shared.mailboxes.wake(wake))
}

/// Why a message was not delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Undelivered {
    /// It was not delivered, for this reason.
    #[error("{0}")]
    Refused(ControlRefusal),
    /// (Only to a probe, never to a sender) this node knows nothing of the agent.
    #[error("not here")]
    NotHere,
    /// It went to the node holding the agent (this one says where) and no answer came back:
    /// it may have been delivered, so it is not sent anywhere else.
    #[error("{0}; the message may have been delivered")]
    Unconfirmed(String),
}

/// Why [`crate::node::NodeHandle::send`] did not send a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The message is not a portable value.
    #[error("{0}")]
    NotPortable(String),
    /// It was not delivered, or may not have been.
    #[error(transparent)]
    Undelivered(#[from] Undelivered),
}

/// What a peer's answer to a forwarded `Deliver` says.
fn forwarded(
    shared: &Shared,
    peer: PeerId,
    answer: Result<ControlReply, ControlFailure>,
) -> Result<Wake, Undelivered> {
    match answer {
        Ok(ControlReply::Delivered) => Ok(Wake::none()),
        Ok(ControlReply::NotHere) => Err(Undelivered::NotHere),
        Ok(ControlReply::Refused(refusal)) => Err(Undelivered::Refused(refusal)),
        Ok(ControlReply::Unconfirmed(e)) => Err(Undelivered::Unconfirmed(e)),
        Ok(other) => Err(Undelivered::Refused(ControlRefusal::UnexpectedReply(
            format!("{other:?}"),
        ))),
        Err(ControlFailure::NotSent(e)) => {
            Err(Undelivered::Refused(ControlRefusal::Unreachable(e)))
        }
        Err(ControlFailure::Unanswered(e)) => Err(Undelivered::Unconfirmed(format!(
            "{} took the message and then broke off ({e})",
            shared.peers.name_of_peer(&peer)
        ))),
    }
}

/// Delivers a message here or passes it on, `ttl` forwarding steps at most. A `probe` only
/// answers for what this node knows.
pub(super) async fn route(
    shared: &Arc<Shared>,
    agent: &str,
    message: Vec<u8>,
    ttl: u8,
    probe: bool,
) -> Result<Wake, Undelivered> {
    let agent_text = || agent.to_string();
    match deliver_here(shared, agent, &message).map_err(Undelivered::Refused)? {
        Delivery::Queued => Ok(Wake::agent(agent)),
        Delivery::Finished => Err(Undelivered::Refused(ControlRefusal::Finished {
            agent: agent_text(),
        })),
        Delivery::Forward(peer) if ttl > 0 => {
            let request = ControlRequest::Deliver {
                agent: agent.to_string(),
                message,
                ttl: ttl - 1,
                probe: false,
            };
            match forwarded(shared, peer, control_request(shared, peer, &request).await) {
                // (Only a probe is answered so; the pointer led nowhere.)
                Err(Undelivered::NotHere) => {
                    Err(Undelivered::Refused(ControlRefusal::StalePointer {
                        node: shared.peers.name_of_peer(&peer),
                        agent: agent_text(),
                    }))
                }
                other => other,
            }
        }
        Delivery::Forward(_) => Err(Undelivered::Refused(ControlRefusal::TooManySteps {
            agent: agent_text(),
        })),
        Delivery::Unknown if probe => Err(Undelivered::NotHere),
        Delivery::Unknown => {
            let peers = shared.peers.names().peers();
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
            Err(Undelivered::Refused(known_error.unwrap_or_else(|| {
                ControlRefusal::UnknownAgent {
                    agent: agent_text(),
                }
            })))
        }
    }
}

/// Forwards the messages queued for an agent that has just left to where it went.
pub(super) fn forward_queued(shared: &Arc<Shared>, agent: &str, messages: Vec<Vec<u8>>) {
    if messages.is_empty() {
        return;
    }
    let task_shared = shared.clone();
    let agent = agent.to_string();
    shared.tasks.spawn(async move {
        for m in messages {
            if let Err(e) = route_message(&task_shared, &agent, m).await {
                tracing::warn!(%agent, "a queued message could not follow the agent: {e}");
            }
        }
    });
}
