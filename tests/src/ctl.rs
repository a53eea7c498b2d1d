//! The client protocol from a test, without the CLI: status, launch, and waiting for an
//! agent's end, as the tests' operator (each call its own runtime and peer, so they work from
//! plain threads).

use std::time::Duration;

use platform::wire::{AgentEnd, ClientRequest, ControlReply, StatusReport};

use crate::raw_peer::RawPeer;

fn peer(addr: &str) -> RawPeer {
    RawPeer::new(
        crate::operator_key(),
        &addr.parse().expect("a node address"),
    )
}

/// The status of the node at `addr`, asked as `tern status` asks it (through
/// [`platform::client::Client`]).
///
/// # Panics
///
/// The node does not answer within 20 s.
pub fn status(addr: &str) -> StatusReport {
    crate::runtime().block_on(async {
        let addr = addr.parse().expect("a node address");
        let report = tokio::time::timeout(Duration::from_secs(20), async {
            platform::client::Client::connect(&addr, Some(&crate::operator_key()))
                .await?
                .status()
                .await
        })
        .await
        .expect("status: timed out");
        report.unwrap_or_else(|e| panic!("status: {e}"))
    })
}

/// Launches `package` (bytes) at `addr`; returns the agent id, and with `wait` how the
/// agent ended (`None` if the stream broke or `timeout` passed first).
///
/// # Panics
///
/// The node refuses the package.
pub fn launch(
    addr: &str,
    package: Vec<u8>,
    wait: bool,
    timeout: Duration,
) -> (String, Option<AgentEnd>) {
    launch_with(addr, package, wait, timeout, |_| {})
}

fn launch_with(
    addr: &str,
    package: Vec<u8>,
    wait: bool,
    timeout: Duration,
    launched: impl FnOnce(&str),
) -> (String, Option<AgentEnd>) {
    crate::runtime().block_on(async {
        let p = peer(addr);
        let (reply, mut stream) = p.client(&ClientRequest::Launch { package, wait }).await;
        let agent = match reply {
            ControlReply::Launched { agent } => agent,
            other => panic!("launch: unexpected reply {other:?}"),
        };
        launched(&agent);
        if !wait {
            return (agent, None);
        }
        let end = tokio::time::timeout(timeout, async {
            // The agent may take longer than the frame reader's silence limit: read the
            // frame by hand, like `tern launch` does.
            use futures::AsyncReadExt;
            let mut len = [0u8; 4];
            stream.read_exact(&mut len).await.ok()?;
            let len = u32::from_be_bytes(len) as usize;
            if len > platform::wire::MAX_FRAME {
                return None;
            }
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body).await.ok()?;
            match ciborium::from_reader(body.as_slice()).ok()? {
                ControlReply::Ended(end) => Some(end),
                _ => None,
            }
        })
        .await
        .ok()
        .flatten();
        (agent, end)
    })
}

/// An agent launched with `wait` from a background thread.
pub struct Waiting {
    /// The agent's id.
    pub agent: String,
    handle: std::thread::JoinHandle<Option<AgentEnd>>,
}

impl Waiting {
    /// How the agent ended (`None`: the stream broke or the launch's timeout passed).
    pub fn end(self) -> Option<AgentEnd> {
        self.handle.join().ok().flatten()
    }
}

/// Launches `package` at `addr` from a thread that waits up to `timeout` for its end;
/// returns as soon as the node has accepted it.
///
/// # Panics
///
/// The node does not accept the package within 20 s.
pub fn launch_in_background(addr: &str, package: Vec<u8>, timeout: Duration) -> Waiting {
    let addr = addr.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        launch_with(&addr, package, true, timeout, |id| {
            let _ = tx.send(id.to_string());
        })
        .1
    });
    let agent = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the node did not accept the launch");
    Waiting { agent, handle }
}
