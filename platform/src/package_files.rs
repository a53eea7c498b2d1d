//! Key and package files on disk: what `tern keygen`, `tern pack`, `tern inspect` and
//! `tern run PACKAGE.tern` read and write. The `security` crate stays pure; this module owns the
//! files.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use security::{
    Grant, Manifest, Package, PackageLimits, ResourceDecl, SecretKey, TrustPolicy, VerifiedPackage,
};

/// Writes a new secret key as PKCS#8 PEM with mode 0600; refuses to overwrite unless `force`.
///
/// # Errors
///
/// The file exists (without `force`) or cannot be written.
pub fn write_new_key(path: &Path, force: bool) -> Result<SecretKey> {
    let key = SecretKey::generate();
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists (use --force to overwrite it)",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot create {}", path.display()))
        }
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // `mode` only applies to new files; an overwritten one gets 0600 too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(key.to_pkcs8_pem().as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(key)
}

/// Reads a PKCS#8 PEM secret key.
///
/// # Errors
///
/// The file cannot be read or is not an ed25519 PKCS#8 key.
pub fn read_key(path: &Path) -> Result<SecretKey> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key {}", path.display()))?;
    SecretKey::from_pkcs8_pem(&pem)
        .with_context(|| format!("{} is not an ed25519 PKCS#8 key", path.display()))
}

/// What `tern pack` puts in the manifest besides the author.
#[derive(Debug, Clone)]
pub struct PackSpec {
    /// Package name.
    pub name: String,
    /// Version text.
    pub version: String,
    /// Declared resources.
    pub resources: Vec<ResourceDecl>,
    /// Requested capabilities.
    pub capabilities: Vec<String>,
    /// Requested limits.
    pub limits: PackageLimits,
}

/// Compiles `source` (refusing syntax errors and unresumable forms) and signs it into a package.
///
/// # Errors
///
/// A compile error (with line and column) or an invalid manifest.
pub fn pack(source: String, spec: PackSpec, key: &SecretKey, now_ms: u64) -> Result<Package> {
    agent_lang::Program::compile(&source, &agent_lang::Limits::default())?;
    let manifest = Manifest {
        name: spec.name,
        version: spec.version,
        author: key.public(),
        created_ms: now_ms,
        resources: spec.resources,
        capabilities: spec.capabilities,
        limits: spec.limits,
    };
    Ok(Package::sign(manifest, source, key)?)
}

/// Reads and verifies a package file.
///
/// # Errors
///
/// The file cannot be read, is not a package, or its signature does not verify.
pub fn read_package(path: &Path) -> Result<VerifiedPackage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let package = Package::from_bytes(&bytes)
        .with_context(|| format!("{} is not a valid package", path.display()))?;
    package.verify().with_context(|| {
        format!(
            "{} was tampered with or is not signed by its author",
            path.display()
        )
    })
}

/// The agent limits a run applies: the node's defaults, tightened by the package's (its
/// manifest's, or better, the grant `TrustPolicy::admit_package` gave it, which adds what the
/// author's grant caps and the manifest left unsaid).
pub fn limits_for(asked: &PackageLimits, limits: agent_lang::Limits) -> agent_lang::Limits {
    // (Rhai reads 0 as "no limit": a 0 asked for is taken as not asked.)
    let asked = *asked;
    let cap = |node: usize, asked: Option<u64>| {
        asked
            .filter(|&a| a > 0)
            .map_or(node, |a| node.min(usize::try_from(a).unwrap_or(usize::MAX)))
    };
    let cap64 =
        |node: u64, asked: Option<u64>| asked.filter(|&a| a > 0).map_or(node, |a| node.min(a));
    limits
        .clone()
        .with_max_operations(cap64(limits.max_operations, asked.max_operations))
        .with_max_total_operations(cap64(
            limits.max_total_operations,
            asked.max_total_operations,
        ))
        .with_max_memory_bytes(cap64(limits.max_memory_bytes, asked.max_memory_bytes))
        .with_max_messages_sent(cap64(limits.max_messages_sent, asked.max_messages_sent))
        .with_max_message_bytes_sent(cap64(
            limits.max_message_bytes_sent,
            asked.max_message_bytes_sent,
        ))
        .with_max_call_depth(cap(limits.max_call_depth, asked.max_call_depth))
        .with_max_string_size(cap(limits.max_string_size, asked.max_string_size))
        .with_max_array_size(cap(limits.max_array_size, asked.max_array_size))
        .with_max_map_size(cap(limits.max_map_size, asked.max_map_size))
        .with_max_continuation_bytes(cap(
            limits.max_continuation_bytes,
            asked.max_continuation_bytes,
        ))
}

/// Checks that `policy` admits the package, with a message that says how to trust its author.
///
/// # Errors
///
/// The author is not trusted, or it asks for more than the policy grants.
pub fn admit(policy: &TrustPolicy, package: &VerifiedPackage) -> Result<Grant> {
    policy.admit_package(package).map_err(|e| {
        anyhow::anyhow!(
            "package '{}' refused: {e}; to run it, trust its author with --trust-author {}",
            package.manifest().name,
            package.author()
        )
    })
}
