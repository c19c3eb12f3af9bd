//! The testbed's Kubernetes mode against the in-process fake API server
//! (root, real network namespaces and cgroups): the objects a kubelet and the
//! controllers would write, kubelet-named pod cgroups, component credentials,
//! and the API relay from node and underlay namespaces.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::Deployment,
    authentication::v1::TokenReview,
    core::v1::{ConfigMap, Namespace, Node, Pod, Secret, Service, ServiceAccount},
    discovery::v1::EndpointSlice,
    rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    api::{
        ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams, WatchEvent,
        WatchParams,
    },
    config::{KubeConfigOptions, Kubeconfig},
};
use sealmesh_common::{
    authz::{self, AuthorizationPolicy},
    cluster::{ClusterFile, Service as ClusterService, ServicePort},
    consts::kube::{
        AGENT_SERVICE_ACCOUNT, ENDPOINTSLICE_SERVICE_LABEL, IDENTITY_NAME, IDENTITY_TOKEN_AUDIENCE,
        ISSUER_SECRET, TOKEN_EXTRA_POD_NAME, TOKEN_EXTRA_POD_UID, TRUST_ROOTS_CONFIGMAP,
        TRUST_ROOTS_KEY,
    },
    consts::{INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT, MESH_LABEL, MESH_LABEL_ENABLED},
};
use sealmesh_pki::{self as pki, CaSpec, Layout};
use serde_json::json;
mod kube_support;
mod support;

use kube_support::HttpsFakeServer;
use xtask::{
    mesh::{Mesh, MeshOptions},
    testbed::{
        PodSpec, Testbed, TestbedSpec, cgroup,
        kube::{CgroupDriver, KubeCluster, KubeMode, KubePki},
    },
};

const APP_NS: &str = "shop";
const PLAIN_NS: &str = "legacy";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

const CRD_NAME: &str = "authorizationpolicies.sealmesh.io";

/// An AuthorizationPolicy with this spec (YAML).
fn policy(namespace: &str, name: &str, spec: &str) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: name.into(),
        namespace: namespace.into(),
        annotations: BTreeMap::new(),
        spec: serde_yaml_ng::from_str(spec).unwrap(),
    }
}

/// node-0: shop/client; node-1: shop/server (behind Service `server`),
/// legacy/plain (ServiceAccount `default`), and shop/late (also `app=server`,
/// laid out but created in the API only when a test asks). `shop` is strict
/// by annotation; `shop/server` is permissive by its own. Two authorization
/// policies: the server admits the client's identity; a cluster-wide one
/// (control namespace) would refuse plaintext, as a dry run.
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace_annotation(APP_NS, INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT)
        .namespace(PLAIN_NS, &[])
        .pod(PodSpec::new(APP_NS, "client", "client", 0).label("app", "client"))
        .pod(
            PodSpec::new(APP_NS, "server", "server", 1)
                .label("app", "server")
                .annotation(INBOUND_POLICY_ANNOTATION, "permissive"),
        )
        .pod(PodSpec::new(PLAIN_NS, "plain", "default", 1).label("app", "plain"))
        .pod(PodSpec::new(APP_NS, "late", "server", 1).label("app", "server"))
        .service(ClusterService {
            name: "server".into(),
            namespace: APP_NS.into(),
            vip: VIP,
            ports: vec![ServicePort {
                name: None,
                port: 80,
                target_port: 8080,
            }],
            selector: BTreeMap::from([("app".into(), "server".into())]),
        })
        .authorization_policy(policy(
            APP_NS,
            "server-from-client",
            "{ selector: { matchLabels: { app: server } }, rules: [{ from: [{ source: { principals: [cluster.local/ns/shop/sa/client] } }] }] }",
        ))
        .authorization_policy(AuthorizationPolicy {
            annotations: BTreeMap::from([(
                authz::DRY_RUN_ANNOTATION.into(),
                authz::DRY_RUN_VALUE.into(),
            )]),
            ..policy(
                "sealmesh",
                "require-mtls",
                "{ action: DENY, rules: [{ from: [{ source: { notPrincipals: ['*'] } }] }] }",
            )
        })
}

fn policy_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(authz::API_GROUP, authz::API_VERSION, authz::KIND),
        authz::PLURAL,
    )
}

fn sorted(mut policies: Vec<AuthorizationPolicy>) -> Vec<AuthorizationPolicy> {
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    policies
}

/// The AuthorizationPolicy objects of the server, read back as the cluster
/// file holds policies, sorted by namespace and name.
async fn policies_in_api(client: &Client) -> Vec<AuthorizationPolicy> {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &policy_resource());
    let policies = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|object| AuthorizationPolicy {
            name: object.name_any(),
            namespace: object.namespace().unwrap(),
            annotations: object.annotations().clone(),
            spec: serde_json::from_value(object.data["spec"].clone()).unwrap(),
        })
        .collect();
    sorted(policies)
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

struct Pki {
    anchors: Vec<u8>,
    issuer: pki::CaMaterial,
}

fn pki() -> Pki {
    let root = pki::generate_root(&CaSpec::valid_for(
        "root.test",
        std::time::Duration::from_secs(3600),
    ))
    .unwrap();
    let (issuer, _) = pki::generate_issuer(
        &root.material(),
        &CaSpec::valid_for("issuer.test", std::time::Duration::from_secs(3600)),
    )
    .unwrap();
    let mut issuer_material = issuer.material();
    issuer_material.ca_pem = Some(issuer.ca_pem.into_bytes());
    Pki {
        anchors: root.cert_pem.into_bytes(),
        issuer: issuer_material,
    }
}

fn start(driver: CgroupDriver) -> (KubeCluster, Testbed, Pki) {
    let mut testbed = Testbed::up_for_kubelet(&spec()).expect("testbed up");
    let pki = pki();
    let mode = KubeMode {
        cgroup_driver: driver,
        pending_pods: vec![(APP_NS.into(), "late".into())],
        ..KubeMode::fake()
    };
    let kube = KubeCluster::start(
        &mut testbed,
        mode,
        &KubePki {
            trust_anchors_pem: &pki.anchors,
            issuer: &pki.issuer,
            issuer_layout: Layout::Tls,
        },
    )
    .expect("registered with the fake API server");
    (kube, testbed, pki)
}

fn get<K>(kube: &KubeCluster, namespace: Option<&str>, name: &str) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(kube.client(), namespace.unwrap_or_default());
    kube.block_on(api.get(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn get_cluster<K>(kube: &KubeCluster, name: &str) -> K
where
    K: kube::Resource<Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(kube.client());
    kube.block_on(api.get(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// (addresses, ready, nodeName, targetRef name) of the Service's slice, and its ports.
fn endpoint_slice(kube: &KubeCluster) -> (EndpointSlice, Vec<(String, bool, String, String)>) {
    let api: Api<EndpointSlice> = Api::namespaced(kube.client(), APP_NS);
    let mut slices = kube
        .block_on(
            api.list(
                &ListParams::default().labels(&format!("{ENDPOINTSLICE_SERVICE_LABEL}=server")),
            ),
        )
        .unwrap()
        .items;
    assert_eq!(slices.len(), 1, "one slice per Service: {slices:?}");
    let slice = slices.remove(0);
    let endpoints = slice
        .endpoints
        .iter()
        .map(|e| {
            let target = e.target_ref.as_ref().unwrap();
            (
                e.addresses.join(","),
                e.conditions.as_ref().and_then(|c| c.ready) == Some(true),
                e.node_name.clone().unwrap_or_default(),
                target.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    (slice, endpoints)
}

/// A client for `kubeconfig` built and used inside network namespace `netns`
/// (so its connections start there): lists pods of `shop` and returns their names.
fn pods_seen_from(testbed: &Testbed, netns: &str, kubeconfig: &Path) -> Vec<String> {
    let kubeconfig = kubeconfig.to_owned();
    testbed
        .run_in_netns(netns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let config = kube::Config::from_custom_kubeconfig(
                    Kubeconfig::read_from(&kubeconfig).unwrap(),
                    &KubeConfigOptions::default(),
                )
                .await
                .unwrap();
                let client = Client::try_from(config).unwrap();
                let pods: Api<Pod> = Api::namespaced(client, APP_NS);
                let mut names: Vec<String> = pods
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .map(|p| p.name_any())
                    .collect();
                names.sort();
                names
            })
        })
        .unwrap()
}

fn relative_to_mount(path: &Path) -> String {
    let mount = sealmesh_common::host::cgroup2_mount().unwrap();
    format!("/{}", path.strip_prefix(&mount).unwrap().display())
}

#[test]
fn registers_the_testbed_as_kubelets_and_controllers_would() {
    let (mut kube, mut testbed, pki) = start(CgroupDriver::Systemd);

    // Namespaces with the cluster file's mesh labels.
    let shop: Namespace = get_cluster(&kube, APP_NS);
    assert_eq!(
        shop.labels().get(MESH_LABEL).map(String::as_str),
        Some(MESH_LABEL_ENABLED)
    );
    // ... and annotations (the inbound policy the agents read).
    assert_eq!(
        shop.annotations()
            .get(INBOUND_POLICY_ANNOTATION)
            .map(String::as_str),
        Some(INBOUND_POLICY_STRICT)
    );
    let legacy: Namespace = get_cluster(&kube, PLAIN_NS);
    assert_eq!(legacy.labels().get(MESH_LABEL), None);
    assert_eq!(legacy.annotations().get(INBOUND_POLICY_ANNOTATION), None);
    let _: Namespace = get_cluster(&kube, "sealmesh");

    // deploy/base's CRD, Established, and the cluster file's policies as
    // its objects (annotations and all).
    let crd: CustomResourceDefinition = get_cluster(&kube, CRD_NAME);
    assert!(established(&crd), "{:?}", crd.status);
    assert_eq!(
        kube.block_on(policies_in_api(&kube.client())),
        sorted(testbed.cluster().authorization_policies.clone())
    );
    let server: Pod = get(&kube, Some(APP_NS), "server");
    assert_eq!(
        server
            .annotations()
            .get(INBOUND_POLICY_ANNOTATION)
            .map(String::as_str),
        Some("permissive"),
        "pod annotations reach the API"
    );

    // ServiceAccounts, including `default`, which no controller makes here.
    for (ns, sa) in [
        ("sealmesh", AGENT_SERVICE_ACCOUNT),
        ("sealmesh", IDENTITY_NAME),
        (APP_NS, "client"),
        (APP_NS, "server"),
        (PLAIN_NS, "default"),
    ] {
        let account: ServiceAccount = get(&kube, Some(ns), sa);
        assert_eq!(account.name_any(), sa);
    }
    // deploy/base RBAC, applied as it is.
    let _: ClusterRole = get_cluster(&kube, AGENT_SERVICE_ACCOUNT);
    let _: ClusterRoleBinding = get_cluster(&kube, AGENT_SERVICE_ACCOUNT);
    let _: Role = get(&kube, Some("sealmesh"), AGENT_SERVICE_ACCOUNT);
    let _: RoleBinding = get(&kube, Some("sealmesh"), AGENT_SERVICE_ACCOUNT);
    let _: ClusterRole = get_cluster(&kube, IDENTITY_NAME);

    // Nodes: InternalIP = underlay IP, Ready.
    for (name, ip) in [("node-0", "172.18.0.2"), ("node-1", "172.18.0.3")] {
        let node: Node = get_cluster(&kube, name);
        let status = node.status.unwrap();
        let addresses: Vec<(String, String)> = status
            .addresses
            .unwrap()
            .into_iter()
            .map(|a| (a.type_, a.address))
            .collect();
        assert_eq!(
            addresses,
            [
                ("InternalIP".to_owned(), ip.to_owned()),
                ("Hostname".to_owned(), name.to_owned())
            ]
        );
        let ready: Vec<(String, String)> = status
            .conditions
            .unwrap()
            .into_iter()
            .map(|c| (c.type_, c.status))
            .collect();
        assert_eq!(ready, [("Ready".to_owned(), "True".to_owned())]);
    }

    // Pods: bound to their node, with the status a kubelet reports.
    let client: Pod = get(&kube, Some(APP_NS), "client");
    let spec = client.spec.clone().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some("node-0"));
    assert_eq!(spec.service_account_name.as_deref(), Some("client"));
    let status = client.status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.0.2"));
    assert_eq!(status.host_ip.as_deref(), Some("172.18.0.2"));
    assert_eq!(condition(&client, "Ready").as_deref(), Some("True"));
    assert_eq!(
        condition(&client, "ContainersReady").as_deref(),
        Some("True")
    );
    let container = &status.container_statuses.unwrap()[0];
    assert!(container.ready, "{container:?}");
    assert!(
        container
            .container_id
            .as_deref()
            .unwrap()
            .starts_with("containerd://")
    );
    let pods: Api<Pod> = Api::namespaced(kube.client(), APP_NS);
    let late = kube.block_on(pods.get_opt("late")).unwrap();
    assert!(late.is_none(), "pending pods wait for create_pod: {late:?}");

    // Agent pods (host network) and the identity Deployment.
    let agent: Pod = get(&kube, Some("sealmesh"), "sealmesh-agent-node-1");
    assert_eq!(
        agent.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node-1")
    );
    assert_eq!(agent.spec.as_ref().unwrap().host_network, Some(true));
    assert_eq!(
        agent.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("172.18.0.3")
    );
    let _: Deployment = get(&kube, Some("sealmesh"), IDENTITY_NAME);

    // Service with the testbed's VIP and its EndpointSlice.
    let service: Service = get(&kube, Some(APP_NS), "server");
    assert_eq!(
        service.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("10.96.0.10")
    );
    let (slice, endpoints) = endpoint_slice(&kube);
    assert_eq!(slice.address_type, "IPv4");
    assert_eq!(
        endpoints,
        [(
            "10.244.1.2".to_owned(),
            true,
            "node-1".to_owned(),
            "server".to_owned()
        )]
    );
    let server_uid = kube.pod(APP_NS, "server").unwrap().uid.clone();
    assert_eq!(
        slice.endpoints[0]
            .target_ref
            .as_ref()
            .unwrap()
            .uid
            .as_deref(),
        Some(server_uid.as_str())
    );
    let ports: Vec<(Option<String>, Option<i32>, Option<String>)> = slice
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.port, p.protocol))
        .collect();
    assert_eq!(
        ports,
        [(Some(String::new()), Some(8080), Some("TCP".into()))]
    );

    // PKI objects.
    let roots: ConfigMap = get(&kube, Some("sealmesh"), TRUST_ROOTS_CONFIGMAP);
    assert_eq!(
        roots.data.unwrap()[TRUST_ROOTS_KEY].as_bytes(),
        &pki.anchors[..]
    );
    let issuer: Secret = get(&kube, Some("sealmesh"), ISSUER_SECRET);
    assert_eq!(issuer.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = issuer.data.unwrap();
    assert_eq!(data["tls.crt"].0, pki.issuer.cert_pem);
    assert_eq!(data["tls.key"].0, pki.issuer.key_pem);
    assert_eq!(Some(&data["ca.crt"].0), pki.issuer.ca_pem.as_ref());

    // Pod cgroups: kubelet naming from the API's UID, processes in a child
    // container cgroup, which the cluster file records.
    let node1 = testbed.cluster().node("node-1").unwrap().cgroup.clone();
    let registered = kube.pod(APP_NS, "server").unwrap().clone();
    assert_eq!(
        registered.pod_cgroup,
        node1.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            server_uid.replace('-', "_")
        ))
    );
    assert_eq!(
        registered.container_cgroup.parent(),
        Some(&*registered.pod_cgroup)
    );
    let container_dir = registered
        .container_cgroup
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        container_dir.starts_with("cri-containerd-") && container_dir.ends_with(".scope"),
        "{container_dir}"
    );
    assert_eq!(
        testbed.cluster().pod(APP_NS, "server").unwrap().cgroup,
        registered.container_cgroup
    );
    let sleeper = testbed
        .spawn_in_pod(APP_NS, "server", {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            cmd
        })
        .unwrap();
    assert_eq!(
        cgroup::of_process(sleeper.id()).unwrap(),
        relative_to_mount(&registered.container_cgroup)
    );
    drop(sleeper);

    // The agent's identity token: bound to its pod, audience identity.sealmesh.io.
    let token = support::node_token(&testbed, "node-0");
    let agent0: Pod = get(&kube, Some("sealmesh"), "sealmesh-agent-node-0");
    let review: TokenReview = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": { "token": token, "audiences": [IDENTITY_TOKEN_AUDIENCE] },
    }))
    .unwrap();
    let reviews: Api<TokenReview> = Api::all(kube.client());
    let reviewed = kube
        .block_on(reviews.create(&PostParams::default(), &review))
        .unwrap()
        .status
        .unwrap();
    assert_eq!(reviewed.authenticated, Some(true), "{reviewed:?}");
    let user = reviewed.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:sealmesh:sealmesh-agent")
    );
    let extra = user.extra.unwrap();
    assert_eq!(extra[TOKEN_EXTRA_POD_NAME], ["sealmesh-agent-node-0"]);
    assert_eq!(extra[TOKEN_EXTRA_POD_UID], [agent0.uid().unwrap()]);

    // Components reach the API through the relay, from their namespaces.
    assert_eq!(kube.relay_addr(), SocketAddr::from(([172, 18, 0, 1], 6443)));
    let node0_ns = testbed.node_netns("node-0").unwrap().to_owned();
    assert_eq!(
        pods_seen_from(&testbed, &node0_ns, &kube.agent_kubeconfig("node-0")),
        ["client", "server"]
    );
    let underlay = testbed.underlay_netns();
    assert_eq!(
        pods_seen_from(&testbed, &underlay, &kube.identity_kubeconfig()),
        ["client", "server"]
    );

    // A pod created later: object and cgroups first (scheduled, its kubelet
    // has reported nothing, no EndpointSlice yet), then its status and its
    // EndpointSlice; then deleted.
    let scheduled = kube
        .schedule_pod(&mut testbed, APP_NS, "late")
        .unwrap()
        .clone();
    assert!(scheduled.container_cgroup.is_dir());
    assert!(!scheduled.running);
    let stored: Pod = get(&kube, Some(APP_NS), "late");
    assert_eq!(
        stored.spec.as_ref().unwrap().node_name.as_deref(),
        Some("node-1")
    );
    assert_eq!(
        stored.status.as_ref().and_then(|s| s.pod_ip.clone()),
        None,
        "no status before the kubelet reports one"
    );
    let (_, endpoints) = endpoint_slice(&kube);
    assert_eq!(endpoints.len(), 1, "a scheduled pod is no endpoint yet");
    let late = kube
        .report_running(&testbed, APP_NS, "late")
        .unwrap()
        .clone();
    assert!(late.running);
    assert_eq!(late.uid, scheduled.uid);
    let stored: Pod = get(&kube, Some(APP_NS), "late");
    assert_eq!(stored.uid().as_deref(), Some(late.uid.as_str()));
    assert_eq!(
        stored.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.244.1.4")
    );
    let (_, endpoints) = endpoint_slice(&kube);
    let names: Vec<&str> = endpoints.iter().map(|e| e.3.as_str()).collect();
    assert_eq!(names, ["server", "late"]);
    kube.delete_pod(&testbed, APP_NS, "late").unwrap();
    assert!(kube.block_on(pods.get_opt("late")).unwrap().is_none());
    assert!(!late.pod_cgroup.exists(), "kubelet removes the pod cgroup");
    let (_, endpoints) = endpoint_slice(&kube);
    let names: Vec<&str> = endpoints.iter().map(|e| e.3.as_str()).collect();
    assert_eq!(names, ["server"]);
}

#[test]
fn cgroupfs_driver_names_pod_cgroups_like_kubelet() {
    let (kube, testbed, _) = start(CgroupDriver::Cgroupfs);
    let node0: PathBuf = testbed.cluster().node("node-0").unwrap().cgroup.clone();
    let registered = kube.pod(APP_NS, "client").unwrap();
    assert_eq!(
        registered.pod_cgroup,
        node0.join(format!("kubepods/besteffort/pod{}", registered.uid))
    );
    let container = registered
        .container_cgroup
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(container.len(), 64, "a containerd id: {container}");
    assert!(registered.container_cgroup.is_dir());
}

#[test]
fn an_external_server_gets_the_same_objects_and_loses_them_on_drop() {
    external_server_round_trip(NamespaceController::Runs);
}

#[test]
fn without_a_namespace_controller_the_teardown_empties_namespaces_before_finalizing_them() {
    external_server_round_trip(NamespaceController::Absent);
}

#[derive(PartialEq, Eq)]
enum NamespaceController {
    Runs,
    /// A bare kube-apiserver: deleted namespaces stay Terminating, contents
    /// and all, until finalized.
    Absent,
}

/// `NAMESPACE/NAME` of every `K` the server still stores in `namespaces`.
async fn left_in<K>(client: &Client, namespaces: &[&str]) -> Vec<String>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|o| {
            let namespace = o.namespace()?;
            namespaces
                .contains(&namespace.as_str())
                .then(|| format!("{namespace}/{}", o.name_any()))
        })
        .collect()
}

fn external_server_round_trip(controller: NamespaceController) {
    // The fake server stands in for an external one: reached only through
    // its kubeconfig, as a real kube-apiserver would be.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let server = runtime
        .block_on(fake_apiserver::FakeApiServer::start())
        .unwrap();
    if controller == NamespaceController::Absent {
        server.stop_namespace_controller();
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("admin.kubeconfig");
    server
        .write_kubeconfig(&kubeconfig, &server.admin_token())
        .unwrap();

    // A server with the CRD already keeps it; one without gets it for the
    // testbed's life only.
    let crds: Api<CustomResourceDefinition> = {
        let _runtime = runtime.enter();
        Api::all(server.client())
    };
    if controller == NamespaceController::Absent {
        let crd: CustomResourceDefinition = serde_yaml_ng::from_str(
            &std::fs::read_to_string(
                xtask::testbed::kube::deploy_base_dir().join("authorizationpolicy-crd.yaml"),
            )
            .unwrap(),
        )
        .unwrap();
        runtime
            .block_on(crds.create(&PostParams::default(), &crd))
            .unwrap();
    }

    let mut testbed = Testbed::up_for_kubelet(&spec()).expect("testbed up");
    let pki = pki();
    let mut kube = KubeCluster::start(
        &mut testbed,
        KubeMode {
            pending_pods: vec![(APP_NS.into(), "late".into())],
            ..KubeMode::external(&kubeconfig)
        },
        &KubePki {
            trust_anchors_pem: &pki.anchors,
            issuer: &pki.issuer,
            issuer_layout: Layout::Pem,
        },
    )
    .expect("registered with the external API server");
    assert!(kube.fake_server().is_none());
    let issuer: Secret = get(&kube, Some("sealmesh"), ISSUER_SECRET);
    assert_eq!(issuer.type_.as_deref(), Some("Opaque"));
    let keys: Vec<&String> = issuer.data.as_ref().unwrap().keys().collect();
    assert_eq!(keys, ["crt.pem", "key.pem"]);
    let client: Pod = get(&kube, Some(APP_NS), "client");
    assert_eq!(client.status.unwrap().phase.as_deref(), Some("Running"));
    let node0_ns = testbed.node_netns("node-0").unwrap().to_owned();
    assert_eq!(
        pods_seen_from(&testbed, &node0_ns, &kube.agent_kubeconfig("node-0")),
        ["client", "server"]
    );
    // A policy created later goes on drop too.
    kube.apply_authorization_policy(&policy(PLAIN_NS, "later", "{}"))
        .unwrap();
    assert_eq!(kube.block_on(policies_in_api(&kube.client())).len(), 3);

    // What controllers add to every namespace (the root CA ConfigMap, the
    // default ServiceAccount) is not the testbed's, and must go too.
    let client = {
        let _runtime = runtime.enter();
        server.client()
    };
    let testbed_namespaces = ["sealmesh", APP_NS, PLAIN_NS];
    runtime.block_on(async {
        for namespace in testbed_namespaces {
            let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            let root_ca: ConfigMap = serde_json::from_value(serde_json::json!({
                "metadata": { "name": "kube-root-ca.crt" },
                "data": { "ca.crt": "-----BEGIN CERTIFICATE-----" },
            }))
            .unwrap();
            config_maps
                .create(&PostParams::default(), &root_ca)
                .await
                .unwrap();
            let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
            let default: ServiceAccount =
                serde_json::from_value(serde_json::json!({ "metadata": { "name": "default" } }))
                    .unwrap();
            if let Err(e) = accounts.create(&PostParams::default(), &default).await {
                assert!(matches!(&e, kube::Error::Api(s) if s.code == 409), "{e}");
            }
        }
    });

    drop(kube);
    let names = |list: Vec<String>| -> Vec<String> {
        let mut list = list;
        list.sort();
        list
    };
    runtime.block_on(async {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let left: Vec<String> = namespaces
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|n| n.name_any())
            .filter(|n| ["sealmesh", APP_NS, PLAIN_NS].contains(&n.as_str()))
            .collect();
        assert_eq!(names(left), Vec::<String>::new(), "namespaces removed");
        let nodes: Api<Node> = Api::all(client.clone());
        assert_eq!(
            nodes
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            0
        );
        let pods: Api<Pod> = Api::all(client.clone());
        assert_eq!(
            pods.list(&ListParams::default()).await.unwrap().items.len(),
            0
        );
        let roles: Api<ClusterRole> = Api::all(client.clone());
        let left: Vec<String> = roles
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|r| r.name_any())
            .collect();
        assert_eq!(left, Vec::<String>::new(), "RBAC removed");
        let crd_left = crds.get_opt(CRD_NAME).await.unwrap().is_some();
        assert_eq!(
            crd_left,
            controller == NamespaceController::Absent,
            "the CRD goes only if the testbed created it"
        );
        if crd_left {
            assert_eq!(
                policies_in_api(&client).await,
                Vec::new(),
                "policies left behind"
            );
        }
        // Nothing is left in storage under the namespaces' names, so a
        // namespace created again with one of them starts empty.
        assert_eq!(
            left_in::<ConfigMap>(&client, &testbed_namespaces).await,
            Vec::<String>::new(),
            "ConfigMaps left behind"
        );
        assert_eq!(
            left_in::<ServiceAccount>(&client, &testbed_namespaces).await,
            Vec::<String>::new(),
            "ServiceAccounts left behind"
        );
    });
}

#[test]
fn components_verify_an_https_api_server_through_the_relay_by_its_original_name() {
    let https = HttpsFakeServer::start();
    let kubeconfig = &https.kubeconfig;
    let admin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kubeconfig).unwrap()).unwrap();
    let mut testbed = Testbed::up_for_kubelet(&spec()).expect("testbed up");
    let pki = pki();
    let kube = KubeCluster::start(
        &mut testbed,
        KubeMode::external(kubeconfig),
        &KubePki {
            trust_anchors_pem: &pki.anchors,
            issuer: &pki.issuer,
            issuer_layout: Layout::Tls,
        },
    )
    .expect("registered over https");
    // The agent's kubeconfig names the relay, keeps the CA and verifies the
    // certificate against the original host name.
    let agent_config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(kube.agent_kubeconfig("node-1")).unwrap()).unwrap();
    let cluster = &agent_config["clusters"][0]["cluster"];
    assert_eq!(cluster["server"], "https://172.18.0.1:6443");
    assert_eq!(cluster["tls-server-name"], "localhost");
    assert_eq!(
        cluster["certificate-authority"],
        admin["clusters"][0]["cluster"]["certificate-authority"]
    );
    let node1_ns = testbed.node_netns("node-1").unwrap().to_owned();
    assert_eq!(
        pods_seen_from(&testbed, &node1_ns, &kube.agent_kubeconfig("node-1")),
        ["client", "late", "server"]
    );
    assert!(
        https
            .server
            .requests()
            .iter()
            .any(|(method, path)| method == "GET"
                && path.starts_with("/api/v1/namespaces/shop/pods")),
        "the listing reached the server through relay and TLS front"
    );
}

/// Tests change policies through the mesh the same way in both modes: in
/// local mode the cluster file (rewritten whole), in Kubernetes mode the
/// API (replaced in place: one MODIFIED event, same uid) and the file.
#[test]
fn mesh_creates_replaces_and_deletes_policies_in_both_modes() {
    for kubernetes in [None, Some(KubeMode::fake())] {
        let mut mesh = Mesh::up(
            &spec(),
            MeshOptions {
                start_identity: false,
                start_agents: false,
                wait_for_certificates: false,
                kubernetes: kubernetes.clone(),
                ..MeshOptions::default()
            },
        )
        .expect("mesh up");
        let cluster_file = mesh.testbed().cluster_file_path();
        let from_file = || {
            sorted(
                ClusterFile::load(&cluster_file)
                    .unwrap()
                    .authorization_policies,
            )
        };
        let mut expected = sorted(spec().authorization_policies);
        assert_eq!(from_file(), expected);

        // Kubernetes mode: a watch on the namespace's policies, from now.
        let mut watch = mesh.kube().map(|kube| {
            let api: Api<DynamicObject> =
                Api::namespaced_with(kube.client(), APP_NS, &policy_resource());
            let current = kube.block_on(api.get("server-from-client")).unwrap();
            let events = kube
                .block_on(api.watch(
                    &WatchParams::default().disable_bookmarks(),
                    &current.resource_version().unwrap(),
                ))
                .unwrap();
            (api, current.uid().unwrap(), Box::pin(events))
        });

        let replaced = policy(
            APP_NS,
            "server-from-client",
            "{ action: DENY, rules: [{ to: [{ operation: { ports: ['22'] } }] }] }",
        );
        let added = policy(PLAIN_NS, "deny-all", "{ action: DENY, rules: [{}] }");
        mesh.apply_authorization_policy(replaced.clone()).unwrap();
        mesh.apply_authorization_policy(added.clone()).unwrap();
        let position = expected
            .iter()
            .position(|p| p.name == replaced.name)
            .unwrap();
        expected[position] = replaced;
        expected.push(added);
        let expected = sorted(expected);
        assert_eq!(from_file(), expected);
        if let (Some(kube), Some((api, uid, events))) = (mesh.kube(), watch.as_mut()) {
            assert_eq!(kube.block_on(policies_in_api(&kube.client())), expected);
            match kube.block_on(futures::StreamExt::next(events)) {
                Some(Ok(WatchEvent::Modified(object))) => {
                    assert_eq!(object.data["spec"]["action"], "DENY");
                }
                other => panic!("expected one MODIFIED, got {other:?}"),
            }
            let current = kube.block_on(api.get("server-from-client")).unwrap();
            assert_eq!(current.uid().as_ref(), Some(&*uid), "replaced in place");
        }

        // A policy the agents could not read is refused, and nothing changes.
        let invalid = policy(
            APP_NS,
            "server-from-client",
            "{ rules: [{ to: [{ operation: { ports: ['http'] } }] }] }",
        );
        assert!(mesh.apply_authorization_policy(invalid).is_err());
        assert_eq!(from_file(), expected);

        mesh.delete_authorization_policy(APP_NS, "server-from-client")
            .unwrap();
        let left: Vec<_> = expected
            .iter()
            .filter(|p| p.name != "server-from-client")
            .cloned()
            .collect();
        assert_eq!(from_file(), left);
        if let Some(kube) = mesh.kube() {
            assert_eq!(kube.block_on(policies_in_api(&kube.client())), left);
        }
        assert!(
            mesh.delete_authorization_policy(APP_NS, "server-from-client")
                .is_err(),
            "deleting a missing policy is an error ({kubernetes:?})"
        );
    }
}
