//! Hop envelopes arrive from any peer that offers a hop (`HopOffer::envelope`, `previous`, the
//! custody tail) and from `Ended` / `Location` reports, and are decoded before anything about
//! them is verified. The decoder must take any bytes to a value or an error, and, since it
//! accepts only the canonical encoding, a value it accepts must encode to exactly the bytes it
//! came from (the envelope's hash is the hash of the bytes that arrived).
#![no_main]

use libfuzzer_sys::fuzz_target;
use security::HopEnvelope;

fuzz_target!(|data: &[u8]| {
    let decoded = tern_fuzz::bounded("HopEnvelope::decode", data.len(), 64, || {
        HopEnvelope::decode(data)
    });
    if let Ok(envelope) = decoded {
        assert_eq!(
            envelope.encode(),
            data,
            "an accepted envelope re-encodes differently"
        );
        assert_eq!(
            envelope.hash().as_bytes(),
            blake3::hash(data).as_bytes(),
            "an accepted envelope's hash is not the hash of its bytes"
        );
    }
});
