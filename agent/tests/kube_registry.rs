//! `KubeRegistry` against the in-process API server (real paths, JSON shapes
//! and watch streams), with objects written the way the kubelet and the
//! controllers write them and real kubelet-named cgroup v2 directories.

mod kube_support;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::Duration,
};

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::{
    Api,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
};
use kube_support::{CgroupRoot, Cluster, PodSpec, eventually, install_policy_crd, policy_resource};
use sealmesh_agent::{
    kube::{KubeRegistry, KubeRegistryConfig, KubeRegistryError},
    registry::{NodeInfo, Workload, WorkloadRegistry},
};
use sealmesh_common::{
    authz::{self, Connection},
    host,
    identity::TrustDomain,
};
use serde_json::json;

const LOCAL_NODE: &str = "n1";
const LOCAL_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
const REMOTE_NODE: &str = "n2";
const REMOTE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const MESHED_NS: &str = "emojivoto";
const PLAIN_NS: &str = "plain";
/// The control namespace: its AuthorizationPolicies apply everywhere.
const CONTROL_NS: &str = "sealmesh";

/// The API server with the AuthorizationPolicy CRD, two nodes, a meshed and
/// an unmeshed namespace, and a cgroup root for the local node.
struct Fixture {
    server: FakeApiServer,
    cluster: Cluster,
    cgroups: CgroupRoot,
}

impl Fixture {
    async fn new(name: &str) -> Self {
        let fx = Self::without_policy_crd(name).await;
        install_policy_crd(&fx.cluster).await;
        fx
    }

    /// As on a cluster where deploy/base was not applied in full.
    async fn without_policy_crd(name: &str) -> Self {
        let (server, cluster) = Cluster::start().await;
        cluster.node(LOCAL_NODE, LOCAL_IP).await;
        cluster.node(REMOTE_NODE, REMOTE_IP).await;
        cluster.namespace(MESHED_NS, true).await;
        cluster.namespace(PLAIN_NS, false).await;
        cluster.namespace(CONTROL_NS, false).await;
        Self {
            server,
            cluster,
            cgroups: CgroupRoot::new(name),
        }
    }

    fn config(&self) -> KubeRegistryConfig {
        KubeRegistryConfig {
            cgroup_rescan: Duration::from_millis(50),
            ..KubeRegistryConfig::new(
                LOCAL_NODE,
                TrustDomain::default(),
                self.cgroups.path().to_owned(),
                CONTROL_NS,
            )
        }
    }

    /// Starts a registry for node `node`.
    async fn start_as(&self, node: &str) -> Result<Arc<KubeRegistry>, KubeRegistryError> {
        let config = KubeRegistryConfig {
            node: node.into(),
            ..self.config()
        };
        KubeRegistry::start(self.server.client(), config).await
    }

    async fn registry(&self) -> Arc<KubeRegistry> {
        KubeRegistry::start(self.server.client(), self.config())
            .await
            .unwrap()
    }
}

/// `emojivoto/web-0` (meshed, ServiceAccount `web`) on the local node.
fn local_web() -> PodSpec<'static> {
    PodSpec::new(MESHED_NS, "web-0", "web", LOCAL_NODE, [10, 244, 1, 2])
}

/// `plain/curl` (unmeshed) on the local node.
fn local_curl() -> PodSpec<'static> {
    PodSpec::new(PLAIN_NS, "curl", "default", LOCAL_NODE, [10, 244, 1, 4])
}

/// `emojivoto/web-1` (meshed, ServiceAccount `web`) on the remote node.
fn remote_web() -> PodSpec<'static> {
    PodSpec::new(MESHED_NS, "web-1", "web", REMOTE_NODE, [10, 244, 2, 2])
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

fn names(workloads: &[Arc<Workload>]) -> Vec<String> {
    workloads
        .iter()
        .map(|w| format!("{}/{}", w.namespace, w.name))
        .collect()
}

#[tokio::test]
async fn meshed_local_pods_get_their_identity_and_cgroup_once_the_cgroup_exists() {
    let fx = Fixture::new("kube-local").await;
    let c = &fx.cluster;
    let web = c.running_pod(local_web()).await;
    let db = c
        .running_pod(PodSpec {
            opted_out: true,
            ..PodSpec::new(MESHED_NS, "db-0", "db", LOCAL_NODE, [10, 244, 1, 3])
        })
        .await;
    c.running_pod(local_curl()).await;
    c.running_pod(PodSpec {
        host_network: true,
        ..PodSpec::new(
            MESHED_NS,
            "node-exporter",
            "exporter",
            LOCAL_NODE,
            [172, 18, 0, 2],
        )
    })
    .await;
    c.running_pod(remote_web()).await;
    // The kubelet made the opted-out pod's cgroup (cgroupfs driver) already;
    // web-0's comes later.
    let db_cgroup = fx.cgroups.create_cgroupfs("besteffort", &db);

    let registry = fx.registry().await;
    assert_eq!(
        registry.local_node(),
        &NodeInfo {
            name: LOCAL_NODE.into(),
            ip: LOCAL_IP
        }
    );
    assert_eq!(
        names(&registry.local_workloads()),
        [
            "emojivoto/db-0",
            "emojivoto/node-exporter",
            "emojivoto/web-0",
            "plain/curl"
        ],
    );
    let exporter = registry
        .local_workloads()
        .into_iter()
        .find(|w| w.name == "node-exporter")
        .unwrap();
    assert_eq!(
        (exporter.ip, exporter.meshed),
        (None, false),
        "a hostNetwork pod is a source by its cgroup only, never meshed"
    );
    let web_identity = TrustDomain::default().identity(MESHED_NS, "web").unwrap();
    let web0 = registry.by_ip(Ipv4Addr::new(10, 244, 1, 2)).unwrap();
    assert_eq!(
        *web0,
        Workload {
            name: "web-0".into(),
            namespace: MESHED_NS.into(),
            service_account: "web".into(),
            identity: web_identity.clone(),
            ip: Some(Ipv4Addr::new(10, 244, 1, 2)),
            node: LOCAL_NODE.into(),
            node_ip: LOCAL_IP,
            meshed: true,
            inbound_policy: Default::default(),
            cgroup_id: None,
            authz: Default::default(),
        }
    );
    let db0 = registry.by_ip(Ipv4Addr::new(10, 244, 1, 3)).unwrap();
    assert_eq!(
        (db0.meshed, db0.cgroup_id),
        (false, Some(host::cgroup_id(&db_cgroup).unwrap())),
        "opted out by annotation"
    );
    assert!(
        !registry.by_ip(Ipv4Addr::new(10, 244, 1, 4)).unwrap().meshed,
        "namespace without the mesh label"
    );
    assert_eq!(registry.by_ip(LOCAL_IP), None, "hostNetwork pod");
    let remote = registry.by_ip(Ipv4Addr::new(10, 244, 2, 2)).unwrap();
    assert_eq!(
        (
            remote.node.as_str(),
            remote.node_ip,
            remote.meshed,
            remote.cgroup_id,
            &remote.identity
        ),
        (REMOTE_NODE, REMOTE_IP, true, None, &web_identity)
    );

    let changes = registry.subscribe();
    let web_cgroup = fx.cgroups.create_systemd("burstable", &web);
    let web_cgroup_id = host::cgroup_id(&web_cgroup).unwrap();
    eventually("the re-scan to find web-0's cgroup", || async {
        registry.by_cgroup(web_cgroup_id).is_some()
    })
    .await;
    assert!(changes.has_changed().unwrap(), "subscribers are told");
    let web0 = registry.by_cgroup(web_cgroup_id).unwrap();
    assert_eq!((web0.name.as_str(), web0.meshed), ("web-0", true));
    let meshed_cgroups: Vec<u64> = registry
        .local_workloads()
        .iter()
        .filter(|w| w.meshed)
        .filter_map(|w| w.cgroup_id)
        .collect();
    assert_eq!(meshed_cgroups, [web_cgroup_id]);
}

#[tokio::test]
async fn a_scheduled_pod_is_known_by_its_cgroup_as_soon_as_the_kubelet_creates_it() {
    let fx = Fixture::new("kube-early").await;
    // No periodic rescan to speak of: only the inotify watch can find the cgroups in time.
    let registry = KubeRegistry::start(
        fx.server.client(),
        KubeRegistryConfig {
            cgroup_rescan: Duration::from_secs(3600),
            ..fx.config()
        },
    )
    .await
    .unwrap();
    assert_eq!(registry.pod_parent_cgroups(), Vec::<u64>::new());

    // Bound to this node; the kubelet has reported nothing yet.
    let uid = fx
        .cluster
        .scheduled_pod(PodSpec::new(
            MESHED_NS,
            "init-0",
            "web",
            LOCAL_NODE,
            [10, 244, 1, 9],
        ))
        .await;
    eventually("the registry to see the scheduled pod", || async {
        names(&registry.local_workloads()) == ["emojivoto/init-0"]
    })
    .await;
    // The kubelet creates kubepods, its QoS level and the pod's cgroup (systemd driver).
    let cgroup = host::cgroup_id(&fx.cgroups.create_systemd("besteffort", &uid)).unwrap();
    eventually("the pod to be known by its cgroup", || async {
        registry.by_cgroup(cgroup).is_some()
    })
    .await;
    let pod = registry.by_cgroup(cgroup).unwrap();
    assert_eq!(
        (pod.name.as_str(), pod.ip, pod.meshed),
        ("init-0", None, true),
        "a source before it has an address"
    );
    let mut parents = registry.pod_parent_cgroups();
    parents.sort_unstable();
    let mut expected = vec![
        host::cgroup_id(&fx.cgroups.path().join("kubepods.slice")).unwrap(),
        host::cgroup_id(
            &fx.cgroups
                .path()
                .join("kubepods.slice/kubepods-besteffort.slice"),
        )
        .unwrap(),
    ];
    expected.sort_unstable();
    assert_eq!(
        parents, expected,
        "the new pod parents are watched and known"
    );
}

#[tokio::test]
async fn service_vips_resolve_through_endpoint_slices_to_ready_pods() {
    let fx = Fixture::new("kube-svc").await;
    let c = &fx.cluster;
    for (name, ip) in [
        ("web-0", [10, 244, 1, 2]),
        ("web-1", [10, 244, 1, 3]),
        ("web-2", [10, 244, 2, 2]),
    ] {
        let node = if ip[2] == 1 { LOCAL_NODE } else { REMOTE_NODE };
        c.running_pod(PodSpec::new(MESHED_NS, name, "web", node, ip))
            .await;
    }
    c.service(
        MESHED_NS,
        "web-svc",
        Ipv4Addr::new(10, 96, 0, 10),
        json!([
            { "name": "http", "port": 80, "targetPort": "http", "protocol": "TCP" },
            { "name": "admin", "port": 9000, "targetPort": 9090 },
            { "name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP" },
        ]),
    )
    .await;
    let pod_ref = |name: &str| json!({ "kind": "Pod", "namespace": MESHED_NS, "name": name });
    c.endpoint_slice(
        MESHED_NS,
        "web-svc-x1",
        "web-svc",
        json!([
            { "addresses": ["10.244.1.2"], "conditions": { "ready": true }, "targetRef": pod_ref("web-0") },
            { "addresses": ["10.244.1.3"], "conditions": { "ready": false }, "targetRef": pod_ref("web-1") },
            { "addresses": ["10.244.2.2"], "targetRef": pod_ref("web-2") },
        ]),
        json!([{ "name": "http", "port": 8080, "protocol": "TCP" }, { "name": "admin", "port": 9090 }]),
    )
    .await;
    let registry = fx.registry().await;

    let picks = |port: u16, n: usize| {
        (0..n)
            .map(|_| {
                let endpoint = registry.resolve(addr([10, 96, 0, 10], port)).unwrap();
                (endpoint.workload.name.clone(), endpoint.addr.port())
            })
            .collect::<Vec<_>>()
    };
    let expect = |pods: &[&str], port: u16| {
        pods.iter()
            .map(|p| (p.to_string(), port))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        picks(80, 4),
        expect(&["web-0", "web-2", "web-0", "web-2"], 8080),
        "named targetPort through the slice; the not-ready web-1 is skipped"
    );
    assert_eq!(picks(9000, 2), expect(&["web-0", "web-2"], 9090));
    assert_eq!(
        registry.resolve(addr([10, 96, 0, 10], 53)),
        None,
        "UDP port"
    );
    assert_eq!(registry.resolve(addr([10, 96, 0, 10], 81)), None);
    let direct = registry.resolve(addr([10, 244, 1, 3], 7000)).unwrap();
    assert_eq!(
        (direct.workload.name.as_str(), direct.addr.port()),
        ("web-1", 7000),
        "a pod IP resolves to the pod whatever its readiness"
    );

    let mut changes = registry.subscribe();
    c.patch_endpoint_slice(
        MESHED_NS,
        "web-svc-x1",
        json!({ "endpoints": [
            { "addresses": ["10.244.1.3"], "conditions": { "ready": true }, "targetRef": pod_ref("web-1") },
        ] }),
    )
    .await;
    changes.changed().await.unwrap();
    assert_eq!(picks(80, 2), expect(&["web-1", "web-1"], 8080));
}

#[tokio::test]
async fn deleted_pods_leave_the_registry() {
    let fx = Fixture::new("kube-delete").await;
    let c = &fx.cluster;
    let uid = c.running_pod(local_web()).await;
    let cgroup_id = host::cgroup_id(&fx.cgroups.create_systemd("besteffort", &uid)).unwrap();
    let registry = fx.registry().await;
    assert_eq!(registry.by_cgroup(cgroup_id).unwrap().name, "web-0");

    let mut changes = registry.subscribe();
    c.delete_pod(MESHED_NS, "web-0").await;
    changes.changed().await.unwrap();
    assert_eq!(registry.by_cgroup(cgroup_id), None);
    assert_eq!(registry.by_ip(Ipv4Addr::new(10, 244, 1, 2)), None);
    assert_eq!(registry.local_workloads(), []);
}

#[tokio::test]
async fn service_accounts_with_dots_are_meshed_and_unnameable_ones_get_a_warning_event() {
    let fx = Fixture::new("kube-sa-names").await;
    let c = &fx.cluster;
    let dotted = c
        .running_pod(PodSpec::new(
            MESHED_NS,
            "api-0",
            "api.v2",
            LOCAL_NODE,
            [10, 244, 1, 2],
        ))
        .await;
    // Valid in Kubernetes (a DNS subdomain), but a 64-character label no
    // certificate's DNS name can hold.
    let too_long = format!("api.{}", "x".repeat(64));
    let unnameable = c
        .running_pod(PodSpec::new(
            MESHED_NS,
            "long-0",
            &too_long,
            LOCAL_NODE,
            [10, 244, 1, 3],
        ))
        .await;
    fx.cgroups.create_systemd("besteffort", &dotted);
    let registry = fx.registry().await;
    let api = eventually_local(&registry, 1).await.remove(0);
    assert_eq!(api.name, "api-0");
    assert!(api.meshed);
    assert_eq!(
        api.identity.spiffe_uri(),
        format!("spiffe://cluster.local/ns/{MESHED_NS}/sa/api.v2")
    );
    assert_eq!(registry.by_ip(Ipv4Addr::new(10, 244, 1, 3)), None);

    let events: Api<Event> = Api::namespaced(fx.server.client(), MESHED_NS);
    let warnings = || async {
        events
            .list(&ListParams::default().fields("reason=IdentityUnrepresentable"))
            .await
            .unwrap()
            .items
    };
    eventually("a Warning Event on the pod", || async {
        !warnings().await.is_empty()
    })
    .await;
    // More rebuilds (another pod) record no second Event.
    c.running_pod(PodSpec::new(
        MESHED_NS,
        "web-0",
        "web",
        LOCAL_NODE,
        [10, 244, 1, 4],
    ))
    .await;
    eventually("the new pod in the registry", || async {
        registry.by_ip(Ipv4Addr::new(10, 244, 1, 4)).is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let recorded = warnings().await;
    assert_eq!(recorded.len(), 1, "{recorded:#?}");
    let event = &recorded[0];
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(event.involved_object.kind.as_deref(), Some("Pod"));
    assert_eq!(event.involved_object.name.as_deref(), Some("long-0"));
    assert_eq!(
        event.involved_object.uid.as_deref(),
        Some(unnameable.as_str())
    );
    assert_eq!(event.reporting_instance.as_deref(), Some(LOCAL_NODE));
    assert_eq!(
        event.message.as_deref(),
        Some(
            format!(
                "ServiceAccount {MESHED_NS}/{too_long} cannot be named in a certificate: its part \"{}\" has 64 \
                 characters, and a DNS label at most 63; rename the ServiceAccount (or use a shorter namespace) \
                 to mesh its pods",
                "x".repeat(64)
            )
            .as_str()
        )
    );
}

/// The registry's local workloads, once there are `count` of them.
async fn eventually_local(registry: &KubeRegistry, count: usize) -> Vec<Arc<Workload>> {
    eventually("local workloads", || async {
        registry.local_workloads().len() >= count
    })
    .await;
    registry.local_workloads()
}

#[tokio::test]
async fn lists_again_after_410_gone_and_sees_what_changed_meanwhile() {
    let fx = Fixture::new("kube-relist").await;
    let c = &fx.cluster;
    c.running_pod(local_curl()).await;
    c.running_pod(remote_web()).await;
    let registry = fx.registry().await;
    assert!(!registry.by_ip(Ipv4Addr::new(10, 244, 1, 4)).unwrap().meshed);
    let pod_lists = || {
        fx.server
            .requests()
            .iter()
            .filter(|(method, path)| {
                method == "GET" && path.starts_with("/api/v1/pods") && !path.contains("watch=true")
            })
            .count()
    };
    assert_eq!(pod_lists(), 1);

    // A write the registry does not watch moves the resourceVersion past
    // what its watches have seen; then history is forgotten and every watch
    // ends, so resuming gets 410 Gone and what changes now can only be
    // learnt by listing again.
    c.trust_roots(PLAIN_NS, "unrelated").await;
    fx.server.compact();
    fx.server.close_watches();
    c.label_namespace(PLAIN_NS, Some("enabled")).await;
    c.delete_pod(MESHED_NS, "web-1").await;
    c.running_pod(PodSpec::new(
        MESHED_NS,
        "web-2",
        "web",
        REMOTE_NODE,
        [10, 244, 2, 3],
    ))
    .await;

    eventually(
        "the registry to see the changes made while its watches were down",
        || async {
            registry
                .by_ip(Ipv4Addr::new(10, 244, 1, 4))
                .is_some_and(|w| w.meshed)
                && registry.by_ip(Ipv4Addr::new(10, 244, 2, 2)).is_none()
                && registry.by_ip(Ipv4Addr::new(10, 244, 2, 3)).is_some()
        },
    )
    .await;
    assert_eq!(pod_lists(), 2, "one re-list of pods after 410 Gone");
}

#[tokio::test]
async fn start_up_failures_say_what_to_fix() {
    let fx = Fixture::new("kube-startup").await;
    let err = fx.start_as("n9").await.unwrap_err();
    assert!(
        matches!(err, KubeRegistryError::NodeNotFound { .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "node \"n9\" does not exist in the Kubernetes API; --node (SEALMESH_NODE) must name this node as the API does (the DaemonSet sets it from spec.nodeName)"
    );

    // Registered by its kubelet, which has not reported addresses yet.
    Api::<Node>::all(fx.server.client())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": "n3" } })).unwrap(),
        )
        .await
        .unwrap();
    let err = fx.start_as("n3").await.unwrap_err();
    assert!(
        matches!(err, KubeRegistryError::NoInternalIp { .. }),
        "{err}"
    );

    let err = KubeRegistry::start(fx.server.client_with_token("not-a-token"), fx.config())
        .await
        .unwrap_err();
    assert!(
        matches!(err, KubeRegistryError::Denied { code: 401, .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .ends_with("grant its ServiceAccount the permissions of deploy/base/agent-rbac.yaml"),
        "{err}"
    );

    let unreachable = {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let config = kube::Config::new(url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    };
    let config = KubeRegistryConfig {
        startup_timeout: Duration::from_secs(1),
        ..fx.config()
    };
    let started = tokio::time::Instant::now();
    let err = KubeRegistry::start(unreachable, config).await.unwrap_err();
    assert!(
        matches!(err, KubeRegistryError::Unreachable { .. }),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "gives up at the start-up deadline"
    );
}

#[tokio::test]
async fn keeps_serving_its_last_state_while_the_api_is_gone() {
    let fx = Fixture::new("kube-outage").await;
    let uid = fx
        .cluster
        .running_pod(PodSpec::new(
            MESHED_NS,
            "web-0",
            "web",
            LOCAL_NODE,
            [10, 244, 1, 2],
        ))
        .await;
    let cgroup_id = host::cgroup_id(&fx.cgroups.create_systemd("besteffort", &uid)).unwrap();
    let registry = fx.registry().await;
    let changes = registry.subscribe();
    let Fixture {
        server, cgroups, ..
    } = fx;
    drop(server);
    // Long enough for every watch to fail and retry at least once.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!changes.has_changed().unwrap());
    let web0 = registry.by_cgroup(cgroup_id).unwrap();
    assert_eq!((web0.name.as_str(), web0.meshed), ("web-0", true));
    assert_eq!(names(&registry.local_workloads()), ["emojivoto/web-0"]);
    // ...and says so: every watch is named failing (readiness details, metrics).
    let failing: Vec<String> = registry
        .source_failures()
        .into_iter()
        .map(|(source, error)| {
            assert!(!error.is_empty(), "{source} fails with an error");
            source
        })
        .collect();
    assert_eq!(
        failing,
        [
            "authorizationpolicies",
            "endpointslices",
            "namespaces",
            "nodes",
            "pods",
            "services"
        ]
        .map(|kind| format!("the Kubernetes API watch of {kind}"))
    );
    drop(cgroups);
}

fn policies(cluster: &Cluster, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(cluster.client.clone(), namespace, &policy_resource())
}

async fn create_policy(cluster: &Cluster, namespace: &str, name: &str, spec: serde_json::Value) {
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": format!("{}/{}", authz::API_GROUP, authz::API_VERSION),
        "kind": authz::KIND,
        "metadata": { "name": name },
        "spec": spec,
    }))
    .unwrap();
    policies(cluster, namespace)
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
}

async fn patch_policy(cluster: &Cluster, namespace: &str, name: &str, patch: serde_json::Value) {
    policies(cluster, namespace)
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// Sets a pod's labels, as its controller would.
async fn label_pod(cluster: &Cluster, namespace: &str, name: &str, labels: serde_json::Value) {
    Api::<Pod>::namespaced(cluster.client.clone(), namespace)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": labels } })),
        )
        .await
        .unwrap();
}

/// The names of the policies selecting the pod at `ip` (none if unknown).
fn selecting(registry: &KubeRegistry, ip: [u8; 4]) -> Vec<String> {
    registry
        .by_ip(Ipv4Addr::from(ip))
        .map(|w| {
            w.authz
                .policies()
                .iter()
                .map(|p| p.name.to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the pod at `ip` takes a connection from `namespace`'s `client`
/// (mTLS) on port 8080, and which policy refuses it if not.
fn refused_by(registry: &KubeRegistry, ip: [u8; 4], namespace: &str) -> Option<String> {
    let identity = TrustDomain::default()
        .identity(namespace, "client")
        .unwrap();
    let workload = registry.by_ip(Ipv4Addr::from(ip)).unwrap();
    workload
        .authz
        .judge(&Connection {
            identity: Some(&identity),
            source_ip: Some(Ipv4Addr::new(10, 244, 2, 9)),
            port: 8080,
        })
        .denied_by()
        .map(|decider| decider.policy.name.to_string())
}

#[tokio::test]
async fn local_meshed_pods_follow_the_policies_selecting_them() {
    let fx = Fixture::new("kube-authz").await;
    let c = &fx.cluster;
    let web0 = [10, 244, 1, 2];
    let db0 = [10, 244, 1, 3];
    let curl = [10, 244, 1, 4];
    let web1 = [10, 244, 2, 2];
    c.running_pod(local_web()).await;
    c.running_pod(PodSpec::new(MESHED_NS, "db-0", "db", LOCAL_NODE, db0))
        .await;
    c.running_pod(local_curl()).await;
    c.running_pod(remote_web()).await;
    for (namespace, pod, app) in [
        (MESHED_NS, "web-0", "web"),
        (MESHED_NS, "db-0", "db"),
        (PLAIN_NS, "curl", "web"),
        (MESHED_NS, "web-1", "web"),
    ] {
        label_pod(c, namespace, pod, json!({ "app": app })).await;
    }
    create_policy(
        c,
        MESHED_NS,
        "web-from-emojivoto",
        json!({ "selector": { "matchLabels": { "app": "web" } },
                "rules": [{ "from": [{ "source": { "namespaces": [MESHED_NS] } }] }] }),
    )
    .await;
    create_policy(
        c,
        CONTROL_NS,
        "require-mtls",
        json!({ "action": "DENY",
                "rules": [{ "from": [{ "source": { "notPrincipals": ["*"] } }] }] }),
    )
    .await;
    let registry = fx.registry().await;

    let both = ["emojivoto/web-from-emojivoto", "sealmesh/require-mtls"];
    assert_eq!(selecting(&registry, web0), both);
    assert_eq!(
        selecting(&registry, db0),
        ["sealmesh/require-mtls"],
        "the control namespace's policy selects every meshed pod; db-0 is not app=web"
    );
    assert_eq!(selecting(&registry, curl), Vec::<String>::new(), "unmeshed");
    assert_eq!(
        selecting(&registry, web1),
        Vec::<String>::new(),
        "another node's pod is judged by its own agent"
    );
    assert_eq!(registry.policies().policies().len(), 2);
    assert_eq!(refused_by(&registry, web0, MESHED_NS), None);
    assert_eq!(
        refused_by(&registry, web0, PLAIN_NS).as_deref(),
        Some("emojivoto/web-from-emojivoto")
    );

    // Labels are followed: db-0 becomes app=web.
    label_pod(c, MESHED_NS, "db-0", json!({ "app": "web" })).await;
    eventually("db-0 to be selected by its new label", || async {
        selecting(&registry, db0) == both
    })
    .await;

    // A policy's rules change: subscribers are told, the new rule judges.
    let mut changes = registry.subscribe();
    changes.borrow_and_update();
    patch_policy(
        c,
        MESHED_NS,
        "web-from-emojivoto",
        json!({ "spec": { "rules": [{ "from": [{ "source": { "namespaces": [PLAIN_NS] } }] }] } }),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(15), changes.changed())
        .await
        .expect("a policy change is published")
        .unwrap();
    eventually("the changed rule to judge", || async {
        refused_by(&registry, web0, MESHED_NS).is_some()
    })
    .await;
    assert_eq!(refused_by(&registry, web0, PLAIN_NS), None);

    // A change to a policy that changes no judgement (a label) publishes
    // nothing: the next version is the next real change's.
    changes.borrow_and_update();
    let version = *changes.borrow();
    patch_policy(
        c,
        MESHED_NS,
        "web-from-emojivoto",
        json!({ "metadata": { "labels": { "owner": "team-a" } } }),
    )
    .await;
    c.running_pod(PodSpec::new(
        MESHED_NS,
        "web-2",
        "web",
        REMOTE_NODE,
        [10, 244, 2, 3],
    ))
    .await;
    eventually("the registry to see the new remote pod", || async {
        registry.by_ip(Ipv4Addr::new(10, 244, 2, 3)).is_some()
    })
    .await;
    assert_eq!(
        *changes.borrow(),
        version + 1,
        "only the new pod is a change"
    );

    // A policy this agent cannot read (an L7 field) refuses every
    // connection to the pods of its namespace.
    create_policy(
        c,
        MESHED_NS,
        "l7",
        json!({ "selector": { "matchLabels": { "app": "nothing" } },
                "rules": [{ "to": [{ "operation": { "methods": ["GET"] } }] }] }),
    )
    .await;
    eventually("the unreadable policy to fail closed", || async {
        [web0, db0]
            .iter()
            .all(|ip| refused_by(&registry, *ip, PLAIN_NS).as_deref() == Some("emojivoto/l7"))
    })
    .await;

    // Deleted policies no longer apply.
    for (namespace, name) in [
        (MESHED_NS, "web-from-emojivoto"),
        (MESHED_NS, "l7"),
        (CONTROL_NS, "require-mtls"),
    ] {
        policies(c, namespace)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    eventually("deleted policies to leave the registry", || async {
        registry.policies().is_empty() && selecting(&registry, web0).is_empty()
    })
    .await;
}

#[tokio::test]
async fn start_up_fails_naming_the_crd_when_policies_are_not_served() {
    let fx = Fixture::without_policy_crd("kube-no-crd").await;
    let err = fx.start_as(LOCAL_NODE).await.unwrap_err();
    assert!(
        matches!(err, KubeRegistryError::PolicyCrdMissing { code: 404, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(
            "the Kubernetes API does not serve authorizationpolicies.sealmesh.io (listing authorizationpolicies.sealmesh.io: 404 "
        ),
        "{message}"
    );
    assert!(
        message.contains(
            "its CustomResourceDefinition is not installed; apply deploy/base (authorizationpolicy-crd.yaml)"
        ),
        "{message}"
    );
}

#[tokio::test]
async fn start_up_fails_naming_the_rbac_rule_when_policies_are_forbidden() {
    let fx = Fixture::new("kube-policy-rbac").await;
    fx.server
        .deny_access(authz::API_GROUP, authz::PLURAL, "list");
    let err = fx.start_as(LOCAL_NODE).await.unwrap_err();
    assert!(
        matches!(err, KubeRegistryError::PolicyDenied { code: 403, .. }),
        "{err}"
    );
    assert!(
        err.to_string().ends_with(
            "grant the agent's ServiceAccount get, list and watch on authorizationpolicies.sealmesh.io (the rule in deploy/base/agent-rbac.yaml)"
        ),
        "{err}"
    );
}
