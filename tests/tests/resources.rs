//! Node resources through real nodes: datasets, tables and values declared in each node's
//! configuration, reached by agents whose packages bind them, across hops.

use std::path::Path;
use std::time::Duration;

use platform::loopback::LoopbackMesh;
use platform::resources::NodeResources;
use platform::wire::AgentEnd;
use tern_tests::package_binding;

fn resources(toml_text: &str, base: &Path) -> NodeResources {
    let table: toml::Table = toml::from_str(toml_text).expect("resources TOML");
    NodeResources::from_toml(&table, base).unwrap_or_else(|e| panic!("{e}"))
}

/// Three nodes, each with a dataset `shard` of its own and a table `counts`; node-0 also
/// offers a value `settings`, and node-2 has no `shard`.
fn three_nodes(dir: &Path) -> Vec<NodeResources> {
    (0..3)
        .map(|i| {
            let shard = dir.join(format!("shard-{i}"));
            std::fs::write(&shard, format!("alpha {i}\nbeta {i}\n")).expect("shard");
            let mut text = String::from("[counts]\ntype = \"table\"\n");
            if i < 2 {
                text += &format!("[shard]\ntype = \"dataset\"\npath = \"shard-{i}\"\n");
            }
            if i == 0 {
                text +=
                    "[settings]\ntype = \"value\"\nvalue = { depth = 3, names = [\"a\", \"b\"] }\n";
            }
            resources(&text, dir)
        })
        .collect()
}

async fn run(source: &str, bindings: &[(&str, &str)]) -> AgentEnd {
    let dir = tempfile::tempdir().expect("dir");
    let (package, trust) = package_binding(source, bindings);
    let mesh = LoopbackMesh::start_with(3, trust, Default::default(), three_nodes(dir.path()))
        .await
        .expect("mesh");
    let (_, end) = tokio::time::timeout(Duration::from_secs(60), mesh.run(package))
        .await
        .expect("in time")
        .expect("runs");
    end
}

fn json(end: AgentEnd) -> String {
    match end {
        AgentEnd::Finished { json, .. } => json,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rebound_dataset_is_read_where_the_agent_is_and_a_node_without_it_throws() {
    tern_tests::runtime().block_on(async {
        let end = run(
            r#"
                let shard = resource("shard");
                let seen = [];
                for n in ["node-0", "node-1", "node-2", "node-0"] {
                    migrate(n);
                    try {
                        seen.push([here(), shard.line_count(), shard.lines(1, 5), shard.size()]);
                    } catch (e) {
                        seen.push(e);
                    }
                }
                seen
            "#,
            &[("shard", "rebind")],
        )
        .await;
        assert_eq!(
            json(end),
            concat!(
                r#"[["node-0",2,["beta 0"],15],["node-1",2,["beta 1"],15],"#,
                r#""line_count: node 'node-2' has no resource 'shard'",["node-0",2,["beta 0"],15]]"#
            )
        );
    });
}

#[test]
fn tables_persist_at_their_node_and_values_are_portable() {
    tern_tests::runtime().block_on(async {
        let end = run(
            r#"
                let counts = resource("counts");
                let settings = resource("settings").get();
                for n in ["node-0", "node-1", "node-0"] {
                    migrate(n);
                    let visits = counts.get("visits") ?? 0;
                    counts.set("visits", visits + 1);
                    counts.set(`by-${hops()}`, #{ at: here() });
                }
                // (migrate("node-0") on node-0 is a hop too: `by-1` was written at node-0.)
                let removed = counts.remove("by-1");
                [settings, counts.len(), counts.keys(0, 10), counts.get("visits"), removed]
            "#,
            &[("counts", "rebind"), ("settings", "rebind")],
        )
        .await;
        assert_eq!(
            json(end),
            r#"[{"depth":3,"names":["a","b"]},2,["by-3","visits"],2,{"at":"node-0"}]"#
        );
    });
}

#[test]
fn undeclared_and_not_yet_provided_bindings_are_refused_with_the_reason() {
    tern_tests::runtime().block_on(async {
        let end = run(
            r#"
                let errors = [];
                try { resource("shard"); } catch (e) { errors.push(e); }
                try { resource("counts"); } catch (e) { errors.push(e); }
                try { resource("../../etc/passwd"); } catch (e) { errors.push(e); }
                errors
            "#,
            &[("counts", "remote")],
        )
        .await;
        let text = json(end);
        assert!(
            text.contains("declares no resource 'shard'")
                && text.contains("'counts' is declared with the remote binding")
                && text.contains("declares no resource '../../etc/passwd'"),
            "{text}"
        );
    });
}

#[test]
fn a_malformed_resource_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("dir");
    for (text, says) in [
        (
            "[a]\ntype = \"disk\"",
            "resource 'a': unknown resource type 'disk'",
        ),
        (
            "[a]\ntype = \"dataset\"",
            "resource 'a': a dataset needs a 'path'",
        ),
        (
            "[a]\ntype = \"dataset\"\npath = \"missing\"",
            "resource 'a':",
        ),
        (
            "[a]\ntype = \"table\"\npath = \"x\"",
            "resource 'a': a table has no 'path'",
        ),
        (
            "[a]\ntype = \"value\"",
            "resource 'a': a value resource needs a 'value'",
        ),
        (
            "[a]\ntype = \"table\"\nmobility = \"roaming\"",
            "unknown mobility 'roaming'",
        ),
        ("[a]\ntype = \"table\"\nsize = 3", "unknown field 'size'"),
        (
            "[\"a/b\"]\ntype = \"table\"",
            "resource 'a/b': a resource name is",
        ),
    ] {
        let table: toml::Table = toml::from_str(text).expect("TOML");
        let err = NodeResources::from_toml(&table, dir.path()).expect_err(text);
        assert!(err.contains(says), "{text}: {err}");
    }
}
