//! Hop envelopes through the public API: the chain of custody and every way a hop is refused.

mod common;

use common::*;
use security::*;

struct Mesh {
    a: SecretKey,
    b: SecretKey,
    c: SecretKey,
    package: PackageHash,
}

fn mesh() -> Mesh {
    Mesh {
        a: key(10),
        b: key(11),
        c: key(12),
        package: package().hash(),
    }
}

const STATE: &[u8] = b"continuation bytes";

fn check<'a>(
    sender: &'a PublicKey,
    me: &'a PublicKey,
    package: &'a PackageHash,
    continuation: &'a [u8; 32],
) -> HopCheck<'a> {
    HopCheck::new(sender, me, package, continuation)
}

#[test]
fn a_chain_of_three_hops_verifies() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (a, b, c) = (m.a.public(), m.b.public(), m.c.public());

    // a -> b, first hop
    let e1 = hop(None, &m.a, &b, m.package, STATE);
    let v1 = verify_hop(e1.clone(), &check(&a, &b, &m.package, &ch)).unwrap();
    assert_eq!(v1.hash(), e1.hash());

    // b -> c, presenting e1 as custody
    let e2 = hop(Some(&e1), &m.b, &c, m.package, STATE);
    let v2 = verify_hop(
        e2.clone(),
        &check(&b, &c, &m.package, &ch).with_previous(Some(&e1)),
    )
    .unwrap();
    assert_eq!(v2.fields().hop, 2);

    // c -> b; b has seen hop 2 (it sent it), so hop 3 is new to it.
    let e3 = hop(Some(&e2), &m.c, &b, m.package, STATE);
    let v3 = verify_hop(
        e3,
        &check(&c, &b, &m.package, &ch)
            .with_previous(Some(&e2))
            .with_last_seen(Some(e2.last_hop()))
            .with_clock(T0, 0),
    )
    .unwrap();
    assert_eq!(v3.last_hop().hop, 3);
    assert_eq!(v3.fields().previous, Some(e2.hash()));
}

#[test]
fn encode_decode_round_trip_and_hash() {
    let m = mesh();
    let e = hop(None, &m.a, &m.b.public(), m.package, STATE);
    let bytes = e.encode();
    assert_eq!(&bytes[..8], ENVELOPE_MAGIC);
    assert!(bytes.len() <= 400, "{}", bytes.len());
    let back = HopEnvelope::decode(&bytes).unwrap();
    assert_eq!(back, e);
    assert_eq!(back.hash().0, *blake3::hash(&bytes).as_bytes());
    assert_eq!(e.hash(), back.hash());
    let e2 = hop(Some(&e), &m.b, &m.c.public(), m.package, STATE);
    assert_eq!(HopEnvelope::decode(&e2.encode()), Ok(e2));
}

#[test]
fn forged_signature_is_bad_signature() {
    let m = mesh();
    let (a, b) = (m.a.public(), m.b.public());
    let ch = continuation_hash(STATE);
    // Signed by c, but claims to be from a (c cannot sign as a through the API, so splice).
    let genuine = hop(None, &m.a, &b, m.package, STATE);
    let mut fields = genuine.fields().clone();
    fields.from = m.c.public();
    let by_c = HopEnvelope::sign(fields, &m.c).unwrap();
    let mut bytes = genuine.encode();
    let n = bytes.len();
    bytes[n - 64..].copy_from_slice(by_c.signature());
    let forged = HopEnvelope::decode(&bytes).unwrap();
    assert_eq!(
        verify_hop(forged, &check(&a, &b, &m.package, &ch)),
        Err(HopError::BadSignature)
    );
    // A field changed after signing.
    let mut bytes = genuine.encode();
    let pos = bytes.windows(32).position(|w| w == ch).unwrap();
    bytes[pos] ^= 1;
    let tampered = HopEnvelope::decode(&bytes).unwrap();
    let mut other_ch = ch;
    other_ch[0] ^= 1;
    assert_eq!(
        verify_hop(tampered, &check(&a, &b, &m.package, &other_ch)),
        Err(HopError::BadSignature)
    );
}

#[test]
fn envelope_relayed_by_another_peer_is_sender_mismatch() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let e = hop(None, &m.a, &m.b.public(), m.package, STATE);
    let c = m.c.public();
    assert_eq!(
        verify_hop(e, &check(&c, &m.b.public(), &m.package, &ch)),
        Err(HopError::SenderMismatch {
            claimed: Box::new(m.a.public()),
            peer: Box::new(c)
        })
    );
}

#[test]
fn sign_refuses_a_key_other_than_from() {
    let m = mesh();
    let e = hop(None, &m.a, &m.b.public(), m.package, STATE);
    assert_eq!(
        HopEnvelope::sign(e.fields().clone(), &m.c),
        Err(HopError::SignerNotSender)
    );
}

#[test]
fn misaddressed_hop_is_refused() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let e = hop(None, &m.a, &m.b.public(), m.package, STATE);
    assert_eq!(
        verify_hop(e, &check(&m.a.public(), &m.c.public(), &m.package, &ch)),
        Err(HopError::Misaddressed {
            to: Box::new(m.b.public())
        })
    );
}

#[test]
fn same_envelope_again_is_duplicate_and_older_hop_is_replayed() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (a, b) = (m.a.public(), m.b.public());
    let e1 = hop(None, &m.a, &b, m.package, STATE);
    let seen = verify_hop(e1.clone(), &check(&a, &b, &m.package, &ch))
        .unwrap()
        .last_hop();
    assert_eq!(
        verify_hop(
            e1.clone(),
            &check(&a, &b, &m.package, &ch).with_last_seen(Some(seen))
        ),
        Err(HopError::Duplicate { hop: 1 })
    );
    // A different, genuine envelope with the same hop number (e.g. re-signed later).
    let mut fields = e1.fields().clone();
    fields.time_ms += 1;
    let again = HopEnvelope::sign(fields, &m.a).unwrap();
    assert_eq!(
        verify_hop(
            again,
            &check(&a, &b, &m.package, &ch).with_last_seen(Some(seen))
        ),
        Err(HopError::Replayed {
            hop: 1,
            last_seen: 1
        })
    );
}

#[test]
fn skipped_hop_is_out_of_order() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (b, c) = (m.b.public(), m.c.public());
    let e1 = hop(None, &m.a, &b, m.package, STATE);
    let mut fields = hop(Some(&e1), &m.b, &c, m.package, STATE).fields().clone();
    fields.hop = 3;
    let skipping = HopEnvelope::sign(fields, &m.b).unwrap();
    assert_eq!(
        verify_hop(
            skipping,
            &check(&b, &c, &m.package, &ch).with_previous(Some(&e1))
        ),
        Err(HopError::OutOfOrder {
            hop: 3,
            expected: 2
        })
    );
    // A later hop presented without its previous envelope.
    let e2 = hop(Some(&e1), &m.b, &c, m.package, STATE);
    assert_eq!(
        verify_hop(e2, &check(&b, &c, &m.package, &ch)),
        Err(HopError::OutOfOrder {
            hop: 2,
            expected: FIRST_HOP
        })
    );
}

#[test]
fn wrong_previous_hash_is_previous_mismatch() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (b, c) = (m.b.public(), m.c.public());
    let e1 = hop(None, &m.a, &b, m.package, STATE);
    let mut fields = hop(Some(&e1), &m.b, &c, m.package, STATE).fields().clone();
    fields.previous = Some(EnvelopeHash([7; 32]));
    let e2 = HopEnvelope::sign(fields, &m.b).unwrap();
    assert_eq!(
        verify_hop(e2, &check(&b, &c, &m.package, &ch).with_previous(Some(&e1))),
        Err(HopError::PreviousMismatch)
    );
}

#[test]
fn previous_addressed_elsewhere_is_no_custody() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (b, c) = (m.b.public(), m.c.public());
    // e1 went a -> c, yet b claims to move the agent on.
    let e1 = hop(None, &m.a, &c, m.package, STATE);
    let e2 = hop(Some(&e1), &m.b, &c, m.package, STATE);
    assert!(matches!(
        verify_hop(e2, &check(&b, &c, &m.package, &ch).with_previous(Some(&e1))),
        Err(HopError::NoCustody { .. })
    ));
}

#[test]
fn forged_previous_is_no_custody() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (b, c) = (m.b.public(), m.c.public());
    // b fabricates "a sent it to me" without a's key.
    let genuine = hop(None, &m.a, &b, m.package, STATE);
    let mut fake = genuine.encode();
    let n = fake.len();
    fake[n - 1] ^= 1;
    let fake = HopEnvelope::decode(&fake).unwrap();
    let e2 = hop(Some(&fake), &m.b, &c, m.package, STATE);
    assert_eq!(
        verify_hop(
            e2,
            &check(&b, &c, &m.package, &ch).with_previous(Some(&fake))
        ),
        Err(HopError::NoCustody {
            reason: "previous envelope signature does not verify"
        })
    );
}

#[test]
fn package_and_continuation_must_match_what_arrived() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (a, b) = (m.a.public(), m.b.public());
    let e = hop(None, &m.a, &b, m.package, STATE);
    let other = PackageHash([9; 32]);
    assert_eq!(
        verify_hop(e.clone(), &check(&a, &b, &other, &ch)),
        Err(HopError::PackageMismatch {
            in_envelope: m.package,
            offered: other
        })
    );
    let other_ch = continuation_hash(b"something else");
    assert_eq!(
        verify_hop(e, &check(&a, &b, &m.package, &other_ch)),
        Err(HopError::ContinuationMismatch)
    );
}

#[test]
fn envelope_from_the_future_is_refused_beyond_the_skew() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (a, b) = (m.a.public(), m.b.public());
    let e = hop(None, &m.a, &b, m.package, STATE);
    let ok = check(&a, &b, &m.package, &ch).with_clock(T0 - 1_000, 1_000);
    assert!(verify_hop(e.clone(), &ok).is_ok());
    let late = check(&a, &b, &m.package, &ch).with_clock(T0 - 1_001, 1_000);
    assert_eq!(
        verify_hop(e, &late),
        Err(HopError::FromTheFuture {
            time_ms: T0,
            now_ms: T0 - 1_001
        })
    );
}

#[test]
fn every_flipped_bit_is_caught() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (a, b) = (m.a.public(), m.b.public());
    let e = hop(None, &m.a, &b, m.package, STATE);
    let bytes = e.encode();
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[i] ^= 1 << bit;
            if let Ok(env) = HopEnvelope::decode(&flipped) {
                assert!(
                    verify_hop(env, &check(&a, &b, &m.package, &ch)).is_err(),
                    "bit {bit} of byte {i}"
                );
            }
        }
    }
}

#[test]
fn truncations_and_oversize_are_decode_errors() {
    let m = mesh();
    let bytes = hop(None, &m.a, &m.b.public(), m.package, STATE).encode();
    for len in 0..bytes.len() {
        assert!(HopEnvelope::decode(&bytes[..len]).is_err());
    }
    let big = vec![0u8; MAX_ENVELOPE_BYTES + 1];
    assert!(matches!(
        HopEnvelope::decode(&big),
        Err(DecodeError::Oversized { .. })
    ));
    assert!(matches!(
        HopEnvelope::decode(b"TERNPKG\x01"),
        Err(DecodeError::BadMagic { .. })
    ));
}

#[test]
fn agent_id_text_round_trips() {
    let home = SecretKey::generate().public();
    let id = AgentId::launched(&home, &LaunchNonce::generate());
    assert_eq!(id.to_string().len(), 32);
    assert_eq!(id.to_string().parse::<AgentId>(), Ok(id));
    assert_ne!(AgentId::launched(&home, &LaunchNonce::generate()), id);
}

#[test]
fn an_agent_id_names_the_home_and_nonce_it_was_launched_with() {
    let (home, other) = (
        SecretKey::generate().public(),
        SecretKey::generate().public(),
    );
    let nonce = LaunchNonce::generate();
    let id = AgentId::launched(&home, &nonce);
    assert_eq!(AgentId::launched(&home, &nonce), id, "derived, not drawn");
    assert!(id.is_launched_by(&home, &nonce));
    assert!(!id.is_launched_by(&other, &nonce));
    assert!(!id.is_launched_by(&home, &LaunchNonce::generate()));
}

#[test]
fn a_previous_known_genuine_skips_only_its_signature_check() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (b, c) = (m.b.public(), m.c.public());
    let genuine = hop(None, &m.a, &b, m.package, STATE);
    let mut fake = genuine.encode();
    let n = fake.len();
    fake[n - 1] ^= 1;
    let fake = HopEnvelope::decode(&fake).unwrap();
    let e2 = hop(Some(&fake), &m.b, &c, m.package, STATE);
    // Trusting the previous envelope is the caller's word; the chain checks still run.
    let trusted = check(&b, &c, &m.package, &ch)
        .with_previous(Some(&fake))
        .with_previous_known_genuine(true);
    assert!(verify_hop(e2.clone(), &trusted).is_ok());
    let elsewhere = hop(None, &m.a, &c, m.package, STATE);
    assert_eq!(
        verify_hop(
            e2,
            &check(&b, &c, &m.package, &ch)
                .with_previous(Some(&elsewhere))
                .with_previous_known_genuine(true)
        ),
        Err(HopError::PreviousMismatch)
    );
}

#[test]
fn decode_known_reuses_known_keys_and_checks_the_others() {
    let m = mesh();
    let e = hop(None, &m.a, &m.b.public(), m.package, STATE);
    let bytes = e.encode();
    for known in [vec![], vec![m.a.public()], vec![m.b.public(), m.c.public()]] {
        let lookup = |b: &[u8; 32]| known.iter().copied().find(|k| k.to_bytes() == *b);
        assert_eq!(HopEnvelope::decode_known(&bytes, lookup).unwrap(), e);
    }
    // A lookup that answers with another key than the bytes name is not believed.
    let liar = |_: &[u8; 32]| Some(m.c.public());
    assert_eq!(HopEnvelope::decode_known(&bytes, liar).unwrap(), e);
    // A key that is not a valid point is refused whatever the receiver knows.
    let mut bad = bytes.clone();
    let at = bytes
        .windows(32)
        .position(|w| w == m.b.public().to_bytes())
        .unwrap();
    let invalid = (2u8..)
        .map(|y| {
            let mut k = [0u8; 32];
            k[0] = y;
            k
        })
        .find(|k| PublicKey::from_bytes(k).is_err())
        .unwrap();
    bad[at..at + 32].copy_from_slice(&invalid);
    let known = [m.a.public(), m.c.public()];
    let lookup = |b: &[u8; 32]| known.iter().copied().find(|k| k.to_bytes() == *b);
    assert!(HopEnvelope::decode_known(&bad, lookup).is_err());
}

/// An envelope like `genuine` but with these signature bytes.
fn with_signature(genuine: &HopEnvelope, signature: &[u8; 64]) -> HopEnvelope {
    let mut bytes = genuine.encode();
    let n = bytes.len();
    bytes[n - 64..].copy_from_slice(signature);
    HopEnvelope::decode(&bytes).unwrap()
}

#[test]
fn signatures_checked_together_give_a_proof_for_each_genuine_one_only() {
    let m = mesh();
    let b = m.b.public();
    let ch = continuation_hash(STATE);
    let senders = [&m.a, &m.c, &m.a, &m.c, &m.a, &m.c, &m.a, &m.c, &m.a];
    let genuine: Vec<HopEnvelope> = senders
        .iter()
        .enumerate()
        .map(|(i, k)| hop(None, k, &b, m.package, &STATE[..STATE.len() - i]))
        .collect();

    // All genuine: a proof each, and each proof lets its own envelope through.
    let all: Vec<&HopEnvelope> = genuine.iter().collect();
    let proofs = check_signatures(&all);
    assert!(proofs.iter().all(Option::is_some), "{proofs:?}");
    for (i, (e, proof)) in genuine.iter().zip(&proofs).enumerate() {
        let ch = continuation_hash(&STATE[..STATE.len() - i]);
        let sender = e.fields().from;
        let ctx = check(&sender, &b, &m.package, &ch).with_signature_checked(*proof);
        assert!(verify_hop(e.clone(), &ctx).is_ok());
    }

    // One signed by another key, one with a small-order nonce (R = the identity, s = 0):
    // refused, the others still proven.
    let by_c = HopEnvelope::sign(
        HopFields {
            from: m.c.public(),
            ..genuine[2].fields().clone()
        },
        &m.c,
    )
    .unwrap();
    let forged = with_signature(&genuine[2], by_c.signature());
    let mut small = [0u8; 64];
    small[0] = 1;
    let small_order = with_signature(&genuine[5], &small);
    let mut mixed = all.clone();
    mixed[2] = &forged;
    mixed[5] = &small_order;
    let proofs = check_signatures(&mixed);
    for (i, proof) in proofs.iter().enumerate() {
        assert_eq!(proof.is_some(), i != 2 && i != 5, "envelope {i}: {proof:?}");
    }

    // A proof is for its own envelope only: handed in with another, the signature is checked.
    let proof_of_genuine = check_signatures(&[&genuine[0]])[0];
    assert!(proof_of_genuine.is_some());
    let a = m.a.public();
    let forged_first = with_signature(&genuine[0], genuine[1].signature());
    assert_eq!(
        verify_hop(
            forged_first,
            &check(&a, &b, &m.package, &ch).with_signature_checked(proof_of_genuine)
        ),
        Err(HopError::BadSignature)
    );
    assert!(check_signatures(&[]).is_empty());
}

#[test]
fn envelope_dated_before_the_hop_it_follows_is_refused_beyond_the_skew() {
    let m = mesh();
    let ch = continuation_hash(STATE);
    let (b, c) = (m.b.public(), m.c.public());
    let e1 = hop(None, &m.a, &b, m.package, STATE);
    let dated = |time_ms| {
        let mut fields = hop(Some(&e1), &m.b, &c, m.package, STATE).fields().clone();
        fields.time_ms = time_ms;
        HopEnvelope::sign(fields, &m.b).unwrap()
    };
    let ctx = check(&b, &c, &m.package, &ch)
        .with_previous(Some(&e1))
        .with_clock(T0, 1_000);
    assert!(
        verify_hop(dated(T0 - 1_000), &ctx).is_ok(),
        "within the skew"
    );
    assert_eq!(
        verify_hop(dated(T0 - 1_001), &ctx),
        Err(HopError::BeforeItsPrevious {
            time_ms: T0 - 1_001,
            previous_ms: T0
        })
    );
    // Without a clock, times are not compared.
    let no_clock = check(&b, &c, &m.package, &ch).with_previous(Some(&e1));
    assert!(verify_hop(dated(0), &no_clock).is_ok());
}
