//! Packages through the public API: signing, the file format, verification and its failures.

mod common;

use common::*;
use security::*;

#[test]
fn sign_encode_decode_verify_round_trip() {
    let package = package();
    let bytes = package.to_bytes();
    assert_eq!(&bytes[..8], PACKAGE_MAGIC);
    let verified = Package::from_bytes(&bytes).unwrap().verify().unwrap();
    assert_eq!(verified.manifest(), package.manifest());
    assert_eq!(verified.source(), package.source());
    assert_eq!(verified.author(), &key(1).public());
    assert_eq!(verified.hash(), package.hash());
    assert_eq!(verified.hash().0, *blake3::hash(&bytes).as_bytes());
}

#[test]
fn encoding_is_deterministic() {
    // Signatures are deterministic (RFC 8032), so signing twice gives the same file and hash.
    assert_eq!(package().to_bytes(), package().to_bytes());
    assert_eq!(package().hash(), package().hash());
    assert_ne!(package().hash(), package_with_source("other").hash());
}

#[test]
fn hash_text_is_hex_and_parses_back() {
    let hash = package().hash();
    let text = hash.to_string();
    assert_eq!(text.len(), 64);
    assert!(text
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    assert_eq!(text.parse::<PackageHash>(), Ok(hash));
    assert!("abc".parse::<PackageHash>().is_err());
}

#[test]
fn changed_source_fails_verification() {
    let good = package();
    let forged = Package::sign(manifest(key(1).public()), "evil()".into(), &key(1)).unwrap();
    // Splice the good signature onto the forged content through the byte format.
    let mut bytes = forged.to_bytes();
    let sig_at = bytes.len() - 64;
    bytes[sig_at..].copy_from_slice(good.signature());
    let spliced = Package::from_bytes(&bytes).unwrap();
    assert_eq!(spliced.verify(), Err(PackageError::SignatureInvalid));
}

#[test]
fn changed_author_fails_verification() {
    // Same content, manifest claims author 2, signed by author 1's signature.
    let good = package();
    let other = key(2);
    let claimed = Package::sign(manifest(other.public()), good.source().into(), &other).unwrap();
    let mut bytes = claimed.to_bytes();
    let sig_at = bytes.len() - 64;
    bytes[sig_at..].copy_from_slice(good.signature());
    assert_eq!(
        Package::from_bytes(&bytes).unwrap().verify(),
        Err(PackageError::SignatureInvalid)
    );
}

#[test]
fn every_flipped_bit_is_caught() {
    let bytes = package().to_bytes();
    let original = package().hash();
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= bit;
            if let Ok(p) = Package::from_bytes(&b) {
                assert!(p.hash() != original);
                assert!(
                    p.verify().is_err(),
                    "flip of bit {bit:#x} in byte {i} verified"
                );
            }
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = package().to_bytes();
    for len in 0..bytes.len() {
        assert!(
            Package::from_bytes(&bytes[..len]).is_err(),
            "prefix of {len} bytes decoded"
        );
    }
    assert_eq!(
        Package::from_bytes(&bytes[..100]),
        Err(PackageError::Decode(DecodeError::Truncated { len: 100 }))
    );
    assert_eq!(
        Package::from_bytes(&bytes[..3]),
        Err(PackageError::Decode(DecodeError::Truncated { len: 3 }))
    );
}

#[test]
fn magic_version_size_and_trailing_bytes() {
    let bytes = package().to_bytes();
    let mut other = bytes.clone();
    other[0] = b'X';
    assert_eq!(
        Package::from_bytes(&other),
        Err(PackageError::Decode(DecodeError::BadMagic {
            expected: "tern package"
        }))
    );
    let mut v2 = bytes.clone();
    v2[7] = 2;
    assert_eq!(
        Package::from_bytes(&v2),
        Err(PackageError::Decode(DecodeError::UnsupportedVersion {
            version: 2
        }))
    );
    assert_eq!(
        Package::from_bytes_with_limit(&bytes, 100),
        Err(PackageError::Decode(DecodeError::Oversized {
            len: bytes.len(),
            max: 100
        }))
    );
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        Package::from_bytes(&long),
        Err(PackageError::Decode(DecodeError::TrailingBytes {
            offset: bytes.len()
        }))
    );
}

#[test]
fn default_limit_is_16_mib() {
    assert_eq!(DEFAULT_MAX_PACKAGE_BYTES, 16 * 1024 * 1024);
    let huge = vec![0u8; DEFAULT_MAX_PACKAGE_BYTES + 1];
    assert!(matches!(
        Package::from_bytes(&huge),
        Err(PackageError::Decode(DecodeError::Oversized { .. }))
    ));
}

#[test]
fn non_canonical_cbor_is_refused() {
    // Same value, longer head: text(5) "0.1.0" as 0x65 becomes 0x78 0x05.
    let bytes = package().to_bytes();
    let pos = bytes.windows(6).position(|w| w == b"\x650.1.0").unwrap();
    let mut longer = bytes[..pos].to_vec();
    longer.extend_from_slice(&[0x78, 0x05]);
    longer.extend_from_slice(&bytes[pos + 1..]);
    assert_eq!(
        Package::from_bytes(&longer),
        Err(PackageError::Decode(DecodeError::NonCanonical))
    );
}

#[test]
fn malformed_cbor_says_where() {
    let mut bytes = PACKAGE_MAGIC.to_vec();
    bytes.extend_from_slice(&[0xa3, 0xff]); // map of 3, then a stray break
    match Package::from_bytes(&bytes) {
        Err(PackageError::Decode(DecodeError::Malformed { offset, .. })) => {
            assert!(offset.is_some_and(|o| o >= 8), "{offset:?}");
        }
        other => panic!("{other:?}"),
    }
    let err = Package::from_bytes(&bytes).unwrap_err().to_string();
    assert!(err.contains("at byte"), "{err}");
}

#[test]
fn weak_author_key_is_an_invalid_key_error() {
    let bytes = package().to_bytes();
    let author = key(1).public().to_bytes();
    let pos = bytes.windows(32).position(|w| w == author).unwrap();
    let mut weak = bytes.clone();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    weak[pos..pos + 32].copy_from_slice(&identity);
    assert_eq!(
        Package::from_bytes(&weak),
        Err(PackageError::Decode(DecodeError::InvalidKey {
            field: "author"
        }))
    );
}

#[test]
fn manifest_reads_from_toml() {
    let text = format!(
        r#"
        name = "counter"
        version = "0.1.0"
        author = "{}"
        created_ms = 1
        capabilities = ["net"]
        resources = [{{ name = "table", policy = "rebind" }}]
        [limits]
        max_operations = 5
        "#,
        key(1).public()
    );
    let m: Manifest = toml::from_str(&text).unwrap();
    assert_eq!(m.author, key(1).public());
    assert_eq!(m.resources[0].policy, ResourcePolicy::Rebind);
    assert_eq!(m.limits.max_operations, Some(5));
    assert_eq!(m.limits.max_call_depth, None);
    let bad = text.replace("rebind", "teleport");
    assert!(toml::from_str::<Manifest>(&bad).is_err());
}

#[test]
fn error_messages_are_short_and_lowercase() {
    let errors: Vec<Box<dyn std::error::Error>> = vec![
        Box::new(PackageError::SignatureInvalid),
        Box::new(PackageError::AuthorMismatch),
        Box::new(PackageError::Decode(DecodeError::NonCanonical)),
        Box::new(DecodeError::Truncated { len: 3 }),
    ];
    for e in errors {
        let s = e.to_string();
        assert!(s.chars().next().is_some_and(|c| c.is_lowercase()), "{s}");
        assert!(!s.ends_with('.'), "{s}");
    }
}
