//! A quick tour of the walked forms against the oracle (the corpus and generator cover them in depth).
mod support;
use support::*;

#[test]
fn smoke() {
    let cases = [
        "let x = 1; migrate(\"node-1\"); x + here().len()",
        "let s = 0; for i in 0..5 { migrate(nodes()[i % 3]); s += i; } s",
        "fn f(n) { if n == 0 { migrate(\"node-2\"); return here(); } let r = f(n - 1); r + n } f(3)",
        "let a = [1,2,3]; let t = 0; for (x, i) in a { migrate(\"node-1\"); t += x * i; } t",
        "let r = 0; try { migrate(\"nowhere\"); r = 1; } catch (e) { r = e; } r",
        "let n = 0; while n < 10 { n += 1; if n % 3 == 0 { migrate(nodes()[n % 3]); continue; } if n > 7 { break; } } [n, here(), hops()]",
        "let x = 5; switch x { 1 => 1, 5 => { migrate(\"node-2\"); here() } _ => 0 }",
        "let i = 0; do { i += 1; migrate(\"node-1\"); } while i < 3; i",
        "fn g(x) { migrate(\"node-1\"); throw x * 2; } let v = 0; try { g(21); } catch (e) { v = e; } v",
        "let x = 1; { let x = 2; migrate(\"node-1\"); x += 10; } x",
        "let s = \"\"; for c in \"abc\" { migrate(\"node-2\"); s += c; } s",
    ];
    for c in cases {
        let (r, t) = check(c);
        eprintln!("{c}\n  => {r:?} {t:?}");
    }
}
