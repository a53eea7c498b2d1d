//! Custody certificates arrive with every hop offer (`HopOffer::certificate`) and in the home's
//! answer to a location report, and are decoded before their signature is checked. The decoder
//! must take any bytes to a value or an error; since it accepts only the canonical encoding, a
//! certificate it accepts encodes to exactly the bytes it came from; checking one against a key
//! and an agent gives an answer, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use security::{AgentId, CustodyCertificate, SecretKey};

fuzz_target!(|data: &[u8]| {
    let decoded = tern_fuzz::bounded("CustodyCertificate::decode", data.len(), 64, || {
        CustodyCertificate::decode_known(data, |_| None)
    });
    if let Ok(certificate) = decoded {
        assert_eq!(
            certificate.encode(),
            data,
            "an accepted certificate re-encodes differently"
        );
        let home = SecretKey::from_seed([1; 32]).public();
        let _ = certificate.verify(&AgentId([7; 16]), &home);
    }
});
