//! The resource protocol's messages (`/tern/res/1`): an agent's call on a `remote` handle (or
//! a copy-on-reference handle's read) as a request to the resource's node, and its answer.

use serde::{Deserialize, Serialize};

/// An operation of an agent on a resource of the node it is sent to (`/tern/res/1`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ResourceRequest {
    /// The agent, by id (for the owner's log and status).
    pub agent: String,
    /// Its package: the owner checks that it binds the resource `remote`, and that the
    /// node's trust policy grants its author the resource.
    #[serde(with = "serde_bytes")]
    pub package: [u8; 32],
    /// The resource, by name.
    pub resource: String,
    /// What to do.
    pub op: ResourceOp,
}

/// A resource operation, as `agent_lang::ResourceCall` says it (values as portable bytes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(missing_docs)] // each is the method of its name
pub enum ResourceOp {
    /// The resource's type (what `resource(name, node)` binds to).
    Describe,
    Size,
    LineCount,
    Lines {
        start: u64,
        count: u64,
    },
    Read {
        offset: u64,
        len: u64,
    },
    Get {
        key: String,
    },
    Set {
        key: String,
        value: serde_bytes::ByteBuf,
    },
    Remove {
        key: String,
    },
    Len,
    Keys {
        start: u64,
        count: u64,
    },
    Value,
}

/// The answer to a [`ResourceRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ResourceReply {
    /// The result, as a portable value; `done` false: it is a page of it (lines or bytes),
    /// and the rest is asked for from where it ends.
    Done {
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        done: bool,
    },
    /// The operation failed, or was refused: why (thrown in the agent).
    Failed(String),
}
