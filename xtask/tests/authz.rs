//! Authorization policies end to end on the testbed (root, real kernel
//! eBPF, real mTLS, real identity service): the destination's agent allows
//! by principal, by namespace and by port, a DENY wins over an ALLOW, a pod
//! no policy selects accepts everyone, a dry-run policy reports and refuses
//! nothing, denied connections are reset at once and named in the access
//! log, metrics, edges and `why`, and a policy change applies to new
//! connections and resets open ones it now denies, across nodes (HBONE) and
//! on one node (secured local). Local mode reads the cluster file,
//! Kubernetes mode the `AuthorizationPolicy` objects of the API.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    process::{Command, Output},
    time::{Duration, Instant},
};

use sealmesh_common::{
    authz::{AuthorizationPolicy, DRY_RUN_ANNOTATION, DRY_RUN_VALUE},
    consts::{AGENT_METRICS_PORT, MESH_LABEL, MESH_LABEL_ENABLED},
};
use serde_json::Value;
use xtask::{
    mesh::{Mesh, MeshOptions},
    testapp,
    testbed::{ChildGuard, PodSpec, TestbedSpec, kube::KubeMode},
};

mod support;

use support::{
    ECHO_PORT, FollowedLines, describe, echo_addr, mesh_with_echo_servers, sealmesh_path,
    testapp_path, wait_access,
};

const SHOP: &str = "shop";
const OPS: &str = "ops";
/// Not meshed: its connections are plaintext.
const LEGACY: &str = "legacy";
/// How long a client waits for its connection and echo: a denied client
/// must fail well within it (reset, not a timeout).
const CLIENT_TIMEOUT_SECS: u64 = 10;
/// A denied client is reset at once; this bounds "at once" loosely enough
/// for a loaded machine and far below a timeout.
const PROMPT: Duration = Duration::from_secs(3);

/// node-0: `shop/frontend`, `shop/bot`, `ops/prom`, `legacy/outsider` (clients) and
/// `shop/web-local` (app=web, served on the clients' node);
/// node-1: `shop/web` (app=web), `shop/db` (app=db), `ops/api`.
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(SHOP, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(OPS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .pod(PodSpec::new(SHOP, "frontend", "frontend", 0))
        .pod(PodSpec::new(SHOP, "bot", "bot", 0))
        .pod(PodSpec::new(OPS, "prom", "prom", 0))
        .pod(PodSpec::new(SHOP, "web-local", "web", 0).label("app", "web"))
        .pod(PodSpec::new(SHOP, "web", "web", 1).label("app", "web"))
        .pod(PodSpec::new(SHOP, "db", "db", 1).label("app", "db"))
        .pod(PodSpec::new(OPS, "api", "api", 1))
        .namespace(LEGACY, &[])
        .pod(PodSpec::new(LEGACY, "outsider", "default", 0))
}

const SERVERS: [(&str, &str); 4] = [
    (SHOP, "web-local"),
    (SHOP, "web"),
    (SHOP, "db"),
    (OPS, "api"),
];

/// `web-allow` admits frontend and bot by principal (both forms) and the
/// `ops` namespace on port 9 only; `deny-bot` denies bot everywhere in
/// `shop`; `db-frontend-only` (dry run) would admit only frontend to db.
fn policies(ops_port: u16) -> Vec<AuthorizationPolicy> {
    let policy = |name: &str, spec: &str, dry_run: bool| AuthorizationPolicy {
        name: name.into(),
        namespace: SHOP.into(),
        annotations: if dry_run {
            [(DRY_RUN_ANNOTATION.to_owned(), DRY_RUN_VALUE.to_owned())].into()
        } else {
            Default::default()
        },
        spec: serde_yaml_ng::from_str(spec).unwrap(),
    };
    vec![
        policy(
            "web-allow",
            &format!(
                r#"
selector: {{ matchLabels: {{ app: web }} }}
action: ALLOW
rules:
  - from: [{{ source: {{ principals: ["cluster.local/ns/shop/sa/frontend", "spiffe://cluster.local/ns/shop/sa/bot"] }} }}]
  - from: [{{ source: {{ namespaces: [ops] }} }}]
    to: [{{ operation: {{ ports: ["{ops_port}"] }} }}]
"#
            ),
            false,
        ),
        policy(
            "deny-bot",
            r#"{ action: DENY, rules: [{ from: [{ source: { principals: ["*/sa/bot"] } }] }] }"#,
            false,
        ),
        policy(
            "db-frontend-only",
            r#"{ selector: { matchLabels: { app: db } }, rules: [{ from: [{ source: { principals: ["cluster.local/ns/shop/sa/frontend"] } }] }] }"#,
            true,
        ),
    ]
}

/// Denies frontend everything in `shop`: added while its connections are open.
fn deny_frontend() -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: "deny-frontend".into(),
        namespace: SHOP.into(),
        annotations: Default::default(),
        spec: serde_yaml_ng::from_str(
            r#"{ action: DENY, rules: [{ from: [{ source: { principals: ["cluster.local/ns/shop/sa/frontend"] } }] }] }"#,
        )
        .unwrap(),
    }
}

struct App {
    mesh: Mesh,
    _servers: Vec<ChildGuard>,
    /// Kubernetes mode: the CLI's kubeconfig (the API's admin).
    kubeconfig: Option<tempfile::NamedTempFile>,
}

impl App {
    fn up(options: MeshOptions) -> Self {
        let (mesh, _servers) = mesh_with_echo_servers(&spec(), options, &SERVERS);
        let kubeconfig = mesh.kube().map(|kube| {
            let fake = kube.fake_server().unwrap();
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), fake.kubeconfig_yaml(&fake.admin_token())).unwrap();
            file
        });
        Self {
            mesh,
            _servers,
            kubeconfig,
        }
    }

    fn echo(&self, ns: &str, pod: &str) -> SocketAddr {
        echo_addr(self.mesh.testbed(), ns, pod)
    }

    fn client(&self, from: &str, to: (&str, &str), hold: Option<u64>) -> ChildGuard {
        let (from_ns, from_pod) = from.split_once('/').unwrap();
        let mut cmd = testapp::client(testapp_path(), self.echo(to.0, to.1), "authz?", 1);
        cmd.args(["--timeout-secs", &CLIENT_TIMEOUT_SECS.to_string()]);
        if let Some(secs) = hold {
            cmd.args(["--hold-secs", &secs.to_string()]);
        }
        self.mesh
            .testbed()
            .spawn_in_pod(from_ns, from_pod, cmd)
            .expect("client starts")
    }

    /// Runs a client to completion, with how long it took.
    fn connect(&self, from: &str, to: (&str, &str)) -> (Output, Duration) {
        let started = Instant::now();
        let out = self.client(from, to, None).wait_with_output().unwrap();
        (out, started.elapsed())
    }

    fn allowed(&self, from: &str, to: (&str, &str)) {
        let (out, _) = self.connect(from, to);
        assert!(
            out.status.success(),
            "{from} -> {}/{} should be allowed: {}",
            to.0,
            to.1,
            describe(&out)
        );
    }

    fn denied(&self, from: &str, to: (&str, &str)) {
        let (out, took) = self.connect(from, to);
        assert!(
            !out.status.success(),
            "{from} -> {}/{} should be denied: {}",
            to.0,
            to.1,
            describe(&out)
        );
        assert!(
            took < PROMPT,
            "{from} -> {}/{}: a denied client is reset at once, not left to time out ({took:?}): {}",
            to.0,
            to.1,
            describe(&out)
        );
    }

    /// Creates or replaces each policy (the cluster file, or the API's
    /// objects in place).
    fn apply_policies(&mut self, policies: Vec<AuthorizationPolicy>) {
        for policy in policies {
            self.mesh.apply_authorization_policy(policy).unwrap();
        }
    }

    /// `sealmesh` through the cluster file, or on Kubernetes through the API.
    fn sealmesh(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(sealmesh_path());
        cmd.args(args);
        match &self.kubeconfig {
            Some(kubeconfig) => cmd
                .env("KUBECONFIG", kubeconfig.path())
                .env_remove("SEALMESH_CLUSTER_FILE"),
            None => cmd.env(
                "SEALMESH_CLUSTER_FILE",
                self.mesh.testbed().cluster_file_path(),
            ),
        };
        cmd.output().expect("sealmesh runs")
    }

    /// `sealmesh_authorization_decisions_total` of `node`'s agent for a
    /// policy and decision.
    fn decisions(&self, node: &str, policy: &str, decision: &str) -> u64 {
        let body = metrics(&self.mesh, node);
        let series = format!(
            "sealmesh_authorization_decisions_total{{policy=\"{policy}\",decision=\"{decision}\"}} "
        );
        body.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |v| v.trim().parse().unwrap())
    }
}

/// The metrics of `node`'s agent, read from the node itself.
fn metrics(mesh: &Mesh, node: &str) -> String {
    let ip = mesh.testbed().cluster().node(node).unwrap().ip;
    let netns = mesh.testbed().node_netns(node).unwrap().to_owned();
    mesh.testbed()
        .run_in_netns(&netns, move || {
            let mut stream = std::net::TcpStream::connect((ip, AGENT_METRICS_PORT)).unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            response
        })
        .unwrap()
}

/// Waits for an access-log line of `node` about a connection from pod
/// `src` to pod `dst` matching `pred`.
fn logged(app: &App, node: &str, src: &str, dst: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_access(&app.mesh, node, &format!("{src} -> {dst}"), |l| {
        l["src"] == src && l["dst"] == dst && pred(l)
    })
}

fn run(options: MeshOptions) {
    let mut app = App::up(options);
    app.apply_policies(policies(9));
    // The agents apply policies within a second of the change; wait until
    // they deny what the new policies deny.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.connect("shop/bot", (SHOP, "web")).0.status.success() {
        assert!(
            Instant::now() < deadline,
            "the agents never applied the policies"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Allowed by principal (SPIFFE and Istio forms), across nodes and on one.
    app.allowed("shop/frontend", (SHOP, "web"));
    app.allowed("shop/frontend", (SHOP, "web-local"));
    // A DENY wins over the ALLOW that names bot: refused at once, both ways
    // a connection can reach the pod.
    app.denied("shop/bot", (SHOP, "web"));
    app.denied("shop/bot", (SHOP, "web-local"));
    // By namespace and port: ops may reach web on port 9 only.
    app.denied("ops/prom", (SHOP, "web"));
    // No policy selects ops/api: everyone may connect.
    app.allowed("shop/bot", (OPS, "api"));
    // web's ALLOW policy names principals, so plaintext cannot match it: the
    // kernel refuses the unmeshed outsider (strict by implication; a dropped
    // SYN, so the client times out), while db, whose only enforced policy is
    // a DENY of bot, still takes plaintext.
    let mut cmd = testapp::client(testapp_path(), app.echo(SHOP, "web"), "plain?", 1);
    cmd.args(["--timeout-secs", "2"]);
    let out = app
        .mesh
        .testbed()
        .spawn_in_pod(LEGACY, "outsider", cmd)
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(
        !out.status.success(),
        "plaintext reached web: {}",
        describe(&out)
    );
    let kernel = wait_access(&app.mesh, "node-1", "the kernel's refusal", |l| {
        l["message"] == "connection refused" && l["src"] == "legacy/outsider"
    });
    assert_eq!(kernel["refused_reason"], "policy_denied", "{kernel}");
    assert_eq!(kernel["denied_by"], "shop/web-allow", "{kernel}");
    app.allowed("legacy/outsider", (SHOP, "db"));
    // Dry run: prom to db is allowed and reported as would-deny.
    app.allowed("ops/prom", (SHOP, "db"));
    app.allowed("shop/frontend", (SHOP, "db"));

    // The deciding agents name the policy and rule; the client's agent reads
    // the peer's 403 back.
    let inbound = logged(&app, "node-1", "shop/bot", "shop/web", |l| {
        l["refused_reason"] == "policy_denied"
    });
    assert_eq!(inbound["denied_by"], "shop/deny-bot rule 0", "{inbound}");
    assert_eq!(inbound["direction"], "inbound");
    let outbound = logged(&app, "node-0", "shop/bot", "shop/web", |l| {
        l["refused_reason"] == "policy_denied"
    });
    assert_eq!(outbound["denied_by"], "shop/deny-bot rule 0", "{outbound}");
    let local = logged(&app, "node-0", "shop/bot", "shop/web-local", |l| {
        l["refused_reason"] == "policy_denied"
    });
    assert_eq!(local["denied_by"], "shop/deny-bot rule 0", "{local}");
    assert_eq!(local["no_tls_reason"], "secured_local");
    let no_rule = logged(&app, "node-1", "ops/prom", "shop/web", |l| {
        l["refused_reason"] == "policy_denied"
    });
    assert_eq!(no_rule["denied_by"], "shop/web-allow", "{no_rule}");
    let dry = logged(&app, "node-1", "ops/prom", "shop/db", |l| {
        l["refused_reason"].is_null() && l["bytes_src_to_dst"].as_u64() > Some(0)
    });
    assert_eq!(dry["dry_run_denied_by"], "shop/db-frontend-only", "{dry}");
    let clean = logged(&app, "node-1", "shop/frontend", "shop/db", |l| {
        l["bytes_src_to_dst"].as_u64() > Some(0)
    });
    assert!(clean["dry_run_denied_by"].is_null(), "{clean}");

    // Metrics count each decision by policy, on the deciding node only.
    assert!(app.decisions("node-1", "shop/deny-bot", "denied") >= 1);
    assert!(
        app.decisions("node-0", "shop/deny-bot", "denied") >= 1,
        "same node"
    );
    assert!(app.decisions("node-1", "shop/web-allow", "denied") >= 1);
    assert!(app.decisions("node-1", "shop/db-frontend-only", "would_deny") >= 1);
    assert_eq!(
        app.decisions("node-0", "shop/web-allow", "denied"),
        0,
        "node-0 did not judge prom -> web"
    );

    // edges shows one allowed, one denied and one would-deny pair.
    let out = app.sealmesh(&["edges", "-A", "-o", "json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let edges: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let authz = |src: &str, dst: &str| {
        edges
            .iter()
            .find(|e| e["src"] == src && e["dst"] == dst)
            .map(|e| {
                (
                    e["denied_policy"].clone(),
                    e["dry_run_denied_policy"].clone(),
                )
            })
            .unwrap_or_else(|| panic!("no edge {src} -> {dst} in {edges:?}"))
    };
    assert_eq!(authz("frontend", "web"), (Value::from(""), Value::from("")));
    assert_eq!(authz("bot", "web").0, "shop/deny-bot");
    assert_eq!(authz("prom", "db").1, "shop/db-frontend-only");
    let table = app.sealmesh(&["edges", "-n", SHOP]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(table.contains("denied shop/deny-bot"), "{table}");
    assert!(
        table.contains("would-deny shop/db-frontend-only"),
        "{table}"
    );

    // why names the policy and rule, and exits 1 for a denied pair.
    let out = app.sealmesh(&[
        "why",
        "shop/bot",
        "shop/web",
        "--port",
        &ECHO_PORT.to_string(),
    ]);
    let why = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(why.contains("shop/deny-bot"), "{why}");

    // A policy change: ops may now reach web on the echo port (new
    // connections follow), and a new DENY resets frontend's open
    // connections, across nodes and on one node.
    let mut held: Vec<(ChildGuard, FollowedLines)> = [(SHOP, "web"), (SHOP, "web-local")]
        .into_iter()
        .map(|to| {
            let mut client = app.client("shop/frontend", to, Some(60));
            let mut lines = FollowedLines::new(client.child_mut().stdout.take().unwrap());
            lines.wait_for("open", Duration::from_secs(20), |l| l.starts_with("open "));
            (client, lines)
        })
        .collect();
    let mut changed = policies(ECHO_PORT);
    changed.push(deny_frontend());
    let changed_at = Instant::now();
    app.apply_policies(changed);
    for (_, lines) in &mut held {
        let ended = lines.wait_for(
            "the end of the held connection",
            Duration::from_secs(20),
            |l| l.starts_with("ended="),
        );
        assert_eq!(
            ended, "ended=reset",
            "a revoked connection is reset, not ended cleanly"
        );
    }
    assert!(
        changed_at.elapsed() < Duration::from_secs(10),
        "open connections were revoked {:?} after the change",
        changed_at.elapsed()
    );
    for (client, _) in held.drain(..) {
        assert!(!client.wait_with_output().unwrap().status.success());
    }
    let revoked = logged(&app, "node-1", "shop/frontend", "shop/web", |l| {
        l["error"]
            .as_str()
            .is_some_and(|e| e.contains("now denies"))
    });
    assert_eq!(
        revoked["denied_by"], "shop/deny-frontend rule 0",
        "{revoked}"
    );
    assert!(app.decisions("node-1", "shop/deny-frontend", "revoked") >= 1);
    assert!(app.decisions("node-0", "shop/deny-frontend", "revoked") >= 1);
    app.denied("shop/frontend", (SHOP, "web"));
    app.denied("shop/frontend", (SHOP, "web-local"));
    app.allowed("ops/prom", (SHOP, "web"));
}

#[test]
fn local_mode_agents_enforce_and_explain_authorization_policies() {
    run(MeshOptions::default());
}

#[test]
fn kubernetes_mode_agents_enforce_and_explain_authorization_policies() {
    run(MeshOptions {
        kubernetes: Some(KubeMode::fake()),
        ..MeshOptions::default()
    });
}
