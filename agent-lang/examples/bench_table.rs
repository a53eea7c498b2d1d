//! Prints the executor and codec benchmark figures as a table of ratios measured in one run:
//! `cargo run --release -p agent-lang --example bench_table`; with `-- --codec-only` it prints
//! only the encode, decode and drop times of a 10 MB integer array, measured apart.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_lang::rhai::{Dynamic, ImmutableString};
use agent_lang::{sandboxed_engine, Execution, HostEnv, Limits, Metered, Outcome, Program, Resume};

/// As in `tern`: the allocator is metered, so tern's side pays for its memory budget (plain
/// Rhai runs under the same allocator, and its figures include the counting too).
#[global_allocator]
static ALLOCATOR: Metered<std::alloc::System> = Metered(std::alloc::System);

fn env() -> HostEnv {
    HostEnv {
        resources: agent_lang::no_resources(),
        here: "node-0".into(),
        home: "node-0".into(),
        nodes: vec!["node-0".into(), "node-1".into()],
        agent_id: "bench".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    }
}

/// Median of `runs` timings of `f`.
fn time(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[runs / 2]
}

fn plain_engine() -> agent_lang::rhai::Engine {
    let mut e = sandboxed_engine(&Limits::default().with_max_operations(0));
    e.register_fn("migrate", |_: ImmutableString| ());
    e.register_fn("here", || ImmutableString::from("node-0"));
    e
}

fn tern_run(program: &Program) -> Dynamic {
    let mut exec = Execution::new(program);
    match exec.resume(&env(), Resume::Start) {
        Outcome::Finished(v) => v,
        other => panic!("{other:?}"),
    }
}

/// Times `source` in plain Rhai (no limits) and under tern with the default limits.
fn ratio_row(name: &str, source: &str, iterations: u64, runs: usize) -> f64 {
    let program = Program::compile(source, &Limits::default()).unwrap();
    let engine = plain_engine();
    let ast = engine.compile(source).unwrap();
    let expected = engine.eval_ast::<Dynamic>(&ast).unwrap();
    assert_eq!(format!("{expected:?}"), format!("{:?}", tern_run(&program)));
    let plain = time(runs, || {
        let _ = black_box(engine.eval_ast::<Dynamic>(&ast).unwrap());
    });
    let tern = time(runs, || {
        let _ = black_box(tern_run(&program));
    });
    let r = tern.as_secs_f64() / plain.as_secs_f64();
    println!(
        "| {name} | {:.1} ns | {:.1} ns | {r:.2} |",
        plain.as_nanos() as f64 / iterations as f64,
        tern.as_nanos() as f64 / iterations as f64
    );
    r
}

/// Encode, decode and drop times of a continuation holding a 10 MB integer array, measured
/// apart (the codec table times encode + decode + drop together).
fn int_array_breakdown() {
    let source = format!(
        "let data = []; data.pad({}, 1000000); migrate(\"node-1\"); data.len()",
        (10 << 20) / 8
    );
    let program = Program::compile(&source, &Limits::default()).unwrap();
    let mut exec = Execution::new(&program);
    assert!(matches!(
        exec.resume(&env(), Resume::Start),
        Outcome::Migrate { .. }
    ));
    let bytes = exec.encode().unwrap();
    let runs = 11;
    let encode = time(runs, || {
        let _ = black_box(exec.encode().unwrap());
    });
    // Decode and drop timed apart, each decoded state dropped right after (so the allocator
    // reuses its memory as it would in a node).
    let (mut decode, mut drop): (Vec<Duration>, Vec<Duration>) = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let e = black_box(Execution::decode(&program, &bytes).unwrap());
            let d = t.elapsed();
            let t = Instant::now();
            std::mem::drop(e);
            (d, t.elapsed())
        })
        .unzip();
    decode.sort();
    drop.sort();
    let (decode, drop) = (decode[runs / 2], drop[runs / 2]);
    let total = encode + decode;
    println!("\n## 10 MB int array, apart (median of {runs} runs)\n");
    println!("| encode | decode | drop | continuation bytes / (encode + decode) | data bytes / (encode + decode) |");
    println!("|---|---|---|---|---|");
    println!(
        "| {:.2} ms | {:.2} ms | {:.2} ms | {:.0} MB/s | {:.0} MB/s |",
        encode.as_secs_f64() * 1e3,
        decode.as_secs_f64() * 1e3,
        drop.as_secs_f64() * 1e3,
        bytes.len() as f64 / total.as_secs_f64() / 1e6,
        (10u64 << 20) as f64 / total.as_secs_f64() / 1e6
    );
}

fn main() {
    if std::env::args().any(|a| a == "--codec-only") {
        int_array_breakdown();
        return;
    }
    println!("## executor against plain Rhai (per iteration, median of runs)\n");
    println!("| workload | plain Rhai | tern | tern / plain |");
    println!("|---|---|---|---|");
    ratio_row(
        "compute-bound, no hop (target ≤ 1.10)",
        r#"fn work(n) { let s = 0; for i in 0..n { s += (i * i) % 7; } s }
           let total = work(200000);
           if total < 0 { migrate("node-1"); }
           total"#,
        200_000,
        15,
    );
    ratio_row(
        "walked loop with a migration point (target ≤ 2.0)",
        r#"let s = 0;
           for i in 0..200000 {
               s += (i * i) % 7;
               if i < 0 { migrate("node-1"); }
           }
           s"#,
        200_000,
        15,
    );
    ratio_row(
        "walked while loop with a migration point",
        r#"let s = 0; let i = 0;
           while i < 200000 {
               s += (i * i) % 7;
               i += 1;
               if i < 0 { migrate("node-1"); }
           }
           s"#,
        200_000,
        15,
    );
    ratio_row(
        "mobile function called in a loop",
        r#"fn step(i) { if i < 0 { migrate("node-1"); } (i * i) % 7 }
           let s = 0;
           for i in 0..50000 { let v = step(i); s += v; }
           s"#,
        50_000,
        9,
    );

    ratio_row(
        "1,000,000 `push`es (target ≤ 1.3)",
        "let a = []; for i in 0..1000000 { a.push(i); } a.len()",
        1_000_000,
        9,
    );
    ratio_row(
        "a 100,000-entry map built in a loop (target ≤ 1.3)",
        "let m = #{}; for i in 0..100000 { m[`k${i}`] = i; } m.len()",
        100_000,
        9,
    );

    println!("\n## continuation codec (encode + decode, median of runs)\n");
    println!("| state | kind | continuation bytes | data bytes | size ratio (target ≤ 1.1) | encode+decode | throughput |");
    println!("|---|---|---|---|---|---|---|");
    for (label, size) in [
        ("1 KB", 1usize << 10),
        ("100 KB", 100 << 10),
        ("10 MB", 10 << 20),
    ] {
        for (kind, source, data_bytes) in [
            (
                "blob",
                format!("let data = blob({size}, 7); migrate(\"node-1\"); data.len()"),
                size,
            ),
            (
                "string",
                format!("let data = blob({size}, 65).as_string(); migrate(\"node-1\"); data.len()"),
                size,
            ),
            (
                "int array",
                format!(
                    "let data = []; data.pad({}, 1000000); migrate(\"node-1\"); data.len()",
                    size / 8
                ),
                size / 8 * 8,
            ),
        ] {
            let program = Program::compile(&source, &Limits::default()).unwrap();
            let mut exec = Execution::new(&program);
            assert!(matches!(
                exec.resume(&env(), Resume::Start),
                Outcome::Migrate { .. }
            ));
            let bytes = exec.encode().unwrap();
            let runs = if size > 1 << 20 { 11 } else { 101 };
            let t = time(runs, || {
                let b = exec.encode().unwrap();
                let _ = black_box(Execution::decode(&program, &b).unwrap());
            });
            println!(
                "| {label} | {kind} | {} | {data_bytes} | {:.3} | {:.1?} | {:.0} MB/s |",
                bytes.len(),
                bytes.len() as f64 / data_bytes as f64,
                t,
                data_bytes as f64 / t.as_secs_f64() / 1e6
            );
        }
    }
    int_array_breakdown();
}
