//! The control protocol (`/tern/ctl/3`), both sides: the requests this node sends to a peer
//! over a pooled stream ([`control_request`]), and the answers it gives, one handler per
//! request.

use std::sync::Arc;

use libp2p::PeerId;
use security::Package;

use super::accept::ExchangePermits;
use super::fault::FaultPoint;
use super::hop::{hop_committed, hop_held};
use super::mailbox::Wake;
use super::routing::{route, Undelivered};
use super::runner::{deliver_end, launch};
use super::{hex, Shared};
use crate::store::{AgentState, StoreError};
use crate::wire::{
    read_frame, write_frame, AgentEnd, AgentStatus, ControlRefusal, ControlReply, ControlRequest,
    StatusReport, WireError, CONTROL_PROTOCOL, MAX_FRAME,
};

/// Sends `request` to `peer` and reads its reply, on an idle stream to it or a new one.
pub(super) async fn control_request(
    shared: &Shared,
    peer: PeerId,
    request: &ControlRequest,
) -> Result<ControlReply, ControlFailure> {
    loop {
        let mut s = shared
            .open_stream(peer, CONTROL_PROTOCOL)
            .await
            .map_err(ControlFailure::NotSent)?;
        if let Err(e) = write_frame(&mut s.stream, request).await {
            // A reused stream that cannot be written to died with its connection before the
            // request went out: open a fresh one.
            if s.reused {
                continue;
            }
            return Err(ControlFailure::NotSent(e.to_string()));
        }
        match read_frame(&mut s.stream, MAX_FRAME).await {
            Ok(reply) => {
                shared.outbound.put(peer, CONTROL_PROTOCOL, s.stream);
                return Ok(reply);
            }
            // A peer that serves one request per stream closed the idle one: afresh. (tern
            // nodes answer every request they read, so the request was not handled.)
            Err(WireError::Io(e)) if s.reused && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(ControlFailure::Unanswered(e.to_string())),
        }
    }
}

/// Why a control request got no reply.
#[derive(Debug)]
pub(super) enum ControlFailure {
    /// The request did not go out.
    NotSent(String),
    /// It went out and no answer came: the peer may have carried it out.
    Unanswered(String),
}

impl std::fmt::Display for ControlFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotSent(e) => write!(f, "{e}"),
            Self::Unanswered(e) => write!(f, "no answer ({e})"),
        }
    }
}

/// Serves control requests on a stream, one after the other, until the peer closes it.
pub(super) async fn handle_control(
    shared: &Arc<Shared>,
    peer: PeerId,
    mut stream: libp2p::Stream,
    permits: &ExchangePermits<'_>,
) -> Result<(), WireError> {
    while let Some((request, _permits)) = permits.next_request(&mut stream).await? {
        answer(shared, peer, &mut stream, request).await?;
    }
    Ok(())
}

/// Answers one request.
async fn answer(
    shared: &Arc<Shared>,
    peer: PeerId,
    stream: &mut libp2p::Stream,
    request: ControlRequest,
) -> Result<(), WireError> {
    match request {
        ControlRequest::Launch { package, wait } => {
            on_launch(shared, peer, stream, &package, wait).await
        }
        ControlRequest::Deliver {
            agent,
            message,
            ttl,
            probe,
        } => on_deliver(shared, stream, &agent, message, ttl, probe).await,
        ControlRequest::Result { agent } => write_frame(stream, &on_result(shared, &agent)).await,
        ControlRequest::Location { agent, node } => {
            let _ = shared
                .store
                .write(move |b| b.set_location(&agent, &node))
                .await;
            write_frame(stream, &ControlReply::Ok).await
        }
        ControlRequest::Status => {
            let reply = match status(shared) {
                Ok(report) => ControlReply::Status(report),
                Err(e) => ControlReply::Refused(ControlRefusal::StoreUnreadable(e.to_string())),
            };
            write_frame(stream, &reply).await
        }
        ControlRequest::Ended { agent, end } => {
            deliver_end(shared, &agent, end);
            write_frame(stream, &ControlReply::Ok).await
        }
        ControlRequest::HopStatus {
            agent,
            hop,
            envelope,
        } => {
            let reply = match hop_held(shared, agent, hop, envelope).await {
                Ok(held) => ControlReply::HopHeld(held),
                Err(e) => ControlReply::Refused(ControlRefusal::StoreUnreadable(e.to_string())),
            };
            write_frame(stream, &reply).await
        }
        ControlRequest::HopCommitted { agent, envelope } => {
            let reply = match hop_committed(shared, &agent, &envelope).await {
                Ok(committed) => ControlReply::HopCommitted(committed),
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
    stream: &mut libp2p::Stream,
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

/// `Deliver`: queues the message here or passes it on; an agent it was queued for here is
/// woken only once the sender is answered (see [`Wake`]).
async fn on_deliver(
    shared: &Arc<Shared>,
    stream: &mut libp2p::Stream,
    agent: &str,
    message: Vec<u8>,
    ttl: u8,
    probe: bool,
) -> Result<(), WireError> {
    let (reply, wake) = match route(shared, agent, message, ttl, probe).await {
        Ok(wake) => (ControlReply::Delivered, wake),
        Err(Undelivered::NotHere) => (ControlReply::NotHere, Wake::none()),
        Err(Undelivered::Unconfirmed(e)) => (ControlReply::Unconfirmed(e), Wake::none()),
        Err(Undelivered::Refused(refusal)) => (ControlReply::Refused(refusal), Wake::none()),
    };
    if wake.queued_here() {
        shared.faults.die_at(FaultPoint::AfterQueue);
    }
    let answered = write_frame(stream, &reply).await;
    shared.mailboxes.wake(wake);
    answered
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
    })
}
