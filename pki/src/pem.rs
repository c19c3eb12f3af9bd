//! PEM text to DER certificates and signing keys (rustls-pki-types' PEM
//! reader; X.509 parsing is x509-parser's).

use rcgen::KeyPair;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use x509_parser::{
    certificate::X509Certificate,
    oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
    prelude::FromDer,
};
use yasna::models::ObjectIdentifier;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{what} holds no PEM CERTIFICATE block")]
    NoCertificates { what: String },
    #[error("{what} is not valid PEM: {reason}")]
    Pem { what: String, reason: String },
    #[error("{what}: certificate {index} is not valid X.509: {reason}")]
    Certificate {
        what: String,
        index: usize,
        reason: String,
    },
    #[error("{what} holds no usable private key: {reason}")]
    Key { what: String, reason: String },
}

/// Every CERTIFICATE block of a PEM text; other blocks are ignored. `what`
/// names the text in errors.
pub fn parse_pem_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Pem {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// Parses a DER certificate, number `index` of `what` (for errors).
pub fn parse_cert<'a>(
    der: &'a [u8],
    what: &str,
    index: usize,
) -> Result<X509Certificate<'a>, PemError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PemError::Certificate {
            what: what.to_owned(),
            index,
            reason: e.to_string(),
        })
}

/// Parses a PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, cert-manager's
/// default encoding) P-256 key.
pub fn parse_key(pem: &[u8], what: &str) -> Result<KeyPair, PemError> {
    let bad = |reason: String| PemError::Key {
        what: what.to_owned(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            bad("no PRIVATE KEY or EC PRIVATE KEY block".to_owned())
        }
        other => bad(other.to_string()),
    })?;
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(pkcs8) => pkcs8.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Sec1(sec1) => p256_sec1_to_pkcs8(sec1.secret_sec1_der()),
        _ => {
            return Err(bad(
                "RSA keys are not supported; use an ECDSA P-256 key (PKCS#8 or SEC1)".to_owned(),
            ));
        }
    };
    KeyPair::try_from(pkcs8).map_err(|e| bad(format!("{e} (expected an ECDSA P-256 key)")))
}

/// Wraps a SEC1 `ECPrivateKey` in a PKCS#8 `PrivateKeyInfo` for the P-256
/// curve (RFC 5915 §1 / RFC 5208): rcgen with ring reads only PKCS#8. The DER
/// is written with yasna, rcgen's own DER writer. A key on another curve
/// fails ring's check of the embedded parameters.
fn p256_sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    let oid = |oid: &x509_parser::der_parser::Oid<'_>| {
        ObjectIdentifier::from_slice(
            &oid.iter()
                .expect("the EC and P-256 OIDs have small arcs")
                .collect::<Vec<u64>>(),
        )
    };
    yasna::construct_der(|writer| {
        writer.write_sequence(|seq| {
            seq.next().write_u8(0);
            seq.next().write_sequence(|algorithm| {
                algorithm
                    .next()
                    .write_oid(&oid(&OID_KEY_TYPE_EC_PUBLIC_KEY));
                algorithm.next().write_oid(&oid(&OID_EC_P256));
            });
            seq.next().write_bytes(sec1);
        });
    })
}

#[cfg(test)]
mod tests {
    use rcgen::PKCS_ECDSA_P256_SHA256;

    use super::*;

    #[test]
    fn sec1_keys_from_cert_manager_are_read() {
        // `openssl ecparam -name prime256v1 -genkey -noout`: SEC1 with the
        // curve parameters and public key, as cert-manager writes tls.key.
        const SEC1: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEICDl667LCNnFyX3jmJTbU3sHIUtXXbZvvx61cKvrO9a6oAoGCCqGSM49
AwEHoUQDQgAEItVOSynH4F24Stl1CsjHGzS/jQ27epw4Wi7TP5KEu4SGj2K+1m7+
E4W3k3JfhXTixK8Eurm0mRdFQO5lVtmMow==
-----END EC PRIVATE KEY-----
";
        let key = parse_key(SEC1.as_bytes(), "test").unwrap();
        assert_eq!(key.algorithm(), &PKCS_ECDSA_P256_SHA256);
        assert_eq!(key.public_key_raw().len(), 65);
    }

    #[test]
    fn sec1_wrapping_is_the_pkcs8_a_generated_key_carries() {
        // A generated key's PKCS#8 holds its SEC1 key as the last OCTET
        // STRING; re-wrapping that SEC1 key gives the same PKCS#8 prefix.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = key.serialize_der();
        let wrapped = p256_sec1_to_pkcs8(b"sec1");
        // SEQUENCE { INTEGER 0, SEQUENCE { ecPublicKey, prime256v1 }, OCTET STRING }
        let header = [
            0x30, 0x1e, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d,
            0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x04,
        ];
        assert_eq!(wrapped, [&header[..], b"sec1"].concat());
        assert!(
            pkcs8.windows(22).any(|w| w == &header[2..24]),
            "same version and algorithm as ring's own PKCS#8"
        );
    }
}
