//! The identity channel on the testbed (root, real network namespaces, real
//! eBPF, the real identity service and agents), in local and Kubernetes
//! mode: while agents start and obtain their certificates, the underlay
//! shows neither a node token nor an HTTP/2 preface in clear on the
//! identity port; a captured token replayed in plaintext from an unmeshed
//! pod gets no certificate; and ServiceAccounts whose names hold dots are
//! meshed across nodes.

use std::{net::SocketAddr, time::Duration};

use sealmesh_common::consts::{IDENTITY_GRPC_PORT, MESH_LABEL, MESH_LABEL_ENABLED};
use sealmesh_proto::identity::{CertifyRequest, identity_client::IdentityClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xtask::{
    capture::{Capture, CaptureReport},
    mesh::{Mesh, MeshOptions},
    testbed::{PodSpec, TestbedSpec, kube::KubeMode},
};

mod support;

use support::{
    APP_NS, PLAIN_NS, client_in_pod, describe, echo_addr, spiffe, start_echo_server, wait_access,
};

/// The HTTP/2 connection preface, which opens every cleartext gRPC
/// connection.
const HTTP2_PREFACE: &str = "PRI * HTTP/2.0";
/// Bytes of a token looked for at a time: a long token may be split across
/// segments, so pieces of it are the markers.
const TOKEN_PIECE: usize = 24;

/// node-0: `client` (ServiceAccount `a.b`); node-1: `server` (ServiceAccount
/// `api.v1`) and `legacy/plain` (unmeshed).
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(APP_NS, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(PLAIN_NS, &[])
        .pod(PodSpec::new(APP_NS, "client", "a.b", 0))
        .pod(PodSpec::new(APP_NS, "server", "api.v1", 1))
        .pod(PodSpec::new(PLAIN_NS, "plain", "default", 1))
}

/// Pieces of `token` that cannot all hide in the gaps between segments.
fn token_pieces(token: &str) -> Vec<String> {
    let bytes = token.as_bytes();
    (0..bytes.len().saturating_sub(TOKEN_PIECE))
        .step_by(TOKEN_PIECE * 4)
        .map(|start| String::from_utf8_lossy(&bytes[start..start + TOKEN_PIECE]).into_owned())
        .chain((bytes.len() < TOKEN_PIECE * 2).then(|| token.to_owned()))
        .collect()
}

fn node_token(mesh: &Mesh, node: &str) -> String {
    support::node_token(mesh.testbed(), node).trim().to_owned()
}

fn capture_identity_port(mesh: &Mesh, markers: &[String]) -> Capture {
    let markers: Vec<&str> = markers.iter().map(String::as_str).collect();
    mesh.testbed()
        .run_in_netns(&mesh.testbed().underlay_netns(), || {
            Capture::start_on_tcp_port(IDENTITY_GRPC_PORT, &markers)
        })
        .expect("enter the underlay")
        .expect("capture starts")
}

fn hits(report: &CaptureReport, markers: &[String]) -> Vec<(String, u64)> {
    markers
        .iter()
        .map(|m| (m.clone(), report.hits_for(m)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn the_identity_channel_is_encrypted_and_authenticated(kubernetes: Option<KubeMode>) {
    let mut mesh = Mesh::up(
        &spec(),
        MeshOptions {
            start_agents: false,
            wait_for_certificates: false,
            kubernetes,
            ..MeshOptions::default()
        },
    )
    .expect("mesh up");
    let nodes = ["node-0", "node-1"];
    let tokens: Vec<String> = nodes.iter().map(|n| node_token(&mesh, n)).collect();
    let mut markers: Vec<String> = tokens.iter().flat_map(|t| token_pieces(t)).collect();
    markers.push(HTTP2_PREFACE.to_owned());

    // Agents start and obtain their certificates under the capture.
    let capture = capture_identity_port(&mesh, &markers);
    for node in nodes {
        mesh.start_agent(node).expect("agent starts");
    }
    for node in nodes {
        mesh.wait_for_certificates(node)
            .expect("certificates obtained");
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = capture.finish().unwrap();
    assert!(
        report.frames > 10,
        "the capture saw the agents' identity traffic: {report:?}"
    );
    assert_eq!(
        hits(&report, &markers),
        [],
        "token bytes or an HTTP/2 preface crossed the underlay in clear"
    );

    // ServiceAccounts named with dots: meshed end to end, across nodes.
    let _server = start_echo_server(&mesh, APP_NS, "server");
    let out = client_in_pod(
        mesh.testbed(),
        APP_NS,
        "client",
        echo_addr(mesh.testbed(), APP_NS, "server"),
        "hello a.b",
        &[],
    );
    assert!(
        out.status.success(),
        "client (a.b) -> server (api.v1): {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok "),
        "{out:?}"
    );
    let outbound = wait_access(&mesh, "node-0", "an access-log event", |e| {
        e["direction"] == "outbound" && e["dst"] == "shop/server"
    });
    let inbound = wait_access(&mesh, "node-1", "an access-log event", |e| {
        e["direction"] == "inbound" && e["dst"] == "shop/server"
    });
    for event in [&outbound, &inbound] {
        assert_eq!(event["tls"], true, "{event}");
        assert_eq!(event["client_id"], spiffe("a.b"), "{event}");
        assert_eq!(event["server_id"], spiffe("api.v1"), "{event}");
        assert_eq!(event["src"], "shop/client", "{event}");
    }

    // The replay: node-1's captured token, sent from the unmeshed pod on
    // node-1 as the API used to be spoken (gRPC over cleartext HTTP/2), for
    // the identity of the meshed pod there. No certificate comes back.
    let identity_addr = SocketAddr::from((mesh.testbed().control_plane_ip(), IDENTITY_GRPC_PORT));
    let capture = capture_identity_port(&mesh, &markers);
    let plain_netns = mesh
        .testbed()
        .pod_netns(PLAIN_NS, "plain")
        .unwrap()
        .to_owned();
    let replayed = tokens[1].clone();
    let (result, raw_answer) = mesh
        .testbed()
        .run_in_netns(&plain_netns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let channel =
                    tonic::transport::Endpoint::from_shared(format!("http://{identity_addr}"))
                        .unwrap()
                        .timeout(Duration::from_secs(10))
                        .connect_lazy();
                let result = IdentityClient::new(channel)
                    .certify(CertifyRequest {
                        identity: format!(
                            "api.v1.{APP_NS}.serviceaccount.identity.sealmesh.cluster.local"
                        ),
                        token: replayed.clone().into_bytes(),
                        certificate_signing_request: Vec::new(),
                    })
                    .await;
                // The same, byte-blind: the preface and the token in one
                // segment, whatever the server says first.
                let mut tcp = tokio::net::TcpStream::connect(identity_addr).await.unwrap();
                tcp.write_all(format!("{HTTP2_PREFACE}\r\n\r\nSM\r\n\r\n{replayed}").as_bytes())
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
                    .await
                    .expect("the server closes the connection");
                (result, answer)
            })
        })
        .expect("enter the unmeshed pod");
    let status = result.expect_err("a plaintext client gets no certificate");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
        ),
        "the connection failed, the service never answered: {status:?}"
    );
    assert!(
        raw_answer.is_empty() || raw_answer[0] == 0x15,
        "only a TLS alert record (content type 21) may answer plaintext: {raw_answer:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let report = capture.finish().unwrap();
    // This time the attacker's own bytes are on the wire in clear: the
    // capture does see them, so the zero hits above mean something.
    assert!(
        report.hits_for(HTTP2_PREFACE) > 0,
        "the replay's preface was seen: {report:?}"
    );
    assert!(
        token_pieces(&tokens[1])
            .iter()
            .all(|piece| report.hits_for(piece) > 0),
        "the replayed token was seen: {report:?}"
    );
    let identity_log = std::fs::read_to_string(mesh.identity_log()).unwrap();
    assert!(identity_log.contains("serving over TLS"), "{identity_log}");
    assert!(
        !identity_log.contains("refused certificate"),
        "the replayed request never reached Certify: {identity_log}"
    );
}

#[test]
fn the_identity_channel_is_encrypted_and_authenticated_in_local_mode() {
    the_identity_channel_is_encrypted_and_authenticated(None);
}

#[test]
fn the_identity_channel_is_encrypted_and_authenticated_in_kubernetes_mode() {
    the_identity_channel_is_encrypted_and_authenticated(Some(KubeMode::fake()));
}
