//! Canonical CBOR: the one place that turns wire structs into the bytes that are signed and hashed,
//! and turns untrusted bytes back into values without panicking or over-allocating.
//!
//! "Canonical" here means: the bytes ciborium produces for our wire structs (struct fields in
//! declaration order, definite lengths, shortest integer heads). Decoding re-encodes the value and
//! rejects the input unless it is byte-for-byte that encoding, so a decoded value has exactly one
//! byte representation and its hash is the hash of the bytes that arrived.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why bytes could not be decoded into a package or an envelope.
///
/// Offsets count from the first byte of the input, magic included.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input does not start with the expected magic bytes.
    #[error("bad magic: not a {expected}")]
    BadMagic {
        /// What the input was expected to be ("tern package", "tern hop envelope").
        expected: &'static str,
    },
    /// The magic is right but the format version byte is one this build does not know.
    #[error("unsupported format version {version}")]
    UnsupportedVersion {
        /// The version byte found after the magic.
        version: u8,
    },
    /// The input is larger than the caller's limit; nothing was parsed.
    #[error("input is {len} bytes, over the {max}-byte limit")]
    Oversized {
        /// Length of the input.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The input ends in the middle of a value.
    #[error("truncated input: ends at byte {len}")]
    Truncated {
        /// Length of the input.
        len: usize,
    },
    /// The CBOR is not well-formed, or does not have the expected shape.
    #[error("malformed cbor{}: {reason}", fmt_offset(*.offset))]
    Malformed {
        /// Where the problem was found, when the parser knows.
        offset: Option<usize>,
        /// What was wrong.
        reason: String,
    },
    /// A complete value was read but more bytes follow it.
    #[error("trailing bytes after the value, from byte {offset}")]
    TrailingBytes {
        /// Offset of the first byte after the value.
        offset: usize,
    },
    /// The value decodes but is not in its one canonical encoding.
    #[error("non-canonical encoding")]
    NonCanonical,
    /// A public key field holds 32 bytes that are not a usable ed25519 key.
    #[error("invalid {field} key")]
    InvalidKey {
        /// Which field ("author", "from", "to").
        field: &'static str,
    },
}

fn fmt_offset(offset: Option<usize>) -> String {
    match offset {
        Some(at) => format!(" at byte {at}"),
        None => String::new(),
    }
}

/// Encodes a wire value canonically.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail, and our wire structs contain only strings, integers,
    // byte strings, options and sequences, which ciborium always serializes.
    if let Err(e) = ciborium::into_writer(value, &mut *out) {
        unreachable!("canonical encoding of a wire struct failed: {e}");
    }
}

/// Checks `magic` (7 bytes of name + 1 version byte) and the size limit, and returns the rest.
pub(crate) fn strip_magic<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    expected: &'static str,
    max: usize,
) -> Result<&'a [u8], DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::Oversized {
            len: bytes.len(),
            max,
        });
    }
    let (name, version) = (&magic[..7], magic[7]);
    if bytes.len() < magic.len() {
        // A prefix of the magic is a cut-off file, anything else is not ours.
        let n = bytes.len().min(7);
        if bytes[..n] == name[..n] {
            return Err(DecodeError::Truncated { len: bytes.len() });
        }
        return Err(DecodeError::BadMagic { expected });
    }
    if &bytes[..7] != name {
        return Err(DecodeError::BadMagic { expected });
    }
    if bytes[7] != version {
        return Err(DecodeError::UnsupportedVersion { version: bytes[7] });
    }
    Ok(&bytes[8..])
}

/// Decodes exactly one canonical value of type `W` from `body`; `base` is the offset of `body`
/// within the caller's input, used for error positions.
///
/// The caller bounds `body`'s length first: ciborium reads byte and text strings in chunks and
/// serde caps pre-allocation for sequences, so memory stays proportional to the input.
pub(crate) fn decode_canonical<W: Serialize + DeserializeOwned>(
    body: &[u8],
    base: usize,
) -> Result<W, DecodeError> {
    let mut rest = body;
    let result: Result<W, _> = ciborium::from_reader(&mut rest);
    // When ciborium does not say where, the reader's position does: the error was found in the
    // item that ends there.
    let reached = base + body.len() - rest.len();
    let value = result.map_err(|e| match e {
        ciborium::de::Error::Io(_) => DecodeError::Truncated {
            len: base + body.len(),
        },
        ciborium::de::Error::Syntax(at) => DecodeError::Malformed {
            offset: Some(base + at),
            reason: "invalid cbor".into(),
        },
        ciborium::de::Error::Semantic(at, reason) => DecodeError::Malformed {
            offset: Some(at.map_or(reached, |at| base + at)),
            reason,
        },
        ciborium::de::Error::RecursionLimitExceeded => DecodeError::Malformed {
            offset: Some(reached),
            reason: "nesting too deep".into(),
        },
    })?;
    let used = body.len() - rest.len();
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            offset: base + used,
        });
    }
    if !encodes_to(&value, body) {
        return Err(DecodeError::NonCanonical);
    }
    Ok(value)
}

/// Whether `value` encodes ([`encode`]) to exactly `expected`: compared piece by piece as the
/// encoder writes, so that checking a decoded value is canonical allocates nothing.
fn encodes_to<T: Serialize>(value: &T, expected: &[u8]) -> bool {
    struct Compare<'a> {
        rest: &'a [u8],
    }
    impl std::io::Write for Compare<'_> {
        fn write(&mut self, piece: &[u8]) -> std::io::Result<usize> {
            match self.rest.strip_prefix(piece) {
                Some(rest) => {
                    self.rest = rest;
                    Ok(piece.len())
                }
                None => Err(std::io::ErrorKind::InvalidData.into()),
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut compare = Compare { rest: expected };
    ciborium::into_writer(value, &mut compare).is_ok() && compare.rest.is_empty()
}

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Parses exactly `N` bytes of hex (either case). `None` on a wrong length or a non-hex digit.
pub(crate) fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// Serde for `[u8; N]` as one CBOR byte string of exactly `N` bytes (serde's default for arrays
/// is a sequence of integers: bigger, and with `N` separate allocations-free but slow items).
pub(crate) mod fixed_bytes {
    use super::fmt;
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        d.deserialize_bytes(FixedVisitor::<N>)
    }

    pub(crate) struct FixedVisitor<const N: usize>;

    impl<'de, const N: usize> Visitor<'de> for FixedVisitor<N> {
        type Value = [u8; N];

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a byte string of {N} bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
            <[u8; N]>::try_from(v).map_err(|_| E::invalid_length(v.len(), &self))
        }

        // Non-canonical (an array of integers); accepted here so that formats without byte
        // strings still work, and rejected for CBOR by the canonical re-encoding check.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = [0u8; N];
            for (i, slot) in out.iter_mut().enumerate() {
                *slot = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(i, &self))?;
            }
            if seq.next_element::<u8>()?.is_some() {
                return Err(A::Error::invalid_length(N + 1, &self));
            }
            Ok(out)
        }
    }
}

/// Serde for `Option<[u8; N]>` as null or one byte string of exactly `N` bytes.
pub(crate) mod opt_fixed_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    struct Wrap<const N: usize>([u8; N]);

    impl<const N: usize> Serialize for Wrap<N> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            super::fixed_bytes::serialize(&self.0, s)
        }
    }

    impl<'de, const N: usize> Deserialize<'de> for Wrap<N> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::fixed_bytes::deserialize(d).map(Wrap)
        }
    }

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        bytes: &Option<[u8; N]>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        bytes.map(Wrap).serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<Option<[u8; N]>, D::Error> {
        Ok(Option::<Wrap<N>>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_bad_digits() {
        let bytes = [0x00, 0x7f, 0xab, 0xff];
        assert_eq!(to_hex(&bytes), "007fabff");
        assert_eq!(from_hex::<4>("007FABff"), Some(bytes));
        assert_eq!(from_hex::<4>("007fabf"), None);
        assert_eq!(from_hex::<4>("007fabfg"), None);
        assert_eq!(from_hex::<2>("é0"), None);
    }

    #[test]
    fn magic_prefix_is_truncated_and_other_bytes_are_bad_magic() {
        let magic = b"TERNPKG\x01";
        assert_eq!(
            strip_magic(b"TERN", magic, "x", 100),
            Err(DecodeError::Truncated { len: 4 })
        );
        assert_eq!(
            strip_magic(b"", magic, "x", 100),
            Err(DecodeError::Truncated { len: 0 })
        );
        assert_eq!(
            strip_magic(b"XERN", magic, "x", 100),
            Err(DecodeError::BadMagic { expected: "x" })
        );
        assert_eq!(
            strip_magic(b"TERNPKG\x02abc", magic, "x", 100),
            Err(DecodeError::UnsupportedVersion { version: 2 })
        );
        assert_eq!(
            strip_magic(b"TERNPKG\x01abc", magic, "x", 5),
            Err(DecodeError::Oversized { len: 11, max: 5 })
        );
        assert_eq!(
            strip_magic(b"TERNPKG\x01abc", magic, "x", 100),
            Ok(&b"abc"[..])
        );
    }

    #[test]
    fn trailing_and_non_canonical_bytes_are_rejected() {
        // 1 encoded canonically is 0x01; with a one-byte argument (0x18 0x01) it is not.
        assert_eq!(decode_canonical::<u64>(&[0x01], 0), Ok(1));
        assert_eq!(
            decode_canonical::<u64>(&[0x18, 0x01], 0),
            Err(DecodeError::NonCanonical)
        );
        assert_eq!(
            decode_canonical::<u64>(&[0x01, 0x01], 3),
            Err(DecodeError::TrailingBytes { offset: 4 })
        );
        assert_eq!(
            decode_canonical::<u64>(&[0x19, 0x01], 0),
            Err(DecodeError::Truncated { len: 2 })
        );
    }

    #[test]
    fn a_value_encodes_to_exactly_its_bytes_or_not_at_all() {
        let value = (7u64, String::from("tern"), vec![1u8, 2, 3]);
        let mut bytes = Vec::new();
        encode(&value, &mut bytes);
        assert!(encodes_to(&value, &bytes));
        // Its encoding a prefix of the bytes, the bytes a prefix of its encoding, one byte off.
        assert!(!encodes_to(&value, &[&bytes[..], &[0]].concat()));
        assert!(!encodes_to(&value, &bytes[..bytes.len() - 1]));
        assert!(!encodes_to(&value, &[]));
        let mut changed = bytes.clone();
        changed[3] ^= 1;
        assert!(!encodes_to(&value, &changed));
    }
}

/// Defines a fixed-size byte identifier: `Display`/`FromStr` as lowercase hex, serde as a hex
/// string in human-readable formats and as one byte string in CBOR.
macro_rules! byte_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&$crate::codec::to_hex(&self.0))
            }
        }

        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::codec::BadHex;

            /// Parses exactly the hex digits of the bytes (either case).
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $crate::codec::from_hex::<$len>(s)
                    .map(Self)
                    .ok_or($crate::codec::BadHex { what: $what, digits: $len * 2 })
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.collect_str(self)
                } else {
                    s.serialize_bytes(&self.0)
                }
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                if d.is_human_readable() {
                    let s = <::std::borrow::Cow<'de, str>>::deserialize(d)?;
                    s.parse().map_err(<D::Error as ::serde::de::Error>::custom)
                } else {
                    $crate::codec::fixed_bytes::deserialize(d).map(Self)
                }
            }
        }
    };
}
pub(crate) use byte_id;

/// A hash or identifier given as text was not the right number of hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {what}: expected {digits} hex digits")]
pub struct BadHex {
    /// What was being parsed.
    pub what: &'static str,
    /// How many hex digits it takes.
    pub digits: usize,
}
