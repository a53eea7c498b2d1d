//! The portable value codec against hostile input: `check_portable` accepts exactly what
//! `decode_portable` accepts, with the same error, for random bytes and for damaged encodings of
//! random values; everything `encode_portable` writes passes both.
use std::sync::Arc;

use agent_lang::rhai::{Dynamic, FnPtr, ImmutableString, Map};
use agent_lang::{
    check_portable, decode_portable, encode_portable, Copied, CopiedDataset, DecodeError,
    Execution, HostEnv, Limits, Outcome, Program, Resource, ResourceKind, Resume, TAG_FN_PTR,
};
use proptest::prelude::*;

/// A program with a named function and a closure that function pointers can name.
const SOURCE: &str = "fn twice(x) { x * 2 } let g = |x| x + 1; g";

/// How `program` runs until its first stop, on a one-node mesh.
fn first_stop(program: &Program) -> Outcome {
    let env = HostEnv {
        resources: agent_lang::no_resources(),
        here: "a".into(),
        home: "a".into(),
        nodes: vec!["a".into()],
        agent_id: "agent-portable".into(),
        hops: 0,
        printer: Arc::new(|_| {}),
    };
    Execution::new(program).resume(&env, Resume::Start)
}

/// The program and its closure (a pointer to its `anon$` function).
fn program() -> (Program, Dynamic) {
    let program = Program::compile(SOURCE, &Limits::default()).unwrap();
    let closure = match first_stop(&program) {
        Outcome::Finished(v) => v,
        other => panic!("{other:?}"),
    };
    assert!(closure
        .read_lock::<FnPtr>()
        .unwrap()
        .fn_name()
        .starts_with("anon$"));
    (program, closure)
}

/// Both functions' verdicts on `bytes`, the decoded value dropped.
fn verdicts(program: &Program, bytes: &[u8]) -> (Result<(), DecodeError>, Result<(), DecodeError>) {
    (
        check_portable(program, bytes),
        decode_portable(program, bytes).map(|_| ()),
    )
}

/// A function pointer item naming `name`, whatever it is (`encode_portable` only writes names
/// Rhai accepts).
fn fn_ptr_bytes(name: &str) -> Vec<u8> {
    let mut b = vec![0xdb];
    b.extend_from_slice(&TAG_FN_PTR.to_be_bytes());
    b.push(0x7b);
    b.extend_from_slice(&(name.len() as u64).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Random portable values of every kind, nested.
fn value(closure: Dynamic) -> impl Strategy<Value = Dynamic> {
    let leaf = prop_oneof![
        Just(Dynamic::UNIT),
        any::<bool>().prop_map(Dynamic::from_bool),
        any::<i64>().prop_map(Dynamic::from_int),
        (-30i64..30).prop_map(Dynamic::from_int),
        any::<f64>().prop_map(Dynamic::from_float),
        any::<char>().prop_map(Dynamic::from_char),
        "\\PC{0,6}".prop_map(|s| Dynamic::from(ImmutableString::from(s))),
        prop::collection::vec(any::<u8>(), 0..6).prop_map(Dynamic::from_blob),
        prop_oneof![Just("twice"), Just("not_in_the_program")]
            .prop_map(|n| Dynamic::from(FnPtr::new(n).unwrap())),
        Just(closure),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Dynamic::from_array),
            prop::collection::btree_map("[a-z]{0,3}", inner.clone(), 0..4).prop_map(|m| {
                Dynamic::from_map(m.into_iter().map(|(k, v)| (k.into(), v)).collect::<Map>())
            }),
            // Handles, with and without copies of each kind.
            (inner.clone(), 0..4u8).prop_map(|(v, which)| {
                let (kind, copy) = match which {
                    0 => (ResourceKind::Table, None),
                    1 => (ResourceKind::Value, Some(Copied::Value(v))),
                    2 => {
                        let mut entries = Map::new();
                        entries.insert("k".into(), v);
                        (ResourceKind::Table, Some(Copied::Table(entries)))
                    }
                    _ => {
                        let file = v.to_string().into_bytes();
                        let files = vec![file, b"a\nb".to_vec()];
                        let dataset = Copied::Dataset(CopiedDataset::new(files));
                        (ResourceKind::Dataset, Some(dataset))
                    }
                };
                Dynamic::from(Resource {
                    name: "res".into(),
                    kind,
                    bound_at: "node-0".into(),
                    copy: copy.map(Arc::new),
                })
            }),
        ]
    })
}

#[derive(Debug, Clone)]
enum Damage {
    Flip(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, u8),
    Delete(prop::sample::Index),
}

fn damage() -> impl Strategy<Value = Damage> {
    use prop::sample::Index;
    prop_oneof![
        (any::<Index>(), 1u8..).prop_map(|(i, x)| Damage::Flip(i, x)),
        any::<Index>().prop_map(Damage::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, x)| Damage::Insert(i, x)),
        any::<Index>().prop_map(Damage::Delete),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match damage {
        Damage::Flip(i, x) => bytes[i.index(len)] ^= x,
        Damage::Truncate(i) => bytes.truncate(i.index(len)),
        Damage::Insert(i, x) => bytes.insert(i.index(len + 1), *x),
        Damage::Delete(i) => {
            bytes.remove(i.index(len));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn check_agrees_with_decode_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let (program, _) = program();
        let (check, decode) = verdicts(&program, &bytes);
        prop_assert_eq!(check, decode);
    }

    #[test]
    fn check_agrees_with_decode_on_damaged_encodings(
        (v, damages) in (value(program().1), prop::collection::vec(damage(), 1..4))
    ) {
        let (program, _) = program();
        let mut bytes = encode_portable(&v).unwrap();
        for d in &damages {
            apply(&mut bytes, d);
        }
        let (check, decode) = verdicts(&program, &bytes);
        prop_assert_eq!(check, decode);
    }

    #[test]
    fn every_encoding_passes_the_check(v in value(program().1)) {
        let (program, _) = program();
        let bytes = encode_portable(&v).unwrap();
        prop_assert_eq!(check_portable(&program, &bytes), Ok(()));
        let back = decode_portable(&program, &bytes).unwrap();
        prop_assert_eq!(encode_portable(&back).unwrap(), bytes);
    }

    #[test]
    fn check_agrees_with_decode_on_function_pointer_names(
        name in prop_oneof![
            "\\PC{0,6}",
            "[a-z_][a-z0-9_]{0,5}",
            Just("if".to_string()),
            Just("anon$0".to_string()),
        ],
        in_array in any::<bool>(),
    ) {
        let (program, _) = program();
        let mut bytes = fn_ptr_bytes(&name);
        if in_array {
            bytes.insert(0, 0x82);
            bytes.push(0xf6);
        }
        let (check, decode) = verdicts(&program, &bytes);
        prop_assert_eq!(check, decode);
    }
}

/// A pointer to a function Rhai cannot name (not an identifier, a keyword, a closure the
/// program lacks) is refused by both, at the same byte, the name shown cut short. A pointer to
/// a well-formed name the program does not define passes both: decoding builds a plain
/// `FnPtr`, like `Fn("name")` in a script, and calling it fails in the agent.
#[test]
fn function_pointer_to_unknown_function_is_refused_by_both() {
    let (program, closure) = program();
    let anon = closure.read_lock::<FnPtr>().unwrap().fn_name().to_string();
    for name in ["not a name", "if", "anon$deadbeef", "", "x-y"] {
        let bytes = fn_ptr_bytes(name);
        let (check, decode) = verdicts(&program, &bytes);
        assert_eq!(check, decode, "{name}");
        match check {
            Err(DecodeError::Malformed { what, offset }) => {
                assert_eq!(offset, bytes.len());
                assert!(what.contains("unknown function"), "{what}");
            }
            other => panic!("{name}: {other:?}"),
        }
    }
    for name in ["twice", "nowhere", anon.as_str()] {
        assert_eq!(verdicts(&program, &fn_ptr_bytes(name)), (Ok(()), Ok(())));
    }
    let long = "-".repeat(100_000);
    match check_portable(&program, &fn_ptr_bytes(&long)) {
        Err(DecodeError::Malformed { what, .. }) => assert!(what.len() < 200, "{}", what.len()),
        other => panic!("{other:?}"),
    }
}

/// Nesting at and past the limit, with the innermost array empty, holding an integer (taken
/// without the depth check, as the encoder writes it) or holding anything else.
#[test]
fn nesting_limit_is_the_same_for_both() {
    let (program, _) = program();
    let mut seen = (false, false);
    for depth in 120..140 {
        for inner in [
            &[0x80][..],
            &[0x81, 0x07],
            &[0x81, 0xf6],
            &[0xa1, 0x61, b'k', 0x07],
        ] {
            let mut bytes = vec![0x81; depth];
            bytes.extend_from_slice(inner);
            let (check, decode) = verdicts(&program, &bytes);
            seen = (seen.0 || check.is_ok(), seen.1 || check.is_err());
            assert_eq!(check, decode, "depth {depth}, {inner:x?}");
        }
    }
    assert_eq!(seen, (true, true));
}

/// A long array of empty arrays (small enough to decode here) passes both; one byte short or
/// one byte over is refused by both with the same error.
#[test]
fn many_empty_arrays_agree() {
    let (program, _) = program();
    let n = 100_000u32;
    let mut bytes = vec![0x9a];
    bytes.extend_from_slice(&n.to_be_bytes());
    bytes.resize(5 + n as usize, 0x80);
    assert_eq!(verdicts(&program, &bytes), (Ok(()), Ok(())));
    for cut in [bytes.len() - 1, 7, 5, 4, 0] {
        let (check, decode) = verdicts(&program, &bytes[..cut]);
        assert!(check.is_err());
        assert_eq!(check, decode);
    }
    bytes.push(0x80);
    let (check, decode) = verdicts(&program, &bytes);
    assert!(check.is_err());
    assert_eq!(check, decode);
}

/// Found by fuzzing (`fuzz/`, target `portable_value`): a NaN with a payload decoded, encoded,
/// decoded and encoded again came out with other bytes the second time. Every NaN now encodes
/// as the one quiet NaN, so re-encoding is stable.
#[test]
fn nans_of_any_sign_and_payload_encode_the_same_and_stably() {
    let (program, _) = program();
    let nans = [
        f64::NAN,
        -f64::NAN,
        f64::from_bits(0x7ff8_0000_0000_0001),
        f64::from_bits(0xfff0_0000_0000_0042),
        f64::from(f32::from_bits(0x7fc0_1234)),
    ];
    let reference = encode_portable(&Dynamic::from_float(f64::NAN)).unwrap();
    for nan in nans {
        let once = encode_portable(&Dynamic::from_float(nan)).unwrap();
        assert_eq!(once, reference, "{:x}", nan.to_bits());
        let again = decode_portable(&program, &once).unwrap();
        assert_eq!(encode_portable(&again).unwrap(), once);
    }
    // The input the fuzzer found (an array with a map, strings and floats, among them an f64
    // NaN with a payload), and a half-float NaN with a payload.
    let found = hex("981c3800fb7e37e43c7465726e00011920ac60647465787440440909000000fb0afffffffffffffffbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfbfb74000000fbfffb000000000000000000000000404040");
    for bytes in [found, vec![0x82, 0xf9, 0xfe, 0xc0, 0x01]] {
        let value = decode_portable(&program, &bytes).unwrap();
        let once = encode_portable(&value).unwrap();
        let twice = encode_portable(&decode_portable(&program, &once).unwrap()).unwrap();
        assert_eq!(once, twice);
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The message `program`'s first `send(to, value)` makes of its value.
fn sent_message(program: &Program) -> Vec<u8> {
    match first_stop(program) {
        Outcome::Send { message, .. } => message,
        other => panic!("{other:?}"),
    }
}

/// A closure an agent sends is named by the place of its body in its program, not by Rhai's
/// `anon$` hash (seeded per process, issue 14 item 4): the same program resolves it to the
/// same closure; another program, even with a closure at that very place, refuses it.
#[test]
fn a_sent_closure_is_named_by_its_place_and_its_program() {
    let source = "let f = |x| x + 1; send(\"a\", [f, Fn(\"g\")]); fn g() {}";
    let program = Program::compile(source, &Limits::default()).unwrap();
    let message = sent_message(&program);
    let text = String::from_utf8_lossy(&message);
    assert!(text.contains("anon@1:15#"), "{text}");
    assert!(!text.contains("anon$"), "{text}");
    let back = decode_portable(&program, &message).unwrap();
    let f = back.into_array().unwrap()[0].clone_cast::<FnPtr>();
    let engine = agent_lang::rhai::Engine::new();
    let ast = engine.compile(source).unwrap();
    assert_eq!(f.call::<i64>(&engine, &ast, (41_i64,)).unwrap(), 42);

    let other = Program::compile(
        "let f = |x| x * 9; send(\"a\", [f, Fn(\"g\")]); fn g() {}",
        &Limits::default(),
    )
    .unwrap();
    assert!(String::from_utf8_lossy(&sent_message(&other)).contains("anon@1:15#"));
    let (check, decode) = verdicts(&other, &message);
    assert_eq!(check, decode);
    match check {
        Err(DecodeError::Malformed { what, .. }) => assert!(what.contains("anon@1:15#"), "{what}"),
        other => panic!("{other:?}"),
    }
}
