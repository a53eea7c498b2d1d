//! Custody as the agent's home node knows it, and the check that lets a node prove it holds an
//! agent.
//!
//! A node that reports where an agent is, or how it ended, must hold it. The home node keeps a
//! [`CustodyPoint`] per agent it launched: the hop, holder and envelope it last confirmed. The
//! reporting node presents the envelopes it has since that point (its *custody tail*: the ones
//! the agent arrived with, up to the one that brought it to the reporter); [`follow_custody`]
//! checks that they link, hop by hop and signature by signature, from the confirmed holder to the
//! reporter. A peer that never held the agent cannot present such a chain: it would need an
//! envelope addressed to it, signed by a holder, linked back to what the home confirmed. (Checking
//! one link is not enough: a throwaway key can sign a "previous hop" to its owner.)

use crate::envelope::{check_signatures, AgentId, EnvelopeHash, HopEnvelope, FIRST_HOP};
use crate::keys::PublicKey;

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
    /// The home has confirmed a later hop than the last of the tail: the report is older than
    /// what the home knows (reports of a fast-moving agent can arrive out of order).
    #[error("the custody tail ends at hop {hop}, and hop {confirmed} is confirmed already")]
    Superseded {
        /// The hop the tail ends at.
        hop: u64,
        /// The hop confirmed.
        confirmed: u64,
    },
    /// The tail leads to another node than the one presenting it.
    #[error("the custody tail leads to {holder}, not to the node presenting it")]
    NotHolder {
        /// Where the tail leads.
        holder: Box<PublicKey>,
    },
}

/// Follows `tail` (oldest first) from `confirmed` and returns the custody it leads to, which must
/// be `presenter`'s. The signature of an envelope for whose hash `genuine` says yes is not checked
/// again (one the caller signed itself, or verified a moment ago). Envelopes at or before the confirmed hop are skipped (a tail may overlap what
/// the home confirmed already); the others must each be the next hop, name the envelope before
/// (the confirmed one for the first), be sent by the node the one before was addressed to, and be
/// signed by it. An empty tail (or one the home confirmed entirely) leaves `confirmed`, which
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
    tail: &[HopEnvelope],
    presenter: &PublicKey,
    genuine: impl Fn(&EnvelopeHash) -> bool,
) -> Result<CustodyPoint, CustodyError> {
    if let Some(last) = tail.last() {
        let hop = last.fields().hop;
        if hop < confirmed.hop {
            return Err(CustodyError::Superseded {
                hop,
                confirmed: confirmed.hop,
            });
        }
    }
    let new: Vec<&HopEnvelope> = tail
        .iter()
        .filter(|e| e.fields().hop > confirmed.hop)
        .collect();
    let mut at = *confirmed;
    for e in &new {
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
    // Signatures last, all at once: the cheap checks above refuse garbage first.
    let unchecked: Vec<&HopEnvelope> = new.into_iter().filter(|e| !genuine(&e.hash())).collect();
    if let Some(bad) = check_signatures(&unchecked)
        .iter()
        .zip(&unchecked)
        .find_map(|(ok, e)| ok.is_none().then_some(e.fields().hop))
    {
        return Err(CustodyError::BadSignature { hop: bad });
    }
    if at.holder != *presenter {
        return Err(CustodyError::NotHolder {
            holder: Box::new(at.holder),
        });
    }
    Ok(at)
}
