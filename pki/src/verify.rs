//! Verifying mesh peers' certificate chains in TLS handshakes: webpki checks
//! the chain against the trust anchors, then the leaf's SPIFFE identity is
//! checked, so a certificate of the wrong identity fails the handshake
//! itself. One implementation for every end: HBONE servers and clients (the
//! agent) and clients of the identity service (agents, tools).

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use sealmesh_common::identity::{Identity, IdentityError, TrustDomain};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

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

/// Why the identity service's certificate was refused. It travels inside
/// the rustls handshake error, as [`CertificateError::Other`].
#[derive(Debug, thiserror::Error)]
pub enum ServerCertError {
    #[error(
        "the server's certificate names {presented}, not the identity service's identity {expected}; \
         check that the address is this mesh's sealmesh identity service (ServiceAccount {service_account} \
         in the control namespace {namespace}) and that the trust domain and control namespace match it"
    )]
    WrongIdentity {
        presented: String,
        expected: String,
        service_account: String,
        namespace: String,
    },
    #[error(
        "the server's certificate is not trusted ({reason}); the identity service's certificate must chain to \
         the mesh's trust anchors: check that the address is this mesh's identity service and that the trust \
         anchors are current"
    )]
    Untrusted { reason: String },
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
pub struct SanNames {
    pub uris: Vec<String>,
    pub dns_names: Vec<String>,
}

impl SanNames {
    pub fn of(cert: &CertificateDer<'_>) -> Result<Self, TlsError> {
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

    /// The identities a refused certificate claims, for error messages.
    fn describe(cert: &CertificateDer<'_>) -> String {
        let names = Self::of(cert).unwrap_or_default();
        if !names.uris.is_empty() {
            names.uris.join(", ")
        } else if names.dns_names.is_empty() {
            "no identity (no URI or DNS SAN)".to_owned()
        } else {
            format!(
                "no SPIFFE identity, only the DNS names {}",
                names.dns_names.join(", ")
            )
        }
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

/// The verifiers of mesh peers built from one bundle of trust anchors:
/// servers by chain and DNS name, clients by chain and one SPIFFE identity of
/// the trust domain. Immutable: a new bundle means a new `PeerVerifier`.
pub struct PeerVerifier {
    roots: Arc<RootCertStore>,
    server: Arc<WebPkiServerVerifier>,
    client: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerVerifier")
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl PeerVerifier {
    /// Parses a PEM bundle of one or more root certificates; signatures are
    /// checked with `provider`'s algorithms.
    pub fn from_pem(
        pem: &[u8],
        trust_domain: &TrustDomain,
        provider: Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
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
        let server = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?;
        let chain = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| TlsError::BadTrustAnchor(e.to_string()))?;
        let client = Arc::new(SpiffeClientVerifier {
            chain,
            trust_domain: trust_domain.clone(),
        });
        Ok(Self {
            roots,
            server,
            client,
        })
    }

    /// The root certificates themselves.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// Verifies servers' chains and DNS names (the client end of a handshake).
    pub fn server_verifier(&self) -> Arc<WebPkiServerVerifier> {
        self.server.clone()
    }

    /// Verifies clients' chains and SPIFFE identities (the server end).
    pub fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.client.clone()
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
        self.server
            .verify_server_cert(leaf, intermediates, &server_name(id), &[], now)?;
        self.client.verify_client_cert(leaf, intermediates, now)?;
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
                .server
                .verify_server_cert(leaf, intermediates, &server_name(id), &[], now)
                .map(drop),
            PeerRole::Client => self
                .client
                .verify_client_cert(leaf, intermediates, now)
                .map(drop),
        }
        .map_err(TlsError::Untrusted)
    }
}

/// A verifier for the identity service at `identity_service`: the server's
/// chain must lead to `roots` and its leaf name exactly that identity (see
/// [`TrustDomain::identity_service`]), whatever address was dialled. A
/// refusal carries a [`ServerCertError`].
pub fn identity_service_verifier(
    roots: Arc<RootCertStore>,
    identity_service: &Identity,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, rustls::Error> {
    let chain = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    Ok(Arc::new(IdentityServiceVerifier {
        chain,
        server_name: server_name(identity_service),
        expected: identity_service.clone(),
    }))
}

/// A refused certificate as rustls carries it, with `error` as the reason.
fn refuse(error: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
}

/// Handshake signatures are checked by the wrapped webpki verifier `chain`.
macro_rules! signatures_by_chain {
    () => {
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
    };
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
        peer_identity(std::slice::from_ref(end_entity), &self.trust_domain).map_err(refuse)?;
        Ok(verified)
    }

    signatures_by_chain!();
}

/// webpki's server check against the anchors and the identity service's DNS
/// name, then: the leaf's one SPIFFE URI is exactly the identity service's.
#[derive(Debug)]
struct IdentityServiceVerifier {
    chain: Arc<WebPkiServerVerifier>,
    server_name: ServerName<'static>,
    expected: Identity,
}

impl IdentityServiceVerifier {
    fn wrong_identity(&self, leaf: &CertificateDer<'_>) -> rustls::Error {
        refuse(ServerCertError::WrongIdentity {
            presented: SanNames::describe(leaf),
            expected: self.expected.spiffe_uri(),
            service_account: self.expected.service_account().to_owned(),
            namespace: self.expected.namespace().to_owned(),
        })
    }
}

impl ServerCertVerifier for IdentityServiceVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain first (a name is only worth reading on a trusted
        // certificate), checked against the identity service's DNS name.
        match self.chain.verify_server_cert(
            end_entity,
            intermediates,
            &self.server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => {
                // The SPIFFE URI is what identifies; the DNS name matched.
                let uris = SanNames::of(end_entity).unwrap_or_default().uris;
                if uris == [self.expected.spiffe_uri()] {
                    Ok(verified)
                } else {
                    Err(self.wrong_identity(end_entity))
                }
            }
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Err(self.wrong_identity(end_entity)),
            Err(rustls::Error::InvalidCertificate(error)) => {
                let reason = match error {
                    CertificateError::UnknownIssuer => {
                        "it is not issued under any of the trust anchors".to_owned()
                    }
                    other => other.to_string(),
                };
                Err(refuse(ServerCertError::Untrusted { reason }))
            }
            Err(other) => Err(other),
        }
    }

    signatures_by_chain!();
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

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

    #[test]
    fn trust_anchor_bundles_must_hold_certificates() {
        assert!(matches!(
            PeerVerifier::from_pem(b"", &TrustDomain::default(), provider()),
            Err(TlsError::NoTrustAnchors)
        ));
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        let bundle = format!("{}{}", root.pem(), root.pem());
        assert_eq!(
            PeerVerifier::from_pem(bundle.as_bytes(), &TrustDomain::default(), provider())
                .unwrap()
                .roots()
                .len(),
            2
        );
    }
}
