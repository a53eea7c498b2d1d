//! The `tern` command line: parse the arguments, run the command, map failures to exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

// jemalloc, configured for large hops: see `platform::memory`.
platform::jemalloc_for_large_hops!();

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
    /// Run one node as a long-lived daemon.
    Node(NodeArgs),
    /// Hand a package to a node and wait for the agent's result.
    Launch(LaunchArgs),
    /// Show a node's peers, agents and forwarding pointers.
    Status(StatusArgs),
    /// Send a message (a JSON value) to an agent, through any node of its mesh.
    Send(SendArgs),
    /// Print how an agent ended, as its home node (or the node it ended on) recorded it.
    Result(ResultArgs),
}

#[derive(clap::Args, Debug)]
struct ResultArgs {
    /// The agent's id.
    agent: String,
    /// The node's address, ending in `/p2p/<peer id>`.
    #[arg(long)]
    node: libp2p::Multiaddr,
}

#[derive(clap::Args, Debug)]
struct SendArgs {
    /// The receiving agent's id.
    agent: String,
    /// The message, as JSON (e.g. '42', '"hi"', '{"x": [1, 2]}').
    message: String,
    /// The node's address, ending in `/p2p/<peer id>`.
    #[arg(long)]
    node: libp2p::Multiaddr,
}

#[derive(clap::Args, Debug)]
struct NodeArgs {
    /// The node's configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
}

#[derive(clap::Args, Debug)]
struct LaunchArgs {
    /// The signed package.
    package: PathBuf,
    /// The node's address, ending in `/p2p/<peer id>`.
    #[arg(long)]
    node: libp2p::Multiaddr,
    /// Do not wait: print the agent id and return.
    #[arg(long)]
    detach: bool,
}

#[derive(clap::Args, Debug)]
struct StatusArgs {
    /// The node's address, ending in `/p2p/<peer id>`.
    #[arg(long)]
    node: libp2p::Multiaddr,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
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

/// An agent that ran but did not succeed: already reported on stderr; exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("agent failed")]
struct AgentFailed;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<AgentFailed>() => ExitCode::from(1),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
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
        Command::Node(args) => runtime()?.block_on(node(args)),
        Command::Launch(args) => runtime()?.block_on(launch(args)),
        Command::Status(args) => runtime()?.block_on(status(args)),
        Command::Send(args) => runtime()?.block_on(send(args)),
        Command::Result(args) => runtime()?.block_on(result(args)),
    }
}

fn run_agent(args: RunArgs) -> Result<()> {
    let mut limits = agent_lang::Limits::default().with_max_operations(args.max_operations);
    let (package, trust) = if args.file.extension().is_some_and(|e| e == "tern") {
        let package = package_files::read_package(&args.file)?;
        let trust = trust_policy(&args)?;
        package_files::admit(&trust, &package)?;
        limits = package_files::limits_for(&package, limits);
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
            resources: Vec::new(),
            capabilities: Vec::new(),
            limits: security::PackageLimits::default(),
        };
        let package = package_files::pack(source, spec, &key, now_ms())?.verify()?;
        let trust: security::TrustPolicy =
            toml::from_str(&format!("authors = [\"{}\"]", key.public()))?;
        (package, trust)
    };
    // Every node of the one-process mesh accepts pushes from the others.
    let trust = security::TrustPolicy {
        accept_from: security::PeersPolicy::Any,
        ..trust
    };
    runtime()?.block_on(run_on_loopback(&args, package, trust, limits))
}

async fn run_on_loopback(
    args: &RunArgs,
    package: security::VerifiedPackage,
    trust: security::TrustPolicy,
    limits: agent_lang::Limits,
) -> Result<()> {
    let mesh = platform::loopback::LoopbackMesh::start(args.nodes as usize, trust, limits)
        .await
        .context("cannot start the mesh")?;
    let mut trace = args.trace.then(|| platform::loopback::HopTrace::new(&mesh));
    let print_hop = |h: platform::loopback::TracedHop| {
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
    for h in trace.as_mut().map(|t| t.rest()).unwrap_or_default() {
        print_hop(h);
    }
    drop(mesh);
    note_unread(&agent, &end);
    match end {
        platform::wire::AgentEnd::Finished {
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
        platform::wire::AgentEnd::Failed {
            error,
            node,
            position,
            ..
        } => Err(failed(args.json, &node, &agent, &error, position)),
    }
}

/// Says on stderr when messages delivered to the agent were never received by it.
fn note_unread(agent: &str, end: &platform::wire::AgentEnd) {
    match end.unread() {
        0 => {}
        1 => eprintln!("note: agent {agent} ended with 1 message it never received"),
        n => eprintln!("note: agent {agent} ended with {n} messages it never received"),
    }
}

/// Reports an agent's failure (with its position in the source, when known) and returns the
/// error that makes the exit code 1.
fn failed(
    json: bool,
    node: &str,
    what: &str,
    error: &str,
    position: Option<(u64, u64)>,
) -> anyhow::Error {
    let position = position.map(|(l, c)| (l as usize, c as usize));
    report_failure(json, node, what, error, position);
    AgentFailed.into()
}

fn report_failure(
    json: bool,
    node: &str,
    what: &str,
    message: &str,
    position: Option<(usize, usize)>,
) {
    if json {
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Agent slices run on the blocking pool: room for Rhai's native recursion.
        .thread_stack_size(64 << 20)
        .build()
        .context("cannot start the async runtime")
}

async fn node(args: NodeArgs) -> Result<()> {
    let config = platform::config::load(&args.config)?;
    let handle = platform::node::Node::start(config).await?;
    for addr in handle.listen_addrs() {
        println!("listening on {addr}");
    }
    std::io::stdout().flush()?;
    shutdown_signal().await;
    handle.shutdown();
    eprintln!("{}: stopped; agents are kept in the store", handle.name());
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

async fn launch(args: LaunchArgs) -> Result<()> {
    let bytes = std::fs::read(&args.package)
        .with_context(|| format!("cannot read {}", args.package.display()))?;
    security::Package::from_bytes(&bytes)
        .and_then(security::Package::verify)
        .with_context(|| format!("{} is not a valid signed package", args.package.display()))?;
    let client = platform::client::Client::connect(&args.node).await?;
    let (agent, end) = client.launch(bytes, !args.detach).await?;
    if args.detach {
        println!("{agent}");
        return Ok(());
    }
    match end {
        Some(platform::wire::ControlReply::Ended(end)) => print_end(&agent, end),
        other => anyhow::bail!("unexpected reply from the node: {other:?}"),
    }
}

/// Prints an agent's end as `tern launch` does: the result JSON on stdout, or the error on
/// stderr and exit code 1.
fn print_end(agent: &str, end: platform::wire::AgentEnd) -> Result<()> {
    note_unread(agent, &end);
    match end {
        platform::wire::AgentEnd::Finished { json, .. } => {
            println!("{json}");
            Ok(())
        }
        platform::wire::AgentEnd::Failed {
            error,
            node,
            position,
            ..
        } => Err(failed(
            false,
            &node,
            &format!("agent {agent}"),
            &error,
            position,
        )),
    }
}

async fn status(args: StatusArgs) -> Result<()> {
    let client = platform::client::Client::connect(&args.node).await?;
    let report = match client
        .request(&platform::wire::ControlRequest::Status)
        .await?
    {
        platform::wire::ControlReply::Status(r) => r,
        other => anyhow::bail!("unexpected reply from the node: {other:?}"),
    };
    if args.json {
        let agents: Vec<_> = report
            .agents
            .iter()
            .map(|a| serde_json::json!({"id": a.id, "package": a.package, "state": a.state, "hops": a.hops}))
            .collect();
        let peers: Vec<_> = report
            .peers
            .iter()
            .map(|(n, p)| serde_json::json!({"name": n, "peer_id": p}))
            .collect();
        let forwards: Vec<_> = report
            .forwards
            .iter()
            .map(|(a, n)| serde_json::json!({"agent": a, "to": n}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"name": report.name, "peer_id": report.peer_id, "peers": peers, "agents": agents, "forwards": forwards})
        );
    } else {
        println!("node {} ({})", report.name, report.peer_id);
        println!("peers: {}", report.peers.len());
        for (n, p) in &report.peers {
            println!("  {n}  {p}");
        }
        println!("agents: {}", report.agents.len());
        for a in &report.agents {
            println!(
                "  {}  {}  hops {}  package {}",
                a.id,
                a.state,
                a.hops,
                &a.package[..16.min(a.package.len())]
            );
        }
        println!("forwarding pointers: {}", report.forwards.len());
        for (a, n) in &report.forwards {
            println!("  {a} -> {n}");
        }
    }
    Ok(())
}

async fn send(args: SendArgs) -> Result<()> {
    let json: serde_json::Value =
        serde_json::from_str(&args.message).context("the message must be a JSON value")?;
    let message = agent_lang::encode_portable(&agent_lang::from_json(&json))?;
    let client = platform::client::Client::connect(&args.node).await?;
    let request = platform::wire::ControlRequest::Deliver {
        agent: args.agent.clone(),
        message,
        ttl: 16,
        probe: false,
    };
    match client.request(&request).await? {
        platform::wire::ControlReply::Delivered => Ok(()),
        platform::wire::ControlReply::Refused(e) => {
            anyhow::bail!("cannot deliver to {}: {e}", args.agent)
        }
        platform::wire::ControlReply::Unconfirmed(e) => {
            anyhow::bail!(
                "delivery to {} unconfirmed (the message may have been delivered): {e}",
                args.agent
            )
        }
        other => anyhow::bail!("unexpected reply from the node: {other:?}"),
    }
}

async fn result(args: ResultArgs) -> Result<()> {
    let client = platform::client::Client::connect(&args.node).await?;
    let request = platform::wire::ControlRequest::Result {
        agent: args.agent.clone(),
    };
    match client.request(&request).await? {
        platform::wire::ControlReply::Ended(end) => print_end(&args.agent, end),
        platform::wire::ControlReply::Refused(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected reply from the node: {other:?}"),
    }
}
