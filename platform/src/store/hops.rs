//! Both sides of a hop, made exactly once: the destination accepts an arrival once per hop
//! (`seen`) and runs it once its source says the hop committed; the source deletes the agent
//! once the destination holds it, leaving a forwarding pointer (`forwards`) and the hop it left
//! by (`departed`) for a destination that asks after a crash.

use redb::{ReadableTable, ReadableTableMetadata};

use security::{CustodyPoint, PublicKey};

use super::directory::custody_in;
use super::records::get_meta;
use super::schema::{AGENTS, CUSTODY, DEPARTED, FORWARDS, SEEN};
use super::{AgentMeta, AgentRecord, AgentState, Batch, Store, StoreError};

/// What an offered hop is checked against, read in one transaction
/// ([`Store::arrival_view`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivalView {
    /// The agent's metadata, if it is stored here.
    pub here: Option<AgentMeta>,
    /// What this node accepted of the hop.
    pub seen: HopSeen,
    /// How many agents are stored here.
    pub resident: u64,
    /// The custody of the agent this node confirmed as its home ([`Store::custody`]).
    pub custody: Option<CustodyPoint>,
}

/// What a node knows of an offered hop (agent, hop) by envelope hash: see
/// [`Store::arrival_view`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HopSeen {
    /// Neither that hop nor a later one was accepted here.
    No,
    /// That hop was accepted here by this very envelope (or by one whose hash was not kept:
    /// hops accepted before schema 4).
    ByThisEnvelope,
    /// That hop was accepted here by another envelope: a conflicting claim on it.
    ByAnotherEnvelope,
    /// A later hop of the agent was accepted here: as an offer, a conflict (its honest source
    /// never offers a hop again once it committed); as a recovering source's question, held
    /// (see [`Store::has_seen`]).
    Later,
}

impl HopSeen {
    /// Whether this node took the hop (as far as it can tell: see [`HopSeen::Later`]).
    pub fn is_duplicate(self) -> bool {
        matches!(self, HopSeen::ByThisEnvelope | HopSeen::Later)
    }
}

/// What [`Batch::accept_arrival`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a duplicate arrival must not be run"]
pub enum Arrival {
    /// The agent is stored: acknowledge the hop and run it.
    New,
    /// This hop by the same envelope was already accepted here; nothing was written.
    /// Acknowledge without running it again.
    Duplicate,
    /// This hop was accepted here by another envelope, or a later hop was; nothing was
    /// written. Refuse it: only one claim on a hop can be the agent's.
    Conflict,
}

impl Store {
    /// Whether this node accepted hop `hop` of agent `id` (by envelope hash `envelope`, if
    /// given), or a later one (answers a source recovering from a crash in the middle of that
    /// hop).
    ///
    /// A later one answers too because only the last committed hop of an agent is remembered
    /// (with any later one still arriving): the table stays one entry per agent instead of
    /// growing with every hop. That is the answer the source needs: it asks about hop `hop` only
    /// while its durable departure record says it offered that hop here, and then the agent can
    /// have gone past `hop` only if this node took it.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn has_seen(
        &self,
        id: &str,
        hop: u64,
        envelope: Option<&[u8; 32]>,
    ) -> Result<bool, StoreError> {
        self.read(|txn| holds(&txn.open_table(SEEN)?, id, hop, envelope))
    }

    /// The hops of agent `id` this node remembers accepting, oldest first (diagnostics: see
    /// [`Store::has_seen`] for which are kept).
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn remembered_hops(&self, id: &str) -> Result<Vec<u64>, StoreError> {
        self.read(|txn| {
            let seen = txn.open_table(SEEN)?;
            let mut hops = Vec::new();
            for entry in seen.range((id, 0)..=(id, u64::MAX))? {
                hops.push(entry?.0.value().1);
            }
            Ok(hops)
        })
    }

    /// What an offer of hop `hop` of agent `id` by envelope hash `envelope` is checked against,
    /// from one snapshot ([`ArrivalView`]). A holder's key in the custody record that `known`
    /// returns for its bytes is taken as it is (as [`Store::custody`]).
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, [`StoreError::Inconsistent`] if
    /// the custody record holds no valid key, or when the read fails.
    pub fn arrival_view(
        &self,
        id: &str,
        hop: u64,
        envelope: &[u8; 32],
        known: impl Fn(&[u8; 32]) -> Option<PublicKey>,
    ) -> Result<ArrivalView, StoreError> {
        self.read(|txn| {
            let agents = txn.open_table(AGENTS)?;
            Ok(ArrivalView {
                here: get_meta(&agents, id)?,
                seen: seen_from(&txn.open_table(SEEN)?, id, hop, envelope)?,
                resident: agents.len()?,
                custody: custody_in(&txn.open_table(CUSTODY)?, id, known)?,
            })
        })
    }

    /// BLAKE3 of the envelope of the hop agent `id` last left this node by, if it ever did.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn departed(&self, id: &str) -> Result<Option<[u8; 32]>, StoreError> {
        self.read(|txn| Ok(txn.open_table(DEPARTED)?.get(id)?.map(|v| v.value())))
    }

    /// Where agent `id` went from here, if it left.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn forward(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.read(|txn| {
            Ok(txn
                .open_table(FORWARDS)?
                .get(id)?
                .map(|v| v.value().to_owned()))
        })
    }

    /// Every forwarding pointer, as (agent id, destination), ordered by id.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn forwards(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.read(|txn| {
            let t = txn.open_table(FORWARDS)?;
            t.iter()?
                .map(|entry| {
                    let (k, v) = entry?;
                    Ok((k.value().to_owned(), v.value().to_owned()))
                })
                .collect()
        })
    }
}

impl Batch<'_> {
    /// [`Store::has_seen`] inside a write: ordered with every other write, so that an arrival
    /// stored before it is seen and one stored after it is not.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn has_seen(
        &mut self,
        id: &str,
        hop: u64,
        envelope: Option<&[u8; 32]>,
    ) -> Result<bool, StoreError> {
        holds(&self.txn.open_table(SEEN)?, id, hop, envelope)
    }

    /// The destination side of a hop: if this node already accepted hop `rec.hop` of agent
    /// `rec.id` by the same envelope, returns [`Arrival::Duplicate`], and if by another, or a
    /// later hop (an honest source does not offer a hop again once it committed),
    /// [`Arrival::Conflict`]; either way it writes nothing. Otherwise stores the agent, remembers
    /// (`rec.id`, `rec.hop`) as seen (forgetting the agent's older hops if it arrives runnable:
    /// see [`Store::has_seen`]), drops any forwarding pointer for the agent (it lives here
    /// again) and returns [`Arrival::New`].
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn accept_arrival(&mut self, rec: &AgentRecord) -> Result<Arrival, StoreError> {
        let id = rec.id.as_str();
        let envelope = *blake3::hash(&rec.envelope).as_bytes();
        let mut seen = self.txn.open_table(SEEN)?;
        match seen_from(&seen, id, rec.hop, &envelope)? {
            HopSeen::No => {}
            HopSeen::ByAnotherEnvelope | HopSeen::Later => return Ok(Arrival::Conflict),
            HopSeen::ByThisEnvelope => return Ok(Arrival::Duplicate),
        }
        seen.insert((id, rec.hop), envelope)?;
        if rec.state == AgentState::Ready {
            forget_hops_before(&mut seen, id, rec.hop)?;
        }
        drop(seen);
        self.put_agent(rec)?;
        self.txn.open_table(FORWARDS)?.remove(id)?;
        Ok(Arrival::New)
    }

    /// The source side of a hop once the destination acknowledged it: deletes the agent and
    /// records the forwarding pointer `id -> to` (and, if its record was
    /// [`AgentState::Leaving`], the hop's envelope hash as [`Store::departed`]). Messages queued
    /// for the agent stay queued; take them in the same batch to forward them.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn complete_departure(&mut self, id: &str, to: &str) -> Result<(), StoreError> {
        let meta = self.agent_meta(id)?;
        self.depart(id, meta.as_ref(), to)
    }

    /// [`Batch::complete_departure`] of hop `hop` only: if agent `id` is stored as
    /// [`AgentState::Leaving`] by that hop, completes its departure and returns its metadata as
    /// it was; otherwise writes nothing and returns None.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn complete_departure_by(
        &mut self,
        id: &str,
        hop: u64,
        to: &str,
    ) -> Result<Option<AgentMeta>, StoreError> {
        let meta = self.agent_meta(id)?;
        match &meta {
            Some(AgentMeta {
                state: AgentState::Leaving { hop: leaving, .. },
                ..
            }) if *leaving == hop => {
                self.depart(id, meta.as_ref(), to)?;
                Ok(meta)
            }
            _ => Ok(None),
        }
    }

    /// Deletes agent `id`, whose metadata this transaction read as `meta`, leaving a forwarding
    /// pointer to `to` (and the envelope hash of its departure, if it was leaving).
    fn depart(&mut self, id: &str, meta: Option<&AgentMeta>, to: &str) -> Result<(), StoreError> {
        let departure = match meta {
            Some(AgentMeta {
                state: AgentState::Leaving { envelope, .. },
                ..
            }) => Some(envelope),
            _ => None,
        };
        self.left(id, departure, to)?;
        self.delete_agent(id)?;
        self.txn.open_table(FORWARDS)?.insert(id, to)?;
        Ok(())
    }

    /// What goes of agent `id` here when it leaves for `to` (by the hop with envelope hash
    /// `departure`, if known), besides its record: its copy-on-reference chunks, the tables it
    /// takes along.
    fn left(&mut self, id: &str, departure: Option<&[u8; 32]>, to: &str) -> Result<(), StoreError> {
        if let Some(envelope) = departure {
            self.txn.open_table(DEPARTED)?.insert(id, envelope)?;
        }
        self.drop_cached_chunks(id)?;
        self.depart_moved(id, to)
    }

    /// Agent `id`, stored here as [`AgentState::Leaving`] for `to` by the hop with envelope hash
    /// `departure`, comes back from `to` by the hop that follows it, before this node completed
    /// that departure (a write of its own, which then finds the new arrival and does nothing):
    /// completes it in the transaction that stores the arrival, after
    /// [`Batch::accept_arrival`], before the arrival's tables and messages. The `carried` oldest
    /// messages queued here went with the agent (and come back in the offer, if it did not
    /// receive them): they go. Those that came here while it was away stay queued for it,
    /// before the offer's.
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn complete_return(
        &mut self,
        id: &str,
        departure: &[u8; 32],
        to: &str,
        carried: u64,
    ) -> Result<(), StoreError> {
        self.left(id, Some(departure), to)?;
        self.drop_oldest_messages(id, carried).map(drop)
    }

    /// The hop with envelope hash `envelope` committed: agent `id`, stored by it as
    /// [`AgentState::Arriving`], becomes [`AgentState::Ready`], and any forwarding pointer of
    /// the agent goes (it lives here again). Returns its metadata as now stored, or None,
    /// having written nothing, if the agent is not stored as arriving by that hop.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn commit_arrival(
        &mut self,
        id: &str,
        envelope: &[u8; 32],
    ) -> Result<Option<AgentMeta>, StoreError> {
        match self.agent_meta(id)? {
            Some(meta) if meta.arriving_by(envelope) => {
                let ready = AgentMeta {
                    state: AgentState::Ready,
                    ..meta
                };
                self.put_agent_meta(&ready)?;
                self.commit_arriving_moved(id)?;
                self.txn.open_table(FORWARDS)?.remove(id)?;
                forget_hops_before(&mut self.txn.open_table(SEEN)?, id, ready.hop)?;
                Ok(Some(ready))
            }
            _ => Ok(None),
        }
    }

    /// The hop with envelope hash `envelope` did not commit: agent `id`, stored by it as
    /// [`AgentState::Arriving`], is dropped with the messages that came with it, and its hop is
    /// forgotten (so that a later offer of that hop number is not taken for a duplicate). The
    /// messages queued for the agent since it arrived stay queued, left behind; returns their
    /// sequence numbers (to forward them), or None, having written nothing, if the agent is not
    /// stored as arriving by that hop.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn abort_arrival(
        &mut self,
        id: &str,
        envelope: &[u8; 32],
    ) -> Result<Option<Vec<u64>>, StoreError> {
        let meta = match self.agent_meta(id)? {
            Some(meta) if meta.arriving_by(envelope) => meta,
            _ => return Ok(None),
        };
        let AgentState::Arriving { carried, .. } = meta.state else {
            return Ok(None);
        };
        self.delete_agent(id)?;
        self.abort_arriving_moved(id)?;
        self.drop_cached_chunks(id)?;
        self.txn.open_table(SEEN)?.remove((id, meta.hop))?;
        self.drop_oldest_messages(id, carried).map(Some)
    }
}

/// What `seen` holds of hop `hop` of agent `id`, compared with envelope hash `envelope`.
/// [`Store::has_seen`] on the `seen` table.
fn holds(
    seen: &impl ReadableTable<(&'static str, u64), [u8; 32]>,
    id: &str,
    hop: u64,
    envelope: Option<&[u8; 32]>,
) -> Result<bool, StoreError> {
    let seen = seen_from(seen, id, hop, envelope.unwrap_or(&[0; 32]))?;
    Ok(match envelope {
        Some(_) => seen.is_duplicate(),
        None => seen != HopSeen::No,
    })
}

fn seen_from(
    seen: &impl ReadableTable<(&'static str, u64), [u8; 32]>,
    id: &str,
    hop: u64,
    envelope: &[u8; 32],
) -> Result<HopSeen, StoreError> {
    let Some(entry) = seen.range((id, hop)..=(id, u64::MAX))?.next().transpose()? else {
        return Ok(HopSeen::No);
    };
    let (key, by) = entry;
    Ok(if key.value().1 > hop {
        HopSeen::Later
    } else if by.value() == *envelope || by.value() == [0; 32] {
        HopSeen::ByThisEnvelope
    } else {
        HopSeen::ByAnotherEnvelope
    })
}

/// Hop `hop` of agent `id` committed here: the hops it accepted before need no remembering
/// (see [`Store::has_seen`]).
fn forget_hops_before(
    seen: &mut redb::Table<'_, (&'static str, u64), [u8; 32]>,
    id: &str,
    hop: u64,
) -> Result<(), StoreError> {
    seen.retain_in((id, 0)..(id, hop), |_, _| false)?;
    Ok(())
}
