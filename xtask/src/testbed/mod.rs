//! A kind-like cluster on one Linux host, built from network namespaces and
//! cgroup v2, for tests, the demo and benchmarks (needs root).
//!
//! Topology (`sm-<id>-...` are named network namespaces, see [`layout`]):
//! - underlay `sm-<id>-u`: bridge `br0` 172.18.0.1/16 (the control plane listens
//!   there) with one port `n<k>` per node and routes to every pod CIDR via its node;
//! - node k `sm-<id>-n<k>`: `eth0` 172.18.0.(k+2)/16 on the bridge, ip_forward on,
//!   routes to other nodes' pod CIDRs 10.244.j.0/24 via 172.18.0.(j+2), and per pod
//!   a veth `p<m>` holding 10.244.k.1/32 with a /32 route to the pod;
//! - pod m of node k `sm-<id>-n<k>-p<m>`: `eth0` 10.244.k.(m+2)/32, gateway
//!   10.244.k.1 (on-link) for 10.244.0.0/16, 172.18.0.0/16 and 10.96.0.0/16.
//!
//! No namespace has a default route. cgroups: `<cgroup2>/sealmesh-testbed/<id>/`
//! holds `underlay/`, `<node>/` and `<node>/<namespace>_<pod>/`. State:
//! `/run/sealmesh/<id>/` holds `cluster.yaml`, `<node>.token` and
//! `sa-<namespace>_<serviceaccount>.token`; agents pin maps in
//! `<bpffs>/sealmesh-testbed/<id>/<node>/`. Dropping a [`Testbed`] (also while
//! unwinding from a panic) kills its processes and removes all of it.
//!
//! Kubernetes mode ([`kube`]): a testbed built with [`Testbed::up_for_kubelet`]
//! has no pod cgroups until [`kube::KubeCluster`] registers its pods with an
//! API server; they then get kubelet-named cgroups below their node's, and the
//! cluster file records each pod's container cgroup, where its processes run.

pub mod api_relay;
pub mod cgroup;
pub mod kube;
pub mod layout;
mod net;
pub mod netns;
pub mod spec;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::OpenOptions,
    io::{self, Write as _},
    net::Ipv4Addr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread::JoinHandle,
};

use rand::RngCore;
use sealmesh_common::{
    authz::AuthorizationPolicy,
    cluster::{self, ClusterError, ClusterFile, IdentityEndpoint},
};

pub use layout::TestbedId;
use layout::{HostPaths, Layout, NETNS_PREFIX, STATE_ROOT};
pub use net::NetError;
pub use netns::ChildGuard;
pub use spec::{MESHED_NAMESPACE, PodSpec, SpecError, TestbedSpec};

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error(
        "the testbed needs root (it creates network namespaces and cgroups): run with `sudo -E`"
    )]
    NotRoot,
    #[error(
        "cgroup v2 is not mounted (looked in /proc/self/mountinfo): mount it, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error(
        "bpffs is not mounted: run `sudo -E cargo xtask setup`, which mounts it at /sys/fs/bpf"
    )]
    NoBpffs,
    #[error(
        "invalid testbed id {0:?}: expected `tb-` and 6 hex digits, as `cargo xtask testbed list` shows"
    )]
    BadId(String),
    #[error("invalid testbed spec: {0}")]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot enter network namespace {netns}: {source}")]
    Setns {
        netns: String,
        source: nix::errno::Errno,
    },
    #[error("cannot start `{command}` in network namespace {netns}: {source}")]
    Spawn {
        command: String,
        netns: String,
        source: io::Error,
    },
    #[error(
        "testbed {id} has no {what} named {name:?}; `cargo xtask testbed list` shows its pods and nodes"
    )]
    Unknown {
        id: TestbedId,
        what: &'static str,
        name: String,
    },
    #[error(
        "testbed {0} is not running (no {STATE_ROOT}/{0}/cluster.yaml); `cargo xtask testbed list` shows running ones"
    )]
    NotRunning(TestbedId),
    #[error("the cluster file is not a testbed's: {what}")]
    NotATestbed { what: String },
    #[error(
        "tearing down testbed {id} left things behind ({problems}); `sudo -E cargo xtask testbed down --all` retries"
    )]
    Teardown { id: TestbedId, problems: String },
    #[error("sweeping testbed leftovers left things behind: {0}")]
    SweepIncomplete(String),
}

/// Fails unless the process is root.
pub fn require_root() -> Result<(), TestbedError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(TestbedError::NotRoot)
    }
}

/// A running testbed. Owned testbeds (from [`Testbed::up`]) are torn down on drop.
#[derive(Debug)]
pub struct Testbed {
    layout: Layout,
    cluster: ClusterFile,
    /// Pods (namespace, name) laid out (network, cgroup) but left out of the
    /// cluster file, as pods the agents have not heard of yet.
    unlisted: BTreeSet<(String, String)>,
    /// Whether dropping this value tears the testbed down.
    owned: bool,
}

impl Testbed {
    /// Builds a testbed as `spec` describes. On error, whatever was created is removed.
    pub fn up(spec: &TestbedSpec) -> Result<Self, TestbedError> {
        Self::build(spec, PodCgroups::Create)
    }

    /// Like [`Testbed::up`], but leaves pod cgroups to a kubelet stand-in
    /// ([`kube::KubeCluster`]), which names them after pod UIDs the API
    /// server assigns.
    pub fn up_for_kubelet(spec: &TestbedSpec) -> Result<Self, TestbedError> {
        Self::build(spec, PodCgroups::Deferred)
    }

    fn build(spec: &TestbedSpec, pod_cgroups: PodCgroups) -> Result<Self, TestbedError> {
        require_root()?;
        let host = HostPaths::detect()?;
        create_dir(host.state_root(), "cannot create state root")?;
        // Creating the state dir claims the id, so concurrent testbeds never share one;
        // ids with leftovers of a crashed run (which lost its state dir) are skipped.
        let layout = loop {
            let layout = Layout::new(TestbedId::random(), host.clone());
            if has_leftovers(&layout) {
                continue;
            }
            match std::fs::create_dir(layout.state_dir()) {
                Ok(()) => break layout,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(TestbedError::Io {
                        what: "cannot create state dir",
                        path: layout.state_dir(),
                        source,
                    });
                }
            }
        };
        let cluster = match spec.to_cluster_file(&layout) {
            Ok(cluster) => cluster,
            Err(e) => {
                let _ = std::fs::remove_dir(layout.state_dir());
                return Err(e.into());
            }
        };
        // From here on, dropping `testbed` on an error path removes what exists.
        let testbed = Self {
            layout,
            cluster,
            unlisted: BTreeSet::new(),
            owned: true,
        };
        testbed.create(pod_cgroups)?;
        tracing::info!(id = %testbed.id(), nodes = testbed.cluster.nodes.len(), pods = testbed.cluster.pods.len(), "testbed up");
        Ok(testbed)
    }

    fn create(&self, pod_cgroups: PodCgroups) -> Result<(), TestbedError> {
        let layout = &self.layout;
        cgroup::create(&layout.underlay_cgroup())?;
        for node in &self.cluster.nodes {
            cgroup::create(&node.cgroup)?;
            create_dir(
                &layout.node_bpffs_dir(&node.name),
                "cannot create bpffs dir",
            )?;
            write_token(&layout.token_file(&node.name))?;
        }
        if pod_cgroups == PodCgroups::Create {
            for pod in &self.cluster.pods {
                cgroup::create(&pod.cgroup)?;
            }
        }
        for token_file in self
            .cluster
            .service_accounts
            .iter()
            .filter_map(|sa| sa.token_file.as_deref())
        {
            write_token(token_file)?;
        }
        net::build(layout, &self.cluster)?;
        self.save()?;
        Ok(())
    }

    /// A testbed another process started (for `testbed exec`/`down`); not torn down
    /// on drop.
    pub fn attach(id: &TestbedId) -> Result<Self, TestbedError> {
        let layout = Layout::new(id.clone(), HostPaths::detect()?);
        let path = layout.cluster_file();
        if !path.exists() {
            return Err(TestbedError::NotRunning(id.clone()));
        }
        let cluster = ClusterFile::load(&path)?;
        Ok(Self {
            layout,
            cluster,
            unlisted: BTreeSet::new(),
            owned: false,
        })
    }

    /// Leaves the testbed running after this value is dropped; returns its id.
    pub fn leave_running(mut self) -> TestbedId {
        self.owned = false;
        self.id().clone()
    }

    /// Kills the testbed's processes and removes everything it created.
    pub fn down(mut self) -> Result<(), TestbedError> {
        self.owned = false;
        teardown(&self.layout)
    }

    pub fn id(&self) -> &TestbedId {
        self.layout.id()
    }

    pub fn cluster(&self) -> &ClusterFile {
        &self.cluster
    }

    pub fn cluster_file_path(&self) -> PathBuf {
        self.layout.cluster_file()
    }

    /// `/run/sealmesh/<id>`: a place for files of this testbed (certs, logs); removed
    /// with it.
    pub fn state_dir(&self) -> PathBuf {
        self.layout.state_dir()
    }

    /// Where `node`'s agent keeps its certificates across restarts: a
    /// directory on the testbed's own tmpfs (mounted on first use, unmounted
    /// with the testbed), as the DaemonSet's memory-backed emptyDir.
    /// Where `node`'s agents hand their listening sockets over.
    pub fn handover_socket(&self, node: &str) -> PathBuf {
        self.layout.handover_socket(node)
    }

    pub fn cert_cache_dir(&self, node: &str) -> Result<PathBuf, TestbedError> {
        let mount = self.layout.cert_cache_mount();
        let mounted = nix::sys::statfs::statfs(&mount)
            .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        if !mounted {
            std::fs::create_dir_all(&mount).map_err(|source| TestbedError::Io {
                what: "cannot create the certificate tmpfs dir",
                path: mount.clone(),
                source,
            })?;
            nix::mount::mount(
                Some("tmpfs"),
                &mount,
                Some("tmpfs"),
                nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                Some("size=16m,mode=0700"),
            )
            .map_err(|errno| TestbedError::Io {
                what: "cannot mount a tmpfs on",
                path: mount.clone(),
                source: errno.into(),
            })?;
        }
        Ok(mount.join(node))
    }

    /// Address of the underlay bridge, where the control plane should listen.
    pub fn control_plane_ip(&self) -> Ipv4Addr {
        layout::UNDERLAY_GATEWAY
    }

    /// Writes the cluster file: the testbed's cluster without its unlisted pods.
    fn save(&self) -> Result<(), TestbedError> {
        let mut listed = self.cluster.clone();
        listed
            .pods
            .retain(|p| self.is_listed(&p.namespace, &p.name));
        listed.save(&self.layout.cluster_file())?;
        Ok(())
    }

    /// Local mode: takes a pod out of the cluster file while its network,
    /// cgroup and processes stay, so agents see a pod they do not know (a
    /// pod just started, as far as they can tell). [`Testbed::list_pod`]
    /// puts it back.
    pub fn unlist_pod(&mut self, namespace: &str, pod: &str) -> Result<(), TestbedError> {
        self.pod(namespace, pod)?;
        self.unlisted.insert((namespace.to_owned(), pod.to_owned()));
        self.save()
    }

    /// Whether the cluster file lists the pod (see [`Testbed::unlist_pod`]).
    pub fn is_listed(&self, namespace: &str, pod: &str) -> bool {
        !self
            .unlisted
            .contains(&(namespace.to_owned(), pod.to_owned()))
    }

    /// Local mode: writes an unlisted pod back into the cluster file (as
    /// the API would learn of a new pod).
    pub fn list_pod(&mut self, namespace: &str, pod: &str) -> Result<(), TestbedError> {
        self.pod(namespace, pod)?;
        self.unlisted
            .remove(&(namespace.to_owned(), pod.to_owned()));
        self.save()
    }

    /// Creates or replaces (by namespace and name) an AuthorizationPolicy in
    /// the cluster file, declaring its namespace if the file does not list
    /// it, and saves the file (atomically: agents read it whole). An invalid
    /// policy leaves the file as it was.
    pub fn set_authorization_policy(
        &mut self,
        policy: AuthorizationPolicy,
    ) -> Result<(), TestbedError> {
        let before = self.cluster.clone();
        if !self
            .cluster
            .namespaces
            .iter()
            .any(|ns| ns.name == policy.namespace)
        {
            self.cluster.namespaces.push(cluster::Namespace {
                name: policy.namespace.clone(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
            });
        }
        let policies = &mut self.cluster.authorization_policies;
        match policies
            .iter_mut()
            .find(|p| p.namespace == policy.namespace && p.name == policy.name)
        {
            Some(existing) => *existing = policy,
            None => policies.push(policy),
        }
        self.save().inspect_err(|_| self.cluster = before)
    }

    /// Removes an AuthorizationPolicy from the cluster file and saves it.
    pub fn remove_authorization_policy(
        &mut self,
        namespace: &str,
        name: &str,
    ) -> Result<(), TestbedError> {
        let unknown = self.unknown("authorization policy", &format!("{namespace}/{name}"));
        let policies = &mut self.cluster.authorization_policies;
        let index = policies
            .iter()
            .position(|p| p.namespace == namespace && p.name == name)
            .ok_or(unknown)?;
        policies.remove(index);
        self.save()
    }

    /// Sets the cluster file's `identity` section and saves the file.
    pub fn set_identity(&mut self, identity: IdentityEndpoint) -> Result<(), TestbedError> {
        self.cluster.identity = Some(identity);
        self.save()
    }

    /// Records where a pod's processes run (Kubernetes mode: its container
    /// cgroup, known once the API server named the pod) and saves the file.
    fn set_pod_cgroup(
        &mut self,
        namespace: &str,
        pod: &str,
        cgroup: PathBuf,
    ) -> Result<(), TestbedError> {
        let unknown = self.unknown("pod", &format!("{namespace}/{pod}"));
        let entry = self
            .cluster
            .pods
            .iter_mut()
            .find(|p| p.namespace == namespace && p.name == pod)
            .ok_or(unknown)?;
        entry.cgroup = cgroup;
        self.save()?;
        Ok(())
    }

    /// Makes a Service's VIP follow the ClusterIP an API server allocated
    /// and saves the file.
    fn set_service_vip(
        &mut self,
        namespace: &str,
        service: &str,
        vip: Ipv4Addr,
    ) -> Result<(), TestbedError> {
        let unknown = self.unknown("service", &format!("{namespace}/{service}"));
        let entry = self
            .cluster
            .services
            .iter_mut()
            .find(|s| s.namespace == namespace && s.name == service)
            .ok_or(unknown)?;
        entry.vip = vip;
        // The API server's range, not the testbed's, holds it: the file no
        // longer names a range it cannot vouch for.
        if self
            .cluster
            .service_cidr
            .is_some_and(|range| !range.contains(&vip))
        {
            self.cluster.service_cidr = None;
        }
        self.save()?;
        Ok(())
    }

    fn node(&self, node: &str) -> Result<&sealmesh_common::cluster::Node, TestbedError> {
        self.cluster
            .node(node)
            .ok_or_else(|| self.unknown("node", node))
    }

    fn pod(
        &self,
        namespace: &str,
        pod: &str,
    ) -> Result<&sealmesh_common::cluster::Pod, TestbedError> {
        self.cluster
            .pod(namespace, pod)
            .ok_or_else(|| self.unknown("pod", &format!("{namespace}/{pod}")))
    }

    fn unknown(&self, what: &'static str, name: &str) -> TestbedError {
        TestbedError::Unknown {
            id: self.id().clone(),
            what,
            name: name.to_owned(),
        }
    }

    /// Where the agent of `node` pins its eBPF maps and links.
    pub fn node_bpffs_dir(&self, node: &str) -> Result<PathBuf, TestbedError> {
        Ok(self.layout.node_bpffs_dir(&self.node(node)?.name))
    }

    pub fn underlay_netns(&self) -> String {
        self.layout.underlay_netns()
    }

    pub fn node_netns(&self, node: &str) -> Result<&str, TestbedError> {
        let node = self.node(node)?;
        node.netns
            .as_deref()
            .ok_or_else(|| TestbedError::NotATestbed {
                what: format!("node {} has no netns", node.name),
            })
    }

    pub fn pod_netns(&self, namespace: &str, pod: &str) -> Result<&str, TestbedError> {
        let pod = self.pod(namespace, pod)?;
        pod.netns
            .as_deref()
            .ok_or_else(|| TestbedError::NotATestbed {
                what: format!("pod {}/{} has no netns", pod.namespace, pod.name),
            })
    }

    /// Starts `cmd` in the pod's network namespace and cgroup.
    pub fn spawn_in_pod(
        &self,
        namespace: &str,
        pod: &str,
        cmd: Command,
    ) -> Result<ChildGuard, TestbedError> {
        let netns = self.pod_netns(namespace, pod)?;
        netns::spawn_in(netns, &self.pod(namespace, pod)?.cgroup, cmd)
    }

    /// Starts `cmd` in the node's network namespace and cgroup (where agents run).
    pub fn spawn_in_node(&self, node: &str, cmd: Command) -> Result<ChildGuard, TestbedError> {
        netns::spawn_in(self.node_netns(node)?, &self.node(node)?.cgroup, cmd)
    }

    /// Starts `cmd` in the underlay namespace (where the control plane runs), in the
    /// testbed's `underlay` cgroup.
    pub fn spawn_in_underlay(&self, cmd: Command) -> Result<ChildGuard, TestbedError> {
        netns::spawn_in(&self.underlay_netns(), &self.layout.underlay_cgroup(), cmd)
    }

    /// See [`netns::run_in_netns`].
    pub fn run_in_netns<T: Send, F: FnOnce() -> T + Send>(
        &self,
        netns: &str,
        f: F,
    ) -> Result<T, TestbedError> {
        netns::run_in_netns(netns, f)
    }

    /// See [`netns::thread_in_netns`].
    pub fn thread_in_netns<T, F>(&self, netns: &str, f: F) -> Result<JoinHandle<T>, TestbedError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        netns::thread_in_netns(netns, f)
    }
}

/// Whether building a testbed creates pod cgroups (local mode) or leaves them
/// to the kubelet stand-in (Kubernetes mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PodCgroups {
    Create,
    Deferred,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.owned
            && let Err(e) = teardown(&self.layout)
        {
            // No caller to return this to; say it where a test run shows it.
            eprintln!("error: {e}");
        }
    }
}

fn has_leftovers(layout: &Layout) -> bool {
    !net::namespaces_with_prefix(&layout.netns_prefix()).is_empty()
        || layout.cgroup_dir().exists()
        || layout.bpffs_dir().exists()
}

fn create_dir(path: &Path, what: &'static str) -> Result<(), TestbedError> {
    std::fs::create_dir_all(path).map_err(|source| TestbedError::Io {
        what,
        path: path.to_owned(),
        source,
    })
}

/// A credential for the identity service: 32 random bytes, hex, owner-only.
fn write_token(path: &Path) -> Result<(), TestbedError> {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(hex::encode(secret).as_bytes()))
        .map_err(|source| TestbedError::Io {
            what: "cannot write token",
            path: path.to_owned(),
            source,
        })
}

/// Removes everything of testbed `layout.id()` that exists: processes, namespaces,
/// cgroups, bpffs dir, state dir. Keeps going past failures and reports them all.
fn teardown(layout: &Layout) -> Result<(), TestbedError> {
    let mut problems = Vec::new();
    // Processes first, so nothing holds a namespace or cgroup.
    if let Err(e) = cgroup::kill_all(&layout.cgroup_dir()) {
        problems.push(e);
    }
    if let Err(e) = net::delete_namespaces(&net::namespaces_with_prefix(&layout.netns_prefix())) {
        problems.push(e);
    }
    if let Err(e) = cgroup::remove_tree(&layout.cgroup_dir()) {
        problems.push(e);
    }
    // Not mounted (no agent kept certificates) is fine.
    let _ = nix::mount::umount2(&layout.cert_cache_mount(), nix::mount::MntFlags::MNT_DETACH);
    for dir in [layout.bpffs_dir(), layout.state_dir()] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    if problems.is_empty() {
        tracing::info!(id = %layout.id(), "testbed down");
        Ok(())
    } else {
        Err(TestbedError::Teardown {
            id: layout.id().clone(),
            problems: problems.join("; "),
        })
    }
}

/// Ids of testbeds that have a state dir (running or crashed).
pub fn list() -> Vec<TestbedId> {
    let mut ids: Vec<TestbedId> = std::fs::read_dir(STATE_ROOT)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    ids.sort();
    ids
}

/// Tears down testbed `id`, whether or not its cluster file survived.
pub fn down_by_id(id: &TestbedId) -> Result<(), TestbedError> {
    teardown(&Layout::new(id.clone(), HostPaths::detect()?))
}

/// Removes every testbed's leftovers (all `sm-*` namespaces, the `sealmesh-testbed`
/// cgroups and bpffs dirs, `/run/sealmesh/tb-*`); returns the ids it found.
/// This also destroys testbeds that are in use: it is for cleaning up after crashes.
pub fn down_all() -> Result<Vec<TestbedId>, TestbedError> {
    require_root()?;
    let host = HostPaths::detect()?;
    let id_of_netns = |name: &str| name.strip_prefix(NETNS_PREFIX)?.get(..9)?.parse().ok();
    let children = |dir: PathBuf| -> Vec<TestbedId> {
        std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    };
    let mut ids: Vec<TestbedId> = list();
    ids.extend(
        net::namespaces_with_prefix(NETNS_PREFIX)
            .iter()
            .filter_map(|n| id_of_netns(n)),
    );
    ids.extend(children(host.cgroup_root()));
    ids.extend(children(host.bpffs_root()));
    ids.sort();
    ids.dedup();

    let mut problems = Vec::new();
    for id in &ids {
        if let Err(e) = teardown(&Layout::new(id.clone(), host.clone())) {
            problems.push(e.to_string());
        }
    }
    // Namespaces named like ours but without a parsable id.
    if let Err(e) = net::delete_namespaces(&net::namespaces_with_prefix(NETNS_PREFIX)) {
        problems.push(e);
    }
    for dir in [host.cgroup_root(), host.bpffs_root()] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("cannot remove {}: {e}", dir.display())),
        }
    }
    if problems.is_empty() {
        Ok(ids)
    } else {
        Err(TestbedError::SweepIncomplete(problems.join("; ")))
    }
}
