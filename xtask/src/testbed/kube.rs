//! The testbed's Kubernetes mode: the testbed registers itself with a
//! Kubernetes API server the way a cluster's kubelets and controllers would,
//! so agents and the identity service run unchanged in `--mode kubernetes`.
//!
//! Pointed at an API server (the in-process fake one, or a real
//! kube-apiserver through a kubeconfig), [`KubeCluster::start`] creates:
//! - the AuthorizationPolicy CRD of `deploy/base` (kept if the server has
//!   it already), waiting until it is Established and its resource served;
//! - the control namespace (`sealmesh`), the agent and identity
//!   ServiceAccounts and the RBAC of `deploy/base/{agent,identity}-rbac.yaml`;
//! - one Node per testbed node (InternalIP = its underlay IP, `Ready` through
//!   `/status`), the cluster file's Namespaces (with their mesh labels) and
//!   ServiceAccounts;
//! - every Pod (`spec.nodeName`, `serviceAccountName`, one container), then
//!   its status as a kubelet reports it (podIP, hostIP, `Running`, `Ready`,
//!   container statuses), and its cgroup with kubelet naming under the node's
//!   cgroup root (pod processes run in a child "container" cgroup);
//! - Services (ClusterIP = the testbed VIP) and their EndpointSlices as the
//!   endpoint-slice controller writes them;
//! - the cluster file's AuthorizationPolicies, as objects of the CRD;
//! - the trust-roots ConfigMap, the issuer Secret, one agent Pod per node
//!   (`sealmesh-agent-<node>`, host network) and the identity Deployment (the
//!   object the identity service records events on);
//! - credentials: per node, the agent's identity token (TokenRequest,
//!   audience `identity.sealmesh.io`, bound to its agent Pod) in the node's
//!   token file, and per component a kubeconfig with a TokenRequest token of
//!   its ServiceAccount, pointing at the API relay in the underlay.
//!
//! A real server has no kubelet, scheduler or controllers here, so nothing
//! relies on one: everything they would write is written here. Objects
//! created on an external server are removed again on drop.

use ipnet::Ipv4Net;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    fs::OpenOptions,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr, ToSocketAddrs},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use fake_apiserver::FakeApiServer;
use k8s_openapi::{
    ByteString,
    api::{
        authentication::v1::TokenRequest,
        core::v1::{ConfigMap, Event, Namespace, Node, Pod, Secret, Service, ServiceAccount},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Client, ResourceExt,
    api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, GroupVersionKind},
    discovery::{self, Scope},
};
use rand::RngCore;
use sealmesh_common::{
    authz::{self, AuthorizationPolicy},
    cluster::{self, ClusterFile},
    consts::kube::{
        AGENT_DAEMONSET, AGENT_SERVICE_ACCOUNT, ENDPOINTSLICE_SERVICE_LABEL, IDENTITY_NAME,
        IDENTITY_TOKEN_AUDIENCE, ISSUER_SECRET, TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY,
    },
};
use sealmesh_pki::{CaMaterial, Layout as PkiLayout};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{
    Testbed, TestbedError,
    api_relay::{ApiRelay, RelayError},
    cgroup,
};

/// Port of the API relay on the underlay's control-plane address (the
/// kube-apiserver's usual secure port).
pub const API_RELAY_PORT: u16 = 6443;
/// How long the teardown waits for a cluster's namespace controller to
/// remove the testbed's namespaces.
const NAMESPACE_DELETION_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// A Terminating namespace still without status conditions after this has
/// no namespace controller working on it (the controller reports its
/// progress there from its first pass).
const NAMESPACE_CONTROLLER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
const NAMESPACE_POLL: std::time::Duration = std::time::Duration::from_millis(250);
/// Lifetime requested for every token the testbed mints (a real server
/// accepts any value of at least 10 minutes unless capped by
/// `--service-account-max-token-expiration`).
const TOKEN_LIFETIME_SECS: i64 = 24 * 3600;
/// Image name of the testbed's pods: nothing pulls it, but the API requires one.
const POD_IMAGE: &str = "sealmesh.io/testbed/pod:none";
/// The one container of every testbed pod.
const CONTAINER_NAME: &str = "app";
/// Field manager / event source the testbed writes as.
const FIELD_MANAGER: &str = "sealmesh-testbed";
/// Label every object the testbed creates carries (and its value).
const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label the endpoint-slice controller puts on the slices it manages.
const ENDPOINTSLICE_MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const ENDPOINTSLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";
/// Files of `deploy/base` the testbed applies.
const RBAC_FILES: [&str; 2] = ["agent-rbac.yaml", "identity-rbac.yaml"];
/// The AuthorizationPolicy CRD in `deploy/base`.
const AUTHZ_CRD_FILE: &str = "authorizationpolicy-crd.yaml";
/// How long a created CRD may take to be Established and served (a real
/// server's controllers take milliseconds).
const CRD_ESTABLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const CRD_POLL: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum TestbedKubeError {
    #[error("cannot start the tokio runtime for the Kubernetes client: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the in-process fake API server: {0:#}")]
    FakeServer(anyhow::Error),
    #[error("cannot load kubeconfig {path}: {source} (set KUBECONFIG to a readable kubeconfig)")]
    Kubeconfig {
        path: PathBuf,
        source: Box<kube::config::KubeconfigError>,
    },
    #[error("cannot build a Kubernetes client from {path}: {source}")]
    Client {
        path: PathBuf,
        source: Box<kube::Error>,
    },
    #[error(
        "the API server address {server} of {path} does not resolve to a socket address: {reason}"
    )]
    ServerAddress {
        path: PathBuf,
        server: String,
        reason: String,
    },
    #[error(
        "{what}: {source} (check that the API server is up and the kubeconfig's user may do this)"
    )]
    Api {
        what: String,
        source: Box<kube::Error>,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a YAML stream of Kubernetes objects: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error(
        "the API server has no pod {namespace}/{name}: create it with KubeCluster::create_pod first"
    )]
    NoSuchPod { namespace: String, name: String },
    #[error(
        "CustomResourceDefinition {name} is not Established and served after {waited:?}: see its status conditions (`kubectl get crd {name} -o yaml`)"
    )]
    CrdNotEstablished {
        name: String,
        waited: std::time::Duration,
    },
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Testbed(#[from] TestbedError),
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> TestbedKubeError {
    let what = what.into();
    move |source| TestbedKubeError::Api {
        what,
        source: Box::new(source),
    }
}

/// HTTP status of an API error (`None` for transport errors).
fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

/// Which API server the testbed registers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeApi {
    /// Start `fake-apiserver` in this process.
    Fake,
    /// An external API server (e.g. a real kube-apiserver) and admin
    /// credentials for it, from this kubeconfig.
    Kubeconfig(PathBuf),
}

/// kubelet's `--cgroup-driver`: how pod cgroups are named.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid with _>.slice`,
    /// containers in `cri-containerd-<id>.scope`.
    #[default]
    Systemd,
    /// `kubepods/besteffort/pod<uid>`, containers in `<id>`.
    Cgroupfs,
}

impl CgroupDriver {
    /// A BestEffort pod's cgroup, relative to the node's cgroup root (every
    /// testbed pod is BestEffort: it has no resource requests).
    pub fn pod_cgroup(self, uid: &str) -> PathBuf {
        match self {
            Self::Systemd => PathBuf::from(format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
                uid.replace('-', "_")
            )),
            Self::Cgroupfs => PathBuf::from(format!("kubepods/besteffort/pod{uid}")),
        }
    }

    /// A container's cgroup, relative to its pod's (containerd's naming).
    pub fn container_cgroup(self, container_id: &str) -> String {
        match self {
            Self::Systemd => format!("cri-containerd-{container_id}.scope"),
            Self::Cgroupfs => container_id.to_owned(),
        }
    }
}

/// How the testbed runs in Kubernetes mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeMode {
    pub api: KubeApi,
    pub cgroup_driver: CgroupDriver,
    /// Pods (namespace, name) of the spec that get their network and address
    /// but are not created in the API at start-up: tests create them later
    /// with [`KubeCluster::create_pod`].
    pub pending_pods: Vec<(String, String)>,
    /// The fake API server's `--service-cluster-ip-range` (an external
    /// server has its own): Services get their ClusterIPs from it, not the
    /// testbed's addresses.
    pub fake_service_range: Ipv4Net,
}

impl KubeMode {
    /// The in-process fake API server, systemd cgroup naming.
    pub fn fake() -> Self {
        Self {
            api: KubeApi::Fake,
            cgroup_driver: CgroupDriver::Systemd,
            pending_pods: Vec::new(),
            fake_service_range: fake_apiserver::DEFAULT_SERVICE_RANGE,
        }
    }

    /// An external API server through `kubeconfig`, systemd cgroup naming.
    pub fn external(kubeconfig: impl Into<PathBuf>) -> Self {
        Self {
            api: KubeApi::Kubeconfig(kubeconfig.into()),
            ..Self::fake()
        }
    }

    fn is_pending(&self, namespace: &str, name: &str) -> bool {
        self.pending_pods
            .iter()
            .any(|(ns, n)| ns == namespace && n == name)
    }
}

/// The mesh's PKI as the cluster stores it: the trust-roots ConfigMap and the
/// issuer Secret.
pub struct KubePki<'a> {
    /// PEM bundle of trust anchors.
    pub trust_anchors_pem: &'a [u8],
    pub issuer: &'a CaMaterial,
    /// `Tls`: a `kubernetes.io/tls` Secret (`tls.crt`/`tls.key`/`ca.crt`) as
    /// cert-manager writes it; `Pem`: an Opaque Secret with `crt.pem`/`key.pem`.
    pub issuer_layout: PkiLayout,
}

/// Facts about a pod the testbed registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredPod {
    pub uid: String,
    pub node: String,
    /// The pod's cgroup (kubelet naming) ...
    pub pod_cgroup: PathBuf,
    /// ... and its container's, where the pod's processes run.
    pub container_cgroup: PathBuf,
    /// The container's id, as its runtime reports it.
    pub container_id: String,
    /// Whether the kubelet reported it Running (with its IP).
    pub running: bool,
}

/// An object the testbed created, for removal from external servers.
#[derive(Clone, Debug)]
struct Created {
    resource: ApiResource,
    namespace: Option<String>,
    name: String,
}

/// How long the kubelet stand-in waits for a pod's port to accept (loopback:
/// it answers or refuses at once).
const PORT_FORWARD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// How to reach the API server from the host and how components should
/// reach it through the relay.
struct Upstream {
    addr: SocketAddr,
    scheme: &'static str,
    /// Cluster fields kept for component kubeconfigs (CA, TLS server name).
    tls: serde_json::Map<String, Value>,
}

/// The kubelets' part of `pods/portforward` for the fake API server: a
/// connection to `127.0.0.1:<port>` inside the pod's network namespace (the
/// node's for the host-network agent pods), opened by a thread that entered
/// it. Pods are those of the cluster file and the agent Pods at start.
fn port_forwarder(testbed: &Testbed) -> fake_apiserver::PortForwarder {
    let control_namespace = testbed.cluster().control_namespace.clone();
    let mut netns_of: BTreeMap<(String, String), String> = testbed
        .cluster()
        .pods
        .iter()
        .filter_map(|pod| {
            let netns = pod.netns.clone()?;
            Some(((pod.namespace.clone(), pod.name.clone()), netns))
        })
        .collect();
    for node in &testbed.cluster().nodes {
        if let Some(netns) = &node.netns {
            netns_of.insert(
                (
                    control_namespace.clone(),
                    KubeCluster::agent_pod_name(&node.name),
                ),
                netns.clone(),
            );
        }
    }
    let netns_of = std::sync::Arc::new(netns_of);
    std::sync::Arc::new(move |namespace: String, pod: String, port: u16| {
        let netns = netns_of.get(&(namespace.clone(), pod.clone())).cloned();
        Box::pin(async move {
            let netns = netns.ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("pod {namespace}/{pod} runs on no testbed node"),
                )
            })?;
            let stream = tokio::task::spawn_blocking(move || {
                super::netns::run_in_netns(&netns, || {
                    std::net::TcpStream::connect_timeout(
                        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                        PORT_FORWARD_CONNECT_TIMEOUT,
                    )
                })
                .map_err(std::io::Error::other)?
            })
            .await
            .map_err(std::io::Error::other)??;
            stream.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(stream)
        }) as futures::future::BoxFuture<'static, std::io::Result<tokio::net::TcpStream>>
    })
}

/// The testbed's registration with a Kubernetes API server. Dropping it
/// stops the relay (and the fake server) and, on an external server, deletes
/// what it created.
pub struct KubeCluster {
    relay: Option<ApiRelay>,
    fake: Option<FakeApiServer>,
    client: Client,
    external: bool,
    mode: KubeMode,
    control_namespace: String,
    dir: PathBuf,
    upstream_tls: serde_json::Map<String, Value>,
    upstream_scheme: &'static str,
    pods: BTreeMap<(String, String), RegisteredPod>,
    /// Each node's agent Pod, by node name.
    agent_pods: BTreeMap<String, RegisteredPod>,
    created: Vec<Created>,
    /// Runtime of the client, the fake server and the relay: dropped last.
    runtime: tokio::runtime::Runtime,
}

impl fmt::Debug for KubeCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeCluster")
            .field("api", &self.mode.api)
            .field("relay", &self.relay)
            .field("cgroup_driver", &self.mode.cgroup_driver)
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

impl KubeCluster {
    /// Registers `testbed` with the API server `mode` names (see the module
    /// docs), starts the API relay in the underlay, creates pod cgroups and
    /// records them in the testbed's cluster file, and writes component
    /// credentials under `<state dir>/kube/`. The testbed must have been
    /// built with [`Testbed::up_for_kubelet`].
    pub fn start(
        testbed: &mut Testbed,
        mode: KubeMode,
        pki: &KubePki,
    ) -> Result<Self, TestbedKubeError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-testbed")
            .enable_all()
            .build()
            .map_err(TestbedKubeError::Runtime)?;
        let (fake, client, upstream) = match &mode.api {
            KubeApi::Fake => {
                let fake = runtime
                    .block_on(FakeApiServer::start_with_service_range(
                        mode.fake_service_range,
                    ))
                    .map_err(TestbedKubeError::FakeServer)?;
                let client = {
                    let _runtime = runtime.enter();
                    fake.client()
                };
                let upstream = Upstream {
                    addr: fake.addr(),
                    scheme: "http",
                    tls: serde_json::Map::new(),
                };
                (Some(fake), client, upstream)
            }
            KubeApi::Kubeconfig(path) => {
                let (client, upstream) = runtime.block_on(external_client(path))?;
                (None, client, upstream)
            }
        };
        let dir = testbed.state_dir().join("kube");
        std::fs::create_dir_all(&dir).map_err(|source| TestbedKubeError::Io {
            what: "cannot create",
            path: dir.clone(),
            source,
        })?;
        if let Some(fake) = &fake {
            fake.set_port_forwarder(port_forwarder(testbed));
        }
        let relay = ApiRelay::start(
            runtime.handle(),
            &testbed.underlay_netns(),
            SocketAddr::from((testbed.control_plane_ip(), API_RELAY_PORT)),
            upstream.addr,
        )?;
        let mut cluster = Self {
            relay: Some(relay),
            fake,
            client,
            external: matches!(mode.api, KubeApi::Kubeconfig(_)),
            control_namespace: testbed.cluster().control_namespace.clone(),
            mode,
            dir,
            upstream_tls: upstream.tls,
            upstream_scheme: upstream.scheme,
            pods: BTreeMap::new(),
            agent_pods: BTreeMap::new(),
            created: Vec::new(),
            runtime,
        };
        cluster.provision(testbed, pki)?;
        Ok(cluster)
    }

    /// Admin client of the API server (use with [`KubeCluster::block_on`]).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs a future on the cluster's runtime (the testbed is synchronous).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// The in-process fake API server, if the testbed started one.
    pub fn fake_server(&self) -> Option<&FakeApiServer> {
        self.fake.as_ref()
    }

    /// Where components reach the API server (the relay in the underlay).
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay
            .as_ref()
            .expect("the relay runs until drop")
            .listen_addr()
    }

    pub fn control_namespace(&self) -> &str {
        &self.control_namespace
    }

    /// The agent of `node`'s kubeconfig.
    pub fn agent_kubeconfig(&self, node: &str) -> PathBuf {
        self.dir.join(format!("agent-{node}.kubeconfig"))
    }

    /// The identity service's kubeconfig.
    pub fn identity_kubeconfig(&self) -> PathBuf {
        self.dir.join("identity.kubeconfig")
    }

    /// Name of the agent Pod of `node`.
    pub fn agent_pod_name(node: &str) -> String {
        format!("{AGENT_DAEMONSET}-{node}")
    }

    /// The agent Pod of `node`: its UID (the DaemonSet passes it to the
    /// agent as `SEALMESH_POD_UID`) and cgroups (where the agent runs).
    pub fn agent_pod(&self, node: &str) -> Option<&RegisteredPod> {
        self.agent_pods.get(node)
    }

    /// A pod the testbed registered (absent for pending or deleted pods).
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&RegisteredPod> {
        self.pods.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// Events in the control namespace with this `reason` (field selector,
    /// as `kubectl get events --field-selector reason=...`).
    pub fn events(&self, reason: &str) -> Result<Vec<Event>, TestbedKubeError> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.control_namespace);
        let list = self
            .block_on(api.list(&ListParams::default().fields(&format!("reason={reason}"))))
            .map_err(api_err(format!("listing events with reason {reason}")))?;
        Ok(list.items)
    }

    /// Replaces the issuer Secret's data (an issuer rotation). A Secret's
    /// type is immutable, so `layout` must be the one the mesh started with.
    pub fn update_issuer(
        &self,
        issuer: &CaMaterial,
        layout: PkiLayout,
    ) -> Result<(), TestbedKubeError> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.control_namespace);
        let what = format!(
            "replacing Secret {}/{ISSUER_SECRET}",
            self.control_namespace
        );
        self.block_on(async {
            let current = api.get(ISSUER_SECRET).await?;
            let mut secret = issuer_secret(&self.control_namespace, issuer, layout);
            secret.metadata.resource_version = current.metadata.resource_version;
            api.replace(ISSUER_SECRET, &post_params(), &secret).await
        })
        .map_err(api_err(what))?;
        Ok(())
    }

    /// Replaces the trust-roots ConfigMap's bundle.
    pub fn update_trust_roots(&self, bundle_pem: &[u8]) -> Result<(), TestbedKubeError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.control_namespace);
        let patch = json!({ "data": { TRUST_ROOTS_KEY: String::from_utf8_lossy(bundle_pem) } });
        self.block_on(api.patch(
            TRUST_ROOTS_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(patch),
        ))
        .map_err(api_err(format!(
            "updating ConfigMap {TRUST_ROOTS_CONFIGMAP}"
        )))?;
        Ok(())
    }

    /// Creates a pod of the cluster file in the API as the scheduler and
    /// kubelet would (object with `spec.nodeName`, cgroup, then status), and
    /// refreshes the EndpointSlices of Services selecting it.
    pub fn create_pod(
        &mut self,
        testbed: &mut Testbed,
        namespace: &str,
        name: &str,
    ) -> Result<&RegisteredPod, TestbedKubeError> {
        self.schedule_pod(testbed, namespace, name)?;
        self.report_running(testbed, namespace, name)
    }

    /// The first half of [`KubeCluster::create_pod`]: the pod as the
    /// scheduler binds it and its kubelet starts it (the object with
    /// `spec.nodeName`, then the pod's and its container's cgroups), before
    /// the kubelet reports any status (Pending, no IP). Processes can run in
    /// it from here on, as init containers and apps do in a real pod.
    pub fn schedule_pod(
        &mut self,
        testbed: &mut Testbed,
        namespace: &str,
        name: &str,
    ) -> Result<&RegisteredPod, TestbedKubeError> {
        let pod = testbed.pod(namespace, name)?.clone();
        let node_cgroup = testbed.node(&pod.node)?.cgroup.clone();
        let registered = self.block_on(self.register_pod(&pod, &node_cgroup))?;
        testbed.set_pod_cgroup(namespace, name, registered.container_cgroup.clone())?;
        let key = (namespace.to_owned(), name.to_owned());
        self.pods.insert(key.clone(), registered);
        Ok(&self.pods[&key])
    }

    /// The second half of [`KubeCluster::create_pod`]: the kubelet reports a
    /// scheduled pod Running with its IP; EndpointSlices follow.
    pub fn report_running(
        &mut self,
        testbed: &Testbed,
        namespace: &str,
        name: &str,
    ) -> Result<&RegisteredPod, TestbedKubeError> {
        let key = (namespace.to_owned(), name.to_owned());
        let registered = self
            .pods
            .get(&key)
            .ok_or_else(|| TestbedKubeError::NoSuchPod {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        let pod = testbed.pod(namespace, name)?;
        let node_ip = testbed.node(&pod.node)?.ip;
        self.block_on(self.patch_pod_status(
            namespace,
            name,
            pod.ip,
            node_ip,
            &registered.container_id,
        ))?;
        if let Some(registered) = self.pods.get_mut(&key) {
            registered.running = true;
        }
        self.block_on(self.sync_endpoint_slices(testbed.cluster()))?;
        Ok(&self.pods[&key])
    }

    /// Deletes a pod as `kubectl delete --grace-period=0` and its kubelet
    /// would: the API object goes, its processes are killed and its cgroup is
    /// removed, and EndpointSlices drop it.
    pub fn delete_pod(
        &mut self,
        testbed: &Testbed,
        namespace: &str,
        name: &str,
    ) -> Result<(), TestbedKubeError> {
        let registered = self
            .pods
            .remove(&(namespace.to_owned(), name.to_owned()))
            .ok_or_else(|| TestbedKubeError::NoSuchPod {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })?;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        self.block_on(api.delete(name, &DeleteParams::default().grace_period(0)))
            .map_err(api_err(format!("deleting Pod {namespace}/{name}")))?;
        let cgroup_error = |problem: String| TestbedKubeError::Io {
            what: "cannot remove pod cgroup",
            path: registered.pod_cgroup.clone(),
            source: std::io::Error::other(problem),
        };
        cgroup::kill_all(&registered.pod_cgroup).map_err(cgroup_error)?;
        cgroup::remove_tree(&registered.pod_cgroup).map_err(cgroup_error)?;
        self.block_on(self.sync_endpoint_slices(testbed.cluster()))
    }

    fn provision(&mut self, testbed: &mut Testbed, pki: &KubePki) -> Result<(), TestbedKubeError> {
        let cluster = testbed.cluster().clone();
        // A handle, not `self.block_on`: the futures borrow `self` mutably.
        let runtime = self.runtime.handle().clone();
        runtime.block_on(self.provision_objects(&cluster, pki))?;
        runtime.block_on(self.register_agent_daemonset())?;
        // Agent pods first: their UIDs bind the agents' tokens.
        for node in &cluster.nodes {
            let agent = runtime.block_on(self.register_agent_pod(node))?;
            self.write_agent_credentials(node, &agent.uid)?;
            self.agent_pods.insert(node.name.clone(), agent);
        }
        self.write_identity_credentials()?;
        for pod in &cluster.pods {
            if self.mode.is_pending(&pod.namespace, &pod.name) {
                continue;
            }
            let node = testbed.node(&pod.node)?.clone();
            let mut registered = self.block_on(self.register_pod(pod, &node.cgroup))?;
            self.block_on(self.patch_pod_status(
                &pod.namespace,
                &pod.name,
                pod.ip,
                node.ip,
                &registered.container_id,
            ))?;
            registered.running = true;
            testbed.set_pod_cgroup(
                &pod.namespace,
                &pod.name,
                registered.container_cgroup.clone(),
            )?;
            self.pods
                .insert((pod.namespace.clone(), pod.name.clone()), registered);
        }
        for service in &cluster.services {
            let cluster_ip = runtime.block_on(self.register_service(service))?;
            if cluster_ip != service.vip {
                testbed.set_service_vip(&service.namespace, &service.name, cluster_ip)?;
            }
        }
        self.block_on(self.sync_endpoint_slices(testbed.cluster()))?;
        tracing::info!(
            api = ?self.mode.api,
            relay = %self.relay_addr(),
            pods = self.pods.len(),
            "testbed registered with the Kubernetes API"
        );
        Ok(())
    }

    async fn provision_objects(
        &mut self,
        cluster: &ClusterFile,
        pki: &KubePki<'_>,
    ) -> Result<(), TestbedKubeError> {
        // First, so the server establishes it while the rest is created.
        let crd = self
            .apply_manifest(&deploy_base_dir().join(AUTHZ_CRD_FILE))
            .await?;
        let control = self.control_namespace.clone();
        self.ensure(
            None,
            namespace_object(&control, &BTreeMap::new(), &BTreeMap::new()),
        )
        .await?;
        for ns in &cluster.namespaces {
            self.ensure(
                None,
                namespace_object(&ns.name, &ns.labels, &ns.annotations),
            )
            .await?;
        }
        let mut service_accounts: BTreeSet<(String, String)> = [
            (control.clone(), AGENT_SERVICE_ACCOUNT.to_owned()),
            (control.clone(), IDENTITY_NAME.to_owned()),
        ]
        .into();
        // Without a controller-manager nobody creates `default` accounts, so
        // every account a pod names is created here.
        service_accounts.extend(
            cluster
                .service_accounts
                .iter()
                .map(|sa| (sa.namespace.clone(), sa.name.clone())),
        );
        service_accounts.extend(
            cluster
                .pods
                .iter()
                .map(|p| (p.namespace.clone(), p.service_account.clone())),
        );
        for (namespace, name) in &service_accounts {
            self.ensure(
                Some(namespace),
                json!({
                    "apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": { "name": name, "namespace": namespace, "labels": managed_labels() },
                }),
            )
            .await?;
        }
        for file in RBAC_FILES {
            self.apply_manifest(&deploy_base_dir().join(file)).await?;
        }
        for node in &cluster.nodes {
            self.register_node(node).await?;
        }
        self.replace(
            Some(&control),
            json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": TRUST_ROOTS_CONFIGMAP, "namespace": control, "labels": managed_labels() },
                "data": { TRUST_ROOTS_KEY: String::from_utf8_lossy(pki.trust_anchors_pem) },
            }),
        )
        .await?;
        let secret = issuer_secret(&control, pki.issuer, pki.issuer_layout);
        self.replace(
            Some(&control),
            serde_json::to_value(&secret).expect("Secret serialises"),
        )
        .await?;
        self.replace(Some(&control), identity_deployment(&control))
            .await?;
        if let Some(identity) = &cluster.identity {
            self.register_identity_service(&control, identity.address)
                .await?;
        }
        for name in crd {
            self.await_established(&name).await?;
        }
        for policy in &cluster.authorization_policies {
            self.replace(Some(&policy.namespace), policy_object(policy))
                .await?;
        }
        Ok(())
    }

    /// Waits until the CRD `name` is Established and its resource is in
    /// discovery: a real server serves it a moment after creating it.
    async fn await_established(&self, name: &str) -> Result<(), TestbedKubeError> {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let started = std::time::Instant::now();
        loop {
            let crd = api
                .get(name)
                .await
                .map_err(api_err(format!("reading CustomResourceDefinition {name}")))?;
            let established = crd
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            let served = match crd.spec.versions.iter().find(|v| v.served) {
                Some(version) if established => {
                    let gvk =
                        GroupVersionKind::gvk(&crd.spec.group, &version.name, &crd.spec.names.kind);
                    discovery::pinned_kind(&self.client, &gvk).await.is_ok()
                }
                _ => false,
            };
            if served {
                return Ok(());
            }
            if started.elapsed() >= CRD_ESTABLISH_WAIT {
                return Err(TestbedKubeError::CrdNotEstablished {
                    name: name.to_owned(),
                    waited: CRD_ESTABLISH_WAIT,
                });
            }
            tokio::time::sleep(CRD_POLL).await;
        }
    }

    /// Creates an AuthorizationPolicy, or replaces the one of that name in
    /// place (one update, as `kubectl apply` makes it: watchers never see
    /// the namespace without it).
    pub fn apply_authorization_policy(
        &mut self,
        policy: &AuthorizationPolicy,
    ) -> Result<(), TestbedKubeError> {
        let runtime = self.runtime.handle().clone();
        runtime.block_on(self.put_authorization_policy(policy))
    }

    async fn put_authorization_policy(
        &mut self,
        policy: &AuthorizationPolicy,
    ) -> Result<(), TestbedKubeError> {
        let (api, resource, name, namespace) = self
            .dynamic_api(Some(&policy.namespace), &policy_object(policy))
            .await?;
        let mut object: DynamicObject = from_json(policy_object(policy))?;
        let what = |verb: &str| format!("{verb} {} {}/{name}", authz::KIND, policy.namespace);
        match api.get_opt(&name).await.map_err(api_err(what("reading")))? {
            Some(current) => {
                object.metadata.resource_version = current.metadata.resource_version;
                api.replace(&name, &post_params(), &object)
                    .await
                    .map_err(api_err(what("replacing")))?;
            }
            None => {
                api.create(&post_params(), &object)
                    .await
                    .map_err(api_err(what("creating")))?;
                self.record(resource, namespace.as_deref(), &name);
            }
        }
        Ok(())
    }

    /// Deletes an AuthorizationPolicy.
    pub fn delete_authorization_policy(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<(), TestbedKubeError> {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(authz::API_GROUP, authz::API_VERSION, authz::KIND),
            authz::PLURAL,
        );
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &resource);
        self.block_on(api.delete(name, &DeleteParams::default()))
            .map_err(api_err(format!(
                "deleting {} {namespace}/{name}",
                authz::KIND
            )))?;
        Ok(())
    }

    /// The identity service's Service, where agents find it through the API
    /// (no cluster DNS): selectorless, with the testbed's identity address
    /// as its one endpoint (the address the testbed runs it at, in the
    /// underlay), so no endpoint controller competes for it.
    async fn register_identity_service(
        &mut self,
        namespace: &str,
        address: SocketAddr,
    ) -> Result<(), TestbedKubeError> {
        let port = json!({ "name": "grpc", "port": address.port(), "protocol": "TCP" });
        self.replace(
            Some(namespace),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": { "name": IDENTITY_NAME, "namespace": namespace, "labels": managed_labels() },
                "spec": { "type": "ClusterIP", "ports": [port] },
            }),
        )
        .await?;
        self.replace(
            Some(namespace),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "name": IDENTITY_NAME, "namespace": namespace,
                    "labels": {
                        ENDPOINTSLICE_SERVICE_LABEL: IDENTITY_NAME,
                        ENDPOINTSLICE_MANAGED_BY_LABEL: FIELD_MANAGER,
                        MANAGED_BY_LABEL: FIELD_MANAGER,
                    },
                },
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": [address.ip().to_string()],
                    "conditions": { "ready": true, "serving": true, "terminating": false },
                }],
                "ports": [port],
            }),
        )
        .await?;
        Ok(())
    }

    /// Creates `object`; one that already exists is kept as it is (shared
    /// objects: namespaces, accounts, RBAC, nodes).
    async fn ensure(
        &mut self,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<(), TestbedKubeError> {
        let (api, resource, name, namespace) = self.dynamic_api(namespace, &object).await?;
        let object: DynamicObject = from_json(object)?;
        match api.create(&post_params(), &object).await {
            Ok(_) => {
                self.record(resource, namespace.as_deref(), &name);
                Ok(())
            }
            Err(e) if status_code(&e) == Some(409) => Ok(()),
            Err(e) => Err(api_err(format!("creating {} {name}", resource.kind))(e)),
        }
    }

    /// Creates `object`, replacing a leftover of an earlier run (delete,
    /// then create), and returns it as the server stored it.
    async fn replace(
        &mut self,
        namespace: Option<&str>,
        object: Value,
    ) -> Result<DynamicObject, TestbedKubeError> {
        let (api, resource, name, namespace) = self.dynamic_api(namespace, &object).await?;
        let object: DynamicObject = from_json(object)?;
        let what = || format!("creating {} {name}", resource.kind);
        let created = match api.create(&post_params(), &object).await {
            Err(e) if status_code(&e) == Some(409) => {
                api.delete(&name, &DeleteParams::default().grace_period(0))
                    .await
                    .map_err(api_err(format!(
                        "deleting leftover {} {name}",
                        resource.kind
                    )))?;
                api.create(&post_params(), &object).await
            }
            other => other,
        }
        .map_err(api_err(what()))?;
        self.record(resource, namespace.as_deref(), &name);
        Ok(created)
    }

    fn record(&mut self, resource: ApiResource, namespace: Option<&str>, name: &str) {
        self.created.push(Created {
            resource,
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
        });
    }

    /// The API for `object`'s apiVersion/kind (discovered, so the plural and
    /// scope are the server's), its resource and its name.
    async fn dynamic_api(
        &self,
        namespace: Option<&str>,
        object: &Value,
    ) -> Result<(Api<DynamicObject>, ApiResource, String, Option<String>), TestbedKubeError> {
        let field = |name: &str| object[name].as_str().unwrap_or_default().to_owned();
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
        let gvk = GroupVersionKind::gvk(group, version, &kind);
        let (resource, capabilities) = discovery::pinned_kind(&self.client, &gvk)
            .await
            .map_err(api_err(format!("discovering {api_version} {kind}")))?;
        let namespace = match capabilities.scope {
            Scope::Namespaced => Some(namespace.unwrap_or(&self.control_namespace).to_owned()),
            Scope::Cluster => None,
        };
        let api = match &namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        Ok((api, resource, name, namespace))
    }

    /// Applies every object of a YAML stream (`---`-separated documents);
    /// namespaced objects without a namespace go to the control namespace.
    /// Returns the objects' names.
    async fn apply_manifest(&mut self, path: &Path) -> Result<Vec<String>, TestbedKubeError> {
        let text = std::fs::read_to_string(path).map_err(|source| TestbedKubeError::Io {
            what: "cannot read manifest",
            path: path.to_owned(),
            source,
        })?;
        let mut names = Vec::new();
        for object in parse_manifest(path, &text)? {
            let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
            names.push(
                object["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
            self.ensure(namespace.as_deref(), object).await?;
        }
        Ok(names)
    }

    async fn register_node(&mut self, node: &cluster::Node) -> Result<(), TestbedKubeError> {
        self.replace(
            None,
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {
                    "name": node.name,
                    "labels": {
                        "kubernetes.io/hostname": node.name,
                        "kubernetes.io/os": "linux",
                        MANAGED_BY_LABEL: FIELD_MANAGER,
                    },
                },
                "spec": { "podCIDR": node.pod_cidr.to_string(), "podCIDRs": [node.pod_cidr.to_string()] },
            }),
        )
        .await?;
        let now = now_rfc3339();
        let api: Api<Node> = Api::all(self.client.clone());
        api.patch_status(
            &node.name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {
                    "addresses": [
                        { "type": "InternalIP", "address": node.ip.to_string() },
                        { "type": "Hostname", "address": node.name },
                    ],
                    "conditions": [{
                        "type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": now, "lastTransitionTime": now,
                    }],
                },
            })),
        )
        .await
        .map_err(api_err(format!("patching Node {} status", node.name)))?;
        Ok(())
    }

    /// Creates the agents' DaemonSet, which a stopping agent asks about (its
    /// deletion means sealmesh is being removed). The testbed runs the agent
    /// pods itself: the DaemonSet selects no node, so a real API server's
    /// controller creates no pods for it.
    async fn register_agent_daemonset(&mut self) -> Result<(), TestbedKubeError> {
        let control = self.control_namespace.clone();
        let labels = json!({ "app.kubernetes.io/name": AGENT_DAEMONSET });
        let object = json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": { "name": AGENT_DAEMONSET, "namespace": control, "labels": managed_labels() },
            "spec": {
                "selector": { "matchLabels": labels },
                "template": {
                    "metadata": { "labels": labels },
                    "spec": {
                        "nodeSelector": { "sealmesh.io/testbed-runs-agents-itself": "true" },
                        "containers": [{ "name": "agent", "image": "sealmesh-agent:testbed" }],
                    },
                },
            },
        });
        self.replace(Some(&control), object).await?;
        Ok(())
    }

    /// Reports how many of the node agents run, in the DaemonSet's status,
    /// as its controller would (the testbed runs them itself).
    pub fn report_agents_ready(&self, ready: usize) -> Result<(), TestbedKubeError> {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let desired = self.agent_pods.len();
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.control_namespace);
        let status = json!({ "status": {
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": desired,
            "updatedNumberScheduled": desired,
            "numberMisscheduled": 0,
            "numberReady": ready,
            "numberAvailable": ready,
            "numberUnavailable": desired.saturating_sub(ready),
        }});
        match self.block_on(api.patch_status(
            AGENT_DAEMONSET,
            &PatchParams::default(),
            &Patch::Merge(status),
        )) {
            Ok(_) => Ok(()),
            // Deleted (uninstall tests): nothing to report on.
            Err(e) if status_code(&e) == Some(404) => Ok(()),
            Err(e) => Err(api_err(format!(
                "reporting DaemonSet {AGENT_DAEMONSET} status"
            ))(e)),
        }
    }

    /// Reports whether the identity service runs, in its Deployment's status.
    pub fn report_identity_available(&self, available: bool) -> Result<(), TestbedKubeError> {
        use k8s_openapi::api::apps::v1::Deployment;
        let ready = usize::from(available);
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.control_namespace);
        let condition = json!({
            "type": "Available",
            "status": if available { "True" } else { "False" },
            "reason": if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" },
            "lastTransitionTime": now_rfc3339(),
        });
        let status = json!({ "status": {
            "replicas": 1, "updatedReplicas": 1,
            "readyReplicas": ready, "availableReplicas": ready,
            "unavailableReplicas": 1 - ready,
            "conditions": [condition],
        }});
        self.block_on(api.patch_status(
            IDENTITY_NAME,
            &PatchParams::default(),
            &Patch::Merge(status),
        ))
        .map(drop)
        .map_err(api_err(format!(
            "reporting Deployment {IDENTITY_NAME} status"
        )))
    }

    /// Deletes the agents' DaemonSet, as uninstalling sealmesh does.
    pub fn delete_agent_daemonset(&self) -> Result<(), TestbedKubeError> {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), &self.control_namespace);
        self.block_on(api.delete(AGENT_DAEMONSET, &DeleteParams::default()))
            .map(drop)
            .map_err(api_err(format!("deleting DaemonSet {AGENT_DAEMONSET}")))
    }

    /// Deletes the agents' RoleBinding in the control namespace (their
    /// access to the trust roots and their DaemonSet), as uninstalling
    /// sealmesh does.
    pub fn delete_agent_role_binding(&self) -> Result<(), TestbedKubeError> {
        use k8s_openapi::api::rbac::v1::RoleBinding;
        let api: Api<RoleBinding> = Api::namespaced(self.client.clone(), &self.control_namespace);
        self.block_on(api.delete(AGENT_SERVICE_ACCOUNT, &DeleteParams::default()))
            .map(drop)
            .map_err(api_err(format!(
                "deleting RoleBinding {AGENT_SERVICE_ACCOUNT}"
            )))
    }

    /// Creates the agent Pod of `node` (host network, Running) and its
    /// cgroups, where the agent runs as in a DaemonSet pod.
    async fn register_agent_pod(
        &mut self,
        node: &cluster::Node,
    ) -> Result<RegisteredPod, TestbedKubeError> {
        let control = self.control_namespace.clone();
        let name = Self::agent_pod_name(&node.name);
        let mut object = pod_object(
            &control,
            &name,
            AGENT_SERVICE_ACCOUNT,
            &node.name,
            &[(
                "app.kubernetes.io/name".to_owned(),
                AGENT_DAEMONSET.to_owned(),
            )]
            .into(),
            &BTreeMap::new(),
        );
        object["spec"]["hostNetwork"] = json!(true);
        let created = self.replace(Some(&control), object).await?;
        let uid = created.uid().unwrap_or_default();
        let container_id = random_container_id();
        let pod_cgroup = node.cgroup.join(self.mode.cgroup_driver.pod_cgroup(&uid));
        let container_cgroup =
            pod_cgroup.join(self.mode.cgroup_driver.container_cgroup(&container_id));
        cgroup::create(&container_cgroup)?;
        self.patch_pod_status(&control, &name, node.ip, node.ip, &container_id)
            .await?;
        Ok(RegisteredPod {
            uid,
            node: node.name.clone(),
            pod_cgroup,
            container_cgroup,
            container_id,
            running: true,
        })
    }

    /// Creates a workload pod bound to its node and its cgroups (no status
    /// yet); returns what the testbed needs to run processes in it.
    async fn register_pod(
        &self,
        pod: &cluster::Pod,
        node_cgroup: &Path,
    ) -> Result<RegisteredPod, TestbedKubeError> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let object: Pod = from_json(pod_object(
            &pod.namespace,
            &pod.name,
            &pod.service_account,
            &pod.node,
            &pod.labels,
            &pod.annotations,
        ))?;
        let created = match api.create(&post_params(), &object).await {
            Err(e) if status_code(&e) == Some(409) => {
                api.delete(&pod.name, &DeleteParams::default().grace_period(0))
                    .await
                    .map_err(api_err(format!(
                        "deleting leftover Pod {}/{}",
                        pod.namespace, pod.name
                    )))?;
                api.create(&post_params(), &object).await
            }
            other => other,
        }
        .map_err(api_err(format!(
            "creating Pod {}/{}",
            pod.namespace, pod.name
        )))?;
        let uid = created.uid().unwrap_or_default();
        // kubelet creates the pod cgroup once the pod is bound to its node,
        // then the container runtime the container's below it.
        let container_id = random_container_id();
        let pod_cgroup = node_cgroup.join(self.mode.cgroup_driver.pod_cgroup(&uid));
        let container_cgroup =
            pod_cgroup.join(self.mode.cgroup_driver.container_cgroup(&container_id));
        cgroup::create(&container_cgroup)?;
        Ok(RegisteredPod {
            uid,
            node: pod.node.clone(),
            pod_cgroup,
            container_cgroup,
            container_id,
            running: false,
        })
    }

    async fn patch_pod_status(
        &self,
        namespace: &str,
        name: &str,
        pod_ip: Ipv4Addr,
        host_ip: Ipv4Addr,
        container_id: &str,
    ) -> Result<(), TestbedKubeError> {
        let now = now_rfc3339();
        let condition =
            |kind: &str| json!({ "type": kind, "status": "True", "lastTransitionTime": now });
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "status": {
                    "phase": "Running",
                    "podIP": pod_ip.to_string(),
                    "podIPs": [{ "ip": pod_ip.to_string() }],
                    "hostIP": host_ip.to_string(),
                    "hostIPs": [{ "ip": host_ip.to_string() }],
                    "qosClass": "BestEffort",
                    "startTime": now,
                    "conditions": [
                        condition("PodReadyToStartContainers"),
                        condition("Initialized"),
                        condition("Ready"),
                        condition("ContainersReady"),
                        condition("PodScheduled"),
                    ],
                    "containerStatuses": [{
                        "name": CONTAINER_NAME,
                        "image": POD_IMAGE,
                        "imageID": "",
                        "containerID": format!("containerd://{container_id}"),
                        "ready": true,
                        "started": true,
                        "restartCount": 0,
                        "state": { "running": { "startedAt": now } },
                    }],
                },
            })),
        )
        .await
        .map_err(api_err(format!("patching Pod {namespace}/{name} status")))?;
        Ok(())
    }

    /// Creates a Service with the testbed's VIP as ClusterIP and returns
    /// the ClusterIP it got. A real API server refuses (422) a ClusterIP
    /// outside its `--service-cluster-ip-range` or already taken; then the
    /// Service is created without one and keeps the IP the server allocates.
    async fn register_service(
        &mut self,
        service: &cluster::Service,
    ) -> Result<Ipv4Addr, TestbedKubeError> {
        let multi = service.ports.len() > 1;
        let ports: Vec<Value> = service
            .ports
            .iter()
            .map(|p| {
                json!({
                    "name": service_port_name(p, multi),
                    "port": p.port,
                    "targetPort": p.target_port,
                    "protocol": "TCP",
                })
            })
            .collect();
        let mut object = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": { "name": service.name, "namespace": service.namespace, "labels": managed_labels() },
            "spec": {
                "type": "ClusterIP",
                "clusterIP": service.vip.to_string(),
                "clusterIPs": [service.vip.to_string()],
                "selector": service.selector,
                "ports": ports,
            },
        });
        let created = match self.replace(Some(&service.namespace), object.clone()).await {
            Err(TestbedKubeError::Api { what, source }) if status_code(&source) == Some(422) => {
                tracing::warn!(
                    service = %format!("{}/{}", service.namespace, service.name),
                    vip = %service.vip,
                    error = %source,
                    "the API server refused the testbed's ClusterIP; using the one it allocates ({what})"
                );
                let spec = object["spec"].as_object_mut().expect("spec is an object");
                spec.remove("clusterIP");
                spec.remove("clusterIPs");
                self.replace(Some(&service.namespace), object).await?
            }
            other => other?,
        };
        let allocated = created.data["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse().ok());
        allocated.ok_or_else(|| TestbedKubeError::Manifest {
            path: PathBuf::from(format!("Service {}/{}", service.namespace, service.name)),
            reason: format!(
                "the API server returned no IPv4 spec.clusterIP: {}",
                created.data["spec"]["clusterIP"]
            ),
        })
    }

    /// Writes every Service's EndpointSlice from the pods registered now, as
    /// the endpoint-slice controller would (one IPv4 slice per Service).
    async fn sync_endpoint_slices(&self, cluster: &ClusterFile) -> Result<(), TestbedKubeError> {
        for service in &cluster.services {
            let services: Api<Service> = Api::namespaced(self.client.clone(), &service.namespace);
            let stored = services.get(&service.name).await.map_err(api_err(format!(
                "reading Service {}/{}",
                service.namespace, service.name
            )))?;
            let endpoints: Vec<Value> = cluster
                .endpoints(service)
                .filter_map(|pod| {
                    let registered = self
                        .pod(&pod.namespace, &pod.name)
                        .filter(|registered| registered.running)?;
                    Some(json!({
                        "addresses": [pod.ip.to_string()],
                        "conditions": { "ready": true, "serving": true, "terminating": false },
                        "nodeName": pod.node,
                        "targetRef": {
                            "kind": "Pod", "namespace": pod.namespace,
                            "name": pod.name, "uid": registered.uid,
                        },
                    }))
                })
                .collect();
            let multi = service.ports.len() > 1;
            let ports: Vec<Value> = service
                .ports
                .iter()
                .map(|p| {
                    json!({
                        "name": service_port_name(p, multi),
                        "port": p.target_port,
                        "protocol": "TCP",
                    })
                })
                .collect();
            let slices: Api<EndpointSlice> =
                Api::namespaced(self.client.clone(), &service.namespace);
            let selector = format!("{ENDPOINTSLICE_SERVICE_LABEL}={}", service.name);
            let existing = slices
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(api_err(format!(
                    "listing EndpointSlices of {}",
                    service.name
                )))?;
            match existing.items.first() {
                Some(slice) => {
                    slices
                        .patch(
                            &slice.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(json!({ "endpoints": endpoints, "ports": ports })),
                        )
                        .await
                        .map_err(api_err(format!(
                            "updating EndpointSlice {}",
                            slice.name_any()
                        )))?;
                }
                None => {
                    let slice: EndpointSlice = from_json(json!({
                        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {
                            "generateName": format!("{}-", service.name),
                            "namespace": service.namespace,
                            "labels": {
                                ENDPOINTSLICE_SERVICE_LABEL: service.name,
                                ENDPOINTSLICE_MANAGED_BY_LABEL: ENDPOINTSLICE_CONTROLLER,
                                MANAGED_BY_LABEL: FIELD_MANAGER,
                            },
                            "ownerReferences": [{
                                "apiVersion": "v1", "kind": "Service", "name": service.name,
                                "uid": stored.uid().unwrap_or_default(),
                                "controller": true, "blockOwnerDeletion": true,
                            }],
                        },
                        "addressType": "IPv4",
                        "endpoints": endpoints,
                        "ports": ports,
                    }))?;
                    slices
                        .create(&post_params(), &slice)
                        .await
                        .map_err(api_err(format!(
                            "creating the EndpointSlice of {}",
                            service.name
                        )))?;
                }
            }
        }
        Ok(())
    }

    /// The agent's identity token (bound to its Pod, audience
    /// `identity.sealmesh.io`) into the node's token file, and its API
    /// credentials (bound too, default audience) into its kubeconfig.
    fn write_agent_credentials(
        &self,
        node: &cluster::Node,
        pod_uid: &str,
    ) -> Result<(), TestbedKubeError> {
        let pod = Self::agent_pod_name(&node.name);
        let bound = Some((pod.as_str(), pod_uid));
        let identity_token = self.block_on(self.request_token(
            AGENT_SERVICE_ACCOUNT,
            Some(IDENTITY_TOKEN_AUDIENCE),
            bound,
        ))?;
        let token_file = node
            .token_file
            .clone()
            .unwrap_or_else(|| self.dir.join(format!("{}.token", node.name)));
        write_secret_file(&token_file, identity_token.as_bytes())?;
        let api_token = self.block_on(self.request_token(AGENT_SERVICE_ACCOUNT, None, bound))?;
        write_secret_file(
            &self.agent_kubeconfig(&node.name),
            self.kubeconfig(AGENT_SERVICE_ACCOUNT, &api_token)
                .as_bytes(),
        )
    }

    fn write_identity_credentials(&self) -> Result<(), TestbedKubeError> {
        let token = self.block_on(self.request_token(IDENTITY_NAME, None, None))?;
        write_secret_file(
            &self.identity_kubeconfig(),
            self.kubeconfig(IDENTITY_NAME, &token).as_bytes(),
        )
    }

    /// TokenRequest for a ServiceAccount of the control namespace. No
    /// audience means the API server's own (the token is an API credential).
    async fn request_token(
        &self,
        service_account: &str,
        audience: Option<&str>,
        bound_pod: Option<(&str, &str)>,
    ) -> Result<String, TestbedKubeError> {
        let mut spec = json!({ "expirationSeconds": TOKEN_LIFETIME_SECS });
        if let Some(audience) = audience {
            spec["audiences"] = json!([audience]);
        }
        if let Some((name, uid)) = bound_pod {
            spec["boundObjectRef"] =
                json!({ "apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid });
        }
        let request: TokenRequest = from_json(json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "metadata": { "name": service_account, "namespace": self.control_namespace },
            "spec": spec,
        }))?;
        let api: Api<ServiceAccount> =
            Api::namespaced(self.client.clone(), &self.control_namespace);
        let response = api
            .create_token_request(service_account, &PostParams::default(), &request)
            .await
            .map_err(api_err(format!(
                "requesting a token for ServiceAccount {}/{service_account}",
                self.control_namespace
            )))?;
        Ok(response.status.map(|s| s.token).unwrap_or_default())
    }

    /// A kubeconfig (JSON, which is YAML) for `user`, whose server is the
    /// relay; an https server's CA data is kept and `tls-server-name` names
    /// the original host, so certificate verification still passes.
    fn kubeconfig(&self, user: &str, token: &str) -> String {
        let mut cluster = self.upstream_tls.clone();
        cluster.insert(
            "server".into(),
            json!(format!("{}://{}", self.upstream_scheme, self.relay_addr())),
        );
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{ "name": "testbed", "cluster": cluster }],
            "users": [{ "name": user, "user": { "token": token } }],
            "contexts": [{ "name": "testbed", "context": {
                "cluster": "testbed", "user": user, "namespace": self.control_namespace,
            } }],
            "current-context": "testbed",
        });
        serde_json::to_string_pretty(&config).expect("kubeconfig serialises")
    }

    /// Deletes what the testbed created on an external server, newest first.
    async fn remove_created(&self) {
        let namespaces: BTreeSet<&str> = self
            .created
            .iter()
            .filter(|c| c.resource.kind == "Namespace")
            .map(|c| c.name.as_str())
            .collect();
        for namespace in &namespaces {
            let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), namespace);
            let _ = slices
                .delete_collection(
                    &DeleteParams::default(),
                    &ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={FIELD_MANAGER}")),
                )
                .await;
        }
        for pod in self.pods.keys().chain(self.agent_pod_keys().iter()) {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.0);
            let _ = api
                .delete(&pod.1, &DeleteParams::default().grace_period(0))
                .await;
        }
        for created in self.created.iter().rev() {
            let api: Api<DynamicObject> = match &created.namespace {
                Some(ns) => Api::namespaced_with(self.client.clone(), ns, &created.resource),
                None => Api::all_with(self.client.clone(), &created.resource),
            };
            match api
                .delete(&created.name, &DeleteParams::default().grace_period(0))
                .await
            {
                Ok(_) => {}
                Err(e) if status_code(&e) == Some(404) => {}
                Err(e) => {
                    tracing::warn!(kind = %created.resource.kind, name = %created.name, error = %e, "cannot delete testbed object");
                }
            }
        }
        self.await_namespace_deletion(namespaces).await;
    }

    /// Waits (bounded) for the cluster's namespace controller to empty and
    /// remove the deleted `namespaces`, as on any cluster. Where none works
    /// on them (a bare kube-apiserver: no status conditions appear on a
    /// Terminating namespace), empties each itself, every namespaced kind the
    /// server lists, and only then removes its finalizer: finalizing a
    /// namespace that still holds objects would leave them in storage, to
    /// reappear when a namespace of that name is created again.
    async fn await_namespace_deletion(&self, namespaces: BTreeSet<&str>) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let started = std::time::Instant::now();
        let mut pending: Vec<Namespace> = Vec::new();
        loop {
            pending.clear();
            for namespace in &namespaces {
                match api.get_opt(namespace).await {
                    Ok(Some(stored)) => pending.push(stored),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(namespace, error = %e, "cannot read testbed namespace");
                    }
                }
            }
            if pending.is_empty() {
                return;
            }
            let controller_at_work = pending.iter().any(|ns| {
                ns.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| !c.is_empty())
            });
            let waited = started.elapsed();
            if waited >= NAMESPACE_DELETION_WAIT
                || (!controller_at_work && waited >= NAMESPACE_CONTROLLER_GRACE)
            {
                break;
            }
            tokio::time::sleep(NAMESPACE_POLL).await;
        }
        let kinds = self.deletable_namespaced_kinds().await;
        for mut stored in pending {
            let namespace = stored.name_any();
            tracing::info!(
                namespace,
                "no namespace controller removed the testbed namespace: emptying and finalizing it"
            );
            self.empty_namespace(&namespace, &kinds).await;
            if let Some(spec) = stored.spec.as_mut() {
                spec.finalizers = Some(Vec::new());
            }
            if let Err(e) = api
                .replace_subresource("finalize", &namespace, &PostParams::default(), &stored)
                .await
            {
                tracing::warn!(namespace, error = %e, "cannot finalize testbed namespace");
            }
        }
    }

    /// Every namespaced kind the server can delete by collection, as the
    /// namespace controller empties a namespace of.
    async fn deletable_namespaced_kinds(&self) -> Vec<ApiResource> {
        let discovery = match discovery::Discovery::new(self.client.clone()).run().await {
            Ok(discovery) => discovery,
            Err(e) => {
                tracing::warn!(error = %e, "cannot discover the server's kinds to empty the testbed namespaces");
                return Vec::new();
            }
        };
        discovery
            .groups()
            .flat_map(|group| group.recommended_resources())
            .filter(|(_, capabilities)| {
                capabilities.scope == Scope::Namespaced
                    && capabilities.supports_operation(discovery::verbs::DELETE_COLLECTION)
            })
            .map(|(resource, _)| resource)
            .collect()
    }

    /// Deletes every object of `kinds` in `namespace`.
    async fn empty_namespace(&self, namespace: &str, kinds: &[ApiResource]) {
        for resource in kinds {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), namespace, resource);
            match api
                .delete_collection(
                    &DeleteParams::default().grace_period(0),
                    &ListParams::default(),
                )
                .await
            {
                Ok(_) => {}
                Err(e) if matches!(status_code(&e), Some(404 | 405)) => {}
                Err(e) => {
                    tracing::warn!(namespace, kind = %resource.kind, error = %e, "cannot empty the testbed namespace");
                }
            }
        }
    }

    fn agent_pod_keys(&self) -> Vec<(String, String)> {
        self.created
            .iter()
            .filter(|c| c.resource.kind == "Pod")
            .map(|c| (c.namespace.clone().unwrap_or_default(), c.name.clone()))
            .collect()
    }
}

impl Drop for KubeCluster {
    fn drop(&mut self) {
        // Relay first: components lose the API before objects vanish.
        let _runtime = self.runtime.enter();
        drop(self.relay.take());
        if self.external {
            self.runtime.block_on(self.remove_created());
        }
        drop(self.fake.take());
    }
}

/// Admin client and relay upstream for an external API server.
async fn external_client(path: &Path) -> Result<(Client, Upstream), TestbedKubeError> {
    let kubeconfig =
        Kubeconfig::read_from(path).map_err(|source| TestbedKubeError::Kubeconfig {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
    let context = kubeconfig
        .current_context
        .clone()
        .and_then(|name| kubeconfig.contexts.iter().find(|c| c.name == name).cloned())
        .and_then(|c| c.context)
        .map(|c| c.cluster);
    let named_cluster = kubeconfig
        .clusters
        .iter()
        .find(|c| context.as_deref().is_none_or(|name| c.name == name))
        .and_then(|c| c.cluster.clone());
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|source| TestbedKubeError::Kubeconfig {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
    let url = config.cluster_url.clone();
    let address_error = |reason: String| TestbedKubeError::ServerAddress {
        path: path.to_owned(),
        server: url.to_string(),
        reason,
    };
    let host = url
        .host()
        .ok_or_else(|| address_error("no host".into()))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_owned();
    let https = url.scheme_str() != Some("http");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    // IPv4 first: `localhost` may resolve to ::1 while the server listens
    // on IPv4 only; the testbed is IPv4 throughout.
    let mut addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| address_error(e.to_string()))?
        .collect();
    addrs.sort_by_key(|a| !a.is_ipv4());
    let addr = *addrs
        .first()
        .ok_or_else(|| address_error("no addresses".into()))?;
    let mut tls = serde_json::Map::new();
    if https {
        if let Some(cluster) = named_cluster {
            if let Some(data) = cluster.certificate_authority_data {
                tls.insert("certificate-authority-data".into(), json!(data));
            }
            if let Some(file) = cluster.certificate_authority {
                // Relative paths in a kubeconfig are relative to it.
                let file = path.parent().unwrap_or(Path::new(".")).join(file);
                tls.insert("certificate-authority".into(), json!(file));
            }
            if cluster.insecure_skip_tls_verify == Some(true) {
                tls.insert("insecure-skip-tls-verify".into(), json!(true));
            }
            let server_name = cluster.tls_server_name.unwrap_or_else(|| host.clone());
            tls.insert("tls-server-name".into(), json!(server_name));
        } else {
            tls.insert("tls-server-name".into(), json!(host));
        }
    }
    let client = Client::try_from(config).map_err(|source| TestbedKubeError::Client {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    Ok((
        client,
        Upstream {
            addr,
            scheme: if https { "https" } else { "http" },
            tls,
        },
    ))
}

/// `<workspace>/deploy/base`, whose RBAC and CRD manifests the testbed applies.
pub fn deploy_base_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("deploy/base")
}

/// The objects of a `---`-separated YAML stream (empty documents skipped).
fn parse_manifest(path: &Path, text: &str) -> Result<Vec<Value>, TestbedKubeError> {
    let mut objects = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        let value: Value =
            serde::Deserialize::deserialize(document).map_err(|e| TestbedKubeError::Manifest {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        if value.is_null() {
            continue;
        }
        for field in ["apiVersion", "kind"] {
            if !value[field].is_string() {
                return Err(TestbedKubeError::Manifest {
                    path: path.to_owned(),
                    reason: format!("a document has no {field}"),
                });
            }
        }
        if !value["metadata"]["name"].is_string() {
            return Err(TestbedKubeError::Manifest {
                path: path.to_owned(),
                reason: format!("a {} has no metadata.name", value["kind"]),
            });
        }
        objects.push(value);
    }
    Ok(objects)
}

fn managed_labels() -> Value {
    json!({ MANAGED_BY_LABEL: FIELD_MANAGER })
}

/// A policy of the cluster file as an object of the CRD.
fn policy_object(policy: &AuthorizationPolicy) -> Value {
    json!({
        "apiVersion": format!("{}/{}", authz::API_GROUP, authz::API_VERSION),
        "kind": authz::KIND,
        "metadata": {
            "name": policy.name, "namespace": policy.namespace,
            "labels": managed_labels(), "annotations": policy.annotations,
        },
        "spec": policy.spec,
    })
}

fn namespace_object(
    name: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Value {
    let mut all = labels.clone();
    all.insert(MANAGED_BY_LABEL.into(), FIELD_MANAGER.into());
    json!({ "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "labels": all, "annotations": annotations } })
}

fn pod_object(
    namespace: &str,
    name: &str,
    service_account: &str,
    node: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": labels, "annotations": annotations },
        "spec": {
            "nodeName": node,
            "serviceAccountName": service_account,
            // The testbed writes credentials itself; nothing mounts them.
            "automountServiceAccountToken": false,
            "containers": [{ "name": CONTAINER_NAME, "image": POD_IMAGE }],
        },
    })
}

fn identity_deployment(namespace: &str) -> Value {
    let labels = json!({ "app.kubernetes.io/name": IDENTITY_NAME });
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": IDENTITY_NAME, "namespace": namespace, "labels": labels },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "serviceAccountName": IDENTITY_NAME,
                    "containers": [{ "name": "identity", "image": POD_IMAGE }],
                },
            },
        },
    })
}

/// The issuer Secret in either layout.
fn issuer_secret(namespace: &str, issuer: &CaMaterial, layout: PkiLayout) -> Secret {
    let mut data = BTreeMap::new();
    data.insert(
        layout.cert_file().to_owned(),
        ByteString(issuer.cert_pem.clone()),
    );
    data.insert(
        layout.key_file().to_owned(),
        ByteString(issuer.key_pem.clone()),
    );
    if let (Some(file), Some(ca)) = (layout.ca_file(), &issuer.ca_pem) {
        data.insert(file.to_owned(), ByteString(ca.clone()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(ISSUER_SECRET.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned())].into()),
            ..ObjectMeta::default()
        },
        type_: Some(
            match layout {
                PkiLayout::Tls => "kubernetes.io/tls",
                PkiLayout::Pem => "Opaque",
            }
            .to_owned(),
        ),
        data: Some(data),
        ..Secret::default()
    }
}

/// Multi-port Services need port names; unnamed ones get `tcp-<port>`.
fn service_port_name(port: &cluster::ServicePort, multi: bool) -> String {
    match &port.name {
        Some(name) => name.clone(),
        None if multi => format!("tcp-{}", port.port),
        None => String::new(),
    }
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    }
}

fn from_json<K: DeserializeOwned>(value: Value) -> Result<K, TestbedKubeError> {
    serde_json::from_value(value).map_err(|e| TestbedKubeError::Manifest {
        path: PathBuf::from("<testbed object>"),
        reason: e.to_string(),
    })
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A containerd container id: 64 hex digits.
fn random_container_id() -> String {
    let mut id = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    hex::encode(id)
}

/// Writes a credential atomically (temp file + rename, as kubelet swaps
/// projected tokens), owner-only.
fn write_secret_file(path: &Path, content: &[u8]) -> Result<(), TestbedKubeError> {
    let io_error = |source| TestbedKubeError::Io {
        what: "cannot write credential",
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_error)?;
    file.write_all(content).map_err(io_error)?;
    std::fs::rename(&tmp, path).map_err(io_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_cgroup_names_for_both_drivers() {
        let uid = "1f2e3d4c-0000-4a5b-8c9d-0123456789ab";
        assert_eq!(
            CgroupDriver::Systemd.pod_cgroup(uid),
            Path::new(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1f2e3d4c_0000_4a5b_8c9d_0123456789ab.slice"
            )
        );
        assert_eq!(
            CgroupDriver::Cgroupfs.pod_cgroup(uid),
            Path::new("kubepods/besteffort/pod1f2e3d4c-0000-4a5b-8c9d-0123456789ab")
        );
        assert_eq!(
            CgroupDriver::Systemd.container_cgroup("abc"),
            "cri-containerd-abc.scope"
        );
        assert_eq!(CgroupDriver::Cgroupfs.container_cgroup("abc"), "abc");
    }

    #[test]
    fn manifests_parse_into_objects_and_reject_nameless_ones() {
        let path = Path::new("rbac.yaml");
        let text = "---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: { name: a }\n---\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: { name: b, namespace: sealmesh }\n";
        let objects = parse_manifest(path, text).unwrap();
        let kinds: Vec<_> = objects
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(kinds, [("ClusterRole", "a"), ("RoleBinding", "b")]);
        assert_eq!(
            parse_manifest(path, "apiVersion: v1\nkind: ConfigMap\nmetadata: {}\n")
                .unwrap_err()
                .to_string(),
            "rbac.yaml is not a YAML stream of Kubernetes objects: a \"ConfigMap\" has no metadata.name"
        );
    }

    #[test]
    fn issuer_secret_uses_the_layouts_keys() {
        let material = CaMaterial {
            source: "test".into(),
            cert_pem: b"CERT".to_vec(),
            key_pem: b"KEY".to_vec(),
            ca_pem: Some(b"CA".to_vec()),
        };
        let keys = |secret: &Secret| -> Vec<(String, String)> {
            secret
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        };
        let tls = issuer_secret("sealmesh", &material, PkiLayout::Tls);
        assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(
            keys(&tls),
            [("ca.crt", "CA"), ("tls.crt", "CERT"), ("tls.key", "KEY")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        let pem = issuer_secret("sealmesh", &material, PkiLayout::Pem);
        assert_eq!(pem.type_.as_deref(), Some("Opaque"));
        assert_eq!(
            keys(&pem),
            [("crt.pem", "CERT"), ("key.pem", "KEY")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }
}
