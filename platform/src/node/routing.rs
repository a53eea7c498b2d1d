//! Message routing: a message for an agent is queued where the agent is, or followed along
//! forwarding pointers and the home node's location record, or, when this node knows nothing of
//! the agent, asked for at every peer. A message queued for an agent that is leaving follows it
//! once the hop settles, if the agent did not take it along, before its sender hears that it
//! was delivered.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;
use futures::FutureExt;
use libp2p::PeerId;

use super::control::{control_request, ControlFailure};
use super::mailbox::Wake;
use super::{lock, Shared};
use crate::store::{AgentMeta, AgentState, QueueSize, StoreError};
use crate::wire::{
    ControlRefusal, ControlReply, ControlRequest, MAX_CARRIED_BYTES, MAX_CARRIED_MESSAGES,
    MESSAGE_TTL,
};

/// How long the sender of a message waits, at most, for it to follow an agent whose hop was
/// unsettled at the node it reached (each time it was left behind, along the way): past that, the sender is
/// told that it is unconfirmed, and it follows the agent all the same. A peer's `Deliver` says
/// how long its sender still waits ([`ControlRequest::Deliver`]'s `wait_ms`), never longer
/// than this.
pub(super) const SENDER_WAIT: Duration = Duration::from_secs(10);

/// What this node can do with a message for `agent`.
enum Delivery {
    /// Queued here, with this sequence number; `unsettled`: the agent is leaving by this hop,
    /// which may have read its queue before this message came (see [`follow_hop`]).
    Queued { seq: u64, unsettled: Option<u64> },
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
                let unsettled = b.agent_meta(agent)?.and_then(|meta| unsettled_hop(&meta));
                Ok(Some(Ok((b.push_message(agent, message)?, unsettled))))
            })
            .map_err(store_failed)?;
        match queued {
            Some(Ok((seq, unsettled))) => {
                // Looked at once the message is stored: a hop that marks the agent later reads
                // its queue later, and takes the message along.
                let unsettled = shared.departures.leaving_by(agent).or(unsettled);
                if unsettled.is_some() {
                    shared.following.add(seq);
                }
                return Ok(Delivery::Queued { seq, unsettled });
            }
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
    let until = Instant::now() + SENDER_WAIT;
    route(shared, agent, message, MESSAGE_TTL, false, until)
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
/// answers for what this node knows. The sender waits `until` then, at most, for a message
/// that follows its agent after a hop.
pub(super) async fn route(
    shared: &Arc<Shared>,
    agent: &str,
    message: Vec<u8>,
    ttl: u8,
    probe: bool,
    until: Instant,
) -> Result<Wake, Undelivered> {
    let agent_text = || agent.to_string();
    match deliver_here(shared, agent, &message).map_err(Undelivered::Refused)? {
        Delivery::Queued {
            unsettled: None, ..
        } => Ok(Wake::agent(agent)),
        Delivery::Queued {
            seq,
            unsettled: Some(hop),
        } => follow_hop(shared, agent, hop, seq, (ttl, probe), until).await,
        Delivery::Finished => Err(Undelivered::Refused(ControlRefusal::Finished {
            agent: agent_text(),
        })),
        Delivery::Forward(peer) if ttl > 0 => {
            let request = ControlRequest::Deliver {
                agent: agent.to_string(),
                message,
                ttl: ttl - 1,
                probe: false,
                wait_ms: wait_ms(until),
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
                    wait_ms: wait_ms(until),
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

/// Messages queued here for agents that were leaving, whose senders wait for them to be
/// delivered (see [`follow_hop`]), by sequence number: their senders forward them, so
/// [`forward_left_behind`] does not. A `std` mutex held for one set operation.
#[derive(Default)]
pub(super) struct Following(Mutex<HashSet<u64>>);

impl Following {
    fn add(&self, seq: u64) {
        lock(&self.0).insert(seq);
    }

    fn remove(&self, seq: u64) {
        lock(&self.0).remove(&seq);
    }

    fn contains(&self, seq: u64) -> bool {
        lock(&self.0).contains(&seq)
    }
}

/// A message (sequence number `seq`) queued for `agent` while it was leaving by hop `hop`: the
/// hop took it along if it read the queue after the message came, else the message stays
/// behind. Waits for the hop to settle, `until` at most, then forwards it if it stayed behind
/// (`steps`: the `ttl` and `probe` it came with), so the sender hears "delivered" only once it
/// is with the agent, or queued where the agent is. Past the wait, the sender hears that the
/// message is unconfirmed, and it follows the agent from a task.
async fn follow_hop(
    shared: &Arc<Shared>,
    agent: &str,
    hop: u64,
    seq: u64,
    steps: (u8, bool),
    until: Instant,
) -> Result<Wake, Undelivered> {
    if !hop_settled(shared, agent, hop, Some(until)).await {
        let (task_shared, task_agent) = (shared.clone(), agent.to_string());
        shared.tasks.spawn(async move {
            let (shared, agent) = (&task_shared, task_agent.as_str());
            hop_settled(shared, agent, hop, None).await;
            let until = Instant::now() + SENDER_WAIT;
            match forward_follower(shared, agent, seq, steps, until).await {
                Ok(wake) => shared.mailboxes.wake(wake),
                Err(e) => tracing::warn!(%agent, "a message could not follow the agent: {e}"),
            }
        });
        return Err(Undelivered::Unconfirmed(format!(
            "the hop of agent {agent} at {} is still unsettled: the message follows the agent \
             once it settles",
            shared.peers.local_name()
        )));
    }
    forward_follower(shared, agent, seq, steps, until).await
}

/// What a `Deliver` says of the time its sender still waits until `until`.
fn wait_ms(until: Instant) -> u32 {
    let left = until.saturating_duration_since(Instant::now()).as_millis();
    u32::try_from(left).unwrap_or(u32::MAX)
}

/// The hop this agent is leaving by, if it is: a message queued for it now may stay behind.
/// (Not one it is arriving by, whose decision a peer gives: a sender is not made to wait for
/// a peer that holds it back; see `settle_arrival`.)
fn unsettled_hop(meta: &AgentMeta) -> Option<u64> {
    match meta.state {
        AgentState::Leaving { hop, .. } => Some(hop),
        _ => None,
    }
}

/// Waits until hop `hop` of `agent` is no longer unsettled here (true; a later one may be), or
/// the deadline passes (false).
async fn hop_settled(shared: &Shared, agent: &str, hop: u64, deadline: Option<Instant>) -> bool {
    loop {
        let settled = shared.departures.settled();
        tokio::pin!(settled);
        // (Enabled before looking, so that a departure settled in between wakes it.)
        settled.as_mut().enable();
        let stored = shared.store.agent_meta(agent).ok().flatten();
        let unsettled = shared.departures.leaving_by(agent) == Some(hop)
            || stored.is_some_and(|meta| unsettled_hop(&meta) == Some(hop));
        if !unsettled {
            return true;
        }
        if let Some(d) = deadline {
            if tokio::time::timeout_at(d, settled).await.is_err() {
                return false;
            }
        } else {
            settled.await;
        }
    }
}

/// [`follow_hop`] once the hop settled: the message is queued for the agent if the agent
/// is here (it stayed, or came back), gone with it if no longer queued, and otherwise taken off
/// the queue and routed after it (forwarding it is the step its `ttl` counts).
fn forward_follower<'a>(
    shared: &'a Arc<Shared>,
    agent: &'a str,
    seq: u64,
    (ttl, probe): (u8, bool),
    until: Instant,
) -> BoxFuture<'a, Result<Wake, Undelivered>> {
    // (Boxed: it routes the message again, which may follow another departure.)
    async move {
        let taken = take_left_behind(shared, agent, seq);
        shared.following.remove(seq);
        match taken {
            Ok(LeftBehind::Held) => Ok(Wake::agent(agent)),
            Ok(LeftBehind::Gone) => Ok(Wake::none()),
            Ok(LeftBehind::Taken(message)) => {
                route(shared, agent, message, ttl, probe, until).await
            }
            Err(e) => Err(Undelivered::Refused(ControlRefusal::Store(e.to_string()))),
        }
    }
    .boxed()
}

/// A message queued here for an agent that left, as [`take_left_behind`] found it.
enum LeftBehind {
    /// The agent is here again: the message is queued for it.
    Held,
    /// It is no longer queued (it went with the agent, or was forwarded).
    Gone,
    /// Taken off the queue, to send after the agent.
    Taken(Vec<u8>),
}

/// Takes message `seq` off `agent`'s queue here, unless the agent is here again.
fn take_left_behind(shared: &Shared, agent: &str, seq: u64) -> Result<LeftBehind, StoreError> {
    shared.store.batch(|b| {
        if b.agent_meta(agent)?.is_some() {
            return Ok(LeftBehind::Held);
        }
        Ok(b.take_message(agent, seq)?
            .map_or(LeftBehind::Gone, LeftBehind::Taken))
    })
}

/// How often a message that stayed behind is sent again while no peer it must go to can be
/// reached (after a restart, before the node's peers are back): 1 s apart at first, twice as
/// long each time, 30 s at most (about three and a half minutes in all).
const LEFT_BEHIND_ATTEMPTS: u32 = 12;

/// Forwards to where `agent` went the messages with sequence numbers `seqs` that stayed queued
/// here when it left (or when its arrival did not commit), from a task: each is taken off the
/// queue as it is sent, unless the agent is here again (they are its) or a waiting sender
/// forwards it ([`Following`]); one that could not go out (no peer reachable) is put back and
/// tried again later. One lost with this node on its way is lost: its sender was told it was
/// delivered, or (while it waited) that it may not have been.
pub(super) fn forward_left_behind(shared: &Arc<Shared>, agent: &str, seqs: Vec<u64>) {
    if seqs.is_empty() {
        return;
    }
    let task_shared = shared.clone();
    let agent = agent.to_string();
    shared.tasks.spawn(async move {
        let shared = &task_shared;
        for seq in seqs {
            let mut delay = Duration::from_secs(1);
            for attempt in 1..=LEFT_BEHIND_ATTEMPTS {
                if shared.following.contains(seq) {
                    break;
                }
                let message = match take_left_behind(shared, &agent, seq) {
                    Ok(LeftBehind::Taken(message)) => message,
                    Ok(LeftBehind::Held | LeftBehind::Gone) => break,
                    Err(e) => {
                        tracing::error!(%agent, "cannot take a message left behind: {e}");
                        return;
                    }
                };
                match route_message(shared, &agent, message.clone()).await {
                    Ok(()) => break,
                    Err(Undelivered::Refused(
                        ControlRefusal::Unreachable(_) | ControlRefusal::UnknownAgent { .. },
                    )) if attempt < LEFT_BEHIND_ATTEMPTS => {
                        // Nothing went out: back in its place, and again later.
                        let put = shared.store.batch(|b| b.put_message(&agent, seq, &message));
                        if let Err(e) = put {
                            tracing::error!(%agent, "cannot keep a message left behind: {e}");
                            break;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => {
                        tracing::warn!(%agent, "a queued message could not follow the agent: {e}");
                        break;
                    }
                }
            }
        }
    });
}
