//! The `tern` command line: parse the arguments, run the command, map failures to exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use platform::mesh::{Mesh, MeshOptions, NodeEvent};
use platform::package_files;

/// tern: mobile agents in Rhai that travel with their whole execution state.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an agent (a .rhai script or a signed .tern package) on an embedded mesh of N nodes
    /// inside this process.
    Run(RunArgs),
    /// Create an ed25519 key (for an author or a node) as a PKCS#8 PEM file.
    Keygen(KeygenArgs),
    /// Compile a script and sign it into a package.
    Pack(PackArgs),
    /// Show a package's manifest, author and hash, and whether its signature verifies.
    Inspect(InspectArgs),
}

#[derive(clap::Args, Debug)]
struct KeygenArgs {
    /// Where to write the secret key (mode 0600).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
    /// Print the public key and peer id as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct PackArgs {
    /// The agent's Rhai script.
    script: PathBuf,
    /// The author's secret key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Package name (default: the script's file stem).
    #[arg(long)]
    name: Option<String>,
    /// Version text.
    #[arg(long, default_value = "0.1.0")]
    version: String,
    /// A resource binding, NAME=POLICY with POLICY one of copy, rebind, remote, move (repeatable).
    #[arg(long = "resource", value_name = "NAME=POLICY")]
    resources: Vec<String>,
    /// A capability the agent asks for (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    /// Operations per run slice the agent asks for.
    #[arg(long)]
    max_operations: Option<u64>,
    /// Where to write the package (default: the script path with extension .tern).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct InspectArgs {
    /// The package file.
    file: PathBuf,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The agent: a Rhai script.
    file: PathBuf,
    /// Number of nodes in the mesh (named node-0 .. node-{N-1}); the agent starts on node-0.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=256))]
    nodes: u16,
    /// Write one line per hop to stderr: from, to, continuation bytes, microseconds.
    #[arg(long)]
    trace: bool,
    /// Machine-readable output: only the result on stdout; trace lines and errors as JSON on stderr.
    #[arg(long)]
    json: bool,
    /// Operations the agent may run between two suspensions before it is stopped.
    #[arg(long, default_value_t = agent_lang::Limits::default().max_operations)]
    max_operations: u64,
    /// Trust packages signed by this author key (`ed25519:<hex>`; repeatable). Packages of other
    /// authors are refused.
    #[arg(long = "trust-author", value_name = "KEY")]
    trust_authors: Vec<String>,
    /// Trust packages of any author (development only).
    #[arg(long)]
    trust_any_author: bool,
}

/// An agent that ran but did not succeed: reported, then exit code 1.
struct AgentFailed;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<AgentFailedMarker>() => ExitCode::from(1),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("agent failed")]
struct AgentFailedMarker;

impl From<AgentFailed> for anyhow::Error {
    fn from(_: AgentFailed) -> Self {
        AgentFailedMarker.into()
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => run_agent(args),
        Command::Keygen(args) => keygen(args),
        Command::Pack(args) => pack(args),
        Command::Inspect(args) => inspect(args),
    }
}

fn run_agent(args: RunArgs) -> Result<()> {
    let mut limits = agent_lang::Limits::default().with_max_operations(args.max_operations);
    let source = if args.file.extension().is_some_and(|e| e == "tern") {
        let package = package_files::read_package(&args.file)?;
        package_files::admit(&trust_policy(&args)?, &package)?;
        limits = package_files::limits_for(&package, limits);
        package.source().to_string()
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?
    };
    // Refuse a script that does not compile before starting any node.
    if let Err(e) = agent_lang::Program::compile(&source, &limits) {
        report_failure(
            &args,
            "node-0",
            &args.file.display().to_string(),
            &e.to_string(),
            Some(e.position()),
        );
        return Err(AgentFailed.into());
    }
    let (mesh, events) = Mesh::start(&MeshOptions {
        nodes: args.nodes as usize,
        limits,
    })
    .context("cannot start the embedded mesh")?;
    let agent_id = agent_id(&source);
    let started = Instant::now();
    mesh.launch(&agent_id, &source);
    let stdout = std::io::stdout();
    loop {
        let event = events
            .recv_timeout(Duration::from_secs(3600))
            .context("the mesh stopped answering")?;
        match event {
            NodeEvent::Print { node, text } => eprintln!("[{node} {agent_id}] {text}"),
            NodeEvent::Hop(h) if args.trace => {
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
            }
            NodeEvent::Hop(_) => {}
            NodeEvent::Finished { node, value, hops } => {
                let mut out = stdout.lock();
                if !args.json {
                    writeln!(
                        out,
                        "agent {agent_id} finished on {node} after {hops} hops in {:.1?}",
                        started.elapsed()
                    )?;
                }
                writeln!(out, "{}", agent_lang::to_json(&value))?;
                out.flush()?;
                return Ok(());
            }
            NodeEvent::Failed { node, error } => {
                let position = match &error {
                    platform::mesh::AgentFailure::Agent(e) => e.position,
                    platform::mesh::AgentFailure::Compile(e) => Some(e.position()),
                    _ => None,
                };
                let message = match &error {
                    platform::mesh::AgentFailure::Agent(e) => e.message.clone(),
                    other => other.to_string(),
                };
                report_failure(&args, &node, &agent_id, &message, position);
                return Err(AgentFailed.into());
            }
        }
    }
}

fn report_failure(
    args: &RunArgs,
    node: &str,
    what: &str,
    message: &str,
    position: Option<(usize, usize)>,
) {
    if args.json {
        let (line, column) = position.map_or((None, None), |(l, c)| (Some(l), Some(c)));
        eprintln!(
            "{}",
            serde_json::json!({"error": message, "node": node, "agent": what, "line": line, "column": column})
        );
    } else {
        match position {
            Some((l, c)) => {
                eprintln!("error: {what} failed on {node} at line {l}, column {c}: {message}")
            }
            None => eprintln!("error: {what} failed on {node}: {message}"),
        }
    }
}

/// A fresh agent id: the source hash mixed with the clock and the process id.
fn agent_id(source: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(source.as_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.finalize().to_hex()[..12].to_string()
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
                k.parse::<security::PublicKey>()
                    .map(|k| format!("\"{k}\""))
                    .with_context(|| format!("--trust-author {k}"))
            })
            .collect::<Result<_>>()?;
        format!("[{}]", keys.join(", "))
    };
    let text = format!("authors = {authors}");
    toml::from_str(&text).context("trust policy")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn keygen(args: KeygenArgs) -> Result<()> {
    let key = package_files::write_new_key(&args.out, args.force)?;
    let public = key.public();
    if args.json {
        println!(
            "{}",
            serde_json::json!({"public_key": public.to_string(), "peer_id": public.peer_id_string(), "file": args.out})
        );
    } else {
        println!("wrote {}", args.out.display());
        println!("public key: {public}");
        println!("peer id:    {}", public.peer_id_string());
    }
    Ok(())
}

fn pack(args: PackArgs) -> Result<()> {
    let key = package_files::read_key(&args.key)?;
    let source = std::fs::read_to_string(&args.script)
        .with_context(|| format!("cannot read {}", args.script.display()))?;
    let resources = args
        .resources
        .iter()
        .map(|r| {
            let (name, policy) = r
                .split_once('=')
                .with_context(|| format!("--resource {r}: expected NAME=POLICY"))?;
            let policy = policy
                .parse()
                .map_err(|e| anyhow::anyhow!("--resource {r}: {e}"))?;
            Ok(security::ResourceDecl {
                name: name.to_string(),
                policy,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let name = match args.name {
        Some(n) => n,
        None => args
            .script
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "agent".into()),
    };
    let spec = package_files::PackSpec {
        name,
        version: args.version,
        resources,
        capabilities: args.capabilities,
        limits: security::PackageLimits {
            max_operations: args.max_operations,
            ..Default::default()
        },
    };
    let package = package_files::pack(source, spec, &key, now_ms())
        .with_context(|| format!("cannot pack {}", args.script.display()))?;
    let out = args
        .out
        .unwrap_or_else(|| args.script.with_extension("tern"));
    std::fs::write(&out, package.to_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!("wrote {}", out.display());
    println!("hash: {}", package.hash());
    Ok(())
}

fn inspect(args: InspectArgs) -> Result<()> {
    let package = package_files::read_package(&args.file)?;
    let m = package.manifest();
    if args.json {
        let resources: Vec<_> = m
            .resources
            .iter()
            .map(|r| serde_json::json!({"name": r.name, "policy": r.policy.as_str()}))
            .collect();
        let limits: serde_json::Map<String, serde_json::Value> = m
            .limits
            .entries()
            .iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), v.into())))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "name": m.name, "version": m.version, "author": m.author.to_string(), "created_ms": m.created_ms,
                "hash": package.hash().to_string(), "signature": "valid", "resources": resources,
                "capabilities": m.capabilities, "limits": limits, "source_bytes": package.source().len(),
            })
        );
    } else {
        println!("package:      {} {}", m.name, m.version);
        println!("hash:         {}", package.hash());
        println!("author:       {}", m.author);
        println!("signature:    valid");
        println!("created (ms): {}", m.created_ms);
        for r in &m.resources {
            println!("resource:     {} ({})", r.name, r.policy.as_str());
        }
        for c in &m.capabilities {
            println!("capability:   {c}");
        }
        for (k, v) in m.limits.entries() {
            if let Some(v) = v {
                println!("limit:        {k} = {v}");
            }
        }
        println!("source:       {} bytes", package.source().len());
    }
    Ok(())
}
