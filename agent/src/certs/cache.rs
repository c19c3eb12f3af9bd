//! Certificates kept across an agent restart, so a restarted agent serves
//! its node's identities at once, even while the identity service is
//! unreachable, instead of taking the node off the mesh until it answers.
//!
//! One file per identity (`<namespace>_<serviceaccount>.pem`: the chain and
//! the PKCS#8 key), mode 0600 in a 0700 directory that must be a tmpfs (in
//! the DaemonSet an `emptyDir` with `medium: Memory`, which survives a
//! container restart but not the pod or the node): keys never reach a disk.
//! At start each file is used only if it still names its identity, chains
//! to the anchors in use and has not expired; any other is deleted.

use std::{
    fs::{self, DirBuilder, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use nix::sys::statfs::{TMPFS_MAGIC, statfs};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, pem::PemObject};
use sealmesh_common::identity::{Identity, TrustDomain};

#[derive(Debug, thiserror::Error)]
pub enum CertCacheError {
    #[error(
        "--cert-cache-dir {}: {source}; it must be a directory the agent can create and write",
        dir.display()
    )]
    Create { dir: PathBuf, source: io::Error },
    #[error(
        "--cert-cache-dir {} is not on a tmpfs: private keys are never written to disk; mount a tmpfs there (an emptyDir with medium: Memory)",
        dir.display()
    )]
    NotTmpfs { dir: PathBuf },
}

/// A certificate as kept: the chain (leaf first) and its private key.
pub(super) struct CachedCert {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

/// The directory the node's certificates are kept in.
#[derive(Debug)]
pub(super) struct CertCache {
    dir: PathBuf,
}

impl CertCache {
    /// Creates `dir` (0700) if needed; it must be on a tmpfs. Nothing is
    /// created on another filesystem.
    pub fn open(dir: &Path) -> Result<Self, CertCacheError> {
        let existing = dir
            .ancestors()
            .find(|path| path.exists())
            .unwrap_or(Path::new("/"));
        if !is_tmpfs(existing) {
            return Err(CertCacheError::NotTmpfs {
                dir: dir.to_owned(),
            });
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| CertCacheError::Create {
                dir: dir.to_owned(),
                source,
            })?;
        if !is_tmpfs(dir) {
            return Err(CertCacheError::NotTmpfs {
                dir: dir.to_owned(),
            });
        }
        // An existing directory (an emptyDir is created 0777) is narrowed too.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            CertCacheError::Create {
                dir: dir.to_owned(),
                source,
            }
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, id: &Identity) -> PathBuf {
        // Kubernetes names have no `_`: the name is unambiguous.
        self.dir
            .join(format!("{}_{}.pem", id.namespace(), id.service_account()))
    }

    /// Keeps `cert` for `id`, replacing the previous one atomically.
    pub fn save(&self, id: &Identity, cert: &CachedCert) {
        let mut pems: Vec<pem::Pem> = cert
            .chain
            .iter()
            .map(|der| pem::Pem::new("CERTIFICATE", der.to_vec()))
            .collect();
        pems.push(pem::Pem::new("PRIVATE KEY", cert.key.secret_pkcs8_der()));
        let path = self.path(id);
        let partial = path.with_extension("pem.partial");
        let written = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .and_then(|mut file| file.write_all(pem::encode_many(&pems).as_bytes()))
            .and_then(|()| fs::rename(&partial, &path));
        if let Err(error) = written {
            let _ = fs::remove_file(&partial);
            tracing::warn!(identity = %id, path = %path.display(), %error,
                "cannot keep the certificate for a restart; a restarted agent will request it again");
        }
    }

    pub fn remove(&self, id: &Identity) {
        match fs::remove_file(self.path(id)) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(identity = %id, %error, "cannot delete a kept certificate")
            }
        }
    }

    /// Every kept certificate that parses, with its identity; unreadable
    /// files are deleted (the caller deletes those it does not accept).
    pub fn load(&self, trust_domain: &TrustDomain) -> Vec<(Identity, CachedCert)> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut kept = Vec::new();
        for path in entries.flatten().map(|entry| entry.path()) {
            match read(&path, trust_domain) {
                Some(entry) => kept.push(entry),
                None => {
                    tracing::info!(path = %path.display(), "deleting an unusable kept certificate");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        kept
    }
}

fn is_tmpfs(path: &Path) -> bool {
    statfs(path).is_ok_and(|fs| fs.filesystem_type() == TMPFS_MAGIC)
}

fn read(path: &Path, trust_domain: &TrustDomain) -> Option<(Identity, CachedCert)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".pem")?;
    let (namespace, service_account) = name.split_once('_')?;
    let id = trust_domain.identity(namespace, service_account).ok()?;
    let text = fs::read(path).ok()?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let key = PrivatePkcs8KeyDer::from_pem_slice(&text).ok()?;
    (!chain.is_empty()).then_some((id, CachedCert { chain, key }))
}
