//! Resource handles through the executor, against a host that keeps each node's resources in
//! memory: a handle is bound once, travels in the continuation (and in messages) and reaches
//! the resource of the node the agent is on; its methods check their resource's type, and the
//! host's errors are catchable. A handle that carries a copy answers from it at every node.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use agent_lang::rhai::{Array, Dynamic, ImmutableString, Map};
use agent_lang::{
    Copied, CopiedDataset, Execution, HostEnv, Limits, Outcome, Program, Resource, ResourceCall,
    ResourceError, ResourceHost, ResourceKind, Resume,
};

/// One node's resources: datasets as lines, tables, values.
#[derive(Default)]
struct NodeData {
    datasets: HashMap<String, Vec<String>>,
    tables: Mutex<HashMap<String, BTreeMap<String, Vec<u8>>>>,
    values: HashMap<String, i64>,
    /// What `resource(name)` copies into the handle (a `copy` binding).
    copies: HashMap<String, Copied>,
}

/// The resources of the node named `here`, bound by name wherever the agent is (rebind).
struct Host {
    here: String,
    data: Arc<NodeData>,
    program: Program,
}

impl Host {
    fn kind_of(&self, name: &str) -> Option<ResourceKind> {
        if self.data.datasets.contains_key(name) {
            Some(ResourceKind::Dataset)
        } else if lock(&self.data.tables).contains_key(name) {
            Some(ResourceKind::Table)
        } else if self.data.values.contains_key(name) {
            Some(ResourceKind::Value)
        } else {
            None
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ResourceHost for Host {
    fn bind(&self, name: &str) -> Result<Resource, ResourceError> {
        let copy = self.data.copies.get(name).cloned();
        let kind = copy
            .as_ref()
            .map(Copied::kind)
            .or_else(|| self.kind_of(name))
            .ok_or_else(|| format!("resource: no '{name}' at {}", self.here))?;
        Ok(Resource {
            name: name.into(),
            kind,
            bound_at: self.here.as_str().into(),
            copy: copy.map(Arc::new),
        })
    }

    fn bind_at(&self, name: &str, node: &str) -> Result<Resource, String> {
        Err(format!("resource: not remotely ({name} at {node})"))
    }

    fn call(&self, r: &Resource, call: ResourceCall<'_>) -> Result<Dynamic, ResourceError> {
        if self.kind_of(&r.name) != Some(r.kind) {
            return Err(format!(
                "{}: no {} '{}' at {}",
                call.method(),
                r.kind,
                r.name,
                self.here
            )
            .into());
        }
        let d = &self.data;
        Ok(match call {
            ResourceCall::LineCount => Dynamic::from_int(d.datasets[r.name.as_str()].len() as i64),
            ResourceCall::Lines { start, count } => d.datasets[r.name.as_str()]
                .iter()
                .skip(start as usize)
                .take(count as usize)
                .map(|l| Dynamic::from(ImmutableString::from(l.as_str())))
                .collect::<Array>()
                .into(),
            ResourceCall::Value => Dynamic::from_int(d.values[r.name.as_str()]),
            ResourceCall::Set(key, value) => {
                let bytes = agent_lang::encode_portable(value).map_err(|e| e.to_string())?;
                lock(&d.tables)
                    .get_mut(r.name.as_str())
                    .map(|t| t.insert(key.to_string(), bytes));
                Dynamic::UNIT
            }
            ResourceCall::Get(key) => match lock(&d.tables)[r.name.as_str()].get(key) {
                Some(bytes) => {
                    agent_lang::decode_portable(&self.program, bytes).map_err(|e| e.to_string())?
                }
                None => Dynamic::UNIT,
            },
            ResourceCall::Len => Dynamic::from_int(lock(&d.tables)[r.name.as_str()].len() as i64),
            other => return Err(format!("{}: not in this test", other.method()).into()),
        })
    }
}

/// The nodes of a test mesh, by name.
type Mesh = Vec<(String, Arc<NodeData>)>;

/// Three nodes: each has a dataset `shard` of its own lines and a table `counts`; node-0 also
/// offers a value `base`.
fn nodes() -> Mesh {
    (0..3)
        .map(|i| {
            let mut data = NodeData::default();
            data.datasets.insert(
                "shard".into(),
                (0..=i).map(|n| format!("line {n} at node-{i}")).collect(),
            );
            lock(&data.tables).insert("counts".into(), BTreeMap::new());
            if i == 0 {
                data.values.insert("base".into(), 100);
                let files = vec![b"a\r\nb\n\n".to_vec(), Vec::new(), b"c\rd".to_vec()];
                let dataset = Copied::Dataset(CopiedDataset::new(files));
                data.copies.insert("cshard".into(), dataset);
                let mut entries = Map::new();
                entries.insert("k1".into(), Dynamic::from_int(1));
                entries.insert("k0".into(), Dynamic::from_array(vec![Dynamic::TRUE]));
                data.copies.insert("ctable".into(), Copied::Table(entries));
                let value = Dynamic::from(ImmutableString::from("settings"));
                data.copies.insert("cvalue".into(), Copied::Value(value));
            }
            (format!("node-{i}"), Arc::new(data))
        })
        .collect()
}

/// Runs `source` through the executor over [`nodes`], encoding and decoding the continuation at
/// every hop: its result as JSON, and the nodes' data afterwards.
fn run(source: &str) -> (Result<String, String>, Mesh) {
    let mesh = nodes();
    let program = Program::compile(source, &Limits::default()).expect("compiles");
    let env_at = |i: usize, hops: i64| HostEnv {
        here: mesh[i].0.clone(),
        home: "node-0".into(),
        nodes: mesh.iter().map(|(n, _)| n.clone()).collect(),
        agent_id: "agent".into(),
        hops,
        printer: Arc::new(|_| {}),
        resources: Arc::new(Host {
            here: mesh[i].0.clone(),
            data: mesh[i].1.clone(),
            program: program.clone(),
        }),
    };
    let (mut at, mut hops) = (0, 0);
    let mut exec = Execution::new(&program);
    let mut input = Resume::Start;
    let result = loop {
        match exec.resume(&env_at(at, hops), input) {
            Outcome::Migrate { to } => {
                let bytes = exec.encode().expect("encodes");
                exec = Execution::decode(&program, &bytes).expect("decodes");
                match mesh.iter().position(|(n, _)| *n == to) {
                    Some(i) => {
                        at = i;
                        hops += 1;
                        input = Resume::Start;
                    }
                    None => input = Resume::Error(format!("no node {to}")),
                }
            }
            Outcome::Finished(v) => {
                break Ok(agent_lang::to_json(&v).expect("json").to_string());
            }
            Outcome::Failed(e) => break Err(e.message),
            other => panic!("{other:?}"),
        }
    };
    (result, mesh)
}

#[test]
fn a_handle_bound_once_reaches_the_resource_of_each_node_it_is_taken_to() {
    let (result, _) = run(r#"
        let shard = resource("shard");
        let seen = [];
        for n in nodes() {
            migrate(n);
            seen += shard.lines(0, 10);
            seen.push(shard.line_count());
        }
        seen
    "#);
    assert_eq!(
        result.as_deref(),
        Ok(
            r#"["line 0 at node-0",1,"line 0 at node-1","line 1 at node-1",2,"line 0 at node-2","line 1 at node-2","line 2 at node-2",3]"#
        )
    );
}

#[test]
fn tables_are_written_where_the_agent_is_and_read_back_after_hops() {
    let (result, mesh) = run(r#"
        let counts = resource("counts");
        counts.set("visits", 1);
        migrate("node-1");
        counts.set("visits", [here(), #{ n: 2 }]);
        migrate("node-0");
        [counts.get("visits"), counts.get("absent"), counts.len()]
    "#);
    assert_eq!(result.as_deref(), Ok(r#"[1,null,1]"#));
    assert_eq!(lock(&mesh[1].1.tables)["counts"].len(), 1);
    assert!(lock(&mesh[2].1.tables)["counts"].is_empty());
}

#[test]
fn host_errors_and_wrong_methods_are_catchable_and_say_what_and_where() {
    let (result, _) = run(r#"
        let errors = [];
        try { resource("nowhere"); } catch (e) { errors.push(e); }
        let base = resource("base");
        let v = base.get();
        try { base.lines(0, 1); } catch (e) { errors.push(e); }
        migrate("node-1");
        try { base.get(); } catch (e) { errors.push(e); }
        try { resource("shard").lines(-1, 2); } catch (e) { errors.push(e); }
        [v, errors]
    "#);
    assert_eq!(
        result.as_deref(),
        Ok(concat!(
            r#"[100,["resource: no 'nowhere' at node-0","#,
            r#""lines() is a method of dataset resources; 'base' is a value","#,
            r#""get: no value 'base' at node-1","#,
            r#""lines: start must not be negative, got -1"]]"#
        ))
    );
}

#[test]
fn a_handle_is_a_portable_value_with_a_json_form_and_a_checked_encoding() {
    let (result, _) = run(r#"
        let h = resource("counts");
        migrate("node-2");
        [h, type_of(h), h.name, h.kind, h == resource("counts"), `${h}`]
    "#);
    assert_eq!(
        result.as_deref(),
        Ok(concat!(
            r#"[{"bound_at":"node-0","copy":false,"resource":"counts","type":"table"},"#,
            r#""resource","counts","#,
            r#""table",false,"resource 'counts' (table, bound at node-0)"]"#
        ))
    );
    // In a message, and refused when it names no valid resource.
    let program = Program::compile("1", &Limits::default()).expect("compiles");
    let handle = Dynamic::from(Resource {
        name: "counts".into(),
        kind: ResourceKind::Table,
        bound_at: "node-0".into(),
        copy: None,
    });
    let bytes = agent_lang::encode_portable(&handle).expect("encodes");
    let back = agent_lang::decode_portable(&program, &bytes).expect("decodes");
    assert_eq!(back.cast::<Resource>().name.as_str(), "counts");
    let bad = Dynamic::from(Resource {
        name: "../etc".into(),
        kind: ResourceKind::Dataset,
        bound_at: "node-0".into(),
        copy: None,
    });
    let bytes = agent_lang::encode_portable(&bad).expect("encodes");
    let err = agent_lang::decode_portable(&program, &bytes).expect_err("an invalid name");
    assert!(err.to_string().contains("invalid resource name"), "{err}");
}

#[test]
fn an_agent_without_resources_is_told_so() {
    let program = Program::compile(
        r#"let why = ""; try { resource("x"); } catch (e) { why = e; } why"#,
        &Limits::default(),
    )
    .expect("compiles");
    let env = HostEnv {
        here: "solo".into(),
        home: "solo".into(),
        nodes: vec!["solo".into()],
        agent_id: "a".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
        resources: agent_lang::no_resources(),
    };
    match Execution::new(&program).resume(&env, Resume::Start) {
        Outcome::Finished(v) => assert_eq!(v.to_string(), "resource: no resource named 'x' here"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_copy_travels_in_the_continuation_and_answers_at_every_node() {
    // Only node-0 has the resources: at the others, only the copies can answer.
    let (result, mesh) = run(r#"
        let shard = resource("cshard");
        let table = resource("ctable");
        let value = resource("cvalue");
        migrate("node-1");
        let seen = [shard.is_copy, shard.size(), shard.line_count(), shard.lines(0, 10)];
        seen += [shard.lines(2, 2), shard.read(3, 4), shard.read(9, 100)];
        table.set("k2", #{ at: here() });
        let other = table;
        other.remove("k0");
        migrate("node-2");
        seen += [table.len(), table.keys(0, 10), table.keys(1, 1), table.get("k2"), table.get("x")];
        seen += [other.keys(0, 10), value.get(), table == other, `${value}`];
        seen
    "#);
    assert_eq!(
        result.as_deref(),
        Ok(concat!(
            r#"[true,9,4,["a","b","","c\rd"],["","c\rd"],[98,10,10,99],[],"#,
            r#"3,["k0","k1","k2"],["k1"],{"at":"node-1"},null,["k1","k2"],"settings",true,"#,
            r#""resource 'cvalue' (value, a copy, bound at node-0)"]"#
        ))
    );
    assert!(lock(&mesh[0].1.tables)["counts"].is_empty());
}

#[test]
fn a_copys_table_refuses_what_a_nodes_table_refuses() {
    let (result, _) = run(r#"
        let table = resource("ctable");
        let errors = [];
        let key = "k";
        key.pad(1025, "k");
        let y = 1;
        try { table.set(key, 1); } catch (e) { errors.push(e); }
        try { table.set("f", |x| x + y); } catch (e) { errors.push(e); }
        try { table.set("b", blob(5000000)); } catch (e) { errors.push(e); }
        [errors, table.len()]
    "#);
    assert_eq!(
        result.as_deref(),
        Ok(concat!(
            r#"[["set: a table key is at most 1024 bytes, this one is 1025","#,
            r#""set: the message holds a value of type 'closure with captured variables', "#,
            r#"which cannot travel between nodes (portable: (), bool, int, float, char, "#,
            r#"string, blob, array, map, Fn pointers without captures, resource handles)","#,
            r#""set: a table value is at most 4194304 bytes encoded, this one is 5000005"],2]"#
        ))
    );
}

#[test]
fn a_copy_of_the_wrong_shape_is_refused_when_decoded_or_checked() {
    let program = Program::compile("1", &Limits::default()).expect("compiles");
    let handle = |kind, copy| {
        Dynamic::from(Resource {
            name: "r".into(),
            kind,
            bound_at: "node-0".into(),
            copy: Some(Arc::new(copy)),
        })
    };
    let text = Dynamic::from(ImmutableString::from("x"));
    for (kind, copy, error) in [
        (
            ResourceKind::Dataset,
            Copied::Value(text.clone()),
            "a dataset copy is an array of byte strings",
        ),
        (
            ResourceKind::Dataset,
            Copied::Value(Dynamic::from_array(vec![text.clone()])),
            "a dataset copy is an array of byte strings",
        ),
        (
            ResourceKind::Table,
            Copied::Value(text.clone()),
            "a table copy is a map",
        ),
    ] {
        let bytes = agent_lang::encode_portable(&handle(kind, copy)).expect("encodes");
        let decoded = agent_lang::decode_portable(&program, &bytes).expect_err("wrong shape");
        let checked = agent_lang::check_portable(&program, &bytes).expect_err("wrong shape");
        assert!(decoded.to_string().contains(error), "{decoded}");
        assert_eq!(decoded.to_string(), checked.to_string());
    }
    let good = handle(
        ResourceKind::Dataset,
        Copied::Dataset(CopiedDataset::new(vec![b"x\ny".to_vec()])),
    );
    let bytes = agent_lang::encode_portable(&good).expect("encodes");
    agent_lang::check_portable(&program, &bytes).expect("checks");
    let back = agent_lang::decode_portable(&program, &bytes).expect("decodes");
    let Some(Copied::Dataset(data)) = back.cast::<Resource>().copy.as_deref().cloned() else {
        panic!("no dataset copy");
    };
    assert_eq!(data.files(), [b"x\ny".to_vec()]);
}

/// A copy travels in the continuation, so its size counts against the continuation limit: an
/// agent whose copy grew past the limit cannot be encoded to leave (its hop is refused), and
/// the same agent with the copy as it was can.
#[test]
fn a_copy_counts_against_the_continuation_limit() {
    let mesh = nodes();
    for (grow, fits) in [(false, true), (true, false)] {
        let source = format!(
            r#"let table = resource("ctable");
               if {grow} {{ table.set("big", blob(20000)); }}
               migrate("node-1");
               table.len()"#
        );
        let limits = Limits::default().with_max_continuation_bytes(16_000);
        let program = Program::compile(&source, &limits).expect("compiles");
        let env = HostEnv {
            here: mesh[0].0.clone(),
            home: "node-0".into(),
            nodes: mesh.iter().map(|(n, _)| n.clone()).collect(),
            agent_id: "agent".into(),
            hops: 0,
            printer: Arc::new(|_| {}),
            resources: Arc::new(Host {
                here: mesh[0].0.clone(),
                data: mesh[0].1.clone(),
                program: program.clone(),
            }),
        };
        let mut exec = Execution::new(&program);
        match exec.resume(&env, Resume::Start) {
            Outcome::Migrate { .. } => {}
            other => panic!("{other:?}"),
        }
        match exec.encode() {
            Ok(bytes) => assert!(fits && bytes.len() < 16_000, "{} bytes", bytes.len()),
            Err(agent_lang::EncodeError::TooLarge { size, limit }) => {
                assert!(
                    !fits && size > 20_000 && limit == 16_000,
                    "{size} / {limit}"
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
}
