//! How clients (agents, the CLI, tools) reach the identity service: gRPC
//! over TLS 1.3 (ALPN h2), never in clear. The server must present a chain
//! to the mesh's trust anchors that names exactly the identity service's
//! own identity ([`TrustDomain::identity_service`]): a certificate for any
//! other identity is refused even when the mesh's CA issued it, so a node
//! token is only ever sent to the identity service.
//!
//! [`client_config`] builds the rustls config for one set of anchors (the
//! chain and identity checks are `sealmesh_pki::verify`'s);
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
use rustls::{CertificateError, ClientConfig, OtherError, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use sealmesh_common::identity::{Identity, TrustDomain};
use sealmesh_pki::verify::{self, ServerCertError, server_name};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, client::TlsStream};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::serving::{ALPN_H2, crypto_provider};

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
    let verifier = verify::identity_service_verifier(roots, identity_service, crypto_provider())?;
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
