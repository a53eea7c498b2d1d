//! The resource benchmarks of issue 13: what the resource bindings cost an agent, on real nodes
//! (two on loopback in one process, redb stores in temporary directories), printed as a markdown
//! table with the target next to each figure.
//!
//! `cargo run --release -p platform --example bench_resources [--lines N] [--ops N] [--runs N]`
//!
//! - `remote`: one `get` on a table of the other node through a `remote` handle, timed by the
//!   agent (Rhai's `timestamp()`) call by call: p50 and p99 of `--ops` calls (default 2,000).
//! - `scan`: a Rhai loop that counts the words of every line of a node's dataset, read 1,024
//!   lines at a time with `lines()`, against the very same loop over those chunks already in
//!   the agent's memory (`--lines` lines of about 48 bytes, default 200,000: 9.6 MB).
//! - `copy-on-reference`: the same loop over the other node's dataset bound by
//!   `copy-on-reference`, second pass (every chunk kept at the agent's node by the first),
//!   against the loop over the local dataset.
//! - `move`: a hop carrying a table bound by `move` (2,500 entries of 4,000 bytes: 10 MB),
//!   against a hop carrying the same 10 MB as the agent's own state. Hop time is the
//!   destination's `HopStored` (suspension at the source → stored).
//!
//! Each timed figure is the median of `--runs` runs (default 5), taking turns.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use platform::loopback::{LoopbackMesh, MeshNode};
use platform::node::NodeEvent;
use platform::resources::NodeResources;
use platform::wire::AgentEnd;
use security::{PeersPolicy, ResourceDecl, SecretKey, TrustPolicy, VerifiedPackage};

// jemalloc, configured for large hops, as `tern` runs: see `platform::memory`.
platform::jemalloc_for_large_hops!();

struct Options {
    lines: usize,
    ops: usize,
    runs: usize,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        lines: 200_000,
        ops: 2_000,
        runs: 5,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || -> Result<usize> {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            v.replace('_', "")
                .parse::<usize>()
                .with_context(|| format!("{a} needs a number"))
        };
        match a.as_str() {
            "--lines" => o.lines = value()?.max(1_024),
            "--ops" => o.ops = value()?.max(100),
            "--runs" => o.runs = value()?.max(1),
            "-h" | "--help" => {
                println!("usage: bench_resources [--lines N] [--ops N] [--runs N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}'"),
        }
    }
    Ok(o)
}

/// A deterministic text of `lines` lines of eight words (about 48 bytes each).
fn corpus(lines: usize) -> String {
    const WORDS: [&str; 16] = [
        "alpha", "beta", "gamma", "delta", "mesh", "node", "agent", "hop", "table", "value",
        "data", "shard", "count", "word", "line", "rhai",
    ];
    let mut text = String::with_capacity(lines * 48);
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..lines {
        for w in 0..8 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if w > 0 {
                text.push(' ');
            }
            text.push_str(WORDS[(x % 16) as usize]);
        }
        text.push('\n');
    }
    text
}

/// node-0: the dataset `data` and the free table `moving`; node-1: the table `far` and the
/// dataset `fardata` (free, so that it may be copied on reference), with the same text as
/// `data`.
fn nodes(dir: &Path) -> Result<Vec<MeshNode>> {
    let resources = |text: &str| -> Result<NodeResources> {
        let table: toml::Table = toml::from_str(text)?;
        NodeResources::from_toml(&table, dir).map_err(|e| anyhow::anyhow!("{e}"))
    };
    Ok(vec![
        MeshNode {
            name: "node-0".into(),
            resources: resources(
                "[data]\ntype = \"dataset\"\npath = \"corpus\"\n\
                 [moving]\ntype = \"table\"\nmobility = \"free\"\n",
            )?,
            upload_mbit: None,
        },
        MeshNode {
            name: "node-1".into(),
            resources: resources(
                "[far]\ntype = \"table\"\n\
                 [fardata]\ntype = \"dataset\"\npath = \"corpus\"\nmobility = \"free\"\n",
            )?,
            upload_mbit: None,
        },
    ])
}

/// The author of every bench agent, trusted with every resource.
struct Author {
    key: SecretKey,
}

impl Author {
    fn trust(&self) -> Result<TrustPolicy> {
        let mut trust: TrustPolicy = toml::from_str(&format!(
            "authors = [{{ key = \"{}\", resources = \"any\" }}]",
            self.key.public()
        ))?;
        trust.accept_from = PeersPolicy::Any;
        Ok(trust)
    }

    fn sign(&self, source: &str, bindings: &[(&str, &str)]) -> Result<VerifiedPackage> {
        let spec = platform::package_files::PackSpec {
            name: "bench".into(),
            version: "0".into(),
            resources: bindings
                .iter()
                .map(|(name, policy)| ResourceDecl::from_text(*name, policy))
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?,
            capabilities: vec![],
            limits: Default::default(),
        };
        Ok(platform::package_files::pack(source.to_string(), spec, &self.key, 0)?.verify()?)
    }
}

/// Runs `package` from node-0 to its end: its result as JSON.
async fn run(mesh: &LoopbackMesh, package: VerifiedPackage) -> Result<String> {
    let (_, end) = tokio::time::timeout(Duration::from_secs(300), mesh.run(package))
        .await
        .context("the agent did not end within 300 s")??;
    match end {
        AgentEnd::Finished { json, .. } => Ok(json),
        AgentEnd::Failed { error, node, .. } => bail!("the agent failed on {node}: {error}"),
    }
}

/// The numbers of a JSON array.
fn numbers(json: &str) -> Result<Vec<f64>> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    value
        .as_array()
        .context("not an array")?
        .iter()
        .map(|v| v.as_f64().context("not a number"))
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// An agent that runs `setup`, then the word-counting loop, timed by the agent, over the
/// lines of dataset handle `h` read 1,024 at a time (`from_handle`) or over the array of
/// chunks `chunks` already in memory. Its result: `[seconds, words]`.
fn scan_source(setup: &str, from_handle: bool) -> String {
    let body = "for l in lines { words += l.split(\" \").len(); }";
    let walk = if from_handle {
        format!(
            "let n = h.line_count(); let i = 0;
             while i < n {{ let lines = h.lines(i, 1024); {body} i += 1024; }}"
        )
    } else {
        format!("for lines in chunks {{ {body} }}")
    };
    format!(
        "{setup}
         let words = 0;
         let t = timestamp();
         {walk}
         [t.elapsed, words]"
    )
}

/// The seconds and the words of one run of a [`scan_source`] agent.
async fn timed_loop(
    mesh: &LoopbackMesh,
    author: &Author,
    source: &str,
    bindings: &[(&str, &str)],
) -> Result<(f64, f64)> {
    let got = numbers(&run(mesh, author.sign(source, bindings)?).await?)?;
    match got.as_slice() {
        [seconds, words] => Ok((*seconds, *words)),
        _ => bail!("unexpected result {got:?}"),
    }
}

/// The hop times (µs, suspension at the source → stored at the destination) of every hop
/// while `package` runs.
async fn hop_micros(mesh: &LoopbackMesh, package: VerifiedPackage) -> Result<Vec<f64>> {
    let mut events: Vec<_> = mesh.nodes().iter().map(|n| n.events()).collect();
    run(mesh, package).await?;
    let mut micros = Vec::new();
    for rx in &mut events {
        while let Ok(event) = rx.try_recv() {
            if let NodeEvent::HopStored { micros: m, .. } = event {
                micros.push(m as f64);
            }
        }
    }
    Ok(micros)
}

fn main() -> Result<()> {
    let o = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(64 << 20)
        .build()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("corpus"), corpus(o.lines))?;
    let author = Author {
        key: SecretKey::generate(),
    };
    let mut rows: Vec<(String, String, String, bool)> = Vec::new();
    rt.block_on(async {
        let mesh =
            LoopbackMesh::start_with(nodes(dir.path())?, author.trust()?, Default::default())
                .await?;

        // remote: round trips of one `get`.
        eprintln!("remote: {} gets on node-1's table from node-0 ...", o.ops);
        let remote = format!(
            "let far = resource(\"far\", \"node-1\");
             far.set(\"k\", 1);
             let times = [];
             for i in 0..{} {{ let t = timestamp(); far.get(\"k\"); times.push(t.elapsed); }}
             times",
            o.ops
        );
        let package = author.sign(&remote, &[("far", "remote")])?;
        // The first tenth warms up (the first call opens the stream to the owner).
        let mut times = numbers(&run(&mesh, package).await?)?.split_off(o.ops / 10);
        times.sort_by(f64::total_cmp);
        let times = &times[..];
        let (p50, p99) = (percentile(times, 0.5) * 1e6, percentile(times, 0.99) * 1e6);
        rows.push((
            format!(
                "remote-reference `get` round trip on loopback, p50 / p99 ({} calls)",
                o.ops
            ),
            format!("{p50:.0} µs / {p99:.0} µs"),
            "≤ 150 µs / ≤ 1 ms".into(),
            p50 <= 150.0 && p99 <= 1000.0,
        ));

        // scan: the loop over the local dataset against the loop over the same chunks in memory.
        eprintln!("scan: {} lines, {} runs each ...", o.lines, o.runs);
        let local = scan_source("let h = resource(\"data\");", true);
        let in_memory = scan_source(
            "let h = resource(\"data\");
             let chunks = []; let n = h.line_count(); let i = 0;
             while i < n { chunks.push(h.lines(i, 1024)); i += 1024; }",
            false,
        );
        let (mut scans, mut memory) = (Vec::new(), Vec::new());
        let mut words = (0.0, 0.0);
        for _ in 0..o.runs {
            let (s, w) = timed_loop(&mesh, &author, &local, &[("data", "rebind")]).await?;
            scans.push(s);
            words.0 = w;
            let (s, w) = timed_loop(&mesh, &author, &in_memory, &[("data", "rebind")]).await?;
            memory.push(s);
            words.1 = w;
        }
        if words.0 != words.1 {
            bail!("the two loops counted {} and {} words", words.0, words.1);
        }
        let (scan, mem) = (median(scans.clone()), median(memory));
        rows.push((
            format!(
                "scanning a local dataset in an agent / the same Rhai loop over the lines already \
                 in memory ({} lines, counting words; medians of {})",
                o.lines, o.runs
            ),
            format!(
                "{:.2} ({:.0} ms / {:.0} ms)",
                scan / mem,
                scan * 1e3,
                mem * 1e3
            ),
            "≤ 1.2".into(),
            scan / mem <= 1.2,
        ));

        // copy-on-reference: second pass, against the local scan.
        eprintln!("copy-on-reference: {} runs ...", o.runs);
        let cor = format!(
            "let h = resource(\"fardata\", \"node-1\");
             let n = h.line_count(); let i = 0;
             while i < n {{ h.lines(i, 1024); i += 1024; }}
             {}",
            scan_source("", true)
        );
        let mut seconds = Vec::new();
        for _ in 0..o.runs {
            let (s, w) =
                timed_loop(&mesh, &author, &cor, &[("fardata", "copy-on-reference")]).await?;
            if w != words.0 {
                bail!(
                    "copy-on-reference counted {w} words, the local scan {}",
                    words.0
                );
            }
            seconds.push(s);
            let (s, _) = timed_loop(&mesh, &author, &local, &[("data", "rebind")]).await?;
            scans.push(s);
        }
        let (second, scan) = (median(seconds), median(scans));
        rows.push((
            format!(
                "second pass over a copy-on-reference dataset / a local dataset (same loop; \
                 medians of {})",
                o.runs
            ),
            format!(
                "{:.2} ({:.0} ms / {:.0} ms)",
                second / scan,
                second * 1e3,
                scan * 1e3
            ),
            "≤ 1.2".into(),
            second / scan <= 1.2,
        ));

        // move: a hop carrying a 10 MB table, against a hop carrying 10 MB of state.
        eprintln!(
            "move: 10 MB table hops and 10 MB state hops, {} runs ...",
            o.runs
        );
        let hops = 6;
        let moving = format!(
            "let t = resource(\"moving\");
             for i in 0..2500 {{ t.set(`k${{i}}`, blob(4000, i % 256)); }}
             for i in 0..{hops} {{ migrate(if i % 2 == 0 {{ \"node-1\" }} else {{ \"node-0\" }}); }}
             t.len()"
        );
        let state = format!(
            "let s = [];
             for i in 0..2500 {{ s.push(blob(4000, i % 256)); }}
             for i in 0..{hops} {{ migrate(if i % 2 == 0 {{ \"node-1\" }} else {{ \"node-0\" }}); }}
             s.len()"
        );
        let (mut table_hops, mut state_hops) = (Vec::new(), Vec::new());
        for _ in 0..o.runs {
            table_hops
                .extend(hop_micros(&mesh, author.sign(&moving, &[("moving", "move")])?).await?);
            state_hops.extend(hop_micros(&mesh, author.sign(&state, &[])?).await?);
        }
        let (table, state) = (median(table_hops), median(state_hops));
        rows.push((
            format!(
                "move of a 10 MB table with a hop / the same hop carrying 10 MB of state (hop \
                 medians of {} hops each)",
                o.runs * hops
            ),
            format!(
                "{:.2} ({:.1} ms / {:.1} ms)",
                table / state,
                table / 1e3,
                state / 1e3
            ),
            "≤ 1.3".into(),
            table / state <= 1.3,
        ));
        Ok::<(), anyhow::Error>(())
    })?;

    let mut out = String::from("| what | measured | target | |\n|---|---|---|---|\n");
    for (what, measured, target, met) in rows {
        let verdict = if met { "met" } else { "**missed**" };
        let _ = writeln!(out, "| {what} | {measured} | {target} | {verdict} |");
    }
    print!("{out}");
    Ok(())
}
