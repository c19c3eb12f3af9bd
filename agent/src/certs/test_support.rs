//! What the cert store's unit tests share: a CA made in memory, a
//! certificate authority signing with it (with switchable outages and a
//! record of when it was asked), and a real TLS handshake against the
//! store's server config.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use sealmesh_common::identity::{Identity, TrustDomain};
use tokio::time::Instant;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{CaError, CertStore, CertStoreConfig, CertificateAuthority, RenewalPolicy};
use crate::tls;

/// How far the identity service back-dates NotBefore for clock skew.
const CLOCK_SKEW: Duration = Duration::from_secs(20);

pub(super) fn web() -> Identity {
    TrustDomain::default().identity("emojivoto", "web").unwrap()
}

pub(super) fn sans_of(id: &Identity) -> Vec<SanType> {
    vec![
        SanType::URI(id.spiffe_uri().try_into().unwrap()),
        SanType::DnsName(id.dns_name().try_into().unwrap()),
    ]
}

/// A root and an issuer under it.
pub(super) struct TestCa {
    pub(super) root: CertifiedIssuer<'static, KeyPair>,
    issuer: CertifiedIssuer<'static, KeyPair>,
    issuer_not_after: SystemTime,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("issuer_not_after", &self.issuer_not_after)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    pub(super) fn new() -> Self {
        Self::with_issuer_until(None)
    }

    /// With an issuer valid until `not_after` (else for centuries).
    pub(super) fn with_issuer_until(not_after: Option<SystemTime>) -> Self {
        let ca_params = |cn: &str| {
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let root =
            CertifiedIssuer::self_signed(ca_params("test root"), KeyPair::generate().unwrap())
                .unwrap();
        let mut issuer_params = ca_params("test issuer");
        if let Some(not_after) = not_after {
            issuer_params.not_after = not_after.into();
        }
        let issuer_not_after = SystemTime::from(issuer_params.not_after);
        let issuer =
            CertifiedIssuer::signed_by(issuer_params, KeyPair::generate().unwrap(), &root).unwrap();
        Self {
            root,
            issuer,
            issuer_not_after,
        }
    }

    /// A leaf as the identity service issues it, with the given SANs.
    pub(super) fn leaf(&self, key: &KeyPair, sans: Vec<SanType>) -> Vec<CertificateDer<'static>> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        leaf_usages(&mut params);
        let leaf = params.signed_by(key, &self.issuer).unwrap();
        vec![leaf.der().clone(), self.issuer.der().clone()]
    }
}

fn leaf_usages(params: &mut CertificateParams) {
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
}

/// A store trusting `ca`'s root and obtaining certificates from `authority`.
pub(super) fn store_with(
    ca: &TestCa,
    authority: Arc<dyn CertificateAuthority>,
    renewal: RenewalPolicy,
) -> Arc<CertStore> {
    store_keeping(ca, authority, renewal, None)
}

/// [`store_with`], keeping its certificates in `cache_dir` (a tmpfs).
pub(super) fn store_keeping(
    ca: &TestCa,
    authority: Arc<dyn CertificateAuthority>,
    renewal: RenewalPolicy,
    cache_dir: Option<&std::path::Path>,
) -> Arc<CertStore> {
    CertStore::with_authority(
        CertStoreConfig {
            identity_addr: "127.0.0.1:9".parse().unwrap(),
            token_file: "/nonexistent/node.token".into(),
            trust_anchors_file: "/nonexistent/ca-bundle.crt".into(),
            trust_domain: TrustDomain::default(),
            renewal,
            cache_dir: cache_dir.map(ToOwned::to_owned),
        },
        "the test CA",
        ca.root.pem().as_bytes(),
        authority,
    )
    .unwrap()
}

/// Signs CSRs as the identity service does (leaf lifetime, NotBefore
/// back-dated, NotAfter clamped to the issuer's), while it is up.
#[derive(Debug)]
pub(super) struct FakeCa {
    pub(super) ca: TestCa,
    lifetime: Duration,
    up: AtomicBool,
    /// When each request came, on the runtime's clock.
    requests: Mutex<Vec<Instant>>,
}

impl FakeCa {
    pub(super) fn new(ca: TestCa, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            ca,
            lifetime,
            up: AtomicBool::new(true),
            requests: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    pub(super) fn requests(&self) -> Vec<Instant> {
        self.requests.lock().unwrap().clone()
    }

    fn sign(&self, csr: Vec<u8>) -> Result<Vec<CertificateDer<'static>>, CaError> {
        self.requests.lock().unwrap().push(Instant::now());
        if !self.up.load(Ordering::SeqCst) {
            return Err(CaError::Unreachable(
                "cannot connect to the test CA: connection refused".into(),
            ));
        }
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
                .unwrap();
        let now = SystemTime::now();
        csr.params.not_before = (now - CLOCK_SKEW).into();
        csr.params.not_after = (now + self.lifetime).min(self.ca.issuer_not_after).into();
        leaf_usages(&mut csr.params);
        let leaf = csr.signed_by(&self.ca.issuer).unwrap();
        Ok(vec![leaf.der().clone(), self.ca.issuer.der().clone()])
    }
}

impl CertificateAuthority for FakeCa {
    fn certify<'a>(
        &'a self,
        _identity: &'a Identity,
        csr: Vec<u8>,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, CaError>> {
        Box::pin(std::future::ready(self.sign(csr)))
    }
}

/// A TLS handshake over an in-memory pipe: `client` asks for `sni`'s DNS
/// name from a server with `server`. The server's outcome, errors as text.
pub(super) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    sni: &Identity,
) -> Result<(), String> {
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let accept = TlsAcceptor::from(server).accept(server_io);
    let connect = TlsConnector::from(client).connect(tls::server_name(sni), client_io);
    let (accepted, _) = tokio::join!(accept, connect);
    accepted.map(drop).map_err(|e| e.to_string())
}
