//! Creating CAs: self-signed roots (trust anchors) and the issuers
//! (intermediate CAs) the identity service signs leaves with, all ECDSA
//! P-256 with random serials.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use time::OffsetDateTime;

use crate::{
    chain::{ChainError, CheckedCa},
    files::{CaFile, CaMaterial, FileError, Layout, write_ca_files},
};

/// Default common name of a root made by `sealmesh certs create-root`.
pub const DEFAULT_ROOT_COMMON_NAME: &str = "root.sealmesh.cluster.local";
/// Default common name of an issuer made by `sealmesh certs create-issuer`.
pub const DEFAULT_ISSUER_COMMON_NAME: &str = "identity.sealmesh.cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot generate certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the root cannot sign an issuer: {0}")]
    Root(#[from] ChainError),
}

/// A random positive 128-bit serial (RFC 5280 allows up to 20 octets): the
/// top bit is cleared so the DER INTEGER is positive, and the next one set so
/// it is never shortened, leaving 126 random bits (CA/B asks for 64).
pub fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Validity and name of a CA to generate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaSpec {
    pub common_name: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CaSpec {
    /// Valid from now for `validity`.
    pub fn valid_for(common_name: &str, validity: Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name: common_name.to_owned(),
            not_before: now,
            not_after: now + validity,
        }
    }
}

/// A generated CA: PEM certificate and key, and the CA above it (itself for a
/// root) for the tls layout's `ca.crt`.
#[derive(Clone)]
pub struct GeneratedCa {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl fmt::Debug for GeneratedCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedCa")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl GeneratedCa {
    /// The same CA as material, as [`CaMaterial::read_dir`] would return it
    /// after [`GeneratedCa::write_dir`] in the pem layout.
    pub fn material(&self) -> CaMaterial {
        CaMaterial {
            source: "generated CA".to_owned(),
            cert_pem: self.cert_pem.clone().into_bytes(),
            key_pem: self.key_pem.clone().into_bytes(),
            ca_pem: None,
        }
    }

    /// Writes the CA to `dir` in `layout`; key files get mode 0600. Refuses
    /// to replace existing files unless `force`. Returns the files written.
    pub fn write_dir(
        &self,
        dir: &Path,
        layout: Layout,
        force: bool,
    ) -> Result<Vec<PathBuf>, FileError> {
        let mut files = vec![
            CaFile {
                name: layout.cert_file(),
                content: &self.cert_pem,
                secret: false,
            },
            CaFile {
                name: layout.key_file(),
                content: &self.key_pem,
                secret: true,
            },
        ];
        if let Some(name) = layout.ca_file() {
            files.push(CaFile {
                name,
                content: &self.ca_pem,
                secret: false,
            });
        }
        write_ca_files(dir, &files, force)
    }
}

fn ca_params(spec: &CaSpec, path_len: BasicConstraints) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, spec.common_name.as_str());
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(path_len);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

/// A self-signed ECDSA P-256 root (trust anchor).
pub fn generate_root(spec: &CaSpec) -> Result<GeneratedCa, GenerateError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = ca_params(spec, BasicConstraints::Unconstrained);
    // A self-signed certificate has no authority to identify.
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key)?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: cert.pem(),
    })
}

/// An ECDSA P-256 issuer (intermediate CA that may sign only leaves), signed
/// by `root`. Its NotAfter is clamped to the root's: a CA cannot usefully
/// outlive the CA above it. Returns the issuer and whether it was clamped.
pub fn generate_issuer(
    root_material: &CaMaterial,
    spec: &CaSpec,
) -> Result<(GeneratedCa, bool), GenerateError> {
    let root = CheckedCa::of(root_material, "root", OffsetDateTime::now_utc())?;
    let root_info = root.info;
    let signer = rcgen::Issuer::from_ca_cert_der(&root.ders[0], root.key)?;

    let mut params = ca_params(spec, BasicConstraints::Constrained(0));
    let clamped = params.not_after > root_info.not_after;
    params.not_after = params.not_after.min(root_info.not_after);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &signer)?;
    Ok((
        GeneratedCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: root.cert_pem,
        },
        clamped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn serials_are_positive_16_octets_and_distinct() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
        assert_ne!(a, b);
    }

    #[test]
    fn writes_both_layouts_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let root = generate_root(&CaSpec::valid_for("root.test", DAY)).unwrap();
        let written = root.write_dir(dir.path(), Layout::Tls, false).unwrap();
        assert_eq!(
            written,
            ["tls.crt", "tls.key", "ca.crt"].map(|f| dir.path().join(f))
        );
        let err = root.write_dir(dir.path(), Layout::Tls, false).unwrap_err();
        assert!(matches!(err, FileError::AlreadyExists { .. }));
        root.write_dir(dir.path(), Layout::Tls, true).unwrap();
        let read = CaMaterial::read_dir(dir.path()).unwrap();
        assert_eq!(read.cert_pem, root.cert_pem.as_bytes());
        assert_eq!(read.ca_pem.as_deref(), Some(root.cert_pem.as_bytes()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn debug_output_never_shows_a_key() {
        let root = generate_root(&CaSpec::valid_for("root.test", DAY)).unwrap();
        let secret = root.key_pem.lines().nth(1).unwrap();
        for shown in [format!("{root:?}"), format!("{:?}", root.material())] {
            assert!(shown.contains("<redacted>"), "{shown}");
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
