//! Node resources: what a node offers the agents that come to it (data sets, tables, values),
//! declared in its configuration, and how an agent's handles reach them.
//!
//! - [`dataset`]: read-only files, read in lines or byte ranges with bounded memory;
//! - `binding`: the [`agent_lang::ResourceHost`] of one agent on this node: which resource a
//!   handle reaches, by the binding policy its package declares, and the calls on it;
//! - [`copy_on_reference`]: the chunks of other nodes' resources an agent keeps where it is;
//! - `moved_datasets`: the datasets that are here by a move, read from the store.
//!
//! `table` resources live in the node's store (`store::tables`); `value` resources are portable
//! values kept encoded; a value or a dataset bound by move is in the store from then on
//! (`store::moved_resources`).

mod binding;
pub mod copy_on_reference;
pub mod dataset;
mod moved_datasets;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use agent_lang::ResourceKind;
pub use security::Mobility;
use security::{ResourceDecl, ResourcePolicy};

pub use agent_lang::{MAX_TABLE_KEY, MAX_TABLE_VALUE};
pub(crate) use binding::{AgentOf, AgentResources, RemoteResources};
use dataset::Dataset;
pub(crate) use moved_datasets::MovedDatasets;

/// What backs a resource.
#[derive(Debug)]
pub enum Backing {
    /// Files, read-only.
    Dataset(Arc<Dataset>),
    /// A table in the node's store, by the resource's name.
    Table,
    /// A portable value, encoded.
    Value(Vec<u8>),
}

/// One resource a node offers.
#[derive(Debug)]
pub struct NodeResource {
    /// Whether it may leave the node.
    pub mobility: Mobility,
    /// What backs it.
    pub backing: Backing,
}

impl NodeResource {
    /// Its type.
    pub fn kind(&self) -> ResourceKind {
        match self.backing {
            Backing::Dataset(_) => ResourceKind::Dataset,
            Backing::Table => ResourceKind::Table,
            Backing::Value(_) => ResourceKind::Value,
        }
    }
}

/// The resources a node offers, by name.
#[derive(Debug, Default, Clone)]
pub struct NodeResources {
    by_name: Arc<BTreeMap<String, NodeResource>>,
    /// The datasets here by a move, opened.
    pub(crate) moved_datasets: MovedDatasets,
}

impl NodeResources {
    /// The resource named `name`, if the node offers one.
    pub fn get(&self, name: &str) -> Option<&NodeResource> {
        self.by_name.get(name)
    }

    /// Names and types of every resource offered, in name order.
    pub fn list(&self) -> impl Iterator<Item = (&str, ResourceKind)> {
        self.by_name.iter().map(|(n, r)| (n.as_str(), r.kind()))
    }

    /// Whether the bindings `declared` (a package's) can be kept with the resources of this
    /// node: for each one this node has, whether its policy admits the resource's mobility
    /// (`ResourcePolicy::admits`, the columns of the paper's table; the rows were checked when
    /// the package was signed) and its type (a table is not copied on reference). A resource of another node is checked where it is bound.
    ///
    /// # Errors
    ///
    /// The first binding that cannot be kept, with the reason.
    pub fn check_bindings(&self, declared: &[ResourceDecl]) -> Result<(), String> {
        for decl in declared {
            if let Some(local) = self.get(&decl.name) {
                let kind = local.kind();
                if decl.policy == ResourcePolicy::CopyOnReference && kind == ResourceKind::Table {
                    return Err(format!(
                        "resource '{}' is bound by {}, which a table here cannot take (a \
                         table changes, and chunks kept of it would go stale)",
                        decl.name, decl.policy
                    ));
                }
                decl.policy.admits(local.mobility).map_err(|why| {
                    format!(
                        "resource '{}' is bound by {} ({}), which its {} resource here cannot \
                         take: {why}",
                        decl.name,
                        decl.policy,
                        decl.binding(),
                        local.mobility
                    )
                })?;
            }
        }
        Ok(())
    }

    /// Reads the resources of a `[resources]` section (a TOML table of tables, one per
    /// resource: `type`, then `path` for a dataset, relative to `base`, or `value` for a value;
    /// `mobility`, `fixed` unless stated).
    ///
    /// # Errors
    ///
    /// A resource is malformed or its dataset cannot be opened: the message names it.
    pub fn from_toml(section: &toml::Table, base: &Path) -> Result<NodeResources, String> {
        let mut by_name = BTreeMap::new();
        for (name, entry) in section {
            let resource =
                parse(name, entry, base).map_err(|e| format!("resource '{name}': {e}"))?;
            by_name.insert(name.clone(), resource);
        }
        Ok(NodeResources {
            by_name: Arc::new(by_name),
            moved_datasets: MovedDatasets::default(),
        })
    }
}

fn parse(name: &str, entry: &toml::Value, base: &Path) -> Result<NodeResource, String> {
    if !agent_lang::is_valid_resource_name(name) {
        return Err("a resource name is 1 to 64 of A-Z a-z 0-9 . _ -".into());
    }
    let toml::Value::Table(fields) = entry else {
        return Err("expected a table (type = ..., ...)".into());
    };
    let text = |key: &str| match fields.get(key) {
        None => Ok(None),
        Some(toml::Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(format!("'{key}' must be a string")),
    };
    for key in fields.keys() {
        if !matches!(key.as_str(), "type" | "path" | "value" | "mobility") {
            return Err(format!(
                "unknown field '{key}' (expected type, path, value, mobility)"
            ));
        }
    }
    let kind: ResourceKind = text("type")?.ok_or("'type' is missing")?.parse()?;
    let mobility = text("mobility")?.map_or(Ok(Mobility::Fixed), str::parse)?;
    let backing = match kind {
        ResourceKind::Dataset => {
            let path = text("path")?.ok_or("a dataset needs a 'path'")?;
            let path = base.join(path);
            Backing::Dataset(Arc::new(Dataset::open(&path).map_err(|e| e.to_string())?))
        }
        ResourceKind::Table => Backing::Table,
        ResourceKind::Value => {
            let value = fields
                .get("value")
                .ok_or("a value resource needs a 'value'")?;
            let json = serde_json::to_value(value).map_err(|e| e.to_string())?;
            let value = agent_lang::from_json(&json);
            Backing::Value(agent_lang::encode_portable(&value).map_err(|e| e.to_string())?)
        }
    };
    if kind != ResourceKind::Dataset && fields.contains_key("path") {
        return Err(format!("a {kind} has no 'path'"));
    }
    if kind != ResourceKind::Value && fields.contains_key("value") {
        return Err(format!("a {kind} has no 'value'"));
    }
    Ok(NodeResource { mobility, backing })
}
