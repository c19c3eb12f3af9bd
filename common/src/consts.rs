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

/// Agent log vocabulary that tools (testbed, demo, bench) wait for or parse.
/// Logged once the agent redirects its node's meshed pods and serves both
/// listeners.
pub const AGENT_STARTED_MESSAGE: &str = "agent started";
/// `tracing` target of the agent's per-connection access log.
pub const ACCESS_LOG_TARGET: &str = "sealmesh_agent::access";
