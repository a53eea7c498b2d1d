//! `tern demo wordcount`: the data-locality job. A word count over a corpus split across three
//! nodes as `dataset` shards (made here, deterministically), computed twice: by an agent that
//! visits each shard and carries only its counts (`examples/wordcount/locality.rhai`, bound by
//! `rebind`), and by one that stays home and reads every shard through `remote` handles
//! (`examples/wordcount/shipping.rhai`, the data-shipping baseline). Each runs on a fresh
//! embedded mesh, without an upload cap and with every node capped; the table compares the
//! bytes on the wire and the wall times, and says whether all results are equal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use platform::loopback::{LoopbackMesh, MeshNode};
use platform::node::NodeHandle;
use platform::package_files;
use platform::resources::NodeResources;
use platform::wire::{AgentEnd, WireBytes};

const LOCALITY: &str = include_str!("../../../../examples/wordcount/locality.rhai");
const SHIPPING: &str = include_str!("../../../../examples/wordcount/shipping.rhai");

/// Nodes of the demo's mesh, each with a shard.
const NODES: usize = 3;

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// The demo to run.
    #[arg(value_enum)]
    demo: Demo,
    /// Megabytes of text in each of the three shards.
    #[arg(long, default_value_t = 50.0, value_parser = parse_size)]
    shard_mb: f64,
    /// The upload cap of every node in the capped runs, in Mbit/s.
    #[arg(long, default_value_t = 20.0, value_parser = crate::run::parse_mbit)]
    upload_mbit: f64,
    /// Where to make the shards (default: a temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Demo {
    /// Word count: data locality against data shipping.
    Wordcount,
}

fn parse_size(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(mb) if mb.is_finite() && mb > 0.0 && mb <= 10_000.0 => Ok(mb),
        _ => Err(format!("'{text}' is not a size in MB between 0 and 10000")),
    }
}

/// One run: the agent's result, the bytes the mesh sent, how long the agent took.
struct Run {
    json: String,
    bytes: WireBytes,
    took: Duration,
}

impl Run {
    fn total_bytes(&self) -> u64 {
        let b = &self.bytes;
        b.hop.0 + b.package.0 + b.control.0 + b.resource.0
    }
}

/// Runs `tern demo`.
pub(crate) fn demo(args: DemoArgs) -> Result<()> {
    let Demo::Wordcount = args.demo;
    let temporary;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            temporary = tempfile::tempdir().context("a temporary directory")?;
            temporary.path().to_path_buf()
        }
    };
    let shard_bytes = (args.shard_mb * 1e6) as u64;
    eprintln!(
        "making {NODES} shards of {:.1} MB in {} ...",
        args.shard_mb,
        dir.display()
    );
    let shards = make_shards(&dir, shard_bytes)?;
    let runtime = crate::runtime()?;
    let mut runs = Vec::new();
    for cap in [None, Some(args.upload_mbit)] {
        for (name, source, policy) in [
            ("locality", LOCALITY, "rebind"),
            ("shipping", SHIPPING, "remote"),
        ] {
            let label = match cap {
                None => format!("{name}, uncapped"),
                Some(m) => format!("{name}, {m} Mbit/s"),
            };
            eprintln!("running {label} ...");
            let run = runtime
                .block_on(run_once(&shards, source, policy, cap))
                .with_context(|| format!("the {label} run"))?;
            eprintln!(
                "  {:.2?}, {} bytes on the wire",
                run.took,
                run.total_bytes()
            );
            runs.push(run);
        }
    }
    let [loc, ship, loc_capped, ship_capped] = &runs[..] else {
        bail!("four runs were expected");
    };
    let equal = runs.iter().all(|r| r.json == loc.json);
    let mut out = std::io::stdout().lock();
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let secs = |d: Duration| d.as_secs_f64();
    writeln!(
        out,
        "word count over {NODES} shards of {:.1} MB each (data locality: rebind; data shipping: remote)",
        args.shard_mb
    )?;
    writeln!(out, "| what | locality | shipping | locality / shipping |")?;
    writeln!(out, "|---|---|---|---|")?;
    writeln!(
        out,
        "| bytes on the wire | {} | {} | {:.3} % |",
        loc.total_bytes(),
        ship.total_bytes(),
        100.0 * ratio(loc.total_bytes() as f64, ship.total_bytes() as f64)
    )?;
    writeln!(
        out,
        "| wall time, uncapped | {:.2} s | {:.2} s | {:.2} |",
        secs(loc.took),
        secs(ship.took),
        ratio(secs(loc.took), secs(ship.took))
    )?;
    writeln!(
        out,
        "| wall time, upload capped at {} Mbit/s | {:.2} s | {:.2} s | {:.2} |",
        args.upload_mbit,
        secs(loc_capped.took),
        secs(ship_capped.took),
        ratio(secs(loc_capped.took), secs(ship_capped.took))
    )?;
    writeln!(out, "results equal: {}", if equal { "yes" } else { "NO" })?;
    if !equal {
        bail!("the runs disagree");
    }
    Ok(())
}

/// Words of the corpus: a fixed vocabulary, drawn with a skewed (Zipf-like) frequency.
fn word(n: u64) -> String {
    format!("w{n}")
}

/// Writes `NODES` shards of about `bytes` each, the same on every run: the paths.
fn make_shards(dir: &Path, bytes: u64) -> Result<Vec<PathBuf>> {
    let vocabulary: Vec<String> = (0..2000).map(word).collect();
    (0..NODES)
        .map(|i| {
            let path = dir.join(format!("shard-{i}.txt"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            let mut out = std::io::BufWriter::new(file);
            let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
            let mut written = 0u64;
            while written < bytes {
                let mut line = String::new();
                for k in 0..12 {
                    // xorshift64*, then a skew towards the first words.
                    state ^= state >> 12;
                    state ^= state << 25;
                    state ^= state >> 27;
                    let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
                    let uniform = (r as f64) / ((1u64 << 53) as f64);
                    let index = ((vocabulary.len() as f64).powf(uniform) - 1.0) as usize;
                    if k > 0 {
                        line.push(' ');
                    }
                    line.push_str(&vocabulary[index.min(vocabulary.len() - 1)]);
                }
                line.push('\n');
                out.write_all(line.as_bytes())?;
                written += line.len() as u64;
            }
            out.flush()?;
            Ok(path)
        })
        .collect()
}

/// Runs `source` (binding `shard` by `policy`) on a fresh mesh of nodes holding `shards`.
async fn run_once(
    shards: &[PathBuf],
    source: &str,
    policy: &str,
    upload_mbit: Option<f64>,
) -> Result<Run> {
    let key = security::SecretKey::generate();
    let spec = package_files::PackSpec {
        name: "wordcount".into(),
        version: "0.0.0".into(),
        resources: crate::pack::resource_decls(&[format!("shard={policy}")])?,
        capabilities: Vec::new(),
        limits: security::PackageLimits::default(),
    };
    let package =
        package_files::pack(source.to_string(), spec, &key, crate::pack::now_ms())?.verify()?;
    let mut trust: security::TrustPolicy = toml::from_str(&format!(
        "authors = [{{ key = \"{}\", resources = \"any\" }}]",
        key.public()
    ))?;
    trust.accept_from = security::PeersPolicy::Any;
    let nodes = shards
        .iter()
        .enumerate()
        .map(|(i, shard)| {
            let mut section = toml::Table::new();
            let mut entry = toml::Table::new();
            entry.insert("type".into(), "dataset".into());
            entry.insert("path".into(), shard.display().to_string().into());
            section.insert("shard".into(), entry.into());
            let resources = NodeResources::from_toml(&section, Path::new("."))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(MeshNode {
                name: format!("node-{i}"),
                resources,
                upload_mbit,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Counting a 50 MB shard takes a few hundred million Rhai operations in one slice: more
    // than a node allows by default, well within the agent's lifetime budget.
    let limits = agent_lang::Limits::default().with_max_operations(5_000_000_000);
    let mesh = LoopbackMesh::start_with(nodes, trust, limits)
        .await
        .context("cannot start the mesh")?;
    let started = Instant::now();
    let (_, end) = mesh.run(package).await?;
    let took = started.elapsed();
    let bytes = mesh
        .nodes()
        .iter()
        .map(NodeHandle::wire_bytes)
        .fold(WireBytes::default(), WireBytes::plus);
    match end {
        AgentEnd::Finished { json, .. } => Ok(Run { json, bytes, took }),
        AgentEnd::Failed { error, node, .. } => bail!("the agent failed on {node}: {error}"),
    }
}
