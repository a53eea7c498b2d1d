//! `tern status`: a node's peers, agents, forwarding pointers and activity (counts of what its
//! event stream reported since it started, and the latest events), as text or JSON.

use anyhow::Result;

use platform::wire::Activity;

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
        let activity = serde_json::to_value(&report.activity)?;
        println!(
            "{}",
            serde_json::json!({"name": report.name, "peer_id": report.peer_id, "peers": peers, "agents": agents, "forwards": forwards, "activity": activity, "store": report.store, "bytes": report.bytes.sent_json(), "remote": report.remote})
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
        println!(
            "store: {} of {} bytes of agents' state ({} chunks kept by copy-on-reference)",
            report.store.stored_bytes, report.store.max_store_bytes, report.store.cached_chunks
        );
        for (name, place) in &report.moved_resources {
            println!("moved {name}: {place}");
        }
        let b = &report.bytes;
        println!(
            "bytes sent/received: hop {}/{}, package {}/{}, control {}/{}, resource {}/{}",
            b.hop.0,
            b.hop.1,
            b.package.0,
            b.package.1,
            b.control.0,
            b.control.1,
            b.resource.0,
            b.resource.1
        );
        println!("remote resources in use: {}", report.remote.len());
        for d in &report.remote {
            let ago = d.seconds_ago;
            if d.serves {
                println!(
                    "  {} at {} uses '{}' here ({ago} s ago)",
                    d.agent, d.node, d.resource
                );
            } else {
                println!(
                    "  {} uses '{}' of {} ({ago} s ago)",
                    d.agent, d.resource, d.node
                );
            }
        }
        println!("forwarding pointers: {}", report.forwards.len());
        for (a, n) in &report.forwards {
            println!("  {a} -> {n}");
        }
        print_activity(&report.activity);
    }
    Ok(())
}

fn print_activity(activity: &Activity) {
    let c = &activity.counts;
    println!(
        "since start: agents {} launched, {} resumed, {} finished, {} failed; \
         hops {} offered, {} committed, {} stored, {} refused, {} failed; \
         messages {} queued, {} delivered; peers {} up, {} down, {} refused a pinned name",
        c.agents_launched,
        c.agents_resumed,
        c.agents_finished,
        c.agents_failed,
        c.hops_offered,
        c.hops_committed,
        c.hops_stored,
        c.hops_refused,
        c.hops_failed,
        c.messages_queued,
        c.messages_delivered,
        c.peers_up,
        c.peers_down,
        c.names_refused,
    );
    if activity.missed > 0 {
        println!(
            "  ({} events missed while the node was busy)",
            activity.missed
        );
    }
    println!("recent events (UTC): {}", activity.recent.len());
    for e in &activity.recent {
        println!("  {}  {}", time_of_day(e.at_ms), e.event);
    }
}

/// `HH:MM:SS.mmm` (UTC) of a unix time in milliseconds.
fn time_of_day(at_ms: u64) -> String {
    let ms = at_ms % 1000;
    let s = (at_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}.{ms:03}", s / 3600, s / 60 % 60, s % 60)
}
