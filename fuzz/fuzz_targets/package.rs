//! Package files come from operators (`tern launch`, `ClientRequest::Launch`) and from any
//! peer that answers a package pull (`PackageReply::Found`), and are decoded before their
//! signature is checked. Decoding must take any bytes to a value or an error; an accepted
//! package must be in its one canonical encoding (its hash is the hash of the bytes read); and
//! verifying whatever decoded (manifest checks, then the signature) must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use security::Package;

fuzz_target!(|data: &[u8]| {
    let decoded = tern_fuzz::bounded("Package::from_bytes", data.len(), 64, || {
        Package::from_bytes(data)
    });
    if let Ok(package) = decoded {
        assert_eq!(
            package.to_bytes(),
            data,
            "an accepted package re-encodes differently"
        );
        let hash = package.hash();
        assert_eq!(hash.as_bytes(), blake3::hash(data).as_bytes());
        if let Ok(verified) = package.verify() {
            assert_eq!(verified.hash(), hash);
            assert_eq!(verified.to_bytes(), data);
        }
    }
});
