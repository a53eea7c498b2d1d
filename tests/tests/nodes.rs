//! Several real libp2p nodes in one process: every protocol path of a hop.

use std::time::Duration;

use platform::loopback::LoopbackMesh;
use platform::wire::AgentEnd;
use security::PeersPolicy;
use tern_tests::package;

fn rt() -> tokio::runtime::Runtime {
    tern_tests::runtime()
}

async fn run(nodes: usize, source: &str) -> AgentEnd {
    let (package, trust) = package(source);
    let mesh = LoopbackMesh::start(nodes, trust, agent_lang::Limits::default(), None)
        .await
        .unwrap();
    let (_, end) = tokio::time::timeout(Duration::from_secs(60), mesh.run(package))
        .await
        .unwrap()
        .unwrap();
    end
}

fn finished(end: AgentEnd) -> (String, String, u64) {
    match end {
        AgentEnd::Finished { json, node, hops } => (json, node, hops),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_agent_hops_between_real_nodes_and_its_result_comes_home() {
    rt().block_on(async {
        let (json, node, hops) = finished(
            run(3, r#"let seen = []; for n in nodes() { migrate(n); seen.push(here()); } [seen, hops()]"#).await,
        );
        assert_eq!(json, r#"[["node-0","node-1","node-2"],3]"#);
        assert_eq!(node, "node-2");
        assert_eq!(hops, 3);
    });
}

#[test]
fn migrate_to_an_unknown_node_throws_and_the_agent_stays() {
    rt().block_on(async {
        let (json, _, _) = finished(
            run(
                2,
                r#"let e = ""; try { migrate("nowhere"); } catch (x) { e = x; } [here(), e]"#,
            )
            .await,
        );
        assert_eq!(
            json,
            r#"["node-0","migrate: no node named 'nowhere' in the mesh"]"#
        );
    });
}

#[test]
fn an_unreachable_peer_throws_and_the_agent_stays() {
    rt().block_on(async {
        let ghost = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
        let src = format!(r#"let e = ""; try {{ migrate("{ghost}"); }} catch (x) {{ e = x; }} [here(), e.contains("cannot move")]"#);
        let (json, _, _) = finished(run(2, &src).await);
        assert_eq!(json, r#"["node-0",true]"#);
    });
}

#[test]
fn a_refusing_destination_throws_at_the_source() {
    rt().block_on(async {
        let (package, mut trust) = package(r#"let e = ""; try { migrate("node-1"); } catch (x) { e = x; } [here(), e.contains("refused")]"#);
        // Nobody accepts pushed agents.
        trust.accept_from = PeersPolicy::List(vec![]);
        let mesh = LoopbackMesh::start(2, trust, agent_lang::Limits::default(), None).await.unwrap();
        let (_, end) = mesh.run(package).await.unwrap();
        assert_eq!(finished(end).0, r#"["node-0",true]"#);
    });
}

#[test]
fn code_is_pulled_once_and_then_cached() {
    rt().block_on(async {
        let (package, trust) =
            package(r#"migrate("node-1"); migrate("node-0"); migrate("node-1"); hops()"#);
        let mesh = LoopbackMesh::start(2, trust, agent_lang::Limits::default(), None)
            .await
            .unwrap();
        let (_, end) = mesh.run(package.clone()).await.unwrap();
        assert_eq!(finished(end).0, "3");
        // A second agent of the same package finds it cached on node-1.
        let (_, end) = mesh.run(package).await.unwrap();
        assert_eq!(finished(end).0, "3");
        let status = mesh.nodes()[1].status();
        assert!(status.agents.is_empty());
    });
}

#[test]
fn failures_name_node_line_and_column() {
    rt().block_on(async {
        match run(2, "migrate(\"node-1\");\nlet x = [1][5];\n").await {
            AgentEnd::Failed { node, position, .. } => {
                assert_eq!(node, "node-1");
                assert_eq!(position.map(|p| p.0), Some(2));
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn a_large_continuation_travels_over_a_stream() {
    rt().block_on(async {
        let (json, _, _) = finished(
            run(
                2,
                "let b = blob(15000000, 7); migrate(\"node-1\"); [b.len(), here()]",
            )
            .await,
        );
        assert_eq!(json, r#"[15000000,"node-1"]"#);
    });
}

#[test]
fn recursion_with_hops_across_real_nodes() {
    rt().block_on(async {
        let src = r#"
            fn f(n) { migrate(nodes()[n % 3]); if n == 0 { return 0; } let r = f(n - 1); r + n }
            let r = f(12); [r, hops()]
        "#;
        assert_eq!(finished(run(3, src).await).0, "[78,13]");
    });
}

#[test]
fn thousands_of_hops() {
    rt().block_on(async {
        let src = "let n = 0; while n < 2000 { migrate(nodes()[n % 3]); n += 1; } [n, hops()]";
        assert_eq!(finished(run(3, src).await).0, "[2000,2000]");
    });
}
