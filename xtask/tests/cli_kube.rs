//! The operator CLI on a Kubernetes cluster, as a user with only a
//! kubeconfig runs it: no cluster file, no root (the binary runs as
//! `nobody`, so it could not enter a node's network namespace), agents found
//! as the DaemonSet's pods and reached by port-forward through the API
//! server (the testbed's Kubernetes mode on the in-process API server, real
//! agents, real identity service, real mTLS).

use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use sealmesh_common::consts::{AGENT_ADMIN_PORT, MESH_LABEL, MESH_LABEL_ENABLED};
use serde_json::Value;
use xtask::{
    mesh::{Mesh, MeshOptions},
    testbed::{ChildGuard, PodSpec, TestbedSpec, kube::KubeMode},
};

mod support;

use support::{
    APP_NS, ECHO_PORT, PLAIN_NS, client_in_pod, describe, echo_addr, echo_service,
    mesh_with_echo_servers, sealmesh_path, stdout,
};

const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Not the default: the CLI must learn it from the agents, not assume it.
const TRUST_DOMAIN: &str = "mesh.example";
const WAIT: Duration = Duration::from_secs(20);
/// The unprivileged user the CLI runs as (`nobody`).
const UNPRIVILEGED_UID: u32 = 65534;

/// node-0: `client`, `neighbour` (meshed); node-1: `server` (meshed, Service
/// `server`), `legacy/plain` (unmeshed).
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .trust_domain(TRUST_DOMAIN)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(PLAIN_NS, &[])
        .pod(PodSpec::new(APP_NS, "client", "client", 0).label("app", "client"))
        .pod(PodSpec::new(APP_NS, "neighbour", "neighbour", 0).label("app", "neighbour"))
        .pod(PodSpec::new(APP_NS, "server", "server", 1).label("app", "server"))
        .pod(PodSpec::new(PLAIN_NS, "plain", "default", 1).label("app", "plain"))
        .service(echo_service("server", SERVICE_VIP, 80))
}

fn spiffe(service_account: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{APP_NS}/sa/{service_account}")
}

struct App {
    mesh: Mesh,
    _servers: Vec<ChildGuard>,
    /// Holds the user's kubeconfig.
    _dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl App {
    fn up() -> Self {
        let (mesh, _servers) = mesh_with_echo_servers(
            &spec(),
            MeshOptions {
                kubernetes: Some(KubeMode::fake()),
                ..MeshOptions::default()
            },
            &[
                (APP_NS, "server"),
                (APP_NS, "neighbour"),
                (PLAIN_NS, "plain"),
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        let fake = mesh.kube().unwrap().fake_server().unwrap();
        write_readable_kubeconfig(
            dir.path(),
            &kubeconfig,
            &fake.kubeconfig_yaml(&fake.admin_token()),
        );
        Self {
            mesh,
            _servers,
            _dir: dir,
            kubeconfig,
        }
    }

    /// `sealmesh` as the user runs it: `KUBECONFIG`, no cluster file, not root.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(sealmesh_path());
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("SEALMESH_CLUSTER_FILE")
            .env("HOME", "/nonexistent")
            .uid(UNPRIVILEGED_UID)
            .gid(UNPRIVILEGED_UID);
        cmd
    }

    fn sealmesh(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("sealmesh runs")
    }

    fn spawn_tap(&self, args: &[&str]) -> Child {
        self.command(&[&["tap"], args].concat())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// One echo round trip from `client` to `ns/pod`.
    fn connect(&self, ns: &str, pod: &str) {
        let testbed = self.mesh.testbed();
        let out = client_in_pod(
            testbed,
            APP_NS,
            "client",
            echo_addr(testbed, ns, pod),
            "hi",
            &[],
        );
        assert!(
            out.status.success(),
            "client -> {ns}/{pod}: {}",
            describe(&out)
        );
    }

    /// Port-forward requests the API server received for `pod`.
    fn port_forwards_to(&self, pod: &str) -> usize {
        let path =
            format!("/api/v1/namespaces/sealmesh/pods/{pod}/portforward?&ports={AGENT_ADMIN_PORT}");
        let fake = self.mesh.kube().unwrap().fake_server().unwrap();
        fake.requests()
            .iter()
            .filter(|(method, p)| method == "GET" && *p == path)
            .count()
    }
}

/// The kubeconfig, readable by the unprivileged user. It holds the admin
/// token of this test's own in-process API server, which dies with it.
fn write_readable_kubeconfig(dir: &Path, path: &Path, yaml: &str) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(yaml.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
}

/// The `√`/`×`/`‼` lines of a `check` output.
fn status_lines(out: &Output) -> Vec<String> {
    stdout(out)
        .lines()
        .filter(|l| l.starts_with('√') || l.starts_with('×') || l.starts_with('‼'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_certs_tap_edges_and_why_reach_the_agents_through_the_api_server() {
    let app = App::up();

    // check --proxy: the PKI from the trust-roots ConfigMap and the issuer
    // Secret, both agents' live certificates through port-forward.
    let out = app.sealmesh(&["check", "--proxy"]);
    assert!(out.status.success(), "{}", describe(&out));
    let lines = status_lines(&out);
    for expected in [
        "√ the identity service is available",
        "√ an agent runs on every node",
        "√ certificate config is valid",
        "√ issuer cert is issued by the trust anchor",
        "√ issuer can sign certificates",
        "√ agents are running and reachable",
        "√ agents are ready",
        "√ agents trust the checked trust anchors",
        "√ data plane certificates chain to the trust anchors",
        "√ every meshed ServiceAccount has a valid certificate",
    ] {
        assert!(
            lines.iter().any(|l| l == expected),
            "{expected:?} missing in:\n{}",
            describe(&out)
        );
    }
    assert!(
        stdout(&out).ends_with("Status check results are √\n"),
        "{}",
        describe(&out)
    );
    for node in ["node-0", "node-1"] {
        assert!(
            app.port_forwards_to(&format!("sealmesh-agent-{node}")) > 0,
            "no port-forward to the agent of {node}"
        );
    }

    // Both agents' certificates, verified against the ConfigMap's anchors.
    for (node, accounts) in [
        ("node-0", &["client", "neighbour"][..]),
        ("node-1", &["server"]),
    ] {
        let out = app.sealmesh(&["certs", "inspect", "--agent", node]);
        assert!(out.status.success(), "{}", describe(&out));
        let text = stdout(&out);
        for account in accounts {
            assert!(
                text.contains(&format!(
                    "Identity: {}\n  Status:        valid\n",
                    spiffe(account)
                )),
                "{text}"
            );
        }
        assert_eq!(
            text.matches("Chain: √ verifies to trust anchor ").count(),
            accounts.len(),
            "{text}"
        );
    }
    // An identity DNS name is read in the agents' trust domain.
    let out = app.sealmesh(&[
        "certs",
        "inspect",
        "--agent",
        "node-0",
        "--identity",
        &format!("neighbour.{APP_NS}.serviceaccount.identity.sealmesh.{TRUST_DOMAIN}"),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout(&out).contains(&format!("Identity: {}\n", spiffe("neighbour"))),
        "{}",
        describe(&out)
    );

    // tap sees a cross-node connection made while it runs, over mTLS; a
    // Deployment target is the pods its selector matches (not its name),
    // matchExpressions included.
    let kube = app.mesh.kube().unwrap();
    let deployment: k8s_openapi::api::apps::v1::Deployment =
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "frontend", "namespace": APP_NS },
            "spec": {
                "selector": {
                    "matchExpressions": [
                        { "key": "app", "operator": "In", "values": ["client", "web"] },
                        { "key": "canary", "operator": "DoesNotExist" },
                    ],
                },
                "template": {
                    "metadata": { "labels": { "app": "client" } },
                    "spec": { "containers": [{ "name": "app", "image": "app" }] },
                },
            },
        }))
        .unwrap();
    kube.block_on(
        kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(kube.client(), APP_NS)
            .create(&Default::default(), &deployment),
    )
    .unwrap();
    let out = app.sealmesh(&["tap", "deploy/nothing", "-n", APP_NS, "--max", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("read Deployment shop/nothing"),
        "{}",
        describe(&out)
    );
    let mut tap = app.spawn_tap(&[
        "deploy/frontend",
        "-n",
        APP_NS,
        "--max",
        "4",
        "--timeout",
        "20s",
    ]);
    let mut tap_err = BufReader::new(tap.stderr.take().unwrap());
    let mut line = String::new();
    tap_err.read_line(&mut line).unwrap();
    assert_eq!(line, "tapping 2 agent(s)\n");
    app.connect(APP_NS, "server");
    let tapped = tap.wait_with_output().unwrap();
    assert!(tapped.status.success(), "{}", describe(&tapped));
    let tapped = stdout(&tapped);
    let server_ip = app
        .mesh
        .testbed()
        .cluster()
        .pod(APP_NS, "server")
        .unwrap()
        .ip;
    let outbound_open = tapped
        .lines()
        .find(|l| l.starts_with("tcp ") && l.contains(" proxy=out "))
        .unwrap_or_else(|| panic!("no outbound open line in:\n{tapped}"));
    assert!(
        outbound_open.contains(&format!(
            " dst={server_ip}:{ECHO_PORT} src_pod=shop/client dst_pod=shop/server tls=true client_id={} server_id={}",
            spiffe("client"),
            spiffe("server")
        )),
        "{outbound_open}"
    );

    // edges: the secured cross-node pair and the unmeshed destination.
    app.connect(PLAIN_NS, "plain");
    let deadline = Instant::now() + WAIT;
    let rows = loop {
        let out = app.sealmesh(&["edges", "-n", APP_NS, "-o", "json"]);
        assert!(out.status.success(), "{}", describe(&out));
        let json: Value = serde_json::from_slice(&out.stdout).expect("edges -o json is JSON");
        let rows = json.as_array().unwrap().clone();
        if rows.len() == 2 || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    let plain = &rows[0];
    assert_eq!(plain["dst"], "plain");
    assert_eq!(plain["secured"], false);
    assert_eq!(plain["no_tls_reason"], "not_meshed");
    let server = &rows[1];
    assert_eq!(server["src"], "client");
    assert_eq!(server["dst"], "server");
    assert_eq!(server["secured"], true);
    assert_eq!(server["tls"], true);
    assert_eq!(server["client_id"], spiffe("client"));
    assert_eq!(server["server_id"], spiffe("server"));

    // why: pods, Services and namespaces from the API, both agents' views.
    let out = app.sealmesh(&["why", "shop/client", "shop/server"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("shop/client -> shop/server: mTLS\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "1 connection(s), secured=√ client_id={} server_id={}",
            spiffe("client"),
            spiffe("server")
        )),
        "{text}"
    );
    // An address of the agents' Service range that no Service holds: held,
    // then refused, as the agents enforce (not "outside the cluster").
    let out = app.sealmesh(&["why", "shop/client", "10.100.7.7:80"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "10.100.7.7:80 is in the cluster's pod or Service networks but no pod or Service of the cluster"
        ),
        "{}",
        describe(&out)
    );
    let out = app.sealmesh(&["why", "client", "legacy/plain", "-n", APP_NS]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains(
            "why: destination legacy/plain is not meshed (namespace legacy lacks the label sealmesh.io/mesh=enabled)"
        ),
        "{}",
        describe(&out)
    );

    // With cert-manager rotating the issuer, its Certificate must be ready.
    let kube = app.mesh.kube().unwrap();
    let certificates: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        kube.client(),
        "sealmesh",
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "cert-manager.io",
            "v1",
            "Certificate",
        )),
    );
    let certificate: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
        "metadata": { "name": "sealmesh-identity-issuer", "namespace": "sealmesh" },
        "spec": { "secretName": "sealmesh-identity-issuer", "isCA": true },
    }))
    .unwrap();
    let ready = |status: &str, message: &str| {
        serde_json::json!({ "status": { "conditions": [
            { "type": "Ready", "status": status, "message": message }
        ]}})
    };
    kube.block_on(certificates.create(&Default::default(), &certificate))
        .unwrap();
    kube.block_on(certificates.patch_status(
        "sealmesh-identity-issuer",
        &Default::default(),
        &kube::api::Patch::Merge(ready(
            "False",
            "Issuing certificate as Secret does not exist",
        )),
    ))
    .unwrap();
    let out = app.sealmesh(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains(
            "× cert-manager's issuer Certificate is ready\n    Issuing certificate as Secret does not exist"
        ),
        "{}",
        describe(&out)
    );
    kube.block_on(certificates.patch_status(
        "sealmesh-identity-issuer",
        &Default::default(),
        &kube::api::Patch::Merge(ready(
            "True",
            "Certificate is up to date and has not expired",
        )),
    ))
    .unwrap();
    let out = app.sealmesh(&["check"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        status_lines(&out).contains(&"√ cert-manager's issuer Certificate is ready".to_owned()),
        "{}",
        describe(&out)
    );

    // An agent that is down is named, the command fails, the other answers.
    let mut app = app;
    app.mesh.stop_agent("node-1").unwrap();
    let out = app.sealmesh(&["check", "--proxy"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains(
            "× agents are running and reachable\n    agent on node node-1 is not reachable at pod sealmesh/sealmesh-agent-node-1 port 15000 (port-forward through the Kubernetes API): an error occurred forwarding 15000 -> 15000"
        ),
        "{text}"
    );
    assert!(!text.contains("agent on node node-0"), "{text}");
    assert!(text.contains("\n√ agents are ready\n"), "{text}");
    assert!(
        text.contains(
            "× an agent runs on every node\n    DaemonSet sealmesh/sealmesh-agent: 1 of 2 available"
        ),
        "the control plane names the missing agent: {text}"
    );
    let out = app.sealmesh(&["edges", "-n", APP_NS, "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "warning: edges are incomplete: agent on node node-1 is not reachable at pod sealmesh/sealmesh-agent-node-1 port 15000"
        ),
        "{}",
        describe(&out)
    );
    let json: Value = serde_json::from_slice(&out.stdout).expect("edges -o json is JSON");
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|row| row["dst"] == "server" && row["secured"] == true),
        "node-0's view of the secured edge is still shown: {json}"
    );

    // A user RBAC does not allow port-forward is told so.
    let fake = app.mesh.kube().unwrap().fake_server().unwrap();
    fake.deny_access("", "pods/portforward", "create");
    let out = app.sealmesh(&["check", "--proxy"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains(
            "agent on node node-0 is not reachable at pod sealmesh/sealmesh-agent-node-0 port 15000 (port-forward through the Kubernetes API): pods \"sealmesh-agent-node-0\" is forbidden: User \"kubernetes-admin\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"sealmesh\" (403 Forbidden); your user lacks that permission"
        ),
        "{}",
        describe(&out)
    );
}

/// The one warning of a healthy testbed: its issuer lives 48 hours.
const ISSUER_WARNING: &str = "‼ issuer cert is valid for at least 60 days";

/// `check`'s RBAC section and its `-o json` and `-o short` output: the
/// testbed applies deploy/base's ServiceAccounts, roles and bindings, so the
/// section passes; without the agent's ClusterRoleBinding every permission it
/// granted is named; a user who may not read RBAC gets a warning.
#[test]
fn check_verifies_the_control_planes_rbac_and_prints_json_and_short() {
    use k8s_openapi::api::{core::v1::ServiceAccount, rbac::v1::ClusterRoleBinding};

    let app = App::up();
    let out = app.sealmesh(&["check", "-o", "json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("check -o json is JSON");
    assert_eq!(json["success"], true, "{json:#}");
    let categories = json["categories"].as_array().unwrap();
    let names: Vec<&str> = categories
        .iter()
        .map(|c| c["categoryName"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "sealmesh-control-plane",
            "sealmesh-rbac",
            "sealmesh-identity",
            "sealmesh-policies"
        ]
    );
    assert_eq!(
        categories[1]["checks"],
        serde_json::json!([
            { "description": "control plane ServiceAccounts exist", "result": "success" },
            { "description": "control plane ServiceAccounts have the permissions they need", "result": "success" },
        ])
    );
    // Short: only the testbed's issuer warning (it lives 48 hours).
    let out = app.sealmesh(&["check", "-o", "short"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(status_lines(&out), [ISSUER_WARNING], "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("sealmesh-identity\n-----------------\n‼ ")
            && text.ends_with("\n\nStatus check results are √\n"),
        "{text}"
    );

    // The agent's ClusterRoleBinding deleted: what it granted is missing.
    let kube = app.mesh.kube().unwrap();
    let bindings: kube::Api<ClusterRoleBinding> = kube::Api::all(kube.client());
    let mut binding = kube.block_on(bindings.get("sealmesh-agent")).unwrap();
    kube.block_on(bindings.delete("sealmesh-agent", &Default::default()))
        .unwrap();
    let hint = "`sealmesh install --node-cidrs <your nodes' CIDRs> | kubectl apply -f -` applies the ServiceAccounts, roles and bindings sealmesh needs; \
                pass it your current trust anchors and issuer (--identity-trust-anchors-file, \
                --identity-issuer-certificate-file, --identity-issuer-key-file), or it generates new ones that replace them";
    let missing = [
        "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch pods cluster-wide",
        "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch nodes cluster-wide",
        "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch services cluster-wide",
        "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch namespaces cluster-wide",
        "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch endpointslices.discovery.k8s.io cluster-wide",
        "ServiceAccount sealmesh/sealmesh-agent cannot get, list, watch authorizationpolicies.sealmesh.io cluster-wide",
        "ServiceAccount sealmesh/sealmesh-agent cannot create events cluster-wide",
    ];
    let failed_check = format!(
        "× control plane ServiceAccounts have the permissions they need\n{}    see: {hint}\n",
        missing
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    let out = app.sealmesh(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains(&format!(
            "sealmesh-rbac\n-------------\n√ control plane ServiceAccounts exist\n{failed_check}\n"
        )),
        "{}",
        describe(&out)
    );
    let out = app.sealmesh(&["check", "-o", "short"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "sealmesh-rbac\n-------------\n{failed_check}\nsealmesh-identity\n"
        )) && text.ends_with("\n\nStatus check results are ×\n"),
        "{text}"
    );
    assert_eq!(
        status_lines(&out),
        [
            "× control plane ServiceAccounts have the permissions they need",
            ISSUER_WARNING
        ]
    );
    let out = app.sealmesh(&["check", "-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("check -o json is JSON");
    assert_eq!(json["success"], false);
    assert_eq!(
        json["categories"][1]["checks"][1],
        serde_json::json!({
            "description": "control plane ServiceAccounts have the permissions they need",
            "result": "error",
            "error": missing.join("\n"),
            "hint": hint,
        })
    );

    // Restored, it passes again.
    binding.metadata.resource_version = None;
    binding.metadata.uid = None;
    kube.block_on(bindings.create(&Default::default(), &binding))
        .unwrap();
    let out = app.sealmesh(&["check"]);
    assert!(out.status.success(), "{}", describe(&out));

    // A user who may not list ClusterRoleBindings is warned, not failed.
    let fake = kube.fake_server().unwrap();
    fake.deny_access("rbac.authorization.k8s.io", "clusterrolebindings", "list");
    let out = app.sealmesh(&["check", "-o", "short"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout(&out).starts_with(
        "sealmesh-rbac\n-------------\n\
         ‼ control plane ServiceAccounts have the permissions they need\n    \
         cannot list ClusterRoleBindings from the Kubernetes API: clusterrolebindings.rbac.authorization.k8s.io is forbidden: \
         User \"kubernetes-admin\" cannot list resource \"clusterrolebindings\" in API group \"rbac.authorization.k8s.io\" at the cluster scope \
         (403 Forbidden); your user lacks that permission (ask for it, or use another --context)\n    \
         see: this check reads ClusterRoles, ClusterRoleBindings, and the Roles and RoleBindings of namespace sealmesh \
         (rbac.authorization.k8s.io): ask for get and list on them\n\n\
         sealmesh-identity\n"
        ),
        "{}",
        describe(&out)
    );

    // A missing ServiceAccount is named.
    let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(kube.client(), "sealmesh");
    kube.block_on(accounts.delete("sealmesh-identity", &Default::default()))
        .unwrap();
    let out = app.sealmesh(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains(&format!(
            "× control plane ServiceAccounts exist\n    ServiceAccount sealmesh/sealmesh-identity does not exist\n    see: {hint}\n"
        )),
        "{}",
        describe(&out)
    );
}
