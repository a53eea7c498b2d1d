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
