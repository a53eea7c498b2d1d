//! Generated agents: random, always-terminating programs built from every walked form, run under
//! tern and under the plain-Rhai oracle; the results must agree.
//!
//! Every program declares the same pool of variables at the top of each body (`v0`..`v3`, an
//! array `arr` and a map `m`), so any generated reference is in scope; integers are kept small
//! (`% 1000`) so the programs mostly succeed and the comparison has something to compare. Loops
//! are bounded by counters that are incremented before anything can `continue`.
mod support;

use std::fmt::Write as _;

use proptest::prelude::*;
use support::*;

const VARS: u8 = 4;

#[derive(Debug, Clone)]
enum E {
    Lit(i64),
    Var(u8),
    Add(Box<E>, Box<E>),
    Sub(Box<E>, Box<E>),
    Mul(Box<E>, Box<E>),
    HereLen,
    Hops,
    /// `global::K0` or `global::K1`: main's top-level constants, read from anywhere.
    Global(u8),
}

#[derive(Debug, Clone, Copy)]
enum CallKind {
    Let,
    Assign,
    AddAssign,
    Index,
    Field,
    Bare,
}

#[derive(Debug, Clone)]
enum S {
    Let(u8, E),
    Assign(u8, E),
    Migrate(E),
    MigrateNowhere,
    Call {
        var: u8,
        func: u8,
        arg: E,
        kind: CallKind,
    },
    Throw(E, E),
    Break,
    Continue,
    Return(E, E),
    If(E, Vec<S>, Vec<S>),
    While(u8, Vec<S>),
    Do(u8, bool, Vec<S>),
    Loop(u8, Vec<S>),
    ForRange(i64, i64, Option<i64>, bool, Vec<S>),
    ForArray(Vec<i64>, Vec<S>),
    ForStr(String, Vec<S>),
    Switch(E, [Vec<S>; 4]),
    Try(Vec<S>, u8, Vec<S>),
    Block(Vec<S>),
    LetIf(u8, E, Vec<S>, E, Vec<S>, E),
    LetLoop(u8, u8, Vec<S>, E),
    /// A loop over a blob of these bytes.
    ForBlob(Vec<u8>, Vec<S>),
    /// A closure without captures, kept in a variable while the body runs, then called.
    Closure(u8, i64, Vec<S>),
    /// `let q = (cond ? () : e) ?? <jump or value>`: the jump is `break`, `continue` or
    /// `return` where one is allowed, a value otherwise.
    Coalesce(u8, E, E, u8),
    /// An array and a map built item by item in a loop whose body runs in between.
    Collect(u8, u8, Vec<S>),
}

fn expr() -> impl Strategy<Value = E> {
    let leaf = prop_oneof![
        4 => (-50i64..50).prop_map(E::Lit),
        6 => (0..VARS).prop_map(E::Var),
        1 => Just(E::HereLen),
        1 => Just(E::Hops),
        1 => (0u8..2).prop_map(E::Global),
    ];
    leaf.prop_recursive(2, 6, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| E::Add(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| E::Sub(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| E::Mul(Box::new(a), Box::new(b))),
        ]
    })
}

fn call_kind() -> impl Strategy<Value = CallKind> {
    prop_oneof![
        Just(CallKind::Let),
        Just(CallKind::Assign),
        Just(CallKind::AddAssign),
        Just(CallKind::Index),
        Just(CallKind::Field),
        Just(CallKind::Bare),
    ]
}

fn stmt() -> impl Strategy<Value = S> {
    let leaf = prop_oneof![
        3 => (0..VARS, expr()).prop_map(|(v, e)| S::Let(v, e)),
        4 => (0..VARS, expr()).prop_map(|(v, e)| S::Assign(v, e)),
        4 => expr().prop_map(S::Migrate),
        1 => Just(S::MigrateNowhere),
        3 => (0..VARS, 0u8..2, expr(), call_kind()).prop_map(|(var, func, arg, kind)| S::Call { var, func, arg, kind }),
        1 => (expr(), expr()).prop_map(|(c, e)| S::Throw(c, e)),
        1 => Just(S::Break),
        1 => Just(S::Continue),
        1 => (expr(), expr()).prop_map(|(c, e)| S::Return(c, e)),
        2 => (0..VARS, expr(), expr(), 0u8..3).prop_map(|(v, c, e, j)| S::Coalesce(v, c, e, j)),
    ];
    leaf.prop_recursive(3, 40, 4, |inner| {
        let body = || prop::collection::vec(inner.clone(), 0..4);
        prop_oneof![
            (expr(), body(), body()).prop_map(|(c, a, b)| S::If(c, a, b)),
            (1u8..4, body()).prop_map(|(n, b)| S::While(n, b)),
            (1u8..4, any::<bool>(), body()).prop_map(|(n, w, b)| S::Do(n, w, b)),
            (1u8..4, body()).prop_map(|(n, b)| S::Loop(n, b)),
            (
                -3i64..3,
                -3i64..6,
                prop::option::of(prop_oneof![Just(2i64), Just(3), Just(-1), Just(-2)]),
                any::<bool>(),
                body()
            )
                .prop_map(|(a, b, step, incl, body)| S::ForRange(a, b, step, incl, body)),
            (prop::collection::vec(-9i64..9, 0..4), body()).prop_map(|(a, b)| S::ForArray(a, b)),
            ("[a-z]{0,3}", body()).prop_map(|(s, b)| S::ForStr(s, b)),
            (expr(), body(), body(), body(), body())
                .prop_map(|(e, a, b, c, d)| S::Switch(e, [a, b, c, d])),
            (body(), 0..VARS, body()).prop_map(|(t, v, c)| S::Try(t, v, c)),
            body().prop_map(S::Block),
            (0..VARS, expr(), body(), expr(), body(), expr())
                .prop_map(|(v, c, a, ea, b, eb)| S::LetIf(v, c, a, ea, b, eb)),
            (0..VARS, 1u8..4, body(), expr()).prop_map(|(v, n, b, e)| S::LetLoop(v, n, b, e)),
            (prop::collection::vec(any::<u8>(), 0..4), body()).prop_map(|(a, b)| S::ForBlob(a, b)),
            (0..VARS, -5i64..5, body()).prop_map(|(v, k, b)| S::Closure(v, k, b)),
            (0..VARS, 1u8..5, body()).prop_map(|(v, n, b)| S::Collect(v, n, b)),
        ]
    })
}

/// A generated agent: the bodies of two mobile functions and of main.
#[derive(Debug, Clone)]
struct Agent {
    f0: Vec<S>,
    f1: Vec<S>,
    main: Vec<S>,
}

fn agent() -> impl Strategy<Value = Agent> {
    (
        prop::collection::vec(stmt(), 0..4),
        prop::collection::vec(stmt(), 0..4),
        prop::collection::vec(stmt(), 1..8),
    )
        .prop_map(|(f0, f1, main)| Agent { f0, f1, main })
}

/// Where a statement is rendered.
#[derive(Clone, Copy)]
struct Ctx {
    /// Innermost enclosing loop (of this body), and whether its value is used (`break value`).
    in_loop: Option<bool>,
    /// In a function (so `return` is allowed).
    in_fn: bool,
    /// Inside a `try` body of this body (so a throw is likely caught).
    in_try: bool,
    /// Functions this body may call: `f0` only from `f1` and main, `f1` only from main.
    callable: u8,
    depth: usize,
}

struct Render {
    out: String,
    next_id: usize,
}

impl Render {
    fn id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    fn line(&mut self, depth: usize, s: &str) {
        for _ in 0..depth {
            self.out.push_str("    ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn expr(e: &E) -> String {
        match e {
            E::Lit(n) => format!("{n}"),
            E::Var(v) => format!("v{v}"),
            E::Add(a, b) => format!("({} + {})", Self::expr(a), Self::expr(b)),
            E::Sub(a, b) => format!("({} - {})", Self::expr(a), Self::expr(b)),
            E::Mul(a, b) => format!("({} * {})", Self::expr(a), Self::expr(b)),
            E::HereLen => "here().len()".into(),
            E::Hops => "hops()".into(),
            E::Global(k) => format!("global::K{k}"),
        }
    }

    fn small(e: &E) -> String {
        format!("({}) % 1000", Self::expr(e))
    }

    fn cond(e: &E) -> String {
        format!("({}) % 3 == 0", Self::expr(e))
    }

    fn node(e: &E) -> String {
        format!("nodes()[(({}) % 3 + 3) % 3]", Self::expr(e))
    }

    fn body(&mut self, stmts: &[S], cx: Ctx) {
        for s in stmts {
            self.stmt(s, cx);
        }
    }

    fn stmt(&mut self, s: &S, cx: Ctx) {
        let d = cx.depth;
        let inner = Ctx { depth: d + 1, ..cx };
        let looped = |value: bool| Ctx {
            in_loop: Some(value),
            depth: d + 1,
            ..cx
        };
        match s {
            S::Let(v, e) => self.line(d, &format!("let v{v} = {};", Self::small(e))),
            S::Assign(v, e) => self.line(d, &format!("v{v} = (v{v} + {}) % 1000;", Self::expr(e))),
            S::Migrate(e) => self.line(d, &format!("migrate({});", Self::node(e))),
            S::MigrateNowhere if cx.in_try => self.line(d, "migrate(\"nowhere\");"),
            S::MigrateNowhere => self.line(
                d,
                "try { migrate(\"nowhere\"); } catch (e) { v3 = (v3 + 1) % 1000; }",
            ),
            S::Call {
                var,
                func,
                arg,
                kind,
            } => {
                if cx.callable == 0 {
                    self.line(d, &format!("migrate({});", Self::node(arg)));
                    return;
                }
                let f = func % cx.callable;
                let call = if f == 0 {
                    format!("f0({})", Self::small(arg))
                } else {
                    format!("f1({}, v{var})", Self::small(arg))
                };
                let line = match kind {
                    CallKind::Let => format!("let v{var} = {call};"),
                    CallKind::Assign => format!("v{var} = {call};"),
                    CallKind::AddAssign => format!("v{var} += {call}; v{var} %= 1000;"),
                    CallKind::Index => format!("arr[((v{var}) % 3 + 3) % 3] = {call};"),
                    CallKind::Field => format!("m.x = {call};"),
                    CallKind::Bare => format!("{call};"),
                };
                self.line(d, &line);
            }
            // Uncaught throws end the agent (in both runs): keep them rare outside `try`.
            S::Throw(..) if !cx.in_try && !cx.in_fn => {}
            S::Throw(c, e) => self.line(
                d,
                &format!("if {} {{ throw {}; }}", Self::cond(c), Self::small(e)),
            ),
            S::Break => match cx.in_loop {
                Some(true) => self.line(d, "break 500;"),
                Some(false) => self.line(d, "break;"),
                None => {}
            },
            S::Continue => {
                if cx.in_loop.is_some() {
                    self.line(d, "continue;");
                }
            }
            S::Return(c, e) => {
                if cx.in_fn {
                    self.line(
                        d,
                        &format!("if {} {{ return {}; }}", Self::cond(c), Self::small(e)),
                    );
                }
            }
            S::If(c, a, b) => {
                self.line(d, &format!("if {} {{", Self::cond(c)));
                self.body(a, inner);
                self.line(d, "} else {");
                self.body(b, inner);
                self.line(d, "}");
            }
            S::While(n, b) => {
                let w = format!("w{}", self.id());
                self.line(d, &format!("let {w} = 0;"));
                self.line(d, &format!("while {w} < {n} {{"));
                self.line(d + 1, &format!("{w} += 1;"));
                self.body(b, looped(false));
                self.line(d, "}");
            }
            S::Do(n, is_while, b) => {
                let w = format!("d{}", self.id());
                self.line(d, &format!("let {w} = 0;"));
                self.line(d, "do {");
                self.line(d + 1, &format!("{w} += 1;"));
                // `continue` in a Rhai `do` loop skips the condition: this guard bounds it.
                self.line(d + 1, &format!("if {w} > {n} {{ break; }}"));
                self.body(b, looped(false));
                if *is_while {
                    self.line(d, &format!("}} while {w} < {n};"));
                } else {
                    self.line(d, &format!("}} until {w} >= {n};"));
                }
            }
            S::Loop(n, b) => {
                let w = format!("l{}", self.id());
                self.line(d, &format!("let {w} = 0;"));
                self.line(d, "loop {");
                self.line(d + 1, &format!("{w} += 1;"));
                self.line(d + 1, &format!("if {w} > {n} {{ break; }}"));
                self.body(b, looped(false));
                self.line(d, "}");
            }
            S::ForRange(a, b, step, incl, body) => {
                let i = format!("i{}", self.id());
                let iter = match step {
                    Some(s) => format!("range({a}, {b}, {s})"),
                    None if *incl => format!("{a}..={b}"),
                    None => format!("{a}..{b}"),
                };
                self.line(d, &format!("for {i} in {iter} {{"));
                self.line(d + 1, &format!("v0 = (v0 + {i}) % 1000;"));
                self.body(body, looped(false));
                self.line(d, "}");
            }
            S::ForArray(items, body) => {
                let id = self.id();
                let items: Vec<String> = items.iter().map(|n| n.to_string()).collect();
                self.line(
                    d,
                    &format!("for (x{id}, k{id}) in [{}] {{", items.join(", ")),
                );
                self.line(d + 1, &format!("v1 = (v1 + x{id} * (k{id} + 1)) % 1000;"));
                self.body(body, looped(false));
                self.line(d, "}");
            }
            S::ForStr(text, body) => {
                let id = self.id();
                self.line(d, &format!("for (c{id}, k{id}) in \"{text}\" {{"));
                self.line(
                    d + 1,
                    &format!("v2 = (v2 + k{id} + c{id}.to_int()) % 1000;"),
                );
                self.body(body, looped(false));
                self.line(d, "}");
            }
            S::Switch(e, [a, b, c, x]) => {
                self.line(d, &format!("switch ({}) % 5 {{", Self::expr(e)));
                self.line(d + 1, "0 => {");
                self.body(a, Ctx { depth: d + 2, ..cx });
                self.line(d + 1, "}");
                self.line(d + 1, "1 if hops() % 2 == 0 => {");
                self.body(b, Ctx { depth: d + 2, ..cx });
                self.line(d + 1, "}");
                self.line(d + 1, "3 => migrate(nodes()[1]),");
                self.line(d + 1, "-4..0 => {");
                self.body(c, Ctx { depth: d + 2, ..cx });
                self.line(d + 1, "}");
                self.line(d + 1, "_ => {");
                self.body(x, Ctx { depth: d + 2, ..cx });
                self.line(d + 1, "}");
                self.line(d, "}");
            }
            S::Try(t, v, c) => {
                let id = self.id();
                self.line(d, "try {");
                self.body(
                    t,
                    Ctx {
                        in_try: true,
                        ..inner
                    },
                );
                self.line(d, &format!("}} catch (e{id}) {{"));
                self.line(
                    d + 1,
                    &format!("v{v} = if type_of(e{id}) == \"i64\" {{ e{id} }} else {{ 7 }};"),
                );
                self.body(c, inner);
                self.line(d, "}");
            }
            S::Block(b) => {
                self.line(d, "{");
                self.body(b, inner);
                self.line(d, "}");
            }
            S::LetIf(v, c, a, ea, b, eb) => {
                self.line(d, &format!("let v{v} = if {} {{", Self::cond(c)));
                self.body(a, inner);
                self.line(d + 1, &Self::small(ea));
                self.line(d, "} else {");
                self.body(b, inner);
                self.line(d + 1, &Self::small(eb));
                self.line(d, "};");
            }
            S::LetLoop(v, n, b, e) => {
                let w = format!("l{}", self.id());
                self.line(d, &format!("let {w} = 0;"));
                self.line(d, &format!("let v{v} = loop {{"));
                self.line(d + 1, &format!("{w} += 1;"));
                self.line(
                    d + 1,
                    &format!("if {w} > {n} {{ break {}; }}", Self::small(e)),
                );
                self.body(b, looped(true));
                self.line(d, "};");
                // A `break;` (unit) can reach here only through a nested plain loop; keep it an int.
                self.line(d, &format!("if type_of(v{v}) != \"i64\" {{ v{v} = 1; }}"));
            }
            S::ForBlob(bytes, body) => {
                let id = self.id();
                self.line(d, &format!("let b{id} = blob();"));
                for b in bytes {
                    self.line(d, &format!("b{id}.push({b});"));
                }
                self.line(d, &format!("for (x{id}, k{id}) in b{id} {{"));
                self.line(d + 1, &format!("v1 = (v1 + x{id} * (k{id} + 1)) % 1000;"));
                self.body(body, looped(false));
                self.line(d, "}");
            }
            S::Closure(v, k, body) => {
                let id = self.id();
                self.line(d, &format!("let c{id} = |x| (x * {k} + 1) % 1000;"));
                self.body(body, inner);
                self.line(d, &format!("v{v} = c{id}.call(v{v});"));
            }
            S::Coalesce(v, c, e, jump) => {
                let id = self.id();
                let tail = match (jump, cx.in_loop, cx.in_fn) {
                    (0, Some(true), _) => "break 500".to_string(),
                    (0, Some(false), _) => "break".to_string(),
                    (1, Some(_), _) => "continue".to_string(),
                    (2, _, true) => format!("return {}", Self::small(e)),
                    _ => Self::small(e),
                };
                self.line(
                    d,
                    &format!(
                        "let q{id} = (if {} {{ () }} else {{ {} }}) ?? {tail};",
                        Self::cond(c),
                        Self::small(e)
                    ),
                );
                self.line(d, &format!("v{v} = (v{v} + q{id}) % 1000;"));
            }
            S::Collect(v, n, body) => {
                let id = self.id();
                self.line(d, &format!("let a{id} = [];"));
                self.line(d, &format!("let m{id} = #{{}};"));
                self.line(d, &format!("for j{id} in 0..{n} {{"));
                self.line(d + 1, &format!("a{id}.push(j{id} * v{v} % 1000);"));
                self.line(d + 1, &format!("m{id}[\"k\" + j{id}] = a{id}.len();"));
                self.body(body, looped(false));
                self.line(d, "}");
                self.line(
                    d,
                    &format!("v{v} = (v{v} + a{id}.len() * 10 + m{id}.len()) % 1000;"),
                );
                self.line(d, &format!("arr.push(a{id}.len());"));
            }
        }
    }

    fn prelude(&mut self, first: &str) {
        self.line(1, &format!("let v0 = {first};"));
        for v in 1..VARS {
            self.line(1, &format!("let v{v} = {v};"));
        }
        self.line(1, "let arr = [0, 0, 0];");
        self.line(1, "let m = #{ x: 0 };");
    }
}

fn render(a: &Agent) -> String {
    let mut r = Render {
        out: String::new(),
        next_id: 0,
    };
    let fcx = |callable| Ctx {
        in_loop: None,
        in_fn: true,
        in_try: false,
        callable,
        depth: 1,
    };
    r.line(0, "fn f0(a) {");
    r.prelude("a");
    r.line(1, "migrate(nodes()[((a % 3) + 3) % 3]);");
    r.body(&a.f0, fcx(0));
    r.line(1, "(v0 + v1 * 7 + v2 + v3 + arr[0] + m.x) % 1000");
    r.line(0, "}");
    r.line(0, "fn f1(a, b) {");
    r.prelude("a + b");
    r.body(&a.f1, fcx(1));
    r.line(1, "let r = f0(v0);");
    r.line(1, "return (r + v1 + v2 * 3 + v3 + arr[1]) % 1000;");
    r.line(0, "}");
    let mut main = Render {
        out: String::new(),
        next_id: r.next_id,
    };
    main.line(1, "const K0 = 17;");
    main.line(1, "const K1 = -3;");
    main.prelude("0");
    main.body(
        &a.main,
        Ctx {
            in_loop: None,
            in_fn: false,
            in_try: false,
            callable: 2,
            depth: 1,
        },
    );
    main.line(1, "[v0, v1, v2, v3, arr, m, here(), hops()]");
    // Main is rendered indented for readability; Rhai does not care.
    let _ = write!(r.out, "{}", main.out);
    r.out
}

fn big_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

#[test]
fn generated_agents_agree_with_oracle() {
    big_stack(|| {
        // GEN_CASES=50000 for a long hunt; the default keeps the debug run at a few seconds.
        let cases = std::env::var("GEN_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(1000);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(cases)
        });
        let outcomes = std::cell::RefCell::new((0usize, 0usize, 0usize));
        runner
            .run(&agent(), |a| {
                let source = render(&a);
                let (result, trace) = check(&source);
                let mut o = outcomes.borrow_mut();
                match result {
                    RunResult::Value(_) => o.0 += 1,
                    RunResult::Error(e) => {
                        o.1 += 1;
                        if std::env::var("GEN_SHOW").is_ok() {
                            eprintln!(
                                "ERR {e}\n  oracle: {:?}",
                                oracle(&source, &agent_lang::Limits::default())
                            );
                        }
                    }
                }
                o.2 += trace.hops;
                Ok(())
            })
            .unwrap();
        let (values, errors, hops) = outcomes.into_inner();
        eprintln!("generated agents: {values} finished with a value, {errors} failed in both, {hops} hops in all");
        // The generator must produce mostly meaningful (successful) programs.
        assert!(
            values > errors,
            "{values} values vs {errors} errors: the generator is too error-prone"
        );
    });
}
