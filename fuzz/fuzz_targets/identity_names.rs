//! Identity names as callers send them (Certify's `identity`), as peers
//! present them (SPIFFE URIs, DNS SANs) and as the cluster file names them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sealmesh_common::identity::{TrustDomain, check_name, check_service_account_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let trust_domain = TrustDomain::default();
    for parsed in [
        trust_domain.parse(text),
        trust_domain.parse_spiffe_uri(text),
        trust_domain.parse_dns_name(text),
    ]
    .into_iter()
    .flatten()
    {
        // What parses is what the mesh formats: both forms lead back to it.
        assert_eq!(
            trust_domain.parse_spiffe_uri(&parsed.spiffe_uri()).ok(),
            Some(parsed.clone())
        );
        assert_eq!(
            trust_domain.parse_dns_name(&parsed.dns_name()).ok(),
            Some(parsed.clone())
        );
    }
    let _ = check_name(text);
    let _ = check_service_account_name(text);
    if let Some((domain, namespace)) = text.split_once('/') {
        let _ = TrustDomain::new(domain, namespace);
    }
});
