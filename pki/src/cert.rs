//! Facts about single certificates in the forms operators read them, and
//! the names an identity's certificates carry.

use rcgen::{CertificateParams, DistinguishedName, DnType, SanType};
use sealmesh_common::identity::Identity;
use sha2::{Digest as _, Sha256};
use x509_parser::{
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    x509::SubjectPublicKeyInfo,
};

/// A serial number's big-endian octets as lowercase hex, colon-separated
/// (`0a:1b:...`, as x509-parser and `openssl x509 -text` print it).
pub fn serial_hex(raw: &[u8]) -> String {
    colon_separated(&hex::encode(raw))
}

/// The SHA-256 fingerprint of a DER certificate as uppercase hex,
/// colon-separated (`AB:CD:...`, as `openssl x509 -fingerprint` prints it).
pub fn fingerprint(der: &[u8]) -> String {
    colon_separated(&hex::encode_upper(Sha256::digest(der)))
}

fn colon_separated(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| std::str::from_utf8(pair).expect("hex digits are ASCII"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether an SPKI holds an ECDSA P-256 key.
pub fn is_p256(spki: &SubjectPublicKeyInfo<'_>) -> bool {
    spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == OID_EC_P256)
}

/// Certificate (or CSR) parameters naming `identity` as Linkerd's identity
/// controller and proxies do: CN = its DNS name, SANs = its SPIFFE URI and
/// its DNS name.
pub fn identity_params(identity: &Identity) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.dns_name());
    params.subject_alt_names = vec![
        SanType::URI(identity.spiffe_uri().try_into()?),
        SanType::DnsName(identity.dns_name().try_into()?),
    ];
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_and_fingerprints_are_colon_separated_hex() {
        assert_eq!(serial_hex(&[0x0a, 0xff, 0x00]), "0a:ff:00");
        assert_eq!(serial_hex(&[]), "");
        let fp = fingerprint(b"certificate");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(fp.split(':').all(|octet| {
            octet.len() == 2
                && octet
                    .chars()
                    .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        }));
    }
}
