//! The resources of one agent on this node: the [`ResourceHost`] its slices run with. It turns
//! `resource(name)`, `resource(name, node)` and the handles' method calls into reads and writes
//! of resources, by the binding policy the agent's package declares for each name:
//!
//! - **rebind**: at every node, a handle reaches that node's resource of the same name and type
//!   (a node without one makes the call throw, naming the node and the resource);
//! - **remote**: a handle stays bound to the node it was bound at; from any other node its
//!   calls are requests to that node ([`RemoteResources`], the node's resource protocol), which
//!   serves them as it would its own agents' ([`AgentResources::serve`]), by its own policy.
//!
//! - **copy**: `resource(name)` takes a copy of this node's resource into the handle (a
//!   dataset's files, a table's entries as one snapshot, a value), which answers the handle's
//!   calls from then on, wherever the agent is (`agent_lang::Copied`); only a resource whose
//!   mobility admits it (free or fixed-transferable) is copied.
//!
//! - **copy-on-reference**: bound as `remote` is, but from any other node its reads go through
//!   the chunks it keeps there (`copy_on_reference`), so each part is asked of the owner once
//!   per node; only datasets and values, whose mobility admits a copy.
//!
//! - **move**: `resource(name)` makes the agent hold this node's resource `name`: from then on
//!   it is the agent's alone here, and it moves with the agent at each hop, in the hop's own
//!   transactions (`store::moved_resources`), so the handle reaches it wherever the agent is. (A
//!   dataset's files are copied into the store, up to what a hop moves: the operator's files
//!   stay, unread by agents from then on.)
//!
//! The same type answers both sides of a remote call: the agent's node builds one for the agent,
//! and the owner builds one for the agent's package to serve its requests, so a resource is
//! checked (declared, granted, present, of the type asked) by the same code wherever it is used.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use agent_lang::rhai::{Array, Blob, Dynamic, ImmutableString, Map};
use agent_lang::{
    Copied, CopiedDataset, Program, Resource, ResourceCall, ResourceError, ResourceHost,
    ResourceKind, MAX_TABLE_KEY, MAX_TABLE_VALUE,
};
use security::{Access, ResourceGrants, ResourcePolicy};
use serde_bytes::ByteBuf;

use super::copy_on_reference::ChunkCache;
use super::{Backing, Mobility, NodeResource, NodeResources};
use crate::node::StoreQuota;
use crate::store::{HeldResource, ResourceContents, ResourcePlace, Store, StoreError};
use crate::wire::{
    ResourceOp, ResourceReply, ResourceRequest, MAX_MOVED_BYTES, MAX_MOVED_RESOURCES, RESOURCE_PAGE,
};

/// How a node sends its agents' requests to the nodes that own their remote resources.
pub(crate) trait RemoteResources: Send + Sync {
    /// Sends `request` to node `owner` and waits for the reply, blocking the calling thread (a
    /// slice's), at most for the protocol's deadline.
    ///
    /// # Errors
    ///
    /// The owner is unknown or unreachable, or did not answer in time: the text thrown.
    fn request(&self, owner: &str, request: &ResourceRequest) -> Result<ResourceReply, String>;
}

/// One agent's view of the resources it reaches from this node.
pub(crate) struct AgentResources {
    /// This node's name.
    here: String,
    resources: NodeResources,
    store: Store,
    quota: StoreQuota,
    /// The agent, worked out on first use.
    of: LazyLock<AgentOf, Box<dyn FnOnce() -> AgentOf + Send>>,
    remote: Arc<dyn RemoteResources>,
}

/// Who a result is built for: the agent itself (its memory budget bounds it; going over ends
/// it), or a remote agent's request (a page of at most [`RESOURCE_PAGE`] bytes; the rest is
/// asked for in turn).
#[derive(Clone, Copy)]
enum Budget {
    Agent,
    Page,
}

/// A result, and whether it is whole (a page of lines or bytes may not be).
struct Served {
    value: Dynamic,
    done: bool,
}

impl Served {
    fn whole(value: Dynamic) -> Result<Served, ResourceError> {
        Ok(Served { value, done: true })
    }
}

/// A table that came to this node with an agent and is not in its configuration: free, as it
/// was to be moved at all.
static MOVED_IN: LazyLock<NodeResource> = LazyLock::new(|| NodeResource {
    mobility: Mobility::Free,
    backing: Backing::Table,
});

/// A resource of this node as [`AgentResources::local`] finds it: of the configuration (or a
/// table that moved here), or a value or a dataset bound by move, read from the store.
enum Local<'r> {
    Configured(&'r NodeResource),
    Moved(NodeResource),
}

impl std::ops::Deref for Local<'_> {
    type Target = NodeResource;

    fn deref(&self) -> &NodeResource {
        match self {
            Local::Configured(resource) => resource,
            Local::Moved(resource) => resource,
        }
    }
}

/// What resources an agent reaches depend on.
pub(crate) struct AgentOf {
    /// The agent's id, which its remote requests name.
    pub(crate) agent: String,
    /// Its package, which its remote requests name.
    pub(crate) package: [u8; 32],
    /// Its bindings, from its package's manifest.
    pub(crate) bindings: HashMap<String, ResourcePolicy>,
    /// What this node grants its author (`[trust]`).
    pub(crate) grants: ResourceGrants,
    /// Decodes the values it reads.
    pub(crate) program: Program,
}

impl AgentResources {
    pub(crate) fn new(
        here: String,
        resources: NodeResources,
        store: Store,
        quota: StoreQuota,
        of: Box<dyn FnOnce() -> AgentOf + Send>,
        remote: Arc<dyn RemoteResources>,
    ) -> AgentResources {
        AgentResources {
            here,
            resources,
            store,
            quota,
            of: LazyLock::new(of),
            remote,
        }
    }

    /// Whether the agent may use resource `name` as `needed` here.
    fn allowed(&self, what: &str, name: &str, needed: Access) -> Result<(), String> {
        match self.of.grants.access(name) {
            Some(granted) if granted >= needed => Ok(()),
            Some(granted) => Err(format!(
                "{what}: node '{}' grants the agent's author {granted} access only to resource \
                 '{name}'",
                self.here
            )),
            None => Err(format!(
                "{what}: node '{}' grants the agent's author no access to resource '{name}' \
                 ([trust] authors: resources)",
                self.here
            )),
        }
    }

    /// The policy the package declares for `name`.
    fn policy(&self, what: &str, name: &str) -> Result<ResourcePolicy, String> {
        self.of.bindings.get(name).copied().ok_or_else(|| {
            format!(
                "{what}: the agent's package declares no resource '{name}' (declare its binding: \
                 tern pack --resource {name}=rebind, or =remote, =copy, \
                 =copy-on-reference, =move)"
            )
        })
    }

    /// The resource of this node named `name`, as the agent may use it now: one that moves
    /// with agents is here only while its place says so (`store::ResourcePlace`), and only for
    /// the agent that holds it, if one does.
    fn local(&self, what: &str, name: &str) -> Result<Local<'_>, String> {
        let here = &self.here;
        let configured = self.resources.get(name);
        let place = self
            .store
            .resource_place(name)
            .map_err(|e| format!("{what}: {e}"))?;
        match place {
            None => configured
                .map(Local::Configured)
                .ok_or_else(|| format!("{what}: node '{here}' has no resource '{name}'")),
            Some(ResourcePlace::Here { holder }) => match holder {
                Some(holder) if holder != self.of.agent => Err(format!(
                    "{what}: resource '{name}' at node '{here}' is held by agent {holder}, which \
                     takes it along when it leaves (a move binding)"
                )),
                _ => self
                    .moved_here(name, configured)
                    .map_err(|e| format!("{what}: {e}")),
            },
            Some(ResourcePlace::Arriving { .. }) => Err(format!(
                "{what}: resource '{name}' is arriving at node '{here}' with an agent, whose hop \
                 has not completed"
            )),
            Some(ResourcePlace::Gone { .. }) => Err(format!(
                "{what}: resource '{name}' left node '{here}' with an agent that holds it (a \
                 move binding)"
            )),
        }
    }

    /// Resource `name`, bound by move and here: a value or a dataset is in the store (copied
    /// there when first held, or come with an agent); a table's entries always are. (What came
    /// may be of another type than what the configuration names, which left.)
    fn moved_here<'r>(
        &'r self,
        name: &str,
        configured: Option<&'r NodeResource>,
    ) -> Result<Local<'r>, StoreError> {
        let moved = |backing| {
            Local::Moved(NodeResource {
                mobility: Mobility::Free,
                backing,
            })
        };
        Ok(match self.store.held_as(name)? {
            HeldResource::Value(value) => moved(Backing::Value(value)),
            HeldResource::Dataset(record) => moved(Backing::Dataset(
                self.resources
                    .moved_datasets
                    .open(&self.store, name, &record),
            )),
            HeldResource::Table => Local::Configured(
                configured
                    .filter(|r| r.kind() == ResourceKind::Table)
                    .unwrap_or(&MOVED_IN),
            ),
        })
    }

    fn decode(&self, what: &str, bytes: &[u8]) -> Result<Dynamic, String> {
        agent_lang::decode_portable(&self.of.program, bytes)
            .map_err(|e| format!("{what}: the value cannot be read by this agent: {e}"))
    }

    /// A handle on this node's resource `name`, checked as a bind is.
    fn bind_here(&self, name: &str) -> Result<Resource, String> {
        self.allowed("resource", name, Access::Read)?;
        let local = self.local("resource", name)?;
        Ok(Resource {
            name: name.into(),
            kind: local.kind(),
            bound_at: self.here.as_str().into(),
            copy: None,
        })
    }

    /// For a request from another node: a resource held by an agent (a move binding) is that
    /// agent's alone, and the request cannot prove it comes from that agent.
    fn not_held(&self, what: &str, name: &str) -> Result<(), String> {
        match self.store.resource_place(name) {
            Ok(Some(ResourcePlace::Here { holder: Some(_) })) => Err(format!(
                "{what}: resource '{name}' at node '{}' is held by an agent (a move binding), \
                 and is not served to other nodes",
                self.here
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }

    /// A handle on this node's resource `name` for copy-on-reference, if it may be copied so.
    fn bind_by_reference(&self, what: &str, name: &str) -> Result<Resource, String> {
        let handle = self.bind_here(name)?;
        let local = self.local(what, name)?;
        let refused = |why: String| {
            format!(
                "{what}: '{name}' at node '{}' cannot be copied on reference: {why}",
                self.here
            )
        };
        if local.kind() == ResourceKind::Table {
            return Err(refused(
                "it is a table, which changes, and chunks kept of it would go stale (use copy \
                 or remote)"
                    .into(),
            ));
        }
        ResourcePolicy::CopyOnReference
            .admits(local.mobility)
            .map_err(refused)?;
        Ok(handle)
    }

    /// A handle on this node's resource `name`, which the agent holds from now on: it leaves
    /// with the agent, in the transactions of its hops (`store::moved_resources`).
    fn hold_here(&self, name: &str) -> Result<Resource, String> {
        let what = "resource";
        self.allowed(what, name, Access::ReadWrite)?;
        let handle = self.bind_here(name)?;
        let local = self.local(what, name)?;
        let refused = |why: String| {
            format!(
                "{what}: '{name}' at node '{}' cannot be moved: {why}",
                self.here
            )
        };
        ResourcePolicy::Move
            .admits(local.mobility)
            .map_err(refused)?;
        let held = self
            .store
            .resource_places()
            .map_err(|e| refused(e.to_string()))?
            .into_iter()
            .filter(|(other, place)| {
                other != name
                    && matches!(place, ResourcePlace::Here { holder: Some(h) } if *h == self.of.agent)
            })
            .count();
        if held >= MAX_MOVED_RESOURCES {
            return Err(refused(format!(
                "the agent holds {held} resources already, and at most {MAX_MOVED_RESOURCES} \
                 move with one hop"
            )));
        }
        // What of the configuration's resource goes to the store, to leave from there (if it
        // never moved: otherwise it is there already).
        let configured = match (&local, &local.backing) {
            (Local::Moved(_), _) | (_, Backing::Table) => None,
            (_, Backing::Value(value)) => Some(ResourceContents::Value(value.clone())),
            (_, Backing::Dataset(data)) => {
                if data.size() > MAX_MOVED_BYTES as u64 {
                    return Err(refused(format!(
                        "it is a dataset of {} bytes, more than the {MAX_MOVED_BYTES} that move \
                         with one hop (use remote or copy-on-reference)",
                        data.size()
                    )));
                }
                self.quota
                    .room_for(data.size())
                    .map_err(|full| refused(crate::wire::ControlRefusal::from(full).to_string()))?;
                let files = data.read_files().map_err(|e| refused(e.to_string()))?;
                Some(ResourceContents::Dataset(files))
            }
        };
        match self
            .store
            .batch(|b| b.hold_resource(name, &self.of.agent, configured.as_ref()))
        {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(_)) => Err(refused("another agent took it meanwhile".into())),
            Err(e) => Err(refused(e.to_string())),
        }
    }

    /// A handle on this node's resource `name` that carries a copy of it.
    fn copy_here(&self, name: &str) -> Result<Resource, ResourceError> {
        let what = "resource";
        let mut handle = self.bind_here(name)?;
        let local = self.local(what, name)?;
        ResourcePolicy::Copy.admits(local.mobility).map_err(|why| {
            format!(
                "{what}: '{name}' at node '{}' cannot be copied: {why}",
                self.here
            )
        })?;
        let failed = |e: &dyn std::fmt::Display| ResourceError::Failed(format!("{what}: {e}"));
        let admit = |bytes: u64| {
            if agent_lang::memory_admits(bytes) {
                Ok(())
            } else {
                Err(ResourceError::OverMemory { bytes })
            }
        };
        let copy = match &local.backing {
            Backing::Dataset(data) => {
                admit(data.size())?;
                Copied::Dataset(CopiedDataset::new(
                    data.read_files().map_err(|e| failed(&e))?,
                ))
            }
            Backing::Table => {
                let mut entries = Map::new();
                let mut refused = Ok(());
                self.store
                    .table_each(name, |key, value| {
                        refused = admit((key.len() + value.len()) as u64 + 64)
                            .and_then(|()| Ok(self.decode(what, value)?))
                            .map(|value| drop(entries.insert(key.into(), value)));
                        refused.is_ok()
                    })
                    .map_err(|e| failed(&e))?;
                refused?;
                Copied::Table(entries)
            }
            Backing::Value(bytes) => Copied::Value(self.decode(what, bytes)?),
        };
        handle.copy = Some(Arc::new(copy));
        Ok(handle)
    }

    /// Runs `op` on this node's resource `name` (of type `kind`), for the agent or for a page.
    fn run_here(
        &self,
        name: &str,
        kind: ResourceKind,
        op: ResourceOp,
        budget: Budget,
    ) -> Result<Served, ResourceError> {
        let what = method(&op);
        let needed = match op {
            ResourceOp::Set { .. } | ResourceOp::Remove { .. } => Access::ReadWrite,
            _ => Access::Read,
        };
        self.allowed(what, name, needed)?;
        let local = self.local(what, name)?;
        if local.kind() != kind {
            return Err(format!(
                "{what}: resource '{name}' at node '{}' is a {}, not a {kind}",
                self.here,
                local.kind()
            )
            .into());
        }
        let failed = |e: &dyn std::fmt::Display| ResourceError::Failed(format!("{what}: {e}"));
        match (&local.backing, op) {
            (_, ResourceOp::Describe) => {
                Served::whole(Dynamic::from(ImmutableString::from(local.kind().as_str())))
            }
            (Backing::Dataset(data), ResourceOp::Size) => {
                Served::whole(Dynamic::from_int(data.size() as i64))
            }
            (Backing::Dataset(data), ResourceOp::LineCount) => Served::whole(Dynamic::from_int(
                data.line_count().map_err(|e| failed(&e))? as i64,
            )),
            (Backing::Dataset(data), ResourceOp::Lines { start, count }) => {
                let max_line = self.of.program.limits().max_string_size;
                let mut page = RESOURCE_PAGE as u64;
                let admits = |bytes: u64| match budget {
                    Budget::Agent => agent_lang::memory_admits(bytes),
                    Budget::Page => {
                        let fits = bytes <= page;
                        page = page.saturating_sub(bytes);
                        fits
                    }
                };
                let read = data
                    .lines(start, count, max_line, admits)
                    .map_err(|e| failed(&e))?;
                match (read.refused, budget) {
                    (Some(bytes), Budget::Agent) => Err(ResourceError::OverMemory { bytes }),
                    (Some(_), Budget::Page) if read.lines.is_empty() => Err(format!(
                        "{what}: line {start} does not fit in one reply of {RESOURCE_PAGE} bytes"
                    )
                    .into()),
                    (refused, _) => Ok(Served {
                        done: refused.is_none(),
                        value: text_array(read.lines),
                    }),
                }
            }
            (Backing::Dataset(data), ResourceOp::Read { offset, len }) => {
                let (len, done) = match budget {
                    Budget::Agent => (len, true),
                    Budget::Page => {
                        let page = len.min(RESOURCE_PAGE as u64);
                        (page, page == len)
                    }
                };
                let bytes = data.read(offset, len).map_err(|e| failed(&e))?;
                let done = done || (bytes.len() as u64) < len;
                Ok(Served {
                    value: Dynamic::from_blob(bytes),
                    done,
                })
            }
            (Backing::Table, ResourceOp::Get { key }) => {
                match self.store.table_get(name, &key).map_err(|e| failed(&e))? {
                    Some(bytes) => Served::whole(self.decode(what, &bytes)?),
                    None => Served::whole(Dynamic::UNIT),
                }
            }
            (Backing::Table, ResourceOp::Set { key, value }) => {
                agent_lang::check_table_key(what, &key)?;
                if value.len() > MAX_TABLE_VALUE {
                    return Err(format!(
                        "{what}: a table value is at most {MAX_TABLE_VALUE} bytes encoded, this \
                         one is {}",
                        value.len()
                    )
                    .into());
                }
                // (Checked as a message is: a value this agent's program could not read back,
                // or that is not a portable value at all, is not stored.)
                agent_lang::check_portable(&self.of.program, &value).map_err(|e| failed(&e))?;
                self.quota
                    .room_for((key.len() + value.len()) as u64)
                    .map_err(|full| failed(&crate::wire::ControlRefusal::from(full)))?;
                let agent = &self.of.agent;
                let written = self
                    .store
                    .batch(|b| {
                        // (Checked again where it is written: the table may have been taken
                        // by an agent holding it since `local` looked.)
                        if !b.table_usable_by(name, agent)? {
                            return Ok(false);
                        }
                        b.table_set(name, &key, &value).map(|()| true)
                    })
                    .map_err(|e| failed(&e))?;
                if !written {
                    self.local(what, name)?;
                    return Err(failed(&"the table was taken meanwhile"));
                }
                Served::whole(Dynamic::UNIT)
            }
            (Backing::Table, ResourceOp::Remove { key }) => {
                agent_lang::check_table_key(what, &key)?;
                let agent = &self.of.agent;
                let removed = self
                    .store
                    .batch(|b| {
                        if !b.table_usable_by(name, agent)? {
                            return Ok(Err(()));
                        }
                        b.table_remove(name, &key).map(Ok)
                    })
                    .map_err(|e| failed(&e))?;
                match removed {
                    Ok(Some(bytes)) => Served::whole(self.decode(what, &bytes)?),
                    Ok(None) => Served::whole(Dynamic::UNIT),
                    Err(()) => {
                        self.local(what, name)?;
                        Err(failed(&"the table was taken meanwhile"))
                    }
                }
            }
            (Backing::Table, ResourceOp::Len) => Served::whole(Dynamic::from_int(
                self.store.table_len(name).map_err(|e| failed(&e))? as i64,
            )),
            (Backing::Table, ResourceOp::Keys { start, count }) => {
                // Keys are at most 1 KiB each: a page holds 4,096, and the agent's budget is
                // asked once for all it asked for.
                let most = count.min(self.store.table_len(name).map_err(|e| failed(&e))?);
                let (most, done) = match budget {
                    Budget::Agent => {
                        let bytes = most.saturating_mul(MAX_TABLE_KEY as u64 + 40);
                        if !agent_lang::memory_admits(bytes) {
                            return Err(ResourceError::OverMemory { bytes });
                        }
                        (most, true)
                    }
                    Budget::Page => {
                        let page = most.min((RESOURCE_PAGE / MAX_TABLE_KEY) as u64);
                        (page, page == most)
                    }
                };
                let keys = self
                    .store
                    .table_keys(name, start, most)
                    .map_err(|e| failed(&e))?;
                let done = done || (keys.len() as u64) < most;
                Ok(Served {
                    value: text_array(keys),
                    done,
                })
            }
            (Backing::Value(bytes), ResourceOp::Value) => Served::whole(self.decode(what, bytes)?),
            (_, op) => Err(format!("{}: not a method of a {}", method(&op), local.kind()).into()),
        }
    }

    /// Runs `op` on resource `name` of node `owner` for the agent: one request, or one per page
    /// of a long result, each page asked of the agent's memory budget before it is kept.
    fn run_at(&self, owner: &str, name: &str, op: ResourceOp) -> Result<Dynamic, ResourceError> {
        let what = method(&op);
        let mut op = op;
        let mut lines = Array::new();
        let mut bytes = Blob::new();
        loop {
            let request = ResourceRequest {
                agent: self.of.agent.clone(),
                package: self.of.package,
                resource: name.to_string(),
                op: op.clone(),
            };
            let (value, done) = match self.remote.request(owner, &request)? {
                ResourceReply::Done { value, done } => (value, done),
                ResourceReply::Failed(message) => return Err(message.into()),
            };
            if !agent_lang::memory_admits(value.len() as u64) {
                return Err(ResourceError::OverMemory {
                    bytes: value.len() as u64,
                });
            }
            let value = self.decode(what, &value)?;
            let next = match (&mut op, value) {
                (ResourceOp::Lines { start, count } | ResourceOp::Keys { start, count }, page) => {
                    let Some(page) = page.try_cast::<Array>() else {
                        return Err(format!("{what}: node '{owner}' answered with no list").into());
                    };
                    let got = page.len() as u64;
                    lines.extend(page);
                    *start += got;
                    *count = count.saturating_sub(got);
                    done || got == 0 || *count == 0
                }
                (ResourceOp::Read { offset, len }, page) => {
                    let Some(page) = page.try_cast::<Blob>() else {
                        return Err(format!("{what}: node '{owner}' answered with no blob").into());
                    };
                    let got = page.len() as u64;
                    bytes.extend(page);
                    *offset += got;
                    *len = len.saturating_sub(got);
                    done || got == 0 || *len == 0
                }
                (_, value) => return Ok(value),
            };
            if next {
                return Ok(match op {
                    ResourceOp::Read { .. } => Dynamic::from_blob(bytes),
                    _ => lines.into(),
                });
            }
        }
    }

    /// Answers a request of a remote agent (whose package this was built for) on one of this
    /// node's resources: by the same checks as for the agents here, plus that the package binds
    /// the resource `remote`.
    pub(crate) fn serve(&self, request: ResourceRequest) -> ResourceReply {
        let name = request.resource.as_str();
        let what = method(&request.op);
        let served = match self.policy(what, name) {
            Ok(ResourcePolicy::Remote) => self
                .not_held(what, name)
                .and_then(|()| self.local(what, name))
                .map_err(ResourceError::from)
                .and_then(|local| self.run_here(name, local.kind(), request.op, Budget::Page)),
            Ok(ResourcePolicy::CopyOnReference) => self
                .bind_by_reference(what, name)
                .map_err(ResourceError::from)
                .and_then(|h| self.run_here(name, h.kind, request.op, Budget::Page)),
            Ok(other) => Err(format!(
                "{what}: the agent's package binds '{name}' by {other}, not remote or \
                 copy-on-reference"
            )
            .into()),
            Err(e) => Err(e.into()),
        };
        let encoded = served.and_then(|s| {
            agent_lang::encode_portable(&s.value)
                .map(|value| (value, s.done))
                .map_err(|e| ResourceError::Failed(format!("{what}: {e}")))
        });
        match encoded {
            Ok((value, done)) => ResourceReply::Done { value, done },
            Err(ResourceError::Failed(message)) => ResourceReply::Failed(message),
            // (Pages are bounded by their size: no agent's budget is asked here.)
            Err(ResourceError::OverMemory { bytes }) => {
                ResourceReply::Failed(format!("{what}: a result of {bytes} bytes is too large"))
            }
        }
    }
}

/// The method an operation is, as the agent calls it.
pub(super) fn method(op: &ResourceOp) -> &'static str {
    match op {
        ResourceOp::Describe => "resource",
        ResourceOp::Size => "size",
        ResourceOp::LineCount => "line_count",
        ResourceOp::Lines { .. } => "lines",
        ResourceOp::Read { .. } => "read",
        ResourceOp::Get { .. } | ResourceOp::Value => "get",
        ResourceOp::Set { .. } => "set",
        ResourceOp::Remove { .. } => "remove",
        ResourceOp::Len => "len",
        ResourceOp::Keys { .. } => "keys",
    }
}

/// The operation a call is (a value to set, encoded).
fn op_of(call: ResourceCall<'_>) -> Result<ResourceOp, ResourceError> {
    Ok(match call {
        ResourceCall::Size => ResourceOp::Size,
        ResourceCall::LineCount => ResourceOp::LineCount,
        ResourceCall::Lines { start, count } => ResourceOp::Lines { start, count },
        ResourceCall::Read { offset, len } => ResourceOp::Read { offset, len },
        ResourceCall::Get(key) => ResourceOp::Get { key: key.into() },
        ResourceCall::Set(key, value) => ResourceOp::Set {
            key: key.into(),
            value: ByteBuf::from(
                agent_lang::encode_portable(value)
                    .map_err(|e| ResourceError::Failed(format!("set: {e}")))?,
            ),
        },
        ResourceCall::Remove(key) => ResourceOp::Remove { key: key.into() },
        ResourceCall::Len => ResourceOp::Len,
        ResourceCall::Keys { start, count } => ResourceOp::Keys { start, count },
        ResourceCall::Value => ResourceOp::Value,
    })
}

fn text_array(items: Vec<String>) -> Dynamic {
    items
        .into_iter()
        .map(|s| Dynamic::from(ImmutableString::from(s)))
        .collect::<Array>()
        .into()
}

impl ResourceHost for AgentResources {
    fn bind(&self, name: &str) -> Result<Resource, ResourceError> {
        match self.policy("resource", name)? {
            ResourcePolicy::Rebind | ResourcePolicy::Remote => Ok(self.bind_here(name)?),
            ResourcePolicy::Copy => self.copy_here(name),
            ResourcePolicy::CopyOnReference => Ok(self.bind_by_reference("resource", name)?),
            ResourcePolicy::Move => Ok(self.hold_here(name)?),
        }
    }

    fn bind_at(&self, name: &str, node: &str) -> Result<Resource, String> {
        match self.policy("resource", name)? {
            ResourcePolicy::Remote if node == self.here => self.bind_here(name),
            ResourcePolicy::CopyOnReference if node == self.here => {
                self.bind_by_reference("resource", name)
            }
            ResourcePolicy::Remote | ResourcePolicy::CopyOnReference => {
                let kind = match self.run_at(node, name, ResourceOp::Describe) {
                    Ok(kind) => kind.into_immutable_string().ok(),
                    Err(ResourceError::Failed(message)) => return Err(message),
                    Err(ResourceError::OverMemory { .. }) => None,
                };
                let Some(kind) = kind.and_then(|k| k.parse::<ResourceKind>().ok()) else {
                    return Err(format!("resource: node '{node}' described '{name}' oddly"));
                };
                Ok(Resource {
                    name: name.into(),
                    kind,
                    bound_at: node.into(),
                    copy: None,
                })
            }
            other => Err(format!(
                "resource: resource(name, node) reaches another node's resource, which a remote \
                 or copy-on-reference binding does; '{name}' is declared {other}"
            )),
        }
    }

    fn call(&self, handle: &Resource, call: ResourceCall<'_>) -> Result<Dynamic, ResourceError> {
        let what = call.method();
        let name = handle.name.as_str();
        let op = op_of(call)?;
        match self.policy(what, name)? {
            // (A moved table is wherever the agent is: `local` finds it, held by the agent.)
            ResourcePolicy::Rebind | ResourcePolicy::Move => {
                Ok(self.run_here(name, handle.kind, op, Budget::Agent)?.value)
            }
            ResourcePolicy::Remote if *handle.bound_at == *self.here => {
                Ok(self.run_here(name, handle.kind, op, Budget::Agent)?.value)
            }
            ResourcePolicy::Remote => self.run_at(&handle.bound_at, name, op),
            ResourcePolicy::CopyOnReference if *handle.bound_at == *self.here => {
                Ok(self.run_here(name, handle.kind, op, Budget::Agent)?.value)
            }
            ResourcePolicy::CopyOnReference => {
                let chunks = ChunkCache {
                    store: &self.store,
                    quota: &self.quota,
                    agent: &self.of.agent,
                    owner: &handle.bound_at,
                    name,
                };
                chunks.serve(
                    op,
                    &|op| self.run_at(&handle.bound_at, name, op),
                    &|bytes| self.decode(what, bytes),
                )
            }
            // A plain handle (from a message, or bound by an agent of another package) where
            // this agent's package copies the resource: only `resource(name)` makes the copy.
            ResourcePolicy::Copy => Err(format!(
                "{what}: this handle holds no copy of '{name}', which the agent's package binds \
                 by copy: bind it here with resource(\"{name}\")"
            )
            .into()),
        }
    }
}
