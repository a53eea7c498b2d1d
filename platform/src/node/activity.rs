//! What `tern status` tells about the node's recent past: counts of what happened since the
//! node started and its last few events, folded from the node's own event stream (see
//! [`super::events`]) by a task of the node, so that status reads what the trace, the tests and
//! the benchmarks read.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::{self, error::RecvError};

use super::{lock, now_ms, NodeEvent};
use crate::wire::{Activity, ActivityCounts, AgentEnd, RecentEvent};

/// Events kept for `tern status`.
pub(super) const RECENT_EVENTS: usize = 32;

/// The activity the status report shows, kept up to date by [`ActivityLog::follow`]. A `std`
/// mutex held to fold one event or to copy the whole out, never across an `.await`.
#[derive(Clone, Default)]
pub(super) struct ActivityLog {
    state: Arc<Mutex<Folded>>,
}

#[derive(Default)]
struct Folded {
    counts: ActivityCounts,
    recent: VecDeque<RecentEvent>,
    missed: u64,
}

impl ActivityLog {
    /// Reads `events` until the channel closes, folding each into the log (the node's task).
    pub(super) async fn follow(self, mut events: broadcast::Receiver<NodeEvent>) {
        loop {
            match events.recv().await {
                Ok(event) => self.record(now_ms(), &event),
                Err(RecvError::Lagged(n)) => lock(&self.state).missed += n,
                Err(RecvError::Closed) => return,
            }
        }
    }

    /// Folds one event that happened at `at_ms` (unix milliseconds).
    fn record(&self, at_ms: u64, event: &NodeEvent) {
        let mut state = lock(&self.state);
        let counts = &mut state.counts;
        let count = match event {
            NodeEvent::PeerUp { .. } => &mut counts.peers_up,
            NodeEvent::PeerDown { .. } => &mut counts.peers_down,
            NodeEvent::NameRefused { .. } => &mut counts.names_refused,
            NodeEvent::AgentLaunched { .. } => &mut counts.agents_launched,
            NodeEvent::AgentResumed { .. } => &mut counts.agents_resumed,
            NodeEvent::AgentEnded {
                end: AgentEnd::Finished { .. },
                ..
            } => &mut counts.agents_finished,
            NodeEvent::AgentEnded {
                end: AgentEnd::Failed { .. },
                ..
            } => &mut counts.agents_failed,
            NodeEvent::HopOffered { .. } => &mut counts.hops_offered,
            NodeEvent::HopStored { .. } => &mut counts.hops_stored,
            NodeEvent::HopCommitted { .. } => &mut counts.hops_committed,
            NodeEvent::HopRefused { .. } => &mut counts.hops_refused,
            NodeEvent::HopFailed { .. } => &mut counts.hops_failed,
            NodeEvent::MessageQueued { .. } => &mut counts.messages_queued,
            NodeEvent::MessageDelivered { .. } => &mut counts.messages_delivered,
        };
        *count += 1;
        if state.recent.len() == RECENT_EVENTS {
            state.recent.pop_front();
        }
        state.recent.push_back(RecentEvent {
            at_ms,
            event: event.to_string(),
        });
    }

    /// The activity so far, oldest recent event first.
    pub(super) fn snapshot(&self) -> Activity {
        let state = lock(&self.state);
        Activity {
            counts: state.counts.clone(),
            recent: state.recent.iter().cloned().collect(),
            missed: state.missed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::HopRefusal;

    fn ended(finished: bool) -> NodeEvent {
        let end = if finished {
            AgentEnd::Finished {
                json: "1".into(),
                node: "a".into(),
                hops: 1,
                unread: 0,
            }
        } else {
            AgentEnd::Failed {
                error: "boom".into(),
                node: "a".into(),
                position: None,
                unread: 0,
            }
        };
        NodeEvent::AgentEnded {
            agent: "agent-1".into(),
            end,
        }
    }

    #[test]
    fn counts_each_kind_and_tells_ends_apart() {
        let log = ActivityLog::default();
        log.record(1, &ended(true));
        log.record(2, &ended(false));
        log.record(3, &ended(false));
        log.record(
            4,
            &NodeEvent::HopRefused {
                agent: Some("agent-1".into()),
                hop: Some(2),
                from: "b".into(),
                reason: HopRefusal::PeerNotAccepted { peer: "b".into() },
            },
        );
        let a = log.snapshot();
        assert_eq!(a.counts.agents_finished, 1);
        assert_eq!(a.counts.agents_failed, 2);
        assert_eq!(a.counts.hops_refused, 1);
        assert_eq!(a.counts.hops_stored, 0);
        assert_eq!(a.recent.len(), 4);
        assert_eq!(a.recent[3].at_ms, 4);
        assert!(
            a.recent[3]
                .event
                .contains("refused hop 2 of agent-1 from b"),
            "{}",
            a.recent[3].event
        );
    }

    #[test]
    fn keeps_only_the_latest_events() {
        let log = ActivityLog::default();
        for i in 0..(RECENT_EVENTS as u64 + 10) {
            log.record(
                i,
                &NodeEvent::MessageQueued {
                    agent: format!("agent-{i}"),
                },
            );
        }
        let a = log.snapshot();
        assert_eq!(a.counts.messages_queued, RECENT_EVENTS as u64 + 10);
        assert_eq!(a.recent.len(), RECENT_EVENTS);
        assert_eq!(a.recent[0].at_ms, 10);
        assert_eq!(
            a.recent[RECENT_EVENTS - 1].event,
            "message queued for agent-41"
        );
    }

    #[tokio::test]
    async fn follows_a_channel_and_counts_what_it_missed() {
        let (sender, receiver) = broadcast::channel(2);
        for i in 0..5 {
            sender
                .send(NodeEvent::MessageDelivered {
                    agent: format!("agent-{i}"),
                })
                .unwrap();
        }
        drop(sender);
        let log = ActivityLog::default();
        log.clone().follow(receiver).await;
        let a = log.snapshot();
        assert_eq!(a.missed, 3);
        assert_eq!(a.counts.messages_delivered, 2);
    }
}
