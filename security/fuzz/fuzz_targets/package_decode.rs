//! Any bytes given to the package decoder give a package or an error, never a panic; whatever
//! decodes re-encodes to the same bytes, and verification of it does not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use security::Package;

fuzz_target!(|data: &[u8]| {
    if let Ok(package) = Package::from_bytes(data) {
        assert_eq!(package.to_bytes(), data, "decoded bytes must be canonical");
        let _ = package.verify();
    }
});
