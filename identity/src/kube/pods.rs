//! Which ServiceAccounts run meshed pods on which node, from cluster-wide
//! pod and namespace watches.
//!
//! Only a small index is kept (pod → node and ServiceAccount, node → counts
//! per ServiceAccount, for pods that did not opt out; the meshed
//! namespaces), never the objects. Until both first lists are in, and before
//! any denial, the API is asked directly (the identity's namespace, and its
//! pods on that node): a pod scheduled or a namespace labelled a moment ago
//! may not have reached the watches yet, and a denial must not come from
//! stale data.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client, ResourceExt as _,
    api::ListParams,
    runtime::{WatchStreamExt as _, watcher},
};
use sealmesh_common::{
    consts::{MESH_LABEL, MESH_OPT_OUT_ANNOTATION},
    identity::{Identity, TrustDomain},
    mesh,
};
use tonic::async_trait;

use crate::auth::{AuthError, WorkloadDirectory};

/// ServiceAccount a pod runs as when its spec names none.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Where one pod runs and as whom.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Placement {
    node: String,
    account: (String, String),
}

/// The placement of a pod that holds (or will hold) its node and may be
/// meshed: scheduled, not terminated, not opted out. (Whether its namespace
/// meshes it is the other half of the rule.)
fn placement(pod: &Pod) -> Option<Placement> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    if terminated_phase(pod).is_some() {
        return None;
    }
    let annotation = pod
        .annotations()
        .get(MESH_OPT_OUT_ANNOTATION)
        .map(String::as_str);
    if mesh::pod_opted_out(annotation) {
        return None;
    }
    let account = spec
        .service_account_name
        .as_deref()
        .filter(|sa| !sa.is_empty())
        .unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    Some(Placement {
        node: node.to_owned(),
        account: (pod.namespace().unwrap_or_default(), account.to_owned()),
    })
}

/// The phase of a pod whose containers have all stopped for good, if it has.
pub(super) fn terminated_phase(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .filter(|phase| matches!(*phase, "Succeeded" | "Failed"))
}

/// Whether a namespace meshes its pods (its mesh label).
fn namespace_meshed(namespace: &Namespace) -> bool {
    mesh::namespace_is_meshed(namespace.labels().get(MESH_LABEL).map(String::as_str))
}

/// `namespace/name` of a pod: the index key.
fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

#[derive(Debug, Default)]
struct PlacementIndex {
    pods: HashMap<String, Placement>,
    /// node → (namespace, ServiceAccount) → number of its pods there
    by_node: HashMap<String, HashMap<(String, String), usize>>,
    /// Namespaces labelled to be meshed.
    meshed_namespaces: HashSet<String>,
}

impl PlacementIndex {
    fn apply(&mut self, pod: &Pod) {
        let key = pod_key(pod);
        match placement(pod) {
            Some(new) => {
                if self.pods.get(&key) == Some(&new) {
                    return;
                }
                self.remove(&key);
                *self
                    .by_node
                    .entry(new.node.clone())
                    .or_default()
                    .entry(new.account.clone())
                    .or_default() += 1;
                self.pods.insert(key, new);
            }
            None => self.remove(&key),
        }
    }

    fn remove(&mut self, key: &str) {
        let Some(old) = self.pods.remove(key) else {
            return;
        };
        if let Some(accounts) = self.by_node.get_mut(&old.node) {
            if let Some(count) = accounts.get_mut(&old.account) {
                *count -= 1;
                if *count == 0 {
                    accounts.remove(&old.account);
                }
            }
            if accounts.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
    }

    fn namespace_changed(&mut self, namespace: &Namespace) {
        let name = namespace.name_any();
        if namespace_meshed(namespace) {
            self.meshed_namespaces.insert(name);
        } else {
            self.meshed_namespaces.remove(&name);
        }
    }

    /// Whether `node` runs a meshed pod of `account`.
    fn runs_meshed(&self, node: &str, account: &(String, String)) -> bool {
        self.meshed_namespaces.contains(&account.0)
            && self
                .by_node
                .get(node)
                .is_some_and(|accounts| accounts.contains_key(account))
    }
}

/// [`WorkloadDirectory`] over the Kubernetes API. Clones share one index;
/// [`KubeWorkloadDirectory::watch`] keeps it current.
#[derive(Clone)]
pub struct KubeWorkloadDirectory {
    client: Client,
    trust_domain: TrustDomain,
    index: Arc<RwLock<PlacementIndex>>,
    /// Both first lists (pods, namespaces) are in.
    synced: Arc<AtomicBool>,
}

impl std::fmt::Debug for KubeWorkloadDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeWorkloadDirectory")
            .field("trust_domain", &self.trust_domain)
            .field("synced", &self.synced.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl KubeWorkloadDirectory {
    pub fn new(client: Client, trust_domain: TrustDomain) -> Self {
        Self {
            client,
            trust_domain,
            index: Arc::default(),
            synced: Arc::default(),
        }
    }

    /// Watches every pod and namespace until `shutdown` resolves, re-listing
    /// after `410 Gone` and backing off on errors (the watchers do both).
    pub async fn watch(self, shutdown: impl Future<Output = ()>) {
        // Any resourceVersion: the API server may answer the (large) lists
        // from its watch cache; staleness is covered by re-checking denials.
        let config = || watcher::Config::default().any_semantic();
        let pods = watcher(Api::<Pod>::all(self.client.clone()), config()).default_backoff();
        let namespaces =
            watcher(Api::<Namespace>::all(self.client.clone()), config()).default_backoff();
        tokio::pin!(pods, namespaces, shutdown);
        // Objects listed since the last (re)start of a watch, swapped in
        // whole once its list is complete.
        let mut relisted_pods: Option<PlacementIndex> = None;
        let mut relisted_namespaces: Option<HashSet<String>> = None;
        let (mut pods_synced, mut namespaces_synced) = (false, false);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                event = pods.next() => match event {
                    None => return,
                    Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying with backoff (placements may be stale meanwhile; denials are re-checked with the API)"),
                    Some(Ok(watcher::Event::Init)) => relisted_pods = Some(PlacementIndex::default()),
                    Some(Ok(watcher::Event::InitApply(pod))) => {
                        relisted_pods.get_or_insert_default().apply(&pod);
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        let fresh = relisted_pods.take().unwrap_or_default();
                        tracing::debug!(
                            pods = fresh.pods.len(),
                            nodes = fresh.by_node.len(),
                            "pod placements listed"
                        );
                        let mut index = self.write();
                        index.pods = fresh.pods;
                        index.by_node = fresh.by_node;
                        pods_synced = true;
                    }
                    Some(Ok(watcher::Event::Apply(pod))) => self.write().apply(&pod),
                    Some(Ok(watcher::Event::Delete(pod))) => self.write().remove(&pod_key(&pod)),
                },
                event = namespaces.next() => match event {
                    None => return,
                    Some(Err(e)) => tracing::warn!(error = %e, "namespace watch failed; retrying with backoff (mesh labels may be stale meanwhile; denials are re-checked with the API)"),
                    Some(Ok(watcher::Event::Init)) => relisted_namespaces = Some(HashSet::new()),
                    Some(Ok(watcher::Event::InitApply(namespace))) => {
                        if namespace_meshed(&namespace) {
                            relisted_namespaces
                                .get_or_insert_default()
                                .insert(namespace.name_any());
                        }
                    }
                    Some(Ok(watcher::Event::InitDone)) => {
                        let fresh = relisted_namespaces.take().unwrap_or_default();
                        tracing::debug!(meshed = fresh.len(), "meshed namespaces listed");
                        self.write().meshed_namespaces = fresh;
                        namespaces_synced = true;
                    }
                    Some(Ok(watcher::Event::Apply(namespace))) => {
                        self.write().namespace_changed(&namespace);
                    }
                    Some(Ok(watcher::Event::Delete(namespace))) => {
                        self.write().meshed_namespaces.remove(&namespace.name_any());
                    }
                },
            }
            self.synced
                .store(pods_synced && namespaces_synced, Ordering::Release);
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PlacementIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the API directly: is `account`'s namespace meshed, and does it
    /// have a pod of `account` on `node` that did not opt out.
    async fn confirmed_by_api(
        &self,
        node: &str,
        account: &(String, String),
    ) -> Result<bool, AuthError> {
        let namespace = Api::<Namespace>::all(self.client.clone())
            .get_opt(&account.0)
            .await
            .map_err(|e| {
                AuthError::Unavailable(format!("cannot read namespace {}: {e}", account.0))
            })?;
        if !namespace.as_ref().is_some_and(namespace_meshed) {
            return Ok(false);
        }
        let pods = Api::<Pod>::namespaced(self.client.clone(), &account.0)
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| {
                AuthError::Unavailable(format!(
                    "cannot list pods of namespace {} on node {node}: {e}",
                    account.0
                ))
            })?;
        Ok(pods
            .items
            .iter()
            .filter_map(placement)
            .any(|p| p.node == node && p.account == *account))
    }
}

#[async_trait]
impl WorkloadDirectory for KubeWorkloadDirectory {
    async fn node_runs_meshed(&self, node: &str, identity: &Identity) -> Result<bool, AuthError> {
        if identity.trust_domain() != &self.trust_domain {
            return Ok(false);
        }
        let account = (
            identity.namespace().to_owned(),
            identity.service_account().to_owned(),
        );
        let synced = self.synced.load(Ordering::Acquire);
        if synced
            && self
                .index
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .runs_meshed(node, &account)
        {
            return Ok(true);
        }
        let confirmed = self.confirmed_by_api(node, &account).await?;
        if synced && confirmed {
            tracing::debug!(node, %identity, "meshed pod not yet seen by the watches; the API confirmed it");
        }
        Ok(confirmed)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;
    use sealmesh_common::consts::{MESH_LABEL_ENABLED, MESH_OPT_OUT_VALUE};

    use super::*;

    fn namespace(name: &str, label: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: label.map(|value| [(MESH_LABEL.to_owned(), value.to_owned())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// An index whose namespace `shop` is meshed.
    fn meshed_index() -> PlacementIndex {
        let mut index = PlacementIndex::default();
        index.namespace_changed(&namespace("shop", Some(MESH_LABEL_ENABLED)));
        index
    }

    fn pod(name: &str, node: Option<&str>, sa: Option<&str>, phase: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                service_account_name: sa.map(Into::into),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                ..Default::default()
            }),
        }
    }

    fn account(sa: &str) -> (String, String) {
        ("shop".into(), sa.into())
    }

    #[test]
    fn index_counts_pods_per_node_and_account_and_forgets_them() {
        let mut index = meshed_index();
        index.apply(&pod("web-0", Some("n1"), Some("web"), "Running"));
        index.apply(&pod("web-1", Some("n1"), Some("web"), "Pending"));
        index.apply(&pod("unscheduled", None, Some("db"), "Pending"));
        index.apply(&pod("plain", Some("n2"), None, "Running"));
        assert!(index.runs_meshed("n1", &account("web")));
        assert!(!index.runs_meshed("n1", &account("db")));
        assert!(index.runs_meshed("n2", &account("default")));
        assert_eq!(index.by_node["n1"][&account("web")], 2);

        index.remove("shop/web-0");
        assert!(index.runs_meshed("n1", &account("web")));
        // A finished pod no longer holds its node.
        index.apply(&pod("web-1", Some("n1"), Some("web"), "Succeeded"));
        assert!(!index.runs_meshed("n1", &account("web")));
        index.remove("shop/plain");
        assert!(index.by_node.is_empty(), "{:?}", index.by_node);
        assert_eq!(index.pods.len(), 0);
    }

    #[test]
    fn a_pod_moving_accounts_is_counted_once() {
        let mut index = meshed_index();
        index.apply(&pod("p", Some("n1"), Some("a"), "Running"));
        index.apply(&pod("p", Some("n1"), Some("a"), "Running"));
        index.apply(&pod("p", Some("n1"), Some("b"), "Running"));
        assert!(!index.runs_meshed("n1", &account("a")));
        assert_eq!(index.by_node["n1"].len(), 1);
        assert_eq!(index.by_node["n1"][&account("b")], 1);
    }

    #[test]
    fn only_pods_of_meshed_namespaces_that_did_not_opt_out_count() {
        let mut index = PlacementIndex::default();
        index.apply(&pod("web-0", Some("n1"), Some("web"), "Running"));
        assert!(
            !index.runs_meshed("n1", &account("web")),
            "namespace not labelled"
        );
        index.namespace_changed(&namespace("shop", Some(MESH_LABEL_ENABLED)));
        assert!(index.runs_meshed("n1", &account("web")));
        index.namespace_changed(&namespace("shop", Some("disabled")));
        assert!(!index.runs_meshed("n1", &account("web")), "label changed");
        index.namespace_changed(&namespace("shop", Some(MESH_LABEL_ENABLED)));

        let mut opted_out = pod("web-0", Some("n1"), Some("web"), "Running");
        opted_out.metadata.annotations = Some(
            [(
                MESH_OPT_OUT_ANNOTATION.to_owned(),
                MESH_OPT_OUT_VALUE.to_owned(),
            )]
            .into(),
        );
        index.apply(&opted_out);
        assert!(!index.runs_meshed("n1", &account("web")), "pod opted out");
        assert!(index.pods.is_empty());
    }
}
