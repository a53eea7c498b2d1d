//! Property tests: every decoder is total (any bytes give a value or an error, never a panic),
//! damaged packages and envelopes never verify, and encodings round-trip.

mod common;

use common::*;
use proptest::prelude::*;
use security::*;

fn cbor(value: &ciborium::Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).unwrap();
    out
}

/// Arbitrary CBOR values, nested a few levels: well-formed bytes of the wrong shape.
fn cbor_value() -> impl Strategy<Value = ciborium::Value> {
    use ciborium::Value;
    let leaf = prop_oneof![
        any::<u64>().prop_map(|n| Value::Integer(n.into())),
        any::<i64>().prop_map(|n| Value::Integer(n.into())),
        proptest::collection::vec(any::<u8>(), 0..70).prop_map(Value::Bytes),
        ".{0,20}".prop_map(Value::Text),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
        prop_oneof![
            Just("manifest"),
            Just("source"),
            Just("signature"),
            Just("name"),
            Just("author"),
            Just("hop"),
            Just("from"),
            Just("to"),
            Just("previous"),
            Just("limits")
        ]
        .prop_map(|s| Value::Text(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
        ]
    })
}

fn limits() -> impl Strategy<Value = PackageLimits> {
    proptest::array::uniform10(proptest::option::of(any::<u64>())).prop_map(|v| PackageLimits {
        max_operations: v[0],
        max_call_depth: v[1],
        max_string_size: v[2],
        max_array_size: v[3],
        max_map_size: v[4],
        max_continuation_bytes: v[5],
        max_total_operations: v[6],
        max_memory_bytes: v[7],
        max_messages_sent: v[8],
        max_message_bytes_sent: v[9],
    })
}

fn policy() -> impl Strategy<Value = ResourcePolicy> {
    proptest::sample::select(ResourcePolicy::ALL.to_vec())
}

prop_compose! {
    fn signed_package()(
        seed in any::<[u8; 32]>(),
        name in "[a-z][a-z0-9-]{0,15}",
        version in ".{0,12}",
        created_ms in any::<u64>(),
        resources in proptest::collection::btree_map("[a-z]{1,8}", policy(), 0..4),
        capabilities in proptest::collection::btree_set(".{1,10}", 0..4),
        limits in limits(),
        source in ".{0,200}",
    ) -> (Package, SecretKey) {
        let key = SecretKey::from_seed(seed);
        let manifest = Manifest {
            name,
            version,
            author: key.public(),
            created_ms,
            resources: resources
                .into_iter()
                .map(|(name, policy)| ResourceDecl::new(name, policy))
                .collect(),
            capabilities: capabilities.into_iter().collect(),
            limits,
        };
        (Package::sign(manifest, source, &key).unwrap(), key)
    }
}

prop_compose! {
    fn hop_fields()(
        agent in any::<[u8; 16]>(),
        hop in any::<u64>(),
        package in any::<[u8; 32]>(),
        continuation in any::<[u8; 32]>(),
        previous in proptest::option::of(any::<[u8; 32]>()),
        from_seed in any::<[u8; 32]>(),
        to_seed in any::<[u8; 32]>(),
        time_ms in any::<u64>(),
    ) -> (HopFields, SecretKey) {
        let from = SecretKey::from_seed(from_seed);
        let fields = HopFields {
            agent_id: AgentId(agent),
            hop,
            package_hash: PackageHash(package),
            continuation_hash: continuation,
            previous: previous.map(EnvelopeHash),
            from: from.public(),
            to: SecretKey::from_seed(to_seed).public(),
            time_ms,
        };
        (fields, from)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Package::from_bytes(&bytes).map(Package::verify);
        let _ = HopEnvelope::decode(&bytes);
    }

    #[test]
    fn random_bytes_after_the_magic_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let package = [&PACKAGE_MAGIC[..], &bytes].concat();
        let _ = Package::from_bytes(&package).map(Package::verify);
        let envelope = [&ENVELOPE_MAGIC[..], &bytes].concat();
        let _ = HopEnvelope::decode(&envelope);
    }

    #[test]
    fn wrong_shaped_cbor_is_an_error(value in cbor_value()) {
        let body = cbor(&value);
        let package = [&PACKAGE_MAGIC[..], &body].concat();
        prop_assert!(Package::from_bytes(&package).is_err());
        let envelope = [&ENVELOPE_MAGIC[..], &body].concat();
        prop_assert!(HopEnvelope::decode(&envelope).is_err());
    }

    #[test]
    fn package_round_trips((package, _key) in signed_package()) {
        let bytes = package.to_bytes();
        let back = Package::from_bytes(&bytes).unwrap();
        prop_assert_eq!(&back, &package);
        let verified = back.verify().unwrap();
        prop_assert_eq!(verified.hash().0, *blake3::hash(&bytes).as_bytes());
        prop_assert_eq!(verified.to_bytes(), bytes);
    }

    #[test]
    fn damaged_packages_never_verify(
        (package, _key) in signed_package(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
        insert in any::<u8>(),
    ) {
        let bytes = package.to_bytes();
        let i = at.index(bytes.len());

        let mut flipped = bytes.clone();
        flipped[i] ^= 1 << bit;
        if let Ok(p) = Package::from_bytes(&flipped) {
            prop_assert!(p.verify().is_err());
        }

        let truncated = &bytes[..cut.index(bytes.len())];
        prop_assert!(Package::from_bytes(truncated).is_err());

        let mut inserted = bytes.clone();
        inserted.insert(i, insert);
        if let Ok(p) = Package::from_bytes(&inserted) {
            prop_assert!(p.verify().is_err());
        }
    }

    #[test]
    fn envelope_round_trips((fields, key) in hop_fields()) {
        let envelope = HopEnvelope::sign(fields, &key).unwrap();
        let bytes = envelope.encode();
        prop_assert!(bytes.len() <= MAX_ENVELOPE_BYTES);
        let back = HopEnvelope::decode(&bytes).unwrap();
        prop_assert_eq!(back.hash().0, *blake3::hash(&bytes).as_bytes());
        prop_assert_eq!(back, envelope);
    }

    #[test]
    fn damaged_envelopes_never_verify(
        (fields, key) in hop_fields(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
        cut in any::<prop::sample::Index>(),
    ) {
        let (from, to, package, ch) =
            (fields.from, fields.to, fields.package_hash, fields.continuation_hash);
        // Make it a first hop so that it verifies when intact.
        let fields = HopFields { hop: FIRST_HOP, previous: None, ..fields };
        let envelope = HopEnvelope::sign(fields, &key).unwrap();
        let ctx = HopCheck::new(&from, &to, &package, &ch);
        prop_assert!(verify_hop(envelope.clone(), &ctx).is_ok());

        let bytes = envelope.encode();
        let mut flipped = bytes.clone();
        flipped[at.index(bytes.len())] ^= 1 << bit;
        if let Ok(e) = HopEnvelope::decode(&flipped) {
            prop_assert!(verify_hop(e, &ctx).is_err());
        }
        prop_assert!(HopEnvelope::decode(&bytes[..cut.index(bytes.len())]).is_err());
    }

    #[test]
    fn key_text_round_trips(seed in any::<[u8; 32]>()) {
        let key = SecretKey::from_seed(seed).public();
        prop_assert_eq!(key.to_string().parse::<PublicKey>(), Ok(key));
        prop_assert_eq!(key.peer_id_string().parse::<PublicKey>(), Ok(key));
        prop_assert!(key.peer_id_string().starts_with("12D3KooW"));
    }

    #[test]
    fn text_parsers_never_panic(s in ".{0,120}") {
        let _ = s.parse::<PublicKey>();
        let _ = format!("ed25519:{s}").parse::<PublicKey>();
        let _ = s.parse::<PackageHash>();
        let _ = s.parse::<AgentId>();
        let _ = s.parse::<ResourcePolicy>();
        let _ = toml::from_str::<TrustPolicy>(&s);
    }
}

#[test]
fn huge_declared_lengths_fail_fast_without_allocating() {
    // Headers that claim 2^64-1 byte strings, text, arrays and maps, with nothing behind them.
    for head in [0x5bu8, 0x7b, 0x9b, 0xbb] {
        let mut body = vec![head];
        body.extend_from_slice(&[0xff; 8]);
        let package = [&PACKAGE_MAGIC[..], &body].concat();
        assert!(Package::from_bytes(&package).is_err());
        let envelope = [&ENVELOPE_MAGIC[..], &body].concat();
        assert!(HopEnvelope::decode(&envelope).is_err());
        // The same inside a well-formed prefix: a map whose first value claims to be huge.
        let mut nested = PACKAGE_MAGIC.to_vec();
        nested.extend_from_slice(&[0xa3, 0x68]);
        nested.extend_from_slice(b"manifest");
        nested.extend_from_slice(&body);
        assert!(Package::from_bytes(&nested).is_err());
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let mut body = PACKAGE_MAGIC.to_vec();
    body.extend_from_slice(&[0xa3, 0x68]);
    body.extend_from_slice(b"manifest");
    body.extend(std::iter::repeat_n(0x81u8, 100_000)); // [[[[...
    assert!(Package::from_bytes(&body).is_err());
    let mut env = ENVELOPE_MAGIC.to_vec();
    env.extend(std::iter::repeat_n(0x81u8, 1_000));
    assert!(HopEnvelope::decode(&env).is_err());
}

#[test]
fn fixture_chain_sanity() {
    // Keeps `common` fully used in this test binary.
    let p = package();
    let e = hop(None, &key(1), &key(2).public(), p.hash(), b"x");
    assert_eq!(e.fields().agent_id, agent());
}
