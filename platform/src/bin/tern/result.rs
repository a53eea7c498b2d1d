//! `tern result`: how an agent ended, as its home node (or the node it ended on) recorded it.

use anyhow::Result;

use crate::agent_end::print_end;
use crate::node_address::NodeAddress;

#[derive(clap::Args, Debug)]
pub(crate) struct ResultArgs {
    /// The agent's id.
    agent: String,
    #[command(flatten)]
    node: NodeAddress,
}

/// Runs `tern result`.
pub(crate) async fn result(args: ResultArgs) -> Result<()> {
    let end = args.node.connect().await?.result(&args.agent).await?;
    print_end(&args.agent, end)
}
