//! `tern send`: a message (a JSON value) to an agent, wherever it is, through any node of its
//! mesh.

use anyhow::{Context, Result};

use crate::node_address::NodeAddress;

#[derive(clap::Args, Debug)]
pub(crate) struct SendArgs {
    /// The receiving agent's id.
    agent: String,
    /// The message, as JSON (e.g. '42', '"hi"', '{"x": [1, 2]}').
    message: String,
    #[command(flatten)]
    node: NodeAddress,
}

/// Runs `tern send`.
pub(crate) async fn send(args: SendArgs) -> Result<()> {
    let json: serde_json::Value =
        serde_json::from_str(&args.message).context("the message must be a JSON value")?;
    let message = agent_lang::encode_portable(&agent_lang::from_json(&json))?;
    args.node
        .connect()
        .await?
        .send(&args.agent, message)
        .await?;
    Ok(())
}
