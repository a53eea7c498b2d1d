//! Ed25519 keys for authors and nodes: generation, PKCS#8/SPKI PEM files, a text form for
//! configuration, and the libp2p `PeerId` text of a node key, computed without libp2p.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::OsRng;
use serde::de::Visitor;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;

/// Prefix of a [`PublicKey`]'s text form.
pub const PUBLIC_KEY_PREFIX: &str = "ed25519:";

/// The bytes in front of the 32 key bytes in an ed25519 `PeerId`: identity multihash (code 0x00,
/// length 36), then the protobuf `PublicKey { Type = Ed25519 (1), Data = 32 bytes }`.
const PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

/// Longest base58 text a 38-byte `PeerId` can have; longer strings are refused before decoding.
const MAX_PEER_ID_TEXT: usize = 60;

/// Why a key could not be parsed or loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The text is not a PKCS#8 (private) or SPKI (public) ed25519 PEM document.
    #[error("invalid pem: {0}")]
    Pem(String),
    /// 32 bytes that do not encode a point on the curve.
    #[error("not an ed25519 public key")]
    InvalidPoint,
    /// A small-order point: anyone can forge signatures that verify under it.
    #[error("weak ed25519 public key")]
    WeakKey,
    /// A text key that is neither `ed25519:<64 hex digits>` nor an ed25519 `PeerId`.
    #[error("bad public key text: expected `ed25519:` and 64 hex digits, or a 12D3KooW… peer id")]
    BadText,
}

/// An ed25519 signing key: an author's key (signs packages) or a node's key (signs hop
/// envelopes and, through [`SecretKey::seed`], is the node's libp2p identity).
///
/// `Debug` shows only the public half. The key is zeroed when dropped.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new random key from the operating system's generator.
    pub fn generate() -> Self {
        Self(SigningKey::generate(&mut OsRng))
    }

    /// The key whose 32-byte seed (RFC 8032 private key) is `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&seed))
    }

    /// The 32-byte seed, e.g. for `libp2p::identity::Keypair::ed25519_from_bytes(seed)`, which
    /// gives the same public key and therefore the `PeerId` of [`PublicKey::peer_id_string`].
    pub fn seed(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// A 32-byte key for `context` derived from this one (BLAKE3's key derivation): a secret
    /// of this node's for a purpose other than signing, which changes with the key.
    pub(crate) fn derive(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, self.0.as_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let key = self.0.verifying_key();
        PublicKey {
            bytes: key.to_bytes(),
            key,
        }
    }

    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as written by `openssl genpkey -algorithm
    /// ed25519` and read by `openssl pkey`.
    pub fn to_pkcs8_pem(&self) -> String {
        // Only the seed is written (PKCS#8 v1), which is what OpenSSL itself writes.
        let doc = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        };
        match doc.to_pkcs8_pem(LineEnding::LF) {
            Ok(pem) => pem.as_str().to_owned(),
            // Encoding 32 fixed bytes into a fixed structure has no failure case in practice.
            Err(e) => unreachable!("pkcs8 encoding of an ed25519 key failed: {e}"),
        }
    }

    /// Reads a PKCS#8 PEM ed25519 private key (v1, or v2 with the public key, which must match).
    ///
    /// # Errors
    ///
    /// [`KeyError::Pem`] if the text is not such a document.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(Self)
            .map_err(|e| KeyError::Pem(e.to_string()))
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).to_bytes()
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

/// An ed25519 public key: an author or a node.
///
/// Always a valid, non-weak curve point (checked on every way in). Stored as its 32 bytes, so
/// it is small to copy, hash and keep in tables; verification decompresses it again.
///
/// **Text form** (`Display`, and what `FromStr` and human-readable serde formats such as TOML
/// accept): `ed25519:` followed by the 64 lowercase hex digits of the 32 key bytes. `FromStr`
/// also accepts the key's libp2p `PeerId` text (`12D3KooW…`), since an ed25519 `PeerId` inlines
/// the key. Binary serde formats (CBOR) carry the 32 raw bytes as a byte string.
///
/// ```
/// use security::{PublicKey, SecretKey};
/// let key = SecretKey::from_seed([7; 32]).public();
/// let text = key.to_string();
/// assert!(text.starts_with("ed25519:"));
/// assert_eq!(text.parse::<PublicKey>().unwrap(), key);
/// assert_eq!(key.peer_id_string().parse::<PublicKey>().unwrap(), key);
/// ```
///
/// The point is decompressed once, when the key is made: verifying with a key (every hop checks
/// one or two signatures) does not pay for decompression again.
#[derive(Clone, Copy)]
pub struct PublicKey {
    bytes: [u8; 32],
    key: VerifyingKey,
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for PublicKey {}

impl std::hash::Hash for PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes.hash(state);
    }
}

impl PartialOrd for PublicKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for PublicKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes.cmp(&other.bytes)
    }
}

impl PublicKey {
    /// The key with these 32 bytes.
    ///
    /// # Errors
    ///
    /// [`KeyError::InvalidPoint`] or [`KeyError::WeakKey`].
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, KeyError> {
        let key = VerifyingKey::from_bytes(bytes).map_err(|_| KeyError::InvalidPoint)?;
        if key.is_weak() {
            return Err(KeyError::WeakKey);
        }
        Ok(Self { bytes: *bytes, key })
    }

    /// The 32 key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.bytes
    }

    /// SubjectPublicKeyInfo PEM (`-----BEGIN PUBLIC KEY-----`), byte-identical to the output of
    /// `openssl pkey -in SECRET.pem -pubout`.
    pub fn to_spki_pem(&self) -> String {
        match self.key.to_public_key_pem(LineEnding::LF) {
            Ok(pem) => pem,
            Err(e) => unreachable!("spki encoding of an ed25519 key failed: {e}"),
        }
    }

    /// Reads an SPKI PEM ed25519 public key.
    ///
    /// # Errors
    ///
    /// [`KeyError::Pem`] if the text is not such a document, [`KeyError::WeakKey`] for a
    /// small-order key.
    pub fn from_spki_pem(pem: &str) -> Result<Self, KeyError> {
        let key =
            VerifyingKey::from_public_key_pem(pem).map_err(|e| KeyError::Pem(e.to_string()))?;
        Self::from_bytes(key.as_bytes())
    }

    /// The libp2p `PeerId` text of a node with this key: base58btc of the identity multihash of
    /// the protobuf-encoded public key. Equal to `PeerId::from(keypair.public()).to_string()`.
    pub fn peer_id_string(&self) -> String {
        let mut bytes = [0u8; 38];
        bytes[..6].copy_from_slice(&PEER_ID_PREFIX);
        bytes[6..].copy_from_slice(&self.bytes);
        bs58::encode(bytes).into_string()
    }

    /// The key inlined in an ed25519 `PeerId` text.
    ///
    /// # Errors
    ///
    /// [`KeyError::BadText`] if the text is not an ed25519 `PeerId` (RSA and secp256k1 ids are
    /// refused), or the key errors of [`PublicKey::from_bytes`].
    pub fn from_peer_id_str(s: &str) -> Result<Self, KeyError> {
        if s.len() > MAX_PEER_ID_TEXT {
            return Err(KeyError::BadText);
        }
        let mut buf = [0u8; 38];
        let n = bs58::decode(s)
            .onto(&mut buf[..])
            .map_err(|_| KeyError::BadText)?;
        if n != buf.len() {
            return Err(KeyError::BadText);
        }
        Self::from_peer_id_bytes(&buf)
    }

    /// The key inlined in the binary form of an ed25519 `PeerId` (its identity multihash, as
    /// `PeerId::to_bytes` gives it).
    ///
    /// # Errors
    ///
    /// [`KeyError::BadText`] if the bytes are not an ed25519 `PeerId`, or the key errors of
    /// [`PublicKey::from_bytes`].
    pub fn from_peer_id_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        match bytes.split_first_chunk::<6>() {
            Some((prefix, key)) if *prefix == PEER_ID_PREFIX => {
                let key: &[u8; 32] = key.try_into().map_err(|_| KeyError::BadText)?;
                Self::from_bytes(key)
            }
            _ => Err(KeyError::BadText),
        }
    }

    /// Strict RFC 8032 verification (no malleable signatures, no small-order components).
    pub(crate) fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        self.key
            .verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }
}

/// Verifies many (key, message, signature) triples; says which verify.
///
/// Together they cost about half as much as one by one from 8 on (ed25519 batch verification).
/// Small-order nonces are refused first, as [`PublicKey::verify`] refuses them (a [`PublicKey`]
/// is never of small order: every way of making one checks it). The batch equation is checked
/// with coefficients derived from all the triples, and it can accept a signature whose nonce
/// its own signer gave a torsion component (the strict check refuses those): only the holder of
/// the key can make such a signature, so it proves as much as any other. If the batch fails
/// (a bad signature, or a nonce that is no point at all), every triple is checked alone.
pub(crate) fn verify_many(items: &[(&PublicKey, &[u8], &[u8; 64])]) -> Vec<bool> {
    if items.len() < 2 {
        return items.iter().map(|(k, m, s)| k.verify(m, s)).collect();
    }
    let small_order = small_order_encodings();
    let mut ok: Vec<bool> = items
        .iter()
        .map(|(_, _, s)| !small_order.iter().any(|e| s[..32] == e[..]))
        .collect();
    let batch: Vec<usize> = (0..items.len()).filter(|&i| ok[i]).collect();
    let messages: Vec<&[u8]> = batch.iter().map(|&i| items[i].1).collect();
    let signatures: Vec<Signature> = batch
        .iter()
        .map(|&i| Signature::from_bytes(items[i].2))
        .collect();
    let keys: Vec<VerifyingKey> = batch.iter().map(|&i| items[i].0.key).collect();
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_err() {
        for i in batch {
            let (k, m, s) = items[i];
            ok[i] = k.verify(m, s);
        }
    }
    ok
}

/// Every 32-byte string that decompresses to a point of small order (as libsodium's
/// `has_small_order` lists them): comparing a nonce with these costs nanoseconds, decompressing
/// it microseconds. The eight torsion points have five y coordinates; each is written with
/// either sign bit (for x = 0 both decode to the same point), and the two below 19 also as
/// y + p (a non-canonical encoding that decompression accepts): 14 strings.
fn small_order_encodings() -> &'static [[u8; 32]] {
    static ENCODINGS: std::sync::OnceLock<Vec<[u8; 32]>> = std::sync::OnceLock::new();
    ENCODINGS.get_or_init(|| {
        // p = 2^255 - 19, little-endian.
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        let mut out: Vec<[u8; 32]> = Vec::new();
        for point in curve25519_dalek::constants::EIGHT_TORSION {
            let canonical = point.compress().to_bytes();
            let mut y = canonical;
            y[31] &= 0x7f;
            let mut forms = vec![y];
            if y[1..].iter().all(|&b| b == 0) && y[0] < 19 {
                let mut alias = p;
                alias[0] += y[0];
                forms.push(alias);
            }
            for form in forms {
                for sign in [0, 0x80] {
                    let mut e = form;
                    e[31] |= sign;
                    if !out.contains(&e) {
                        out.push(e);
                    }
                }
            }
        }
        out
    })
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_KEY_PREFIX}{}", codec::to_hex(&self.bytes))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    /// Parses `ed25519:<64 hex digits>` (either case) or an ed25519 `PeerId` (`12D3KooW…`).
    fn from_str(s: &str) -> Result<Self, KeyError> {
        match s.strip_prefix(PUBLIC_KEY_PREFIX) {
            Some(hex) => Self::from_bytes(&codec::from_hex::<32>(hex).ok_or(KeyError::BadText)?),
            None => Self::from_peer_id_str(s),
        }
    }
}

impl Serialize for PublicKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_bytes(&self.bytes)
        }
    }
}

impl<'de> Deserialize<'de> for PublicKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = PublicKey;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ed25519 public key (`ed25519:<hex>`, a peer id, or 32 bytes)")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PublicKey, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<PublicKey, E> {
                let bytes =
                    <[u8; 32]>::try_from(v).map_err(|_| E::invalid_length(v.len(), &self))?;
                PublicKey::from_bytes(&bytes).map_err(E::custom)
            }
        }

        if d.is_human_readable() {
            d.deserialize_str(KeyVisitor)
        } else {
            d.deserialize_bytes(KeyVisitor)
        }
    }
}

/// Turns raw key bytes read from the wire into a key, naming the field on failure.
pub(crate) fn wire_key(
    bytes: &[u8; 32],
    field: &'static str,
) -> Result<PublicKey, crate::DecodeError> {
    PublicKey::from_bytes(bytes).map_err(|_| crate::DecodeError::InvalidKey { field })
}

#[cfg(test)]
mod tests {
    use sha2::Digest;

    use super::*;

    #[test]
    fn text_form_round_trips_and_is_lowercase_hex() {
        let key = SecretKey::from_seed([1; 32]).public();
        let text = key.to_string();
        assert_eq!(text.len(), PUBLIC_KEY_PREFIX.len() + 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<PublicKey>(), Ok(key));
        assert_eq!(
            text.to_uppercase().replace("ED25519:", "ed25519:").parse(),
            Ok(key)
        );
    }

    #[test]
    fn bad_text_is_refused() {
        for bad in [
            "",
            "ed25519:",
            "ed25519:00",
            "ed25519:zz",
            "12D3KooW",
            "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
            &"1".repeat(1000),
        ] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn weak_and_invalid_points_are_refused() {
        // The identity point (y = 1) has small order.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::from_bytes(&identity), Err(KeyError::WeakKey));
        // y = 2 is not the y-coordinate of any curve point.
        let mut not_on_curve = [0u8; 32];
        not_on_curve[0] = 2;
        assert_eq!(
            PublicKey::from_bytes(&not_on_curve),
            Err(KeyError::InvalidPoint)
        );
    }

    #[test]
    fn secret_debug_does_not_print_the_seed() {
        let key = SecretKey::from_seed([0xab; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("abab"), "{shown}");
        assert!(shown.contains(&key.public().to_string()));
    }

    #[test]
    fn signatures_verify_only_for_their_message() {
        let key = SecretKey::from_seed([3; 32]);
        let sig = key.sign(b"hello");
        assert!(key.public().verify(b"hello", &sig));
        assert!(!key.public().verify(b"hellO", &sig));
        assert!(!SecretKey::from_seed([4; 32])
            .public()
            .verify(b"hello", &sig));
    }

    #[test]
    fn every_small_order_nonce_is_refused_in_a_batch() {
        let encodings = small_order_encodings();
        assert_eq!(encodings.len(), 14);
        for e in encodings {
            let point = curve25519_dalek::edwards::CompressedEdwardsY(*e).decompress();
            assert!(point.is_some_and(|p| p.is_small_order()), "{e:02x?}");
        }
        // Each of them as the nonce R of a signature the key holder made (s = H(R‖A‖M)·a):
        // the batch equation alone accepts it whenever z·R is the identity (always for the
        // identity itself), the strict check never. Checked together with a genuine one, only
        // the genuine one verifies.
        let seed = [5; 32];
        let key = SecretKey::from_seed(seed);
        let public = key.public();
        let genuine = key.sign(b"genuine");
        let expanded: [u8; 64] = sha2::Sha512::digest(seed).into();
        let mut a = [0u8; 32];
        a.copy_from_slice(&expanded[..32]);
        let a = curve25519_dalek::Scalar::from_bytes_mod_order(
            curve25519_dalek::scalar::clamp_integer(a),
        );
        for e in encodings {
            let k = curve25519_dalek::Scalar::from_hash(
                sha2::Sha512::new()
                    .chain_update(e)
                    .chain_update(public.to_bytes())
                    .chain_update(b"genuine"),
            );
            let mut forged = [0u8; 64];
            forged[..32].copy_from_slice(e);
            forged[32..].copy_from_slice((k * a).as_bytes());
            assert!(!public.verify(b"genuine", &forged));
            let items = [
                (&public, &b"genuine"[..], &genuine),
                (&public, &b"genuine"[..], &forged),
            ];
            assert_eq!(verify_many(&items), [true, false], "{e:02x?}");
        }
        // A nonce that is no point at all fails the batch; the genuine one still verifies.
        let invalid = (2..=255u8)
            .map(|y| {
                let mut e = [0u8; 32];
                e[0] = y;
                e
            })
            .find(|e| {
                curve25519_dalek::edwards::CompressedEdwardsY(*e)
                    .decompress()
                    .is_none()
            })
            .unwrap();
        let mut not_a_point = genuine;
        not_a_point[..32].copy_from_slice(&invalid);
        let items = [
            (&public, &b"genuine"[..], &not_a_point),
            (&public, &b"genuine"[..], &genuine),
        ];
        assert_eq!(verify_many(&items), [false, true]);
    }
}
