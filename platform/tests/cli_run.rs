//! `tern run` through the real binary: the success contract and every error path.

use std::path::PathBuf;
use std::process::{Command, Output};

fn write_agent(name: &str, source: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tern-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, source).unwrap();
    path
}

fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .unwrap()
}

fn run_source(name: &str, source: &str, extra: &[&str]) -> (i32, String, String) {
    let path = write_agent(name, source);
    let mut args = vec!["run"];
    args.extend_from_slice(extra);
    let p = path.to_str().unwrap().to_string();
    args.push(&p);
    let out = tern(&args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

#[test]
fn result_is_the_last_line_of_stdout_as_json() {
    let (code, out, _) = run_source(
        "ok.rhai",
        r#"let m = #{a: 1, b: [true, 'c', 2.5, ()]}; migrate("node-2"); m.here = here(); m.blob = blob(2, 7); m"#,
        &[],
    );
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(last_line(&out)).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"a": 1, "b": [true, "c", 2.5, null], "here": "node-2", "blob": [7, 7]})
    );
}

#[test]
fn messages_the_agent_never_received_are_reported() {
    let (code, out, err) = run_source(
        "unread.rhai",
        r#"send(id(), 1); migrate("node-1"); send(id(), 2); send(id(), 3); receive()"#,
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(last_line(&out), "1");
    assert!(
        err.contains("ended with 2 messages it never received"),
        "{err}"
    );
}

#[test]
fn json_mode_prints_only_the_result_and_ends_stderr_with_the_bytes_moved() {
    let (code, out, err) = run_source("json.rhai", r#"migrate("node-1"); here()"#, &["--json"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), "\"node-1\"");
    let bytes: serde_json::Value = serde_json::from_str(last_line(&err)).unwrap();
    let hop = bytes["bytes"]["hop"].as_u64().unwrap();
    // The offer and the answers of one small hop: some hundreds of bytes, not kilobytes.
    assert!((100..4096).contains(&hop), "{bytes}");
    assert!(bytes["bytes"]["package"].as_u64().unwrap() > 0, "{bytes}");
    assert_eq!(bytes["bytes"]["resource"], 0, "{bytes}");
    // A failed run ends with them too.
    let (code, _, err) = run_source("fail.rhai", r#"migrate("node-1"); throw "no""#, &["--json"]);
    assert_eq!(code, 1);
    let bytes: serde_json::Value = serde_json::from_str(last_line(&err)).unwrap();
    assert!(bytes["bytes"]["hop"].as_u64().unwrap() > 0, "{bytes}");
}

#[test]
fn nodes_option_sets_the_mesh_size() {
    let (code, out, _) = run_source("nodes.rhai", "nodes()", &["--nodes", "5"]);
    assert_eq!(code, 0);
    assert_eq!(
        last_line(&out),
        r#"["node-0","node-1","node-2","node-3","node-4"]"#
    );
}

#[test]
fn trace_writes_one_line_per_hop() {
    let (code, _, err) = run_source(
        "trace.rhai",
        r#"for n in ["node-1", "node-2", "node-0"] { migrate(n); } hops()"#,
        &["--trace"],
    );
    assert_eq!(code, 0);
    let hops: Vec<_> = err.lines().filter(|l| l.starts_with("hop ")).collect();
    assert_eq!(hops.len(), 3, "{err}");
    assert!(
        hops[1].contains("node-1 -> node-2") && hops[1].contains("bytes") && hops[1].contains("µs"),
        "{err}"
    );
    // Then the bytes each node sent, by protocol, and the mesh's total of each.
    let sent = |prefix: &str| -> Vec<u64> {
        let line = err
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}: {err}"));
        ["hop ", "package ", "control ", "resource "]
            .iter()
            .map(|p| {
                let at = line.find(p).unwrap_or_else(|| panic!("{p:?} in {line:?}")) + p.len();
                let digits: String = line[at..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits
                    .parse()
                    .unwrap_or_else(|_| panic!("a count after {p:?} in {line:?}"))
            })
            .collect()
    };
    let nodes: Vec<Vec<u64>> = ["node-0", "node-1", "node-2"]
        .iter()
        .map(|n| sent(&format!("bytes sent by {n}: ")))
        .collect();
    let total = sent("bytes sent: ");
    for (i, total) in total.iter().enumerate() {
        assert_eq!(*total, nodes.iter().map(|n| n[i]).sum::<u64>(), "{err}");
    }
    // Every node sent the agent on once; node-0, where it was launched, sent its package.
    assert!(nodes.iter().all(|n| n[0] > 0) && nodes[0][1] > 0, "{err}");
}

#[test]
fn print_goes_to_stderr_with_node_and_agent() {
    let (code, out, err) = run_source("print.rhai", r#"migrate("node-1"); print("hello"); 1"#, &[]);
    assert_eq!(code, 0);
    assert_eq!(last_line(&out), "1");
    assert!(
        err.lines()
            .any(|l| l.starts_with("[node-1 ") && l.ends_with("] hello")),
        "{err}"
    );
}

#[test]
fn syntax_error_names_node_line_and_column() {
    let (code, _, err) = run_source("syntax.rhai", "let x = 1;\nlet = 2;\n", &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("node-0") && err.contains("line 2, column"),
        "{err}"
    );
}

#[test]
fn uncaught_throw_names_node_line_and_column() {
    let (code, _, err) = run_source("throw.rhai", "migrate(\"node-2\");\nthrow \"boom\";\n", &[]);
    assert_eq!(code, 1);
    assert!(
        err.contains("node-2") && err.contains("line 2, column 1") && err.contains("boom"),
        "{err}"
    );
}

#[test]
fn runaway_loop_is_stopped_by_the_operation_limit() {
    let (code, _, err) = run_source(
        "loop.rhai",
        "migrate(\"node-1\");\nlet i = 0;\nloop { i += 1; }\n",
        &["--max-operations", "100000"],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("node-1") && err.contains("too many operations") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn runaway_walked_loop_is_stopped_too() {
    let (code, _, err) = run_source(
        "walked.rhai",
        "let i = 0;\nloop { i += 1; if i < 0 { migrate(\"node-1\"); } }\n",
        &["--max-operations", "100000"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("too many operations"), "{err}");
}

#[test]
fn memory_bomb_is_stopped_by_the_memory_budget() {
    let (code, _, err) = run_source(
        "bomb.rhai",
        "let s = \"xx\";\nloop { s += s; }\n",
        &["--max-memory-bytes", "8000000"],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("line 2") && err.contains("out of memory") && err.contains("8000000"),
        "{err}"
    );
}

#[test]
fn unresumable_form_is_refused_with_a_hint() {
    let (code, _, err) = run_source(
        "unresumable.rhai",
        "let x = 1 + migrate(\"node-1\");\n",
        &[],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("line 1, column") && err.contains("variable first"),
        "{err}"
    );
}

#[test]
fn migrate_to_an_unknown_node_throws_and_the_agent_stays() {
    let (code, out, _) = run_source(
        "unknown.rhai",
        r#"let r = ""; try { migrate("mars"); } catch (e) { r = e; } [here(), r]"#,
        &[],
    );
    assert_eq!(code, 0);
    assert_eq!(
        last_line(&out),
        r#"["node-0","migrate: no node named 'mars' in the mesh"]"#
    );
    let (code, _, err) = run_source("unknown2.rhai", "migrate(\"mars\");\n", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("mars") && err.contains("node-0"), "{err}");
}

#[test]
fn non_portable_value_blocks_the_hop_naming_the_variable() {
    let (code, out, _) = run_source(
        "portable.rhai",
        r#"let r = 0..3; let msg = ""; try { migrate("node-1"); } catch (e) { msg = e; } [here(), msg]"#,
        &[],
    );
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(last_line(&out)).unwrap();
    assert_eq!(v[0], "node-0");
    assert!(v[1].as_str().unwrap().contains("variable 'r'"), "{v}");
}

#[test]
fn receive_without_timeout_cannot_hang() {
    let (code, _, err) = run_source("receive.rhai", "receive()\n", &[]);
    assert_eq!(code, 1);
    assert!(err.contains("receive"), "{err}");
    let (code, out, _) = run_source("receive2.rhai", "let m = receive(10); m", &[]);
    assert_eq!(code, 0);
    assert_eq!(last_line(&out), "null");
}

#[test]
fn missing_file_is_an_error() {
    let out = tern(&["run", "/nonexistent/agent.rhai"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn every_example_runs() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rhai") {
            let out = tern(&["run", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            serde_json::from_str::<serde_json::Value>(last_line(&stdout)).unwrap();
            count += 1;
        }
    }
    assert!(count >= 2);
}

#[test]
fn a_mesh_description_names_the_nodes_and_their_resources() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("shards")).unwrap();
    for (i, words) in ["a b", "b c c"].iter().enumerate() {
        std::fs::write(dir.path().join(format!("shards/{i}")), words).unwrap();
    }
    let mesh = dir.path().join("mesh.toml");
    std::fs::write(
        &mesh,
        r#"
            [[node]]
            name = "alpha"
            [node.resources.shard]
            type = "dataset"
            path = "shards/0"
            [[node]]
            name = "beta"
            [node.resources.shard]
            type = "dataset"
            path = "shards/1"
            mobility = "fixed"
        "#,
    )
    .unwrap();
    let script = dir.path().join("count.rhai");
    std::fs::write(
        &script,
        r#"
            let shard = resource("shard");
            let words = 0;
            for n in nodes() {
                migrate(n);
                for line in shard.lines(0, 100) { words += line.split(" ").len(); }
            }
            [nodes(), words]
        "#,
    )
    .unwrap();
    let mesh_arg = mesh.to_str().unwrap();
    let script_arg = script.to_str().unwrap();
    let out = tern(&[
        "run",
        "--mesh",
        mesh_arg,
        "--resource",
        "shard=rebind",
        script_arg,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(last_line(&stdout), r#"[["alpha","beta"],5]"#);
    // Without the binding the script is told what to declare.
    let out = tern(&["run", "--mesh", mesh_arg, script_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--resource shard=rebind"), "{stderr}");
    // A mesh description that is wrong says where.
    std::fs::write(&mesh, "[[node]]\nname = \"alpha\"\n[node.resources.shard]\ntype = \"dataset\"\npath = \"nowhere\"\n").unwrap();
    let out = tern(&[
        "run",
        "--mesh",
        mesh_arg,
        "--resource",
        "shard=rebind",
        script_arg,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("node 'alpha': resource 'shard'") && stderr.contains("nowhere"),
        "{stderr}"
    );
    let out = tern(&["run", "--mesh", mesh_arg, "--nodes", "2", script_arg]);
    assert!(!out.status.success());
    std::fs::write(&mesh, "[[node]]\nname = \"alpha\"\nupload_mbit = -3\n").unwrap();
    let out = tern(&["run", "--mesh", mesh_arg, script_arg]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("node 'alpha': upload_mbit must be a positive number"),
        "{stderr}"
    );
}

/// The data-locality job at a small size: both agents agree, with and without upload caps, and
/// the agent that goes to the data moves fewer bytes than the one that ships the data to itself.
#[test]
fn the_wordcount_demo_runs_and_both_agents_agree() {
    let out = tern(&["demo", "wordcount", "--shard-mb", "0.2"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(last_line(&stdout), "results equal: yes");
    let bytes_row = stdout
        .lines()
        .find(|l| l.starts_with("| bytes on the wire"))
        .unwrap();
    let cells: Vec<&str> = bytes_row.split('|').map(str::trim).collect();
    let (locality, shipping): (u64, u64) = (cells[2].parse().unwrap(), cells[3].parse().unwrap());
    assert!(locality * 5 < shipping, "{bytes_row}");
}
