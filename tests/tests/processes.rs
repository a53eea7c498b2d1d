//! End to end with separate `tern node` processes on loopback, driven through the CLI:
//! `tern keygen`, `tern pack`, `tern launch`, `tern status`. (Waiting for nodes to meet goes
//! through the control protocol from the test; everything asserted goes through the CLI.)
//! `tern_status_reaches_a_node` guards the bug where the CLI registered the node's address with
//! a behaviour that keeps none, so every call failed with "no addresses for peer".

use std::time::Duration;

use tern_tests::process::{
    agent_ids, forward_of, keygen, pack, pack_binding, peer_names, spawn_tern, tern, toml_list,
    KeyFile, NodeFile, TernNode, QUICK,
};
use tern_tests::wait_for;

const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// alpha, beta (bootstrapping to alpha) and gamma (to alpha and beta), trusting `author`,
/// each seeing the two others.
fn three_nodes(dir: &std::path::Path, author: &KeyFile) -> (Vec<NodeFile>, Vec<TernNode>) {
    let authors = toml_list(&[&author.public_key]);
    let mut files = Vec::new();
    let mut nodes: Vec<TernNode> = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let mut f = NodeFile::new(dir, name, &authors);
        // Killed and restarted below: what it stored must be on disk.
        f.durability = "fsync".into();
        f.bootstrap = nodes.iter().map(|n| n.addr.clone()).collect();
        nodes.push(TernNode::start(&f, None));
        files.push(f);
    }
    for n in &nodes {
        let others: Vec<&str> = nodes
            .iter()
            .filter(|o| o.name != n.name)
            .map(|o| o.name.as_str())
            .collect();
        n.wait_for_peers(&others);
    }
    (files, nodes)
}

/// Nodes `a` and `b` (which dials `a`), both trusting the authors `authors` (a TOML value);
/// `a` offers the resources `a_resources` (`[resources.NAME]` sections, or none). Returns once
/// each knows the other's name.
fn two_nodes(dir: &std::path::Path, authors: &str, a_resources: &str) -> (TernNode, TernNode) {
    let mut fa = NodeFile::new(dir, "a", authors);
    fa.extra = a_resources.into();
    let a = TernNode::start(&fa, None);
    let mut fb = NodeFile::new(dir, "b", authors);
    fb.bootstrap = vec![a.addr.clone()];
    let b = TernNode::start(&fb, None);
    a.wait_for_peers(&["b"]);
    b.wait_for_peers(&["a"]);
    (a, b)
}

const TOUR: &str = r#"
let visited = [];
for n in ["beta", "gamma", "alpha"] {
    migrate(n);
    visited.push(here());
}
[here(), hops(), visited]
"#;

#[test]
fn three_node_processes_run_agents_report_status_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let author = keygen(dir.path(), "author");
    let (files, mut nodes) = three_nodes(dir.path(), &author);
    let alpha = nodes[0].addr.clone();

    // Status lists the peers by name.
    let status = nodes[0].status();
    assert_eq!(status["name"], "alpha");
    assert_eq!(status["peer_id"], nodes[0].peer_id.as_str());
    let mut peers = peer_names(&status);
    peers.sort();
    assert_eq!(peers, ["beta", "gamma"]);

    // A tour by name: the result is the last stdout line, exit 0.
    let tour = pack(dir.path(), "tour", TOUR, &author);
    let out = tern(
        &["launch", tour.to_str().unwrap(), "--node", &alpha],
        AGENT_TIMEOUT,
    )
    .expect_code(0);
    assert_eq!(out.last_line(), r#"["alpha",3,["beta","gamma","alpha"]]"#);

    // Status reads the node's event stream: beta stored the first hop and committed the second.
    let b = nodes[1].status();
    let counts = &b["activity"]["counts"];
    assert!(
        counts["hops_stored"].as_u64() >= Some(1),
        "status of beta: {b}"
    );
    assert!(
        counts["hops_committed"].as_u64() >= Some(1),
        "status of beta: {b}"
    );
    let recent: Vec<&str> = b["activity"]["recent"]
        .as_array()
        .map(|r| r.iter().filter_map(|e| e["event"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        recent.iter().any(|e| e.starts_with("stored hop 1 of ")),
        "recent events of beta: {recent:?}"
    );
    // (The count follows the event stream, which may trail the answer to `launch` a little.)
    wait_for("alpha to count the finished agent", QUICK, || {
        let a = nodes[0].status();
        (a["activity"]["counts"]["agents_finished"].as_u64() >= Some(1)).then_some(())
    });

    // A failing agent: exit 1, the node and the line on stderr.
    let failing = pack(
        dir.path(),
        "failing",
        "migrate(\"beta\");\nlet x = [1][5];\n",
        &author,
    );
    let out = tern(
        &["launch", failing.to_str().unwrap(), "--node", &alpha],
        AGENT_TIMEOUT,
    )
    .expect_code(1);
    assert!(
        out.stderr.contains("failed on beta at line 2"),
        "stderr: {}",
        out.stderr
    );

    // --detach prints the agent id; status shows the agent where it is, then the forwarding
    // pointer it leaves behind.
    let slow = pack(
        dir.path(),
        "slow",
        r#"receive(1500); migrate("beta"); receive(1500); here()"#,
        &author,
    );
    let out = tern(
        &[
            "launch",
            slow.to_str().unwrap(),
            "--node",
            &alpha,
            "--detach",
        ],
        QUICK,
    )
    .expect_code(0);
    let agent = out.last_line().to_string();
    assert_eq!(agent.len(), 32, "an agent id: {agent:?}");
    assert!(agent.bytes().all(|b| b.is_ascii_hexdigit()));
    let a = nodes[0].status();
    assert_eq!(agent_ids(&a), vec![agent.clone()], "status of alpha: {a}");
    assert_eq!(a["agents"][0]["hops"], 0);
    wait_for("the agent to arrive on beta", QUICK, || {
        let b = nodes[1].status();
        agent_ids(&b).contains(&agent).then_some(())
    });
    let b = nodes[1].status();
    assert_eq!(b["agents"][0]["hops"], 1, "status of beta: {b}");
    let a = nodes[0].status();
    assert!(agent_ids(&a).is_empty(), "alpha still holds it: {a}");
    assert_eq!(forward_of(&a, &agent).as_deref(), Some("beta"));
    wait_for("the agent to finish on beta", QUICK, || {
        agent_ids(&nodes[1].status()).is_empty().then_some(())
    });

    // Restart alpha (SIGKILL, then the same key and data directory; it dials the two others
    // since their addresses are not in its original file): same peer id, same data.
    let peer_id = nodes[0].peer_id.clone();
    nodes[0].kill();
    let mut f = files[0].clone();
    f.bootstrap = vec![nodes[1].addr.clone(), nodes[2].addr.clone()];
    nodes[0] = TernNode::start(&f, None);
    assert_eq!(nodes[0].peer_id, peer_id);
    nodes[0].wait_for_peers(&["beta", "gamma"]);
    nodes[2].wait_for_peers(&["alpha"]);
    let a = nodes[0].status();
    assert_eq!(a["peer_id"], peer_id.as_str());
    assert_eq!(forward_of(&a, &agent).as_deref(), Some("beta"), "{a}");
    // And it still runs agents across the mesh.
    let out = tern(
        &["launch", tour.to_str().unwrap(), "--node", &nodes[0].addr],
        AGENT_TIMEOUT,
    )
    .expect_code(0);
    assert_eq!(out.last_line(), r#"["alpha",3,["beta","gamma","alpha"]]"#);
}

#[test]
fn a_package_by_an_untrusted_author_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let trusted = keygen(dir.path(), "trusted");
    let stranger = keygen(dir.path(), "stranger");
    let node = TernNode::start(
        &NodeFile::new(dir.path(), "solo", &toml_list(&[&trusted.public_key])),
        None,
    );
    let pkg = pack(dir.path(), "stranger", "40 + 2", &stranger);
    let out = tern(
        &["launch", pkg.to_str().unwrap(), "--node", &node.addr],
        QUICK,
    )
    .expect_code(1);
    assert!(out.stderr.contains("refused"), "stderr: {}", out.stderr);
    assert!(agent_ids(&node.status()).is_empty());
    // The trusted author's package runs on the same node.
    let pkg = pack(dir.path(), "trusted", "40 + 2", &trusted);
    let out = tern(
        &["launch", pkg.to_str().unwrap(), "--node", &node.addr],
        QUICK,
    )
    .expect_code(0);
    assert_eq!(out.last_line(), "42");
}

#[test]
fn a_destination_refuses_pushes_from_peers_not_in_accept_from() {
    let dir = tempfile::tempdir().unwrap();
    let author = keygen(dir.path(), "author");
    let authors = toml_list(&[&author.public_key]);
    let a = TernNode::start(&NodeFile::new(dir.path(), "a", &authors), None);
    // b accepts agents only from a key that is not a's.
    let other = keygen(dir.path(), "other");
    let mut fb = NodeFile::new(dir.path(), "b", &authors);
    fb.bootstrap = vec![a.addr.clone()];
    fb.accept_from = toml_list(&[&other.peer_id]);
    let b = TernNode::start(&fb, None);
    a.wait_for_peers(&["b"]);
    let pkg = pack(
        dir.path(),
        "push",
        r#"let e = ""; try { migrate("b"); } catch (x) { e = x; } [here(), e.contains("refused")]"#,
        &author,
    );
    let out = tern(
        &["launch", pkg.to_str().unwrap(), "--node", &a.addr],
        AGENT_TIMEOUT,
    )
    .expect_code(0);
    assert_eq!(out.last_line(), r#"["a",true]"#);
    assert!(agent_ids(&b.status()).is_empty());
}

/// The smallest reproduction of the client bug: `tern status` against a fresh node.
#[test]
fn tern_status_reaches_a_node_as_its_operator_only() {
    let dir = tempfile::tempdir().unwrap();
    let node = TernNode::start(&NodeFile::new(dir.path(), "solo", "\"any\""), None);
    let out = tern(&["status", "--node", &node.addr, "--json"], QUICK);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let status: serde_json::Value = serde_json::from_str(out.last_line()).unwrap();
    assert_eq!(status["name"], "solo");
    // With a key the node does not list in [trust] operators: refused, saying what to do.
    let stranger = keygen(dir.path(), "stranger");
    let out = tern(
        &[
            "status",
            "--node",
            &node.addr,
            "--key",
            stranger.path.to_str().unwrap(),
        ],
        QUICK,
    )
    .expect_code(1);
    assert!(
        out.stderr.contains(&stranger.public_key) && out.stderr.contains("--key"),
        "stderr: {}",
        out.stderr
    );
    // The test nodes do not fsync, and say what that risks.
    assert!(
        node.log().contains("durability = \"none\"") && node.log().contains("forked"),
        "{}",
        node.log()
    );
}

/// A closure without captures is a portable value (issue 14 item 4): it hops between two
/// `tern node` processes, whose Rhai hashes anonymous functions' names with different seeds,
/// and is called there; so do closures kept in a map and passed as a message to itself.
/// Afterwards both nodes' `tern status --json` count the bytes they sent (issue 13 item 5).
#[test]
fn a_closure_hops_between_two_node_processes() {
    let dir = tempfile::tempdir().unwrap();
    let author = keygen(dir.path(), "author");
    let (a, b) = two_nodes(dir.path(), &toml_list(&[&author.public_key]), "");
    let pkg = pack(
        dir.path(),
        "closures",
        r#"
        let double = |x| x * 2;
        let ops = #{ inc: |x| x + 1, named: Fn("square") };
        fn square(x) { x * x }
        migrate("b");
        send(id(), ops.inc);
        let inc = receive();
        [here(), double.call(21), inc.call(41), ops.named.call(6), ops.inc.call(1)]
        "#,
        &author,
    );
    let out = tern(
        &["launch", pkg.to_str().unwrap(), "--node", &a.addr],
        AGENT_TIMEOUT,
    );
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    assert_eq!(out.last_line(), r#"["b",42,42,36,2]"#);
    // `tern status --json` gives the bytes each node sent, by protocol: `a` sent the hop and
    // the package `b` pulled; `b` reported the agent's end to its home, `a`.
    let sent = |node: &TernNode, protocol: &str| {
        let status = node.status();
        status["bytes"][protocol]
            .as_u64()
            .unwrap_or_else(|| panic!("no bytes.{protocol} in {status}"))
    };
    assert!(sent(&a, "hop") > 0 && sent(&a, "package") > 0);
    assert!(sent(&b, "control") > 0);
    assert_eq!(sent(&a, "resource") + sent(&b, "resource"), 0);
    drop(b);
}

/// An owner that hangs under a remote reference (its process stopped, its connections left
/// open): the agent's call throws once the resource protocol's deadline has passed, naming the
/// resource and its node, and the agent carries on to its end (issue 13: an unreachable owner
/// makes the operation throw within a deadline, nothing hangs).
#[test]
fn a_remote_call_to_an_owner_that_hangs_throws_after_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let author = keygen(dir.path(), "author");
    let (a, b) = two_nodes(
        dir.path(),
        &format!("[{{ key = {:?}, resources = \"any\" }}]", author.public_key),
        "[resources.counts]\ntype = \"table\"\nmobility = \"free\"\n",
    );
    let pkg = pack_binding(
        dir.path(),
        "hung",
        r#"
        let t = resource("counts", "a");
        t.set("k", 1);
        receive();
        let r = "answered";
        try { t.get("k"); } catch (e) { r = e; }
        [r, here()]
        "#,
        &author,
        &["counts=remote"],
    );
    let launch = spawn_tern(&["launch", pkg.to_str().unwrap(), "--node", &b.addr]);
    let agent = wait_for("the agent to wait at b", AGENT_TIMEOUT, || {
        b.status()["agents"]
            .as_array()?
            .iter()
            .find(|x| x["state"] == "waiting")
            .and_then(|x| x["id"].as_str().map(String::from))
    });
    a.pause();
    let sent = tern(&["send", &agent, "1", "--node", &b.addr], QUICK);
    let out = launch.wait(AGENT_TIMEOUT);
    a.resume();
    assert_eq!(sent.code, Some(0), "stderr: {}", sent.stderr);
    assert_eq!(out.code, Some(0), "stderr: {}", out.stderr);
    let result = out.last_line();
    assert!(
        result == r#"["resource 'counts' at node 'a' did not answer within 10 s","b"]"#,
        "{result}"
    );
}
