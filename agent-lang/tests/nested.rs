//! Deeply nested values: comparing and printing them give plain Rhai's results, or an error past
//! `MAX_WALKED_DEPTH`, never a stack overflow; an execution holding one drops on a small stack.
mod support;

use std::sync::Arc;

use agent_lang::rhai::{Dynamic, Engine};
use agent_lang::{Execution, HostEnv, Limits, Outcome, Program, Resume, MAX_WALKED_DEPTH};

fn env() -> HostEnv {
    HostEnv {
        resources: agent_lang::no_resources(),
        here: "node-0".into(),
        home: "node-0".into(),
        nodes: support::mesh(),
        agent_id: "agent-nested".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    }
}

/// Runs `f` on a thread with `stack` bytes of stack, as a node's slice thread.
fn on_stack<T: Send + 'static>(stack: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(stack)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn tern(source: &str) -> Result<String, String> {
    let program = Program::compile(source, &Limits::default()).unwrap();
    let mut exec = Execution::new(&program);
    match exec.resume(&env(), Resume::Start) {
        Outcome::Finished(v) => Ok(v.to_string()),
        Outcome::Failed(e) => Err(e.message),
        other => panic!("{other:?}"),
    }
}

/// Rhai as it comes, without tern's sandbox: the oracle for comparing and printing.
fn plain(source: &str) -> Result<String, String> {
    Engine::new()
        .eval::<Dynamic>(source)
        .map(|v| v.to_string())
        .map_err(|e| e.to_string())
}

#[test]
fn comparing_and_printing_nested_values_agree_with_plain_rhai() {
    let values = [
        "[]",
        "[1, 2.5, \"s\", 'c', true, ()]",
        "[[1, [2, [3]]], #{a: [1, #{b: \"x\"}]}]",
        "#{a: 1, b: [1, 2], \"c d\": #{e: ()}}",
        "[blob(3, 7), [blob(0)]]",
        "[1, \"1\", 1.0]",
        "[[1], [1.0]]",
        "#{a: 1.0}",
        "[Fn(\"f\"), [Fn(\"g\")]]",
        "[1 .. 3]",
    ];
    let mut checked = 0;
    for a in values {
        for b in values {
            for source in [
                format!("{a} == {b}"),
                format!("{a} != {b}"),
                format!("let x = {a}; x.to_string()"),
                format!("let x = {a}; x.to_debug()"),
                format!("let x = {a}; `${{x}}`"),
                format!("let x = {a}; \"\" + x"),
                format!("let x = [{a}, {b}]; x.contains({b})"),
                format!("let x = [{a}, {b}]; x.index_of({b})"),
            ] {
                let expected = plain(&source);
                let got = tern(&source);
                match (&expected, &got) {
                    (Ok(e), Ok(g)) => assert_eq!(e, g, "{source}"),
                    (Err(_), Err(_)) => {}
                    _ => panic!("{source}: plain Rhai {expected:?}, tern {got:?}"),
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 800);
}

/// A script that nests an array `depth` deep in `a`, then runs `then`.
fn nested(depth: usize, then: &str) -> String {
    format!("let a = []; for i in 0..{depth} {{ a = [a.take()]; }}\n{then}")
}

#[test]
fn values_nested_deeper_than_the_walk_are_an_error_not_an_overflow() {
    let stack = Limits::default().slice_stack_bytes();
    let results = on_stack(stack, || {
        [
            "let b = a; a == b",
            "let b = a; a != b",
            "a.to_string()",
            "print(a)",
            "debug(a)",
        ]
        .map(|then| tern(&nested(200_000, then)))
    });
    for (i, result) in results.into_iter().enumerate() {
        let Err(err) = result else {
            panic!("case {i}: walked past the limit");
        };
        assert!(
            err.contains(&format!("nested more than {MAX_WALKED_DEPTH} deep")),
            "{err}"
        );
    }
    // Interpolation formats with Rust's `Display`, recursive without Rhai's dispatch: it fits the
    // slice's stack.
    let text = on_stack(stack, || tern(&nested(200_000, "`${a}`.len()")));
    assert_eq!(text.unwrap(), (2 * 200_001).to_string());
    // Just within the walk: compared and printed.
    let shallow = on_stack(stack, || {
        tern(&nested(
            MAX_WALKED_DEPTH,
            "let b = a; [a == b, a.to_string().len()]",
        ))
    });
    assert_eq!(
        shallow.unwrap(),
        format!("[true, {}]", 2 * (MAX_WALKED_DEPTH + 1))
    );
    // The error is the script's to catch.
    let caught = on_stack(stack, || {
        tern(&nested(
            100_000,
            "let b = a; let r = \"not caught\"; try { a == b; } catch (e) { r = e; } r",
        ))
    });
    assert!(caught.unwrap().contains("cannot compare"));
}

#[test]
fn an_execution_holding_a_million_levels_drops_on_a_small_stack() {
    let exec = on_stack(Limits::default().slice_stack_bytes(), || {
        let program =
            Program::compile(&nested(1_000_000, "receive()"), &Limits::default()).unwrap();
        let mut exec = Execution::new(&program);
        assert!(matches!(
            exec.resume(&env(), Resume::Start),
            Outcome::Receive { .. }
        ));
        exec
    });
    // A thread of 256 KiB: dropping the value recursively would need hundreds of MiB.
    on_stack(256 << 10, move || drop(exec));
}

#[test]
fn the_executors_variables_are_dropped_on_a_small_stack() {
    // Building a value 300,000 deep does not recurse; dropping it whole would (some 170 bytes
    // of stack a level, 50 MB here). The executor drops the variables it holds (the top level
    // here) when the script ends, returns or throws.
    let build = "let a = []; for i in 0..300000 { a = [a.take()]; }";
    let maps = "let m = #{}; for i in 0..300000 { m = #{m: m.take()}; }";
    let cases = [
        (format!("{build} 1"), Ok("1".to_string())),
        (format!("{maps} 1"), Ok("1".to_string())),
        (
            format!("let f = Fn(\"x\"); {build} f = f.curry(a.take()); 1"),
            Ok("1".to_string()),
        ),
        (
            format!("{build} throw \"out\";"),
            Err("Runtime error: out".to_string()),
        ),
    ];
    for (source, expected) in cases {
        let result = on_stack(4 << 20, {
            let source = source.clone();
            move || tern(&source)
        });
        assert_eq!(result, expected, "{source}");
    }
    // A variable a closure captured lives on with the closure: it is not taken apart.
    for source in [
        "let f = { let a = [1, [2, [3]]]; || a }; f.call()",
        "let f = { let a = #{x: [1]}; let g = || a; g }; f.call().x",
        "fn make() { let a = [[1], 2]; || a } let f = make(); f.call()",
    ] {
        assert_eq!(tern(source), plain(source), "{source}");
    }
}

#[test]
fn a_result_nested_too_deep_for_json_is_an_error() {
    let program = Program::compile(&nested(1_000, "a"), &Limits::default()).unwrap();
    let mut exec = Execution::new(&program);
    let Outcome::Finished(v) = exec.resume(&env(), Resume::Start) else {
        panic!("finishes");
    };
    let err = agent_lang::to_json(&v).unwrap_err();
    assert!(err.to_string().contains("nested too deeply"), "{err}");
    assert!(agent_lang::to_json(&Dynamic::from_array(vec![Dynamic::UNIT])).is_ok());
}
