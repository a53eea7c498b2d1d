//! The `tern` command line: parse the arguments, run the command, map failures to exit codes.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use platform::mesh::{Mesh, MeshOptions, NodeEvent};

/// tern: mobile agents in Rhai that travel with their whole execution state.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an agent on an embedded mesh of N nodes inside this process.
    Run(RunArgs),
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
    }
}

fn run_agent(args: RunArgs) -> Result<()> {
    let source = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let limits = agent_lang::Limits::default().with_max_operations(args.max_operations);
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
