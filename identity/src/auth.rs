//! Who is calling, and may they have the identity they ask for.
//!
//! Two seams, so the Kubernetes implementations (TokenReview, pod watches)
//! slot in beside the local one:
//! - [`TokenValidator`] turns a bearer token into a [`Caller`];
//! - [`WorkloadDirectory`] answers whether a node runs a meshed pod of a
//!   ServiceAccount (the rule of `sealmesh_common::mesh::is_meshed`): an
//!   agent's token obtains only identities of its node's meshed pods.
//!
//! [`LocalCluster`] implements both from the cluster file; `kube` implements
//! them with TokenReview and a pod watch.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use sealmesh_common::{
    cluster::{ClusterError, ClusterFile},
    consts::{MESH_LABEL, MESH_LABEL_ENABLED, MESH_OPT_OUT_ANNOTATION, MESH_OPT_OUT_VALUE},
    identity::{Identity, TrustDomain},
};
use sha2::{Digest, Sha256};
use tonic::async_trait;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A node agent, asking on behalf of the pods of its node.
    Node(String),
    /// A workload, asking for its own ServiceAccount identity.
    Workload(Identity),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(name) => write!(f, "node {name}"),
            Self::Workload(identity) => write!(f, "workload {identity}"),
        }
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "no token was sent; send the node agent's token (or the workload's ServiceAccount token)"
    )]
    MissingToken,
    #[error(
        "the token is not a known node or ServiceAccount credential; send the node's token (local mode: the node's tokenFile in the cluster file)"
    )]
    UnknownToken,
    #[error(
        "node {node} runs no meshed pod with the identity {requested}; an agent may only request identities of meshed pods \
         (namespace labelled {MESH_LABEL}={MESH_LABEL_ENABLED}, no {MESH_OPT_OUT_ANNOTATION}: {MESH_OPT_OUT_VALUE} annotation) scheduled on its node"
    )]
    NotOnNode { node: String, requested: String },
    #[error("{caller} may not request {requested}; a workload may only request its own identity")]
    OtherWorkload { caller: String, requested: String },
    #[error(
        "Kubernetes TokenReview rejected the token: {reason}; send a ServiceAccount token projected for the audience {audience:?}"
    )]
    TokenRejected { reason: String, audience: String },
    #[error(
        "the token of {service_account} is not bound to a pod; agents must present their projected ServiceAccount token (a serviceAccountToken volume), not a Secret-based or unbound token"
    )]
    UnboundAgentToken { service_account: String },
    #[error(
        "the agent token is bound to pod {pod}, which {problem}; agents must present the current projected token of their own running pod"
    )]
    AgentPodInvalid { pod: String, problem: String },
    #[error(
        "{username} is not a ServiceAccount; only ServiceAccount tokens (agents' or workloads') may request certificates"
    )]
    NotServiceAccount { username: String },
    #[error("cannot check the caller: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait TokenValidator: Send + Sync + 'static {
    /// Authenticates a bearer token.
    async fn validate(&self, token: &[u8]) -> Result<Caller, AuthError>;
}

#[async_trait]
pub trait WorkloadDirectory: Send + Sync + 'static {
    /// Whether `node` has a meshed pod scheduled with `identity`'s
    /// ServiceAccount.
    async fn node_runs_meshed(&self, node: &str, identity: &Identity) -> Result<bool, AuthError>;
}

/// Authenticates a token and authorises the identity it asks for.
#[derive(Clone)]
pub struct Authorizer {
    tokens: Arc<dyn TokenValidator>,
    workloads: Arc<dyn WorkloadDirectory>,
}

impl Authorizer {
    pub fn new(tokens: Arc<dyn TokenValidator>, workloads: Arc<dyn WorkloadDirectory>) -> Self {
        Self { tokens, workloads }
    }

    pub async fn authorize(&self, token: &[u8], requested: &Identity) -> Result<Caller, AuthError> {
        if token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        let caller = self.tokens.validate(token).await?;
        match &caller {
            Caller::Node(node) => {
                if !self.workloads.node_runs_meshed(node, requested).await? {
                    return Err(AuthError::NotOnNode {
                        node: node.clone(),
                        requested: requested.to_string(),
                    });
                }
            }
            Caller::Workload(own) => {
                if own != requested {
                    return Err(AuthError::OtherWorkload {
                        caller: caller.to_string(),
                        requested: requested.to_string(),
                    });
                }
            }
        }
        Ok(caller)
    }
}

/// What makes a file "changed": replaced (inode), rewritten (mtime, size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    mtime_ns: i128,
    len: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            len: meta.len(),
        })
    }
}

/// Callers and placements as of one version of the cluster file.
struct Snapshot {
    cluster_stamp: Option<FileStamp>,
    token_stamps: Vec<(PathBuf, Option<FileStamp>)>,
    /// SHA-256 of each token: lookups never compare secrets byte by byte.
    callers: HashMap<[u8; 32], Caller>,
    /// node → (namespace, serviceaccount) of its meshed pods
    placements: HashMap<String, HashSet<(String, String)>>,
}

impl Snapshot {
    fn tokens_changed(&self) -> bool {
        self.token_stamps
            .iter()
            .any(|(path, stamp)| FileStamp::of(path) != *stamp)
    }
}

/// Local mode: callers and pod placement from the cluster file, which is
/// re-read whenever it (or a token file it names) changes, so pods and
/// nodes added later are seen on the next call.
pub struct LocalCluster {
    path: PathBuf,
    trust_domain: TrustDomain,
    snapshot: ArcSwap<Snapshot>,
    reload: Mutex<()>,
}

impl fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCluster")
            .field("path", &self.path)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl LocalCluster {
    /// Loads the cluster file; fails if it is missing or invalid.
    pub fn load(path: &Path) -> Result<Self, ClusterError> {
        let stamp = FileStamp::of(path);
        let file = ClusterFile::load(path)?;
        let trust_domain = file.trust_domain()?;
        Ok(Self {
            path: path.to_owned(),
            snapshot: ArcSwap::from_pointee(snapshot_of(&file, &trust_domain, stamp)),
            trust_domain,
            reload: Mutex::new(()),
        })
    }

    /// The trust domain identities are issued in (fixed at start).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current snapshot, re-read first if the cluster file changed.
    fn current(&self, force_tokens: bool) -> Arc<Snapshot> {
        let snapshot = self.snapshot.load_full();
        let stamp = FileStamp::of(&self.path);
        if stamp == snapshot.cluster_stamp && !(force_tokens && snapshot.tokens_changed()) {
            return snapshot;
        }
        let _serialised = self.reload.lock().unwrap_or_else(|p| p.into_inner());
        let latest = self.snapshot.load_full();
        if !Arc::ptr_eq(&latest, &snapshot) {
            return latest; // another caller reloaded meanwhile
        }
        let reloaded = match ClusterFile::load(&self.path) {
            Ok(file) if file.trust_domain.as_str() == self.trust_domain.domain() => {
                tracing::debug!(path = %self.path.display(), "cluster file reloaded");
                snapshot_of(&file, &self.trust_domain, stamp)
            }
            Ok(file) => {
                tracing::warn!(
                    path = %self.path.display(),
                    new = file.trust_domain,
                    current = self.trust_domain.domain(),
                    "cluster file changed its trust domain; restart the identity service to adopt it; keeping the previous cluster state"
                );
                return self.keep_with_stamp(&snapshot, stamp);
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cluster file is invalid; keeping the previous cluster state until it is fixed");
                return self.keep_with_stamp(&snapshot, stamp);
            }
        };
        let reloaded = Arc::new(reloaded);
        self.snapshot.store(reloaded.clone());
        reloaded
    }

    /// Remembers a bad version's stamp so it is not re-parsed on every call.
    fn keep_with_stamp(&self, old: &Snapshot, stamp: Option<FileStamp>) -> Arc<Snapshot> {
        let kept = Arc::new(Snapshot {
            cluster_stamp: stamp,
            token_stamps: old.token_stamps.clone(),
            callers: old.callers.clone(),
            placements: old.placements.clone(),
        });
        self.snapshot.store(kept.clone());
        kept
    }
}

fn snapshot_of(
    file: &ClusterFile,
    trust_domain: &TrustDomain,
    stamp: Option<FileStamp>,
) -> Snapshot {
    let mut callers = HashMap::new();
    let mut token_stamps = Vec::new();
    let mut add = |path: &Path, caller: Caller| {
        token_stamps.push((path.to_owned(), FileStamp::of(path)));
        match std::fs::read(path) {
            Ok(token) => {
                let token = token.trim_ascii();
                if token.is_empty() {
                    tracing::warn!(path = %path.display(), %caller, "token file is empty; that caller cannot authenticate");
                } else if let Some(previous) = callers.insert(token_digest(token), caller.clone()) {
                    tracing::warn!(path = %path.display(), %caller, %previous, "two callers share a token; only the last one listed can authenticate with it");
                }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), %caller, error = %e, "cannot read token file; that caller cannot authenticate until it exists")
            }
        }
    };
    for node in &file.nodes {
        if let Some(path) = &node.token_file {
            add(path, Caller::Node(node.name.clone()));
        }
    }
    for sa in &file.service_accounts {
        let Some(path) = &sa.token_file else { continue };
        match trust_domain.identity(&sa.namespace, &sa.name) {
            Ok(identity) => add(path, Caller::Workload(identity)),
            Err(e) => tracing::warn!(error = %e, "skipping ServiceAccount token"),
        }
    }
    let mut placements: HashMap<String, HashSet<(String, String)>> = HashMap::new();
    for pod in file.pods.iter().filter(|pod| file.is_meshed(pod)) {
        placements
            .entry(pod.node.clone())
            .or_default()
            .insert((pod.namespace.clone(), pod.service_account.clone()));
    }
    Snapshot {
        cluster_stamp: stamp,
        token_stamps,
        callers,
        placements,
    }
}

fn token_digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

#[async_trait]
impl TokenValidator for LocalCluster {
    async fn validate(&self, token: &[u8]) -> Result<Caller, AuthError> {
        let digest = token_digest(token.trim_ascii());
        if let Some(caller) = self.current(false).callers.get(&digest) {
            return Ok(caller.clone());
        }
        // A token file may have been (re)written since the last read.
        self.current(true)
            .callers
            .get(&digest)
            .cloned()
            .ok_or(AuthError::UnknownToken)
    }
}

#[async_trait]
impl WorkloadDirectory for LocalCluster {
    async fn node_runs_meshed(&self, node: &str, identity: &Identity) -> Result<bool, AuthError> {
        let key = (
            identity.namespace().to_owned(),
            identity.service_account().to_owned(),
        );
        Ok(identity.trust_domain() == &self.trust_domain
            && self
                .current(false)
                .placements
                .get(node)
                .is_some_and(|accounts| accounts.contains(&key)))
    }
}
