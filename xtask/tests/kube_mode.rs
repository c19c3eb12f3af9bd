//! The mesh in Kubernetes mode on the testbed (root, real network namespaces,
//! real kernel eBPF, real mTLS): agents and the identity service run with
//! `--mode kubernetes` against the in-process fake API server, which the
//! testbed fills as kubelets and controllers would. With
//! `SEALMESH_TEST_KUBECONFIG` naming a real kube-apiserver's kubeconfig, the
//! Service test also runs against it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use sealmesh_common::consts::{
    ACCESS_LOG_TARGET, AGENT_ADMIN_PORT, MESH_LABEL, MESH_LABEL_ENABLED, SEALMESH_REMOVED_MESSAGE,
    kube::{EVENT_ISSUER_UPDATED, IDENTITY_NAME},
};
use sealmesh_pki::{self as pki, CaSpec, Layout};
use sealmesh_proto::admin::{self as pb, admin_client::AdminClient};
use serde_json::Value;
mod kube_support;
mod support;

use kube_support::HttpsFakeServer;
use support::{
    APP_NS, assert_marker_never_in_clear, capture_underlay, client_in_pod, describe, echo_addr,
    echo_service, sealmesh_path, spiffe, start_echo_server, stdout, testapp_path, wait_access,
};
use xtask::{
    mesh::{Mesh, MeshOptions},
    testapp,
    testbed::{
        ChildGuard, PodSpec, TestbedSpec, cgroup,
        kube::{KubeApi, KubeMode},
        netns,
    },
};

/// The Service's VIP; a real API server may allocate another ClusterIP,
/// which the testbed then uses ([`App::service_addr`]).
const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
/// Environment variable naming a real API server's kubeconfig for test (e).
const REAL_KUBECONFIG_ENV: &str = "SEALMESH_TEST_KUBECONFIG";
const WAIT: Duration = Duration::from_secs(40);

/// node-0: `client`, and `starter` (ServiceAccount `client`); node-1:
/// `server` behind Service `server` (10.96.0.10:80 → 8080), and `late`.
/// `starter` and `late` are laid out, created in the API only when a test
/// asks.
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .pod(PodSpec::new(APP_NS, "client", "client", 0).label("app", "client"))
        .pod(PodSpec::new(APP_NS, "starter", "client", 0).label("app", "starter"))
        .pod(PodSpec::new(APP_NS, "server", "server", 1).label("app", "server"))
        .pod(PodSpec::new(APP_NS, "late", "late", 1).label("app", "late"))
        .service(echo_service("server", SERVICE_VIP, SERVICE_PORT))
}

fn kube_mode(api: KubeApi) -> KubeMode {
    KubeMode {
        api,
        pending_pods: vec![
            (APP_NS.into(), "late".into()),
            (APP_NS.into(), "starter".into()),
        ],
        ..KubeMode::fake()
    }
}

struct App {
    mesh: Mesh,
    servers: Vec<ChildGuard>,
}

impl App {
    fn up(api: KubeApi, options: MeshOptions) -> Self {
        let mesh = Mesh::up(
            &spec(),
            MeshOptions {
                kubernetes: Some(kube_mode(api)),
                ..options
            },
        )
        .expect("mesh up in Kubernetes mode");
        let mut app = Self {
            mesh,
            servers: Vec::new(),
        };
        app.serve("server");
        app
    }

    fn serve(&mut self, pod: &str) {
        self.servers
            .push(start_echo_server(&self.mesh, APP_NS, pod));
    }

    fn echo_addr(&self, pod: &str) -> SocketAddr {
        echo_addr(self.mesh.testbed(), APP_NS, pod)
    }

    /// The Service's ClusterIP and port, as the API server holds them.
    fn service_addr(&self) -> SocketAddr {
        let vip = self.mesh.testbed().cluster().services[0].vip;
        SocketAddr::from((vip, SERVICE_PORT))
    }

    fn client(&self, connect: SocketAddr, text: &str) -> Output {
        client_in_pod(
            self.mesh.testbed(),
            APP_NS,
            "client",
            connect,
            text,
            &["--timeout-secs", "10"],
        )
    }

    fn client_ok(&self, connect: SocketAddr, text: &str) -> String {
        let out = self.client(connect, text);
        assert!(
            out.status.success(),
            "client -> {connect}: {}",
            describe(&out)
        );
        stdout(&out)
    }

    /// Waits for an access-log event of `node`'s agent matching `pred`.
    fn wait_access(&self, node: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        wait_access(&self.mesh, node, what, pred)
    }

    /// The agent's certificate store, through its admin API on the node's loopback.
    fn certificates(&self, node: &str) -> pb::GetCertificatesResponse {
        let netns = self.mesh.testbed().node_netns(node).unwrap().to_owned();
        self.mesh
            .testbed()
            .run_in_netns(&netns, || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    let mut admin =
                        AdminClient::connect(format!("http://127.0.0.1:{AGENT_ADMIN_PORT}"))
                            .await
                            .expect("the admin API answers on the node's loopback");
                    admin
                        .get_certificates(pb::GetCertificatesRequest {})
                        .await
                        .unwrap()
                        .into_inner()
                })
            })
            .unwrap()
    }

    /// Polls the admin API of `node` until `done` holds.
    fn wait_certificates(
        &self,
        node: &str,
        what: &str,
        done: impl Fn(&pb::GetCertificatesResponse) -> bool,
    ) -> pb::GetCertificatesResponse {
        let deadline = Instant::now() + WAIT;
        loop {
            let certs = self.certificates(node);
            if done(&certs) {
                return certs;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {node}: {what}; last: {certs:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Test (a), against whichever API server: a meshed client on node-0 reaches
/// the meshed server on node-1 through the Service VIP over mTLS with both
/// identities, and nothing of it crosses the underlay in clear.
fn service_over_mtls(api: KubeApi) {
    const MARKER: &str = "sealmesh-kube-secret-marker-51c2";
    let user_kubeconfig = match &api {
        KubeApi::Kubeconfig(path) => Some(path.clone()),
        KubeApi::Fake => None,
    };
    let app = App::up(api, MeshOptions::default());
    let capture = capture_underlay(&app.mesh, &[MARKER]);

    let service = app.service_addr();
    let out = app.client_ok(service, MARKER);
    assert!(out.starts_with("ok "), "{out}");
    assert!(out.contains(&format!(" peer={service} ")), "{out}");

    let inbound = app.wait_access("node-1", "inbound mTLS connection to shop/server", |e| {
        e["direction"] == "inbound" && e["dst"] == "shop/server"
    });
    assert_eq!(inbound["client_id"], spiffe("client"), "{inbound}");
    assert_eq!(inbound["server_id"], spiffe("server"), "{inbound}");
    assert_eq!(inbound["tls"], true, "{inbound}");
    assert_eq!(inbound["src"], "shop/client", "{inbound}");
    let outbound = app.wait_access("node-0", "outbound connection from shop/client", |e| {
        e["direction"] == "outbound" && e["dst"] == "shop/server"
    });
    assert_eq!(outbound["client_id"], spiffe("client"), "{outbound}");
    assert_eq!(outbound["server_id"], spiffe("server"), "{outbound}");
    assert_eq!(outbound["tls"], true, "{outbound}");
    assert_eq!(
        outbound["dst_addr"],
        app.echo_addr("server").to_string(),
        "the VIP resolved to the server pod through the EndpointSlice: {outbound}"
    );

    // Everything came through the API: the identity service reviewed the
    // agents' tokens and the agents watch EndpointSlices.
    if let Some(fake) = app.mesh.kube().unwrap().fake_server() {
        let requests = fake.requests();
        let seen = |method: &str, prefix: &str, part: &str| {
            requests
                .iter()
                .any(|(m, p)| m == method && p.starts_with(prefix) && p.contains(part))
        };
        assert!(
            seen("POST", "/apis/authentication.k8s.io/v1/tokenreviews", ""),
            "{requests:?}"
        );
        assert!(
            seen(
                "GET",
                "/apis/discovery.k8s.io/v1/endpointslices",
                "watch=true"
            ),
            "{requests:?}"
        );
    }

    assert_marker_never_in_clear(capture, MARKER, "the mTLS traffic");

    // `sealmesh check` reads the control plane, RBAC, trust roots and issuer
    // through the same API, as a user with the cluster's kubeconfig.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = user_kubeconfig.unwrap_or_else(|| {
        let fake = app.mesh.kube().unwrap().fake_server().unwrap();
        let path = dir.path().join("kubeconfig");
        fake.write_kubeconfig(&path, &fake.admin_token()).unwrap();
        path
    });
    let out = std::process::Command::new(sealmesh_path())
        .args(["check", "-o", "json"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("SEALMESH_CLUSTER_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let report: Value = serde_json::from_slice(&out.stdout).expect("check -o json is JSON");
    let failed: Vec<&Value> = report["categories"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["checks"].as_array().unwrap())
        .filter(|c| c["result"] == "error")
        .collect();
    assert_eq!(failed, Vec::<&Value>::new(), "{}", describe(&out));
    let categories: Vec<&str> = report["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["categoryName"].as_str().unwrap())
        .collect();
    for expected in ["sealmesh-control-plane", "sealmesh-rbac"] {
        assert!(categories.contains(&expected), "{categories:?}");
    }
}

#[test]
fn meshed_pods_reach_a_service_over_mtls_with_everything_from_the_api() {
    service_over_mtls(KubeApi::Fake);
}

#[test]
fn meshed_pods_reach_a_service_over_mtls_through_an_https_api_server_named_by_a_kubeconfig() {
    // What a real server adds: TLS verified by name through the relay, and
    // objects removed again on drop.
    let https = HttpsFakeServer::start();
    service_over_mtls(KubeApi::Kubeconfig(https.kubeconfig.clone()));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pods = runtime.block_on(async {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::all(https.server.client());
        pods.list(&Default::default()).await.unwrap().items.len()
    });
    assert_eq!(pods, 0, "the testbed's pods are gone from the server");
}

#[test]
fn meshed_pods_reach_a_service_over_mtls_on_a_real_api_server() {
    let Some(kubeconfig) = std::env::var_os(REAL_KUBECONFIG_ENV) else {
        eprintln!(
            "note: skipped: set {REAL_KUBECONFIG_ENV} to the kubeconfig of a kube-apiserver (v1.28+) to run this test against it (see docs/ARCHITECTURE.md, Local testbed)"
        );
        return;
    };
    service_over_mtls(KubeApi::Kubeconfig(PathBuf::from(kubeconfig)));
}

#[test]
fn rotating_the_issuer_secret_records_an_event_and_renews_leaves_under_the_new_issuer() {
    let app = App::up(
        KubeApi::Fake,
        MeshOptions {
            identity_args: vec!["--cert-lifetime".into(), "8s".into()],
            ..MeshOptions::default()
        },
    );
    let kube = app.mesh.kube().unwrap();
    assert_eq!(kube.events(EVENT_ISSUER_UPDATED).unwrap().len(), 0);

    // A new issuer under the same root, as cert-manager would write it.
    let root = pki::CaMaterial::read_dir(&app.mesh.pki_dir().join("root")).unwrap();
    let (issuer, _) = pki::generate_issuer(
        &root,
        &CaSpec::valid_for(
            "identity-2.sealmesh.cluster.local",
            Duration::from_secs(3600),
        ),
    )
    .unwrap();
    let mut material = issuer.material();
    material.ca_pem = Some(issuer.ca_pem.clone().into_bytes());
    kube.update_issuer(&material, Layout::Tls).unwrap();

    let deadline = Instant::now() + WAIT;
    let event = loop {
        if let Some(event) = kube.events(EVENT_ISSUER_UPDATED).unwrap().pop() {
            break event;
        }
        assert!(Instant::now() < deadline, "no {EVENT_ISSUER_UPDATED} event");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(event.type_.as_deref(), Some("Normal"));
    assert_eq!(event.involved_object.kind.as_deref(), Some("Deployment"));
    assert_eq!(event.involved_object.name.as_deref(), Some(IDENTITY_NAME));
    assert_eq!(
        event.involved_object.namespace.as_deref(),
        Some(kube.control_namespace())
    );

    // Renewed leaves chain to the new issuer, on both nodes.
    let new_issuer_der = pki::parse_pem_certs(issuer.cert_pem.as_bytes(), "new issuer")
        .unwrap()
        .remove(0);
    for (node, sa) in [("node-0", "client"), ("node-1", "server")] {
        let certs = app.wait_certificates(node, "a leaf under the new issuer", |c| {
            c.certificates.iter().any(|cert| {
                cert.identity == spiffe(sa)
                    && cert.valid
                    && cert.chain.get(1).map(Vec::as_slice) == Some(new_issuer_der.as_ref())
            })
        });
        assert_eq!(certs.wanted, [spiffe(sa)], "{node}");
    }
    app.client_ok(app.echo_addr("server"), "after the rotation");
}

#[test]
fn a_new_root_in_the_trust_roots_configmap_is_hot_reloaded_by_running_agents() {
    let app = App::up(KubeApi::Fake, MeshOptions::default());
    let pids: Vec<Option<u32>> = ["node-0", "node-1"]
        .iter()
        .map(|n| app.mesh.agent_pid(n))
        .collect();
    let old_bundle = std::fs::read_to_string(app.mesh.pki_dir().join("ca-bundle.crt")).unwrap();
    assert_eq!(app.certificates("node-0").trust_anchors_pem, old_bundle);

    let next_root = pki::generate_root(&CaSpec::valid_for(
        "root-2.sealmesh.cluster.local",
        Duration::from_secs(3600),
    ))
    .unwrap();
    let bundle = format!("{old_bundle}{}", next_root.cert_pem);
    app.mesh
        .kube()
        .unwrap()
        .update_trust_roots(bundle.as_bytes())
        .unwrap();
    for node in ["node-0", "node-1"] {
        app.wait_certificates(node, "both roots trusted", |c| {
            c.trust_anchors_pem == bundle
        });
    }
    // Same processes: reloaded, not restarted; traffic still flows.
    let after: Vec<Option<u32>> = ["node-0", "node-1"]
        .iter()
        .map(|n| app.mesh.agent_pid(n))
        .collect();
    assert_eq!(after, pids);
    app.client_ok(app.echo_addr("server"), "after the reload");
}

#[test]
fn pods_created_after_start_up_are_meshed_and_deleted_ones_disappear() {
    let mut app = App::up(KubeApi::Fake, MeshOptions::default());
    let pid = app.mesh.agent_pid("node-1");
    assert_eq!(app.certificates("node-1").wanted, [spiffe("server")]);

    // Scheduler + kubelet: object, cgroup, status; the agent watches it in.
    let late = app.mesh.create_pod(APP_NS, "late").unwrap();
    assert!(late.container_cgroup.is_dir());
    app.serve("late");
    app.mesh.wait_for_certificates("node-1").unwrap();
    let certs = app.certificates("node-1");
    let mut wanted = certs.wanted.clone();
    wanted.sort();
    assert_eq!(wanted, [spiffe("late"), spiffe("server")]);

    app.client_ok(app.echo_addr("late"), "hello late pod");
    let inbound = app.wait_access("node-1", "inbound mTLS connection to shop/late", |e| {
        e["direction"] == "inbound" && e["dst"] == "shop/late"
    });
    assert_eq!(inbound["server_id"], spiffe("late"), "{inbound}");
    assert_eq!(inbound["client_id"], spiffe("client"), "{inbound}");
    assert_eq!(inbound["tls"], true, "{inbound}");

    // Deleted: gone from the agent's view, its certificate dropped.
    app.mesh.delete_pod(APP_NS, "late").unwrap();
    let certs = app.wait_certificates("node-1", "the late pod's identity dropped", |c| {
        c.wanted == [spiffe("server")]
            && c.certificates
                .iter()
                .all(|cert| cert.identity != spiffe("late"))
    });
    assert_eq!(certs.wanted, [spiffe("server")]);
    assert_eq!(
        app.mesh.agent_pid("node-1"),
        pid,
        "the agent was not restarted"
    );
    app.client_ok(app.echo_addr("server"), "the others still work");
}

/// What one start of `shop/starter` did: its init process's and its app's
/// connection, each succeeded or not.
struct Start {
    init_ok: bool,
    app_ok: bool,
}

#[test]
fn pods_connecting_as_they_start_never_send_their_first_bytes_in_clear() {
    const MARKER: &str = "sealmesh-kube-first-packet-marker-90d4";
    const STARTS: usize = 100;
    let mut app = App::up(
        KubeApi::Fake,
        MeshOptions {
            // Logs each connection of a pod the kernel did not know yet.
            agent_log_level: Some("info,sealmesh_agent::proxy::outbound=debug".into()),
            ..MeshOptions::default()
        },
    );
    let capture = capture_underlay(&app.mesh, &[MARKER]);
    let netns = app
        .mesh
        .testbed()
        .pod_netns(APP_NS, "starter")
        .unwrap()
        .to_owned();
    let server = app.echo_addr("server");
    let client = |cgroup: &Path| {
        let mut cmd = testapp::client(testapp_path(), server, MARKER, 1);
        cmd.args(["--timeout-secs", "10"]);
        let out = netns::spawn_in(&netns, cgroup, cmd)
            .expect("client starts")
            .wait_with_output()
            .expect("client finishes");
        out.status.success()
    };

    let started = Instant::now();
    let mut starts = Vec::with_capacity(STARTS);
    for _ in 0..STARTS {
        // As a kubelet starts a pod: bound to the node, its cgroups made; an
        // init container runs first, then the app, which connects at once;
        // only then is the pod reported Running.
        let pod = app.mesh.schedule_pod(APP_NS, "starter").unwrap();
        let init = pod.pod_cgroup.join(format!("init-{}", pod.container_id));
        cgroup::create(&init).unwrap();
        let init_ok = client(&init);
        let app_ok = client(&pod.container_cgroup);
        app.mesh.report_pod_running(APP_NS, "starter").unwrap();
        app.mesh.delete_pod(APP_NS, "starter").unwrap();
        starts.push(Start { init_ok, app_ok });
    }
    let elapsed = started.elapsed();

    let connections = 2 * STARTS;
    let succeeded = starts
        .iter()
        .map(|s| usize::from(s.init_ok) + usize::from(s.app_ok))
        .sum::<usize>();
    let mut lines = Vec::new();
    app.mesh
        .wait_for_agent_log("node-0", "an access-log line per connection", |all| {
            lines = all
                .iter()
                .filter(|l| l["target"] == ACCESS_LOG_TARGET && l["src"] == "shop/starter")
                .cloned()
                .collect();
            lines.len() >= connections
        })
        .unwrap();
    let plaintext: Vec<&Value> = lines
        .iter()
        .filter(|l| l["tls"] != true && l["error"] == "")
        .collect();
    assert!(plaintext.is_empty(), "carried in plaintext: {plaintext:#?}");
    let secured = lines.iter().filter(|l| l["tls"] == true).count();
    assert_eq!(secured, succeeded, "every success was mTLS: {lines:#?}");
    let refused: Vec<&Value> = lines.iter().filter(|l| l["error"] != "").collect();
    assert!(
        refused
            .iter()
            .all(|l| l["refused_reason"].as_str().is_some_and(|r| !r.is_empty())),
        "every refusal names its reason: {refused:#?}"
    );
    // Connections the kernel redirected before the agent knew the pod:
    // without the hold they would have left in clear.
    let unknown_at_connect = app
        .mesh
        .agent_log_lines("node-0")
        .unwrap()
        .iter()
        .filter(|l| {
            l["message"] == "connection of a pod the kernel did not know resolved"
                && l["pod"] == "starter"
        })
        .count();
    let mut held_ms: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["duration_ms"].as_u64())
        .collect();
    held_ms.sort_unstable();
    eprintln!(
        "{STARTS} starts in {elapsed:?}: {succeeded}/{connections} connections over mTLS, {} refused, {unknown_at_connect} from a pod the kernel did not know yet; connection durations (ms) p50 {} p99 {} max {}",
        refused.len(),
        held_ms[held_ms.len() / 2],
        held_ms[held_ms.len() * 99 / 100],
        held_ms[held_ms.len() - 1],
    );
    // Starting pods are secured, not refused (a refusal is safe, but would
    // break the app): at most a few may outlast the hold under load.
    assert!(
        succeeded * 100 >= connections * 95,
        "{succeeded}/{connections} succeeded; refusals: {refused:#?}"
    );

    // The agents run in their DaemonSet pods' cgroups, below the kubelet's
    // pod parents, as in a cluster: their own connections (API, identity
    // service, peers) are never taken for a pod's.
    for node in ["node-0", "node-1"] {
        let agent = app.mesh.kube().unwrap().agent_pod(node).unwrap();
        let agent_cgroup = cgroup::of_process(app.mesh.agent_pid(node).unwrap()).unwrap();
        assert!(
            agent_cgroup.contains("kubepods") && agent_cgroup.contains(&agent.container_id),
            "{node}: the agent runs in {agent_cgroup}"
        );
        let status = sealmesh_agent::ebpf::Redirector::pinned_status(
            &app.mesh.testbed().node_bpffs_dir(node).unwrap(),
        )
        .unwrap();
        assert_eq!(
            status.agent_cgroups, 2,
            "{node}: its container's and its pod's: {status:?}"
        );
        let agents_own: Vec<Value> = app
            .mesh
            .access_log(node)
            .unwrap()
            .into_iter()
            .filter(|l| l["src"].as_str().unwrap_or("").starts_with("sealmesh/"))
            .collect();
        assert!(
            agents_own.is_empty(),
            "{node} redirected the agent: {agents_own:#?}"
        );
    }

    assert_marker_never_in_clear(capture, MARKER, "the traffic");
}

/// Deleting the agents' DaemonSet (what `kubectl delete -k deploy/base`
/// does) removes sealmesh from each node as its agent stops: the node's pods
/// connect directly again instead of being refused for ever by a redirect
/// nobody serves. An agent stopped while its DaemonSet exists (a restart, a
/// drain) keeps the redirection: meshed connections fail closed meanwhile.
#[test]
fn deleting_the_agent_daemonset_removes_sealmesh_from_each_node_as_its_agent_stops() {
    let mut app = App::up(KubeApi::Fake, MeshOptions::default());
    let server = app.echo_addr("server");
    app.client_ok(server, "meshed");
    let links = |app: &App, node: &str| {
        let dir = app.mesh.testbed().node_bpffs_dir(node).unwrap();
        std::fs::read_dir(dir.join("links")).map_or(0, |entries| entries.count())
    };
    assert!(links(&app, "node-0") > 0, "the redirection is pinned");

    let stopped = app.mesh.terminate_agent("node-0").unwrap();
    assert!(stopped.success(), "{stopped}");
    assert!(
        links(&app, "node-0") > 0,
        "a stop with the DaemonSet in place keeps the redirection"
    );
    let refused = app.client(server, "no agent");
    assert!(
        !refused.status.success(),
        "meshed connections fail closed while no agent runs: {}",
        describe(&refused)
    );
    app.mesh.start_agent("node-0").unwrap();
    app.client_ok(server, "agent back");

    // As `kubectl delete -k` does: node-0's agent stops after the DaemonSet
    // is gone, node-1's after its RBAC is gone too (it can no longer ask).
    app.mesh.kube().unwrap().delete_agent_daemonset().unwrap();
    for node in ["node-0", "node-1"] {
        if node == "node-1" {
            app.mesh
                .kube()
                .unwrap()
                .delete_agent_role_binding()
                .unwrap();
        }
        let stopped = app.mesh.terminate_agent(node).unwrap();
        assert!(stopped.success(), "{node}: {stopped}");
        assert_eq!(links(&app, node), 0, "{node}: no link pinned");
        let dir = app.mesh.testbed().node_bpffs_dir(node).unwrap();
        assert!(!dir.exists(), "{node}: the pin directory is gone");
        let removed = app
            .mesh
            .agent_log_lines(node)
            .unwrap()
            .into_iter()
            .any(|l| l["message"] == SEALMESH_REMOVED_MESSAGE);
        assert!(removed, "{node}: the agent said it removed sealmesh");
    }
    // No agent anywhere, and the pods talk again: directly, in plaintext.
    let out = app.client_ok(server, "after uninstall");
    assert!(out.contains("ok "), "{out}");
}
