//! Hops whose outcome is unknown to one side (a lost acknowledgement, a lost decision, a restart):
//! each side asks the other until it answers, and the answers stay true however late they come.

use std::sync::Arc;
use std::time::Duration;

use agent_lang::Resume;
use libp2p::PeerId;
use security::HopEnvelope;

use super::arrive::settle_arrival;
use super::depart::{complete_departure, SentHop};
use crate::node::control::control_request;
use crate::node::events::NodeEvent;
use crate::node::routing::forward_left_behind;
use crate::node::runner::{spawn_agent, spawn_runner};
use crate::node::Shared;
use crate::store::{AgentMeta, AgentState, StoreError};
use crate::wire::{ControlReply, ControlRequest, HandoverKey};

/// Whether this node holds (agent, hop) (by the envelope with hash `envelope`, if given: held
/// by another is a "no"), once no receipt of that hop is in progress; with `give_up`, a "no"
/// shuts out the offer with that envelope for good. A store that cannot be read is an error,
/// never a "no" (the source would resume an agent that may live here).
pub(in crate::node) async fn hop_held(
    shared: &Shared,
    agent: String,
    hop: u64,
    envelope: Option<[u8; 32]>,
    give_up: bool,
) -> Result<bool, StoreError> {
    let store = shared.store.clone();
    shared
        .arrivals
        .held(
            (agent, hop),
            envelope.filter(|_| give_up),
            |agent, hop| shared.store.has_seen(agent, hop, envelope.as_ref()),
            |agent, hop| async move {
                store
                    .write(move |b| b.has_seen(&agent, hop, envelope.as_ref()))
                    .await
            },
        )
        .await
}

/// Asks the destination whether it holds the hop; with `give_up`, a "no" also shuts out any
/// copy of the offer still on its way. None: it could not be asked.
pub(in crate::node) async fn resolve_departure(
    shared: &Shared,
    sent: &SentHop<'_>,
    give_up: bool,
) -> Option<bool> {
    for attempt in 0..5u64 {
        match control_request(
            shared,
            sent.dest,
            &ControlRequest::HopStatus {
                agent: sent.agent.to_string(),
                hop: sent.hop,
                envelope: sent.envelope,
                give_up,
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
pub(in crate::node) async fn recover_departure(shared: Arc<Shared>, rec: AgentMeta) {
    let AgentState::Leaving {
        to,
        hop,
        carried,
        envelope,
        checkpoint,
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
            // (Zeros in a record written before envelope hashes were kept.)
            envelope: Some(envelope).filter(|e| *e != [0; 32]),
        };
        if let Some(held) = resolve_departure(&shared, &sent, true).await {
            if held {
                shared.events.emit(NodeEvent::HopCommitted {
                    agent: rec.id.clone(),
                    hop,
                    to: shared.peers.name_of(&to),
                });
                // After a restart, no sender waits to forward what came after the hop read the
                // queue: it follows from here.
                if let Ok(left_behind) =
                    complete_departure(&shared, &rec.id, &to, hop, carried).await
                {
                    forward_left_behind(&shared, &rec.id, left_behind);
                }
            } else {
                // Back to the state before the hop (only the state changes: the stored
                // continuation stays as it is). At `migrate`, the agent resumes and `migrate`
                // throws; at its last checkpoint, it resumes from there.
                let (state, first) = match checkpoint {
                    Some(state) => (*state, None),
                    None => {
                        let interrupted = format!(
                            "migrate: the hop to {} was interrupted",
                            shared.peers.name_of(&to)
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
                shared.departures.settle();
                spawn_runner(&shared, back.id, back.hop, first, None);
            }
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Settles an agent stored as arriving whose source's decision was lost (a broken stream, a
/// restart): asks the source until it answers.
pub(in crate::node) async fn ask_hop_decision(shared: Arc<Shared>, meta: AgentMeta) {
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

/// How long [`departed_by`] waits for a departure still completing.
const DEPARTURE_WAIT: Duration = Duration::from_secs(3);

/// The source's answer to [`ControlRequest::Departed`], and its check of a hop that brings an
/// agent back by an envelope it signed: whether agent `agent` left this node by the hop with
/// this envelope hash (the destination said it holds it), waiting up to [`DEPARTURE_WAIT`]
/// while it is still leaving by it (the destination may ask, or come back, before this node
/// heard its acknowledgement). A store that cannot be read is an error, never a "no".
pub(in crate::node) async fn departed_by(
    shared: &Shared,
    agent: &str,
    envelope: &[u8; 32],
) -> Result<bool, StoreError> {
    let deadline = tokio::time::Instant::now() + DEPARTURE_WAIT;
    loop {
        let settled = shared.departures.settled();
        tokio::pin!(settled);
        // (Enabled before looking, so that a departure settled in between wakes it.)
        settled.as_mut().enable();
        // Whether the departure is under way is looked at before whether it is done, since it
        // goes from one to the other: one that ends between the two looks is seen done. (The
        // other way round, it was seen neither, and an agent coming back by the next hop was
        // refused for want of this hop's handover.)
        let leaving_by_it = shared.departures.recording(envelope).is_some()
            || matches!(
                shared.store.agent_meta(agent)?,
                Some(AgentMeta { state: AgentState::Leaving { envelope: e, .. }, .. }) if e == *envelope
            );
        if shared.departures.handed_over(envelope)
            || shared.store.departed(agent)? == Some(*envelope)
        {
            return Ok(true);
        }
        if !leaving_by_it || tokio::time::timeout_at(deadline, settled).await.is_err() {
            return Ok(false);
        }
    }
}

/// This node's handover key of the hop with this envelope, which opens the envelope's handover
/// lock: sent once the destination said it holds the agent, and to a destination that asks
/// ([`departed_by`]). None if this node did not sign the envelope.
pub(in crate::node) fn handover_key(
    shared: &Shared,
    envelope: &HopEnvelope,
) -> Option<HandoverKey> {
    envelope.handover_key(&shared.key).map(HandoverKey)
}

/// The source's answer to [`ControlRequest::HopCommitted`]: whether the departure record of the
/// hop with this envelope hash is durable (waiting for it while it is written). A store that
/// cannot be read is an error, never a "no".
pub(in crate::node) async fn hop_committed(
    shared: &Shared,
    agent: &str,
    envelope: &[u8; 32],
) -> Result<bool, StoreError> {
    if let Some(recorded) = shared.departures.recording(envelope) {
        return Ok(recorded.await.is_ok());
    }
    // The hop's outcome is in the store: still leaving by it, or departed by it.
    match shared.store.agent_meta(agent)? {
        Some(AgentMeta {
            state: AgentState::Leaving { envelope: e, .. },
            ..
        }) if e == *envelope => Ok(true),
        _ => Ok(shared.store.departed(agent)? == Some(*envelope)),
    }
}
