//! Rate limits on the messages each peer delivers to this node. Queue quotas bound what one
//! agent holds; this bounds how fast one peer can make the node check, queue and write
//! messages, so that a peer flooding `Deliver` requests is refused past its quota
//! ([`ControlRefusal::RateLimited`]) instead of taking the store and the CPU from the others.
//! Operators' messages (`tern send`) are not counted: operators are trusted.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota};
use libp2p::PeerId;

use crate::wire::ControlRefusal;

/// The message quota of every peer: a token bucket per peer, refilled at `per_second` and
/// holding as many (a burst of one second's worth).
pub(super) struct SenderRates {
    limiter: DefaultKeyedRateLimiter<PeerId>,
    per_second: NonZeroU32,
}

impl SenderRates {
    /// Each peer may deliver `per_second` messages a second.
    pub(super) fn new(per_second: NonZeroU32) -> Self {
        SenderRates {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second)),
            per_second,
        }
    }

    /// Counts one message from `peer`.
    ///
    /// # Errors
    ///
    /// [`ControlRefusal::RateLimited`] if `peer` is over its quota.
    pub(super) fn admit(&self, peer: &PeerId) -> Result<(), ControlRefusal> {
        self.limiter
            .check_key(peer)
            .map_err(|_| ControlRefusal::RateLimited {
                per_second: self.per_second.get(),
            })
    }

    /// Drops the buckets that are full again (their peers sent nothing for a second): what
    /// this keeps grows with the peers sending now, not with every peer ever seen.
    pub(super) fn collect(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Peers with a bucket kept.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_over_its_quota_is_refused_and_others_are_not() {
        let rates = SenderRates::new(NonZeroU32::new(5).unwrap());
        let (flooder, other) = (PeerId::random(), PeerId::random());
        for _ in 0..5 {
            rates.admit(&flooder).expect("within the burst");
        }
        assert_eq!(
            rates.admit(&flooder),
            Err(ControlRefusal::RateLimited { per_second: 5 })
        );
        rates.admit(&other).expect("another peer has its own quota");
        // A second later the bucket is full again and is collected.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        rates.admit(&flooder).expect("refilled");
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        rates.collect();
        assert_eq!(rates.tracked(), 0);
    }
}
