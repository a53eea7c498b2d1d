//! Node resources through real nodes: datasets, tables and values declared in each node's
//! configuration, reached by agents whose packages bind them, across hops.

use std::path::Path;
use std::time::Duration;

use platform::loopback::{LoopbackMesh, MeshNode};
use platform::resources::NodeResources;
use platform::wire::{AgentEnd, ControlRefusal};
use security::VerifiedPackage;
use tern_tests::package_binding;

fn resources(toml_text: &str, base: &Path) -> NodeResources {
    let table: toml::Table = toml::from_str(toml_text).expect("resources TOML");
    NodeResources::from_toml(&table, base).unwrap_or_else(|e| panic!("{e}"))
}

/// Nodes `node-0`, `node-1`, ... with the resources of each `[resources]` text, paths relative
/// to `dir`.
fn nodes_of(texts: &[&str], dir: &Path) -> Vec<MeshNode> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| MeshNode {
            upload_mbit: None,
            name: format!("node-{i}"),
            resources: resources(text, dir),
        })
        .collect()
}

/// A loopback mesh of `nodes` that trusts as `trust` does, with the default limits.
async fn mesh_of(nodes: Vec<MeshNode>, trust: security::TrustPolicy) -> LoopbackMesh {
    LoopbackMesh::start_with(nodes, trust, Default::default())
        .await
        .expect("mesh")
}

/// Three nodes, each with a dataset `shard` of its own and a table `counts`; node-0 also
/// offers a value `settings` (and node-2 a table of that name), and node-2 has no `shard`.
fn three_nodes(dir: &Path) -> Vec<MeshNode> {
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
            if i == 2 {
                text += "[settings]\ntype = \"table\"\n";
            }
            MeshNode {
                upload_mbit: None,
                name: format!("node-{i}"),
                resources: resources(&text, dir),
            }
        })
        .collect()
}

async fn run(source: &str, bindings: &[(&str, &str)]) -> AgentEnd {
    let dir = tempfile::tempdir().expect("dir");
    let (package, trust) = package_binding(source, bindings);
    let mesh = mesh_of(three_nodes(dir.path()), trust).await;
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

/// A rebound handle at a node whose resource of that name is of another type throws, naming
/// the node, the resource and both types; the agent carries on.
#[test]
fn a_rebound_handle_meeting_another_type_throws() {
    tern_tests::runtime().block_on(async {
        let end = run(
            r#"
                let settings = resource("settings");
                let seen = [settings.get()];
                migrate("node-2");
                try { seen.push(settings.get()); } catch (e) { seen.push(e); }
                seen
            "#,
            &[("settings", "rebind")],
        )
        .await;
        assert_eq!(
            json(end),
            concat!(
                r#"[{"depth":3,"names":["a","b"]},"#,
                r#""get: resource 'settings' at node 'node-2' is a table, not a value"]"#
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
fn undeclared_bindings_and_missing_resources_are_refused_with_the_reason() {
    tern_tests::runtime().block_on(async {
        let end = run(
            r#"
                let errors = [];
                try { resource("shard"); } catch (e) { errors.push(e); }
                try { resource("elsewhere"); } catch (e) { errors.push(e); }
                try { resource("../../etc/passwd"); } catch (e) { errors.push(e); }
                errors
            "#,
            &[("elsewhere", "move")],
        )
        .await;
        let text = json(end);
        assert!(
            text.contains("declares no resource 'shard'")
                && text.contains("node 'node-0' has no resource 'elsewhere'")
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

/// Reading more lines than the agent's memory budget holds ends that agent with the budget's
/// error, however many the call asks for, before the node has allocated them all.
#[test]
fn a_read_past_the_memory_budget_ends_the_agent_not_the_node() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let text: String = (0..200_000).map(|i| format!("line number {i}\n")).collect();
        std::fs::write(dir.path().join("big"), &text).expect("dataset");
        let node = MeshNode {
            upload_mbit: None,
            name: "node-0".into(),
            resources: resources("[big]\ntype = \"dataset\"\npath = \"big\"\n", dir.path()),
        };
        let (package, trust) = package_binding(
            r#"
                let big = resource("big");
                let n = big.line_count();
                let some = big.lines(n - 3, 10);
                let all = big.lines(0, 100000000);
                [n, some, all.len()]
            "#,
            &[("big", "rebind")],
        );
        let limits = agent_lang::Limits::default().with_max_memory_bytes(1 << 20);
        let mesh = LoopbackMesh::start_with(vec![node], trust, limits)
            .await
            .expect("mesh");
        let (_, end) = mesh.run(package).await.expect("runs");
        assert!(
            matches!(&end, AgentEnd::Failed { error, .. } if error.contains("memory")),
            "{end:?}"
        );
        // Byte ranges of the same data (on a mesh of its own: a mesh trusts one author).
        let (package, trust) = package_binding(
            r#"let big = resource("big"); [big.size(), big.read(12, 14)]"#,
            &[("big", "rebind")],
        );
        let node = MeshNode {
            upload_mbit: None,
            name: "node-0".into(),
            resources: resources("[big]\ntype = \"dataset\"\npath = \"big\"\n", dir.path()),
        };
        let mesh = mesh_of(vec![node], trust).await;
        let (_, end) = mesh.run(package).await.expect("runs");
        let expected: Vec<u8> = text.as_bytes()[12..26].to_vec();
        assert_eq!(
            json(end),
            format!(
                "[{},{}]",
                text.len(),
                serde_json::to_string(&expected).expect("json")
            )
        );
    });
}

/// A node's trust policy says which resources an author's agents may use, and how: a resource
/// not granted cannot be bound, and one granted for reading cannot be written.
#[test]
fn resources_are_used_only_as_the_node_grants_them() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let (package, mut trust) = package_binding(
            r#"
                let shard = resource("shard");
                let counts = resource("counts");
                let errors = [shard.line_count(), counts.len()];
                try { counts.set("k", 1); } catch (e) { errors.push(e); }
                try { counts.remove("k"); } catch (e) { errors.push(e); }
                try { resource("settings"); } catch (e) { errors.push(e); }
                errors
            "#,
            &[("shard", "rebind"), ("counts", "rebind"), ("settings", "rebind")],
        );
        trust.authors = toml::from_str::<security::TrustPolicy>(&format!(
            r#"authors = [{{ key = "{}", resources = {{ shard = "read", counts = "read" }} }}]"#,
            package.author()
        ))
        .expect("trust")
        .authors;
        let mesh = mesh_of(three_nodes(dir.path()), trust).await;
        let (_, end) = mesh.run(package).await.expect("runs");
        assert_eq!(
            json(end),
            concat!(
                r#"[2,0,"set: node 'node-0' grants the agent's author read access only to resource 'counts'","#,
                r#""remove: node 'node-0' grants the agent's author read access only to resource 'counts'","#,
                r#""resource: node 'node-0' grants the agent's author no access to resource 'settings' ([trust] authors: resources)"]"#
            )
        );
    });
}

/// A `remote` handle stays bound to its node: from anywhere else, its calls are requests to
/// that node, whose resource they read and write.
#[test]
fn a_remote_handle_reaches_its_node_from_wherever_the_agent_is() {
    tern_tests::runtime().block_on(async {
        let end = run(
            r#"
                let far = resource("shard", "node-1");
                let counts = resource("counts");
                let seen = [far.lines(0, 10), far.kind];
                migrate("node-2");
                seen.push(far.line_count());
                counts.set("from", here());
                seen.push(counts.len());
                try { resource("shard", "node-2"); } catch (e) { seen.push(e); }
                try { resource("shard", "nowhere"); } catch (e) { seen.push(e); }
                migrate("node-0");
                seen.push(counts.get("from"));
                seen
            "#,
            &[("shard", "remote"), ("counts", "remote")],
        )
        .await;
        assert_eq!(
            json(end),
            concat!(
                r#"[["alpha 1","beta 1"],"dataset",2,1,"#,
                r#""resource: node 'node-2' has no resource 'shard'","#,
                r#""node 'nowhere' is not in the mesh","node-2"]"#
            )
        );
    });
}

/// Results larger than one reply come in pages; the agent gets them whole.
#[test]
fn a_remote_read_larger_than_a_reply_comes_in_pages() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let text: String = (0..300_000).map(|i| format!("{i:07}\n")).collect();
        std::fs::write(dir.path().join("big"), &text).expect("dataset");
        let nodes = vec![
            MeshNode {
                upload_mbit: None,
                name: "node-0".into(),
                resources: NodeResources::default(),
            },
            MeshNode {
                upload_mbit: None,
                name: "node-1".into(),
                resources: resources("[big]\ntype = \"dataset\"\npath = \"big\"\n", dir.path()),
            },
        ];
        let (package, trust) = package_binding(
            r#"
                let big = resource("big", "node-1");
                let lines = big.lines(10, 1000000);
                let bytes = big.read(8, 9000000);
                [lines.len(), lines[0], lines[lines.len() - 1], bytes.len(), big.size()]
            "#,
            &[("big", "remote")],
        );
        let mesh = mesh_of(nodes, trust).await;
        let (_, end) = mesh.run(package).await.expect("runs");
        assert_eq!(
            json(end),
            format!(
                r#"[299990,"0000010","0299999",{},{}]"#,
                text.len() - 8,
                text.len()
            )
        );
        // The owner sent the lines and the bytes: the data twice, and not much more.
        let sent = mesh.nodes()[1].wire_bytes().resource.0;
        let data = 2 * text.len() as u64;
        assert!(
            sent > data && sent < data + data / 4,
            "{sent} bytes for {data}"
        );
        assert_eq!(mesh.nodes()[0].wire_bytes().resource.1, sent);
        // Both nodes show the residual dependency.
        let uses = mesh.nodes()[0].status().expect("status").remote;
        let serves = mesh.nodes()[1].status().expect("status").remote;
        assert_eq!(
            (
                uses.len(),
                uses[0].node.as_str(),
                uses[0].resource.as_str(),
                uses[0].serves
            ),
            (1, "node-1", "big", false)
        );
        assert_eq!(
            (serves.len(), serves[0].node.as_str(), serves[0].serves),
            (1, "node-0", true)
        );
    });
}

/// Three nodes whose resources may be copied: node-0's `shard` (300 KB, fixed-transferable),
/// `counts` (free) and `settings` (free); node-1's `shard` is fixed; node-2 has none.
fn copyable_nodes(dir: &Path) -> Vec<MeshNode> {
    let big: String = (0..30_000).map(|i| format!("row {i:05}\n")).collect();
    std::fs::write(dir.join("big"), &big).expect("shard");
    std::fs::write(dir.join("small"), "one\ntwo\n").expect("shard");
    let texts = [
        concat!(
            "[shard]\ntype = \"dataset\"\npath = \"big\"\nmobility = \"fixed-transferable\"\n",
            "[counts]\ntype = \"table\"\nmobility = \"free\"\n",
            "[settings]\ntype = \"value\"\nvalue = { depth = 3 }\nmobility = \"free\"\n",
        ),
        "[shard]\ntype = \"dataset\"\npath = \"small\"\n",
        "",
    ];
    nodes_of(&texts, dir)
}

/// A copy is taken where the agent binds it and travels in its continuation (a 300 KB one by
/// the hop's bulk path): it answers at nodes without the resource, the agent's changes stay in
/// its copy (back at the owner too), and a fixed resource is not copied.
#[test]
fn a_copy_travels_with_the_agent_and_the_resource_stays_as_it_was() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let key = security::SecretKey::generate();
        let trust = tern_tests::trust_for(&key);
        let mesh = mesh_of(copyable_nodes(dir.path()), trust).await;
        let run = |source: &str, bindings: &[(&str, &str)]| {
            let package = tern_tests::package_by(&key, source, bindings);
            let mesh = &mesh;
            async move {
                let (_, end) = tokio::time::timeout(Duration::from_secs(60), mesh.run(package))
                    .await
                    .expect("in time")
                    .expect("runs");
                json(end)
            }
        };
        let filled = run(
            r#"let t = resource("counts"); t.set("a", 1); t.set("b", [2]); t.len()"#,
            &[("counts", "rebind")],
        )
        .await;
        assert_eq!(filled, "2");
        let copied = run(
            r#"
                let shard = resource("shard");
                let counts = resource("counts");
                let settings = resource("settings");
                let seen = [];
                for n in ["node-1", "node-2"] {
                    migrate(n);
                    counts.set(here(), hops());
                    seen.push([here(), shard.line_count(), shard.lines(29999, 5), counts.keys(0, 9)]);
                }
                seen.push(settings.get());
                migrate("node-1");
                try { resource("shard"); } catch (e) { seen.push(e); }
                // Back at the owner, the copy is still the agent's own.
                migrate("node-0");
                counts.set("home", hops());
                seen.push([here(), counts.len(), shard.line_count()]);
                seen
            "#,
            &[("shard", "copy"), ("counts", "copy/by-type"), ("settings", "copy")],
        )
        .await;
        assert_eq!(
            copied,
            concat!(
                r#"[["node-1",30000,["row 29999"],["a","b","node-1"]],"#,
                r#"["node-2",30000,["row 29999"],["a","b","node-1","node-2"]],{"depth":3},"#,
                r#""resource: 'shard' at node 'node-1' cannot be copied: a copy takes the "#,
                r#"resource's contents from its node, and it is fixed (not transferable): use "#,
                r#"remote",["node-0",5,30000]]"#
            )
        );
        let after = run(
            r#"let t = resource("counts"); [t.len(), t.keys(0, 9)]"#,
            &[("counts", "rebind")],
        )
        .await;
        assert_eq!(after, r#"[2,["a","b"]]"#);
    });
}

/// A copy larger than the agent's memory budget ends the agent, naming the budget.
#[test]
fn a_copy_over_the_memory_budget_ends_the_agent() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let (package, trust) = package_binding(
            r#"let shard = resource("shard"); shard.size()"#,
            &[("shard", "copy")],
        );
        let mut nodes = copyable_nodes(dir.path());
        let big = vec![b'x'; 80 << 20];
        std::fs::write(dir.path().join("huge"), big).expect("huge");
        nodes[0].resources = resources(
            "[shard]\ntype = \"dataset\"\npath = \"huge\"\nmobility = \"free\"\n",
            dir.path(),
        );
        let mesh = mesh_of(nodes, trust).await;
        let (_, end) = tokio::time::timeout(Duration::from_secs(60), mesh.run(package))
            .await
            .expect("in time")
            .expect("runs");
        match end {
            AgentEnd::Failed { error, .. } => assert!(error.contains("memory"), "{error}"),
            other => panic!("{other:?}"),
        }
    });
}

/// A binding that cannot be kept with the launching node's resource of its name (the paper's
/// columns) is refused at launch with the reason; the ones that can are launched.
#[test]
fn a_binding_the_nodes_resource_cannot_take_is_refused_at_launch() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let key = security::SecretKey::generate();
        let mesh = mesh_of(copyable_nodes(dir.path()), tern_tests::trust_for(&key)).await;
        let launch = |node: usize, bindings: &[(&str, &str)]| {
            let package = tern_tests::package_by(&key, "1", bindings);
            match mesh.nodes()[node].launch(package, None) {
                Ok(_) => String::new(),
                Err(ControlRefusal::ImpossibleBinding(why)) => why,
                Err(other) => panic!("{other}"),
            }
        };
        let why = launch(0, &[("counts", "rebind"), ("shard", "move/by-value")]);
        assert!(
            why.contains(
                "resource 'shard' is bound by move (by-value), which its fixed-transferable \
                 resource here cannot take: a move takes the resource away"
            ),
            "{why}"
        );
        let why = launch(0, &[("counts", "copy-on-reference")]);
        assert!(
            why.contains(
                "resource 'counts' is bound by copy-on-reference, which a table here cannot take"
            ),
            "{why}"
        );
        let why = launch(1, &[("shard", "copy")]);
        assert!(
            why.contains("its fixed resource here cannot take: a copy takes"),
            "{why}"
        );
        let why = launch(
            0,
            &[
                ("shard", "copy"),
                ("counts", "move"),
                ("settings", "remote"),
            ],
        );
        assert_eq!(why, "");
    });
}

/// A copy-on-reference handle reads each chunk from its owner once per node: a second pass at
/// the same node sends no resource bytes from the owner, and the chunks go when the agent
/// leaves; back at the owner, it reads the owner's resources in place. A table is not copied
/// so, and neither is a fixed resource.
#[test]
fn a_copy_on_reference_reads_each_chunk_from_the_owner_once_per_node() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let (package, trust) = package_binding(
            r#"
                let shard = resource("shard");
                let settings = resource("settings", "node-0");
                migrate("node-1");
                let passes = [];
                for pass in 0..2 {
                    let total = 0;
                    let count = shard.line_count();
                    for start in range(0, count, 7000) {
                        for line in shard.lines(start, 7000) { total += line.parse_int(); }
                    }
                    let bytes = shard.read(1000000, 1500000);
                    let across = shard.read(1048570, 14).as_string();
                    passes.push([count, total, bytes.len(), bytes[0], across, settings.get(), shard.size()]);
                    if pass == 0 { receive(); }
                }
                let errors = [];
                try { resource("counts"); } catch (e) { errors.push(e); }
                migrate("node-2");
                // Back at the owner, the handle reads the owner's own resources.
                migrate("node-0");
                let home = [here(), shard.lines(299999, 1), shard.size(), settings.get()];
                [passes[0] == passes[1], passes[0], errors, home]
            "#,
            &[
                ("shard", "copy-on-reference"),
                ("settings", "copy-on-reference"),
                ("counts", "copy-on-reference/by-type"),
            ],
        );
        let mut nodes = copyable_nodes(dir.path());
        // 2.1 MB: three chunks of bytes, 293 of lines.
        let numbers: String = (0..300_000).map(|i| format!("{i:06}\n")).collect();
        std::fs::write(dir.path().join("numbers"), numbers).expect("numbers");
        nodes[0].resources = resources(
            concat!(
                "[shard]\ntype = \"dataset\"\npath = \"numbers\"\nmobility = \"free\"\n",
                "[settings]\ntype = \"value\"\nvalue = { depth = 3 }\nmobility = \"free\"\n",
            ),
            dir.path(),
        );
        // Node-1 has a table `counts` of its own, which is not copied on reference.
        nodes[1].resources = resources("[counts]\ntype = \"table\"\nmobility = \"free\"\n", dir.path());
        let mesh = mesh_of(nodes, trust).await;
        let (id, end) = mesh.nodes()[0].launch(package, None).expect("launch");
        let owner_sent = || mesh.nodes()[0].wire_bytes().resource.0;
        let kept = || mesh.nodes()[1].status().expect("status").store.cached_chunks;
        tern_tests::eventually(|| mesh.nodes()[1].waits_for_a_message(&id)).await;
        let after_first = owner_sent();
        // 300,000 lines in chunks of 1,024, three chunks of bytes, the size, the count, the
        // value.
        assert_eq!(kept(), 293 + 3 + 3);
        assert!(after_first > 2_100_000, "{after_first}");
        let one = agent_lang::rhai::Dynamic::from(1_i64);
        mesh.nodes()[1].send(&id, &one).await.expect("delivered");
        let end = tokio::time::timeout(Duration::from_secs(60), end)
            .await
            .expect("in time")
            .expect("an end");
        let text = json(end);
        assert!(
            text.starts_with(r#"[true,[300000,44999850000,1100000,52,"5\n149796\n14979",{"depth":3},2100000],"#)
                && text.contains("it is a table, which changes")
                && text.ends_with(r#"["node-0",["299999"],2100000,{"depth":3}]]"#),
            "{text}"
        );
        assert_eq!(
            owner_sent(),
            after_first,
            "the second pass, or the reads at the owner, asked the owner again"
        );
        let at_owner = mesh.nodes()[0].status().expect("status").store.cached_chunks;
        assert_eq!(at_owner, 0, "the owner kept chunks of its own resources");
        // (Node-1 lets the agent go once node-2 has it, maybe after it ended there.)
        tern_tests::eventually(|| kept() == 0).await;
    });
}

/// A mesh of [`moving_nodes`] in a temporary directory (kept alive by the first value), whose
/// nodes trust the returned author key.
async fn moving_mesh() -> (tempfile::TempDir, security::SecretKey, LoopbackMesh) {
    let dir = tempfile::tempdir().expect("dir");
    let key = security::SecretKey::generate();
    let mesh = mesh_of(moving_nodes(dir.path()), tern_tests::trust_for(&key)).await;
    (dir, key, mesh)
}

/// Three nodes for moves: node-0 offers a free table `counts`, node-1 none, node-2 a table
/// `counts` of its own.
fn moving_nodes(dir: &Path) -> Vec<MeshNode> {
    let texts = [
        "[counts]\ntype = \"table\"\nmobility = \"free\"\n",
        "",
        "[counts]\ntype = \"table\"\nmobility = \"free\"\n",
    ];
    nodes_of(&texts, dir)
}

/// Where each node says the moved table `counts` is.
fn places(mesh: &LoopbackMesh) -> Vec<String> {
    places_of(mesh, "counts")
}

/// Where each node says the moved resource `resource` is ("-": it does not know it).
fn places_of(mesh: &LoopbackMesh, resource: &str) -> Vec<String> {
    mesh.nodes()
        .iter()
        .map(|n| {
            let report = n.status().expect("status");
            let place = report
                .moved_resources
                .iter()
                .find(|(name, _)| name == resource);
            place.map_or_else(|| "-".to_string(), |(_, place)| place.clone())
        })
        .collect()
}

/// Launches `mover` on node-0, which takes `resource` along by move to node-1 and waits there
/// for a message; returns once node-0 says the resource went to node-1 and node-1 that the
/// agent holds it (node-0 lets it go once node-1 has the agent, maybe a moment after it runs).
async fn held_on_node_1(
    mesh: &LoopbackMesh,
    mover: VerifiedPackage,
    resource: &str,
) -> (String, tokio::sync::oneshot::Receiver<AgentEnd>) {
    let (id, end) = mesh.nodes()[0].launch(mover, None).expect("launch");
    tern_tests::eventually(|| mesh.nodes()[1].waits_for_a_message(&id)).await;
    let held = format!("here, held by {id}");
    let expected = ["gone to node-1", held.as_str(), "-"];
    tern_tests::eventually(|| places_of(mesh, resource) == expected).await;
    (id, end)
}

/// What agent `id`, waiting for a message on node-1, ends with once it has one.
async fn wake_on_node_1(
    mesh: &LoopbackMesh,
    id: &str,
    end: tokio::sync::oneshot::Receiver<AgentEnd>,
) -> String {
    mesh.nodes()[1]
        .send(id, &agent_lang::rhai::Dynamic::from(1_i64))
        .await
        .expect("delivered");
    let end = tokio::time::timeout(Duration::from_secs(30), end).await;
    json(end.expect("in time").expect("an end"))
}

/// What an agent of `source` by `key`, binding `resource` by rebind, ends with on node `node`.
async fn rebound_on(
    mesh: &LoopbackMesh,
    node: usize,
    key: &security::SecretKey,
    source: &str,
    resource: &str,
) -> String {
    let package = tern_tests::package_by(key, source, &[(resource, "rebind")]);
    let (_, end) = mesh.nodes()[node].launch(package, None).expect("launch");
    let end = tokio::time::timeout(Duration::from_secs(30), end).await;
    json(end.expect("in time").expect("an end"))
}

/// A table bound by move goes with its agent at every hop and comes back with it; while the
/// agent holds it, no other agent uses it; a node with a table of the same name refuses the
/// hop (the agent stays, with its table); when the agent ends, the table stays where it ended,
/// for every agent granted it there.
#[test]
fn a_moved_table_goes_with_its_agent_and_stays_where_it_ends() {
    tern_tests::runtime().block_on(async {
        let (_dir, key, mesh) = moving_mesh().await;
        let mover = tern_tests::package_by(
            &key,
            r#"
                let t = resource("counts");
                t.set("a", 1);
                let refused = "";
                try { migrate("node-2"); } catch (e) { refused = e; }
                let seen = [here(), refused];
                migrate("node-1");
                t.set("b", here());
                seen.push(t.len());
                receive();
                migrate("node-0");
                t.set("c", 3);
                seen.push(t.keys(0, 9));
                migrate("node-1");
                seen
            "#,
            &[("counts", "move")],
        );
        let user = |node: usize| {
            let source =
                r#"let r = ""; try { r = resource("counts").len(); } catch (e) { r = e; } r"#;
            rebound_on(&mesh, node, &key, source, "counts")
        };
        let (id, end) = held_on_node_1(&mesh, mover, "counts").await;
        let there = user(1).await;
        assert!(there.contains(&format!("is held by agent {id}")), "{there}");
        let gone = user(0).await;
        assert!(gone.contains("left node 'node-0' with an agent"), "{gone}");
        // Nor from another node: a request cannot prove it comes from the holder.
        let remote = tern_tests::package_by(
            &key,
            r#"let r = ""; try { r = resource("counts", "node-1").len(); } catch (e) { r = e; } r"#,
            &[("counts", "remote")],
        );
        let (_, asked) = mesh.nodes()[0].launch(remote, None).expect("launch");
        let far = json(asked.await.expect("an end"));
        assert!(far.contains("is not served to other nodes"), "{far}");
        let text = wake_on_node_1(&mesh, &id, end).await;
        assert!(
            text.starts_with(r#"["node-0","migrate: cannot move to node-2: "#)
                && text.contains("this node has a resource 'counts' of its own")
                && text.ends_with(r#"2,["a","b","c"]]"#),
            "{text}"
        );
        tern_tests::eventually(|| places(&mesh) == ["gone to node-1", "here", "-"]).await;
        assert_eq!(user(1).await, "3");
        // Node-2's own table was never touched.
        assert_eq!(user(2).await, "0");
    });
}

/// A value bound by move goes with its agent as a table does: gone from its node while the
/// agent holds it elsewhere, refused by a node with a resource of its own of that name, back
/// with the agent, and left where the agent ends, for every agent there; a fixed value is not
/// moved (refused at launch). A table of that name may then move to the node the value left.
#[test]
fn a_moved_value_goes_with_its_agent_and_stays_where_it_ends() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let key = security::SecretKey::generate();
        let texts = [
            "[token]\ntype = \"value\"\nvalue = { owner = \"node-0\" }\nmobility = \"free\"\n\
             [pinned]\ntype = \"value\"\nvalue = 1\n",
            "",
            "[token]\ntype = \"table\"\nmobility = \"free\"\n",
        ];
        let mesh = mesh_of(nodes_of(&texts, dir.path()), tern_tests::trust_for(&key)).await;
        let pinned = tern_tests::package_by(&key, "1", &[("pinned", "move")]);
        match mesh.nodes()[0].launch(pinned, None) {
            Err(ControlRefusal::ImpossibleBinding(why)) => {
                assert!(why.contains("only a free resource may be moved"), "{why}");
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        let mover = tern_tests::package_by(
            &key,
            r#"
                let t = resource("token");
                let seen = [t.get().owner];
                let refused = "";
                try { migrate("node-2"); } catch (e) { refused = e; }
                seen.push(refused);
                migrate("node-1");
                seen.push(`${here()}: ${t.get().owner}`);
                receive();
                migrate("node-0");
                seen.push(`${here()}: ${t.get().owner}`);
                migrate("node-1");
                seen
            "#,
            &[("token", "move")],
        );
        let user = |node: usize| {
            let source =
                r#"let r = ""; try { r = resource("token").get().owner; } catch (e) { r = e; } r"#;
            rebound_on(&mesh, node, &key, source, "token")
        };
        let places = || places_of(&mesh, "token");
        let (id, end) = held_on_node_1(&mesh, mover, "token").await;
        let there = user(1).await;
        assert!(there.contains(&format!("is held by agent {id}")), "{there}");
        let gone = user(0).await;
        assert!(gone.contains("left node 'node-0' with an agent"), "{gone}");
        let text = wake_on_node_1(&mesh, &id, end).await;
        assert!(
            text.starts_with(r#"["node-0","migrate: cannot move to node-2: "#)
                && text.contains("this node has a resource 'token' of its own")
                && text.ends_with(r#""node-1: node-0","node-0: node-0"]"#),
            "{text}"
        );
        tern_tests::eventually(|| places() == ["gone to node-1", "here", "-"]).await;
        assert_eq!(user(1).await, r#""node-0""#);
        assert!(user(0).await.contains("left node 'node-0'"));
        // Node-2's table of that name goes where the value left, and is a table there.
        let table = tern_tests::package_by(
            &key,
            r#"let t = resource("token"); t.set("k", 1); migrate("node-0"); [here(), t.len()]"#,
            &[("token", "move")],
        );
        let (_, end) = mesh.nodes()[2].launch(table, None).expect("launch");
        let end = tokio::time::timeout(Duration::from_secs(30), end).await;
        assert_eq!(
            json(end.expect("in time").expect("an end")),
            r#"["node-0",1]"#
        );
        tern_tests::eventually(|| places() == ["here", "here", "gone to node-0"]).await;
    });
}

/// A dataset bound by move goes with its agent as a table does, its files copied into the
/// store where the agent first holds it (the operator's files stay, unread from then on): read
/// in lines and bytes at every node it is taken to, refused by a node with a resource of that
/// name, and left where the agent ends, for every agent there. One larger than a hop moves is
/// not held.
#[test]
fn a_moved_dataset_goes_with_its_agent_and_stays_where_it_ends() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let scratch = dir.path().join("scratch");
        std::fs::create_dir(&scratch).expect("mkdir");
        std::fs::write(scratch.join("a"), "alpha\nbeta").expect("write");
        std::fs::write(scratch.join("b"), "gamma\r\ndelta\n").expect("write");
        let huge = std::fs::File::create(dir.path().join("huge")).expect("create");
        huge.set_len(65 << 20).expect("a sparse file");
        let key = security::SecretKey::generate();
        let texts = [
            "[scratch]\ntype = \"dataset\"\npath = \"scratch\"\nmobility = \"free\"\n\
             [huge]\ntype = \"dataset\"\npath = \"huge\"\nmobility = \"free\"\n",
            "",
            "[scratch]\ntype = \"table\"\n",
        ];
        let mesh = mesh_of(nodes_of(&texts, dir.path()), tern_tests::trust_for(&key)).await;
        let mover = tern_tests::package_by(
            &key,
            r#"
                let huge = "";
                try { resource("huge"); } catch (e) { huge = e; }
                let d = resource("scratch");
                let seen = [huge, d.line_count()];
                let refused = "";
                try { migrate("node-2"); } catch (e) { refused = e; }
                seen.push(refused);
                migrate("node-1");
                seen.push([here(), d.lines(0, 10), d.size()]);
                receive();
                migrate("node-0");
                seen.push([here(), d.read(6, 4).len(), d.lines(2, 1)]);
                migrate("node-1");
                seen
            "#,
            &[("scratch", "move"), ("huge", "move")],
        );
        let user = |node: usize| {
            let source =
                r#"let r = ""; try { r = resource("scratch").lines(1, 3); } catch (e) { r = e; } r"#;
            rebound_on(&mesh, node, &key, source, "scratch")
        };
        let places = || places_of(&mesh, "scratch");
        let (id, end) = held_on_node_1(&mesh, mover, "scratch").await;
        let gone = user(0).await;
        assert!(gone.contains("left node 'node-0' with an agent"), "{gone}");
        let text = wake_on_node_1(&mesh, &id, end).await;
        assert!(
            text.starts_with(
                r#"["resource: 'huge' at node 'node-0' cannot be moved: it is a dataset of 68157440 bytes"#
            ) && text.contains(r#"4,"migrate: cannot move to node-2: "#)
                && text.contains("this node has a resource 'scratch' of its own")
                && text.ends_with(
                    r#"["node-1",["alpha","beta","gamma","delta"],23],["node-0",4,["gamma"]]]"#
                ),
            "{text}"
        );
        tern_tests::eventually(|| places() == ["gone to node-1", "here", "-"]).await;
        assert_eq!(user(1).await, r#"["beta","gamma","delta"]"#);
        // The operator's files are as they were.
        assert_eq!(
            std::fs::read_to_string(scratch.join("a")).expect("read"),
            "alpha\nbeta"
        );
    });
}

/// A table larger than a frame (10 MB, where tables rode in the hop's offer up to 4 MiB) moves
/// with its agent after the continuation, there and back, whole.
#[test]
fn a_table_of_ten_megabytes_moves_with_its_agent() {
    tern_tests::runtime().block_on(async {
        let (_dir, key, mesh) = moving_mesh().await;
        let mover = tern_tests::package_by(
            &key,
            r#"
                let t = resource("counts");
                let value = "";
                value.pad(4000, "x");
                for i in 0..2500 { t.set(`k${i}`, `${i}:${value}`); }
                migrate("node-1");
                let there = [here(), t.len(), t.get("k1234").len(), t.get("k2499").sub_string(0, 6)];
                t.set("back", true);
                migrate("node-0");
                [there, here(), t.len(), t.get("back")]
            "#,
            &[("counts", "move")],
        );
        let (id, end) = mesh.nodes()[0].launch(mover, None).expect("launch");
        let end = tokio::time::timeout(Duration::from_secs(60), end)
            .await
            .expect("in time")
            .expect("an end");
        assert_eq!(
            json(end),
            r#"[["node-1",2500,4005,"2499:x"],"node-0",2501,true]"#,
            "{id}"
        );
        tern_tests::eventually(|| places(&mesh) == ["here", "gone to node-0", "-"]).await;
    });
}

/// Tables larger than one hop moves (in bytes, or in entries) make `migrate` throw, and the
/// agent stays with them; once they fit, they go.
#[test]
fn tables_larger_than_a_hop_moves_keep_their_agent_where_it_is() {
    tern_tests::runtime().block_on(async {
        let (_dir, key, mesh) = moving_mesh().await;
        let mover = tern_tests::package_by(
            &key,
            r#"
                let t = resource("counts");
                for i in 0..17 { t.set(`big${i}`, blob(4000000, i)); }
                let too_large = "";
                try { migrate("node-1"); } catch (e) { too_large = e; }
                for i in 0..17 { t.remove(`big${i}`); }
                for i in 0..16385 { t.set(`k${i}`, i); }
                let too_many = "";
                try { migrate("node-1"); } catch (e) { too_many = e; }
                t.remove("k0");
                migrate("node-1");
                [too_large, too_many, here(), t.len(), t.get("k16384")]
            "#,
            &[("counts", "move")],
        );
        let (_, end) = mesh.nodes()[0].launch(mover, None).expect("launch");
        let end = tokio::time::timeout(Duration::from_secs(120), end)
            .await
            .expect("in time")
            .expect("an end");
        let text = json(end);
        assert!(
            text.starts_with(r#"["migrate: the resources bound by move take "#)
                && text.contains("more than the 67108864 that move with one hop")
                && text.contains(
                    "migrate: table 'counts' holds 16385 entries, and a table moves with at \
                     most 16384"
                )
                && text.ends_with(r#""node-1",16384,16384]"#),
            "{text}"
        );
    });
}

/// An owner that is gone makes a remote call throw (catchably) instead of hanging.
#[test]
fn a_remote_call_to_an_owner_that_is_gone_throws() {
    tern_tests::runtime().block_on(async {
        let dir = tempfile::tempdir().expect("dir");
        let (package, trust) = package_binding(
            r#"
                let far = resource("shard", "node-1");
                let first = far.size();
                let m = receive();
                let why = "";
                try { far.size(); } catch (e) { why = e; }
                [first, why]
            "#,
            &[("shard", "remote")],
        );
        let mesh = mesh_of(three_nodes(dir.path()), trust).await;
        let (id, end) = mesh.nodes()[0].launch(package, None).expect("launch");
        tern_tests::eventually(|| mesh.nodes()[0].waits_for_a_message(&id)).await;
        mesh.nodes()[1].stop().await;
        // (Sent just as node-1 stops, a message may find no route at first: it is sent again.)
        let mut tries = 0;
        while let Err(e) = mesh.nodes()[2]
            .send(&id, &agent_lang::rhai::Dynamic::from(1_i64))
            .await
        {
            tries += 1;
            eprintln!("not delivered yet: {e:#}");
            assert!(tries < 50, "not delivered: {e:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let end = tokio::time::timeout(Duration::from_secs(30), end)
            .await
            .expect("in time")
            .expect("an end");
        let text = json(end);
        assert!(
            text.starts_with("[15,\"") && text.contains("node-1"),
            "{text}"
        );
    });
}

/// A node's upload cap paces what its protocols send: a 2 MB agent leaving a node capped at
/// 8 Mbit/s (1 MB/s) takes at least about 2 s to go, and the bytes are all counted.
#[test]
fn an_upload_cap_paces_what_a_node_sends() {
    tern_tests::runtime().block_on(async {
        let nodes = (0..2)
            .map(|i| MeshNode {
                upload_mbit: (i == 0).then_some(8.0),
                name: format!("node-{i}"),
                resources: NodeResources::default(),
            })
            .collect();
        let (package, trust) = package_binding(
            r#"let load = blob(2000000, 7); migrate("node-1"); load.len()"#,
            &[],
        );
        let mesh = mesh_of(nodes, trust).await;
        let started = std::time::Instant::now();
        let (_, end) = mesh.run(package).await.expect("runs");
        let took = started.elapsed();
        assert_eq!(json(end), "2000000");
        let sent = mesh.nodes()[0].wire_bytes().hop.0;
        assert!(sent > 2_000_000, "{sent}");
        // (A lower bound only: how much longer it takes depends on the machine.)
        assert!(
            took >= Duration::from_millis(1800),
            "{took:?} for {sent} bytes at 1 MB/s"
        );
    });
}
