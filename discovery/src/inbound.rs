//! Inbound streams of a node's own protocols, queued per peer and handed out in turn.
//!
//! libp2p-stream gives each accepted protocol a channel that holds one stream and drops the
//! next one when the receiver has not taken the first yet: a burst of streams (many agents
//! hopping at once, or one request after another on fresh streams) mostly vanished, and a
//! flooding peer could make honest peers' streams vanish with its own. [`InboundStreams`] is
//! the behaviour that takes the streams instead. Each peer has a queue of its own, bounded
//! ([`MAX_QUEUED_PER_PEER`]); the node's receiver, [`IncomingStreams`], takes one stream from
//! each peer with streams waiting in turn, so a peer that floods fills and loses only its own
//! queue. All queues together are bounded too ([`MAX_QUEUED`]), so the streams waiting cost
//! the node a known amount whatever the number of peers.
//!
//! It only takes streams: outbound streams are opened with libp2p-stream's `Control`, which
//! negotiates any protocol a remote accepts.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::{poll_fn, Ready};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use libp2p::core::upgrade::{DeniedUpgrade, InboundUpgrade, UpgradeInfo};
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{ConnectionEvent, FullyNegotiatedInbound};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, SubstreamProtocol, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, Stream, StreamProtocol};

/// Streams of one peer waiting for the receiver; past this its new streams are dropped.
pub const MAX_QUEUED_PER_PEER: usize = 64;

/// Streams of all peers together waiting for the receiver.
pub const MAX_QUEUED: usize = 2048;

/// The behaviour: accepts streams of the given protocols on every connection and queues them
/// for its [`IncomingStreams`].
pub struct InboundStreams {
    protocols: Arc<[StreamProtocol]>,
    queue: Arc<Mutex<Queue>>,
}

/// The receiving end: the streams peers opened, in turn per peer.
pub struct IncomingStreams {
    queue: Arc<Mutex<Queue>>,
}

/// The waiting streams, shared by the behaviour's connection handlers (which push) and the
/// receiver (which takes). A `std` mutex held for one queue operation. Generic over the
/// stream so that its turns and bounds are tested without a network.
struct Queue<S = Stream> {
    by_peer: HashMap<PeerId, VecDeque<(StreamProtocol, S)>>,
    /// Peers with streams waiting, in the order they get their next turn.
    turns: VecDeque<PeerId>,
    len: usize,
    /// The receiver waiting for a stream.
    waker: Option<Waker>,
    /// The behaviour is gone (the swarm stopped): no stream will come.
    behaviour_gone: bool,
    /// The receiver is gone: streams are dropped as they come.
    receiver_gone: bool,
    dropped: u64,
}

impl<S> Default for Queue<S> {
    fn default() -> Self {
        Queue {
            by_peer: HashMap::new(),
            turns: VecDeque::new(),
            len: 0,
            waker: None,
            behaviour_gone: false,
            receiver_gone: false,
            dropped: 0,
        }
    }
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

impl InboundStreams {
    /// A behaviour accepting `protocols`, and the receiver of their streams.
    pub fn new(protocols: Vec<StreamProtocol>) -> (InboundStreams, IncomingStreams) {
        let queue = Arc::new(Mutex::new(Queue::default()));
        (
            InboundStreams {
                protocols: protocols.into(),
                queue: queue.clone(),
            },
            IncomingStreams { queue },
        )
    }

    fn handler(&self, peer: PeerId) -> InboundHandler {
        InboundHandler {
            peer,
            protocols: self.protocols.clone(),
            queue: self.queue.clone(),
        }
    }
}

impl Drop for InboundStreams {
    fn drop(&mut self) {
        let mut queue = lock(&self.queue);
        queue.behaviour_gone = true;
        if let Some(waker) = queue.waker.take() {
            waker.wake();
        }
    }
}

impl<S> Queue<S> {
    /// Queues a stream `peer` opened, or drops it when its peer's queue or all of them are full.
    fn push(&mut self, peer: PeerId, protocol: StreamProtocol, stream: S) {
        let queued = self.by_peer.get(&peer).map_or(0, VecDeque::len);
        if self.receiver_gone || queued >= MAX_QUEUED_PER_PEER || self.len >= MAX_QUEUED {
            self.dropped += 1;
            tracing::debug!(%peer, %protocol, queued, "inbound stream dropped: its queue is full");
            return;
        }
        if queued == 0 {
            self.turns.push_back(peer);
        }
        self.by_peer
            .entry(peer)
            .or_default()
            .push_back((protocol, stream));
        self.len += 1;
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// The next stream of the peer whose turn it is.
    fn pop(&mut self) -> Option<(PeerId, StreamProtocol, S)> {
        let peer = self.turns.pop_front()?;
        let queue = self.by_peer.get_mut(&peer)?;
        let (protocol, stream) = queue.pop_front()?;
        if queue.is_empty() {
            self.by_peer.remove(&peer);
        } else {
            self.turns.push_back(peer);
        }
        self.len -= 1;
        Some((peer, protocol, stream))
    }
}

impl IncomingStreams {
    /// The next stream a peer opened (with the peer and the protocol negotiated); None once
    /// the behaviour is gone and every stream was taken.
    pub async fn next(&self) -> Option<(PeerId, StreamProtocol, Stream)> {
        poll_fn(|cx| {
            let mut queue = lock(&self.queue);
            if let Some(next) = queue.pop() {
                return Poll::Ready(Some(next));
            }
            if queue.behaviour_gone {
                return Poll::Ready(None);
            }
            queue.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Streams dropped so far because their peer's queue (or all queues) were full.
    pub fn dropped(&self) -> u64 {
        lock(&self.queue).dropped
    }
}

impl Drop for IncomingStreams {
    fn drop(&mut self) {
        let mut queue = lock(&self.queue);
        queue.receiver_gone = true;
        queue.by_peer.clear();
        queue.turns.clear();
        queue.len = 0;
    }
}

impl NetworkBehaviour for InboundStreams {
    type ConnectionHandler = InboundHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _connection: ConnectionId,
        peer: PeerId,
        _local: &Multiaddr,
        _remote: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn handle_established_outbound_connection(
        &mut self,
        _connection: ConnectionId,
        peer: PeerId,
        _addr: &Multiaddr,
        _role: Endpoint,
        _port_use: libp2p::core::transport::PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(self.handler(peer))
    }

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _peer: PeerId,
        _connection: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _cx: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

/// The handler of one connection: offers the protocols and queues each stream negotiated.
pub struct InboundHandler {
    peer: PeerId,
    protocols: Arc<[StreamProtocol]>,
    queue: Arc<Mutex<Queue>>,
}

impl ConnectionHandler for InboundHandler {
    type FromBehaviour = Infallible;
    type ToBehaviour = Infallible;
    type InboundProtocol = Protocols;
    type OutboundProtocol = DeniedUpgrade;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = Infallible;

    fn listen_protocol(&self) -> SubstreamProtocol<Protocols> {
        SubstreamProtocol::new(Protocols(self.protocols.to_vec()), ())
    }

    fn poll(
        &mut self,
        _cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<DeniedUpgrade, Infallible, Infallible>> {
        Poll::Pending
    }

    fn on_behaviour_event(&mut self, event: Infallible) {
        match event {}
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<Self::InboundProtocol, Self::OutboundProtocol, (), Infallible>,
    ) {
        if let ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
            protocol: (stream, protocol),
            ..
        }) = event
        {
            lock(&self.queue).push(self.peer, protocol, stream);
        }
    }
}

/// The upgrade of an inbound stream: multistream-select picks one of the protocols, and the
/// stream is handed over as it is.
pub struct Protocols(Vec<StreamProtocol>);

impl UpgradeInfo for Protocols {
    type Info = StreamProtocol;
    type InfoIter = std::vec::IntoIter<StreamProtocol>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.0.clone().into_iter()
    }
}

impl InboundUpgrade<Stream> for Protocols {
    type Output = (Stream, StreamProtocol);
    type Error = Infallible;
    type Future = Ready<Result<(Stream, StreamProtocol), Infallible>>;

    fn upgrade_inbound(self, stream: Stream, protocol: StreamProtocol) -> Self::Future {
        std::future::ready(Ok((stream, protocol)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: StreamProtocol = StreamProtocol::new("/test/1");

    fn drain(queue: &mut Queue<u32>) -> Vec<(PeerId, u32)> {
        std::iter::from_fn(|| queue.pop().map(|(peer, _, n)| (peer, n))).collect()
    }

    #[test]
    fn peers_take_turns_and_each_keeps_its_order() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut queue = Queue::default();
        for n in 0..3 {
            queue.push(a, P, n);
        }
        queue.push(b, P, 10);
        queue.push(b, P, 11);
        assert_eq!(
            drain(&mut queue),
            [(a, 0), (b, 10), (a, 1), (b, 11), (a, 2)]
        );
        assert!(queue.by_peer.is_empty() && queue.turns.is_empty());
        assert_eq!(queue.len, 0);
    }

    #[test]
    fn a_flooding_peer_loses_only_its_own_streams() {
        let (flooder, honest) = (PeerId::random(), PeerId::random());
        let mut queue = Queue::default();
        for n in 0..MAX_QUEUED_PER_PEER as u32 + 10 {
            queue.push(flooder, P, n);
        }
        queue.push(honest, P, 1_000);
        assert_eq!(queue.dropped, 10);
        let taken = drain(&mut queue);
        assert_eq!(taken.len(), MAX_QUEUED_PER_PEER + 1);
        // The honest peer's stream comes second, not after the flood.
        assert_eq!(taken[1], (honest, 1_000));
    }

    #[test]
    fn all_queues_together_are_bounded() {
        let mut queue = Queue::default();
        let peers = MAX_QUEUED / MAX_QUEUED_PER_PEER + 2;
        for _ in 0..peers {
            let peer = PeerId::random();
            for n in 0..MAX_QUEUED_PER_PEER as u32 {
                queue.push(peer, P, n);
            }
        }
        assert_eq!(queue.len, MAX_QUEUED);
        assert_eq!(
            queue.dropped as usize,
            peers * MAX_QUEUED_PER_PEER - MAX_QUEUED
        );
        assert_eq!(drain(&mut queue).len(), MAX_QUEUED);
        // Room again once taken.
        queue.push(PeerId::random(), P, 0);
        assert_eq!(queue.len, 1);
    }
}
