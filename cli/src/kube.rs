//! Kubernetes mode: the cluster as kubectl finds it (`--kubeconfig`,
//! `--context`, `KUBECONFIG`, `~/.kube/config`, the in-cluster config), the
//! agents as the pods of the agent DaemonSet, and the way to their admin API:
//! a port-forward through the API server to the agent pod's
//! [`AGENT_ADMIN_PORT`] for each connection. The caller needs only API
//! credentials (`list` pods in the sealmesh namespace, `create`
//! `pods/portforward` there), no root and no access to nodes.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io,
    net::Ipv4Addr,
    path::PathBuf,
    pin::Pin,
    task::{Context, Poll},
};

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use ipnet::Ipv4Net;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use kube::{
    Api, Client, Config,
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use sealmesh_common::{
    authz::{self, PolicyName},
    cluster::{self, ClusterFile},
    consts::{
        AGENT_ADMIN_PORT, DEFAULT_CONTROL_NAMESPACE, DEFAULT_TRUST_DOMAIN,
        kube::{
            AGENT_DAEMONSET, IDENTITY_NAME, ISSUER_SECRET, TRUST_ROOTS_CONFIGMAP, TRUST_ROOTS_KEY,
        },
    },
};
use sealmesh_pki::files::{
    CaMaterial, PEM_CERT_FILE, PEM_KEY_FILE, TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, DuplexStream, ReadBuf};

use crate::{
    agents::{
        AgentDirectory, AgentError, AgentLink, AgentRef, AgentRoute, AgentTransport, LinkSession,
        SessionHandle,
    },
    policies::ListedPolicy,
    rbac::Rbac,
    selector::Selector,
};

/// The recommended Kubernetes label the agent DaemonSet selects its pods by
/// (`deploy/base/agent.yaml`), with the value [`AGENT_DAEMONSET`].
const APP_NAME_LABEL: &str = "app.kubernetes.io/name";
/// The agents' flag naming their trust domain.
const TRUST_DOMAIN_FLAG: &str = "--trust-domain";
/// Bytes of the agent's first answer read before the stream is handed on.
const FIRST_READ_BYTES: usize = 4096;

/// Which Kubernetes cluster, and where sealmesh runs in it.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// kubeconfig file. Default: as kubectl, `KUBECONFIG`, then
    /// `~/.kube/config`, then the config of the pod the CLI runs in.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context. Default: the kubeconfig's current context.
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Namespace sealmesh (the agent DaemonSet, the identity service) runs in.
    #[arg(long, value_name = "NAMESPACE", default_value = DEFAULT_CONTROL_NAMESPACE)]
    pub sealmesh_namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "no cluster given: no kubeconfig or in-cluster config was found ({0}); pass --kubeconfig FILE or set KUBECONFIG, or in local mode --cluster-file FILE (SEALMESH_CLUSTER_FILE)"
    )]
    NoConfig(String),
    #[error("cannot read the kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("cannot start the Kubernetes client: {0}")]
    Client(String),
    #[error(
        "cannot {what} from the Kubernetes API: {}{}",
        api_text(error),
        hint(error)
    )]
    Api {
        what: String,
        /// Shown in the message, not as a cause (its text repeats it).
        error: Box<kube::Error>,
    },
    #[error(
        "no agent pods (label {APP_NAME_LABEL}={AGENT_DAEMONSET}) in namespace {namespace}: is sealmesh installed there? (pass --sealmesh-namespace if it runs elsewhere)"
    )]
    NoAgents { namespace: String },
    #[error("{0}")]
    Invalid(String),
}

impl KubeError {
    /// The API server refused the call (403): the user lacks a permission.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::Api { error, .. } if matches!(&**error, kube::Error::Api(status) if status.code == 403))
    }
}

/// What to do about a refused API call.
fn hint(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) if status.code == 401 => {
            "; the kubeconfig's credentials were refused (log in again)"
        }
        kube::Error::Api(status) if status.code == 403 => {
            "; your user lacks that permission (ask for it, or use another --context)"
        }
        _ => "",
    }
}

/// An API error as people read it: the server's message and code.
fn api_text(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => {
            // The causes say what failed (a refused connection, a TLS error).
            let mut text = other.to_string();
            let mut cause = std::error::Error::source(other);
            while let Some(error) = cause {
                let part = error.to_string();
                if !text.contains(&part) {
                    text = format!("{text}: {part}");
                }
                cause = error.source();
            }
            text
        }
    }
}

fn api_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> KubeError {
    let what = what.into();
    move |error| KubeError::Api {
        what,
        error: Box::new(error),
    }
}

/// A runtime for the CLI's own API calls (commands are synchronous).
fn block_on<T>(future: impl Future<Output = T>) -> Result<T, KubeError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| KubeError::Client(error.to_string()))?;
    Ok(runtime.block_on(future))
}

impl KubeArgs {
    /// The cluster of the kubeconfig or in-cluster config, as kubectl finds it.
    pub fn cluster(&self) -> Result<KubeCluster, KubeError> {
        let config = block_on(self.config())??;
        Ok(KubeCluster {
            config,
            namespace: self.sealmesh_namespace.clone(),
        })
    }

    async fn config(&self) -> Result<Config, KubeError> {
        if self.kubeconfig.is_none() && self.context.is_none() {
            return Config::infer()
                .await
                .map_err(|error| KubeError::NoConfig(error.to_string()));
        }
        let kubeconfig = match &self.kubeconfig {
            Some(path) => Kubeconfig::read_from(path),
            None => Kubeconfig::read(),
        }
        .map_err(|error| KubeError::Kubeconfig(error.to_string()))?;
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..KubeConfigOptions::default()
        };
        Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|error| KubeError::Kubeconfig(error.to_string()))
    }
}

/// Workloads `tap` resolves to their pods by their selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    DaemonSet,
    StatefulSet,
}

impl WorkloadKind {
    pub fn kind(self) -> &'static str {
        match self {
            Self::Deployment => "Deployment",
            Self::DaemonSet => "DaemonSet",
            Self::StatefulSet => "StatefulSet",
        }
    }
}

/// Ready and wanted copies of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replicas {
    pub ready: i32,
    pub wanted: i32,
}

/// A Kubernetes cluster the CLI talks to.
#[derive(Debug, Clone)]
pub struct KubeCluster {
    config: Config,
    namespace: String,
}

fn client(config: &Config) -> Result<Client, KubeError> {
    Client::try_from(config.clone()).map_err(|error| KubeError::Client(error.to_string()))
}

impl KubeCluster {
    /// The namespace sealmesh runs in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// One agent per node: the agent DaemonSet's pods, reached by port-forward.
    pub fn agent_directory(&self) -> Result<AgentDirectory, KubeError> {
        let pods = block_on(async {
            let pods: Api<Pod> = Api::namespaced(client(&self.config)?, &self.namespace);
            pods.list(&ListParams::default().labels(&format!("{APP_NAME_LABEL}={AGENT_DAEMONSET}")))
                .await
                .map_err(api_error(format!(
                    "list the agent pods in namespace {}",
                    self.namespace
                )))
        })??;
        let agents = agents_of(pods.items);
        if agents.is_empty() {
            return Err(KubeError::NoAgents {
                namespace: self.namespace.clone(),
            });
        }
        Ok(AgentDirectory::kubernetes(
            agents,
            PortForwardTransport {
                config: self.config.clone(),
                namespace: self.namespace.clone(),
            },
        ))
    }

    /// The cluster's nodes, namespaces, pods and Services, in the shape of a
    /// cluster file (what `why` and `tap` look pods up in).
    pub fn snapshot(&self) -> Result<ClusterFile, KubeError> {
        block_on(async {
            let client = client(&self.config)?;
            let nodes = Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(api_error("list nodes"))?;
            let namespaces = Api::<Namespace>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(api_error("list namespaces"))?;
            let pods = Api::<Pod>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map_err(api_error("list pods"))?;
            let services = Api::<Service>::all(client)
                .list(&ListParams::default())
                .await
                .map_err(api_error("list services"))?;
            let mut cluster =
                ClusterFile::new(self.config.cluster_url.host().unwrap_or("kubernetes"));
            cluster.control_namespace = self.namespace.clone();
            cluster.nodes = nodes.items.iter().filter_map(node_of).collect();
            cluster.namespaces = namespaces.items.iter().map(namespace_of).collect();
            cluster.pods = pods.items.iter().filter_map(pod_of).collect();
            cluster.services = services.items.iter().filter_map(service_of).collect();
            Ok(cluster)
        })?
    }

    /// Every `AuthorizationPolicy` of the cluster (`authorizationpolicies.sealmesh.io`),
    /// each with its spec or why it cannot be read. None when the API
    /// serves no such resource (its CRD is not installed): then there are
    /// no policies to enforce.
    pub fn authorization_policies(&self) -> Result<Option<Vec<ListedPolicy>>, KubeError> {
        use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(authz::API_GROUP, authz::API_VERSION, authz::KIND),
            authz::PLURAL,
        );
        let listed = block_on(async {
            let api: Api<DynamicObject> = Api::all_with(client(&self.config)?, &resource);
            match api.list(&ListParams::default()).await {
                Ok(list) => Ok(Some(list.items)),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                Err(error) => Err(api_error(format!(
                    "list {}.{}",
                    authz::PLURAL,
                    authz::API_GROUP
                ))(error)),
            }
        })??;
        Ok(listed.map(|objects| objects.iter().filter_map(policy_of).collect()))
    }

    /// Every ServiceAccount of the cluster, as (namespace, name).
    pub fn service_accounts(&self) -> Result<BTreeSet<(String, String)>, KubeError> {
        let accounts = block_on(async {
            Api::<ServiceAccount>::all(client(&self.config)?)
                .list(&ListParams::default())
                .await
                .map_err(api_error("list ServiceAccounts"))
        })??;
        Ok(accounts
            .items
            .into_iter()
            .filter_map(|a| Some((a.metadata.namespace?, a.metadata.name?)))
            .collect())
    }

    /// The trust domain the agents name identities in: the agent
    /// DaemonSet's `--trust-domain` (as `sealmesh install` sets it), else
    /// the default.
    pub fn trust_domain(&self) -> Result<String, KubeError> {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let what = format!("read DaemonSet {}/{AGENT_DAEMONSET}", self.namespace);
        let daemonset = block_on(async {
            Api::<DaemonSet>::namespaced(client(&self.config)?, &self.namespace)
                .get(AGENT_DAEMONSET)
                .await
                .map_err(api_error(what.clone()))
        })??;
        let args = daemonset
            .spec
            .and_then(|spec| spec.template.spec)
            .into_iter()
            .flat_map(|spec| spec.containers)
            .flat_map(|container| container.args.unwrap_or_default());
        Ok(flag_value(args, TRUST_DOMAIN_FLAG).unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned()))
    }

    /// The label selector of workload `kind`/`name` in `namespace`: a
    /// Deployment, DaemonSet or StatefulSet.
    pub fn workload_selector(
        &self,
        kind: WorkloadKind,
        namespace: &str,
        name: &str,
    ) -> Result<Selector, KubeError> {
        use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
        let what = format!("read {} {namespace}/{name}", kind.kind());
        let selector = block_on(async {
            let client = client(&self.config)?;
            let selector = match kind {
                WorkloadKind::Deployment => Api::<Deployment>::namespaced(client, namespace)
                    .get(name)
                    .await
                    .map(|o| o.spec.map(|s| s.selector)),
                WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client, namespace)
                    .get(name)
                    .await
                    .map(|o| o.spec.map(|s| s.selector)),
                WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client, namespace)
                    .get(name)
                    .await
                    .map(|o| o.spec.map(|s| s.selector)),
            };
            selector.map_err(api_error(what.clone()))
        })??
        .unwrap_or_default();
        Selector::parse(&selector)
            .map_err(|e| KubeError::Invalid(format!("{} {namespace}/{name}: {e}", kind.kind())))
    }

    /// Whether ServiceAccount `name` exists in the sealmesh namespace.
    pub fn service_account_exists(&self, name: &str) -> Result<bool, KubeError> {
        let what = format!("read ServiceAccount {}/{name}", self.namespace);
        block_on(async {
            match Api::<ServiceAccount>::namespaced(client(&self.config)?, &self.namespace)
                .get(name)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
                Err(error) => Err(api_error(what.clone())(error)),
            }
        })?
    }

    /// What can grant the sealmesh namespace's ServiceAccounts permissions:
    /// every ClusterRole and ClusterRoleBinding, and the Roles and
    /// RoleBindings of that namespace.
    pub fn rbac(&self) -> Result<Rbac, KubeError> {
        let namespace = &self.namespace;
        block_on(async {
            let client = client(&self.config)?;
            let all = ListParams::default();
            Ok(Rbac {
                cluster_roles: Api::<ClusterRole>::all(client.clone())
                    .list(&all)
                    .await
                    .map_err(api_error("list ClusterRoles"))?
                    .items,
                cluster_role_bindings: Api::<ClusterRoleBinding>::all(client.clone())
                    .list(&all)
                    .await
                    .map_err(api_error("list ClusterRoleBindings"))?
                    .items,
                roles: Api::<Role>::namespaced(client.clone(), namespace)
                    .list(&all)
                    .await
                    .map_err(api_error(format!("list Roles in namespace {namespace}")))?
                    .items,
                role_bindings: Api::<RoleBinding>::namespaced(client, namespace)
                    .list(&all)
                    .await
                    .map_err(api_error(format!(
                        "list RoleBindings in namespace {namespace}"
                    )))?
                    .items,
            })
        })?
    }

    /// Ready and wanted replicas of the identity service's Deployment.
    pub fn identity_replicas(&self) -> Result<Replicas, KubeError> {
        use k8s_openapi::api::apps::v1::Deployment;
        let what = format!("read Deployment {}/{IDENTITY_NAME}", self.namespace);
        let deployment = block_on(async {
            Api::<Deployment>::namespaced(client(&self.config)?, &self.namespace)
                .get(IDENTITY_NAME)
                .await
                .map_err(api_error(what.clone()))
        })??;
        Ok(Replicas {
            ready: deployment
                .status
                .and_then(|s| s.available_replicas)
                .unwrap_or(0),
            wanted: deployment.spec.and_then(|s| s.replicas).unwrap_or(1),
        })
    }

    /// Available agents, and nodes that should run one, of the agent DaemonSet.
    pub fn agent_replicas(&self) -> Result<Replicas, KubeError> {
        use k8s_openapi::api::apps::v1::DaemonSet;
        let what = format!("read DaemonSet {}/{AGENT_DAEMONSET}", self.namespace);
        let daemonset = block_on(async {
            Api::<DaemonSet>::namespaced(client(&self.config)?, &self.namespace)
                .get(AGENT_DAEMONSET)
                .await
                .map_err(api_error(what.clone()))
        })??;
        let status = daemonset.status.unwrap_or_default();
        Ok(Replicas {
            ready: status.number_available.unwrap_or(0),
            wanted: status.desired_number_scheduled,
        })
    }

    /// The Ready condition of cert-manager's Certificate for the issuer, when
    /// cert-manager rotates it (`None`: no such Certificate, or no cert-manager).
    pub fn issuer_certificate(&self) -> Result<Option<(bool, String)>, KubeError> {
        use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
            "cert-manager.io",
            "v1",
            "Certificate",
        ));
        let what = format!("read Certificate {}/{ISSUER_SECRET}", self.namespace);
        let found = block_on(async {
            let api: Api<DynamicObject> =
                Api::namespaced_with(client(&self.config)?, &self.namespace, &resource);
            match api.get(ISSUER_SECRET).await {
                Ok(object) => Ok(Some(object)),
                // No such Certificate, or no cert-manager (no such kind).
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                Err(error) => Err(api_error(what.clone())(error)),
            }
        })??;
        Ok(found.map(|certificate| {
            let ready = certificate.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready");
            let message = ready
                .and_then(|c| c["message"].as_str())
                .unwrap_or("cert-manager reported no Ready condition yet")
                .to_owned();
            (ready.is_some_and(|c| c["status"] == "True"), message)
        }))
    }

    /// The trust-anchor bundle (PEM) of the trust-roots ConfigMap.
    pub fn trust_anchors_pem(&self) -> Result<Vec<u8>, KubeError> {
        let what = format!("read ConfigMap {}/{TRUST_ROOTS_CONFIGMAP}", self.namespace);
        let map = block_on(async {
            Api::<ConfigMap>::namespaced(client(&self.config)?, &self.namespace)
                .get(TRUST_ROOTS_CONFIGMAP)
                .await
                .map_err(api_error(what.clone()))
        })??;
        map.data
            .and_then(|mut data| data.remove(TRUST_ROOTS_KEY))
            .map(String::into_bytes)
            .ok_or_else(|| {
                KubeError::Invalid(format!(
                    "ConfigMap {}/{TRUST_ROOTS_CONFIGMAP} has no key {TRUST_ROOTS_KEY}",
                    self.namespace
                ))
            })
    }

    /// The issuer of the issuer Secret (either layout).
    pub fn issuer_material(&self) -> Result<CaMaterial, KubeError> {
        let source = format!("Secret {}/{ISSUER_SECRET}", self.namespace);
        let secret = block_on(async {
            Api::<Secret>::namespaced(client(&self.config)?, &self.namespace)
                .get(ISSUER_SECRET)
                .await
                .map_err(api_error(format!("read {source}")))
        })??;
        let mut data: BTreeMap<String, Vec<u8>> = secret
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| (key, value.0))
            .collect();
        let (cert, key, ca) = if data.contains_key(TLS_CERT_FILE) {
            (TLS_CERT_FILE, TLS_KEY_FILE, Some(TLS_CA_FILE))
        } else {
            (PEM_CERT_FILE, PEM_KEY_FILE, None)
        };
        let mut take = |name: &str| {
            data.remove(name).ok_or_else(|| {
                KubeError::Invalid(format!(
                    "{source} has no key {name}: expected {PEM_CERT_FILE} + {PEM_KEY_FILE}, or {TLS_CERT_FILE} + {TLS_KEY_FILE} (+ {TLS_CA_FILE})"
                ))
            })
        };
        Ok(CaMaterial {
            cert_pem: take(cert)?,
            key_pem: take(key)?,
            ca_pem: ca.and_then(|name| take(name).ok()),
            source,
        })
    }
}

/// One agent per node from the DaemonSet's pods: a running pod, the newest
/// when a rolling update runs two on a node.
fn agents_of(pods: Vec<Pod>) -> Vec<AgentRef> {
    let mut by_node: BTreeMap<String, (bool, String, AgentRef)> = BTreeMap::new();
    for pod in pods {
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        let Some(node) = pod.spec.as_ref().and_then(|spec| spec.node_name.clone()) else {
            continue;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let status = pod.status.unwrap_or_default();
        let running = status.phase.as_deref() == Some("Running");
        let node_ip = status
            .host_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .unwrap_or(Ipv4Addr::UNSPECIFIED);
        let created = pod
            .metadata
            .creation_timestamp
            .map(|time| time.0.to_string())
            .unwrap_or_default();
        let agent = AgentRef {
            node: node.clone(),
            node_ip,
            netns: None,
            pod: Some(name),
        };
        let candidate = (running, created, agent);
        match by_node.get(&node) {
            Some((kept_running, kept_created, _))
                if (*kept_running, kept_created) >= (candidate.0, &candidate.1) => {}
            _ => {
                by_node.insert(node, candidate);
            }
        }
    }
    by_node.into_values().map(|(_, _, agent)| agent).collect()
}

/// The value of `--flag VALUE` or `--flag=VALUE` in container arguments.
fn flag_value(args: impl IntoIterator<Item = String>, flag: &str) -> Option<String> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == flag {
            return args.next();
        }
        if let Some(value) = arg
            .strip_prefix(flag)
            .and_then(|rest| rest.strip_prefix('='))
        {
            return Some(value.to_owned());
        }
    }
    None
}

/// A policy object; one without a name or namespace is skipped (the API
/// server never returns such a namespaced object).
fn policy_of(object: &kube::api::DynamicObject) -> Option<ListedPolicy> {
    Some(ListedPolicy::from_json(
        PolicyName {
            namespace: object.metadata.namespace.clone()?,
            name: object.metadata.name.clone()?,
        },
        labels(object.metadata.annotations.as_ref()),
        object.data.get("spec"),
    ))
}

fn labels(map: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    map.cloned().unwrap_or_default()
}

fn node_of(node: &Node) -> Option<cluster::Node> {
    let ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|address| address.type_ == "InternalIP")?
        .address
        .parse::<Ipv4Addr>()
        .ok()?;
    let pod_cidr = node
        .spec
        .as_ref()
        .and_then(|spec| spec.pod_cidr.as_deref())
        .and_then(|cidr| cidr.parse().ok())
        .unwrap_or_else(|| Ipv4Net::from(ip));
    Some(cluster::Node {
        name: node.metadata.name.clone()?,
        ip,
        pod_cidr,
        cgroup: PathBuf::new(),
        token_file: None,
        netns: None,
    })
}

fn namespace_of(namespace: &Namespace) -> cluster::Namespace {
    cluster::Namespace {
        name: namespace.metadata.name.clone().unwrap_or_default(),
        labels: labels(namespace.metadata.labels.as_ref()),
        annotations: labels(namespace.metadata.annotations.as_ref()),
    }
}

/// A scheduled, unfinished pod with its own address (host-network pods
/// share their node's and are never meshed).
fn pod_of(pod: &Pod) -> Option<cluster::Pod> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    Some(cluster::Pod {
        name: pod.metadata.name.clone()?,
        namespace: pod.metadata.namespace.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        ip: status.pod_ip.as_deref()?.parse().ok()?,
        node: spec.node_name.clone()?,
        cgroup: PathBuf::new(),
        labels: labels(pod.metadata.labels.as_ref()),
        annotations: labels(pod.metadata.annotations.as_ref()),
        netns: None,
    })
}

/// A Service with a ClusterIP; named target ports count as the port itself.
fn service_of(service: &Service) -> Option<cluster::Service> {
    let spec = service.spec.as_ref()?;
    let vip = spec.cluster_ip.as_deref()?.parse().ok()?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|port| {
            let number = u16::try_from(port.port).ok()?;
            let target = match &port.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(target)) => {
                    u16::try_from(*target).ok()?
                }
                _ => number,
            };
            Some(cluster::ServicePort {
                name: port.name.clone(),
                port: number,
                target_port: target,
            })
        })
        .collect();
    Some(cluster::Service {
        name: service.metadata.name.clone()?,
        namespace: service.metadata.namespace.clone()?,
        vip,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
    })
}

/// Reaches agents by port-forward through the API server: each session runs
/// on a thread of its own with a client of its own.
#[derive(Debug, Clone)]
pub struct PortForwardTransport {
    config: Config,
    namespace: String,
}

impl AgentTransport for PortForwardTransport {
    fn spawn_linked<T: Send + 'static>(
        &self,
        agent: &AgentRef,
        session: LinkSession<T>,
    ) -> Result<SessionHandle<T>, AgentError> {
        let node = agent.node.clone();
        let pod = agent
            .pod
            .clone()
            .ok_or_else(|| AgentError::NoPod { node: node.clone() })?;
        let config = self.config.clone();
        let namespace = self.namespace.clone();
        std::thread::Builder::new()
            .name(format!("agent {node}"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| AgentError::Runtime {
                        node: node.clone(),
                        source,
                    })?;
                runtime.block_on(async move {
                    let client = client(&config).map_err(|error| AgentError::Connect {
                        node: node.clone(),
                        address: format!("the Kubernetes API at {}", config.cluster_url),
                        reason: error.to_string(),
                    })?;
                    let pod_port = PodPort {
                        pods: Api::namespaced(client, &namespace),
                        namespace,
                        pod,
                        port: AGENT_ADMIN_PORT,
                    };
                    session(AgentLink::new(
                        node,
                        AgentRoute::PortForward(Box::new(pod_port)),
                    ))
                    .await
                })
            })
            .map_err(|source| AgentError::Runtime {
                node: agent.node.clone(),
                source,
            })
    }
}

/// A pod's port, reached by port-forward.
#[derive(Clone)]
pub struct PodPort {
    pods: Api<Pod>,
    namespace: String,
    pod: String,
    port: u16,
}

impl std::fmt::Debug for PodPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodPort({self})")
    }
}

impl std::fmt::Display for PodPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pod {}/{} port {} (port-forward through the Kubernetes API)",
            self.namespace, self.pod, self.port
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{}{}", api_text(error), hint(error))]
    Api { error: Box<kube::Error> },
    #[error("{0}")]
    Pod(String),
    #[error("reading the agent's first answer: {0}")]
    Read(io::Error),
}

impl PodPort {
    /// The URI tonic is given (its authority becomes HTTP/2's `:authority`).
    pub fn uri(&self) -> String {
        format!("http://{}.{}:{}", self.pod, self.namespace, self.port)
    }

    /// A tonic connector opening a port-forward for each connection.
    pub fn connector(
        &self,
    ) -> impl tower::Service<
        http::Uri,
        Response = TokioIo<ForwardedStream>,
        Error = ForwardError,
        Future = BoxFuture<'static, Result<TokioIo<ForwardedStream>, ForwardError>>,
    > + Send
    + 'static {
        let pod_port = self.clone();
        tower::service_fn(move |_: http::Uri| {
            let pod_port = pod_port.clone();
            Box::pin(async move { pod_port.open().await })
                as BoxFuture<'static, Result<TokioIo<ForwardedStream>, ForwardError>>
        })
    }

    async fn open(&self) -> Result<TokioIo<ForwardedStream>, ForwardError> {
        let mut forwarder = self
            .pods
            .portforward(&self.pod, &[self.port])
            .await
            .map_err(|error| ForwardError::Api {
                error: Box::new(error),
            })?;
        let mut stream = forwarder
            .take_stream(self.port)
            .expect("the forwarder has a stream for the port it was asked for");
        let error = forwarder
            .take_error(self.port)
            .expect("the forwarder has an error channel for the port it was asked for");
        // The agent is an HTTP/2 server, which speaks first (its SETTINGS):
        // bytes prove the port answered; an end instead comes with the
        // kubelet's reason on the port's error channel.
        let mut first = vec![0; FIRST_READ_BYTES];
        let read = stream.read(&mut first).await.map_err(ForwardError::Read)?;
        if read == 0 {
            return Err(ForwardError::Pod(error.await.unwrap_or_else(|| {
                "the port-forward ended before the agent answered".to_owned()
            })));
        }
        first.truncate(read);
        Ok(TokioIo::new(ForwardedStream {
            first,
            offset: 0,
            stream,
        }))
    }
}

/// A port-forwarded connection, with the bytes already read in front.
#[derive(Debug)]
pub struct ForwardedStream {
    first: Vec<u8>,
    offset: usize,
    stream: DuplexStream,
}

impl AsyncRead for ForwardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.offset < self.first.len() {
            let take = buf.remaining().min(self.first.len() - self.offset);
            let start = self.offset;
            buf.put_slice(&self.first[start..start + take]);
            self.offset += take;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ForwardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use clap::Parser;

    use super::*;
    use crate::agents::{ClusterArgs, ClusterSource};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        cluster: ClusterArgs,
    }

    fn parse(args: &[&str]) -> ClusterArgs {
        Cli::try_parse_from([&["sealmesh"], args].concat())
            .unwrap()
            .cluster
    }

    /// A kubeconfig with two contexts, `a` (current) and `b`.
    fn kubeconfig() -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(
            br#"
apiVersion: v1
kind: Config
clusters:
  - { name: a, cluster: { server: "http://127.0.0.1:7001" } }
  - { name: b, cluster: { server: "http://127.0.0.1:7002" } }
users:
  - { name: u, user: { token: "t" } }
contexts:
  - { name: a, context: { cluster: a, user: u } }
  - { name: b, context: { cluster: b, user: u } }
current-context: a
"#,
        )
        .unwrap();
        file
    }

    fn server(args: &ClusterArgs) -> String {
        match args.source().unwrap() {
            ClusterSource::Kubernetes(cluster) => cluster.config.cluster_url.to_string(),
            ClusterSource::Local(_) => panic!("expected Kubernetes mode"),
        }
    }

    #[test]
    fn a_kubeconfig_selects_kubernetes_mode_with_its_current_or_the_given_context() {
        let file = kubeconfig();
        let path = file.path().to_str().unwrap();
        let args = parse(&["--kubeconfig", path]);
        assert_eq!(server(&args), "http://127.0.0.1:7001/");
        assert_eq!(args.kube.sealmesh_namespace, DEFAULT_CONTROL_NAMESPACE);
        let args = parse(&["--kubeconfig", path, "--context", "b"]);
        assert_eq!(server(&args), "http://127.0.0.1:7002/");
        let args = parse(&["--kubeconfig", path, "--sealmesh-namespace", "mesh-system"]);
        let ClusterSource::Kubernetes(cluster) = args.source().unwrap() else {
            panic!("expected Kubernetes mode");
        };
        assert_eq!(cluster.namespace(), "mesh-system");
    }

    #[test]
    fn the_cluster_file_wins_over_a_kubeconfig() {
        let mut cluster_file = tempfile::NamedTempFile::new().unwrap();
        cluster_file
            .write_all(
                b"apiVersion: sealmesh.io/v1alpha1\nkind: Cluster\nname: tb-test\nnodes:\n  \
                  - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/x/node-0 }\n",
            )
            .unwrap();
        let file = kubeconfig();
        let args = parse(&[
            "--cluster-file",
            cluster_file.path().to_str().unwrap(),
            "--kubeconfig",
            file.path().to_str().unwrap(),
        ]);
        let ClusterSource::Local(cluster) = args.source().unwrap() else {
            panic!("expected local mode");
        };
        assert_eq!(cluster.nodes[0].name, "node-0");
    }

    #[test]
    fn a_missing_kubeconfig_or_context_is_named() {
        let args = parse(&["--kubeconfig", "/nonexistent/kubeconfig"]);
        let error = args.source().unwrap_err().to_string();
        assert!(
            error.starts_with("cannot read the kubeconfig: ")
                && error.contains("/nonexistent/kubeconfig"),
            "{error}"
        );
        let file = kubeconfig();
        let args = parse(&[
            "--kubeconfig",
            file.path().to_str().unwrap(),
            "--context",
            "c",
        ]);
        let error = args.source().unwrap_err().to_string();
        assert_eq!(
            error,
            "cannot read the kubeconfig: failed to load current context: c"
        );
    }

    #[test]
    fn policy_objects_parse_and_an_unreadable_spec_is_invalid() {
        let object = |spec: serde_json::Value| -> kube::api::DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "sealmesh.io/v1alpha1",
                "kind": "AuthorizationPolicy",
                "metadata": {
                    "name": "web-allow",
                    "namespace": "shop",
                    "annotations": { "sealmesh.io/dry-run": "true" },
                },
                "spec": spec,
            }))
            .unwrap()
        };
        let policy = policy_of(&object(serde_json::json!({
            "selector": { "matchLabels": { "app": "web" } },
            "rules": [{ "from": [{ "source": { "principals": ["cluster.local/ns/shop/sa/frontend"] } }] }],
        })))
        .unwrap();
        assert_eq!(policy.name.to_string(), "shop/web-allow");
        assert!(policy.dry_run());
        let spec = policy.spec.as_ref().unwrap();
        assert_eq!(
            spec.rules[0].from[0].source.principals,
            ["cluster.local/ns/shop/sa/frontend"]
        );
        assert_eq!(policy.invalid(), None);

        let unreadable = policy_of(&object(serde_json::json!({ "rules": "all" }))).unwrap();
        let error = unreadable.invalid().unwrap();
        assert_eq!(error.field, "spec.rules");
        assert!(
            error.problem.starts_with("invalid type: string \"all\""),
            "{error}"
        );
    }

    #[test]
    fn the_trust_domain_flag_is_read_in_either_form() {
        let args = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            flag_value(
                args(&["--node", "x", "--trust-domain", "example.org"]),
                TRUST_DOMAIN_FLAG
            ),
            Some("example.org".to_owned())
        );
        assert_eq!(
            flag_value(args(&["--trust-domain=example.org"]), TRUST_DOMAIN_FLAG),
            Some("example.org".to_owned())
        );
        assert_eq!(
            flag_value(args(&["--trust-domainx=a"]), TRUST_DOMAIN_FLAG),
            None
        );
    }

    fn agent_pod(name: &str, node: &str, phase: &str, created: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "creationTimestamp": created},
            "spec": {"nodeName": node, "containers": []},
            "status": {"phase": phase, "hostIP": "172.18.0.2"},
        }))
        .unwrap()
    }

    #[test]
    fn one_agent_per_node_the_running_newest_pod() {
        let agents = agents_of(vec![
            agent_pod(
                "sealmesh-agent-old",
                "node-0",
                "Running",
                "2026-01-01T00:00:00Z",
            ),
            agent_pod(
                "sealmesh-agent-new",
                "node-0",
                "Running",
                "2026-01-02T00:00:00Z",
            ),
            agent_pod(
                "sealmesh-agent-pending",
                "node-0",
                "Pending",
                "2026-01-03T00:00:00Z",
            ),
            agent_pod(
                "sealmesh-agent-b",
                "node-1",
                "Running",
                "2026-01-01T00:00:00Z",
            ),
        ]);
        let chosen: Vec<(&str, Option<&str>)> = agents
            .iter()
            .map(|a| (a.node.as_str(), a.pod.as_deref()))
            .collect();
        assert_eq!(
            chosen,
            [
                ("node-0", Some("sealmesh-agent-new")),
                ("node-1", Some("sealmesh-agent-b"))
            ]
        );
        assert_eq!(agents[0].node_ip, Ipv4Addr::new(172, 18, 0, 2));
    }
}
