//! Custody reports: the node holding an agent tells the agent's home where it is and how it
//! ended, and proves it holds the agent with its custody tail (`security::follow_custody`).
//!
//! Both sides live here. The holder presents the envelopes it has since what the home last
//! confirmed ([`tail_of`]) and forgets those the home confirmed ([`trim_confirmed`]). The home
//! follows the tail from its `custody` record ([`confirm_report`]) and takes the report only if
//! it leads to the peer that sent it: a peer that never held the agent can neither end it nor
//! redirect its messages, whatever ids it learned.

use std::sync::Arc;

use libp2p::PeerId;
use security::{
    follow_custody, AgentId, CustodyError, CustodyPoint, EnvelopeHash, HopEnvelope, PublicKey,
};
use serde_bytes::ByteBuf;

use super::Shared;
use crate::store::{AgentMeta, StoreError};
use crate::wire::{ControlRefusal, MAX_CUSTODY_TAIL};

/// The custody tail the holder of `meta` presents: the envelopes the home may not have
/// confirmed, then the one that brought the agent here. Empty on the home node before the
/// agent's first hop (the home confirmed it holds it).
pub(super) fn tail_of(meta: &AgentMeta) -> Vec<ByteBuf> {
    let mut tail = meta.custody.clone();
    if !meta.envelope.is_empty() {
        tail.push(ByteBuf::from(meta.envelope.clone()));
    }
    tail
}

/// The custody an arriving agent keeps: the tail it came with and the envelope its source held
/// it by, the newest [`MAX_CUSTODY_TAIL`] of them (older ones the home has confirmed long ago,
/// or cannot follow any more: see [`MAX_CUSTODY_TAIL`]).
pub(super) fn arriving_tail(carried: Vec<ByteBuf>, previous: &[u8]) -> Vec<ByteBuf> {
    let mut tail = carried;
    if !previous.is_empty() {
        tail.push(ByteBuf::from(previous.to_vec()));
    }
    let excess = tail.len().saturating_sub(MAX_CUSTODY_TAIL);
    tail.drain(..excess);
    tail
}

/// On the home node: whether an agent coming home by the custody `tail` (ending with the
/// envelope of this very hop) follows from the custody recorded here. A home takes its agents
/// back only from their holders.
///
/// # Errors
///
/// [`ControlRefusal::NoCustody`] if the agent was not launched here, an envelope does not
/// decode, or the tail does not lead from the recorded custody to this node;
/// [`ControlRefusal::StoreUnreadable`] if the record cannot be read.
pub(super) fn check_homecoming(
    shared: &Shared,
    agent: &str,
    tail: &[ByteBuf],
    verified: &EnvelopeHash,
) -> Result<CustodyPoint, ControlRefusal> {
    let recorded = shared
        .store
        .custody(agent)
        .map_err(|e| ControlRefusal::StoreUnreadable(e.to_string()))?;
    let genuine = |h: &EnvelopeHash| h == verified || signed_here(shared, h);
    follow(
        shared,
        agent,
        recorded,
        tail,
        shared.peers.local_key(),
        genuine,
    )
}

/// Whether this node signed the envelope with hash `h` (lately): its signature needs no check.
fn signed_here(shared: &Shared, h: &EnvelopeHash) -> bool {
    shared.departures.signed_here(h.as_bytes())
}

/// The key of the peer presenting a report.
fn key_of(shared: &Shared, agent: &str, peer: &PeerId) -> Result<PublicKey, ControlRefusal> {
    shared
        .peers
        .key_of(peer)
        .ok_or_else(|| ControlRefusal::NoCustody {
            agent: agent.to_string(),
            reason: "the sender has no ed25519 identity".into(),
        })
}

/// Where the custody `tail` presented by `presenter` for `agent` leads from `recorded` (the
/// signatures of envelopes `genuine` vouches for are not checked again).
fn follow(
    shared: &Shared,
    agent: &str,
    recorded: Option<CustodyPoint>,
    tail: &[ByteBuf],
    presenter: &PublicKey,
    genuine: impl Fn(&EnvelopeHash) -> bool,
) -> Result<CustodyPoint, ControlRefusal> {
    let refuse = |reason: String| ControlRefusal::NoCustody {
        agent: agent.to_string(),
        reason,
    };
    let recorded =
        recorded.ok_or_else(|| refuse("no agent of this id was launched here".into()))?;
    let id: AgentId = agent
        .parse()
        .map_err(|_| refuse("not an agent id".into()))?;
    let known = |k: &[u8; 32]| shared.peers.known_key(k);
    let tail: Vec<HopEnvelope> = tail
        .iter()
        .enumerate()
        .map(|(i, e)| {
            HopEnvelope::decode_known(e, known)
                .map_err(|err| refuse(format!("envelope {i} of the tail: {err}")))
        })
        .collect::<Result<_, _>>()?;
    follow_custody(&id, &recorded, &tail, presenter, genuine).map_err(|e| match e {
        CustodyError::Superseded { hop, .. } => ControlRefusal::Superseded {
            agent: agent.to_string(),
            hop,
        },
        e => refuse(e.to_string()),
    })
}

/// On the home node: takes a report of `agent` from `presenter` with custody `tail` if the tail
/// leads from the custody recorded here to `presenter` (checked first out of the store's write,
/// then again in it if another report moved the record meanwhile), and records the custody it
/// leads to and, with it, where the agent is.
///
/// # Errors
///
/// As [`check_homecoming`] (for `presenter`), or [`ControlRefusal::Store`] if the write fails.
pub(super) async fn confirm_report(
    shared: &Arc<Shared>,
    agent: &str,
    tail: Vec<ByteBuf>,
    presenter: PeerId,
) -> Result<CustodyPoint, ControlRefusal> {
    let checked_from = shared
        .store
        .custody(agent)
        .map_err(|e| ControlRefusal::StoreUnreadable(e.to_string()))?;
    let presenter_key = key_of(shared, agent, &presenter)?;
    let point = follow(shared, agent, checked_from, &tail, &presenter_key, |h| {
        signed_here(shared, h)
    })?;
    let (task_shared, id, holder) = (shared.clone(), agent.to_string(), presenter.to_string());
    shared
        .store
        .write(move |b| {
            let now = b.custody(&id)?;
            let point = if now == checked_from {
                Ok(point)
            } else {
                follow(&task_shared, &id, now, &tail, &presenter_key, |h| {
                    signed_here(&task_shared, h)
                })
            };
            if let Ok(point) = &point {
                b.set_custody(&id, point)?;
                b.set_location(&id, &holder)?;
            }
            Ok(point)
        })
        .await
        .map_err(|e: StoreError| ControlRefusal::Store(e.to_string()))?
}

/// On the holder: the home confirmed custody up to `hop` by envelope `envelope`; if the agent
/// is still here by that envelope, it need not carry the tail before it any more. (Unsynced: a
/// tail lost in a crash is only carried a little longer.)
pub(super) async fn trim_confirmed(shared: &Shared, agent: &str, envelope: EnvelopeHash) {
    let id = agent.to_string();
    let trimmed = shared
        .store
        .write_unsynced(move |b| {
            let Some(mut meta) = b.agent_meta(&id)? else {
                return Ok(());
            };
            let here_by_it = !meta.envelope.is_empty()
                && blake3::hash(&meta.envelope).as_bytes() == envelope.as_bytes();
            if here_by_it && !meta.custody.is_empty() {
                meta.custody.clear();
                b.put_agent_meta(&meta)?;
            }
            Ok(())
        })
        .await;
    if let Err(e) = trimmed {
        tracing::debug!(agent, "cannot drop the confirmed custody tail: {e}");
    }
}
