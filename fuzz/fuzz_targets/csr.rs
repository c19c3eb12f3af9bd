//! Certificate signing requests as callers send them to the identity
//! service: parsed, signature checked, SANs compared with the identity.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealmesh_common::identity::TrustDomain;
use sealmesh_identity::ca::verify_csr;

fuzz_target!(|data: &[u8]| {
    let id = TrustDomain::default()
        .identity("shop", "web")
        .expect("a valid identity");
    let _ = verify_csr(data, &id);
});
