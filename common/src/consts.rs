//! Well-known ports, label names and defaults. Every crate uses these; none
//! repeats them.

/// Agent: plaintext listener that redirected outbound pod connections reach.
pub const OUTBOUND_PORT: u16 = 15001;
/// Agent: HBONE (HTTP/2 CONNECT over mTLS) listener for inbound connections.
pub const HBONE_PORT: u16 = 15008;
/// Agent: admin gRPC API (connection snapshot, tap, cert store, config).
pub const AGENT_ADMIN_PORT: u16 = 15000;
/// Agent: Prometheus metrics and liveness/readiness.
pub const AGENT_METRICS_PORT: u16 = 15020;

/// Identity service: gRPC Certify API (Linkerd's identity port).
pub const IDENTITY_GRPC_PORT: u16 = 8080;
/// Identity service: Prometheus metrics and health.
pub const IDENTITY_METRICS_PORT: u16 = 9990;

/// Default SPIFFE trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Namespace the control plane runs in; part of identity DNS names.
pub const DEFAULT_CONTROL_NAMESPACE: &str = "sealmesh";

/// Namespace label that meshes every pod in the namespace ...
pub const MESH_LABEL: &str = "sealmesh.io/mesh";
/// ... when set to this value.
pub const MESH_LABEL_ENABLED: &str = "enabled";
/// Pod annotation that opts a pod of a meshed namespace out of the mesh ...
pub const MESH_OPT_OUT_ANNOTATION: &str = "sealmesh.io/mesh";
/// ... when set to this value.
pub const MESH_OPT_OUT_VALUE: &str = "disabled";
/// Namespace or pod annotation choosing how a meshed pod treats inbound
/// connections that do not come through its node's agent (the pod's wins over
/// its namespace's; the agent's `--default-inbound-policy` applies to pods
/// neither sets) ...
pub const INBOUND_POLICY_ANNOTATION: &str = "sealmesh.io/inbound-policy";
/// ... `strict`: only connections through the node's agent (mTLS from meshed
/// pods), the node itself (kubelet probes) and the pod's own loopback; the
/// kernel drops the rest ...
pub const INBOUND_POLICY_STRICT: &str = "strict";
/// ... `permissive`: plaintext from anyone is accepted too (the default, as in
/// Linkerd and Istio).
pub const INBOUND_POLICY_PERMISSIVE: &str = "permissive";

/// Services `--deny-plaintext` lets pods reach in plaintext unless told
/// otherwise: the API server and cluster DNS, which every in-cluster client
/// needs and no mesh can secure.
pub const DEFAULT_PLAINTEXT_ALLOWED_SERVICES: &[&str] =
    &["default/kubernetes", "kube-system/kube-dns"];
/// Ports `--deny-plaintext` lets through in plaintext anywhere: DNS over TCP.
pub const DEFAULT_PLAINTEXT_ALLOWED_PORTS: &[u16] = &[53];

/// Agent log vocabulary that tools (testbed, demo, bench) wait for or parse.
/// Logged once the agent redirects its node's meshed pods and serves both
/// listeners.
pub const AGENT_STARTED_MESSAGE: &str = "agent started";
/// Logged (with `identity`) when the agent obtains an identity's first certificate.
pub const CERTIFICATE_OBTAINED_MESSAGE: &str = "certificate obtained";
/// Logged (with `identity`) when a restarted agent takes over a kept certificate.
pub const CERTIFICATE_INHERITED_MESSAGE: &str = "certificate inherited from the previous run";
/// `tracing` target of the agent's per-connection access log.
pub const ACCESS_LOG_TARGET: &str = "sealmesh_agent::access";
/// Where a node's running agent hands its listening sockets to its successor
/// (a Unix socket, node-local: a hostPath in the DaemonSet).
pub const AGENT_HANDOVER_SOCKET: &str = "/run/sealmesh/agent.sock";
/// Health endpoints of every sealmesh binary's metrics port (the probes'
/// paths): live while the process serves, ready when it can do its job.
pub const HEALTH_LIVE_PATH: &str = "/healthz/live";
pub const HEALTH_READY_PATH: &str = "/healthz/ready";
/// What an agent logs once it removed sealmesh from its node.
pub const SEALMESH_REMOVED_MESSAGE: &str = "sealmesh removed from this node";
/// What the running agent logs once its successor took its listeners.
pub const LISTENERS_HANDED_OVER_MESSAGE: &str = "listening sockets handed over to the new agent";

/// Kubernetes object and key names shared by the agent, the identity service,
/// the CLI, the testbed and `deploy/`.
pub mod kube {
    /// Audience of the projected ServiceAccount tokens agents (and workloads)
    /// present to the identity service; TokenReview checks it.
    pub const IDENTITY_TOKEN_AUDIENCE: &str = "identity.sealmesh.io";
    /// Where the agent DaemonSet mounts that projected token.
    pub const IDENTITY_TOKEN_PATH: &str = "/var/run/secrets/sealmesh.io/identity/token";
    /// Where the agent DaemonSet keeps its certificates across a restart and
    /// a rolling update: the host's `/run/sealmesh` (a tmpfs on usual hosts).
    pub const CERT_CACHE_DIR: &str = "/run/sealmesh/certs";
    /// ServiceAccount the agents run as (in the control namespace); node-mode
    /// callers must hold a token of it.
    pub const AGENT_SERVICE_ACCOUNT: &str = "sealmesh-agent";
    /// Name of the agent DaemonSet (and the prefix of its pods).
    pub const AGENT_DAEMONSET: &str = "sealmesh-agent";
    /// ServiceAccount, Deployment and Service of the identity service.
    pub const IDENTITY_NAME: &str = "sealmesh-identity";
    /// Kubernetes' default cluster DNS domain (Services are
    /// `<name>.<namespace>.svc.<domain>`); not the SPIFFE trust domain,
    /// though both default to the same text.
    pub const CLUSTER_DNS_DOMAIN: &str = "cluster.local";
    /// Secret holding the issuer (intermediate CA): `crt.pem`/`key.pem` or
    /// cert-manager's `tls.crt`/`tls.key`/`ca.crt`.
    pub const ISSUER_SECRET: &str = "sealmesh-identity-issuer";
    /// ConfigMap holding the trust-anchor bundle ...
    pub const TRUST_ROOTS_CONFIGMAP: &str = "sealmesh-identity-trust-roots";
    /// ... under this key.
    pub const TRUST_ROOTS_KEY: &str = "ca-bundle.crt";
    /// Prefix of a ServiceAccount's Kubernetes username,
    /// `system:serviceaccount:<namespace>:<name>` (as TokenReview reports it).
    pub const SERVICE_ACCOUNT_USERNAME_PREFIX: &str = "system:serviceaccount:";
    /// TokenReview `extra` keys naming the pod a bound token belongs to.
    pub const TOKEN_EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
    pub const TOKEN_EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
    /// Event reasons recorded on the identity Deployment when the issuer
    /// Secret changes (as Linkerd's `kubectl get events --field-selector
    /// reason=IssuerUpdated` expects).
    pub const EVENT_ISSUER_UPDATED: &str = "IssuerUpdated";
    /// kube-apiserver's (and kubeadm's) default `--service-cluster-ip-range`.
    pub const DEFAULT_SERVICE_CIDR: ipnet::Ipv4Net =
        ipnet::Ipv4Net::new_assert(std::net::Ipv4Addr::new(10, 96, 0, 0), 12);
    pub const EVENT_ISSUER_UPDATE_SKIPPED: &str = "IssuerUpdateSkipped";
    /// Warning Event reason recorded by a node's agent on a pod it leaves
    /// out of the mesh because no certificate can name its ServiceAccount.
    pub const EVENT_IDENTITY_UNREPRESENTABLE: &str = "IdentityUnrepresentable";
    /// Label EndpointSlices carry to name their Service.
    pub const ENDPOINTSLICE_SERVICE_LABEL: &str = "kubernetes.io/service-name";
    /// Label the API server puts on every Namespace, its own name; the
    /// NetworkPolicy of the identity service's metrics port selects the
    /// monitoring namespace by it, so that namespace needs no labelling.
    pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
    /// Namespace whose pods (Prometheus) may scrape the identity service's
    /// metrics port (`sealmesh install --monitoring-namespace` changes it).
    pub const DEFAULT_MONITORING_NAMESPACE: &str = "monitoring";
    /// The node-CIDR placeholder (TEST-NET-1, RFC 5737: no node has such an
    /// address) in `deploy/overlays/network-policy`, to be replaced by the
    /// nodes' CIDRs before applying; `sealmesh install --node-cidrs` does.
    pub const NODE_CIDRS_PLACEHOLDER: &str = "192.0.2.0/24";
}
