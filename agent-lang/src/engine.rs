//! The sandboxed Rhai engine agents run in, and the host functions it exposes.
//!
//! Host functions that only read the agent's situation (`here()`, `nodes()`, ...) are ordinary
//! registered Rhai functions: they read a [`HostEnv`] that the executor installs in a thread-local
//! for the duration of one run slice, so delegated statements call them at native speed. The
//! suspension primitives (`migrate`, `receive`) are also registered, but only so that a call the
//! executor could not intercept (inside a closure, a function pointer call or a method call) fails
//! with a clear error instead of silently doing nothing.

use std::cell::RefCell;
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, ImmutableString, Position};

use crate::limits::Limits;

/// What an agent can learn about where it runs, installed by the executor for one slice.
#[derive(Clone)]
pub struct HostEnv {
    /// Name of the node the agent is on now (`here()`).
    pub here: String,
    /// Name of the node the agent was launched on (`home()`).
    pub home: String,
    /// Sorted names of every node of the mesh (`nodes()`).
    pub nodes: Vec<String>,
    /// The agent's id (`id()`).
    pub agent_id: String,
    /// Hops made so far (`hops()`).
    pub hops: i64,
    /// Where `print(..)` and `debug(..)` go.
    pub printer: Arc<dyn Fn(&str) + Send + Sync>,
    /// What `resource(name)` and the handles' methods reach ([`crate::no_resources`] for none).
    pub resources: Arc<dyn crate::ResourceHost>,
}

impl std::fmt::Debug for HostEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostEnv")
            .field("here", &self.here)
            .field("home", &self.home)
            .field("nodes", &self.nodes)
            .field("agent_id", &self.agent_id)
            .field("hops", &self.hops)
            .finish_non_exhaustive()
    }
}

thread_local! {
    // One slice runs synchronously on one thread, so a thread-local is the cheapest way for
    // registered functions (which Rhai calls without any context of ours) to find their host.
    static HOST: RefCell<Option<HostEnv>> = const { RefCell::new(None) };
}

/// Installs `env` for the current thread until the guard is dropped.
pub(crate) struct HostGuard(Option<HostEnv>);

impl HostGuard {
    pub(crate) fn install(env: &HostEnv) -> HostGuard {
        HostGuard(HOST.with(|h| h.replace(Some(env.clone()))))
    }
}

impl Drop for HostGuard {
    fn drop(&mut self) {
        let previous = self.0.take();
        HOST.with(|h| *h.borrow_mut() = previous);
    }
}

pub(crate) fn with_host<T>(f: impl FnOnce(&HostEnv) -> T) -> Result<T, Box<EvalAltResult>> {
    HOST.with(|h| match &*h.borrow() {
        Some(env) => Ok(f(env)),
        None => Err("host functions are only available inside a running agent".into()),
    })
}

/// Names of the suspension primitives, with the argument counts that make them primitives.
pub(crate) const PRIMITIVES: &[(&str, usize)] =
    &[("migrate", 1), ("receive", 0), ("receive", 1), ("send", 2)];

/// The names an agent may not define functions under.
pub(crate) const RESERVED_FUNCTIONS: &[&str] = &[
    "migrate", "receive", "send", "here", "home", "nodes", "id", "hops", "resource",
];

/// The value carried by `exit(value)`: Rhai's own `exit` would end only the statement the executor
/// delegated, so the sandbox replaces it with a non-catchable termination carrying this token.
#[derive(Debug, Clone)]
pub struct ExitValue(pub Dynamic);

/// If `err` is the termination raised by `exit(value)`, the value the agent exited with.
pub fn exit_value(err: &EvalAltResult) -> Option<Dynamic> {
    match err {
        EvalAltResult::ErrorTerminated(token, _) => {
            token.read_lock::<ExitValue>().map(|v| v.0.clone())
        }
        _ => None,
    }
}

/// A plain sandboxed engine with `limits` applied and no host functions: what the executor
/// builds on, and what a test oracle uses to run a script in plain Rhai under the same rules.
///
/// The sandbox: no `eval`, no modules, strict variables (undefined names are compile errors),
/// depth and operation limits, `exit` ending the whole agent. Rhai's per-object size limits are
/// not set: they cost a walk of the whole value after every change. Memory is bounded per agent
/// by the executor's meter instead ([`crate::meter`]), and the built-ins that allocate what
/// their arguments ask are re-registered to ask the meter first ([`crate::sized`]). Comparing
/// and printing arrays and maps are re-registered to walk deep nesting without Rhai's dispatch
/// at every level ([`crate::nested`]).
pub fn sandboxed_engine(limits: &Limits) -> Engine {
    let mut engine = Engine::new();
    engine.disable_symbol("eval");
    engine.disable_symbol("import");
    engine.disable_symbol("export");
    engine.set_module_resolver(rhai::module_resolvers::DummyModuleResolver::new());
    engine.set_strict_variables(true);
    engine.set_max_operations(limits.max_operations);
    engine.set_max_call_levels(limits.max_call_depth);
    engine.set_max_expr_depths(64, 64);
    engine.set_max_modules(0);
    crate::sized::register(&mut engine);
    crate::nested::register(&mut engine);
    engine.register_fn("exit", |v: Dynamic| -> Result<(), Box<EvalAltResult>> {
        Err(EvalAltResult::ErrorTerminated(Dynamic::from(ExitValue(v)), Position::NONE).into())
    });
    engine.register_fn("exit", || -> Result<(), Box<EvalAltResult>> {
        Err(
            EvalAltResult::ErrorTerminated(Dynamic::from(ExitValue(Dynamic::UNIT)), Position::NONE)
                .into(),
        )
    });
    engine
}

/// The engine programs are compiled and run with: the sandbox plus the host API.
pub(crate) fn agent_engine(limits: &Limits) -> Engine {
    let mut engine = sandboxed_engine(limits);
    let max_operations = limits.max_operations;
    engine.on_progress(move |operations| {
        crate::meter::check(operations, max_operations).map(Dynamic::from)
    });
    engine.on_print(|s| {
        let _ = crate::meter::outside_the_agent(|| with_host(|h| (h.printer)(s)));
    });
    engine.on_debug(|s, _, _| {
        let _ = crate::meter::outside_the_agent(|| with_host(|h| (h.printer)(s)));
    });
    engine.register_fn("here", || {
        with_host(|h| ImmutableString::from(h.here.as_str()))
    });
    engine.register_fn("home", || {
        with_host(|h| ImmutableString::from(h.home.as_str()))
    });
    engine.register_fn("id", || {
        with_host(|h| ImmutableString::from(h.agent_id.as_str()))
    });
    engine.register_fn("hops", || with_host(|h| h.hops));
    engine.register_fn("nodes", || {
        with_host(|h| {
            h.nodes
                .iter()
                .map(|n| Dynamic::from(ImmutableString::from(n.as_str())))
                .collect::<rhai::Array>()
        })
    });
    crate::resources::register(&mut engine, limits.max_string_size);
    engine.register_fn("migrate", |_: Dynamic| -> Result<(), Box<EvalAltResult>> {
        Err(native_primitive_error("migrate").into())
    });
    engine.register_fn("receive", || -> Result<(), Box<EvalAltResult>> {
        Err(native_primitive_error("receive").into())
    });
    engine.register_fn("receive", |_: Dynamic| -> Result<(), Box<EvalAltResult>> {
        Err(native_primitive_error("receive").into())
    });
    engine.register_fn(
        "send",
        |_: Dynamic, _: Dynamic| -> Result<(), Box<EvalAltResult>> {
            Err(native_primitive_error("send").into())
        },
    );
    engine
}

fn native_primitive_error(name: &str) -> String {
    format!(
        "{name}() cannot suspend the agent here: it was reached from native code (a closure, a \
         function pointer, a method call or an expression); call it as a statement of its own, \
         e.g. `let x = {name}(..);`"
    )
}

/// The error `migrate(name)` throws in the agent when `name` is not a node of the mesh.
pub fn unknown_node_error(name: &str) -> String {
    format!("migrate: no node named '{name}' in the mesh")
}
