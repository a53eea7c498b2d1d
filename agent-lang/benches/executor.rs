//! Criterion benchmarks of the executor against plain Rhai and of the continuation codec.
//! `cargo run --release -p agent-lang --example bench_table` prints the same workloads as a
//! table of ratios measured in one run.

use std::hint::black_box;
use std::sync::Arc;

use agent_lang::rhai::{Dynamic, ImmutableString};
use agent_lang::{sandboxed_engine, Execution, HostEnv, Limits, Outcome, Program, Resume};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

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

const COMPUTE: &str = r#"fn work(n) { let s = 0; for i in 0..n { s += (i * i) % 7; } s }
    let total = work(20000);
    if total < 0 { migrate("node-1"); }
    total"#;

const WALKED: &str = r#"let s = 0;
    for i in 0..20000 { s += (i * i) % 7; if i < 0 { migrate("node-1"); } }
    s"#;

fn executor(c: &mut Criterion) {
    let mut group = c.benchmark_group("executor");
    let mut engine = sandboxed_engine(&Limits::default().with_max_operations(0));
    engine.register_fn("migrate", |_: ImmutableString| ());
    for (name, source) in [("compute-bound", COMPUTE), ("walked-loop", WALKED)] {
        let ast = engine.compile(source).unwrap();
        group.bench_function(BenchmarkId::new("plain-rhai", name), |b| {
            b.iter(|| black_box(engine.eval_ast::<Dynamic>(&ast).unwrap()))
        });
        let program = Program::compile(source, &Limits::default().with_max_operations(0)).unwrap();
        group.bench_function(BenchmarkId::new("tern", name), |b| {
            b.iter(|| {
                let mut exec = Execution::new(&program);
                match exec.resume(&env(), Resume::Start) {
                    Outcome::Finished(v) => black_box(v),
                    other => panic!("{other:?}"),
                }
            })
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("continuation");
    let sizes = [1usize << 10, 100 << 10, 10 << 20];
    let states = sizes
        .iter()
        .map(|&size| {
            (
                format!("blob/{size}"),
                size,
                format!("let data = blob({size}, 7); migrate(\"node-1\"); data.len()"),
            )
        })
        .chain(sizes.iter().map(|&size| {
            (
                format!("int-array/{size}"),
                size,
                format!(
                    "let data = []; data.pad({}, 1000000); migrate(\"node-1\"); data.len()",
                    size / 8
                ),
            )
        }));
    for (name, size, source) in states {
        let program = Program::compile(&source, &Limits::default()).unwrap();
        let mut exec = Execution::new(&program);
        assert!(matches!(
            exec.resume(&env(), Resume::Start),
            Outcome::Migrate { .. }
        ));
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("encode+decode", name), |b| {
            b.iter(|| {
                let bytes = exec.encode().unwrap();
                black_box(Execution::decode(&program, &bytes).unwrap())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, executor, codec);
criterion_main!(benches);
