//! Fixtures for tests of the crates that use this one: generated roots and
//! issuers, CSRs for identities, certificates' SANs as text, and a chain
//! check with plain webpki (no sealmesh code), as a mesh peer applies it.
//! Everything panics on failure, as test set-up should.

use std::time::Duration;

use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
    SignatureAlgorithm,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use sealmesh_common::identity::Identity;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{CaSpec, GeneratedCa, generate_issuer, generate_root};

pub const DAY: Duration = Duration::from_secs(86_400);

/// A root named `root.test`, valid for a year.
pub fn new_root() -> GeneratedCa {
    new_root_named("root.test")
}

/// A root named `common_name`, valid for a year.
pub fn new_root_named(common_name: &str) -> GeneratedCa {
    generate_root(&CaSpec::valid_for(common_name, 365 * DAY)).unwrap()
}

/// An issuer signed by `root`, valid from now for `validity` (at most as
/// long as the root).
pub fn new_issuer(root: &GeneratedCa, common_name: &str, validity: Duration) -> GeneratedCa {
    generate_issuer(&root.material(), &CaSpec::valid_for(common_name, validity))
        .unwrap()
        .0
}

/// A workload leaf for `spiffe_uri` signed by `issuer`, with the usages the
/// identity service gives (serverAuth and clientAuth).
pub fn workload_leaf(issuer: &GeneratedCa, spiffe_uri: &str) -> CertificateDer<'static> {
    let issuer_key = KeyPair::from_pem(&issuer.key_pem).unwrap();
    let signer = rcgen::Issuer::from_ca_cert_pem(&issuer.cert_pem, issuer_key).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.subject_alt_names = vec![SanType::URI(spiffe_uri.try_into().unwrap())];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    params.signed_by(&key, &signer).unwrap().der().clone()
}

/// Every certificate of a PEM text.
pub fn pem_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The subject alternative names of a DER certificate as x509-parser shows
/// them: `URI(spiffe://...)`, `DNSName(...)`.
pub fn san_strings(der: &[u8]) -> Vec<String> {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// A PKCS#10 CSR (DER) for `sans`, with a new key of `alg`.
pub fn csr_with(alg: &'static SignatureAlgorithm, sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// Both names of `identity` as SANs: its SPIFFE URI and its DNS name.
pub fn names_of(identity: &Identity) -> Vec<SanType> {
    vec![
        SanType::URI(identity.spiffe_uri().try_into().unwrap()),
        SanType::DnsName(identity.dns_name().try_into().unwrap()),
    ]
}

/// A P-256 CSR for both names of `identity`.
pub fn csr_for(identity: &Identity) -> Vec<u8> {
    csr_with(&PKCS_ECDSA_P256_SHA256, names_of(identity))
}

/// Verifies `leaf` + `chain` against `anchors` as an mTLS peer would (both
/// usages, and the identity's DNS name).
pub fn verify_chain(
    leaf: &[u8],
    chain: &[Vec<u8>],
    anchors: &[CertificateDer<'static>],
    identity: &Identity,
) -> Result<(), webpki::Error> {
    let anchors: Vec<_> = anchors
        .iter()
        .map(|a| webpki::anchor_from_trusted_cert(a).unwrap().to_owned())
        .collect();
    let intermediates: Vec<CertificateDer<'_>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf = CertificateDer::from(leaf);
    let end_entity = webpki::EndEntityCert::try_from(&leaf)?;
    let now = UnixTime::now();
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        end_entity.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            usage,
            None,
            None,
        )?;
    }
    end_entity.verify_is_valid_for_subject_name(&ServerName::try_from(identity.dns_name()).unwrap())
}
