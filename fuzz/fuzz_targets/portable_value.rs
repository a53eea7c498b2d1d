//! Messages between agents are portable values: they come from operators (`tern send`), from
//! peers (`ControlRequest::Deliver`, the messages a hop offer carries) and reach the agent's
//! `receive()`. A node checks them with `check_portable` (which builds nothing) before queueing
//! them, and decodes them with `decode_portable` when the agent takes one. Both must take any
//! bytes to a value or an error, and must agree: `check_portable` documents that it gives the
//! error `decode_portable` gives for the same bytes, so a message it lets through is one the
//! agent can decode. A decoded value must encode again, and decoding and encoding that is
//! stable (one canonical form).
#![no_main]

use agent_lang::{check_portable, decode_portable, encode_portable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let program = tern_fuzz::receiver();
    let checked = tern_fuzz::bounded("check_portable", data.len(), 0, || {
        check_portable(program, data)
    });
    let decoded = tern_fuzz::bounded("decode_portable", data.len(), 128, || {
        decode_portable(program, data)
    });
    assert_eq!(
        checked,
        decoded.as_ref().map(|_| ()).map_err(Clone::clone),
        "check_portable and decode_portable disagree"
    );
    if let Ok(value) = decoded {
        let once = encode_portable(&value).expect("a decoded value encodes");
        let again = decode_portable(program, &once).expect("a re-encoded value decodes");
        let twice = encode_portable(&again).expect("a decoded value encodes");
        assert_eq!(once, twice, "encoding is not stable");
        assert_eq!(check_portable(program, &once), Ok(()));
    }
});
