//! Kubernetes mode: the workload registry and the trust anchors come from the
//! Kubernetes API instead of the local cluster file.
//!
//! [`KubeRegistry`] runs one kube-rs reflector per kind (Pods, Nodes,
//! Namespaces, Services, EndpointSlices, AuthorizationPolicies, all
//! cluster-wide): each watcher lists, then watches from the list's
//! resourceVersion, re-lists by itself after `410 Gone` and backs off on
//! errors. Objects are parsed into views of the fields the data path reads
//! (`objects`), and every change rebuilds one immutable [`Snapshot`] that
//! the proxy reads lock-free.

pub mod cgroup;
mod events;
mod objects;
mod snapshot;
pub mod trust_roots;

use std::{
    collections::BTreeMap,
    fmt::Debug,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{FutureExt, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use ipnet::Ipv4Net;
use kube::{
    Api, Client, Resource,
    api::ListParams,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher,
    },
};
use sealmesh_common::{
    authz::{API_GROUP, PLURAL},
    consts::kube::ENDPOINTSLICE_SERVICE_LABEL,
    identity::TrustDomain,
};
use serde::de::DeserializeOwned;
use tokio::{
    sync::{Notify, watch},
    task::JoinSet,
    time::Instant,
};

pub use self::cgroup::{PodCgroup, PodCgroups};
use self::{
    events::PodEvents,
    objects::{
        AuthorizationPolicyView, EndpointSliceView, NamespaceView, NodeView, PodView, ServiceView,
        keep_labels_if_on, node_internal_ip,
    },
    snapshot::ClusterObjects,
};
use crate::{
    backoff,
    config::ServiceName,
    dir_watch::DirWatcher,
    registry::{Endpoint, NodeInfo, Published, Workload, WorkloadRegistry},
};

/// How long start-up may take to reach the API and list every kind.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the cgroups of local pods are looked for again while some are
/// missing, besides the inotify watch on the directories pods are created
/// in, which normally finds them at once: a safety net for missed events.
pub const DEFAULT_CGROUP_RESCAN: Duration = Duration::from_secs(10);
/// A burst of watch events (a re-list, a rollout) becomes one rebuild.
const REBUILD_COALESCE: Duration = Duration::from_millis(20);
/// What the error messages point operators at for permissions.
const AGENT_RBAC_FILE: &str = "deploy/base/agent-rbac.yaml";
/// ... and for the AuthorizationPolicy resource.
const POLICY_CRD_FILE: &str = "authorizationpolicy-crd.yaml";

#[derive(Debug, thiserror::Error)]
pub enum KubeRegistryError {
    #[error(
        "no Kubernetes API credentials: {0}; set KUBECONFIG to a kubeconfig file, or run the agent in a pod with its ServiceAccount token mounted"
    )]
    Credentials(#[source] kube::Error),
    #[error(
        "cannot reach the Kubernetes API while {doing}: {source}; check the server address in the kubeconfig (in a pod: KUBERNETES_SERVICE_HOST) and the network path to it"
    )]
    Unreachable {
        doing: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the Kubernetes API refused {doing} ({code} {reason}: {message}); check the agent's credentials (kubeconfig, or the pod's ServiceAccount token) and grant its ServiceAccount the permissions of {AGENT_RBAC_FILE}"
    )]
    Denied {
        doing: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error("the Kubernetes API failed {doing} ({code} {reason}): {message}")]
    Api {
        doing: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error(
        "the Kubernetes API does not serve {PLURAL}.{API_GROUP} ({doing}: {code} {reason}: {message}): its CustomResourceDefinition is not installed; apply deploy/base ({POLICY_CRD_FILE}); the agent does not start without it, as enforcing no AuthorizationPolicy would let through what they deny"
    )]
    PolicyCrdMissing {
        doing: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error(
        "the Kubernetes API refused {doing} ({code} {reason}: {message}); grant the agent's ServiceAccount get, list and watch on {PLURAL}.{API_GROUP} (the rule in {AGENT_RBAC_FILE})"
    )]
    PolicyDenied {
        doing: String,
        code: u16,
        reason: String,
        message: String,
    },
    #[error(
        "node {node:?} does not exist in the Kubernetes API; --node (SEALMESH_NODE) must name this node as the API does (the DaemonSet sets it from spec.nodeName)"
    )]
    NodeNotFound { node: String },
    #[error(
        "node {node:?} reports no IPv4 InternalIP in status.addresses; the agent listens on it, so it cannot start until the kubelet reports one"
    )]
    NoInternalIp { node: String },
    #[error(
        "the first list of {pending} did not finish within {timeout:?} (last errors: {errors}); check the agent's permissions ({AGENT_RBAC_FILE}) and the API server's health"
    )]
    SyncTimeout {
        pending: String,
        timeout: Duration,
        errors: String,
    },
    #[error(
        "ConfigMap {namespace}/{name} does not exist; the agent takes its trust anchors from it: deploy the control plane (deploy/base) first, or pass --namespace with the control namespace"
    )]
    TrustRootsMissing { namespace: String, name: String },
    #[error(
        "{origin} is missing or empty; the identity service's trust anchors (PEM root certificates) must be stored there"
    )]
    TrustRootsEmpty { origin: String },
}

impl KubeRegistryError {
    /// Classifies an API call's failure; `doing` says what the agent was doing.
    pub fn from_api(doing: impl Into<String>, error: kube::Error) -> Self {
        let doing = doing.into();
        match error {
            kube::Error::Api(status) if matches!(status.code, 401 | 403) => Self::Denied {
                doing,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            kube::Error::Api(status) => Self::Api {
                doing,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            source => Self::Unreachable { doing, source },
        }
    }

    /// Classifies the failure of reading AuthorizationPolicies, which has
    /// its own fixes: install the CRD (404), grant the rule (403).
    fn from_policy_api(doing: impl Into<String>, error: kube::Error) -> Self {
        let doing = doing.into();
        match error {
            kube::Error::Api(status) if status.code == 404 => Self::PolicyCrdMissing {
                doing,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            kube::Error::Api(status) if status.code == 403 => Self::PolicyDenied {
                doing,
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
            },
            error => Self::from_api(doing, error),
        }
    }

    /// Worth retrying: the API may answer differently in a moment.
    fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Api { code, .. } => *code == 429 || *code >= 500,
            _ => false,
        }
    }
}

/// Connects with the usual credentials: `KUBECONFIG` (or `~/.kube/config`),
/// else the in-cluster ServiceAccount.
pub async fn connect() -> Result<Client, KubeRegistryError> {
    Client::try_default()
        .await
        .map_err(KubeRegistryError::Credentials)
}

/// The ready endpoints of `service`'s port `port`, as the API lists them
/// (what kube-proxy balances over), sorted: the agent reaches the identity
/// service there without cluster DNS or a Service proxy.
pub async fn service_endpoints(
    client: &Client,
    service: &ServiceName,
    port: u16,
) -> Result<Vec<SocketAddr>, kube::Error> {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
    let spec = Api::<Service>::namespaced(client.clone(), &service.namespace)
        .get(&service.name)
        .await?
        .spec
        .unwrap_or_default();
    // EndpointSlice ports carry the Service port's name (none when it has one port).
    let port_name = spec
        .ports
        .unwrap_or_default()
        .into_iter()
        .find(|p| p.port == i32::from(port))
        .and_then(|p| p.name);
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &service.namespace)
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("{ENDPOINTSLICE_SERVICE_LABEL}={}", service.name)),
        )
        .await?;
    let mut endpoints = Vec::new();
    for slice in slices.items {
        let Some(target) = slice
            .ports
            .unwrap_or_default()
            .into_iter()
            .find(|p| p.name == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in slice.endpoints {
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            endpoints.extend(
                endpoint
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .map(|ip| SocketAddr::new(ip, target)),
            );
        }
    }
    endpoints.sort();
    endpoints.dedup();
    Ok(endpoints)
}

/// Keeps the identity service's address on a ready endpoint of `service`:
/// when the one in use is gone (the pod moved), later requests go to
/// another (`retarget`). Runs until `shutdown`.
pub async fn follow_service_endpoints(
    client: Client,
    service: ServiceName,
    port: u16,
    mut current: SocketAddr,
    retarget: impl Fn(SocketAddr) + Send,
    shutdown: impl Future<Output = ()>,
) {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &service.namespace);
    let config = watcher::Config::default()
        .labels(&format!("{ENDPOINTSLICE_SERVICE_LABEL}={}", service.name));
    let mut changes = std::pin::pin!(watcher(slices, config).default_backoff());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            change = changes.next() => match change {
                None => return,
                Some(Err(error)) => tracing::debug!(%error, %service, "watching the identity service's endpoints failed; retrying"),
                Some(Ok(_)) => match service_endpoints(&client, &service, port).await {
                    Ok(endpoints) if !endpoints.is_empty() && !endpoints.contains(&current) => {
                        let next = endpoints[0];
                        tracing::info!(%service, from = %current, to = %next, "the identity service moved; requesting certificates from its new endpoint");
                        retarget(next);
                        current = next;
                    }
                    Ok(_) => {}
                    Err(error) => tracing::debug!(%error, %service, "reading the identity service's endpoints failed"),
                },
            },
        }
    }
}

/// Whether sealmesh is being removed from the cluster: the agents'
/// DaemonSet in `namespace` is gone or being deleted, or the agent's own
/// credentials were revoked (401/403: its ServiceAccount or RBAC deleted,
/// which `kubectl delete -k` does before it reaches the DaemonSet). A
/// stopping agent then removes sealmesh from its node (pods connect directly
/// again) instead of keeping the redirection for a successor that will never
/// come. Any other answer (the DaemonSet there, the API unreachable) keeps
/// it, failing closed.
pub async fn sealmesh_being_removed(client: &Client, namespace: &str) -> Result<bool, kube::Error> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    match daemonsets
        .get_opt(sealmesh_common::consts::kube::AGENT_DAEMONSET)
        .await
    {
        Ok(None) => Ok(true),
        Ok(Some(daemonset)) => Ok(daemonset.metadata.deletion_timestamp.is_some()),
        Err(kube::Error::Api(status)) if status.code == 401 || status.code == 403 => Ok(true),
        Err(error) => Err(error),
    }
}

/// Calls `call` until it succeeds, fails for good, or `deadline` passes,
/// backing off between transient failures.
async fn retry_until<T, F, Fut>(
    deadline: Instant,
    doing: &str,
    call: F,
) -> Result<T, KubeRegistryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, KubeRegistryError>>,
{
    backoff::STARTUP
        .retry_until(
            deadline,
            call,
            KubeRegistryError::is_transient,
            |error, delay| {
                tracing::warn!(%error, retry_in = ?delay, "{doing} failed; retrying");
            },
        )
        .await
}

#[derive(Clone, Debug)]
pub struct KubeRegistryConfig {
    /// This node's name in the API.
    pub node: String,
    pub trust_domain: TrustDomain,
    /// The control namespace (`--namespace`): its AuthorizationPolicies
    /// apply to every namespace.
    pub control_namespace: String,
    /// Where the kubelet's pod cgroups are found.
    pub cgroup_root: PathBuf,
    pub startup_timeout: Duration,
    pub cgroup_rescan: Duration,
    /// Configured pod and Service networks, besides every Node's pod networks.
    pub cluster_networks: Vec<Ipv4Net>,
}

impl KubeRegistryConfig {
    pub fn new(
        node: &str,
        trust_domain: TrustDomain,
        cgroup_root: PathBuf,
        control_namespace: &str,
    ) -> Self {
        Self {
            node: node.to_owned(),
            trust_domain,
            control_namespace: control_namespace.to_owned(),
            cgroup_root,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            cgroup_rescan: DEFAULT_CGROUP_RESCAN,
            cluster_networks: Vec::new(),
        }
    }
}

/// The workload registry of one node, fed by the Kubernetes API. Its watches
/// run until it is dropped.
pub struct KubeRegistry {
    shared: Arc<Shared>,
    /// The reflectors and the rebuilder; dropping the set aborts them.
    _tasks: Mutex<JoinSet<()>>,
}

impl Debug for KubeRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeRegistry")
            .field("node", &self.shared.node)
            .field("cgroup_root", &self.shared.cgroups.root())
            .field("version", &self.shared.published.version())
            .finish_non_exhaustive()
    }
}

struct Stores {
    nodes: Store<NodeView>,
    namespaces: Store<NamespaceView>,
    pods: Store<PodView>,
    services: Store<ServiceView>,
    endpoint_slices: Store<EndpointSliceView>,
    authorization_policies: Store<AuthorizationPolicyView>,
}

/// What the registry's tasks share.
struct Shared {
    node: NodeInfo,
    trust_domain: TrustDomain,
    /// Whose AuthorizationPolicies apply to every namespace.
    control_namespace: String,
    cgroups: PodCgroups,
    cgroup_rescan: Duration,
    cluster_networks: Vec<Ipv4Net>,
    published: Published,
    stores: Stores,
    signals: Arc<Signals>,
    /// UIDs of local pods whose cgroup was not there at the last rebuild.
    missing_cgroups: Mutex<Vec<String>>,
    /// Which differing address of this node was last reported (once per value).
    reported_node_ip: Mutex<Option<Ipv4Addr>>,
    /// Warning Events on local pods left out of the mesh.
    events: PodEvents,
}

impl KubeRegistry {
    /// Reads this node from the API, lists every watched kind and builds the
    /// first snapshot; then keeps it current in the background. Transient
    /// API failures are retried until `config.startup_timeout`.
    pub async fn start(
        client: Client,
        config: KubeRegistryConfig,
    ) -> Result<Arc<Self>, KubeRegistryError> {
        let deadline = Instant::now() + config.startup_timeout;
        let node = local_node(&client, &config.node, deadline).await?;
        tracing::info!(node = %node.name, ip = %node.ip, "node found in the Kubernetes API");
        policies_readable(&client, deadline).await?;

        let mut tasks = JoinSet::new();
        let signals = Arc::new(Signals::default());
        let events = PodEvents::new(client.clone(), &node.name);
        let local = node.name.clone();
        let stores = Stores {
            nodes: spawn_reflector(&mut tasks, &client, "nodes", keep_whole, &signals),
            namespaces: spawn_reflector(&mut tasks, &client, "namespaces", keep_whole, &signals),
            pods: spawn_reflector(
                &mut tasks,
                &client,
                "pods",
                move |pod| keep_labels_if_on(pod, &local),
                &signals,
            ),
            services: spawn_reflector(&mut tasks, &client, "services", keep_whole, &signals),
            endpoint_slices: spawn_reflector(
                &mut tasks,
                &client,
                "endpointslices",
                keep_whole,
                &signals,
            ),
            authorization_policies: spawn_reflector(
                &mut tasks, &client, PLURAL, keep_whole, &signals,
            ),
        };
        wait_until_listed(&stores, &signals, deadline, config.startup_timeout).await?;

        let shared = Arc::new(Shared {
            node,
            trust_domain: config.trust_domain,
            control_namespace: config.control_namespace,
            cgroups: PodCgroups::new(config.cgroup_root),
            cgroup_rescan: config.cgroup_rescan,
            cluster_networks: config.cluster_networks,
            published: Published::new(Default::default()),
            stores,
            signals,
            missing_cgroups: Mutex::new(Vec::new()),
            reported_node_ip: Mutex::new(None),
            events,
        });
        shared.rebuild();
        tasks.spawn(keep_current(shared.clone()));
        Ok(Arc::new(Self {
            shared,
            _tasks: Mutex::new(tasks),
        }))
    }
}

/// Reads this node and its InternalIP.
async fn local_node(
    client: &Client,
    name: &str,
    deadline: Instant,
) -> Result<NodeInfo, KubeRegistryError> {
    let api: Api<NodeView> = Api::all(client.clone());
    let doing = format!("reading node {name}");
    let node = retry_until(deadline, &doing, || async {
        api.get_opt(name)
            .await
            .map_err(|error| KubeRegistryError::from_api(doing.clone(), error))
    })
    .await?
    .ok_or_else(|| KubeRegistryError::NodeNotFound {
        node: name.to_owned(),
    })?;
    let ip = node_internal_ip(&node).ok_or_else(|| KubeRegistryError::NoInternalIp {
        node: name.to_owned(),
    })?;
    Ok(NodeInfo {
        name: name.to_owned(),
        ip,
    })
}

/// Lists AuthorizationPolicies once before the reflectors start. Without
/// the resource (its CRD not installed) or the right to read it, the agent
/// would enforce no policy and let through what policies deny: start-up
/// fails at once with what to fix, rather than at the sync timeout.
async fn policies_readable(client: &Client, deadline: Instant) -> Result<(), KubeRegistryError> {
    let api: Api<AuthorizationPolicyView> = Api::all(client.clone());
    let doing = format!("listing {PLURAL}.{API_GROUP}");
    retry_until(deadline, &doing, || async {
        api.list(&ListParams::default().limit(1))
            .await
            .map(drop)
            .map_err(|error| KubeRegistryError::from_policy_api(doing.clone(), error))
    })
    .await
}

/// What the reflectors report.
#[derive(Default)]
struct Signals {
    /// Raised when a cache changed.
    changed: Notify,
    /// Each kind's last watch error, until its watch delivers again.
    errors: Mutex<BTreeMap<&'static str, String>>,
}

impl Signals {
    fn errors(&self) -> BTreeMap<&'static str, String> {
        self.errors
            .lock()
            .expect("watch errors lock poisoned")
            .clone()
    }
}

/// The `trim` of the kinds whose views hold nothing to drop.
fn keep_whole<K>(_: &mut K) {}

/// Starts a reflector for `K` in every namespace and returns its cache,
/// which holds each object as `trim` leaves it.
fn spawn_reflector<K>(
    tasks: &mut JoinSet<()>,
    client: &Client,
    kind: &'static str,
    trim: impl FnMut(&mut K) + Send + 'static,
    signals: &Arc<Signals>,
) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let signals = signals.clone();
    tasks.spawn(async move {
        let events = watcher(api, watcher::Config::default())
            .modify(trim)
            .default_backoff()
            .reflect(writer);
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    let recovered = signals
                        .errors
                        .lock()
                        .expect("watch errors lock poisoned")
                        .remove(kind);
                    if let Some(error) = recovered {
                        tracing::info!(kind, previous_error = %error, "watch recovered");
                    }
                    if matches!(
                        event,
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
                    ) {
                        signals.changed.notify_one();
                    }
                }
                Err(error) => {
                    if is_gone(&error) {
                        tracing::info!(kind, "watch history expired (410 Gone); listing again");
                    } else {
                        tracing::warn!(kind, %error, "watching the Kubernetes API failed; retrying with backoff (the registry keeps its last state)");
                    }
                    signals
                        .errors
                        .lock()
                        .expect("watch errors lock poisoned")
                        .insert(kind, error.to_string());
                }
            }
        }
    });
    reader
}

fn is_gone(error: &watcher::Error) -> bool {
    matches!(error, watcher::Error::WatchError(status) if status.code == 410)
}

/// Waits for every reflector's first complete list.
async fn wait_until_listed(
    stores: &Stores,
    signals: &Signals,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), KubeRegistryError> {
    let mut waits: FuturesUnordered<BoxFuture<'_, (&'static str, bool)>> = [
        listed("nodes", &stores.nodes),
        listed("namespaces", &stores.namespaces),
        listed("pods", &stores.pods),
        listed("services", &stores.services),
        listed("endpointslices", &stores.endpoint_slices),
        listed(PLURAL, &stores.authorization_policies),
    ]
    .into_iter()
    .collect();
    let mut pending = vec![
        "nodes",
        "namespaces",
        "pods",
        "services",
        "endpointslices",
        PLURAL,
    ];
    loop {
        match tokio::time::timeout_at(deadline, waits.next()).await {
            Ok(Some((kind, true))) => pending.retain(|k| *k != kind),
            Ok(None) => return Ok(()),
            // A writer only goes away with its task, which runs until dropped.
            Ok(Some((_, false))) | Err(_) => {
                let errors = signals.errors();
                return Err(KubeRegistryError::SyncTimeout {
                    pending: pending.join(", "),
                    timeout,
                    errors: if errors.is_empty() {
                        "none".to_owned()
                    } else {
                        errors
                            .iter()
                            .map(|(kind, error)| format!("{kind}: {error}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    },
                });
            }
        }
    }
}

/// Resolves with whether the store got its first complete list.
fn listed<'a, K>(kind: &'static str, store: &'a Store<K>) -> BoxFuture<'a, (&'static str, bool)>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    async move { (kind, store.wait_until_ready().await.is_ok()) }.boxed()
}

/// Rebuilds the snapshot on every API change, on every pod cgroup created
/// or removed where the kubelet makes them (inotify), and when a missing
/// local pod cgroup appears (looked for on a slow timer, in case an event
/// was missed).
async fn keep_current(shared: Arc<Shared>) {
    let mut watched_dirs = vec![shared.cgroups.root().to_owned()];
    watched_dirs.extend(shared.cgroups.parent_candidates());
    let mut cgroup_events = match DirWatcher::new(watched_dirs) {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(%error, rescan = ?shared.cgroup_rescan, "new pods' cgroups are found by the periodic rescan only");
            None
        }
    };
    loop {
        let missing_cgroups = shared.published.load().missing_cgroups;
        tokio::select! {
            () = shared.signals.changed.notified() => tokio::time::sleep(REBUILD_COALESCE).await,
            changed = async { cgroup_events.as_mut()?.changed().await.ok() }, if cgroup_events.is_some() => {
                if changed.is_none() {
                    tracing::warn!(rescan = ?shared.cgroup_rescan, "watching the pod cgroup directories failed; new pods' cgroups are found by the periodic rescan only");
                    cgroup_events = None;
                }
            }
            () = tokio::time::sleep(shared.cgroup_rescan), if missing_cgroups => {
                if !shared.a_missing_cgroup_appeared() {
                    continue;
                }
            }
        }
        shared.rebuild();
    }
}

impl Shared {
    fn rebuild(&self) {
        let objects = ClusterObjects {
            pods: self.stores.pods.state(),
            nodes: self.stores.nodes.state(),
            namespaces: self.stores.namespaces.state(),
            services: self.stores.services.state(),
            endpoint_slices: self.stores.endpoint_slices.state(),
            authorization_policies: self.stores.authorization_policies.state(),
        };
        self.check_local_node(&objects);
        let mut missing = Vec::new();
        let mut left_out = Vec::new();
        let mut snapshot = snapshot::build(
            &objects,
            &self.node,
            &self.trust_domain,
            &self.cluster_networks,
            &self.control_namespace,
            |uid| {
                let id = self.cgroups.find(uid).map(|cgroup| cgroup.id);
                if id.is_none() {
                    missing.push(uid.to_owned());
                }
                id
            },
            &mut left_out,
        );
        self.events.report(&left_out);
        snapshot.pod_parents = self.cgroups.parent_ids();
        snapshot.pod_parents.sort_unstable();
        *self
            .missing_cgroups
            .lock()
            .expect("missing cgroups lock poisoned") = missing;
        if self.published.publish(snapshot) {
            // Debug: every pod change in the cluster lands here.
            tracing::debug!(
                version = self.published.version(),
                local_pods = self.published.local_workloads().len(),
                "workload registry updated"
            );
        }
    }

    /// Whether the kubelet created the cgroup of a local pod that had none,
    /// which is worth a rebuild (stat calls only, no rebuild otherwise).
    fn a_missing_cgroup_appeared(&self) -> bool {
        self.missing_cgroups
            .lock()
            .expect("missing cgroups lock poisoned")
            .iter()
            .any(|uid| self.cgroups.find(uid).is_some())
    }

    /// The agent listens on the address it started with; a changed address
    /// needs a restart (reported once per new value).
    fn check_local_node(&self, objects: &ClusterObjects) {
        let current = objects
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.node.name.as_str()))
            .and_then(|n| node_internal_ip(n));
        let mut reported = self.reported_node_ip.lock().expect("node ip lock poisoned");
        match current {
            Some(ip) if ip != self.node.ip && *reported != Some(ip) => {
                tracing::error!(node = %self.node.name, listening_on = %self.node.ip, api_says = %ip,
                    "this node's InternalIP changed; restart the agent to serve the new address");
                *reported = Some(ip);
            }
            _ => {}
        }
    }
}

impl WorkloadRegistry for KubeRegistry {
    fn local_node(&self) -> &NodeInfo {
        &self.shared.node
    }

    fn source_failures(&self) -> Vec<(String, String)> {
        self.shared
            .signals
            .errors()
            .into_iter()
            .map(|(kind, error)| (format!("the Kubernetes API watch of {kind}"), error))
            .collect()
    }

    fn trust_domain(&self) -> &TrustDomain {
        &self.shared.trust_domain
    }

    fn by_cgroup(&self, cgroup_id: u64) -> Option<Arc<Workload>> {
        self.shared.published.by_cgroup(cgroup_id)
    }

    fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Workload>> {
        self.shared.published.by_ip(ip)
    }

    fn resolve(&self, dst: SocketAddrV4) -> Option<Endpoint> {
        self.shared.published.resolve(dst)
    }

    fn local_workloads(&self) -> Vec<Arc<Workload>> {
        self.shared.published.local_workloads()
    }

    fn in_cluster_network(&self, ip: Ipv4Addr) -> bool {
        self.shared.published.in_cluster_network(ip)
    }

    fn served_outside_pods(&self, dst: SocketAddrV4) -> bool {
        self.shared.published.served_outside_pods(dst)
    }

    fn service_at(&self, ip: Ipv4Addr) -> Option<ServiceName> {
        self.shared.published.service_at(ip)
    }

    fn pod_parent_cgroups(&self) -> Vec<u64> {
        self.shared.published.pod_parent_cgroups()
    }

    fn policies(&self) -> Arc<sealmesh_common::authz::PolicySet> {
        self.shared.published.policies()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.published.subscribe()
    }
}
