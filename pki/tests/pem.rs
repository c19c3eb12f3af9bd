//! PEM input as operators hand it over: certificates among other blocks, keys
//! in either encoding, and files that hold the wrong thing or broken base64.

use std::time::Duration;

use sealmesh_pki::{
    self as pki, CaMaterial, CaSpec, ChainError, GeneratedCa, Issuer, PemError, TrustAnchors,
};
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn root_and_issuer() -> (GeneratedCa, GeneratedCa) {
    let root = pki::generate_root(&CaSpec::valid_for("root.test", 30 * DAY)).unwrap();
    let (issuer, _) =
        pki::generate_issuer(&root.material(), &CaSpec::valid_for("issuer.test", DAY)).unwrap();
    (root, issuer)
}

fn anchors(root: &GeneratedCa) -> TrustAnchors {
    TrustAnchors::from_pem(root.cert_pem.as_bytes(), "test").unwrap()
}

fn issuer_with_key(issuer: &GeneratedCa, key_pem: &str) -> Result<Issuer, ChainError> {
    let material = CaMaterial {
        key_pem: key_pem.as_bytes().to_vec(),
        ..issuer.material()
    };
    // An issuer's `ca_pem` is the root above it.
    let anchors = TrustAnchors::from_pem(issuer.ca_pem.as_bytes(), "test").unwrap();
    Issuer::from_material(&material, &anchors, OffsetDateTime::now_utc())
}

#[test]
fn certificates_are_found_among_other_blocks_and_text() {
    let (root, issuer) = root_and_issuer();
    let bundle = format!(
        "root of the test mesh\n{}\n{}{}",
        root.cert_pem, issuer.key_pem, issuer.cert_pem
    );
    let certs = pki::parse_pem_certs(bundle.as_bytes(), "bundle").unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(anchors(&root).certificates()[0], certs[0]);
}

#[test]
fn a_file_without_certificates_says_so() {
    let (_, issuer) = root_and_issuer();
    let err = pki::parse_pem_certs(issuer.key_pem.as_bytes(), "ca.crt").unwrap_err();
    assert!(matches!(err, PemError::NoCertificates { .. }), "{err}");
    assert_eq!(err.to_string(), "ca.crt holds no PEM CERTIFICATE block");
}

#[test]
fn broken_base64_is_a_pem_error_naming_the_file() {
    let (root, _) = root_and_issuer();
    let broken = root.cert_pem.replacen("MII", "M*I", 1);
    let err = pki::parse_pem_certs(broken.as_bytes(), "ca.crt").unwrap_err();
    assert!(matches!(err, PemError::Pem { .. }), "{err}");
    assert!(
        err.to_string().starts_with("ca.crt is not valid PEM: "),
        "{err}"
    );
}

#[test]
fn the_generated_pkcs8_key_is_read() {
    let (_, issuer) = root_and_issuer();
    assert!(issuer.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let loaded = issuer_with_key(&issuer, &issuer.key_pem).unwrap();
    assert_eq!(loaded.info().subject, "CN=issuer.test");
}

#[test]
fn a_key_file_without_a_key_block_says_which_blocks_it_needs() {
    let (_, issuer) = root_and_issuer();
    let err = issuer_with_key(&issuer, &issuer.cert_pem).unwrap_err();
    assert!(
        matches!(err, ChainError::Pem(PemError::Key { .. })),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "generated CA key holds no usable private key: no PRIVATE KEY or EC PRIVATE KEY block"
    );
}

#[test]
fn a_key_with_broken_base64_is_refused() {
    let (_, issuer) = root_and_issuer();
    let broken = issuer.key_pem.replacen("MI", "M*", 1);
    let err = issuer_with_key(&issuer, &broken).unwrap_err();
    assert!(
        matches!(err, ChainError::Pem(PemError::Key { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("base64"), "{err}");
}
