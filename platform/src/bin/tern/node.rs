//! `tern node`: one node as a long-lived daemon, configured by a TOML file, until SIGINT or
//! SIGTERM; its agents stay in its store.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub(crate) struct NodeArgs {
    /// The node's configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
}

/// Runs `tern node`: prints the addresses it listens on, then runs until a shutdown signal.
pub(crate) async fn run_node(args: NodeArgs) -> Result<()> {
    let config = platform::config::load(&args.config)?;
    if config.durability == platform::store::Durability::NoSync {
        eprintln!(
            "warning: {}: durability = \"none\": a crash or power loss can roll this node's \
             store back to an older state, and then an agent that had left it runs here again \
             while it also runs elsewhere (forked), or a hop it took is lost. Use \"fsync\" \
             (the default) for anything but tests.",
            args.config.display()
        );
    }
    let handle = platform::node::Node::start(config).await?;
    for addr in handle.listen_addrs() {
        println!("listening on {addr}");
    }
    std::io::stdout().flush()?;
    tokio::select! {
        () = shutdown_signal() => handle.shutdown(),
        () = handle.stopped() => {}
    }
    if let Some(cause) = handle.store_failure() {
        anyhow::bail!(
            "{}: stopped because its store failed ({cause}); agents stay as they were last \
             stored and resume from there when the node starts again",
            handle.name()
        );
    }
    eprintln!("{}: stopped; agents are kept in the store", handle.name());
    Ok(())
}

/// Ends at Ctrl-C or (on Unix) SIGTERM.
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
