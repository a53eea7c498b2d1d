//! The CLI's side of the client protocol: a libp2p peer with the operator's key (or an ephemeral
//! one, which nodes refuse) that dials one node, sends it requests and turns the node's replies
//! into typed results (`tern launch`, `tern status`, `tern send`, `tern result`), so that no
//! command reads wire messages itself.

use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::wire::{
    read_frame, read_frame_after, write_frame, AgentEnd, ClientRequest, ControlRefusal,
    ControlReply, StatusReport, WireError, CLIENT_PROTOCOL, MAX_FRAME,
};

/// How long the client waits for the connection to the node, and then for each control stream.
const REACH_TIMEOUT: Duration = Duration::from_secs(15);

/// How many times a question that changes nothing (status, result) is asked when the node
/// closes the stream without an answer (its connection closed, or the node's queue of this
/// client's new streams was full): such a stream was never read, and asking again is the
/// remedy (for questions only: a request that acts may have been carried out).
const QUERY_ATTEMPTS: u32 = 4;

/// Why a request to a node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The node's address does not end in `/p2p/<peer id>`.
    #[error("{0}: the node address must end in /p2p/<peer id> (as `tern node` prints it)")]
    NoPeerId(Multiaddr),
    /// This side's libp2p transport cannot be built.
    #[error(transparent)]
    Transport(anyhow::Error),
    /// The node's address cannot be dialled.
    #[error("cannot dial {addr}")]
    Dial {
        /// The node's address.
        addr: Multiaddr,
        /// Why.
        #[source]
        source: Box<libp2p::swarm::DialError>,
    },
    /// No connection to the node came up.
    #[error("cannot reach the node at {addr}: {reason}")]
    Unreachable {
        /// The node's address.
        addr: Multiaddr,
        /// Why: the connection error, or that it timed out.
        reason: String,
    },
    /// The node is connected but no control stream could be opened to it (why, as text).
    #[error("cannot reach the node: {0}")]
    NoStream(String),
    /// A request could not be sent, or a reply not read.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The node took the request but sent no answer: it may have carried it out.
    #[error("the node took the request but sent no answer (it may have carried it out)")]
    NoAnswer(#[source] WireError),
    /// The node takes requests only from its operators, and this client's key is not one.
    #[error("{0} (pass an operator's key with --key or TERN_KEY)")]
    NotOperator(ControlRefusal),
    /// The node refused the package.
    #[error("the node refused the package: {0}")]
    PackageRefused(ControlRefusal),
    /// The node closed the stream (or it broke) before the launched agent ended.
    #[error("the node closed the stream before the agent ended")]
    ClosedBeforeEnd(#[source] std::io::Error),
    /// The message was refused or could not be delivered.
    #[error("cannot deliver to {agent}: {reason}")]
    NotDelivered {
        /// The receiving agent.
        agent: String,
        /// Why.
        reason: ControlRefusal,
    },
    /// The message went on to the node holding the agent, which broke off without answering:
    /// it may have been delivered.
    #[error("delivery to {agent} unconfirmed (the message may have been delivered): {reason}")]
    DeliveryUnconfirmed {
        /// The receiving agent.
        agent: String,
        /// Why, as the node said it.
        reason: String,
    },
    /// The node has no end to give for the agent.
    #[error("{0}")]
    NoResult(ControlRefusal),
    /// The node answered with a reply that does not fit the request.
    #[error("unexpected reply from the node: {0:?}")]
    UnexpectedReply(Box<ControlReply>),
}

/// A connection to one node.
pub struct Client {
    control: libp2p_stream::Control,
    peer: PeerId,
    /// Drives the swarm (the connection) in the background; aborted on drop.
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Dials the node at `addr`, which must end in `/p2p/<peer id>`, as `operator` (a key in
    /// the node's `[trust] operators`), or as a fresh key that nodes answer only with
    /// [`ControlRefusal::NotOperator`].
    ///
    /// # Errors
    ///
    /// The address has no peer id, the transport cannot be built, or the node cannot be reached.
    pub async fn connect(
        addr: &Multiaddr,
        operator: Option<&security::SecretKey>,
    ) -> Result<Client, ClientError> {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            return Err(ClientError::NoPeerId(addr.clone()));
        };
        let identity = match operator {
            Some(key) => libp2p::identity::Keypair::ed25519_from_bytes(key.seed())
                .map_err(|e| ClientError::Transport(e.into()))?,
            None => libp2p::identity::Keypair::generate_ed25519(),
        };
        let mut swarm = crate::wire::swarm(identity, |_| libp2p_stream::Behaviour::new())
            .map_err(ClientError::Transport)?;
        // libp2p-stream keeps no addresses: dial the node ourselves (by peer id, so that
        // `open_stream` waits for this dial instead of starting one with no address).
        swarm
            .dial(
                libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .build(),
            )
            .map_err(|source| ClientError::Dial {
                addr: addr.clone(),
                source: Box::new(source),
            })?;
        let control = swarm.behaviour().new_control();
        // Wait for the connection before opening streams on it.
        let connected = tokio::time::timeout(REACH_TIMEOUT, async {
            loop {
                match swarm.select_next_some().await {
                    libp2p::swarm::SwarmEvent::ConnectionEstablished { peer_id, .. }
                        if peer_id == peer =>
                    {
                        return Ok(())
                    }
                    libp2p::swarm::SwarmEvent::OutgoingConnectionError { error, .. } => {
                        return Err(error.to_string())
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()));
        if let Err(reason) = connected {
            return Err(ClientError::Unreachable {
                addr: addr.clone(),
                reason,
            });
        }
        let driver = tokio::spawn(async move {
            loop {
                let _ = swarm.select_next_some().await;
            }
        });
        Ok(Client {
            control,
            peer,
            driver,
        })
    }

    /// Starts an agent from `package` (the bytes of a signed package) and returns its id,
    /// without waiting for it.
    ///
    /// # Errors
    ///
    /// The node cannot be reached, refuses the package, or the stream breaks.
    pub async fn launch(&self, package: Vec<u8>) -> Result<String, ClientError> {
        let (agent, _) = self.start_agent(package, false).await?;
        Ok(agent)
    }

    /// Starts an agent from `package` (the bytes of a signed package) and waits, with no time
    /// limit, for its end; returns its id and how it ended.
    ///
    /// # Errors
    ///
    /// The node cannot be reached, refuses the package, or the stream breaks before the end.
    pub async fn launch_and_wait(
        &self,
        package: Vec<u8>,
    ) -> Result<(String, AgentEnd), ClientError> {
        let (agent, mut stream) = self.start_agent(package, true).await?;
        // The agent may run for a long time: wait for its end to begin without the frame timeout.
        let mut first = [0u8; 1];
        futures::AsyncReadExt::read_exact(&mut stream, &mut first)
            .await
            .map_err(ClientError::ClosedBeforeEnd)?;
        match read_frame_after(&mut stream, first[0], MAX_FRAME).await? {
            ControlReply::Ended(end) => Ok((agent, end)),
            other => Err(unexpected(other)),
        }
    }

    /// The node's peers, agents and forwarding pointers.
    ///
    /// # Errors
    ///
    /// The node cannot be reached or does not answer.
    pub async fn status(&self) -> Result<StatusReport, ClientError> {
        match self.query(&ClientRequest::Status).await? {
            ControlReply::Status(report) => Ok(*report),
            other => Err(unexpected(other)),
        }
    }

    /// Delivers `message` (a portable value, as `agent_lang::encode_portable` writes it) to
    /// `agent`, wherever it is: the node queues it, or forwards it to the node holding the agent.
    ///
    /// # Errors
    ///
    /// The node cannot be reached or does not answer, the message cannot be delivered, or it
    /// may have been ([`ClientError::DeliveryUnconfirmed`]).
    pub async fn send(&self, agent: &str, message: Vec<u8>) -> Result<(), ClientError> {
        let request = ClientRequest::Send {
            agent: agent.to_string(),
            message,
        };
        match self.request(&request).await? {
            ControlReply::Delivered => Ok(()),
            ControlReply::Refused(reason) => Err(ClientError::NotDelivered {
                agent: agent.to_string(),
                reason,
            }),
            ControlReply::Unconfirmed(reason) => Err(ClientError::DeliveryUnconfirmed {
                agent: agent.to_string(),
                reason,
            }),
            other => Err(unexpected(other)),
        }
    }

    /// How `agent` ended, as the node recorded it (its home node, or the node it ended on).
    ///
    /// # Errors
    ///
    /// The node cannot be reached or does not answer, or has no end recorded for the agent.
    pub async fn result(&self, agent: &str) -> Result<AgentEnd, ClientError> {
        let request = ClientRequest::Result {
            agent: agent.to_string(),
        };
        match self.query(&request).await? {
            ControlReply::Ended(end) => Ok(end),
            ControlReply::Refused(reason) => Err(ClientError::NoResult(reason)),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a launch request and reads the agent id the node answers with; returns the stream,
    /// on which the agent's end follows if `wait`.
    async fn start_agent(
        &self,
        package: Vec<u8>,
        wait: bool,
    ) -> Result<(String, libp2p::Stream), ClientError> {
        let mut stream = self.open(&ClientRequest::Launch { package, wait }).await?;
        match operator_reply(read_frame(&mut stream, MAX_FRAME).await?)? {
            ControlReply::Launched { agent } => Ok((agent, stream)),
            ControlReply::Refused(reason) => Err(ClientError::PackageRefused(reason)),
            other => Err(unexpected(other)),
        }
    }

    /// One request, one reply.
    async fn request(&self, request: &ClientRequest) -> Result<ControlReply, ClientError> {
        let mut stream = self.open(request).await?;
        let reply = read_frame(&mut stream, MAX_FRAME)
            .await
            .map_err(ClientError::NoAnswer)?;
        operator_reply(reply)
    }

    /// One question (a request that changes nothing at the node), one reply: asked again on a
    /// fresh stream if the node closed the stream without answering (see [`QUERY_ATTEMPTS`]).
    async fn query(&self, request: &ClientRequest) -> Result<ControlReply, ClientError> {
        let mut attempt = 1;
        loop {
            match self.request(request).await {
                Err(ClientError::NoAnswer(WireError::Io(e)))
                    if e.kind() == std::io::ErrorKind::UnexpectedEof
                        && attempt < QUERY_ATTEMPTS =>
                {
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    attempt += 1;
                }
                answer => return answer,
            }
        }
    }

    /// Sends `request` and returns the stream for the replies.
    async fn open(&self, request: &ClientRequest) -> Result<libp2p::Stream, ClientError> {
        let mut stream = tokio::time::timeout(
            REACH_TIMEOUT,
            self.control.clone().open_stream(self.peer, CLIENT_PROTOCOL),
        )
        .await
        .map_err(|_| ClientError::NoStream("timed out".to_string()))?
        .map_err(|e| ClientError::NoStream(e.to_string()))?;
        write_frame(&mut stream, request).await?;
        Ok(stream)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// `reply`, unless it says the client is not an operator.
fn operator_reply(reply: ControlReply) -> Result<ControlReply, ClientError> {
    match reply {
        ControlReply::Refused(refusal @ ControlRefusal::NotOperator { .. }) => {
            Err(ClientError::NotOperator(refusal))
        }
        reply => Ok(reply),
    }
}

/// The error for a reply that does not fit the request.
fn unexpected(reply: ControlReply) -> ClientError {
    ClientError::UnexpectedReply(Box::new(reply))
}
