//! Agent records: what a node keeps of each agent resident on it ([`AgentRecord`], its metadata
//! [`AgentMeta`] and its state [`AgentState`]), and how an `agents` value encodes them.
//!
//! An agent's continuation may be 100 MB or more, and most of what reads or writes its record
//! does not need it; so an `agents` value is one tag byte, saying where the continuation is,
//! then the CBOR [`AgentMeta`]:
//!
//! - tag 0: the continuation is shorter than 4 KiB (or empty) and is in the CBOR, as a
//!   `continuation` byte string after the metadata fields: one table, one value, as cheap as a
//!   record without a continuation;
//! - tag 1: the continuation is 4 KiB or longer and is in `continuation_chunks` (see `chunks`).
//!
//! [`Batch::put_agent`] and [`Batch::delete_agent`] write and remove both parts in the same
//! transaction, so they are stored and dropped together. Whatever needs only the metadata
//! ([`Store::agent_meta`], [`Store::agent_metas`], [`Batch::agent_meta`]) never touches a large
//! continuation, and [`Batch::put_agent_meta`] changes the metadata without rewriting the
//! continuation.

use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};

use super::chunks::{insert_chunks, read_chunks, remove_chunks, LARGE};
use super::error::decode_cbor;
use super::schema::{AGENTS, CHUNKS};
use super::{Batch, Store, StoreError};
use crate::wire::{CustodyLink, HandoverKey, MessagesSent};

/// An agent resident on this node, as a restart finds it: its metadata and its continuation.
/// The metadata's fields read through the record (`rec.id` is `rec.meta.id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRecord {
    /// Everything but the continuation.
    pub meta: AgentMeta,
    /// The encoded continuation; empty when the agent has not started yet.
    pub continuation: Vec<u8>,
}

impl std::ops::Deref for AgentRecord {
    type Target = AgentMeta;

    fn deref(&self) -> &AgentMeta {
        &self.meta
    }
}

impl std::ops::DerefMut for AgentRecord {
    fn deref_mut(&mut self) -> &mut AgentMeta {
        &mut self.meta
    }
}

impl AgentRecord {
    /// The record made of `meta` and `continuation` (moved, not copied).
    pub fn from_parts(meta: AgentMeta, continuation: Vec<u8>) -> AgentRecord {
        AgentRecord { meta, continuation }
    }

    /// Decodes `bytes` as an `agents` value with the store's own decoders: the metadata alone
    /// (as [`Store::agent_meta`] reads it) and the whole record (as [`Store::agent`] reads it;
    /// `None` for a continuation kept in chunks). It exists for fuzzing (`fuzz/`, target
    /// `store_record`), which needs the decoders without a database; the node never calls it.
    #[doc(hidden)]
    #[allow(clippy::type_complexity)]
    pub fn decode_agent_value(
        bytes: &[u8],
    ) -> (
        Result<AgentMeta, StoreError>,
        Result<(AgentMeta, Option<Vec<u8>>), StoreError>,
    ) {
        (decode_meta("", bytes), decode_agent("", bytes))
    }
}

/// An agent's record without its continuation: what status listings, duplicate checks and
/// state changes need, read without touching the continuation (which may be 100 MB).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMeta {
    /// The agent's id, unique in the mesh.
    pub id: String,
    /// Hash of the agent's package (its code), a key of the `packages` table.
    #[serde(with = "serde_bytes")]
    pub package: [u8; 32],
    /// Number of the hop envelope that brought the agent here (0 on its home node before its
    /// first hop): the custody sequence duplicates are detected by.
    pub hop: u64,
    /// Hops the agent has made, as `hops()` reports them (a `migrate` to the node it is on
    /// counts, but needs no envelope).
    #[serde(default)]
    pub hops: u64,
    /// Operations the agent has run in all, every slice on every node: what its lifetime
    /// budget (`Limits::max_total_operations`) is counted against.
    #[serde(default)]
    pub operations: u64,
    /// Messages the agent has sent in all, every node: what its message budgets are counted
    /// against.
    #[serde(default)]
    pub sent: MessagesSent,
    /// The agent's home node (peer id text), which tracks where it is.
    pub home: String,
    /// Who to send the result to (peer id text), if anyone.
    pub launcher: Option<String>,
    /// What to do with the agent after a restart.
    pub state: AgentState,
    /// The envelope of the hop that brought the agent here; empty on its home node.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// The source's handover signature of the hop by `envelope`, once this node has it (none
    /// on the home node before the agent's first hop): with `envelope`, the last link of the
    /// agent's custody here.
    #[serde(default)]
    pub handover: Option<HandoverKey>,
    /// The hops before `envelope` that the home node may not have certified yet, oldest first
    /// (the custody tail: see `security::follow_custody`); at most
    /// [`MAX_CUSTODY_TAIL`](crate::wire::MAX_CUSTODY_TAIL) + 1. (Records before custody links
    /// had a `custody` list of envelopes instead, which is ignored.)
    #[serde(default)]
    pub tail: Vec<CustodyLink>,
    /// The nonce the agent's home derived its id with (`security::AgentId::launched`): with
    /// `home`, it shows whose agent this is.
    #[serde(default, with = "serde_bytes")]
    pub nonce: [u8; 16],
    /// The home's latest certificate of the agent's custody that came here
    /// (`security::CustodyCertificate`), from which `custody` leads on; empty if none came
    /// (custody then leads on from the launch).
    #[serde(default, with = "serde_bytes")]
    pub certificate: Vec<u8>,
}

impl AgentMeta {
    /// Whether the agent is stored as arriving by the hop with this envelope hash.
    pub fn arriving_by(&self, hash: &[u8; 32]) -> bool {
        matches!(&self.state, AgentState::Arriving { envelope, .. } if envelope == hash)
    }
}

/// The CBOR of an `agents` value, borrowed from an [`AgentRecord`] or an [`AgentMeta`] to be
/// encoded without copying; decodes as a [`StoredAgent`], or as an [`AgentMeta`] (same field
/// names, the continuation ignored).
#[derive(Serialize)]
struct MetaRef<'a> {
    id: &'a str,
    #[serde(with = "serde_bytes")]
    package: &'a [u8; 32],
    hop: u64,
    hops: u64,
    operations: u64,
    sent: MessagesSent,
    home: &'a str,
    launcher: Option<&'a str>,
    state: &'a AgentState,
    #[serde(with = "serde_bytes")]
    envelope: &'a [u8],
    handover: Option<&'a HandoverKey>,
    tail: &'a [CustodyLink],
    #[serde(with = "serde_bytes")]
    nonce: &'a [u8; 16],
    #[serde(with = "serde_bytes")]
    certificate: &'a [u8],
    /// The continuation when it is inline.
    #[serde(with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    continuation: Option<&'a [u8]>,
}

impl<'a> MetaRef<'a> {
    fn new(m: &'a AgentMeta, continuation: Option<&'a [u8]>) -> Self {
        MetaRef {
            id: &m.id,
            package: &m.package,
            hop: m.hop,
            hops: m.hops,
            operations: m.operations,
            sent: m.sent,
            home: &m.home,
            launcher: m.launcher.as_deref(),
            state: &m.state,
            envelope: &m.envelope,
            handover: m.handover.as_ref(),
            tail: &m.tail,
            nonce: &m.nonce,
            certificate: &m.certificate,
            continuation,
        }
    }

    fn of_record(r: &'a AgentRecord, continuation: Option<&'a [u8]>) -> Self {
        MetaRef {
            id: &r.id,
            package: &r.package,
            hop: r.hop,
            hops: r.hops,
            operations: r.operations,
            sent: r.sent,
            home: &r.home,
            launcher: r.launcher.as_deref(),
            state: &r.state,
            envelope: &r.envelope,
            handover: r.handover.as_ref(),
            tail: &r.tail,
            nonce: &r.nonce,
            certificate: &r.certificate,
            continuation,
        }
    }
}

/// The CBOR of an `agents` value, decoded whole.
#[derive(Deserialize)]
struct StoredAgent {
    id: String,
    #[serde(with = "serde_bytes")]
    package: [u8; 32],
    hop: u64,
    #[serde(default)]
    hops: u64,
    #[serde(default)]
    operations: u64,
    #[serde(default)]
    sent: MessagesSent,
    home: String,
    launcher: Option<String>,
    state: AgentState,
    #[serde(with = "serde_bytes")]
    envelope: Vec<u8>,
    #[serde(default)]
    handover: Option<HandoverKey>,
    #[serde(default)]
    tail: Vec<CustodyLink>,
    #[serde(default, with = "serde_bytes")]
    nonce: [u8; 16],
    #[serde(default, with = "serde_bytes")]
    certificate: Vec<u8>,
    #[serde(default, with = "serde_bytes")]
    continuation: Option<Vec<u8>>,
}

impl StoredAgent {
    fn into_parts(self) -> (AgentMeta, Option<Vec<u8>>) {
        let meta = AgentMeta {
            id: self.id,
            package: self.package,
            hop: self.hop,
            hops: self.hops,
            operations: self.operations,
            sent: self.sent,
            home: self.home,
            launcher: self.launcher,
            state: self.state,
            envelope: self.envelope,
            handover: self.handover,
            tail: self.tail,
            nonce: self.nonce,
            certificate: self.certificate,
        };
        (meta, self.continuation)
    }
}

/// What an agent was doing when its record was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    /// Runnable: resume it.
    Ready,
    /// Blocked in `receive`, until a message arrives or the deadline (ms since the Unix epoch).
    Waiting {
        /// When `receive` gives up, if ever.
        timeout_at_ms: Option<u64>,
    },
    /// A hop in progress, recorded while the hop is offered: after a crash, ask `to` whether it
    /// holds `hop` before resuming the agent here. Once this record is durable, the hop commits
    /// as soon as the destination holds it.
    Leaving {
        /// Destination peer id text.
        to: String,
        /// The hop number being made.
        hop: u64,
        /// How many of the agent's queued messages (the oldest) travel with this hop; the rest
        /// arrived later and are forwarded once the hop completes.
        #[serde(default)]
        carried: u64,
        /// BLAKE3 of the hop's envelope: the destination asks about the hop by it.
        #[serde(default, with = "serde_bytes")]
        envelope: [u8; 32],
        /// None: the stored continuation is the agent's at `migrate` (if the hop does not
        /// happen, it resumes there and `migrate` throws). Some: the record kept the agent's
        /// last checkpoint instead (a large continuation is not written again while it
        /// travels), and this is the state it was stored in: if the hop does not happen, the
        /// agent resumes from that checkpoint, as after any crash between checkpoints.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoint: Option<Box<AgentState>>,
    },
    /// Suspended at `receive`, which returned this message (the portable encoding of a value):
    /// resume it with that. Written in the transaction that takes the message off the queue,
    /// so a crash after it neither loses nor repeats the message.
    Answered {
        /// The message.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Stored by a hop whose source may not have recorded its departure durably yet: not
    /// runnable until the source says the hop committed (its departure record is durable), and
    /// dropped if it says it did not.
    Arriving {
        /// Source peer id text: whom to ask after a crash.
        from: String,
        /// BLAKE3 of the hop's envelope.
        #[serde(with = "serde_bytes")]
        envelope: [u8; 32],
        /// How many of the agent's queued messages (the oldest) came with the hop (copies of the
        /// source's, dropped if the hop does not commit).
        carried: u64,
    },
}

/// The first byte of an `agents` value when the continuation is inline, in the CBOR.
const INLINE: u8 = 0;
/// The first byte of an `agents` value when the continuation is in `continuation_chunks`.
const CHUNKED: u8 = 1;

impl Store {
    /// The agent with this id, if it is resident here. Its continuation is copied once, from
    /// the store's pages into the record.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, [`StoreError::Inconsistent`] if its
    /// continuation is missing, or when the read fails.
    pub fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        self.read(|txn| {
            let agents = txn.open_table(AGENTS)?;
            let Some(v) = agents.get(id)? else {
                return Ok(None);
            };
            match decode_agent(id, v.value())? {
                (meta, Some(inline)) => Ok(Some(AgentRecord::from_parts(meta, inline))),
                (meta, None) => {
                    let continuation = read_chunks(&txn.open_table(CHUNKS)?, id)?;
                    Ok(Some(AgentRecord::from_parts(meta, continuation)))
                }
            }
        })
    }

    /// The metadata of the agent with this id, if it is resident here, without reading its
    /// continuation: for status, duplicate checks and everything else that does not run it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, or when the read fails.
    pub fn agent_meta(&self, id: &str) -> Result<Option<AgentMeta>, StoreError> {
        self.read(|txn| get_meta(&txn.open_table(AGENTS)?, id))
    }

    /// Every agent resident here, ordered by id, continuations included: what a restart
    /// resumes. [`Store::agent_metas`] lists them without their continuations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] naming the first record that is corrupt,
    /// [`StoreError::Inconsistent`] naming the first agent whose continuation is missing, or
    /// when the read fails.
    pub fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.read(|txn| {
            let chunks = txn.open_table(CHUNKS)?;
            txn.open_table(AGENTS)?
                .iter()?
                .map(|entry| {
                    let (k, v) = entry?;
                    let (meta, inline) = decode_agent(k.value(), v.value())?;
                    let continuation = match inline {
                        Some(inline) => inline,
                        None => read_chunks(&chunks, k.value())?,
                    };
                    Ok(AgentRecord::from_parts(meta, continuation))
                })
                .collect()
        })
    }

    /// How many agents are stored here (in any state), read without decoding any.
    ///
    /// # Errors
    ///
    /// When the read fails.
    pub fn agent_count(&self) -> Result<u64, StoreError> {
        self.read(|txn| Ok(txn.open_table(AGENTS)?.len()?))
    }

    /// The metadata of every agent resident here, ordered by id, without their continuations:
    /// what status shows, and what a restart needs to decide what to resume.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] naming the first record that is corrupt, or when the read fails.
    pub fn agent_metas(&self) -> Result<Vec<AgentMeta>, StoreError> {
        self.read(|txn| {
            txn.open_table(AGENTS)?
                .iter()?
                .map(|entry| {
                    let (k, v) = entry?;
                    decode_meta(k.value(), v.value())
                })
                .collect()
        })
    }
}

impl Batch<'_> {
    /// The agent with this id, as this transaction sees it (for read-modify-write). Reads the
    /// continuation: use [`Batch::agent_meta`] when the metadata is enough.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, [`StoreError::Inconsistent`] if its
    /// continuation is missing, or when the read fails.
    pub fn agent(&mut self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
        let agents = self.txn.open_table(AGENTS)?;
        let Some(v) = agents.get(id)? else {
            return Ok(None);
        };
        match decode_agent(id, v.value())? {
            (meta, Some(inline)) => Ok(Some(AgentRecord::from_parts(meta, inline))),
            (meta, None) => {
                let continuation = read_chunks(&self.txn.open_table(CHUNKS)?, id)?;
                Ok(Some(AgentRecord::from_parts(meta, continuation)))
            }
        }
    }

    /// The metadata of the agent with this id, as this transaction sees it, without reading its
    /// continuation.
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if its record is corrupt, or when the read fails.
    pub fn agent_meta(&mut self, id: &str) -> Result<Option<AgentMeta>, StoreError> {
        get_meta(&self.txn.open_table(AGENTS)?, id)
    }

    /// Stores (or replaces) an agent record: its metadata and its continuation. The
    /// continuation replaces the stored one whole (the old one is dropped, never read or
    /// copied).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn put_agent(&mut self, rec: &AgentRecord) -> Result<(), StoreError> {
        let id = rec.id.as_str();
        let large = rec.continuation.len() >= LARGE;
        let value = if large {
            encode_agent(CHUNKED, &MetaRef::of_record(rec, None))?
        } else {
            encode_agent(INLINE, &MetaRef::of_record(rec, Some(&rec.continuation)))?
        };
        let (old_len, old_inline) = self
            .txn
            .open_table(AGENTS)?
            .insert(id, value.as_slice())?
            .map_or((0, None), |old| {
                (
                    old.value().len(),
                    Some(old.value().first() == Some(&INLINE)),
                )
            });
        self.count(value.len(), old_len);
        // The old chunks go first, so that redb never copies them (a replacement in place
        // copies the old value, or its whole page), and none is left behind by a shorter
        // continuation.
        if large || old_inline == Some(false) {
            let mut chunks = self.txn.open_table(CHUNKS)?;
            let removed = remove_chunks(&mut chunks, id)?;
            if large {
                insert_chunks(&mut chunks, id, &rec.continuation)?;
            }
            drop(chunks);
            self.count(if large { rec.continuation.len() } else { 0 }, removed);
        }
        Ok(())
    }

    /// Replaces the metadata of agent `meta.id` and keeps its continuation as stored: a state
    /// change (such as back to [`AgentState::Ready`] after an interrupted hop) without rewriting
    /// a continuation that did not change. Returns false, having written nothing, if the agent
    /// is not stored (this never stores an agent without a continuation).
    ///
    /// # Errors
    ///
    /// [`StoreError::Decode`] if the stored record is corrupt, or when the write fails.
    pub fn put_agent_meta(&mut self, meta: &AgentMeta) -> Result<bool, StoreError> {
        let id = meta.id.as_str();
        let mut agents = self.txn.open_table(AGENTS)?;
        let value = {
            let Some(old) = agents.get(id)? else {
                return Ok(false);
            };
            match decode_agent(id, old.value())?.1 {
                Some(inline) => encode_agent(INLINE, &MetaRef::new(meta, Some(&inline)))?,
                None => encode_agent(CHUNKED, &MetaRef::new(meta, None))?,
            }
        };
        let old_len = agents
            .insert(id, value.as_slice())?
            .map_or(0, |old| old.value().len());
        drop(agents);
        self.count(value.len(), old_len);
        Ok(true)
    }

    /// Removes an agent's record and its continuation (absent is fine).
    ///
    /// # Errors
    ///
    /// When the write fails.
    pub fn delete_agent(&mut self, id: &str) -> Result<(), StoreError> {
        let Some((old_len, old_inline)) = self
            .txn
            .open_table(AGENTS)?
            .remove(id)?
            .map(|old| (old.value().len(), old.value().first() == Some(&INLINE)))
        else {
            return Ok(());
        };
        let removed = if old_inline {
            0
        } else {
            remove_chunks(&mut self.txn.open_table(CHUNKS)?, id)?
        };
        self.count(0, old_len + removed);
        Ok(())
    }
}

/// An `agents` value: `tag`, then the CBOR of `meta`.
fn encode_agent(tag: u8, meta: &MetaRef<'_>) -> Result<Vec<u8>, StoreError> {
    // Room for the fields and their names, so that the vector is allocated once.
    let room = 256
        + meta.id.len()
        + meta.home.len()
        + meta.launcher.map_or(0, str::len)
        + meta.envelope.len()
        + meta.continuation.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(room);
    out.push(tag);
    ciborium::into_writer(meta, &mut out).map_err(|source| StoreError::Encode {
        table: "agents",
        key: meta.id.to_owned(),
        source,
    })?;
    Ok(out)
}

/// The tag and the CBOR of an `agents` value.
fn split_tag<'v>(key: &str, bytes: &'v [u8]) -> Result<(u8, &'v [u8]), StoreError> {
    match bytes.split_first() {
        Some((&tag, cbor)) if tag == INLINE || tag == CHUNKED => Ok((tag, cbor)),
        _ => Err(StoreError::Decode {
            table: "agents",
            key: key.to_owned(),
            source: ciborium::de::Error::Semantic(None, "unknown record tag".to_owned()),
        }),
    }
}

/// The metadata of an `agents` value (an inline continuation is skipped, not copied).
fn decode_meta(key: &str, bytes: &[u8]) -> Result<AgentMeta, StoreError> {
    let (_, cbor) = split_tag(key, bytes)?;
    decode_cbor("agents", key, cbor)
}

/// The metadata of an `agents` value, and its continuation if it is inline (`None`: in chunks).
fn decode_agent(key: &str, bytes: &[u8]) -> Result<(AgentMeta, Option<Vec<u8>>), StoreError> {
    let (tag, cbor) = split_tag(key, bytes)?;
    let stored: StoredAgent = decode_cbor("agents", key, cbor)?;
    let (meta, continuation) = stored.into_parts();
    match (tag, continuation) {
        (INLINE, None) => Err(StoreError::Inconsistent {
            table: "agents",
            key: key.to_owned(),
            what: "the record has no continuation",
        }),
        (INLINE, inline) => Ok((meta, inline)),
        // A continuation in the CBOR of a chunked record is not the agent's.
        (_, _) => Ok((meta, None)),
    }
}

/// The metadata of agent `id` in `agents`, if it is there.
pub(super) fn get_meta(
    agents: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &str,
) -> Result<Option<AgentMeta>, StoreError> {
    agents
        .get(id)?
        .map(|v| decode_meta(id, v.value()))
        .transpose()
}
