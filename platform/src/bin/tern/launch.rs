//! `tern launch`: hands a signed package to a node, then prints the agent's result (or, with
//! `--detach`, its id).

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::agent_end::print_end;
use crate::node_address::NodeAddress;

#[derive(clap::Args, Debug)]
pub(crate) struct LaunchArgs {
    /// The signed package.
    package: PathBuf,
    #[command(flatten)]
    node: NodeAddress,
    /// Do not wait: print the agent id and return.
    #[arg(long)]
    detach: bool,
}

/// Runs `tern launch`.
pub(crate) async fn launch(args: LaunchArgs) -> Result<()> {
    let bytes = std::fs::read(&args.package)
        .with_context(|| format!("cannot read {}", args.package.display()))?;
    // Refuse a damaged or unsigned file here rather than have the node refuse it.
    security::Package::from_bytes(&bytes)
        .and_then(security::Package::verify)
        .with_context(|| format!("{} is not a valid signed package", args.package.display()))?;
    let client = args.node.connect().await?;
    if args.detach {
        println!("{}", client.launch(bytes).await?);
        return Ok(());
    }
    let (agent, end) = client.launch_and_wait(bytes).await?;
    print_end(&agent, end)
}
