//! The client protocol (`/tern/client/3`), node side: what an operator's client (the CLI) may ask
//! a node — launch an agent, the node's status, an agent's result, send a message — answered
//! only for the keys of the node's `[trust] operators`. Peers that are not operators get a
//! `NotOperator` refusal and nothing else: they cannot start agents here or learn the ids of
//! the agents the node holds.

use std::sync::Arc;

use libp2p::PeerId;
use security::Package;

use super::accept::ExchangePermits;
use super::control::on_deliver;
use super::routing::SENDER_WAIT;
use super::runner::launch;
use super::NodeStream;
use super::{hex, Shared};
use crate::store::{AgentState, ResourcePlace, StoreError};
use crate::wire::{
    write_frame, AgentEnd, AgentStatus, ClientRequest, ControlRefusal, ControlReply, StatusReport,
    WireError, MAX_FRAME, MESSAGE_TTL,
};

/// Serves an operator's requests on a stream, one after the other, until the client closes
/// it; a client that is not an operator is refused once and the stream closed.
pub(super) async fn handle_client(
    shared: &Arc<Shared>,
    peer: PeerId,
    mut stream: NodeStream,
    permits: &ExchangePermits<'_>,
) -> Result<(), WireError> {
    let key = shared.peers.key_of(&peer);
    if !key.as_ref().is_some_and(|k| shared.trust.is_operator(k)) {
        // Refused without reading (or keeping) what it asks.
        if permits.skip_request(&mut stream).await? {
            let client = key.map_or_else(|| peer.to_string(), |k| k.to_string());
            tracing::warn!(%peer, "refused a client request: not an operator");
            let refusal = ControlRefusal::NotOperator { client };
            write_frame(&mut stream, &ControlReply::Refused(refusal)).await?;
        }
        return Ok(());
    }
    while let Some((request, _permits)) = permits
        .next_request::<ClientRequest>(&mut stream, MAX_FRAME)
        .await?
    {
        answer(shared, peer, &mut stream, request).await?;
    }
    Ok(())
}

/// Answers one operator's request.
async fn answer(
    shared: &Arc<Shared>,
    peer: PeerId,
    stream: &mut NodeStream,
    request: ClientRequest,
) -> Result<(), WireError> {
    match request {
        ClientRequest::Launch { package, wait } => {
            on_launch(shared, peer, stream, &package, wait).await
        }
        ClientRequest::Send { agent, message } => {
            on_deliver(
                shared,
                stream,
                &agent,
                message,
                (MESSAGE_TTL, false),
                SENDER_WAIT,
            )
            .await
        }
        ClientRequest::Result { agent } => write_frame(stream, &on_result(shared, &agent)).await,
        ClientRequest::Status => {
            let reply = match status(shared) {
                Ok(report) => ControlReply::Status(Box::new(report)),
                Err(e) => ControlReply::Refused(ControlRefusal::StoreUnreadable(e.to_string())),
            };
            write_frame(stream, &reply).await
        }
    }
}

/// `Launch`: starts the agent here; with `wait`, its end follows on the stream.
async fn on_launch(
    shared: &Arc<Shared>,
    peer: PeerId,
    stream: &mut NodeStream,
    package: &[u8],
    wait: bool,
) -> Result<(), WireError> {
    let verified = match Package::from_bytes(package).and_then(Package::verify) {
        Ok(p) => p,
        Err(e) => {
            let refusal = ControlRefusal::BadPackage(e.to_string());
            return write_frame(stream, &ControlReply::Refused(refusal)).await;
        }
    };
    let (agent, end) = match launch(shared, verified, Some(peer.to_string())) {
        Ok(launched) => launched,
        Err(refusal) => return write_frame(stream, &ControlReply::Refused(refusal)).await,
    };
    write_frame(stream, &ControlReply::Launched { agent }).await?;
    if wait {
        if let Ok(end) = end.await {
            write_frame(stream, &ControlReply::Ended(end)).await?;
        }
    }
    Ok(())
}

/// `Result`: how an agent of this home node ended.
fn on_result(shared: &Shared, agent: &str) -> ControlReply {
    match shared.store.result(agent) {
        Ok(Some(bytes)) => match ciborium::from_reader::<AgentEnd, _>(bytes.as_slice()) {
            Ok(end) => ControlReply::Ended(end),
            Err(e) => ControlReply::Refused(ControlRefusal::UnreadableResult(e.to_string())),
        },
        Ok(None) => ControlReply::Refused(ControlRefusal::NoResult {
            agent: agent.to_string(),
        }),
        Err(e) => ControlReply::Refused(ControlRefusal::Store(e.to_string())),
    }
}

/// `Status`: this node's peers, agents, forwarding pointers and recent activity (an error if the store cannot be
/// read: an unreadable store is not an empty one).
pub(super) fn status(shared: &Shared) -> Result<StatusReport, StoreError> {
    let peers = shared
        .peers
        .names()
        .list()
        .into_iter()
        .map(|(name, peer)| (name, peer.to_string()))
        .collect();
    let agents = shared
        .store
        .agent_metas()?
        .into_iter()
        .map(|r| AgentStatus {
            id: r.id,
            package: hex(&r.package),
            state: match r.state {
                AgentState::Ready => "running".into(),
                AgentState::Waiting { .. } => "waiting".into(),
                AgentState::Answered { .. } => "running".into(),
                AgentState::Leaving { to, hop, .. } => {
                    format!("leaving for {} (hop {hop})", shared.peers.name_of(&to))
                }
                AgentState::Arriving { from, .. } => {
                    format!(
                        "arriving from {} (hop {})",
                        shared.peers.name_of(&from),
                        r.hop
                    )
                }
            },
            hops: r.hops,
        })
        .collect();
    let forwards = shared
        .store
        .forwards()?
        .into_iter()
        .map(|(a, to)| (a, shared.peers.name_of(&to)))
        .collect();
    Ok(StatusReport {
        name: shared.peers.local_name().to_string(),
        peer_id: shared.peers.local_text().to_string(),
        peers,
        agents,
        forwards,
        activity: shared.activity.snapshot(),
        store: shared.quota.usage()?,
        bytes: shared.wire.snapshot(),
        remote: shared.residuals.list(),
        moved_resources: shared
            .store
            .resource_places()?
            .into_iter()
            .map(|(name, place)| {
                let place = match place {
                    ResourcePlace::Here { holder: None } => "here".to_string(),
                    ResourcePlace::Here {
                        holder: Some(agent),
                    } => format!("here, held by {agent}"),
                    ResourcePlace::Arriving { holder, .. } => format!("arriving with {holder}"),
                    ResourcePlace::Gone { to } => format!("gone to {}", shared.peers.name_of(&to)),
                };
                (name, place)
            })
            .collect(),
    })
}
