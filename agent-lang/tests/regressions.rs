//! Regression tests for executor disagreements with plain Rhai found by the differential tests.
mod support;
use support::*;

/// `let x = if ..`, `x = switch ..`, `return loop ..` whose blocks hop used to be refused as
/// "a call inside a larger expression"; they are now walked blocks whose value completes the
/// statement.
#[test]
fn block_values_with_hops_complete_their_statement() {
    check("let v = if true { migrate(\"node-1\"); 5 } else { 0 }; [v, here()]");
    check("let k = 0; let v = loop { k += 1; migrate(nodes()[k % 3]); if k > 3 { break k * 7; } }; [v, hops()]");
    check("let x = 1; x += switch x { 1 => { migrate(\"node-2\"); 10 } _ => 0 }; x");
    check("fn f() { return while true { migrate(\"node-1\"); break here(); }; } let r = f(); r");
    check("let m = #{ a: 0 }; m.a = { let t = 2; migrate(\"node-1\"); t * t }; m");
    check("let out = 0; for k in 0..5 { let x = { if k == 3 { break; } migrate(\"node-1\"); k }; out += x; } out");
}

/// `for i in range(a, b, step)` with a hop used to materialize the whole range as an array
/// (and ship what was left at every hop): a large stepped range ran out of operations where
/// Rhai finishes at once. It is now iterated lazily, exactly like Rhai's `StepRange`
/// (including its overflow edge).
#[test]
fn stepped_range_is_iterated_lazily() {
    let (_, trace) = check("let s = 0; for i in range(0, 20000000, 1) { if i == 0 { migrate(\"node-1\"); } s += i; if s > 50 { break; } } s");
    assert!(trace.bytes < 1000, "{} bytes for one hop", trace.bytes);
    check("let s = []; for i in range(9223372036854775800, 9223372036854775807, 3) { migrate(\"node-1\"); s.push(i); } s");
    check("let s = []; for i in range(-9223372036854775800, -9223372036854775807, -3) { migrate(\"node-1\"); s.push(i); } s");
    check("let s = []; for (i, k) in range(5, -5, -4) { migrate(\"node-1\"); s.push([i, k]); } s");
    check("let s = []; for i in range(0.0, 2.0, 0.5) { migrate(\"node-1\"); s.push(i); } s");
    check("let s = []; for i in range(0, 5, 0) { migrate(\"node-1\"); s.push(i); } s");
    check("let s = []; for i in range(7, 8, 100) { migrate(\"node-1\"); s.push(i); } for i in range(5, 0, 1) { s.push(i); } s");
}

/// `global::NAME` read a module-level constant only until the first suspension: the global
/// constants Rhai collects as the main body runs are not part of a continuation (issue 14,
/// item 1). Each slice now rebuilds them from the main frame's top level.
#[test]
fn global_constants_are_read_after_a_hop() {
    check("const KEY = 38; fn f(x) { x + global::KEY } migrate(\"node-1\"); f(4)");
    check("const KEY = 38; fn f(x) { x + global::KEY } migrate(\"node-1\"); const KEY = 1; let k = 5; [f(4), k]");
    check("const A = [1, 2]; fn f() { global::A.len() + global::B } const B = 3; migrate(\"node-1\"); let r = f(); migrate(\"node-2\"); [r, f(), here()]");
    check("fn f() { global::C } const C = \"c\"; let r = []; for i in 0..3 { migrate(nodes()[i]); r.push(f()); } r");
    // A constant in a nested block is not global, before a hop or after.
    check("fn f() { global::D } { const D = 4; migrate(\"node-1\"); f() }");
    check("fn f() { global::D } let r = 0; { const D = 4; r = f(); } migrate(\"node-1\"); r");
    // Shadowed by a variable in a nested block: the constant is still the global one.
    check("const E = 5; fn f() { global::E } { let E = 6; migrate(\"node-1\"); [f(), E] }");
    // Read in a function that hops itself.
    check("const G = 7; fn f() { migrate(\"node-1\"); global::G * 2 } f()");
}

/// `for x in blob` gives `x` as Rhai's `u8`, which could not travel: a `migrate` in the loop
/// threw (issue 14, item 2). A byte is now a portable value (tag `TAG_BYTE`).
#[test]
fn blob_loops_hop() {
    check("let b = blob(3, 7); b[1] = 200; let s = []; for x in b { migrate(\"node-1\"); s.push(x); } s");
    check("let b = blob(4, 1); let n = 0; for x in b { migrate(nodes()[n % 3]); n += 1; } [n, here()]");
    check("let b = blob(3, 9); let r = []; for (x, i) in b { migrate(\"node-2\"); r.push([x, i]); } r");
    check("let b = blob(2, 5); let s = 0; for x in b { migrate(\"node-1\"); s += x; } s");
    check("fn f(b) { let last = (); for x in b { migrate(\"node-1\"); last = x; } last } f(blob(5, 3))");
}

#[test]
fn a_byte_is_portable_and_only_a_byte() {
    let program = agent_lang::Program::compile("1", &agent_lang::Limits::default()).unwrap();
    let byte = agent_lang::rhai::Dynamic::from(200u8);
    let bytes = agent_lang::encode_portable(&byte).unwrap();
    let back = agent_lang::decode_portable(&program, &bytes).unwrap();
    assert_eq!(back.clone().try_cast::<u8>(), Some(200));
    assert!(agent_lang::check_portable(&program, &bytes).is_ok());
    // The tag over 256: refused by both readers alike.
    // (200 is `0x18 0xc8` after the tag; 256 is `0x19 0x01 0x00`.)
    assert_eq!(bytes[bytes.len() - 2..], [0x18, 0xc8]);
    let mut bad = bytes[..bytes.len() - 2].to_vec();
    bad.extend([0x19, 0x01, 0x00]);
    let decoded = agent_lang::decode_portable(&program, &bad).unwrap_err();
    let checked = agent_lang::check_portable(&program, &bad).unwrap_err();
    assert_eq!(decoded.to_string(), checked.to_string());
    assert!(decoded.to_string().contains("invalid byte"), "{decoded}");
}

/// A result is written as JSON as Rhai's own serialisation writes it: a curried function
/// pointer or a closure with captures was its bare name (issue 14, item 5); it is now an array
/// of its name and the curried values. Every other kind of value is checked against the same
/// oracle.
#[test]
fn results_are_written_as_rhai_serialises_them() {
    let engine = agent_lang::sandboxed_engine(&agent_lang::Limits::default());
    for source in [
        "fn add(a, b) { a + b } Fn(\"add\").curry(40)",
        "fn f(a, b, c) { a } Fn(\"f\").curry([1, #{ k: 'c' }]).curry(())",
        "let x = 5; let f = |y| x + y; f",
        "let x = [1]; let f = |y| x + y; [f, #{ g: f }]",
        "|x| x + 1",
        "Fn(\"abs\")",
        "[(), true, 1, -2.5, 'c', \"s\", blob(3, 7), #{ b: 1, a: [#{}] }]",
        "[0.0 / 0.0, 1.0 / 0.0]",
    ] {
        let value = engine.eval::<agent_lang::rhai::Dynamic>(source).unwrap();
        let oracle = serde_json::to_value(&value).unwrap();
        assert_eq!(agent_lang::to_json(&value).unwrap(), oracle, "{source}");
    }
    // Through the executor, made after a hop, the same.
    check("fn add(a, b) { a + b } migrate(\"node-1\"); let x = [1]; [Fn(\"add\").curry(here()), |y| x + y]");
}

/// `break` and `return` as the last operand of `??` (issue 14, item 3) were refused once the
/// enclosing block held a `migrate`. The operands before the last run as one expression, and
/// the last is walked like a block: it may jump, or call something that suspends.
#[test]
fn coalesce_with_break_return_or_a_hop() {
    check("fn f(x) { let y = x ?? return -1; migrate(\"node-1\"); y + 1 } let a = f(()); let b = f(2); [a, b, here()]");
    check(
        "fn f(x) { migrate(\"node-2\"); x ?? return here(); } let a = f(()); let b = f(5); [a, b]",
    );
    check("let r = []; for x in [1, (), 3] { migrate(\"node-1\"); let y = x ?? break 42; r.push(y); } r");
    check("let r = []; for x in [1, (), 3] { let y = x ?? continue; migrate(\"node-1\"); r.push(y); } r");
    check("let v = loop { migrate(\"node-2\"); let k = () ?? break 7; }; [v, here()]");
    check("let i = 0; let v = loop { i += 1; migrate(nodes()[i % 3]); let k = (if i < 4 { () } else { i }) ?? continue; break k * 10; }; v");
    check("let a = (); let b = (); let s = 0; while true { s += 1; migrate(\"node-1\"); a ?? b ?? break; } s");
    check("let a = (); let s = []; for i in 0..3 { migrate(\"node-1\"); s.push(a ?? i); } s");
    // The last operand may itself suspend, as a mobile function or a block that hops.
    check("fn g() { migrate(\"node-2\"); here() } let x = (); let y = x ?? g(); [y, here()]");
    check("let x = (); let y = x ?? { migrate(\"node-1\"); 5 }; [y, here()]");
    check("let x = 3; let y = x ?? { migrate(\"node-1\"); 5 }; [y, here()]");
    check("let x = (); x = x ?? { migrate(\"node-2\"); 9 }; [x, here()]");
    check("fn g() { migrate(\"node-1\"); () } let y = () ?? g(); y");
}

/// An operand of `??` before the last that must be walked is refused, naming where.
#[test]
fn coalesce_refuses_a_walked_operand_before_the_last() {
    let program = agent_lang::Program::compile(
        "fn g() { migrate(\"node-1\"); 1 } let x = (); let y = x ?? g() ?? 2; y",
        &agent_lang::Limits::default(),
    );
    match program {
        Err(e @ agent_lang::CompileError::Unresumable { .. }) => {
            assert!(
                e.to_string()
                    .contains("operand of `??` other than the last"),
                "{e}"
            )
        }
        other => panic!("{other:?}"),
    }
}
