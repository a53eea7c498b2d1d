//! The destination's side of a hop: check the offer (peer, envelope, duplicates, size, package),
//! take and verify the continuation, store the agent as arriving, and make it runnable once the
//! source's decision to commit is here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use agent_lang::{Execution, MAX_TABLE_KEY, MAX_TABLE_VALUE};
use libp2p::PeerId;
use security::{
    verify_hop, Access, CustodyPoint, EnvelopeHash, HopCheck, HopEnvelope, PublicKey,
    ResourcePolicy,
};

use super::depart::KEEP_CHECKPOINT_FROM;

/// How far apart two nodes' clocks may be: an envelope dated further ahead of this node's clock,
/// or further before the envelope it follows, is refused. Five minutes, as Kerberos allows:
/// hosts that keep time with NTP are within a second of each other.
const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
use super::gate::Arriving;
use super::recover::{ask_hop_decision, departed_by, handover_key};
use crate::node::accept::ExchangePermits;
use crate::node::custody::{
    arriving_tail, check_arrival, check_homecoming, report_location, ArrivingHop, ReportFailure,
};
use crate::node::events::NodeEvent;
use crate::node::fault::FaultPoint;
use crate::node::packages::{ensure_package, Loaded};
use crate::node::routing::forward_left_behind;
use crate::node::runner::{spawn_agent, spawn_runner, Runnable};
use crate::node::NodeStream;
use crate::node::{now_ms, Shared};
use crate::store::{
    AgentMeta, AgentRecord, AgentState, Arrival, ArrivalView, HopSeen, ResourceContents,
    ResourcePlace, StoreError,
};
use crate::wire::{
    read_bulk, read_frame, write_frame, ControlRefusal, HandoverKey, HopDecision, HopHandover,
    HopOffer, HopRefusal, HopReply, MovedContents, MovedResource, MovedResources, WireError,
    MAX_FRAME, MAX_MOVED_BYTES,
};

/// Destination side of hops: offer after offer on one stream, until the source closes it.
pub(in crate::node) async fn handle_hop(
    shared: &Arc<Shared>,
    peer: PeerId,
    mut stream: NodeStream,
    permits: &ExchangePermits<'_>,
) -> Result<(), WireError> {
    // A peer that may not push agents here is refused without its offer being read (or kept).
    if !shared
        .peers
        .key_of(&peer)
        .is_some_and(|k| shared.trust.accepts_push_from(&k))
    {
        if permits.skip_request(&mut stream).await? {
            tracing::warn!(%peer, "refused a pushed agent: peer not in accept_from");
            let refusal = HopRefusal::PeerNotAccepted {
                peer: peer.to_string(),
            };
            shared.events.emit(NodeEvent::HopRefused {
                agent: None,
                hop: None,
                from: shared.peers.name_of_peer(&peer),
                reason: refusal.clone(),
            });
            write_frame(&mut stream, &HopReply::Refused(refusal)).await?;
        }
        return Ok(());
    }
    while let Some((offer, exchange_permits)) = permits
        .next_request::<HopOffer>(&mut stream, MAX_FRAME)
        .await?
    {
        let mut claimed = None;
        // No handover follows a hop to the agent's home (it keeps the agent's custody itself).
        let to_home = offer.home == shared.peers.local_text();
        match receive_hop(shared, peer, &mut stream, offer, &mut claimed).await {
            Ok((arrived, by)) => {
                let acknowledged = write_frame(&mut stream, &HopReply::Stored).await;
                // Stored is stored: the agent runs here even if the acknowledgement is lost
                // (the source then learns of the hop through `HopStatus`).
                let meta = arrived.rec.meta.clone();
                spawn_runner(shared, meta.id.clone(), meta.hop, None, Some(arrived));
                acknowledged?;
                // (The handover is waited for without holding the node's permits.)
                drop(exchange_permits);
                let handover = if to_home {
                    Ok(())
                } else {
                    take_handover(shared, &mut stream, &meta.id, &by).await
                };
                tell_home_location(shared, meta, &peer);
                handover?;
            }
            Err(Refusal::Reply(reply)) => {
                if let HopReply::Refused(reason) = &reply {
                    shared.events.emit(NodeEvent::HopRefused {
                        agent: claimed.as_ref().map(|(agent, _)| agent.clone()),
                        hop: claimed.as_ref().map(|(_, hop)| *hop),
                        from: shared.peers.name_of_peer(&peer),
                        reason: reason.clone(),
                    });
                }
                write_frame(&mut stream, &reply).await?;
                drop(exchange_permits);
                // A hop this node holds already: its handover follows all the same.
                if let (HopReply::Duplicate, Some((agent, _)), false) = (&reply, &claimed, to_home)
                {
                    let handover =
                        read_frame::<_, HopHandover>(&mut stream, HANDOVER_FRAME).await?;
                    if let Ok(Some(meta)) = shared.store.agent_meta(agent) {
                        record_handover(shared, agent, &meta.envelope, handover.0);
                    }
                }
            }
            Err(Refusal::Wire(e)) => return Err(e),
        }
    }
    Ok(())
}

/// Largest `HopHandover` frame read (one is 70 bytes).
const HANDOVER_FRAME: usize = 256;

/// The envelope an agent arrived by: its hash, and the handover lock its source opens once the
/// agent is here.
pub(in crate::node) struct ArrivedBy {
    envelope: [u8; 32],
    handover_lock: [u8; 32],
}

/// Reads the source's handover of the hop that brought `agent` here by, which follows `Stored`,
/// and keeps it for the agent ([`Handovers`](crate::node::custody::Handovers)) if it opens the
/// lock of the envelope the agent came by.
async fn take_handover(
    shared: &Shared,
    stream: &mut NodeStream,
    agent: &str,
    by: &ArrivedBy,
) -> Result<(), WireError> {
    let HopHandover(handover) = read_frame::<_, HopHandover>(stream, HANDOVER_FRAME).await?;
    if security::handover_opens(&by.handover_lock, &handover.0) {
        shared.handovers.record(agent, by.envelope, handover);
    } else {
        tracing::debug!(
            agent,
            "a handover key that does not open the envelope's lock"
        );
    }
    Ok(())
}

/// This node's handover key of the hop that took `agent` from here by `envelope`, once the
/// destination holds it (see [`departed_by`]): an agent back at the source of its last hop
/// comes without the key, which the source knows, so that it need not wait for it to leave.
async fn own_handover(
    shared: &Shared,
    agent: &str,
    envelope: &HopEnvelope,
) -> Result<Option<HandoverKey>, StoreError> {
    Ok(departed_by(shared, agent, envelope.hash().as_bytes())
        .await?
        .then(|| handover_key(shared, envelope))
        .flatten())
}

/// Keeps `handover` for `agent`, held by `envelope`, if it opens the envelope's handover lock.
fn record_handover(shared: &Shared, agent: &str, envelope: &[u8], handover: HandoverKey) {
    match HopEnvelope::decode_known(envelope, |k| shared.peers.known_key(k)) {
        Ok(e) if e.handover_verifies(&handover.0) => {
            shared
                .handovers
                .record(agent, *e.hash().as_bytes(), handover)
        }
        _ => tracing::debug!(
            agent,
            "a handover key that does not open the lock of the envelope held"
        ),
    }
}

/// Why a hop was not received: an answer for the source, or a broken stream.
pub(in crate::node) enum Refusal {
    Reply(HopReply),
    Wire(WireError),
}

impl From<WireError> for Refusal {
    fn from(e: WireError) -> Self {
        Refusal::Wire(e)
    }
}

pub(in crate::node) fn refused(why: HopRefusal) -> Refusal {
    Refusal::Reply(HopReply::Refused(why))
}

/// Checks an offer, takes the continuation (inline, or raw after Ready), verifies it, stores the
/// agent as arriving while the source's decision travels, and makes it runnable on `Commit`.
/// Gives the agent, and the envelope it came by (the source's handover key follows).
pub(in crate::node) async fn receive_hop(
    shared: &Arc<Shared>,
    peer: PeerId,
    stream: &mut NodeStream,
    offer: HopOffer,
    claimed: &mut Option<(String, u64)>,
) -> Result<(Runnable, ArrivedBy), Refusal> {
    let received = std::time::Instant::now();
    let inline = !offer.inline.is_empty();
    let checked = match check_offer(shared, peer, &offer, claimed).await {
        Ok(checked) => checked,
        // The source's decision follows an inline offer whatever the answer.
        Err(refusal) if inline => return Err(after_decision(stream, refusal).await),
        Err(refusal) => return Err(refusal),
    };
    let (continuation, continuation_hash) = if inline {
        let hash = *blake3::hash(&offer.inline).as_bytes();
        (offer.inline, hash)
    } else {
        if offer.continuation_len >= KEEP_CHECKPOINT_FROM as u64 {
            crate::memory::before_large_hop();
        }
        write_frame(stream, &HopReply::Ready).await?;
        read_bulk(stream, offer.continuation_len as usize).await?
    };
    // The resources that move with the agent follow its continuation (checked against
    // `MAX_MOVED_BYTES` with the offer).
    let tables = if offer.tables_len > 0 {
        read_bulk(stream, offer.tables_len as usize).await?.0
    } else {
        Vec::new()
    };
    // From here on the source's decision follows, whatever the answer.
    let CheckedOffer {
        envelope,
        previous,
        sender,
        loaded,
        custody: recorded,
        _arriving,
    } = checked;
    let fields = envelope.fields().clone();
    let envelope_hash = *envelope.hash().as_bytes();
    let lock = *envelope.handover_lock();
    let hash = fields.package_hash;
    // The signature is checked with those of the hops arriving at the same time.
    let signature_checked = if envelope.fields().from == sender {
        let others_arriving = shared.arrivals.in_progress() > 1;
        shared
            .verifier
            .check(envelope.clone(), others_arriving)
            .await
    } else {
        None
    };
    let check = HopCheck::new(&sender, shared.peers.local_key(), &hash, &continuation_hash)
        .with_clock(now_ms(), MAX_CLOCK_SKEW_MS)
        .with_previous(previous.as_ref())
        // (Its signature is checked with the custody that must lead to it, below.)
        .with_previous_known_genuine(true)
        .with_signature_checked(signature_checked);
    if let Err(e) = verify_hop(envelope, &check) {
        tracing::warn!(%peer, "refused a hop: {e}");
        return Err(after_decision(stream, refused(HopRefusal::Verification(e.to_string()))).await);
    }
    // A small continuation is decoded before it is accepted; a large one (whose hash and
    // envelope were checked) by its runner, so the acknowledgement does not wait for it.
    let exec = if inline {
        match Execution::decode(&loaded.program, &continuation) {
            Ok(exec) => Some(exec),
            Err(e) => {
                let refusal = refused(HopRefusal::Continuation(e.to_string()));
                return Err(after_decision(stream, refusal).await);
            }
        }
    } else {
        None
    };
    // Carried messages are checked as deliveries are: the agent must be able to decode them.
    let messages = offer.messages;
    for (index, m) in messages.iter().enumerate() {
        if let Err(e) = agent_lang::check_portable(&loaded.program, m) {
            let reason = e.to_string();
            let refusal = refused(HopRefusal::BadMessage { index, reason });
            return Err(after_decision(stream, refusal).await);
        }
    }
    let id = fields.agent_id.to_string();
    let tables = if tables.is_empty() {
        Ok(MovedResources::default())
    } else {
        MovedResources::decode(&tables)
            .map_err(|e| format!("the resources that move with the agent do not decode: {e}"))
    };
    let tables = match tables.and_then(|tables| moved_resources(shared, &loaded, &id, tables.0)) {
        Ok(tables) => tables,
        Err(why) => {
            let refusal = refused(HopRefusal::MovingTable(why));
            return Err(after_decision(stream, refusal).await);
        }
    };
    // The tail is kept with the agent (and read with its record): no entry may be more than an
    // envelope.
    if let Some(index) = offer
        .custody
        .iter()
        .position(|link| link.envelope.len() > security::MAX_ENVELOPE_BYTES)
    {
        let refusal = refused(HopRefusal::Envelope(format!(
            "custody tail entry {index} is larger than an envelope"
        )));
        return Err(after_decision(stream, refusal).await);
    }
    // This node is the agent's home if it keeps its custody, whatever the offer says.
    let me = shared.peers.local_text();
    let home_here = recorded.is_some();
    if home_here != (offer.home == me) {
        tracing::warn!(%peer, agent = id, "refused a hop that names another home than the agent's");
        let refusal = refused(HopRefusal::Envelope(format!(
            "the agent's home is {}, not {}",
            if home_here { me } else { "another node" },
            offer.home
        )));
        return Err(after_decision(stream, refusal).await);
    }
    // Custody must lead to this node: coming home, from the custody recorded here; anywhere
    // else, from the home's certificate the agent carries (or its launch).
    let previous_handover = match (offer.previous_handover, &previous) {
        (None, Some(previous)) if previous.fields().from == *shared.peers.local_key() => {
            match own_handover(shared, &id, previous).await {
                Ok(handover) => handover,
                Err(e) => {
                    let refusal = refused(HopRefusal::StoreRead(e.to_string()));
                    return Err(after_decision(stream, refusal).await);
                }
            }
        }
        (handover, _) => handover,
    };
    let arrival = ArrivingHop {
        sender: &sender,
        previous: previous.as_ref(),
        previous_handover,
    };
    let checked = if home_here {
        check_homecoming(shared, &id, recorded, &offer.custody, &arrival)
    } else {
        let origin = (offer.home.as_str(), offer.nonce);
        check_arrival(
            shared,
            &id,
            origin,
            &offer.certificate,
            &offer.custody,
            &arrival,
        )
    };
    if let Err(e) = checked {
        tracing::warn!(%peer, "refused a hop: {e}");
        let refusal = refused(HopRefusal::Verification(e.to_string()));
        return Err(after_decision(stream, refusal).await);
    }
    let (custody, certificate) = if home_here {
        (Vec::new(), Vec::new())
    } else {
        let custody = arriving_tail(offer.custody, &offer.previous, previous_handover);
        (custody, offer.certificate)
    };
    let rec = AgentRecord {
        meta: AgentMeta {
            id,
            package: *hash.as_bytes(),
            hop: fields.hop,
            hops: offer.hops,
            operations: offer.operations,
            sent: offer.sent,
            home: offer.home,
            launcher: offer.launcher,
            state: AgentState::Arriving {
                from: shared.peers.text_of(&peer),
                envelope: envelope_hash,
                carried: messages.len() as u64,
            },
            envelope: offer.envelope,
            handover: None,
            tail: custody,
            nonce: offer.nonce,
            certificate,
        },
        continuation,
    };
    // Stored durably while the source's departure record is written and its decision travels;
    // runnable at once if the decision to commit is already here when the write runs (the
    // decision is read first, so one that came with the offer is).
    let commit_seen = Arc::new(AtomicBool::new(false));
    let decision = {
        let commit_seen = commit_seen.clone();
        async move {
            let decision = read_frame::<_, HopDecision>(stream, MAX_FRAME).await;
            if let Ok(HopDecision::Commit) = decision {
                commit_seen.store(true, Ordering::Release);
            }
            decision
        }
    };
    let me = shared.peers.local_text().to_string();
    let home_custody = CustodyPoint {
        hop: rec.hop,
        holder: *shared.peers.local_key(),
        envelope: Some(EnvelopeHash(envelope_hash)),
    };
    let mut rec = rec;
    let source = shared.peers.text_of(&peer);
    let previous = fields.previous.map(|h| h.0);
    let gate = shared.clone();
    let store = shared.store.write(move |b| {
        // Answered "not held" to its source while this receipt was stuck (see
        // `ArrivalGate::held`): the source resumes its own copy, so this one is not stored.
        if gate.arrivals.abandoned(&envelope_hash) {
            return Ok(None);
        }
        // Checked again where it is written: another arrival may have brought a table of the
        // same name since `moved_resources` looked.
        if let Some(why) = b.resources_taken(&rec.id, tables.iter().map(|(name, _)| name))? {
            return Ok(Some(Err(why)));
        }
        let mut returning = None;
        match b.agent_meta(&rec.id)? {
            // An arrival of this hop number by another envelope from the same source still
            // waits for its decision: the source gave it up (it is offering this one), so it
            // goes, and what was queued since it arrived (its senders were told "delivered")
            // stays queued, before what this offer carries.
            Some(AgentMeta {
                state:
                    AgentState::Arriving {
                        envelope: old,
                        from,
                        ..
                    },
                hop,
                ..
            }) if hop == rec.hop && old != envelope_hash && from == source => {
                b.abort_arrival(&rec.id, &old)?;
            }
            // Back from where it left for, by the hop after that one, before this node
            // completed the departure: completed with this arrival.
            Some(AgentMeta {
                state:
                    AgentState::Leaving {
                        to,
                        envelope,
                        carried,
                        ..
                    },
                ..
            }) if previous == Some(envelope) && to == source => {
                returning = Some((envelope, carried));
            }
            _ => {}
        }
        let committed = commit_seen.load(Ordering::Acquire);
        if committed {
            rec.state = AgentState::Ready;
        }
        let arrival = b.accept_arrival(&rec)?;
        if let Arrival::New = arrival {
            if let Some((departure, carried)) = returning {
                b.complete_return(&rec.id, &departure, &source, carried)?;
            }
            b.arrive_moved(&rec.id, &source, &tables, committed)?;
            for m in &messages {
                b.push_message(&rec.id, m)?;
            }
            if committed && rec.home == me {
                b.set_location(&rec.id, &me)?;
                b.set_custody(&rec.id, &home_custody)?;
            }
        }
        Ok(Some(Ok((arrival, rec, committed))))
    });
    let (decision, stored) = tokio::join!(decision, store);
    let (rec, committed) = match stored {
        Ok(Some(Ok((Arrival::New, rec, committed)))) => (rec, committed),
        Ok(Some(Err(why))) => {
            decision?;
            return Err(refused(HopRefusal::MovingTable(why)));
        }
        Ok(Some(Ok((Arrival::Duplicate, ..)))) => {
            decision?;
            return Err(Refusal::Reply(HopReply::Duplicate));
        }
        Ok(Some(Ok((Arrival::Conflict, rec, _)))) => {
            decision?;
            return Err(conflict(&peer, &rec.id, rec.hop));
        }
        Ok(None) => {
            decision?;
            return Err(refused(HopRefusal::Abandoned));
        }
        Err(e) => {
            decision?;
            return Err(refused(HopRefusal::StoreWrite(e.to_string())));
        }
    };
    shared.faults.die_at(FaultPoint::DestinationAfterStore);
    match decision {
        Ok(HopDecision::Commit) => {}
        Ok(HopDecision::Abort(why)) => {
            settle_arrival(shared, &rec.meta, false).await;
            return Err(refused(HopRefusal::SourceAborted(why)));
        }
        Err(e) => {
            // The decision is lost with the stream: ask the source for it.
            shared
                .tasks
                .spawn(ask_hop_decision(shared.clone(), rec.meta.clone()));
            return Err(Refusal::Wire(e));
        }
    }
    let rec = if committed {
        rec
    } else {
        match commit_arrival(shared, &rec.id, &envelope_hash).await {
            Some(meta) => AgentRecord {
                meta: AgentMeta {
                    state: meta.state,
                    ..rec.meta
                },
                ..rec
            },
            None => return Err(refused(HopRefusal::ArrivalDropped)),
        }
    };
    if rec.continuation.len() >= KEEP_CHECKPOINT_FROM {
        crate::memory::after_large_hop();
    }
    // Reported by the destination, before the agent runs here: a trace line never races the
    // agent's end.
    shared.events.emit(NodeEvent::HopStored {
        agent: rec.id.clone(),
        hop: rec.hop,
        from: shared.peers.name_of_peer(&peer),
        to: shared.peers.local_name().to_string(),
        bytes: rec.continuation.len(),
        micros: offer.prepared_micros + received.elapsed().as_micros() as u64,
    });
    let by = ArrivedBy {
        envelope: envelope_hash,
        handover_lock: lock,
    };
    Ok((Runnable { rec, exec, loaded }, by))
}

/// A hop this node accepted by another envelope, offered again: refused (only one claim on a
/// hop can be the agent's), and logged, since one of the two was made by a node that did not
/// hold the agent.
fn conflict(peer: &PeerId, agent: &str, hop: u64) -> Refusal {
    tracing::warn!(%peer, agent, hop, "refused a hop accepted here already by another envelope");
    refused(HopRefusal::Conflict { hop })
}

/// An offer that passed the checks made before its continuation is taken.
pub(in crate::node) struct CheckedOffer<'a> {
    pub(in crate::node) envelope: HopEnvelope,
    pub(in crate::node) previous: Option<HopEnvelope>,
    pub(in crate::node) sender: PublicKey,
    pub(in crate::node) loaded: Arc<Loaded>,
    /// The agent's custody as this node confirmed it, if it is the agent's home
    /// ([`Store::custody`](crate::store::Store::custody)).
    pub(in crate::node) custody: Option<CustodyPoint>,
    /// Holds the hop in `ArrivalGate::arriving` until the offer is settled.
    pub(in crate::node) _arriving: Arriving<'a>,
}

/// The checks of an offer made before its continuation is taken: the sender, the envelope, the
/// hop not seen before, the size, the package (pulled if missing) and its author.
pub(in crate::node) async fn check_offer<'a>(
    shared: &'a Arc<Shared>,
    peer: PeerId,
    offer: &HopOffer,
    claimed: &mut Option<(String, u64)>,
) -> Result<CheckedOffer<'a>, Refusal> {
    let Some(sender) = shared.peers.key_of(&peer) else {
        return Err(refused(HopRefusal::NoIdentity));
    };
    if !shared.trust.accepts_push_from(&sender) {
        tracing::warn!(%peer, "refused a pushed agent: peer not in accept_from");
        return Err(refused(HopRefusal::PeerNotAccepted {
            peer: peer.to_string(),
        }));
    }
    let known = |k: &[u8; 32]| shared.peers.known_key(k);
    let envelope = HopEnvelope::decode_known(&offer.envelope, known)
        .map_err(|e| refused(HopRefusal::Envelope(e.to_string())))?;
    let previous = if offer.previous.is_empty() {
        None
    } else {
        Some(
            HopEnvelope::decode_known(&offer.previous, known)
                .map_err(|e| refused(HopRefusal::PreviousEnvelope(e.to_string())))?,
        )
    };
    let fields = envelope.fields();
    let agent = fields.agent_id.to_string();
    *claimed = Some((agent.clone(), fields.hop));
    let arriving = shared
        .arrivals
        .enter((agent.clone(), fields.hop), *envelope.hash().as_bytes())
        .await
        .map_err(refused)?;
    // An agent that lives here cannot arrive here. Only a departure record (the agent is in
    // flight, and may be coming back before the departure completed) gives way to an arrival,
    // and an arrival of the same hop by another envelope from the same source (which gave it
    // up) to this one. The same hop by the same envelope is a retry (`Duplicate`); by another,
    // from anyone else, a conflicting claim (`Conflict`).
    let ArrivalView {
        here,
        seen,
        resident,
        custody,
    } = shared
        .store
        .arrival_view(&agent, fields.hop, envelope.hash().as_bytes(), known)
        .map_err(|e| refused(HopRefusal::StoreRead(e.to_string())))?;
    let source = shared.peers.text_of(&peer);
    let replaces = here.as_ref().is_some_and(|m| {
        m.hop == fields.hop
            && matches!(&m.state, AgentState::Arriving { from, .. } if *from == source)
            && !m.arriving_by(envelope.hash().as_bytes())
    });
    // (An offer of a hop older than one accepted here is a conflict too: its honest source
    // never offers it again once it sent `Commit`, it asks `HopStatus`; and taking it for a
    // duplicate would let a fabricated later hop make that source delete the agent.)
    if !replaces {
        match seen {
            HopSeen::No => {}
            HopSeen::ByThisEnvelope => return Err(Refusal::Reply(HopReply::Duplicate)),
            HopSeen::ByAnotherEnvelope | HopSeen::Later => {
                return Err(conflict(&peer, &agent, fields.hop))
            }
        }
    }
    // A new agent here must fit (one coming back, or replacing an arrival, takes its own place).
    if here.is_none() && resident >= shared.max_agents {
        tracing::warn!(%peer, agent, "refused a hop: the node is full");
        return Err(refused(HopRefusal::NodeFull {
            max: shared.max_agents,
        }));
    }
    match here {
        None
        | Some(AgentMeta {
            state: AgentState::Leaving { .. },
            ..
        }) => {}
        Some(_) if replaces => {}
        Some(_) => {
            tracing::warn!(%peer, agent, "refused a hop of an agent that lives here");
            return Err(refused(HopRefusal::LivesHere));
        }
    }
    if offer.continuation_len > shared.limits.max_continuation_bytes as u64 {
        return Err(refused(HopRefusal::OverLimit {
            bytes: offer.continuation_len,
        }));
    }
    if offer.tables_len > MAX_MOVED_BYTES as u64 {
        return Err(refused(HopRefusal::MovingTable(format!(
            "the resources that move with the agent take {} bytes, more than the \
             {MAX_MOVED_BYTES} a hop moves",
            offer.tables_len
        ))));
    }
    if !offer.inline.is_empty() && offer.tables_len > 0 {
        return Err(refused(HopRefusal::MovingTable(
            "an inline offer moves no resources: they follow a raw continuation".into(),
        )));
    }
    if let Err(full) = shared
        .quota
        .room_for(offer.continuation_len.saturating_add(offer.tables_len))
    {
        tracing::warn!(%peer, agent, "refused a hop: {}", HopRefusal::from(full));
        return Err(refused(full.into()));
    }
    if !offer.inline.is_empty() && offer.inline.len() as u64 != offer.continuation_len {
        return Err(refused(HopRefusal::LengthMismatch {
            inline: offer.inline.len() as u64,
            announced: offer.continuation_len,
        }));
    }
    // Pull the code if this node lacks it (receiver-initiated, anonymous), then admit it.
    let hash = fields.package_hash;
    ensure_package(shared, peer, &hash).await.map_err(refused)?;
    let loaded = shared
        .loaded(hash.as_bytes())
        .map_err(|e| refused(HopRefusal::Package(e)))?;
    if let Err(e) = shared.trust.admit_package(&loaded.package) {
        return Err(refused(HopRefusal::UntrustedPackage(e.to_string())));
    }
    Ok(CheckedOffer {
        envelope,
        previous,
        sender,
        loaded,
        custody,
        _arriving: arriving,
    })
}

/// The resources moving with agent `agent`, checked before they are stored with it: each must
/// be granted to its author for reading and writing here, must not meet a resource of this
/// node of the same name, and must hold what a table or a value holds (keys and values of a
/// table's sizes, values the agent's program reads; a dataset's files are any bytes); together
/// they must fit in the store quota.
fn moved_resources(
    shared: &Shared,
    loaded: &Loaded,
    agent: &str,
    moving: Vec<MovedResource>,
) -> Result<Vec<(String, ResourceContents)>, String> {
    if moving.is_empty() {
        return Ok(Vec::new());
    }
    let grants = shared
        .trust
        .admit_package(&loaded.package)
        .map(|grant| grant.resources)
        .unwrap_or_default();
    let manifest = loaded.package.manifest();
    let mut bytes = 0u64;
    let mut checked: Vec<(String, ResourceContents)> = Vec::with_capacity(moving.len());
    for resource in moving {
        let name = resource.name;
        if !agent_lang::is_valid_resource_name(&name) {
            return Err("a resource name is 1 to 64 of A-Z a-z 0-9 . _ -".into());
        }
        if !manifest
            .resources
            .iter()
            .any(|r| r.name == name && r.policy == ResourcePolicy::Move)
        {
            return Err(format!(
                "the agent's package does not bind '{name}' by move"
            ));
        }
        if checked.iter().any(|(seen, _)| *seen == name) {
            return Err(format!("'{name}' comes twice"));
        }
        if grants.access(&name) != Some(Access::ReadWrite) {
            return Err(format!(
                "this node does not grant the agent's author '{name}' for reading and writing"
            ));
        }
        let place = shared
            .store
            .resource_place(&name)
            .map_err(|e| e.to_string())?;
        // (The agent's own table, arriving or here: a retry of a hop stored or committed
        // already, which the store answers as such.)
        match place {
            Some(ResourcePlace::Gone { .. }) => {}
            Some(ResourcePlace::Arriving { holder, .. }) if holder == agent => {}
            Some(ResourcePlace::Here {
                holder: Some(holder),
            }) if holder == agent => {}
            None if shared.resources.get(&name).is_none() => {}
            _ => return Err(format!("this node has a resource '{name}' of its own")),
        }
        let contents = match resource.contents {
            MovedContents::Table(moved) => {
                let mut entries = Vec::with_capacity(moved.len());
                for (key, value) in moved {
                    if key.len() > MAX_TABLE_KEY || value.len() > MAX_TABLE_VALUE {
                        return Err(format!("'{name}': an entry is larger than a table holds"));
                    }
                    agent_lang::check_portable(&loaded.program, &value)
                        .map_err(|e| format!("'{name}', key '{key}': {e}"))?;
                    bytes += (key.len() + value.len()) as u64;
                    entries.push((key, value.into_vec()));
                }
                ResourceContents::Table(entries)
            }
            MovedContents::Value(value) => {
                agent_lang::check_portable(&loaded.program, &value)
                    .map_err(|e| format!("'{name}': {e}"))?;
                bytes += value.len() as u64;
                ResourceContents::Value(value.into_vec())
            }
            MovedContents::Dataset(files) => {
                bytes += files.iter().map(|f| f.len() as u64).sum::<u64>();
                ResourceContents::Dataset(files.into_iter().map(|f| f.into_vec()).collect())
            }
        };
        checked.push((name, contents));
    }
    shared
        .quota
        .room_for(bytes)
        .map_err(|full| HopRefusal::from(full).to_string())?;
    Ok(checked)
}

/// Takes the source's decision that follows the continuation, then gives `refusal`: the stream
/// stays in step for the next offer.
pub(in crate::node) async fn after_decision(stream: &mut NodeStream, refusal: Refusal) -> Refusal {
    if let Refusal::Reply(_) = refusal {
        if let Err(e) = read_frame::<_, HopDecision>(stream, MAX_FRAME).await {
            return Refusal::Wire(e);
        }
    }
    refusal
}

/// The hop committed: the agent stored as arriving by this envelope becomes runnable (an
/// unsynced write: a crash before it is durable leaves the agent arriving, and a restart asks
/// the source again). Its metadata as now stored; None if it is not arriving by this hop.
pub(in crate::node) async fn commit_arrival(
    shared: &Shared,
    id: &str,
    envelope: &[u8; 32],
) -> Option<AgentMeta> {
    let (agent, envelope, me, my_key) = (
        id.to_string(),
        *envelope,
        shared.peers.local_text().to_string(),
        *shared.peers.local_key(),
    );
    let committed = shared
        .store
        .write_unsynced(move |b| {
            let Some(meta) = b.commit_arrival(&agent, &envelope)? else {
                return Ok(None);
            };
            // (On the agent's home node, its location and custody with it.)
            if meta.home == me {
                b.set_location(&agent, &me)?;
                let custody = CustodyPoint {
                    hop: meta.hop,
                    holder: my_key,
                    envelope: Some(EnvelopeHash(envelope)),
                };
                b.set_custody(&agent, &custody)?;
            }
            Ok(Some(meta))
        })
        .await;
    match committed {
        Ok(meta) => meta,
        Err(e) => {
            // Stored as arriving, and committed: it runs; a restart would ask the source again.
            tracing::error!(agent = id, "cannot record that the hop committed: {e}");
            shared
                .store
                .agent_meta(id)
                .ok()
                .flatten()
                .map(|m| AgentMeta {
                    state: AgentState::Ready,
                    ..m
                })
        }
    }
}

/// Applies the source's decision to an agent stored as arriving: runs it if the hop committed,
/// else drops it (and forwards what was queued for it since it arrived: from a task, after
/// their senders heard "delivered", and lost if this node dies first. Making them wait for the
/// decision, as for a departure, would let a source that holds its decision back hold every
/// sender of a message to the agent).
pub(in crate::node) async fn settle_arrival(
    shared: &Arc<Shared>,
    meta: &AgentMeta,
    committed: bool,
) {
    let AgentState::Arriving { envelope, .. } = meta.state else {
        return;
    };
    if committed {
        if commit_arrival(shared, &meta.id, &envelope).await.is_some() {
            spawn_agent(shared, meta.id.clone(), meta.hop);
        }
        return;
    }
    let agent = meta.id.clone();
    match shared
        .store
        .write(move |b| b.abort_arrival(&agent, &envelope))
        .await
    {
        Ok(Some(left_behind)) => forward_left_behind(shared, &meta.id, left_behind),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(agent = %meta.id, "cannot drop an arrival that did not commit: {e}")
        }
    }
}

/// Updates the agent's location at its home node (best effort; forwarding pointers cover gaps).
/// A home that sent the agent here recorded where it went when the hop completed.
/// (An agent arriving at its home is recorded there with the arrival.)
pub(in crate::node) fn tell_home_location(shared: &Arc<Shared>, meta: AgentMeta, from: &PeerId) {
    if meta.home == shared.peers.local_text() {
        return;
    }
    let Ok(home) = meta.home.parse::<PeerId>() else {
        return;
    };
    if home == *from {
        return;
    }
    let task_shared = shared.clone();
    shared.tasks.spawn(async move {
        let agent = &meta.id;
        match report_location(&task_shared, &meta, home).await {
            Ok(certificate) => {
                let envelope = *blake3::hash(&meta.envelope).as_bytes();
                task_shared.confirmed.record(agent, envelope, certificate)
            }
            Err(ReportFailure::Refused(ControlRefusal::Superseded { .. })) => {}
            Err(ReportFailure::Refused(refusal)) => {
                tracing::warn!(agent, "the home node refused the agent's location: {refusal}")
            }
            Err(e) => tracing::debug!(agent, "cannot tell the home node where the agent is (forwarding pointers still lead there): {e}"),
        }
    });
}
