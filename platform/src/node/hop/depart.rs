//! The source's side of a hop: sign the envelope, write the departure record while the offer and
//! the continuation travel, decide Commit or Abort, and complete the departure once the
//! destination owns the agent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_lang::{unknown_node_error, Execution};
use futures::future::{BoxFuture, Shared as SharedFuture};
use futures::FutureExt;
use libp2p::PeerId;
use security::{AgentId, HopEnvelope, HopFields, PublicKey, ResourcePolicy, Vouched, FIRST_HOP};

use super::recover::{recover_departure, resolve_departure};
use crate::node::custody::{handover_of, report_location};
use crate::node::events::NodeEvent;
use crate::node::fault::FaultPoint;
use crate::node::packages::Loaded;
use crate::node::peers::Unresolved;
use crate::node::streams::PeerStream;
use crate::node::{lock, now_ms, Shared};
use crate::store::{
    AgentMeta, AgentRecord, AgentState, Batch, Durability, HeldResource, Store, StoreError,
};
use crate::wire::{
    push_frame, read_frame, write_bulk, write_frame, write_frames, HandoverKey, HopDecision,
    HopHandover, HopOffer, HopReply, MovedResources, MovingContents, TableEntriesSource,
    HOP_PROTOCOL, INLINE_CONTINUATION, MAX_CUSTODY_TAIL, MAX_FRAME, MAX_MOVED_BYTES,
    MAX_MOVED_ENTRIES, MAX_MOVED_RESOURCES,
};

/// Envelopes this node signed that it remembers: an agent that comes back presents one as its
/// custody, and its signature needs no check. Past this many, they are forgotten (an agent
/// that comes back after that costs one more signature check).
const SIGNED_REMEMBERED: usize = 65_536;

/// What the source side of hops keeps in memory. `std` mutexes, each held for one map or set
/// operation, never across an `.await`.
#[derive(Default)]
pub(in crate::node) struct Departures {
    /// Departure records being written, by envelope hash: a destination asking whether such a
    /// hop committed waits for the record.
    recording: Mutex<HashMap<[u8; 32], DepartureRecorded>>,
    /// Hashes of the hop envelopes this node signed lately.
    signed: Mutex<HashSet<[u8; 32]>>,
    /// Hashes of the envelopes of hops this node handed its agents over by lately (the
    /// destination said it holds the agent), from that moment on: before the departure is
    /// complete in the store.
    handed_over: Mutex<HashSet<[u8; 32]>>,
    /// Agents leaving this node, with the number of the hop they leave by: from before the
    /// hop reads the agent's message queue until the hop ends (a message queued meanwhile may
    /// be left behind: see `routing`).
    leaving: Mutex<HashMap<String, u64>>,
    /// Wakes those waiting for how a departure ends ([`departed_by`](super::departed_by)).
    settled: tokio::sync::Notify,
}

/// An agent marked leaving by a hop ([`Departures::leave`]) until this drops.
struct Leaving<'a> {
    departures: &'a Departures,
    agent: String,
    hop: u64,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        let mut leaving = lock(&self.departures.leaving);
        // (Unless the agent came back and leaves again, by a later hop.)
        if leaving.get(&self.agent) == Some(&self.hop) {
            leaving.remove(&self.agent);
        }
        drop(leaving);
        self.departures.settle();
    }
}

impl Departures {
    /// Remembers an envelope this node signed.
    fn signed(&self, hash: [u8; 32]) {
        remember(&self.signed, hash);
    }

    /// Whether this node signed the envelope with this hash (lately).
    pub(in crate::node) fn signed_here(&self, hash: &[u8; 32]) -> bool {
        lock(&self.signed).contains(hash)
    }

    /// Whether this node signed the envelope with this hash (lately): its signature needs no
    /// check.
    pub(in crate::node) fn vouched(&self, hash: &[u8; 32]) -> Vouched {
        Vouched {
            envelope: self.signed_here(hash),
        }
    }

    /// The destination holds the agent this node sent by the envelope with this hash.
    fn hand_over(&self, hash: [u8; 32]) {
        remember(&self.handed_over, hash);
        self.settled.notify_waiters();
    }

    /// Whether this node handed an agent over by the envelope with this hash (lately).
    pub(in crate::node) fn handed_over(&self, hash: &[u8; 32]) -> bool {
        lock(&self.handed_over).contains(hash)
    }

    /// Marks `agent` leaving by hop `hop` until the returned guard drops.
    fn leave(&self, agent: &str, hop: u64) -> Leaving<'_> {
        lock(&self.leaving).insert(agent.to_string(), hop);
        Leaving {
            departures: self,
            agent: agent.to_string(),
            hop,
        }
    }

    /// The hop `agent` is leaving this node by, if it is (the hop may have read its queue
    /// already).
    pub(in crate::node) fn leaving_by(&self, agent: &str) -> Option<u64> {
        lock(&self.leaving).get(agent).copied()
    }

    /// A departure ended, one way or the other: those waiting look again.
    pub(in crate::node) fn settle(&self) {
        self.settled.notify_waiters();
    }

    /// Resolves at the next [`Departures::settle`] or [`Departures::hand_over`], if enabled
    /// before looking (see [`departed_by`](super::departed_by)).
    pub(in crate::node) fn settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.settled.notified()
    }

    /// The departure record of the hop with this envelope hash, while it is being written.
    pub(in crate::node) fn recording(&self, hash: &[u8; 32]) -> Option<DepartureRecorded> {
        lock(&self.recording).get(hash).cloned()
    }
}

/// Adds `hash` to a bounded set (emptied when full: forgetting costs only a signature check).
fn remember(set: &Mutex<HashSet<[u8; 32]>>, hash: [u8; 32]) {
    let mut set = lock(set);
    if set.len() >= SIGNED_REMEMBERED {
        set.clear();
    }
    set.insert(hash);
}

/// The source's side of a completed hop, in one transaction: drop our copy and leave a
/// forwarding pointer (and, on the agent's home node, record where it went) — unless the agent
/// has already come back (a newer arrival replaced the departure record), in which case the
/// record is the new arrival's and stays. The `carried` oldest messages went with the agent;
/// returns the sequence numbers of those that came after the hop read the queue, which stay
/// queued here until they are forwarded (their senders do it: see `routing`).
///
/// (The write waits for the disk. Recovery could redo it, but tried unsynced, it made the next
/// hop slower: redb's next synced commit then writes out what the unsynced one deferred.)
pub(in crate::node) async fn complete_departure(
    shared: &Arc<Shared>,
    id: &str,
    to: &str,
    hop: u64,
    carried: u64,
) -> Result<Vec<u64>, String> {
    let (agent, dest, me) = (
        id.to_string(),
        to.to_string(),
        shared.peers.local_text().to_string(),
    );
    let left_behind = shared
        .store
        .write(move |b| {
            let Some(left) = b.complete_departure_by(&agent, hop, &dest)? else {
                return Ok(Vec::new());
            };
            if left.home == me {
                b.set_location(&agent, &dest)?;
            }
            b.drop_oldest_messages(&agent, carried)
        })
        .await
        .map_err(|e| format!("migrate: {e}"))?;
    shared.mailboxes.forget(id);
    shared.departures.settle();
    Ok(left_behind)
}

/// Brings the custody the agent takes along up to date before it leaves. The home needs none:
/// the envelope it signs is its word. Elsewhere, the home's certificate of this node's custody,
/// if one came while the agent was here, replaces the tail before it; a tail too long to take
/// along is certified first, or the agent stays. `held_by` is the envelope the agent is held by
/// here (none before its first hop), `dest` the key of the node it leaves for.
async fn anchor_custody(
    shared: &Arc<Shared>,
    rec: &mut AgentRecord,
    held_by: Option<&HopEnvelope>,
    dest: &PublicKey,
) -> Result<(), String> {
    if rec.home == shared.peers.local_text() {
        rec.tail.clear();
        return Ok(());
    }
    // The handover of the hop that brought the agent here travels on with it (and stays in its
    // record, should it not leave); back to that hop's source, it is not needed: the source
    // knows its own key (see `own_handover`).
    if rec.handover.is_none() && held_by.is_none_or(|e| e.fields().from != *dest) {
        rec.handover = handover_of(shared, &rec.meta).await;
        shared.handovers.forget(&rec.id);
    }
    let held_by = held_by.map(|e| *e.hash().as_bytes());
    let certificate = match held_by.and_then(|h| shared.confirmed.take(&rec.id, &h)) {
        Some(certificate) => certificate,
        None if rec.tail.len() >= MAX_CUSTODY_TAIL => {
            let home = rec.home.parse::<PeerId>().map_err(|e| {
                format!(
                    "migrate: the agent's home {} is not a peer id: {e}",
                    rec.home
                )
            })?;
            report_location(shared, &rec.meta, home)
                .await
                .map_err(|e| {
                    format!(
                        "migrate: the agent's home has certified none of its last {} hops, and \
                         cannot now ({e}): it stays until its home can be reached",
                        rec.tail.len() + 1
                    )
                })?
        }
        None => return Ok(()),
    };
    rec.certificate = certificate;
    rec.tail.clear();
    Ok(())
}

/// What became of an agent's hop attempt.
pub(in crate::node) enum HopResult {
    /// The agent lives on the destination now.
    Left,
    /// It migrated to this very node: carry on.
    Stayed,
}

/// Moves the agent to `to`, exactly once. On any failure before the destination owns the agent,
/// the agent stays here and `migrate` throws the returned message.
pub(in crate::node) async fn hop(
    shared: &Arc<Shared>,
    rec: &mut AgentRecord,
    stored_checkpoint: usize,
    exec: &Execution,
    loaded: &Loaded,
    to: &str,
) -> Result<HopResult, String> {
    let dest = match shared.peers.resolve(to) {
        Ok(dest) => dest,
        Err(Unresolved::Unknown) => return Err(unknown_node_error(to)),
        Err(Unresolved::Contested(peers)) => {
            let peers: Vec<String> = peers.iter().map(PeerId::to_string).collect();
            return Err(format!(
                "migrate: node name '{to}' is claimed by {}: pin it to one key in [peers]",
                peers.join(" and ")
            ));
        }
    };
    if dest == shared.peers.local() {
        rec.hops += 1;
        return Ok(HopResult::Stayed);
    }
    let dest_key = shared
        .peers
        .key_of(&dest)
        .ok_or_else(|| format!("migrate: {to} has no ed25519 identity"))?;
    let previous = if rec.envelope.is_empty() {
        None
    } else {
        Some(
            HopEnvelope::decode_known(&rec.envelope, |k| shared.peers.known_key(k))
                .map_err(|e| format!("migrate: stored envelope: {e}"))?,
        )
    };
    anchor_custody(shared, rec, previous.as_ref(), &dest_key).await?;
    let started = std::time::Instant::now();
    let expected = exec.encoded_len_hint();
    if expected >= KEEP_CHECKPOINT_FROM {
        crate::memory::before_large_hop();
    }
    let continuation = exec
        .encode_into(Vec::with_capacity(expected))
        .map_err(|e| format!("migrate: {e}"))?;
    let agent_id: AgentId = rec
        .id
        .parse()
        .map_err(|_| "migrate: agent id is not an envelope id".to_string())?;
    let next_hop = previous.as_ref().map_or(FIRST_HOP, |p| p.fields().hop + 1);
    let (envelope, handover) = HopEnvelope::sign_with_handover(
        HopFields {
            agent_id,
            hop: next_hop,
            package_hash: loaded.package.hash(),
            continuation_hash: continuation_hash(&continuation),
            previous: previous.as_ref().map(HopEnvelope::hash),
            from: *shared.peers.local_key(),
            to: dest_key,
            time_ms: now_ms(),
        },
        &shared.key,
    )
    .map_err(|e| format!("migrate: {e}"))?;
    let envelope_hash = *envelope.hash().as_bytes();
    // The handover key is revealed once the destination holds the agent; not to the agent's
    // home, which keeps its custody itself and has no use for it.
    let handover = (rec.home != shared.peers.text_of(&dest)).then_some(HandoverKey(handover));
    shared.departures.signed(envelope_hash);
    let moves = loaded
        .package
        .manifest()
        .resources
        .iter()
        .any(|r| r.policy == ResourcePolicy::Move);
    let tables = if moves {
        moving_resources(shared, &rec.id)?
    } else {
        Vec::new()
    };
    // The messages queued so far travel with the agent; one queued from now on may not (see
    // `routing`).
    let _leaving = shared.departures.leave(&rec.id, next_hop);
    let carried = shared
        .store
        .messages(&rec.id)
        .map_err(|e| format!("migrate: {e}"))?;
    // Durably "leaving for dest at hop h", written while the offer travels and the destination
    // stores the agent as arriving: the destination runs it only after this record is durable
    // (`HopDecision::Commit`, or asked after a crash), so the two commits overlap and a crash
    // at any point leaves one live copy.
    // (The continuation is moved, never copied: it may be 100 MB.)
    let leaving_state = |checkpoint| AgentState::Leaving {
        to: shared.peers.text_of(&dest),
        hop: next_hop,
        carried: carried.len() as u64,
        envelope: envelope_hash,
        checkpoint,
    };
    // A large continuation is not written again while it travels (that write would compete
    // with sending it): the record keeps the agent's last checkpoint, from which it resumes
    // if the hop does not happen. So it does when that checkpoint is large: its bytes are no
    // longer in `rec` to be written back (`release_large_checkpoint`).
    let kept = if continuation.len() >= KEEP_CHECKPOINT_FROM
        || stored_checkpoint >= KEEP_CHECKPOINT_FROM
    {
        match shared.store.agent_meta(&rec.id) {
            Ok(Some(stored)) => Some(AgentMeta {
                state: leaving_state(Some(Box::new(stored.state.clone()))),
                ..stored
            }),
            _ => None,
        }
    } else {
        None
    };
    let leaving = Arc::new(AgentRecord {
        meta: AgentMeta {
            state: leaving_state(None),
            ..rec.meta.clone()
        },
        continuation,
    });
    let recorded: DepartureRecorded = {
        let (store, record, kept) = (shared.store.clone(), leaving.clone(), kept.clone());
        let write = move |b: &mut Batch<'_>| match &kept {
            None => b.put_agent(&record),
            Some(meta) if b.put_agent_meta(meta)? => Ok(()),
            Some(_) => Err(StoreError::Inconsistent {
                table: "agents",
                key: record.id.clone(),
                what: "the departing agent is no longer stored",
            }),
        };
        shared
            .tasks
            .spawn_to_end(async move { store.write(write).await })
            .map(|written| match written {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("cannot record the departure: {e}")),
                Err(e) => Err(format!("cannot record the departure: {e}")),
            })
            .boxed()
            .shared()
    };
    lock(&shared.departures.recording).insert(envelope_hash, recorded.clone());
    let continuation = &leaving.continuation;
    // (Tables follow the continuation on the raw path.)
    let inline = continuation.len() <= INLINE_CONTINUATION && tables.is_empty();
    let dest_text = shared.peers.text_of(&dest);
    let offer = HopOffer {
        envelope: envelope.encode(),
        previous: rec.envelope.clone(),
        previous_handover: rec.handover,
        continuation_len: continuation.len() as u64,
        inline: if inline {
            continuation.clone()
        } else {
            Vec::new()
        },
        hops: rec.hops + 1,
        operations: rec.operations,
        sent: rec.sent,
        prepared_micros: started.elapsed().as_micros() as u64,
        messages: carried
            .iter()
            .cloned()
            .map(serde_bytes::ByteBuf::from)
            .collect(),
        home: rec.home.clone(),
        nonce: rec.nonce,
        certificate: rec.certificate.clone(),
        launcher: rec.launcher.clone(),
        custody: rec.tail.clone(),
        tables_len: tables.len() as u64,
    };
    let sent = SentHop {
        dest,
        agent: &rec.id,
        hop: next_hop,
        envelope: Some(envelope_hash),
    };
    if shared.faults.at(FaultPoint::SourceBeforeOffer) && recorded.clone().await.is_ok() {
        shared.faults.die_at(FaultPoint::SourceBeforeOffer);
    }
    if inline && shared.store.durability() == Durability::NoSync {
        // Without fsync the record costs little: written first, it lets the decision travel
        // with the offer (one message instead of two, and one write at the destination).
        let _ = recorded.clone().await;
    }
    shared.events.emit(NodeEvent::HopOffered {
        agent: rec.id.clone(),
        hop: next_hop,
        to: shared.peers.name_of_peer(&dest),
        bytes: continuation.len(),
    });
    let payload = HopPayload {
        continuation,
        tables: &tables,
    };
    let outcome = send_hop(shared, &sent, &offer, payload, &recorded, handover).await;
    let result = match (outcome, recorded.await) {
        (SendOutcome::Owned, Ok(())) => {
            shared.departures.hand_over(envelope_hash);
            shared.faults.die_at(FaultPoint::SourceAfterAck);
            if shared.faults.at(FaultPoint::SlowDeparture)
                || shared.faults.at(FaultPoint::SourceAfterDeparture)
            {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            shared.events.emit(NodeEvent::HopCommitted {
                agent: rec.id.clone(),
                hop: next_hop,
                to: shared.peers.name_of_peer(&dest),
            });
            let completed =
                complete_departure(shared, &rec.id, &dest_text, next_hop, carried.len() as u64)
                    .await;
            // (What came after the hop read the queue is forwarded by its senders.)
            shared.faults.die_at(FaultPoint::SourceAfterDeparture);
            if let Err(e) = completed {
                // The destination owns the agent: it must not run here again. The departure
                // record stays; recovery (now, or after a restart) completes it.
                tracing::error!(agent = %rec.id, "hop to {to} done, but not recorded here: {e}");
                let record = kept.clone().unwrap_or_else(|| leaving.meta.clone());
                shared
                    .tasks
                    .spawn(recover_departure(shared.clone(), record));
            }
            Ok(HopResult::Left)
        }
        (SendOutcome::Unknown(reason), Ok(())) => {
            // The destination could not even be asked: keep the departure record; recovery
            // settles it when the destination answers.
            tracing::warn!(agent = %rec.id, "hop to {to} unsettled: {reason}");
            let record = kept.clone().unwrap_or_else(|| leaving.meta.clone());
            shared
                .tasks
                .spawn(recover_departure(shared.clone(), record));
            Ok(HopResult::Left)
        }
        // The destination does not hold the agent, or holds it only as arriving and hears
        // that the hop did not commit (the departure record is not there): it stays here.
        (SendOutcome::NotTaken(reason), _) => {
            stay(shared, rec, kept.is_some());
            Err(format!("migrate: cannot move to {to}: {reason}"))
        }
        (_, Err(e)) => {
            stay(shared, rec, kept.is_some());
            Err(format!("migrate: {e}"))
        }
    };
    if let Err(reason) = &result {
        shared.events.emit(NodeEvent::HopFailed {
            agent: rec.id.clone(),
            to: to.to_string(),
            reason: reason.clone(),
        });
    }
    // Only now: until the store says how the hop ended, a destination asking about it must
    // wait for the record.
    lock(&shared.departures.recording).remove(&envelope_hash);
    shared.departures.settle();
    if continuation.len() >= KEEP_CHECKPOINT_FROM {
        crate::memory::after_large_hop();
    }
    result
}

/// The resources agent `agent` holds here (bound by `move`), which go with it, encoded
/// ([`MovedResources`]; empty if none): refused, and the agent stays, when they are more than
/// one hop carries. A table's entries are counted first, then written as they are read.
fn moving_resources(shared: &Shared, agent: &str) -> Result<Vec<u8>, String> {
    let failed = |e: &dyn std::fmt::Display| format!("migrate: {e}");
    let held = shared.store.moved_with(agent).map_err(|e| failed(&e))?;
    if held.is_empty() {
        return Ok(Vec::new());
    }
    if held.len() > MAX_MOVED_RESOURCES {
        return Err(format!(
            "migrate: the agent holds {} resources bound by move, and at most \
             {MAX_MOVED_RESOURCES} move with one hop",
            held.len()
        ));
    }
    let mut moving: Vec<(&str, MovingContents<'_>)> = Vec::with_capacity(held.len());
    let mut size = 0usize;
    for (name, held) in &held {
        let contents = match held {
            HeldResource::Value(value) => {
                size += value.len();
                MovingContents::Value(value)
            }
            HeldResource::Dataset(_) => {
                let files = shared
                    .store
                    .moved_dataset_files(name)
                    .map_err(|e| failed(&e))?;
                size += files.iter().map(|f| f.len() + 9).sum::<usize>();
                MovingContents::Dataset(files)
            }
            HeldResource::Table => {
                let table = StoredTable::count(&shared.store, name).map_err(|e| failed(&e))?;
                if table.len > MAX_MOVED_ENTRIES {
                    return Err(format!(
                        "migrate: table '{name}' holds {} entries, and a table moves with at \
                         most {MAX_MOVED_ENTRIES}",
                        table.len
                    ));
                }
                size += table.bytes;
                MovingContents::Table(Box::new(table))
            }
        };
        size += name.len() + 32;
        moving.push((name, contents));
    }
    let too_large = |bytes: usize| {
        format!(
            "migrate: the resources bound by move take {bytes} bytes, more than the \
             {MAX_MOVED_BYTES} that move with one hop"
        )
    };
    // (`size` counts at most a few bytes an entry more than their encoding takes, far less
    // than an eighth of the limit: past this, the encoding would not fit either.)
    if size > MAX_MOVED_BYTES + MAX_MOVED_BYTES / 8 {
        return Err(too_large(size));
    }
    let bytes = MovedResources::encode_from(&moving, size).map_err(|e| failed(&e))?;
    if bytes.len() > MAX_MOVED_BYTES {
        return Err(too_large(bytes.len()));
    }
    Ok(bytes)
}

/// A table an agent holds, as its hop sends it: read from the store as it is written (it is
/// the agent's alone, and the agent is not running).
struct StoredTable<'a> {
    store: &'a Store,
    name: &'a str,
    /// Its entries.
    len: usize,
    /// About how many bytes they take encoded.
    bytes: usize,
}

impl<'a> StoredTable<'a> {
    /// Table `name`, its entries counted.
    fn count(store: &'a Store, name: &'a str) -> Result<StoredTable<'a>, StoreError> {
        let (mut len, mut bytes) = (0, 0);
        store.table_each(name, |key, value| {
            len += 1;
            bytes += key.len() + value.len() + 19;
            true
        })?;
        Ok(StoredTable {
            store,
            name,
            len,
            bytes,
        })
    }
}

impl TableEntriesSource for StoredTable<'_> {
    fn count(&self) -> usize {
        self.len
    }

    fn each(&self, each: &mut dyn FnMut(&str, &[u8])) -> Result<(), String> {
        self.store
            .table_each(self.name, |key, value| {
                each(key, value);
                true
            })
            .map_err(|e| e.to_string())
    }
}

/// From this size on, a departure record keeps the agent's last checkpoint rather than its
/// continuation at `migrate` (see `AgentState::Leaving`): writing it again would cost as much as
/// sending it. So a crash of the source during such a hop that does not go through resumes the
/// agent from that checkpoint (as a crash between checkpoints does), not at `migrate`.
pub(in crate::node) const KEEP_CHECKPOINT_FROM: usize = 1 << 20;

/// Lets go of the bytes of the agent's stored checkpoint once they are decoded, when they are
/// large (at least [`KEEP_CHECKPOINT_FROM`]); gives their length. The running agent's values
/// hold the same state, and keeping the bytes too would hold one more copy of it for as long
/// as the agent runs or waits here. Small ones are kept: [`stay`] writes them back after a hop
/// that did not happen, while a departure leaves a large one in the store and writes the
/// metadata only (see [`hop`]).
pub(in crate::node) fn release_large_checkpoint(rec: &mut AgentRecord) -> usize {
    let stored = rec.continuation.len();
    if stored >= KEEP_CHECKPOINT_FROM {
        rec.continuation = Vec::new();
    }
    stored
}

/// BLAKE3 of a continuation: a large one hashed on every core (while it is hashed, the hop
/// waits and nothing else of it runs).
pub(in crate::node) fn continuation_hash(continuation: &[u8]) -> [u8; 32] {
    if continuation.len() < 1 << 20 {
        return *blake3::hash(continuation).as_bytes();
    }
    *blake3::Hasher::new()
        .update_rayon(continuation)
        .finalize()
        .as_bytes()
}

/// A hop that did not happen: the agent's record goes back to what it was before (only its
/// metadata, when the departure record kept its continuation).
pub(in crate::node) fn stay(shared: &Shared, rec: &AgentRecord, continuation_kept: bool) {
    let restored = if continuation_kept {
        shared
            .store
            .batch(|b| b.put_agent_meta(&rec.meta))
            .map(drop)
    } else {
        shared.store.batch(|b| b.put_agent(rec))
    };
    if let Err(e) = restored {
        tracing::error!(agent = %rec.id, "cannot restore the agent after a failed hop: {e}");
    }
}

/// The source's departure record being written (see `hop`): `Ok` once it is durable.
pub(in crate::node) type DepartureRecorded = SharedFuture<BoxFuture<'static, Result<(), String>>>;

pub(in crate::node) enum SendOutcome {
    /// The destination acknowledged (or already had it).
    Owned,
    /// The destination did not take the agent.
    NotTaken(String),
    /// The continuation may have arrived, and the destination could not be asked.
    Unknown(String),
}

/// The hop being sent, as the destination knows it.
pub(in crate::node) struct SentHop<'a> {
    pub(in crate::node) dest: PeerId,
    pub(in crate::node) agent: &'a str,
    pub(in crate::node) hop: u64,
    /// BLAKE3 of its envelope (None when settling a departure found in the store).
    pub(in crate::node) envelope: Option<[u8; 32]>,
}

/// The raw bytes of a hop: the continuation, then the resources that move with the agent
/// ([`MovedResources`], empty if none). Both follow `HopReply::Ready` unless the continuation is
/// inline (then none move).
#[derive(Clone, Copy)]
pub(in crate::node) struct HopPayload<'a> {
    pub(in crate::node) continuation: &'a [u8],
    pub(in crate::node) tables: &'a [u8],
}

/// How one attempt to send a hop over a stream ended.
pub(in crate::node) enum HopExchange {
    /// The destination answered; `reusable`: the stream is fit for the next exchange.
    Answered(SendOutcome, bool),
    /// Nothing of the agent reached the destination.
    NotSent(String),
    /// The agent may have reached it.
    Unknown(String),
}

pub(in crate::node) async fn send_hop(
    shared: &Shared,
    sent: &SentHop<'_>,
    offer: &HopOffer,
    payload: HopPayload<'_>,
    recorded: &DepartureRecorded,
    handover: Option<HandoverKey>,
) -> SendOutcome {
    // Attempts are retried: a destination drops new streams past what it queues for one peer,
    // and a reused stream may have died with its connection. Resending the
    // same offer is safe (the destination stores it once); giving up is only safe once the
    // destination has shut out every copy that may still be on its way.
    let mut attempt = 0u64;
    let mut maybe_delivered = false;
    loop {
        attempt += 1;
        let failure = match shared.open_stream(sent.dest, HOP_PROTOCOL).await {
            Err(e) => format!("unreachable ({e})"),
            Ok(mut s) => {
                let reused = s.reused;
                match hop_exchange(shared, &mut s, offer, payload, recorded, handover).await {
                    HopExchange::Answered(outcome, reusable) => {
                        if reusable {
                            shared.outbound.put(sent.dest, HOP_PROTOCOL, s.stream);
                        }
                        return outcome;
                    }
                    HopExchange::NotSent(e) if reused => {
                        // Most likely the connection closed under an idle stream: afresh.
                        attempt -= 1;
                        e
                    }
                    HopExchange::NotSent(e) => e,
                    // The stream broke after the offer went out: ask, then try again.
                    HopExchange::Unknown(e) => {
                        maybe_delivered = true;
                        match resolve_departure(shared, sent, false).await {
                            Some(true) => return SendOutcome::Owned,
                            Some(false) => e,
                            None => return SendOutcome::Unknown(e),
                        }
                    }
                }
            }
        };
        if attempt >= 6 {
            if !maybe_delivered {
                return SendOutcome::NotTaken(failure);
            }
            return match resolve_departure(shared, sent, true).await {
                Some(true) => SendOutcome::Owned,
                Some(false) => SendOutcome::NotTaken(failure),
                None => SendOutcome::Unknown(failure),
            };
        }
        tokio::time::sleep(Duration::from_millis(10 * attempt * attempt)).await;
    }
}

/// One attempt at a hop on one stream: the offer (with the continuation inline when it is
/// small, else Ready and the raw continuation), the source's decision once its departure record
/// is written, then the destination's answer; if it holds the agent, this node's `handover` key
/// (none to the agent's home).
async fn hop_exchange(
    shared: &Shared,
    s: &mut PeerStream,
    offer: &HopOffer,
    payload: HopPayload<'_>,
    recorded: &DepartureRecorded,
    handover: Option<HandoverKey>,
) -> HopExchange {
    let exchange = offer_and_decide(shared, s, offer, payload, recorded).await;
    if let (HopExchange::Answered(SendOutcome::Owned, true), Some(handover)) = (&exchange, handover)
    {
        if write_frame(&mut s.stream, &HopHandover(handover))
            .await
            .is_err()
        {
            // (The destination asks for it: `ControlRequest::Departed`.)
            return HopExchange::Answered(SendOutcome::Owned, false);
        }
    }
    exchange
}

/// [`hop_exchange`] up to the destination's answer.
async fn offer_and_decide(
    shared: &Shared,
    s: &mut PeerStream,
    offer: &HopOffer,
    payload: HopPayload<'_>,
    recorded: &DepartureRecorded,
) -> HopExchange {
    let stream = &mut s.stream;
    let answered = |reply| match reply {
        HopReply::Stored | HopReply::Duplicate => HopExchange::Answered(SendOutcome::Owned, true),
        HopReply::Refused(r) => {
            HopExchange::Answered(SendOutcome::NotTaken(format!("refused: {r}")), true)
        }
        HopReply::Ready => HopExchange::Answered(
            SendOutcome::NotTaken("protocol error: Ready out of turn".into()),
            false,
        ),
    };
    if !offer.inline.is_empty() && matches!(recorded.peek(), Some(Ok(()))) {
        // The departure record is written already (see `hop`): the offer and the decision to
        // commit go out together, and the destination stores the agent runnable at once.
        shared.faults.die_at(FaultPoint::SourceAfterLeaving);
        let mut frames = Vec::with_capacity(offer.inline.len() + 1024);
        let pushed = push_frame(&mut frames, offer)
            .and_then(|()| push_frame(&mut frames, &HopDecision::Commit));
        if let Err(e) = pushed {
            return HopExchange::NotSent(e.to_string());
        }
        if let Err(e) = write_frames(stream, &frames).await {
            return HopExchange::Unknown(e.to_string());
        }
        let reply = read_frame::<_, HopReply>(stream, MAX_FRAME).await;
        s.opening = None;
        return match reply {
            Ok(reply) => answered(reply),
            Err(e) => HopExchange::Unknown(e.to_string()),
        };
    }
    if let Err(e) = write_frame(stream, offer).await {
        // An inline offer may have arrived whole, a raw one cannot have.
        return if offer.inline.is_empty() {
            HopExchange::NotSent(e.to_string())
        } else {
            HopExchange::Unknown(e.to_string())
        };
    }
    if offer.inline.is_empty() {
        let reply = read_frame::<_, HopReply>(stream, MAX_FRAME).await;
        // Answered (or not at all): the next new stream to this peer may be opened.
        s.opening = None;
        match reply {
            Err(e) => return HopExchange::NotSent(e.to_string()),
            Ok(HopReply::Ready) => {}
            Ok(reply) => return answered(reply),
        }
        // Until the bytes are all out, the destination holds nothing.
        for bytes in [payload.continuation, payload.tables] {
            if bytes.is_empty() {
                continue;
            }
            if let Err(e) = write_bulk(stream, bytes).await {
                return HopExchange::NotSent(e.to_string());
            }
        }
    }
    let decision = match recorded.clone().await {
        Ok(()) => {
            shared.faults.die_at(FaultPoint::SourceAfterLeaving);
            HopDecision::Commit
        }
        Err(e) => HopDecision::Abort(e),
    };
    if let Err(e) = write_frame(stream, &decision).await {
        return match decision {
            HopDecision::Commit => HopExchange::Unknown(e.to_string()),
            HopDecision::Abort(why) => HopExchange::Answered(SendOutcome::NotTaken(why), false),
        };
    }
    let reply = read_frame::<_, HopReply>(stream, MAX_FRAME).await;
    s.opening = None;
    match (reply, decision) {
        (Ok(reply), HopDecision::Abort(why)) => match answered(reply) {
            HopExchange::Answered(_, reusable) => {
                HopExchange::Answered(SendOutcome::NotTaken(why), reusable)
            }
            other => other,
        },
        (Ok(reply), HopDecision::Commit) => answered(reply),
        (Err(_), HopDecision::Abort(why)) => {
            HopExchange::Answered(SendOutcome::NotTaken(why), false)
        }
        (Err(e), HopDecision::Commit) => HopExchange::Unknown(e.to_string()),
    }
}
