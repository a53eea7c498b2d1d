//! Custody as the agent's home node knows it, and the check that lets a node prove it holds an
//! agent.
//!
//! A node that reports where an agent is, or how it ended, must hold it. The home node keeps a
//! [`CustodyPoint`] per agent it launched: the hop, holder and envelope it last confirmed. The
//! reporting node presents the hops since that point (its *custody tail*: the ones the agent
//! arrived with, up to the one that brought it to the reporter), each a [`HandedOverHop`]: the
//! envelope and its sender's signature that it handed the agent over by it. [`follow_custody`]
//! checks that they link, hop by hop and signature by signature, from the confirmed holder to
//! the reporter. A peer that never held the agent cannot present such a chain: it would need a
//! hop to it, handed over by a holder, linked back to what the home confirmed. (Checking one link is not
//! enough: a throwaway key can sign a "previous hop" to its owner. And an envelope is not
//! enough: a node that was offered the agent and did not take it holds one addressed to it.)
//!
//! Any other node a hop brings the agent to checks its custody the same way, from a point the
//! home vouches for: the home signs a [`CustodyCertificate`] of each point it confirms, the
//! holder sends the latest one with the agent, and [`follow_anchored`] follows the tail from it
//! (or from the launch, when there is none yet). The home's key is the one the agent's id was
//! derived from ([`AgentId::launched`]), so a peer cannot name itself the home of an agent
//! it did not launch.

use serde::{Deserialize, Serialize};

use crate::codec::{self, fixed_bytes, opt_fixed_bytes, DecodeError};
use crate::envelope::{AgentId, EnvelopeHash, HopEnvelope, LaunchNonce, FIRST_HOP};
use crate::keys::{verify_many, wire_key, PublicKey, SecretKey};

/// What a home node last confirmed of an agent's custody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CustodyPoint {
    /// The hop number of the envelope that brought the agent to `holder` (0 before its first hop).
    pub hop: u64,
    /// The node that held the agent then.
    pub holder: PublicKey,
    /// That envelope's hash (`None` before the first hop).
    pub envelope: Option<EnvelopeHash>,
}

impl CustodyPoint {
    /// An agent just launched on `home`, before its first hop.
    pub fn launched(home: PublicKey) -> Self {
        CustodyPoint {
            hop: 0,
            holder: home,
            envelope: None,
        }
    }
}

/// A hop of an agent's custody: the envelope that moved it, and the key its sender revealed when
/// it handed the agent over by it ([`HopEnvelope::handover_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedOverHop {
    /// The hop's envelope.
    pub envelope: HopEnvelope,
    /// The handover key the sender revealed.
    pub handover: [u8; 32],
}

/// Whether the caller vouches for a hop's envelope signature (it made it itself), so that
/// [`follow_custody`] does not check it again. Signing an envelope is not handing over: a node
/// signs one for every offer, taken or not, so the handover key is checked all the same (one
/// hash).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Vouched {
    /// The envelope's signature.
    pub envelope: bool,
}

/// Who launched an agent: the home's key and the nonce its id was derived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentOrigin {
    /// The home node's key.
    pub home: PublicKey,
    /// The nonce the home chose.
    pub nonce: LaunchNonce,
}

/// The first bytes of an encoded certificate: `TERNCRT` and format version 1.
pub const CERTIFICATE_MAGIC: &[u8; 8] = b"TERNCRT\x01";

/// Largest certificate [`CustodyCertificate::decode`] accepts. A real one is about 200 bytes.
pub const MAX_CERTIFICATE_BYTES: usize = 512;

/// Domain-separation tag for certificate signatures.
const CERTIFICATE_TAG: &str = "tern/custody/v1";

/// A custody point of an agent, signed by the agent's home: "I confirmed that `holder` held
/// this agent by the envelope of hop `hop`". Checked with [`CustodyCertificate::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustodyCertificate {
    agent: AgentId,
    point: CustodyPoint,
    signature: [u8; 64],
}

/// What the home signs, borrowed.
#[derive(Serialize)]
struct CertifiedRef<'a> {
    #[serde(with = "fixed_bytes")]
    agent_id: &'a [u8; 16],
    hop: u64,
    #[serde(with = "fixed_bytes")]
    holder: &'a [u8; 32],
    #[serde(with = "opt_fixed_bytes")]
    envelope: Option<[u8; 32]>,
}

/// The encoded form: [`CertifiedRef`]'s fields and the signature.
#[derive(Serialize, Deserialize)]
struct CertificateWire {
    #[serde(with = "fixed_bytes")]
    agent_id: [u8; 16],
    hop: u64,
    #[serde(with = "fixed_bytes")]
    holder: [u8; 32],
    #[serde(with = "opt_fixed_bytes")]
    envelope: Option<[u8; 32]>,
    #[serde(with = "fixed_bytes")]
    signature: [u8; 64],
}

fn certified_bytes(agent: &AgentId, point: &CustodyPoint) -> Vec<u8> {
    let holder = point.holder.to_bytes();
    let mut out = Vec::with_capacity(160);
    codec::encode(
        &(
            CERTIFICATE_TAG,
            CertifiedRef {
                agent_id: &agent.0,
                hop: point.hop,
                holder: &holder,
                envelope: point.envelope.map(|h| h.0),
            },
        ),
        &mut out,
    );
    out
}

impl CustodyCertificate {
    /// The home (whose key is `home`) certifies `point` of `agent`.
    pub fn sign(agent: AgentId, point: CustodyPoint, home: &SecretKey) -> Self {
        let signature = home.sign(&certified_bytes(&agent, &point));
        Self {
            agent,
            point,
            signature,
        }
    }

    /// The point certified (not yet checked, unless it came from [`CustodyCertificate::verify`]).
    pub fn point(&self) -> &CustodyPoint {
        &self.point
    }

    /// The wire bytes: [`CERTIFICATE_MAGIC`] then canonical CBOR of the fields and signature.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(200);
        out.extend_from_slice(CERTIFICATE_MAGIC);
        codec::encode(
            &CertificateWire {
                agent_id: self.agent.0,
                hop: self.point.hop,
                holder: self.point.holder.to_bytes(),
                envelope: self.point.envelope.map(|h| h.0),
                signature: self.signature,
            },
            &mut out,
        );
        out
    }

    /// Reads a certificate of at most [`MAX_CERTIFICATE_BYTES`]; `known` as for
    /// [`HopEnvelope::decode_known`]. Checks the format only.
    ///
    /// # Errors
    ///
    /// A [`DecodeError`] for anything but a canonical certificate with a valid key.
    pub fn decode_known(
        bytes: &[u8],
        known: impl Fn(&[u8; 32]) -> Option<PublicKey>,
    ) -> Result<Self, DecodeError> {
        let body = codec::strip_magic(
            bytes,
            CERTIFICATE_MAGIC,
            "tern custody certificate",
            MAX_CERTIFICATE_BYTES,
        )?;
        let w: CertificateWire = codec::decode_canonical(body, CERTIFICATE_MAGIC.len())?;
        let holder = match known(&w.holder) {
            Some(k) if k.to_bytes() == w.holder => k,
            _ => wire_key(&w.holder, "holder")?,
        };
        Ok(Self {
            agent: AgentId(w.agent_id),
            point: CustodyPoint {
                hop: w.hop,
                holder,
                envelope: w.envelope.map(EnvelopeHash),
            },
            signature: w.signature,
        })
    }

    /// The point certified, if this certificate is for `agent` and signed by `home`.
    ///
    /// # Errors
    ///
    /// [`CustodyError::BadCertificate`] otherwise.
    pub fn verify(&self, agent: &AgentId, home: &PublicKey) -> Result<CustodyPoint, CustodyError> {
        let consistent =
            self.agent == *agent && (self.point.hop == 0) == self.point.envelope.is_none();
        if consistent && home.verify(&certified_bytes(&self.agent, &self.point), &self.signature) {
            Ok(self.point)
        } else {
            Err(CustodyError::BadCertificate)
        }
    }
}

/// Why a custody tail does not lead from the confirmed point to its presenter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CustodyError {
    /// An envelope of the tail is for another agent.
    #[error("the envelope of hop {hop} is for another agent")]
    OtherAgent {
        /// Its hop number.
        hop: u64,
    },
    /// The tail is not in hop order, or skips the hop after the confirmed one.
    #[error("the custody tail has hop {found} where hop {expected} belongs")]
    Gap {
        /// The hop number the chain calls for.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// An envelope does not name the envelope before it.
    #[error("the envelope of hop {hop} does not follow the one before it")]
    Unlinked {
        /// Its hop number.
        hop: u64,
    },
    /// An envelope was signed by a node that did not hold the agent then.
    #[error("the envelope of hop {hop} was sent by a node that did not hold the agent")]
    NotFromHolder {
        /// Its hop number.
        hop: u64,
    },
    /// An envelope's signature does not verify.
    #[error("the envelope of hop {hop} is not signed by its sender")]
    BadSignature {
        /// Its hop number.
        hop: u64,
    },
    /// A hop's handover signature does not verify: its sender did not say it handed the agent
    /// over (the envelope may be one the agent was only offered by).
    #[error("hop {hop} was not handed over by its sender")]
    NotHandedOver {
        /// Its hop number.
        hop: u64,
    },
    /// The home has confirmed a later hop than the last of the tail: the report is older than
    /// what the home knows (reports of a fast-moving agent can arrive out of order).
    #[error("the custody tail ends at hop {hop}, and hop {confirmed} is confirmed already")]
    Superseded {
        /// The hop the tail ends at.
        hop: u64,
        /// The hop confirmed.
        confirmed: u64,
    },
    /// The agent's id was not derived from the key of the node named as its home.
    #[error("the agent was not launched by {home}")]
    NotLaunchedBy {
        /// The home named.
        home: Box<PublicKey>,
    },
    /// The custody certificate is not the home's, or not for this agent.
    #[error("the custody certificate is not signed by the agent's home for this agent")]
    BadCertificate,
    /// The tail leads to another node than the one presenting it.
    #[error("the custody tail leads to {holder}, not to the node presenting it")]
    NotHolder {
        /// Where the tail leads.
        holder: Box<PublicKey>,
    },
}

/// Follows `tail` (oldest first) from `confirmed` and returns the custody it leads to, which must
/// be `presenter`'s. The signatures of a hop that `vouched` vouches for (given its envelope's
/// hash) are not checked. Hops at or before the confirmed one are
/// skipped (a tail may overlap what the home confirmed already); the others must each be the
/// next hop, name the envelope before (the confirmed one for the first), be sent by the node the
/// one before was addressed to, and be signed and handed over by it. An empty tail (or one the home confirmed entirely) leaves `confirmed`, which
/// `presenter` must then hold. A tail that ends before the confirmed hop is [`Superseded`]
/// (nothing in it is checked: it changes nothing either way).
///
/// [`Superseded`]: CustodyError::Superseded
///
/// # Errors
///
/// The first [`CustodyError`] along the tail.
pub fn follow_custody(
    agent: &AgentId,
    confirmed: &CustodyPoint,
    tail: &[HandedOverHop],
    presenter: &PublicKey,
    vouched: impl Fn(&EnvelopeHash) -> Vouched,
) -> Result<CustodyPoint, CustodyError> {
    if let Some(last) = tail.last() {
        let hop = last.envelope.fields().hop;
        if hop < confirmed.hop {
            return Err(CustodyError::Superseded {
                hop,
                confirmed: confirmed.hop,
            });
        }
    }
    let new: Vec<&HandedOverHop> = tail
        .iter()
        .filter(|h| h.envelope.fields().hop > confirmed.hop)
        .collect();
    let mut at = *confirmed;
    for h in &new {
        let e = &h.envelope;
        let f = e.fields();
        if f.agent_id != *agent {
            return Err(CustodyError::OtherAgent { hop: f.hop });
        }
        let expected = at.hop.saturating_add(1).max(FIRST_HOP);
        if f.hop != expected {
            return Err(CustodyError::Gap {
                expected,
                found: f.hop,
            });
        }
        if f.previous != at.envelope {
            return Err(CustodyError::Unlinked { hop: f.hop });
        }
        if f.from != at.holder {
            return Err(CustodyError::NotFromHolder { hop: f.hop });
        }
        at = CustodyPoint {
            hop: f.hop,
            holder: f.to,
            envelope: Some(e.hash()),
        };
    }
    // Signatures last, all at once: the cheap checks above refuse garbage first. Then the
    // handover keys (a hash each).
    let unchecked: Vec<(&HopEnvelope, Vec<u8>)> = new
        .iter()
        .map(|h| &h.envelope)
        .filter(|e| !vouched(&e.hash()).envelope)
        .map(|e| (e, e.signed_bytes()))
        .collect();
    let items: Vec<(&PublicKey, &[u8], &[u8; 64])> = unchecked
        .iter()
        .map(|(e, message)| (&e.fields().from, message.as_slice(), e.signature()))
        .collect();
    let verified = verify_many(&items);
    if let Some(((e, _), _)) = unchecked.iter().zip(&verified).find(|(_, ok)| !**ok) {
        return Err(CustodyError::BadSignature {
            hop: e.fields().hop,
        });
    }
    if let Some(h) = new
        .iter()
        .find(|h| !h.envelope.handover_verifies(&h.handover))
    {
        return Err(CustodyError::NotHandedOver {
            hop: h.envelope.fields().hop,
        });
    }
    if at.holder != *presenter {
        return Err(CustodyError::NotHolder {
            holder: Box::new(at.holder),
        });
    }
    Ok(at)
}

/// Follows `tail` (oldest first) to `presenter` as any node a hop brings the agent to checks
/// it: the agent's id must be `origin`'s, and custody starts from what the home vouches for,
/// whichever is latest: the point `certificate` certifies (signed by the home), the home's own
/// hop in the tail (an envelope the home sent is its word that it held the agent just before),
/// or else the launch. Then as [`follow_custody`], with the same `vouched`.
///
/// # Errors
///
/// [`CustodyError::NotLaunchedBy`], [`CustodyError::BadCertificate`], or those of
/// [`follow_custody`].
pub fn follow_anchored(
    agent: &AgentId,
    origin: &AgentOrigin,
    certificate: Option<&CustodyCertificate>,
    tail: &[HandedOverHop],
    presenter: &PublicKey,
    vouched: impl Fn(&EnvelopeHash) -> Vouched,
) -> Result<CustodyPoint, CustodyError> {
    if !agent.is_launched_by(&origin.home, &origin.nonce) {
        return Err(CustodyError::NotLaunchedBy {
            home: Box::new(origin.home),
        });
    }
    let certified = match certificate {
        Some(c) => c.verify(agent, &origin.home)?,
        None => CustodyPoint::launched(origin.home),
    };
    // The home's latest hop in the tail starts custody where it held the agent, if that is
    // later than what it certified: the hop's own checks (its signature among them) follow.
    let sent_by_home = tail.iter().rposition(|e| {
        let f = e.envelope.fields();
        f.from == origin.home && f.agent_id == *agent && f.hop > certified.hop
    });
    match sent_by_home {
        Some(i) => {
            let f = tail[i].envelope.fields();
            let home_held = CustodyPoint {
                hop: f.hop - 1,
                holder: origin.home,
                envelope: f.previous,
            };
            follow_custody(agent, &home_held, &tail[i..], presenter, vouched)
        }
        None => follow_custody(agent, &certified, tail, presenter, vouched),
    }
}
