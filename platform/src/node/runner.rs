//! The agent runner: launches agents, runs a stored agent slice after slice until it leaves,
//! finishes or fails, and reports its end to its home node (which tells the launcher).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_lang::rhai::Dynamic;
use agent_lang::{Execution, HostEnv, Outcome, ResourceHost, Resume};
use libp2p::PeerId;
use security::{AgentId, CustodyPoint, LaunchNonce, VerifiedPackage};
use tokio::sync::oneshot;

use super::control::control_request;
use super::custody::custody_tail;
use super::events::NodeEvent;
use super::hop::{hop, release_large_checkpoint, HopResult};
use super::packages::Loaded;
use super::resource_protocol::NodeRemote;
use super::routing::route_message;
use super::{hex, lock, now_ms, Shared};
use crate::resources::{AgentOf, AgentResources};
use crate::store::{AgentMeta, AgentRecord, AgentState};
use crate::wire::{AgentEnd, ControlRefusal, ControlReply, ControlRequest, MessagesSent};

/// The agents running on this node, and the launchers waiting for the ends of the agents this
/// node is home to. `std` mutexes, each held for one set or map operation.
#[derive(Default)]
pub(super) struct Agents {
    /// Runner tasks on this node, by (agent, hop envelope number): an agent that comes back
    /// while the runner that sent it away is still finishing gets a runner of its own.
    running: Mutex<HashSet<(String, u64)>>,
    /// Launchers waiting for agents of this home node to end.
    launchers: Mutex<HashMap<String, Vec<oneshot::Sender<AgentEnd>>>>,
}

impl Shared {
    /// What the agent's host functions see of this node; `resources` is what its handles reach
    /// here ([`resources_of`]).
    fn env(&self, rec: &AgentRecord, resources: &Arc<dyn ResourceHost>) -> HostEnv {
        let node = self.peers.local_name().to_string();
        let agent = rec.id.clone();
        HostEnv {
            resources: resources.clone(),
            here: node.clone(),
            home: self.peers.name_of(&rec.home),
            nodes: self.peers.node_names(),
            agent_id: rec.id.clone(),
            hops: rec.hops as i64,
            printer: Arc::new(move |text: &str| {
                tracing::info!(target: "tern::agent", "[{node} {agent}] {text}");
                eprintln!("[{node} {agent}] {text}");
            }),
        }
    }
}

/// The resources agent `agent` of `loaded`'s package reaches from this node, by the bindings
/// its manifest declares and what this node grants its author (worked out when the agent first
/// uses a resource: most agents never do, and this is made at every arrival).
pub(super) fn resources_of(
    shared: &Arc<Shared>,
    loaded: &Arc<Loaded>,
    agent: &str,
) -> Arc<AgentResources> {
    let (node, loaded, agent) = (shared.clone(), loaded.clone(), agent.to_string());
    let of = move || {
        // (Admitted when it came: if the policy changed since, it reaches nothing.)
        let grants = node
            .trust
            .admit_package(&loaded.package)
            .map(|grant| grant.resources)
            .unwrap_or_default();
        AgentOf {
            agent,
            package: *loaded.package.hash().as_bytes(),
            bindings: loaded
                .package
                .manifest()
                .resources
                .iter()
                .map(|d| (d.name.clone(), d.policy))
                .collect(),
            grants,
            program: loaded.program.clone(),
        }
    };
    Arc::new(AgentResources::new(
        shared.peers.local_name().to_string(),
        shared.resources.clone(),
        shared.store.clone(),
        shared.quota.clone(),
        Box::new(of),
        Arc::new(NodeRemote {
            shared: shared.clone(),
            runtime: tokio::runtime::Handle::current(),
        }),
    ))
}

/// Launches a verified package here, with this node as the agent's home; `launcher` (a peer
/// id as text) is whoever waits for its end. The agent id, and where its end will come.
pub(super) fn launch(
    shared: &Arc<Shared>,
    package: VerifiedPackage,
    launcher: Option<String>,
) -> Result<(String, oneshot::Receiver<AgentEnd>), ControlRefusal> {
    shared
        .trust
        .admit_package(&package)
        .map_err(|e| ControlRefusal::UntrustedPackage(e.to_string()))?;
    shared
        .resources
        .check_bindings(&package.manifest().resources)
        .map_err(ControlRefusal::ImpossibleBinding)?;
    let resident = shared
        .store
        .agent_count()
        .map_err(|e| ControlRefusal::StoreUnreadable(e.to_string()))?;
    if resident >= shared.max_agents {
        return Err(ControlRefusal::NodeFull {
            max: shared.max_agents,
        });
    }
    let hash = package.hash();
    let bytes = package.to_bytes();
    shared.quota.room_for(bytes.len() as u64)?;
    shared
        .store
        .batch(|b| b.put_package(hash.as_bytes(), &bytes))
        .map_err(|e| ControlRefusal::Store(e.to_string()))?;
    shared
        .loaded(hash.as_bytes())
        .map_err(ControlRefusal::Package)?;
    let nonce = LaunchNonce::generate();
    let id = AgentId::launched(shared.peers.local_key(), &nonce).to_string();
    let (tx, rx) = oneshot::channel();
    lock(&shared.agents.launchers)
        .entry(id.clone())
        .or_default()
        .push(tx);
    let me = shared.peers.local_text().to_string();
    let rec = AgentRecord {
        meta: AgentMeta {
            id: id.clone(),
            package: *hash.as_bytes(),
            hop: 0,
            hops: 0,
            operations: 0,
            sent: MessagesSent::default(),
            home: me.clone(),
            launcher,
            state: AgentState::Ready,
            envelope: Vec::new(),
            handover: None,
            tail: Vec::new(),
            nonce: nonce.0,
            certificate: Vec::new(),
        },
        continuation: Vec::new(),
    };
    shared
        .store
        .batch(|b| {
            b.put_agent(&rec)?;
            b.set_custody(&id, &CustodyPoint::launched(*shared.peers.local_key()))?;
            b.set_location(&id, &me)
        })
        .map_err(|e| ControlRefusal::Store(e.to_string()))?;
    shared.events.emit(NodeEvent::AgentLaunched {
        agent: id.clone(),
        package: hex(hash.as_bytes()),
    });
    spawn_agent(shared, id.clone(), 0);
    Ok((id, rx))
}

/// Starts the runner task of a stored agent (once per arrival).
pub(super) fn spawn_agent(shared: &Arc<Shared>, id: String, hop: u64) {
    spawn_runner(shared, id, hop, None, None);
}

/// Starts the runner of a stored agent; `first` (if any) is what its pending primitive
/// returns; `state` (if any) is the agent as the hop that just stored it decoded it, which
/// spares reading it back.
pub(super) fn spawn_runner(
    shared: &Arc<Shared>,
    id: String,
    hop: u64,
    first: Option<Resume>,
    state: Option<Runnable>,
) {
    let key = (id, hop);
    if !lock(&shared.agents.running).insert(key.clone()) {
        return;
    }
    let runner = shared.clone();
    shared.tasks.spawn(async move {
        let state = match state {
            Some(state) => Some(state),
            None => load_runnable(&runner, &key.0, key.1).await,
        };
        if let Some(state) = state {
            runner.events.emit(NodeEvent::AgentResumed {
                agent: key.0.clone(),
                hop: key.1,
            });
            run_agent(&runner, state, first).await;
        }
        lock(&runner.agents.running).remove(&key);
    });
}

/// A stored agent, ready to run: its record, its program, and its execution if it is decoded
/// already (a hop decodes small continuations before storing them; large ones, and those read
/// back from the store, are decoded by their runner).
pub(super) struct Runnable {
    pub(super) rec: AgentRecord,
    pub(super) exec: Option<Execution>,
    pub(super) loaded: Arc<Loaded>,
}

/// Reads the agent stored for this arrival; None if it is gone (or was replaced by a later
/// arrival). An agent whose package cannot be loaded ends with a node failure.
async fn load_runnable(shared: &Arc<Shared>, id: &str, arrival: u64) -> Option<Runnable> {
    let rec = match shared.store.agent(id) {
        // (An agent stored as arriving runs once its hop committed.)
        Ok(Some(AgentRecord {
            meta:
                AgentMeta {
                    state: AgentState::Arriving { .. },
                    ..
                },
            ..
        })) => return None,
        Ok(Some(r)) if r.hop == arrival => r,
        Ok(_) => return None,
        Err(e) => {
            tracing::error!(agent = id, "cannot read agent: {e}");
            return None;
        }
    };
    let loaded = match shared.loaded(&rec.package) {
        Ok(l) => l,
        Err(e) => {
            finish(shared, &rec, node_failure(shared, e)).await;
            return None;
        }
    };
    Some(Runnable {
        rec,
        exec: None,
        loaded,
    })
}

/// An agent end for a failure of the node rather than of the script.
pub(super) fn node_failure(shared: &Shared, error: String) -> AgentEnd {
    AgentEnd::Failed {
        error,
        node: shared.peers.local_name().to_string(),
        position: None,
        unread: 0,
    }
}

/// Memory an agent held during a slice from which the slice's thread is replaced after it.
/// Such a slice may have dropped a value nested deep (40 bytes a level at least), touching up
/// to ~4 stack bytes a budget byte; the pages would stay with the thread (`bench_mesh hostile`:
/// about 200 MB after a million levels). A new thread costs tens of microseconds; a slice that
/// holds this much takes longer than that to encode at its next hop.
const RETIRE_THREAD_FROM: u64 = 16 << 20;

/// What a slice gives back to its runner: the agent suspended, with what it asks for, or its
/// end. An agent that ends is taken apart on the slice's thread (its result turned into JSON,
/// its values dropped), whose stack fits the deepest value its memory budget admits.
enum Slice {
    Suspended(Execution, Outcome),
    /// The result as JSON, or why it has none.
    Finished(Result<String, String>),
    Failed(agent_lang::AgentError),
}

impl Slice {
    fn ended(exec: Execution, outcome: Outcome) -> Slice {
        match outcome {
            Outcome::Finished(value) => {
                drop(exec);
                let json = agent_lang::to_json(&value)
                    .map(|json| json.to_string())
                    .map_err(|e| e.to_string());
                drop(value);
                Slice::Finished(json)
            }
            Outcome::Failed(error) => Slice::Failed(error),
            other => Slice::Suspended(exec, other),
        }
    }
}

/// Runs a stored agent until it leaves, finishes or fails. `first` is what its pending
/// primitive returns (a recovered, interrupted hop); otherwise a waiting agent goes back to
/// waiting and any other resumes with `()`.
async fn run_agent(shared: &Arc<Shared>, state: Runnable, first: Option<Resume>) {
    let Runnable {
        mut rec,
        exec,
        loaded,
    } = state;
    let decoded = match exec {
        Some(exec) => Ok(exec),
        None if rec.continuation.is_empty() => Ok(Execution::new(&loaded.program)),
        None => Execution::decode(&loaded.program, &rec.continuation),
    };
    let mut exec = match decoded {
        Ok(exec) => exec,
        Err(e) => {
            let failure = node_failure(shared, format!("stored continuation: {e}"));
            return finish(shared, &rec, failure).await;
        }
    };
    let mut stored_checkpoint = release_large_checkpoint(&mut rec);
    let mut input = match (first, &rec.state) {
        (Some(input), _) => input,
        (None, AgentState::Waiting { timeout_at_ms }) => {
            let left = timeout_at_ms.map(|t| t.saturating_sub(now_ms()));
            let mailboxes = &shared.mailboxes;
            mailboxes
                .receive(&mut rec, &mut stored_checkpoint, &exec, left)
                .await
        }
        (None, AgentState::Answered { value }) => Resume::Message(value.clone()),
        (None, _) => Resume::Start,
    };
    let budget = exec.program().limits().max_total_operations;
    let resources: Arc<dyn ResourceHost> = resources_of(shared, &loaded, &rec.id);
    loop {
        let env = shared.env(&rec, &resources);
        let left = budget.saturating_sub(rec.operations);
        let stack = exec.program().limits().slice_stack_bytes();
        let slice = crate::slices::run(stack, move || {
            let outcome = exec.resume_within(&env, input, left);
            if exec.slice_peak_memory() >= RETIRE_THREAD_FROM {
                crate::slices::retire_this_thread();
            }
            Slice::ended(exec, outcome)
        })
        .await;
        let outcome = match slice {
            Ok(Slice::Suspended(e, outcome)) => {
                exec = e;
                rec.operations = rec.operations.saturating_add(exec.slice_operations());
                outcome
            }
            Ok(Slice::Finished(json)) => {
                let end = match json {
                    Ok(json) => AgentEnd::Finished {
                        json,
                        node: shared.peers.local_name().to_string(),
                        hops: rec.hops,
                        unread: 0,
                    },
                    Err(e) => node_failure(shared, format!("the result cannot be returned: {e}")),
                };
                return finish(shared, &rec, end).await;
            }
            Ok(Slice::Failed(mut err)) => {
                if err.kind == agent_lang::AgentErrorKind::OperationBudget {
                    err.message = format!("{} (this node allows {budget} in all)", err.message);
                }
                return finish(shared, &rec, failed_end(shared.peers.local_name(), err)).await;
            }
            Err(join) => {
                return finish(
                    shared,
                    &rec,
                    node_failure(shared, format!("agent slice crashed: {join}")),
                )
                .await
            }
        };
        match outcome {
            // The hop, a send and the end are boxed: an `.await`ed future is laid out inside
            // this one, so the largest (the hop's, 4.3 KiB) would be paid by every agent that
            // waits in `receive` (its runner task takes under 3 KiB rather than 6).
            Outcome::Migrate { to } => {
                let hop = hop(shared, &mut rec, stored_checkpoint, &exec, &loaded, &to);
                match Box::pin(hop).await {
                    Ok(HopResult::Left) => return,
                    Ok(HopResult::Stayed) => input = Resume::Start,
                    Err(message) => input = Resume::Error(message),
                }
            }
            Outcome::Receive { timeout_ms } => {
                input = shared
                    .mailboxes
                    .receive(&mut rec, &mut stored_checkpoint, &exec, timeout_ms)
                    .await;
            }
            Outcome::Send { to, message } => {
                if let Some(over) = count_sent(&mut rec.sent, &message, exec.program().limits()) {
                    return finish(shared, &rec, failed_end(shared.peers.local_name(), over)).await;
                }
                input = match Box::pin(route_message(shared, &to, message)).await {
                    Ok(()) => Resume::Value(Dynamic::UNIT),
                    Err(e) => Resume::Error(format!("send: {e}")),
                }
            }
            _ => return finish(shared, &rec, node_failure(shared, "unknown outcome".into())).await,
        }
    }
}

/// The agent ended here: drop it, keep the result, tell its home (which tells the launcher).
/// Boxed, so that the runners awaiting it do not hold room for it while they wait.
pub(super) async fn finish(shared: &Arc<Shared>, rec: &AgentRecord, end: AgentEnd) {
    Box::pin(end_here(shared, rec, end)).await
}

/// [`finish`], unboxed.
async fn end_here(shared: &Arc<Shared>, rec: &AgentRecord, end: AgentEnd) {
    // Messages still queued were delivered and never received: the end says how many (taken in
    // the transaction that deletes the agent, so a message is either counted here or refused
    // to its sender as sent to a finished agent).
    let id = rec.id.clone();
    let stored = shared
        .store
        .write(move |b| {
            let unread = b.take_messages(&id)?.len() as u64;
            let end = end.with_unread(unread);
            b.delete_agent(&id)?;
            b.drop_cached_chunks(&id)?;
            b.release_moved(&id)?;
            b.put_result(&id, &ciborium_bytes(&end))?;
            Ok(end)
        })
        .await;
    // Not stored, the end did not happen as far as the mesh can know: the agent stays as it
    // was last stored and runs again from there after a restart, so reporting this end would
    // make it end twice. (A store that failed stops the node.)
    let end = match stored {
        Ok(end) => end,
        Err(e) => {
            tracing::error!(agent = %rec.id, "the agent's end could not be stored, so it is not reported: {e}; the agent stays as it was last stored");
            return;
        }
    };
    shared.mailboxes.forget(&rec.id);
    shared.events.emit(NodeEvent::AgentEnded {
        agent: rec.id.clone(),
        end: end.clone(),
    });
    if end.unread() > 0 {
        let unread = end.unread();
        tracing::warn!(agent = %rec.id, "the agent ended with {unread} unread message(s)");
    }
    if rec.home == shared.peers.local_text() {
        deliver_end(shared, &rec.id, end);
        return;
    }
    let Ok(home) = rec.home.parse::<PeerId>() else {
        return;
    };
    // The home may be briefly unreachable: retry for a while; the result stays stored here.
    let report = ControlRequest::Ended {
        agent: rec.id.clone(),
        end,
        custody: custody_tail(shared, rec).await,
    };
    for attempt in 0..20u64 {
        match control_request(shared, home, &report).await {
            // Refused for what the report is: final. (A busy or failing home is asked again.)
            Ok(ControlReply::Refused(
                refusal @ (ControlRefusal::NoCustody { .. } | ControlRefusal::Superseded { .. }),
            )) => {
                tracing::error!(agent = %rec.id, "the home node refused the agent's end (its result stays here): {refusal}");
                return;
            }
            Ok(ControlReply::Refused(refusal)) => {
                tracing::warn!(agent = %rec.id, "the home node did not take the agent's end (attempt {attempt}): {refusal}");
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(agent = %rec.id, "cannot report the end to the home node (attempt {attempt}): {e}");
                tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
            }
        }
    }
}

/// Counts a message the agent is sending against its lifetime message budgets: the error
/// that ends it when this one is over either. (Counted whether or not it is then delivered:
/// the budget bounds what the agent makes nodes do.)
fn count_sent(
    sent: &mut MessagesSent,
    message: &[u8],
    limits: &agent_lang::Limits,
) -> Option<agent_lang::AgentError> {
    sent.count = sent.count.saturating_add(1);
    sent.bytes = sent.bytes.saturating_add(message.len() as u64);
    let message = if sent.count > limits.max_messages_sent {
        format!(
            "message budget: the agent sent {} messages, more than its budget of {} messages in all",
            sent.count, limits.max_messages_sent
        )
    } else if sent.bytes > limits.max_message_bytes_sent {
        format!(
            "message budget: the agent sent {} bytes of messages, more than its budget of {} bytes in all",
            sent.bytes, limits.max_message_bytes_sent
        )
    } else {
        return None;
    };
    Some(agent_lang::AgentError {
        kind: agent_lang::AgentErrorKind::MessageBudget,
        message,
        position: None,
    })
}

/// The end of an agent whose script failed here.
fn failed_end(node: &str, err: agent_lang::AgentError) -> AgentEnd {
    AgentEnd::Failed {
        error: err.message,
        node: node.to_string(),
        position: err.position.map(|(l, c)| (l as u64, c as u64)),
        unread: 0,
    }
}

/// CBOR of a value whose encoding cannot fail (a wire type held in memory).
pub(super) fn ciborium_bytes<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = ciborium::into_writer(v, &mut out);
    out
}

/// An agent of this home node ended (here or elsewhere): keep its end for `tern result`, and
/// tell whoever waits for it.
pub(super) fn deliver_end(shared: &Shared, agent: &str, end: AgentEnd) {
    let _ = shared
        .store
        .batch(|b| b.put_result(agent, &ciborium_bytes(&end)));
    if let Some(waiters) = lock(&shared.agents.launchers).remove(agent) {
        for w in waiters {
            let _ = w.send(end.clone());
        }
    }
}
