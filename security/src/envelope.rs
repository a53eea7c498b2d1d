//! Hop envelopes: what the sending node signs at every hop, so that the chain of envelopes is the
//! agent's custody record and a destination can refuse forged, replayed, out-of-order or
//! misaddressed hops.
//!
//! # The chain
//!
//! The first envelope of an agent's journey has hop number [`FIRST_HOP`] and no `previous`. Every
//! later envelope has hop number one more than the envelope before it and names that envelope's
//! [`EnvelopeHash`] in `previous`. The node holding an agent keeps the envelope under which it
//! received it (its [`VerifiedHop`]); when the agent moves on, it signs the next envelope and sends
//! **both** (the new one and the one it holds). The receiver then passes the older one as
//! [`HopCheck::with_previous`], which proves the sender held custody: it was signed by its own
//! sender, addressed to this sender, for the same agent and package, one hop earlier.
//!
//! Separately, each node keeps a [`LastHop`] per agent — the latest hop it has accepted *or sent*
//! — and passes it as [`HopCheck::with_last_seen`]: anything at or below it is a replay (or, if it
//! is that very envelope again, a [`HopError::Duplicate`] the platform can acknowledge again).
//!
//! # Handing over
//!
//! An envelope shows that a hop was *offered*: a node that was offered an agent and did not take
//! it holds one too. Each envelope therefore also carries a **handover lock**, BLAKE3 of a
//! secret only its sender can compute (derived from the sender's key and the envelope's
//! fields). Once the destination said it holds the agent, the sender reveals the secret
//! ([`HopEnvelope::handover_key`]); anyone can check it against the signed lock
//! ([`HopEnvelope::handover_verifies`]). It proves the same as a second signature over the
//! envelope's hash would, for a hash instead of a signature on both sides (an ed25519
//! signature costs about 20 µs, a check 50 µs; a handover was one of each per hop).

use serde::{Deserialize, Serialize};

use crate::codec::{self, byte_id, fixed_bytes, opt_fixed_bytes, DecodeError};
use crate::keys::{wire_key, PublicKey, SecretKey};
use crate::package::PackageHash;

/// The first bytes of an encoded envelope: `TERNHOP` and format version 2 (version 1 had no
/// handover lock).
pub const ENVELOPE_MAGIC: &[u8; 8] = b"TERNHOP\x02";

/// Largest envelope [`HopEnvelope::decode`] accepts. A real one is about 365 bytes.
pub const MAX_ENVELOPE_BYTES: usize = 1024;

/// Hop number of the first envelope of a chain (the agent's first move).
pub const FIRST_HOP: u64 = 1;

/// Domain-separation tag for envelope signatures.
const SIGNING_TAG: &str = "tern/hop/v2";

/// Domain-separation tag for handover locks: a lock is BLAKE3 of this tag, a zero byte and the
/// handover key.
const HANDOVER_TAG: &[u8] = b"tern/handover-lock/v1";

/// BLAKE3 key-derivation context of the key a node derives its handover keys with.
const HANDOVER_KEY_CONTEXT: &str = "tern 2026-12-07 hop handover keys v1";

byte_id!(
    /// An agent's identity for its whole life, fixed at launch and bound to the key of the node
    /// that launched it, its home ([`AgentId::launched`]). Text form: 32 hex digits.
    AgentId,
    16,
    "agent id"
);

byte_id!(
    /// The random part of an agent's id, chosen by its home at launch; it travels with the
    /// agent so that any node can check whose agent it is ([`AgentId::launched`]).
    LaunchNonce,
    16,
    "launch nonce"
);

byte_id!(
    /// BLAKE3 of an envelope's encoded bytes ([`HopEnvelope::encode`]), signature included.
    EnvelopeHash,
    32,
    "envelope hash"
);

/// Domain-separation tag for deriving agent ids.
const AGENT_ID_TAG: &[u8] = b"tern/agent-id/v1";

impl AgentId {
    /// The id of the agent that the node with key `home` launched with `nonce`: the first 16
    /// bytes of BLAKE3 over a tag, the key and the nonce. Finding another key that gives an
    /// existing id is a 128-bit second preimage, so an id names its home: only the home's
    /// signature vouches for where the agent is ([`crate::CustodyCertificate`]).
    pub fn launched(home: &PublicKey, nonce: &LaunchNonce) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(AGENT_ID_TAG);
        hasher.update(&home.to_bytes());
        hasher.update(&nonce.0);
        let mut id = [0u8; 16];
        id.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        Self(id)
    }

    /// Whether this is the id of an agent launched by `home` with `nonce`.
    pub fn is_launched_by(&self, home: &PublicKey, nonce: &LaunchNonce) -> bool {
        Self::launched(home, nonce) == *self
    }
}

impl LaunchNonce {
    /// A fresh random nonce from the operating system's generator.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Self(bytes)
    }
}

/// What a hop envelope says; the sender signs all of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopFields {
    /// The agent that moves.
    pub agent_id: AgentId,
    /// Which move this is: [`FIRST_HOP`] for the first, then one more each time.
    pub hop: u64,
    /// The package the agent runs.
    pub package_hash: PackageHash,
    /// BLAKE3 of the continuation bytes that travel with this hop.
    pub continuation_hash: [u8; 32],
    /// Hash of the envelope of the hop before; `None` exactly for the first hop.
    pub previous: Option<EnvelopeHash>,
    /// The sending node (the signer).
    pub from: PublicKey,
    /// The destination node.
    pub to: PublicKey,
    /// Sender's clock at signing, unix milliseconds.
    pub time_ms: u64,
}

/// A signed hop envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopEnvelope {
    fields: HopFields,
    /// BLAKE3 of the key its sender reveals once it handed the agent over.
    handover_lock: [u8; 32],
    signature: [u8; 64],
    /// BLAKE3 of the wire bytes, computed once: a hop needs it four or five times.
    hash: EnvelopeHash,
}

/// The latest hop a node has accepted or sent for an agent: what it needs to detect replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LastHop {
    /// That envelope's hop number.
    pub hop: u64,
    /// That envelope's hash.
    pub hash: EnvelopeHash,
}

/// Why an envelope could not be signed or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HopError {
    /// [`HopEnvelope::sign`] was given a key other than `fields.from`.
    #[error("signing key is not the envelope's sender")]
    SignerNotSender,
    /// The envelope claims a sender other than the peer on the authenticated connection.
    #[error("envelope is from {claimed}, but the connection is from {peer}")]
    SenderMismatch {
        /// `from` in the envelope.
        claimed: Box<PublicKey>,
        /// The authenticated peer.
        peer: Box<PublicKey>,
    },
    /// The signature does not verify under `from`: the envelope is forged or corrupted.
    #[error("envelope signature does not verify")]
    BadSignature,
    /// The envelope is addressed to another node.
    #[error("envelope is addressed to {to}, not to this node")]
    Misaddressed {
        /// `to` in the envelope.
        to: Box<PublicKey>,
    },
    /// This exact envelope was already accepted (a retransmission: safe to acknowledge again).
    #[error("hop {hop} already accepted")]
    Duplicate {
        /// Its hop number.
        hop: u64,
    },
    /// The hop number is not above the latest hop this node has seen for the agent.
    #[error("hop {hop} replayed: already saw hop {last_seen}")]
    Replayed {
        /// The envelope's hop number.
        hop: u64,
        /// The latest hop seen.
        last_seen: u64,
    },
    /// The hop number is not the one that follows the previous envelope (a skipped or
    /// repeated hop), or a first-hop envelope has a previous hash or vice versa.
    #[error("hop {hop} out of order: expected hop {expected}")]
    OutOfOrder {
        /// The envelope's hop number.
        hop: u64,
        /// The hop number the chain calls for.
        expected: u64,
    },
    /// `previous` does not name the previous envelope that was presented.
    #[error("previous envelope hash does not match")]
    PreviousMismatch,
    /// The previous envelope does not show that the sender held the agent: it was not addressed
    /// to the sender, or is for another agent or package, or its own signature does not verify.
    #[error("previous envelope does not prove custody: {reason}")]
    NoCustody {
        /// Which check failed.
        reason: &'static str,
    },
    /// The envelope names another package than the one offered.
    #[error("envelope is for package {in_envelope}, not {offered}")]
    PackageMismatch {
        /// `package_hash` in the envelope.
        in_envelope: PackageHash,
        /// The package actually offered.
        offered: PackageHash,
    },
    /// The continuation bytes received do not hash to `continuation_hash`.
    #[error("continuation does not match the envelope")]
    ContinuationMismatch,
    /// The envelope is dated further in the future than the allowed clock skew.
    #[error("envelope is dated {time_ms}, ahead of local time {now_ms}")]
    FromTheFuture {
        /// `time_ms` in the envelope.
        time_ms: u64,
        /// The receiver's clock.
        now_ms: u64,
    },
    /// The envelope is dated before the one it follows, by more than the allowed clock skew:
    /// custody moves forward in time.
    #[error("envelope is dated {time_ms}, before the hop it follows ({previous_ms})")]
    BeforeItsPrevious {
        /// `time_ms` in the envelope.
        time_ms: u64,
        /// `time_ms` of the previous envelope.
        previous_ms: u64,
    },
}

#[derive(Serialize)]
struct FieldsRef<'a> {
    #[serde(with = "fixed_bytes")]
    agent_id: &'a [u8; 16],
    hop: u64,
    #[serde(with = "fixed_bytes")]
    package_hash: &'a [u8; 32],
    #[serde(with = "fixed_bytes")]
    continuation_hash: &'a [u8; 32],
    #[serde(with = "opt_fixed_bytes")]
    previous: Option<[u8; 32]>,
    #[serde(with = "fixed_bytes")]
    from: &'a [u8; 32],
    #[serde(with = "fixed_bytes")]
    to: &'a [u8; 32],
    time_ms: u64,
    #[serde(with = "fixed_bytes")]
    handover_lock: &'a [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct EnvelopeWire {
    #[serde(with = "fixed_bytes")]
    agent_id: [u8; 16],
    hop: u64,
    #[serde(with = "fixed_bytes")]
    package_hash: [u8; 32],
    #[serde(with = "fixed_bytes")]
    continuation_hash: [u8; 32],
    #[serde(with = "opt_fixed_bytes")]
    previous: Option<[u8; 32]>,
    #[serde(with = "fixed_bytes")]
    from: [u8; 32],
    #[serde(with = "fixed_bytes")]
    to: [u8; 32],
    time_ms: u64,
    #[serde(with = "fixed_bytes")]
    handover_lock: [u8; 32],
    #[serde(with = "fixed_bytes")]
    signature: [u8; 64],
}

/// The encoded form: the same fields as [`EnvelopeWire`], borrowed.
#[derive(Serialize)]
struct EnvelopeRef<'a> {
    #[serde(with = "fixed_bytes")]
    agent_id: &'a [u8; 16],
    hop: u64,
    #[serde(with = "fixed_bytes")]
    package_hash: &'a [u8; 32],
    #[serde(with = "fixed_bytes")]
    continuation_hash: &'a [u8; 32],
    #[serde(with = "opt_fixed_bytes")]
    previous: Option<[u8; 32]>,
    #[serde(with = "fixed_bytes")]
    from: &'a [u8; 32],
    #[serde(with = "fixed_bytes")]
    to: &'a [u8; 32],
    time_ms: u64,
    #[serde(with = "fixed_bytes")]
    handover_lock: &'a [u8; 32],
    #[serde(with = "fixed_bytes")]
    signature: &'a [u8; 64],
}

fn fields_ref<'a>(
    f: &'a HopFields,
    from: &'a [u8; 32],
    to: &'a [u8; 32],
    handover_lock: &'a [u8; 32],
) -> FieldsRef<'a> {
    FieldsRef {
        agent_id: &f.agent_id.0,
        hop: f.hop,
        package_hash: &f.package_hash.0,
        continuation_hash: &f.continuation_hash,
        previous: f.previous.map(|h| h.0),
        from,
        to,
        time_ms: f.time_ms,
        handover_lock,
    }
}

/// What an envelope's signature signs: the tag, the fields and the handover lock.
pub(crate) fn signing_bytes(fields: &HopFields, handover_lock: &[u8; 32]) -> Vec<u8> {
    let (from, to) = (fields.from.to_bytes(), fields.to.to_bytes());
    let mut out = Vec::with_capacity(256);
    codec::encode(
        &(SIGNING_TAG, fields_ref(fields, &from, &to, handover_lock)),
        &mut out,
    );
    out
}

/// The handover key of the envelope with these fields signed by `key`: a keyed hash of the
/// fields, under a key derived from the signing key. Only the signer can compute it, and it
/// differs for every envelope (the fields include the time, the destination and the
/// continuation's hash).
fn handover_key_of(fields: &HopFields, key: &SecretKey) -> [u8; 32] {
    let derived = key.derive(HANDOVER_KEY_CONTEXT);
    *blake3::keyed_hash(&derived, &signing_bytes(fields, &[0; 32])).as_bytes()
}

/// Whether `handover` opens the handover lock `lock` (an envelope's
/// [`HopEnvelope::handover_lock`], kept apart from it).
pub fn handover_opens(lock: &[u8; 32], handover: &[u8; 32]) -> bool {
    lock_of(handover) == *lock
}

/// The lock a handover key opens.
fn lock_of(handover_key: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(HANDOVER_TAG);
    hasher.update(&[0]);
    hasher.update(handover_key);
    *hasher.finalize().as_bytes()
}

impl HopEnvelope {
    /// Signs `fields` with the sending node's key.
    ///
    /// # Errors
    ///
    /// [`HopError::SignerNotSender`] if `key` is not `fields.from`.
    pub fn sign(fields: HopFields, key: &SecretKey) -> Result<Self, HopError> {
        Self::sign_with_handover(fields, key).map(|(envelope, _)| envelope)
    }

    /// [`HopEnvelope::sign`], and the envelope's handover key
    /// ([`HopEnvelope::handover_key`]), computed once for both.
    ///
    /// # Errors
    ///
    /// As [`HopEnvelope::sign`].
    pub fn sign_with_handover(
        fields: HopFields,
        key: &SecretKey,
    ) -> Result<(Self, [u8; 32]), HopError> {
        if key.public() != fields.from {
            return Err(HopError::SignerNotSender);
        }
        let handover_key = handover_key_of(&fields, key);
        let handover_lock = lock_of(&handover_key);
        let signature = key.sign(&signing_bytes(&fields, &handover_lock));
        let mut envelope = Self {
            fields,
            handover_lock,
            signature,
            hash: EnvelopeHash([0; 32]),
        };
        envelope.hash = EnvelopeHash(*blake3::hash(&envelope.encode()).as_bytes());
        Ok((envelope, handover_key))
    }

    /// What the envelope says (not yet checked, unless it came from a [`VerifiedHop`]).
    pub fn fields(&self) -> &HopFields {
        &self.fields
    }

    /// BLAKE3 of the key its sender reveals once it handed the agent over
    /// ([`HopEnvelope::handover_key`]).
    pub fn handover_lock(&self) -> &[u8; 32] {
        &self.handover_lock
    }

    /// The sender's signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The wire bytes: [`ENVELOPE_MAGIC`] then canonical CBOR of the fields and the signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(384);
        out.extend_from_slice(ENVELOPE_MAGIC);
        let f = &self.fields;
        let (from, to) = (f.from.to_bytes(), f.to.to_bytes());
        codec::encode(
            &EnvelopeRef {
                agent_id: &f.agent_id.0,
                hop: f.hop,
                package_hash: &f.package_hash.0,
                continuation_hash: &f.continuation_hash,
                previous: f.previous.map(|h| h.0),
                from: &from,
                to: &to,
                time_ms: f.time_ms,
                handover_lock: &self.handover_lock,
                signature: &self.signature,
            },
            &mut out,
        );
        out
    }

    /// Reads an envelope of at most [`MAX_ENVELOPE_BYTES`]. Checks the format only; the
    /// signature and the chain are checked by [`verify_hop`].
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] for anything but a canonical envelope with valid keys.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode_known(bytes, |_| None)
    }

    /// As [`HopEnvelope::decode`], but a key that `known` returns for its bytes (the receiver's
    /// own, a peer's it met before) is taken as it is instead of being decompressed and checked
    /// again.
    ///
    /// # Errors
    ///
    /// As [`HopEnvelope::decode`].
    pub fn decode_known(
        bytes: &[u8],
        known: impl Fn(&[u8; 32]) -> Option<PublicKey>,
    ) -> Result<Self, DecodeError> {
        let key = |bytes: &[u8; 32], field| match known(bytes) {
            Some(k) if k.to_bytes() == *bytes => Ok(k),
            _ => wire_key(bytes, field),
        };
        let body = codec::strip_magic(
            bytes,
            ENVELOPE_MAGIC,
            "tern hop envelope",
            MAX_ENVELOPE_BYTES,
        )?;
        let w: EnvelopeWire = codec::decode_canonical(body, ENVELOPE_MAGIC.len())?;
        Ok(Self {
            fields: HopFields {
                agent_id: AgentId(w.agent_id),
                hop: w.hop,
                package_hash: PackageHash(w.package_hash),
                continuation_hash: w.continuation_hash,
                previous: w.previous.map(EnvelopeHash),
                from: key(&w.from, "from")?,
                to: key(&w.to, "to")?,
                time_ms: w.time_ms,
            },
            handover_lock: w.handover_lock,
            signature: w.signature,
            // The decoder took canonical bytes only: these are what `encode` gives.
            hash: EnvelopeHash(*blake3::hash(bytes).as_bytes()),
        })
    }

    /// BLAKE3 of [`HopEnvelope::encode`].
    pub fn hash(&self) -> EnvelopeHash {
        self.hash
    }

    /// This envelope as the latest hop of its agent, e.g. right after sending it.
    pub fn last_hop(&self) -> LastHop {
        LastHop {
            hop: self.fields.hop,
            hash: self.hash(),
        }
    }

    /// The key that opens this envelope's handover lock, which its sender (holding `key`)
    /// reveals once it handed the agent over by this hop: the destination said it holds the
    /// agent, and the sender will not run it again. None if `key` did not sign this envelope.
    /// (Revealed with the decision to commit, it would prove nothing: the destination reads
    /// that decision before it answers, and can then refuse.)
    pub fn handover_key(&self, key: &SecretKey) -> Option<[u8; 32]> {
        let handover_key = handover_key_of(&self.fields, key);
        (lock_of(&handover_key) == self.handover_lock).then_some(handover_key)
    }

    /// Whether `handover` opens this envelope's handover lock: its sender said it handed the
    /// agent over by this hop ([`HopEnvelope::handover_key`]). One hash.
    pub fn handover_verifies(&self, handover: &[u8; 32]) -> bool {
        handover_opens(&self.handover_lock, handover)
    }

    /// What its signature signs.
    pub(crate) fn signed_bytes(&self) -> Vec<u8> {
        signing_bytes(&self.fields, &self.handover_lock)
    }

    fn signature_ok(&self) -> bool {
        self.fields
            .from
            .verify(&self.signed_bytes(), &self.signature)
    }
}

/// Proof that an envelope's signature verifies under its sender's key, from
/// [`check_signatures`]; [`HopCheck::with_signature_checked`] takes it so that [`verify_hop`]
/// does not check the signature again. Only this crate makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureChecked(EnvelopeHash);

/// Checks the signatures of many envelopes at once (ed25519 batch verification: from 8 on,
/// about half the cost of checking them one by one): `Some` proof for each that verifies. For
/// a node that receives many hops at the same time; [`verify_hop`] does everything else.
pub fn check_signatures(envelopes: &[&HopEnvelope]) -> Vec<Option<SignatureChecked>> {
    let messages: Vec<Vec<u8>> = envelopes.iter().map(|e| e.signed_bytes()).collect();
    let items: Vec<(&PublicKey, &[u8], &[u8; 64])> = envelopes
        .iter()
        .zip(&messages)
        .map(|(e, m)| (&e.fields.from, m.as_slice(), &e.signature))
        .collect();
    crate::keys::verify_many(&items)
        .into_iter()
        .zip(envelopes)
        .map(|(ok, e)| ok.then(|| SignatureChecked(e.hash())))
        .collect()
}

/// What the receiver knows when a hop arrives. Build with [`HopCheck::new`] and the `with_*`
/// methods.
#[derive(Debug, Clone, Copy)]
pub struct HopCheck<'a> {
    /// The peer on the authenticated (noise) connection the envelope came over.
    pub authenticated_sender: &'a PublicKey,
    /// This node.
    pub me: &'a PublicKey,
    /// Hash of the package offered with the hop.
    pub package_hash: &'a PackageHash,
    /// BLAKE3 of the continuation bytes received with the hop.
    pub continuation_hash: &'a [u8; 32],
    /// The envelope under which the sender holds the agent; `None` means the hop must be the
    /// first of the chain.
    pub previous: Option<&'a HopEnvelope>,
    /// The receiver knows `previous` is genuine without checking its signature (it signed it
    /// itself: the agent is coming back).
    pub previous_known_genuine: bool,
    /// The latest hop this node has accepted or sent for this agent, if any.
    pub last_seen: Option<LastHop>,
    /// `(now_ms, max_skew_ms)`: refuse envelopes dated after `now_ms + max_skew_ms`, or
    /// before their previous envelope by more than `max_skew_ms`.
    pub clock: Option<(u64, u64)>,
    /// The envelope's signature was checked already (if this proof is for it).
    pub signature_checked: Option<SignatureChecked>,
}

impl<'a> HopCheck<'a> {
    /// The checks every hop needs: who sent it, who I am, what package and continuation came.
    pub fn new(
        authenticated_sender: &'a PublicKey,
        me: &'a PublicKey,
        package_hash: &'a PackageHash,
        continuation_hash: &'a [u8; 32],
    ) -> Self {
        Self {
            authenticated_sender,
            me,
            package_hash,
            continuation_hash,
            previous: None,
            previous_known_genuine: false,
            last_seen: None,
            clock: None,
            signature_checked: None,
        }
    }

    /// The envelope's signature was checked by [`check_signatures`]: a proof for this very
    /// envelope spares checking it again (a proof for another is ignored).
    pub fn with_signature_checked(mut self, proof: Option<SignatureChecked>) -> Self {
        self.signature_checked = proof;
        self
    }

    /// The envelope the sender presented as its own custody (the hop before this one).
    pub fn with_previous(mut self, previous: Option<&'a HopEnvelope>) -> Self {
        self.previous = previous;
        self
    }

    /// `previous` is an envelope this node signed itself, so its signature needs no check
    /// (the chain checks still apply).
    pub fn with_previous_known_genuine(mut self, known: bool) -> Self {
        self.previous_known_genuine = known;
        self
    }

    /// The latest hop this node knows for the agent.
    pub fn with_last_seen(mut self, last_seen: Option<LastHop>) -> Self {
        self.last_seen = last_seen;
        self
    }

    /// Refuse envelopes dated more than `max_skew_ms` after `now_ms` (unix milliseconds), or
    /// more than `max_skew_ms` before the previous envelope (the two were signed by different
    /// clocks).
    pub fn with_clock(mut self, now_ms: u64, max_skew_ms: u64) -> Self {
        self.clock = Some((now_ms, max_skew_ms));
        self
    }
}

/// An envelope that passed [`verify_hop`]. Keep it as the agent's custody while it is here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedHop {
    envelope: HopEnvelope,
    hash: EnvelopeHash,
}

impl VerifiedHop {
    /// The envelope.
    pub fn envelope(&self) -> &HopEnvelope {
        &self.envelope
    }

    /// Its fields.
    pub fn fields(&self) -> &HopFields {
        &self.envelope.fields
    }

    /// Its hash (the `previous` of the next hop).
    pub fn hash(&self) -> EnvelopeHash {
        self.hash
    }

    /// What to record as the agent's latest hop.
    pub fn last_hop(&self) -> LastHop {
        LastHop {
            hop: self.envelope.fields.hop,
            hash: self.hash,
        }
    }

    /// The envelope, forgetting that it was verified.
    pub fn into_envelope(self) -> HopEnvelope {
        self.envelope
    }
}

/// Checks an arriving hop against what the receiver knows.
///
/// # Errors
///
/// The first failing check, as a [`HopError`], in this order: sender mismatch, bad signature,
/// misaddressed, duplicate, replayed, out of order, previous mismatch, no custody, package
/// mismatch, continuation mismatch, from the future.
pub fn verify_hop(envelope: HopEnvelope, ctx: &HopCheck<'_>) -> Result<VerifiedHop, HopError> {
    let f = &envelope.fields;
    if f.from != *ctx.authenticated_sender {
        return Err(HopError::SenderMismatch {
            claimed: Box::new(f.from),
            peer: Box::new(*ctx.authenticated_sender),
        });
    }
    // Right after the sender check, so every later error is about a genuine envelope.
    let hash = envelope.hash();
    let checked = ctx.signature_checked == Some(SignatureChecked(hash));
    if !checked && !envelope.signature_ok() {
        return Err(HopError::BadSignature);
    }
    if f.to != *ctx.me {
        return Err(HopError::Misaddressed { to: Box::new(f.to) });
    }
    if let Some(last) = ctx.last_seen {
        if last.hash == hash {
            return Err(HopError::Duplicate { hop: f.hop });
        }
        if f.hop <= last.hop {
            return Err(HopError::Replayed {
                hop: f.hop,
                last_seen: last.hop,
            });
        }
    }
    match (ctx.previous, f.previous) {
        (None, None) if f.hop == FIRST_HOP => {}
        (None, _) => {
            return Err(HopError::OutOfOrder {
                hop: f.hop,
                expected: FIRST_HOP,
            })
        }
        (Some(prev), claimed) => {
            let p = &prev.fields;
            let expected = p.hop.saturating_add(1);
            if f.hop != expected || p.hop == u64::MAX {
                return Err(HopError::OutOfOrder {
                    hop: f.hop,
                    expected,
                });
            }
            if claimed != Some(prev.hash()) {
                return Err(HopError::PreviousMismatch);
            }
            if p.to != f.from {
                return Err(HopError::NoCustody {
                    reason: "previous hop was addressed to another node",
                });
            }
            if p.agent_id != f.agent_id {
                return Err(HopError::NoCustody {
                    reason: "previous hop is for another agent",
                });
            }
            if p.package_hash != f.package_hash {
                return Err(HopError::NoCustody {
                    reason: "previous hop is for another package",
                });
            }
            if !ctx.previous_known_genuine && !prev.signature_ok() {
                return Err(HopError::NoCustody {
                    reason: "previous envelope signature does not verify",
                });
            }
        }
    }
    if f.package_hash != *ctx.package_hash {
        return Err(HopError::PackageMismatch {
            in_envelope: f.package_hash,
            offered: *ctx.package_hash,
        });
    }
    if f.continuation_hash != *ctx.continuation_hash {
        return Err(HopError::ContinuationMismatch);
    }
    if let Some((now_ms, skew)) = ctx.clock {
        if f.time_ms > now_ms.saturating_add(skew) {
            return Err(HopError::FromTheFuture {
                time_ms: f.time_ms,
                now_ms,
            });
        }
        if let Some(previous) = ctx.previous {
            let previous_ms = previous.fields.time_ms;
            if f.time_ms.saturating_add(skew) < previous_ms {
                return Err(HopError::BeforeItsPrevious {
                    time_ms: f.time_ms,
                    previous_ms,
                });
            }
        }
    }
    Ok(VerifiedHop { envelope, hash })
}
