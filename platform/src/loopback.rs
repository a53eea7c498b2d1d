//! `tern run`'s mesh: N real nodes (libp2p over TCP on 127.0.0.1, noise, yamux) inside one
//! process, each with its own store in a temporary directory. The agent is signed with a
//! throwaway key the run trusts (or is a package whose author the caller trusts), launched on
//! `node-0`, and its end comes back through the control protocol's waiter like any launch.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::future::select_all;
use futures::FutureExt;
use security::{SecretKey, TrustPolicy, VerifiedPackage};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use crate::node::{Node, NodeConfig, NodeEvent, NodeHandle};
use crate::resources::NodeResources;
use crate::wire::AgentEnd;

/// A running loopback mesh; its nodes stop and their directories are removed when dropped.
pub struct LoopbackMesh {
    nodes: Vec<NodeHandle>,
    _dirs: Vec<tempfile::TempDir>,
}

/// One node of a mesh to start: its name and what it offers agents.
#[derive(Debug, Clone)]
pub struct MeshNode {
    /// Its name (`here()` there, `migrate(name)` to it).
    pub name: String,
    /// Its resources.
    pub resources: NodeResources,
    /// Its upload cap, in Mbit/s (None: not capped).
    pub upload_mbit: Option<f64>,
}

impl MeshNode {
    /// Reads a mesh description (`tern run --mesh`): one `[[node]]` table per node, in order,
    /// each with a `name`, optionally an `upload_mbit` cap, and `[node.resources.NAME]` tables as
    /// a node configuration has them (paths relative to the description's directory).
    ///
    /// # Errors
    ///
    /// The file cannot be read or is malformed: the error names the node and field.
    pub fn read_mesh(path: &std::path::Path) -> Result<Vec<MeshNode>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Mesh {
            node: Vec<Described>,
        }
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Described {
            name: String,
            #[serde(default)]
            resources: toml::Table,
            upload_mbit: Option<f64>,
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mesh: Mesh = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid mesh description", path.display()))?;
        let base = path.parent().unwrap_or(std::path::Path::new("."));
        let mut seen = std::collections::HashSet::new();
        if mesh.node.is_empty() || mesh.node.len() > 256 {
            bail!("{}: a mesh has 1 to 256 nodes", path.display());
        }
        mesh.node
            .into_iter()
            .map(|d| {
                if !discovery::is_valid_name(&d.name) {
                    bail!(
                        "{}: node name '{}' must be 1 to 64 of A-Z a-z 0-9 . _ -",
                        path.display(),
                        d.name
                    );
                }
                if !seen.insert(d.name.clone()) {
                    bail!("{}: node '{}' is described twice", path.display(), d.name);
                }
                let resources = NodeResources::from_toml(&d.resources, base)
                    .map_err(|e| anyhow::anyhow!("{}: node '{}': {e}", path.display(), d.name))?;
                let upload_mbit = d
                    .upload_mbit
                    .map(crate::node::check_upload_mbit)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("{}: node '{}': {e}", path.display(), d.name))?;
                Ok(MeshNode {
                    name: d.name,
                    resources,
                    upload_mbit,
                })
            })
            .collect()
    }
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
    ) -> Result<LoopbackMesh> {
        let nodes = (0..n)
            .map(|i| MeshNode {
                name: format!("node-{i}"),
                resources: NodeResources::default(),
                upload_mbit: None,
            })
            .collect();
        LoopbackMesh::start_with(nodes, trust, limits).await
    }

    /// Starts the nodes `nodes` describes (the first is where [`LoopbackMesh::run`] launches)
    /// and connects every pair.
    ///
    /// # Errors
    ///
    /// As [`LoopbackMesh::start`].
    pub async fn start_with(
        described: Vec<MeshNode>,
        trust: TrustPolicy,
        limits: agent_lang::Limits,
    ) -> Result<LoopbackMesh> {
        let n = described.len();
        let mut nodes: Vec<NodeHandle> = Vec::with_capacity(n);
        let mut dirs = Vec::with_capacity(n);
        for node in described {
            let dir = tempfile::tempdir().context("temporary directory")?;
            let bootstrap = nodes
                .iter()
                .flat_map(|h| h.listen_addrs().into_iter().take(1))
                .collect();
            let config = NodeConfig {
                bootstrap,
                limits: limits.clone(),
                resources: node.resources,
                upload_mbit: node.upload_mbit,
                ..NodeConfig::local(
                    &node.name,
                    SecretKey::generate(),
                    dir.path().to_path_buf(),
                    trust.clone(),
                )
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

    /// The events of every node of the mesh from now on, as one stream.
    pub fn events(&self) -> MeshEvents {
        MeshEvents {
            receivers: self.nodes.iter().map(NodeHandle::events).collect(),
        }
    }

    /// Launches `package` on node-0 and waits for the agent's end.
    ///
    /// # Errors
    ///
    /// node-0 refuses the package, or the mesh stops before the agent ends.
    pub async fn run(&self, package: VerifiedPackage) -> Result<(String, AgentEnd)> {
        let (agent, end) = self.nodes[0]
            .launch(package, None)
            .context("node-0 refused the agent")?;
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

/// The events of the nodes of a mesh, read as one stream. Events of one node come in the order
/// it published them; events of different nodes in the order they are read.
pub struct MeshEvents {
    receivers: Vec<broadcast::Receiver<NodeEvent>>,
}

/// What reading a node's events gave.
#[derive(Debug)]
pub enum MeshEvent {
    /// An event.
    Event(NodeEvent),
    /// This many events were lost: the reader fell more than `node::EVENT_BUFFER` behind.
    Lost(u64),
}

impl MeshEvents {
    /// The next event of any node; None once every node has stopped.
    pub async fn next(&mut self) -> Option<MeshEvent> {
        loop {
            if self.receivers.is_empty() {
                return None;
            }
            let (received, index, _) =
                select_all(self.receivers.iter_mut().map(|r| r.recv().boxed())).await;
            match received {
                Ok(event) => return Some(MeshEvent::Event(event)),
                Err(RecvError::Lagged(lost)) => return Some(MeshEvent::Lost(lost)),
                Err(RecvError::Closed) => {
                    self.receivers.swap_remove(index);
                }
            }
        }
    }

    /// Every event already published and not read yet, without waiting.
    pub fn drain(&mut self) -> Vec<MeshEvent> {
        let mut out = Vec::new();
        for receiver in &mut self.receivers {
            loop {
                match receiver.try_recv() {
                    Ok(event) => out.push(MeshEvent::Event(event)),
                    Err(TryRecvError::Lagged(lost)) => out.push(MeshEvent::Lost(lost)),
                    Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                }
            }
        }
        out
    }
}

/// One hop as a trace shows it: a [`NodeEvent::HopStored`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedHop {
    /// The hop number.
    pub hop: u64,
    /// The source's name.
    pub from: String,
    /// The destination's name.
    pub to: String,
    /// The continuation's size.
    pub bytes: usize,
    /// From the agent's suspension at the source to the agent stored at the destination.
    pub micros: u64,
}

/// The hops of the mesh's agents, each agent's in hop order. Each destination publishes the
/// hops it stores on its own channel, so a reader may see a later hop (stored by one node)
/// before an earlier one (stored by another); a hop that comes early waits for those before it.
pub struct HopTrace {
    events: MeshEvents,
    /// Per agent, the hop to show next.
    next: HashMap<String, u64>,
    /// Hops that came before one of their agent's earlier hops.
    early: BTreeMap<(String, u64), TracedHop>,
    /// Hops shown and waiting to be taken.
    ready: std::collections::VecDeque<TracedHop>,
}

impl HopTrace {
    /// The trace of the mesh's hops from now on.
    pub fn new(mesh: &LoopbackMesh) -> HopTrace {
        HopTrace {
            events: mesh.events(),
            next: HashMap::new(),
            early: BTreeMap::new(),
            ready: std::collections::VecDeque::new(),
        }
    }

    /// The next hop in order; None once every node has stopped.
    pub async fn next(&mut self) -> Option<TracedHop> {
        while self.ready.is_empty() {
            let event = self.events.next().await?;
            self.take(event);
        }
        self.ready.pop_front()
    }

    /// Every hop published and not taken yet, in order (what waits for a hop that never came
    /// included), without waiting.
    pub fn rest(&mut self) -> Vec<TracedHop> {
        for event in self.events.drain() {
            self.take(event);
        }
        self.flush();
        self.ready.drain(..).collect()
    }

    fn take(&mut self, event: MeshEvent) {
        match event {
            MeshEvent::Event(NodeEvent::HopStored {
                agent,
                hop,
                from,
                to,
                bytes,
                micros,
            }) => {
                let traced = TracedHop {
                    hop,
                    from,
                    to,
                    bytes,
                    micros,
                };
                let next = self
                    .next
                    .entry(agent.clone())
                    .or_insert(security::FIRST_HOP);
                if hop > *next {
                    self.early.insert((agent, hop), traced);
                    return;
                }
                *next = hop + 1;
                self.ready.push_back(traced);
                while let Some(traced) = self.early.remove(&(agent.clone(), *next)) {
                    *next += 1;
                    self.ready.push_back(traced);
                }
            }
            // Lost events leave gaps no hop will fill.
            MeshEvent::Lost(_) => self.flush(),
            MeshEvent::Event(_) => {}
        }
    }

    /// Shows every hop that waits, in order.
    fn flush(&mut self) {
        for ((agent, hop), traced) in std::mem::take(&mut self.early) {
            self.next.insert(agent, hop + 1);
            self.ready.push_back(traced);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MeshNode;

    /// A mesh description's `upload_mbit` reaches the node it is given for, and only it.
    #[test]
    fn a_mesh_description_caps_the_nodes_it_names() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("mesh.toml");
        std::fs::write(
            &path,
            "[[node]]\nname = \"home\"\n[[node]]\nname = \"far\"\nupload_mbit = 20\n",
        )
        .expect("write");
        let nodes = MeshNode::read_mesh(&path).expect("a mesh");
        let caps: Vec<(&str, Option<f64>)> = nodes
            .iter()
            .map(|n| (n.name.as_str(), n.upload_mbit))
            .collect();
        assert_eq!(caps, [("home", None), ("far", Some(20.0))]);
    }
}
