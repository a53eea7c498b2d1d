//! `tern run`: an agent (a script or a signed package) on an embedded mesh of N nodes inside this
//! process, its hops traced on stderr and its result on the last line of stdout.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use platform::loopback::{HopTrace, MeshNode, TracedHop};
use platform::package_files;
use platform::wire::{AgentEnd, WireBytes};

use crate::agent_end::{failed, note_unread, report_failure, AgentFailed};

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// The agent: a Rhai script.
    file: PathBuf,
    /// Number of nodes in the mesh (named node-0 .. node-{N-1}); the agent starts on node-0.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=256), conflicts_with = "mesh")]
    nodes: u16,
    /// The mesh to run on, described in a TOML file: its nodes, in order (the agent starts on
    /// the first), and the resources each offers (see the README).
    #[arg(long, value_name = "FILE")]
    mesh: Option<PathBuf>,
    /// Caps every node's upload at this many Mbit/s (a node the mesh description caps keeps
    /// its own).
    #[arg(long, value_name = "MBIT", value_parser = parse_mbit)]
    upload_mbit: Option<f64>,
    /// Declares how the script binds a resource (NAME=POLICY[/BINDING]; repeatable), as
    /// `tern pack --resource` does. A package declares its own.
    #[arg(long = "resource", value_name = "NAME=POLICY[/BINDING]")]
    resources: Vec<String>,
    /// Write one line per hop to stderr: from, to, continuation bytes, microseconds.
    #[arg(long)]
    trace: bool,
    /// Machine-readable output: only the result on stdout; trace lines and errors as JSON on stderr.
    #[arg(long)]
    json: bool,
    /// Operations the agent may run between two suspensions before it is stopped.
    #[arg(long, default_value_t = agent_lang::Limits::default().max_operations)]
    max_operations: u64,
    /// Bytes of memory all of the agent's values together may take on a node.
    #[arg(
        long,
        default_value_t = agent_lang::Limits::default().max_memory_bytes,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_memory_bytes: u64,
    /// Trust packages signed by this author key (`ed25519:<hex>`; repeatable). Packages of other
    /// authors are refused.
    #[arg(long = "trust-author", value_name = "KEY")]
    trust_authors: Vec<String>,
    /// Trust packages of any author (development only).
    #[arg(long)]
    trust_any_author: bool,
}

/// Runs `tern run`.
pub(crate) fn run_agent(args: RunArgs) -> Result<()> {
    let mut limits = agent_lang::Limits::default()
        .with_max_operations(args.max_operations)
        .with_max_memory_bytes(args.max_memory_bytes);
    let (package, trust) = if args.file.extension().is_some_and(|e| e == "tern") {
        if !args.resources.is_empty() {
            anyhow::bail!(
                "--resource declares a script's bindings; the package {} declares its own",
                args.file.display()
            );
        }
        let package = package_files::read_package(&args.file)?;
        let trust = trust_policy(&args)?;
        let grant = package_files::admit(&trust, &package)?;
        limits = package_files::limits_for(&grant.limits, limits);
        (package, trust)
    } else {
        let source = std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
        // Refuse a script that does not compile before starting any node.
        if let Err(e) = agent_lang::Program::compile(&source, &limits) {
            report_failure(
                args.json,
                "node-0",
                &args.file.display().to_string(),
                &e.to_string(),
                Some(e.position()),
            );
            return Err(AgentFailed.into());
        }
        // A plain script is signed with a throwaway key that only this run's nodes trust.
        let key = security::SecretKey::generate();
        let name = args
            .file
            .file_stem()
            .map_or_else(|| "agent".into(), |s| s.to_string_lossy().into_owned());
        let spec = package_files::PackSpec {
            name,
            version: "0.0.0".into(),
            resources: crate::pack::resource_decls(&args.resources)?,
            capabilities: Vec::new(),
            limits: security::PackageLimits::default(),
        };
        let package = package_files::pack(source, spec, &key, crate::pack::now_ms())?.verify()?;
        let trust: security::TrustPolicy = toml::from_str(&format!(
            "authors = [{{ key = \"{}\", resources = \"any\" }}]",
            key.public()
        ))?;
        (package, trust)
    };
    // Every node of the one-process mesh accepts pushes from the others.
    let trust = security::TrustPolicy {
        accept_from: security::PeersPolicy::Any,
        ..trust
    };
    crate::runtime()?.block_on(run_on_loopback(&args, package, trust, limits))
}

async fn run_on_loopback(
    args: &RunArgs,
    package: security::VerifiedPackage,
    trust: security::TrustPolicy,
    limits: agent_lang::Limits,
) -> Result<()> {
    let mut nodes = match &args.mesh {
        Some(path) => MeshNode::read_mesh(path)?,
        None => (0..args.nodes)
            .map(|i| MeshNode {
                name: format!("node-{i}"),
                resources: Default::default(),
                upload_mbit: None,
            })
            .collect(),
    };
    for node in &mut nodes {
        node.upload_mbit = node.upload_mbit.or(args.upload_mbit);
    }
    let mesh = platform::loopback::LoopbackMesh::start_with(nodes, trust, limits)
        .await
        .context("cannot start the mesh")?;
    let mut trace = args.trace.then(|| HopTrace::new(&mesh));
    let print_hop = |h: TracedHop| {
        if args.json {
            eprintln!(
                "{}",
                serde_json::json!({"hop": h.hop, "from": h.from, "to": h.to, "bytes": h.bytes, "micros": h.micros})
            );
        } else {
            eprintln!(
                "hop {}: {} -> {}  {} bytes  {} µs",
                h.hop, h.from, h.to, h.bytes, h.micros
            );
        }
    };
    let started = Instant::now();
    let (agent, end) = {
        let run = mesh.run(package);
        tokio::pin!(run);
        loop {
            tokio::select! {
                ended = &mut run => break ended?,
                Some(h) = async { trace.as_mut()?.next().await } => print_hop(h),
            }
        }
    };
    // Destinations report a hop before the agent runs there: every hop is already published.
    for h in trace.as_mut().map(HopTrace::rest).unwrap_or_default() {
        print_hop(h);
    }
    let by_node: Vec<(String, WireBytes)> = mesh
        .nodes()
        .iter()
        .map(|n| (n.name().to_string(), n.wire_bytes()))
        .collect();
    let bytes = by_node
        .iter()
        .map(|(_, b)| *b)
        .fold(WireBytes::default(), WireBytes::plus);
    drop(mesh);
    note_unread(&agent, &end);
    let outcome = match end {
        AgentEnd::Finished {
            json, node, hops, ..
        } => {
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            if !args.json {
                writeln!(
                    out,
                    "agent {agent} finished on {node} after {hops} hops in {:.1?}",
                    started.elapsed()
                )?;
            }
            writeln!(out, "{json}")?;
            out.flush()?;
            Ok(())
        }
        AgentEnd::Failed {
            error,
            node,
            position,
            ..
        } => Err(failed(args.json, &node, &agent, &error, position)),
    };
    // Bytes on the wire: the mesh's protocols, every node's sent bytes together (and, with
    // `--trace`, each node's first).
    if args.json {
        eprintln!("{}", serde_json::json!({"bytes": bytes.sent_json()}));
    } else if args.trace {
        let sent = |b: &WireBytes| {
            format!(
                "hop {}, package {}, control {}, resource {}",
                b.hop.0, b.package.0, b.control.0, b.resource.0
            )
        };
        for (node, b) in &by_node {
            eprintln!("bytes sent by {node}: {}", sent(b));
        }
        eprintln!("bytes sent: {}", sent(&bytes));
    }
    outcome
}

/// The trust policy of an embedded run, from `--trust-author` / `--trust-any-author`.
fn trust_policy(args: &RunArgs) -> Result<security::TrustPolicy> {
    let authors = if args.trust_any_author {
        "\"any\"".to_string()
    } else {
        let keys: Vec<String> = args
            .trust_authors
            .iter()
            .map(|k| {
                // The mesh is the user's own: its resources are theirs to use.
                k.parse::<security::PublicKey>()
                    .map(|k| format!("{{ key = \"{k}\", resources = \"any\" }}"))
                    .with_context(|| format!("--trust-author {k}"))
            })
            .collect::<Result<_>>()?;
        format!("[{}]", keys.join(", "))
    };
    let text = format!("authors = {authors}");
    toml::from_str(&text).context("trust policy")
}

/// An upload cap given on the command line (`tern run`, `tern demo`).
pub(crate) fn parse_mbit(text: &str) -> Result<f64, String> {
    let mbit = text
        .parse::<f64>()
        .map_err(|_| format!("'{text}' is not a number of Mbit/s"))?;
    platform::node::check_upload_mbit(mbit)
}
