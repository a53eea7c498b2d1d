//! Signed packages: an agent's code segment (manifest + Rhai source) signed by its author, with a
//! file format, a content hash that names it on the network, and a typestate so that only
//! verified packages reach the executor.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::codec::{self, byte_id, fixed_bytes, DecodeError};
use crate::keys::{wire_key, PublicKey, SecretKey};

/// The first bytes of a package file: `TERNPKG` and format version 1.
pub const PACKAGE_MAGIC: &[u8; 8] = b"TERNPKG\x01";

/// Default largest package [`Package::from_bytes`] accepts: 16 MiB.
pub const DEFAULT_MAX_PACKAGE_BYTES: usize = 16 * 1024 * 1024;

/// Domain-separation tag: a package signature can never be mistaken for a signature over
/// anything else tern (or another program using the same key) signs.
const SIGNING_TAG: &str = "tern/package/v1";

byte_id!(
    /// A package's name on the network: BLAKE3 of its canonical file bytes
    /// ([`Package::to_bytes`]), signature included. Text form: 64 lowercase hex digits.
    PackageHash,
    32,
    "package hash"
);

/// How a resource binding moves when its agent hops (see ARCHITECTURE.md, "Resources").
///
/// Text form (`Display`, `FromStr`, serde): `copy`, `rebind`, `remote`, `move`,
/// `copy-on-reference`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResourcePolicy {
    /// The value travels with the agent.
    Copy,
    /// At every node, bind to the local resource of the same name and type.
    Rebind,
    /// Keep a reference; operations become requests to the owning node.
    Remote,
    /// The resource itself goes with the agent (only where it may leave its host).
    Move,
    /// A lazy copy: reads go to the resource where it was bound, and each part read is kept at
    /// the node the agent is on, so that reading it again there is local.
    CopyOnReference,
}

impl ResourcePolicy {
    /// Every policy.
    pub const ALL: [ResourcePolicy; 5] = [
        Self::Copy,
        Self::Rebind,
        Self::Remote,
        Self::Move,
        Self::CopyOnReference,
    ];

    /// The text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copy => "copy",
            Self::Rebind => "rebind",
            Self::Remote => "remote",
            Self::Move => "move",
            Self::CopyOnReference => "copy-on-reference",
        }
    }

    /// The kind of binding a declaration of this policy alone stands for: `rebind` binds by
    /// type, `copy` and copy-on-reference by value, `move` and `remote` by identifier.
    pub fn usual_binding(self) -> BindingKind {
        match self {
            Self::Rebind => BindingKind::ByType,
            Self::Copy | Self::CopyOnReference => BindingKind::ByValue,
            Self::Move | Self::Remote => BindingKind::ByIdentifier,
        }
    }

    /// Whether a binding of `kind` may be kept by this policy: the rows of Fuggetta, Picco and
    /// Vigna's table ("Understanding Code Mobility", 1998, table 1). A binding by identifier
    /// needs that very resource (moved, or reached where it is); by value, its contents (copied,
    /// moved, or reached); by type, any resource of its type (rebound, or any of the others).
    ///
    /// # Errors
    ///
    /// Why not, in a sentence.
    pub fn keeps(self, kind: BindingKind) -> Result<(), String> {
        match (kind, self) {
            (BindingKind::ByIdentifier, Self::Copy | Self::CopyOnReference) => Err(format!(
                "a binding by identifier needs that very resource, and a {self} is another one \
                 (use move or remote)"
            )),
            (BindingKind::ByIdentifier | BindingKind::ByValue, Self::Rebind) => Err(format!(
                "rebind reaches whichever resource of the type each node has, which only a \
                 binding by type accepts, not one {kind}"
            )),
            _ => Ok(()),
        }
    }

    /// Whether this policy may be used on a resource of `mobility`: the columns of the same
    /// table. A `move` takes the resource away, which only a free one may leave; a copy (eager
    /// or lazy) takes its contents, which a fixed non-transferable one never gives; `remote`
    /// and `rebind` leave every resource where it is.
    ///
    /// # Errors
    ///
    /// Why not, in a sentence.
    pub fn admits(self, mobility: Mobility) -> Result<(), String> {
        match (self, mobility) {
            (Self::Move, Mobility::FixedTransferable | Mobility::Fixed) => Err(format!(
                "a move takes the resource away from its node, and it is {mobility} (only a \
                 free resource may be moved)"
            )),
            (Self::Copy | Self::CopyOnReference, Mobility::Fixed) => Err(format!(
                "a {self} takes the resource's contents from its node, and it is fixed (not \
                 transferable): use remote"
            )),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for ResourcePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource policy name that is not one of [`ResourcePolicy::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown resource policy {0:?}: expected copy, rebind, remote, move or copy-on-reference")]
pub struct UnknownResourcePolicy(pub String);

impl FromStr for ResourcePolicy {
    type Err = UnknownResourcePolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownResourcePolicy(s.chars().take(64).collect()))
    }
}

/// What an agent's binding to a resource needs of it (the paper's three kinds).
///
/// Text form: `by-identifier`, `by-value`, `by-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindingKind {
    /// That very resource.
    ByIdentifier,
    /// Its contents.
    ByValue,
    /// Any resource of its type.
    ByType,
}

impl BindingKind {
    /// The text form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ByIdentifier => "by-identifier",
            Self::ByValue => "by-value",
            Self::ByType => "by-type",
        }
    }
}

impl fmt::Display for BindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BindingKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::ByIdentifier, Self::ByValue, Self::ByType]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown binding kind '{}': expected by-identifier, by-value or by-type",
                    s.chars().take(64).collect::<String>()
                )
            })
    }
}

/// Whether a resource may leave the node that offers it (the paper's columns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mobility {
    /// Free transferable: it may be moved or copied.
    Free,
    /// Fixed transferable: it may be copied (its contents leave), never moved.
    FixedTransferable,
    /// Fixed non-transferable: it never leaves its node; agents reach it there.
    Fixed,
}

impl Mobility {
    /// The text form, as in node configurations.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Free => "free",
            Self::FixedTransferable => "fixed-transferable",
            Self::Fixed => "fixed",
        }
    }
}

impl fmt::Display for Mobility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mobility {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Free, Self::FixedTransferable, Self::Fixed]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown mobility '{}': expected free, fixed-transferable or fixed",
                    s.chars().take(64).collect::<String>()
                )
            })
    }
}

/// A resource the agent binds to by name, and how that binding moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceDecl {
    /// The name the agent passes to `resource(name)`.
    pub name: String,
    /// How the binding travels.
    pub policy: ResourcePolicy,
    /// The kind of binding, when the author stated it (otherwise the policy's
    /// [`ResourcePolicy::usual_binding`]; left out of the encoding then, so that a package
    /// signed before it existed keeps its bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<BindingKind>,
}

impl ResourceDecl {
    /// A declaration of `policy`, of its usual kind of binding.
    pub fn new(name: impl Into<String>, policy: ResourcePolicy) -> ResourceDecl {
        ResourceDecl {
            name: name.into(),
            policy,
            binding: None,
        }
    }

    /// A declaration from its text form, `POLICY` or `POLICY/BINDING` (as `tern pack
    /// --resource NAME=...` takes it): `rebind`, `copy/by-type`, `move/by-value`.
    ///
    /// # Errors
    ///
    /// An unknown policy or kind of binding, or a kind the policy cannot keep.
    pub fn from_text(name: impl Into<String>, text: &str) -> Result<ResourceDecl, String> {
        let (policy, binding) = match text.split_once('/') {
            Some((policy, binding)) => (policy, Some(binding.parse::<BindingKind>()?)),
            None => (text, None),
        };
        let policy: ResourcePolicy = policy.parse().map_err(|e| format!("{e}"))?;
        let decl = ResourceDecl {
            name: name.into(),
            policy,
            binding,
        };
        policy.keeps(decl.binding())?;
        Ok(decl)
    }

    /// The kind of binding: as stated, or the policy's usual one.
    pub fn binding(&self) -> BindingKind {
        self.binding.unwrap_or(self.policy.usual_binding())
    }
}

/// Limits a package asks for (in its manifest) or a policy allows (in an [`crate::AuthorGrant`]).
/// `None` means "not stated": for a package, the node's default applies; for a grant, no cap.
///
/// All fields may be omitted in TOML. In the canonical encoding the first six fields are always
/// present; the budgets after them only when stated, so that a package signed before they
/// existed keeps its bytes and its hash.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PackageLimits {
    /// Rhai operations per run slice.
    pub max_operations: Option<u64>,
    /// Depth of nested function calls.
    pub max_call_depth: Option<u64>,
    /// Bytes in one string.
    pub max_string_size: Option<u64>,
    /// Items in one array.
    pub max_array_size: Option<u64>,
    /// Entries in one object map.
    pub max_map_size: Option<u64>,
    /// Bytes of the encoded continuation (the whole execution state that travels).
    pub max_continuation_bytes: Option<u64>,
    /// Rhai operations in the agent's whole life, every slice on every node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_total_operations: Option<u64>,
    /// Bytes all the agent's values may hold together, on the node it is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_memory_bytes: Option<u64>,
    /// Messages the agent may send in its whole life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages_sent: Option<u64>,
    /// Bytes of messages the agent may send in its whole life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes_sent: Option<u64>,
}

impl PackageLimits {
    /// Every limit with its name, in declaration order.
    pub fn entries(&self) -> [(&'static str, Option<u64>); 10] {
        [
            ("max_operations", self.max_operations),
            ("max_call_depth", self.max_call_depth),
            ("max_string_size", self.max_string_size),
            ("max_array_size", self.max_array_size),
            ("max_map_size", self.max_map_size),
            ("max_continuation_bytes", self.max_continuation_bytes),
            ("max_total_operations", self.max_total_operations),
            ("max_memory_bytes", self.max_memory_bytes),
            ("max_messages_sent", self.max_messages_sent),
            ("max_message_bytes_sent", self.max_message_bytes_sent),
        ]
    }

    pub(crate) fn from_entries(v: [Option<u64>; 10]) -> Self {
        Self {
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
        }
    }
}

/// What a package says about itself; signed together with the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Package name (not unique: the [`PackageHash`] is the real name).
    pub name: String,
    /// Author-chosen version text.
    pub version: String,
    /// The key that must have signed the package.
    pub author: PublicKey,
    /// When the author built it, unix milliseconds (informational).
    pub created_ms: u64,
    /// Resources the agent binds to; names are unique.
    #[serde(default)]
    pub resources: Vec<ResourceDecl>,
    /// Capabilities the agent asks for; a node's [`crate::TrustPolicy`] must grant all of them.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Limits the agent asks for.
    #[serde(default)]
    pub limits: PackageLimits,
}

impl Manifest {
    /// Checks what the types cannot: a non-empty name, unique resource names and capabilities.
    ///
    /// # Errors
    ///
    /// [`PackageError::InvalidManifest`] saying what is wrong.
    pub fn validate(&self) -> Result<(), PackageError> {
        let invalid = |reason: String| Err(PackageError::InvalidManifest { reason });
        if self.name.is_empty() {
            return invalid("empty name".into());
        }
        let mut seen = BTreeSet::new();
        for r in &self.resources {
            if r.name.is_empty() {
                return invalid("empty resource name".into());
            }
            if !seen.insert(r.name.as_str()) {
                return invalid(format!("resource {:?} declared twice", r.name));
            }
            if let Err(why) = r.policy.keeps(r.binding()) {
                return invalid(format!("resource {:?}: {why}", r.name));
            }
        }
        let mut seen = BTreeSet::new();
        for c in &self.capabilities {
            if !seen.insert(c.as_str()) {
                return invalid(format!("capability {c:?} requested twice"));
            }
        }
        Ok(())
    }
}

/// Why a package could not be read, signed or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PackageError {
    /// The bytes are not a well-formed package file (bad magic, unsupported version,
    /// oversized, truncated, malformed or non-canonical CBOR, an invalid author key).
    #[error("cannot decode package: {0}")]
    Decode(#[from] DecodeError),
    /// The manifest breaks a rule of [`Manifest::validate`].
    #[error("invalid manifest: {reason}")]
    InvalidManifest {
        /// What is wrong.
        reason: String,
    },
    /// [`Package::sign`] was given a key other than the manifest's author.
    #[error("signing key is not the manifest's author")]
    AuthorMismatch,
    /// The signature does not verify under the manifest's author key.
    #[error("package signature does not verify")]
    SignatureInvalid,
}

/// A package as signed or as read from bytes, **not yet verified**. Call [`Package::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    manifest: Manifest,
    source: String,
    signature: [u8; 64],
}

/// A package whose author signature has been checked. Only [`Package::verify`] makes one, so a
/// function taking `&VerifiedPackage` cannot be handed unchecked code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPackage {
    package: Package,
    hash: PackageHash,
}

// Wire forms. Field order here *is* the canonical encoding; the borrowed form (for encoding) and
// the owned form (for decoding) must list the same fields in the same order, which
// `decode_canonical`'s re-encoding check and the round-trip tests enforce.

#[derive(Serialize)]
struct ManifestRef<'a> {
    name: &'a str,
    version: &'a str,
    #[serde(with = "fixed_bytes")]
    author: &'a [u8; 32],
    created_ms: u64,
    resources: &'a [ResourceDecl],
    capabilities: &'a [String],
    limits: &'a PackageLimits,
}

#[derive(Serialize, Deserialize)]
struct ManifestWire {
    name: String,
    version: String,
    #[serde(with = "fixed_bytes")]
    author: [u8; 32],
    created_ms: u64,
    resources: Vec<ResourceDecl>,
    capabilities: Vec<String>,
    limits: PackageLimits,
}

#[derive(Serialize)]
struct PackageRef<'a> {
    manifest: ManifestRef<'a>,
    source: &'a str,
    #[serde(with = "fixed_bytes")]
    signature: &'a [u8; 64],
}

#[derive(Serialize, Deserialize)]
struct PackageWire {
    manifest: ManifestWire,
    source: String,
    #[serde(with = "fixed_bytes")]
    signature: [u8; 64],
}

fn manifest_ref<'a>(m: &'a Manifest, author: &'a [u8; 32]) -> ManifestRef<'a> {
    ManifestRef {
        name: &m.name,
        version: &m.version,
        author,
        created_ms: m.created_ms,
        resources: &m.resources,
        capabilities: &m.capabilities,
        limits: &m.limits,
    }
}

/// The bytes the author signs: canonical CBOR of `[tag, manifest, source]`.
fn signing_bytes(manifest: &Manifest, source: &str) -> Vec<u8> {
    let author = manifest.author.to_bytes();
    let mut out = Vec::with_capacity(source.len() + 256);
    codec::encode(
        &(SIGNING_TAG, manifest_ref(manifest, &author), source),
        &mut out,
    );
    out
}

impl Package {
    /// Signs `manifest` and `source` with the author's key.
    ///
    /// # Errors
    ///
    /// [`PackageError::AuthorMismatch`] if `key` is not `manifest.author`;
    /// [`PackageError::InvalidManifest`] if the manifest does not validate.
    pub fn sign(manifest: Manifest, source: String, key: &SecretKey) -> Result<Self, PackageError> {
        if key.public() != manifest.author {
            return Err(PackageError::AuthorMismatch);
        }
        manifest.validate()?;
        let signature = key.sign(&signing_bytes(&manifest, &source));
        Ok(Self {
            manifest,
            source,
            signature,
        })
    }

    /// The manifest (unverified).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The Rhai source (unverified).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The author's ed25519 signature.
    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// The package file: [`PACKAGE_MAGIC`] then canonical CBOR of manifest, source, signature.
    pub fn to_bytes(&self) -> Vec<u8> {
        let author = self.manifest.author.to_bytes();
        let mut out = Vec::with_capacity(PACKAGE_MAGIC.len() + self.source.len() + 512);
        out.extend_from_slice(PACKAGE_MAGIC);
        codec::encode(
            &PackageRef {
                manifest: manifest_ref(&self.manifest, &author),
                source: &self.source,
                signature: &self.signature,
            },
            &mut out,
        );
        out
    }

    /// BLAKE3 of [`Package::to_bytes`]. For a package read with [`Package::from_bytes`] this is
    /// the hash of the bytes that were read, since only canonical bytes are accepted.
    pub fn hash(&self) -> PackageHash {
        PackageHash(*blake3::hash(&self.to_bytes()).as_bytes())
    }

    /// Reads a package file of at most [`DEFAULT_MAX_PACKAGE_BYTES`]. Does not verify it.
    ///
    /// # Errors
    ///
    /// [`PackageError::Decode`] for anything but a canonical package file.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PackageError> {
        Self::from_bytes_with_limit(bytes, DEFAULT_MAX_PACKAGE_BYTES)
    }

    /// Reads a package file of at most `max` bytes. Does not verify it.
    ///
    /// # Errors
    ///
    /// [`PackageError::Decode`] for anything but a canonical package file.
    pub fn from_bytes_with_limit(bytes: &[u8], max: usize) -> Result<Self, PackageError> {
        let body = codec::strip_magic(bytes, PACKAGE_MAGIC, "tern package", max)?;
        let wire: PackageWire = codec::decode_canonical(body, PACKAGE_MAGIC.len())?;
        let m = wire.manifest;
        Ok(Self {
            manifest: Manifest {
                name: m.name,
                version: m.version,
                author: wire_key(&m.author, "author")?,
                created_ms: m.created_ms,
                resources: m.resources,
                capabilities: m.capabilities,
                limits: m.limits,
            },
            source: wire.source,
            signature: wire.signature,
        })
    }

    /// Checks the manifest and the author's signature.
    ///
    /// # Errors
    ///
    /// [`PackageError::InvalidManifest`] or [`PackageError::SignatureInvalid`].
    pub fn verify(self) -> Result<VerifiedPackage, PackageError> {
        self.manifest.validate()?;
        let message = signing_bytes(&self.manifest, &self.source);
        if !self.manifest.author.verify(&message, &self.signature) {
            return Err(PackageError::SignatureInvalid);
        }
        let hash = self.hash();
        Ok(VerifiedPackage {
            package: self,
            hash,
        })
    }
}

impl VerifiedPackage {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.package.manifest
    }

    /// The Rhai source.
    pub fn source(&self) -> &str {
        &self.package.source
    }

    /// The author who signed it.
    pub fn author(&self) -> &PublicKey {
        &self.package.manifest.author
    }

    /// Its content hash (computed once, at verification).
    pub fn hash(&self) -> PackageHash {
        self.hash
    }

    /// The package file bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.package.to_bytes()
    }

    /// The package underneath.
    pub fn package(&self) -> &Package {
        &self.package
    }

    /// Gives back the package, forgetting that it was verified.
    pub fn into_package(self) -> Package {
        self.package
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(author: PublicKey) -> Manifest {
        Manifest {
            name: "hello".into(),
            version: "1.0.0".into(),
            author,
            created_ms: 1_700_000_000_000,
            resources: vec![ResourceDecl::new("data", ResourcePolicy::Rebind)],
            capabilities: vec!["net".into()],
            limits: PackageLimits {
                max_operations: Some(1_000_000),
                ..PackageLimits::default()
            },
        }
    }

    #[test]
    fn resource_policy_text_round_trips() {
        for p in ResourcePolicy::ALL {
            assert_eq!(p.to_string().parse(), Ok(p));
        }
        assert!("Copy".parse::<ResourcePolicy>().is_err());
        for k in [
            BindingKind::ByIdentifier,
            BindingKind::ByValue,
            BindingKind::ByType,
        ] {
            assert_eq!(k.to_string().parse(), Ok(k));
        }
        for m in [Mobility::Free, Mobility::FixedTransferable, Mobility::Fixed] {
            assert_eq!(m.to_string().parse(), Ok(m));
        }
    }

    #[test]
    fn the_combinations_allowed_are_the_papers_table() {
        // Fuggetta, Picco & Vigna 1998, table 1: for each kind of binding, the mechanisms
        // allowed on a free, a fixed transferable and a fixed non-transferable resource.
        let table = [
            (
                BindingKind::ByIdentifier,
                ["move remote", "remote", "remote"],
            ),
            (
                BindingKind::ByValue,
                [
                    "copy remote move copy-on-reference",
                    "copy remote copy-on-reference",
                    "remote",
                ],
            ),
            (
                BindingKind::ByType,
                [
                    "rebind remote copy move copy-on-reference",
                    "rebind remote copy copy-on-reference",
                    "rebind remote",
                ],
            ),
        ];
        let columns = [Mobility::Free, Mobility::FixedTransferable, Mobility::Fixed];
        for (kind, row) in table {
            for (mobility, allowed) in columns.into_iter().zip(row) {
                for policy in ResourcePolicy::ALL {
                    let expected = allowed.split(' ').any(|p| p == policy.as_str());
                    let got = policy.keeps(kind).and(policy.admits(mobility));
                    assert_eq!(got.is_ok(), expected, "{kind} {policy} {mobility}: {got:?}");
                }
            }
        }
        assert_eq!(
            ResourcePolicy::ALL.map(|p| p.keeps(p.usual_binding())),
            [const { Ok(()) }; 5]
        );
    }

    #[test]
    fn a_binding_the_policy_cannot_keep_is_refused_when_signed() {
        let key = SecretKey::from_seed([1; 32]);
        let mut m = manifest(key.public());
        m.resources[0].binding = Some(BindingKind::ByIdentifier);
        let Err(PackageError::InvalidManifest { reason }) = Package::sign(m, "x".into(), &key)
        else {
            panic!("a rebind by identifier was signed");
        };
        assert!(
            reason.contains("\"data\"") && reason.contains("by type"),
            "{reason}"
        );
    }

    #[test]
    fn signing_bytes_start_with_the_domain_tag() {
        let key = SecretKey::from_seed([9; 32]);
        let bytes = signing_bytes(&manifest(key.public()), "x");
        // CBOR array of 3, then a text string of 15 bytes: the tag.
        assert_eq!(&bytes[..2], &[0x83, 0x6f]);
        assert_eq!(&bytes[2..17], SIGNING_TAG.as_bytes());
    }

    #[test]
    fn sign_refuses_a_key_that_is_not_the_author() {
        let author = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        assert_eq!(
            Package::sign(manifest(author.public()), "x".into(), &other),
            Err(PackageError::AuthorMismatch)
        );
    }

    #[test]
    fn manifest_validation_catches_duplicates() {
        let key = SecretKey::from_seed([1; 32]);
        let mut m = manifest(key.public());
        m.resources.push(m.resources[0].clone());
        assert!(matches!(
            Package::sign(m, "x".into(), &key),
            Err(PackageError::InvalidManifest { .. })
        ));
        let mut m = manifest(key.public());
        m.capabilities.push("net".into());
        assert!(m.validate().is_err());
        let mut m = manifest(key.public());
        m.name.clear();
        assert!(m.validate().is_err());
    }

    #[test]
    fn wire_round_trip_is_canonical_and_hash_is_of_the_bytes() {
        let key = SecretKey::from_seed([1; 32]);
        let package = Package::sign(manifest(key.public()), "print(1);".into(), &key).unwrap();
        let bytes = package.to_bytes();
        let back = Package::from_bytes(&bytes).unwrap();
        assert_eq!(back, package);
        let verified = back.verify().unwrap();
        assert_eq!(verified.hash().0, *blake3::hash(&bytes).as_bytes());
        assert_eq!(verified.to_bytes(), bytes);
    }

    /// The budgets added to `PackageLimits` after the first six limits are left out of the
    /// canonical encoding when not stated: a package signed before they existed keeps its
    /// bytes and its hash (this one's was taken before they were added). Stated, they are
    /// signed and read back; an explicit `null` for one is not canonical.
    #[test]
    fn limits_added_later_leave_older_packages_unchanged() {
        let key = SecretKey::from_seed([1; 32]);
        let package = Package::sign(manifest(key.public()), "print(1);".into(), &key).unwrap();
        assert_eq!(
            package.hash().to_string(),
            "3450c4a04c09321dc457cb81b8baf73dfd753df389d6393497fa21d3983fa97f"
        );
        let mut m = manifest(key.public());
        m.limits.max_memory_bytes = Some(1 << 20);
        m.limits.max_messages_sent = Some(7);
        let package = Package::sign(m, "print(1);".into(), &key).unwrap();
        let back = Package::from_bytes(&package.to_bytes()).unwrap();
        assert_eq!(back.manifest().limits, package.manifest().limits);
        assert_eq!(back.manifest().limits.max_messages_sent, Some(7));

        let mut limits = Vec::new();
        crate::codec::encode(&package.manifest().limits, &mut limits);
        let mut with_null = limits.clone();
        with_null[0] += 1; // one more entry in the map ...
        crate::codec::encode(&"max_message_bytes_sent", &mut with_null);
        with_null.push(0xf6); // ... stated as null
        assert!(crate::codec::decode_canonical::<PackageLimits>(&with_null, 0).is_err());
        assert!(crate::codec::decode_canonical::<PackageLimits>(&limits, 0).is_ok());
    }
}
