//! Custody reports: the node holding an agent tells the agent's home where it is and how it
//! ended, and proves it holds the agent with its custody tail (`security::follow_custody`).
//!
//! Both sides live here. The holder presents the hops it has since what the home last
//! confirmed ([`custody_tail`]), each with its source's handover signature ([`handover_of`]:
//! sent after `Stored`, kept in [`Handovers`], or asked of the source). The home follows the
//! tail from its `custody` record ([`confirm_report`]) and takes the report only if it leads to
//! the peer that sent it: a peer that never held the agent (or was only offered it) can neither
//! end it nor redirect its messages, whatever ids it learned. For a location it answers with
//! its certificate of the custody it confirmed, which the holder keeps ([`ConfirmedCustody`])
//! and sends on with the agent instead of the tail before it.
//!
//! Any other node an agent comes to checks its custody the same way ([`check_arrival`]), from
//! the latest point the home vouches for (its certificate the agent carries, a hop the home
//! handed it over by, or the launch): a peer allowed to push agents cannot push a copy of one
//! it never held.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use security::{
    follow_anchored, follow_custody, AgentId, AgentOrigin, CustodyCertificate, CustodyError,
    CustodyPoint, EnvelopeHash, HandedOverHop, HopEnvelope, LaunchNonce, PublicKey, Vouched,
};

use super::control::control_request;
use super::{lock, Shared};
use crate::store::{AgentMeta, StoreError};
use crate::wire::{ControlRefusal, ControlReply, ControlRequest, CustodyLink, HandoverKey};

/// The custody tail the holder of `meta` presents: the hops the home may not have certified,
/// then the one that brought the agent here (with its handover, [`handover_of`]). Empty on the
/// home node before the agent's first hop (the home confirmed it holds it).
pub(super) async fn custody_tail(shared: &Arc<Shared>, meta: &AgentMeta) -> Vec<CustodyLink> {
    let handover = handover_of(shared, meta).await;
    arriving_tail(meta.tail.clone(), &meta.envelope, handover)
}

/// The source's handover of the hop that brought the agent of `meta` here: kept with the agent,
/// or sent after the hop ([`Handovers`]), or else asked of the source
/// (`ControlRequest::Departed`). None if the source does not say it handed the agent over (or
/// cannot be asked), and on the home node before the agent's first hop.
pub(super) async fn handover_of(shared: &Arc<Shared>, meta: &AgentMeta) -> Option<HandoverKey> {
    if meta.handover.is_some() || meta.envelope.is_empty() {
        return meta.handover;
    }
    let envelope = *blake3::hash(&meta.envelope).as_bytes();
    // It follows the source's `Stored` at once; an agent that leaves right after it arrived
    // may be quicker.
    if let Some(handover) = shared.handovers.wait_for(&meta.id, &envelope).await {
        return Some(handover);
    }
    let hop = HopEnvelope::decode_known(&meta.envelope, |k| shared.peers.known_key(k)).ok()?;
    let peer = hop.fields().from.peer_id_string().parse::<PeerId>().ok()?;
    let question = ControlRequest::Departed {
        agent: meta.id.clone(),
        envelope: meta.envelope.clone(),
    };
    match control_request(shared, peer, &question).await {
        Ok(ControlReply::HandedOver(Some(handover))) if hop.handover_verifies(&handover.0) => {
            shared.handovers.record(&meta.id, envelope, handover);
            Some(handover)
        }
        Ok(other) => {
            tracing::warn!(agent = %meta.id, "the hop's source answered {other:?} about its handover");
            None
        }
        Err(e) => {
            tracing::debug!(agent = %meta.id, "cannot ask the hop's source for its handover: {e}");
            None
        }
    }
}

/// The custody an arriving agent keeps: the tail it came with and the hop its source held it
/// by (a link without its handover signature, which no check accepts, if there is none).
pub(super) fn arriving_tail(
    carried: Vec<CustodyLink>,
    previous: &[u8],
    handover: Option<HandoverKey>,
) -> Vec<CustodyLink> {
    let mut tail = carried;
    if !previous.is_empty() {
        tail.push(CustodyLink {
            envelope: previous.to_vec(),
            handover: handover.unwrap_or(HandoverKey([0; 32])),
        });
    }
    tail
}

/// How an arriving hop stands in its agent's custody: who sends it, and the envelope it names
/// as the one before (the one its sender holds the agent by).
pub(super) struct ArrivingHop<'a> {
    /// The sending peer's key.
    pub(super) sender: &'a PublicKey,
    /// The envelope the hop names as previous, decoded with the offer (none on a first hop):
    /// the last link of the custody, with `previous_handover`.
    pub(super) previous: Option<&'a HopEnvelope>,
    /// The handover of that envelope's hop, as the offer brought it (or this node knows it).
    pub(super) previous_handover: Option<HandoverKey>,
}

impl ArrivingHop<'_> {
    /// Whether custody followed to `point` is the sender's, by the envelope the hop follows.
    fn held_at(&self, agent: &str, point: &CustodyPoint) -> Result<(), ControlRefusal> {
        if point.holder == *self.sender && point.envelope == self.previous.map(HopEnvelope::hash) {
            Ok(())
        } else {
            Err(ControlRefusal::NoCustody {
                agent: agent.to_string(),
                reason: format!(
                    "the hop does not follow the custody its sender holds (hop {})",
                    point.hop
                ),
            })
        }
    }
}

/// The custody an arriving hop presents, decoded: the `carried` tail, then the hop its sender
/// holds the agent by (as [`arriving_tail`] keeps it, without decoding that envelope again).
fn arriving_custody(
    shared: &Shared,
    agent: &str,
    carried: &[CustodyLink],
    arrival: &ArrivingHop<'_>,
) -> Result<(AgentId, Vec<HandedOverHop>), ControlRefusal> {
    let (id, mut tail) = decode_tail(shared, agent, carried)?;
    if let Some(previous) = arrival.previous {
        tail.push(HandedOverHop {
            envelope: previous.clone(),
            handover: arrival.previous_handover.map_or([0; 32], |h| h.0),
        });
    }
    Ok((id, tail))
}

/// On any node but the agent's home: whether an agent arriving by a hop comes from its holder.
/// The agent's id must be the one `home` launched with `nonce`, and the custody (the `carried`
/// tail and the hop the sender holds the agent by, [`arriving_custody`]) must lead
/// to the sender, by the envelope the hop follows, from the home's `certificate` (or from the
/// launch, if empty). The home itself needs no tail: it vouches for its own agents.
///
/// # Errors
///
/// [`ControlRefusal::NoCustody`], saying why.
pub(super) fn check_arrival(
    shared: &Shared,
    agent: &str,
    (home, nonce): (&str, [u8; 16]),
    certificate: &[u8],
    carried: &[CustodyLink],
    arrival: &ArrivingHop<'_>,
) -> Result<(), ControlRefusal> {
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
    let (id, tail) = arriving_custody(shared, agent, carried, arrival)?;
    if *arrival.sender == home && id.is_launched_by(&home, &origin.nonce) {
        return Ok(());
    }
    let known = |k: &[u8; 32]| shared.peers.known_key(k);
    let certificate = if certificate.is_empty() {
        None
    } else {
        Some(
            CustodyCertificate::decode_known(certificate, known)
                .map_err(|e| refuse(format!("custody certificate: {e}")))?,
        )
    };
    let point = follow_anchored(
        &id,
        &origin,
        certificate.as_ref(),
        &tail,
        arrival.sender,
        |h| signed_here(shared, h),
    )
    .map_err(|e| refuse(e.to_string()))?;
    arrival.held_at(agent, &point)
}

/// On the home node: whether an agent coming home by a hop comes from its holder: the custody
/// `tail` must lead from the custody `recorded` here (`Store::custody`) to the sender, by the
/// envelope the hop follows.
///
/// # Errors
///
/// [`ControlRefusal::NoCustody`] if the agent was not launched here, an envelope does not
/// decode, or the tail does not lead to the sender.
pub(super) fn check_homecoming(
    shared: &Shared,
    agent: &str,
    recorded: Option<CustodyPoint>,
    carried: &[CustodyLink],
    arrival: &ArrivingHop<'_>,
) -> Result<(), ControlRefusal> {
    let recorded = launched_here(agent, recorded)?;
    let (id, tail) = arriving_custody(shared, agent, carried, arrival)?;
    let point = follow_decoded(shared, agent, &recorded, &id, &tail, arrival.sender)?;
    arrival.held_at(agent, &point)
}

/// Which signatures of the hop with envelope hash `h` this node made (lately): they need no
/// check.
fn signed_here(shared: &Shared, h: &EnvelopeHash) -> Vouched {
    shared.departures.vouched(h.as_bytes())
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
/// signatures of hops this node made are not checked again).
fn follow(
    shared: &Shared,
    agent: &str,
    recorded: Option<CustodyPoint>,
    tail: &[CustodyLink],
    presenter: &PublicKey,
) -> Result<CustodyPoint, ControlRefusal> {
    let recorded = launched_here(agent, recorded)?;
    let (id, tail) = decode_tail(shared, agent, tail)?;
    follow_decoded(shared, agent, &recorded, &id, &tail, presenter)
}

/// The custody this home `recorded` of `agent` (`Store::custody`), which it has only of the
/// agents it launched.
fn launched_here(
    agent: &str,
    recorded: Option<CustodyPoint>,
) -> Result<CustodyPoint, ControlRefusal> {
    recorded.ok_or_else(|| ControlRefusal::NoCustody {
        agent: agent.to_string(),
        reason: "no agent of this id was launched here".into(),
    })
}

/// [`follow`], of a tail decoded already.
fn follow_decoded(
    shared: &Shared,
    agent: &str,
    recorded: &CustodyPoint,
    id: &AgentId,
    tail: &[HandedOverHop],
    presenter: &PublicKey,
) -> Result<CustodyPoint, ControlRefusal> {
    let refuse = |reason: String| ControlRefusal::NoCustody {
        agent: agent.to_string(),
        reason,
    };
    follow_custody(id, recorded, tail, presenter, |h| signed_here(shared, h)).map_err(|e| match e {
        CustodyError::Superseded { hop, .. } => ControlRefusal::Superseded {
            agent: agent.to_string(),
            hop,
        },
        e => refuse(e.to_string()),
    })
}

/// The agent id and the hops of a custody tail, decoded.
fn decode_tail(
    shared: &Shared,
    agent: &str,
    tail: &[CustodyLink],
) -> Result<(AgentId, Vec<HandedOverHop>), ControlRefusal> {
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
        .map(|(i, link)| {
            HopEnvelope::decode_known(&link.envelope, known)
                .map(|envelope| HandedOverHop {
                    envelope,
                    handover: link.handover.0,
                })
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
    tail: Vec<CustodyLink>,
    presenter: PeerId,
) -> Result<CustodyPoint, ControlRefusal> {
    let checked_from = shared
        .store
        .custody(agent, |k| shared.peers.known_key(k))
        .map_err(|e| ControlRefusal::StoreUnreadable(e.to_string()))?;
    let presenter_key = key_of(shared, agent, &presenter)?;
    let point = follow(shared, agent, checked_from, &tail, &presenter_key)?;
    let (task_shared, id, holder) = (shared.clone(), agent.to_string(), presenter.to_string());
    shared
        .store
        .write(move |b| {
            let now = b.custody(&id, |k| task_shared.peers.known_key(k))?;
            let point = if now == checked_from {
                Ok(point)
            } else {
                follow(&task_shared, &id, now, &tail, &presenter_key)
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
        custody: custody_tail(shared, meta).await,
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

/// What this node keeps per agent for the envelope the agent is held by here (agent id -> that
/// envelope's hash and the value), until the agent's next hop or report uses it. A `std` mutex
/// held for one map operation. Bounded: past [`REMEMBERED`] entries it starts afresh (what is
/// forgotten costs a longer tail, or a question to the hop's source).
pub(super) struct HeldBy<T> {
    by_agent: Mutex<HashMap<String, ([u8; 32], T)>>,
}

/// Entries a [`HeldBy`] keeps at most.
const REMEMBERED: usize = 65_536;

impl<T> Default for HeldBy<T> {
    fn default() -> Self {
        HeldBy {
            by_agent: Mutex::default(),
        }
    }
}

impl<T: Clone> HeldBy<T> {
    /// Keeps `value` for `agent` held by the envelope with hash `envelope`.
    pub(super) fn record(&self, agent: &str, envelope: [u8; 32], value: T) {
        let mut map = lock(&self.by_agent);
        if map.len() >= REMEMBERED {
            map.clear();
        }
        map.insert(agent.to_string(), (envelope, value));
    }

    /// The value kept for `agent` held by the envelope with hash `envelope`.
    fn get(&self, agent: &str, envelope: &[u8; 32]) -> Option<T> {
        lock(&self.by_agent)
            .get(agent)
            .filter(|(e, _)| e == envelope)
            .map(|(_, v)| v.clone())
    }

    /// As [`HeldBy::get`], and forgets what was kept for `agent` either way.
    pub(super) fn take(&self, agent: &str, envelope: &[u8; 32]) -> Option<T> {
        let (held_by, value) = lock(&self.by_agent).remove(agent)?;
        (held_by == *envelope).then_some(value)
    }
}

/// On the holder: the certificates its agents' homes sent while they were here, until the
/// agent's next hop sends the certificate instead of the tail before it.
pub(super) type ConfirmedCustody = HeldBy<Vec<u8>>;

/// On a destination: the handovers its sources sent after the hops agents arrived here by,
/// until the agent leaves or reports with them.
#[derive(Default)]
pub(super) struct Handovers {
    held: HeldBy<HandoverKey>,
    /// Wakes those waiting for a handover ([`Handovers::wait_for`]) when one comes.
    arrived: tokio::sync::Notify,
}

/// How long [`Handovers::wait_for`] waits for a handover on its way before the source is asked.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

impl Handovers {
    /// The source of the hop with envelope hash `envelope` handed `agent` over.
    pub(super) fn record(&self, agent: &str, envelope: [u8; 32], handover: HandoverKey) {
        self.held.record(agent, envelope, handover);
        self.arrived.notify_waiters();
    }

    /// The handover of `agent` by the hop with envelope hash `envelope`, once it came, waiting
    /// up to [`HANDOVER_WAIT`] for it.
    async fn wait_for(&self, agent: &str, envelope: &[u8; 32]) -> Option<HandoverKey> {
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            // (Registered before looking, so that a handover recorded in between wakes it.)
            arrived.as_mut().enable();
            if let Some(found) = self.held.get(agent, envelope) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }

    /// Forgets `agent`'s handover (it left, or keeps it in its record).
    pub(super) fn forget(&self, agent: &str) {
        lock(&self.held.by_agent).remove(agent);
    }
}
