//! Packages on this node: the compiled programs, the anonymous, receiver-initiated pull of a
//! package a hop needs (`/tern/pkg/1`), and the answers this node gives to such pulls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_lang::Program;
use libp2p::PeerId;
use security::{Package, PackageHash, VerifiedPackage};
use tokio::sync::oneshot;

use super::accept::ExchangePermits;
use super::event_loop::SwarmCommand;
use super::NodeStream;
use super::{hex, lock, Shared};
use crate::wire::{
    read_frame, write_frame, HopRefusal, PackageReply, PackageRequest, WireError, MAX_FRAME,
    PACKAGE_PROTOCOL,
};

/// A compiled package this node can run.
pub(super) struct Loaded {
    pub(super) package: VerifiedPackage,
    pub(super) program: Program,
}

/// The packages compiled on this node, by hash: each is compiled once, whichever agent needs it
/// first. A `std` mutex held for one map operation (compiling happens outside it).
#[derive(Default)]
pub(super) struct Programs {
    compiled: Mutex<HashMap<[u8; 32], Arc<Loaded>>>,
}

/// Compiled packages kept once no agent uses them: past it, those go (and are compiled again
/// if an agent of theirs comes), so that a stream of new packages does not grow the node.
const MAX_COMPILED: usize = 256;

impl Programs {
    pub(super) fn get(&self, hash: &[u8; 32]) -> Option<Arc<Loaded>> {
        lock(&self.compiled).get(hash).cloned()
    }

    pub(super) fn contains(&self, hash: &[u8; 32]) -> bool {
        lock(&self.compiled).contains_key(hash)
    }

    /// Keeps `loaded`; past [`MAX_COMPILED`], first drops those no agent holds.
    pub(super) fn insert(&self, hash: [u8; 32], loaded: Arc<Loaded>) {
        let mut compiled = lock(&self.compiled);
        if compiled.len() >= MAX_COMPILED {
            compiled.retain(|_, l| Arc::strong_count(l) > 1);
        }
        compiled.insert(hash, loaded);
    }
}

impl Shared {
    /// Compiles (once) the package with this hash from the store.
    pub(super) fn loaded(&self, hash: &[u8; 32]) -> Result<Arc<Loaded>, String> {
        if let Some(l) = self.programs.get(hash) {
            return Ok(l);
        }
        let bytes = self
            .store
            .package(hash)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("package {} is not on this node", hex(hash)))?;
        let package = Package::from_bytes(&bytes)
            .and_then(Package::verify)
            .map_err(|e| e.to_string())?;
        // The limits of the author's grant, not only those the manifest asks for.
        let grant = self
            .trust
            .admit_package(&package)
            .map_err(|e| e.to_string())?;
        let limits = crate::package_files::limits_for(&grant.limits, self.limits.clone());
        let program = Program::compile(package.source(), &limits).map_err(|e| e.to_string())?;
        let loaded = Arc::new(Loaded { package, program });
        self.programs.insert(*hash, loaded.clone());
        Ok(loaded)
    }
}

/// Makes sure the package with `hash` is in the store: pulled (anonymously, receiver-initiated)
/// from `peer` — the node offering the hop — or else from any node that announced it.
pub(super) async fn ensure_package(
    shared: &Shared,
    peer: PeerId,
    hash: &PackageHash,
) -> Result<(), HopRefusal> {
    if shared.programs.contains(hash.as_bytes()) {
        return Ok(());
    }
    if shared
        .store
        .has_package(hash.as_bytes())
        .map_err(|e| HopRefusal::StoreRead(e.to_string()))?
    {
        return Ok(());
    }
    let first = pull_package(shared, peer, hash).await;
    let bytes = match first {
        Ok(bytes) => bytes,
        Err(first_error) => {
            let (tx, rx) = oneshot::channel();
            let _ = shared
                .commands
                .send(SwarmCommand::FindProviders(*hash.as_bytes(), tx))
                .await;
            let providers = tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            let mut pulled = None;
            for provider in providers.into_iter().filter(|p| *p != peer) {
                if let Ok(bytes) = pull_package(shared, provider, hash).await {
                    pulled = Some(bytes);
                    break;
                }
            }
            pulled.ok_or(first_error)?
        }
    };
    let key = *hash.as_bytes();
    shared
        .store
        .write(move |b| b.put_package(&key, &bytes))
        .await
        .map_err(|e| HopRefusal::StoreWrite(e.to_string()))?;
    let _ = shared
        .commands
        .send(SwarmCommand::Provide(*hash.as_bytes()))
        .await;
    Ok(())
}

/// Downloads and verifies a package from one peer; checks its hash and the trust policy.
async fn pull_package(
    shared: &Shared,
    peer: PeerId,
    hash: &PackageHash,
) -> Result<Vec<u8>, HopRefusal> {
    // A download is idempotent: a stream that broke (its connection closed, or the peer's
    // inbound queue for this node was full) is tried again.
    let mut attempt = 0u64;
    let reply = loop {
        attempt += 1;
        match request_package(shared, peer, hash).await {
            Ok(reply) => break reply,
            Err(WireError::Io(e)) if attempt < 3 => {
                tracing::debug!(%peer, "package pull failed, trying again: {e}");
                tokio::time::sleep(Duration::from_millis(20 * attempt * attempt)).await;
            }
            Err(e) => return Err(HopRefusal::PackageUnavailable(e.to_string())),
        }
    };
    let bytes = match reply {
        PackageReply::Found(b) => b,
        PackageReply::NotFound => {
            return Err(HopRefusal::PackageUnavailable(
                "the peer does not have the package".into(),
            ))
        }
        PackageReply::Refused => {
            return Err(HopRefusal::PackageUnavailable(
                "the peer does not serve packages".into(),
            ))
        }
    };
    let package = Package::from_bytes(&bytes)
        .and_then(Package::verify)
        .map_err(|e| HopRefusal::BadPackage(e.to_string()))?;
    if package.hash() != *hash {
        return Err(HopRefusal::BadPackage("it has another hash".into()));
    }
    shared
        .trust
        .admit_package(&package)
        .map_err(|e| HopRefusal::UntrustedPackage(e.to_string()))?;
    Ok(bytes)
}

async fn request_package(
    shared: &Shared,
    peer: PeerId,
    hash: &PackageHash,
) -> Result<PackageReply, WireError> {
    let mut stream = shared
        .control
        .clone()
        .open_stream(peer, PACKAGE_PROTOCOL)
        .await
        .map_err(|e| WireError::Io(std::io::Error::other(e.to_string())))?;
    let request = PackageRequest {
        hash: *hash.as_bytes(),
    };
    write_frame(&mut stream, &request).await?;
    read_frame(&mut stream, MAX_FRAME).await
}

pub(super) async fn handle_package(
    shared: &Shared,
    mut stream: NodeStream,
    permits: &ExchangePermits<'_>,
) -> Result<(), WireError> {
    let Some((request, _permits)) = permits
        .next_request::<PackageRequest>(&mut stream, 1024)
        .await?
    else {
        return Ok(());
    };
    let reply = if !shared.trust.serve_packages {
        PackageReply::Refused
    } else {
        match shared.store.package(&request.hash) {
            Ok(Some(bytes)) => PackageReply::Found(bytes),
            _ => PackageReply::NotFound,
        }
    };
    write_frame(&mut stream, &reply).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded() -> Loaded {
        let spec = crate::package_files::PackSpec {
            name: "t".into(),
            version: "0".into(),
            resources: vec![],
            capabilities: vec![],
            limits: Default::default(),
        };
        let key = security::SecretKey::from_seed([3; 32]);
        let package = crate::package_files::pack("1".to_string(), spec, &key, 0)
            .and_then(|p| Ok(p.verify()?))
            .expect("packs");
        let program =
            Program::compile(package.source(), &agent_lang::Limits::default()).expect("compiles");
        Loaded { package, program }
    }

    fn hash(i: usize) -> [u8; 32] {
        let mut h = [0; 32];
        h[..8].copy_from_slice(&(i as u64).to_le_bytes());
        h
    }

    /// Compiled packages past the bound go, except those an agent still holds.
    #[test]
    fn compiled_packages_no_agent_holds_go_past_the_bound() {
        let programs = Programs::default();
        let one = loaded();
        let again = || {
            Arc::new(Loaded {
                package: one.package.clone(),
                program: one.program.clone(),
            })
        };
        let held = again();
        programs.insert(hash(0), held.clone());
        for i in 1..MAX_COMPILED {
            programs.insert(hash(i), again());
        }
        assert_eq!(lock(&programs.compiled).len(), MAX_COMPILED);
        programs.insert(hash(MAX_COMPILED), again());
        assert!(programs.contains(&hash(0)), "an agent holds it");
        assert!(programs.contains(&hash(MAX_COMPILED)));
        assert_eq!(lock(&programs.compiled).len(), 2);
        assert!(programs.get(&hash(1)).is_none());
    }
}
