//! The CLI's side of the control protocol: an ephemeral libp2p peer that dials one node and
//! exchanges control frames with it (`tern launch`, `tern status`).

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::wire::{
    read_frame, write_frame, ControlReply, ControlRequest, CONTROL_PROTOCOL, MAX_FRAME,
};

/// A connection to one node.
pub struct Client {
    control: libp2p_stream::Control,
    peer: PeerId,
    driver: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Dials the node at `addr`, which must end in `/p2p/<peer id>`.
    ///
    /// # Errors
    ///
    /// The address has no peer id, or the transport cannot be built.
    pub async fn connect(addr: &Multiaddr) -> Result<Client> {
        let Some(Protocol::P2p(peer)) = addr.iter().last() else {
            bail!("{addr}: the node address must end in /p2p/<peer id> (as `tern node` prints it)");
        };
        let mut swarm = crate::wire::swarm(libp2p::identity::Keypair::generate_ed25519(), |_| {
            libp2p_stream::Behaviour::new()
        })?;
        // libp2p-stream keeps no addresses: dial the node ourselves (by peer id, so that
        // `open_stream` waits for this dial instead of starting one with no address).
        swarm
            .dial(
                libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(vec![addr.clone()])
                    .build(),
            )
            .with_context(|| format!("cannot dial {addr}"))?;
        let control = swarm.behaviour().new_control();
        // Wait for the connection before opening streams on it.
        let connected = tokio::time::timeout(Duration::from_secs(15), async {
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
        .await;
        match connected {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("cannot reach the node at {addr}: {e}"),
            Err(_) => bail!("cannot reach the node at {addr}: timed out"),
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

    /// Sends `request` and returns the stream for the replies.
    async fn open(&self, request: &ControlRequest) -> Result<libp2p::Stream> {
        let mut stream = tokio::time::timeout(
            Duration::from_secs(15),
            self.control
                .clone()
                .open_stream(self.peer, CONTROL_PROTOCOL),
        )
        .await
        .map_err(|_| anyhow!("cannot reach the node: timed out"))?
        .map_err(|e| anyhow!("cannot reach the node: {e}"))?;
        write_frame(&mut stream, request).await?;
        Ok(stream)
    }

    /// One request, one reply.
    ///
    /// # Errors
    ///
    /// The node cannot be reached or answers garbage.
    pub async fn request(&self, request: &ControlRequest) -> Result<ControlReply> {
        let mut stream = self.open(request).await?;
        read_frame(&mut stream, MAX_FRAME)
            .await
            .context("the node took the request but sent no answer (it may have carried it out)")
    }

    /// Launches a package; with `wait`, also waits for the agent's end (no time limit).
    ///
    /// # Errors
    ///
    /// The node cannot be reached, refuses the package, or the stream breaks.
    pub async fn launch(
        &self,
        package: Vec<u8>,
        wait: bool,
    ) -> Result<(String, Option<ControlReply>)> {
        let mut stream = self.open(&ControlRequest::Launch { package, wait }).await?;
        let agent = match read_frame(&mut stream, MAX_FRAME).await? {
            ControlReply::Launched { agent } => agent,
            ControlReply::Refused(e) => bail!("the node refused the package: {e}"),
            other => bail!("unexpected reply {other:?}"),
        };
        if !wait {
            return Ok((agent, None));
        }
        // The agent may run for a long time: wait on the stream without the frame timeout.
        let mut len = [0u8; 4];
        futures::AsyncReadExt::read_exact(&mut stream, &mut len)
            .await
            .context("the node closed the stream before the agent ended")?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME {
            bail!("reply too large");
        }
        let mut body = vec![0u8; len];
        futures::AsyncReadExt::read_exact(&mut stream, &mut body).await?;
        let reply: ControlReply =
            ciborium::from_reader(body.as_slice()).context("malformed reply")?;
        Ok((agent, Some(reply)))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}
