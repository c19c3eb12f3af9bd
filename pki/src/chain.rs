//! Trust anchors and issuers: a bundle of roots, and the validation of an
//! issuer (intermediate CA) against it. An issuer must be a CA, be valid
//! now, hold the key matching its certificate, and chain to one of the trust
//! anchors; otherwise it is refused with a message naming what to fix.

use std::{fmt, path::Path};

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use crate::{
    PkiError,
    cert::serial_hex,
    files::{CaMaterial, read},
    pem::{PemError, parse_cert, parse_pem_certs},
};

/// Longest CA chain (issuer plus intermediates) accepted below an anchor.
const MAX_CHAIN_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error(
        "the private key does not match certificate {subject:?}; put the key that belongs to the certificate next to it"
    )]
    KeyMismatch { subject: String },
    #[error(
        "certificate {subject:?} is not a CA (basicConstraints CA:TRUE with keyCertSign); use a CA certificate as the {role}"
    )]
    NotCa { subject: String, role: &'static str },
    #[error("certificate {subject:?} expired at {not_after}; issue a new one")]
    Expired {
        subject: String,
        not_after: OffsetDateTime,
    },
    #[error("certificate {subject:?} is not valid before {not_before}; check the clock")]
    NotYetValid {
        subject: String,
        not_before: OffsetDateTime,
    },
    #[error(
        "issuer {subject:?} does not chain to any trust anchor: no anchor or intermediate named {issuer:?} signed it; \
         sign the issuer with a root from the trust-anchor bundle or add that root to the bundle"
    )]
    NoChainToAnchor { subject: String, issuer: String },
    #[error("the CA chain of {subject:?} is longer than {MAX_CHAIN_DEPTH} certificates")]
    ChainTooLong { subject: String },
    #[error("cannot load the issuer's signing key: {0}")]
    Signer(#[from] rcgen::Error),
}

/// Facts about a certificate that operators see in logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    /// Lowercase hex, colon-separated ([`serial_hex`]).
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    pub(crate) fn of(cert: &X509Certificate<'_>) -> Self {
        Self {
            subject: cert.subject().to_string(),
            serial: serial_hex(cert.raw_serial()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        }
    }

    pub(crate) fn check_valid_at(&self, now: OffsetDateTime) -> Result<(), ChainError> {
        if now < self.not_before {
            return Err(ChainError::NotYetValid {
                subject: self.subject.clone(),
                not_before: self.not_before,
            });
        }
        if now >= self.not_after {
            return Err(ChainError::Expired {
                subject: self.subject.clone(),
                not_after: self.not_after,
            });
        }
        Ok(())
    }
}

/// The roots leaves and issuers must chain to.
#[derive(Clone, Debug)]
pub struct TrustAnchors {
    certificates: Vec<CertificateDer<'static>>,
    infos: Vec<CertInfo>,
}

impl TrustAnchors {
    /// Reads and parses a bundle file.
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        Ok(Self::from_pem(&read(path)?, &path.display().to_string())?)
    }

    /// Parses a bundle; every certificate in it must be a CA.
    pub fn from_pem(pem: &[u8], source: &str) -> Result<Self, ChainError> {
        let what = format!("trust anchors {source}");
        let certificates = parse_pem_certs(pem, &what)?;
        let infos = certificates
            .iter()
            .enumerate()
            .map(|(index, der)| {
                let cert = parse_cert(der, &what, index)?;
                check_ca(&cert, "trust anchor")?;
                Ok(CertInfo::of(&cert))
            })
            .collect::<Result<_, ChainError>>()?;
        Ok(Self {
            certificates,
            infos,
        })
    }

    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    pub fn infos(&self) -> &[CertInfo] {
        &self.infos
    }
}

/// A validated issuer, ready to sign leaves.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    chain: Vec<CertificateDer<'static>>,
    info: CertInfo,
    chain_not_after: OffsetDateTime,
    anchor_subject: String,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("info", &self.info)
            .field("chain_len", &self.chain.len())
            .field("chain_not_after", &self.chain_not_after)
            .field("anchor_subject", &self.anchor_subject)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// Validates CA material against the anchors at `now`.
    pub fn from_material(
        material: &CaMaterial,
        anchors: &TrustAnchors,
        now: OffsetDateTime,
    ) -> Result<Self, ChainError> {
        let CheckedCa {
            ders, key, info, ..
        } = CheckedCa::of(material, "issuer", now)?;
        let parsed = ders
            .iter()
            .enumerate()
            .map(|(index, der)| parse_cert(der, &material.source, index))
            .collect::<Result<Vec<_>, _>>()?;

        let anchor_certs = anchors
            .certificates
            .iter()
            .enumerate()
            .map(|(index, der)| parse_cert(der, "trust anchors", index))
            .collect::<Result<Vec<_>, _>>()?;

        let mut chain = vec![ders[0].clone()];
        let mut chain_not_after = info.not_after;
        let mut current = 0;
        for _ in 0..MAX_CHAIN_DEPTH {
            let cert = &parsed[current];
            if let Some(anchor) = anchor_certs.iter().find(|a| signed_by(cert, a)) {
                let anchor_info = CertInfo::of(anchor);
                anchor_info.check_valid_at(now)?;
                chain_not_after = chain_not_after.min(anchor_info.not_after);
                return Ok(Self {
                    signer: rcgen::Issuer::from_ca_cert_der(&ders[0], key)?,
                    chain,
                    info,
                    chain_not_after,
                    anchor_subject: anchor_info.subject,
                });
            }
            let parent = (0..parsed.len())
                .find(|&i| i != current && signed_by(cert, &parsed[i]))
                .ok_or_else(|| ChainError::NoChainToAnchor {
                    subject: cert.subject().to_string(),
                    issuer: cert.issuer().to_string(),
                })?;
            check_ca(&parsed[parent], "intermediate")?;
            let parent_info = CertInfo::of(&parsed[parent]);
            parent_info.check_valid_at(now)?;
            chain_not_after = chain_not_after.min(parent_info.not_after);
            chain.push(ders[parent].clone());
            current = parent;
        }
        Err(ChainError::ChainTooLong {
            subject: info.subject,
        })
    }

    pub fn signer(&self) -> &rcgen::Issuer<'static, KeyPair> {
        &self.signer
    }

    /// The issuer certificate first, then intermediates up to (not including)
    /// the anchor: what a leaf's owner presents after its leaf.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// Earliest NotAfter over the issuer, its intermediates and its anchor:
    /// no leaf may outlive it.
    pub fn chain_not_after(&self) -> OffsetDateTime {
        self.chain_not_after
    }

    pub fn anchor_subject(&self) -> &str {
        &self.anchor_subject
    }
}

/// The first certificate of some CA material, checked to be a CA valid at
/// `now` whose key is the material's.
pub(crate) struct CheckedCa {
    /// Every certificate of the material, the CA first.
    pub ders: Vec<CertificateDer<'static>>,
    pub key: KeyPair,
    pub info: CertInfo,
    /// The PEM text of the CA's certificate file.
    pub cert_pem: String,
}

impl CheckedCa {
    pub(crate) fn of(
        material: &CaMaterial,
        role: &'static str,
        now: OffsetDateTime,
    ) -> Result<Self, ChainError> {
        let ders = material.certificates()?;
        let cert = parse_cert(&ders[0], &material.source, 0)?;
        check_ca(&cert, role)?;
        let info = CertInfo::of(&cert);
        info.check_valid_at(now)?;
        let key = material.key_pair()?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(ChainError::KeyMismatch {
                subject: info.subject,
            });
        }
        Ok(Self {
            cert_pem: String::from_utf8_lossy(&material.cert_pem).into_owned(),
            ders,
            key,
            info,
        })
    }
}

fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

pub(crate) fn check_ca(cert: &X509Certificate<'_>, role: &'static str) -> Result<(), ChainError> {
    let may_sign = cert
        .key_usage()
        .ok()
        .flatten()
        .is_none_or(|ku| ku.value.key_cert_sign());
    if cert.is_ca() && may_sign {
        Ok(())
    } else {
        Err(ChainError::NotCa {
            subject: cert.subject().to_string(),
            role,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{CertificateParams, PKCS_ECDSA_P256_SHA256};

    use super::*;
    use crate::generate::{CaSpec, GeneratedCa, generate_issuer, generate_root};

    const DAY: Duration = Duration::from_secs(86_400);

    fn root_and_issuer() -> (GeneratedCa, GeneratedCa) {
        let root = generate_root(&CaSpec::valid_for("root.test", 10 * DAY)).unwrap();
        let (issuer, clamped) =
            generate_issuer(&root.material(), &CaSpec::valid_for("issuer.test", DAY)).unwrap();
        assert!(!clamped);
        (root, issuer)
    }

    fn anchors(root: &GeneratedCa) -> TrustAnchors {
        TrustAnchors::from_pem(root.cert_pem.as_bytes(), "test").unwrap()
    }

    #[test]
    fn generated_issuer_chains_to_its_root() {
        let (root, issuer) = root_and_issuer();
        let loaded = Issuer::from_material(
            &issuer.material(),
            &anchors(&root),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        assert_eq!(loaded.info().subject, "CN=issuer.test");
        assert_eq!(loaded.anchor_subject(), "CN=root.test");
        assert_eq!(loaded.chain().len(), 1);
        assert_eq!(loaded.chain_not_after(), loaded.info().not_after);
    }

    #[test]
    fn issuer_outliving_root_is_clamped() {
        let root = generate_root(&CaSpec::valid_for("root.test", DAY)).unwrap();
        let (issuer, clamped) = generate_issuer(
            &root.material(),
            &CaSpec::valid_for("issuer.test", 10 * DAY),
        )
        .unwrap();
        assert!(clamped);
        let loaded = Issuer::from_material(
            &issuer.material(),
            &anchors(&root),
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let root_info = anchors(&root).infos()[0].clone();
        assert_eq!(loaded.info().not_after, root_info.not_after);
    }

    #[test]
    fn issuer_of_another_root_is_refused() {
        let (_, issuer) = root_and_issuer();
        let (other_root, _) = root_and_issuer();
        let err = Issuer::from_material(
            &issuer.material(),
            &anchors(&other_root),
            OffsetDateTime::now_utc(),
        )
        .unwrap_err();
        assert!(
            matches!(&err, ChainError::NoChainToAnchor { subject, issuer } if subject == "CN=issuer.test" && issuer == "CN=root.test"),
            "{err}"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let (root, issuer) = root_and_issuer();
        let (_, other) = root_and_issuer();
        let mut material = issuer.material();
        material.key_pem = other.key_pem.into_bytes();
        let err = Issuer::from_material(&material, &anchors(&root), OffsetDateTime::now_utc())
            .unwrap_err();
        assert!(matches!(err, ChainError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn leaf_like_certificate_is_not_an_issuer() {
        let root = generate_root(&CaSpec::valid_for("root.test", DAY)).unwrap();
        let signer = rcgen::Issuer::from_ca_cert_pem(
            &root.cert_pem,
            KeyPair::from_pem(&root.key_pem).unwrap(),
        )
        .unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["leaf.test".to_owned()])
            .unwrap()
            .signed_by(&key, &signer)
            .unwrap();
        let material = CaMaterial {
            source: "test".into(),
            cert_pem: leaf.pem().into_bytes(),
            key_pem: key.serialize_pem().into_bytes(),
            ca_pem: None,
        };
        let err = Issuer::from_material(&material, &anchors(&root), OffsetDateTime::now_utc())
            .unwrap_err();
        assert!(
            matches!(err, ChainError::NotCa { role: "issuer", .. }),
            "{err}"
        );
    }

    #[test]
    fn expiry_is_checked_against_the_given_time() {
        let (root, issuer) = root_and_issuer();
        let later = OffsetDateTime::now_utc() + 2 * DAY;
        let err = Issuer::from_material(&issuer.material(), &anchors(&root), later).unwrap_err();
        assert!(matches!(err, ChainError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("issue a new one"));
    }
}
