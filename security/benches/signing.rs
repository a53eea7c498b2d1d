//! Signing and verification costs: a hop envelope (per hop) and a 1 MB package (per package).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use security::{
    check_signatures, verify_hop, AgentId, HopCheck, HopEnvelope, HopFields, Manifest, Package,
    PackageHash, PackageLimits, SecretKey, FIRST_HOP,
};

fn envelope(c: &mut Criterion) {
    let (a, b) = (SecretKey::from_seed([1; 32]), SecretKey::from_seed([2; 32]));
    let (a_pub, b_pub) = (a.public(), b.public());
    let package = PackageHash([3; 32]);
    let continuation = [4u8; 32];
    let fields = HopFields {
        agent_id: AgentId([5; 16]),
        hop: FIRST_HOP,
        package_hash: package,
        continuation_hash: continuation,
        previous: None,
        from: a_pub,
        to: b_pub,
        time_ms: 1_700_000_000_000,
    };
    let mut group = c.benchmark_group("hop_envelope");
    group.bench_function("sign+encode", |bench| {
        bench.iter_batched(
            || fields.clone(),
            |f| HopEnvelope::sign(f, &a).map(|e| e.encode()),
            BatchSize::SmallInput,
        )
    });
    let wire = HopEnvelope::sign(fields.clone(), &a)
        .map(|e| e.encode())
        .unwrap_or_default();
    group.bench_function("decode+verify", |bench| {
        let ctx = HopCheck::new(&a_pub, &b_pub, &package, &continuation);
        bench.iter(|| HopEnvelope::decode(&wire).map(|e| verify_hop(e, &ctx)))
    });
    // What a node receiving 8 hops at once pays for their signatures (batch verification).
    let eight: Vec<HopEnvelope> = (0..8u8)
        .filter_map(|n| {
            let f = HopFields {
                agent_id: AgentId([n; 16]),
                ..fields.clone()
            };
            HopEnvelope::sign(f, &a).ok()
        })
        .collect();
    group.throughput(Throughput::Elements(eight.len() as u64));
    group.bench_function("check_signatures x8", |bench| {
        let refs: Vec<&HopEnvelope> = eight.iter().collect();
        bench.iter(|| check_signatures(&refs))
    });
    group.finish();
}

fn package_1mb(c: &mut Criterion) {
    let author = SecretKey::from_seed([9; 32]);
    let manifest = Manifest {
        name: "big".into(),
        version: "1".into(),
        author: author.public(),
        created_ms: 0,
        resources: vec![],
        capabilities: vec![],
        limits: PackageLimits::default(),
    };
    let source: String = "let x = 1; // padding padding padding\n"
        .repeat(1024 * 1024 / 38 + 1)
        .chars()
        .take(1024 * 1024)
        .collect();
    let mut group = c.benchmark_group("package_1mb");
    group.throughput(Throughput::Bytes(source.len() as u64));
    group.sample_size(20);
    group.bench_function("sign+to_bytes", |bench| {
        bench.iter_batched(
            || (manifest.clone(), source.clone()),
            |(m, s)| Package::sign(m, s, &author).map(|p| p.to_bytes()),
            BatchSize::LargeInput,
        )
    });
    let bytes = Package::sign(manifest.clone(), source.clone(), &author)
        .map(|p| p.to_bytes())
        .unwrap_or_default();
    group.bench_function("from_bytes+verify", |bench| {
        bench.iter(|| Package::from_bytes(&bytes).map(Package::verify))
    });
    group.finish();
}

criterion_group!(benches, envelope, package_1mb);
criterion_main!(benches);
