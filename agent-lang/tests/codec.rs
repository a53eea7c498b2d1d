//! The continuation codec against hostile input: every decoder result is a value or an error,
//! never a panic; a decoded (even corrupted) continuation resumes to an outcome.
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use agent_lang::{
    AgentErrorKind, DecodeError, EncodeError, Execution, HostEnv, Limits, Outcome, Program, Resume,
};
use proptest::prelude::*;

/// An agent whose suspended state has everything: nested walked frames, a `try`, loops over a
/// range, a stepped range and an array, a block computing a `let`, maps, blobs, chars, floats.
const RICH: &str = r#"
fn visit(depth, m) {
    let acc = [];
    for (x, i) in ["a", "b", "c"] {
        try {
            let v = if depth > 0 { migrate(nodes()[i % 3]); depth * 10 } else { -1 };
            acc.push([x, v, 'z', 1.5, blob(2, 7)]);
        } catch (e) { acc.push(e); }
    }
    if depth > 0 { let r = visit(depth - 1, m); acc.push(r); }
    m.n += 1;
    [acc, m]
}
let total = 0;
for k in range(0, 9, 4) {
    for j in 0..2 { total += j; }
    let got = visit(2, #{ n: k, s: "str" });
    total += got.len();
}
total
"#;

fn env(here: &str) -> HostEnv {
    HostEnv {
        resources: agent_lang::no_resources(),
        here: here.into(),
        home: "node-0".into(),
        nodes: support::mesh(),
        agent_id: "agent-codec".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    }
}

/// Runs `program` until its `n`-th hop and returns the suspended execution there.
fn suspended_at(program: &Program, n: usize) -> Execution {
    let mut exec = Execution::new(program);
    let mut input = Resume::Start;
    let mut hops = 0;
    loop {
        match exec.resume(&env("node-0"), input) {
            Outcome::Migrate { .. } => {
                hops += 1;
                if hops == n {
                    return exec;
                }
                input = Resume::Start;
            }
            other => panic!("agent stopped before hop {n}: {other:?}"),
        }
    }
}

/// Resumes `exec` until it stops for good (hops go nowhere), at most `slices` times; returns
/// how it ended. Never panics: every path returns an outcome.
fn drive(mut exec: Execution, slices: usize) -> &'static str {
    let mut input = Resume::Start;
    for _ in 0..slices {
        match exec.resume(&env("node-1"), input) {
            Outcome::Finished(_) => return "finished",
            Outcome::Failed(e) if e.kind == AgentErrorKind::Internal => return "internal failure",
            Outcome::Failed(_) => return "failed",
            Outcome::Migrate { .. } => {
                // Also check the state after a corrupted resume still encodes or refuses cleanly.
                let _ = exec.encode();
                input = Resume::Start;
            }
            Outcome::Receive { .. } => input = Resume::Value(().into()),
            _ => return "other",
        }
    }
    "still running"
}

fn rich() -> (Program, Vec<u8>) {
    let limits = Limits::default().with_max_operations(200_000);
    let program = Program::compile(RICH, &limits).unwrap();
    let exec = suspended_at(&program, 5);
    let bytes = exec.encode().unwrap();
    (program, bytes)
}

#[test]
fn round_trip_is_stable_and_resumes_like_the_original() {
    let (program, bytes) = rich();
    let decoded = Execution::decode(&program, &bytes).unwrap();
    assert_eq!(
        decoded.encode().unwrap(),
        bytes,
        "decode then encode must give the same bytes"
    );
    assert!(
        decoded.depth() > 2,
        "the rich agent should be suspended in nested frames"
    );
    let mut a = Execution::decode(&program, &bytes).unwrap();
    let mut b = suspended_at(&program, 5);
    let mut input = Resume::Start;
    loop {
        match (
            a.resume(&env("node-1"), input.clone()),
            b.resume(&env("node-1"), input),
        ) {
            (Outcome::Migrate { to: x }, Outcome::Migrate { to: y }) => {
                assert_eq!(x, y);
                assert_eq!(a.encode().unwrap(), b.encode().unwrap());
                input = Resume::Start;
            }
            (Outcome::Finished(x), Outcome::Finished(y)) => {
                assert_eq!(x.to_string(), y.to_string());
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn truncated_at_every_length_is_an_error() {
    let (program, bytes) = rich();
    for len in 0..bytes.len() {
        assert!(
            Execution::decode(&program, &bytes[..len]).is_err(),
            "a prefix of {len} bytes decoded"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        Execution::decode(&program, &longer),
        Err(DecodeError::Malformed { .. })
    ));
}

static CAUGHT_PANICS: AtomicUsize = AtomicUsize::new(0);

/// Every single-bit corruption of a rich continuation is refused by the decoder (a typed
/// error) or decodes to a state that runs to a normal outcome: never a panic, never an internal
/// failure. (Regression: about ten flips used to shorten a frame's scope or move its position;
/// Rhai then indexed its scope out of range, a panic `resume` reported as an internal failure.
/// The decoder now checks every frame against the plan.)
#[test]
fn every_single_bit_flip_is_refused_or_runs_normally() {
    // `Execution::resume` turns a panic inside Rhai into `Outcome::Failed` (kind Internal);
    // count those (silently, for this test's thread only) to report them.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current()
            .name()
            .is_some_and(|n| n.contains("bit_flip"))
        {
            CAUGHT_PANICS.fetch_add(1, Ordering::SeqCst);
        } else {
            previous(info);
        }
    }));
    let (program, bytes) = rich();
    let (mut decoded, mut refused) = (0, 0);
    let mut endings = std::collections::BTreeMap::new();
    let mut internal = Vec::new();
    for i in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[i / 8] ^= 1 << (i % 8);
        // Decoding never panics (this would unwind through the test).
        match Execution::decode(&program, &flipped) {
            Ok(exec) => {
                decoded += 1;
                // Neither does resuming: every slice returns an outcome.
                let ending = drive(exec, 20);
                if ending == "internal failure" {
                    internal.push(i);
                }
                *endings.entry(ending).or_insert(0) += 1;
            }
            Err(_) => refused += 1,
        }
    }
    let caught = CAUGHT_PANICS.load(Ordering::SeqCst);
    eprintln!(
        "{} bit flips: {refused} refused, {decoded} decoded and resumed: {endings:?}; \
         {caught} panics inside Rhai caught by resume",
        bytes.len() * 8
    );
    assert!(refused > 0 && decoded > 0);
    assert!(
        internal.is_empty() && caught == 0,
        "bits {internal:?} decoded into states that failed internally ({caught} panics)"
    );
}

/// A frame whose scope or position was tampered with in ways that keep the bytes well-formed
/// (the kind of change that used to make Rhai index out of range) is a typed decode error.
#[test]
fn inconsistent_frames_are_refused() {
    let source = r#"
        fn f(a, b) {
            let s = a;
            for (x, i) in [1, 2] {
                let t = x + i;
                migrate("n");
                s += t;
            }
            s + b
        }
        let k = 1;
        let r = f(k, 2);
        r
    "#;
    let program = Program::compile(source, &Limits::default()).unwrap();
    let bytes = suspended_at(&program, 1).encode().unwrap();
    assert!(Execution::decode(&program, &bytes).is_ok());
    // Each case replaces one encoded piece with another of the same kind, so the bytes still
    // parse; only its meaning is wrong.
    let cases: [(&str, &[u8], &[u8]); 5] = [
        // The function's variable `t` renamed (`u`).
        ("renamed variable", b"\x61t", b"\x61u"),
        // The main body's `k` renamed to `r`, declared later.
        ("variable of a later statement", b"\x61k", b"\x61r"),
        // A parameter renamed.
        ("renamed parameter", b"\x61b", b"\x61z"),
        // The loop counter `i` and item `x` swapped.
        ("swapped loop variables", b"\x61x", b"\x61i"),
        // The function frame's first variable `a` renamed to the main body's `k`.
        ("variable of another body", b"\x61a", b"\x61k"),
    ];
    for (what, from, to) in cases {
        let at = bytes
            .windows(from.len())
            .rposition(|w| w == from)
            .unwrap_or_else(|| panic!("{what}: {from:?} not found"));
        let mut bad = bytes.clone();
        bad[at..at + to.len()].copy_from_slice(to);
        match Execution::decode(&program, &bad) {
            Err(DecodeError::Malformed { what: why, .. }) => {
                assert!(why.contains("variables"), "{what}: {why}")
            }
            other => panic!("{what}: decoded: {other:?}"),
        }
    }
}

#[test]
fn wrong_program_is_refused() {
    let (_, bytes) = rich();
    let other =
        Program::compile(&format!("{RICH}\n// another program"), &Limits::default()).unwrap();
    assert!(matches!(
        Execution::decode(&other, &bytes),
        Err(DecodeError::WrongProgram { .. })
    ));
}

#[test]
fn wrong_version_is_refused() {
    let (program, bytes) = rich();
    // [array(5), text(17) "tern-continuation", VERSION, ..]: the version is byte 19.
    assert_eq!(bytes[19] as u64, agent_lang::CONTINUATION_VERSION);
    let mut old = bytes.clone();
    old[19] = 1;
    assert_eq!(
        Execution::decode(&program, &old).unwrap_err(),
        DecodeError::Version(1)
    );
    let mut future = bytes;
    future[19] = 0x17;
    assert_eq!(
        Execution::decode(&program, &future).unwrap_err(),
        DecodeError::Version(0x17)
    );
}

#[test]
fn bad_magic_is_refused() {
    let (program, mut bytes) = rich();
    bytes[3] = b'X';
    assert_eq!(
        Execution::decode(&program, &bytes).unwrap_err(),
        DecodeError::BadMagic
    );
    assert_eq!(
        Execution::decode(&program, b"").unwrap_err(),
        DecodeError::BadMagic
    );
}

#[test]
fn oversized_continuations_are_refused_both_ways() {
    let src =
        "let big = []; for i in 0..500 { big.push(`item ${i}`); } migrate(\"node-1\"); big.len()";
    let program =
        Program::compile(src, &Limits::default().with_max_continuation_bytes(1000)).unwrap();
    let exec = suspended_at(&program, 1);
    match exec.encode() {
        Err(EncodeError::TooLarge { size, limit }) => assert!(size > limit && limit == 1000),
        other => panic!("{other:?}"),
    }
    // Bytes from a generous node are refused by a strict one before anything is parsed.
    let generous = Program::compile(src, &Limits::default()).unwrap();
    let bytes = suspended_at(&generous, 1).encode().unwrap();
    assert!(bytes.len() > 1000);
    assert!(matches!(
        Execution::decode(&program, &bytes),
        Err(DecodeError::TooLarge { limit: 1000, .. })
    ));
    // Garbage over the limit is refused the same way.
    assert!(matches!(
        Execution::decode(&program, &vec![0xff; 5000]),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn capturing_closure_blocks_the_hop_naming_the_variable() {
    let program = Program::compile(
        "let y = 5; let add_y = |x| x + y; migrate(\"node-1\"); add_y.call(1)",
        &Limits::default(),
    )
    .unwrap();
    let err = suspended_at(&program, 1).encode().unwrap_err();
    assert!(err.to_string().contains("variable 'add_y'"), "{err}");
}

#[test]
fn range_value_blocks_the_hop_naming_the_variable() {
    let program =
        Program::compile("let r = 0..3; migrate(\"node-1\"); r", &Limits::default()).unwrap();
    let err = suspended_at(&program, 1).encode().unwrap_err();
    assert!(err.to_string().contains("variable 'r'"), "{err}");
    // Nested inside a map inside a function frame: the path is named too.
    let program = Program::compile(
        "fn f() { let m = #{ inner: [1, 0..3] }; migrate(\"node-1\"); m } f()",
        &Limits::default(),
    )
    .unwrap();
    let err = suspended_at(&program, 1).encode().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("variable 'm'") && msg.contains("function 'f'") && msg.contains("inner[1]"),
        "{msg}"
    );
}

#[test]
fn function_pointers_without_captures_travel() {
    let program = Program::compile(
        "fn twice(x) { x * 2 } let f = Fn(\"twice\"); let g = |x| x + 1; migrate(\"node-1\"); f.call(g.call(20))",
        &Limits::default(),
    )
    .unwrap();
    let bytes = suspended_at(&program, 1).encode().unwrap();
    let mut exec = Execution::decode(&program, &bytes).unwrap();
    match exec.resume(&env("node-1"), Resume::Start) {
        Outcome::Finished(v) => assert_eq!(v.as_int().unwrap(), 42),
        other => panic!("{other:?}"),
    }
}

#[test]
fn for_loop_items_travel_without_the_consumed_prefix() {
    // Regression: the decoder used to rebuild the consumed prefix of a `for` array from a
    // position in the input, so a few hostile bytes could allocate gigabytes.
    let src = "let a = []; for i in 0..200 { a.push(`${i}-padding-padding`); } let n = 0; for s in a { migrate(\"node-1\"); n += 1; } n";
    let program = Program::compile(src, &Limits::default()).unwrap();
    let early = suspended_at(&program, 2).encode().unwrap();
    let late = suspended_at(&program, 190).encode().unwrap();
    assert!(
        late.len() + 2000 < early.len(),
        "early {} bytes, late {} bytes",
        early.len(),
        late.len()
    );
    let mut exec = Execution::decode(&program, &late).unwrap();
    let mut hops = 190;
    loop {
        match exec.resume(&env("node-1"), Resume::Start) {
            Outcome::Migrate { .. } => hops += 1,
            Outcome::Finished(v) => {
                assert_eq!(v.as_int().unwrap(), 200);
                assert_eq!(hops, 200);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let program = Program::compile(RICH, &Limits::default()).unwrap();
        let _ = Execution::decode(&program, &bytes);
    }

    #[test]
    fn random_tails_after_a_valid_header_never_panic(tail in prop::collection::vec(any::<u8>(), 0..256), cut in 0usize..200) {
        // Keep the real magic, version and program hash so decoding reaches the frames.
        let (program, bytes) = rich();
        let header = 1 + 18 + 1 + 2 + 32;
        let mut input = bytes[..header].to_vec();
        input.extend_from_slice(&bytes[header..(header + cut).min(bytes.len())]);
        input.extend_from_slice(&tail);
        if let Ok(exec) = Execution::decode(&program, &input) {
            prop_assert_ne!(drive(exec, 5), "internal failure");
        }
    }
}

/// Guards the hand-written CBOR reader: every float width ciborium may choose (half, single,
/// double), special values, and integers at each head size survive a hop exactly.
#[test]
fn scalars_of_every_cbor_width_round_trip() {
    let source = r#"
        let v = [0.0, -0.0, 1.5, 2.5, 65504.0, 0.1, 1e300, -3.25, 1.0/0.0, -1.0/0.0,
                 0, 23, 24, 255, 256, 65535, 65536, 4294967295, 4294967296, -1, -24, -25, -256, -257,
                 9223372036854775807, -9223372036854775807 - 1, 'x', "", blob(3, 9), #{a: [()]}, true, false];
        migrate("b");
        v
    "#;
    let program = Program::compile(source, &Limits::default()).unwrap();
    let mut exec = Execution::new(&program);
    assert!(matches!(
        exec.resume(&env("a"), Resume::Start),
        Outcome::Migrate { .. }
    ));
    let bytes = exec.encode().unwrap();
    let mut back = Execution::decode(&program, &bytes).unwrap();
    // Re-encoding the decoded state gives the same bytes.
    assert_eq!(back.encode().unwrap(), bytes);
    match back.resume(&env("b"), Resume::Start) {
        Outcome::Finished(v) => {
            let json = agent_lang::to_json(&v).unwrap().to_string();
            assert_eq!(
                json,
                r#"[0.0,-0.0,1.5,2.5,65504.0,0.1,1e+300,-3.25,null,null,0,23,24,255,256,65535,65536,4294967295,4294967296,-1,-24,-25,-256,-257,9223372036854775807,-9223372036854775808,"x","",[9,9,9],{"a":[null]},true,false]"#
            );
            let items = v.into_array().unwrap();
            assert!(
                items[8].as_float().unwrap().is_infinite() && items[8].as_float().unwrap() > 0.0
            );
            assert!(items[1].as_float().unwrap().is_sign_negative());
        }
        other => panic!("{other:?}"),
    }
}

/// Guards the bulk paths for arrays of numbers (written in runs, read in one pass): long arrays
/// of integers of every width and sign, broken by other values and nested arrays at and around
/// the run boundaries, survive a hop exactly, and constants stay constants.
#[test]
fn long_mixed_integer_arrays_round_trip() {
    let source = r#"
        let v = [];
        for i in 0..2000 {
            let m = i % 11;
            if m == 0 { v.push(i); }
            else if m == 1 { v.push(-i); }
            else if m == 2 { v.push(i * 1000); }
            else if m == 3 { v.push(-i * 100000); }
            else if m == 4 { v.push(i * 10000000000); }
            else if m == 5 { v.push(9223372036854775807 - i); }
            else if m == 6 { v.push(-9223372036854775807 + i); }
            else if i % 255 == 7 { v.push(`s${i}`); }
            else if i % 257 == 8 { v.push([i, [i, -i], 1.5]); }
            else { v.push(i % 24); }
        }
        v[255] = "edge"; v[256] = 0.5; v[511] = (); v[512] = [];
        const C = [1, 2, 3];
        migrate("b");
        let same = C.len() == 3;
        [v, same, v.len()]
    "#;
    let program = Program::compile(source, &Limits::default()).unwrap();
    let mut original = Execution::new(&program);
    assert!(matches!(
        original.resume(&env("a"), Resume::Start),
        Outcome::Migrate { .. }
    ));
    let bytes = original.encode().unwrap();
    let mut back = Execution::decode(&program, &bytes).unwrap();
    assert_eq!(back.encode().unwrap(), bytes);
    let results = [&mut original, &mut back].map(|e| match e.resume(&env("b"), Resume::Start) {
        Outcome::Finished(v) => agent_lang::to_json(&v).unwrap().to_string(),
        other => panic!("{other:?}"),
    });
    assert_eq!(results[0], results[1]);
    assert!(
        results[0].ends_with(",true,2000]"),
        "{}",
        &results[0][..200]
    );
    // Every truncation inside the bulk array is refused.
    for len in (bytes.len() - 4000..bytes.len()).step_by(7) {
        assert!(Execution::decode(&program, &bytes[..len]).is_err());
    }
}

#[test]
fn encoding_into_a_buffer_sized_by_the_hint_gives_the_same_bytes() {
    // The rich state, and a bulky one: blobs, a long array of numbers, a long string.
    let bulky = Program::compile(
        r#"
        let b = blob(300000, 9);
        let a = [];
        for i in 0..100000 { a.push(i * 1000); }
        let s = "x";
        for i in 0..12 { s += s; }
        migrate("node-1");
        [b.len(), a.len(), s.len()]
        "#,
        &Limits::default(),
    )
    .unwrap();
    let (rich, _) = rich();
    for (program, hop, is_bulky) in [(&rich, 1, false), (&rich, 3, false), (&bulky, 1, true)] {
        let exec = suspended_at(program, hop);
        let plain = exec.encode().unwrap();
        let hint = exec.encoded_len_hint();
        let into = exec.encode_into(Vec::with_capacity(hint)).unwrap();
        assert_eq!(into, plain);
        // Appended after what the buffer holds.
        let mut prefix = b"head".to_vec();
        prefix = exec.encode_into(prefix).unwrap();
        assert_eq!((&prefix[..4], &prefix[4..]), (&b"head"[..], &plain[..]));
        // A hint, not a promise: near the size for bulky state, never far below it.
        assert!(
            hint * 10 >= plain.len() * 9,
            "hint {hint} for {} bytes",
            plain.len()
        );
        if is_bulky {
            assert!(
                hint <= plain.len() * 11 / 10,
                "hint {hint} for {} bytes",
                plain.len()
            );
        }
    }
}
