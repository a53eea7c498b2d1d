//! Residual dependencies: the remote resource bindings in use through this node, both ways —
//! agents here reaching resources of other nodes, and agents elsewhere reaching this node's —
//! as `tern status` shows them. A dependency is remembered for [`REMEMBERED`] after its last
//! request (a handle in an agent's continuation cannot be listed without decoding the agent),
//! and at most [`MOST`] are kept, the oldest going first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;
use crate::wire::RemoteDependency;

/// How long a dependency is shown after its last request.
const REMEMBERED: Duration = Duration::from_secs(600);

/// Most dependencies kept.
const MOST: usize = 4096;

/// Which way a dependency goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Direction {
    /// An agent here uses a resource of another node.
    Uses,
    /// An agent elsewhere uses a resource of this node.
    Serves,
}

/// The dependencies and when each was last seen. A `std` mutex held for one map operation.
#[derive(Default)]
pub(super) struct Residuals {
    seen: Mutex<HashMap<(Direction, String, String, String), Instant>>,
}

impl Residuals {
    /// Agent `agent` used resource `resource` of (`Uses`) or from (`Serves`) node `node` now.
    pub(super) fn note(&self, direction: Direction, agent: &str, node: &str, resource: &str) {
        let now = Instant::now();
        let mut seen = lock(&self.seen);
        if seen.len() >= MOST {
            seen.retain(|_, at| now.duration_since(*at) < REMEMBERED);
        }
        if seen.len() >= MOST {
            if let Some(oldest) = seen
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(k, _)| k.clone())
            {
                seen.remove(&oldest);
            }
        }
        seen.insert(
            (
                direction,
                agent.to_string(),
                node.to_string(),
                resource.to_string(),
            ),
            now,
        );
    }

    /// The dependencies seen within [`REMEMBERED`], most recent first.
    pub(super) fn list(&self) -> Vec<RemoteDependency> {
        let now = Instant::now();
        let mut listed: Vec<(Duration, RemoteDependency)> = lock(&self.seen)
            .iter()
            .map(|((direction, agent, node, resource), at)| {
                (now.duration_since(*at), direction, agent, node, resource)
            })
            .filter(|(ago, ..)| *ago < REMEMBERED)
            .map(|(ago, direction, agent, node, resource)| {
                (
                    ago,
                    RemoteDependency {
                        agent: agent.clone(),
                        node: node.clone(),
                        resource: resource.clone(),
                        serves: *direction == Direction::Serves,
                        seconds_ago: ago.as_secs(),
                    },
                )
            })
            .collect();
        listed.sort_by_key(|(ago, _)| *ago);
        listed.into_iter().map(|(_, d)| d).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_are_listed_once_each_and_bounded() {
        let residuals = Residuals::default();
        residuals.note(Direction::Uses, "a", "node-1", "shard");
        residuals.note(Direction::Uses, "a", "node-1", "shard");
        residuals.note(Direction::Serves, "b", "node-2", "counts");
        let listed = residuals.list();
        assert_eq!(listed.len(), 2);
        assert_eq!((listed[0].agent.as_str(), listed[0].serves), ("b", true));
        for i in 0..MOST + 10 {
            residuals.note(Direction::Uses, &format!("agent-{i}"), "n", "r");
        }
        assert_eq!(residuals.list().len(), MOST);
    }
}
