//! An agent's side of messages: `receive` waits for the next message without holding a thread,
//! and takes it off the queue in the transaction that stores the agent as answered by it, so a
//! crash right after `receive` neither loses the message nor delivers it twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_lang::rhai::Dynamic;
use agent_lang::{Execution, Resume};
use tokio::sync::Notify;

use super::events::{Events, NodeEvent};
use super::fault::{FaultPoint, Faults};
use super::hop::release_large_checkpoint;
use super::quota::StoreQuota;
use super::{lock, now_ms};
use crate::store::{AgentMeta, AgentRecord, AgentState, Store};
use crate::wire::ControlRefusal;

/// The agents of this node that may be waiting in `receive`, and how to wake them.
pub(super) struct Mailboxes {
    store: Store,
    /// What a checkpoint that grew the agent must fit in.
    quota: StoreQuota,
    faults: Faults,
    events: Events,
    /// One `Notify` per agent: a wake that comes before the agent waits is kept (as a permit)
    /// and not lost. A `std` mutex held for one map operation.
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
}

/// A message delivered: if it was queued on this node, the agent it is for, to wake once
/// whoever sent the message has been answered. Waking first would let the agent take the
/// message, and its node die, before the sender learns that it was delivered.
#[must_use]
pub(super) struct Wake(Option<String>);

impl Wake {
    /// Nothing to wake (the message was not queued here).
    pub(super) fn none() -> Wake {
        Wake(None)
    }

    /// The message was queued here for `agent`.
    pub(super) fn agent(agent: &str) -> Wake {
        Wake(Some(agent.to_string()))
    }

    /// Whether the message was queued here.
    pub(super) fn queued_here(&self) -> bool {
        self.0.is_some()
    }
}

/// The checkpoint `receive` can make of the agent at this `receive`.
enum AtReceive {
    /// Its continuation here, not stored yet.
    Encoded(Vec<u8>),
    /// `rec` is its Waiting record here: only the state changes.
    Stored,
    /// It holds a value that cannot be stored: no checkpoint.
    Unstorable,
}

impl Mailboxes {
    pub(super) fn new(quota: StoreQuota, faults: Faults, events: Events) -> Mailboxes {
        Mailboxes {
            store: quota.store().clone(),
            quota,
            faults,
            events,
            waiting: Mutex::default(),
        }
    }

    fn notify_of(&self, agent: &str) -> Arc<Notify> {
        lock(&self.waiting)
            .entry(agent.to_string())
            .or_default()
            .clone()
    }

    /// Wakes the agent a delivered message was queued for (see [`Wake`]), if it is in
    /// `receive` here. (One that calls `receive` later looks at its queue in the store before
    /// it waits, so nothing is kept for it: an entry made here for an agent that never waits on
    /// this node would stay.)
    pub(super) fn wake(&self, wake: Wake) {
        if let Some(agent) = wake.0 {
            self.events.emit(NodeEvent::MessageQueued {
                agent: agent.clone(),
            });
            if let Some(notify) = lock(&self.waiting).get(&agent) {
                notify.notify_one();
            }
        }
    }

    /// The agent ended here or left: its entry goes, unless a `receive` of it holds it (the
    /// agent came back and already waits again).
    pub(super) fn forget(&self, agent: &str) {
        let mut waiting = lock(&self.waiting);
        if waiting
            .get(agent)
            .is_some_and(|notify| Arc::strong_count(notify) == 1)
        {
            waiting.remove(agent);
        }
    }

    /// Waits for the agent's next message (or the timeout), without holding a thread. Each
    /// step is a checkpoint of the agent suspended at this `receive`, and `rec` becomes it:
    /// while it waits, stored as Waiting (a restarted node resumes it waiting); once a message
    /// is here, as Answered by it, in the transaction that takes the message off the queue (a
    /// crash after that resumes it with that message: none is lost or received twice). An
    /// agent holding a value that cannot be stored gets no checkpoint here (a crash resumes it
    /// from its last one). `stored` is the size of the agent's stored checkpoint, whose bytes
    /// `rec` holds only while small (`hop::release_large_checkpoint`); it follows each new one.
    pub(super) async fn receive(
        &self,
        rec: &mut AgentRecord,
        stored: &mut usize,
        exec: &Execution,
        timeout_ms: Option<u64>,
    ) -> Resume {
        match self.wait_for_message(rec, stored, exec, timeout_ms).await {
            Ok(Some(message)) => Resume::Message(message),
            Ok(None) => Resume::Value(Dynamic::UNIT),
            Err(e) => Resume::Error(e),
        }
    }

    /// [`Mailboxes::receive`]: the message, or None at the timeout.
    async fn wait_for_message(
        &self,
        rec: &mut AgentRecord,
        stored: &mut usize,
        exec: &Execution,
        timeout_ms: Option<u64>,
    ) -> Result<Option<Vec<u8>>, String> {
        let notify = self.notify_of(&rec.id);
        let deadline = timeout_ms.map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        let mut here = match exec.encode() {
            Ok(continuation) => {
                // A checkpoint larger than the last must fit in the node's store quota; if it
                // does not, `receive` fails (catchably) and the messages stay queued.
                let growth = continuation.len().saturating_sub(*stored);
                if let Err(full) = self.quota.room_for(growth as u64) {
                    return Err(format!("receive: {}", ControlRefusal::from(full)));
                }
                AtReceive::Encoded(continuation)
            }
            Err(e) => {
                tracing::debug!(agent = %rec.id, "receive without a checkpoint: {e}");
                AtReceive::Unstorable
            }
        };
        loop {
            match self.store.message_count(&rec.id) {
                Ok(0) => {}
                Ok(_) => {
                    if let Some(message) = self.take_message(rec, stored, &mut here).await? {
                        return Ok(Some(message));
                    }
                }
                Err(e) => return Err(format!("receive: {e}")),
            }
            if let AtReceive::Encoded(continuation) =
                std::mem::replace(&mut here, AtReceive::Stored)
            {
                let timeout_at_ms = timeout_ms.map(|ms| now_ms().saturating_add(ms));
                let state = AgentState::Waiting { timeout_at_ms };
                let checkpoint = AgentRecord::from_parts(
                    AgentMeta {
                        state,
                        ..rec.meta.clone()
                    },
                    continuation,
                );
                let written = self
                    .store
                    .write(move |b| b.put_agent(&checkpoint).map(|()| checkpoint))
                    .await;
                *rec = written.map_err(|e| format!("receive: {e}"))?;
                *stored = release_large_checkpoint(rec);
                // A message may have come in before the record said Waiting: look again.
                continue;
            }
            match deadline {
                Some(d) => {
                    if tokio::time::timeout_at(d, notify.notified()).await.is_err() {
                        // Timed out: `receive` returns `()`, and the checkpoint says so.
                        if let AtReceive::Stored = here {
                            let unit = agent_lang::encode_portable(&Dynamic::UNIT)
                                .map_err(|e| format!("receive: {e}"))?;
                            let answered = AgentMeta {
                                state: AgentState::Answered { value: unit },
                                ..rec.meta.clone()
                            };
                            let stored = self
                                .store
                                .write(move |b| b.put_agent_meta(&answered).map(|_| answered.state))
                                .await;
                            rec.state = stored.map_err(|e| format!("receive: {e}"))?;
                        }
                        return Ok(None);
                    }
                }
                None => notify.notified().await,
            }
        }
    }

    /// Takes the agent's next message off its queue and, in the same transaction, stores the
    /// agent as Answered by it (as `here` allows); `rec` becomes that record. None, with `here`
    /// as it was, if the queue is empty.
    async fn take_message(
        &self,
        rec: &mut AgentRecord,
        stored_len: &mut usize,
        here: &mut AtReceive,
    ) -> Result<Option<Vec<u8>>, String> {
        let checkpoint = std::mem::replace(here, AtReceive::Unstorable);
        let (id, meta) = (rec.id.clone(), rec.meta.clone());
        let (message, checkpoint) = self
            .store
            .write(move |b| {
                let Some(message) = b.pop_message(&id)? else {
                    return Ok((None, Err(checkpoint)));
                };
                let answered = AgentMeta {
                    state: AgentState::Answered {
                        value: message.clone(),
                    },
                    ..meta
                };
                let stored = match checkpoint {
                    AtReceive::Encoded(continuation) => {
                        let record = AgentRecord::from_parts(answered, continuation);
                        b.put_agent(&record)?;
                        Some((record.meta.state, Some(record.continuation)))
                    }
                    AtReceive::Stored => {
                        b.put_agent_meta(&answered)?;
                        Some((answered.state, None))
                    }
                    AtReceive::Unstorable => None,
                };
                Ok((Some(message), Ok(stored)))
            })
            .await
            .map_err(|e| format!("receive: {e}"))?;
        match (message, checkpoint) {
            (Some(message), Ok(stored)) => {
                self.faults.die_at(FaultPoint::AfterReceive);
                if let Some((state, continuation)) = stored {
                    rec.state = state;
                    if let Some(continuation) = continuation {
                        rec.continuation = continuation;
                        *stored_len = release_large_checkpoint(rec);
                    }
                }
                self.events.emit(NodeEvent::MessageDelivered {
                    agent: rec.id.clone(),
                });
                Ok(Some(message))
            }
            (_, Err(unchanged)) => {
                *here = unchanged;
                Ok(None)
            }
            (None, Ok(_)) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use agent_lang::{Limits, Outcome, Program};
    use tokio::sync::broadcast::error::TryRecvError;

    use super::*;
    use crate::store::Durability;

    /// A store in a temporary directory, the mailboxes over it, and a subscriber to its events.
    fn mailboxes() -> (
        Mailboxes,
        tempfile::TempDir,
        tokio::sync::broadcast::Receiver<NodeEvent>,
    ) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = Store::open(&dir.path().join("tern.redb"), Durability::NoSync).expect("store");
        let events = Events::default();
        let subscriber = events.subscribe();
        (
            Mailboxes::new(
                StoreQuota::new(store, crate::node::DEFAULT_MAX_STORE_BYTES),
                Faults::default(),
                events,
            ),
            dir,
            subscriber,
        )
    }

    /// The integer a `receive` answered with.
    fn int_of(answer: Resume) -> Option<i64> {
        let program = Program::compile("1", &Limits::default()).expect("compiles");
        match answer {
            Resume::Message(bytes) => agent_lang::decode_portable(&program, &bytes)
                .ok()
                .and_then(|v| v.as_int().ok()),
            _ => None,
        }
    }

    /// The host of the tests' agent, `agent-1` on the one node `n`.
    fn test_env() -> agent_lang::HostEnv {
        agent_lang::HostEnv {
            resources: agent_lang::no_resources(),
            here: "n".into(),
            home: "n".into(),
            nodes: vec!["n".into()],
            agent_id: "agent-1".into(),
            hops: 0,
            printer: Arc::new(|_: &str| {}),
        }
    }

    /// An agent stopped at `receive(..)`, stored as a resident agent.
    fn agent_at_receive(
        mailboxes: &Mailboxes,
        source: &str,
    ) -> (AgentRecord, Execution, Option<u64>) {
        let program = Program::compile(source, &Limits::default()).expect("test agent compiles");
        let mut exec = Execution::new(&program);
        let env = test_env();
        let Outcome::Receive { timeout_ms } = exec.resume(&env, Resume::Start) else {
            panic!("the test agent stops at receive");
        };
        let rec = AgentRecord::from_parts(
            AgentMeta {
                id: "agent-1".into(),
                package: [0; 32],
                hop: 0,
                hops: 0,
                operations: 0,
                sent: Default::default(),
                home: "home".into(),
                launcher: None,
                state: AgentState::Ready,
                envelope: Vec::new(),
                handover: None,
                tail: Vec::new(),
                nonce: [0; 16],
                certificate: Vec::new(),
            },
            Vec::new(),
        );
        let stored = rec.clone();
        mailboxes
            .store
            .batch(|b| b.put_agent(&stored))
            .expect("agent stored");
        (rec, exec, timeout_ms)
    }

    fn queue(mailboxes: &Mailboxes, value: i64) {
        let message = agent_lang::encode_portable(&Dynamic::from(value)).expect("portable");
        mailboxes
            .store
            .batch(|b| b.push_message("agent-1", &message).map(drop))
            .expect("message queued");
    }

    fn stored_state(mailboxes: &Mailboxes) -> AgentState {
        match mailboxes.store.agent_meta("agent-1") {
            Ok(Some(meta)) => meta.state,
            other => panic!("agent-1 is not stored: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_queued_message_is_taken_with_the_checkpoint_that_answers_it() {
        let (mailboxes, _dir, mut events) = mailboxes();
        let (mut rec, exec, timeout) = agent_at_receive(&mailboxes, "receive()");
        queue(&mailboxes, 7);
        let got = mailboxes.receive(&mut rec, &mut 0, &exec, timeout).await;
        assert_eq!(int_of(got), Some(7));
        assert_eq!(mailboxes.store.message_count("agent-1").ok(), Some(0));
        assert!(matches!(
            stored_state(&mailboxes),
            AgentState::Answered { .. }
        ));
        assert!(matches!(rec.state, AgentState::Answered { .. }));
        assert_eq!(
            events.try_recv(),
            Ok(NodeEvent::MessageDelivered {
                agent: "agent-1".into()
            })
        );
    }

    #[tokio::test]
    async fn a_waiting_agent_is_stored_waiting_and_woken_by_a_delivery() {
        let (mailboxes, _dir, mut events) = mailboxes();
        let mailboxes = Arc::new(mailboxes);
        let (mut rec, exec, timeout) = agent_at_receive(&mailboxes, "receive()");
        let waiting = tokio::spawn({
            let mailboxes = mailboxes.clone();
            async move { int_of(mailboxes.receive(&mut rec, &mut 0, &exec, timeout).await) }
        });
        while !matches!(
            stored_state(&mailboxes),
            AgentState::Waiting {
                timeout_at_ms: None
            }
        ) {
            tokio::task::yield_now().await;
        }
        queue(&mailboxes, 42);
        mailboxes.wake(Wake::agent("agent-1"));
        assert_eq!(waiting.await.ok(), Some(Some(42)));
        assert_eq!(
            events.try_recv(),
            Ok(NodeEvent::MessageQueued {
                agent: "agent-1".into()
            })
        );
    }

    #[tokio::test]
    async fn a_wake_that_comes_before_the_wait_is_not_lost() {
        let (mailboxes, _dir, _events) = mailboxes();
        let (mut rec, exec, timeout) = agent_at_receive(&mailboxes, "receive()");
        // Queued and woken before `receive` ever looked: it finds the message at once.
        queue(&mailboxes, 1);
        mailboxes.wake(Wake::agent("agent-1"));
        let got = mailboxes.receive(&mut rec, &mut 0, &exec, timeout).await;
        assert_eq!(int_of(got), Some(1));
    }

    /// The table of agents in `receive` keeps no entry for an agent that is not waiting: a
    /// wake for one adds none, and one that waited is forgotten once it left or ended, unless
    /// it waits here again.
    #[tokio::test]
    async fn only_agents_in_receive_have_an_entry() {
        let (mailboxes, _dir, _events) = mailboxes();
        mailboxes.wake(Wake::agent("agent-elsewhere"));
        assert!(lock(&mailboxes.waiting).is_empty());
        let (mut rec, exec, timeout) = agent_at_receive(&mailboxes, "receive()");
        queue(&mailboxes, 3);
        let got = mailboxes.receive(&mut rec, &mut 0, &exec, timeout).await;
        assert_eq!(int_of(got), Some(3));
        assert_eq!(lock(&mailboxes.waiting).len(), 1);
        let held = mailboxes.notify_of("agent-1");
        mailboxes.forget("agent-1");
        assert_eq!(
            lock(&mailboxes.waiting).len(),
            1,
            "a receive still holds it"
        );
        drop(held);
        mailboxes.forget("agent-1");
        assert!(lock(&mailboxes.waiting).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_answers_unit_and_the_checkpoint_says_so() {
        let (mailboxes, _dir, mut events) = mailboxes();
        let (mut rec, exec, timeout) = agent_at_receive(&mailboxes, "receive(5000)");
        assert_eq!(timeout, Some(5000));
        let got = mailboxes.receive(&mut rec, &mut 0, &exec, timeout).await;
        assert!(matches!(got, Resume::Value(v) if v.is_unit()));
        let unit = agent_lang::encode_portable(&Dynamic::UNIT).expect("portable");
        assert_eq!(
            stored_state(&mailboxes),
            AgentState::Answered { value: unit }
        );
        assert_eq!(events.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn a_message_that_does_not_decode_is_an_error_for_the_agent_only() {
        let (mailboxes, _dir, _events) = mailboxes();
        let (mut rec, exec, timeout) = agent_at_receive(&mailboxes, "receive()");
        mailboxes
            .store
            .batch(|b| b.push_message("agent-1", b"\xff\x00 not a value").map(drop))
            .expect("message queued");
        let got = mailboxes.receive(&mut rec, &mut 0, &exec, timeout).await;
        assert_eq!(mailboxes.store.message_count("agent-1").ok(), Some(0));
        // The agent decodes it in its slice, where it throws.
        let Resume::Message(bytes) = got else {
            panic!("{got:?}");
        };
        let env = test_env();
        let mut exec = exec;
        let Outcome::Failed(e) = exec.resume(&env, Resume::Message(bytes)) else {
            panic!("the agent fails");
        };
        assert!(e.message.contains("receive: bad message"), "{e}");
    }
}
