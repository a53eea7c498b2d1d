//! Custody reports: the node holding an agent tells the agent's home where it is and how it
//! ended, and proves it holds the agent with its custody tail (`security::follow_custody`).
//!
//! Both sides live here. The holder presents the envelopes it has since what the home last
//! confirmed ([`tail_of`]). The home follows the tail from its `custody` record
//! ([`confirm_report`]) and takes the report only if it leads to the peer that sent it: a peer
//! that never held the agent can neither end it nor redirect its messages, whatever ids it
//! learned. For a location it answers with its certificate of the custody it confirmed, which
//! the holder keeps ([`ConfirmedCustody`]) and sends on with the agent instead of the tail
//! before it.
//!
//! Any other node an agent comes to checks its custody the same way ([`check_arrival`]), from
//! the home's latest certificate the agent carries, or from its launch: a peer allowed to push
//! agents cannot push a copy of one it never held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use security::{
    follow_anchored, follow_custody, AgentId, AgentOrigin, CustodyCertificate, CustodyError,
    CustodyPoint, EnvelopeHash, HopEnvelope, LaunchNonce, PublicKey,
};
use serde_bytes::ByteBuf;

use super::control::control_request;
use super::hop::departed_by;
use super::{lock, Shared};
use crate::store::{AgentMeta, StoreError};
use crate::wire::{ControlRefusal, ControlReply, ControlRequest};

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
/// it by.
pub(super) fn arriving_tail(carried: Vec<ByteBuf>, previous: &[u8]) -> Vec<ByteBuf> {
    let mut tail = carried;
    if !previous.is_empty() {
        tail.push(ByteBuf::from(previous.to_vec()));
    }
    tail
}

/// On any node but the agent's home: whether an agent arriving by the custody `tail` (ending
/// with the envelope of this very hop) comes from its holder. The agent's id must be the one
/// `home` launched with `nonce`, and the tail must lead to this node from the home's
/// `certificate` (or from the launch, if empty). Signatures `genuine` vouches for are not
/// checked again.
///
/// # Errors
///
/// [`ControlRefusal::NoCustody`], saying why.
pub(super) fn check_arrival(
    shared: &Shared,
    agent: &str,
    (home, nonce): (&str, [u8; 16]),
    certificate: &[u8],
    tail: &[ByteBuf],
    genuine: impl Fn(&EnvelopeHash) -> bool,
) -> Result<CustodyPoint, ControlRefusal> {
    let refuse = |reason: String| ControlRefusal::NoCustody {
        agent: agent.to_string(),
        reason,
    };
    // (A known peer's key is not decoded again: decompressing one costs a few signatures' worth.)
    let home = match home
        .parse::<PeerId>()
        .ok()
        .and_then(|p| shared.peers.key_of(&p))
    {
        Some(key) => key,
        None => PublicKey::from_peer_id_str(home)
            .map_err(|_| refuse("its home is not an ed25519 peer id".into()))?,
    };
    let origin = AgentOrigin {
        home,
        nonce: LaunchNonce(nonce),
    };
    let known = |k: &[u8; 32]| shared.peers.known_key(k);
    let certificate = if certificate.is_empty() {
        None
    } else {
        Some(
            CustodyCertificate::decode_known(certificate, known)
                .map_err(|e| refuse(format!("custody certificate: {e}")))?,
        )
    };
    let (id, tail) = decode_tail(shared, agent, tail)?;
    follow_anchored(
        &id,
        &origin,
        certificate.as_ref(),
        &tail,
        shared.peers.local_key(),
        genuine,
    )
    .map_err(|e| refuse(e.to_string()))
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
    let (id, tail) = decode_tail(shared, agent, tail)?;
    follow_custody(&id, &recorded, &tail, presenter, genuine).map_err(|e| match e {
        CustodyError::Superseded { hop, .. } => ControlRefusal::Superseded {
            agent: agent.to_string(),
            hop,
        },
        e => refuse(e.to_string()),
    })
}

/// The agent id and the envelopes of a custody tail, decoded.
fn decode_tail(
    shared: &Shared,
    agent: &str,
    tail: &[ByteBuf],
) -> Result<(AgentId, Vec<HopEnvelope>), ControlRefusal> {
    let refuse = |reason: String| ControlRefusal::NoCustody {
        agent: agent.to_string(),
        reason,
    };
    let id: AgentId = agent
        .parse()
        .map_err(|_| refuse("not an agent id".into()))?;
    let known = |k: &[u8; 32]| shared.peers.known_key(k);
    let tail = tail
        .iter()
        .enumerate()
        .map(|(i, e)| {
            HopEnvelope::decode_known(e, known)
                .map_err(|err| refuse(format!("envelope {i} of the tail: {err}")))
        })
        .collect::<Result<_, _>>()?;
    Ok((id, tail))
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
    if checked_from.is_none_or(|c| c.hop < point.hop) {
        hop_completed(shared, agent, &tail, &point).await?;
    }
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

/// The home's answer to a location report it took: its certificate of `point`, the custody of
/// `agent` it confirmed.
pub(super) fn certify(shared: &Shared, agent: &str, point: CustodyPoint) -> ControlReply {
    match agent.parse::<AgentId>() {
        Ok(id) => ControlReply::CustodyConfirmed(
            CustodyCertificate::sign(id, point, &shared.key).encode(),
        ),
        Err(_) => ControlReply::Refused(ControlRefusal::NoCustody {
            agent: agent.to_string(),
            reason: "not an agent id".into(),
        }),
    }
}

/// Whether the hop that brought the agent to the presenter (the last of its tail, `to`) was
/// completed: its source says the agent left by it. A node that was only offered the agent
/// (and refused it, or was given up on) holds that signed envelope too, and must not take
/// custody with it.
///
/// # Errors
///
/// [`ControlRefusal::NoCustody`] if the source says no; [`ControlRefusal::Unreachable`] if it
/// cannot be asked (the report may be sent again).
async fn hop_completed(
    shared: &Shared,
    agent: &str,
    tail: &[ByteBuf],
    to: &CustodyPoint,
) -> Result<(), ControlRefusal> {
    let Some(hash) = to.envelope else {
        return Ok(());
    };
    let last = tail
        .iter()
        .rev()
        .find(|e| blake3::hash(e).as_bytes() == hash.as_bytes())
        .and_then(|e| HopEnvelope::decode_known(e, |k| shared.peers.known_key(k)).ok())
        .ok_or_else(|| ControlRefusal::NoCustody {
            agent: agent.to_string(),
            reason: "the tail lost its last envelope".into(),
        })?;
    let source = last.fields().from;
    let departed = if source == *shared.peers.local_key() {
        departed_by(shared, agent, hash.as_bytes())
            .await
            .map_err(|e| ControlRefusal::StoreUnreadable(e.to_string()))?
    } else {
        let peer = source
            .peer_id_string()
            .parse::<PeerId>()
            .map_err(|e| ControlRefusal::Unreachable(e.to_string()))?;
        let question = ControlRequest::Departed {
            agent: agent.to_string(),
            envelope: *hash.as_bytes(),
        };
        match control_request(shared, peer, &question).await {
            Ok(ControlReply::HopCommitted(departed)) => departed,
            Ok(other) => {
                return Err(ControlRefusal::Unreachable(format!(
                    "the hop's source answered {other:?}"
                )))
            }
            Err(e) => return Err(ControlRefusal::Unreachable(e.to_string())),
        }
    };
    if departed {
        Ok(())
    } else {
        Err(ControlRefusal::NoCustody {
            agent: agent.to_string(),
            reason: format!("hop {} to the sender did not complete", to.hop),
        })
    }
}

/// Reports where the agent of `meta` is (here) to its home `home`, with its custody tail.
///
/// # Errors
///
/// Why the home did not take it, or answered something else than its certificate of this
/// custody.
pub(super) async fn report_location(
    shared: &Arc<Shared>,
    meta: &AgentMeta,
    home: PeerId,
) -> Result<Vec<u8>, ReportFailure> {
    let request = ControlRequest::Location {
        agent: meta.id.clone(),
        custody: tail_of(meta),
    };
    let certificate = match control_request(shared, home, &request).await {
        Ok(ControlReply::CustodyConfirmed(certificate)) => certificate,
        Ok(ControlReply::Refused(refusal)) => return Err(ReportFailure::Refused(refusal)),
        Ok(other) => return Err(ReportFailure::Answer(format!("{other:?}"))),
        Err(e) => return Err(ReportFailure::Answer(e.to_string())),
    };
    // Only a certificate of this very custody replaces the tail.
    let here = CustodyPoint {
        hop: meta.hop,
        holder: *shared.peers.local_key(),
        envelope: Some(EnvelopeHash(*blake3::hash(&meta.envelope).as_bytes())),
    };
    match CustodyCertificate::decode_known(&certificate, |k| shared.peers.known_key(k)) {
        Ok(c) if *c.point() == here => Ok(certificate),
        Ok(_) => Err(ReportFailure::Answer(
            "a certificate of another custody".into(),
        )),
        Err(e) => Err(ReportFailure::Answer(format!(
            "a certificate that does not decode: {e}"
        ))),
    }
}

/// Why a location report did not bring a certificate back.
#[derive(Debug)]
pub(super) enum ReportFailure {
    /// The home refused the report.
    Refused(ControlRefusal),
    /// The home could not be asked, or gave an answer that is no certificate of the custody.
    Answer(String),
}

impl std::fmt::Display for ReportFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(refusal) => write!(f, "the home refused it: {refusal}"),
            Self::Answer(e) => write!(f, "the home answered {e}"),
        }
    }
}

/// On the holder: the certificates its agents' homes sent while they were here (agent id ->
/// the envelope the agent was held by, and the home's certificate of that custody), until the
/// agent's next hop sends the certificate instead of the tail before it
/// ([`ConfirmedCustody::take`]). Bounded: past [`CONFIRMED_REMEMBERED`] entries it starts
/// afresh (an agent that then leaves carries its tail a little longer).
#[derive(Default)]
pub(super) struct ConfirmedCustody {
    /// A `std` mutex held for one map operation.
    by_agent: Mutex<HashMap<String, (EnvelopeHash, Vec<u8>)>>,
}

/// Confirmations kept at most.
const CONFIRMED_REMEMBERED: usize = 65_536;

impl ConfirmedCustody {
    /// The home certified custody of `agent` held by the envelope with hash `envelope`.
    pub(super) fn record(&self, agent: &str, envelope: EnvelopeHash, certificate: Vec<u8>) {
        let mut map = lock(&self.by_agent);
        if map.len() >= CONFIRMED_REMEMBERED {
            map.clear();
        }
        map.insert(agent.to_string(), (envelope, certificate));
    }

    /// The home's certificate of `agent` held by `envelope` (its encoded bytes), if it came:
    /// then the tail before it need not travel. Forgets the confirmation either way.
    pub(super) fn take(&self, agent: &str, envelope: &[u8]) -> Option<Vec<u8>> {
        let (hash, certificate) = lock(&self.by_agent).remove(agent)?;
        (!envelope.is_empty() && blake3::hash(envelope).as_bytes() == hash.as_bytes())
            .then_some(certificate)
    }
}
