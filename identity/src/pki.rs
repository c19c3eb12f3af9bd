//! Trust anchors and issuers: loading, validation and generation.
//!
//! An issuer directory holds an intermediate CA in one of two layouts:
//! `crt.pem` + `key.pem` (Linkerd/step), or cert-manager's `kubernetes.io/tls`
//! Secret keys `tls.crt` + `tls.key` (+ `ca.crt`). Either way the issuer must
//! be a CA, be valid now, hold the key matching its certificate, and chain to
//! one of the trust anchors; otherwise it is refused with a message naming
//! what to fix.

use std::{
    fmt,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use x509_parser::{
    certificate::X509Certificate, oid_registry::OID_EC_P256, prelude::FromDer,
    x509::SubjectPublicKeyInfo,
};

pub const PEM_CERT_FILE: &str = "crt.pem";
pub const PEM_KEY_FILE: &str = "key.pem";
pub const TLS_CERT_FILE: &str = "tls.crt";
pub const TLS_KEY_FILE: &str = "tls.key";
pub const TLS_CA_FILE: &str = "ca.crt";

/// Default common name of a root made by `sealmesh certs create-root`.
pub const DEFAULT_ROOT_COMMON_NAME: &str = "root.sealmesh.cluster.local";
/// Default common name of an issuer made by `sealmesh certs create-issuer`.
pub const DEFAULT_ISSUER_COMMON_NAME: &str = "identity.sealmesh.cluster.local";

/// Longest CA chain (issuer plus intermediates) accepted below an anchor.
const MAX_CHAIN_DEPTH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} already exists; pass --force to overwrite it")]
    AlreadyExists { path: PathBuf },
    #[error(
        "{dir} holds no CA: expected {PEM_CERT_FILE} + {PEM_KEY_FILE}, or {TLS_CERT_FILE} + {TLS_KEY_FILE} (+ {TLS_CA_FILE})"
    )]
    NoCaFiles { dir: PathBuf },
    #[error(
        "{dir} holds both layouts ({PEM_CERT_FILE} and {TLS_CERT_FILE}); remove one so it is clear which CA to use"
    )]
    AmbiguousLayout { dir: PathBuf },
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
    #[error("cannot generate certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Directory layout of a CA (root or issuer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// `crt.pem` + `key.pem`
    Pem,
    /// `tls.crt` + `tls.key` + `ca.crt` (cert-manager's kubernetes.io/tls Secret)
    Tls,
}

impl Layout {
    pub fn cert_file(self) -> &'static str {
        match self {
            Self::Pem => PEM_CERT_FILE,
            Self::Tls => TLS_CERT_FILE,
        }
    }

    pub fn key_file(self) -> &'static str {
        match self {
            Self::Pem => PEM_KEY_FILE,
            Self::Tls => TLS_KEY_FILE,
        }
    }

    pub fn ca_file(self) -> Option<&'static str> {
        match self {
            Self::Pem => None,
            Self::Tls => Some(TLS_CA_FILE),
        }
    }

    /// Which layout `dir` uses.
    pub fn detect(dir: &Path) -> Result<Self, PkiError> {
        let pem = dir.join(PEM_CERT_FILE).exists();
        let tls = dir.join(TLS_CERT_FILE).exists();
        match (pem, tls) {
            (true, true) => Err(PkiError::AmbiguousLayout {
                dir: dir.to_owned(),
            }),
            (true, false) => Ok(Self::Pem),
            (false, true) => Ok(Self::Tls),
            (false, false) => Err(PkiError::NoCaFiles {
                dir: dir.to_owned(),
            }),
        }
    }
}

/// The raw PEM files of a CA as read from a directory (or, later, a Secret).
#[derive(Clone, PartialEq, Eq)]
pub struct CaMaterial {
    /// Where it came from, for messages.
    pub source: String,
    /// The CA certificate first, then any intermediates above it.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// `ca.crt` of the tls layout: the CA(s) above this one.
    pub ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaMaterial")
            .field("source", &self.source)
            .field("cert_pem_bytes", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

impl CaMaterial {
    /// Reads a CA directory in either layout (symlinks such as kubelet's
    /// `..data` are followed).
    pub fn read_dir(dir: &Path) -> Result<Self, PkiError> {
        let layout = Layout::detect(dir)?;
        let ca_pem = match layout.ca_file() {
            Some(name) if dir.join(name).exists() => Some(read(&dir.join(name))?),
            _ => None,
        };
        Ok(Self {
            source: dir.display().to_string(),
            cert_pem: read(&dir.join(layout.cert_file()))?,
            key_pem: read(&dir.join(layout.key_file()))?,
            ca_pem,
        })
    }

    /// SHA-256 over every file, to notice any change.
    pub fn content_hash(&self) -> [u8; 32] {
        let mut hash = Sha256::new();
        for part in [
            Some(&self.cert_pem),
            Some(&self.key_pem),
            self.ca_pem.as_ref(),
        ] {
            let part = part.map_or(&[][..], Vec::as_slice);
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part);
        }
        hash.finalize().into()
    }

    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        let mut certs = parse_pem_certs(&self.cert_pem, &format!("{} certificate", self.source))?;
        if let Some(ca_pem) = &self.ca_pem {
            certs.extend(parse_pem_certs(
                ca_pem,
                &format!("{} {TLS_CA_FILE}", self.source),
            )?);
        }
        Ok(certs)
    }

    fn key_pair(&self) -> Result<KeyPair, PkiError> {
        parse_key(&self.key_pem, &format!("{} key", self.source))
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Facts about a certificate that operators see in logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    /// Hex, colon-separated (as `openssl x509 -serial` groups it).
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    fn of(cert: &X509Certificate<'_>) -> Self {
        Self {
            subject: cert.subject().to_string(),
            serial: cert.raw_serial_as_string(),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        }
    }

    fn check_valid_at(&self, now: OffsetDateTime) -> Result<(), PkiError> {
        if now < self.not_before {
            return Err(PkiError::NotYetValid {
                subject: self.subject.clone(),
                not_before: self.not_before,
            });
        }
        if now >= self.not_after {
            return Err(PkiError::Expired {
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
    pub fn load(path: &Path) -> Result<Self, PkiError> {
        Self::from_pem(&read(path)?, &path.display().to_string())
    }

    /// Parses a bundle; every certificate in it must be a CA.
    pub fn from_pem(pem: &[u8], source: &str) -> Result<Self, PkiError> {
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
            .collect::<Result<_, PkiError>>()?;
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
    ) -> Result<Self, PkiError> {
        let ders = material.certificates()?;
        let parsed = ders
            .iter()
            .enumerate()
            .map(|(index, der)| parse_cert(der, &material.source, index))
            .collect::<Result<Vec<_>, _>>()?;
        let issuer = &parsed[0];
        let info = CertInfo::of(issuer);
        check_ca(issuer, "issuer")?;
        info.check_valid_at(now)?;

        let key = material.key_pair()?;
        if key.public_key_raw() != issuer.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch {
                subject: info.subject,
            });
        }

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
                .ok_or_else(|| PkiError::NoChainToAnchor {
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
        Err(PkiError::ChainTooLong {
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

fn signed_by(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

fn check_ca(cert: &X509Certificate<'_>, role: &'static str) -> Result<(), PkiError> {
    let may_sign = cert
        .key_usage()
        .ok()
        .flatten()
        .is_none_or(|ku| ku.value.key_cert_sign());
    if cert.is_ca() && may_sign {
        Ok(())
    } else {
        Err(PkiError::NotCa {
            subject: cert.subject().to_string(),
            role,
        })
    }
}

fn parse_cert<'a>(
    der: &'a CertificateDer<'_>,
    what: &str,
    index: usize,
) -> Result<X509Certificate<'a>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::Certificate {
            what: what.to_owned(),
            index,
            reason: e.to_string(),
        })
}

/// Every CERTIFICATE block of a PEM text; other blocks are ignored.
pub fn parse_pem_certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificates {
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// Parses a PKCS#8 (`PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`, cert-manager's
/// default encoding) P-256 key.
fn parse_key(pem: &[u8], what: &str) -> Result<KeyPair, PkiError> {
    let bad = |reason: String| PkiError::Key {
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
/// curve (RFC 5915 §1 / RFC 5208): ring only reads PKCS#8. A key on another
/// curve fails ring's check of the embedded parameters.
fn p256_sec1_to_pkcs8(sec1: &[u8]) -> Vec<u8> {
    const TAG_INTEGER: u8 = 0x02;
    const TAG_OCTET_STRING: u8 = 0x04;
    const TAG_OID: u8 = 0x06;
    const TAG_SEQUENCE: u8 = 0x30;
    let ec_public_key_oid = der_tlv(
        TAG_OID,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY.as_bytes(),
    );
    let p256_oid = der_tlv(TAG_OID, OID_EC_P256.as_bytes());
    let algorithm = der_tlv(TAG_SEQUENCE, &[ec_public_key_oid, p256_oid].concat());
    let version = der_tlv(TAG_INTEGER, &[0]);
    der_tlv(
        TAG_SEQUENCE,
        &[version, algorithm, der_tlv(TAG_OCTET_STRING, sec1)].concat(),
    )
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let significant = &bytes[bytes
            .iter()
            .position(|&b| b != 0)
            .unwrap_or(bytes.len() - 1)..];
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
    out
}

/// Whether an SPKI holds an ECDSA P-256 key.
pub fn is_p256(spki: &SubjectPublicKeyInfo<'_>) -> bool {
    spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|oid| oid == OID_EC_P256)
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
    ) -> Result<Vec<PathBuf>, PkiError> {
        let mut files = vec![
            (layout.cert_file(), &self.cert_pem, false),
            (layout.key_file(), &self.key_pem, true),
        ];
        if let Some(ca_file) = layout.ca_file() {
            files.push((ca_file, &self.ca_pem, false));
        }
        let paths: Vec<PathBuf> = files.iter().map(|(name, _, _)| dir.join(name)).collect();
        if !force && let Some(existing) = paths.iter().find(|p| p.exists()) {
            return Err(PkiError::AlreadyExists {
                path: existing.clone(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| PkiError::Write {
            path: dir.to_owned(),
            source,
        })?;
        for ((_, content, secret), path) in files.iter().zip(&paths) {
            write_atomically(
                path,
                content.as_bytes(),
                if *secret { 0o600 } else { 0o644 },
            )?;
        }
        Ok(paths)
    }
}

/// Writes to a temporary sibling, then renames over `path`, so readers (and
/// the issuer watcher) never see half a file.
fn write_atomically(path: &Path, content: &[u8], mode: u32) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    file.write_all(content).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
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
pub fn generate_root(spec: &CaSpec) -> Result<GeneratedCa, PkiError> {
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
pub fn generate_issuer(root: &CaMaterial, spec: &CaSpec) -> Result<(GeneratedCa, bool), PkiError> {
    let root_ders = root.certificates()?;
    let root_cert = parse_cert(&root_ders[0], &root.source, 0)?;
    check_ca(&root_cert, "root")?;
    let root_info = CertInfo::of(&root_cert);
    root_info.check_valid_at(OffsetDateTime::now_utc())?;
    let root_key = root.key_pair()?;
    if root_key.public_key_raw() != root_cert.public_key().subject_public_key.data.as_ref() {
        return Err(PkiError::KeyMismatch {
            subject: root_info.subject,
        });
    }
    let signer = rcgen::Issuer::from_ca_cert_der(&root_ders[0], root_key)?;

    let mut params = ca_params(spec, BasicConstraints::Constrained(0));
    let clamped = params.not_after > root_info.not_after;
    params.not_after = params.not_after.min(root_info.not_after);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, &signer)?;
    let root_pem = String::from_utf8_lossy(&root.cert_pem).into_owned();
    Ok((
        GeneratedCa {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: root_pem,
        },
        clamped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            matches!(&err, PkiError::NoChainToAnchor { subject, issuer } if subject == "CN=issuer.test" && issuer == "CN=root.test"),
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
        assert!(matches!(err, PkiError::KeyMismatch { .. }), "{err}");
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
            matches!(err, PkiError::NotCa { role: "issuer", .. }),
            "{err}"
        );
    }

    #[test]
    fn expiry_is_checked_against_the_given_time() {
        let (root, issuer) = root_and_issuer();
        let later = OffsetDateTime::now_utc() + 2 * DAY;
        let err = Issuer::from_material(&issuer.material(), &anchors(&root), later).unwrap_err();
        assert!(matches!(err, PkiError::Expired { .. }), "{err}");
        assert!(err.to_string().contains("issue a new one"));
    }

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
    fn der_lengths_use_long_form_above_127() {
        assert_eq!(der_tlv(0x04, &[7; 3]), [0x04, 3, 7, 7, 7]);
        let long = der_tlv(0x04, &[0; 300]);
        assert_eq!(&long[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(long.len(), 304);
    }

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
        assert!(matches!(err, PkiError::AlreadyExists { .. }));
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
}
