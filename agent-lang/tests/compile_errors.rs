//! Forms the executor cannot suspend and resume are refused at compile time, naming line and
//! column and saying how to rewrite them.

use agent_lang::{CompileError, Limits, Program};

/// Compiles `src`, expects an `Unresumable` refusal at (line, column), and returns its message.
fn refused(src: &str, line: usize, column: usize) -> String {
    match Program::compile(src, &Limits::default()) {
        Err(e @ CompileError::Unresumable { .. }) => {
            assert_eq!(
                e.position(),
                (line, column),
                "wrong position for {src:?}: {e}"
            );
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("line {line}, column {column}")),
                "{msg}"
            );
            msg
        }
        other => panic!("expected a refusal for {src:?}, got {other:?}"),
    }
}

const HOP: &str = "fn hop(n) { migrate(\"node-1\"); n }\n";

#[test]
fn primitive_inside_arithmetic() {
    let m = refused("let x = 1 + migrate(\"a\");", 1, 13);
    assert!(m.contains("assign"), "{m}");
}

#[test]
fn primitive_in_if_condition() {
    refused("if migrate(\"a\") == () { 1 }", 1, 4);
}

#[test]
fn mobile_function_called_as_method() {
    let m = refused(&format!("{HOP}let a = 1;\na.hop();"), 3, 3);
    assert!(m.contains("call it as a function"), "{m}");
}

#[test]
fn mobile_method_call_inside_expression() {
    refused(&format!("{HOP}let a = 1;\nlet b = a.hop() + 1;"), 3, 11);
}

#[test]
fn mobile_call_inside_mobile_call_arguments() {
    let m = refused(&format!("{HOP}let x = hop(hop(1));"), 2, 13);
    assert!(m.contains("arguments of `hop`"), "{m}");
}

#[test]
fn mobile_call_inside_native_call_arguments() {
    refused(&format!("{HOP}print(hop(1));"), 2, 7);
}

#[test]
fn mobile_call_inside_array_literal() {
    refused(&format!("{HOP}let a = [hop(1), 2];"), 2, 10);
}

#[test]
fn mobile_call_in_while_condition() {
    refused(&format!("{HOP}while hop(1) > 0 {{ }}"), 2, 7);
}

#[test]
fn mobile_call_in_do_condition() {
    refused(&format!("{HOP}do {{ }} while hop(1) < 0;"), 2, 14);
}

#[test]
fn mobile_call_in_for_iterable() {
    refused(&format!("{HOP}for x in hop([1]) {{ }}"), 2, 10);
}

#[test]
fn mobile_call_in_switch_value() {
    refused(&format!("{HOP}switch hop(1) {{ _ => 0 }}"), 2, 8);
}

#[test]
fn mobile_call_in_switch_condition() {
    refused(
        &format!("{HOP}let x = 1;\nswitch x {{ 1 if hop(1) > 0 => 0, _ => 1 }}"),
        3,
        17,
    );
}

#[test]
fn mobile_call_inside_switch_arm_expression() {
    let m = refused(
        &format!("{HOP}let x = 1;\nswitch x {{ 1 => hop(1) + 1, _ => 1 }}"),
        3,
        17,
    );
    assert!(m.contains("block arm"), "{m}");
}

#[test]
fn mobile_call_in_assignment_target() {
    refused(&format!("{HOP}let a = [1, 2];\na[hop(1)] = 5;"), 3, 3);
}

#[test]
fn mobile_call_inside_return_expression() {
    refused(&format!("{HOP}fn f() {{ return 1 + hop(1); }}\nf()"), 2, 21);
}

#[test]
fn mobile_call_in_throw_value() {
    refused(&format!("{HOP}throw hop(1);"), 2, 7);
}

#[test]
fn mobile_call_in_break_value() {
    // Regression: Rhai's own AST walk skips `break` values, so this used to compile and then
    // fail at run time ("reached from native code").
    refused(&format!("{HOP}loop {{ break hop(1); }}"), 2, 14);
    refused(
        &format!("{HOP}let i = 0;\nlet x = loop {{ i += 1; if i > 2 {{ break hop(i); }} }};"),
        3,
        41,
    );
}

#[test]
fn mobile_call_in_string_interpolation() {
    refused(&format!("{HOP}let s = `x${{hop(1)}}`;"), 2, 13);
}

#[test]
fn block_value_inside_larger_expression() {
    // A walked `if` used as a value is fine on its own (`let x = if ..`), not inside arithmetic.
    refused(
        "let x = 1 + if true { migrate(\"node-1\"); 2 } else { 3 };",
        1,
        23,
    );
}

#[test]
fn redefining_a_host_function_is_refused() {
    match Program::compile("fn migrate(x) { x }\n1", &Limits::default()) {
        Err(CompileError::Syntax { message, .. }) => {
            assert!(message.contains("host function"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn supported_forms_compile() {
    for src in [
        "let x = migrate(\"a\");",
        "migrate(\"a\");",
        "fn f() { migrate(\"a\"); 1 } let x = f(); x = f(); x += f(); let a = [0]; a[0] = f(); let m = #{}; m.k = f(); f();",
        "fn f() { return migrate(\"a\"); } f()",
        "let x = if true { migrate(\"a\"); 1 } else { 2 };",
        "let x = loop { migrate(\"a\"); break 1; };",
        "let x = switch 1 { 1 => migrate(\"a\"), _ => 2 };",
        "let x = 1; switch x { 1 => migrate(\"a\"), 2 if x > 0 => { migrate(\"a\"); } 3..5 => (), _ => () }",
    ] {
        if let Err(e) = Program::compile(src, &Limits::default()) {
            panic!("{src}: {e}");
        }
    }
}
