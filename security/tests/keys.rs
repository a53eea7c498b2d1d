//! Key interop: PEM files against OpenSSL, PeerId text against libp2p.

use std::path::PathBuf;
use std::process::Command;

use security::{KeyError, PublicKey, SecretKey};

/// `openssl` on PATH, or `None` (the OpenSSL tests then only print that they were skipped).
fn openssl() -> Option<&'static str> {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some("openssl")
}

fn temp_file(name: &str, contents: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-security-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn pkcs8_pem_round_trips() {
    let key = SecretKey::generate();
    let pem = key.to_pkcs8_pem();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    let back = SecretKey::from_pkcs8_pem(&pem).unwrap();
    assert_eq!(back.seed(), key.seed());
    assert_eq!(back.public(), key.public());
}

#[test]
fn spki_pem_round_trips() {
    let key = SecretKey::generate().public();
    let pem = key.to_spki_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem}");
    assert_eq!(PublicKey::from_spki_pem(&pem), Ok(key));
}

#[test]
fn garbage_pem_is_an_error() {
    for bad in [
        "",
        "hello",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ] {
        assert!(matches!(
            SecretKey::from_pkcs8_pem(bad),
            Err(KeyError::Pem(_))
        ));
        assert!(matches!(
            PublicKey::from_spki_pem(bad),
            Err(KeyError::Pem(_))
        ));
    }
}

#[test]
fn openssl_reads_our_private_key_and_derives_our_public_key() {
    let Some(openssl) = openssl() else {
        eprintln!("skipped: openssl not found");
        return;
    };
    let key = SecretKey::generate();
    let path = temp_file("ours.pem", &key.to_pkcs8_pem());
    let out = Command::new(openssl)
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        key.public().to_spki_pem()
    );
}

#[test]
fn we_read_an_openssl_generated_key() {
    let Some(openssl) = openssl() else {
        eprintln!("skipped: openssl not found");
        return;
    };
    let dir = std::env::temp_dir().join(format!("tern-security-gen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("theirs.pem");
    let gen = Command::new(openssl)
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let key = SecretKey::from_pkcs8_pem(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let out = Command::new(openssl)
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let theirs = String::from_utf8(out.stdout).unwrap();
    assert_eq!(theirs, key.public().to_spki_pem());
    assert_eq!(PublicKey::from_spki_pem(&theirs), Ok(key.public()));
}

/// The PeerId of the key with seed `[0; 32]`, as libp2p prints it.
const ZERO_SEED_PEER_ID: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

#[test]
fn peer_id_of_the_zero_seed_is_the_known_vector() {
    let key = SecretKey::from_seed([0; 32]).public();
    assert_eq!(key.peer_id_string(), ZERO_SEED_PEER_ID);
    assert_eq!(ZERO_SEED_PEER_ID.parse::<PublicKey>(), Ok(key));
}

#[test]
fn peer_id_matches_libp2p() {
    let mut seeds = vec![[0u8; 32], [1u8; 32], [0xff; 32]];
    seeds.extend((0..20).map(|_| SecretKey::generate().seed()));
    for seed in seeds {
        let ours = SecretKey::from_seed(seed);
        let theirs = libp2p_identity::Keypair::ed25519_from_bytes(seed).unwrap();
        let peer_id = libp2p_identity::PeerId::from(theirs.public());
        assert_eq!(ours.public().peer_id_string(), peer_id.to_string());
        assert!(peer_id.to_string().starts_with("12D3KooW"));
        assert_eq!(
            PublicKey::from_peer_id_bytes(&peer_id.to_bytes()),
            Ok(ours.public())
        );
        let libp2p_key = theirs.public().try_into_ed25519().unwrap().to_bytes();
        assert_eq!(ours.public().to_bytes(), libp2p_key);
        // libp2p and we sign identically, so either can check the other's envelopes.
        let msg = b"tern";
        let sig = theirs.sign(msg).unwrap();
        assert!(theirs.public().verify(msg, &sig));
    }
}

#[test]
fn peer_id_text_of_a_non_ed25519_key_is_refused() {
    // An RSA-style (sha256 multihash) peer id.
    let rsa = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N";
    assert_eq!(PublicKey::from_peer_id_str(rsa), Err(KeyError::BadText));
    assert_eq!(rsa.parse::<PublicKey>(), Err(KeyError::BadText));
    let ed = SecretKey::from_seed([3; 32]).public().peer_id_string();
    let mut bytes = bs58::decode(ed).into_vec().unwrap();
    for len in 0..bytes.len() {
        assert_eq!(
            PublicKey::from_peer_id_bytes(&bytes[..len]),
            Err(KeyError::BadText)
        );
    }
    bytes.push(0);
    assert_eq!(
        PublicKey::from_peer_id_bytes(&bytes),
        Err(KeyError::BadText)
    );
}

#[test]
fn serde_uses_text_in_toml_and_bytes_in_cbor() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Doc {
        key: PublicKey,
    }
    let doc = Doc {
        key: SecretKey::from_seed([5; 32]).public(),
    };
    let text = toml::to_string(&doc).unwrap();
    assert_eq!(text.trim(), format!("key = \"{}\"", doc.key));
    assert_eq!(toml::from_str::<Doc>(&text).unwrap(), doc);

    let mut cbor = Vec::new();
    ciborium::into_writer(&doc.key, &mut cbor).unwrap();
    assert_eq!(cbor.len(), 2 + 32); // byte string head (0x58 0x20) + 32 bytes
    assert_eq!(&cbor[..2], &[0x58, 0x20]);
    assert_eq!(
        ciborium::from_reader::<PublicKey, _>(&cbor[..]).unwrap(),
        doc.key
    );
    // 31 bytes is not a key.
    let short = [&[0x58u8, 0x1f][..], &[0u8; 31]].concat();
    assert!(ciborium::from_reader::<PublicKey, _>(&short[..]).is_err());
}
