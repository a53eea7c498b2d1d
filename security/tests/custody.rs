//! Custody tails through the public API: a tail that leads from what the home confirmed to its
//! presenter is taken; every way a peer that never held the agent could try to claim it is not.

mod common;

use common::*;
use security::*;

/// The hops of `envelopes`, each handed over by its sender (every key in these tests is a
/// `key(n)`).
fn handed_over(envelopes: &[HopEnvelope]) -> Vec<HandedOverHop> {
    envelopes
        .iter()
        .map(|e| {
            let sender = (0..=u8::MAX)
                .map(key)
                .find(|k| k.public() == e.fields().from)
                .expect("a test key");
            HandedOverHop {
                handover: e.handover_key(&sender).expect("the sender's envelope"),
                envelope: e.clone(),
            }
        })
        .collect()
}

/// No hop is vouched for: every signature is checked.
fn none(_: &EnvelopeHash) -> Vouched {
    Vouched::default()
}

/// home -> a -> b -> c, and the envelopes of those hops.
struct Journey {
    home: SecretKey,
    a: SecretKey,
    b: SecretKey,
    c: SecretKey,
    hops: Vec<HopEnvelope>,
}

fn journey() -> Journey {
    let (home, a, b, c) = (key(20), key(21), key(22), key(23));
    let package = package().hash();
    let e1 = hop(None, &home, &a.public(), package, b"1");
    let e2 = hop(Some(&e1), &a, &b.public(), package, b"2");
    let e3 = hop(Some(&e2), &b, &c.public(), package, b"3");
    Journey {
        home,
        a,
        b,
        c,
        hops: vec![e1, e2, e3],
    }
}

#[test]
fn a_tail_from_the_launch_leads_to_its_holder() {
    let j = journey();
    let start = CustodyPoint::launched(j.home.public());
    let at = follow_custody(&agent(), &start, &handed_over(&j.hops), &j.c.public(), none).unwrap();
    assert_eq!(
        at,
        CustodyPoint {
            hop: 3,
            holder: j.c.public(),
            envelope: Some(j.hops[2].hash()),
        }
    );
    // From a later confirmed point, an overlapping tail is fine, and so is the exact rest.
    let confirmed = follow_custody(
        &agent(),
        &start,
        &handed_over(&j.hops[..1]),
        &j.a.public(),
        none,
    )
    .unwrap();
    assert_eq!(
        follow_custody(
            &agent(),
            &confirmed,
            &handed_over(&j.hops),
            &j.c.public(),
            none
        ),
        Ok(at)
    );
    assert_eq!(
        follow_custody(
            &agent(),
            &confirmed,
            &handed_over(&j.hops[1..]),
            &j.c.public(),
            none
        ),
        Ok(at)
    );
    // The holder the home confirmed needs no tail.
    assert_eq!(
        follow_custody(&agent(), &at, &handed_over(&[]), &j.c.public(), none),
        Ok(at)
    );
}

#[test]
fn a_node_that_is_not_where_the_tail_leads_is_refused() {
    let j = journey();
    let start = CustodyPoint::launched(j.home.public());
    // A former holder presenting the tail it carried, or the whole one.
    for (tail, presenter) in [(&j.hops[..2], &j.a), (&j.hops[..], &j.b)] {
        assert!(matches!(
            follow_custody(
                &agent(),
                &start,
                &handed_over(tail),
                &presenter.public(),
                none
            ),
            Err(CustodyError::NotHolder { .. })
        ));
    }
    // A tail older than what the home confirmed.
    let confirmed =
        follow_custody(&agent(), &start, &handed_over(&j.hops), &j.c.public(), none).unwrap();
    assert_eq!(
        follow_custody(
            &agent(),
            &confirmed,
            &handed_over(&j.hops[..2]),
            &j.b.public(),
            none
        ),
        Err(CustodyError::Superseded {
            hop: 2,
            confirmed: 3
        })
    );
    // Nobody but the home before the first hop.
    assert!(matches!(
        follow_custody(&agent(), &start, &handed_over(&[]), &j.a.public(), none),
        Err(CustodyError::NotHolder { .. })
    ));
}

#[test]
fn a_stranger_cannot_make_a_tail_to_itself() {
    let j = journey();
    let start = CustodyPoint::launched(j.home.public());
    let package = package().hash();
    let (stranger, throwaway) = (key(30), key(31));
    // A "previous hop" signed by a throwaway key, to the stranger: the home never sent it there.
    let forged = hop(None, &throwaway, &stranger.public(), package, b"x");
    assert_eq!(
        follow_custody(
            &agent(),
            &start,
            &handed_over(&[forged]),
            &stranger.public(),
            none
        ),
        Err(CustodyError::NotFromHolder { hop: 1 })
    );
    // Hop 4, signed by the stranger, following the real hop 3 (to c, not to the stranger).
    let e4 = hop(
        Some(&j.hops[2]),
        &stranger,
        &stranger.public(),
        package,
        b"4",
    );
    let mut tail = j.hops.clone();
    tail.push(e4.clone());
    assert_eq!(
        follow_custody(
            &agent(),
            &start,
            &handed_over(&tail),
            &stranger.public(),
            none
        ),
        Err(CustodyError::NotFromHolder { hop: 4 })
    );
    // Skipping hops, or the real hops with one left out.
    assert_eq!(
        follow_custody(
            &agent(),
            &start,
            &handed_over(&[e4]),
            &stranger.public(),
            none
        ),
        Err(CustodyError::Gap {
            expected: 1,
            found: 4
        })
    );
    assert!(matches!(
        follow_custody(
            &agent(),
            &start,
            &handed_over(&[j.hops[0].clone(), j.hops[2].clone()]),
            &j.c.public(),
            none
        ),
        Err(CustodyError::Gap { .. })
    ));
}

#[test]
fn a_tail_with_a_replaced_or_misattributed_envelope_is_refused() {
    let j = journey();
    let start = CustodyPoint::launched(j.home.public());
    let package = package().hash();
    // b signs another hop 2 to itself from a's hop 1: the from is wrong (a held the agent).
    let other2 = hop(Some(&j.hops[0]), &j.b, &j.b.public(), package, b"2'");
    assert_eq!(
        follow_custody(
            &agent(),
            &start,
            &handed_over(&[j.hops[0].clone(), other2]),
            &j.b.public(),
            none
        ),
        Err(CustodyError::NotFromHolder { hop: 2 })
    );
    // A hop 2 by a that names another envelope as its previous.
    let mut fields = j.hops[1].fields().clone();
    fields.previous = Some(j.hops[2].hash());
    let unlinked = HopEnvelope::sign(fields, &j.a).unwrap();
    assert_eq!(
        follow_custody(
            &agent(),
            &start,
            &handed_over(&[j.hops[0].clone(), unlinked]),
            &j.b.public(),
            none
        ),
        Err(CustodyError::Unlinked { hop: 2 })
    );
    // Hop 1 claiming to be from the home, signed by someone else.
    let mut fields = j.hops[0].fields().clone();
    fields.to = j.c.public();
    let original = HopEnvelope::sign(fields, &j.home).unwrap();
    let mut tampered = original.encode();
    // The `to` key sits in the CBOR; swap c's key bytes for a's, keeping the signature.
    let (c, a) = (j.c.public().to_bytes(), j.a.public().to_bytes());
    let at = tampered
        .windows(32)
        .position(|w| w == c)
        .expect("c's key is in the envelope");
    tampered[at..at + 32].copy_from_slice(&a);
    let tampered = HopEnvelope::decode(&tampered).unwrap();
    // (Its lock is the original's: the original's key opens it.)
    let tampered_hop = vec![HandedOverHop {
        envelope: tampered.clone(),
        handover: original.handover_key(&j.home).unwrap(),
    }];
    assert_eq!(
        follow_custody(&agent(), &start, &tampered_hop, &j.a.public(), none),
        Err(CustodyError::BadSignature { hop: 1 })
    );
    // Unless the caller vouches for that envelope (it signed it itself); the handover key is
    // checked all the same.
    let vouched = tampered.hash();
    let envelope_only = |h: &EnvelopeHash| Vouched {
        envelope: *h == vouched,
    };
    assert!(follow_custody(
        &agent(),
        &start,
        &tampered_hop,
        &j.a.public(),
        envelope_only
    )
    .is_ok());
    let mut not_handed_over = tampered_hop;
    not_handed_over[0].handover = [0; 32];
    assert_eq!(
        follow_custody(
            &agent(),
            &start,
            &not_handed_over,
            &j.a.public(),
            envelope_only
        ),
        Err(CustodyError::NotHandedOver { hop: 1 })
    );
    // Another agent's hop 1 from the same home.
    let mut fields = j.hops[0].fields().clone();
    fields.agent_id = AgentId([7; 16]);
    let other_agent = HopEnvelope::sign(fields, &j.home).unwrap();
    assert_eq!(
        follow_custody(
            &agent(),
            &start,
            &handed_over(&[other_agent]),
            &j.a.public(),
            none
        ),
        Err(CustodyError::OtherAgent { hop: 1 })
    );
}

/// An agent launched by `home`, and the envelopes of its journey home -> a -> b -> c.
fn anchored_journey() -> (Journey, AgentOrigin) {
    let (home, a, b, c) = (key(40), key(41), key(42), key(43));
    let origin = AgentOrigin {
        home: home.public(),
        nonce: LaunchNonce([7; 16]),
    };
    let id = AgentId::launched(&origin.home, &origin.nonce);
    let package = package().hash();
    let mut hops: Vec<HopEnvelope> = Vec::new();
    for (from, to) in [(&home, &a), (&a, &b), (&b, &c)] {
        let previous = hops.last();
        let e = HopEnvelope::sign(
            HopFields {
                agent_id: id,
                hop: previous.map_or(FIRST_HOP, |p| p.fields().hop + 1),
                package_hash: package,
                continuation_hash: continuation_hash(b"state"),
                previous: previous.map(HopEnvelope::hash),
                from: from.public(),
                to: to.public(),
                time_ms: T0,
            },
            from,
        )
        .unwrap();
        hops.push(e);
    }
    (
        Journey {
            home,
            a,
            b,
            c,
            hops,
        },
        origin,
    )
}

#[test]
fn a_destination_follows_custody_from_the_launch_or_from_a_certificate_of_the_home() {
    let (j, origin) = anchored_journey();
    let id = j.hops[0].fields().agent_id;
    let at_c = CustodyPoint {
        hop: 3,
        holder: j.c.public(),
        envelope: Some(j.hops[2].hash()),
    };
    // From the launch, the whole tail.
    assert_eq!(
        follow_anchored(
            &id,
            &origin,
            None,
            &handed_over(&j.hops),
            &j.c.public(),
            none
        ),
        Ok(at_c)
    );
    // From the home's certificate of hop 2 at b, only what came after it.
    let at_b = CustodyPoint {
        hop: 2,
        holder: j.b.public(),
        envelope: Some(j.hops[1].hash()),
    };
    let certificate = CustodyCertificate::sign(id, at_b, &j.home);
    let wire = certificate.encode();
    assert!(wire.starts_with(CERTIFICATE_MAGIC));
    let certificate = CustodyCertificate::decode_known(&wire, |_| None).unwrap();
    assert_eq!(certificate.point(), &at_b);
    assert_eq!(certificate.encode(), wire);
    assert_eq!(
        follow_anchored(
            &id,
            &origin,
            Some(&certificate),
            &handed_over(&j.hops[2..]),
            &j.c.public(),
            none
        ),
        Ok(at_c)
    );
    // Without the certificate, that short tail has nowhere to start from.
    assert!(follow_anchored(
        &id,
        &origin,
        None,
        &handed_over(&j.hops[2..]),
        &j.c.public(),
        none
    )
    .is_err());
}

#[test]
fn no_one_but_the_home_anchors_an_agents_custody() {
    let (j, origin) = anchored_journey();
    let id = j.hops[0].fields().agent_id;
    let stranger = key(44);
    // The stranger names itself the home (with the real nonce, or any other).
    for nonce in [origin.nonce, LaunchNonce([8; 16])] {
        let claimed = AgentOrigin {
            home: stranger.public(),
            nonce,
        };
        assert_eq!(
            follow_anchored(
                &id,
                &claimed,
                None,
                &handed_over(&j.hops),
                &j.c.public(),
                none
            ),
            Err(CustodyError::NotLaunchedBy {
                home: Box::new(stranger.public())
            })
        );
    }
    // A certificate of custody at the stranger: signed by the stranger, or by the home for
    // another agent, or the home's with its hop changed.
    let at_stranger = CustodyPoint {
        hop: 3,
        holder: stranger.public(),
        envelope: Some(j.hops[2].hash()),
    };
    let other = AgentId::launched(&origin.home, &LaunchNonce([9; 16]));
    let mut changed = CustodyCertificate::sign(id, at_stranger, &j.home).encode();
    // The hop is the byte after the "hop" key: 3 -> 2.
    let at = changed
        .windows(4)
        .position(|w| w == b"hop\x03")
        .expect("the hop is encoded as a small integer");
    changed[at + 3] = 2;
    let changed = CustodyCertificate::decode_known(&changed, |_| None).unwrap();
    for forged in [
        CustodyCertificate::sign(id, at_stranger, &stranger),
        CustodyCertificate::sign(other, at_stranger, &j.home),
        changed,
    ] {
        assert_eq!(
            follow_anchored(
                &id,
                &origin,
                Some(&forged),
                &handed_over(&[]),
                &stranger.public(),
                none
            ),
            Err(CustodyError::BadCertificate)
        );
    }
    // A certificate of the launch point with an envelope, or of a later point without one.
    for point in [
        CustodyPoint {
            hop: 0,
            holder: j.a.public(),
            envelope: Some(j.hops[0].hash()),
        },
        CustodyPoint {
            hop: 1,
            holder: j.a.public(),
            envelope: None,
        },
    ] {
        let odd = CustodyCertificate::sign(id, point, &j.home);
        assert_eq!(
            odd.verify(&id, &origin.home),
            Err(CustodyError::BadCertificate)
        );
    }
}

#[test]
fn certificates_decode_only_from_their_own_canonical_bytes() {
    let (j, _) = anchored_journey();
    let id = j.hops[0].fields().agent_id;
    let good =
        CustodyCertificate::sign(id, CustodyPoint::launched(j.home.public()), &j.home).encode();
    assert!(CustodyCertificate::decode_known(&good, |_| None).is_ok());
    for bad in [
        &good[..good.len() - 1],
        &good[..5],
        &j.hops[0].encode()[..],
        &[good.as_slice(), &[0]].concat()[..],
    ] {
        assert!(CustodyCertificate::decode_known(bad, |_| None).is_err());
    }
    let big = vec![0u8; MAX_CERTIFICATE_BYTES + 1];
    assert!(matches!(
        CustodyCertificate::decode_known(&big, |_| None),
        Err(DecodeError::Oversized { .. })
    ));
}

#[test]
fn a_hop_that_was_only_offered_does_not_make_custody() {
    let j = journey();
    let start = CustodyPoint::launched(j.home.public());
    // b was offered hop 2 by a, and a then sent the agent elsewhere: b holds the envelope, but
    // not the key a reveals when it hands the agent over, and cannot make it. Without it, or
    // with the lock itself, or the key of another hop:
    assert_eq!(j.hops[1].handover_key(&j.b), None);
    assert_eq!(j.hops[1].handover_key(&j.home), None);
    let mut tail = handed_over(&j.hops[..2]);
    let hop_1 = handed_over(&j.hops[..1]).remove(0).handover;
    for handover in [[0; 32], hop_1, *j.hops[1].handover_lock()] {
        tail[1].handover = handover;
        assert_eq!(
            follow_custody(&agent(), &start, &tail, &j.b.public(), none),
            Err(CustodyError::NotHandedOver { hop: 2 })
        );
    }
    // The hop's own signature checked before its handover: a forged envelope is BadSignature.
    let mut forged = handed_over(&j.hops[..2]);
    let mut fields = j.hops[1].fields().clone();
    fields.time_ms += 1;
    let other = HopEnvelope::sign(fields, &j.a).unwrap();
    let mut bytes = other.encode();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    forged[1].envelope = HopEnvelope::decode(&bytes).unwrap();
    assert_eq!(
        follow_custody(&agent(), &start, &forged, &j.b.public(), none),
        Err(CustodyError::BadSignature { hop: 2 })
    );
}

#[test]
fn a_handover_key_opens_its_own_envelope_only() {
    // a offers hop 2 to b, b does not take it, a sends the agent to c by another hop 2 instead:
    // the key a reveals to c does not open b's envelope, though it is the same agent, hop,
    // package, sender and (here) time.
    let j = journey();
    let to_b = &j.hops[1];
    let mut fields = to_b.fields().clone();
    fields.to = j.c.public();
    let to_c = HopEnvelope::sign(fields, &j.a).unwrap();
    let revealed = to_c.handover_key(&j.a).unwrap();
    assert!(to_c.handover_verifies(&revealed));
    assert!(!to_b.handover_verifies(&revealed));
    let start = CustodyPoint::launched(j.home.public());
    let mut tail = handed_over(&j.hops[..2]);
    tail[1].handover = revealed;
    assert_eq!(
        follow_custody(&agent(), &start, &tail, &j.b.public(), none),
        Err(CustodyError::NotHandedOver { hop: 2 })
    );
    // And a key is the same however often its sender computes it (a destination that lost it
    // asks again).
    assert_eq!(to_b.handover_key(&j.a), to_b.handover_key(&j.a));
}

#[test]
fn a_hop_the_home_sent_anchors_custody_without_a_certificate() {
    let (j, origin) = anchored_journey();
    let id = j.hops[0].fields().agent_id;
    let package = package().hash();
    // The agent came home by hop 3 (c -> home, not shown), and the home sends it on to a.
    let sign_hop = |from: &SecretKey, to: &SecretKey, previous: EnvelopeHash| {
        HopEnvelope::sign(
            HopFields {
                agent_id: id,
                hop: 4,
                package_hash: package,
                continuation_hash: continuation_hash(b"state"),
                previous: Some(previous),
                from: from.public(),
                to: to.public(),
                time_ms: T0,
            },
            from,
        )
        .unwrap()
    };
    let came_home = EnvelopeHash([3; 32]);
    let e4 = sign_hop(&j.home, &j.a, came_home);
    let e5 = HopEnvelope::sign(
        HopFields {
            hop: 5,
            previous: Some(e4.hash()),
            from: j.a.public(),
            to: j.b.public(),
            ..e4.fields().clone()
        },
        &j.a,
    )
    .unwrap();
    assert_eq!(
        follow_anchored(
            &id,
            &origin,
            None,
            &handed_over(&[e4.clone(), e5.clone()]),
            &j.b.public(),
            none
        ),
        Ok(CustodyPoint {
            hop: 5,
            holder: j.b.public(),
            envelope: Some(e5.hash()),
        })
    );
    // Anything before the home's hop does not matter; a hop "from the home" that the home did
    // not sign anchors nothing.
    assert!(follow_anchored(
        &id,
        &origin,
        None,
        &handed_over(&[j.hops[1].clone(), e4.clone(), e5.clone()]),
        &j.b.public(),
        none
    )
    .is_ok());
    let mut forged = e4.encode();
    let n = forged.len();
    forged[n - 1] ^= 1;
    let forged = HopEnvelope::decode(&forged).unwrap();
    assert_eq!(
        follow_anchored(
            &id,
            &origin,
            None,
            &handed_over(&[forged]),
            &j.a.public(),
            none
        ),
        Err(CustodyError::BadSignature { hop: 4 })
    );
    // A stranger's hop to itself, "following" the home's, does not lead from it.
    let stranger = key(45);
    let e5_stranger = sign_hop(&stranger, &stranger, e4.hash());
    assert!(follow_anchored(
        &id,
        &origin,
        None,
        &handed_over(&[e4, e5_stranger]),
        &stranger.public(),
        none
    )
    .is_err());
}
