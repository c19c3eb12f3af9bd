//! TLS settings both ends of HBONE share (TLS 1.3 only, ring, ALPN h2), the
//! trust anchors peers are verified against, and reading a verified peer's
//! SPIFFE identity.

use std::sync::{Arc, OnceLock};

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    server::{
        ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::{CertifiedKey, SingleCertAndKey},
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use sealmesh_common::identity::{Identity, IdentityError, TrustDomain};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

/// ALPN protocol of HBONE: HTTP/2 (CONNECT streams) over mTLS.
pub const ALPN_HBONE: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "the peer presented no certificate; meshed peers must authenticate with their ServiceAccount certificate"
    )]
    NoPeerCertificate,
    #[error("the certificate is not parseable X.509: {0}")]
    UnparseableCertificate(String),
    #[error(
        "the certificate carries no SPIFFE URI SAN; only certificates issued by the sealmesh identity service are accepted"
    )]
    NoSpiffeIdentity,
    #[error(
        "the certificate carries {0} URI SANs; a SPIFFE identity certificate must carry exactly one"
    )]
    AmbiguousSpiffeIdentity(usize),
    #[error("the certificate's identity is not accepted: {0}")]
    ForeignIdentity(#[source] IdentityError),
    #[error(
        "no trust anchors in the bundle; it must hold at least one PEM CERTIFICATE (the mesh's root CA)"
    )]
    NoTrustAnchors,
    #[error("bad trust anchor in the bundle (fix or remove it): {0}")]
    BadTrustAnchor(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("the certificate chain is not trusted: {0}")]
    Untrusted(#[source] rustls::Error),
}

/// TLS 1.3 suites in the order the agent offers them (a rustls server
/// follows the client's order). AES-128-GCM first, the suite every TLS 1.3
/// implementation must support: ring's default offers AES-256-GCM first,
/// whose 14 rounds cost more per byte on the data path.
const CIPHER_SUITES: [rustls::SupportedCipherSuite; 3] = [
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// The one crypto provider the agent uses (ring, like the rest of sealmesh).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: CIPHER_SUITES.to_vec(),
                ..rustls::crypto::ring::default_provider()
            })
        })
        .clone()
}

/// The TLS server name (SNI, and the DNS SAN the server's certificate must
/// carry) that asks for `id`.
pub fn server_name(id: &Identity) -> ServerName<'static> {
    ServerName::try_from(id.dns_name())
        .expect("identity DNS names are checked to be valid DNS names when the identity is made")
}

/// The peer's identity from its (already verified) leaf certificate's SPIFFE
/// URI SAN, which must be in `td`. `certs` is the peer's chain, leaf first.
pub fn peer_identity(certs: &[CertificateDer<'_>], td: &TrustDomain) -> Result<Identity, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    let names = SanNames::of(leaf)?;
    match names.uris.as_slice() {
        [] => Err(TlsError::NoSpiffeIdentity),
        [uri] => td.parse_spiffe_uri(uri).map_err(TlsError::ForeignIdentity),
        many => Err(TlsError::AmbiguousSpiffeIdentity(many.len())),
    }
}

/// The subject alternative names of a certificate that identities live in.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct SanNames {
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
}

impl SanNames {
    pub(crate) fn of(cert: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let (_, parsed) = X509Certificate::from_der(cert)
            .map_err(|e| TlsError::UnparseableCertificate(e.to_string()))?;
        let san = parsed
            .subject_alternative_name()
            .map_err(|e| TlsError::UnparseableCertificate(e.to_string()))?;
        let mut names = Self::default();
        for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
            match name {
                GeneralName::URI(uri) => names.uris.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => names.dns_names.push((*dns).to_owned()),
                _ => {}
            }
        }
        Ok(names)
    }
}

/// Which end of a handshake a peer's chain was verified as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerRole {
    /// A server, for this identity's DNS name (HBONE client side).
    Server(Identity),
    /// A client of the trust domain (HBONE server side).
    Client,
}

/// The roots peers' chains must lead to, with the verifiers built from them.
/// Immutable: a new bundle (anchor rotation) means a new `TrustAnchors`.
pub struct TrustAnchors {
    roots: Arc<RootCertStore>,
    server_verifier: Arc<WebPkiServerVerifier>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for TrustAnchors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustAnchors")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl TrustAnchors {
    /// Parses a PEM bundle of one or more root certificates. Clients must
    /// also carry one SPIFFE identity of `trust_domain`.
    pub fn from_pem(pem: &[u8], trust_domain: &TrustDomain) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoTrustAnchors);
        }
        let roots = Arc::new(roots);
        let provider = crypto_provider();
        let server_verifier =
            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?;
        let webpki_client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?;
        let client_verifier = Arc::new(SpiffeClientVerifier {
            chain: webpki_client_verifier,
            trust_domain: trust_domain.clone(),
        });
        Ok(Self {
            roots,
            server_verifier,
            client_verifier,
        })
    }

    pub fn len(&self) -> usize {
        self.roots.len()
    }

    /// The root certificates themselves.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Checks a chain (leaf first) exactly as peers will: it must chain to
    /// these anchors, be valid now, serve as a server certificate for
    /// `id`'s DNS name and as a client certificate of the trust domain.
    pub fn verify_identity_chain(
        &self,
        chain: &[CertificateDer<'static>],
        id: &Identity,
    ) -> Result<(), TlsError> {
        let (leaf, intermediates) = chain.split_first().ok_or(TlsError::NoPeerCertificate)?;
        let now = UnixTime::now();
        self.server_verifier
            .verify_server_cert(leaf, intermediates, &server_name(id), &[], now)?;
        self.client_verifier
            .verify_client_cert(leaf, intermediates, now)?;
        Ok(())
    }

    /// Checks a chain a peer presented at its handshake against these
    /// anchors again, as that handshake did. When the anchors change, a
    /// connection whose peer no longer passes must end (a removed anchor
    /// cuts the sessions it authenticated).
    pub fn verify_peer_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: &PeerRole,
    ) -> Result<(), TlsError> {
        let (leaf, intermediates) = chain.split_first().ok_or(TlsError::NoPeerCertificate)?;
        let now = UnixTime::now();
        match role {
            PeerRole::Server(id) => self
                .server_verifier
                .verify_server_cert(leaf, intermediates, &server_name(id), &[], now)
                .map(drop),
            PeerRole::Client => self
                .client_verifier
                .verify_client_cert(leaf, intermediates, now)
                .map(drop),
        }
        .map_err(TlsError::Untrusted)
    }

    /// Client side of HBONE: presents `key`, verifies the server's chain
    /// against these anchors and its DNS SAN against the server name the
    /// caller connects with (see [`server_name`]).
    pub fn client_config(&self, key: Arc<CertifiedKey>) -> Result<ClientConfig, TlsError> {
        let mut config = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(self.server_verifier.clone())
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(key)));
        config.alpn_protocols = vec![ALPN_HBONE.to_vec()];
        Ok(config)
    }

    /// Server side of HBONE: the certificate comes from `resolver` (by SNI);
    /// a client certificate chaining to these anchors is mandatory.
    pub fn server_config(
        &self,
        resolver: Arc<dyn ResolvesServerCert>,
    ) -> Result<ServerConfig, TlsError> {
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier.clone())
            .with_cert_resolver(resolver);
        config.alpn_protocols = vec![ALPN_HBONE.to_vec()];
        Ok(config)
    }
}

/// The webpki client check (chain to the anchors, clientAuth, validity),
/// then: the leaf names exactly one SPIFFE identity of the trust domain, so
/// a foreign client fails the handshake itself rather than relying on every
/// caller to check [`peer_identity`].
#[derive(Debug)]
struct SpiffeClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        peer_identity(std::slice::from_ref(end_entity), &self.trust_domain).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn cert_with_sans(sans: Vec<SanType>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn uri(text: &str) -> SanType {
        SanType::URI(text.try_into().unwrap())
    }

    #[test]
    fn peer_identity_reads_the_single_spiffe_uri() {
        let td = TrustDomain::default();
        let id = td.identity("emojivoto", "web").unwrap();
        let cert = cert_with_sans(vec![
            uri(&id.spiffe_uri()),
            SanType::DnsName(id.dns_name().try_into().unwrap()),
        ]);
        assert_eq!(peer_identity(&[cert], &td).unwrap(), id);
    }

    #[test]
    fn peer_identity_rejects_what_is_not_one_local_spiffe_id() {
        let td = TrustDomain::default();
        assert!(matches!(
            peer_identity(&[], &td),
            Err(TlsError::NoPeerCertificate)
        ));
        let dns_only = cert_with_sans(vec![SanType::DnsName(
            "web.emojivoto.serviceaccount.identity.sealmesh.cluster.local"
                .try_into()
                .unwrap(),
        )]);
        assert!(matches!(
            peer_identity(&[dns_only], &td),
            Err(TlsError::NoSpiffeIdentity)
        ));
        let foreign = cert_with_sans(vec![uri("spiffe://evil.org/ns/emojivoto/sa/web")]);
        assert!(matches!(
            peer_identity(&[foreign], &td),
            Err(TlsError::ForeignIdentity(
                IdentityError::InvalidSpiffeUri { .. }
            ))
        ));
        let two = cert_with_sans(vec![
            uri("spiffe://cluster.local/ns/a/sa/b"),
            uri("spiffe://cluster.local/ns/a/sa/c"),
        ]);
        assert!(matches!(
            peer_identity(&[two], &td),
            Err(TlsError::AmbiguousSpiffeIdentity(2))
        ));
        assert!(matches!(
            peer_identity(&[CertificateDer::from(vec![1, 2, 3])], &td),
            Err(TlsError::UnparseableCertificate(_))
        ));
    }

    #[test]
    fn server_name_is_the_identity_dns_name() {
        let id = TrustDomain::default().identity("ns1", "sa1").unwrap();
        assert_eq!(
            server_name(&id).to_str(),
            "sa1.ns1.serviceaccount.identity.sealmesh.cluster.local"
        );
    }

    /// Leaf for `id` with the identity service's SANs, signed by `root`.
    fn leaf(id: &Identity, root: &rcgen::Issuer<'_, KeyPair>) -> Arc<CertifiedKey> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            uri(&id.spiffe_uri()),
            SanType::DnsName(id.dns_name().try_into().unwrap()),
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, root).unwrap();
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Arc::new(
            CertifiedKey::from_der(vec![cert.der().clone()], key_der, &crypto_provider()).unwrap(),
        )
    }

    #[test]
    fn hbone_handshakes_negotiate_aes_128_gcm() {
        let td = TrustDomain::default();
        let root_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&root_key).unwrap();
        let anchors = TrustAnchors::from_pem(root.pem().as_bytes(), &td).unwrap();
        let root = rcgen::Issuer::new(params, root_key);
        let client_id = td.identity("app", "client").unwrap();
        let server_id = td.identity("app", "server").unwrap();
        let client_config = anchors.client_config(leaf(&client_id, &root)).unwrap();
        let server_config = anchors
            .server_config(Arc::new(SingleCertAndKey::from(leaf(&server_id, &root))))
            .unwrap();

        let mut client =
            rustls::ClientConnection::new(Arc::new(client_config), server_name(&server_id))
                .unwrap();
        let mut server = rustls::ServerConnection::new(Arc::new(server_config)).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        for suite in [
            client.negotiated_cipher_suite(),
            server.negotiated_cipher_suite(),
        ] {
            assert_eq!(
                suite.map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
        assert_eq!(
            peer_identity(client.peer_certificates().unwrap(), &td).unwrap(),
            server_id
        );
        assert_eq!(
            peer_identity(server.peer_certificates().unwrap(), &td).unwrap(),
            client_id
        );
    }

    #[test]
    fn trust_anchor_bundles_must_hold_certificates() {
        assert!(matches!(
            TrustAnchors::from_pem(b"", &TrustDomain::default()),
            Err(TlsError::NoTrustAnchors)
        ));
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        let bundle = format!("{}{}", root.pem(), root.pem());
        assert_eq!(
            TrustAnchors::from_pem(bundle.as_bytes(), &TrustDomain::default())
                .unwrap()
                .len(),
            2
        );
    }
}
