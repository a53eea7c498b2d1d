//! The `--node ADDR` argument of the commands that talk to a running node, and the connection
//! it opens.

use platform::client::{Client, ClientError};

/// Which node to talk to.
#[derive(clap::Args, Debug)]
pub(crate) struct NodeAddress {
    /// The node's address, ending in `/p2p/<peer id>`.
    #[arg(long)]
    node: libp2p::Multiaddr,
}

impl NodeAddress {
    /// Connects to the node.
    pub(crate) async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.node).await
    }
}
