//! Hop signatures checked in batches.
//!
//! Checking an ed25519 signature is the largest single cost of receiving a hop (about 50 µs
//! here, a fifth of a node's CPU with 200 agents hopping). Checked together, signatures cost
//! about half as much from 8 on ([`security::check_signatures`]). A node receiving many hops at
//! once has them: each arrival queues its envelope, lets the other tasks ready to run queue
//! theirs, then checks whatever is queued — its own included, unless another arrival took it
//! first, in which case that one sends it the result. An arrival while no other hop is being
//! received checks its own at once, without waiting a turn. The check runs on the arrival's
//! task, as a single check did before.

use std::sync::{Mutex, PoisonError};

use security::{check_signatures, HopEnvelope, SignatureChecked};
use tokio::sync::oneshot;

/// The most envelopes checked in one batch (beyond 8 the cost per signature no longer falls).
const MAX_BATCH: usize = 32;

/// Envelopes waiting for their signature check, shared by a node's arrivals.
#[derive(Default)]
pub struct BatchVerifier {
    queue: Mutex<Vec<Queued>>,
}

/// An envelope and where its result goes.
type Queued = (HopEnvelope, oneshot::Sender<Option<SignatureChecked>>);

impl BatchVerifier {
    /// Checks the signature of `envelope` (with those of the other envelopes queued meanwhile):
    /// a proof for [`security::HopCheck::with_signature_checked`] if it verifies. With
    /// `others_arriving` (other hops are being received), it first waits one turn for theirs.
    pub async fn check(
        &self,
        envelope: HopEnvelope,
        others_arriving: bool,
    ) -> Option<SignatureChecked> {
        let (reply, result) = oneshot::channel();
        self.lock().push((envelope, reply));
        if others_arriving {
            tokio::task::yield_now().await;
        }
        // Whatever is queued now holds this envelope, unless another arrival took it already
        // (then that one sends its result).
        let queued = std::mem::take(&mut *self.lock());
        let mut queued = queued.into_iter().peekable();
        while queued.peek().is_some() {
            let batch: Vec<Queued> = queued.by_ref().take(MAX_BATCH).collect();
            let envelopes: Vec<&HopEnvelope> = batch.iter().map(|(e, _)| e).collect();
            let proofs = check_signatures(&envelopes);
            for ((_, reply), proof) in batch.into_iter().zip(proofs) {
                // The arrival may have given up meanwhile; nothing to do then.
                let _ = reply.send(proof);
            }
        }
        result.await.unwrap_or(None)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        // Only pushes and drains happen under the lock: a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl std::fmt::Debug for BatchVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchVerifier")
            .field("queued", &self.lock().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use security::{AgentId, HopCheck, HopFields, PackageHash, SecretKey, FIRST_HOP};
    use std::sync::Arc;

    fn envelope(from: &SecretKey, to: &SecretKey, n: u8) -> HopEnvelope {
        HopEnvelope::sign(
            HopFields {
                agent_id: AgentId([n; 16]),
                hop: FIRST_HOP,
                package_hash: PackageHash([1; 32]),
                continuation_hash: [n; 32],
                previous: None,
                from: from.public(),
                to: to.public(),
                time_ms: 0,
            },
            from,
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checks_each_get_their_own_result() {
        let (a, b) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
        let verifier = Arc::new(BatchVerifier::default());
        let tasks: Vec<_> = (0..40u8)
            .map(|n| {
                let mut e = envelope(&a, &b, n);
                // Every fifth is forged: the signature of another envelope.
                if n % 5 == 0 {
                    e = forged(&e, &envelope(&a, &b, n.wrapping_add(100)));
                }
                let verifier = verifier.clone();
                tokio::spawn(async move {
                    let proof = verifier.check(e.clone(), true).await;
                    (n, e, proof)
                })
            })
            .collect();
        let me = b.public();
        for task in tasks {
            let (n, e, proof) = task.await.unwrap();
            assert_eq!(proof.is_some(), n % 5 != 0, "envelope {n}");
            let (from, package, ch) = {
                let f = e.fields();
                (f.from, f.package_hash, f.continuation_hash)
            };
            let ctx = HopCheck::new(&from, &me, &package, &ch).with_signature_checked(proof);
            assert_eq!(security::verify_hop(e, &ctx).is_ok(), n % 5 != 0);
        }
        assert!(verifier.lock().is_empty());
    }

    /// `e` with the signature of `other`.
    fn forged(e: &HopEnvelope, other: &HopEnvelope) -> HopEnvelope {
        let mut bytes = e.encode();
        let n = bytes.len();
        bytes[n - 64..].copy_from_slice(other.signature());
        HopEnvelope::decode(&bytes).unwrap()
    }
}
