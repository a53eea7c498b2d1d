//! A node's life in one process: stopping a node stops every task it spawned and releases its
//! store, threads and sockets; what a node does shows on its event stream, in order.

use std::time::Duration;

use platform::loopback::LoopbackMesh;
use platform::node::NodeEvent;
use security::{SecretKey, TrustPolicy};
use tern_tests::{package, start_node as start};
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
