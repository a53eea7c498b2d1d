//! `tern run`'s mesh: N real nodes (libp2p over TCP on 127.0.0.1, noise, yamux) inside one
//! process, each with its own store in a temporary directory. The agent is signed with a
//! throwaway key the run trusts (or is a package whose author the caller trusts), launched on
//! `node-0`, and its end comes back through the control protocol's waiter like any launch.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use security::{SecretKey, TrustPolicy, VerifiedPackage};
use tokio::sync::mpsc;

use crate::node::{HopRecord, Node, NodeConfig, NodeHandle};
use crate::store::Durability;
use crate::wire::AgentEnd;

/// A running loopback mesh; its nodes stop and their directories are removed when dropped.
pub struct LoopbackMesh {
    nodes: Vec<NodeHandle>,
    _dirs: Vec<tempfile::TempDir>,
}

impl LoopbackMesh {
    /// Starts `n` nodes named `node-0` .. and connects every pair.
    ///
    /// # Errors
    ///
    /// A node cannot start, or the nodes do not learn each other's names within 20 seconds.
    pub async fn start(
        n: usize,
        trust: TrustPolicy,
        limits: agent_lang::Limits,
        hop_log: Option<mpsc::UnboundedSender<HopRecord>>,
    ) -> Result<LoopbackMesh> {
        let mut nodes: Vec<NodeHandle> = Vec::with_capacity(n);
        let mut dirs = Vec::with_capacity(n);
        for i in 0..n {
            let dir = tempfile::tempdir().context("temporary directory")?;
            let bootstrap = nodes
                .iter()
                .flat_map(|h| h.listen_addrs().into_iter().take(1))
                .collect();
            let config = NodeConfig {
                name: format!("node-{i}"),
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
                bootstrap,
                key: SecretKey::generate(),
                data_dir: dir.path().to_path_buf(),
                mdns: false,
                durability: Durability::NoSync,
                trust: trust.clone(),
                limits: limits.clone(),
                hop_log: hop_log.clone(),
            };
            nodes.push(Node::start(config).await?);
            dirs.push(dir);
        }
        // Wait until every node knows every other by name (identify).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while nodes.iter().any(|h| h.peer_names().len() + 1 < n) {
            if tokio::time::Instant::now() > deadline {
                bail!("the nodes did not all find each other within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(LoopbackMesh { nodes, _dirs: dirs })
    }

    /// The nodes, `node-0` first.
    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// Launches `package` on node-0 and waits for the agent's end.
    ///
    /// # Errors
    ///
    /// node-0 refuses the package, or the mesh stops before the agent ends.
    pub async fn run(&self, package: VerifiedPackage) -> Result<(String, AgentEnd)> {
        let (agent, end) = self.nodes[0]
            .launch(package, None)
            .map_err(anyhow::Error::msg)?;
        tokio::pin!(end);
        // Only the agent itself can send it messages here: waiting for one without a timeout,
        // with none queued, would never end.
        let mut stuck_checks = 0;
        loop {
            tokio::select! {
                end = &mut end => return Ok((agent, end.context("the mesh stopped before the agent ended")?)),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {
                    match self.nodes.iter().find(|n| n.waits_for_a_message(&agent)) {
                        Some(node) if stuck_checks >= 1 => {
                            let node = node.name().to_string();
                            let error = "receive() without a timeout would wait forever: under `tern run` only \
                                         the agent itself can send it messages (use receive(timeout_ms))"
                                .to_string();
                            return Ok((agent, AgentEnd::Failed { error, node, position: None, unread: 0 }));
                        }
                        Some(_) => stuck_checks += 1,
                        None => stuck_checks = 0,
                    }
                }
            }
        }
    }
}

impl Drop for LoopbackMesh {
    fn drop(&mut self) {
        for n in &self.nodes {
            n.shutdown();
        }
    }
}
