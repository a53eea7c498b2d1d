//! The `--node ADDR` and `--key FILE` arguments of the commands that talk to a running node, and
//! the connection they open: to the node at ADDR, as the operator whose key is in FILE.

use std::path::PathBuf;

use anyhow::Result;
use platform::client::Client;

/// Which node to talk to, and as whom.
#[derive(clap::Args, Debug)]
pub(crate) struct NodeAddress {
    /// The node's address, ending in `/p2p/<peer id>`.
    #[arg(long)]
    node: libp2p::Multiaddr,
    /// An operator's key (PEM, from `tern keygen`) listed in the node's `[trust] operators`;
    /// without one, the node refuses the request.
    #[arg(long, env = "TERN_KEY")]
    key: Option<PathBuf>,
}

impl NodeAddress {
    /// Connects to the node, with the operator's key if one was given.
    pub(crate) async fn connect(&self) -> Result<Client> {
        let key = match &self.key {
            Some(path) => Some(platform::package_files::read_key(path)?),
            None => None,
        };
        Ok(Client::connect(&self.node, key.as_ref()).await?)
    }
}
