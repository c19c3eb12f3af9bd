//! PEM bundles (trust anchors, issuers) and certificate chains as peers
//! present them: parsed, then verified for a SPIFFE identity against a
//! real root, as the agents verify HBONE peers.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use sealmesh_common::identity::{Identity, TrustDomain};
use sealmesh_pki::{TrustAnchors, parse_pem_certs, test_support, verify::PeerVerifier};

fn verifier() -> &'static (PeerVerifier, Identity) {
    static VERIFIER: OnceLock<(PeerVerifier, Identity)> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let root = test_support::new_root();
        let trust_domain = TrustDomain::default();
        let verifier = PeerVerifier::from_pem(
            root.cert_pem.as_bytes(),
            &trust_domain,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .expect("a generated root is a trust anchor");
        let id = trust_domain.identity("shop", "web").expect("a valid identity");
        (verifier, id)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_pem_certs(data, "fuzz input");
    let _ = TrustAnchors::from_pem(data, "fuzz input");
    let (verifier, id) = verifier();
    // As a DER chain: the first half the leaf, the rest one intermediate.
    let (leaf, intermediate) = data.split_at(data.len() / 2);
    let chain = [
        CertificateDer::from(leaf.to_vec()),
        CertificateDer::from(intermediate.to_vec()),
    ];
    assert!(
        verifier.verify_identity_chain(&chain, id).is_err(),
        "random bytes never chain to a fresh root"
    );
    let _ = verifier.verify_identity_chain(&chain[..1], id);
});
