//! The agent's admin gRPC API, metrics and health probes on the testbed
//! (root; real agents, kernel eBPF, mTLS and identity service). The admin
//! API listens on the node's loopback, so clients run in the node's network
//! namespace, as the CLI does.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use sealmesh_agent::ebpf::acceleration::KernelLimit;
use sealmesh_common::consts::{AGENT_METRICS_PORT, MESH_LABEL, MESH_LABEL_ENABLED};
use sealmesh_proto::admin::{self as pb, ConnectionEvent, Direction, Phase, PodRef};
use xtask::{
    mesh::{Mesh, MeshOptions},
    testbed::{ChildGuard, PodSpec, TestbedSpec},
};

mod support;

use support::{
    APP_NS, PLAIN_NS, admin, admin_client, client_in_pod, describe, echo_addr, node_token,
    node_token_file, spiffe, start_echo_server,
};

const TIMEOUT: Duration = Duration::from_secs(40);

fn pod_ref(namespace: &str, name: &str) -> Option<PodRef> {
    Some(PodRef {
        namespace: namespace.into(),
        name: name.into(),
    })
}

/// node-0: `shop/client` (meshed); node-1: `shop/server` (meshed) and
/// `legacy/plain` (unmeshed).
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(PLAIN_NS, &[])
        .pod(PodSpec::new(APP_NS, "client", "client", 0))
        .pod(PodSpec::new(APP_NS, "server", "server", 1))
        .pod(PodSpec::new(PLAIN_NS, "plain", "default", 1))
}

fn status(mesh: &Mesh, node: &str) -> pb::AgentStatus {
    admin(mesh, node, |mut c| async move {
        c.get_status(pb::GetStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

fn connections(mesh: &Mesh, node: &str) -> pb::GetConnectionsResponse {
    admin(mesh, node, |mut c| async move {
        c.get_connections(pb::GetConnectionsRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

fn certificates(mesh: &Mesh, node: &str) -> pb::GetCertificatesResponse {
    admin(mesh, node, |mut c| async move {
        c.get_certificates(pb::GetCertificatesRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

/// `GET path` on the node's metrics port: (status code, body).
fn http_get(mesh: &Mesh, node: &str, path: &str) -> (u16, String) {
    let netns = mesh.testbed().node_netns(node).unwrap().to_owned();
    let path = path.to_owned();
    mesh.testbed()
        .run_in_netns(&netns, move || {
            let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, AGENT_METRICS_PORT)).unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            let (head, body) = response.split_once("\r\n\r\n").unwrap();
            let code = head.split(' ').nth(1).unwrap().parse().unwrap();
            (code, body.to_owned())
        })
        .unwrap()
}

/// Polls `f` until it returns Some, or panics naming `what`.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_server(mesh: &Mesh, ns: &str, pod: &str) -> (ChildGuard, SocketAddr) {
    (
        start_echo_server(mesh, ns, pod),
        echo_addr(mesh.testbed(), ns, pod),
    )
}

fn run_client(mesh: &Mesh, connect: SocketAddr, text: &str) {
    let out = client_in_pod(mesh.testbed(), APP_NS, "client", connect, text, &[]);
    assert!(
        out.status.success(),
        "client -> {connect}: {}",
        describe(&out)
    );
}

/// Subscribes to `node`'s tap for `shop/client` on a thread in the node's
/// namespace; returns once subscribed, with a handle yielding the events up
/// to the first close.
fn tap_until_close(mesh: &Mesh, node: &str) -> std::thread::JoinHandle<Vec<ConnectionEvent>> {
    let netns = mesh.testbed().node_netns(node).unwrap().to_owned();
    let (subscribed_tx, subscribed_rx) = mpsc::channel();
    let handle = mesh
        .testbed()
        .thread_in_netns(&netns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let mut client = admin_client().await;
                let mut stream = client
                    .tap(pb::TapRequest {
                        namespace: APP_NS.into(),
                        pod: "client".into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                subscribed_tx.send(()).unwrap();
                let mut events = Vec::new();
                loop {
                    let event = tokio::time::timeout(TIMEOUT, stream.message())
                        .await
                        .expect("a tap event in time")
                        .unwrap()
                        .expect("the tap stream stays open");
                    let closed = event.phase == Phase::Close as i32;
                    events.push(event);
                    if closed {
                        return events;
                    }
                }
            })
        })
        .unwrap();
    subscribed_rx.recv_timeout(TIMEOUT).expect("tap subscribed");
    handle
}

/// The value of the one metric line whose name and labels are exactly `series`.
fn metric(body: &str, series: &str) -> Option<String> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

fn connection_series(name: &str, tls: bool, server: &str, reason: &str, dst_ns: &str) -> String {
    format!(
        "{name}{{direction=\"outbound\",tls=\"{tls}\",client_id=\"{}\",server_id=\"{server}\",no_tls_reason=\"{reason}\",src_namespace=\"{APP_NS}\",dst_namespace=\"{dst_ns}\"}}",
        if tls { spiffe("client") } else { String::new() },
    )
}

#[test]
fn admin_api_and_metrics_report_a_real_mtls_connection_exactly() {
    let mesh = Mesh::up(&spec(), MeshOptions::default()).expect("mesh up");
    let (_server, server_addr) = start_server(&mesh, APP_NS, "server");
    let (_plain, plain_addr) = start_server(&mesh, PLAIN_NS, "plain");
    let text = "hello admin";

    // Tap streams a connection made after subscribing, with both identities.
    let tap = tap_until_close(&mesh, "node-0");
    run_client(&mesh, server_addr, text);
    let events = tap.join().unwrap();
    let phases: Vec<i32> = events.iter().map(|e| e.phase).collect();
    assert_eq!(phases, [Phase::Open as i32, Phase::Close as i32]);
    let close = &events[1];
    assert_eq!(close.id, events[0].id);
    assert_eq!(close.direction, Direction::Outbound as i32);
    assert_eq!(close.node, "node-0");
    assert_eq!(close.src, pod_ref(APP_NS, "client"));
    assert_eq!(close.dst, pod_ref(APP_NS, "server"));
    assert_eq!(close.dst_addr, server_addr.to_string());
    assert_eq!(close.client_id, spiffe("client"));
    assert_eq!(close.server_id, spiffe("server"));
    assert!(close.tls);
    assert_eq!(close.no_tls_reason, "");
    assert_eq!(close.error, "");
    let sent = text.len() as u64;
    assert_eq!(
        (close.bytes_src_to_dst, close.bytes_dst_to_src),
        (sent, sent)
    );

    // A plaintext connection to the unmeshed pod, for the no-TLS series.
    run_client(&mesh, plain_addr, text);

    // Edges on both sides; nothing open any more.
    let edge = |direction: Direction, dst: &str, tls: bool| pb::Edge {
        src: pod_ref(APP_NS, "client"),
        dst: if tls {
            pod_ref(APP_NS, dst)
        } else {
            pod_ref(PLAIN_NS, dst)
        },
        direction: direction as i32,
        client_id: if tls { spiffe("client") } else { String::new() },
        server_id: if tls { spiffe("server") } else { String::new() },
        tls,
        no_tls_reason: if tls { "" } else { "not_meshed" }.into(),
        connections_total: 1,
        connections_open: 0,
        errors_total: 0,
        refused_total: 0,
        denied_total: 0,
        denied_policy: String::new(),
        dry_run_denied_policy: String::new(),
        last_seen_unix_ms: 0,
    };
    let without_time = |mut edges: Vec<pb::Edge>| {
        for e in &mut edges {
            assert!(e.last_seen_unix_ms > 0);
            e.last_seen_unix_ms = 0;
        }
        edges
    };
    let node0 = wait_for("node-0 to see both connections closed", || {
        let c = connections(&mesh, "node-0");
        (c.edges.len() == 2 && c.edges.iter().all(|e| e.connections_open == 0)).then_some(c)
    });
    assert!(node0.open.is_empty(), "{:?}", node0.open);
    assert_eq!(
        without_time(node0.edges),
        [
            edge(Direction::Outbound, "plain", false),
            edge(Direction::Outbound, "server", true)
        ]
    );
    let node1 = wait_for("node-1 to see the inbound connection closed", || {
        let c = connections(&mesh, "node-1");
        (c.edges.len() == 1 && c.edges[0].connections_open == 0).then_some(c)
    });
    assert_eq!(
        without_time(node1.edges),
        [edge(Direction::Inbound, "server", true)]
    );

    // Certificates: exactly the client's, valid, as logged, chained to the issuer.
    let certs = certificates(&mesh, "node-0");
    assert_eq!(certs.wanted, [spiffe("client")]);
    assert_eq!(
        certs.trust_anchors_pem,
        std::fs::read_to_string(mesh.pki_dir().join("ca-bundle.crt")).unwrap()
    );
    assert_eq!(certs.certificates.len(), 1);
    let cert = &certs.certificates[0];
    assert_eq!(cert.identity, spiffe("client"));
    assert!(cert.valid);
    assert_eq!(cert.last_error, "");
    let logged_serial = mesh
        .agent_log_lines("node-0")
        .unwrap()
        .into_iter()
        .find(|l| l["message"] == sealmesh_common::consts::CERTIFICATE_OBTAINED_MESSAGE)
        .and_then(|l| l["serial"].as_str().map(str::to_owned))
        .unwrap();
    // The log and the admin API print one serial, as openssl does.
    assert_eq!(cert.serial, logged_serial);
    assert!(
        cert.serial
            .split(':')
            .all(|byte| byte.len() == 2 && byte.bytes().all(|b| b.is_ascii_hexdigit())),
        "{}",
        cert.serial
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(cert.not_before_unix <= now && now < cert.not_after_unix);
    assert!(cert.last_refresh_unix <= now && cert.last_refresh_unix >= cert.not_before_unix);
    let issuer = CertificateDer::from_pem_file(mesh.pki_dir().join("issuer/tls.crt")).unwrap();
    assert_eq!(cert.chain.len(), 2, "leaf and issuer");
    assert_eq!(cert.chain[1], issuer.as_ref());

    // Config: the effective values, the token file named, its content never shown.
    let config = admin(&mesh, "node-0", |mut c| async move {
        c.get_config(pb::GetConfigRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    let token_file = node_token_file(mesh.testbed(), "node-0");
    let token = node_token(mesh.testbed(), "node-0");
    assert!(config.yaml.contains("node: node-0\n"), "{}", config.yaml);
    assert!(
        config.yaml.contains("node_ip: 172.18.0.2\n"),
        "{}",
        config.yaml
    );
    assert!(
        config
            .yaml
            .contains(&format!("token_file: {}\n", token_file.display())),
        "{}",
        config.yaml
    );
    assert!(!config.yaml.contains(token.trim()), "the token leaked");

    // eBPF: the redirect programs attached, the one meshed pod of node-0.
    let ebpf = admin(&mesh, "node-0", |mut c| async move {
        c.get_ebpf_status(pb::GetEbpfStatusRequest {})
            .await
            .unwrap()
            .into_inner()
    });
    let attached: BTreeSet<&str> = ebpf.attached_programs.iter().map(String::as_str).collect();
    assert!(
        attached.is_superset(&BTreeSet::from(sealmesh_agent::admin::REQUIRED_PROGRAMS)),
        "{attached:?}"
    );
    assert_eq!(ebpf.meshed_pods, 1);
    assert_eq!(
        Path::new(&ebpf.pin_dir),
        mesh.testbed().node_bpffs_dir("node-0").unwrap()
    );
    // Sockmap acceleration by default: on exactly when the kernel passed the agent's probe,
    // with the reasons otherwise, said once in the log.
    assert!(
        config.yaml.contains("sockmap_acceleration: auto\n"),
        "{}",
        config.yaml
    );
    assert_eq!(
        ebpf.sockmap_acceleration,
        ebpf.sockmap_acceleration_limits.is_empty(),
        "{ebpf:?}"
    );
    // The probe itself ran (sk_msg works here: agent/tests/sockmap.rs needs it too); what it
    // found, if anything, is about the kernel.
    let probe_failures = KernelLimit::Unsupported(String::new()).to_string();
    assert!(
        !ebpf
            .sockmap_acceleration_limits
            .iter()
            .any(|limit| limit.starts_with(&probe_failures)),
        "{ebpf:?}"
    );
    let decisions: Vec<_> = mesh
        .agent_log_lines("node-0")
        .unwrap()
        .into_iter()
        .filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.starts_with("sockmap acceleration "))
        })
        .collect();
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    if !ebpf.sockmap_acceleration {
        assert_eq!(
            decisions[0]["limits"],
            ebpf.sockmap_acceleration_limits.join("; "),
            "{decisions:?}"
        );
    }

    // Status: ready.
    let node0_status = status(&mesh, "node-0");
    assert_eq!(
        (
            node0_status.node.as_str(),
            node0_status.node_ip.as_str(),
            node0_status.ready
        ),
        ("node-0", "172.18.0.2", true)
    );
    assert_eq!(node0_status.not_ready_reasons, Vec::<String>::new());
    assert_eq!(node0_status.version, env!("CARGO_PKG_VERSION"));

    // Metrics: exact series.
    let (code, body) = http_get(&mesh, "node-0", "/metrics");
    assert_eq!(code, 200);
    let server_id = spiffe("server");
    let mtls = |name| connection_series(name, true, &server_id, "", APP_NS);
    let plain = |name| connection_series(name, false, "", "not_meshed", PLAIN_NS);
    let bytes = sent.to_string();
    for (series, value) in [
        (mtls("sealmesh_tcp_open_total"), "1"),
        (mtls("sealmesh_tcp_close_total"), "1"),
        (mtls("sealmesh_tcp_open_connections"), "0"),
        (mtls("sealmesh_tcp_read_bytes_total"), &bytes),
        (mtls("sealmesh_tcp_write_bytes_total"), &bytes),
        (plain("sealmesh_tcp_open_total"), "1"),
        (plain("sealmesh_tcp_close_total"), "1"),
        (plain("sealmesh_tcp_read_bytes_total"), &bytes),
        (
            "sealmesh_tls_handshake_duration_seconds_count{direction=\"outbound\"}".to_owned(),
            "1",
        ),
        (
            format!(
                "sealmesh_certificate_expiry_timestamp_seconds{{identity=\"{}\"}}",
                spiffe("client")
            ),
            &cert.not_after_unix.to_string(),
        ),
        (
            format!(
                "sealmesh_certificate_refresh_total{{identity=\"{}\",result=\"success\"}}",
                spiffe("client")
            ),
            "1",
        ),
        (
            format!(
                "sealmesh_certificate_refresh_total{{identity=\"{}\",result=\"failure\"}}",
                spiffe("client")
            ),
            "0",
        ),
    ] {
        assert_eq!(
            metric(&body, &series).as_deref(),
            Some(value),
            "{series} in\n{body}"
        );
    }
    assert!(!body.contains("sealmesh_tcp_refused_total{"), "{body}");
    let (code, body) = http_get(&mesh, "node-1", "/metrics");
    assert_eq!(code, 200);
    let inbound = format!(
        "sealmesh_tcp_close_total{{direction=\"inbound\",tls=\"true\",client_id=\"{}\",server_id=\"{server_id}\",no_tls_reason=\"\",src_namespace=\"{APP_NS}\",dst_namespace=\"{APP_NS}\"}}",
        spiffe("client")
    );
    assert_eq!(metric(&body, &inbound).as_deref(), Some("1"), "{body}");
    assert_eq!(
        metric(
            &body,
            "sealmesh_tls_handshake_duration_seconds_count{direction=\"inbound\"}"
        )
        .as_deref(),
        Some("1"),
        "{body}"
    );

    assert_eq!(
        http_get(&mesh, "node-0", "/healthz/live"),
        (200, "ok\n".into())
    );
    assert_eq!(
        http_get(&mesh, "node-0", "/healthz/ready"),
        (200, "ready\n".into())
    );
}

#[test]
fn readiness_waits_for_a_certificate_of_every_local_meshed_service_account() {
    let mut mesh = Mesh::up(
        &spec(),
        MeshOptions {
            start_identity: false,
            wait_for_certificates: false,
            ..MeshOptions::default()
        },
    )
    .expect("mesh up without the identity service");

    let missing = format!(
        "no valid certificate for local meshed ServiceAccount {}: ",
        spiffe("client")
    );
    let not_ready = status(&mesh, "node-0");
    assert!(!not_ready.ready);
    assert_eq!(not_ready.not_ready_reasons.len(), 1, "{not_ready:?}");
    assert!(
        not_ready.not_ready_reasons[0].starts_with(&missing),
        "{not_ready:?}"
    );
    let (code, body) = http_get(&mesh, "node-0", "/healthz/ready");
    assert_eq!(code, 503);
    assert!(
        body.starts_with(&format!("not ready:\n- {missing}")),
        "{body}"
    );
    // The cert store says the same.
    let certs = certificates(&mesh, "node-0");
    assert_eq!(certs.wanted, [spiffe("client")]);
    assert!(certs.certificates.iter().all(|c| !c.valid));

    // Once the identity service runs, the agent obtains the certificate and turns ready.
    mesh.start_identity().unwrap();
    wait_for("node-0 ready", || {
        status(&mesh, "node-0").ready.then_some(())
    });
    assert_eq!(
        status(&mesh, "node-0").not_ready_reasons,
        Vec::<String>::new()
    );
    assert_eq!(
        http_get(&mesh, "node-0", "/healthz/ready"),
        (200, "ready\n".into())
    );
    let (_, body) = http_get(&mesh, "node-0", "/metrics");
    let refreshes = |result: &str| {
        metric(
            &body,
            &format!(
                "sealmesh_certificate_refresh_total{{identity=\"{}\",result=\"{result}\"}}",
                spiffe("client")
            ),
        )
        .map(|v| v.parse::<u64>().unwrap())
    };
    assert_eq!(refreshes("success"), Some(1), "{body}");
    assert!(refreshes("failure").unwrap() >= 1, "{body}");
}
