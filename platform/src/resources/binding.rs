//! The resources of one agent on this node: the [`ResourceHost`] its slices run with. It turns
//! `resource(name)` and the handles' method calls into reads and writes of this node's
//! resources, by the binding policy the agent's package declares for each name.
//!
//! Policies built so far: **rebind**, under which a handle reaches, at every node, that node's
//! resource of the same name and type (a node without one makes the call throw, naming the node
//! and the resource). The others (`copy`, `remote`, `move`) are refused when the handle is
//! bound, with the reason, rather than run as something they are not.

use std::collections::HashMap;

use agent_lang::rhai::{Array, Dynamic, ImmutableString};
use agent_lang::{Program, Resource, ResourceCall, ResourceError, ResourceHost};
use security::{Access, ResourceGrants, ResourcePolicy};

use super::{Backing, NodeResource, NodeResources};
use crate::node::StoreQuota;
use crate::store::Store;

/// Longest table key, in bytes.
pub const MAX_TABLE_KEY: usize = 1024;

/// Largest table value, encoded, in bytes.
pub const MAX_TABLE_VALUE: usize = 4 << 20;

/// One agent's view of this node's resources.
pub(crate) struct AgentResources {
    /// This node's name.
    here: String,
    resources: NodeResources,
    store: Store,
    quota: StoreQuota,
    /// The agent's bindings, from its package's manifest.
    bindings: HashMap<String, ResourcePolicy>,
    /// What this node grants the agent's author (`[trust]`).
    grants: ResourceGrants,
    /// Decodes the values the agent reads.
    program: Program,
}

impl AgentResources {
    pub(crate) fn new(
        here: String,
        resources: NodeResources,
        store: Store,
        quota: StoreQuota,
        bindings: impl IntoIterator<Item = (String, ResourcePolicy)>,
        grants: ResourceGrants,
        program: Program,
    ) -> AgentResources {
        AgentResources {
            here,
            resources,
            store,
            quota,
            bindings: bindings.into_iter().collect(),
            grants,
            program,
        }
    }

    /// Whether the agent may use resource `name` as `needed` here.
    fn allowed(&self, what: &str, name: &str, needed: Access) -> Result<(), String> {
        match self.grants.access(name) {
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
        self.bindings.get(name).copied().ok_or_else(|| {
            format!(
                "{what}: the agent's package declares no resource '{name}' (declare its binding: \
                 tern pack --resource {name}=rebind)"
            )
        })
    }

    /// The resource of this node a handle named `name` reaches.
    fn local(&self, what: &str, name: &str) -> Result<&NodeResource, String> {
        self.resources
            .get(name)
            .ok_or_else(|| format!("{what}: node '{}' has no resource '{name}'", self.here))
    }

    fn decode(&self, what: &str, bytes: &[u8]) -> Result<Dynamic, String> {
        agent_lang::decode_portable(&self.program, bytes)
            .map_err(|e| format!("{what}: the stored value cannot be read by this agent: {e}"))
    }
}

fn text_array(items: Vec<String>) -> Dynamic {
    items
        .into_iter()
        .map(|s| Dynamic::from(ImmutableString::from(s)))
        .collect::<Array>()
        .into()
}

fn check_key(what: &str, key: &str) -> Result<(), String> {
    if key.len() > MAX_TABLE_KEY {
        return Err(format!(
            "{what}: a table key is at most {MAX_TABLE_KEY} bytes, this one is {}",
            key.len()
        ));
    }
    Ok(())
}

impl ResourceHost for AgentResources {
    fn bind(&self, name: &str) -> Result<Resource, String> {
        match self.policy("resource", name)? {
            ResourcePolicy::Rebind => {
                self.allowed("resource", name, Access::Read)?;
                let local = self.local("resource", name)?;
                Ok(Resource {
                    name: name.into(),
                    kind: local.kind(),
                    bound_at: self.here.as_str().into(),
                })
            }
            other => Err(format!(
                "resource: '{name}' is declared with the {other} binding, which this node does \
                 not provide yet (only rebind)"
            )),
        }
    }

    fn call(&self, handle: &Resource, call: ResourceCall<'_>) -> Result<Dynamic, ResourceError> {
        let what = call.method();
        let name = handle.name.as_str();
        if self.policy(what, name)? != ResourcePolicy::Rebind {
            return Err(format!("{what}: resource '{name}' is not bound by rebind").into());
        }
        let needed = match call {
            ResourceCall::Set(..) | ResourceCall::Remove(_) => Access::ReadWrite,
            _ => Access::Read,
        };
        self.allowed(what, name, needed)?;
        let local = self.local(what, name)?;
        if local.kind() != handle.kind {
            return Err(format!(
                "{what}: resource '{name}' at node '{}' is a {}, not a {}",
                self.here,
                local.kind(),
                handle.kind
            )
            .into());
        }
        let failed = |e: &dyn std::fmt::Display| ResourceError::Failed(format!("{what}: {e}"));
        Ok(match (&local.backing, call) {
            (Backing::Dataset(data), ResourceCall::Size) => Dynamic::from_int(data.size() as i64),
            (Backing::Dataset(data), ResourceCall::LineCount) => {
                Dynamic::from_int(data.line_count().map_err(|e| failed(&e))? as i64)
            }
            (Backing::Dataset(data), ResourceCall::Lines { start, count }) => {
                let max_line = self.program.limits().max_string_size;
                match data.lines(start, count, max_line, agent_lang::memory_admits) {
                    Ok(lines) => text_array(lines),
                    Err(super::dataset::DatasetError::OverMemory { bytes }) => {
                        return Err(ResourceError::OverMemory { bytes })
                    }
                    Err(e) => return Err(failed(&e)),
                }
            }
            (Backing::Dataset(data), ResourceCall::Read { offset, len }) => {
                Dynamic::from_blob(data.read(offset, len).map_err(|e| failed(&e))?)
            }
            (Backing::Table, ResourceCall::Get(key)) => {
                match self.store.table_get(name, key).map_err(|e| failed(&e))? {
                    Some(bytes) => self.decode(what, &bytes)?,
                    None => Dynamic::UNIT,
                }
            }
            (Backing::Table, ResourceCall::Set(key, value)) => {
                check_key(what, key)?;
                let bytes = agent_lang::encode_portable(value).map_err(|e| failed(&e))?;
                if bytes.len() > MAX_TABLE_VALUE {
                    return Err(format!(
                        "{what}: a table value is at most {MAX_TABLE_VALUE} bytes encoded, this one is {}",
                        bytes.len()
                    )
                    .into());
                }
                self.quota
                    .room_for((key.len() + bytes.len()) as u64)
                    .map_err(|full| failed(&crate::wire::ControlRefusal::from(full)))?;
                self.store
                    .batch(|b| b.table_set(name, key, &bytes))
                    .map_err(|e| failed(&e))?;
                Dynamic::UNIT
            }
            (Backing::Table, ResourceCall::Remove(key)) => {
                check_key(what, key)?;
                match self
                    .store
                    .batch(|b| b.table_remove(name, key))
                    .map_err(|e| failed(&e))?
                {
                    Some(bytes) => self.decode(what, &bytes)?,
                    None => Dynamic::UNIT,
                }
            }
            (Backing::Table, ResourceCall::Len) => {
                Dynamic::from_int(self.store.table_len(name).map_err(|e| failed(&e))? as i64)
            }
            (Backing::Table, ResourceCall::Keys { start, count }) => {
                // Keys are at most 1 KiB each: the agent's budget is asked once for them all.
                let most = count.min(self.store.table_len(name).map_err(|e| failed(&e))?);
                let bytes = most.saturating_mul(MAX_TABLE_KEY as u64 + 40);
                if !agent_lang::memory_admits(bytes) {
                    return Err(ResourceError::OverMemory { bytes });
                }
                text_array(
                    self.store
                        .table_keys(name, start, most)
                        .map_err(|e| failed(&e))?,
                )
            }
            (Backing::Value(bytes), ResourceCall::Value) => self.decode(what, bytes)?,
            (_, call) => {
                return Err(format!("{}: not a method of a {}", call.method(), local.kind()).into())
            }
        })
    }
}
