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
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use sealmesh_common::{
    cluster::{ClusterError, ClusterFile},
    consts::{MESH_LABEL, MESH_LABEL_ENABLED, MESH_OPT_OUT_ANNOTATION, MESH_OPT_OUT_VALUE},
    file_watch::{FileWatch, FileWatchError},
    identity::{Identity, TrustDomain},
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
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

/// SHA-256 of a file's content; None while it cannot be read.
type ContentDigest = Option<[u8; 32]>;

fn content_digest(path: &Path) -> ContentDigest {
    std::fs::read(path)
        .ok()
        .map(|content| Sha256::digest(content).into())
}

/// Callers and placements as of one reading of the cluster file and the
/// token files it names.
struct LocalClusterState {
    /// The file watch's generation before the files were read: while it
    /// stays, they are unchanged.
    generation: u64,
    /// What each file read held (the cluster file first).
    sources: Vec<(PathBuf, ContentDigest)>,
    /// SHA-256 of each token: lookups never compare secrets byte by byte.
    callers: HashMap<[u8; 32], Caller>,
    /// node → (namespace, serviceaccount) of its meshed pods
    placements: HashMap<String, HashSet<(String, String)>>,
}

impl LocalClusterState {
    fn sources_changed(&self) -> bool {
        self.sources
            .iter()
            .any(|(path, digest)| content_digest(path) != *digest)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    #[error(transparent)]
    File(#[from] ClusterError),
    #[error(transparent)]
    Watch(Box<FileWatchError>),
}

/// Local mode: callers and pod placement from the cluster file, which is
/// re-read whenever it (or a token file it names) changes, so pods and
/// nodes added later are seen on the next call.
///
/// Changes are known from file events; a call that would be refused also
/// compares the files' contents, because the event of a file written just
/// before the call may still be on its way (and a token file whose
/// directory cannot be watched has none).
pub struct LocalCluster {
    path: PathBuf,
    trust_domain: TrustDomain,
    state: ArcSwap<LocalClusterState>,
    /// Follows the cluster file and the token files it names (each watched
    /// before it is first read); held while reloading.
    watch: Mutex<FileWatch>,
    /// The watch's generation, read without its lock.
    changes: watch::Receiver<u64>,
}

impl fmt::Debug for LocalCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalCluster")
            .field("path", &self.path)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// The cluster file's content and its parsed form.
fn read_cluster_file(path: &Path) -> Result<(ContentDigest, ClusterFile), ClusterError> {
    let content = std::fs::read(path).map_err(|source| ClusterError::Read {
        path: path.to_owned(),
        source,
    })?;
    let digest = Some(Sha256::digest(&content).into());
    let text = String::from_utf8(content).map_err(|error| ClusterError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, error),
    })?;
    Ok((digest, ClusterFile::from_yaml(&text)?))
}

impl LocalCluster {
    /// Loads the cluster file and starts following it; fails if it is
    /// missing or invalid, or cannot be watched.
    pub fn load(path: &Path) -> Result<Self, LocalClusterError> {
        let mut file_watch =
            FileWatch::new([path]).map_err(|error| LocalClusterError::Watch(Box::new(error)))?;
        let changes = file_watch.subscribe();
        let generation = file_watch.generation();
        let (digest, file) = read_cluster_file(path)?;
        let trust_domain = file.trust_domain()?;
        let state = state_of(
            &file,
            &trust_domain,
            generation,
            (path.to_owned(), digest),
            &mut file_watch,
        );
        Ok(Self {
            path: path.to_owned(),
            state: ArcSwap::from_pointee(state),
            trust_domain,
            watch: Mutex::new(file_watch),
            changes,
        })
    }

    /// The trust domain identities are issued in (fixed at start).
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The current state, re-read first if a file changed (`compare`: or
    /// holds other content than was read, see [`LocalCluster`]).
    fn current(&self, compare: bool) -> Arc<LocalClusterState> {
        let state = self.state.load_full();
        if *self.changes.borrow() == state.generation && !(compare && state.sources_changed()) {
            return state;
        }
        let mut file_watch = self.watch.lock().unwrap_or_else(|p| p.into_inner());
        let latest = self.state.load_full();
        if !Arc::ptr_eq(&latest, &state) {
            return latest; // another caller reloaded meanwhile
        }
        let generation = file_watch.generation();
        let reloaded = match read_cluster_file(&self.path) {
            Ok((digest, file)) if file.trust_domain.as_str() == self.trust_domain.domain() => {
                tracing::debug!(path = %self.path.display(), "cluster file reloaded");
                state_of(
                    &file,
                    &self.trust_domain,
                    generation,
                    (self.path.clone(), digest),
                    &mut file_watch,
                )
            }
            Ok((digest, file)) => {
                tracing::warn!(
                    path = %self.path.display(),
                    new = file.trust_domain,
                    current = self.trust_domain.domain(),
                    "cluster file changed its trust domain; restart the identity service to adopt it; keeping the previous cluster state"
                );
                return self.keep_previous(&state, generation, digest);
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cluster file is invalid; keeping the previous cluster state until it is fixed");
                return self.keep_previous(&state, generation, content_digest(&self.path));
            }
        };
        let reloaded = Arc::new(reloaded);
        self.state.store(reloaded.clone());
        reloaded
    }

    /// Keeps the callers and placements of `old`, remembering the rejected
    /// version so that it is not re-parsed on every call.
    fn keep_previous(
        &self,
        old: &LocalClusterState,
        generation: u64,
        cluster_digest: ContentDigest,
    ) -> Arc<LocalClusterState> {
        let mut sources = old.sources.clone();
        sources[0].1 = cluster_digest;
        let kept = Arc::new(LocalClusterState {
            generation,
            sources,
            callers: old.callers.clone(),
            placements: old.placements.clone(),
        });
        self.state.store(kept.clone());
        kept
    }
}

/// Reads the token files `file` names (watching each first) into a state.
fn state_of(
    file: &ClusterFile,
    trust_domain: &TrustDomain,
    generation: u64,
    cluster_source: (PathBuf, ContentDigest),
    file_watch: &mut FileWatch,
) -> LocalClusterState {
    let mut callers = HashMap::new();
    let mut sources = vec![cluster_source];
    let mut add = |path: &Path, caller: Caller| {
        if let Err(error) = file_watch.add([path]) {
            tracing::warn!(path = %path.display(), %caller, %error, "token file changes are seen only when a token is refused");
        }
        match std::fs::read(path) {
            Ok(content) => {
                sources.push((path.to_owned(), Some(Sha256::digest(&content).into())));
                let token = content.trim_ascii();
                if token.is_empty() {
                    tracing::warn!(path = %path.display(), %caller, "token file is empty; that caller cannot authenticate");
                } else if let Some(previous) = callers.insert(token_digest(token), caller.clone()) {
                    tracing::warn!(path = %path.display(), %caller, %previous, "two callers share a token; only the last one listed can authenticate with it");
                }
            }
            Err(e) => {
                sources.push((path.to_owned(), None));
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
    LocalClusterState {
        generation,
        sources,
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
        // A token file may have been (re)written just now.
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
        let runs = |state: &LocalClusterState| {
            state
                .placements
                .get(node)
                .is_some_and(|accounts| accounts.contains(&key))
        };
        // A refusal first compares the files: a pod may have been added just now.
        Ok(identity.trust_domain() == &self.trust_domain
            && (runs(&self.current(false)) || runs(&self.current(true))))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// node-0 with a token, running a meshed pod of ServiceAccount `web`
    /// when `with_web`.
    fn cluster_yaml(dir: &Path, with_web: bool) -> String {
        let web = if with_web {
            "  - { name: web-0, namespace: apps, serviceAccount: web, ip: 10.244.0.2, node: node-0, cgroup: /sys/fs/cgroup/auth-test/node-0/web-0 }\n"
        } else {
            ""
        };
        format!(
            "apiVersion: sealmesh.io/v1alpha1\nkind: Cluster\nname: auth-test\n\
             nodes:\n  - {{ name: node-0, ip: 172.18.0.2, podCidr: 10.244.0.0/24, cgroup: /sys/fs/cgroup/auth-test/node-0, tokenFile: {} }}\n\
             namespaces:\n  - {{ name: apps, labels: {{ sealmesh.io/mesh: enabled }} }}\n\
             pods:\n{web}",
            dir.join("node-0.token").display()
        )
    }

    /// Replaces `path` by rename, as `ClusterFile::save` and editors do.
    fn replace(path: &Path, content: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test]
    async fn a_pod_removed_by_an_atomic_replace_is_refused_once_the_event_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        std::fs::write(dir.path().join("node-0.token"), "node-0-token").unwrap();
        std::fs::write(&file, cluster_yaml(dir.path(), true)).unwrap();
        let cluster = LocalCluster::load(&file).unwrap();
        let web = cluster.trust_domain().identity("apps", "web").unwrap();
        assert!(cluster.node_runs_meshed("node-0", &web).await.unwrap());

        // An allowed call compares no contents: only the event tells it.
        replace(&file, &cluster_yaml(dir.path(), false));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while cluster.node_runs_meshed("node-0", &web).await.unwrap() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replaced cluster file was not seen"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_pod_or_token_written_just_before_the_call_is_seen_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        let token = dir.path().join("node-0.token");
        std::fs::write(&token, "node-0-token").unwrap();
        std::fs::write(&file, cluster_yaml(dir.path(), false)).unwrap();
        let cluster = LocalCluster::load(&file).unwrap();
        let web = cluster.trust_domain().identity("apps", "web").unwrap();
        assert!(!cluster.node_runs_meshed("node-0", &web).await.unwrap());

        replace(&file, &cluster_yaml(dir.path(), true));
        assert!(cluster.node_runs_meshed("node-0", &web).await.unwrap());

        std::fs::write(&token, "node-0-rotated").unwrap();
        assert_eq!(
            cluster.validate(b"node-0-rotated").await,
            Ok(Caller::Node("node-0".into()))
        );
        assert_eq!(
            cluster.validate(b"node-0-token").await,
            Err(AuthError::UnknownToken)
        );
    }

    #[test]
    fn an_invalid_version_keeps_the_state_and_is_parsed_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cluster.yaml");
        std::fs::write(dir.path().join("node-0.token"), "node-0-token").unwrap();
        std::fs::write(&file, cluster_yaml(dir.path(), true)).unwrap();
        let cluster = LocalCluster::load(&file).unwrap();
        let before = *cluster.changes.borrow();

        replace(
            &file,
            "apiVersion: sealmesh.io/v1alpha1\nkind: Cluster\nnodes: [oops\n",
        );
        // Once the file's event is in: a call before it would parse it again then.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while *cluster.changes.borrow() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "no event for the rewrite"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let kept = cluster.current(true);
        assert!(kept.placements.contains_key("node-0"));
        assert!(
            !kept.sources_changed(),
            "the rejected version is remembered"
        );
        assert!(Arc::ptr_eq(&kept, &cluster.current(true)));
    }
}
