//! The `tern` command line: parse the arguments, run the command (one module each), map failures
//! to exit codes.

use std::process::ExitCode;

// jemalloc, configured for large hops: see `platform::memory`.
platform::jemalloc_for_large_hops!();

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod agent_end;
mod demo;
mod inspect;
mod keygen;
mod launch;
mod node;
mod node_address;
mod pack;
mod result;
mod run;
mod send;
mod status;

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
    Run(run::RunArgs),
    /// Run a demonstration: `wordcount`, the data-locality job (an agent that goes to the data
    /// against one that ships the data to itself), with a table of bytes and times.
    Demo(demo::DemoArgs),
    /// Create an ed25519 key (for an author or a node) as a PKCS#8 PEM file.
    Keygen(keygen::KeygenArgs),
    /// Compile a script and sign it into a package.
    Pack(pack::PackArgs),
    /// Show a package's manifest, author and hash, and whether its signature verifies.
    Inspect(inspect::InspectArgs),
    /// Run one node as a long-lived daemon.
    Node(node::NodeArgs),
    /// Hand a package to a node and wait for the agent's result.
    Launch(launch::LaunchArgs),
    /// Show a node's peers, agents and forwarding pointers.
    Status(status::StatusArgs),
    /// Send a message (a JSON value) to an agent, through any node of its mesh.
    Send(send::SendArgs),
    /// Print how an agent ended, as its home node (or the node it ended on) recorded it.
    Result(result::ResultArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<agent_end::AgentFailed>() => ExitCode::from(1),
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
        Command::Run(args) => run::run_agent(args),
        Command::Demo(args) => demo::demo(args),
        Command::Keygen(args) => keygen::keygen(args),
        Command::Pack(args) => pack::pack(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Node(args) => runtime()?.block_on(node::run_node(args)),
        Command::Launch(args) => runtime()?.block_on(launch::launch(args)),
        Command::Status(args) => runtime()?.block_on(status::status(args)),
        Command::Send(args) => runtime()?.block_on(send::send(args)),
        Command::Result(args) => runtime()?.block_on(result::result(args)),
    }
}

/// The runtime the commands that run nodes or talk to them run on.
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Room for Rhai's native recursion where the runtime compiles agents (their slices run
        // on `platform::slices` threads).
        .thread_stack_size(64 << 20)
        .build()
        .context("cannot start the async runtime")
}
