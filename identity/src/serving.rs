//! The identity service's own TLS. Its gRPC API carries bearer tokens, so it
//! is served over TLS 1.3 only (ALPN h2), never in clear:
//!
//! - [`ServingCertificate`]: a certificate for the service's own identity
//!   (the SPIFFE URI and identity DNS name of its ServiceAccount, plus its
//!   Service's DNS names), signed by the current issuer at start, renewed
//!   at half its lifetime and re-issued as soon as a new issuer takes over;
//!   handshakes pick up the new one at once (an atomic swap behind the
//!   rustls certificate resolver);
//! - [`tls_incoming`]: the accepted connections, each handed to tonic only
//!   after its TLS handshake completed (a client that does not speak TLS
//!   never reaches gRPC).

use std::{
    io,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use futures::Stream;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sealmesh_common::identity::Identity;
use time::OffsetDateTime;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::{
    ca::{self, CaError, LeafPolicy},
    metrics::IdentityMetrics,
    rotation::IssuerStore,
};
use sealmesh_pki::Issuer;

/// ALPN protocol of the gRPC API: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// A client gets this long to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The serving certificate is renewed after this fraction of its lifetime.
const RENEW_FRACTION: f64 = 0.5;
/// A failed renewal is retried after this long (the old certificate serves
/// meanwhile).
const RENEW_RETRY: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for tonic to take them.
const ACCEPT_QUEUE: usize = 64;
/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The one crypto provider of the service's TLS (ring, as everywhere in
/// sealmesh).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("cannot issue the identity service's own serving certificate for {identity}: {source}")]
    Issue {
        identity: String,
        #[source]
        source: CaError,
    },
    #[error("cannot generate the key of the serving certificate: {0}")]
    Key(#[from] rcgen::Error),
    #[error("cannot use the serving certificate for TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// One issued serving certificate with its key.
struct Served {
    key: Arc<CertifiedKey>,
    serial: String,
    /// Serial of the issuer that signed it.
    issuer_serial: String,
    issued: SystemTime,
    not_after: SystemTime,
}

/// The service's serving certificate; the rustls resolver of its TLS
/// server. Clone the `Arc` to share it.
pub struct ServingCertificate {
    identity: Identity,
    hostnames: Vec<String>,
    policy: LeafPolicy,
    metrics: Arc<IdentityMetrics>,
    current: ArcSwap<Served>,
}

impl std::fmt::Debug for ServingCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current.load();
        f.debug_struct("ServingCertificate")
            .field("identity", &self.identity)
            .field("hostnames", &self.hostnames)
            .field("serial", &current.serial)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl ServingCertificate {
    /// Issues the first certificate for `identity` (and `hostnames`) with
    /// the current issuer.
    pub fn issue(
        issuer: &Issuer,
        identity: Identity,
        hostnames: Vec<String>,
        policy: LeafPolicy,
        metrics: Arc<IdentityMetrics>,
    ) -> Result<Arc<Self>, ServingError> {
        let served = sign(issuer, &identity, &hostnames, &policy)?;
        log_issued(
            &identity,
            &served,
            "issued the identity service's serving certificate",
        );
        metrics.set_serving_certificate_expiry(served.not_after);
        Ok(Arc::new(Self {
            identity,
            hostnames,
            policy,
            metrics,
            current: ArcSwap::from_pointee(served),
        }))
    }

    /// The identity the certificate names.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// TLS 1.3 only, ALPN h2, no client certificates (callers authenticate
    /// with their token), this certificate.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, ServingError> {
        let mut config = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }

    /// Keeps the certificate fresh until `shutdown` resolves: renewed at
    /// half its lifetime, re-issued when `issuers` gets a new issuer.
    pub async fn maintain(
        self: Arc<Self>,
        issuers: Arc<IssuerStore>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut replaced = issuers.subscribe();
        tokio::pin!(shutdown);
        // An issuer replaced before the subscription is noticed here.
        let mut wait = if self.current.load().issuer_serial == issuers.current().info().serial {
            self.renew_in()
        } else {
            Duration::ZERO
        };
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(wait) => {}
                changed = replaced.changed() => if changed.is_err() {
                    return;
                },
            }
            wait = match self.renew(&issuers.current()) {
                Ok(()) => self.renew_in(),
                Err(error) => {
                    tracing::error!(
                        %error,
                        retry_in = ?RENEW_RETRY,
                        serial = self.current.load().serial,
                        "cannot renew the identity service's serving certificate; the current one serves until it expires"
                    );
                    RENEW_RETRY
                }
            };
        }
    }

    fn renew(&self, issuer: &Issuer) -> Result<(), ServingError> {
        let served = sign(issuer, &self.identity, &self.hostnames, &self.policy)?;
        log_issued(
            &self.identity,
            &served,
            "renewed the identity service's serving certificate",
        );
        self.metrics
            .set_serving_certificate_expiry(served.not_after);
        self.current.store(Arc::new(served));
        Ok(())
    }

    fn renew_in(&self) -> Duration {
        let current = self.current.load();
        let lifetime = current
            .not_after
            .duration_since(current.issued)
            .unwrap_or_default();
        let renew_at = current.issued + lifetime.mul_f64(RENEW_FRACTION);
        renew_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

impl ResolvesServerCert for ServingCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One certificate whatever name the client asked for: clients dial
        // the Service's name or an address and check the identity.
        Some(self.current.load().key.clone())
    }
}

fn sign(
    issuer: &Issuer,
    identity: &Identity,
    hostnames: &[String],
    policy: &LeafPolicy,
) -> Result<Served, ServingError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let leaf = ca::issue_serving(
        issuer,
        &key,
        identity,
        hostnames,
        policy,
        OffsetDateTime::now_utc(),
    )
    .map_err(|source| ServingError::Issue {
        identity: identity.to_string(),
        source,
    })?;
    let chain: Vec<CertificateDer<'static>> = std::iter::once(leaf.certificate)
        .chain(leaf.chain)
        .collect();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let certified = CertifiedKey::from_der(chain, key_der, &crypto_provider())?;
    Ok(Served {
        key: Arc::new(certified),
        serial: leaf.serial,
        issuer_serial: issuer.info().serial.clone(),
        issued: SystemTime::now(),
        not_after: leaf.not_after.into(),
    })
}

fn log_issued(identity: &Identity, served: &Served, message: &str) {
    tracing::info!(
        %identity,
        serial = served.serial,
        issuer_serial = served.issuer_serial,
        not_after = %OffsetDateTime::from(served.not_after),
        "{message}"
    );
}

/// A client connection whose TLS handshake has completed.
pub struct TlsConnection(TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and yields each connection once its TLS handshake
/// with `config` completed. Handshakes run concurrently, each bounded by
/// [`HANDSHAKE_TIMEOUT`]; failed ones (plaintext clients, clients that do
/// not trust the certificate) are closed and logged at debug level. Accepting
/// stops when the stream is dropped.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsConnection, io::Error>> + Send + 'static {
    let (connections, mut accepted) = mpsc::channel(ACCEPT_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = connections.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "cannot accept a connection on the gRPC listener");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, connections) = (acceptor.clone(), connections.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = connections.send(Ok(TlsConnection(tls))).await;
                    }
                    Ok(Err(error)) => tracing::debug!(
                        %peer,
                        %error,
                        "TLS handshake failed; the identity service speaks TLS 1.3 only"
                    ),
                    Err(_) => tracing::debug!(
                        %peer,
                        timeout = ?HANDSHAKE_TIMEOUT,
                        "TLS handshake timed out"
                    ),
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| accepted.poll_recv(cx))
}
