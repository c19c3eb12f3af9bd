//! Leaf issuance: verifies a CSR and signs a short-lived certificate for one
//! identity. Nothing is copied from the CSR except its public key: the names,
//! lifetime and usages of the leaf are decided here.

use std::time::Duration;

use rcgen::{
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData,
    SanType, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use sealmesh_common::identity::Identity;
use time::OffsetDateTime;
use x509_parser::{
    certification_request::X509CertificationRequest,
    extensions::{GeneralName, ParsedExtension},
    oid_registry::{
        OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
    },
    prelude::FromDer,
    x509::SubjectPublicKeyInfo,
};

use sealmesh_pki::{self as pki, Issuer};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaError {
    #[error("certificate_signing_request is not a DER-encoded PKCS#10 CSR: {0}")]
    MalformedCsr(String),
    #[error(
        "the CSR's signature does not verify with the public key it carries; sign the CSR with its own key"
    )]
    BadCsrSignature,
    #[error(
        "the CSR's key is {found}; only ECDSA P-256 keys are accepted, generate the workload key on P-256"
    )]
    UnsupportedKey { found: String },
    #[error("the CSR names no identity; add a SAN with {uri} and/or {dns}")]
    NoIdentity { uri: String, dns: String },
    #[error(
        "the CSR asks for {found}, but the request is for {expected}; a CSR must carry only the SPIFFE URI and/or DNS name of the requested identity"
    )]
    ForeignName { found: String, expected: String },
    #[error(
        "the issuer chain expired at {chain_not_after}, so no certificate can be issued; rotate the issuer (sealmesh certs create-issuer)"
    )]
    IssuerExpired { chain_not_after: OffsetDateTime },
    #[error("signing the certificate failed: {0}")]
    Sign(String),
}

/// How leaves are shaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafPolicy {
    pub lifetime: Duration,
    pub clock_skew: Duration,
}

/// A CSR whose signature and names have been checked against one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCsr {
    /// Uncompressed P-256 point.
    public_key: Vec<u8>,
    /// The CSR's subject, for the debug log only (it is not copied to the leaf).
    pub subject: String,
}

impl PublicKeyData for VerifiedCsr {
    fn der_bytes(&self) -> &[u8] {
        &self.public_key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Checks that `der` is a PKCS#10 CSR with an ECDSA P-256 key, signed by that
/// key, whose SANs name `identity` (URI and/or DNS) and nothing else.
pub fn verify_csr(der: &[u8], identity: &Identity) -> Result<VerifiedCsr, CaError> {
    let csr = match X509CertificationRequest::from_der(der) {
        Ok(([], csr)) => csr,
        Ok((rest, _)) => {
            return Err(CaError::MalformedCsr(format!(
                "{} trailing bytes after the CSR",
                rest.len()
            )));
        }
        Err(e) => return Err(CaError::MalformedCsr(e.to_string())),
    };
    let info = &csr.certification_request_info;
    if !pki::is_p256(&info.subject_pki) {
        return Err(CaError::UnsupportedKey {
            found: key_description(&info.subject_pki),
        });
    }
    csr.verify_signature()
        .map_err(|_| CaError::BadCsrSignature)?;

    let uri = identity.spiffe_uri();
    let dns = identity.dns_name();
    let mut named = false;
    for extension in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = extension {
            for name in &san.general_names {
                let matches = match name {
                    GeneralName::URI(found) => *found == uri,
                    GeneralName::DNSName(found) => *found == dns,
                    _ => false,
                };
                if !matches {
                    return Err(CaError::ForeignName {
                        found: describe_name(name),
                        expected: identity.to_string(),
                    });
                }
                named = true;
            }
        }
    }
    if !named {
        return Err(CaError::NoIdentity { uri, dns });
    }
    Ok(VerifiedCsr {
        public_key: info.subject_pki.subject_public_key.data.to_vec(),
        subject: info.subject.to_string(),
    })
}

fn describe_name(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::URI(uri) => format!("URI SAN {uri}"),
        GeneralName::DNSName(dns) => format!("DNS SAN {dns}"),
        other => format!("SAN {other}"),
    }
}

fn key_description(spki: &SubjectPublicKeyInfo<'_>) -> String {
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        match spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
        {
            Some(curve) if curve == OID_NIST_EC_P384 => "ECDSA P-384".to_owned(),
            Some(curve) => format!("ECDSA on curve {curve}"),
            None => "ECDSA without a named curve".to_owned(),
        }
    } else if *algorithm == OID_SIG_ED25519 {
        "Ed25519".to_owned()
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        "RSA".to_owned()
    } else {
        format!("of algorithm {algorithm}")
    }
}

/// A signed leaf and the chain its owner presents after it.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub certificate: CertificateDer<'static>,
    pub chain: Vec<CertificateDer<'static>>,
    /// Hex, colon-separated.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Signs a leaf for `identity` with the CSR's key: NotBefore = now − skew,
/// NotAfter = now + lifetime + skew clamped to the issuer chain's expiry.
/// Usable for both ends of mTLS.
pub fn issue(
    issuer: &Issuer,
    csr: &VerifiedCsr,
    identity: &Identity,
    policy: &LeafPolicy,
    now: OffsetDateTime,
) -> Result<IssuedLeaf, CaError> {
    sign_leaf(
        issuer,
        csr,
        identity,
        &[],
        &[
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        policy,
        now,
    )
}

/// Signs the identity service's own serving certificate for `key`: the
/// names of `identity` plus `hostnames` (its Service's DNS names), shaped
/// like [`issue`]'s leaves but for TLS servers only.
pub fn issue_serving(
    issuer: &Issuer,
    key: &KeyPair,
    identity: &Identity,
    hostnames: &[String],
    policy: &LeafPolicy,
    now: OffsetDateTime,
) -> Result<IssuedLeaf, CaError> {
    sign_leaf(
        issuer,
        key,
        identity,
        hostnames,
        &[ExtendedKeyUsagePurpose::ServerAuth],
        policy,
        now,
    )
}

fn sign_leaf(
    issuer: &Issuer,
    public_key: &impl PublicKeyData,
    identity: &Identity,
    hostnames: &[String],
    usages: &[ExtendedKeyUsagePurpose],
    policy: &LeafPolicy,
    now: OffsetDateTime,
) -> Result<IssuedLeaf, CaError> {
    // X.509 times have whole seconds; keep what we report equal to what we sign.
    let now = now.replace_nanosecond(0).unwrap_or(now);
    let chain_not_after = issuer.chain_not_after();
    let not_after = (now + policy.lifetime + policy.clock_skew).min(chain_not_after);
    if not_after <= now {
        return Err(CaError::IssuerExpired { chain_not_after });
    }
    let not_before = now - policy.clock_skew;
    let serial = pki::random_serial();

    let mut params = pki::identity_params(identity).map_err(|e| CaError::Sign(e.to_string()))?;
    for hostname in hostnames {
        params
            .subject_alt_names
            .push(SanType::DnsName(ia5(hostname.clone())?));
    }
    params.not_before = not_before;
    params.not_after = not_after;
    params.serial_number = Some(serial.clone());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages.to_vec();
    params.use_authority_key_identifier_extension = true;

    let certificate = params
        .signed_by(public_key, issuer.signer())
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(IssuedLeaf {
        certificate: certificate.der().clone(),
        chain: issuer.chain().to_vec(),
        serial: pki::serial_hex(&serial.to_bytes()),
        not_before,
        not_after,
    })
}

fn ia5(name: String) -> Result<rcgen::string::Ia5String, CaError> {
    name.try_into()
        .map_err(|e: rcgen::Error| CaError::Sign(e.to_string()))
}

#[cfg(test)]
mod tests {
    use rcgen::{PKCS_ECDSA_P384_SHA384, PKCS_ED25519};
    use sealmesh_common::identity::TrustDomain;
    use x509_parser::prelude::X509Certificate;

    use sealmesh_pki::{
        CaSpec, TrustAnchors, generate_issuer, generate_root,
        test_support::{csr_with, names_of, san_strings},
    };

    use super::*;

    fn identity() -> Identity {
        TrustDomain::default().identity("emojivoto", "web").unwrap()
    }

    fn csr(alg: &'static SignatureAlgorithm, sans: &[SanType]) -> Vec<u8> {
        csr_with(alg, sans.to_vec())
    }

    fn both_names() -> Vec<SanType> {
        names_of(&identity())
    }

    #[test]
    fn accepts_either_or_both_identity_names() {
        let names = both_names();
        for sans in [&names[..], &names[..1], &names[1..]] {
            let verified = verify_csr(&csr(&PKCS_ECDSA_P256_SHA256, sans), &identity()).unwrap();
            assert_eq!(verified.subject, "CN=rcgen self signed cert");
            assert_eq!(verified.public_key.len(), 65);
        }
    }

    #[test]
    fn rejects_other_keys_names_and_bytes() {
        let id = identity();
        let err = |der: &[u8]| verify_csr(der, &id).unwrap_err();
        assert_eq!(
            err(&csr(&PKCS_ECDSA_P384_SHA384, &both_names())),
            CaError::UnsupportedKey {
                found: "ECDSA P-384".into()
            }
        );
        assert_eq!(
            err(&csr(&PKCS_ED25519, &both_names())),
            CaError::UnsupportedKey {
                found: "Ed25519".into()
            }
        );
        let mut extra = both_names();
        extra.push(SanType::DnsName("evil.example.com".try_into().unwrap()));
        assert_eq!(
            err(&csr(&PKCS_ECDSA_P256_SHA256, &extra)),
            CaError::ForeignName {
                found: "DNS SAN evil.example.com".into(),
                expected: id.to_string()
            }
        );
        assert!(matches!(
            err(&csr(&PKCS_ECDSA_P256_SHA256, &[])),
            CaError::NoIdentity { .. }
        ));
        let mut tampered = csr(&PKCS_ECDSA_P256_SHA256, &both_names());
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        assert_eq!(err(&tampered), CaError::BadCsrSignature);
        assert!(matches!(err(b"not a csr"), CaError::MalformedCsr(_)));
    }

    #[test]
    fn leaf_has_exact_names_usages_and_clamped_lifetime() {
        let root =
            generate_root(&CaSpec::valid_for("root", Duration::from_secs(86_400 * 10))).unwrap();
        let (issuer_ca, _) = generate_issuer(
            &root.material(),
            &CaSpec::valid_for("issuer", Duration::from_secs(3600)),
        )
        .unwrap();
        let anchors = TrustAnchors::from_pem(root.cert_pem.as_bytes(), "test").unwrap();
        let now = OffsetDateTime::now_utc();
        let issuer = Issuer::from_material(&issuer_ca.material(), &anchors, now).unwrap();
        let verified =
            verify_csr(&csr(&PKCS_ECDSA_P256_SHA256, &both_names()), &identity()).unwrap();
        let policy = LeafPolicy {
            lifetime: Duration::from_secs(86_400),
            clock_skew: Duration::from_secs(20),
        };
        let leaf = issue(&issuer, &verified, &identity(), &policy, now).unwrap();
        let whole_second = now.replace_nanosecond(0).unwrap();
        assert_eq!(leaf.not_before, whole_second - Duration::from_secs(20));
        assert_eq!(leaf.not_after, issuer.chain_not_after());

        let (_, cert) = X509Certificate::from_der(&leaf.certificate).unwrap();
        assert_eq!(cert.raw_serial_as_string(), leaf.serial);
        assert_eq!(
            san_strings(&leaf.certificate),
            [
                "URI(spiffe://cluster.local/ns/emojivoto/sa/web)",
                "DNSName(web.emojivoto.serviceaccount.identity.sealmesh.cluster.local)"
            ]
        );
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());

        let after_expiry = issuer.chain_not_after() + Duration::from_secs(1);
        assert_eq!(
            issue(&issuer, &verified, &identity(), &policy, after_expiry).unwrap_err(),
            CaError::IssuerExpired {
                chain_not_after: issuer.chain_not_after()
            }
        );
    }
}
