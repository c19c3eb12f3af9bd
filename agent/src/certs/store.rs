//! The certificates held: per identity the key, chain and client config,
//! the trust anchors with the server config (certificate chosen by SNI) and
//! the TLS config of the identity service channel, and what is known of
//! each identity's progress (for admin and the CLI).

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rcgen::KeyPair;
use rustls::{
    ClientConfig, ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sealmesh_common::{
    consts::CERTIFICATE_INHERITED_MESSAGE,
    identity::{Identity, TrustDomain},
};
use sealmesh_identity::client as identity_tls;
use tokio::sync::watch;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use super::{
    RenewalPolicy,
    ca_client::{CaError, CertificateAuthority, IdentityService},
    cache::{CachedCert, CertCache},
};
use crate::tls::{HboneTrust, PeerRole, SanNames, TlsError, crypto_provider};

#[derive(Clone, Debug)]
pub struct CertStoreConfig {
    /// gRPC address of the identity service.
    pub identity_addr: SocketAddr,
    /// The node's credential; re-read on every request because it is rotated.
    pub token_file: PathBuf,
    /// PEM bundle of the mesh's roots, read by [`CertStore::new`] and
    /// [`CertStore::reload_trust_anchors`]. A store built with
    /// [`CertStore::with_trust_anchors_pem`] takes its bundle from the caller
    /// instead and never reads this file.
    pub trust_anchors_file: PathBuf,
    pub trust_domain: TrustDomain,
    pub renewal: RenewalPolicy,
    /// Where certificates are kept across a restart (a tmpfs); `None`: not kept.
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertStoreError {
    #[error(
        "cannot read trust anchors file {path}: {source}; point the agent at the mesh's PEM root bundle"
    )]
    ReadTrustAnchors {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("trust anchors file {path} is unusable: {source}")]
    BadTrustAnchors { path: PathBuf, source: TlsError },
    #[error(
        "trust anchors from {origin} are unusable: {source}; it must hold the mesh's PEM root certificates"
    )]
    BadSuppliedTrustAnchors { origin: String, source: TlsError },
    #[error(
        "this store's trust anchors come from {origin}, not from a file; reload them with reload_trust_anchors_pem"
    )]
    AnchorsNotFromFile { origin: String },
}

/// Why a certificate could not be obtained (kept as the status's last error).
#[derive(Debug, thiserror::Error)]
pub enum ObtainError {
    #[error("cannot generate a key and CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Authority(#[from] CaError),
    #[error(
        "issued certificate names URIs {uris:?} and DNS names {dns_names:?}, not exactly the requested identity {requested}"
    )]
    WrongIdentity {
        /// SPIFFE URI of the requested identity.
        requested: String,
        uris: Vec<String>,
        dns_names: Vec<String>,
    },
    #[error(
        "issued certificate is not trusted: {0}; the identity service's issuer must chain to the agent's trust anchors"
    )]
    Untrusted(#[source] TlsError),
    #[error("issued certificate does not match the key of the CSR: {0}")]
    KeyMismatch(#[source] rustls::Error),
}

/// The certificate for `identity` is missing, expired, or not requested:
/// connections presenting it must not be made.
#[derive(Debug, thiserror::Error)]
#[error(
    "no valid certificate for {identity}: {reason}; meshed connections from it are refused until the identity service issues one"
)]
pub struct NoCertificate {
    pub identity: Identity,
    pub reason: String,
}

/// What the store knows about one identity (for admin and the CLI).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertStatus {
    pub identity: Identity,
    /// Hex serial of the certificate held, if any.
    pub serial: Option<String>,
    pub not_before: Option<SystemTime>,
    /// NotAfter of the certificate held, or of the last one, dropped when it
    /// expired without a successor.
    pub not_after: Option<SystemTime>,
    /// When the certificate held was received.
    pub last_refresh: Option<SystemTime>,
    /// The last failure, cleared by the next success.
    pub last_error: Option<String>,
    /// A certificate is held and valid now.
    pub valid: bool,
    /// DER of the certificate held (leaf first, then the intermediates it is
    /// presented with); empty without one.
    pub chain: Vec<CertificateDer<'static>>,
    /// Certificates obtained for this identity since it was first wanted.
    pub refreshes_succeeded: u64,
    /// Failed attempts to obtain one since it was first wanted.
    pub refreshes_failed: u64,
}

/// One issued certificate with its key and the client config presenting it.
pub(super) struct IssuedCert {
    pub(super) serial: String,
    not_before: SystemTime,
    pub(super) not_after: SystemTime,
    pub(super) received: SystemTime,
    key: Arc<CertifiedKey>,
    client_config: Arc<ClientConfig>,
    /// [`Anchored::epoch`] of the anchors `client_config` verifies servers with.
    anchors_epoch: u64,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }

    /// The same certificate with a client config verifying servers against `anchored`.
    fn with_anchors(&self, anchored: &Anchored) -> Result<Self, TlsError> {
        Ok(Self {
            serial: self.serial.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            received: self.received,
            key: self.key.clone(),
            client_config: Arc::new(anchored.anchors.client_config(self.key.clone())?),
            anchors_epoch: anchored.epoch,
        })
    }
}

type CertMap = HashMap<Identity, Arc<IssuedCert>>;

/// The anchors and the server config verifying clients against them; swapped
/// together when the bundle is reloaded.
struct Anchored {
    anchors: HboneTrust,
    /// The bundle `anchors` was parsed from.
    pem: String,
    server_config: Arc<ServerConfig>,
    /// TLS to the identity service, verified against `anchors`.
    identity_tls: Arc<ClientConfig>,
    /// Bumped on every reload.
    epoch: u64,
}

#[derive(Clone, Debug, Default)]
struct Progress {
    last_error: Option<String>,
    refreshes_succeeded: u64,
    refreshes_failed: u64,
    /// NotAfter of the certificate dropped when it expired without a
    /// successor; cleared by the next one.
    expired_at: Option<SystemTime>,
}

/// Where a store's trust anchors come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AnchorsOrigin {
    /// `CertStoreConfig::trust_anchors_file`.
    File,
    /// PEM handed over by the caller; names where it came from (e.g. a ConfigMap).
    Supplied(String),
}

/// The cert store: one certificate per ServiceAccount of the node's meshed
/// pods, obtained from a [`CertificateAuthority`] (the identity service,
/// with the node token), renewed before expiry (`renewal`), kept through
/// outages while valid, dropped when it expires or the ServiceAccount leaves
/// the node. It hands out the rustls configs HBONE uses; without a valid
/// certificate there is no client config, and the SNI lookup finds none
/// (fail closed).
pub struct CertStore {
    pub(super) cfg: CertStoreConfig,
    anchors_origin: AnchorsOrigin,
    pub(super) authority: Arc<dyn CertificateAuthority>,
    /// What new connections to the identity service verify it with: follows
    /// `anchored`.
    identity_tls: Arc<ArcSwap<ClientConfig>>,
    anchored: ArcSwap<Anchored>,
    pub(super) certs: Arc<ArcSwap<CertMap>>,
    /// Serialises changes of `certs` and `anchored`, so no certificate is
    /// installed with a client config built from replaced anchors.
    writer: Mutex<()>,
    /// Identities being maintained (requested), with their last failure.
    progress: Mutex<HashMap<Identity, Progress>>,
    resolver: Arc<SniResolver>,
    /// The anchors' epoch, published so live connections re-check their peer.
    anchor_changes: watch::Sender<u64>,
    /// Bumped whenever a certificate is installed or stops being wanted, so
    /// connections held for a first certificate look again.
    certificate_changes: watch::Sender<u64>,
    /// Where certificates are kept across a restart, if anywhere.
    cache: Option<CertCache>,
    /// Certificates taken over from the cache at start, by identity: serial
    /// and NotAfter, until their maintainer starts from them.
    inherited: Mutex<HashMap<Identity, (String, SystemTime)>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("cfg", &self.cfg)
            .field("certs", &self.certs.load().len())
            .finish_non_exhaustive()
    }
}

impl CertStore {
    /// Loads the trust anchors from `cfg.trust_anchors_file`; obtains no
    /// certificate yet (see [`CertStore::run`]). Call within a tokio runtime:
    /// the identity service channel lives on it.
    pub fn new(cfg: CertStoreConfig) -> Result<Arc<Self>, CertStoreError> {
        let pem = read_anchors_file(&cfg.trust_anchors_file)?;
        Self::build(cfg, AnchorsOrigin::File, &pem, None)
    }

    /// Like [`CertStore::new`], with the trust anchors given as a PEM bundle
    /// (e.g. from a Kubernetes ConfigMap) that `origin` names in logs and
    /// errors; `cfg.trust_anchors_file` is not used. Reload them with
    /// [`CertStore::reload_trust_anchors_pem`].
    pub fn with_trust_anchors_pem(
        cfg: CertStoreConfig,
        origin: &str,
        pem: &[u8],
    ) -> Result<Arc<Self>, CertStoreError> {
        Self::build(cfg, AnchorsOrigin::Supplied(origin.to_owned()), pem, None)
    }

    /// Like [`CertStore::with_trust_anchors_pem`], obtaining certificates
    /// from `authority` instead of the identity service at
    /// `cfg.identity_addr` (`cfg.token_file` is not used either).
    pub fn with_authority(
        cfg: CertStoreConfig,
        origin: &str,
        pem: &[u8],
        authority: Arc<dyn CertificateAuthority>,
    ) -> Result<Arc<Self>, CertStoreError> {
        Self::build(
            cfg,
            AnchorsOrigin::Supplied(origin.to_owned()),
            pem,
            Some(authority),
        )
    }

    /// Without `authority`, certificates come from the identity service.
    fn build(
        cfg: CertStoreConfig,
        anchors_origin: AnchorsOrigin,
        pem: &[u8],
        authority: Option<Arc<dyn CertificateAuthority>>,
    ) -> Result<Arc<Self>, CertStoreError> {
        let certs = Arc::new(ArcSwap::from_pointee(CertMap::new()));
        let resolver = Arc::new(SniResolver {
            certs: certs.clone(),
            trust_domain: cfg.trust_domain.clone(),
        });
        let anchored = anchored_from_pem(&cfg, &anchors_origin, pem, resolver.clone(), 0)?;
        let identity_tls = Arc::new(ArcSwap::new(anchored.identity_tls.clone()));
        let authority = authority.unwrap_or_else(|| {
            Arc::new(IdentityService::new(
                cfg.identity_addr,
                cfg.token_file.clone(),
                &cfg.trust_domain,
                identity_tls.clone(),
                cfg.renewal.request_timeout,
            ))
        });
        let cache = cfg.cache_dir.as_deref().and_then(|dir| {
            CertCache::open(dir)
                .inspect_err(|error| {
                    tracing::warn!(%error, "certificates are not kept across restarts");
                })
                .ok()
        });
        let store = Arc::new(Self {
            anchors_origin,
            authority,
            identity_tls,
            anchored: ArcSwap::from_pointee(anchored),
            certs,
            writer: Mutex::new(()),
            progress: Mutex::new(HashMap::new()),
            resolver,
            anchor_changes: watch::Sender::new(0),
            certificate_changes: watch::Sender::new(0),
            cache,
            inherited: Mutex::new(HashMap::new()),
            cfg,
        });
        store.inherit_kept();
        Ok(store)
    }

    /// Installs the certificates kept by the previous run that are still
    /// valid for their identity under the anchors in use; deletes the rest.
    fn inherit_kept(&self) {
        let Some(cache) = &self.cache else { return };
        for (id, kept) in cache.load(&self.cfg.trust_domain) {
            let inherited = KeyPair::try_from(&kept.key)
                .map_err(ObtainError::from)
                .and_then(|key| self.accept(&id, kept.chain, key))
                // The chain is verified at the current time: an expired one fails.
                .and_then(|issued| {
                    let facts = (issued.serial.clone(), issued.not_after);
                    self.install(&id, issued).map_err(ObtainError::Untrusted)?;
                    Ok(facts)
                });
            match inherited {
                Ok((serial, not_after)) => {
                    tracing::info!(identity = %id, %serial, not_after = %humanize(not_after),
                        "{CERTIFICATE_INHERITED_MESSAGE}");
                    self.inherited
                        .lock()
                        .expect("inherited lock poisoned")
                        .insert(id, (serial, not_after));
                }
                Err(error) => {
                    tracing::info!(identity = %id, %error, "kept certificate unusable; deleted");
                    cache.remove(&id);
                }
            }
        }
    }

    /// The certificate inherited for `id` at start, once: serial and NotAfter.
    pub(super) fn take_inherited(&self, id: &Identity) -> Option<(String, SystemTime)> {
        self.inherited
            .lock()
            .expect("inherited lock poisoned")
            .remove(id)
    }

    /// Identities holding a certificate now.
    pub(super) fn held_identities(&self) -> Vec<Identity> {
        self.certs.load().keys().cloned().collect()
    }

    /// Keeps `cert` for a restart, if certificates are kept.
    pub(super) fn keep(&self, id: &Identity, cert: &CachedCert) {
        if let Some(cache) = &self.cache {
            cache.save(id, cert);
        }
    }

    /// Sends later certificate requests to the identity service at `addr`
    /// (its Service's endpoints changed).
    pub fn retarget_identity_service(&self, addr: SocketAddr) {
        self.authority.retarget(addr);
    }

    /// Re-reads the trust anchors file and switches every config to it (for
    /// anchor rotation). On error the old anchors stay.
    pub fn reload_trust_anchors(&self) -> Result<(), CertStoreError> {
        if let AnchorsOrigin::Supplied(origin) = &self.anchors_origin {
            return Err(CertStoreError::AnchorsNotFromFile {
                origin: origin.clone(),
            });
        }
        let pem = read_anchors_file(&self.cfg.trust_anchors_file)?;
        let _writer = self.writer.lock().expect("cert writer lock poisoned");
        self.install_anchors(&pem)
    }

    /// Switches every config to the anchors of `pem` (a new bundle from the
    /// store's supplier, e.g. an updated ConfigMap). Returns `Ok(false)`,
    /// changing nothing, when `pem` is the bundle in use. On error the old
    /// anchors stay.
    pub fn reload_trust_anchors_pem(&self, pem: &[u8]) -> Result<bool, CertStoreError> {
        let _writer = self.writer.lock().expect("cert writer lock poisoned");
        if self.anchored.load().pem.as_bytes() == pem {
            return Ok(false);
        }
        self.install_anchors(pem)?;
        Ok(true)
    }

    /// Parses `pem` and swaps it in with every certificate's client config
    /// rebuilt. The caller holds `writer`.
    fn install_anchors(&self, pem: &[u8]) -> Result<(), CertStoreError> {
        let epoch = self.anchored.load().epoch + 1;
        let anchored = Arc::new(anchored_from_pem(
            &self.cfg,
            &self.anchors_origin,
            pem,
            self.resolver.clone(),
            epoch,
        )?);
        self.anchored.store(anchored.clone());
        self.identity_tls.store(anchored.identity_tls.clone());
        let rebuilt: CertMap = self
            .certs
            .load()
            .iter()
            .filter_map(|(id, issued)| match issued.with_anchors(&anchored) {
                Ok(issued) => Some((id.clone(), Arc::new(issued))),
                Err(error) => {
                    tracing::error!(identity = %id, %error, "cannot rebuild the client config for the new trust anchors; dropping the certificate until it is renewed");
                    None
                }
            })
            .collect();
        self.certs.store(Arc::new(rebuilt));
        self.anchor_changes.send_replace(epoch);
        tracing::info!(
            from = %self.anchors_origin_name(),
            anchors = anchored.anchors.len(),
            "trust anchors reloaded"
        );
        Ok(())
    }

    /// Marked changed on every anchor reload (see [`CertStore::verify_peer_chain`]).
    pub fn anchor_changes(&self) -> watch::Receiver<u64> {
        self.anchor_changes.subscribe()
    }

    /// Checks a chain a peer presented at its handshake against the current
    /// anchors again.
    pub fn verify_peer_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: &PeerRole,
    ) -> Result<(), TlsError> {
        self.anchored.load().anchors.verify_peer_chain(chain, role)
    }

    /// Where the anchors come from, for logs.
    fn anchors_origin_name(&self) -> String {
        match &self.anchors_origin {
            AnchorsOrigin::File => self.cfg.trust_anchors_file.display().to_string(),
            AnchorsOrigin::Supplied(origin) => origin.clone(),
        }
    }

    /// rustls client config presenting `source`'s cert, verifying the server
    /// chain against the anchors (server name = the destination identity's
    /// DNS name, sent as SNI), ALPN "h2", TLS 1.3 only. Err when `source` has
    /// no valid cert (fail closed).
    pub fn client_config(&self, source: &Identity) -> Result<Arc<ClientConfig>, NoCertificate> {
        let now = SystemTime::now();
        match self.certs.load().get(source) {
            Some(issued) if issued.is_valid_at(now) => Ok(issued.client_config.clone()),
            held => Err(NoCertificate {
                identity: source.clone(),
                reason: self.why_no_certificate(source, held.map(|c| c.not_after)),
            }),
        }
    }

    /// rustls server config: cert chosen by SNI among local identities;
    /// requires a client cert chaining to the anchors; ALPN "h2"; TLS 1.3 only.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.anchored.load().server_config.clone()
    }

    /// NotAfter of the certificate held for `id`, if any.
    pub fn not_after(&self, id: &Identity) -> Option<SystemTime> {
        self.certs.load().get(id).map(|c| c.not_after)
    }

    /// For the ServiceAccount of a local meshed pod: when no certificate of
    /// it has been held yet (a new pod's, wanted or about to be), a receiver
    /// marked changed at the next installation (subscribed before the check,
    /// so none is missed); None when one is held or has expired (an outage:
    /// nothing to wait for).
    pub fn awaiting_first_certificate(&self, id: &Identity) -> Option<watch::Receiver<u64>> {
        let changes = self.certificate_changes.subscribe();
        let expired = self
            .progress
            .lock()
            .expect("cert progress lock poisoned")
            .get(id)
            .is_some_and(|p| p.expired_at.is_some());
        (!expired && !self.certs.load().contains_key(id)).then_some(changes)
    }

    pub fn has_valid_cert(&self, id: &Identity) -> bool {
        self.certs
            .load()
            .get(id)
            .is_some_and(|c| c.is_valid_at(SystemTime::now()))
    }

    /// Every identity being maintained, sorted by identity.
    pub fn snapshot(&self) -> Vec<CertStatus> {
        let certs = self.certs.load();
        let progress = self.progress.lock().expect("cert progress lock poisoned");
        let now = SystemTime::now();
        let mut out: Vec<CertStatus> = progress
            .iter()
            .map(|(id, p)| {
                let held = certs.get(id);
                CertStatus {
                    identity: id.clone(),
                    serial: held.map(|c| c.serial.clone()),
                    not_before: held.map(|c| c.not_before),
                    not_after: held.map(|c| c.not_after).or(p.expired_at),
                    last_refresh: held.map(|c| c.received),
                    last_error: p.last_error.clone(),
                    valid: held.is_some_and(|c| c.is_valid_at(now)),
                    chain: held.map(|c| c.key.cert.clone()).unwrap_or_default(),
                    refreshes_succeeded: p.refreshes_succeeded,
                    refreshes_failed: p.refreshes_failed,
                }
            })
            .collect();
        out.sort_by_key(|s| s.identity.to_string());
        out
    }

    /// The PEM bundle of the trust anchors in use now.
    pub fn trust_anchors_pem(&self) -> String {
        self.anchored.load().pem.clone()
    }

    /// Starts reporting on `id` (its certificate is wanted).
    pub(super) fn want(&self, id: &Identity) {
        self.progress
            .lock()
            .expect("cert progress lock poisoned")
            .insert(id.clone(), Progress::default());
    }

    /// Drops `id`'s certificate and report (its certificate is no longer
    /// wanted).
    pub(super) fn forget(&self, id: &Identity) {
        if let Some(cache) = &self.cache {
            cache.remove(id);
        }
        // The report first: whoever sees the certificate gone sees no report either.
        self.progress
            .lock()
            .expect("cert progress lock poisoned")
            .remove(id);
        let _writer = self.writer.lock().expect("cert writer lock poisoned");
        let mut certs = CertMap::clone(&self.certs.load());
        certs.remove(id);
        self.certs.store(Arc::new(certs));
        self.certificate_changes.send_modify(|n| *n += 1);
    }

    /// Drops `id`'s certificate `serial`, which has expired: nothing presents
    /// it any more, and the SNI lookup for `id` finds nothing.
    pub(super) fn drop_expired(&self, id: &Identity, serial: &str) {
        let not_after = {
            let _writer = self.writer.lock().expect("cert writer lock poisoned");
            let current = self.certs.load();
            let Some(not_after) = current
                .get(id)
                .filter(|c| c.serial == serial)
                .map(|c| c.not_after)
            else {
                return;
            };
            let mut certs = CertMap::clone(&current);
            certs.remove(id);
            self.certs.store(Arc::new(certs));
            not_after
        };
        if let Some(cache) = &self.cache {
            cache.remove(id);
        }
        if let Some(p) = self
            .progress
            .lock()
            .expect("cert progress lock poisoned")
            .get_mut(id)
        {
            p.expired_at = Some(not_after);
        }
        tracing::error!(
            identity = %id,
            %serial,
            not_after = %humanize(not_after),
            "certificate expired before it could be renewed; meshed connections from and to this identity are refused until the identity service issues one"
        );
    }

    pub(super) fn install(&self, id: &Identity, issued: IssuedCert) -> Result<(), TlsError> {
        {
            let _writer = self.writer.lock().expect("cert writer lock poisoned");
            let anchored = self.anchored.load();
            let issued = if issued.anchors_epoch == anchored.epoch {
                issued
            } else {
                // The anchors were reloaded while this certificate was on its way.
                issued.with_anchors(&anchored)?
            };
            let mut certs = CertMap::clone(&self.certs.load());
            certs.insert(id.clone(), Arc::new(issued));
            self.certs.store(Arc::new(certs));
        }
        if let Some(p) = self
            .progress
            .lock()
            .expect("cert progress lock poisoned")
            .get_mut(id)
        {
            p.last_error = None;
            p.expired_at = None;
        }
        self.certificate_changes.send_modify(|n| *n += 1);
        Ok(())
    }

    pub(super) fn count_refresh(&self, id: &Identity, succeeded: bool) {
        if let Some(p) = self
            .progress
            .lock()
            .expect("cert progress lock poisoned")
            .get_mut(id)
        {
            if succeeded {
                p.refreshes_succeeded += 1;
            } else {
                p.refreshes_failed += 1;
            }
        }
    }

    pub(super) fn set_error(&self, id: &Identity, error: Option<String>) {
        if let Some(p) = self
            .progress
            .lock()
            .expect("cert progress lock poisoned")
            .get_mut(id)
        {
            p.last_error = error;
        }
    }

    fn why_no_certificate(&self, id: &Identity, expired_at: Option<SystemTime>) -> String {
        let progress = self.progress.lock().expect("cert progress lock poisoned");
        let Some(p) = progress.get(id) else {
            return "no meshed pod of this ServiceAccount runs on this node".to_owned();
        };
        let state = match expired_at.or(p.expired_at) {
            Some(t) => format!("the certificate expired at {}", humanize(t)),
            None => "not issued yet".to_owned(),
        };
        match &p.last_error {
            Some(error) => format!("{state}; last attempt: {error}"),
            None => state,
        }
    }

    /// Uses an issued chain only if it names exactly `id`, chains to the
    /// anchors (as peers will check it) and certifies our key.
    pub(super) fn accept(
        &self,
        id: &Identity,
        chain: Vec<CertificateDer<'static>>,
        key: KeyPair,
    ) -> Result<IssuedCert, ObtainError> {
        let names = SanNames::of(&chain[0]).map_err(ObtainError::Untrusted)?;
        if names.uris != [id.spiffe_uri()] || names.dns_names != [id.dns_name()] {
            return Err(ObtainError::WrongIdentity {
                requested: id.spiffe_uri(),
                uris: names.uris,
                dns_names: names.dns_names,
            });
        }
        let anchored = self.anchored.load();
        anchored
            .anchors
            .verify_identity_chain(&chain, id)
            .map_err(ObtainError::Untrusted)?;
        let (serial, not_before, not_after) = leaf_facts(&chain[0])?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(chain, key_der, &crypto_provider())
            .map_err(ObtainError::KeyMismatch)?;
        // from_der tolerates keys it cannot compare; we require the comparison.
        certified.keys_match().map_err(ObtainError::KeyMismatch)?;
        let key = Arc::new(certified);
        let client_config = anchored
            .anchors
            .client_config(key.clone())
            .map_err(ObtainError::Untrusted)?;
        Ok(IssuedCert {
            serial,
            not_before,
            not_after,
            received: SystemTime::now(),
            key,
            client_config: Arc::new(client_config),
            anchors_epoch: anchored.epoch,
        })
    }
}

fn read_anchors_file(path: &Path) -> Result<Vec<u8>, CertStoreError> {
    std::fs::read(path).map_err(|source| CertStoreError::ReadTrustAnchors {
        path: path.to_owned(),
        source,
    })
}

fn anchored_from_pem(
    cfg: &CertStoreConfig,
    origin: &AnchorsOrigin,
    pem: &[u8],
    resolver: Arc<SniResolver>,
    epoch: u64,
) -> Result<Anchored, CertStoreError> {
    let bad = |source| match origin {
        AnchorsOrigin::File => CertStoreError::BadTrustAnchors {
            path: cfg.trust_anchors_file.clone(),
            source,
        },
        AnchorsOrigin::Supplied(origin) => CertStoreError::BadSuppliedTrustAnchors {
            origin: origin.clone(),
            source,
        },
    };
    let anchors = HboneTrust::from_pem(pem, &cfg.trust_domain).map_err(bad)?;
    let server_config = Arc::new(anchors.server_config(resolver).map_err(bad)?);
    let identity_tls = Arc::new(
        identity_tls::client_config(anchors.roots(), &cfg.trust_domain.identity_service())
            .map_err(|e| bad(TlsError::Config(e)))?,
    );
    Ok(Anchored {
        anchors,
        // HboneTrust::from_pem accepted it, so it is PEM text.
        pem: String::from_utf8_lossy(pem).into_owned(),
        server_config,
        identity_tls,
        epoch,
    })
}

/// Serial (colon-separated hex, as openssl prints it), notBefore and notAfter of a leaf.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(String, SystemTime, SystemTime), ObtainError> {
    let (_, cert) = X509Certificate::from_der(leaf)
        .map_err(|e| ObtainError::Untrusted(TlsError::UnparseableCertificate(e.to_string())))?;
    let serial = sealmesh_pki::serial_hex(cert.raw_serial());
    let validity = cert.validity();
    Ok((
        serial,
        unix_time(validity.not_before.timestamp()),
        unix_time(validity.not_after.timestamp()),
    ))
}

fn unix_time(secs: i64) -> SystemTime {
    match u64::try_from(secs) {
        Ok(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        Err(_) => SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()),
    }
}

/// A readable UTC time for log lines and messages.
pub(super) fn humanize(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    };
    x509_parser::time::ASN1Time::from_timestamp(secs)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{secs}s after the Unix epoch"))
}

/// Picks, by SNI, the certificate of a local identity; none (so the handshake
/// fails) for no SNI, a foreign name, or an identity without a valid cert.
#[derive(Debug)]
struct SniResolver {
    certs: Arc<ArcSwap<CertMap>>,
    trust_domain: TrustDomain,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = hello.server_name() else {
            tracing::debug!(
                "inbound TLS without SNI refused: it must name the destination identity"
            );
            return None;
        };
        let id = match self.trust_domain.parse_dns_name(sni) {
            Ok(id) => id,
            Err(error) => {
                tracing::debug!(%sni, %error, "inbound TLS for a name that is not a local identity refused");
                return None;
            }
        };
        let certs = self.certs.load();
        match certs.get(&id) {
            Some(issued) if issued.is_valid_at(SystemTime::now()) => Some(issued.key.clone()),
            _ => {
                tracing::debug!(identity = %id, "inbound TLS for an identity without a valid local certificate refused");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{PKCS_ECDSA_P256_SHA256, SanType};

    use super::{
        super::test_support::{TestCa, sans_of, web},
        *,
    };

    fn store_trusting(ca: &TestCa, dir: &tempfile::TempDir) -> Arc<CertStore> {
        let anchors = dir.path().join("ca-bundle.crt");
        std::fs::write(&anchors, ca.root.pem()).unwrap();
        CertStore::new(CertStoreConfig {
            identity_addr: "127.0.0.1:9".parse().unwrap(),
            token_file: dir.path().join("node.token"),
            trust_anchors_file: anchors,
            trust_domain: TrustDomain::default(),
            renewal: RenewalPolicy::default(),
            cache_dir: None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn accepts_only_trusted_certs_for_exactly_the_identity_and_key() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let store = store_trusting(&ca, &dir);
        let id = web();
        let key = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();

        let k = key();
        let chain = ca.leaf(&k, sans_of(&id));
        let (serial, _, not_after) = leaf_facts(&chain[0]).unwrap();
        let issued = store.accept(&id, chain, k).unwrap();
        assert_eq!(issued.serial, serial);
        assert_eq!(issued.not_after, not_after);
        // Colon-separated lowercase hex bytes, as openssl prints serials.
        assert!(
            serial.split(':').all(|byte| byte.len() == 2
                && byte
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())),
            "{serial}"
        );

        let k = key();
        let mut extra = sans_of(&id);
        extra.push(SanType::DnsName("evil.example".try_into().unwrap()));
        let err = store.accept(&id, ca.leaf(&k, extra), k).unwrap_err();
        assert!(matches!(err, ObtainError::WrongIdentity { .. }), "{err}");

        let other = TrustDomain::default().identity("emojivoto", "db").unwrap();
        let k = key();
        let err = store
            .accept(&id, ca.leaf(&k, sans_of(&other)), k)
            .unwrap_err();
        assert!(matches!(err, ObtainError::WrongIdentity { .. }), "{err}");

        let foreign = TestCa::new();
        let k = key();
        let err = store
            .accept(&id, foreign.leaf(&k, sans_of(&id)), k)
            .unwrap_err();
        assert!(matches!(err, ObtainError::Untrusted(_)), "{err}");
        assert!(
            err.to_string()
                .contains("must chain to the agent's trust anchors"),
            "{err}"
        );

        let evil = TrustDomain::new("evil.org", "sealmesh")
            .unwrap()
            .identity("emojivoto", "web")
            .unwrap();
        let k = key();
        let err = store
            .accept(&evil, ca.leaf(&k, sans_of(&evil)), k)
            .unwrap_err();
        assert!(matches!(err, ObtainError::Untrusted(_)), "{err}");
        assert!(err.to_string().contains("spiffe://evil.org"), "{err}");

        let err = store
            .accept(&id, ca.leaf(&key(), sans_of(&id)), key())
            .unwrap_err();
        assert!(matches!(err, ObtainError::KeyMismatch(_)), "{err}");
    }

    #[tokio::test]
    async fn client_config_fails_closed_and_says_why() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let store = store_trusting(&ca, &dir);
        let id = web();

        let err = store.client_config(&id).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no valid certificate for spiffe://cluster.local/ns/emojivoto/sa/web: no meshed pod of \
             this ServiceAccount runs on this node; meshed connections from it are refused until \
             the identity service issues one"
        );

        store.want(&id);
        store.set_error(&id, Some("identity service unreachable".into()));
        let err = store.client_config(&id).unwrap_err();
        assert!(
            err.to_string()
                .contains(": not issued yet; last attempt: identity service unreachable;"),
            "{err}"
        );

        let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let issued = store.accept(&id, ca.leaf(&k, sans_of(&id)), k).unwrap();
        let debug = format!("{issued:?}");
        assert!(
            debug.contains("<redacted>") && !debug.contains("PRIVATE"),
            "{debug}"
        );
        store.install(&id, issued).unwrap();
        assert!(store.has_valid_cert(&id));
        let config = store.client_config(&id).unwrap();
        assert_eq!(config.alpn_protocols, [b"h2".to_vec()]);
        let status = store.snapshot();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].identity, id);
        assert_eq!(status[0].last_error, None);
        assert!(status[0].serial.is_some() && status[0].last_refresh.is_some());
    }

    #[tokio::test]
    async fn supplied_anchors_reload_from_pem_only_when_they_change() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let origin = "ConfigMap sealmesh/sealmesh-identity-trust-roots";
        let store = CertStore::with_trust_anchors_pem(
            CertStoreConfig {
                identity_addr: "127.0.0.1:9".parse().unwrap(),
                token_file: dir.path().join("node.token"),
                trust_anchors_file: dir.path().join("never-read.crt"),
                trust_domain: TrustDomain::default(),
                renewal: RenewalPolicy::default(),
                cache_dir: None,
            },
            origin,
            ca.root.pem().as_bytes(),
        )
        .unwrap();
        assert_eq!(store.trust_anchors_pem(), ca.root.pem());
        assert!(
            !store
                .reload_trust_anchors_pem(ca.root.pem().as_bytes())
                .unwrap()
        );
        assert_eq!(store.anchored.load().epoch, 0);

        let err = store.reload_trust_anchors_pem(b"").unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "trust anchors from {origin} are unusable: {}; it must hold the mesh's PEM root certificates",
                TlsError::NoTrustAnchors
            )
        );
        let err = store.reload_trust_anchors().unwrap_err();
        assert!(
            matches!(err, CertStoreError::AnchorsNotFromFile { .. }),
            "{err}"
        );
        assert_eq!(store.trust_anchors_pem(), ca.root.pem());

        let both = format!("{}{}", ca.root.pem(), TestCa::new().root.pem());
        assert!(store.reload_trust_anchors_pem(both.as_bytes()).unwrap());
        assert_eq!(store.trust_anchors_pem(), both);
        assert_eq!(store.anchored.load().anchors.len(), 2);
    }

    #[tokio::test]
    async fn reloading_anchors_rebuilds_configs_and_keeps_old_ones_on_error() {
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let store = store_trusting(&ca, &dir);
        let id = web();
        let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        store
            .install(
                &id,
                store.accept(&id, ca.leaf(&k, sans_of(&id)), k).unwrap(),
            )
            .unwrap();
        let before = store.client_config(&id).unwrap();
        let server_before = store.server_config();

        std::fs::write(&store.cfg.trust_anchors_file, "not pem").unwrap();
        let err = store.reload_trust_anchors().unwrap_err();
        assert!(
            matches!(err, CertStoreError::BadTrustAnchors { .. }),
            "{err}"
        );
        assert!(Arc::ptr_eq(&server_before, &store.server_config()));

        let next = TestCa::new();
        std::fs::write(
            &store.cfg.trust_anchors_file,
            format!("{}{}", ca.root.pem(), next.root.pem()),
        )
        .unwrap();
        // Obtained before the reload, installed after it.
        let k = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let in_flight = store.accept(&id, ca.leaf(&k, sans_of(&id)), k).unwrap();
        store.reload_trust_anchors().unwrap();
        assert_eq!(store.anchored.load().anchors.len(), 2);
        assert_eq!(store.anchored.load().epoch, 1);
        assert_eq!(store.certs.load()[&id].anchors_epoch, 1);
        assert!(!Arc::ptr_eq(&before, &store.client_config(&id).unwrap()));
        assert!(!Arc::ptr_eq(&server_before, &store.server_config()));

        assert_eq!(in_flight.anchors_epoch, 0);
        store.install(&id, in_flight).unwrap();
        assert_eq!(store.certs.load()[&id].anchors_epoch, 1);
    }
}
