//! The per-agent memory budget, measured by the metered allocator this test binary installs:
//! what an agent holds is counted across slices and hops, what it frees is given back, growth
//! costs O(change), and built-ins whose arguments choose their size ask before they allocate.
mod support;

use std::alloc::System;
use std::sync::Arc;

use agent_lang::{
    encode_portable, AgentErrorKind, DecodeError, Execution, HostEnv, Limits, Metered, Outcome,
    Program, Resume,
};

#[global_allocator]
static ALLOCATOR: Metered<System> = Metered(System);

fn env() -> HostEnv {
    HostEnv {
        resources: agent_lang::no_resources(),
        here: "node-0".into(),
        home: "node-0".into(),
        nodes: support::mesh(),
        agent_id: "agent-memory".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    }
}

fn start(source: &str, limits: &Limits) -> Execution {
    let program = Program::compile(source, limits).unwrap();
    Execution::new(&program)
}

/// Runs `source` to its end, travelling (encode, decode) at every `migrate`.
fn run(source: &str, limits: &Limits) -> Outcome {
    let program = Program::compile(source, limits).unwrap();
    let mut exec = Execution::new(&program);
    loop {
        match exec.resume(&env(), Resume::Start) {
            Outcome::Migrate { .. } => {
                let bytes = exec.encode().unwrap();
                drop(exec);
                exec = Execution::decode(&program, &bytes).unwrap();
            }
            other => return other,
        }
    }
}

fn failure(outcome: Outcome) -> agent_lang::AgentError {
    match outcome {
        Outcome::Failed(e) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}

fn budget(mib: u64) -> Limits {
    Limits::default().with_max_memory_bytes(mib << 20)
}

/// How `source` ends under a memory budget of `mib` MiB: over it.
fn over_budget(source: &str, mib: u64) -> agent_lang::AgentError {
    let e = failure(run(source, &budget(mib)));
    assert_eq!(e.kind, AgentErrorKind::MemoryBudget, "{source}: {e}");
    e
}

#[test]
fn the_allocator_is_metered_in_this_binary() {
    assert!(agent_lang::memory_is_metered());
}

#[test]
fn a_million_pushes_finish() {
    let outcome = run(
        "let a = []; for i in 0..1000000 { a.push(i); } a.len()",
        &Limits::default(),
    );
    match outcome {
        Outcome::Finished(v) => assert_eq!(v.as_int(), Ok(1_000_000)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn arrays_held_together_beyond_the_budget_end_the_agent_at_the_statement() {
    // Each array is well under any per-object limit; together they pass 16 MiB.
    let e = over_budget(
        "let all = [];\nloop {\n  let a = []; a.pad(100000, 0); all.push(a);\n}\n",
        16,
    );
    assert!(e.message.contains("memory budget of 16777216 bytes"), "{e}");
    assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
}

#[test]
fn an_agent_stopped_while_nesting_arrays_ends_on_a_small_stack() {
    // 16 MiB of arrays one in another is some 400,000 levels: dropped whole as the error
    // unwinds, 70 MB of stack. A slice thread has room for it, but every page it touches stays
    // with the process.
    let e = std::thread::Builder::new()
        .stack_size(4 << 20)
        .spawn(|| failure(run("let a = []; loop { a = [a.take()]; }", &budget(16))))
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(e.kind, AgentErrorKind::MemoryBudget, "{e}");
}

#[test]
fn the_memory_budget_is_not_catchable() {
    over_budget(
        "let all = []; try { loop { all.push(blob(1000000)); } } catch (err) { 0 }",
        8,
    );
}

#[test]
fn what_an_agent_frees_is_given_back() {
    // 200 rounds of 4 MB each, under a budget of 16 MiB: only one round is held at a time.
    let outcome = run(
        "let n = 0; for i in 0..200 { let b = blob(4000000, i); n += b.len(); } n",
        &budget(16),
    );
    match outcome {
        Outcome::Finished(v) => assert_eq!(v.as_int(), Ok(800_000_000)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn what_an_agent_holds_travels_with_it() {
    // 6 MB taken on each of four hops: under 16 MiB on every node only if nothing is counted
    // twice, over 16 MiB once the fourth is taken if what it held before a hop still counts.
    let source =
        "let all = [];\nfor i in 0..4 { all.push(blob(6000000)); migrate(\"node-1\"); }\nall.len()";
    let e = over_budget(source, 16);
    assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    match run(source, &budget(32)) {
        Outcome::Finished(v) => assert_eq!(v.as_int(), Ok(4)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_continuation_over_the_receivers_budget_is_refused_when_decoded() {
    let limits = budget(64);
    let program = Program::compile(
        "let b = blob(20000000); migrate(\"node-1\"); b.len()",
        &limits,
    )
    .unwrap();
    let mut exec = Execution::new(&program);
    assert!(matches!(
        exec.resume(&env(), Resume::Start),
        Outcome::Migrate { .. }
    ));
    let bytes = exec.encode().unwrap();
    drop(exec);
    let small = Program::compile(
        "let b = blob(20000000); migrate(\"node-1\"); b.len()",
        &budget(8),
    )
    .unwrap();
    match Execution::decode(&small, &bytes) {
        Err(DecodeError::OverMemoryBudget { held, max }) => {
            assert!(held >= 20_000_000, "{held}");
            assert_eq!(max, 8 << 20);
        }
        other => panic!("{other:?}"),
    }
    let exec = Execution::decode(&program, &bytes).unwrap();
    assert!(exec.memory() >= 20_000_000, "{}", exec.memory());
}

#[test]
fn messages_received_and_sent_do_not_drift_the_count() {
    // 10,000 rounds of receiving a 10 kB message and sending it on: what the agent holds at the
    // end is what one round holds, not what all of them moved.
    let limits = budget(4);
    let mut exec = start(
        "let n = 0; loop { let m = receive(); if m == () { break; } n += m.len(); send(\"peer\", m); } n",
        &limits,
    );
    let message =
        encode_portable(&agent_lang::rhai::Dynamic::from_blob(vec![7u8; 10_000])).unwrap();
    let mut outcome = exec.resume(&env(), Resume::Start);
    for round in 0..10_000 {
        assert!(
            matches!(outcome, Outcome::Receive { .. }),
            "round {round}: {outcome:?}"
        );
        outcome = exec.resume(&env(), Resume::Message(message.clone()));
        let Outcome::Send { message: sent, .. } = outcome else {
            panic!("round {round}: {outcome:?}");
        };
        assert_eq!(sent.len(), message.len());
        outcome = exec.resume(&env(), Resume::Start);
    }
    assert!(exec.memory() < 100_000, "{} bytes held", exec.memory());
    match exec.resume(&env(), Resume::Value(().into())) {
        Outcome::Finished(v) => assert_eq!(v.as_int(), Ok(100_000_000)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn copying_a_growing_value_costs_operations() {
    // `a = [a]` copies `a` whole: one Rhai operation that copies more each time. The copies are
    // charged as operations, so this ends long before 40,000 rounds (it took 72 s when each
    // was one operation).
    let e = failure(run(
        "let a = []; for i in 0..40000 { a = [a]; }",
        &Limits::default().with_max_operations(1_000_000),
    ));
    assert_eq!(e.kind, AgentErrorKind::OperationLimit, "{e}");
}

#[test]
fn built_ins_that_take_a_size_ask_before_allocating() {
    for source in [
        "blob(1 << 40)",
        "blob(1 << 40, 7)",
        "let b = blob(); b.pad(1 << 40, 0); b",
        "let a = []; a.pad(1 << 40, 0); a",
        "let a = []; a.pad(1 << 40, \"x\"); a",
        "let s = \"\"; s.pad(1 << 40, \"x\"); s",
        "let s = \"\"; s.pad(1 << 40, 'x'); s",
        "let s = \"ab\"; let big = \"x\"; big.pad(1000000, 'x'); s.replace(\"\", big); s",
    ] {
        over_budget(source, 1);
    }
}

#[test]
fn padding_with_nothing_returns() {
    match run("let s = \"ab\"; s.pad(10, \"\"); s", &Limits::default()) {
        Outcome::Finished(v) => assert_eq!(v.into_string().unwrap(), "ab"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn printing_is_not_charged_to_the_agent() {
    match run(
        "for i in 0..100000 { print(`line ${i}`); } 1",
        &Limits::default().with_max_memory_bytes(1 << 20),
    ) {
        Outcome::Finished(v) => assert_eq!(v.as_int(), Ok(1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn strings_grown_a_little_at_a_time_cost_what_they_grow() {
    // Each `+=` reallocates the string a few bytes larger; counting every new size whole would
    // charge 10^12 bytes here, and end the agent long before 4 MB are built.
    let limits = Limits::default().with_max_operations(20_000_000);
    for (source, expected) in [
        (
            "let t = \"\"; for i in 0..1000000 { t += \"ab\"; } t.len()",
            2_000_000,
        ),
        (
            "let t = \"\"; for i in 0..1000000 { t += 'x'; } t.len()",
            1_000_000,
        ),
        ("let s = \"\"; s.pad(4000000, \"ab\"); s.len()", 4_000_000),
        ("let s = \"\"; s.pad(4000000, 'é'); s.len()", 4_000_000),
    ] {
        match run(source, &limits) {
            Outcome::Finished(v) => assert_eq!(v.as_int(), Ok(expected), "{source}"),
            other => panic!("{source}: {other:?}"),
        }
    }
}

#[test]
fn built_ins_that_multiply_their_input_stop_at_the_budget() {
    // Each makes an array many times the size of its input in one call.
    for source in [
        "let s = \"\"; s.pad(4000000, \" \"); s.split(\" \")",
        "let s = \"\"; s.pad(4000000, \" \"); s.split(' ')",
        "let s = \"\"; s.pad(4000000, \" \"); s.split_rev(\" \")",
        "let s = \"\"; s.pad(4000000, \" \"); s.split(\" \", 1 << 40)",
        "let s = \"\"; s.pad(4000000, \"a b\"); s.split()",
        "let s = \"\"; s.pad(4000000, \"x\"); s.to_chars()",
        "let b = blob(4000000); b.to_array()",
    ] {
        let e = over_budget(source, 16);
        // Stopped near the budget, not after the whole array was made (hundreds of MB).
        let took: u64 = e
            .message
            .split("took ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{e}"));
        assert!(took < 20 << 20, "{source}: {took} bytes");
    }
}

#[test]
fn built_ins_that_multiply_their_input_give_plain_rhais_results() {
    let oracle = agent_lang::rhai::Engine::new();
    let mut checked = 0;
    for s in ["", " ", "a", "a b  c ", "ab,cd,,ef", "é,ü ,", ",,"] {
        for call in [
            "split()",
            "split(\",\")",
            "split(\"\")",
            "split(',')",
            "split(\",\", 2)",
            "split(\",\", 0)",
            "split(',', 3)",
            "split_rev(\",\")",
            "split_rev(\",\", 2)",
            "split_rev(',')",
            "split_rev(',', 2)",
            "to_chars()",
            "to_blob().to_array()",
        ] {
            let source = format!("let s = {s:?}; s.{call}");
            let expected = oracle
                .eval::<agent_lang::rhai::Dynamic>(&source)
                .unwrap()
                .to_string();
            match run(&source, &Limits::default()) {
                Outcome::Finished(v) => assert_eq!(v.to_string(), expected, "{source}"),
                other => panic!("{source}: {other:?}"),
            }
            checked += 1;
        }
    }
    for source in [
        "let m = #{b: [1, 2], a: \"x\"}; [m.keys(), m.values()]",
        "let m = #{}; [m.keys(), m.values()]",
        "const S = \"a,b\"; S.split(\",\")",
    ] {
        let expected = oracle
            .eval::<agent_lang::rhai::Dynamic>(source)
            .unwrap()
            .to_string();
        match run(source, &Limits::default()) {
            Outcome::Finished(v) => assert_eq!(v.to_string(), expected, "{source}"),
            other => panic!("{source}: {other:?}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 7 * 13 + 3);
}
