//! tern's wire protocols between nodes (and between the CLI and a node): names, message types,
//! and the framing every stream uses.
//!
//! Each protocol is one libp2p stream per exchange (libp2p-stream), so large continuations flow
//! without being buffered by a request-response layer. A frame is a 4-byte big-endian length
//! followed by that many bytes of CBOR; the length is checked against a limit *before* anything
//! is allocated. Bulk continuation bytes follow a hop offer raw, their length announced in it.

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build())
}

/// Moving an agent: offer, (package pull by the receiver), continuation bytes, acknowledgement.
pub const HOP_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/hop/1");
/// Anonymous, receiver-initiated download of a package by hash.
pub const PACKAGE_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/pkg/1");
/// Launching agents, status, results and hop recovery queries.
pub const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/tern/ctl/1");

/// Largest control frame (a package travels in one): 17 MiB.
pub const MAX_FRAME: usize = 17 << 20;

/// How long one exchange may stay silent before it is abandoned.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

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
    let mut body = Vec::new();
    ciborium::into_writer(message, &mut body).map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge {
        len: body.len(),
        max: MAX_FRAME,
    })?;
    with_timeout(async {
        w.write_all(&len.to_be_bytes()).await?;
        w.write_all(&body).await?;
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
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return Err(WireError::TooLarge { len, max });
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        Ok(body)
    })
    .await?;
    ciborium::from_reader(body.as_slice()).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Reads exactly `len` raw bytes (a continuation), in chunks, each under the I/O timeout.
///
/// # Errors
///
/// The stream fails, closes early or stalls.
pub async fn read_bulk<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, WireError> {
    const CHUNK: usize = 1 << 20;
    let mut out = Vec::with_capacity(len.min(64 << 20));
    let mut buf = vec![0u8; CHUNK.min(len.max(1))];
    while out.len() < len {
        let want = (len - out.len()).min(buf.len());
        let n = with_timeout(async { Ok(r.read(&mut buf[..want]).await?) }).await?;
        if n == 0 {
            return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
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

/// The first frame of a hop, from the source.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HopOffer {
    /// The signed envelope of this hop.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// The envelope the source received this agent with (empty on its first hop).
    #[serde(with = "serde_bytes")]
    pub previous: Vec<u8>,
    /// Length of the continuation bytes that follow a [`HopReply::Ready`].
    pub continuation_len: u64,
    /// Hops the agent will have made on arrival (what `hops()` reports).
    pub hops: u64,
    /// Microseconds the source spent from the agent's suspension to sending this offer.
    pub prepared_micros: u64,
    /// Messages queued for the agent at the source, oldest first: they travel with it, so the
    /// destination's queue keeps their order.
    pub messages: Vec<serde_bytes::ByteBuf>,
    /// The agent's home node (peer id).
    pub home: String,
    /// Who waits for the agent's result (peer id), if anyone.
    pub launcher: Option<String>,
}

/// The destination's answers during a hop.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HopReply {
    /// Send the continuation.
    Ready,
    /// The destination refuses the hop (policy, verification, size ...).
    Refused(String),
    /// The destination already holds this hop (a retry after a lost acknowledgement).
    Duplicate,
    /// The continuation is verified and stored durably: the destination owns the agent now.
    Stored,
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

/// Control requests (CLI to node, and node to node).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ControlRequest {
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
    /// An agent of this home node ended elsewhere (node to node).
    Ended {
        /// The agent.
        agent: String,
        /// How it ended.
        end: AgentEnd,
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
    },
    /// Where an agent of this home node is now (from the node it arrived at).
    Location {
        /// The agent.
        agent: String,
        /// Peer id of the node holding it.
        node: String,
    },
    /// How an agent of this home node ended, if it has (`tern result`).
    Result {
        /// The agent.
        agent: String,
    },
    /// Does this node hold (agent, hop)? Asked by a source that lost a hop's acknowledgement.
    HopStatus {
        /// The agent.
        agent: String,
        /// The hop.
        hop: u64,
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
    },
    /// Failed with this message, on this node.
    Failed {
        /// Why.
        error: String,
        /// Node name it failed on.
        node: String,
        /// Line and column in the agent's source, when known.
        position: Option<(u64, u64)>,
    },
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
    Status(StatusReport),
    /// Whether this node holds the hop asked about.
    HopHeld(bool),
    /// The message is queued for the agent (or forwarded to where it is).
    Delivered,
    /// (To a probe) this node knows nothing of the agent.
    NotHere,
    /// Done.
    Ok,
    /// The request was refused or failed.
    Error(String),
}

/// What `tern status` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// This node's name.
    pub name: String,
    /// This node's peer id.
    pub peer_id: String,
    /// Connected tern peers: (name, peer id).
    pub peers: Vec<(String, String)>,
    /// Agents held here.
    pub agents: Vec<AgentStatus>,
    /// Forwarding pointers: (agent, node it left for).
    pub forwards: Vec<(String, String)>,
}

/// One agent in a [`StatusReport`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    /// Agent id.
    pub id: String,
    /// Package hash (hex).
    pub package: String,
    /// Ready, waiting, leaving ...
    pub state: String,
    /// Hops made.
    pub hops: u64,
}
