//! Shared support for end-to-end tests: sign a script for a test mesh, the runtime nodes need,
//! and bounded waits. The modules hold the rest: [`process`] (`tern` processes), [`raw_peer`]
//! (a hand-driven hostile peer), [`ctl`] (the CLI's requests from tests) and [`disk`] (a storage
//! layer that fails on purpose).

use security::{PeersPolicy, SecretKey, TrustPolicy, VerifiedPackage};

/// The tests' allocator: the system's, metered as in `tern`, so that agents' memory budgets
/// hold in the nodes the tests start.
#[global_allocator]
static ALLOC: agent_lang::Metered<std::alloc::System> = agent_lang::Metered(std::alloc::System);

/// Signs `source` with a fresh author key; returns the package and a trust policy that trusts
/// that author and accepts pushes from any peer.
pub fn package(source: &str) -> (VerifiedPackage, TrustPolicy) {
    package_binding(source, &[])
}

/// [`package`], declaring resource bindings (`("shard", "rebind")`, `("t", "move/by-value")`).
pub fn package_binding(source: &str, bindings: &[(&str, &str)]) -> (VerifiedPackage, TrustPolicy) {
    let key = SecretKey::generate();
    (package_by(&key, source, bindings), trust_for(&key))
}

/// A trust policy that trusts `key` as an author (every resource granted) and accepts pushes
/// from any peer.
pub fn trust_for(key: &SecretKey) -> TrustPolicy {
    let mut trust: TrustPolicy = toml::from_str(&format!(
        "authors = [{{ key = \"{}\", resources = \"any\" }}]",
        key.public()
    ))
    .unwrap_or_default();
    trust.accept_from = PeersPolicy::Any;
    trust
}

/// `source` signed by `key`, declaring resource bindings as [`package_binding`] does.
pub fn package_by(key: &SecretKey, source: &str, bindings: &[(&str, &str)]) -> VerifiedPackage {
    let spec = platform::package_files::PackSpec {
        name: "test".into(),
        version: "0".into(),
        resources: bindings
            .iter()
            .map(|(name, policy)| {
                security::ResourceDecl::from_text(*name, policy).unwrap_or_else(|e| panic!("{e}"))
            })
            .collect(),
        capabilities: vec![],
        limits: Default::default(),
    };
    platform::package_files::pack(source.to_string(), spec, key, 0)
        .and_then(|p| Ok(p.verify()?))
        .unwrap_or_else(|e| panic!("test agent does not pack: {e:#}"))
}

/// The operator key of every test node started from a configuration file (`tests/fixtures`,
/// a key made for the tests and for nothing else): `tern launch|status|send|result` speak with
/// it (`TERN_KEY`), and the nodes list it in `[trust] operators`.
pub fn operator_key_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/operator.pem")
}

/// The key at [`operator_key_path`].
pub fn operator_key() -> SecretKey {
    platform::package_files::read_key(&operator_key_path())
        .unwrap_or_else(|e| panic!("the tests' operator key: {e:#}"))
}

/// A runtime like `tern`'s: multi-threaded, with room for Rhai's recursion on its threads.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(64 << 20)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`.
///
/// # Panics
///
/// When `timeout` passes first; the message says what was awaited.
pub fn wait_for<T>(
    what: &str,
    timeout: std::time::Duration,
    check: impl FnMut() -> Option<T>,
) -> T {
    wait_for_or(what, timeout, check, String::new)
}

/// [`wait_for`], with `context` (the nodes' logs, say) added to the message when `timeout`
/// passes first.
///
/// # Panics
///
/// When `timeout` passes first.
pub fn wait_for_or<T>(
    what: &str,
    timeout: std::time::Duration,
    mut check: impl FnMut() -> Option<T>,
    context: impl FnOnce() -> String,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if std::time::Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Polls `check` every 10 ms, without holding the runtime's thread, until it holds.
///
/// # Panics
///
/// When it does not hold within 20 s.
pub async fn eventually(mut check: impl FnMut() -> bool) {
    for _ in 0..2000 {
        if check() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 20 s");
}

pub mod ctl;
pub mod disk;
pub mod process;
pub mod raw_peer;

/// Starts node `name` on 127.0.0.1 with its store in `dir` (the same `dir` and `key` restart
/// it), trusting as `trust` does, after dialing `bootstrap`.
///
/// # Panics
///
/// The node does not start.
pub async fn start_node(
    name: &str,
    dir: &std::path::Path,
    key: &SecretKey,
    trust: &TrustPolicy,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> platform::node::NodeHandle {
    let config = platform::node::NodeConfig {
        bootstrap,
        ..platform::node::NodeConfig::local(name, key.clone(), dir.to_path_buf(), trust.clone())
    };
    platform::node::Node::start(config)
        .await
        .unwrap_or_else(|e| panic!("node {name} starts: {e:#}"))
}
