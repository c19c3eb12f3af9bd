//! Which ServiceAccounts run on which node, from a cluster-wide pod watch.
//!
//! Only a small index is kept (pod → node and ServiceAccount, node → counts
//! per ServiceAccount), never the pod objects. Until the first list is in,
//! and before any denial, the API is asked directly (pods of the identity's
//! namespace on that node): a pod scheduled a moment ago may not have
//! reached the watch yet, and a denial must not come from stale data.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt as _,
    api::ListParams,
    runtime::{WatchStreamExt as _, watcher},
};
use sealmesh_common::identity::{Identity, TrustDomain};
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

/// The placement of a pod that holds (or will hold) its node: scheduled and
/// not terminated.
fn placement(pod: &Pod) -> Option<Placement> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.as_deref().filter(|n| !n.is_empty())?;
    if terminated_phase(pod).is_some() {
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

/// `namespace/name` of a pod: the index key.
fn pod_key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

#[derive(Debug, Default)]
struct PlacementIndex {
    pods: HashMap<String, Placement>,
    /// node → (namespace, ServiceAccount) → number of its pods there
    by_node: HashMap<String, HashMap<(String, String), usize>>,
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

    fn runs(&self, node: &str, account: &(String, String)) -> bool {
        self.by_node
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

    /// Watches every pod until `shutdown` resolves, re-listing after `410
    /// Gone` and backing off on errors (the watcher does both).
    pub async fn watch(self, shutdown: impl Future<Output = ()>) {
        // Any resourceVersion: the API server may answer the (large) list
        // from its watch cache; staleness is covered by re-checking denials.
        let config = watcher::Config::default().any_semantic();
        let events = watcher(Api::<Pod>::all(self.client.clone()), config).default_backoff();
        tokio::pin!(events, shutdown);
        // Pods listed since the last (re)start of the watch, swapped in whole
        // once the list is complete.
        let mut relisted: Option<PlacementIndex> = None;
        loop {
            let event = tokio::select! {
                () = &mut shutdown => return,
                event = events.next() => event,
            };
            match event {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pod watch failed; retrying with backoff (placements may be stale meanwhile; denials are re-checked with the API)");
                }
                Some(Ok(watcher::Event::Init)) => relisted = Some(PlacementIndex::default()),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    relisted.get_or_insert_default().apply(&pod);
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let fresh = relisted.take().unwrap_or_default();
                    tracing::debug!(
                        pods = fresh.pods.len(),
                        nodes = fresh.by_node.len(),
                        "pod placements listed"
                    );
                    *self.index.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                    self.synced.store(true, Ordering::Release);
                }
                Some(Ok(watcher::Event::Apply(pod))) => self.write().apply(&pod),
                Some(Ok(watcher::Event::Delete(pod))) => self.write().remove(&pod_key(&pod)),
            }
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, PlacementIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the API directly: pods of `account`'s namespace on `node`.
    async fn listed_on(&self, node: &str, account: &(String, String)) -> Result<bool, AuthError> {
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
    async fn node_runs(&self, node: &str, identity: &Identity) -> Result<bool, AuthError> {
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
                .runs(node, &account)
        {
            return Ok(true);
        }
        let listed = self.listed_on(node, &account).await?;
        if synced && listed {
            tracing::debug!(node, %identity, "pod placement not yet seen by the watch; the API confirmed it");
        }
        Ok(listed)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    use super::*;

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
        let mut index = PlacementIndex::default();
        index.apply(&pod("web-0", Some("n1"), Some("web"), "Running"));
        index.apply(&pod("web-1", Some("n1"), Some("web"), "Pending"));
        index.apply(&pod("unscheduled", None, Some("db"), "Pending"));
        index.apply(&pod("plain", Some("n2"), None, "Running"));
        assert!(index.runs("n1", &account("web")));
        assert!(!index.runs("n1", &account("db")));
        assert!(index.runs("n2", &account("default")));
        assert_eq!(index.by_node["n1"][&account("web")], 2);

        index.remove("shop/web-0");
        assert!(index.runs("n1", &account("web")));
        // A finished pod no longer holds its node.
        index.apply(&pod("web-1", Some("n1"), Some("web"), "Succeeded"));
        assert!(!index.runs("n1", &account("web")));
        index.remove("shop/plain");
        assert!(index.by_node.is_empty(), "{:?}", index.by_node);
        assert_eq!(index.pods.len(), 0);
    }

    #[test]
    fn a_pod_moving_accounts_is_counted_once() {
        let mut index = PlacementIndex::default();
        index.apply(&pod("p", Some("n1"), Some("a"), "Running"));
        index.apply(&pod("p", Some("n1"), Some("a"), "Running"));
        index.apply(&pod("p", Some("n1"), Some("b"), "Running"));
        assert!(!index.runs("n1", &account("a")));
        assert_eq!(index.by_node["n1"].len(), 1);
        assert_eq!(index.by_node["n1"][&account("b")], 1);
    }
}
