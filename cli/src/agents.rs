//! Finding node agents and talking to their admin API.
//!
//! Each agent serves its admin API node-locally (`127.0.0.1:AGENT_ADMIN_PORT`),
//! so a caller must be "on" the node to reach it. [`AgentDirectory`] lists the
//! agents of a cluster and runs one session per agent through a
//! [`AgentTransport`]: in local mode ([`NetnsTransport`]) a thread that joins
//! the node's network namespace (root); on a Kubernetes cluster
//! ([`PortForwardTransport`](crate::kube::PortForwardTransport)) a
//! port-forward through the API server to the agent pod, per connection, with
//! the caller's kubeconfig only.

use std::{
    fs::File,
    future::Future,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    thread::JoinHandle,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use sealmesh_common::{
    backoff::CappedBackoff,
    cluster::{ClusterError, ClusterFile},
    consts::AGENT_ADMIN_PORT,
    host::NETNS_RUN_DIR,
};
use sealmesh_proto::admin::admin_client::AdminClient;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for an agent to accept the admin connection; one-shot
/// commands retry an agent that does not answer within this time too.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Between attempts to reach an agent that did not answer: quick at first
/// (an agent restarting is back within a second or two), then every few
/// seconds at most.
pub const RECONNECT: CappedBackoff = CappedBackoff {
    first: Duration::from_millis(200),
    cap: Duration::from_secs(5),
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "reaching agents in local mode means entering node network namespaces, which needs root: run sealmesh with sudo"
    )]
    NotRoot,
    #[error(
        "node {node} has no netns in the cluster file; local mode reaches agents through the node's network namespace"
    )]
    NoNetns { node: String },
    #[error("cannot open network namespace {path} of node {node}: {source}; is the testbed up?")]
    OpenNetns {
        node: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {netns} of node {node}: {source}")]
    EnterNetns {
        node: String,
        netns: String,
        source: nix::Error,
    },
    #[error("node {node} has no agent pod; Kubernetes mode reaches agents through their pods")]
    NoPod { node: String },
    #[error("cannot start a thread or runtime for node {node}: {source}")]
    Runtime {
        node: String,
        source: std::io::Error,
    },
    #[error(
        "agent on node {node} is not reachable at {address}: {reason}; is the agent running there? (see its log)"
    )]
    Connect {
        node: String,
        /// Where the agent was dialled (an address, or the pod port-forwarded to).
        address: String,
        /// The error and its causes, one line.
        reason: String,
    },
    #[error("agent on node {node} answered {call} with an error: {status}")]
    Rpc {
        node: String,
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("the session with the agent on node {node} panicked")]
    Panicked { node: String },
}

impl AgentError {
    /// Wraps a failed admin call.
    pub fn rpc(node: &str, call: &'static str, status: tonic::Status) -> Self {
        Self::Rpc {
            node: node.to_owned(),
            call,
            status: Box::new(status),
        }
    }

    /// The agent did not answer (not listening, or going away): asking again
    /// shortly may succeed, unlike for an error it answered with.
    pub fn is_unanswered(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Rpc { status, .. } => status.code() == tonic::Code::Unavailable,
            _ => false,
        }
    }
}

/// One node agent as the cluster describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentRef {
    pub node: String,
    pub node_ip: Ipv4Addr,
    /// Network namespace of the node (local mode).
    pub netns: Option<String>,
    /// The agent's pod (Kubernetes mode).
    pub pod: Option<String>,
}

/// What a session does with a connected admin client. Its future runs on a
/// current-thread runtime of the session's own thread (so it need not be
/// `Send`).
pub type Session<T> = Box<
    dyn FnOnce(AdminClient<Channel>) -> Pin<Box<dyn Future<Output = Result<T, AgentError>>>> + Send,
>;

/// A session that dials the agent itself, as often as it needs (to retry or
/// reconnect), through the [`AgentLink`] it is given; it runs as a
/// [`Session`] does.
pub type LinkSession<T> =
    Box<dyn FnOnce(AgentLink) -> Pin<Box<dyn Future<Output = Result<T, AgentError>>>> + Send>;

/// A running session's thread.
pub type SessionHandle<T> = JoinHandle<Result<T, AgentError>>;

/// Boxes an async closure as a [`Session`].
pub fn session<T, F, Fut>(f: F) -> Session<T>
where
    F: FnOnce(AdminClient<Channel>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, AgentError>> + 'static,
{
    Box::new(move |client| Box::pin(f(client)))
}

/// Boxes an async closure as a [`LinkSession`].
pub fn link_session<T, F, Fut>(f: F) -> LinkSession<T>
where
    F: FnOnce(AgentLink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, AgentError>> + 'static,
{
    Box::new(move |link| Box::pin(f(link)))
}

/// Runs `session` on a client of the agent, connected once.
fn connected<T: 'static>(session: Session<T>) -> LinkSession<T> {
    link_session(move |link| async move { session(link.connect().await?).await })
}

/// An agent's admin API as a session reaches it.
#[derive(Clone, Debug)]
pub struct AgentLink {
    node: String,
    route: AgentRoute,
}

/// How a link dials its agent.
#[derive(Clone, Debug)]
pub enum AgentRoute {
    /// A TCP address the session's thread reaches (inside the node).
    Direct(SocketAddr),
    /// A port-forward through the API server, one per connection.
    PortForward(Box<crate::kube::PodPort>),
}

impl AgentLink {
    pub fn new(node: String, route: AgentRoute) -> Self {
        Self { node, route }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Dials the agent, waiting at most [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<AdminClient<Channel>, AgentError> {
        self.connect_within(CONNECT_TIMEOUT).await
    }

    async fn connect_within(&self, timeout: Duration) -> Result<AdminClient<Channel>, AgentError> {
        let connected = match &self.route {
            AgentRoute::Direct(address) => {
                Endpoint::from_shared(format!("http://{address}"))
                    .expect("a socket address makes a valid URI")
                    .connect_timeout(timeout)
                    .connect()
                    .await
            }
            AgentRoute::PortForward(pod_port) => {
                Endpoint::from_shared(pod_port.uri())
                    .expect("a pod's name makes a valid URI")
                    .connect_timeout(timeout)
                    .connect_with_connector(pod_port.connector())
                    .await
            }
        };
        let channel = connected.map_err(|error| AgentError::Connect {
            node: self.node.clone(),
            address: self.route.to_string(),
            reason: error_chain(&error),
        })?;
        Ok(AdminClient::new(channel))
    }

    /// Dials the agent and makes `call`, again with [`RECONNECT`] delays
    /// while the agent does not answer ([`AgentError::is_unanswered`]), for
    /// at most [`CONNECT_TIMEOUT`] in all: a one-shot command rides out an
    /// agent that is restarting and still names one that stays down.
    pub async fn call_with_retries<T, Fut>(
        &self,
        call: impl Fn(AdminClient<Channel>) -> Fut,
    ) -> Result<T, AgentError>
    where
        Fut: Future<Output = Result<T, AgentError>>,
    {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let call = &call;
        RECONNECT
            .retry_until(
                deadline,
                || async move {
                    let left = deadline.saturating_duration_since(Instant::now());
                    call(self.connect_within(left).await?).await
                },
                AgentError::is_unanswered,
                |_, _| {},
            )
            .await
    }
}

impl std::fmt::Display for AgentRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(address) => write!(f, "{address}"),
            Self::PortForward(pod_port) => write!(f, "{pod_port}"),
        }
    }
}

/// An error and its causes on one line, without tonic's bare
/// "transport error" wrapper.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        let text = error.to_string();
        if text != "transport error" && !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        next = error.source();
    }
    if parts.is_empty() {
        "transport error".to_owned()
    } else {
        parts.join(": ")
    }
}

/// Awaits one admin call and names the node and call when it fails.
pub async fn call<T>(
    node: &str,
    call: &'static str,
    response: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    response
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| AgentError::rpc(node, call, status))
}

/// How sessions reach an agent's admin API.
pub trait AgentTransport {
    /// Starts `session` with a link to `agent`'s admin API on a thread of
    /// its own.
    fn spawn_linked<T: Send + 'static>(
        &self,
        agent: &AgentRef,
        session: LinkSession<T>,
    ) -> Result<SessionHandle<T>, AgentError>;

    /// Starts `session` against `agent`'s admin API on a thread of its own.
    fn spawn<T: Send + 'static>(
        &self,
        agent: &AgentRef,
        session: Session<T>,
    ) -> Result<SessionHandle<T>, AgentError> {
        self.spawn_linked(agent, connected(session))
    }
}

/// Local mode: join the node's network namespace and dial the agent on loopback.
#[derive(Clone, Debug)]
pub struct NetnsTransport {
    netns_dir: PathBuf,
}

impl Default for NetnsTransport {
    fn default() -> Self {
        Self {
            netns_dir: PathBuf::from(NETNS_RUN_DIR),
        }
    }
}

impl NetnsTransport {
    /// Fails early with a clear message when not root (setns needs CAP_SYS_ADMIN).
    pub fn new() -> Result<Self, AgentError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(AgentError::NotRoot);
        }
        Ok(Self::default())
    }
}

impl AgentTransport for NetnsTransport {
    fn spawn_linked<T: Send + 'static>(
        &self,
        agent: &AgentRef,
        session: LinkSession<T>,
    ) -> Result<SessionHandle<T>, AgentError> {
        let node = agent.node.clone();
        let netns = agent
            .netns
            .clone()
            .ok_or_else(|| AgentError::NoNetns { node: node.clone() })?;
        let path = self.netns_dir.join(&netns);
        let netns_file = File::open(&path).map_err(|source| AgentError::OpenNetns {
            node: node.clone(),
            path: path.clone(),
            source,
        })?;
        std::thread::Builder::new()
            .name(format!("agent {node}"))
            .spawn(move || {
                // setns(2) switches only this thread; the runtime below is
                // current-thread, so every socket it opens is in the node.
                setns(&netns_file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                    AgentError::EnterNetns {
                        node: node.clone(),
                        netns: netns.clone(),
                        source,
                    }
                })?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| AgentError::Runtime {
                        node: node.clone(),
                        source,
                    })?;
                let link = AgentLink::new(
                    node,
                    AgentRoute::Direct(SocketAddr::from((Ipv4Addr::LOCALHOST, AGENT_ADMIN_PORT))),
                );
                runtime.block_on(session(link))
            })
            .map_err(|source| AgentError::Runtime {
                node: agent.node.clone(),
                source,
            })
    }
}

/// Either transport, chosen at run time by where the cluster is described.
#[derive(Debug)]
pub enum AnyTransport {
    Netns(NetnsTransport),
    PortForward(Box<crate::kube::PortForwardTransport>),
}

impl AgentTransport for AnyTransport {
    fn spawn_linked<T: Send + 'static>(
        &self,
        agent: &AgentRef,
        session: LinkSession<T>,
    ) -> Result<SessionHandle<T>, AgentError> {
        match self {
            Self::Netns(transport) => transport.spawn_linked(agent, session),
            Self::PortForward(transport) => transport.spawn_linked(agent, session),
        }
    }
}

/// The agents of a cluster and the way to reach them.
#[derive(Debug)]
pub struct AgentDirectory<T = AnyTransport> {
    agents: Vec<AgentRef>,
    transport: T,
}

impl AgentDirectory {
    /// Local mode: one agent per node of the cluster file.
    pub fn local(cluster: &ClusterFile) -> Result<Self, AgentError> {
        let agents = cluster
            .nodes
            .iter()
            .map(|node| AgentRef {
                node: node.name.clone(),
                node_ip: node.ip,
                netns: node.netns.clone(),
                pod: None,
            })
            .collect();
        Ok(Self {
            agents,
            transport: AnyTransport::Netns(NetnsTransport::new()?),
        })
    }

    /// Kubernetes mode: the agent pods the API lists, reached by port-forward.
    pub fn kubernetes(agents: Vec<AgentRef>, transport: crate::kube::PortForwardTransport) -> Self {
        Self {
            agents,
            transport: AnyTransport::PortForward(Box::new(transport)),
        }
    }

    /// The agents of whichever cluster `source` describes.
    pub fn of(source: &ClusterSource) -> Result<Self, anyhow::Error> {
        match source {
            ClusterSource::Local(cluster) => Ok(Self::local(cluster)?),
            ClusterSource::Kubernetes(cluster) => Ok(cluster.agent_directory()?),
        }
    }
}

impl<T: AgentTransport> AgentDirectory<T> {
    pub fn agents(&self) -> &[AgentRef] {
        &self.agents
    }

    pub fn agent(&self, node: &str) -> Option<&AgentRef> {
        self.agents.iter().find(|a| a.node == node)
    }

    /// Starts one linked session per agent, all at once.
    pub fn spawn_all_linked<R: Send + 'static>(
        &self,
        mut make: impl FnMut(&AgentRef) -> LinkSession<R>,
    ) -> Vec<(AgentRef, Result<SessionHandle<R>, AgentError>)> {
        self.agents
            .iter()
            .map(|agent| {
                let handle = self.transport.spawn_linked(agent, make(agent));
                (agent.clone(), handle)
            })
            .collect()
    }

    /// Runs one session per agent concurrently and returns every agent's
    /// result, in directory order.
    pub fn query_all<R: Send + 'static>(
        &self,
        mut make: impl FnMut(&AgentRef) -> Session<R>,
    ) -> Vec<(AgentRef, Result<R, AgentError>)> {
        self.query_all_linked(|agent| connected(make(agent)))
    }

    /// [`AgentDirectory::query_all`] for linked sessions.
    pub fn query_all_linked<R: Send + 'static>(
        &self,
        make: impl FnMut(&AgentRef) -> LinkSession<R>,
    ) -> Vec<(AgentRef, Result<R, AgentError>)> {
        self.spawn_all_linked(make)
            .into_iter()
            .map(|(agent, handle)| {
                let result = handle.and_then(|h| join(&agent.node, h));
                (agent, result)
            })
            .collect()
    }

    /// Starts one session against `agent`.
    pub fn spawn<R: Send + 'static>(
        &self,
        agent: &AgentRef,
        session: Session<R>,
    ) -> Result<SessionHandle<R>, AgentError> {
        self.transport.spawn(agent, session)
    }

    /// Runs one session against `agent` and waits for its result.
    pub fn query<R: Send + 'static>(
        &self,
        agent: &AgentRef,
        session: Session<R>,
    ) -> Result<R, AgentError> {
        let handle = self.transport.spawn(agent, session)?;
        join(&agent.node, handle)
    }
}

pub fn join<R>(node: &str, handle: SessionHandle<R>) -> Result<R, AgentError> {
    handle.join().unwrap_or_else(|_| {
        Err(AgentError::Panicked {
            node: node.to_owned(),
        })
    })
}

/// Where the CLI learns about the cluster: the cluster file (local mode), or
/// else the Kubernetes API as kubectl finds it.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterArgs {
    /// Local mode: the cluster file (written by the testbed) that lists the
    /// nodes, pods and the identity service. Without it the CLI uses the
    /// Kubernetes API (kubeconfig or in-cluster config).
    #[arg(long, env = "SEALMESH_CLUSTER_FILE")]
    pub cluster_file: Option<PathBuf>,
    #[command(flatten)]
    pub kube: crate::kube::KubeArgs,
}

/// The cluster a command works on.
#[derive(Debug)]
pub enum ClusterSource {
    /// The testbed's cluster file; agents are reached in node namespaces.
    Local(Box<ClusterFile>),
    /// A Kubernetes cluster; agents are reached by port-forward.
    Kubernetes(Box<crate::kube::KubeCluster>),
}

impl ClusterSource {
    /// The cluster's pods, Services, namespaces and nodes as a cluster file
    /// (on Kubernetes read from the API now).
    pub fn cluster_file(&self) -> Result<std::borrow::Cow<'_, ClusterFile>, ClusterArgsError> {
        match self {
            Self::Local(cluster) => Ok(std::borrow::Cow::Borrowed(cluster)),
            Self::Kubernetes(cluster) => Ok(std::borrow::Cow::Owned(cluster.snapshot()?)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterArgsError {
    #[error(transparent)]
    Load(#[from] ClusterError),
    #[error(transparent)]
    Kube(#[from] crate::kube::KubeError),
}

impl ClusterArgs {
    /// The cluster file given with `--cluster-file`, else the Kubernetes
    /// cluster of the kubeconfig (`--kubeconfig`, `KUBECONFIG`,
    /// `~/.kube/config`) or of the pod the CLI runs in.
    pub fn source(&self) -> Result<ClusterSource, ClusterArgsError> {
        if let Some(path) = &self.cluster_file {
            return Ok(ClusterSource::Local(Box::new(ClusterFile::load(path)?)));
        }
        Ok(ClusterSource::Kubernetes(Box::new(self.kube.cluster()?)))
    }

    pub fn path(&self) -> Option<&Path> {
        self.cluster_file.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_netns_is_refused_with_the_reason() {
        let transport = NetnsTransport::default();
        let agent = AgentRef {
            node: "node-0".into(),
            node_ip: Ipv4Addr::new(172, 18, 0, 2),
            netns: None,
            pod: None,
        };
        let err = transport
            .spawn::<()>(&agent, Box::new(|_| Box::pin(async { Ok(()) })))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "node node-0 has no netns in the cluster file; local mode reaches agents through the node's network namespace"
        );
    }

    #[test]
    fn a_missing_namespace_names_its_path() {
        let transport = NetnsTransport {
            netns_dir: PathBuf::from("/nonexistent-netns-dir"),
        };
        let agent = AgentRef {
            node: "node-1".into(),
            node_ip: Ipv4Addr::new(172, 18, 0, 3),
            netns: Some("sm-x-n1".into()),
            pod: None,
        };
        let err = transport
            .spawn::<()>(&agent, Box::new(|_| Box::pin(async { Ok(()) })))
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "cannot open network namespace /nonexistent-netns-dir/sm-x-n1 of node node-1:"
            ),
            "{err}"
        );
    }
}
