//! Shared support for end-to-end tests: sign a script for a test mesh, and the runtime nodes
//! need.

use security::{PeersPolicy, SecretKey, TrustPolicy, VerifiedPackage};

/// Signs `source` with a fresh author key; returns the package and a trust policy that trusts
/// that author and accepts pushes from any peer.
pub fn package(source: &str) -> (VerifiedPackage, TrustPolicy) {
    let key = SecretKey::generate();
    let spec = platform::package_files::PackSpec {
        name: "test".into(),
        version: "0".into(),
        resources: vec![],
        capabilities: vec![],
        limits: Default::default(),
    };
    let package = platform::package_files::pack(source.to_string(), spec, &key, 0)
        .and_then(|p| Ok(p.verify()?))
        .unwrap_or_else(|e| panic!("test agent does not pack: {e:#}"));
    let mut trust: TrustPolicy =
        toml::from_str(&format!("authors = [\"{}\"]", key.public())).unwrap_or_default();
    trust.accept_from = PeersPolicy::Any;
    (package, trust)
}

/// A runtime like `tern`'s: multi-threaded, with room for Rhai's recursion on blocking threads.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(64 << 20)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}
