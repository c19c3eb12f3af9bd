//! The agent's admin API (gRPC, `sealmesh.admin.v1.Admin`): status and
//! readiness, open connections and edges, a live tap of connection events,
//! the cert store, the effective configuration, the eBPF datapath and each
//! local pod's inbound policy with the kernel's latest refusals. The
//! `sealmesh` CLI (`check`, `edges`, `tap`, `why`, `certs inspect --agent`)
//! reads it.
//!
//! # Reaching it, and why it is node-local
//!
//! It exposes traffic metadata (who talks to whom, addresses, identities,
//! bytes) and has no authentication of its own, so it listens on
//! `127.0.0.1:15000` (`AGENT_ADMIN_PORT`) by default: only processes in the
//! agent's network namespace (the node's host network) can reach it, never
//! pods (their own namespaces) nor other nodes. On the local testbed the CLI
//! enters the node's network namespace; in Kubernetes, use
//! `kubectl port-forward` to the agent pod, which the API server authorises
//! (RBAC on `pods/portforward`). `--admin-listen` moves it; only bind it to a
//! non-loopback address behind something that authenticates callers.
//!
//! The API is read-only and never slows the data path: state is kept by
//! [`ConnectionObserver`](crate::proxy::ConnectionObserver)s with short
//! critical sections, and a tap subscriber that falls behind loses its
//! stream (with a status saying so) rather than holding connections back.

mod connections;
mod service;

use std::{
    collections::BTreeSet,
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use agent_ebpf::names;
use sealmesh_proto::admin::admin_server::AdminServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

pub use connections::{ConnectionTable, EdgeKey, EdgeStats, MAX_EDGES};
pub use service::AdminService;

use crate::{
    certs::CertStore,
    ebpf::{EbpfStatus, Redirector},
    handover::Listeners,
    inbound_policy::InboundPolicyState,
    metrics::{AgentMetrics, Health, Readiness},
    proxy::ProxyHandle,
    registry::WorkloadRegistry,
};

/// The programs that must be attached for pods to be meshed (and strict
/// ones protected).
pub const REQUIRED_PROGRAMS: [&str; 4] = [
    names::CONNECT4_PROGRAM,
    names::CONNECT6_PROGRAM,
    names::SOCK_OPS_PROGRAM,
    names::STRICT_INBOUND_PROGRAM,
];

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot listen on {addr} for {what}: {source}; is another agent running in this network namespace? Choose another address with {flag}"
    )]
    Bind {
        what: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Where the datapath's state comes from; [`Redirector`] in the agent.
pub trait DatapathStatus: Send + Sync + 'static {
    /// Cheap: what readiness needs (programs attached, and where they pin).
    fn attachment(&self) -> (Vec<&'static str>, PathBuf);
    /// Costly (walks every map): run off the runtime's workers.
    fn status(&self) -> EbpfStatus;
}

impl DatapathStatus for Redirector {
    fn attachment(&self) -> (Vec<&'static str>, PathBuf) {
        (self.attached_programs(), self.pin_dir().to_owned())
    }

    fn status(&self) -> EbpfStatus {
        Redirector::status(self)
    }
}

/// Everything the admin API and the readiness probe read.
pub struct AgentState {
    pub node: String,
    pub node_ip: String,
    /// [`AgentConfig::to_redacted_yaml`](crate::config::AgentConfig::to_redacted_yaml).
    pub config_yaml: String,
    pub started: SystemTime,
    pub registry: Arc<dyn WorkloadRegistry>,
    pub certs: Arc<CertStore>,
    pub datapath: Arc<dyn DatapathStatus>,
    pub proxy: ProxyHandle,
    pub connections: Arc<ConnectionTable>,
    pub inbound: Arc<InboundPolicyState>,
}

impl std::fmt::Debug for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentState")
            .field("node", &self.node)
            .field("connections", &self.connections)
            .finish_non_exhaustive()
    }
}

impl Health for AgentState {
    /// The TLS engine's accept loop runs: a stopped one (a failed task) is
    /// cured by a restart.
    fn liveness(&self) -> Result<(), String> {
        if self.proxy.is_accepting() {
            Ok(())
        } else {
            Err("the TLS engine stopped accepting connections; see the agent log".to_owned())
        }
    }

    fn readiness(&self) -> Readiness {
        AgentState::readiness(self)
    }
}

impl AgentState {
    /// SPIFFE URIs of the local meshed ServiceAccounts, sorted.
    pub fn wanted_identities(&self) -> BTreeSet<String> {
        self.registry
            .local_workloads()
            .iter()
            .filter(|w| w.meshed)
            .map(|w| w.identity.spiffe_uri())
            .collect()
    }

    /// Ready when every redirect program is attached and every local meshed
    /// ServiceAccount has a valid certificate; otherwise, why not. Cheap
    /// enough for every probe: no eBPF map is read.
    pub fn readiness(&self) -> Readiness {
        let (attached, pin_dir) = self.datapath.attachment();
        let mut reasons: Vec<String> = REQUIRED_PROGRAMS
            .iter()
            .filter(|program| !attached.contains(program))
            .map(|program| {
                format!(
                    "eBPF program {program} is not attached at the node cgroup (no link pinned under {}): meshed pods' connections are not redirected; see the agent log for the load error",
                    pin_dir.display()
                )
            })
            .collect();
        let held = self.certs.snapshot();
        for identity in self.wanted_identities() {
            let status = held.iter().find(|s| s.identity.spiffe_uri() == identity);
            if status.is_some_and(|s| s.valid) {
                continue;
            }
            let why = match status.and_then(|s| s.last_error.as_deref()) {
                Some(error) => format!("last attempt failed: {error}"),
                None if status.is_some_and(|s| s.not_after.is_some()) => {
                    "the certificate held has expired; renewal pending".to_owned()
                }
                None => "not obtained yet from the identity service".to_owned(),
            };
            reasons.push(format!(
                "no valid certificate for local meshed ServiceAccount {identity}: {why}"
            ));
        }
        let warnings = self
            .registry
            .source_failures()
            .into_iter()
            .map(|(source, error)| {
                format!("{source} fails ({error}); serving pods and Services as last seen")
            })
            .collect();
        Readiness { reasons, warnings }
    }

    /// Keeps edges and metric series to what is on the node: on every
    /// registry change, forgets pods and identities that left.
    pub async fn forget_departed(
        self: Arc<Self>,
        metrics: Arc<AgentMetrics>,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut changes = self.registry.subscribe();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            self.connections.forget_departed(self.registry.as_ref());
            let local = self.registry.local_workloads();
            let namespaces: BTreeSet<String> = local.iter().map(|w| w.namespace.clone()).collect();
            metrics.forget_departed(&self.wanted_identities(), &namespaces);
        }
    }
}

/// Binds the admin gRPC listener, or takes the one a previous agent handed
/// over (so a taken port fails the start-up).
pub fn bind(addr: SocketAddr, listeners: &mut Listeners) -> Result<TcpListener, AdminError> {
    listeners
        .tcp(addr, std::net::TcpListener::bind)
        .map_err(|source| AdminError::Bind {
            what: "the admin gRPC API",
            flag: "--admin-listen",
            addr,
            source,
        })
}

/// Serves the admin API on `listener` until `shutdown` resolves; open tap
/// streams end then too.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AgentState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tracing::info!(addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()), "admin API listening");
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService::new(state, stop_rx)))
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await?;
    Ok(())
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
