//! The agent's configuration: parsed from the command line (and environment)
//! in one place, with every default filled (from the cluster file in local
//! mode, from Kubernetes conventions in kubernetes mode), then validated
//! before anything starts.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{Parser, ValueEnum};
use ipnet::Ipv4Net;
use sealmesh_common::{
    cluster::{ClusterError, ClusterFile},
    consts::{
        AGENT_ADMIN_PORT, AGENT_HANDOVER_SOCKET, AGENT_METRICS_PORT, DEFAULT_CONTROL_NAMESPACE,
        DEFAULT_PLAINTEXT_ALLOWED_PORTS, DEFAULT_PLAINTEXT_ALLOWED_SERVICES, DEFAULT_TRUST_DOMAIN,
        IDENTITY_GRPC_PORT,
        kube::{CERT_CACHE_DIR, DEFAULT_SERVICE_CIDR, IDENTITY_NAME, IDENTITY_TOKEN_PATH},
    },
    host,
    identity::{IdentityError, TrustDomain},
    logging::{LogArgs, LogFormat},
    policy::InboundPolicy,
};
use serde::Serialize;

use crate::{
    ebpf::acceleration::SockmapAcceleration,
    kube::trust_roots::trust_roots_origin,
    proxy::{DEFAULT_MAX_CONNECTIONS_PER_LISTENER, DEFAULT_POD_RESOLVE_TIMEOUT},
};

/// Directory under the bpffs mount that holds every sealmesh pin; below it,
/// one directory per cluster and node so several testbed nodes share a host.
const BPFFS_SUBDIR: &str = "sealmesh";
/// The "cluster" part of the pin directory in kubernetes mode (a node runs
/// one cluster).
const BPFFS_KUBERNETES_CLUSTER: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot use the cluster file: {0}")]
    Cluster(#[from] ClusterError),
    #[error(
        "node {node:?} is not in the cluster file {file} (nodes: {known}); pass --node with one of them"
    )]
    UnknownNode {
        node: String,
        file: PathBuf,
        known: String,
    },
    #[error(
        "no {what} configured: the cluster file {file} has no identity section; pass {flag} or deploy the identity service first"
    )]
    MissingIdentity {
        what: &'static str,
        flag: &'static str,
        file: PathBuf,
    },
    #[error(
        "no token file for node {node}: the cluster file has no nodes[].tokenFile for it; pass --token-file"
    )]
    MissingTokenFile { node: String },
    #[error("bpffs is not mounted; mount it (mount -t bpf bpf /sys/fs/bpf) or pass --bpffs-dir")]
    NoBpffs,
    #[error(
        "cgroup v2 is not mounted; mount it (mount -t cgroup2 none /sys/fs/cgroup) or pass --cgroup-root"
    )]
    NoCgroup2,
    #[error(
        "--mode local needs --cluster-file (SEALMESH_CLUSTER_FILE); to read the Kubernetes API instead, pass --mode kubernetes"
    )]
    MissingClusterFile,
    #[error("{flag} does not apply to --mode {mode}: {hint}")]
    NotForMode {
        flag: &'static str,
        mode: Mode,
        hint: &'static str,
    },
    #[error("invalid --trust-domain or --namespace: {0}")]
    TrustDomain(#[from] IdentityError),
}

/// Where the agent learns about nodes, pods, Services and trust anchors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// From the cluster file (the local testbed).
    Local,
    /// From the Kubernetes API (the agent DaemonSet).
    Kubernetes,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Local => "local",
            Self::Kubernetes => "kubernetes",
        })
    }
}

/// Where the agent finds the identity service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityLocation {
    /// `--identity-addr` or the cluster file's: an IP or DNS name and a port.
    Address(IdentityAddr),
    /// Kubernetes mode without `--identity-addr`: a ready endpoint of this
    /// Service, read from the API (the agent starts without cluster DNS) and
    /// followed as the endpoints change.
    Service { service: ServiceName, port: u16 },
}

impl fmt::Display for IdentityLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(addr) => addr.fmt(f),
            Self::Service { service, port } => write!(
                f,
                "Service {service} port {port} (its endpoints, from the Kubernetes API)"
            ),
        }
    }
}

impl Serialize for IdentityLocation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The identity service's address: an IP or a DNS name, and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityAddr {
    host: String,
    port: u16,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not <host>:<port> (an IP or DNS name, and a port)")]
pub struct IdentityAddrError(String);

impl FromStr for IdentityAddr {
    type Err = IdentityAddrError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(addr.into());
        }
        let bad = || IdentityAddrError(text.to_owned());
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !host_ok {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl From<SocketAddr> for IdentityAddr {
    fn from(addr: SocketAddr) -> Self {
        Self {
            host: addr.ip().to_string(),
            port: addr.port(),
        }
    }
}

impl fmt::Display for IdentityAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            _ => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

impl Serialize for IdentityAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl IdentityAddr {
    /// The address, resolving a DNS name (IPv4 preferred: the redirect
    /// programs exclude the identity service by its IPv4 address).
    pub async fn resolve(&self) -> io::Result<SocketAddr> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} resolves to no address", self.host),
                )
            })
    }
}

/// Command-line flags as typed; `AgentConfig::from_args` turns them into a
/// complete `AgentConfig`.
#[derive(Clone, Debug, Parser)]
#[command(name = "sealmesh-agent", version, about = "sealmesh node agent")]
pub struct Args {
    /// Where nodes, pods, Services and trust anchors come from: the cluster file, or the
    /// Kubernetes API (credentials from KUBECONFIG, else the pod's ServiceAccount).
    #[arg(long, value_enum, default_value_t = Mode::Local, env = "SEALMESH_MODE")]
    pub mode: Mode,
    /// Cluster description (written by the testbed) to read nodes, pods and Services from
    /// (local mode only; required there).
    #[arg(long, env = "SEALMESH_CLUSTER_FILE")]
    pub cluster_file: Option<PathBuf>,
    /// Name of the node this agent serves (a node of the cluster file, or the Kubernetes
    /// node name: the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "SEALMESH_NODE")]
    pub node: String,
    /// Kubernetes mode: the control namespace, holding the trust-roots ConfigMap; part of
    /// identity DNS names [default: sealmesh].
    #[arg(long, env = "SEALMESH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Kubernetes mode: the SPIFFE trust domain [default: cluster.local].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// Kubernetes mode: the cgroup v2 directory the kubelet's pod cgroups are under
    /// (kubepods.slice/... or kubepods/...); a hybrid host's cgroup root stands for its
    /// `unified` cgroup v2 part [default: the host's cgroup2 mount].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Kubernetes mode: the UID of the agent's own pod (the DaemonSet sets it from
    /// metadata.uid), whose cgroup below --cgroup-root marks the agent's connections as its own
    /// even where /proc/self/cgroup shows a cgroup namespace's view.
    #[arg(long, env = "SEALMESH_POD_UID")]
    pub agent_pod_uid: Option<String>,
    /// Directory to pin eBPF maps and links in [default: <bpffs>/sealmesh/<cluster>/<node>,
    /// <cluster> = "kubernetes" in kubernetes mode].
    #[arg(long)]
    pub bpffs_dir: Option<PathBuf>,
    /// cgroup v2 directory to attach the redirect programs to [default: the node's cgroup;
    /// in kubernetes mode the cgroup root].
    #[arg(long)]
    pub node_cgroup: Option<PathBuf>,
    /// Identity service gRPC address, <IP or DNS name>:<port> [default: from the cluster
    /// file; in kubernetes mode a ready endpoint of the Service sealmesh-identity in
    /// --namespace, read from the API (no cluster DNS) and followed as it changes].
    #[arg(long)]
    pub identity_addr: Option<IdentityAddr>,
    /// PEM bundle of trust anchors (local mode) [default: from the cluster file]. Kubernetes
    /// mode reads and watches the ConfigMap sealmesh-identity-trust-roots instead.
    #[arg(long)]
    pub trust_anchors: Option<PathBuf>,
    /// File holding this node's identity-service token, re-read on every request [default:
    /// the node's tokenFile; in kubernetes mode the projected ServiceAccount token
    /// /var/run/secrets/sealmesh.io/identity/token].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Directory (on a tmpfs) where certificates are kept so a restarted agent serves at once,
    /// even while the identity service is unreachable [default: in kubernetes mode
    /// /run/sealmesh/certs; in local mode none].
    #[arg(long)]
    pub cert_cache_dir: Option<PathBuf>,
    /// Unix socket through which this agent takes the listening sockets of the agent running
    /// on the node (a rolling update refuses no connection) and later hands them to its own
    /// successor; node-local, only the agent's user may open it.
    #[arg(long, default_value = AGENT_HANDOVER_SOCKET)]
    pub handover_socket: PathBuf,
    /// How long a starting agent waits for the certificates of its node's meshed
    /// ServiceAccounts before it listens (kept ones count at once).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub certificate_wait: Duration,
    /// Remove sealmesh from this node and exit: delete the eBPF pins under the pin directory
    /// (the programs detach once no agent holds them), the kept certificates and the hand-over
    /// socket. For nodes whose agent did not remove it when its DaemonSet was deleted.
    #[arg(long)]
    pub uninstall: bool,
    /// Carry same-node meshed connections over mTLS (HBONE to this node) instead of connecting directly.
    #[arg(long)]
    pub force_mtls_local: bool,
    /// Refuse connections to non-meshed destinations instead of passing them through in plaintext
    /// (except the --plaintext-allowed-* destinations).
    #[arg(long)]
    pub deny_plaintext: bool,
    /// A Service (namespace/name, repeatable) that --deny-plaintext still lets pods reach in
    /// plaintext by its ClusterIP (or its endpoints outside the cluster's networks), because
    /// in-cluster clients need it and it cannot be meshed
    /// [default: default/kubernetes (the API server) and kube-system/kube-dns (cluster DNS)].
    #[arg(long = "plaintext-allowed-service", value_name = "NAMESPACE/NAME")]
    pub plaintext_allowed_services: Vec<ServiceName>,
    /// A network (repeatable) --deny-plaintext still lets pods reach in plaintext, e.g. a
    /// node-local DNS cache or a database outside the cluster [default: none].
    #[arg(long = "plaintext-allowed-cidr", value_name = "CIDR")]
    pub plaintext_allowed_cidrs: Vec<Ipv4Net>,
    /// A destination port (repeatable) --deny-plaintext still lets through in plaintext
    /// anywhere [default: 53, DNS over TCP].
    #[arg(long = "plaintext-allowed-port", value_name = "PORT")]
    pub plaintext_allowed_ports: Vec<u16>,
    /// Inbound policy of meshed pods whose pod and namespace carry no sealmesh.io/inbound-policy
    /// annotation: `permissive` accepts plaintext from unmeshed pods, other nodes and hosts too;
    /// `strict` lets the kernel drop every connection that does not come through this node's
    /// agent, the node itself (kubelet probes) or the pod's own loopback. `strict` also closes
    /// the metrics port to all but the node and --metrics-allowed-cidrs.
    #[arg(long, default_value_t = InboundPolicy::Permissive, env = "SEALMESH_DEFAULT_INBOUND_POLICY")]
    pub default_inbound_policy: InboundPolicy,
    /// Networks besides the node itself that may read the metrics port (e.g. Prometheus' pod
    /// CIDR), comma-separated; everyone else is refused at accept, as the admin API listens on
    /// loopback only: both carry the node's traffic metadata.
    #[arg(long, value_delimiter = ',', env = "SEALMESH_METRICS_ALLOWED_CIDRS")]
    pub metrics_allowed_cidrs: Vec<Ipv4Net>,
    /// The Service ClusterIP range (repeatable). A connection to an address there that is no
    /// Service port or pod the agent knows is held like one to an unknown pod, then refused:
    /// never sent in plaintext [default: kube-apiserver's 10.96.0.0/12 in kubernetes mode;
    /// the cluster file's serviceCidr in local mode].
    #[arg(long = "service-cidr", value_name = "CIDR")]
    pub service_cidrs: Vec<Ipv4Net>,
    /// A pod network of the cluster besides the Nodes' spec.podCIDRs (repeatable), for CNIs
    /// that allocate pod IPs elsewhere; unknown addresses there are held, then refused, never
    /// sent in plaintext [local mode: the cluster file's node podCidrs are always included].
    #[arg(long = "cluster-pod-cidr", value_name = "CIDR")]
    pub cluster_pod_cidrs: Vec<Ipv4Net>,
    /// How long a redirected connection from a pod the agent does not know yet (just started,
    /// its cgroup or API object not seen yet), or to an address of the cluster's networks no
    /// pod or Service the agent knows has yet, is held before it is refused, e.g. 500ms
    /// [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub pod_resolve_timeout: Option<Duration>,
    /// Admin gRPC API address (status, connections, tap, certificates, config). It exposes
    /// traffic metadata: keep it on loopback unless the address is otherwise protected
    /// [default: 127.0.0.1:15000].
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// Prometheus metrics and /healthz/live, /healthz/ready [default: 0.0.0.0:15020].
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub log: LogArgs,
    /// Move payload between pods and this agent with sk_msg/sockhash instead of through the
    /// TCP/IP stack (same-host pod <-> agent hop only). `auto` probes the kernel at start and
    /// turns it on only if pod sockets in a sockhash behave like TCP sockets there (logged
    /// once); on Linux 6.18 they do not (a blocking read woken without data fails with EAGAIN,
    /// and redirected bytes get no back-pressure). `on` skips the probe.
    #[arg(long, value_enum, default_value_t = SockmapAcceleration::Auto, env = "SEALMESH_SOCKMAP_ACCELERATION")]
    pub sockmap_acceleration: SockmapAcceleration,
    /// Threads of the TLS engine. The agent's work is socket hand-offs: where it shares one or
    /// two cores with its pods, 1 saves cross-thread wake-ups (docs/PERFORMANCE.md); raise it
    /// on nodes whose agent must carry more than one core's worth of traffic.
    #[arg(long, default_value_t = DEFAULT_WORKER_THREADS, value_parser = clap::value_parser!(u16).range(1..), env = "SEALMESH_WORKER_THREADS")]
    pub worker_threads: u16,
    /// Open connections each listener (pods' redirected connections; peers' HBONE connections)
    /// may hold; beyond it the agent stops accepting, logs it once, and new connections wait in
    /// the kernel's backlog until one closes.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_LISTENER, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections_per_listener: usize,
}

/// Engine threads unless `--worker-threads` says otherwise (ztunnel's default too).
const DEFAULT_WORKER_THREADS: u16 = 2;

/// A Service by namespace and name, as `--plaintext-allowed-service` takes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not <namespace>/<name> of a Service")]
pub struct ServiceNameError(String);

impl FromStr for ServiceName {
    type Err = ServiceNameError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let valid = |part: &str| sealmesh_common::identity::check_name(part).is_ok();
        match text.split_once('/') {
            Some((namespace, name)) if valid(namespace) && valid(name) => Ok(Self {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(ServiceNameError(text.to_owned())),
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl From<ServiceName> for String {
    fn from(service: ServiceName) -> Self {
        service.to_string()
    }
}

/// Destinations `--deny-plaintext` still lets through in plaintext: what
/// every in-cluster client needs and no mesh can secure (the API server,
/// cluster DNS). Without them a strict cluster breaks its own controllers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlaintextExemptions {
    /// Reached by their ClusterIP, or their endpoints outside the cluster's
    /// networks (the API server's addresses).
    pub services: Vec<ServiceName>,
    pub cidrs: Vec<Ipv4Net>,
    pub ports: Vec<u16>,
}

impl Default for PlaintextExemptions {
    fn default() -> Self {
        Self {
            services: DEFAULT_PLAINTEXT_ALLOWED_SERVICES
                .iter()
                .map(|text| text.parse().expect("the default Service names are valid"))
                .collect(),
            cidrs: Vec::new(),
            ports: DEFAULT_PLAINTEXT_ALLOWED_PORTS.to_vec(),
        }
    }
}

impl PlaintextExemptions {
    /// Why a plaintext connection to `dst` (its ClusterIP belonging to
    /// `service`, if it is one) is allowed despite `--deny-plaintext`; None:
    /// it is refused.
    pub fn exemption(&self, dst: SocketAddrV4, service: Option<&ServiceName>) -> Option<String> {
        if let Some(service) = service.filter(|s| self.services.contains(s)) {
            return Some(format!("--plaintext-allowed-service {service}"));
        }
        if let Some(cidr) = self.cidrs.iter().find(|cidr| cidr.contains(dst.ip())) {
            return Some(format!("--plaintext-allowed-cidr {cidr}"));
        }
        self.ports
            .contains(&dst.port())
            .then(|| format!("--plaintext-allowed-port {}", dst.port()))
    }
}

/// A repeatable flag's values, or its defaults when none were given.
fn or_default<T>(given: Vec<T>, default: Vec<T>) -> Vec<T> {
    if given.is_empty() { default } else { given }
}

/// What the proxy and the kernel enforce beyond the defaults; copied into the TLS engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub force_mtls_local: bool,
    pub deny_plaintext: bool,
    /// Inbound policy of meshed pods no annotation sets.
    pub default_inbound_policy: InboundPolicy,
}

/// Who may read the metrics port (`--metrics-listen`): the node itself and
/// `allowed_cidrs`; the rest is refused at accept.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MetricsAccess {
    pub allowed_cidrs: Vec<Ipv4Net>,
}

/// Local mode: everything comes from the cluster file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSettings {
    pub cluster_file: PathBuf,
    pub cluster_name: String,
    pub node_ip: Ipv4Addr,
    pub trust_anchors: PathBuf,
}

/// Kubernetes mode: everything comes from the API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KubeSettings {
    /// The control namespace (trust-roots ConfigMap).
    pub namespace: String,
    /// Where the kubelet's pod cgroups are found.
    pub cgroup_root: PathBuf,
    /// The agent's own pod, when the downward API names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_pod_uid: Option<String>,
}

/// The cluster's pod and Service networks: a destination there is a pod or a
/// Service of the cluster, so one the registry cannot resolve is held until
/// it can (or refused), never sent in plaintext. In kubernetes mode the
/// registry adds every Node's spec.podCIDRs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClusterNetworks {
    pub service_cidrs: Vec<Ipv4Net>,
    pub pod_cidrs: Vec<Ipv4Net>,
}

impl ClusterNetworks {
    /// Every network, pods' then Services'.
    pub fn all(&self) -> Vec<Ipv4Net> {
        self.pod_cidrs
            .iter()
            .chain(&self.service_cidrs)
            .copied()
            .collect()
    }
}

/// The mode and what only that mode needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Local(LocalSettings),
    Kubernetes(KubeSettings),
}

/// The agent's complete, validated configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub source: Source,
    pub node: String,
    pub trust_domain: TrustDomain,
    pub bpffs_dir: PathBuf,
    pub node_cgroup: PathBuf,
    pub identity_addr: IdentityLocation,
    /// Path only; the token itself is read by the cert store and never logged.
    pub token_file: PathBuf,
    /// Where certificates are kept across restarts (a tmpfs), if anywhere.
    pub cert_cache_dir: Option<PathBuf>,
    /// Where listening sockets pass from this agent to the next.
    pub handover_socket: PathBuf,
    /// How long the start waits for the node's certificates before listening.
    pub certificate_wait: Duration,
    /// Remove sealmesh from the node instead of running.
    pub uninstall: bool,
    pub policy: Policy,
    pub plaintext_exemptions: PlaintextExemptions,
    /// How long connections of (and to) pods the registry does not know yet are held.
    pub pod_resolve_timeout: Duration,
    pub cluster_networks: ClusterNetworks,
    pub sockmap_acceleration: SockmapAcceleration,
    pub worker_threads: u16,
    pub max_connections_per_listener: usize,
    pub admin_listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub metrics_access: MetricsAccess,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// The configuration as the admin API dumps it. Holds no secret: the token
/// is only named by its file, never read here.
#[derive(Serialize)]
struct ConfigView<'a> {
    mode: Mode,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_file: Option<&'a Path>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cluster_name: Option<&'a str>,
    node: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_ip: Option<Ipv4Addr>,
    trust_domain: &'a str,
    bpffs_dir: &'a Path,
    node_cgroup: &'a Path,
    identity_addr: &'a IdentityLocation,
    /// A file in local mode, the ConfigMap in kubernetes mode.
    trust_anchors: String,
    token_file: &'a Path,
    token: &'static str,
    cert_cache_dir: Option<&'a Path>,
    handover_socket: &'a Path,
    #[serde(with = "humantime_serde_text")]
    certificate_wait: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubeView<'a>>,
    policy: Policy,
    plaintext_exemptions: &'a PlaintextExemptions,
    #[serde(with = "humantime_serde_text")]
    pod_resolve_timeout: Duration,
    cluster_networks: ClusterNetworksView<'a>,
    sockmap_acceleration: SockmapAcceleration,
    worker_threads: u16,
    max_connections_per_listener: usize,
    admin_listen: SocketAddr,
    metrics_listen: SocketAddr,
    metrics_access: &'a MetricsAccess,
    log_level: &'a str,
    log_format: LogFormat,
}

#[derive(Serialize)]
struct ClusterNetworksView<'a> {
    #[serde(flatten)]
    configured: &'a ClusterNetworks,
    /// Kubernetes mode: where else pod networks come from.
    #[serde(skip_serializing_if = "Option::is_none")]
    also: Option<&'static str>,
}

#[derive(Serialize)]
struct KubeView<'a> {
    #[serde(flatten)]
    settings: &'a KubeSettings,
    /// Where API credentials come from (a path or "in-cluster"; never the credentials).
    api_credentials: String,
}

/// Durations in the YAML dump as people write them (`5s`, `500ms`).
mod humantime_serde_text {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }
}

/// Where Kubernetes mode takes pod networks from besides the configured ones.
const NODE_POD_CIDRS: &str = "every Node's spec.podCIDRs";

/// What the YAML dump shows instead of the token.
const TOKEN_REDACTED: &str = "<redacted: read from token_file on each request>";

impl AgentConfig {
    pub fn mode(&self) -> Mode {
        match self.source {
            Source::Local(_) => Mode::Local,
            Source::Kubernetes(_) => Mode::Kubernetes,
        }
    }

    /// Where the trust anchors come from, as operators should read it.
    pub fn trust_anchors_origin(&self) -> String {
        match &self.source {
            Source::Local(local) => local.trust_anchors.display().to_string(),
            Source::Kubernetes(kube) => trust_roots_origin(&kube.namespace),
        }
    }

    /// The effective configuration as YAML, secrets redacted (for the admin API).
    pub fn to_redacted_yaml(&self) -> String {
        let local = match &self.source {
            Source::Local(local) => Some(local),
            Source::Kubernetes(_) => None,
        };
        let view = ConfigView {
            mode: self.mode(),
            cluster_file: local.map(|l| l.cluster_file.as_path()),
            cluster_name: local.map(|l| l.cluster_name.as_str()),
            node: &self.node,
            node_ip: local.map(|l| l.node_ip),
            trust_domain: self.trust_domain.domain(),
            bpffs_dir: &self.bpffs_dir,
            node_cgroup: &self.node_cgroup,
            identity_addr: &self.identity_addr,
            trust_anchors: self.trust_anchors_origin(),
            token_file: &self.token_file,
            token: TOKEN_REDACTED,
            cert_cache_dir: self.cert_cache_dir.as_deref(),
            handover_socket: &self.handover_socket,
            certificate_wait: self.certificate_wait,
            kubernetes: match &self.source {
                Source::Kubernetes(settings) => Some(KubeView {
                    settings,
                    api_credentials: api_credentials_origin(),
                }),
                Source::Local(_) => None,
            },
            policy: self.policy,
            plaintext_exemptions: &self.plaintext_exemptions,
            pod_resolve_timeout: self.pod_resolve_timeout,
            cluster_networks: ClusterNetworksView {
                configured: &self.cluster_networks,
                also: match self.source {
                    Source::Kubernetes(_) => Some(NODE_POD_CIDRS),
                    Source::Local(_) => None,
                },
            },
            sockmap_acceleration: self.sockmap_acceleration,
            worker_threads: self.worker_threads,
            max_connections_per_listener: self.max_connections_per_listener,
            admin_listen: self.admin_listen,
            metrics_listen: self.metrics_listen,
            metrics_access: &self.metrics_access,
            log_level: &self.log_level,
            log_format: self.log_format,
        };
        // Paths, addresses and strings only: serialising cannot fail.
        serde_yaml_ng::to_string(&view).expect("the config view serialises to YAML")
    }

    /// Parses the process's arguments and fills the defaults.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_args(Args::parse())
    }

    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        let bpffs_mount = match &args.bpffs_dir {
            Some(_) => None,
            None => Some(host::bpffs_mount().ok_or(ConfigError::NoBpffs)?),
        };
        match args.mode {
            Mode::Local => {
                let path = args
                    .cluster_file
                    .as_deref()
                    .ok_or(ConfigError::MissingClusterFile)?;
                let cluster = ClusterFile::load(path)?;
                Self::resolve(args, &cluster, bpffs_mount.as_deref())
            }
            Mode::Kubernetes => {
                let cgroup2 = match &args.cgroup_root {
                    Some(_) => None,
                    None => Some(host::cgroup2_mount().ok_or(ConfigError::NoCgroup2)?),
                };
                Self::resolve_kubernetes(args, bpffs_mount.as_deref(), cgroup2.as_deref())
            }
        }
    }

    /// Fills defaults from an already-loaded cluster description; separate
    /// from `from_args` so the rules are testable without a host.
    fn resolve(
        args: Args,
        cluster: &ClusterFile,
        bpffs_mount: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let not_local = |flag, hint| ConfigError::NotForMode {
            flag,
            mode: Mode::Local,
            hint,
        };
        const FROM_FILE: &str = "local mode reads it from the cluster file; remove the flag";
        if args.namespace.is_some() {
            return Err(not_local("--namespace (SEALMESH_NAMESPACE)", FROM_FILE));
        }
        if args.trust_domain.is_some() {
            return Err(not_local("--trust-domain", FROM_FILE));
        }
        if args.cgroup_root.is_some() {
            return Err(not_local(
                "--cgroup-root",
                "the cluster file names each pod's cgroup; remove the flag",
            ));
        }
        if args.agent_pod_uid.is_some() {
            return Err(not_local(
                "--agent-pod-uid (SEALMESH_POD_UID)",
                "a local-mode agent runs in its node's cgroup, not in a pod; remove it",
            ));
        }
        let cluster_file = args
            .cluster_file
            .clone()
            .ok_or(ConfigError::MissingClusterFile)?;
        let node = cluster
            .node(&args.node)
            .ok_or_else(|| ConfigError::UnknownNode {
                node: args.node.clone(),
                file: cluster_file.clone(),
                known: cluster.node_names(),
            })?;
        let missing_identity = |what, flag| ConfigError::MissingIdentity {
            what,
            flag,
            file: cluster_file.clone(),
        };
        let identity_addr = match (&args.identity_addr, &cluster.identity) {
            (Some(addr), _) => IdentityLocation::Address(addr.clone()),
            (None, Some(id)) => IdentityLocation::Address(id.address.into()),
            (None, None) => {
                return Err(missing_identity(
                    "identity service address",
                    "--identity-addr",
                ));
            }
        };
        let trust_anchors = match (&args.trust_anchors, &cluster.identity) {
            (Some(path), _) => path.clone(),
            (None, Some(id)) => id.trust_anchors_file.clone(),
            (None, None) => return Err(missing_identity("trust anchors", "--trust-anchors")),
        };
        let token_file = args
            .token_file
            .clone()
            .or_else(|| node.token_file.clone())
            .ok_or_else(|| ConfigError::MissingTokenFile {
                node: node.name.clone(),
            })?;
        let bpffs_dir = bpffs_dir(&args, bpffs_mount, &cluster.name)?;
        let node_cgroup = args
            .node_cgroup
            .clone()
            .unwrap_or_else(|| node.cgroup.clone());
        let mut pod_cidrs: Vec<Ipv4Net> = cluster.nodes.iter().map(|n| n.pod_cidr).collect();
        pod_cidrs.extend(&args.cluster_pod_cidrs);
        let cluster_networks = ClusterNetworks {
            service_cidrs: if args.service_cidrs.is_empty() {
                cluster.service_cidr.into_iter().collect()
            } else {
                args.service_cidrs.clone()
            },
            pod_cidrs,
        };
        let source = Source::Local(LocalSettings {
            cluster_file,
            cluster_name: cluster.name.clone(),
            node_ip: node.ip,
            trust_anchors,
        });
        Self::finish(
            args,
            source,
            cluster.trust_domain()?,
            cluster_networks,
            bpffs_dir,
            node_cgroup,
            identity_addr,
            token_file,
        )
    }

    /// Fills the kubernetes-mode defaults; separate from `from_args` so the
    /// rules are testable without a host.
    fn resolve_kubernetes(
        args: Args,
        bpffs_mount: Option<&Path>,
        cgroup2_mount: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let not_kubernetes = |flag, hint| ConfigError::NotForMode {
            flag,
            mode: Mode::Kubernetes,
            hint,
        };
        if args.cluster_file.is_some() {
            return Err(not_kubernetes(
                "--cluster-file (SEALMESH_CLUSTER_FILE)",
                "kubernetes mode reads nodes, pods and Services from the Kubernetes API; remove it",
            ));
        }
        if args.trust_anchors.is_some() {
            return Err(not_kubernetes(
                "--trust-anchors",
                "kubernetes mode reads and watches the trust-roots ConfigMap of --namespace; remove it",
            ));
        }
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_CONTROL_NAMESPACE.to_owned());
        let trust_domain = TrustDomain::new(
            args.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN),
            &namespace,
        )?;
        let cgroup_root = match (&args.cgroup_root, cgroup2_mount) {
            // The host's /sys/fs/cgroup as the DaemonSet mounts it: on a
            // hybrid host its cgroup v2 part is `unified` below it.
            (Some(dir), _) => host::cgroup2_dir(dir).unwrap_or_else(|| dir.clone()),
            (None, Some(mount)) => mount.to_owned(),
            (None, None) => return Err(ConfigError::NoCgroup2),
        };
        let identity_addr = match args.identity_addr.clone() {
            Some(addr) => IdentityLocation::Address(addr),
            None => IdentityLocation::Service {
                service: ServiceName {
                    namespace: namespace.clone(),
                    name: IDENTITY_NAME.to_owned(),
                },
                port: IDENTITY_GRPC_PORT,
            },
        };
        let token_file = args
            .token_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(IDENTITY_TOKEN_PATH));
        let bpffs_dir = bpffs_dir(&args, bpffs_mount, BPFFS_KUBERNETES_CLUSTER)?;
        let node_cgroup = args
            .node_cgroup
            .clone()
            .unwrap_or_else(|| cgroup_root.clone());
        let source = Source::Kubernetes(KubeSettings {
            namespace,
            cgroup_root,
            agent_pod_uid: args.agent_pod_uid.clone(),
        });
        let cluster_networks = ClusterNetworks {
            service_cidrs: if args.service_cidrs.is_empty() {
                vec![DEFAULT_SERVICE_CIDR]
            } else {
                args.service_cidrs.clone()
            },
            pod_cidrs: args.cluster_pod_cidrs.clone(),
        };
        Self::finish(
            args,
            source,
            trust_domain,
            cluster_networks,
            bpffs_dir,
            node_cgroup,
            identity_addr,
            token_file,
        )
    }

    /// The settings both modes share.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        args: Args,
        source: Source,
        trust_domain: TrustDomain,
        cluster_networks: ClusterNetworks,
        bpffs_dir: PathBuf,
        node_cgroup: PathBuf,
        identity_addr: IdentityLocation,
        token_file: PathBuf,
    ) -> Result<Self, ConfigError> {
        let cert_cache_dir = args.cert_cache_dir.or_else(|| match source {
            Source::Kubernetes(_) => Some(PathBuf::from(CERT_CACHE_DIR)),
            Source::Local(_) => None,
        });
        Ok(Self {
            source,
            node: args.node,
            trust_domain,
            bpffs_dir,
            node_cgroup,
            identity_addr,
            token_file,
            cert_cache_dir,
            handover_socket: args.handover_socket,
            certificate_wait: args.certificate_wait,
            uninstall: args.uninstall,
            policy: Policy {
                force_mtls_local: args.force_mtls_local,
                deny_plaintext: args.deny_plaintext,
                default_inbound_policy: args.default_inbound_policy,
            },
            plaintext_exemptions: {
                let defaults = PlaintextExemptions::default();
                PlaintextExemptions {
                    services: or_default(args.plaintext_allowed_services, defaults.services),
                    cidrs: args.plaintext_allowed_cidrs,
                    ports: or_default(args.plaintext_allowed_ports, defaults.ports),
                }
            },
            metrics_access: MetricsAccess {
                allowed_cidrs: args.metrics_allowed_cidrs,
            },
            pod_resolve_timeout: args
                .pod_resolve_timeout
                .unwrap_or(DEFAULT_POD_RESOLVE_TIMEOUT),
            cluster_networks,
            sockmap_acceleration: args.sockmap_acceleration,
            worker_threads: args.worker_threads,
            max_connections_per_listener: args.max_connections_per_listener,
            admin_listen: args
                .admin_listen
                .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_ADMIN_PORT))),
            metrics_listen: args.metrics_listen.unwrap_or(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                AGENT_METRICS_PORT,
            ))),
            log_level: args.log.log_level,
            log_format: args.log.log_format,
        })
    }
}

/// `--bpffs-dir`, or `<bpffs>/sealmesh/<cluster>/<node>`.
fn bpffs_dir(
    args: &Args,
    bpffs_mount: Option<&Path>,
    cluster: &str,
) -> Result<PathBuf, ConfigError> {
    match (&args.bpffs_dir, bpffs_mount) {
        (Some(dir), _) => Ok(dir.clone()),
        (None, Some(mount)) => Ok(mount.join(BPFFS_SUBDIR).join(cluster).join(&args.node)),
        (None, None) => Err(ConfigError::NoBpffs),
    }
}

/// Where `kube::Client::try_default` takes credentials from: the KUBECONFIG
/// path(s), else the in-cluster ServiceAccount. Names only, never content.
fn api_credentials_origin() -> String {
    match std::env::var_os("KUBECONFIG") {
        Some(path) if !path.is_empty() => format!("kubeconfig {}", path.to_string_lossy()),
        _ => "kubeconfig ~/.kube/config if present, else the in-cluster ServiceAccount".to_owned(),
    }
}

/// `a,b` for the one-line dump (`none` when empty).
fn cidr_list(cidrs: &[Ipv4Net]) -> String {
    if cidrs.is_empty() {
        return "none".to_owned();
    }
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One-line dump for the start-up log. It holds no secrets (the token file's
/// path, never its content) so nothing needs masking beyond that.
impl fmt::Display for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mode={} ", self.mode())?;
        match &self.source {
            Source::Local(local) => write!(
                f,
                "cluster_file={} cluster={} node={} node_ip={} ",
                local.cluster_file.display(),
                local.cluster_name,
                self.node,
                local.node_ip,
            )?,
            Source::Kubernetes(kube) => write!(
                f,
                "node={} namespace={} cgroup_root={} api_credentials=({}) ",
                self.node,
                kube.namespace,
                kube.cgroup_root.display(),
                api_credentials_origin(),
            )?,
        }
        write!(
            f,
            "trust_domain={} bpffs_dir={} node_cgroup={} identity_addr={} trust_anchors=({}) \
             token_file={} (content not shown) cert_cache_dir={} handover_socket={} force_mtls_local={} deny_plaintext={} \
             default_inbound_policy={} pod_resolve_timeout={} service_cidrs={} pod_cidrs={}{} \
             admin_listen={} metrics_listen={} metrics_allowed_cidrs={:?} \
             log_level={} log_format={:?}",
            self.trust_domain.domain(),
            self.bpffs_dir.display(),
            self.node_cgroup.display(),
            self.identity_addr,
            self.trust_anchors_origin(),
            self.token_file.display(),
            self.cert_cache_dir
                .as_deref()
                .map_or_else(|| "none".to_owned(), |dir| dir.display().to_string()),
            self.handover_socket.display(),
            self.policy.force_mtls_local,
            self.policy.deny_plaintext,
            self.policy.default_inbound_policy,
            humantime::format_duration(self.pod_resolve_timeout),
            cidr_list(&self.cluster_networks.service_cidrs),
            cidr_list(&self.cluster_networks.pod_cidrs),
            match self.source {
                Source::Kubernetes(_) => format!(" (and {NODE_POD_CIDRS})"),
                Source::Local(_) => String::new(),
            },
            self.admin_listen,
            self.metrics_listen,
            self.metrics_access.allowed_cidrs,
            self.log_level,
            self.log_format,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = r#"
apiVersion: sealmesh.io/v1alpha1
kind: Cluster
name: tb-cfg
identity: { address: "172.18.0.1:8080", trustAnchorsFile: /run/sealmesh/tb-cfg/ca-bundle.crt }
nodes:
  - { name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/sealmesh/tb-cfg/node-0, tokenFile: /run/sealmesh/tb-cfg/node-0.token }
  - { name: node-1, ip: 172.18.0.3, podCidr: 10.244.1.0/24, cgroup: /sys/fs/cgroup/sealmesh/tb-cfg/node-1 }
"#;

    fn args_for(node: &str, extra: &[&str]) -> Args {
        let mut argv = vec![
            "sealmesh-agent",
            "--cluster-file",
            "/etc/cluster.yaml",
            "--node",
            node,
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn args(extra: &[&str]) -> Args {
        args_for("node-0", extra)
    }

    fn resolve(extra: &[&str]) -> Result<AgentConfig, ConfigError> {
        let cluster = ClusterFile::from_yaml(CLUSTER).unwrap();
        AgentConfig::resolve(args(extra), &cluster, Some(Path::new("/sys/fs/bpf")))
    }

    #[test]
    fn fills_defaults_from_the_cluster_file() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.mode(), Mode::Local);
        assert_eq!(
            c.source,
            Source::Local(LocalSettings {
                cluster_file: "/etc/cluster.yaml".into(),
                cluster_name: "tb-cfg".into(),
                node_ip: Ipv4Addr::new(172, 18, 0, 2),
                trust_anchors: "/run/sealmesh/tb-cfg/ca-bundle.crt".into(),
            })
        );
        assert_eq!(
            c.identity_addr,
            IdentityLocation::Address("172.18.0.1:8080".parse().unwrap())
        );
        assert_eq!(c.token_file, Path::new("/run/sealmesh/tb-cfg/node-0.token"));
        assert_eq!(
            c.node_cgroup,
            Path::new("/sys/fs/cgroup/sealmesh/tb-cfg/node-0")
        );
        assert_eq!(c.bpffs_dir, Path::new("/sys/fs/bpf/sealmesh/tb-cfg/node-0"));
        assert_eq!(c.policy, Policy::default());
        assert_eq!(c.pod_resolve_timeout, Duration::from_secs(5));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.trust_domain, TrustDomain::default());
        assert_eq!(c.admin_listen, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(c.metrics_listen, "0.0.0.0:15020".parse().unwrap());
    }

    #[test]
    fn local_mode_takes_the_service_range_from_the_cluster_file() {
        let cluster =
            ClusterFile::from_yaml(&format!("{CLUSTER}serviceCidr: 10.96.0.0/16\n")).unwrap();
        let c = AgentConfig::resolve(args(&[]), &cluster, Some(Path::new("/sys/fs/bpf"))).unwrap();
        assert_eq!(
            c.cluster_networks.service_cidrs,
            ["10.96.0.0/16".parse::<Ipv4Net>().unwrap()]
        );
        let shown = c.to_string();
        assert!(
            shown.contains(" service_cidrs=10.96.0.0/16 pod_cidrs=10.244.0.0/24,10.244.1.0/24 "),
            "{shown}"
        );
    }

    #[test]
    fn flags_override_the_cluster_file() {
        let c = resolve(&[
            "--identity-addr",
            "127.0.0.1:9000",
            "--trust-anchors",
            "/a.pem",
            "--token-file",
            "/t",
            "--node-cgroup",
            "/sys/fs/cgroup/x",
            "--bpffs-dir",
            "/sys/fs/bpf/x",
            "--force-mtls-local",
            "--deny-plaintext",
            "--log-format",
            "json",
            "--log-level",
            "sealmesh_agent=debug",
            "--admin-listen",
            "172.18.0.2:16000",
            "--metrics-listen",
            "127.0.0.1:16020",
            "--pod-resolve-timeout",
            "750ms",
            "--service-cidr",
            "10.97.0.0/16",
            "--cluster-pod-cidr",
            "100.64.0.0/10",
        ])
        .unwrap();
        assert_eq!(
            c.cluster_networks,
            ClusterNetworks {
                service_cidrs: vec!["10.97.0.0/16".parse().unwrap()],
                pod_cidrs: vec![
                    "10.244.0.0/24".parse().unwrap(),
                    "10.244.1.0/24".parse().unwrap(),
                    "100.64.0.0/10".parse().unwrap()
                ],
            },
            "the file's node podCidrs stay"
        );
        assert_eq!(c.pod_resolve_timeout, Duration::from_millis(750));
        assert_eq!(c.admin_listen, "172.18.0.2:16000".parse().unwrap());
        assert_eq!(c.metrics_listen, "127.0.0.1:16020".parse().unwrap());
        assert_eq!(
            c.identity_addr,
            IdentityLocation::Address("127.0.0.1:9000".parse().unwrap())
        );
        assert_eq!(c.trust_anchors_origin(), "/a.pem");
        assert_eq!(c.token_file, Path::new("/t"));
        assert_eq!(c.node_cgroup, Path::new("/sys/fs/cgroup/x"));
        assert_eq!(c.bpffs_dir, Path::new("/sys/fs/bpf/x"));
        assert_eq!(
            c.policy,
            Policy {
                force_mtls_local: true,
                deny_plaintext: true,
                default_inbound_policy: InboundPolicy::Permissive,
            }
        );
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.log_level, "sealmesh_agent=debug");
    }

    #[test]
    fn explains_what_is_missing() {
        let cluster = ClusterFile::from_yaml(CLUSTER).unwrap();
        let err = AgentConfig::resolve(
            args_for("node-9", &[]),
            &cluster,
            Some(Path::new("/sys/fs/bpf")),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "node \"node-9\" is not in the cluster file /etc/cluster.yaml (nodes: node-0, node-1); pass --node with one of them"
        );

        let err = AgentConfig::resolve(
            args_for("node-1", &[]),
            &cluster,
            Some(Path::new("/sys/fs/bpf")),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no token file for node node-1: the cluster file has no nodes[].tokenFile for it; pass --token-file"
        );

        let mut no_identity = cluster.clone();
        no_identity.identity = None;
        let err = AgentConfig::resolve(args(&[]), &no_identity, Some(Path::new("/sys/fs/bpf")))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("no identity service address configured"),
            "{err}"
        );

        let err = AgentConfig::resolve(args(&[]), &cluster, None).unwrap_err();
        assert!(matches!(err, ConfigError::NoBpffs), "{err}");

        let err = Args::try_parse_from([
            "sealmesh-agent",
            "--node",
            "n1",
            "--log-level",
            "sealmesh_agent=loud",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("invalid log level"), "{err}");
    }

    #[test]
    fn plaintext_exemptions_default_to_the_api_server_and_dns_and_given_ones_replace_them() {
        let defaults = resolve(&["--deny-plaintext"]).unwrap();
        let exemptions = &defaults.plaintext_exemptions;
        let api: ServiceName = "default/kubernetes".parse().unwrap();
        let database: ServiceName = "shop/database".parse().unwrap();
        let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);
        assert_eq!(
            exemptions.exemption(vip, Some(&api)).as_deref(),
            Some("--plaintext-allowed-service default/kubernetes")
        );
        assert_eq!(exemptions.exemption(vip, Some(&database)), None);
        assert_eq!(exemptions.exemption(vip, None), None);
        assert_eq!(
            exemptions
                .exemption(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 53), None)
                .as_deref(),
            Some("--plaintext-allowed-port 53")
        );
        let dumped: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&defaults.to_redacted_yaml()).unwrap();
        assert_eq!(
            dumped["plaintext_exemptions"]["services"],
            serde_yaml_ng::to_value(["default/kubernetes", "kube-system/kube-dns"]).unwrap()
        );

        let given = resolve(&[
            "--plaintext-allowed-service",
            "shop/database",
            "--plaintext-allowed-cidr",
            "169.254.20.10/32",
        ])
        .unwrap();
        let exemptions = &given.plaintext_exemptions;
        assert_eq!(exemptions.services, std::slice::from_ref(&database));
        assert_eq!(
            exemptions.exemption(vip, Some(&api)),
            None,
            "given ones replace the defaults"
        );
        assert_eq!(
            exemptions.exemption(vip, Some(&database)).as_deref(),
            Some("--plaintext-allowed-service shop/database")
        );
        assert_eq!(
            exemptions
                .exemption(
                    SocketAddrV4::new(Ipv4Addr::new(169, 254, 20, 10), 8053),
                    None
                )
                .as_deref(),
            Some("--plaintext-allowed-cidr 169.254.20.10/32")
        );
        assert_eq!(exemptions.ports, [53], "ports keep their default");

        let bad = Args::try_parse_from([
            "sealmesh-agent",
            "--plaintext-allowed-service",
            "kubernetes",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            bad.contains("\"kubernetes\" is not <namespace>/<name> of a Service"),
            "{bad}"
        );
    }

    #[test]
    fn yaml_dump_names_the_token_file_and_redacts_the_token() {
        let yaml = resolve(&["--deny-plaintext"]).unwrap().to_redacted_yaml();
        let dumped: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(dumped["mode"], "local");
        assert_eq!(dumped["cluster_file"], "/etc/cluster.yaml");
        assert_eq!(
            dumped["trust_anchors"],
            "/run/sealmesh/tb-cfg/ca-bundle.crt"
        );
        assert_eq!(dumped.get("kubernetes"), None);
        assert_eq!(dumped["node"], "node-0");
        assert_eq!(dumped["node_ip"], "172.18.0.2");
        assert_eq!(dumped["token_file"], "/run/sealmesh/tb-cfg/node-0.token");
        assert_eq!(dumped["token"], TOKEN_REDACTED);
        assert_eq!(dumped["policy"]["deny_plaintext"], true);
        assert_eq!(dumped["policy"]["default_inbound_policy"], "permissive");
        assert_eq!(
            dumped["metrics_access"]["allowed_cidrs"],
            serde_yaml_ng::to_value(Vec::<String>::new()).unwrap()
        );
        assert_eq!(dumped["pod_resolve_timeout"], "5s");
        assert_eq!(
            dumped["cluster_networks"]["pod_cidrs"],
            serde_yaml_ng::to_value(["10.244.0.0/24", "10.244.1.0/24"]).unwrap()
        );
        assert_eq!(
            dumped["cluster_networks"]["service_cidrs"],
            serde_yaml_ng::to_value(Vec::<String>::new()).unwrap(),
            "this cluster file names no Service range"
        );
        assert_eq!(dumped["cluster_networks"].get("also"), None);
        assert_eq!(dumped["sockmap_acceleration"], "auto");
        assert_eq!(dumped["worker_threads"], 2);
        assert_eq!(
            dumped["max_connections_per_listener"],
            DEFAULT_MAX_CONNECTIONS_PER_LISTENER
        );
        assert_eq!(dumped["admin_listen"], "127.0.0.1:15000");
        assert_eq!(dumped["log_format"], "text");
    }

    #[test]
    fn display_names_the_token_path_but_not_its_content() {
        let shown = resolve(&[]).unwrap().to_string();
        assert!(
            shown.contains("token_file=/run/sealmesh/tb-cfg/node-0.token (content not shown)"),
            "{shown}"
        );
    }

    #[test]
    fn the_metrics_port_admits_the_allowed_networks_besides_the_node() {
        let c = resolve(&[]).unwrap();
        assert_eq!(c.metrics_access, MetricsAccess::default());
        let c = resolve(&["--metrics-allowed-cidrs", "10.244.0.0/16,192.168.1.7/32"]).unwrap();
        assert_eq!(
            c.metrics_access,
            MetricsAccess {
                allowed_cidrs: vec![
                    "10.244.0.0/16".parse().unwrap(),
                    "192.168.1.7/32".parse().unwrap()
                ]
            }
        );
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(&c.to_redacted_yaml()).unwrap();
        assert_eq!(
            yaml["metrics_access"]["allowed_cidrs"],
            serde_yaml_ng::to_value(["10.244.0.0/16", "192.168.1.7/32"]).unwrap()
        );
    }

    #[test]
    fn bad_policy_values_are_refused_with_the_valid_ones() {
        let error = Args::try_parse_from([
            "sealmesh-agent",
            "--node",
            "n",
            "--default-inbound-policy",
            "STRICT",
        ])
        .expect_err("not a policy");
        assert!(
            error
                .to_string()
                .contains("\"STRICT\" is not an inbound policy; use strict or permissive"),
            "{error}"
        );
        let error = Args::try_parse_from([
            "sealmesh-agent",
            "--node",
            "n",
            "--metrics-allowed-cidrs",
            "10.0.0.0/33",
        ])
        .expect_err("not a CIDR");
        assert!(
            error.to_string().contains("--metrics-allowed-cidrs"),
            "{error}"
        );
    }

    fn kube_args(extra: &[&str]) -> Args {
        let mut argv = vec!["sealmesh-agent", "--mode", "kubernetes", "--node", "n1"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).unwrap()
    }

    fn resolve_kube(extra: &[&str]) -> Result<AgentConfig, ConfigError> {
        AgentConfig::resolve_kubernetes(
            kube_args(extra),
            Some(Path::new("/sys/fs/bpf")),
            Some(Path::new("/sys/fs/cgroup")),
        )
    }

    #[test]
    fn kubernetes_mode_fills_kubernetes_defaults() {
        let c = resolve_kube(&[]).unwrap();
        assert_eq!(c.mode(), Mode::Kubernetes);
        assert_eq!(
            c.source,
            Source::Kubernetes(KubeSettings {
                namespace: "sealmesh".into(),
                cgroup_root: "/sys/fs/cgroup".into(),
                agent_pod_uid: None,
            })
        );
        assert_eq!(c.node, "n1");
        assert_eq!(c.trust_domain, TrustDomain::default());
        assert_eq!(
            c.identity_addr.to_string(),
            "Service sealmesh/sealmesh-identity port 8080 (its endpoints, from the Kubernetes API)"
        );
        assert_eq!(c.token_file, Path::new(IDENTITY_TOKEN_PATH));
        assert_eq!(c.bpffs_dir, Path::new("/sys/fs/bpf/sealmesh/kubernetes/n1"));
        assert_eq!(c.node_cgroup, Path::new("/sys/fs/cgroup"));
        assert_eq!(
            c.trust_anchors_origin(),
            "ConfigMap sealmesh/sealmesh-identity-trust-roots key ca-bundle.crt"
        );
    }

    #[test]
    fn kubernetes_mode_takes_its_flags() {
        let c = resolve_kube(&[
            "--namespace",
            "mesh-system",
            "--trust-domain",
            "example.org",
            "--cgroup-root",
            "/sys/fs/cgroup/kubelet.slice",
            "--identity-addr",
            "172.18.0.1:8080",
            "--token-file",
            "/run/token",
            "--agent-pod-uid",
            "6f1c2d3e-0a1b-4c5d-8e9f-001122334455",
            "--service-cidr",
            "10.43.0.0/16",
            "--cluster-pod-cidr",
            "10.42.0.0/16",
            "--cluster-pod-cidr",
            "100.64.0.0/10",
        ])
        .unwrap();
        assert_eq!(
            c.cluster_networks,
            ClusterNetworks {
                service_cidrs: vec!["10.43.0.0/16".parse().unwrap()],
                pod_cidrs: vec![
                    "10.42.0.0/16".parse().unwrap(),
                    "100.64.0.0/10".parse().unwrap()
                ],
            }
        );
        assert_eq!(
            c.trust_domain,
            TrustDomain::new("example.org", "mesh-system").unwrap()
        );
        assert_eq!(
            c.source,
            Source::Kubernetes(KubeSettings {
                namespace: "mesh-system".into(),
                cgroup_root: "/sys/fs/cgroup/kubelet.slice".into(),
                agent_pod_uid: Some("6f1c2d3e-0a1b-4c5d-8e9f-001122334455".into()),
            })
        );
        assert_eq!(c.node_cgroup, Path::new("/sys/fs/cgroup/kubelet.slice"));
        assert_eq!(
            c.identity_addr,
            IdentityLocation::Address("172.18.0.1:8080".parse().unwrap())
        );
        assert_eq!(c.token_file, Path::new("/run/token"));
    }

    #[test]
    fn each_mode_rejects_the_other_modes_flags() {
        let err = resolve_kube(&["--cluster-file", "/etc/cluster.yaml"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--cluster-file (SEALMESH_CLUSTER_FILE) does not apply to --mode kubernetes: kubernetes mode reads nodes, pods and Services from the Kubernetes API; remove it"
        );
        let err = resolve_kube(&["--trust-anchors", "/a.pem"]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::NotForMode {
                    flag: "--trust-anchors",
                    ..
                }
            ),
            "{err}"
        );
        let err = resolve(&["--namespace", "x"]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::NotForMode {
                    mode: Mode::Local,
                    ..
                }
            ),
            "{err}"
        );
        let err = resolve(&["--agent-pod-uid", "6f1c2d3e"]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::NotForMode {
                    flag: "--agent-pod-uid (SEALMESH_POD_UID)",
                    ..
                }
            ),
            "{err}"
        );
        let err = resolve(&["--cgroup-root", "/sys/fs/cgroup"]).unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::NotForMode {
                    flag: "--cgroup-root",
                    ..
                }
            ),
            "{err}"
        );

        let no_threads =
            Args::try_parse_from(["sealmesh-agent", "--node", "n1", "--worker-threads", "0"])
                .unwrap_err();
        assert!(
            no_threads.to_string().contains("--worker-threads"),
            "{no_threads}"
        );

        let no_file = Args::try_parse_from(["sealmesh-agent", "--node", "n1"]).unwrap();
        let err = AgentConfig::from_args(Args {
            bpffs_dir: Some("/sys/fs/bpf/x".into()),
            ..no_file
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::MissingClusterFile), "{err}");

        let err = resolve_kube(&["--trust-domain", "Bad_Domain"]).unwrap_err();
        assert!(matches!(err, ConfigError::TrustDomain(_)), "{err}");
        let err =
            AgentConfig::resolve_kubernetes(kube_args(&[]), Some(Path::new("/sys/fs/bpf")), None)
                .unwrap_err();
        assert!(matches!(err, ConfigError::NoCgroup2), "{err}");
    }

    #[test]
    fn kubernetes_yaml_dump_shows_the_mode_and_kube_settings() {
        let yaml = resolve_kube(&[]).unwrap().to_redacted_yaml();
        let dumped: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
        assert_eq!(dumped["mode"], "kubernetes");
        assert_eq!(dumped["kubernetes"]["namespace"], "sealmesh");
        assert_eq!(dumped["kubernetes"]["cgroup_root"], "/sys/fs/cgroup");
        assert!(
            dumped["kubernetes"]["api_credentials"]
                .as_str()
                .unwrap()
                .contains("kubeconfig")
        );
        assert_eq!(
            dumped["trust_anchors"],
            "ConfigMap sealmesh/sealmesh-identity-trust-roots key ca-bundle.crt"
        );
        assert_eq!(
            dumped["identity_addr"],
            "Service sealmesh/sealmesh-identity port 8080 (its endpoints, from the Kubernetes API)"
        );
        assert_eq!(dumped["token"], TOKEN_REDACTED);
        assert_eq!(dumped.get("cluster_file"), None);
        assert_eq!(dumped.get("node_ip"), None);
        assert_eq!(
            dumped["cluster_networks"]["service_cidrs"],
            serde_yaml_ng::to_value(["10.96.0.0/12"]).unwrap()
        );
        assert_eq!(
            dumped["cluster_networks"]["also"],
            "every Node's spec.podCIDRs"
        );
        let shown = resolve_kube(&[]).unwrap().to_string();
        assert!(
            shown.starts_with("mode=kubernetes node=n1 namespace=sealmesh "),
            "{shown}"
        );
    }

    #[test]
    fn identity_addresses_are_ips_or_dns_names_with_a_port() {
        let named: IdentityAddr = "Sealmesh-Identity.sealmesh.svc:8080".parse().unwrap();
        assert_eq!(named.to_string(), "sealmesh-identity.sealmesh.svc:8080");
        let v6: IdentityAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(v6.to_string(), "[::1]:8080");
        for bad in [
            "identity",
            "identity:port",
            ":8080",
            "a..b:1",
            "a b:1",
            "x:70000",
        ] {
            assert!(bad.parse::<IdentityAddr>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn identity_addresses_resolve_to_socket_addresses() {
        let ip: IdentityAddr = "172.18.0.1:8080".parse().unwrap();
        assert_eq!(
            ip.resolve().await.unwrap(),
            "172.18.0.1:8080".parse().unwrap()
        );
        let name: IdentityAddr = "localhost:8080".parse().unwrap();
        assert_eq!(
            name.resolve().await.unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
    }
}
