//! Outgoing streams kept open between exchanges: a hop or control exchange takes an idle stream
//! to its peer (or opens a new one) and gives it back once it got its answer, so that an
//! exchange does not pay for opening and negotiating a stream. The receiving side serves
//! exchange after exchange on a stream until it is closed or idle for `wire::STREAM_IDLE`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{PeerId, StreamProtocol};
use tokio::time::Instant;

use super::{lock, NodeStream};

/// Idle streams kept per peer and protocol.
const IDLE_STREAMS_PER_PEER: usize = 128;

/// An idle stream older than this is dropped rather than reused: the other side closes its end
/// after `wire::STREAM_IDLE`, and this stays well inside that.
const IDLE_STREAM_REUSE: Duration = Duration::from_secs(10);

/// Held by the exchange whose turn it is to open a new stream to a peer.
type OpeningTurn = Arc<tokio::sync::Mutex<()>>;

/// Streams are pooled per peer and protocol.
type PoolKey = (PeerId, StreamProtocol);

/// The idle streams to each peer, by protocol, and whose turn it is to open a new one.
///
/// New streams to a peer are opened one at a time, each once the previous one got its first
/// answer: a peer queues at most `discovery::MAX_QUEUED_PER_PEER` of a node's new streams
/// before its accept loop takes them and drops the rest, so a burst of new streams (many
/// agents leaving at once) must not outrun it. Reused streams need no turn.
///
/// Generic over the stream so that its expiry is tested without a network; the node's is
/// `StreamPool<NodeStream>`.
pub(super) struct StreamPool<S> {
    /// Idle streams, oldest first. A `std` mutex held to push or pop one, never across an
    /// `.await`.
    idle: Mutex<HashMap<PoolKey, VecDeque<(Instant, S)>>>,
    /// One opening turn per peer and protocol (a tokio mutex: it is held across the opening).
    opening: Mutex<HashMap<PoolKey, OpeningTurn>>,
}

impl<S> Default for StreamPool<S> {
    fn default() -> Self {
        StreamPool {
            idle: Mutex::default(),
            opening: Mutex::default(),
        }
    }
}

/// A stream for one exchange.
pub(super) struct PeerStream<S = NodeStream> {
    pub(super) stream: S,
    /// It served an exchange before (and may have died with its connection since).
    pub(super) reused: bool,
    /// A new stream holds its peer's opening turn until the first answer arrives on it: the
    /// exchange sets this to None then (or once no answer will come), and the next new stream
    /// to the peer may be opened.
    pub(super) opening: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<S> StreamPool<S> {
    /// The most recently idled stream to `peer`, if one is fresh enough.
    fn take(&self, peer: PeerId, protocol: &StreamProtocol) -> Option<S> {
        let mut idle = lock(&self.idle);
        let streams = idle.get_mut(&(peer, protocol.clone()))?;
        let (since, stream) = streams.pop_back()?;
        if since.elapsed() < IDLE_STREAM_REUSE {
            return Some(stream);
        }
        // The most recent one expired, so all did.
        streams.clear();
        None
    }

    /// Gives a stream back after its exchange, for the next one; streams that expired meanwhile
    /// go from the front of the queue (no scan of them all).
    pub(super) fn put(&self, peer: PeerId, protocol: StreamProtocol, stream: S) {
        let mut idle = lock(&self.idle);
        let streams = idle.entry((peer, protocol)).or_default();
        let now = Instant::now();
        while streams
            .front()
            .is_some_and(|(since, _)| now.duration_since(*since) >= IDLE_STREAM_REUSE)
        {
            streams.pop_front();
        }
        if streams.len() < IDLE_STREAMS_PER_PEER {
            streams.push_back((now, stream));
        }
    }

    /// The connection to `peer` closed: its streams are dead.
    pub(super) fn forget(&self, peer: &PeerId) {
        lock(&self.idle).retain(|(p, _), _| p != peer);
        lock(&self.opening).retain(|(p, _), _| p != peer);
    }

    fn opening_turn(&self, peer: PeerId, protocol: &StreamProtocol) -> OpeningTurn {
        lock(&self.opening)
            .entry((peer, protocol.clone()))
            .or_default()
            .clone()
    }

    /// A stream to `peer` for one exchange: an idle one, or a new one from `open` once it is
    /// this exchange's turn to open one.
    pub(super) async fn stream_to<E>(
        &self,
        peer: PeerId,
        protocol: StreamProtocol,
        open: impl AsyncFnOnce(PeerId, StreamProtocol) -> Result<S, E>,
    ) -> Result<PeerStream<S>, E> {
        let reused = |stream| PeerStream {
            stream,
            reused: true,
            opening: None,
        };
        if let Some(stream) = self.take(peer, &protocol) {
            return Ok(reused(stream));
        }
        let turn = self.opening_turn(peer, &protocol).lock_owned().await;
        // Another exchange may have given its stream back meanwhile.
        if let Some(stream) = self.take(peer, &protocol) {
            return Ok(reused(stream));
        }
        let stream = open(peer, protocol).await?;
        Ok(PeerStream {
            stream,
            reused: false,
            opening: Some(turn),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    const HOP: StreamProtocol = StreamProtocol::new("/test/hop");

    fn pool() -> (StreamPool<u32>, PeerId) {
        (StreamPool::default(), PeerId::random())
    }

    async fn get(pool: &StreamPool<u32>, peer: PeerId, fresh: u32) -> PeerStream<u32> {
        let opened = pool
            .stream_to(peer, HOP, async |_, _| Ok::<_, Infallible>(fresh))
            .await;
        match opened {
            Ok(s) => s,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_is_reused_until_it_expires() {
        let (pool, peer) = pool();
        pool.put(peer, HOP, 1);
        let s = get(&pool, peer, 99).await;
        assert_eq!((s.stream, s.reused), (1, true));
        pool.put(peer, HOP, 2);
        tokio::time::advance(IDLE_STREAM_REUSE - Duration::from_millis(1)).await;
        assert_eq!(get(&pool, peer, 99).await.stream, 2);
        pool.put(peer, HOP, 3);
        tokio::time::advance(IDLE_STREAM_REUSE).await;
        let s = get(&pool, peer, 99).await;
        assert_eq!((s.stream, s.reused), (99, false));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_streams_leave_from_the_front_when_one_is_put() {
        let (pool, peer) = pool();
        pool.put(peer, HOP, 1);
        pool.put(peer, HOP, 2);
        tokio::time::advance(IDLE_STREAM_REUSE).await;
        pool.put(peer, HOP, 3);
        let idle = lock(&pool.idle);
        let left: Vec<u32> = idle[&(peer, HOP)].iter().map(|(_, s)| *s).collect();
        assert_eq!(left, vec![3]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_newest_stream_is_taken_first_and_the_pool_is_bounded() {
        let (pool, peer) = pool();
        for s in 0..IDLE_STREAMS_PER_PEER as u32 + 10 {
            pool.put(peer, HOP, s);
        }
        assert_eq!(lock(&pool.idle)[&(peer, HOP)].len(), IDLE_STREAMS_PER_PEER);
        assert_eq!(
            get(&pool, peer, 999).await.stream,
            IDLE_STREAMS_PER_PEER as u32 - 1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_stream_holds_the_opening_turn_until_answered() {
        let pool = Arc::new(StreamPool::<u32>::default());
        let peer = PeerId::random();
        let mut first = get(&pool, peer, 1).await;
        assert!(!first.reused);
        // A second exchange waits for the first one's answer, then reuses what it gave back
        // instead of opening a stream of its own.
        let second = tokio::spawn({
            let pool = pool.clone();
            async move { get(&pool, peer, 2).await.stream }
        });
        tokio::task::yield_now().await;
        assert!(!second.is_finished(), "the opener holds the turn");
        first.opening = None;
        pool.put(peer, HOP, first.stream);
        assert_eq!(second.await.ok(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn forgetting_a_peer_drops_its_streams_only() {
        let (pool, peer) = pool();
        let other = PeerId::random();
        pool.put(peer, HOP, 1);
        pool.put(other, HOP, 2);
        pool.forget(&peer);
        assert_eq!(get(&pool, peer, 9).await.stream, 9);
        assert_eq!(get(&pool, other, 9).await.stream, 2);
    }
}
