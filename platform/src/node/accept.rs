//! Incoming streams: one loop per protocol hands each inbound stream to a task of its own, and
//! the permits bound how many exchanges the node, and each peer, has in hand at once (a flood of
//! streams from one peer cannot starve the others or exhaust the node).
//!
//! An exchange takes the node's permits only once its first request has arrived whole: a peer
//! that starts requests and stalls (one byte, then nothing) holds only reading slots of its own,
//! [`MAX_READING_PER_PEER`] at most, each for at most the I/O timeout, and never delays another
//! peer's exchanges. A request is read into a buffer that grows as its bytes arrive, not one of
//! the length it declares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{control, hop, lock, operators, packages, resource_protocol, NodeStream, Shared};
use crate::wire::{
    next_frame_start, read_frame_after, skip_frame_after, WireError, CONTROL_PROTOCOL,
    HOP_PROTOCOL, MAX_FRAME, PACKAGE_PROTOCOL, RESOURCE_PROTOCOL,
};

/// Exchanges the node handles at once.
const MAX_STREAMS: usize = 256;

/// Exchanges of one peer handled at once.
const MAX_STREAMS_PER_PEER: usize = 32;

/// Requests of one peer being read at once (before their exchange takes its permits).
const MAX_READING_PER_PEER: usize = 8;

/// The protocols a node accepts streams of.
#[derive(Clone, Copy, Debug)]
pub(super) enum Protocol {
    Hop,
    Package,
    Control,
    Client,
    Resource,
}

impl Protocol {
    /// The protocol named `name` (the client's for a name that is none of the node's: only a
    /// node's own protocols are opened).
    pub(super) fn of(name: &libp2p::StreamProtocol) -> Protocol {
        match name.as_ref() {
            n if n == HOP_PROTOCOL.as_ref() => Protocol::Hop,
            n if n == PACKAGE_PROTOCOL.as_ref() => Protocol::Package,
            n if n == CONTROL_PROTOCOL.as_ref() => Protocol::Control,
            n if n == RESOURCE_PROTOCOL.as_ref() => Protocol::Resource,
            _ => Protocol::Client,
        }
    }
}

/// The permits of the exchanges in hand.
pub(super) struct InboundLimits {
    /// Bounds the exchanges handled at once, so a flood of peers cannot exhaust the node.
    all: Semaphore,
    /// What each peer may have in hand at once: one peer cannot take every permit of `all`
    /// and starve the others (its extra exchanges wait on its own semaphores). A `std` mutex
    /// held for one map operation.
    per_peer: Mutex<HashMap<PeerId, Arc<PeerPermits>>>,
}

/// One peer's semaphores.
struct PeerPermits {
    /// Its exchanges being handled.
    exchanges: Semaphore,
    /// Its requests being read.
    reading: Semaphore,
}

impl Default for InboundLimits {
    fn default() -> Self {
        InboundLimits {
            all: Semaphore::new(MAX_STREAMS),
            per_peer: Mutex::default(),
        }
    }
}

impl InboundLimits {
    /// The permits an exchange of `peer` will take.
    fn permits_of(&self, peer: PeerId) -> ExchangePermits<'_> {
        let per_peer = lock(&self.per_peer)
            .entry(peer)
            .or_insert_with(|| {
                Arc::new(PeerPermits {
                    exchanges: Semaphore::new(MAX_STREAMS_PER_PEER),
                    reading: Semaphore::new(MAX_READING_PER_PEER),
                })
            })
            .clone();
        ExchangePermits {
            per_peer,
            all: &self.all,
        }
    }

    /// The connection to `peer` closed: its semaphore goes (exchanges still running keep
    /// theirs).
    pub(super) fn forget(&self, peer: &PeerId) {
        lock(&self.per_peer).remove(peer);
    }
}

/// What an exchange holds while it is handled: a permit of its peer's and one of the node's.
/// Idle reused streams hold none.
pub(super) struct ExchangePermits<'a> {
    per_peer: Arc<PeerPermits>,
    all: &'a Semaphore,
}

impl ExchangePermits<'_> {
    /// Both permits; None if a semaphore was closed.
    pub(super) async fn acquire(&self) -> Option<(SemaphorePermit<'_>, SemaphorePermit<'_>)> {
        let peer = self.per_peer.exchanges.acquire().await.ok()?;
        let all = self.all.acquire().await.ok()?;
        Some((peer, all))
    }

    /// The next request on a reused stream, of at most `max` bytes, and the permits its
    /// exchange holds; None once the peer closed the stream (or left it idle). The permits are
    /// taken once the request has arrived whole (see the module docs), so idle streams and
    /// stalled requests hold none.
    pub(super) async fn next_request<T: serde::de::DeserializeOwned>(
        &self,
        stream: &mut NodeStream,
        max: usize,
    ) -> Result<Option<(T, impl Sized + '_)>, WireError> {
        let Some(first) = next_frame_start(stream).await? else {
            return Ok(None);
        };
        // The reading slot is held until the exchange has its permits: a request read whole
        // and waiting for them still counts against its peer's reading slots, so one peer can
        // have at most 8 requests in memory beyond those being handled.
        let Ok(_reading) = self.per_peer.reading.acquire().await else {
            return Ok(None);
        };
        let request = read_frame_after(stream, first, max).await?;
        let Some(permits) = self.acquire().await else {
            return Ok(None);
        };
        Ok(Some((request, permits)))
    }

    /// Reads past the next request on the stream without keeping it (for a peer that may not
    /// ask it: the request is answered with a refusal, and costs no memory): whether there was
    /// one.
    pub(super) async fn skip_request(&self, stream: &mut NodeStream) -> Result<bool, WireError> {
        let Some(first) = next_frame_start(stream).await? else {
            return Ok(false);
        };
        let Ok(_reading) = self.per_peer.reading.acquire().await else {
            return Ok(false);
        };
        skip_frame_after(stream, first, MAX_FRAME).await?;
        Ok(true)
    }
}

/// Takes the inbound streams of the node's protocols until the node stops, each to a task of
/// the node's own.
pub(super) async fn accept_loop(incoming: discovery::IncomingStreams, shared: Arc<Shared>) {
    while let Some((peer, protocol, stream)) = incoming.next().await {
        let protocol = Protocol::of(&protocol);
        let exchange = shared.clone();
        let stream = shared.wire.count(protocol, stream);
        shared.tasks.spawn(async move {
            let permits = exchange.inbound.permits_of(peer);
            let result = match protocol {
                Protocol::Hop => hop::handle_hop(&exchange, peer, stream, &permits).await,
                Protocol::Package => packages::handle_package(&exchange, stream, &permits).await,
                Protocol::Control => {
                    control::handle_control(&exchange, peer, stream, &permits).await
                }
                Protocol::Client => {
                    operators::handle_client(&exchange, peer, stream, &permits).await
                }
                Protocol::Resource => {
                    resource_protocol::handle_resource(&exchange, peer, stream, &permits).await
                }
            };
            if let Err(e) = result {
                tracing::warn!(%peer, ?protocol, "exchange failed: {e}");
            }
        });
    }
}
