//! The lifetime operation budget: a host that keeps the count and passes what is left to
//! `resume_within` stops an agent that suspends often (so that no one slice runs long) once all
//! its slices together reach the budget.
mod support;

use std::sync::Arc;

use agent_lang::{AgentErrorKind, Execution, HostEnv, Limits, Outcome, Program, Resume};

fn env() -> HostEnv {
    HostEnv {
        resources: agent_lang::no_resources(),
        here: "node-0".into(),
        home: "node-0".into(),
        nodes: support::mesh(),
        agent_id: "agent-budget".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    }
}

/// Resumes `exec` as a host would, with the budget left, until it ends: the outcome, the
/// operations counted in all, and the slices run.
fn run_with_budget(exec: &mut Execution, budget: u64) -> (Outcome, u64, u64) {
    let (mut used, mut slices) = (0u64, 0u64);
    loop {
        let outcome = exec.resume_within(&env(), Resume::Start, budget.saturating_sub(used));
        used += exec.slice_operations();
        slices += 1;
        match outcome {
            Outcome::Migrate { .. } | Outcome::Receive { .. } => {}
            other => return (other, used, slices),
        }
    }
}

#[test]
fn an_agent_that_suspends_often_stops_at_its_budget() {
    // Each slice is a few operations under a per-slice limit of 2,000; a million slices would
    // run far past a budget of 50,000.
    let limits = Limits::default().with_max_operations(2_000);
    let program = Program::compile(
        "let n = 0; while n < 1000000 { n += 1; migrate(\"node-1\"); } n",
        &limits,
    )
    .unwrap();
    let mut exec = Execution::new(&program);
    let (outcome, used, slices) = run_with_budget(&mut exec, 50_000);
    match outcome {
        Outcome::Failed(e) => {
            assert_eq!(e.kind, AgentErrorKind::OperationBudget, "{e}");
            assert!(e.message.contains("operation budget"), "{e}");
            assert!(e.position.is_some(), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // (The operation that goes over is counted, as Rhai counts it for the per-slice limit.)
    assert!((50_000..=50_001).contains(&used), "{used}");
    assert!(slices > 1_000, "{slices} slices");
}

#[test]
fn the_per_slice_limit_still_applies_under_a_larger_budget() {
    let limits = Limits::default().with_max_operations(2_000);
    let program = Program::compile("loop { }", &limits).unwrap();
    let mut exec = Execution::new(&program);
    let (outcome, used, _) = run_with_budget(&mut exec, 1_000_000);
    match outcome {
        Outcome::Failed(e) => assert_eq!(e.kind, AgentErrorKind::OperationLimit, "{e}"),
        other => panic!("{other:?}"),
    }
    assert!((2_000..=2_001).contains(&used), "{used}");
}

#[test]
fn slices_count_what_the_agent_ran_and_a_budget_large_enough_changes_nothing() {
    let limits = Limits::default().with_max_operations(2_000);
    let source = "let t = 0; for i in 0..20 { t += i; migrate(\"node-1\"); } t";
    let program = Program::compile(source, &limits).unwrap();
    let mut exec = Execution::new(&program);
    let (outcome, used, slices) = run_with_budget(&mut exec, u64::MAX);
    match outcome {
        Outcome::Finished(v) => assert_eq!(v.as_int().unwrap(), 190),
        other => panic!("{other:?}"),
    }
    assert_eq!(slices, 21);
    assert!(used >= 40, "{used} operations for 20 iterations");
    // With exactly that budget it still finishes; with one less it does not.
    let mut exact = Execution::new(&program);
    assert!(matches!(
        run_with_budget(&mut exact, used).0,
        Outcome::Finished(_)
    ));
    let mut short = Execution::new(&program);
    assert!(matches!(
        run_with_budget(&mut short, used - 1).0,
        Outcome::Failed(_)
    ));
}
