//! How clients (agents, the CLI, tools) reach the identity service: gRPC
//! over TLS 1.3 (ALPN h2), never in clear. The server must present a chain
//! to the mesh's trust anchors that names exactly the identity service's
//! own identity ([`TrustDomain::identity_service`]): a certificate for any
//! other identity is refused even when the mesh's CA issued it, so a node
//! token is only ever sent to the identity service.
//!
//! [`client_config`] builds the rustls config for one set of anchors;
//! [`lazy_channel`] dials with whatever config its [`ArcSwap`] holds when a
//! connection is made, so clients whose anchors rotate verify new
//! connections against the current ones; [`channel_with_anchors`] is the
//! short form for a fixed bundle.
//!
//! [`TrustDomain::identity_service`]: sealmesh_common::identity::TrustDomain::identity_service

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sealmesh_common::identity::{Identity, TrustDomain};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::transport::{Channel, Endpoint, Uri};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName, prelude::FromDer};

use crate::serving::{ALPN_H2, crypto_provider};

/// Why the identity service's certificate was refused. It travels inside
/// the rustls handshake error; [`ConnectError`] brings it back out.
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

/// Why a connection to the identity service could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to the identity service at {addr}: {source}")]
    Tcp {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with the identity service at {addr} failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
}

/// A root store holding `anchors`.
pub fn root_store(anchors: &[CertificateDer<'static>]) -> Result<RootCertStore, rustls::Error> {
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots.add(anchor.clone())?;
    }
    Ok(roots)
}

/// TLS 1.3, ALPN h2, no client certificate; the server's chain must lead to
/// `roots` and name exactly `identity_service` (see
/// [`TrustDomain::identity_service`](sealmesh_common::identity::TrustDomain::identity_service)).
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity_service: &Identity,
) -> Result<ClientConfig, rustls::Error> {
    let chain = WebPkiServerVerifier::builder_with_provider(roots, crypto_provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let verifier = Arc::new(IdentityServiceVerifier {
        chain,
        server_name: server_name(identity_service),
        expected: identity_service.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// A gRPC channel to the identity service at `addr` that connects on first
/// use, each connection over TLS with the config `tls` holds at that
/// moment. `timeout` bounds connecting and every call.
pub fn lazy_channel(
    addr: SocketAddr,
    identity_service: &Identity,
    tls: Arc<ArcSwap<ClientConfig>>,
    timeout: Duration,
) -> Channel {
    // The scheme and authority only name the request; the connector below
    // decides where and how to connect.
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .expect("a socket address makes a valid URI")
        .connect_timeout(timeout)
        .timeout(timeout);
    endpoint.connect_with_connector_lazy(Connector {
        addr,
        server_name: server_name(identity_service),
        tls,
    })
}

/// A [`lazy_channel`] verifying the identity service of `trust_domain`
/// against a fixed set of `anchors` (for tools and tests; agents follow
/// rotating anchors with [`lazy_channel`]).
pub fn channel_with_anchors(
    addr: SocketAddr,
    anchors: &[CertificateDer<'static>],
    trust_domain: &TrustDomain,
    timeout: Duration,
) -> Result<Channel, rustls::Error> {
    let identity_service = trust_domain.identity_service();
    let config = client_config(Arc::new(root_store(anchors)?), &identity_service)?;
    Ok(lazy_channel(
        addr,
        &identity_service,
        Arc::new(ArcSwap::from_pointee(config)),
        timeout,
    ))
}

/// The TLS server name clients send and check: the identity DNS name of
/// the identity service, whatever address they dial.
fn server_name(identity_service: &Identity) -> ServerName<'static> {
    ServerName::try_from(identity_service.dns_name())
        .expect("identity DNS names are checked to be valid DNS names when the identity is made")
}

/// Dials TCP, then TLS; what tonic's channel connects with.
#[derive(Clone)]
struct Connector {
    addr: SocketAddr,
    server_name: ServerName<'static>,
    tls: Arc<ArcSwap<ClientConfig>>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let Self {
            addr,
            server_name,
            tls,
        } = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| ConnectError::Tcp { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let tls = TlsConnector::from(tls.load_full())
                .connect(server_name, tcp)
                .await
                .map_err(|error| ConnectError::Handshake {
                    addr,
                    reason: handshake_failure(&error),
                })?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// What went wrong in a handshake, in the words of [`ServerCertError`]
/// when the certificate was refused.
fn handshake_failure(error: &io::Error) -> String {
    let tls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls_error {
        Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) => {
            match inner.downcast_ref::<ServerCertError>() {
                Some(refused) => refused.to_string(),
                None => inner.to_string(),
            }
        }
        Some(rustls::Error::InvalidMessage(_)) => format!(
            "{error}: the server does not speak TLS; the identity service serves its API over TLS only"
        ),
        _ => error.to_string(),
    }
}

/// webpki's chain check against the anchors, then the identity check.
#[derive(Debug)]
struct IdentityServiceVerifier {
    chain: Arc<WebPkiServerVerifier>,
    server_name: ServerName<'static>,
    expected: Identity,
}

impl IdentityServiceVerifier {
    fn refuse(error: ServerCertError) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(error))))
    }

    fn wrong_identity(&self, leaf: &CertificateDer<'_>) -> ServerCertError {
        ServerCertError::WrongIdentity {
            presented: describe_names(leaf),
            expected: self.expected.spiffe_uri(),
            service_account: self.expected.service_account().to_owned(),
            namespace: self.expected.namespace().to_owned(),
        }
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
                if spiffe_uris(end_entity) == [self.expected.spiffe_uri()] {
                    Ok(verified)
                } else {
                    Err(Self::refuse(self.wrong_identity(end_entity)))
                }
            }
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Err(Self::refuse(self.wrong_identity(end_entity))),
            Err(rustls::Error::InvalidCertificate(error)) => {
                let reason = match error {
                    CertificateError::UnknownIssuer => {
                        "it is not issued under any of the trust anchors".to_owned()
                    }
                    other => other.to_string(),
                };
                Err(Self::refuse(ServerCertError::Untrusted { reason }))
            }
            Err(other) => Err(other),
        }
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

/// The URI SANs of a certificate.
fn spiffe_uris(cert: &CertificateDer<'_>) -> Vec<String> {
    names(cert)
        .into_iter()
        .filter_map(|name| match name {
            SanName::Uri(uri) => Some(uri),
            SanName::Dns(_) => None,
        })
        .collect()
}

enum SanName {
    Uri(String),
    Dns(String),
}

fn names(cert: &CertificateDer<'_>) -> Vec<SanName> {
    let Ok((_, parsed)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(SanName::Uri((*uri).to_owned())),
            GeneralName::DNSName(dns) => Some(SanName::Dns((*dns).to_owned())),
            _ => None,
        })
        .collect()
}

/// The names a refused certificate carries, for the error message.
fn describe_names(cert: &CertificateDer<'_>) -> String {
    let names = names(cert);
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            SanName::Uri(uri) => Some(uri.as_str()),
            SanName::Dns(_) => None,
        })
        .collect();
    if !uris.is_empty() {
        return uris.join(", ");
    }
    let dns: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            SanName::Dns(dns) => Some(dns.as_str()),
            SanName::Uri(_) => None,
        })
        .collect();
    if dns.is_empty() {
        "no identity (no URI or DNS SAN)".to_owned()
    } else {
        format!("no SPIFFE identity, only the DNS names {}", dns.join(", "))
    }
}
