//! A continuation is the largest thing a node takes from a peer: the suspended state of an
//! agent arriving by a hop (inline in `HopOffer::inline`, or raw after it), decoded against the
//! agent's program before the node stores it. `Execution::decode` must take any bytes to an
//! execution or an error, never reserving memory for lengths the bytes only claim. What it
//! accepts must be a state the executor could have built: it encodes again (stably), and
//! resuming it gives an outcome, never an internal failure (a panic inside Rhai, which
//! `resume` catches, aborts this process under libFuzzer's panic hook anyway).
#![no_main]

use agent_lang::{AgentErrorKind, Execution, Outcome, Resume};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let program = tern_fuzz::traveller();
    let decoded = tern_fuzz::bounded("Execution::decode", data.len(), 128, || {
        Execution::decode(program, data)
    });
    let Ok(mut exec) = decoded else { return };
    let once = exec.encode().expect("a decoded continuation encodes");
    let again = Execution::decode(program, &once).expect("a re-encoded continuation decodes");
    assert_eq!(
        again.encode().as_deref(),
        Ok(&once[..]),
        "encoding is not stable"
    );
    let env = tern_fuzz::env();
    for _ in 0..4 {
        match exec.resume_within(&env, Resume::Start, 20_000) {
            Outcome::Failed(e) => {
                assert_ne!(e.kind, AgentErrorKind::Internal, "{}", e.message);
                return;
            }
            Outcome::Finished(_) => return,
            _ => {}
        }
    }
});
