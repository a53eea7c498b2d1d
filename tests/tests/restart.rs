//! A node restarted from its data directory: it resumes the agents it stored, from the
//! checkpoints it stored.

use std::time::Duration;

use platform::node::NodeEvent;
use security::{SecretKey, TrustPolicy};
use tern_tests::{package, start_node as start};

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
