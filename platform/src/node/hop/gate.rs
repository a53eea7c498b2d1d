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
    /// progress; a "no" shuts out the offer with envelope hash `envelope` for good. A store
    /// error is an error, never a "no".
    ///
    /// A receipt stuck past twice the I/O timeout is not waited for any longer. It already
    /// passed [`ArrivalGate::enter`], so the offer is shut out first, and then the hop is
    /// looked for by `seen_in_order`, a read ordered with the store's writes. The receipt's own
    /// write looks at [`ArrivalGate::abandoned`]: stored before that read, the hop is seen;
    /// after, the write refuses it. Either way, the answer stays true.
    pub(in crate::node) async fn held<F>(
        &self,
        key: HopKey,
        envelope: Option<[u8; 32]>,
        seen: impl Fn(&str, u64) -> Result<bool, StoreError>,
        seen_in_order: impl FnOnce(String, u64) -> F,
    ) -> Result<bool, StoreError>
    where
        F: std::future::Future<Output = Result<bool, StoreError>>,
    {
        let deadline = Instant::now() + 2 * IO_TIMEOUT;
        loop {
            {
                let mut state = lock(&self.state);
                if !state.arriving.contains(&key) {
                    let held = seen(&key.0, key.1)?;
                    if !held {
                        if let Some(hash) = envelope {
                            state.abandon(hash);
                        }
                    }
                    return Ok(held);
                }
                if Instant::now() > deadline {
                    if let Some(hash) = envelope {
                        state.abandon(hash);
                    }
                    break;
                }
            }
            tokio::time::sleep(POLL).await;
        }
        let held = seen_in_order(key.0, key.1).await;
        if let (Some(hash), Ok(true) | Err(_)) = (envelope, &held) {
            // Held after all, or unknown: nothing to shut out.
            lock(&self.state).abandoned.remove(&hash);
        }
        held
    }

    /// Whether the offer with this envelope hash was answered "not held" (its receipt must not
    /// be stored): looked at by the receipt's store write.
    pub(in crate::node) fn abandoned(&self, envelope: &[u8; 32]) -> bool {
        lock(&self.state).abandoned.contains_key(envelope)
    }
}

impl GateState {
    fn abandon(&mut self, envelope: [u8; 32]) {
        self.abandoned
            .retain(|_, since| since.elapsed() < ABANDONED_MEMORY);
        self.abandoned.insert(envelope, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hop: u64) -> HopKey {
        ("agent-1".to_string(), hop)
    }

    fn inconsistent() -> StoreError {
        StoreError::Inconsistent {
            table: "seen",
            key: "agent-1".into(),
            what: "test failure",
        }
    }

    /// The read ordered with the store's writes, for answers that must not reach it.
    async fn unreachable_read(_: String, _: u64) -> Result<bool, StoreError> {
        panic!("only a receipt stuck past the deadline reads in order")
    }

    /// A receipt stuck past the deadline: the offer is shut out before the hop is looked for
    /// (so that the receipt's write, ordered with that read, either is seen by it or refuses
    /// itself), and stays shut out on a "no"; a "yes" or an error lifts it.
    #[tokio::test(start_paused = true)]
    async fn past_the_deadline_the_offer_is_shut_out_before_the_read() {
        let gate = ArrivalGate::default();
        let _stuck = gate.enter(key(1), [4; 32]).await.expect("enters");
        for (answer, shut_out) in [(Ok(false), true), (Ok(true), false), (Err(()), false)] {
            let held = gate
                .held(
                    key(1),
                    Some([4; 32]),
                    |_, _| panic!("a receipt is in progress"),
                    |_, _| {
                        let shut = gate.abandoned(&[4; 32]);
                        async move {
                            assert!(shut, "shut out before the read");
                            answer.map_err(|()| inconsistent())
                        }
                    },
                )
                .await;
            assert_eq!(held.is_ok(), answer.is_ok());
            assert_eq!(gate.abandoned(&[4; 32]), shut_out, "{answer:?}");
        }
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
        let held = gate
            .held(key(1), Some([9; 32]), |_, _| Ok(false), unreachable_read)
            .await;
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
        let answer = gate.held(key(1), Some([1; 32]), |_, _| Ok(true), unreachable_read);
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
            .held(
                key(1),
                Some([7; 32]),
                |_, _| Err(inconsistent()),
                unreachable_read,
            )
            .await;
        assert!(held.is_err());
        assert!(gate.enter(key(1), [7; 32]).await.is_ok());
    }
}
