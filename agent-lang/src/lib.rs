//! Rhai for mobile agents: a sandboxed engine, a resumable executor that gives Rhai scripts
//! *strong mobility*, portable values, and the continuation codec. Pure: no I/O, no threads.
//!
//! - [`Program::compile`] parses a script with the sandboxed engine, finds the functions that can
//!   reach a suspension primitive (`migrate`, `receive`) and plans every body into statements
//!   Rhai runs natively and statements the executor walks.
//! - [`Execution::resume`] runs the agent until it finishes, fails or suspends, returning an
//!   [`Outcome`]. A suspended execution is [`Execution::encode`]d to bytes and
//!   [`Execution::decode`]d against the same program elsewhere, then resumed with the primitive's
//!   result: it carries on from the very next statement with every frame intact.
//!
//! The contract: an agent's result is the result plain Rhai gives for the same script when
//! `migrate(node)` only changes what `here()` returns.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use agent_lang::{Execution, HostEnv, Limits, Outcome, Program, Resume};
//!
//! let program = Program::compile(
//!     r#"let total = 0;
//!        for n in nodes() { migrate(n); total += here().len(); }
//!        total"#,
//!     &Limits::default(),
//! ).unwrap();
//! let nodes = vec!["a".to_string(), "bb".to_string()];
//! let mut env = HostEnv {
//!     here: "a".into(), home: "a".into(), nodes: nodes.clone(), agent_id: "agent-1".into(),
//!     hops: 0, printer: Arc::new(|_| {}), resources: agent_lang::no_resources(),
//! };
//! let mut exec = Execution::new(&program);
//! let mut input = Resume::Start;
//! let result = loop {
//!     match exec.resume(&env, input) {
//!         Outcome::Migrate { to } => {
//!             let bytes = exec.encode().unwrap();            // leave ...
//!             exec = Execution::decode(&program, &bytes).unwrap(); // ... and arrive
//!             env.here = to;
//!             env.hops += 1;
//!             input = Resume::Start;
//!         }
//!         Outcome::Finished(v) => break v,
//!         other => panic!("{other:?}"),
//!     }
//! };
//! assert_eq!(result.as_int().unwrap(), 3);
//! ```

mod closures;
mod codec;
mod compile;
mod copies;
mod engine;
mod error;
mod exec;
mod layout;
mod limits;
mod meter;
mod nested;
mod resources;
mod sized;
mod value;

pub use codec::{
    DecodeError, EncodeError, MAGIC as CONTINUATION_MAGIC, VERSION as CONTINUATION_VERSION,
};
pub use compile::{CompileError, Program, ProgramHash};
pub use copies::{check_table_key, Copied, CopiedDataset, MAX_TABLE_KEY, MAX_TABLE_VALUE};
pub use engine::{exit_value, sandboxed_engine, unknown_node_error, ExitValue, HostEnv};
pub use error::{AgentError, AgentErrorKind};
pub use exec::{Execution, Outcome, Resume};
pub use limits::{Limits, DEFAULT_MEMORY_BYTES};
pub use meter::{is_installed as memory_is_metered, Metered, BYTES_PER_OPERATION};
pub use nested::MAX_WALKED_DEPTH;
pub use resources::{
    is_valid_resource_name, memory_admits, no_resources, NoResources, Resource, ResourceCall,
    ResourceError, ResourceHost, ResourceKind,
};
pub use value::{
    check_portable, decode_portable, encode_portable, from_json, to_json, ValueError, TAG_BYTE,
    TAG_CHAR, TAG_FN_PTR, TAG_RESOURCE,
};

pub use rhai;
