//! A node's trust policy: which authors' packages it runs and with what capabilities and limits,
//! which peers may push agents to it, whether it serves packages to anyone who asks, and who
//! operates it.
//!
//! Read from the node's `[trust]` TOML table:
//!
//! ```toml
//! [trust]
//! # "any", or a list of keys / tables; omitted means no author is trusted.
//! authors = [
//!   "ed25519:3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
//!   { key = "ed25519:...", capabilities = ["net"], limits = { max_operations = 1000000 } },
//!   # The node's resources its agents may use: "any" (all, read and write), or by name.
//!   { key = "ed25519:...", resources = { shard = "read", counts = "read-write" } },
//! ]
//! # "any", or a list of `ed25519:` keys or peer ids; omitted means nobody may push.
//! accept_from = "any"
//! serve_packages = true
//! # `ed25519:` keys or peer ids of who may launch agents here and ask about them (`tern launch
//! # --key`); omitted means nobody.
//! operators = ["ed25519:..."]
//! ```

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::keys::PublicKey;
use crate::package::{PackageLimits, VerifiedPackage};

/// What a node trusts. `TrustPolicy::default()` trusts no author and accepts pushes from no
/// peer, but serves packages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustPolicy {
    /// Whose packages this node runs.
    pub authors: AuthorsPolicy,
    /// Which peers may push agents here.
    pub accept_from: PeersPolicy,
    /// Whether this node answers package downloads by hash (pull is anonymous).
    pub serve_packages: bool,
    /// Who may launch agents here and ask about them (the client protocol: launch, status,
    /// result, send). Never "any": a node is run by someone.
    pub operators: Vec<PublicKey>,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        Self {
            authors: AuthorsPolicy::List(Vec::new()),
            accept_from: PeersPolicy::List(Vec::new()),
            serve_packages: true,
            operators: Vec::new(),
        }
    }
}

/// Which authors are trusted. TOML: `"any"` or a list of [`AuthorGrant`]s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorsPolicy {
    /// Every author, with every capability it asks for (for development meshes).
    Any,
    /// Only these authors, each with its own grant.
    List(Vec<AuthorGrant>),
}

/// One trusted author. TOML: the key as a string (no capabilities, no extra limits, no
/// resources), or a table `{ key = "...", capabilities = [...] | "any", limits = { ... },
/// resources = "any" | { name = "read" | "read-write" } }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorGrant {
    /// The author's key.
    pub key: PublicKey,
    /// Capabilities its packages may have.
    pub capabilities: Capabilities,
    /// Caps on the limits its packages may ask for; a package asking for more is refused, and a
    /// package stating no limit gets the cap.
    pub limits: PackageLimits,
    /// The node's resources its agents may use.
    pub resources: ResourceGrants,
}

/// How an agent may use a resource it was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read it (a dataset, a value, a table's entries).
    Read,
    /// Read it and change it (a table's entries).
    ReadWrite,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::ReadWrite => "read-write",
        })
    }
}

/// Which of a node's resources an author's agents may use, and how. TOML: `"any"` (every
/// resource, read and write) or a table of names, `{ shard = "read", counts = "read-write" }`.
/// Default: none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceGrants {
    /// Every resource, read and write.
    Any,
    /// Only these, each as stated.
    Named(std::collections::BTreeMap<String, Access>),
}

impl Default for ResourceGrants {
    fn default() -> Self {
        Self::Named(Default::default())
    }
}

impl ResourceGrants {
    /// How resource `name` may be used; None: not at all.
    pub fn access(&self, name: &str) -> Option<Access> {
        match self {
            Self::Any => Some(Access::ReadWrite),
            Self::Named(names) => names.get(name).copied(),
        }
    }
}

impl Serialize for ResourceGrants {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Any => s.serialize_str(ANY),
            Self::Named(names) => names.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ResourceGrants {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct GrantsVisitor;

        impl<'de> Visitor<'de> for GrantsVisitor {
            type Value = ResourceGrants;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"any\" or a table of resource names, each \"read\" or \"read-write\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ResourceGrants, E> {
                if v == ANY {
                    Ok(ResourceGrants::Any)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ResourceGrants, A::Error> {
                let names = std::collections::BTreeMap::<String, Access>::deserialize(
                    MapAccessDeserializer::new(map),
                )?;
                Ok(ResourceGrants::Named(names))
            }
        }

        d.deserialize_any(GrantsVisitor)
    }
}

/// A set of capabilities. TOML: `"any"` or a list of names. Default: none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capabilities {
    /// Every capability.
    Any,
    /// Only these.
    List(Vec<String>),
}

impl Default for Capabilities {
    fn default() -> Self {
        Self::List(Vec::new())
    }
}

impl Capabilities {
    /// Whether `capability` is in the set.
    pub fn allows(&self, capability: &str) -> bool {
        match self {
            Self::Any => true,
            Self::List(list) => list.iter().any(|c| c == capability),
        }
    }
}

/// Which peers may push agents. TOML: `"any"` or a list of `ed25519:` keys or peer ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeersPolicy {
    /// Every peer.
    Any,
    /// Only these.
    List(Vec<PublicKey>),
}

/// What an admitted package may do here: the capabilities it asked for (all granted) and the
/// limits that apply (its own, capped by the author's grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The package's author.
    pub author: PublicKey,
    /// The capabilities it asked for, all of them granted.
    pub capabilities: Vec<String>,
    /// The limits in force; `None` leaves the node's default.
    pub limits: PackageLimits,
    /// The node's resources it may use.
    pub resources: ResourceGrants,
}

/// Why a package is not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The policy does not trust the package's author.
    #[error("author {author} is not trusted")]
    UntrustedAuthor {
        /// The author.
        author: Box<PublicKey>,
    },
    /// The package asks for a capability its author's grant does not include.
    #[error("capability {capability:?} is not granted to author {author}")]
    CapabilityNotGranted {
        /// The author.
        author: Box<PublicKey>,
        /// The capability.
        capability: String,
    },
    /// The package asks for more than its author's grant allows.
    #[error("{limit} of {requested} is over the granted {allowed}")]
    LimitExceeded {
        /// Which limit (a [`PackageLimits`] field name).
        limit: &'static str,
        /// What the package asks for.
        requested: u64,
        /// What the grant allows.
        allowed: u64,
    },
}

impl TrustPolicy {
    /// Decides whether this node runs `package`, and with what.
    ///
    /// # Errors
    ///
    /// [`PolicyError::UntrustedAuthor`], [`PolicyError::CapabilityNotGranted`] or
    /// [`PolicyError::LimitExceeded`].
    pub fn admit_package(&self, package: &VerifiedPackage) -> Result<Grant, PolicyError> {
        let manifest = package.manifest();
        let author = *package.author();
        let grant = match &self.authors {
            AuthorsPolicy::Any => {
                return Ok(Grant {
                    author,
                    capabilities: manifest.capabilities.clone(),
                    limits: manifest.limits,
                    resources: ResourceGrants::Any,
                })
            }
            AuthorsPolicy::List(list) => {
                list.iter()
                    .find(|g| g.key == author)
                    .ok_or(PolicyError::UntrustedAuthor {
                        author: Box::new(author),
                    })?
            }
        };
        if let Some(missing) = manifest
            .capabilities
            .iter()
            .find(|c| !grant.capabilities.allows(c))
        {
            return Err(PolicyError::CapabilityNotGranted {
                author: Box::new(author),
                capability: missing.clone(),
            });
        }
        let mut limits = [None; 10];
        for (slot, ((limit, requested), (_, allowed))) in limits.iter_mut().zip(
            manifest
                .limits
                .entries()
                .into_iter()
                .zip(grant.limits.entries()),
        ) {
            *slot = match (requested, allowed) {
                // 0 means "no limit" to Rhai: asking for it is asking for nothing.
                (Some(0), allowed) => allowed,
                (Some(requested), Some(allowed)) if requested > allowed => {
                    return Err(PolicyError::LimitExceeded {
                        limit,
                        requested,
                        allowed,
                    })
                }
                (Some(requested), _) => Some(requested),
                (None, allowed) => allowed,
            };
        }
        Ok(Grant {
            author,
            capabilities: manifest.capabilities.clone(),
            limits: PackageLimits::from_entries(limits),
            resources: grant.resources.clone(),
        })
    }

    /// Whether `author`'s packages can be admitted at all.
    pub fn trusts_author(&self, author: &PublicKey) -> bool {
        match &self.authors {
            AuthorsPolicy::Any => true,
            AuthorsPolicy::List(list) => list.iter().any(|g| g.key == *author),
        }
    }

    /// Whether `client` may launch agents on this node and ask it about them.
    pub fn is_operator(&self, client: &PublicKey) -> bool {
        self.operators.contains(client)
    }

    /// Whether `peer` may push agents to this node.
    pub fn accepts_push_from(&self, peer: &PublicKey) -> bool {
        match &self.accept_from {
            PeersPolicy::Any => true,
            PeersPolicy::List(list) => list.contains(peer),
        }
    }
}

// ---- serde: `"any"` or a list ----

const ANY: &str = "any";

/// Deserializes `"any"` as `None` and a sequence as `Some(list)`.
fn any_or_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    struct AnyOrList<T>(PhantomData<T>);

    impl<'de, T: Deserialize<'de>> Visitor<'de> for AnyOrList<T> {
        type Value = Option<Vec<T>>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("\"any\" or a list")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            if v == ANY {
                Ok(None)
            } else {
                Err(E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            // No size_hint pre-allocation: the hint comes from the input.
            let mut list = Vec::new();
            while let Some(item) = seq.next_element()? {
                list.push(item);
            }
            Ok(Some(list))
        }
    }

    d.deserialize_any(AnyOrList(PhantomData))
}

fn serialize_any_or_list<S: Serializer, T: Serialize>(
    list: Option<&[T]>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match list {
        None => s.serialize_str(ANY),
        Some(list) => {
            let mut seq = s.serialize_seq(Some(list.len()))?;
            for item in list {
                seq.serialize_element(item)?;
            }
            seq.end()
        }
    }
}

macro_rules! any_or_list_serde {
    ($ty:ident, $item:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    Self::Any => serialize_any_or_list::<S, $item>(None, s),
                    Self::List(list) => serialize_any_or_list(Some(list), s),
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                Ok(any_or_list(d)?.map_or(Self::Any, Self::List))
            }
        }
    };
}

any_or_list_serde!(AuthorsPolicy, AuthorGrant);
any_or_list_serde!(PeersPolicy, PublicKey);
any_or_list_serde!(Capabilities, String);

impl<'de> Deserialize<'de> for AuthorGrant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            key: PublicKey,
            #[serde(default)]
            capabilities: Capabilities,
            #[serde(default)]
            limits: PackageLimits,
            #[serde(default)]
            resources: ResourceGrants,
        }

        struct GrantVisitor;

        impl<'de> Visitor<'de> for GrantVisitor {
            type Value = AuthorGrant;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an author key or a table with `key`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<AuthorGrant, E> {
                Ok(AuthorGrant {
                    key: v.parse().map_err(E::custom)?,
                    capabilities: Capabilities::default(),
                    limits: PackageLimits::default(),
                    resources: ResourceGrants::default(),
                })
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<AuthorGrant, A::Error> {
                let t = Table::deserialize(MapAccessDeserializer::new(map))?;
                Ok(AuthorGrant {
                    key: t.key,
                    capabilities: t.capabilities,
                    limits: t.limits,
                    resources: t.resources,
                })
            }
        }

        d.deserialize_any(GrantVisitor)
    }
}
