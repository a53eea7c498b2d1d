//! Bytes on the wire, counted per protocol and paced to the node's upload cap: every stream a
//! node opens or accepts is a [`CountedStream`], which adds what it writes and reads to its
//! protocol's counters, and writes no faster than the node's [`UploadCap`] lets all its streams
//! together. What is counted and paced is what tern's protocols carry (frames and continuation
//! bytes), not the transport's own (noise, yamux, identify, Kademlia, ping): the figure an
//! agent's traffic is judged by, and nearly all of a node's upload.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use futures::{AsyncRead, AsyncWrite};

use super::accept::Protocol;
use crate::wire::WireBytes;

/// One protocol's counters.
#[derive(Default, Debug)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// `mbit_per_second` if it can be an upload cap: a finite number above 0.
///
/// # Errors
///
/// What is wrong with it, as a configuration error says it.
pub fn check_upload_mbit(mbit_per_second: f64) -> Result<f64, String> {
    if mbit_per_second.is_finite() && mbit_per_second > 0.0 {
        Ok(mbit_per_second)
    } else {
        Err(format!(
            "upload_mbit must be a positive number of Mbit/s, not {mbit_per_second}"
        ))
    }
}

/// The node's counters, one pair per protocol, and its upload cap.
#[derive(Default, Debug)]
pub(super) struct WireCounters {
    hop: Arc<Counters>,
    package: Arc<Counters>,
    control: Arc<Counters>,
    client: Arc<Counters>,
    resource: Arc<Counters>,
    cap: Option<Arc<UploadCap>>,
}

/// A node's upload cap (`[limits] upload_mbit`): a token bucket all its streams write through.
/// A write goes out while the bucket holds tokens, and takes what it wrote (the bucket may go
/// into debt by one write); a stream that finds it empty waits until it refills. The bucket
/// holds at most [`UploadCap::BURST`] of sending, so an idle node does not save up a burst.
#[derive(Debug)]
pub(super) struct UploadCap {
    bytes_per_second: f64,
    /// Tokens (bytes) and when they were last counted. A `std` mutex held for the arithmetic.
    bucket: Mutex<(f64, Instant)>,
}

impl UploadCap {
    /// How much sending the bucket holds at most.
    const BURST: Duration = Duration::from_millis(20);

    pub(super) fn new(mbit_per_second: f64) -> UploadCap {
        UploadCap {
            bytes_per_second: mbit_per_second * 1e6 / 8.0,
            bucket: Mutex::new((0.0, Instant::now())),
        }
    }

    /// The tokens now, refilled since they were last counted.
    fn refill(&self, bucket: &mut (f64, Instant)) {
        let now = Instant::now();
        let most = (self.bytes_per_second * Self::BURST.as_secs_f64()).max(16_384.0);
        bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * self.bytes_per_second)
            .min(most);
        bucket.1 = now;
    }

    /// None if a write may go out now; else how long until it may.
    fn wait(&self) -> Option<Duration> {
        let mut bucket = super::lock(&self.bucket);
        self.refill(&mut bucket);
        (bucket.0 <= 0.0).then(|| Duration::from_secs_f64((1.0 - bucket.0) / self.bytes_per_second))
    }

    /// `bytes` went out.
    fn take(&self, bytes: usize) {
        let mut bucket = super::lock(&self.bucket);
        self.refill(&mut bucket);
        bucket.0 -= bytes as f64;
    }
}

impl WireCounters {
    /// Counters for a node whose upload is capped at `mbit_per_second` (none: not capped).
    pub(super) fn with_cap(mbit_per_second: Option<f64>) -> WireCounters {
        WireCounters {
            cap: mbit_per_second.map(|m| Arc::new(UploadCap::new(m))),
            ..WireCounters::default()
        }
    }

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
            cap: self.cap.clone(),
            paused: None,
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

/// A stream whose bytes count for its protocol, written no faster than the node's cap.
pub(super) struct CountedStream {
    inner: libp2p::Stream,
    counters: Arc<Counters>,
    cap: Option<Arc<UploadCap>>,
    /// Until when a write waits for the cap's bucket to refill.
    paused: Option<Pin<Box<Sleep>>>,
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
        if let Some(cap) = &this.cap {
            loop {
                if let Some(paused) = &mut this.paused {
                    std::task::ready!(paused.as_mut().poll(cx));
                    this.paused = None;
                }
                match cap.wait() {
                    None => break,
                    Some(wait) => this.paused = Some(Box::pin(tokio::time::sleep(wait))),
                }
            }
        }
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            this.counters.sent.fetch_add(*n as u64, Ordering::Relaxed);
            if let Some(cap) = &this.cap {
                cap.take(*n);
            }
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
