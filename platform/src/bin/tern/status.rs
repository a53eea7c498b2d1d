//! `tern status`: a node's peers, agents and forwarding pointers, as text or JSON.

use anyhow::Result;

use crate::node_address::NodeAddress;

#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    node: NodeAddress,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `tern status`.
pub(crate) async fn status(args: StatusArgs) -> Result<()> {
    let report = args.node.connect().await?.status().await?;
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
