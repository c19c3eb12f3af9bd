//! The operator CLI (`sealmesh check`, `edges`, `tap`, `why`, `certs
//! inspect`) as an operator runs it: the real binary against real testbed
//! meshes (root, real agents, real identity service).

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use sealmesh_common::{
    authz::AuthorizationPolicy,
    consts::{MESH_LABEL, MESH_LABEL_ENABLED},
};
use sealmesh_pki::{self as pki, CaSpec, GeneratedCa, Layout};
use serde_json::Value;
use xtask::{
    mesh::{Mesh, MeshOptions},
    testbed::{ChildGuard, PodSpec, TestbedSpec},
};

mod support;

use support::{
    APP_NS, ECHO_PORT, FollowedLines, PLAIN_NS, client_in_pod, describe, echo_addr, echo_service,
    mesh_with_echo_servers, sealmesh_path, spiffe, stdout,
};

const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(20);

/// node-0: `client`, `neighbour` (meshed); node-1: `server` (meshed, Service
/// `server` at 10.96.0.10:80), `legacy/plain` (unmeshed).
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(PLAIN_NS, &[])
        .pod(PodSpec::new(APP_NS, "client", "client", 0).label("app", "client"))
        .pod(PodSpec::new(APP_NS, "neighbour", "neighbour", 0).label("app", "neighbour"))
        .pod(PodSpec::new(APP_NS, "server", "server", 1).label("app", "server"))
        .pod(PodSpec::new(PLAIN_NS, "plain", "default", 1).label("app", "plain"))
        .service(echo_service("server", SERVICE_VIP, 80))
}

struct App {
    mesh: Mesh,
    _servers: Vec<ChildGuard>,
}

impl App {
    fn up(options: MeshOptions) -> Self {
        let (mesh, _servers) = mesh_with_echo_servers(
            &spec(),
            options,
            &[
                (APP_NS, "server"),
                (APP_NS, "neighbour"),
                (PLAIN_NS, "plain"),
            ],
        );
        Self { mesh, _servers }
    }

    fn sealmesh(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("sealmesh runs")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(sealmesh_path());
        cmd.args(args).env(
            "SEALMESH_CLUSTER_FILE",
            self.mesh.testbed().cluster_file_path(),
        );
        cmd
    }

    /// `sealmesh tap` running with `args`, its output piped.
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
}

/// The `√`/`×`/`‼` lines and the summary of a `check` output.
fn status_lines(out: &Output) -> Vec<String> {
    stdout(out)
        .lines()
        .filter(|l| {
            l.starts_with('√')
                || l.starts_with('×')
                || l.starts_with('‼')
                || l.starts_with("Status")
        })
        .map(str::to_owned)
        .collect()
}

const IDENTITY_OK: [&str; 12] = [
    "√ certificate config is valid",
    "√ trust anchors are using supported crypto algorithm",
    "√ trust anchors are CA certificates",
    "√ trust anchors are within their validity period",
    "√ trust anchors are valid for at least 60 days",
    "√ issuer cert is using supported crypto algorithm",
    "√ issuer cert is a CA certificate",
    "√ issuer cert is within its validity period",
    "√ issuer cert is valid for at least 60 days",
    "√ issuer cert is issued by the trust anchor",
    "√ issuer can sign certificates",
    "Status check results are √",
];

/// The policies section of a cluster without policies.
const POLICIES_OK: [&str; 4] = [
    "√ authorization policies are valid",
    "√ policy principals name existing ServiceAccounts",
    "√ policy selectors match pods",
    "√ policies select meshed pods",
];

/// A policy of the app namespace with `spec` (YAML).
fn policy(name: &str, spec: &str) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name: name.into(),
        namespace: APP_NS.into(),
        annotations: Default::default(),
        spec: serde_yaml_ng::from_str(spec).unwrap(),
    }
}

fn strings(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|l| (*l).to_owned()).collect()
}

#[test]
fn a_healthy_mesh_passes_check_and_edges_tap_why_and_inspect_show_its_traffic() {
    let app = App::up(MeshOptions::default());

    // check --proxy: the mesh's issuer lives 48h, so the 60-day rule warns.
    let out = app.sealmesh(&["check", "--proxy"]);
    assert!(out.status.success(), "{}", describe(&out));
    let mut expected = strings(&IDENTITY_OK[..11]);
    expected[8] = "‼ issuer cert is valid for at least 60 days".into();
    expected.extend(strings(&[
        "√ agents are running and reachable",
        "√ agents are ready",
        "√ agents trust the checked trust anchors",
        "√ data plane certificates chain to the trust anchors",
        "√ every meshed ServiceAccount has a valid certificate",
        "√ data plane certificates are not close to expiry",
    ]));
    expected.extend(strings(&POLICIES_OK));
    expected.push("Status check results are √".into());
    assert_eq!(status_lines(&out), expected, "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("sealmesh-identity\n-----------------\n√ certificate config is valid\n"),
        "{text}"
    );
    assert!(
        text.contains("\nsealmesh-data-plane\n-------------------\n"),
        "{text}"
    );
    assert!(
        text.contains("    issuer CN=identity.sealmesh.cluster.local expires in 47h"),
        "{text}"
    );

    // tap sees a cross-node connection made while it runs, with both identities.
    let mut tap = app.spawn_tap(&[
        "deploy/client",
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
    let inbound_end = tapped
        .lines()
        .find(|l| l.starts_with("end ") && l.contains(" proxy=in "))
        .unwrap_or_else(|| panic!("no inbound end line in:\n{tapped}"));
    assert!(
        inbound_end.contains(&format!(
            " tls=true client_id={} server_id={} bytes_out=",
            spiffe("client"),
            spiffe("server")
        )),
        "{inbound_end}"
    );
    assert_eq!(tapped.lines().count(), 4, "{tapped}");

    // edges: the meshed pair, the same-node pair and the unmeshed destination.
    app.connect(APP_NS, "neighbour");
    app.connect(PLAIN_NS, "plain");
    let expected_table = "\
SRC      DST         SRC_NS   DST_NS   SECURED      AUTHZ
client   plain       shop     legacy   not_meshed   allowed
client   neighbour   shop     shop     √ (local)    allowed
client   server      shop     shop     √            allowed
";
    let deadline = Instant::now() + WAIT;
    let table = loop {
        let out = app.sealmesh(&["edges", "-n", APP_NS]);
        assert!(out.status.success(), "{}", describe(&out));
        if stdout(&out) == expected_table || Instant::now() > deadline {
            break stdout(&out);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(table, expected_table);

    let out = app.sealmesh(&["edges", "-n", PLAIN_NS, "-o", "wide"]);
    assert_eq!(
        stdout(&out),
        "SRC      DST     SRC_NS   DST_NS   SECURED      AUTHZ     CLIENT_ID   SERVER_ID\n\
         client   plain   shop     legacy   not_meshed   allowed   -           -\n"
    );

    let out = app.sealmesh(&["edges", "-n", APP_NS, "-o", "json"]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("edges -o json is JSON");
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 3, "{json}");
    let server = &rows[2];
    assert_eq!(server["src"], "client");
    assert_eq!(server["dst"], "server");
    assert_eq!(server["secured"], true);
    assert_eq!(server["tls"], true);
    assert_eq!(server["client_id"], spiffe("client"));
    assert_eq!(server["server_id"], spiffe("server"));
    assert_eq!(server["connections_total"], 1);
    assert_eq!(server["denied_total"], 0);
    assert_eq!(server["denied_policy"], "");
    assert_eq!(server["dry_run_denied_policy"], "");
    let plain = &rows[0];
    assert_eq!(plain["dst_ns"], PLAIN_NS);
    assert_eq!(plain["secured"], false);
    assert_eq!(plain["no_tls_reason"], "not_meshed");

    // why: a meshed pair, and an unmeshed destination with the fix.
    let out = app.sealmesh(&["why", "shop/client", "shop/server"]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "shop/client -> shop/server: mTLS", "{text}");
    assert!(
        lines[1].starts_with(&format!(
            "  source identity {}: certificate on node-0 valid (",
            spiffe("client")
        )),
        "{text}"
    );
    assert!(
        lines[3].contains(&format!(
            "1 connection(s), secured=√ client_id={} server_id={}",
            spiffe("client"),
            spiffe("server")
        )),
        "{text}"
    );

    let out = app.sealmesh(&["why", "client", "legacy/plain", "-n", APP_NS]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "shop/client -> legacy/plain: NOT mTLS: plaintext\n\
             \x20 why: destination legacy/plain is not meshed (namespace legacy lacks the label sealmesh.io/mesh=enabled): \
             the agent on node-0 forwards the connection in plaintext (not_meshed)\n\
             \x20 fix: label the namespace: kubectl label namespace legacy sealmesh.io/mesh=enabled\n\
             \x20 last observed: "
        ),
        "{text}"
    );
    assert!(
        text.ends_with("secured=not_meshed client_id=- server_id=-\n"),
        "{text}"
    );

    // Through the Service VIP, same verdict as the pod behind it.
    let out = app.sealmesh(&["why", "shop/client", "10.96.0.10:80"]);
    assert!(
        stdout(&out).starts_with(
            "shop/client -> shop/server: mTLS\n  10.96.0.10:80 is Service shop/server with endpoints server; explaining server\n"
        ),
        "{}",
        describe(&out)
    );

    // certs inspect --agent: the live chain with both SANs, verified.
    let out = app.sealmesh(&[
        "certs",
        "inspect",
        "--agent",
        "node-1",
        "--identity",
        &spiffe("server"),
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "Identity: {}\n  Status:        valid\n",
            spiffe("server")
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "Certificate 1 of 2 (leaf)\n  Subject:       CN=server.shop.serviceaccount.identity.sealmesh.cluster.local\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "\n  SANs:          URI:{}, DNS:server.shop.serviceaccount.identity.sealmesh.cluster.local\n",
            spiffe("server")
        )),
        "{text}"
    );
    assert!(
        text.contains(
            "\n  Ext key usage: TLS Web Server Authentication, TLS Web Client Authentication\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "Certificate 2 of 2 (CA)\n  Subject:       CN=identity.sealmesh.cluster.local\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with(&format!(
            "Chain: √ verifies to trust anchor CN=root.sealmesh.cluster.local ({})\n\n",
            app.mesh.pki_dir().join("ca-bundle.crt").display()
        )),
        "{text}"
    );

    // Authorization policies, read from a copy of the cluster file the CLI
    // is given (the agents keep theirs): why judges the pair as the
    // destination's agent would, check names what misses its aim.
    let mut cluster = app.mesh.testbed().cluster().clone();
    let principal = |sa: &str| spiffe(sa).trim_start_matches("spiffe://").to_owned();
    cluster.authorization_policies = vec![
        policy(
            "server-allow",
            &format!(
                "{{ selector: {{ matchLabels: {{ app: server }} }}, rules: [{{ from: [{{ source: {{ principals: [\"{}\"] }} }}] }}] }}",
                principal("neighbour")
            ),
        ),
        policy(
            "typo",
            &format!(
                "{{ selector: {{ matchLabels: {{ app: neighbour }} }}, rules: [{{ from: [{{ source: {{ principals: [\"{}\"] }} }}] }}] }}",
                principal("clinet")
            ),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let with_policies = dir.path().join("cluster.yaml");
    std::fs::write(&with_policies, cluster.to_yaml()).unwrap();
    let sealmesh = |args: &[&str]| {
        app.command(args)
            .env("SEALMESH_CLUSTER_FILE", &with_policies)
            .output()
            .unwrap()
    };
    let port = ECHO_PORT.to_string();
    let out = sealmesh(&["why", "shop/client", "shop/server", "--port", &port]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(
            "shop/client -> shop/server: mTLS; DENIED by authorization policy shop/server-allow\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "\n  authorization (port {ECHO_PORT}, as {}): DENIED: ALLOW policy shop/server-allow selects shop/server and none of its rules matches the source\n  \
             fix: add the source's principal {} (or its namespace shop) to a rule of shop/server-allow: kubectl edit authorizationpolicy server-allow -n shop\n",
            principal("client"),
            principal("client")
        )),
        "{text}"
    );
    let out = sealmesh(&["why", "shop/client", "shop/neighbour"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).starts_with(
            "shop/client -> shop/neighbour: secured (same node, no network hop); DENIED by authorization policy shop/typo\n"
        ),
        "{}",
        describe(&out)
    );
    let out = sealmesh(&["check", "-o", "short"]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        stdout(&out).contains(
            "sealmesh-policies\n-----------------\n\
             ‼ policy principals name existing ServiceAccounts\n    \
             shop/typo: spec.rules[0].from[0].source.principals[0]: ServiceAccount shop/clinet does not exist\n"
        ),
        "{}",
        describe(&out)
    );
    // A policy the agents cannot use is an error naming the field; the
    // rest of the file is checked as usual.
    cluster.authorization_policies = vec![policy(
        "bad-port",
        "{ rules: [{ to: [{ operation: { ports: [http] } }] }] }",
    )];
    std::fs::write(&with_policies, cluster.to_yaml()).unwrap();
    let out = sealmesh(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).contains(
            "× authorization policies are valid\n    \
             shop/bad-port: spec.rules[0].to[0].operation.ports[0]: \"http\" is not a port (1-65535)\n"
        ),
        "{}",
        describe(&out)
    );
    assert!(
        status_lines(&out).contains(&"√ issuer cert is issued by the trust anchor".to_owned()),
        "{}",
        describe(&out)
    );
}

#[test]
fn check_proxy_fails_when_an_agent_has_no_certificate() {
    let app = App::up(MeshOptions {
        start_identity: false,
        wait_for_certificates: false,
        ..MeshOptions::default()
    });
    let out = app.sealmesh(&["check", "--proxy"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let lines = status_lines(&out);
    assert_eq!(
        lines[11..],
        strings(&[
            "√ agents are running and reachable",
            "× agents are ready",
            "√ agents trust the checked trust anchors",
            "√ data plane certificates chain to the trust anchors",
            "× every meshed ServiceAccount has a valid certificate",
            "√ data plane certificates are not close to expiry",
            POLICIES_OK[0],
            POLICIES_OK[1],
            POLICIES_OK[2],
            POLICIES_OK[3],
            "Status check results are ×",
        ]),
        "{}",
        describe(&out)
    );
    let text = stdout(&out);
    for (node, sa) in [
        ("node-0", "client"),
        ("node-0", "neighbour"),
        ("node-1", "server"),
    ] {
        assert!(
            text.contains(&format!(
                "\n    {node} {} has no valid certificate",
                spiffe(sa)
            )) || text.contains(&format!("\n    {node} {} has no certificate", spiffe(sa))),
            "{node} {sa}: {text}"
        );
    }
    assert!(
        text.contains(
            "\n    see: make sure the identity service runs and is reachable from the node"
        ),
        "{text}"
    );

    // why names the missing certificate as the cause.
    let out = app.sealmesh(&["why", "shop/client", "shop/server"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("shop/client -> shop/server: NOT mTLS: connections are refused\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "  why: no certificate for the source identity {} on node-0 because ",
            spiffe("client")
        )),
        "{text}"
    );

    // An agent that is down is named with the fix.
    let mut app = app;
    app.mesh.stop_agent("node-1").unwrap();
    let out = app.sealmesh(&["check", "--proxy"]);
    let text = stdout(&out);
    assert!(
        text.contains("× agents are running and reachable\n    agent on node node-1 is not reachable at 127.0.0.1:15000: "),
        "{text}"
    );
}

/// A PKI written to a temporary directory, as `check --pki-dir` reads it.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(root: &GeneratedCa, issuer: &GeneratedCa) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca-bundle.crt"), &root.cert_pem).unwrap();
        issuer
            .write_dir(&dir.path().join("issuer"), Layout::Tls, false)
            .unwrap();
        Self { dir }
    }

    fn check(&self) -> Output {
        self.check_with(&[])
    }

    fn check_with(&self, args: &[&str]) -> Output {
        Command::new(sealmesh_path())
            .args(["check", "--pki-dir"])
            .arg(self.dir.path())
            .args(args)
            .env_remove("SEALMESH_CLUSTER_FILE")
            .output()
            .unwrap()
    }
}

fn root(validity: Duration) -> GeneratedCa {
    pki::generate_root(&CaSpec::valid_for("root.test", validity)).unwrap()
}

/// An issuer valid for `validity`, starting `started_ago`.
fn issuer(root: &GeneratedCa, started_ago: Duration, validity: Duration) -> GeneratedCa {
    let mut spec = CaSpec::valid_for("issuer.test", validity);
    spec.not_before -= started_ago;
    spec.not_after -= started_ago;
    pki::generate_issuer(&root.material(), &spec).unwrap().0
}

#[test]
fn check_fails_for_an_expired_issuer() {
    let root = root(365 * DAY);
    let pki = Pki::new(&root, &issuer(&root, 10 * DAY, 9 * DAY));
    let out = pki.check();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let mut expected = strings(&IDENTITY_OK);
    expected[7] = "× issuer cert is within its validity period".into();
    expected.remove(8); // no 60-day rule for an expired issuer
    expected.remove(9); // the loader is not asked once a check failed
    expected[9] = "Status check results are ×".into();
    assert_eq!(status_lines(&out), expected, "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.contains("× issuer cert is within its validity period\n    issuer CN=issuer.test is not valid now: expired 24h0m ago ("),
        "{text}"
    );
    assert!(
        text.contains("    see: issue a new issuer: `sealmesh certs create-issuer --root <root dir> --out <issuer dir> --force`"),
        "{text}"
    );
}

#[test]
fn check_prints_json_and_short_as_linkerd_check_does() {
    let root = root(365 * DAY);
    let pki = Pki::new(&root, &issuer(&root, 10 * DAY, 9 * DAY));
    let out = pki.check_with(&["-o", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let json: Value = serde_json::from_slice(&out.stdout).expect("check -o json is JSON");
    assert_eq!(json["success"], false);
    assert_eq!(json["categories"][0]["categoryName"], "sealmesh-identity");
    let checks = json["categories"][0]["checks"].as_array().unwrap();
    let results: Vec<(&str, &str)> = checks
        .iter()
        .map(|c| {
            (
                c["description"].as_str().unwrap(),
                c["result"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(results[0], ("certificate config is valid", "success"));
    assert_eq!(
        results
            .iter()
            .filter(|(_, r)| *r != "success")
            .collect::<Vec<_>>(),
        [&("issuer cert is within its validity period", "error")]
    );
    let failed = checks.iter().find(|c| c["result"] == "error").unwrap();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .starts_with("issuer CN=issuer.test is not valid now: expired 24h0m ago ("),
        "{failed}"
    );
    assert!(
        failed["hint"]
            .as_str()
            .unwrap()
            .starts_with("issue a new issuer: "),
        "{failed}"
    );

    let out = pki.check_with(&["-o", "short"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("sealmesh-identity\n-----------------\n× issuer cert is within its validity period\n    issuer CN=issuer.test is not valid now: "),
        "{text}"
    );
    assert_eq!(
        status_lines(&out),
        [
            "× issuer cert is within its validity period",
            "Status check results are ×"
        ]
    );
}

#[test]
fn check_fails_for_an_issuer_not_signed_by_the_anchors() {
    let other_root = root(365 * DAY);
    let pki = Pki::new(
        &root(365 * DAY),
        &issuer(&other_root, Duration::ZERO, 90 * DAY),
    );
    let out = pki.check();
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let mut expected = strings(&IDENTITY_OK);
    expected[9] = "× issuer cert is issued by the trust anchor".into();
    expected.remove(10);
    expected[10] = "Status check results are ×".into();
    assert_eq!(status_lines(&out), expected, "{}", describe(&out));
    assert!(
        stdout(&out).contains(
            "× issuer cert is issued by the trust anchor\n    no trust anchor signed CN=issuer.test (its issuer is CN=root.test)\n    see: sign the issuer with a root of the trust-anchor bundle"
        ),
        "{}",
        describe(&out)
    );
}

#[test]
fn check_warns_for_anchors_expiring_within_60_days() {
    let root = root(30 * DAY);
    let pki = Pki::new(&root, &issuer(&root, Duration::ZERO, 20 * DAY));
    let out = pki.check();
    assert!(
        out.status.success(),
        "warnings do not fail: {}",
        describe(&out)
    );
    let mut expected = strings(&IDENTITY_OK);
    expected[4] = "‼ trust anchors are valid for at least 60 days".into();
    expected[8] = "‼ issuer cert is valid for at least 60 days".into();
    assert_eq!(status_lines(&out), expected, "{}", describe(&out));
    assert!(
        stdout(&out).contains("‼ trust anchors are valid for at least 60 days\n    trust anchor CN=root.test expires in 29d (at "),
        "{}",
        describe(&out)
    );
}

#[test]
fn why_names_the_deny_plaintext_policy_and_tap_streams_json_lines() {
    let mut app = App::up(MeshOptions {
        agent_args: vec!["--deny-plaintext".into()],
        ..MeshOptions::default()
    });
    let out = app.sealmesh(&["why", "shop/client", "legacy/plain"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        stdout(&out).starts_with(
            "shop/client -> legacy/plain: NOT mTLS: connections are refused\n\
             \x20 why: destination legacy/plain is not meshed (namespace legacy lacks the label sealmesh.io/mesh=enabled), \
             and the agent on node-0 runs with --deny-plaintext: the connection is refused \
             (it lets through only the Services default/kubernetes, kube-system/kube-dns by ClusterIP, port 53)\n\
             \x20 fix: label the namespace: kubectl label namespace legacy sealmesh.io/mesh=enabled\n"
        ),
        "{}",
        describe(&out)
    );

    let mut tap = app.spawn_tap(&[
        "pod/server",
        "-n",
        APP_NS,
        "-o",
        "json",
        "--max",
        "4",
        "--timeout",
        "20s",
    ]);
    let mut line = String::new();
    BufReader::new(tap.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "tapping 2 agent(s)\n");
    app.connect(APP_NS, "server");
    let tapped = tap.wait_with_output().unwrap();
    assert!(tapped.status.success(), "{}", describe(&tapped));
    let events: Vec<Value> = stdout(&tapped)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let mut seen: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            assert_eq!(e["tls"], true, "{e}");
            assert_eq!(e["client_id"], spiffe("client"), "{e}");
            assert_eq!(e["server_id"], spiffe("server"), "{e}");
            assert_eq!(e["src_pod"]["name"], "client", "{e}");
            assert_eq!(e["dst_pod"]["name"], "server", "{e}");
            (
                e["node"].as_str().unwrap().to_owned(),
                e["proxy"].as_str().unwrap().to_owned(),
                e["phase"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    seen.sort();
    let expected: Vec<(String, String, String)> = [
        ("node-0", "out", "close"),
        ("node-0", "out", "open"),
        ("node-1", "in", "close"),
        ("node-1", "in", "open"),
    ]
    .iter()
    .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
    .collect();
    assert_eq!(seen, expected, "{events:?}");

    // With one agent down, tap still streams from the others and says so,
    // once, while it keeps trying that agent.
    app.mesh.stop_agent("node-1").unwrap();
    let out = app.sealmesh(&["tap", "-n", APP_NS, "--timeout", "2s"]);
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].starts_with(
            "tap: agent node-1 unreachable (agent on node node-1 is not reachable at 127.0.0.1:15000: "
        ) && lines[0].ends_with("); reconnecting"),
        "{stderr}"
    );
    assert_eq!(lines[1], "tapping 1 agent(s)", "{stderr}");
}

#[test]
fn tap_follows_an_agent_through_its_restart() {
    let mut app = App::up(MeshOptions::default());
    // In the testbed's cgroup: it runs until killed, and teardown kills it
    // whatever happens.
    let mut cmd = app.command(&["tap", "-n", APP_NS]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut tap = app.mesh.testbed().spawn_in_underlay(cmd).unwrap();
    let mut tap_out = FollowedLines::new(tap.child_mut().stdout.take().unwrap());
    let mut tap_err = FollowedLines::new(tap.child_mut().stderr.take().unwrap());
    tap_err.wait_for("the tap started", WAIT, |l| l == "tapping 2 agent(s)");

    // The agent of the server's node goes away: tap says so once and keeps
    // running while it retries.
    app.mesh.stop_agent("node-1").unwrap();
    let outage = tap_err.wait_for("the outage of node-1", WAIT, |l| {
        l.starts_with("tap: agent node-1 ")
    });
    assert!(
        outage.starts_with("tap: agent node-1 unreachable (")
            && outage.ends_with("); reconnecting"),
        "{outage}"
    );
    // Several reconnect attempts fail meanwhile (200 ms, then doubling).
    // `edges` asks the missing agent again for its 3 s, then names it.
    let asked = Instant::now();
    let out = app.sealmesh(&["edges", "-n", APP_NS]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with(
            "warning: edges are incomplete: agent on node node-1 is not reachable at 127.0.0.1:15000: "
        ),
        "{}",
        describe(&out)
    );
    // Its retry delays (200 ms doubling, each 50–100 % of its step) stop
    // before the next would end past 3 s: never before 1.5 s of sleeps.
    assert!(
        asked.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        asked.elapsed()
    );
    assert!(tap.child_mut().try_wait().unwrap().is_none(), "tap exited");
    // A connection tried meanwhile fails (closed, never in clear): node-0's
    // agent records it as refused beside the pair's mTLS connections.
    let testbed = app.mesh.testbed();
    let refused = client_in_pod(
        testbed,
        APP_NS,
        "client",
        echo_addr(testbed, APP_NS, "server"),
        "hi",
        &[],
    );
    assert!(!refused.status.success(), "{}", describe(&refused));

    // A new agent (as a DaemonSet restarts it): tap is back on that node
    // and shows its new connections, mTLS as before.
    app.mesh.start_agent("node-1").unwrap();
    app.mesh.wait_for_certificates("node-1").unwrap();
    tap_err.wait_for("node-1 back", WAIT, |l| l == "tap: agent node-1 back");
    app.connect(APP_NS, "server");
    let inbound = tap_out.wait_for("the restarted agent's inbound open line", WAIT, |l| {
        l.starts_with("tcp id=node-1:") && l.contains(" proxy=in ")
    });
    assert!(
        inbound.contains(&format!(
            " src_pod=shop/client dst_pod=shop/server tls=true client_id={} server_id={}",
            spiffe("client"),
            spiffe("server")
        )),
        "{inbound}"
    );

    // The pair was mTLS whenever it carried bytes: the refusal during the
    // outage does not make edges call it unsecured.
    let out = app.sealmesh(&["edges", "-n", APP_NS, "-o", "json"]);
    assert!(out.status.success(), "{}", describe(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pair = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["src"] == "client" && r["dst"] == "server")
        .unwrap_or_else(|| panic!("no client -> server edge: {rows}"));
    assert_eq!(
        (&pair["secured"], &pair["tls"], &pair["no_tls_reason"]),
        (&Value::Bool(true), &Value::Bool(true), &Value::from("")),
        "{pair}"
    );
    assert!(pair["refused_total"].as_u64() >= Some(1), "{pair}");

    tap.kill();
    // One note per outage and per return, nothing about the other node.
    assert_eq!(
        tap_err.all(Duration::from_millis(200)),
        [
            "tapping 2 agent(s)",
            outage.as_str(),
            "tap: agent node-1 back"
        ],
    );
}
