//! Shared support for end-to-end tests: start a mesh, launch an agent, wait for its end.

use std::time::Duration;

use agent_lang::Limits;
use platform::mesh::{Mesh, MeshOptions, NodeEvent};

/// How an end-to-end run ended, with the hops it made.
#[derive(Debug)]
pub enum Ending {
    /// Finished on `node` with a JSON value.
    Finished {
        node: String,
        json: String,
        hops: u64,
        hop_records: usize,
    },
    /// Failed on `node`.
    Failed { node: String, error: String },
}

/// Starts an embedded mesh of `nodes` nodes, runs `source` from node-0 and stops the mesh.
pub fn run_on_mesh(nodes: usize, source: &str) -> Ending {
    let (mesh, events) = Mesh::start(&MeshOptions {
        nodes,
        limits: Limits::default(),
    })
    .expect("mesh starts");
    mesh.launch("e2e-agent", source);
    let mut hop_records = 0;
    loop {
        match events
            .recv_timeout(Duration::from_secs(120))
            .expect("the agent ends within two minutes")
        {
            NodeEvent::Hop(_) => hop_records += 1,
            NodeEvent::Print { .. } => {}
            NodeEvent::Finished { node, value, hops } => {
                return Ending::Finished {
                    node,
                    json: agent_lang::to_json(&value).to_string(),
                    hops,
                    hop_records,
                }
            }
            NodeEvent::Failed { node, error } => {
                return Ending::Failed {
                    node,
                    error: error.to_string(),
                }
            }
        }
    }
}
