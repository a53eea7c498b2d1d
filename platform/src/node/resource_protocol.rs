//! The resource protocol (`/tern/res/1`), both sides: an agent's calls on a `remote` handle
//! bound at another node become requests to that node ([`NodeRemote`], sent from the agent's
//! slice thread, which waits for the reply within [`RESOURCE_DEADLINE`]); the owner answers
//! them ([`handle_resource`]) with the same checks it makes for its own agents.
//!
//! Who may ask: peers this node accepts agents from (`[trust] accept_from`), for agents of a
//! package whose author the node grants the resource, and that binds the resource `remote`. The
//! owner pulls the package it lacks, as for a hop, to read those from its signed manifest.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use security::PackageHash;

use super::accept::ExchangePermits;
use super::control::{request_over, Exchange};
use super::packages::ensure_package;
use super::peers::Unresolved;
use super::residual::Direction;
use super::runner::resources_of;
use super::NodeStream;
use super::Shared;
use crate::resources::RemoteResources;
use crate::wire::{
    write_frame, ResourceReply, ResourceRequest, WireError, MAX_FRAME, RESOURCE_PROTOCOL,
};

/// How long an agent waits for the owner of a remote resource to answer one request.
pub(super) const RESOURCE_DEADLINE: Duration = Duration::from_secs(10);

/// How this node sends its agents' resource requests.
pub(super) struct NodeRemote {
    pub(super) shared: Arc<Shared>,
    pub(super) runtime: tokio::runtime::Handle,
}

impl RemoteResources for NodeRemote {
    fn request(&self, owner: &str, request: &ResourceRequest) -> Result<ResourceReply, String> {
        let what = format!("node '{owner}'");
        let peer = match self.shared.peers.resolve(owner) {
            Ok(peer) => peer,
            Err(Unresolved::Unknown) => return Err(format!("{what} is not in the mesh")),
            Err(Unresolved::Contested(_)) => {
                return Err(format!(
                    "{what} is claimed by several peers: pin it in [peers]"
                ))
            }
        };
        // (A slice thread is not one of the runtime's: it may wait for it here.)
        self.shared
            .residuals
            .note(Direction::Uses, &request.agent, owner, &request.resource);
        // (The deadline's timer is made inside: only the runtime's context has one.)
        let reply = self.runtime.block_on(async {
            tokio::time::timeout(
                RESOURCE_DEADLINE,
                request_over::<_, ResourceReply>(
                    &self.shared,
                    peer,
                    RESOURCE_PROTOCOL,
                    request,
                    Exchange::Idempotent,
                ),
            )
            .await
        });
        let what = format!("resource '{}' at {what}", request.resource);
        match reply {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(format!("{what} did not answer: {e}")),
            Err(_) => Err(format!(
                "{what} did not answer within {} s",
                RESOURCE_DEADLINE.as_secs()
            )),
        }
    }
}

/// Serves resource requests on a stream, one after the other, until the peer closes it.
pub(super) async fn handle_resource(
    shared: &Arc<Shared>,
    peer: PeerId,
    mut stream: NodeStream,
    permits: &ExchangePermits<'_>,
) -> Result<(), WireError> {
    while let Some((request, _permits)) = permits
        .next_request::<ResourceRequest>(&mut stream, MAX_FRAME)
        .await?
    {
        let reply = answer(shared, peer, request).await;
        write_frame(&mut stream, &reply).await?;
    }
    Ok(())
}

async fn answer(shared: &Arc<Shared>, peer: PeerId, request: ResourceRequest) -> ResourceReply {
    let here = shared.peers.local_name();
    let accepted = shared
        .peers
        .key_of(&peer)
        .is_some_and(|key| shared.trust.accepts_push_from(&key));
    if !accepted {
        tracing::warn!(%peer, resource = request.resource, "refused a resource request from a peer not in accept_from");
        return ResourceReply::Failed(format!(
            "node '{here}' serves its resources only to peers it accepts agents from"
        ));
    }
    let hash = PackageHash(request.package);
    if let Err(e) = ensure_package(shared, peer, &hash).await {
        return ResourceReply::Failed(format!("node '{here}' cannot get the agent's package: {e}"));
    }
    let loaded = match shared.loaded(&request.package) {
        Ok(loaded) => loaded,
        Err(e) => return ResourceReply::Failed(format!("node '{here}': {e}")),
    };
    if let Err(e) = shared.trust.admit_package(&loaded.package) {
        return ResourceReply::Failed(format!(
            "node '{here}' does not admit the agent's package: {e}"
        ));
    }
    shared.residuals.note(
        Direction::Serves,
        &request.agent,
        &shared.peers.name_of_peer(&peer),
        &request.resource,
    );
    let host = resources_of(shared, &loaded, &request.agent);
    // Datasets are files, tables the store: read off the runtime's workers.
    match tokio::task::spawn_blocking(move || host.serve(request)).await {
        Ok(reply) => reply,
        Err(e) => ResourceReply::Failed(format!("node '{here}' failed serving it: {e}")),
    }
}
