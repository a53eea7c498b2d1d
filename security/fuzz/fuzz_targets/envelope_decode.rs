//! Any bytes given to the envelope decoder give an envelope or an error, never a panic; whatever
//! decodes re-encodes to the same bytes, and checking it against itself does not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use security::{verify_hop, HopCheck, HopEnvelope};

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = HopEnvelope::decode(data) {
        assert_eq!(envelope.encode(), data, "decoded bytes must be canonical");
        let f = envelope.fields().clone();
        let ctx = HopCheck::new(&f.from, &f.to, &f.package_hash, &f.continuation_hash)
            .with_previous(Some(&envelope))
            .with_clock(f.time_ms, 0);
        let _ = verify_hop(envelope.clone(), &ctx);
    }
});
