//! Bytes on the wire, counted per protocol: every stream a node opens or accepts is a
//! [`CountedStream`], which adds what it writes and reads to its protocol's counters. What is
//! counted is what tern's protocols carry (frames and continuation bytes), not the transport's
//! own (noise, yamux, identify, Kademlia, ping): the figure an agent's traffic is judged by.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{AsyncRead, AsyncWrite};

use super::accept::Protocol;
use crate::wire::WireBytes;

/// One protocol's counters.
#[derive(Default, Debug)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// The node's counters, one pair per protocol.
#[derive(Default, Debug)]
pub(super) struct WireCounters {
    hop: Arc<Counters>,
    package: Arc<Counters>,
    control: Arc<Counters>,
    client: Arc<Counters>,
    resource: Arc<Counters>,
}

impl WireCounters {
    fn of(&self, protocol: Protocol) -> &Arc<Counters> {
        match protocol {
            Protocol::Hop => &self.hop,
            Protocol::Package => &self.package,
            Protocol::Control => &self.control,
            Protocol::Client => &self.client,
            Protocol::Resource => &self.resource,
        }
    }

    /// `stream`, counted as `protocol`'s.
    pub(super) fn count(&self, protocol: Protocol, stream: libp2p::Stream) -> CountedStream {
        CountedStream {
            inner: stream,
            counters: self.of(protocol).clone(),
        }
    }

    /// What this node sent and received so far, by protocol.
    pub(super) fn snapshot(&self) -> WireBytes {
        let pair = |c: &Counters| {
            (
                c.sent.load(Ordering::Relaxed),
                c.received.load(Ordering::Relaxed),
            )
        };
        WireBytes {
            hop: pair(&self.hop),
            package: pair(&self.package),
            control: pair(&self.control),
            client: pair(&self.client),
            resource: pair(&self.resource),
        }
    }
}

/// A stream whose bytes count for its protocol.
pub(super) struct CountedStream {
    inner: libp2p::Stream,
    counters: Arc<Counters>,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &read {
            this.counters
                .received
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        read
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            this.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
