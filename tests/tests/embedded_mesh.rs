//! The embedded mesh end to end: real node threads, only bytes between them.

use tern_tests::{run_on_mesh, Ending};

#[test]
fn an_agent_tours_the_mesh_and_comes_home() {
    let source = r#"
        let seen = [];
        for n in nodes() { migrate(n); seen.push(here()); }
        migrate(home());
        [seen, here(), hops()]
    "#;
    match run_on_mesh(4, source) {
        Ending::Finished {
            node,
            json,
            hops,
            hop_records,
        } => {
            assert_eq!(node, "node-0");
            assert_eq!(
                json,
                r#"[["node-0","node-1","node-2","node-3"],"node-0",5]"#
            );
            assert_eq!((hops, hop_records), (5, 5));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn thousands_of_hops() {
    let source = r#"
        let n = 0;
        while n < 3000 { migrate(nodes()[n % 3]); n += 1; }
        [n, hops()]
    "#;
    match run_on_mesh(3, source) {
        Ending::Finished { json, .. } => assert_eq!(json, "[3000,3000]"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_failure_names_the_node() {
    match run_on_mesh(3, "migrate(\"node-2\");\nlet x = 1 / 0;") {
        Ending::Failed { node, error } => {
            assert_eq!(node, "node-2");
            assert!(error.contains("line 2"), "{error}");
        }
        other => panic!("{other:?}"),
    }
}
