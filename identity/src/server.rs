//! Wires the modules into a running service: loads callers and PKI from the
//! mode's sources (files, or the Kubernetes API), binds the gRPC and metrics
//! listeners (so callers learn the bound addresses before serving), then
//! serves until shutdown.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use sealmesh_common::identity::TrustDomain;
use sealmesh_proto::{identity as pb, linkerd_identity as linkerd};
use time::OffsetDateTime;
use tokio::{net::TcpListener, sync::watch};
use tonic_health::ServingStatus;

use crate::{
    IdentityConfig,
    auth::{Authorizer, LocalCluster, LocalClusterError},
    ca::LeafPolicy,
    config::{KubeSettings, LocalSources, Mode},
    kube::{
        AnchorBundle, KubeIssuerEvents, KubeModeError, KubeTokenValidator, KubeWorkloadDirectory,
        PkiObjects,
    },
    limits::RequestLimits,
    metrics::{self, IdentityMetrics},
    rotation::{self, IssuerEvents, IssuerStore, LoggingIssuerEvents, RotationError},
    service::CertifyService,
    serving::{self, ServingCertificate, ServingError},
};
use sealmesh_pki::{CaMaterial, PkiError, TrustAnchors};

/// How long in-flight calls get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cluster file {path}: {source}")]
    Cluster {
        path: PathBuf,
        source: LocalClusterError,
    },
    #[error("trust anchors: {0}")]
    Anchors(PkiError),
    #[error("issuer from {origin}: {source}; refusing to start without a valid issuer")]
    Issuer { origin: String, source: PkiError },
    #[error("cannot listen on {addr} for {what}: {source}; choose a free address with --{flag}")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Rotation(#[from] RotationError),
    #[error(transparent)]
    Kube(#[from] KubeModeError),
    #[error(transparent)]
    Serving(#[from] ServingError),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Builds a [`Server`]. By default everything comes from the config's mode:
/// local mode reads the cluster file and PKI files and reports issuer events
/// to the log; Kubernetes mode uses `kube::Client::try_default()` and
/// records issuer events as Kubernetes Events.
pub struct ServerBuilder {
    config: IdentityConfig,
    events: Option<Arc<dyn IssuerEvents>>,
    authorization: Option<(TrustDomain, Authorizer)>,
    kube_client: Option<kube::Client>,
}

/// How the issuer and anchors are followed once serving.
enum PkiSource {
    Directory(LocalSources),
    Kubernetes(Box<KubeWatches>),
}

/// What Kubernetes mode watches once serving.
struct KubeWatches {
    objects: PkiObjects,
    /// The bundle the issuer store starts with.
    anchors: AnchorBundle,
    /// `None` when authorisation was replaced (see [`ServerBuilder::authorization`]).
    placements: Option<KubeWorkloadDirectory>,
}

/// Where the service's inputs come from, loaded.
struct Loaded {
    trust_domain: TrustDomain,
    authorizer: Authorizer,
    events: Arc<dyn IssuerEvents>,
    anchors: TrustAnchors,
    material: CaMaterial,
    source: PkiSource,
}

impl ServerBuilder {
    pub fn new(config: IdentityConfig) -> Self {
        Self {
            config,
            events: None,
            authorization: None,
            kube_client: None,
        }
    }

    /// Where issuer rotations are reported (default: the log in local mode,
    /// Kubernetes Events and the log in Kubernetes mode).
    pub fn issuer_events(mut self, events: Arc<dyn IssuerEvents>) -> Self {
        self.events = Some(events);
        self
    }

    /// Replaces the mode's authorisation (callers and placements).
    pub fn authorization(mut self, trust_domain: TrustDomain, authorizer: Authorizer) -> Self {
        self.authorization = Some((trust_domain, authorizer));
        self
    }

    /// The API client of Kubernetes mode (default: `kube::Client::try_default()`:
    /// KUBECONFIG, else the in-cluster ServiceAccount).
    pub fn kube_client(mut self, client: kube::Client) -> Self {
        self.kube_client = Some(client);
        self
    }

    /// Loads and validates everything, and binds both listeners.
    pub async fn bind(self) -> Result<Server, ServeError> {
        tracing::info!(mode = self.config.mode.name(), config = ?self.config, "starting identity service");
        let loaded = match self.config.mode.clone() {
            Mode::Local(local) => Self::load_local(local, self.authorization, self.events)?,
            Mode::Kubernetes(settings) => {
                Self::load_kube(&settings, self.kube_client, self.authorization, self.events)
                    .await?
            }
        };
        let config = self.config;
        let metrics = Arc::new(IdentityMetrics::new());
        metrics.set_anchor_expiries(loaded.anchors.infos());
        let issuers = Arc::new(
            IssuerStore::new(
                &loaded.material,
                loaded.anchors,
                loaded.events,
                metrics.clone(),
            )
            .map_err(|source| ServeError::Issuer {
                origin: loaded.material.source.clone(),
                source,
            })?,
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
        let policy = LeafPolicy {
            lifetime: config.cert_lifetime,
            clock_skew: config.clock_skew,
        };
        // Issued here, not through Certify: the service's own identity is
        // not a caller's request.
        let serving = ServingCertificate::issue(
            &issuer,
            loaded.trust_domain.identity_service(),
            loaded.trust_domain.identity_service_hostnames().to_vec(),
            policy,
            metrics.clone(),
        )?;
        let grpc = bind(config.listen, "the gRPC API", "listen").await?;
        let metrics_listener = bind(config.metrics_listen, "metrics", "metrics-listen").await?;
        let service = CertifyService::new(
            loaded.trust_domain,
            loaded.authorizer,
            issuers.clone(),
            policy,
            metrics.clone(),
            config.limits.caller_rate,
        );
        Ok(Server {
            limits: config.limits,
            grpc,
            metrics_listener,
            service,
            serving,
            issuers,
            metrics,
            pki_source: loaded.source,
        })
    }

    fn load_local(
        local: LocalSources,
        authorization: Option<(TrustDomain, Authorizer)>,
        events: Option<Arc<dyn IssuerEvents>>,
    ) -> Result<Loaded, ServeError> {
        let (trust_domain, authorizer) = match authorization {
            Some(authorization) => authorization,
            None => {
                let cluster =
                    Arc::new(LocalCluster::load(&local.cluster_file).map_err(|source| {
                        ServeError::Cluster {
                            path: local.cluster_file.clone(),
                            source,
                        }
                    })?);
                let trust_domain = cluster.trust_domain().clone();
                (trust_domain, Authorizer::new(cluster.clone(), cluster))
            }
        };
        let anchors = TrustAnchors::load(&local.trust_anchors).map_err(ServeError::Anchors)?;
        let material =
            CaMaterial::read_dir(&local.issuer_dir).map_err(|source| ServeError::Issuer {
                origin: local.issuer_dir.display().to_string(),
                source: source.into(),
            })?;
        Ok(Loaded {
            trust_domain,
            authorizer,
            events: events.unwrap_or_else(|| Arc::new(LoggingIssuerEvents)),
            anchors,
            material,
            source: PkiSource::Directory(local),
        })
    }

    async fn load_kube(
        settings: &KubeSettings,
        client: Option<kube::Client>,
        authorization: Option<(TrustDomain, Authorizer)>,
        events: Option<Arc<dyn IssuerEvents>>,
    ) -> Result<Loaded, ServeError> {
        let client = match client {
            Some(client) => client,
            None => kube::Client::try_default()
                .await
                .map_err(KubeModeError::Client)?,
        };
        let (trust_domain, authorizer, placements) = match authorization {
            Some((trust_domain, authorizer)) => (trust_domain, authorizer, None),
            None => {
                crate::kube::check_token_review_access(&client, settings.namespace()).await?;
                let placements =
                    KubeWorkloadDirectory::new(client.clone(), settings.trust_domain.clone());
                let authorizer = Authorizer::new(
                    Arc::new(KubeTokenValidator::new(client.clone(), settings)),
                    Arc::new(placements.clone()),
                );
                (settings.trust_domain.clone(), authorizer, Some(placements))
            }
        };
        let objects = PkiObjects::new(client.clone(), settings.namespace());
        let anchors = objects.trust_anchors().await?;
        let material = objects.issuer().await?;
        let events = events.unwrap_or_else(|| Arc::new(KubeIssuerEvents::new(client, settings)));
        Ok(Loaded {
            trust_domain,
            authorizer,
            events,
            anchors: anchors.anchors.clone(),
            material,
            source: PkiSource::Kubernetes(Box::new(KubeWatches {
                objects,
                anchors,
                placements,
            })),
        })
    }
}

/// A bound, not yet serving, identity service.
pub struct Server {
    limits: RequestLimits,
    grpc: TcpListener,
    metrics_listener: TcpListener,
    service: CertifyService,
    serving: Arc<ServingCertificate>,
    issuers: Arc<IssuerStore>,
    metrics: Arc<IdentityMetrics>,
    pki_source: PkiSource,
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

    /// Serves Certify (both packages) and gRPC health over TLS, and metrics,
    /// keeps its serving certificate fresh, and follows
    /// the issuer (directory, or Secret and ConfigMap) and, in Kubernetes
    /// mode, pod placements, until `shutdown` resolves.
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

        let mut helpers = Vec::new();
        match self.pki_source {
            PkiSource::Directory(local) => helpers.push(rotation::spawn_directory_watch(
                self.issuers.clone(),
                local.issuer_dir,
                local.issuer_poll_interval,
                stopped(),
            )?),
            PkiSource::Kubernetes(watches) => {
                let KubeWatches {
                    objects,
                    anchors,
                    placements,
                } = *watches;
                helpers.push(tokio::spawn(objects.watch(
                    self.issuers.clone(),
                    anchors,
                    stopped(),
                )));
                if let Some(placements) = placements {
                    helpers.push(tokio::spawn(placements.watch(stopped())));
                }
            }
        }
        let tls = self.serving.server_config()?;
        helpers.push(tokio::spawn(
            self.serving
                .clone()
                .maintain(self.issuers.clone(), stopped()),
        ));
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

        tracing::info!(
            grpc = %self.grpc.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            identity = %self.serving.identity(),
            "serving over TLS"
        );
        let incoming = serving::tls_incoming(self.grpc, tls);
        let serving = tonic::transport::Server::builder()
            .timeout(self.limits.deadline)
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                self.limits.max_concurrent,
            ))
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
        for helper in helpers {
            let _ = helper.await;
        }
        let _ = metrics_task.await;
        served.map_err(ServeError::from)
    }
}

/// Binds with `config` and serves until `shutdown` resolves.
pub async fn serve(
    config: IdentityConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    ServerBuilder::new(config).bind().await?.run(shutdown).await
}
