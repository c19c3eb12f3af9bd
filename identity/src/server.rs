//! Wires the modules into a running service: binds the gRPC and metrics
//! listeners (so callers learn the bound addresses before serving), then
//! serves until shutdown.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use sealmesh_common::{cluster::ClusterError, identity::TrustDomain};
use sealmesh_proto::{identity as pb, linkerd_identity as linkerd};
use time::OffsetDateTime;
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::{
    Config,
    auth::{Authorizer, LocalCluster},
    ca::LeafPolicy,
    metrics::{self, Metrics},
    pki::{CaMaterial, PkiError, TrustAnchors},
    rotation::{self, IssuerEvents, IssuerStore, LoggingIssuerEvents, RotationError},
    service::CertifyService,
};

/// How long in-flight calls get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cluster file {path}: {source}")]
    Cluster { path: PathBuf, source: ClusterError },
    #[error("trust anchors: {0}")]
    Anchors(PkiError),
    #[error("issuer in {dir}: {source}; refusing to start without a valid issuer")]
    Issuer { dir: PathBuf, source: PkiError },
    #[error("cannot listen on {addr} for {what}: {source}; choose a free address with --{flag}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Rotation(#[from] RotationError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Builds a [`Server`]. The defaults are local mode: callers and placements
/// from the cluster file, issuer events to the log.
pub struct ServerBuilder {
    config: Config,
    events: Arc<dyn IssuerEvents>,
    authorization: Option<(TrustDomain, Authorizer)>,
}

impl ServerBuilder {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            events: Arc::new(LoggingIssuerEvents),
            authorization: None,
        }
    }

    /// Where issuer rotations are reported (default: the log).
    pub fn issuer_events(mut self, events: Arc<dyn IssuerEvents>) -> Self {
        self.events = events;
        self
    }

    /// Replaces local-mode authorisation (e.g. with Kubernetes TokenReview).
    pub fn authorization(mut self, trust_domain: TrustDomain, authorizer: Authorizer) -> Self {
        self.authorization = Some((trust_domain, authorizer));
        self
    }

    /// Loads and validates everything, and binds both listeners.
    pub async fn bind(self) -> Result<Server, ServeError> {
        let config = self.config;
        tracing::info!(?config, "starting identity service");
        let (trust_domain, authorizer) = match self.authorization {
            Some(authorization) => authorization,
            None => {
                let cluster =
                    Arc::new(LocalCluster::load(&config.cluster_file).map_err(|source| {
                        ServeError::Cluster {
                            path: config.cluster_file.clone(),
                            source,
                        }
                    })?);
                let trust_domain = cluster.trust_domain().clone();
                (trust_domain, Authorizer::new(cluster.clone(), cluster))
            }
        };

        let metrics = Arc::new(Metrics::new());
        let anchors = TrustAnchors::load(&config.trust_anchors).map_err(ServeError::Anchors)?;
        metrics.set_anchor_expiries(anchors.infos());
        let issuer_error = |source| ServeError::Issuer {
            dir: config.issuer_dir.clone(),
            source,
        };
        let material = CaMaterial::read_dir(&config.issuer_dir).map_err(issuer_error)?;
        let issuers = Arc::new(
            IssuerStore::new(&material, anchors, self.events, metrics.clone())
                .map_err(issuer_error)?,
        );
        let issuer = issuers.current();
        tracing::info!(
            subject = issuer.info().subject,
            serial = issuer.info().serial,
            not_after = %issuer.info().not_after,
            anchor = issuer.anchor_subject(),
            "loaded issuer"
        );

        let bind = |addr: SocketAddr, what: &'static str, flag: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind {
                    addr,
                    what,
                    flag,
                    source,
                })
        };
        let grpc = bind(config.listen, "the gRPC API", "listen").await?;
        let metrics_listener = bind(config.metrics_listen, "metrics", "metrics-listen").await?;
        let policy = LeafPolicy {
            lifetime: config.cert_lifetime,
            clock_skew: config.clock_skew,
        };
        let service = CertifyService::new(
            trust_domain,
            authorizer,
            issuers.clone(),
            policy,
            metrics.clone(),
        );
        Ok(Server {
            config,
            grpc,
            metrics_listener,
            service,
            issuers,
            metrics,
        })
    }
}

/// A bound, not yet serving, identity service.
pub struct Server {
    config: Config,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    service: CertifyService,
    issuers: Arc<IssuerStore>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("grpc_addr", &self.grpc.local_addr().ok())
            .field("metrics_addr", &self.metrics_listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Server {
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn issuers(&self) -> Arc<IssuerStore> {
        self.issuers.clone()
    }

    /// Serves Certify (both packages), gRPC health and metrics, and watches
    /// the issuer directory, until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(());
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                // Resolves when the sender is dropped (shutdown) or signals.
                let _ = rx.changed().await;
            }
        };

        let watch_task = rotation::spawn_directory_watch(
            self.issuers.clone(),
            self.config.issuer_dir.clone(),
            self.config.issuer_poll_interval,
            stopped(),
        )?;
        let issuers = self.issuers.clone();
        let ready =
            Arc::new(move || issuers.current().chain_not_after() > OffsetDateTime::now_utc());
        let metrics_task = tokio::spawn(metrics::serve_http(
            self.metrics_listener,
            self.metrics.clone(),
            ready,
            stopped(),
        ));

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in [
            "",
            pb::identity_server::SERVICE_NAME,
            linkerd::identity_server::SERVICE_NAME,
        ] {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }

        tracing::info!(grpc = %self.grpc.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "serving");
        let incoming = TcpIncoming::from(self.grpc).with_nodelay(Some(true));
        let serving = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(pb::identity_server::IdentityServer::new(
                self.service.clone(),
            ))
            .add_service(linkerd::identity_server::IdentityServer::new(self.service))
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                let _ = stop_tx.send(());
            });
        // Graceful shutdown waits for clients to close their connections;
        // agents keep theirs open, so stop waiting after a grace period.
        let grace_over = async {
            stopped().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        let served = tokio::select! {
            served = serving => served,
            () = grace_over => {
                tracing::info!(grace = ?SHUTDOWN_GRACE, "closing connections still open after the shutdown grace period");
                Ok(())
            }
        };
        // The gRPC server may also end on error: stop the helpers either way.
        let _ = watch_task.await;
        let _ = metrics_task.await;
        served.map_err(ServeError::from)
    }
}

/// Binds with `config` and serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    ServerBuilder::new(config).bind().await?.run(shutdown).await
}
