//! tern's wire protocols between nodes (and between the CLI and a node): names, message types,
//! and the framing every stream uses.
//!
//! Each protocol runs over libp2p streams (libp2p-stream), so large continuations flow without
//! being buffered by a request-response layer. A stream carries one exchange after another:
//! nodes keep idle hop and control streams to a peer and reuse them, so a hop does not pay for
//! opening and negotiating a stream. A frame is a 4-byte big-endian length followed by that many
//! bytes of CBOR; the length is checked against a limit *before* anything is allocated. A small
//! continuation travels inside its hop offer; a large one follows it raw, its length announced
//! in the offer.

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

mod moved;
mod resource;
mod status;
pub use moved::{
    MovedContents, MovedResource, MovedResources, MovingContents, TableEntriesSource,
    MAX_MOVED_BYTES, MAX_MOVED_ENTRIES, MAX_MOVED_FILES, MAX_MOVED_RESOURCES,
};
pub use resource::{ResourceOp, ResourceReply, ResourceRequest};
pub use status::{
    Activity, ActivityCounts, AgentStatus, RecentEvent, RemoteDependency, StatusReport, StoreUsage,
    WireBytes,
};

/// A swarm with tern's transport: TCP (no Nagle) + noise + yamux on tokio, connections kept
/// open for an hour when idle (ping and the protocols do not keep them alive on their own).
///
/// # Errors
///
/// The transport or the behaviour cannot be built.
pub fn swarm<B: libp2p::swarm::NetworkBehaviour>(
    keypair: libp2p::identity::Keypair,
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> anyhow::Result<libp2p::Swarm<B>> {
    Ok(libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            libp2p::tcp::Config::default().nodelay(true),
            libp2p::noise::Config::new,
            libp2p::yamux::Config::default,
        )?
        .with_behaviour(|k| behaviour(k))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(3600))
                // Every tern stream offers exactly one protocol: the dialer sends its data right
                // behind the protocol proposal instead of waiting a round trip for the answer.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build())
}

/// Moving an agent: offer, (package pull by the receiver), continuation bytes, the source's
/// decision, acknowledgement.
pub const HOP_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/hop/10");
/// Anonymous, receiver-initiated download of a package by hash.
pub const PACKAGE_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/pkg/1");
/// Node to node: messages on their way, agents' ends and whereabouts for their home, hop
/// recovery questions.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/ctl/9");
/// An operator's client (the CLI) to a node: launch, status, result, send. Only the keys of the
/// node's `[trust] operators` are answered.
pub const CLIENT_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/client/3");
/// An agent's operations on a resource of another node (a `remote` binding), to that node.
pub const RESOURCE_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/res/1");

/// Most bytes of result one resource reply carries: a larger result comes in pages, each asked
/// for in turn ([`ResourceReply::Done`] says whether more follow).
pub const RESOURCE_PAGE: usize = 4 << 20;

/// Forwarding steps a message may take on its way to an agent (guards against pointer loops).
pub const MESSAGE_TTL: u8 = 16;

/// Largest control frame (a package travels in one): 17 MiB.
pub const MAX_FRAME: usize = 17 << 20;

/// How long one exchange may stay silent before it is abandoned.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a stream may wait idle for its next exchange before the receiving side closes it.
pub const STREAM_IDLE: Duration = Duration::from_secs(20);

/// Most messages a hop offer may carry (the agent's queue at the source): a node's
/// `max_queued_messages` is at most this, and an offer with more does not decode.
pub const MAX_CARRIED_MESSAGES: usize = 4096;

/// Most envelopes of custody tail an agent carries besides the one it arrived with (about 300
/// bytes each). The tail is what the agent's home has not certified yet: every node the agent
/// comes to follows it from the home's latest certificate. A holder whose agent would carry more
/// asks the home for a certificate before the agent leaves; if the home cannot be reached, the
/// agent stays (`migrate` throws) until it can.
pub const MAX_CUSTODY_TAIL: usize = 256;

/// Most bytes of messages a hop offer may carry: a node's `max_queued_bytes` is at most this,
/// so an agent's queue, with its continuation's inline part and its envelopes, always fits in
/// one [`MAX_FRAME`] and never keeps the agent from leaving. (The resources that move with it
/// follow the offer: [`MAX_MOVED_BYTES`].)
pub const MAX_CARRIED_BYTES: u64 = 12 << 20;

/// Continuations up to this size travel inside the hop offer (one round trip per hop); larger
/// ones follow it as raw bytes once the destination said it will take them.
pub const INLINE_CONTINUATION: usize = 64 << 10;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The stream failed or closed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The announced length is over the limit.
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The bytes are not the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer went silent.
    #[error("timed out")]
    Timeout,
}

/// Writes one frame.
///
/// # Errors
///
/// The stream fails.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    message: &T,
) -> Result<(), WireError> {
    let mut frames = Vec::with_capacity(256);
    push_frame(&mut frames, message)?;
    write_frames(w, &frames).await
}

/// Appends `message` to `frames` as one frame (its length, then its body), for
/// [`write_frames`]: frames that go out together take one write and one yamux frame.
///
/// # Errors
///
/// The message cannot be encoded or is over 4 GiB.
pub fn push_frame<T: Serialize>(frames: &mut Vec<u8>, message: &T) -> Result<(), WireError> {
    let start = frames.len();
    frames.extend_from_slice(&[0; 4]);
    ciborium::into_writer(message, &mut *frames)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = frames.len() - start - 4;
    let len = u32::try_from(len).map_err(|_| WireError::TooLarge {
        len,
        max: MAX_FRAME,
    })?;
    frames[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Writes frames made by [`push_frame`] in one write, and flushes.
///
/// # Errors
///
/// The stream fails.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[u8],
) -> Result<(), WireError> {
    with_timeout(async {
        w.write_all(frames).await?;
        w.flush().await?;
        Ok(())
    })
    .await
}

/// Reads one frame of at most `max` bytes.
///
/// # Errors
///
/// The stream fails or times out, the frame is too large, or it is not a `T`.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<T, WireError> {
    let body = with_timeout(async {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).await?;
        read_body(r, u32::from_be_bytes(len) as usize, max).await
    })
    .await?;
    ciborium::from_reader(body.as_slice()).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Waits for the next frame on a reused stream to begin: its first byte, or `None` if the peer
/// closed the stream (or left it idle for [`STREAM_IDLE`]) first.
///
/// # Errors
///
/// The stream fails.
pub async fn next_frame_start<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<u8>, WireError> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(STREAM_IDLE, r.read(&mut first)).await {
        Err(_) | Ok(Ok(0)) => Ok(None),
        Ok(Ok(_)) => Ok(Some(first[0])),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Reads the rest of a frame of at most `max` bytes whose first byte was `first` (see
/// [`next_frame_start`]).
///
/// # Errors
///
/// As [`read_frame`].
pub async fn read_frame_after<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
    first: u8,
    max: usize,
) -> Result<T, WireError> {
    let body = with_timeout(async {
        let mut rest = [0u8; 3];
        r.read_exact(&mut rest).await?;
        let len = u32::from_be_bytes([first, rest[0], rest[1], rest[2]]) as usize;
        read_body(r, len, max).await
    })
    .await?;
    ciborium::from_reader(body.as_slice()).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Reads a frame body of `len` bytes into a buffer that grows as they arrive: a peer that
/// declares 17 MiB and sends one byte costs one byte (and a little more), not 17 MiB.
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    max: usize,
) -> Result<Vec<u8>, WireError> {
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    let mut body = Vec::with_capacity(len.min(64 << 10));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(body)
}

/// Reads past a frame of at most `max` bytes whose first byte was `first` (see
/// [`next_frame_start`]) without keeping it, in one small buffer.
///
/// # Errors
///
/// As [`read_frame`].
pub async fn skip_frame_after<R: AsyncRead + Unpin>(
    r: &mut R,
    first: u8,
    max: usize,
) -> Result<(), WireError> {
    with_timeout(async {
        let mut rest = [0u8; 3];
        r.read_exact(&mut rest).await?;
        let len = u32::from_be_bytes([first, rest[0], rest[1], rest[2]]) as usize;
        if len > max {
            return Err(WireError::TooLarge { len, max });
        }
        let skipped =
            futures::io::copy((&mut *r).take(len as u64), &mut futures::io::sink()).await?;
        if skipped < len as u64 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        Ok(())
    })
    .await
}

/// Reads exactly `len` raw bytes (a continuation), in chunks, each under the I/O timeout, and
/// their BLAKE3 hash, computed as they arrive.
///
/// The bytes land in place, in one zeroed allocation of `len` bytes: the caller bounds `len`
/// (the node refuses offers over its continuation limit before reading them). Fresh pages cost
/// nothing until written; memory the allocator reuses (jemalloc keeps freed pages a while) is
/// zeroed first.
///
/// # Errors
///
/// The stream fails, closes early or stalls.
pub async fn read_bulk<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
) -> Result<(Vec<u8>, [u8; 32]), WireError> {
    const CHUNK: usize = 1 << 20;
    let mut out = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    let mut filled = 0;
    while filled < len {
        let end = (filled + CHUNK).min(len);
        let n = with_timeout(async { Ok(r.read(&mut out[filled..end]).await?) }).await?;
        if n == 0 {
            return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        hasher.update(&out[filled..filled + n]);
        filled += n;
    }
    Ok((out, *hasher.finalize().as_bytes()))
}

/// Writes raw bytes, in chunks, each under the I/O timeout.
///
/// # Errors
///
/// The stream fails or stalls.
pub async fn write_bulk<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), WireError> {
    for chunk in bytes.chunks(1 << 20) {
        with_timeout(async { Ok(w.write_all(chunk).await?) }).await?;
    }
    with_timeout(async { Ok(w.flush().await?) }).await
}

async fn with_timeout<T>(
    f: impl std::future::Future<Output = Result<T, WireError>>,
) -> Result<T, WireError> {
    tokio::time::timeout(IO_TIMEOUT, f)
        .await
        .unwrap_or(Err(WireError::Timeout))
}

/// What an agent has sent in its whole life, on every node: counted against its message
/// budgets (`Limits::max_messages_sent`, `Limits::max_message_bytes_sent`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesSent {
    /// Messages.
    pub count: u64,
    /// Bytes of their encoded values.
    pub bytes: u64,
}

/// The first frame of a hop, from the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopOffer {
    /// The signed envelope of this hop.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// The envelope the source received this agent with (empty on its first hop).
    #[serde(with = "serde_bytes")]
    pub previous: Vec<u8>,
    /// The handover key of that hop, by its own source (none on the first hop).
    pub previous_handover: Option<HandoverKey>,
    /// Length of the continuation.
    pub continuation_len: u64,
    /// The continuation itself when it is at most [`INLINE_CONTINUATION`] bytes, and then a
    /// [`HopDecision`] follows the offer; otherwise empty, and its bytes follow a
    /// [`HopReply::Ready`], then a [`HopDecision`].
    #[serde(with = "serde_bytes")]
    pub inline: Vec<u8>,
    /// Hops the agent will have made on arrival (what `hops()` reports).
    pub hops: u64,
    /// Operations the agent has run in all (its lifetime budget is counted against them).
    pub operations: u64,
    /// Messages the agent has sent in all.
    #[serde(default)]
    pub sent: MessagesSent,
    /// Microseconds the source spent from the agent's suspension to sending this offer.
    pub prepared_micros: u64,
    /// Messages queued for the agent at the source, oldest first: they travel with it, so the
    /// destination's queue keeps their order. At most [`MAX_CARRIED_MESSAGES`] (more do not
    /// decode: a million empty messages in one frame would cost tens of MiB to decode).
    #[serde(deserialize_with = "at_most::<MAX_CARRIED_MESSAGES, _, _>")]
    pub messages: Vec<serde_bytes::ByteBuf>,
    /// The hops of the agent before `previous` that its home node may not have certified yet,
    /// oldest first (the custody tail): at most [`MAX_CUSTODY_TAIL`].
    #[serde(deserialize_with = "at_most::<MAX_CUSTODY_TAIL, _, _>")]
    pub custody: Vec<CustodyLink>,
    /// The agent's home node (peer id).
    pub home: String,
    /// The nonce the home derived the agent's id with (`security::AgentId::launched`): with
    /// `home`, it shows whose agent this is.
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; 16],
    /// The home's latest certificate of the agent's custody (`security::CustodyCertificate`),
    /// from which `custody` leads on to `previous`; empty if there is none yet (custody then
    /// leads on from the launch).
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    /// Who waits for the agent's result (peer id), if anyone.
    pub launcher: Option<String>,
    /// Bytes of the resources that move with the agent (tables and values bound by `move`;
    /// [`MovedResources`], at most [`MAX_MOVED_BYTES`]), 0 if none. They follow the
    /// continuation on the raw path (an offer with them is never inline): the destination
    /// stores them with the agent, the source drops them once the hop is complete.
    #[serde(default)]
    pub tables_len: u64,
}

/// The key a source reveals when it handed an agent over by a hop, which opens the handover lock
/// of the hop's envelope (`security::HopEnvelope::handover_key`).
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverKey(#[serde(with = "serde_bytes")] pub [u8; 32]);

impl std::fmt::Debug for HandoverKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HandoverKey({:02x?}..)", &self.0[..4])
    }
}

/// One hop of an agent's custody as it travels and is stored: the envelope that moved it
/// (at most `security::MAX_ENVELOPE_BYTES`: checked where it is taken) and its source's
/// handover key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyLink {
    /// The hop's envelope.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// Its source's handover key.
    pub handover: HandoverKey,
}

/// The source's word, after the destination answered `Stored` or `Duplicate`, that it handed the
/// agent over: the destination's proof of custody for the hop (reports to the home, the next
/// hop). A destination that misses it asks with [`ControlRequest::Departed`]. None follows a
/// hop to the agent's home, which keeps the agent's custody itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopHandover(pub HandoverKey);

/// The source's last word on a hop, sent after the continuation (inline in the offer, or raw
/// after it) once the departure record it writes meanwhile is durable, or could not be written.
/// The destination stores the agent as arriving while this travels, and runs it only after
/// `Commit`; a destination that misses it asks with [`ControlRequest::HopCommitted`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HopDecision {
    /// The source's departure record is durable: the hop commits once the destination holds
    /// the agent.
    Commit,
    /// The source could not record the departure: drop what arrived.
    Abort(String),
}

/// The destination's answers during a hop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HopReply {
    /// Send the continuation.
    Ready,
    /// The destination refuses the hop (policy, verification, size ...).
    Refused(HopRefusal),
    /// The destination already holds this hop (a retry after a lost acknowledgement).
    Duplicate,
    /// The continuation is verified and stored durably: the destination owns the agent now.
    Stored,
}

/// Why a destination refused a hop ([`HopReply::Refused`]). The text is made here, at the edge;
/// code and tests match the variant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum HopRefusal {
    /// This node holds as many agents as it takes (`[limits] max_agents`).
    #[error("this node is full: it holds its maximum of {max} agents")]
    NodeFull {
        /// The node's `max_agents`.
        max: u64,
    },
    /// The agent does not fit in this node's store quota (`[limits] max_store_bytes`).
    #[error(
        "this node's store is full: it holds {stored} bytes of agents' state, and {adding} more \
         would exceed its quota of {max} bytes (max_store_bytes)"
    )]
    StoreFull {
        /// Bytes of agents' state the node holds.
        stored: u64,
        /// Bytes asked for.
        adding: u64,
        /// The node's `max_store_bytes`.
        max: u64,
    },
    /// This node accepted this hop of the agent already, by another envelope: one of the two
    /// claims on it was made by a node that did not hold the agent. The agent stays where it is.
    #[error("hop {hop} of this agent, or a later one, came here already by another envelope")]
    Conflict {
        /// The hop.
        hop: u64,
    },
    /// The sending peer's id does not inline an ed25519 key.
    #[error("sender has no ed25519 identity")]
    NoIdentity,
    /// The sending peer is not in this node's `accept_from`.
    #[error("this node does not accept agents from {peer}")]
    PeerNotAccepted {
        /// The peer (id as text).
        peer: String,
    },
    /// The hop envelope does not decode.
    #[error("envelope: {0}")]
    Envelope(String),
    /// The previous envelope (the sender's custody) does not decode.
    #[error("previous envelope: {0}")]
    PreviousEnvelope(String),
    /// The envelope does not verify: signature, chain, sender or destination.
    #[error("hop envelope: {0}")]
    Verification(String),
    /// The sender gave up on this offer (it asked about the hop and heard "not held").
    #[error("the sender gave up on this hop")]
    Abandoned,
    /// The agent lives on this node: it cannot arrive here.
    #[error("this agent lives on this node")]
    LivesHere,
    /// The continuation is larger than this node takes.
    #[error("continuation of {bytes} bytes is over this node's limit")]
    OverLimit {
        /// The size the offer announces.
        bytes: u64,
    },
    /// The inline continuation's length is not the one the offer announces.
    #[error("the inline continuation has {inline} bytes, the offer announces {announced}")]
    LengthMismatch {
        /// Bytes inline.
        inline: u64,
        /// Bytes announced.
        announced: u64,
    },
    /// The package could not be pulled from the source nor from any provider.
    #[error("package pull: {0}")]
    PackageUnavailable(String),
    /// The pulled package does not decode, verify, or have the announced hash.
    #[error("pulled package: {0}")]
    BadPackage(String),
    /// The package could not be loaded (compiled) here.
    #[error("{0}")]
    Package(String),
    /// The trust policy refuses the package (its author, its grants).
    #[error("package refused: {0}")]
    UntrustedPackage(String),
    /// A resource moving with the agent (a table, a value, a dataset: the variant keeps its
    /// first name on the wire) cannot come here (this node has one of that name, does not grant
    /// it to the agent's author, or it is malformed).
    #[error("moving resource: {0}")]
    MovingTable(String),
    /// A message the agent carries does not decode as a portable value for its program.
    #[error("carried message {index}: {reason}")]
    BadMessage {
        /// Its place in the offer's queue.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The continuation does not decode against the package's program.
    #[error("continuation: {0}")]
    Continuation(String),
    /// The store could not be read.
    #[error("store: {0}")]
    StoreRead(String),
    /// The store could not take the agent.
    #[error("cannot store the agent: {0}")]
    StoreWrite(String),
    /// The source could not record its departure and sent `Abort`.
    #[error("the source gave up the hop: {0}")]
    SourceAborted(String),
    /// The arrival was dropped while its commit was being recorded.
    #[error("the arrival was dropped meanwhile")]
    ArrivalDropped,
}

/// Why a node refused or failed a control request ([`ControlReply::Refused`]): a launch, a
/// delivery, a result, a question about a hop. The text is made here, at the edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum ControlRefusal {
    /// This node holds as many agents as it takes (`[limits] max_agents`).
    #[error("this node is full: it holds its maximum of {max} agents")]
    NodeFull {
        /// The node's `max_agents`.
        max: u64,
    },
    /// What was asked does not fit in this node's store quota (`[limits] max_store_bytes`).
    #[error(
        "this node's store is full: it holds {stored} bytes of agents' state, and {adding} more \
         would exceed its quota of {max} bytes (max_store_bytes)"
    )]
    StoreFull {
        /// Bytes of agents' state the node holds.
        stored: u64,
        /// Bytes asked for.
        adding: u64,
        /// The node's `max_store_bytes`.
        max: u64,
    },
    /// The client's key is not one of the node's operators.
    #[error(
        "this node takes launch, status, result and send only from its operators ([trust] \
         operators); {client} is not one"
    )]
    NotOperator {
        /// The client's key (`ed25519:...`), or its peer id if it has no ed25519 key.
        client: String,
    },
    /// The package does not decode or its signature does not verify.
    #[error("package: {0}")]
    BadPackage(String),
    /// The trust policy refuses the package (its author, its grants).
    #[error("package refused: {0}")]
    UntrustedPackage(String),
    /// A binding the package declares cannot be kept with this node's resource of its name (a
    /// move of a fixed resource, a copy of a non-transferable one).
    #[error("package refused: {0}")]
    ImpossibleBinding(String),
    /// The package could not be loaded (compiled) here.
    #[error("{0}")]
    Package(String),
    /// The store failed.
    #[error("{0}")]
    Store(String),
    /// The store could not be read to answer a question about a hop.
    #[error("cannot read the store: {0}")]
    StoreUnreadable(String),
    /// The agent has finished: it takes no more messages.
    #[error("agent {agent} has finished")]
    Finished {
        /// The agent.
        agent: String,
    },
    /// No node asked knows the agent.
    #[error("no agent {agent} in the mesh")]
    UnknownAgent {
        /// The agent.
        agent: String,
    },
    /// A forwarding pointer or location record led to a node that does not know the agent.
    #[error("{node} does not know agent {agent}")]
    StalePointer {
        /// The node that did not know it (its name, or peer id).
        node: String,
        /// The agent.
        agent: String,
    },
    /// A message followed more forwarding pointers than it may.
    #[error("agent {agent}: too many forwarding steps")]
    TooManySteps {
        /// The agent.
        agent: String,
    },
    /// The next node on the message's way could not be reached.
    #[error("{0}")]
    Unreachable(String),
    /// The next node answered something the protocol does not allow there.
    #[error("unexpected reply {0}")]
    UnexpectedReply(String),
    /// No result is recorded for the agent on this (its home) node, yet.
    #[error("no result for agent {agent} on this node (yet)")]
    NoResult {
        /// The agent.
        agent: String,
    },
    /// The recorded result does not decode.
    #[error("stored result is unreadable: {0}")]
    UnreadableResult(String),
    /// The message is larger than the node takes.
    #[error("a message of {bytes} bytes is over this node's limit of {max} bytes")]
    MessageTooLarge {
        /// Its size.
        bytes: u64,
        /// The node's `max_message_bytes`.
        max: u64,
    },
    /// The agent's queue on this node is full (too many messages, or too many bytes).
    #[error("the message queue of agent {agent} is full ({messages} messages, {bytes} bytes)")]
    QueueFull {
        /// The agent.
        agent: String,
        /// Messages queued.
        messages: u64,
        /// Their bytes.
        bytes: u64,
    },
    /// The message is not a portable value the agent's program can take.
    #[error("message for agent {agent} is not a portable value: {reason}")]
    BadMessage {
        /// The agent.
        agent: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The sender of an end or location report does not hold the agent, as far as the custody
    /// it presented shows.
    #[error("the sender does not hold agent {agent}: {reason}")]
    NoCustody {
        /// The agent.
        agent: String,
        /// What the check found.
        reason: String,
    },
    /// A location report older than what the home knows of the agent (reports can arrive out
    /// of order): nothing changed.
    #[error("agent {agent}'s home knows of a later hop than {hop}")]
    Superseded {
        /// The agent.
        agent: String,
        /// The hop the report was about.
        hop: u64,
    },
    /// The sending peer delivered more messages than this node takes from one peer.
    #[error("over this node's limit of {per_second} messages a second from one peer")]
    RateLimited {
        /// The node's `max_messages_per_peer_per_second`.
        per_second: u32,
    },
}

/// Decodes a list (an offer's carried messages, a custody tail), refusing more than `MAX` items
/// before building them: a million empty items in one frame would cost tens of MiB.
pub(crate) fn at_most<'de, const MAX: usize, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct AtMost<const MAX: usize, T>(std::marker::PhantomData<T>);
    impl<'de, const MAX: usize, T: Deserialize<'de>> serde::de::Visitor<'de> for AtMost<MAX, T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {MAX} items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(m) = seq.next_element()? {
                if items.len() == MAX {
                    return Err(serde::de::Error::invalid_length(items.len() + 1, &self));
                }
                items.push(m);
            }
            Ok(items)
        }
    }
    deserializer.deserialize_seq(AtMost::<MAX, T>(std::marker::PhantomData))
}

/// A package download request: the package hash.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageRequest {
    /// Hash of the package wanted.
    pub hash: [u8; 32],
}

/// The answer to a package download.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PackageReply {
    /// The package bytes.
    Found(#[serde(with = "serde_bytes")] Vec<u8>),
    /// This node does not have it.
    NotFound,
    /// This node does not serve packages.
    Refused,
}

/// What an operator's client asks a node (protocol [`CLIENT_PROTOCOL`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Start an agent from this package here. With `wait`, the stream stays open and the
    /// agent's end follows as [`ControlReply::Ended`].
    Launch {
        /// The package bytes.
        #[serde(with = "serde_bytes")]
        package: Vec<u8>,
        /// Keep the stream open until the agent ends.
        wait: bool,
    },
    /// The node's peers, agents and forwarding pointers.
    Status,
    /// How an agent of this home node ended, if it has (`tern result`).
    Result {
        /// The agent.
        agent: String,
    },
    /// Send a message to an agent, wherever it is (`tern send`).
    Send {
        /// The receiving agent.
        agent: String,
        /// The message, a portable value (`agent_lang::encode_portable`).
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
    },
}

/// What one node asks another (protocol [`CONTROL_PROTOCOL`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
    /// An agent of this home node ended elsewhere (node to node).
    Ended {
        /// The agent.
        agent: String,
        /// How it ended.
        end: AgentEnd,
        /// The custody tail that shows the sender held the agent: the hops since the one the
        /// home last confirmed, up to the one that brought the agent to the sender (at most
        /// [`MAX_CUSTODY_TAIL`] + 1).
        #[serde(deserialize_with = "at_most::<{ MAX_CUSTODY_TAIL + 1 }, _, _>")]
        custody: Vec<CustodyLink>,
    },
    /// Deliver a message to an agent: held here → queued for it; moved on → forwarded along
    /// the forwarding pointer or the home's location record.
    Deliver {
        /// The receiving agent.
        agent: String,
        /// The message, a portable value (`agent_lang::encode_portable`).
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
        /// Forwarding steps left (guards against pointer loops).
        ttl: u8,
        /// Only answer for what this node knows; do not ask other peers.
        probe: bool,
        /// How long the sender still waits for the answer, in milliseconds: a message that
        /// must follow an agent leaving the receiving node waits that long at most for the
        /// agent's hop to settle.
        #[serde(default)]
        wait_ms: u32,
    },
    /// An agent of this home node is now on the sending node (which it arrived at).
    Location {
        /// The agent.
        agent: String,
        /// The custody tail that shows it, as in `Ended`.
        #[serde(deserialize_with = "at_most::<{ MAX_CUSTODY_TAIL + 1 }, _, _>")]
        custody: Vec<CustodyLink>,
    },
    /// Does this node hold (agent, hop)? Asked by a source that lost a hop's acknowledgement.
    /// The answer waits for an arrival of that hop still in progress; a "no" about the offer
    /// with envelope hash `envelope` also shuts that offer out, should it still come in late.
    HopStatus {
        /// The agent.
        agent: String,
        /// The hop.
        hop: u64,
        /// BLAKE3 of the envelope of the offer in question, when the source knows it: the hop
        /// is held only by that envelope.
        envelope: Option<[u8; 32]>,
        /// The source gives the hop up if it is not held: a "no" also shuts out that offer,
        /// should it still come in late.
        give_up: bool,
    },
    /// Did the hop with this envelope hash commit (is the source's departure record durable)?
    /// Asked by a destination holding the agent as arriving that missed the source's decision.
    HopCommitted {
        /// The agent.
        agent: String,
        /// BLAKE3 of the hop's envelope.
        envelope: [u8; 32],
    },
    /// Did the agent leave this node by the hop with this envelope (its destination took it)?
    /// Asked by that destination when it missed the [`HopHandover`]: the source needs the
    /// envelope's fields to compute the key again. The answer waits (briefly) for a departure
    /// still completing.
    Departed {
        /// The agent.
        agent: String,
        /// The hop's envelope (at most `security::MAX_ENVELOPE_BYTES`: checked where it is
        /// taken).
        #[serde(with = "serde_bytes")]
        envelope: Vec<u8>,
    },
}

/// How an agent ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum AgentEnd {
    /// Finished with this result (JSON text), on this node.
    Finished {
        /// The result as JSON.
        json: String,
        /// Node name it finished on.
        node: String,
        /// Hops made.
        hops: u64,
        /// Messages that were queued for the agent and that it never received.
        #[serde(default)]
        unread: u64,
    },
    /// Failed with this message, on this node.
    Failed {
        /// Why.
        error: String,
        /// Node name it failed on.
        node: String,
        /// Line and column in the agent's source, when known.
        position: Option<(u64, u64)>,
        /// Messages that were queued for the agent and that it never received.
        #[serde(default)]
        unread: u64,
    },
}

impl AgentEnd {
    /// Messages delivered to the agent (queued for it) that it never received.
    pub fn unread(&self) -> u64 {
        match self {
            AgentEnd::Finished { unread, .. } | AgentEnd::Failed { unread, .. } => *unread,
        }
    }

    fn unread_mut(&mut self) -> &mut u64 {
        match self {
            AgentEnd::Finished { unread, .. } | AgentEnd::Failed { unread, .. } => unread,
        }
    }

    /// The same end, with `n` unread messages.
    pub fn with_unread(mut self, n: u64) -> Self {
        *self.unread_mut() = n;
        self
    }
}

/// Control replies.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlReply {
    /// The agent started, with this id.
    Launched {
        /// The agent id.
        agent: String,
    },
    /// The agent ended.
    Ended(AgentEnd),
    /// The node's status.
    Status(Box<StatusReport>),
    /// Whether this node holds the hop asked about.
    HopHeld(bool),
    /// Whether the hop asked about committed.
    HopCommitted(bool),
    /// Whether the agent left by the hop asked about: if it did, the source's handover key.
    HandedOver(Option<HandoverKey>),
    /// The message is queued for the agent (or forwarded to where it is).
    Delivered,
    /// (To a probe) this node knows nothing of the agent.
    NotHere,
    /// Done.
    Ok,
    /// (To a location report) the home took it: its certificate of the custody confirmed
    /// (`security::CustodyCertificate`), which the holder sends on with the agent.
    CustodyConfirmed(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The request was refused or failed.
    Refused(ControlRefusal),
    /// The message went on to the node holding the agent, which broke off without answering:
    /// it may have been delivered (why, as text).
    Unconfirmed(String),
}
