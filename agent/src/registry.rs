//! The workloads the agent knows: pods (with their identity, node and, for
//! local pods, cgroup) and Services. Behind a trait: the cluster file feeds
//! [`LocalRegistry`], the Kubernetes API feeds [`crate::kube::KubeRegistry`];
//! both answer from the same immutable [`Snapshot`].

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use ipnet::Ipv4Net;

use crate::{config::ServiceName, dir_watch::DirWatcher};
use sealmesh_common::{
    authz::{CompiledPolicy, PodPolicies, PolicySet},
    cluster::{ClusterError, ClusterFile},
    file_watch::FileWatch,
    host,
    identity::{Identity, TrustDomain},
    policy::InboundPolicyAnnotations,
};
use tokio::sync::watch;

/// How often [`LocalRegistry::watch`] checks the cluster file and the local
/// pods' cgroups, besides the inotify watches that normally see changes at
/// once: a safety net for missed events, and the only way when the watches
/// cannot be set up.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub ip: Ipv4Addr,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: Identity,
    /// The pod's address in the pod network. None for a local pod that has
    /// none (yet: scheduled, not started) or shares its node's network
    /// (hostNetwork): such a pod is known only as a source, by its cgroup.
    pub ip: Option<Ipv4Addr>,
    pub node: String,
    pub node_ip: Ipv4Addr,
    pub meshed: bool,
    /// What the pod's and its namespace's `sealmesh.io/inbound-policy`
    /// annotations say (the agent's default fills in the rest).
    pub inbound_policy: InboundPolicyAnnotations,
    /// Some only for pods on this node whose cgroup directory exists.
    pub cgroup_id: Option<u64>,
    /// The authorization policies selecting this pod (local meshed pods
    /// only: the agent judges connections to its own pods), compiled when
    /// pods or policies change.
    pub authz: PodPolicies,
}

/// Where a connection to a pod or Service goes: a pod and the address (pod
/// IP and, for a Service, the target port) to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub workload: Arc<Workload>,
    pub addr: SocketAddrV4,
}

pub trait WorkloadRegistry: Send + Sync + 'static {
    fn local_node(&self) -> &NodeInfo;
    fn trust_domain(&self) -> &TrustDomain;
    fn by_cgroup(&self, cgroup_id: u64) -> Option<Arc<Workload>>;
    fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Workload>>;
    /// Pod IP:port -> that pod; Service VIP:port -> one endpoint pod (round
    /// robin) with the target port; None -> outside the cluster (or a Service
    /// without endpoints or that port).
    fn resolve(&self, dst: SocketAddrV4) -> Option<Endpoint>;
    fn local_workloads(&self) -> Vec<Arc<Workload>>;
    /// Whether `ip` is in the cluster's pod or Service networks: a pod or a
    /// Service of the cluster, known or not (yet).
    fn in_cluster_network(&self, ip: Ipv4Addr) -> bool;
    /// Whether `dst` is a Service port served only by addresses that are no
    /// pods (the API server behind `kubernetes.default`): traffic to it
    /// leaves the mesh.
    fn served_outside_pods(&self, dst: SocketAddrV4) -> bool;
    /// The Service whose ClusterIP `ip` is, or whose endpoint outside the
    /// cluster's networks (None: no Service, or not known; never grounds for
    /// an exemption then).
    fn service_at(&self, _ip: Ipv4Addr) -> Option<ServiceName> {
        None
    }
    /// Ids of the cgroups this node's pods are created in (their direct parents), sorted.
    fn pod_parent_cgroups(&self) -> Vec<u64>;
    /// Every authorization policy of the cluster, compiled (none for a
    /// registry that follows no policy source).
    fn policies(&self) -> Arc<PolicySet> {
        Arc::default()
    }
    /// What of the registry's source fails now (e.g. the Kubernetes API's
    /// pod watch), with the error, sorted; empty while it follows its
    /// source. The registry serves its last state meanwhile.
    fn source_failures(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Bumped on every change (pods/services come and go).
    fn subscribe(&self) -> watch::Receiver<u64>;
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(
        "node {node:?} is not in cluster file {path}; start the agent with one of its node names: {known}"
    )]
    UnknownNode {
        node: String,
        path: PathBuf,
        known: String,
    },
    #[error(
        "cluster file {path} changed this node's {what}; the agent keeps the old value until it is restarted"
    )]
    ImmutableChanged { path: PathBuf, what: &'static str },
}

/// A registry fed by the cluster file, for one node. Re-reads the file when
/// it changes ([`LocalRegistry::watch`]); a bad file keeps the last good state.
pub struct LocalRegistry {
    path: PathBuf,
    node: NodeInfo,
    /// The cluster's pod and Service networks (configured at start).
    cluster_networks: Vec<Ipv4Net>,
    trust_domain: TrustDomain,
    published: Published,
    source: Mutex<Source>,
}

impl std::fmt::Debug for LocalRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRegistry")
            .field("path", &self.path)
            .field("node", &self.node)
            .field("version", &self.published.version())
            .finish_non_exhaustive()
    }
}

/// The last good file and the text of the last version read (good or not):
/// a version is parsed, and a bad one reported, once.
struct Source {
    file: ClusterFile,
    text: String,
}

fn read_cluster_file(path: &Path) -> Result<String, ClusterError> {
    std::fs::read_to_string(path).map_err(|source| ClusterError::Read {
        path: path.to_owned(),
        source,
    })
}

impl LocalRegistry {
    /// Reads the cluster file for `node_name`; `cluster_networks` are the
    /// cluster's pod and Service networks. Fails when the file is bad or
    /// does not list the node.
    pub fn load(
        path: &Path,
        node_name: &str,
        cluster_networks: Vec<Ipv4Net>,
    ) -> Result<Arc<Self>, RegistryError> {
        let text = read_cluster_file(path)?;
        let file = ClusterFile::from_yaml(&text)?;
        let node = file
            .node(node_name)
            .ok_or_else(|| RegistryError::UnknownNode {
                node: node_name.to_owned(),
                path: path.to_owned(),
                known: file.node_names(),
            })?;
        let node = NodeInfo {
            name: node.name.clone(),
            ip: node.ip,
        };
        let trust_domain = file.trust_domain()?;
        let snapshot = Snapshot::build(&file, &node.name, &cluster_networks)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            node,
            cluster_networks,
            trust_domain,
            published: Published::new(snapshot),
            source: Mutex::new(Source { file, text }),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file if it changed since the last read, and rebuilds the
    /// state if the file changed or a local pod's cgroup may have appeared.
    /// Returns whether the state changed (and the version was bumped). On
    /// error the last good state stays.
    pub fn reload(&self) -> Result<bool, RegistryError> {
        self.refresh(false)
    }

    /// [`LocalRegistry::reload`], also rebuilding when `cgroups_changed`
    /// (a pod cgroup was created or removed: a pod's cgroup may have been
    /// replaced by one with another id).
    fn refresh(&self, cgroups_changed: bool) -> Result<bool, RegistryError> {
        let mut source = self.source.lock().expect("registry source lock poisoned");
        let text = read_cluster_file(&self.path)?;
        let file_changed = text != source.text;
        if file_changed {
            // Recorded first so one bad version is reported once, not every poll.
            source.text = text;
            let file = ClusterFile::from_yaml(&source.text)?;
            self.check_immutable(&file)?;
            source.file = file;
        } else if !cgroups_changed && !self.published.load().missing_cgroups {
            return Ok(false);
        }
        let snapshot = Snapshot::build(&source.file, &self.node.name, &self.cluster_networks)?;
        Ok(self.published.publish(snapshot))
    }

    /// Reloads when the cluster file changes (rewritten or replaced) or a
    /// directory appears in (or leaves) the node's cgroup, where pod cgroups
    /// are created (inotify), and every `interval` in case an event was
    /// missed, until `shutdown` resolves; logs changes and errors.
    pub async fn watch(self: Arc<Self>, interval: Duration, shutdown: impl Future<Output = ()>) {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let file_watch = FileWatch::new([&self.path])
            .inspect_err(|error| {
                tracing::warn!(%error, ?interval, "cluster file changes are found by polling only");
            })
            .ok();
        let mut file_changes = file_watch.as_ref().map(FileWatch::subscribe);
        let mut cgroup_events = match DirWatcher::new(self.node_cgroup()) {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, ?interval, "pod cgroup changes are found by polling only");
                None
            }
        };
        loop {
            let cgroups_changed = tokio::select! {
                () = &mut shutdown => return,
                _ = ticks.tick() => false,
                changed = async { file_changes.as_mut()?.changed().await.ok() }, if file_changes.is_some() => {
                    if changed.is_none() {
                        tracing::warn!(?interval, "watching the cluster file failed; its changes are found by polling only");
                        file_changes = None;
                    }
                    false
                }
                changed = async { cgroup_events.as_mut()?.changed().await.ok() }, if cgroup_events.is_some() => {
                    if changed.is_none() {
                        tracing::warn!(?interval, "watching pod cgroups failed; their changes are found by polling only");
                        cgroup_events = None;
                    }
                    true
                }
            };
            match self.refresh(cgroups_changed) {
                Ok(true) => tracing::info!(
                    path = %self.path.display(),
                    version = self.published.version(),
                    "workload registry reloaded"
                ),
                Ok(false) => {}
                Err(error) => tracing::error!(
                    path = %self.path.display(),
                    %error,
                    "cluster file rejected; keeping the last good state"
                ),
            }
        }
    }

    /// This node's cgroup, where its pods' cgroups are created.
    fn node_cgroup(&self) -> Vec<PathBuf> {
        let source = self.source.lock().expect("registry source lock poisoned");
        source
            .file
            .node(&self.node.name)
            .map(|n| n.cgroup.clone())
            .into_iter()
            .collect()
    }

    fn check_immutable(&self, file: &ClusterFile) -> Result<(), RegistryError> {
        let changed = |what| RegistryError::ImmutableChanged {
            path: self.path.clone(),
            what,
        };
        let node = file
            .node(&self.node.name)
            .ok_or_else(|| changed("presence"))?;
        if node.ip != self.node.ip {
            return Err(changed("IP"));
        }
        if file.trust_domain()? != self.trust_domain {
            return Err(changed("trust domain"));
        }
        Ok(())
    }
}

impl WorkloadRegistry for LocalRegistry {
    fn local_node(&self) -> &NodeInfo {
        &self.node
    }

    fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    fn by_cgroup(&self, cgroup_id: u64) -> Option<Arc<Workload>> {
        self.published.by_cgroup(cgroup_id)
    }

    fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Workload>> {
        self.published.by_ip(ip)
    }

    fn resolve(&self, dst: SocketAddrV4) -> Option<Endpoint> {
        self.published.resolve(dst)
    }

    fn local_workloads(&self) -> Vec<Arc<Workload>> {
        self.published.local_workloads()
    }

    fn in_cluster_network(&self, ip: Ipv4Addr) -> bool {
        self.published.in_cluster_network(ip)
    }

    fn served_outside_pods(&self, dst: SocketAddrV4) -> bool {
        self.published.served_outside_pods(dst)
    }

    fn service_at(&self, ip: Ipv4Addr) -> Option<ServiceName> {
        self.published.service_at(ip)
    }

    fn pod_parent_cgroups(&self) -> Vec<u64> {
        self.published.pod_parent_cgroups()
    }

    fn policies(&self) -> Arc<PolicySet> {
        self.published.policies()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }
}

/// One immutable view of the cluster, swapped whole on change. Both
/// registries build one: from the cluster file, or from the Kubernetes API.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    by_ip: HashMap<Ipv4Addr, Arc<Workload>>,
    by_cgroup: HashMap<u64, Arc<Workload>>,
    local: Vec<Arc<Workload>>,
    /// Service VIP -> Service port -> the endpoints behind it.
    services: HashMap<Ipv4Addr, HashMap<u16, Backends>>,
    /// Service VIP, and endpoint address outside the cluster's networks
    /// (the API server's), -> that Service.
    pub(crate) service_names: HashMap<Ipv4Addr, ServiceName>,
    /// The cgroups this node's pods are created in, sorted.
    pub(crate) pod_parents: Vec<u64>,
    /// The cluster's pod and Service networks.
    pub(crate) cluster_networks: Vec<Ipv4Net>,
    /// Service ports whose endpoints are addresses outside the cluster's
    /// networks and no pods.
    pub(crate) served_outside_pods: HashSet<SocketAddrV4>,
    /// A local pod's cgroup directory did not exist (yet): worth a re-scan.
    pub(crate) missing_cgroups: bool,
    /// Every authorization policy of the cluster.
    pub(crate) policies: Arc<PolicySet>,
}

/// The endpoints of one Service port, each with its own target port (named
/// target ports may resolve to different numbers on different pods).
#[derive(Debug)]
struct Backends {
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
}

impl PartialEq for Backends {
    // The round-robin position is not part of the cluster's state.
    fn eq(&self, other: &Self) -> bool {
        self.endpoints == other.endpoints
    }
}

impl Eq for Backends {}

impl Snapshot {
    /// Indexes `workloads`; those on `local_node` are the local ones, in the
    /// order given.
    pub(crate) fn with_workloads(
        workloads: impl IntoIterator<Item = Arc<Workload>>,
        local_node: &str,
    ) -> Self {
        let mut snapshot = Self::default();
        for workload in workloads {
            if let Some(id) = workload.cgroup_id {
                snapshot.by_cgroup.insert(id, workload.clone());
            }
            if workload.node == local_node {
                snapshot.local.push(workload.clone());
            }
            if let Some(ip) = workload.ip {
                snapshot.by_ip.insert(ip, workload);
            }
        }
        snapshot
    }

    pub(crate) fn workload_by_ip(&self, ip: Ipv4Addr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip)
    }

    /// The local node's pods, in the order they were given.
    pub(crate) fn local(&self) -> &[Arc<Workload>] {
        &self.local
    }

    /// Routes `vip:port` to `endpoints` (round robin), replacing what the
    /// port had.
    pub(crate) fn set_service_port(&mut self, vip: Ipv4Addr, port: u16, endpoints: Vec<Endpoint>) {
        self.services.entry(vip).or_default().insert(
            port,
            Backends {
                endpoints,
                next: AtomicUsize::new(0),
            },
        );
    }

    fn build(
        file: &ClusterFile,
        local_node: &str,
        cluster_networks: &[Ipv4Net],
    ) -> Result<Self, RegistryError> {
        let mut workloads = Vec::with_capacity(file.pods.len());
        let policies = PolicySet::new(
            &file.control_namespace,
            file.authorization_policies
                .iter()
                .map(CompiledPolicy::compile),
        );
        // The node's cgroup is the parent of its pods' cgroups.
        let node_cgroup = file
            .node(local_node)
            .map(|node| host::cgroup_id(&node.cgroup));
        let mut missing_cgroups = !matches!(node_cgroup, Some(Ok(_)));
        for pod in &file.pods {
            let node = file
                .node(&pod.node)
                .expect("validated cluster files list every pod's node");
            let cgroup_id = if pod.node == local_node {
                match host::cgroup_id(&pod.cgroup) {
                    Ok(id) => Some(id),
                    Err(error) => {
                        tracing::debug!(pod = %pod.name, cgroup = %pod.cgroup.display(), %error,
                            "local pod's cgroup is not there (yet)");
                        missing_cgroups = true;
                        None
                    }
                }
            } else {
                None
            };
            let meshed = file.is_meshed(pod);
            let authz = if meshed && pod.node == local_node {
                policies.for_pod(&pod.namespace, &pod.labels)
            } else {
                PodPolicies::default()
            };
            workloads.push(Arc::new(Workload {
                name: pod.name.clone(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
                identity: file.identity_of(pod)?,
                ip: Some(pod.ip),
                node: pod.node.clone(),
                node_ip: node.ip,
                meshed,
                inbound_policy: file.inbound_policy_annotations(pod),
                cgroup_id,
                authz,
            }));
        }
        let mut snapshot = Self::with_workloads(workloads, local_node);
        snapshot.missing_cgroups = missing_cgroups;
        snapshot.pod_parents = node_cgroup.and_then(Result::ok).into_iter().collect();
        snapshot.cluster_networks = cluster_networks.to_vec();
        snapshot.policies = Arc::new(policies);
        for svc in &file.services {
            for port in &svc.ports {
                let endpoints = file
                    .endpoints(svc)
                    .map(|pod| Endpoint {
                        workload: snapshot.by_ip[&pod.ip].clone(),
                        addr: SocketAddrV4::new(pod.ip, port.target_port),
                    })
                    .collect();
                snapshot.set_service_port(svc.vip, port.port, endpoints);
            }
            snapshot.service_names.insert(
                svc.vip,
                ServiceName {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                },
            );
        }
        Ok(snapshot)
    }

    pub(crate) fn in_cluster_network(&self, ip: Ipv4Addr) -> bool {
        self.cluster_networks.iter().any(|net| net.contains(&ip))
    }

    pub(crate) fn resolve(&self, dst: SocketAddrV4) -> Option<Endpoint> {
        if let Some(workload) = self.by_ip.get(dst.ip()) {
            return Some(Endpoint {
                workload: workload.clone(),
                addr: dst,
            });
        }
        let backends = self.services.get(dst.ip())?.get(&dst.port())?;
        if backends.endpoints.is_empty() {
            return None;
        }
        let pick = backends.next.fetch_add(1, Ordering::Relaxed) % backends.endpoints.len();
        Some(backends.endpoints[pick].clone())
    }
}

/// The current snapshot and its version: what a registry answers queries
/// from and what subscribers watch.
#[derive(Debug)]
pub(crate) struct Published {
    snapshot: ArcSwap<Snapshot>,
    version: watch::Sender<u64>,
}

impl Published {
    pub(crate) fn new(snapshot: Snapshot) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            version: watch::Sender::new(0),
        }
    }

    pub(crate) fn load(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Installs `snapshot` and bumps the version, unless it equals the
    /// current one. Returns whether it changed.
    pub(crate) fn publish(&self, snapshot: Snapshot) -> bool {
        if **self.snapshot.load() == snapshot {
            return false;
        }
        self.snapshot.store(Arc::new(snapshot));
        self.version.send_modify(|v| *v += 1);
        true
    }

    pub(crate) fn version(&self) -> u64 {
        *self.version.borrow()
    }

    pub(crate) fn by_cgroup(&self, cgroup_id: u64) -> Option<Arc<Workload>> {
        self.snapshot.load().by_cgroup.get(&cgroup_id).cloned()
    }

    pub(crate) fn by_ip(&self, ip: Ipv4Addr) -> Option<Arc<Workload>> {
        self.snapshot.load().by_ip.get(&ip).cloned()
    }

    pub(crate) fn resolve(&self, dst: SocketAddrV4) -> Option<Endpoint> {
        self.snapshot.load().resolve(dst)
    }

    pub(crate) fn local_workloads(&self) -> Vec<Arc<Workload>> {
        self.snapshot.load().local().to_vec()
    }

    pub(crate) fn pod_parent_cgroups(&self) -> Vec<u64> {
        self.snapshot.load().pod_parents.clone()
    }

    pub(crate) fn in_cluster_network(&self, ip: Ipv4Addr) -> bool {
        self.snapshot.load().in_cluster_network(ip)
    }

    pub(crate) fn policies(&self) -> Arc<PolicySet> {
        self.snapshot.load().policies.clone()
    }

    pub(crate) fn served_outside_pods(&self, dst: SocketAddrV4) -> bool {
        self.snapshot.load().served_outside_pods.contains(&dst)
    }

    pub(crate) fn service_at(&self, ip: Ipv4Addr) -> Option<ServiceName> {
        self.snapshot.load().service_names.get(&ip).cloned()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use sealmesh_common::host::cgroup_id;

    use super::*;

    /// node-0 (local): web-0, web-1 (meshed, sa web), db-0 (opted out), curl (unmeshed ns);
    /// node-1: web-2 (meshed). Pod "cgroups" are plain directories: their id is the inode.
    fn cluster_yaml(dir: &Path) -> String {
        let cg = dir.display();
        format!(
            r#"
apiVersion: sealmesh.io/v1alpha1
kind: Cluster
name: tb-test
nodes:
  - {{ name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: {cg}/node-0 }}
  - {{ name: node-1, ip: 172.18.0.3, podCidr: 10.244.1.0/24, cgroup: {cg}/node-1 }}
namespaces:
  - {{ name: emojivoto, labels: {{ sealmesh.io/mesh: enabled }} }}
  - {{ name: plain }}
pods:
  - {{ name: web-0, namespace: emojivoto, serviceAccount: web, ip: 10.244.0.2, node: node-0, cgroup: {cg}/node-0/web-0, labels: {{ app: web }} }}
  - {{ name: web-1, namespace: emojivoto, serviceAccount: web, ip: 10.244.0.3, node: node-0, cgroup: {cg}/node-0/web-1, labels: {{ app: web }} }}
  - {{ name: db-0, namespace: emojivoto, serviceAccount: db, ip: 10.244.0.4, node: node-0, cgroup: {cg}/node-0/db-0, annotations: {{ sealmesh.io/mesh: disabled }} }}
  - {{ name: curl, namespace: plain, serviceAccount: default, ip: 10.244.0.5, node: node-0, cgroup: {cg}/node-0/curl }}
  - {{ name: web-2, namespace: emojivoto, serviceAccount: web, ip: 10.244.1.2, node: node-1, cgroup: {cg}/node-1/web-2, labels: {{ app: web }} }}
services:
  - {{ name: web-svc, namespace: emojivoto, vip: 10.96.0.10, ports: [{{ port: 80, targetPort: 8080 }}], selector: {{ app: web }} }}
  - {{ name: none-svc, namespace: emojivoto, vip: 10.96.0.11, ports: [{{ port: 80, targetPort: 8080 }}], selector: {{ app: nothing }} }}
"#
        )
    }

    struct Fixture {
        dir: tempfile::TempDir,
        file: PathBuf,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            for pod in ["web-0", "web-1", "db-0", "curl"] {
                fs::create_dir_all(dir.path().join("node-0").join(pod)).unwrap();
            }
            let file = dir.path().join("cluster.yaml");
            fs::write(&file, cluster_yaml(dir.path())).unwrap();
            Self { dir, file }
        }

        fn cgroup(&self, pod: &str) -> u64 {
            cgroup_id(&self.dir.path().join("node-0").join(pod)).unwrap()
        }

        fn rewrite(&self, edit: impl FnOnce(&mut ClusterFile)) {
            let mut file = ClusterFile::load(&self.file).unwrap();
            edit(&mut file);
            file.save(&self.file).unwrap();
        }
    }

    fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(ip), port)
    }

    #[test]
    fn indexes_pods_by_cgroup_and_ip() {
        let fx = Fixture::new();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();
        assert_eq!(
            reg.local_node(),
            &NodeInfo {
                name: "node-0".into(),
                ip: Ipv4Addr::new(172, 18, 0, 2)
            }
        );
        assert_eq!(reg.trust_domain(), &TrustDomain::default());

        let web0 = reg.by_cgroup(fx.cgroup("web-0")).unwrap();
        assert_eq!(
            *web0,
            Workload {
                name: "web-0".into(),
                namespace: "emojivoto".into(),
                service_account: "web".into(),
                identity: TrustDomain::default().identity("emojivoto", "web").unwrap(),
                ip: Some(Ipv4Addr::new(10, 244, 0, 2)),
                node: "node-0".into(),
                node_ip: Ipv4Addr::new(172, 18, 0, 2),
                meshed: true,
                inbound_policy: InboundPolicyAnnotations::default(),
                cgroup_id: Some(fx.cgroup("web-0")),
                authz: PodPolicies::default(),
            }
        );
        assert!(!reg.by_cgroup(fx.cgroup("db-0")).unwrap().meshed);
        assert!(!reg.by_cgroup(fx.cgroup("curl")).unwrap().meshed);
        assert_eq!(reg.by_cgroup(1), None);

        let web2 = reg.by_ip(Ipv4Addr::new(10, 244, 1, 2)).unwrap();
        assert_eq!(
            (
                web2.name.as_str(),
                web2.node_ip,
                web2.cgroup_id,
                web2.meshed
            ),
            ("web-2", Ipv4Addr::new(172, 18, 0, 3), None, true)
        );
        assert_eq!(reg.by_ip(Ipv4Addr::new(10, 244, 9, 9)), None);

        let local: Vec<_> = reg
            .local_workloads()
            .iter()
            .map(|w| w.name.clone())
            .collect();
        assert_eq!(local, ["web-0", "web-1", "db-0", "curl"]);
    }

    #[test]
    fn resolves_pod_ips_and_service_vips() {
        let fx = Fixture::new();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();

        let direct = reg.resolve(addr([10, 244, 1, 2], 9000)).unwrap();
        assert_eq!(
            (direct.workload.name.as_str(), direct.addr.port()),
            ("web-2", 9000)
        );

        let picks: Vec<_> = (0..6)
            .map(|_| {
                let ep = reg.resolve(addr([10, 96, 0, 10], 80)).unwrap();
                (ep.workload.name.clone(), ep.addr.port())
            })
            .collect();
        let expected: Vec<_> = ["web-0", "web-1", "web-2", "web-0", "web-1", "web-2"]
            .iter()
            .map(|n| (n.to_string(), 8080))
            .collect();
        assert_eq!(picks, expected);

        assert_eq!(
            reg.resolve(addr([10, 96, 0, 10], 81)),
            None,
            "port the Service does not expose"
        );
        assert_eq!(
            reg.resolve(addr([10, 96, 0, 11], 80)),
            None,
            "Service without endpoints"
        );
        assert_eq!(
            reg.resolve(addr([8, 8, 8, 8], 53)),
            None,
            "outside the cluster"
        );
    }

    #[test]
    fn reloads_a_changed_file_and_notifies() {
        let fx = Fixture::new();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();
        let mut changes = reg.subscribe();
        assert!(!reg.reload().unwrap(), "nothing changed yet");

        fx.rewrite(|f| f.pods.retain(|p| p.name != "web-1"));
        assert!(reg.reload().unwrap());
        assert!(changes.has_changed().unwrap());
        assert_eq!(*changes.borrow_and_update(), 1);
        assert_eq!(reg.by_ip(Ipv4Addr::new(10, 244, 0, 3)), None);
        assert_eq!(reg.by_cgroup(fx.cgroup("web-1")), None);
        let picks: Vec<_> = (0..2)
            .map(|_| {
                reg.resolve(addr([10, 96, 0, 10], 80))
                    .unwrap()
                    .workload
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(picks, ["web-0", "web-2"]);

        // Same content written again (a new inode): same state, no bump.
        fx.rewrite(|_| {});
        assert!(!reg.reload().unwrap());
        assert!(!changes.has_changed().unwrap());
    }

    #[test]
    fn the_node_cgroup_is_the_pods_parent() {
        let fx = Fixture::new();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();
        assert_eq!(
            reg.pod_parent_cgroups(),
            [cgroup_id(&fx.dir.path().join("node-0")).unwrap()]
        );
    }

    #[test]
    fn picks_up_a_local_cgroup_created_after_the_file() {
        let fx = Fixture::new();
        fs::remove_dir(fx.dir.path().join("node-0/curl")).unwrap();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();
        let curl = reg.by_ip(Ipv4Addr::new(10, 244, 0, 5)).unwrap();
        assert_eq!(curl.cgroup_id, None);

        fs::create_dir(fx.dir.path().join("node-0/curl")).unwrap();
        assert!(reg.reload().unwrap());
        assert_eq!(reg.by_cgroup(fx.cgroup("curl")).unwrap().name, "curl");
    }

    #[test]
    fn bad_file_keeps_the_last_good_state() {
        let fx = Fixture::new();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();
        let changes = reg.subscribe();

        fs::write(
            &fx.file,
            "apiVersion: sealmesh.io/v1alpha1\nkind: Cluster\nnodes: [oops\n",
        )
        .unwrap();
        assert!(matches!(reg.reload(), Err(RegistryError::Cluster(_))));
        assert!(!reg.reload().unwrap(), "a bad version is reported once");
        assert_eq!(
            reg.by_ip(Ipv4Addr::new(10, 244, 0, 3)).unwrap().name,
            "web-1"
        );

        fs::write(
            &fx.file,
            cluster_yaml(fx.dir.path()).replace("172.18.0.2", "172.18.0.9"),
        )
        .unwrap();
        let err = reg.reload().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cluster file {} changed this node's IP; the agent keeps the old value until it is restarted",
                fx.file.display()
            )
        );
        assert_eq!(reg.local_node().ip, Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(reg.local_workloads().len(), 4);
        assert!(!changes.has_changed().unwrap());
    }

    #[test]
    fn unknown_node_names_the_known_ones() {
        let fx = Fixture::new();
        let err = LocalRegistry::load(&fx.file, "node-7", Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "node \"node-7\" is not in cluster file {}; start the agent with one of its node names: node-0, node-1",
                fx.file.display()
            )
        );
    }

    #[tokio::test]
    async fn watch_sees_a_new_pod_cgroup_and_a_replaced_or_rewritten_file_at_once() {
        let fx = Fixture::new();
        fs::remove_dir(fx.dir.path().join("node-0/curl")).unwrap();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();
        let mut changes = reg.subscribe();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Polling alone would take an hour.
        let task = tokio::spawn(reg.clone().watch(Duration::from_secs(3600), async {
            let _ = stopped.await;
        }));
        // The first tick polls at once; what follows is inotify's.
        tokio::time::sleep(Duration::from_millis(100)).await;
        fs::create_dir(fx.dir.path().join("node-0/curl")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("the new cgroup is seen without polling")
            .unwrap();
        assert_eq!(reg.by_cgroup(fx.cgroup("curl")).unwrap().name, "curl");
        fx.rewrite(|f| f.services.clear());
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("the replaced file is read without polling")
            .unwrap();
        assert_eq!(reg.resolve(addr([10, 96, 0, 10], 80)), None);
        fs::write(&fx.file, cluster_yaml(fx.dir.path())).unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("the file rewritten in place is read without polling")
            .unwrap();
        assert!(reg.resolve(addr([10, 96, 0, 10], 80)).is_some());
        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn watch_polls_until_shutdown() {
        let fx = Fixture::new();
        let reg = LocalRegistry::load(&fx.file, "node-0", Vec::new()).unwrap();
        let mut changes = reg.subscribe();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(reg.clone().watch(Duration::from_millis(20), async {
            let _ = stopped.await;
        }));
        fx.rewrite(|f| f.services.clear());
        changes.changed().await.unwrap();
        assert_eq!(reg.resolve(addr([10, 96, 0, 10], 80)), None);
        stop.send(()).unwrap();
        task.await.unwrap();
    }
}
