//! Test support: the plain-Rhai oracle and an in-memory mesh that runs an agent through tern's
//! executor, passing only encoded bytes between nodes.
#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};

use agent_lang::rhai::{Dynamic, EvalAltResult, ImmutableString};
use agent_lang::{
    exit_value, sandboxed_engine, unknown_node_error, Execution, HostEnv, Limits, Outcome, Program,
    Resume,
};

/// The mesh the tests use.
pub fn mesh() -> Vec<String> {
    (0..3).map(|i| format!("node-{i}")).collect()
}

/// What a run produced, comparable between the oracle and tern.
#[derive(Debug, Clone, PartialEq)]
pub enum RunResult {
    Value(String),
    Error(String),
}

fn show(v: &Dynamic) -> String {
    match agent_lang::to_json(v) {
        Ok(json) => format!("{json:?}"),
        Err(e) => format!("no JSON: {e}"),
    }
}

/// Plain Rhai, same sandbox, with a fake `migrate` that only changes what `here()` returns.
pub fn oracle(source: &str, limits: &Limits) -> RunResult {
    let nodes = mesh();
    let here = Arc::new(Mutex::new(nodes[0].clone()));
    let hops = Arc::new(Mutex::new(0i64));
    let mut engine = sandboxed_engine(limits);
    engine.on_print(|_| {});
    {
        let here = here.clone();
        engine.register_fn("here", move || {
            ImmutableString::from(here.lock().unwrap().as_str())
        });
    }
    engine.register_fn("home", || ImmutableString::from("node-0"));
    engine.register_fn("id", || ImmutableString::from("agent-test"));
    {
        let hops = hops.clone();
        engine.register_fn("hops", move || *hops.lock().unwrap());
    }
    {
        let nodes = nodes.clone();
        engine.register_fn("nodes", move || {
            nodes
                .iter()
                .map(|n| Dynamic::from(ImmutableString::from(n.as_str())))
                .collect::<agent_lang::rhai::Array>()
        });
    }
    {
        let (here, hops, nodes) = (here.clone(), hops.clone(), nodes.clone());
        engine.register_fn(
            "migrate",
            move |to: ImmutableString| -> Result<(), Box<EvalAltResult>> {
                if nodes.iter().any(|n| n == to.as_str()) {
                    *here.lock().unwrap() = to.to_string();
                    *hops.lock().unwrap() += 1;
                    Ok(())
                } else {
                    Err(unknown_node_error(&to).into())
                }
            },
        );
    }
    engine.register_fn("receive", || Dynamic::UNIT);
    engine.register_fn("receive", |_: i64| Dynamic::UNIT);
    match engine.eval::<Dynamic>(source) {
        Ok(v) => RunResult::Value(show(&v)),
        Err(e) => match exit_value(&e) {
            Some(v) => RunResult::Value(show(&v)),
            None => RunResult::Error(e.to_string()),
        },
    }
}

/// Statistics of a tern run.
#[derive(Debug, Default, Clone)]
pub struct Trace {
    pub hops: usize,
    pub bytes: usize,
}

/// Runs `source` on the in-memory mesh with tern's executor.
pub fn tern(source: &str, limits: &Limits) -> (RunResult, Trace) {
    let program = match Program::compile(source, limits) {
        Ok(p) => p,
        Err(e) => return (RunResult::Error(format!("compile: {e}")), Trace::default()),
    };
    let nodes = mesh();
    let mut env = HostEnv {
        resources: agent_lang::no_resources(),
        here: nodes[0].clone(),
        home: nodes[0].clone(),
        nodes: nodes.clone(),
        agent_id: "agent-test".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    };
    let mut trace = Trace::default();
    let mut exec = Execution::new(&program);
    let mut input = Resume::Start;
    loop {
        match exec.resume(&env, input) {
            Outcome::Finished(v) => return (RunResult::Value(show(&v)), trace),
            Outcome::Failed(e) => return (RunResult::Error(e.to_string()), trace),
            Outcome::Migrate { to } => {
                if !nodes.contains(&to) {
                    input = Resume::Error(unknown_node_error(&to));
                    continue;
                }
                let bytes = match exec.encode() {
                    Ok(b) => b,
                    Err(e) => return (RunResult::Error(format!("encode: {e}")), trace),
                };
                trace.hops += 1;
                trace.bytes += bytes.len();
                exec = match Execution::decode(&program, &bytes) {
                    Ok(x) => x,
                    Err(e) => return (RunResult::Error(format!("decode: {e}")), trace),
                };
                env.here = to;
                env.hops += 1;
                input = Resume::Start;
            }
            Outcome::Receive { .. } => input = Resume::Value(Dynamic::UNIT),
            other => {
                return (
                    RunResult::Error(format!("unexpected outcome {other:?}")),
                    trace,
                )
            }
        }
    }
}

/// Asserts tern agrees with the oracle on `source` (values must be equal; both must fail or
/// both succeed).
pub fn check(source: &str) -> (RunResult, Trace) {
    let limits = Limits::default().with_max_operations(5_000_000);
    let expected = oracle(source, &limits);
    let (got, trace) = tern(source, &limits);
    match (&expected, &got) {
        (RunResult::Value(a), RunResult::Value(b)) => {
            assert_eq!(a, b, "value differs for:\n{source}")
        }
        (RunResult::Error(a), RunResult::Error(b)) => {
            // Both failed: at run time they must fail the same way (a compile-time refusal by
            // tern of a script plain Rhai rejects too is fine whatever the message).
            if !b.starts_with("compile:") {
                assert_eq!(
                    failure_core(a),
                    failure_core(b),
                    "both failed, differently, for:\n{source}\noracle: {a}\ntern: {b}"
                );
            }
        }
        _ => panic!("oracle {expected:?} vs tern {got:?} for:\n{source}"),
    }
    (got, trace)
}

/// The gist of a run-time failure message, comparable between the oracle and tern: its first
/// line without the position Rhai appends (" (line L, position P)") or tern prefixes
/// ("line L, column C: ").
pub fn failure_core(message: &str) -> String {
    let first = message.lines().next().unwrap_or_default();
    let mut s = first;
    if let Some(rest) = s.strip_prefix("line ") {
        if let Some(i) = rest.find(": ") {
            if rest[..i]
                .split(", column ")
                .all(|p| p.chars().all(|c| c.is_ascii_digit()))
            {
                s = &rest[i + 2..];
            }
        }
    }
    match s.rfind(" (line ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s.to_string(),
    }
}
