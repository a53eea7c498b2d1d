//! A node's life in one process: stopping a node stops every task it spawned and releases its
//! store, threads and sockets; a restart resumes what it stored; what a node does shows on its
//! event stream, in order.

use std::path::Path;
use std::time::Duration;

use platform::loopback::LoopbackMesh;
use platform::node::{Node, NodeConfig, NodeEvent, NodeHandle};
use security::{SecretKey, TrustPolicy};
use tern_tests::package;
use tokio::sync::broadcast;

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

async fn start(
    name: &str,
    dir: &Path,
    key: &SecretKey,
    trust: &TrustPolicy,
    bootstrap: Vec<libp2p::Multiaddr>,
) -> NodeHandle {
    let config = NodeConfig {
        bootstrap,
        ..NodeConfig::local(name, key.clone(), dir.to_path_buf(), trust.clone())
    };
    Node::start(config).await.expect("node starts")
}

/// Two nodes, `a` and `b`, on the same directories and keys every time; the first time, an
/// agent goes from `a` to `b` and waits there for a message that never comes (so every later
/// start of `b` resumes it). Both stop; every task of both must be gone.
async fn cycle(
    dirs: &[tempfile::TempDir; 2],
    keys: &[SecretKey; 2],
    trust: &TrustPolicy,
    launch: Option<security::VerifiedPackage>,
) {
    let a = start("a", dirs[0].path(), &keys[0], trust, Vec::new()).await;
    let b = start("b", dirs[1].path(), &keys[1], trust, a.listen_addrs()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while a.peer_names().is_empty() || b.peer_names().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the nodes did not meet"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if let Some(package) = launch {
        let (agent, _end) = a.launch(package, None).expect("launch");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !b.waits_for_a_message(&agent) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent did not reach b"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let stopped = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(a.stop(), b.stop());
    })
    .await;
    assert!(stopped.is_ok(), "a node did not stop within 20 s");
    assert_eq!((a.running_tasks(), b.running_tasks()), (0, 0));
}

#[test]
fn a_node_started_and_stopped_fifty_times_leaves_nothing_behind() {
    // Blocking threads (store writes, the store's opening) go soon after their last job, so the
    // count of threads settles quickly.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(Duration::from_millis(20))
        .build()
        .unwrap();
    rt.block_on(async {
        let (agent, trust) = package(r#"migrate("b"); receive()"#);
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let keys = [SecretKey::generate(), SecretKey::generate()];
        // The first cycle starts what a process keeps (slice threads, the memory thread).
        cycle(&dirs, &keys, &trust, Some(agent)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (threads_before, files_before) = (threads(), open_files());
        for _ in 0..50 {
            // Reopening the same stores proves the last ones were released (a store cannot be
            // open twice in one process).
            cycle(&dirs, &keys, &trust, None).await;
        }
        // Let the blocking threads of the last cycle go.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while (threads(), open_files()) != (threads_before, files_before)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(threads(), threads_before, "threads left behind");
        assert_eq!(open_files(), files_before, "file handles left behind");
    });
}

/// Every event `receiver` got so far.
fn received(receiver: &mut broadcast::Receiver<NodeEvent>) -> Vec<NodeEvent> {
    std::iter::from_fn(|| receiver.try_recv().ok()).collect()
}

#[test]
fn a_hop_shows_on_both_nodes_event_streams_in_order() {
    tern_tests::runtime().block_on(async {
        let (agent, trust) = package(r#"migrate("node-1"); 1"#);
        let mesh = LoopbackMesh::start(2, trust, agent_lang::Limits::default())
            .await
            .unwrap();
        let (mut source, mut destination) = (mesh.nodes()[0].events(), mesh.nodes()[1].events());
        let (id, end) = mesh.nodes()[0].launch(agent, None).unwrap();
        end.await.unwrap();
        // The destination published its events before it reported the end home; the source
        // publishes "committed" once it reads the acknowledgement, which races with the end.
        let at_destination = received(&mut destination);
        let mut at_source = received(&mut source);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while at_source.len() < 4 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            at_source.extend(received(&mut source));
        }
        let kinds = |events: &[NodeEvent]| -> Vec<&'static str> {
            events
                .iter()
                .map(|e| match e {
                    NodeEvent::AgentLaunched { .. } => "launched",
                    NodeEvent::AgentResumed { .. } => "resumed",
                    NodeEvent::HopOffered { .. } => "offered",
                    NodeEvent::HopCommitted { .. } => "committed",
                    NodeEvent::HopStored { .. } => "stored",
                    NodeEvent::AgentEnded { .. } => "ended",
                    _ => "other",
                })
                .collect()
        };
        assert_eq!(
            kinds(&at_source),
            ["launched", "resumed", "offered", "committed"],
            "{at_source:?}"
        );
        assert_eq!(
            kinds(&at_destination),
            ["stored", "resumed", "ended"],
            "{at_destination:?}"
        );
        match &at_destination[0] {
            NodeEvent::HopStored {
                agent,
                hop,
                from,
                to,
                ..
            } => {
                assert_eq!(
                    (agent, *hop, from.as_str(), to.as_str()),
                    (&id, 1, "node-0", "node-1")
                );
            }
            other => panic!("not a stored hop: {other:?}"),
        }
        assert!(matches!(
            &at_destination[2],
            NodeEvent::AgentEnded { agent, end: platform::wire::AgentEnd::Finished { json, .. } }
                if *agent == id && json == "1"
        ));
    });
}

/// An agent whose checkpoint on a node is large (its arrival with 2 MB of state), and whose
/// next hop from there, after it let the 2 MB go, is refused: the node's runner no longer holds
/// that checkpoint's bytes, so the refused departure must leave it in the store. A restart of
/// the node then resumes the agent from its arrival (hops 1), not from nothing (it would run
/// its first lines again on that node, and count a hop to itself).
#[test]
fn a_refused_hop_after_a_large_checkpoint_leaves_it_for_a_restart() {
    tern_tests::runtime().block_on(async {
        let (agent, trust) = package(
            r#"
            let ballast = blob(2000000, 7);
            migrate("b");
            let size = ballast.len();
            ballast = ();
            let refused = false;
            try { migrate("c"); } catch { refused = true; }
            let clock = timestamp(); // not portable: the receive below stores no checkpoint
            receive();
            [here(), hops(), size, refused]
            "#,
        );
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let keys: Vec<_> = (0..3).map(|_| SecretKey::generate()).collect();
        let a = start("a", dirs[0].path(), &keys[0], &trust, Vec::new()).await;
        let b = start("b", dirs[1].path(), &keys[1], &trust, a.listen_addrs()).await;
        // c trusts no author: it refuses the hop.
        let trusts_none = TrustPolicy::default();
        let c = start(
            "c",
            dirs[2].path(),
            &keys[2],
            &trusts_none,
            a.listen_addrs(),
        )
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while [&a, &b, &c].iter().any(|n| n.peer_names().len() < 2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the nodes did not meet"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut at_b = b.events();
        let (id, end) = a.launch(agent, None).expect("launch");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, at_b.recv()).await {
                Ok(Ok(NodeEvent::HopFailed { .. })) => break,
                Ok(Ok(_)) => {}
                other => panic!("no refused hop on b: {other:?}"),
            }
        }
        // It reaches its `receive` (which stores no checkpoint) at once; if it did not, the
        // restart would resume it from the same stored checkpoint all the same.
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.stop().await;
        drop(b);
        let b = start("b", dirs[1].path(), &keys[1], &trust, a.listen_addrs()).await;
        b.send(&id, &agent_lang::rhai::Dynamic::from(1_i64))
            .await
            .expect("send");
        let end = tokio::time::timeout(Duration::from_secs(30), end)
            .await
            .expect("the agent ends")
            .expect("its end");
        match end {
            platform::wire::AgentEnd::Finished { json, .. } => {
                assert_eq!(json, r#"["b",1,2000000,true]"#);
            }
            other => panic!("{other:?}"),
        }
    });
}
