//! tern's security: identities, signed packages, signed hop envelopes and trust policy.
//!
//! Everything here is pure: bytes in, values out. No sockets, files, async or clocks; callers
//! pass the time in as unix milliseconds. Every decoder is total: any byte string gives a value
//! or an error, never a panic or an allocation sized by an untrusted length.
//!
//! # Contents
//!
//! | type | what it is | module |
//! |---|---|---|
//! | [`SecretKey`], [`PublicKey`] | ed25519 keys of authors and nodes; PEM files, `ed25519:<hex>` text, libp2p `PeerId` text | `keys` |
//! | [`Manifest`], [`Package`] → [`VerifiedPackage`], [`PackageHash`] | an agent's code, signed by its author; a file format; its content hash | `package` |
//! | [`HopEnvelope`], [`HopCheck`], [`verify_hop`] → [`VerifiedHop`] | what the sending node signs at each hop; the checks a receiver makes | `envelope` |
//! | [`CustodyPoint`], [`CustodyCertificate`], [`follow_custody`], [`follow_anchored`] | what a home node confirmed of an agent's custody, and signed; the checks that a node reporting on the agent, or sending it on, holds it | `custody` |
//! | [`TrustPolicy`] → [`Grant`] | which authors a node runs, with what, and which peers may push to it | `policy` |
//! | [`DecodeError`] | why bytes are not a package or envelope | `codec` |
//!
//! # How they fit
//!
//! An author signs a [`Manifest`] and Rhai source into a [`Package`] and writes
//! [`Package::to_bytes`] to a file. A node that reads those bytes gets an unverified
//! [`Package`]; [`Package::verify`] is the only way to a [`VerifiedPackage`], and
//! [`TrustPolicy::admit_package`] says whether this node runs it and with what [`Grant`]. When the
//! agent moves, the sending node signs a [`HopEnvelope`] naming the agent, hop number, package
//! hash, continuation hash, previous envelope and destination; the receiver checks it with
//! [`verify_hop`] against the peer of the authenticated connection.
//!
//! # Example
//!
//! ```
//! use security::*;
//!
//! let author = SecretKey::generate();
//! let manifest = Manifest {
//!     name: "hello".into(),
//!     version: "1.0.0".into(),
//!     author: author.public(),
//!     created_ms: 1_700_000_000_000,
//!     resources: vec![ResourceDecl::new("data", ResourcePolicy::Rebind)],
//!     capabilities: vec![],
//!     limits: PackageLimits::default(),
//! };
//! let bytes = Package::sign(manifest, "print(\"hi\");".into(), &author)?.to_bytes();
//!
//! // On a node: decode, verify, admit.
//! let package = Package::from_bytes(&bytes)?.verify()?;
//! let policy: TrustPolicy = toml::from_str(&format!("authors = [\"{}\"]", author.public()))?;
//! let grant = policy.admit_package(&package)?;
//! assert_eq!(grant.author, author.public());
//!
//! // Node A sends the agent to node B.
//! let (a, b) = (SecretKey::generate(), SecretKey::generate());
//! let continuation = b"...execution state...";
//! let continuation_hash = *blake3::hash(continuation).as_bytes();
//! let envelope = HopEnvelope::sign(
//!     HopFields {
//!         agent_id: AgentId::launched(&a.public(), &LaunchNonce::generate()),
//!         hop: FIRST_HOP,
//!         package_hash: package.hash(),
//!         continuation_hash,
//!         previous: None,
//!         from: a.public(),
//!         to: b.public(),
//!         time_ms: 1_700_000_000_000,
//!     },
//!     &a,
//! )?;
//! let wire = envelope.encode();
//!
//! // On B, with A authenticated by the connection:
//! let hop = verify_hop(
//!     HopEnvelope::decode(&wire)?,
//!     &HopCheck::new(&a.public(), &b.public(), &package.hash(), &continuation_hash),
//! )?;
//! assert_eq!(hop.fields().hop, FIRST_HOP);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod codec;
mod custody;
mod envelope;
mod keys;
mod package;
mod policy;

pub use codec::{BadHex, DecodeError};
pub use custody::{
    follow_anchored, follow_custody, AgentOrigin, CustodyCertificate, CustodyError, CustodyPoint,
    HandedOverHop, Vouched, CERTIFICATE_MAGIC, MAX_CERTIFICATE_BYTES,
};
pub use envelope::{
    check_signatures, handover_opens, verify_hop, AgentId, EnvelopeHash, HopCheck, HopEnvelope,
    HopError, HopFields, LastHop, LaunchNonce, SignatureChecked, VerifiedHop, ENVELOPE_MAGIC,
    FIRST_HOP, MAX_ENVELOPE_BYTES,
};
pub use keys::{KeyError, PublicKey, SecretKey, PUBLIC_KEY_PREFIX};
pub use package::{
    BindingKind, Manifest, Mobility, Package, PackageError, PackageHash, PackageLimits,
    ResourceDecl, ResourcePolicy, UnknownResourcePolicy, VerifiedPackage,
    DEFAULT_MAX_PACKAGE_BYTES, PACKAGE_MAGIC,
};
pub use policy::{
    Access, AuthorGrant, AuthorsPolicy, Capabilities, Grant, PeersPolicy, PolicyError,
    ResourceGrants, TrustPolicy,
};
