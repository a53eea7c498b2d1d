//! Fixtures shared by the integration tests: deterministic keys, a package, a chain of hops.

#![allow(dead_code, unreachable_pub)]

use security::*;

pub const T0: u64 = 1_700_000_000_000;

pub fn key(n: u8) -> SecretKey {
    SecretKey::from_seed([n; 32])
}

pub fn manifest(author: PublicKey) -> Manifest {
    Manifest {
        name: "counter".into(),
        version: "0.1.0".into(),
        author,
        created_ms: T0,
        resources: vec![
            ResourceDecl::new("table", ResourcePolicy::Rebind),
            ResourceDecl::new("log", ResourcePolicy::Remote),
        ],
        capabilities: vec!["net".into(), "table:read".into()],
        limits: PackageLimits {
            max_operations: Some(10_000),
            max_continuation_bytes: Some(1 << 20),
            ..PackageLimits::default()
        },
    }
}

pub fn package_with_source(source: &str) -> Package {
    let author = key(1);
    Package::sign(manifest(author.public()), source.into(), &author).unwrap()
}

pub fn package() -> Package {
    package_with_source("let n = 0; loop { n += 1; if n > 3 { migrate(\"x\"); } }")
}

pub fn continuation_hash(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

pub fn agent() -> AgentId {
    AgentId([0x42; 16])
}

/// Signs the hop after `previous` (or the first hop) from `from` to `to`.
pub fn hop(
    previous: Option<&HopEnvelope>,
    from: &SecretKey,
    to: &PublicKey,
    package: PackageHash,
    continuation: &[u8],
) -> HopEnvelope {
    HopEnvelope::sign(
        HopFields {
            agent_id: agent(),
            hop: previous.map_or(FIRST_HOP, |p| p.fields().hop + 1),
            package_hash: package,
            continuation_hash: continuation_hash(continuation),
            previous: previous.map(HopEnvelope::hash),
            from: from.public(),
            to: *to,
            time_ms: T0,
        },
        from,
    )
    .unwrap()
}
