//! The node-to-node control protocol (`/tern/ctl/8`), both sides: the requests this node sends
//! to a peer over a pooled stream ([`control_request`]), and the answers it gives, one handler
//! per request. What an operator's client asks is `operators`.

use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use security::{CustodyPoint, HopEnvelope};

use super::accept::ExchangePermits;
use super::custody::{certify, confirm_report};
use super::fault::FaultPoint;
use super::hop::{departed_by, handover_key, hop_committed, hop_held};
use super::mailbox::Wake;
use super::routing::{route, Undelivered, SENDER_WAIT};
use super::runner::deliver_end;
use super::NodeStream;
use super::Shared;
use crate::wire::{
    read_frame, write_frame, ControlRefusal, ControlReply, ControlRequest, CustodyLink, WireError,
    CONTROL_PROTOCOL, MAX_FRAME,
};

/// Sends `request` to `peer` and reads its reply, on an idle stream to it or a new one. A
/// message (`Deliver`) is never sent twice: see [`Exchange`].
pub(super) async fn control_request(
    shared: &Shared,
    peer: PeerId,
    request: &ControlRequest,
) -> Result<ControlReply, ControlFailure> {
    let exchange = match request {
        ControlRequest::Deliver { .. } => Exchange::Message,
        _ => Exchange::Idempotent,
    };
    request_over(shared, peer, CONTROL_PROTOCOL, request, exchange).await
}

/// What kind of request an exchange carries, which says whether it is sent again when its
/// reused stream ends without an answer (mostly the other side having closed the stream,
/// unread; but a node that died after carrying the request out ends it the same way), and how
/// long it holds its peer's opening turn ([`super::streams::StreamPool`]) when it is on a new
/// stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Exchange {
    /// Carrying it out twice changes nothing: sent again. Its answer comes at once, and it
    /// holds the opening turn until then.
    Idempotent,
    /// A message: never sent twice (unanswered, it may have been delivered). Its answer may
    /// wait for the agent's hop to settle, and for what the peer asks of this node meanwhile
    /// (a message that followed its agent here and on, back to the same peer): it gives the
    /// opening turn up once it is sent, or such a request would wait for the turn until this
    /// one's answer.
    Message,
}

/// Sends `request` to `peer` over `protocol` (one whose streams serve request after request,
/// each with one reply) and reads its reply, on an idle stream to it or a new one.
pub(super) async fn request_over<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
    shared: &Shared,
    peer: PeerId,
    protocol: libp2p::StreamProtocol,
    request: &Q,
    exchange: Exchange,
) -> Result<R, ControlFailure> {
    loop {
        let mut s = shared
            .open_stream(peer, protocol.clone())
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
        if exchange == Exchange::Message {
            s.opening = None;
        }
        match read_frame(&mut s.stream, MAX_FRAME).await {
            Ok(reply) => {
                shared.outbound.put(peer, protocol, s.stream);
                return Ok(reply);
            }
            // The peer closed the idle stream, most likely unread: afresh, if the request may
            // be carried out twice (a node that died after carrying it out ends it so too).
            Err(WireError::Io(e))
                if s.reused
                    && exchange == Exchange::Idempotent
                    && e.kind() == std::io::ErrorKind::UnexpectedEof => {}
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
    mut stream: NodeStream,
    permits: &ExchangePermits<'_>,
) -> Result<(), WireError> {
    while let Some((request, _permits)) = permits.next_request(&mut stream, MAX_FRAME).await? {
        answer(shared, peer, &mut stream, request).await?;
    }
    Ok(())
}

/// Answers one request.
async fn answer(
    shared: &Arc<Shared>,
    peer: PeerId,
    stream: &mut NodeStream,
    request: ControlRequest,
) -> Result<(), WireError> {
    match request {
        ControlRequest::Deliver {
            agent,
            message,
            ttl,
            probe,
            wait_ms,
        } => match shared.sender_rates.admit(&peer) {
            Ok(()) => {
                let wait = Duration::from_millis(u64::from(wait_ms));
                on_deliver(shared, stream, &agent, message, (ttl, probe), wait).await
            }
            Err(refusal) => {
                tracing::debug!(%peer, "refused a message: over the peer's rate");
                write_frame(stream, &ControlReply::Refused(refusal)).await
            }
        },
        ControlRequest::Location { agent, custody } => {
            let reply = match take_report(shared, peer, &agent, custody, "location").await {
                Ok(point) => certify(shared, &agent, point),
                Err(refused) => refused,
            };
            write_frame(stream, &reply).await
        }
        ControlRequest::Ended {
            agent,
            end,
            custody,
        } => {
            let reply = match take_report(shared, peer, &agent, custody, "end").await {
                Ok(_) => {
                    deliver_end(shared, &agent, end);
                    ControlReply::Ok
                }
                Err(refused) => refused,
            };
            write_frame(stream, &reply).await
        }
        ControlRequest::HopStatus {
            agent,
            hop,
            envelope,
            give_up,
        } => {
            let reply = match hop_held(shared, agent, hop, envelope, give_up).await {
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
        ControlRequest::Departed { agent, envelope } => {
            // An envelope that does not decode, or that this node did not sign, is no hop it
            // handed an agent over by.
            let envelope = match HopEnvelope::decode_known(&envelope, |k| shared.peers.known_key(k))
            {
                Ok(envelope) => envelope,
                Err(e) => {
                    tracing::debug!(%peer, agent, "asked about a hop by an unreadable envelope: {e}");
                    return write_frame(stream, &ControlReply::HandedOver(None)).await;
                }
            };
            let hash = *envelope.hash().as_bytes();
            let reply = match departed_by(shared, &agent, &hash).await {
                Ok(departed) => ControlReply::HandedOver(
                    departed.then(|| handover_key(shared, &envelope)).flatten(),
                ),
                Err(e) => ControlReply::Refused(ControlRefusal::StoreUnreadable(e.to_string())),
            };
            write_frame(stream, &reply).await
        }
    }
}

/// A report on an agent's `what` (location or end): counted against the sender's rate, then
/// taken if its custody shows the sender holds the agent (`custody::confirm_report`). Refused
/// otherwise, with a warning (none for a report that is only older than what this node knows).
async fn take_report(
    shared: &Arc<Shared>,
    peer: PeerId,
    agent: &str,
    custody: Vec<CustodyLink>,
    what: &str,
) -> Result<CustodyPoint, ControlReply> {
    let checked = match shared.sender_rates.admit(&peer) {
        Ok(()) => confirm_report(shared, agent, custody, peer).await,
        Err(refusal) => Err(refusal),
    };
    checked.map_err(|refusal| {
        if matches!(refusal, ControlRefusal::Superseded { .. }) {
            tracing::debug!(%peer, "an agent's {what} report came late: {refusal}");
        } else {
            tracing::warn!(%peer, "refused a report of an agent's {what}: {refusal}");
        }
        ControlReply::Refused(refusal)
    })
}

/// `Deliver`: queues the message here or passes it on; an agent it was queued for here is
/// woken only once the sender is answered (see [`Wake`]).
pub(super) async fn on_deliver(
    shared: &Arc<Shared>,
    stream: &mut NodeStream,
    agent: &str,
    message: Vec<u8>,
    (ttl, probe): (u8, bool),
    wait: Duration,
) -> Result<(), WireError> {
    let until = tokio::time::Instant::now() + wait.min(SENDER_WAIT);
    let (reply, wake) = match route(shared, agent, message, ttl, probe, until).await {
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
