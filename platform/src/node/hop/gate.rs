//! The destination's record of hops in progress, so that a source asking about a hop whose
//! acknowledgement it lost (`ControlRequest::HopStatus`) gets an answer that stays true: the
//! answer waits for a receipt of that hop still in progress, and a "not held" shuts that offer
//! out should it still come in late.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::node::lock;
use crate::store::StoreError;
use crate::wire::{HopRefusal, IO_TIMEOUT};

/// How long an abandoned offer is remembered (far longer than any stream stays open).
const ABANDONED_MEMORY: Duration = Duration::from_secs(600);

/// How often a receipt or an answer waiting for another receipt looks again.
const POLL: Duration = Duration::from_millis(5);

/// (agent, hop).
type HopKey = (String, u64);

/// Hops being received right now and offers their senders gave up on. A `std` mutex held for
/// a set operation, or for one store read while answering whether a hop is held (so that no
/// receipt of that hop starts between the read and the answer).
#[derive(Default)]
pub(in crate::node) struct ArrivalGate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    /// (agent, hop) being received now: the answer about them waits.
    arriving: HashSet<HopKey>,
    /// Envelope hashes of offers answered "not held": if one still comes in, it is refused.
    abandoned: HashMap<[u8; 32], Instant>,
}

/// Holds (agent, hop) in the gate while a hop is received.
pub(in crate::node) struct Arriving<'a> {
    gate: &'a ArrivalGate,
    key: HopKey,
}

impl Drop for Arriving<'_> {
    fn drop(&mut self) {
        lock(&self.gate.state).arriving.remove(&self.key);
    }
}

impl ArrivalGate {
    /// Enters the receipt of (agent, hop) with this envelope: waits while another receipt of
    /// the same hop is in progress (a sender's retry); refuses an offer its sender gave up on.
    pub(in crate::node) async fn enter(
        &self,
        key: HopKey,
        envelope: [u8; 32],
    ) -> Result<Arriving<'_>, HopRefusal> {
        loop {
            {
                let mut state = lock(&self.state);
                if state.abandoned.contains_key(&envelope) {
                    return Err(HopRefusal::Abandoned);
                }
                if state.arriving.insert(key.clone()) {
                    return Ok(Arriving { gate: self, key });
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// How many hops are being received right now.
    pub(in crate::node) fn in_progress(&self) -> usize {
        lock(&self.state).arriving.len()
    }

    /// Whether this node holds (agent, hop) by `seen`, asked once no receipt of that hop is in
    /// progress (or, after a receipt stuck past twice the I/O timeout, anyway); a "no" shuts
    /// out the offer with envelope hash `envelope` for good. A store error is an error, never
    /// a "no".
    pub(in crate::node) async fn held(
        &self,
        key: HopKey,
        envelope: Option<[u8; 32]>,
        seen: impl Fn(&str, u64) -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        let deadline = Instant::now() + 2 * IO_TIMEOUT;
        loop {
            {
                let mut state = lock(&self.state);
                if !state.arriving.contains(&key) || Instant::now() > deadline {
                    let held = seen(&key.0, key.1)?;
                    if !held {
                        if let Some(hash) = envelope {
                            state
                                .abandoned
                                .retain(|_, since| since.elapsed() < ABANDONED_MEMORY);
                            state.abandoned.insert(hash, Instant::now());
                        }
                    }
                    return Ok(held);
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hop: u64) -> HopKey {
        ("agent-1".to_string(), hop)
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_receipt_of_the_same_hop_waits_for_the_first() {
        let gate = ArrivalGate::default();
        let first = gate.enter(key(1), [1; 32]).await.expect("enters");
        assert_eq!(gate.in_progress(), 1);
        let second = gate.enter(key(1), [2; 32]);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "the retry waits"
        );
        drop(first);
        assert!(second.await.is_ok());
        // Another hop of the same agent does not wait.
        assert!(gate.enter(key(2), [3; 32]).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_not_held_answer_shuts_that_offer_out_for_good() {
        let gate = ArrivalGate::default();
        let held = gate.held(key(1), Some([9; 32]), |_, _| Ok(false)).await;
        assert!(matches!(held, Ok(false)));
        assert!(matches!(
            gate.enter(key(1), [9; 32]).await,
            Err(HopRefusal::Abandoned)
        ));
        // Another offer of that hop is not shut out.
        assert!(gate.enter(key(1), [8; 32]).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_answer_waits_for_a_receipt_in_progress() {
        let gate = ArrivalGate::default();
        let receiving = gate.enter(key(1), [1; 32]).await.expect("enters");
        let answer = gate.held(key(1), Some([1; 32]), |_, _| Ok(true));
        tokio::pin!(answer);
        assert!(tokio::time::timeout(Duration::from_millis(50), &mut answer)
            .await
            .is_err());
        drop(receiving);
        assert!(matches!(answer.await, Ok(true)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_error_is_not_a_no_and_shuts_nothing_out() {
        let gate = ArrivalGate::default();
        let held = gate
            .held(key(1), Some([7; 32]), |_, _| {
                Err(StoreError::Inconsistent {
                    table: "seen",
                    key: "agent-1".into(),
                    what: "test failure",
                })
            })
            .await;
        assert!(held.is_err());
        assert!(gate.enter(key(1), [7; 32]).await.is_ok());
    }
}
