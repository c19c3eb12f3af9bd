//! What the Kubernetes-mode test binaries share: an in-process API server
//! with objects created the way the kubelet and the controllers would create
//! them, and kubelet-named pod cgroups under a private cgroup v2 subtree,
//! removed on drop.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::{
    fs,
    future::Future,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use sealmesh_common::authz;
use sealmesh_common::host;
use serde_json::json;

/// How long a test waits for the registry to see a change.
pub const CONVERGE: Duration = Duration::from_secs(15);

/// Polls `check` until it holds, or panics naming `what` after [`CONVERGE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {CONVERGE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private subtree of the host's cgroup v2 hierarchy standing in for a
/// node's cgroup root; every directory made under it is removed on drop
/// (cgroups go with rmdir, deepest first).
pub struct CgroupRoot {
    root: PathBuf,
}

impl CgroupRoot {
    pub fn new(name: &str) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the Kubernetes-mode tests need root to create cgroups"
        );
        let root = host::cgroup2_mount()
            .expect("cgroup2 is mounted")
            .join(format!("sealmesh-{name}-{:08x}", rand::random::<u32>()));
        fs::create_dir(&root).expect("create the test cgroup root");
        Self { root }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Creates the pod's cgroup as the kubelet's systemd driver names it.
    pub fn create_systemd(&self, qos: &str, uid: &str) -> PathBuf {
        let qos_slice = format!("kubepods-{qos}");
        let dir = self
            .root
            .join("kubepods.slice")
            .join(format!("{qos_slice}.slice"))
            .join(format!("{qos_slice}-pod{}.slice", uid.replace('-', "_")));
        fs::create_dir_all(&dir).expect("create a systemd-style pod cgroup");
        dir
    }

    /// Creates the pod's cgroup as the kubelet's cgroupfs driver names it.
    pub fn create_cgroupfs(&self, qos: &str, uid: &str) -> PathBuf {
        let dir = self
            .root
            .join("kubepods")
            .join(qos)
            .join(format!("pod{uid}"));
        fs::create_dir_all(&dir).expect("create a cgroupfs-style pod cgroup");
        dir
    }
}

impl Drop for CgroupRoot {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.root);
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Creates and reads back cluster objects with one client.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
}

impl Cluster {
    /// A fresh in-process API server, and the cluster writer on it.
    pub async fn start() -> (FakeApiServer, Cluster) {
        let server = FakeApiServer::start().await.unwrap();
        let cluster = Cluster {
            client: server.client(),
        };
        (server, cluster)
    }

    pub async fn node(&self, name: &str, internal_ip: Ipv4Addr) {
        let api: Api<Node> = Api::all(self.client.clone());
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": name } })).unwrap(),
        )
        .await
        .unwrap();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": { "addresses": [
                { "type": "Hostname", "address": name },
                { "type": "InternalIP", "address": internal_ip.to_string() },
            ] } })),
        )
        .await
        .unwrap();
    }

    pub async fn namespace(&self, name: &str, meshed: bool) {
        let labels = if meshed {
            json!({ "sealmesh.io/mesh": "enabled" })
        } else {
            json!({})
        };
        Api::<Namespace>::all(self.client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({ "metadata": { "name": name, "labels": labels } }))
                    .unwrap(),
            )
            .await
            .unwrap();
    }

    pub async fn label_namespace(&self, name: &str, value: Option<&str>) {
        Api::<Namespace>::all(self.client.clone())
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": { "labels": { "sealmesh.io/mesh": value } } })),
            )
            .await
            .unwrap();
    }

    /// Creates a pod (as a controller would, scheduled to `node`) and
    /// reports it Running with `ip` (as its kubelet would). Returns its UID.
    pub async fn running_pod(&self, spec: PodSpec<'_>) -> String {
        let uid = self.scheduled_pod(spec).await;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), spec.namespace);
        api.patch_status(
            spec.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "phase": "Running",
                "podIP": spec.ip.to_string(),
                "podIPs": [{ "ip": spec.ip.to_string() }],
                "conditions": [{ "type": "Ready", "status": "True" }],
            } })),
        )
        .await
        .unwrap();
        uid
    }

    /// Creates a pod scheduled to `node` that its kubelet has not reported
    /// on yet (no status, no address). Returns its UID.
    pub async fn scheduled_pod(&self, spec: PodSpec<'_>) -> String {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), spec.namespace);
        let annotations = if spec.opted_out {
            json!({ "sealmesh.io/mesh": "disabled" })
        } else {
            json!({})
        };
        let created = api
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": spec.name, "annotations": annotations },
                    "spec": {
                        "nodeName": spec.node,
                        "serviceAccountName": spec.service_account,
                        "hostNetwork": spec.host_network,
                        "containers": [{ "name": "app", "image": "testapp" }],
                    },
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        created.metadata.uid.expect("the server sets metadata.uid")
    }

    pub async fn delete_pod(&self, namespace: &str, name: &str) {
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }

    pub async fn service(
        &self,
        namespace: &str,
        name: &str,
        cluster_ip: Ipv4Addr,
        ports: serde_json::Value,
    ) {
        Api::<Service>::namespaced(self.client.clone(), namespace)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": name },
                    "spec": { "clusterIP": cluster_ip.to_string(), "ports": ports },
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }

    /// An EndpointSlice of `service` as the endpoint controller writes it.
    pub async fn endpoint_slice(
        &self,
        namespace: &str,
        name: &str,
        service: &str,
        endpoints: serde_json::Value,
        ports: serde_json::Value,
    ) {
        Api::<EndpointSlice>::namespaced(self.client.clone(), namespace)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": { "name": name, "labels": { "kubernetes.io/service-name": service } },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": ports,
                }))
                .unwrap(),
            )
            .await
            .unwrap();
    }

    pub async fn patch_endpoint_slice(
        &self,
        namespace: &str,
        name: &str,
        patch: serde_json::Value,
    ) {
        Api::<EndpointSlice>::namespaced(self.client.clone(), namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap();
    }

    pub async fn trust_roots(&self, namespace: &str, bundle: &str) {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let config_map: ConfigMap = serde_json::from_value(json!({
            "metadata": { "name": "sealmesh-identity-trust-roots" },
            "data": { "ca-bundle.crt": bundle },
        }))
        .unwrap();
        if api
            .get_opt("sealmesh-identity-trust-roots")
            .await
            .unwrap()
            .is_some()
        {
            api.patch(
                "sealmesh-identity-trust-roots",
                &PatchParams::default(),
                &Patch::Merge(json!({ "data": { "ca-bundle.crt": bundle } })),
            )
            .await
            .unwrap();
        } else {
            api.create(&PostParams::default(), &config_map)
                .await
                .unwrap();
        }
    }
}

/// A pod as a test describes it.
#[derive(Clone, Copy)]
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub service_account: &'a str,
    pub node: &'a str,
    pub ip: Ipv4Addr,
    pub opted_out: bool,
    pub host_network: bool,
}

impl<'a> PodSpec<'a> {
    pub fn new(
        namespace: &'a str,
        name: &'a str,
        service_account: &'a str,
        node: &'a str,
        ip: [u8; 4],
    ) -> Self {
        Self {
            namespace,
            name,
            service_account,
            node,
            ip: Ipv4Addr::from(ip),
            opted_out: false,
            host_network: false,
        }
    }
}

pub fn crd_resource() -> ApiResource {
    ApiResource {
        group: "apiextensions.k8s.io".into(),
        version: "v1".into(),
        api_version: "apiextensions.k8s.io/v1".into(),
        kind: "CustomResourceDefinition".into(),
        plural: "customresourcedefinitions".into(),
    }
}

pub fn policy_resource() -> ApiResource {
    ApiResource {
        group: authz::API_GROUP.into(),
        version: authz::API_VERSION.into(),
        api_version: format!("{}/{}", authz::API_GROUP, authz::API_VERSION),
        kind: authz::KIND.into(),
        plural: authz::PLURAL.into(),
    }
}

/// Creates a minimal CustomResourceDefinition of AuthorizationPolicy (the
/// spec unvalidated, so the test can store specs this agent cannot read) and
/// waits until the server serves the resource.
pub async fn install_policy_crd(cluster: &Cluster) {
    let crd: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": format!("{}.{}", authz::PLURAL, authz::API_GROUP) },
        "spec": {
            "group": authz::API_GROUP,
            "scope": "Namespaced",
            "names": {
                "plural": authz::PLURAL,
                "singular": "authorizationpolicy",
                "kind": authz::KIND,
                "listKind": format!("{}List", authz::KIND),
            },
            "versions": [{
                "name": authz::API_VERSION,
                "served": true,
                "storage": true,
                "schema": { "openAPIV3Schema": {
                    "type": "object",
                    "properties": { "spec": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": true,
                    } },
                } },
            }],
        },
    }))
    .unwrap();
    Api::<DynamicObject>::all_with(cluster.client.clone(), &crd_resource())
        .create(&PostParams::default(), &crd)
        .await
        .expect("the API server takes the AuthorizationPolicy CustomResourceDefinition");
    let policies = Api::<DynamicObject>::all_with(cluster.client.clone(), &policy_resource());
    eventually("the API server to serve AuthorizationPolicies", || async {
        policies.list(&ListParams::default()).await.is_ok()
    })
    .await;
}
