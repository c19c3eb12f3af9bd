//! CA directories on disk: the two layouts, reading a CA's PEM files and
//! writing them atomically (keys with mode 0600).

use std::{
    fmt,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::KeyPair;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::pem::{PemError, parse_key, parse_pem_certs};

pub const PEM_CERT_FILE: &str = "crt.pem";
pub const PEM_KEY_FILE: &str = "key.pem";
pub const TLS_CERT_FILE: &str = "tls.crt";
pub const TLS_KEY_FILE: &str = "tls.key";
pub const TLS_CA_FILE: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum FileError {
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
    pub fn detect(dir: &Path) -> Result<Self, FileError> {
        let pem = dir.join(PEM_CERT_FILE).exists();
        let tls = dir.join(TLS_CERT_FILE).exists();
        match (pem, tls) {
            (true, true) => Err(FileError::AmbiguousLayout {
                dir: dir.to_owned(),
            }),
            (true, false) => Ok(Self::Pem),
            (false, true) => Ok(Self::Tls),
            (false, false) => Err(FileError::NoCaFiles {
                dir: dir.to_owned(),
            }),
        }
    }
}

/// The raw PEM files of a CA as read from a directory or a Secret.
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
    pub fn read_dir(dir: &Path) -> Result<Self, FileError> {
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

    /// The CA certificate, its intermediates, then `ca.crt`'s certificates.
    pub(crate) fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, PemError> {
        let mut certs = parse_pem_certs(&self.cert_pem, &format!("{} certificate", self.source))?;
        if let Some(ca_pem) = &self.ca_pem {
            certs.extend(parse_pem_certs(
                ca_pem,
                &format!("{} {TLS_CA_FILE}", self.source),
            )?);
        }
        Ok(certs)
    }

    pub(crate) fn key_pair(&self) -> Result<KeyPair, PemError> {
        parse_key(&self.key_pem, &format!("{} key", self.source))
    }
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })
}

/// One file of a CA to write.
pub(crate) struct CaFile<'a> {
    pub name: &'static str,
    pub content: &'a str,
    pub secret: bool,
}

/// Writes `files` into `dir` (created if missing); secret files get mode
/// 0600, others 0644. Refuses to replace existing files unless `force`.
/// Returns the paths written.
pub(crate) fn write_ca_files(
    dir: &Path,
    files: &[CaFile<'_>],
    force: bool,
) -> Result<Vec<PathBuf>, FileError> {
    let paths: Vec<PathBuf> = files.iter().map(|file| dir.join(file.name)).collect();
    if !force && let Some(existing) = paths.iter().find(|p| p.exists()) {
        return Err(FileError::AlreadyExists {
            path: existing.clone(),
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| FileError::Write {
        path: dir.to_owned(),
        source,
    })?;
    for (file, path) in files.iter().zip(&paths) {
        let mode = if file.secret { 0o600 } else { 0o644 };
        write_atomically(path, file.content.as_bytes(), mode)?;
    }
    Ok(paths)
}

/// Writes to a temporary sibling, then renames over `path`, so readers (and
/// the issuer watcher) never see half a file.
fn write_atomically(path: &Path, content: &[u8], mode: u32) -> Result<(), FileError> {
    let err = |source| FileError::Write {
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
