//! Resources: what an agent reaches outside itself at the node it is on (a data set, a table, a
//! value the node offers), through handles that travel with it.
//!
//! `resource(name)` asks the host for a handle; the handle is a portable value (it is encoded in
//! the continuation and in messages like any other) that names the resource, its type and the
//! node it was bound at. Its methods are requests to the host ([`ResourceHost`]), which decides,
//! by the binding policy the agent's package declares, which resource at which node a handle
//! reaches now: this crate holds no I/O, only the handle, the calls and their checks. A handle
//! of the `copy` binding holds the agent's own copy of the resource ([`crate::copies`]), which
//! answers its calls itself.
//!
//! Each method is a native call: it does not suspend the agent, and it runs at full speed from
//! delegated statements. A host error (a resource missing where the agent is now, a read past
//! the end) is thrown as a catchable Rhai error.

use std::fmt;
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, INT};

use crate::copies::Copied;
use crate::engine::with_host;

/// What kind of resource a handle is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// Read-only lines or bytes of a file or of a directory of files.
    Dataset,
    /// A persistent key-value table.
    Table,
    /// A portable value the node offers.
    Value,
}

impl ResourceKind {
    /// The name in node configurations and error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::Dataset => "dataset",
            ResourceKind::Table => "table",
            ResourceKind::Value => "value",
        }
    }

    pub(crate) fn code(self) -> u64 {
        match self {
            ResourceKind::Dataset => 0,
            ResourceKind::Table => 1,
            ResourceKind::Value => 2,
        }
    }

    pub(crate) fn from_code(code: u64) -> Option<ResourceKind> {
        match code {
            0 => Some(ResourceKind::Dataset),
            1 => Some(ResourceKind::Table),
            2 => Some(ResourceKind::Value),
            _ => None,
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ResourceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dataset" => Ok(ResourceKind::Dataset),
            "table" => Ok(ResourceKind::Table),
            "value" => Ok(ResourceKind::Value),
            _ => Err(format!(
                "unknown resource type '{s}': expected dataset, table or value"
            )),
        }
    }
}

/// A handle on a resource, as the agent holds it (Rhai type name `resource`).
///
/// Two handles are equal when they reach the same resource the same way: the same name, type
/// and node, and both copies or neither (a copy's contents are not compared).
#[derive(Clone, Debug)]
pub struct Resource {
    /// The name the agent bound it by (`resource(name)`).
    pub name: ImmutableString,
    /// The type of the resource it was bound to.
    pub kind: ResourceKind,
    /// The node it was bound at.
    pub bound_at: ImmutableString,
    /// The agent's own copy of the resource, for a `copy` binding (of the same kind).
    pub copy: Option<Arc<Copied>>,
}

impl PartialEq for Resource {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.kind == other.kind
            && self.bound_at == other.bound_at
            && self.copy.is_some() == other.copy.is_some()
    }
}

impl Eq for Resource {}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let copy = if self.copy.is_some() { "a copy, " } else { "" };
        write!(
            f,
            "resource '{}' ({}, {copy}bound at {})",
            self.name, self.kind, self.bound_at
        )
    }
}

/// Whether `name` may name a resource: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn is_valid_resource_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One method call on a handle.
#[derive(Debug)]
pub enum ResourceCall<'a> {
    /// `size()`: a dataset's length in bytes.
    Size,
    /// `line_count()`: a dataset's number of lines.
    LineCount,
    /// `lines(start, count)`: up to `count` lines of a dataset from line `start` (0-based).
    Lines {
        /// First line.
        start: u64,
        /// Most lines.
        count: u64,
    },
    /// `read(offset, len)`: up to `len` bytes of a dataset from byte `offset`.
    Read {
        /// First byte.
        offset: u64,
        /// Most bytes.
        len: u64,
    },
    /// `get(key)` on a table: the value, or `()` when absent.
    Get(&'a str),
    /// `set(key, value)` on a table.
    Set(&'a str, &'a Dynamic),
    /// `remove(key)` on a table: the value removed, or `()`.
    Remove(&'a str),
    /// `len()` of a table.
    Len,
    /// `keys(start, count)` of a table: up to `count` keys in sorted order from the `start`-th.
    Keys {
        /// Index of the first key.
        start: u64,
        /// Most keys.
        count: u64,
    },
    /// `get()` of a value resource.
    Value,
}

impl ResourceCall<'_> {
    /// The method's name, as the agent calls it.
    pub fn method(&self) -> &'static str {
        match self {
            ResourceCall::Size => "size",
            ResourceCall::LineCount => "line_count",
            ResourceCall::Lines { .. } => "lines",
            ResourceCall::Read { .. } => "read",
            ResourceCall::Get(_) | ResourceCall::Value => "get",
            ResourceCall::Set(..) => "set",
            ResourceCall::Remove(_) => "remove",
            ResourceCall::Len => "len",
            ResourceCall::Keys { .. } => "keys",
        }
    }

    /// The kind of resource the method belongs to.
    fn kind(&self) -> ResourceKind {
        match self {
            ResourceCall::Size
            | ResourceCall::LineCount
            | ResourceCall::Lines { .. }
            | ResourceCall::Read { .. } => ResourceKind::Dataset,
            ResourceCall::Get(_)
            | ResourceCall::Set(..)
            | ResourceCall::Remove(_)
            | ResourceCall::Len
            | ResourceCall::Keys { .. } => ResourceKind::Table,
            ResourceCall::Value => ResourceKind::Value,
        }
    }
}

/// Why a resource call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceError {
    /// What the call throws in the agent (catchable).
    Failed(String),
    /// Its result would take the agent past its memory budget by holding `bytes` more (a host
    /// asks [`memory_admits`] as it builds the result): this ends the agent, as any allocation
    /// over its budget does.
    OverMemory {
        /// What the result would have added.
        bytes: u64,
    },
}

impl From<String> for ResourceError {
    fn from(message: String) -> Self {
        ResourceError::Failed(message)
    }
}

/// Whether the agent whose slice runs on this thread may hold `bytes` more: for hosts building
/// a result whose size the agent's arguments choose (true outside a metered slice).
pub fn memory_admits(bytes: u64) -> bool {
    crate::meter::admits(bytes).is_ok()
}

/// What the node gives an agent's resource calls: installed with the [`crate::HostEnv`] for
/// one slice, called on the slice's thread (it may block on a file or the store, never on the
/// agent's node's runtime).
pub trait ResourceHost: Send + Sync {
    /// `resource(name)`: a handle on the resource the agent's package binds under `name` (with
    /// a copy of it, for a `copy` binding).
    ///
    /// # Errors
    ///
    /// Why there is none (not declared by the package, not at this node, not granted): the
    /// text the agent's `resource` call throws; or a copy over the agent's memory budget.
    fn bind(&self, name: &str) -> Result<Resource, ResourceError>;

    /// `resource(name, node)`: a handle on resource `name` of node `node`, which the agent
    /// reaches from wherever it is (a `remote` binding).
    ///
    /// # Errors
    ///
    /// As [`ResourceHost::bind`].
    fn bind_at(&self, name: &str, node: &str) -> Result<Resource, String>;

    /// A method call on `resource` (whose kind matches the call's).
    ///
    /// # Errors
    ///
    /// Why the call failed: the text it throws.
    fn call(&self, resource: &Resource, call: ResourceCall<'_>) -> Result<Dynamic, ResourceError>;
}

/// The host of an agent that may reach no resource: every `resource(name)` throws.
pub struct NoResources;

impl ResourceHost for NoResources {
    fn bind(&self, name: &str) -> Result<Resource, ResourceError> {
        Err(ResourceError::Failed(format!(
            "resource: no resource named '{name}' here"
        )))
    }

    fn bind_at(&self, name: &str, node: &str) -> Result<Resource, String> {
        Err(format!("resource: no resource named '{name}' at {node}"))
    }

    fn call(&self, resource: &Resource, call: ResourceCall<'_>) -> Result<Dynamic, ResourceError> {
        Err(ResourceError::Failed(format!(
            "{}: resource '{}' is not reachable here",
            call.method(),
            resource.name
        )))
    }
}

/// A [`ResourceHost`] for agents that reach none.
pub fn no_resources() -> Arc<dyn ResourceHost> {
    Arc::new(NoResources)
}

type Checked<T> = Result<T, Box<EvalAltResult>>;

fn call(resource: &mut Resource, call: ResourceCall<'_>, max_line: usize) -> Checked<Dynamic> {
    if call.kind() != resource.kind {
        return Err(format!(
            "{}() is a method of {} resources; '{}' is a {}",
            call.method(),
            call.kind(),
            resource.name,
            resource.kind
        )
        .into());
    }
    let result = match &mut resource.copy {
        Some(copy) => crate::copies::call(copy, call, max_line),
        None => with_host(|h| h.resources.call(resource, call))?,
    };
    thrown(result)
}

/// A host's result as the agent sees it: an error thrown (catchable), or the end of the agent
/// when its memory budget is still exceeded.
fn thrown<T>(result: Result<T, ResourceError>) -> Checked<T> {
    match result {
        Ok(value) => Ok(value),
        Err(ResourceError::Failed(message)) => Err(message.into()),
        Err(ResourceError::OverMemory { bytes }) => match crate::meter::admits(bytes) {
            Err(exceeded) => Err(exceeded.into_error()),
            // (Freed meanwhile: the call is only refused.)
            Ok(()) => Err(format!(
                "the result would exceed the agent's memory budget by {bytes} bytes"
            )
            .into()),
        },
    }
}

/// A count or an offset given by the agent: negative ones are refused.
fn unsigned(what: &str, n: INT) -> Checked<u64> {
    u64::try_from(n).map_err(|_| format!("{what} must not be negative, got {n}").into())
}

/// Registers `resource(name)`, the `resource` type and its methods on `engine`, for agents
/// whose strings are at most `max_line` bytes (the longest line a copy's `lines` returns, as a
/// node's dataset does).
pub(crate) fn register(engine: &mut Engine, max_line: usize) {
    engine.register_type_with_name::<Resource>("resource");
    engine.register_fn("resource", |name: &str| -> Checked<Resource> {
        thrown(with_host(|h| h.resources.bind(name))?)
    });
    engine.register_fn("resource", |name: &str, node: &str| -> Checked<Resource> {
        with_host(|h| h.resources.bind_at(name, node))?.map_err(Into::into)
    });
    engine.register_fn("to_string", |r: &mut Resource| r.to_string());
    engine.register_fn("to_debug", |r: &mut Resource| r.to_string());
    engine.register_fn("==", |a: &mut Resource, b: Resource| *a == b);
    engine.register_fn("!=", |a: &mut Resource, b: Resource| *a != b);
    engine.register_get("name", |r: &mut Resource| r.name.clone());
    engine.register_get("kind", |r: &mut Resource| {
        ImmutableString::from(r.kind.as_str())
    });
    engine.register_get("is_copy", |r: &mut Resource| r.copy.is_some());
    engine.register_fn("size", |r: &mut Resource| call(r, ResourceCall::Size, 0));
    engine.register_fn("line_count", |r: &mut Resource| {
        call(r, ResourceCall::LineCount, 0)
    });
    engine.register_fn("lines", move |r: &mut Resource, start: INT, count: INT| {
        let start = unsigned("lines: start", start)?;
        let count = unsigned("lines: count", count)?;
        call(r, ResourceCall::Lines { start, count }, max_line)
    });
    engine.register_fn("read", |r: &mut Resource, offset: INT, len: INT| {
        let offset = unsigned("read: offset", offset)?;
        let len = unsigned("read: len", len)?;
        // The blob is allocated by the host: the meter is asked first, as `blob(n)` asks it.
        crate::meter::admits(len).map_err(crate::meter::Exceeded::into_error)?;
        call(r, ResourceCall::Read { offset, len }, 0)
    });
    engine.register_fn("get", |r: &mut Resource, key: &str| {
        call(r, ResourceCall::Get(key), 0)
    });
    engine.register_fn("get", |r: &mut Resource| call(r, ResourceCall::Value, 0));
    engine.register_fn("set", |r: &mut Resource, key: &str, value: Dynamic| {
        call(r, ResourceCall::Set(key, &value), 0).map(drop)
    });
    engine.register_fn("remove", |r: &mut Resource, key: &str| {
        call(r, ResourceCall::Remove(key), 0)
    });
    engine.register_fn("len", |r: &mut Resource| call(r, ResourceCall::Len, 0));
    engine.register_fn("keys", |r: &mut Resource, start: INT, count: INT| {
        let start = unsigned("keys: start", start)?;
        let count = unsigned("keys: count", count)?;
        call(r, ResourceCall::Keys { start, count }, 0)
    });
}
