//! The data path end to end on the testbed (root, real kernel eBPF, real
//! mTLS, real identity service): what the mesh promises its users, from
//! mTLS with kernel-attested identities to failing closed.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    process::Output,
    time::Duration,
};

use sealmesh_common::consts::{
    AGENT_ADMIN_PORT, AGENT_METRICS_PORT, CERTIFICATE_INHERITED_MESSAGE, HBONE_PORT,
    LISTENERS_HANDED_OVER_MESSAGE, MESH_LABEL, MESH_LABEL_ENABLED, OUTBOUND_PORT,
    SEALMESH_REMOVED_MESSAGE,
};
use serde_json::Value;
use xtask::{
    mesh::{Mesh, MeshError, MeshOptions, locate_binary},
    testapp,
    testbed::{ChildGuard, PodSpec, TestbedSpec},
};

mod support;

use support::{
    APP_NS, ECHO_PORT, PLAIN_NS, assert_marker_never_in_clear, capture_underlay, client_in_pod,
    describe, echo_addr, echo_service, mesh_with_echo_servers, pod_ip, spiffe, start_echo_servers,
    testapp_path, wait_access_count,
};

const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;

/// node-0: `client` (meshed), `neighbour` (meshed, same node as client);
/// node-1: `server` (meshed, behind Service `server` at 10.96.0.10:80),
/// `stranger` (meshed, another ServiceAccount), `legacy/plain` (unmeshed).
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(PLAIN_NS, &[])
        .pod(PodSpec::new(APP_NS, "client", "client", 0).label("app", "client"))
        .pod(PodSpec::new(APP_NS, "neighbour", "neighbour", 0).label("app", "neighbour"))
        .pod(PodSpec::new(APP_NS, "server", "server", 1).label("app", "server"))
        .pod(PodSpec::new(APP_NS, "stranger", "stranger", 1).label("app", "stranger"))
        .pod(PodSpec::new(PLAIN_NS, "plain", "default", 1).label("app", "plain"))
        .service(echo_service("server", SERVICE_VIP, SERVICE_PORT))
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
                (APP_NS, "stranger"),
                (PLAIN_NS, "plain"),
            ],
        );
        Self { mesh, _servers }
    }

    fn ip(&self, ns: &str, pod: &str) -> Ipv4Addr {
        pod_ip(self.mesh.testbed(), ns, pod)
    }

    fn echo_addr(&self, ns: &str, pod: &str) -> SocketAddr {
        echo_addr(self.mesh.testbed(), ns, pod)
    }

    /// Runs `testapp client` in a pod with extra arguments.
    fn client(
        &self,
        ns: &str,
        pod: &str,
        connect: SocketAddr,
        text: &str,
        extra: &[&str],
    ) -> Output {
        client_in_pod(self.mesh.testbed(), ns, pod, connect, text, extra)
    }

    /// `client` fails to reach `connect` within 3 s.
    fn client_refused(&self, connect: SocketAddr, text: &str, why: &str) {
        let out = self.client(APP_NS, "client", connect, text, &["--timeout-secs", "3"]);
        assert!(!out.status.success(), "{why}: {}", describe(&out));
    }

    fn client_ok(&self, ns: &str, pod: &str, connect: SocketAddr, text: &str) -> String {
        let out = self.client(ns, pod, connect, text, &[]);
        assert!(
            out.status.success(),
            "{ns}/{pod} -> {connect}: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Access-log events of `node`'s agent whose field `key` equals `value`.
    fn access(&self, node: &str, key: &str, value: &str) -> Vec<Value> {
        self.mesh
            .access_log(node)
            .unwrap()
            .into_iter()
            .filter(|e| e[key] == value)
            .collect()
    }

    /// Waits for an access-log event of `node`'s agent matching `pred`.
    fn wait_access(&self, node: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_access_count(node, what, 1, pred).remove(0)
    }

    /// Waits for `count` access-log events of `node`'s agent matching `pred`.
    fn wait_access_count(
        &self,
        node: &str,
        what: &str,
        count: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        wait_access_count(&self.mesh, node, what, count, pred)
    }
}

#[test]
fn meshed_pods_talk_mtls_across_and_within_nodes_with_kernel_attested_identities() {
    let app = App::up(MeshOptions::default());

    // Across nodes, by pod IP and through the Service VIP. getpeername in the
    // pod names the destination it connected to, not the agent it was
    // redirected to.
    let out = app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "server"),
        "hello across nodes",
    );
    let server_addr = app.echo_addr(APP_NS, "server");
    assert!(out.contains(&format!(" peer={server_addr} ")), "{out}");
    let out = app.client_ok(
        APP_NS,
        "client",
        SocketAddr::from((SERVICE_VIP, SERVICE_PORT)),
        "hello service",
    );
    assert!(out.starts_with("ok "), "{out}");
    assert!(
        out.contains(&format!(" peer={SERVICE_VIP}:{SERVICE_PORT} ")),
        "{out}"
    );

    let server_ip = app.ip(APP_NS, "server").to_string();
    let inbound = app.wait_access("node-1", "inbound mTLS connection to shop/server", |e| {
        e["direction"] == "inbound" && e["dst"] == "shop/server"
    });
    assert_eq!(
        inbound["client_id"],
        spiffe("client"),
        "the receiving agent names the sender: {inbound}"
    );
    assert_eq!(inbound["server_id"], spiffe("server"));
    assert_eq!(inbound["tls"], true);
    assert_eq!(inbound["src"], "shop/client", "{inbound}");
    let outbound = app.wait_access("node-0", "outbound connection from shop/client", |e| {
        e["direction"] == "outbound" && e["dst"] == "shop/server"
    });
    assert_eq!(outbound["src"], "shop/client");
    assert_eq!(outbound["client_id"], spiffe("client"));
    assert_eq!(outbound["server_id"], spiffe("server"));
    assert_eq!(outbound["tls"], true);
    assert_eq!(outbound["dst_addr"], format!("{server_ip}:{ECHO_PORT}"));
    // Both connections (pod IP and VIP) went to the one server pod.
    let both = app.wait_access_count("node-0", "both connections", 2, |e| {
        e["dst"] == "shop/server"
    });
    assert_eq!(both.len(), 2, "{both:?}");

    // Same node: secured locally, recorded as such.
    let out = app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "neighbour"),
        "hello neighbour",
    );
    let neighbour_addr = app.echo_addr(APP_NS, "neighbour");
    assert!(out.contains(&format!(" peer={neighbour_addr} ")), "{out}");
    let local = app.wait_access("node-0", "same-node connection", |e| {
        e["dst"] == "shop/neighbour"
    });
    assert_eq!(local["no_tls_reason"], "secured_local", "{local}");
    assert_eq!(local["src"], "shop/client");
}

#[test]
fn no_plaintext_crosses_the_underlay() {
    const MARKER: &str = "sealmesh-secret-marker-7f3a";
    // With agents: the marker never appears in clear between nodes.
    let app = App::up(MeshOptions::default());
    let capture = capture_underlay(&app.mesh, &[MARKER]);
    app.client_ok(APP_NS, "client", app.echo_addr(APP_NS, "server"), MARKER);
    app.client_ok(
        APP_NS,
        "client",
        SocketAddr::from((SERVICE_VIP, SERVICE_PORT)),
        MARKER,
    );
    assert_marker_never_in_clear(capture, MARKER, "the mTLS traffic");
    drop(app);

    // Without agents the same exchange is cleartext on the same wire: the
    // capture does see it, so the zero above means something.
    let bare = App::up(MeshOptions {
        start_agents: false,
        start_identity: false,
        wait_for_certificates: false,
        ..MeshOptions::default()
    });
    let capture = capture_underlay(&bare.mesh, &[MARKER]);
    bare.client_ok(APP_NS, "client", bare.echo_addr(APP_NS, "server"), MARKER);
    std::thread::sleep(Duration::from_millis(300));
    let report = capture.finish().unwrap();
    assert!(
        report.hits_for(MARKER) >= 2,
        "request and echo seen in clear without agents: {report:?}"
    );
}

#[test]
fn binary_payloads_are_carried_byte_for_byte_across_and_within_nodes() {
    let app = App::up(MeshOptions::default());
    // 8 MiB of random bytes (any protocol, TLS included, is just bytes to the
    // mesh): across nodes over HBONE, and within a node (secured local), where
    // bulk is spliced in the kernel. Each is counted by the agent that
    // carried it to the destination.
    for (server, node, direction, no_tls_reason) in [
        ("server", "node-1", "inbound", ""),
        ("neighbour", "node-0", "outbound", "secured_local"),
    ] {
        let out = app.client(
            APP_NS,
            "client",
            app.echo_addr(APP_NS, server),
            "",
            &["--random-bytes", "8388608"],
        );
        assert!(out.status.success(), "to {server}: {}", describe(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("bytes=8388608"), "{stdout}");
        let event = app.wait_access(node, "close with byte counts", |e| {
            e["direction"] == direction && e["dst"] == format!("{APP_NS}/{server}")
        });
        assert_eq!(
            event["no_tls_reason"].as_str().unwrap_or_default(),
            no_tls_reason,
            "{event}"
        );
        assert_eq!(event["bytes_src_to_dst"], 8_388_608, "{event}");
        assert_eq!(event["bytes_dst_to_src"], 8_388_608, "{event}");
    }
}

#[test]
fn unmeshed_pods_are_left_alone_and_meshed_to_unmeshed_is_recorded_plaintext() {
    let app = App::up(MeshOptions::default());
    // Unmeshed client: not redirected, its node's agent sees nothing from it.
    app.client_ok(
        PLAIN_NS,
        "plain",
        app.echo_addr(APP_NS, "neighbour"),
        "from legacy",
    );
    assert!(app.access("node-1", "src", "legacy/plain").is_empty());
    assert!(app.access("node-0", "dst", "shop/neighbour").is_empty());

    // Meshed client to unmeshed server: plaintext, with the reason recorded.
    app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(PLAIN_NS, "plain"),
        "to legacy",
    );
    let event = app.wait_access("node-0", "plaintext to legacy/plain", |e| {
        e["dst"] == "legacy/plain"
    });
    assert_eq!(event["tls"], false);
    assert_eq!(event["no_tls_reason"], "not_meshed", "{event}");
    assert_eq!(event["src"], "shop/client");
    // Still nothing from the unmeshed pod, now that time has passed.
    assert!(app.access("node-1", "src", "legacy/plain").is_empty());
}

#[test]
fn plaintext_can_be_denied_by_policy() {
    let app = App::up(MeshOptions {
        agent_args: vec!["--deny-plaintext".into()],
        ..MeshOptions::default()
    });
    let out = app.client(
        APP_NS,
        "client",
        app.echo_addr(PLAIN_NS, "plain"),
        "to legacy",
        &["--timeout-secs", "3"],
    );
    assert!(
        !out.status.success(),
        "plaintext must be refused: {}",
        describe(&out)
    );
    // Reset, not an orderly end the app could take for an empty answer.
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Connection reset by peer"),
        "{}",
        describe(&out)
    );
    let refused = app.wait_access("node-0", "the refusal", |e| e["dst"] == "legacy/plain");
    assert_eq!(refused["refused_reason"], "plaintext_denied", "{refused}");
    assert_eq!(refused["no_tls_reason"], "not_meshed", "{refused}");
    // Meshed traffic is unaffected.
    app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "server"),
        "still fine",
    );
}

#[test]
fn identity_outage_fails_closed_before_the_first_certificate_and_not_after() {
    let mut app = App::up(MeshOptions {
        start_identity: false,
        wait_for_certificates: false,
        ..MeshOptions::default()
    });
    // No certificate yet: meshed connections fail closed, never plaintext.
    app.client_refused(
        app.echo_addr(APP_NS, "server"),
        "too early",
        "must fail closed without a certificate",
    );
    let refused = app.wait_access("node-0", "fail-closed record", |e| {
        e["dst"] == "shop/server"
    });
    assert_eq!(refused["tls"], false);
    assert_eq!(
        refused["refused_reason"], "no_source_certificate",
        "{refused}"
    );
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains(&spiffe("client")),
        "the log names the identity lacking a certificate: {refused}"
    );

    app.mesh.start_identity().unwrap();
    app.mesh.wait_for_certificates("node-0").unwrap();
    app.mesh.wait_for_certificates("node-1").unwrap();
    app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "server"),
        "with certificates",
    );

    // Identity down after issuance: traffic keeps flowing on held certificates.
    app.mesh.stop_identity();
    app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "server"),
        "during the outage",
    );

    // Both agents restart during the outage (a crash, as the kubelet
    // restarts a container): they serve the certificates kept on their
    // tmpfs at once, so the mesh keeps working without the identity service.
    for node in ["node-0", "node-1"] {
        app.mesh.stop_agent(node).unwrap();
        app.mesh.start_agent(node).unwrap();
        app.mesh
            .wait_for_agent_log(node, "the kept certificates inherited", |lines| {
                lines
                    .iter()
                    .any(|l| l["message"] == CERTIFICATE_INHERITED_MESSAGE)
            })
            .unwrap();
    }
    app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "server"),
        "after restarts during the outage",
    );
    let secured = app.wait_access("node-1", "an mTLS connection after the restarts", |e| {
        e["direction"] == "inbound" && e["src"] == "shop/client" && e["tls"] == true
    });
    assert_eq!(secured["client_id"], spiffe("client"));
}

#[test]
fn a_thousand_concurrent_connections_through_one_agent_leave_no_map_entries() {
    let app = App::up(MeshOptions::default());
    let out = app.client(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "server"),
        "many at once",
        &["--connections", "1000", "--timeout-secs", "60"],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("connections=1000"),
        "{}",
        describe(&out)
    );
    let closed = app.wait_access_count("node-0", "1000 closed connections", 1000, |e| {
        e["dst"] == "shop/server"
    });
    assert_eq!(closed.len(), 1000, "one access-log line per connection");
    assert!(
        closed.iter().all(|e| e["tls"] == true && e["error"] == ""),
        "all mTLS, no errors"
    );
    // Every redirect record was collected or expired with its connection.
    for node in ["node-0", "node-1"] {
        let dir = app.mesh.testbed().node_bpffs_dir(node).unwrap();
        let status = sealmesh_agent::ebpf::Redirector::pinned_status(&dir).unwrap();
        assert_eq!(
            (status.pending_connects, status.pending_accepts),
            (0, 0),
            "{node}: {status:?}"
        );
    }
}

#[test]
fn forged_peers_are_refused_by_the_inbound_side() {
    let app = App::up(MeshOptions::default());
    let node1 = app.mesh.testbed().cluster().node("node-1").unwrap().ip;
    let hbone = SocketAddrV4::new(node1, HBONE_PORT);
    let node0_ns = app.mesh.testbed().node_netns("node-0").unwrap().to_owned();
    let results = app
        .mesh
        .testbed()
        .run_in_netns(&node0_ns, || {
            forged::attempts(app.mesh.pki_dir(), app.mesh.testbed().cluster(), hbone)
        })
        .unwrap();
    assert_eq!(
        results,
        forged::Outcomes {
            foreign_ca: "handshake refused".into(),
            sni_not_on_node: "handshake refused".into(),
            identity_mismatch: "HTTP 403".into(),
            legitimate: "HTTP 200".into(),
        }
    );
}

/// Hand-made HBONE clients: one with a certificate from another CA, one
/// asking for an identity that does not live on the node, one asking to
/// reach a pod of another ServiceAccount than the SNI named.
mod forged {
    use std::{net::SocketAddrV4, path::Path, sync::Arc};

    use rcgen::{CertificateParams, KeyPair, SanType};
    use rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
    };
    use sealmesh_common::cluster::ClusterFile;
    use sealmesh_pki::{self as pki, CaSpec};

    #[derive(Debug, PartialEq, Eq)]
    pub struct Outcomes {
        pub foreign_ca: String,
        pub sni_not_on_node: String,
        pub identity_mismatch: String,
        pub legitimate: String,
    }

    /// A leaf for `spiffe` signed by the CA in `ca_dir` (pem or tls layout).
    fn leaf(
        ca: &pki::CaMaterial,
        identity: &sealmesh_common::identity::Identity,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let issuer = rcgen::Issuer::from_ca_cert_pem(
            std::str::from_utf8(&ca.cert_pem).unwrap(),
            KeyPair::from_pem(std::str::from_utf8(&ca.key_pem).unwrap()).unwrap(),
        )
        .unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(identity.spiffe_uri().try_into().unwrap()),
            SanType::DnsName(identity.dns_name().try_into().unwrap()),
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let ca_der = pki::parse_pem_certs(&ca.cert_pem, "issuer").unwrap();
        let mut chain = vec![cert.der().clone()];
        chain.extend(ca_der);
        (
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    fn config(
        anchor_pem: &[u8],
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for cert in pki::parse_pem_certs(anchor_pem, "anchors").unwrap() {
            roots.add(cert).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    async fn try_connect(
        config: Arc<ClientConfig>,
        hbone: SocketAddrV4,
        sni: &str,
        authority: &str,
    ) -> String {
        let tcp = tokio::net::TcpStream::connect(hbone)
            .await
            .expect("HBONE port reachable");
        let name = ServerName::try_from(sni.to_owned()).unwrap();
        let tls = match tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
        {
            Ok(tls) => tls,
            Err(_) => return "handshake refused".into(),
        };
        // TLS 1.3 client auth failures surface on the first read/write.
        let Ok((mut client, connection)) = h2::client::handshake(tls).await else {
            return "handshake refused".into();
        };
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(())
            .unwrap();
        let Ok((response, _stream)) = client.send_request(request, false) else {
            return "handshake refused".into();
        };
        match response.await {
            Ok(response) => format!("HTTP {}", response.status().as_u16()),
            Err(_) => "handshake refused".into(),
        }
    }

    pub fn attempts(pki_dir: &Path, cluster: &ClusterFile, hbone: SocketAddrV4) -> Outcomes {
        let td = cluster.trust_domain().unwrap();
        let id = |sa: &str| td.identity(super::APP_NS, sa).unwrap();
        let pod = |name: &str| {
            format!(
                "{}:{}",
                cluster.pod(super::APP_NS, name).unwrap().ip,
                super::ECHO_PORT
            )
        };
        let anchors = std::fs::read(pki_dir.join("ca-bundle.crt")).unwrap();
        let issuer = pki::CaMaterial::read_dir(&pki_dir.join("issuer")).unwrap();

        let other_root = pki::generate_root(&CaSpec::valid_for(
            "evil root",
            std::time::Duration::from_secs(3600),
        ))
        .unwrap();
        let (foreign_chain, foreign_key) = leaf(&other_root.material(), &id("client"));
        let (chain, key) = leaf(&issuer, &id("client"));
        let legit = config(&anchors, chain, key);

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            Outcomes {
                foreign_ca: try_connect(
                    config(&anchors, foreign_chain, foreign_key),
                    hbone,
                    &id("server").dns_name(),
                    &pod("server"),
                )
                .await,
                sni_not_on_node: try_connect(
                    legit.clone(),
                    hbone,
                    &id("client").dns_name(),
                    &pod("server"),
                )
                .await,
                identity_mismatch: try_connect(
                    legit.clone(),
                    hbone,
                    &id("server").dns_name(),
                    &pod("stranger"),
                )
                .await,
                legitimate: try_connect(legit, hbone, &id("server").dns_name(), &pod("server"))
                    .await,
            }
        })
    }
}

/// [`spec`] plus pods the tests leave out of the cluster file at first (the
/// agents have not heard of them: pods that just started): `shop/newcomer`
/// (meshed, ServiceAccount `client`), `shop/debutant` (meshed, a
/// ServiceAccount of its own) and `legacy/fresh` (unmeshed) on node-0,
/// `shop/latecomer` (meshed, ServiceAccount `server`) and `shop/premiere`
/// (meshed, a ServiceAccount of its own) on node-1.
fn spec_with_newcomers() -> TestbedSpec {
    spec()
        .pod(PodSpec::new(APP_NS, "newcomer", "client", 0).label("app", "newcomer"))
        .pod(PodSpec::new(APP_NS, "debutant", "debutant", 0).label("app", "debutant"))
        .pod(PodSpec::new(PLAIN_NS, "fresh", "default", 0).label("app", "fresh"))
        .pod(PodSpec::new(APP_NS, "latecomer", "server", 1).label("app", "latecomer"))
        .pod(PodSpec::new(APP_NS, "premiere", "premiere", 1).label("app", "premiere"))
}

/// How long the agents hold a connection of (or to) a pod they do not know.
const POD_RESOLVE_TIMEOUT: &str = "3s";
/// How long the tests keep a pod unknown while its connection is held.
const HOLD: Duration = Duration::from_millis(500);

/// Starts a client in a pod without waiting for it.
fn start_client(app: &App, ns: &str, pod: &str, connect: SocketAddr, text: &str) -> ChildGuard {
    let mut cmd = testapp::client(testapp_path(), connect, text, 1);
    cmd.args(["--timeout-secs", "10"]);
    app.mesh
        .testbed()
        .spawn_in_pod(ns, pod, cmd)
        .expect("client starts")
}

/// Waits for a client and asserts it succeeded.
fn client_succeeded(client: ChildGuard, what: &str) {
    let out = client.wait_with_output().expect("client finishes");
    assert!(out.status.success(), "{what}: {}", describe(&out));
}

fn still_running(client: &mut ChildGuard) -> bool {
    client.child_mut().try_wait().unwrap().is_none()
}

#[test]
fn pods_the_agents_do_not_know_yet_are_held_then_routed_and_never_sent_in_clear() {
    const MARKER: &str = "sealmesh-first-packet-marker-3b9e";
    let newcomers = [
        (APP_NS, "newcomer"),
        (APP_NS, "debutant"),
        (PLAIN_NS, "fresh"),
        (APP_NS, "latecomer"),
        (APP_NS, "premiere"),
    ];
    let mesh = Mesh::up(
        &spec_with_newcomers(),
        MeshOptions {
            agent_args: vec!["--pod-resolve-timeout".into(), POD_RESOLVE_TIMEOUT.into()],
            unlisted_pods: newcomers
                .iter()
                .map(|(ns, pod)| ((*ns).to_owned(), (*pod).to_owned()))
                .collect(),
            ..MeshOptions::default()
        },
    )
    .expect("mesh up");
    let servers = start_echo_servers(
        &mesh,
        &[
            (APP_NS, "server"),
            (APP_NS, "neighbour"),
            (PLAIN_NS, "plain"),
            (APP_NS, "latecomer"),
            (APP_NS, "premiere"),
        ],
    );
    let mut app = App {
        mesh,
        _servers: servers,
    };
    let capture = capture_underlay(&app.mesh, &[MARKER]);

    // A meshed pod the agent does not know connects: redirected anyway, held
    // until the agent learns the pod, then carried over mTLS.
    let mut client = start_client(
        &app,
        APP_NS,
        "newcomer",
        app.echo_addr(APP_NS, "server"),
        MARKER,
    );
    std::thread::sleep(HOLD);
    assert!(still_running(&mut client), "held while the pod is unknown");
    app.mesh.list_pod(APP_NS, "newcomer").unwrap();
    client_succeeded(client, "newcomer -> server");
    let event = app.wait_access("node-0", "the newcomer's connection", |e| {
        e["src"] == "shop/newcomer"
    });
    assert_eq!(event["tls"], true, "{event}");
    assert_eq!(event["client_id"], spiffe("client"), "{event}");
    assert!(
        event["duration_ms"].as_u64().unwrap() >= 400,
        "held: {event}"
    );

    // A pod of a ServiceAccount no pod of its node had: held while the agent
    // learns the pod, then while the identity service (frozen here, as an
    // overloaded one) issues that ServiceAccount's first certificate; then
    // secured, never refused for a certificate that was on its way.
    app.mesh.freeze_identity(true).unwrap();
    let mut client = start_client(
        &app,
        APP_NS,
        "debutant",
        app.echo_addr(APP_NS, "server"),
        MARKER,
    );
    app.mesh.list_pod(APP_NS, "debutant").unwrap();
    std::thread::sleep(2 * HOLD);
    assert!(
        still_running(&mut client),
        "held for the first certificate once the pod is known"
    );
    app.mesh.freeze_identity(false).unwrap();
    client_succeeded(client, "debutant -> server");
    let event = app.wait_access("node-0", "the debutant's connection", |e| {
        e["src"] == "shop/debutant"
    });
    assert_eq!(event["tls"], true, "{event}");
    assert_eq!(event["client_id"], spiffe("debutant"), "{event}");
    assert!(
        event["duration_ms"].as_u64().unwrap() >= 900,
        "held: {event}"
    );

    // The same on the server side: a new pod of a new ServiceAccount on the
    // other node, known to both agents, is reached while its first
    // certificate is on its way. Its agent holds the client's handshake
    // until it can present the certificate the client asks for.
    app.mesh.freeze_identity(true).unwrap();
    app.mesh.list_pod(APP_NS, "premiere").unwrap();
    std::thread::sleep(HOLD);
    let mut client = start_client(
        &app,
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "premiere"),
        MARKER,
    );
    std::thread::sleep(HOLD);
    assert!(
        still_running(&mut client),
        "held for the server's first certificate"
    );
    app.mesh.freeze_identity(false).unwrap();
    client_succeeded(client, "client -> premiere");
    let event = app.wait_access("node-0", "the connection to the premiere", |e| {
        e["dst"] == "shop/premiere"
    });
    assert_eq!(event["tls"], true, "{event}");
    assert_eq!(event["server_id"], spiffe("premiere"), "{event}");

    // An unmeshed pod the agent does not know: held, then carried in
    // plaintext as it would have gone without the agent, recorded as such.
    let mut client = start_client(
        &app,
        PLAIN_NS,
        "fresh",
        app.echo_addr(PLAIN_NS, "plain"),
        "first",
    );
    std::thread::sleep(HOLD);
    assert!(still_running(&mut client), "held while the pod is unknown");
    app.mesh.list_pod(PLAIN_NS, "fresh").unwrap();
    client_succeeded(client, "fresh -> plain, first");
    let event = app.wait_access("node-0", "the fresh pod's first connection", |e| {
        e["src"] == "legacy/fresh"
    });
    assert_eq!(event["tls"], false, "{event}");
    assert_eq!(event["no_tls_reason"], "not_meshed", "{event}");
    assert_eq!(event["error"], "", "{event}");
    assert_eq!(event["dst"], "legacy/plain", "{event}");
    // Now the kernel knows it as unmeshed: its connections bypass the agent.
    app.client_ok(
        PLAIN_NS,
        "fresh",
        app.echo_addr(PLAIN_NS, "plain"),
        "second",
    );
    app.client_ok(
        APP_NS,
        "client",
        app.echo_addr(APP_NS, "neighbour"),
        "a later line",
    );
    app.wait_access("node-0", "the later connection", |e| {
        e["dst"] == "shop/neighbour"
    });
    assert_eq!(
        app.access("node-0", "src", "legacy/fresh").len(),
        1,
        "only the first connection went through the agent"
    );
    let status = sealmesh_agent::ebpf::Redirector::pinned_status(
        &app.mesh.testbed().node_bpffs_dir("node-0").unwrap(),
    )
    .unwrap();
    assert_eq!(status.unmeshed_pods, 1, "legacy/fresh: {status:?}");

    // A destination pod the agents learn of after the client dialled it:
    // held, then secured.
    let latecomer = app.echo_addr(APP_NS, "latecomer");
    let mut client = start_client(&app, APP_NS, "client", latecomer, MARKER);
    std::thread::sleep(HOLD);
    assert!(
        still_running(&mut client),
        "held while the destination is unknown"
    );
    app.mesh.list_pod(APP_NS, "latecomer").unwrap();
    client_succeeded(client, "client -> latecomer");
    let event = app.wait_access("node-0", "the connection to the latecomer", |e| {
        e["dst"] == "shop/latecomer"
    });
    assert_eq!(event["tls"], true, "{event}");
    assert_eq!(event["server_id"], spiffe("server"), "{event}");

    // An address of the cluster's pod network that never becomes a pod:
    // refused after the timeout with its reason, never sent in plaintext.
    let nobody = SocketAddr::from((Ipv4Addr::new(10, 244, 1, 200), ECHO_PORT));
    let out = app.client(APP_NS, "client", nobody, MARKER, &["--timeout-secs", "10"]);
    assert!(!out.status.success(), "{}", describe(&out));
    let event = app.wait_access("node-0", "the refusal", |e| {
        e["dst_addr"] == nobody.to_string()
    });
    assert_eq!(event["refused_reason"], "unknown_destination", "{event}");
    assert!(event["duration_ms"].as_u64().unwrap() >= 2900, "{event}");

    // A host process (the node's, like the kubelet) is never redirected.
    let node0 = app.mesh.testbed().node_netns("node-0").unwrap().to_owned();
    let host_client = testapp::client(testapp_path(), app.echo_addr(PLAIN_NS, "plain"), "host", 1);
    let out = app
        .mesh
        .testbed()
        .spawn_in_node("node-0", host_client)
        .expect("host client starts")
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "host -> plain: {} in {node0}",
        describe(&out)
    );
    let node_ip = app.mesh.testbed().cluster().node("node-0").unwrap().ip;
    assert!(
        app.mesh
            .access_log("node-0")
            .unwrap()
            .iter()
            .all(|e| !e["src_addr"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("{node_ip}:"))),
        "the host's connection did not reach the agent"
    );

    assert_marker_never_in_clear(capture, MARKER, "the traffic");
}

#[test]
fn a_component_that_exits_at_start_is_reported_with_its_log_not_waited_for() {
    for (options, component, said) in [
        (
            MeshOptions {
                agent_args: vec!["--no-such-flag".into()],
                ..MeshOptions::default()
            },
            "the agent of node-0",
            "unexpected argument '--no-such-flag'",
        ),
        (
            MeshOptions {
                identity_args: vec!["--cert-lifetime=soon".into()],
                ..MeshOptions::default()
            },
            "the identity service",
            "invalid value 'soon' for '--cert-lifetime",
        ),
    ] {
        let Err(error) = Mesh::up(&spec(), options) else {
            panic!("{component} started with a bad flag");
        };
        let MeshError::Exited { what, tail, .. } = &error else {
            panic!("reported as exited, not after a timeout: {error}");
        };
        assert_eq!(what, component);
        assert!(tail.contains(said), "{error}");
    }
}

/// A rolling update replaces each node's agent while a meshed client keeps
/// opening connections across nodes: the new agent takes the running one's
/// listening sockets, so not one new connection is refused, and the
/// long-lived connection the old agents carried ends at most once per
/// replaced agent (cut at the end of its drain), never in plaintext.
#[test]
fn a_rolling_update_of_every_agent_refuses_no_new_connection() {
    let mut app = App::up(MeshOptions::default());
    let testbed = app.mesh.testbed();
    let server_addr = SocketAddr::from((pod_ip(testbed, APP_NS, "server"), ECHO_PORT + 1));
    let mut server = testbed
        .spawn_in_pod(
            APP_NS,
            "server",
            testapp::line_server(testapp_path(), server_addr, "server"),
        )
        .unwrap();
    testapp::wait_listening(&mut server).unwrap();
    let capture = capture_underlay(&app.mesh, &["vote "]);
    let mut bot = testbed
        .spawn_in_pod(
            APP_NS,
            "client",
            testapp::bot(
                testapp_path(),
                &[("server", server_addr)],
                Duration::from_millis(20),
            ),
        )
        .unwrap();
    let mut lines = support::FollowedLines::new(bot.child_mut().stdout.take().unwrap());
    let ok = |l: &str| l.starts_with("ok ");
    for _ in 0..10 {
        lines.wait_for("answers before the update", Duration::from_secs(30), ok);
    }

    for node in ["node-1", "node-0"] {
        let status = app.mesh.roll_agent(node).unwrap();
        assert!(
            status.success(),
            "the old agent of {node} stopped cleanly: {status}"
        );
        let logs = app.mesh.agent_log_lines(node).unwrap();
        assert!(
            logs.iter()
                .any(|l| l["message"] == LISTENERS_HANDED_OVER_MESSAGE),
            "{node}: the old agent handed its listeners over"
        );
        let taken: Vec<_> = logs
            .iter()
            .filter(|l| l["message"] == "listening socket taken over from the previous agent")
            .filter_map(|l| l["addr"].as_str())
            .collect();
        for port in [
            OUTBOUND_PORT,
            HBONE_PORT,
            AGENT_ADMIN_PORT,
            AGENT_METRICS_PORT,
        ] {
            assert!(
                taken.iter().any(|addr| addr.ends_with(&format!(":{port}"))),
                "{node}: the new agent took the listener on port {port}: {taken:?}"
            );
        }
        for _ in 0..10 {
            lines.wait_for("answers after the update", Duration::from_secs(30), ok);
        }
    }
    bot.kill();
    let reports: Vec<testapp::BotReport> = lines
        .all(Duration::from_millis(200))
        .iter()
        .filter_map(|l| testapp::BotReport::parse(l))
        .collect();
    let failed = |conn: &str| {
        reports
            .iter()
            .filter(|r| r.conn == conn && r.outcome.is_err())
            .collect::<Vec<_>>()
    };
    let fresh = reports.iter().filter(|r| r.conn == "fresh").count();
    assert!(fresh >= 20, "the client kept connecting: {reports:?}");
    assert_eq!(
        failed("fresh"),
        Vec::<&testapp::BotReport>::new(),
        "no new connection failed"
    );
    assert!(
        failed("persistent").len() <= 2,
        "the long-lived connection ended at most once per replaced agent: {:?}",
        failed("persistent")
    );
    assert_marker_never_in_clear(capture, "vote ", "the requests during the update");
}

/// A node whose agent is gone without removing sealmesh (it crashed, or its
/// DaemonSet was deleted while it was down) keeps refusing its meshed pods'
/// connections, failing closed; `sealmesh-agent --uninstall` on the node
/// removes the redirection, and the pods connect directly again.
#[test]
fn uninstall_on_a_node_without_agent_lets_its_pods_connect_directly() {
    let mut app = App::up(MeshOptions::default());
    let server = app.echo_addr(APP_NS, "server");
    app.client_ok(APP_NS, "client", server, "meshed");
    app.mesh.stop_agent("node-0").unwrap();
    let refused = app.client(
        APP_NS,
        "client",
        server,
        "no agent",
        &["--timeout-secs", "3"],
    );
    assert!(
        !refused.status.success(),
        "fails closed: {}",
        describe(&refused)
    );

    let bpffs_dir = app.mesh.testbed().node_bpffs_dir("node-0").unwrap();
    let out = std::process::Command::new(locate_binary("sealmesh-agent").unwrap())
        .arg("--uninstall")
        .arg("--cluster-file")
        .arg(app.mesh.testbed().cluster_file_path())
        .args(["--node", "node-0", "--log-format", "json"])
        .arg("--bpffs-dir")
        .arg(&bpffs_dir)
        .arg("--handover-socket")
        .arg(app.mesh.testbed().handover_socket("node-0"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(SEALMESH_REMOVED_MESSAGE),
        "{}",
        describe(&out)
    );
    assert!(
        !bpffs_dir.exists(),
        "no pin left under {}",
        bpffs_dir.display()
    );
    let direct = app.client_ok(APP_NS, "client", server, "after uninstall");
    assert!(direct.contains("ok "), "{direct}");
}
