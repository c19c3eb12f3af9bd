//! Strict inbound mode end to end on the testbed (root, real kernel eBPF,
//! real mTLS, real identity service): a strict pod accepts connections only
//! through its node's agent, from the node itself and over its own
//! loopback; the kernel refuses plaintext from unmeshed pods, other nodes
//! and hosts, counts each refusal and reports it (metric, tap, access log,
//! admin API, `sealmesh why`). Permissive pods are unchanged. Local mode
//! reads the policy from the cluster file, Kubernetes mode from the API.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Command, Output},
    sync::mpsc,
    time::{Duration, Instant},
};

use sealmesh_agent::ebpf::Redirector;
use sealmesh_common::{
    authz::AuthorizationPolicy,
    cluster::ClusterFile,
    consts::{
        ACCESS_LOG_TARGET, AGENT_ADMIN_PORT, AGENT_METRICS_PORT, INBOUND_POLICY_ANNOTATION,
        INBOUND_POLICY_PERMISSIVE, INBOUND_POLICY_STRICT, MESH_LABEL, MESH_LABEL_ENABLED,
    },
};
use sealmesh_proto::admin::{self as pb, ConnectionEvent, Phase, admin_client::AdminClient};
use serde_json::Value;
use xtask::{
    mesh::{Mesh, MeshOptions},
    testapp,
    testbed::{ChildGuard, PodSpec, TestbedSpec, kube::KubeMode},
};

mod support;

use support::{
    ECHO_PORT, describe, echo_addr, mesh_with_echo_servers, pod_ip, sealmesh_path, testapp_path,
};

const SHOP: &str = "shop";
const OPEN: &str = "open";
const LEGACY: &str = "legacy";
const WAIT: Duration = Duration::from_secs(40);
/// How long a refused client waits: its SYN is dropped, so it times out.
const REFUSED_CONNECT_TIMEOUT_SECS: &str = "2";

/// `shop` (meshed) is strict by namespace annotation; `open` (meshed) is
/// not annotated; `legacy` is not meshed.
/// node-0: `shop/client`, `legacy/outsider`;
/// node-1: `shop/server`, `shop/neighbour`, `shop/relaxed` (pod annotation
/// permissive), `shop/typo` (pod annotation `Strict`: ignored), `open/server`,
/// `open/guarded` (pod annotation strict), `legacy/plain`.
fn spec() -> TestbedSpec {
    TestbedSpec::new(2)
        .namespace(SHOP, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace_annotation(SHOP, INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT)
        .namespace(OPEN, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(LEGACY, &[])
        .pod(PodSpec::new(SHOP, "client", "client", 0))
        .pod(PodSpec::new(LEGACY, "outsider", "default", 0))
        .pod(PodSpec::new(SHOP, "server", "server", 1))
        .pod(PodSpec::new(SHOP, "neighbour", "neighbour", 1))
        .pod(
            PodSpec::new(SHOP, "relaxed", "relaxed", 1)
                .annotation(INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_PERMISSIVE),
        )
        .pod(PodSpec::new(SHOP, "typo", "typo", 1).annotation(INBOUND_POLICY_ANNOTATION, "Strict"))
        .pod(PodSpec::new(OPEN, "server", "server", 1))
        .pod(
            PodSpec::new(OPEN, "guarded", "guarded", 1)
                .annotation(INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT),
        )
        .pod(PodSpec::new(LEGACY, "plain", "default", 1))
}

/// Echo servers of the pods connections go to.
const SERVERS: [(&str, &str); 5] = [
    (SHOP, "server"),
    (SHOP, "relaxed"),
    (SHOP, "typo"),
    (OPEN, "server"),
    (OPEN, "guarded"),
];

struct App {
    mesh: Mesh,
    _servers: Vec<ChildGuard>,
}

impl App {
    fn up(spec: &TestbedSpec, options: MeshOptions, servers: &[(&str, &str)]) -> Self {
        let (mesh, _servers) = mesh_with_echo_servers(spec, options, servers);
        Self { mesh, _servers }
    }

    fn ip(&self, ns: &str, pod: &str) -> Ipv4Addr {
        pod_ip(self.mesh.testbed(), ns, pod)
    }

    fn echo(&self, ns: &str, pod: &str) -> SocketAddr {
        echo_addr(self.mesh.testbed(), ns, pod)
    }

    fn client_command(&self, connect: SocketAddr) -> Command {
        let mut cmd = testapp::client(testapp_path(), connect, "strict?", 1);
        cmd.args(["--timeout-secs", REFUSED_CONNECT_TIMEOUT_SECS]);
        cmd
    }

    /// A client in pod `ns/pod`.
    fn client_in_pod(&self, ns: &str, pod: &str, connect: SocketAddr) -> Output {
        let cmd = self.client_command(connect);
        wait(self.mesh.testbed().spawn_in_pod(ns, pod, cmd).unwrap())
    }

    /// A client on the node itself (its network namespace and cgroup), as
    /// the kubelet probes.
    fn client_on_node(&self, node: &str, connect: SocketAddr) -> Output {
        let cmd = self.client_command(connect);
        wait(self.mesh.testbed().spawn_in_node(node, cmd).unwrap())
    }

    /// A client on the underlay, outside every node.
    fn client_on_underlay(&self, connect: SocketAddr) -> Output {
        let cmd = self.client_command(connect);
        wait(self.mesh.testbed().spawn_in_underlay(cmd).unwrap())
    }

    fn admin<T, F, Fut>(&self, node: &str, call: F) -> T
    where
        T: Send,
        F: FnOnce(AdminClient<tonic::transport::Channel>) -> Fut + Send,
        Fut: std::future::Future<Output = T>,
    {
        support::admin(&self.mesh, node, call)
    }

    fn inbound_policy(&self, node: &str) -> pb::InboundPolicyStatus {
        self.admin(node, async |mut c| {
            c.get_inbound_policy(pb::GetInboundPolicyRequest {})
                .await
                .unwrap()
                .into_inner()
        })
    }

    /// `GET /metrics` from `node`'s namespace to the node's address.
    fn metrics(&self, node: &str) -> String {
        let ip = self.mesh.testbed().cluster().node(node).unwrap().ip;
        let netns = self.mesh.testbed().node_netns(node).unwrap().to_owned();
        let response = self
            .mesh
            .testbed()
            .run_in_netns(&netns, move || {
                http_get(SocketAddr::from((ip, AGENT_METRICS_PORT)))
            })
            .unwrap()
            .expect("the node itself reads its metrics");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        response
    }

    /// Starts a tap of every namespace on `node`; the handle yields the
    /// first `count` refusals.
    fn tap_refusals(
        &self,
        node: &str,
        count: usize,
    ) -> std::thread::JoinHandle<Vec<ConnectionEvent>> {
        let netns = self.mesh.testbed().node_netns(node).unwrap().to_owned();
        let (subscribed_tx, subscribed_rx) = mpsc::channel();
        let handle = self
            .mesh
            .testbed()
            .thread_in_netns(&netns, move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async move {
                        let mut client =
                            AdminClient::connect(format!("http://127.0.0.1:{AGENT_ADMIN_PORT}"))
                                .await
                                .unwrap();
                        let mut stream = client
                            .tap(pb::TapRequest::default())
                            .await
                            .unwrap()
                            .into_inner();
                        subscribed_tx.send(()).unwrap();
                        let mut refusals = Vec::new();
                        while refusals.len() < count {
                            let event = tokio::time::timeout(WAIT, stream.message())
                                .await
                                .expect("a tap event in time")
                                .unwrap()
                                .expect("the tap stream stays open");
                            if event.phase == Phase::Refused as i32 {
                                refusals.push(event);
                            }
                        }
                        refusals
                    })
            })
            .unwrap();
        subscribed_rx.recv_timeout(WAIT).expect("tap subscribed");
        handle
    }

    fn sealmesh(&self, args: &[&str]) -> Output {
        Command::new(sealmesh_path())
            .args(args)
            .env(
                "SEALMESH_CLUSTER_FILE",
                self.mesh.testbed().cluster_file_path(),
            )
            .output()
            .expect("sealmesh runs")
    }

    /// Access-log refusals of `node`'s agent so far.
    fn logged_refusals(&self, node: &str) -> Vec<Value> {
        self.mesh
            .access_log(node)
            .unwrap()
            .into_iter()
            .filter(|l| l["message"] == "connection refused")
            .collect()
    }

    fn trusted_connections(&self, node: &str) -> usize {
        let dir = self.mesh.testbed().node_bpffs_dir(node).unwrap();
        Redirector::pinned_status(&dir).unwrap().trusted_connections
    }

    fn plaintext_access_entries(&self, node: &str) -> usize {
        let dir = self.mesh.testbed().node_bpffs_dir(node).unwrap();
        Redirector::pinned_status(&dir)
            .unwrap()
            .plaintext_access_entries
    }

    /// Replaces the cluster's authorization policies with `policies` of
    /// namespace shop, as (name, spec in YAML).
    fn set_policies(&self, policies: &[(&str, &str)]) {
        let path = self.mesh.testbed().cluster_file_path();
        let mut file = ClusterFile::load(&path).unwrap();
        file.authorization_policies = policies
            .iter()
            .map(|(name, spec)| AuthorizationPolicy {
                name: (*name).into(),
                namespace: SHOP.into(),
                annotations: Default::default(),
                spec: serde_yaml_ng::from_str(spec).unwrap(),
            })
            .collect();
        file.save(&path).unwrap();
    }
}

fn wait(child: ChildGuard) -> Output {
    child.wait_with_output().expect("client finishes")
}

#[track_caller]
fn accepted(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} must be accepted: {}",
        describe(out)
    );
}

/// The kernel drops the SYN: the client times out, it is not reset.
#[track_caller]
fn refused(out: &Output, what: &str) {
    assert!(!out.status.success(), "{what} must be refused");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out") || stderr.contains("os error 110"),
        "{what}: the SYN is dropped, so the connect times out: {}",
        describe(out)
    );
}

/// One HTTP/1.1 GET /metrics; None when the server closes without answering.
fn http_get(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).ok()?;
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    (!response.is_empty()).then_some(response)
}

/// The value of the one metric line whose name and labels are exactly `series`.
fn metric(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

fn refused_series(namespace: &str, pod: &str) -> String {
    format!(
        "sealmesh_inbound_refused_total{{namespace=\"{namespace}\",pod=\"{pod}\",reason=\"strict_inbound\"}}"
    )
}

fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pod_policy<'a>(
    status: &'a pb::InboundPolicyStatus,
    ns: &str,
    pod: &str,
) -> &'a pb::PodInboundPolicy {
    status
        .pods
        .iter()
        .find(|p| {
            p.pod
                .as_ref()
                .is_some_and(|r| r.namespace == ns && r.name == pod)
        })
        .unwrap_or_else(|| panic!("{ns}/{pod} in {status:?}"))
}

#[test]
fn strict_pods_refuse_plaintext_from_outside_the_mesh_and_accept_mtls_and_their_node() {
    let app = App::up(&spec(), MeshOptions::default(), &SERVERS);
    let server = app.echo(SHOP, "server");
    let tap = app.tap_refusals("node-1", 5);

    // Plaintext to the strict pod: refused from an unmeshed pod of its node,
    // of another node, and from a host outside the nodes.
    refused(
        &app.client_in_pod(LEGACY, "plain", server),
        "legacy/plain -> shop/server",
    );
    refused(
        &app.client_in_pod(LEGACY, "outsider", server),
        "legacy/outsider (node-0) -> shop/server",
    );
    refused(&app.client_on_underlay(server), "underlay -> shop/server");
    refused(
        &app.client_on_node("node-0", server),
        "node-0 (another node) -> shop/server",
    );
    // A strict pod in a permissive namespace refuses too.
    refused(
        &app.client_in_pod(LEGACY, "plain", app.echo(OPEN, "guarded")),
        "legacy/plain -> open/guarded",
    );

    // Through the agent: mTLS across nodes and secured-local on the node.
    accepted(
        &app.client_in_pod(SHOP, "client", server),
        "shop/client (node-0) -> shop/server",
    );
    accepted(
        &app.client_in_pod(SHOP, "neighbour", server),
        "shop/neighbour -> shop/server",
    );
    // The node itself (kubelet probes), and the pod's own loopback.
    accepted(
        &app.client_on_node("node-1", server),
        "node-1 -> shop/server",
    );
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, ECHO_PORT + 1));
    let mut on_loopback = app
        .mesh
        .testbed()
        .spawn_in_pod(
            SHOP,
            "server",
            testapp::echo_server(testapp_path(), loopback),
        )
        .unwrap();
    testapp::wait_listening(&mut on_loopback).unwrap();
    accepted(
        &app.client_in_pod(SHOP, "server", loopback),
        "shop/server -> its loopback",
    );
    drop(on_loopback);
    // Permissive pods accept plaintext as before; the pod's annotation wins
    // over its strict namespace's.
    accepted(
        &app.client_in_pod(LEGACY, "plain", app.echo(OPEN, "server")),
        "legacy/plain -> open/server",
    );
    accepted(
        &app.client_in_pod(LEGACY, "plain", app.echo(SHOP, "relaxed")),
        "legacy/plain -> shop/relaxed",
    );
    // An invalid pod value is ignored: the namespace's strict applies.
    refused(
        &app.client_in_pod(LEGACY, "plain", app.echo(SHOP, "typo")),
        "legacy/plain -> shop/typo",
    );

    // The kernel counted each attempt once (retransmitted SYNs included).
    let metrics = app.metrics("node-1");
    assert_eq!(
        metric(&metrics, &refused_series(SHOP, "server")),
        Some(4),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &refused_series(OPEN, "guarded")),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &refused_series(SHOP, "typo")),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &refused_series(SHOP, "relaxed")),
        None,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &refused_series(OPEN, "server")),
        None,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "sealmesh_inbound_refusals_unreported_total"),
        Some(0)
    );
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("=\"\"") && l.contains("inbound_refused")),
        "no empty label value: {metrics}"
    );

    // Tap shows each refusal with its source, destination and reason.
    let refusals = tap.join().unwrap();
    let plain_ip = app.ip(LEGACY, "plain").to_string();
    let first = &refusals[0];
    assert_eq!(first.refused_reason, "strict_inbound", "{first:?}");
    assert_eq!(first.dst_addr, server.to_string());
    assert!(
        first.src_addr.starts_with(&format!("{plain_ip}:")),
        "{first:?}"
    );
    assert_eq!(
        first
            .src
            .as_ref()
            .map(|p| (p.namespace.as_str(), p.name.as_str())),
        Some((LEGACY, "plain"))
    );
    assert_eq!(
        first
            .dst
            .as_ref()
            .map(|p| (p.namespace.as_str(), p.name.as_str())),
        Some((SHOP, "server"))
    );
    assert!(
        first
            .error
            .contains("annotation sealmesh.io/inbound-policy=strict on namespace shop"),
        "{first:?}"
    );
    let outsider_ip = app.ip(LEGACY, "outsider").to_string();
    assert!(
        refusals[1].src_addr.starts_with(&format!("{outsider_ip}:")),
        "{refusals:?}"
    );
    assert!(
        refusals[2].src_addr.starts_with("172.18.0.1:"),
        "underlay: {refusals:?}"
    );
    assert_eq!(refusals[2].src, None, "the underlay is no pod");
    assert!(
        refusals[3].src_addr.starts_with("172.18.0.2:"),
        "node-0's own address: {refusals:?}"
    );

    // The admin API: each pod's policy, where it comes from, the kernel's
    // counts and the latest refusals.
    let status = app.inbound_policy("node-1");
    assert_eq!(status.default_policy, "permissive");
    let server_policy = pod_policy(&status, SHOP, "server");
    assert_eq!(
        (server_policy.policy.as_str(), server_policy.source.as_str()),
        ("strict", "namespace_annotation")
    );
    assert!(server_policy.enforced);
    assert_eq!(server_policy.refused_total, 4);
    let relaxed = pod_policy(&status, SHOP, "relaxed");
    assert_eq!(
        (
            relaxed.policy.as_str(),
            relaxed.source.as_str(),
            relaxed.enforced
        ),
        ("permissive", "pod_annotation", false)
    );
    let guarded = pod_policy(&status, OPEN, "guarded");
    assert_eq!(
        (
            guarded.policy.as_str(),
            guarded.source.as_str(),
            guarded.enforced
        ),
        ("strict", "pod_annotation", true)
    );
    let open = pod_policy(&status, OPEN, "server");
    assert_eq!(
        (open.policy.as_str(), open.source.as_str()),
        ("permissive", "cluster_default")
    );
    let plain = pod_policy(&status, LEGACY, "plain");
    assert_eq!((plain.policy.as_str(), plain.meshed), ("permissive", false));
    let typo = pod_policy(&status, SHOP, "typo");
    assert_eq!(typo.policy, "strict");
    assert!(
        typo.ignored_annotations[0]
            .contains("sealmesh.io/inbound-policy=\"Strict\" on pod shop/typo"),
        "{typo:?}"
    );
    assert_eq!(status.recent_refusals.len(), 6, "{status:?}");
    let enforced_on_node0: Vec<String> = app
        .inbound_policy("node-0")
        .pods
        .iter()
        .filter(|p| p.enforced)
        .filter_map(|p| {
            p.pod
                .as_ref()
                .map(|r| format!("{}/{}", r.namespace, r.name))
        })
        .collect();
    assert_eq!(
        enforced_on_node0,
        ["shop/client"],
        "each agent enforces its own pods"
    );

    // The agent warned about the bad value, and logged each refusal.
    let log = app.mesh.agent_log_lines("node-1").unwrap();
    assert!(
        log.iter().any(|l| l["level"] == "WARN"
            && l["message"].as_str().is_some_and(
                |m| m.contains("\"Strict\" on pod shop/typo is neither strict nor permissive")
            )),
        "a warning for the bad annotation value"
    );
    let logged = app.logged_refusals("node-1");
    assert_eq!(logged.len(), 6, "{logged:?}");
    assert!(logged.iter().all(|l| l["target"] == ACCESS_LOG_TARGET
        && l["refused_reason"] == "strict_inbound"
        && l["direction"] == "inbound"));
    assert_eq!(logged[0]["src"], "legacy/plain");
    assert_eq!(logged[0]["dst"], "shop/server");

    // `sealmesh why` names the policy that refused it, and how to change it.
    let why = app.sealmesh(&["why", "legacy/plain", "shop/server"]);
    let text = String::from_utf8_lossy(&why.stdout);
    assert!(!why.status.success(), "{}", describe(&why));
    assert!(
        text.starts_with("legacy/plain -> shop/server: NOT mTLS: connections are refused"),
        "{text}"
    );
    assert!(
        text.contains(
            "strict inbound policy: annotation sealmesh.io/inbound-policy=strict on namespace shop"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "kubectl annotate namespace shop --overwrite sealmesh.io/inbound-policy=permissive"
        ),
        "{text}"
    );
    assert!(
        text.contains("4 plaintext connection attempt(s) refused so far"),
        "{text}"
    );
    assert!(
        text.contains("last refused: ") && text.contains(&plain_ip),
        "{text}"
    );
    let why = app.sealmesh(&["why", "shop/client", "shop/server"]);
    let text = String::from_utf8_lossy(&why.stdout);
    assert!(why.status.success(), "{}", describe(&why));
    assert!(
        text.starts_with("shop/client -> shop/server: mTLS"),
        "{text}"
    );
    assert!(text.contains("destination shop/server is strict"), "{text}");

    // Trusted connections are forgotten when they close.
    wait_until("the trusted connections of node-1 to close", || {
        (app.trusted_connections("node-1") == 0).then_some(())
    });
}

#[test]
fn agents_follow_policy_changes_and_a_strict_default_closes_the_metrics_port() {
    let spec = TestbedSpec::new(2)
        .namespace(SHOP, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(LEGACY, &[])
        .pod(PodSpec::new(SHOP, "client", "client", 0))
        .pod(PodSpec::new(SHOP, "server", "server", 1))
        .pod(PodSpec::new(LEGACY, "plain", "default", 1));
    let app = App::up(
        &spec,
        MeshOptions {
            agent_args: vec![
                "--default-inbound-policy=strict".into(),
                // The underlay's gateway, where the test reads from.
                "--metrics-allowed-cidrs=172.18.0.1/32".into(),
            ],
            ..MeshOptions::default()
        },
        &[(SHOP, "server")],
    );
    let server = app.echo(SHOP, "server");
    // Every meshed pod is strict by default; the mesh still works.
    refused(
        &app.client_in_pod(LEGACY, "plain", server),
        "legacy/plain -> shop/server",
    );
    accepted(
        &app.client_in_pod(SHOP, "client", server),
        "shop/client -> shop/server",
    );
    let status = app.inbound_policy("node-1");
    assert_eq!(status.default_policy, "strict");
    let policy = pod_policy(&status, SHOP, "server");
    assert_eq!(
        (policy.source.as_str(), policy.enforced),
        ("cluster_default", true)
    );

    // The metrics port: the node itself and the allowed network read it;
    // a pod is refused at accept, also through the agent.
    let node1 = app.mesh.testbed().cluster().node("node-1").unwrap().ip;
    let metrics_addr = SocketAddr::from((node1, AGENT_METRICS_PORT));
    let body = app.metrics("node-1");
    assert_eq!(
        metric(&body, "sealmesh_metrics_refused_total"),
        Some(0),
        "{body}"
    );
    let underlay = app.mesh.testbed().underlay_netns();
    let from_underlay = app
        .mesh
        .testbed()
        .run_in_netns(&underlay, move || http_get(metrics_addr))
        .unwrap();
    assert!(
        from_underlay.is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "--metrics-allowed-cidrs admits the underlay"
    );
    let plain_netns = app
        .mesh
        .testbed()
        .pod_netns(LEGACY, "plain")
        .unwrap()
        .to_owned();
    let from_pod = app
        .mesh
        .testbed()
        .run_in_netns(&plain_netns, move || http_get(metrics_addr))
        .unwrap();
    assert_eq!(from_pod, None, "an unmeshed pod is refused at accept");
    // A meshed pod's connection reaches the port from the node's address
    // through the agent: the agent refuses to carry it.
    let through_agent = app.client_in_pod(SHOP, "server", metrics_addr);
    assert!(
        !through_agent.status.success(),
        "{}",
        describe(&through_agent)
    );
    let body = app.metrics("node-1");
    assert_eq!(
        metric(&body, "sealmesh_metrics_refused_total"),
        Some(1),
        "{body}"
    );
    let log = app.mesh.agent_log_lines("node-1").unwrap();
    let refusal = log
        .iter()
        .find(|l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("this node's metrics port"))
        })
        .expect("the agent logs why it refused to carry the meshed pod's connection");
    assert_eq!(
        refusal["refused_reason"], "protected_local_port",
        "{refusal}"
    );
    assert_eq!(
        metric(
            &body,
            &format!(
                "sealmesh_tcp_refused_total{{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"protected_local_port\",src_namespace=\"{SHOP}\",dst_namespace=\"\"}}"
            )
        ),
        Some(1),
        "{body}"
    );

    // Annotating the pod permissive at run time lets plaintext in again.
    let path = app.mesh.testbed().cluster_file_path();
    let mut file = ClusterFile::load(&path).unwrap();
    file.pods
        .iter_mut()
        .find(|p| p.namespace == SHOP && p.name == "server")
        .unwrap()
        .annotations
        .insert(
            INBOUND_POLICY_ANNOTATION.into(),
            INBOUND_POLICY_PERMISSIVE.into(),
        );
    file.save(&path).unwrap();
    wait_until("shop/server to become permissive", || {
        let status = app.inbound_policy("node-1");
        let policy = pod_policy(&status, SHOP, "server");
        (!policy.enforced && policy.policy == "permissive").then_some(())
    });
    accepted(
        &app.client_in_pod(LEGACY, "plain", server),
        "legacy/plain -> shop/server (permissive now)",
    );
    let body = app.metrics("node-1");
    assert_eq!(
        metric(&body, &refused_series(SHOP, "server")),
        None,
        "{body}"
    );
}

/// Authorization policies that refuse some plaintext make a permissive pod
/// strict by implication: the kernel admits plaintext only from the
/// `ipBlocks` and `ports` they allow, reports the rest with the denying
/// policy, and its map follows policy and pod changes.
#[test]
fn authorization_policies_make_a_pod_strict_by_implication() {
    let spec = TestbedSpec::new(2)
        .namespace(SHOP, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace(LEGACY, &[])
        .pod(PodSpec::new(SHOP, "client", "client", 0))
        .pod(PodSpec::new(LEGACY, "outsider", "default", 0))
        .pod(PodSpec::new(SHOP, "server", "server", 1).label("app", "server"))
        .pod(
            PodSpec::new(SHOP, "guarded", "guarded", 1)
                .label("app", "server")
                .annotation(INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT),
        )
        .pod(PodSpec::new(LEGACY, "plain", "default", 1));
    let app = App::up(
        &spec,
        MeshOptions::default(),
        &[(SHOP, "server"), (SHOP, "guarded")],
    );
    let (_other_port_server, other_port) = testapp::start_echo_server(
        app.mesh.testbed(),
        testapp_path(),
        SHOP,
        "server",
        ECHO_PORT + 1,
    )
    .unwrap();
    let server = app.echo(SHOP, "server");
    // Plaintext from the pod network to the echo port; mTLS from shop; and
    // no plaintext from node-0's pods (10.244.0.0/24).
    let allow = format!(
        r#"{{ selector: {{ matchLabels: {{ app: server }} }}, rules: [
            {{ from: [{{ source: {{ principals: ["cluster.local/ns/shop/*"] }} }}] }},
            {{ from: [{{ source: {{ ipBlocks: [10.244.0.0/16] }} }}], to: [{{ operation: {{ ports: ["{ECHO_PORT}"] }} }}] }} ] }}"#
    );
    let deny = r#"{ selector: { matchLabels: { app: server } }, action: DENY, rules: [
        { from: [{ source: { ipBlocks: [10.244.0.0/24], notPrincipals: ["*"] } }] } ] }"#;
    let tap = app.tap_refusals("node-1", 4);
    app.set_policies(&[("server-plaintext", &allow), ("no-node0-plaintext", deny)]);
    wait_until("shop/server to be guarded by its policies", || {
        let status = app.inbound_policy("node-1");
        let policy = pod_policy(&status, SHOP, "server");
        (policy.enforced && policy.required_by_authorization_policy).then_some(())
    });
    // Its regions: the echo port and every other port, each for 0.0.0.0/0,
    // the allowed block and the denied block inside it; none for the pod
    // strict by annotation.
    assert_eq!(app.plaintext_access_entries("node-1"), 6);

    accepted(
        &app.client_in_pod(LEGACY, "plain", server),
        "legacy/plain -> shop/server (allowed block and port)",
    );
    refused(
        &app.client_in_pod(LEGACY, "plain", other_port),
        "legacy/plain -> shop/server's other port",
    );
    refused(
        &app.client_in_pod(LEGACY, "outsider", server),
        "legacy/outsider (node-0) -> shop/server: the DENY block inside the ALLOW block",
    );
    refused(
        &app.client_on_underlay(server),
        "underlay -> shop/server: another block",
    );
    refused(
        &app.client_in_pod(LEGACY, "plain", app.echo(SHOP, "guarded")),
        "legacy/plain -> shop/guarded: strict by annotation admits no plaintext",
    );
    accepted(
        &app.client_in_pod(SHOP, "client", server),
        "shop/client (node-0) -> shop/server over mTLS",
    );
    accepted(
        &app.client_on_node("node-1", server),
        "node-1 -> shop/server",
    );

    // Each refusal names the policy, and the rule when one matched.
    let refusals = tap.join().unwrap();
    let summary: Vec<(&str, &str, Option<u32>)> = refusals
        .iter()
        .map(|e| {
            (
                e.refused_reason.as_str(),
                e.denied_policy.as_str(),
                e.denied_rule,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("policy_denied", "shop/server-plaintext", None),
            ("policy_denied", "shop/no-node0-plaintext", Some(0)),
            ("policy_denied", "shop/server-plaintext", None),
            ("strict_inbound", "", None),
        ],
        "{refusals:?}"
    );
    assert!(
        refusals[0]
            .error
            .contains("no rule of ALLOW policy shop/server-plaintext matches it"),
        "{:?}",
        refusals[0]
    );
    let metrics = app.metrics("node-1");
    assert_eq!(
        metric(
            &metrics,
            &format!(
                "sealmesh_inbound_refused_total{{namespace=\"{SHOP}\",pod=\"server\",reason=\"policy_denied\"}}"
            )
        ),
        Some(3),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, &refused_series(SHOP, "guarded")),
        Some(1),
        "{metrics}"
    );
    let logged = app.logged_refusals("node-1");
    assert_eq!(logged[0]["refused_reason"], "policy_denied", "{logged:?}");
    assert_eq!(logged[1]["denied_by"], "shop/no-node0-plaintext rule 0");
    let status = app.inbound_policy("node-1");
    let guarded = pod_policy(&status, SHOP, "guarded");
    assert!(guarded.enforced && !guarded.required_by_authorization_policy);
    assert_eq!(
        pod_policy(&status, SHOP, "server").policy,
        "permissive",
        "the annotation policy is unchanged"
    );

    // The map follows the policies: without the DENY, node-0's pods get in.
    app.set_policies(&[("server-plaintext", &allow)]);
    wait_until("the DENY block to leave the map", || {
        (app.plaintext_access_entries("node-1") == 4).then_some(())
    });
    accepted(
        &app.client_in_pod(LEGACY, "outsider", server),
        "legacy/outsider -> shop/server without the DENY policy",
    );
    // ... and the pod: its regions go with it.
    let path = app.mesh.testbed().cluster_file_path();
    let mut file = ClusterFile::load(&path).unwrap();
    file.pods
        .retain(|p| !(p.namespace == SHOP && p.name == "server"));
    file.save(&path).unwrap();
    wait_until("shop/server's regions to leave the map", || {
        (app.plaintext_access_entries("node-1") == 0).then_some(())
    });
}

/// Kubernetes mode reads the policy from namespace and pod annotations in
/// the API.
#[test]
fn kubernetes_mode_reads_the_inbound_policy_from_the_api() {
    let spec = TestbedSpec::new(2)
        .namespace(SHOP, &[(MESH_LABEL, MESH_LABEL_ENABLED)])
        .namespace_annotation(SHOP, INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT)
        .namespace(LEGACY, &[])
        .pod(PodSpec::new(SHOP, "client", "client", 0))
        .pod(PodSpec::new(SHOP, "server", "server", 1))
        .pod(
            PodSpec::new(SHOP, "relaxed", "relaxed", 1)
                .annotation(INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_PERMISSIVE),
        )
        .pod(PodSpec::new(LEGACY, "plain", "default", 1));
    let app = App::up(
        &spec,
        MeshOptions {
            kubernetes: Some(KubeMode::fake()),
            ..MeshOptions::default()
        },
        &[(SHOP, "server"), (SHOP, "relaxed")],
    );
    let server = app.echo(SHOP, "server");
    wait_until("shop/server to be enforced", || {
        pod_policy(&app.inbound_policy("node-1"), SHOP, "server")
            .enforced
            .then_some(())
    });
    refused(
        &app.client_in_pod(LEGACY, "plain", server),
        "legacy/plain -> shop/server",
    );
    accepted(
        &app.client_in_pod(SHOP, "client", server),
        "shop/client -> shop/server",
    );
    accepted(
        &app.client_on_node("node-1", server),
        "node-1 -> shop/server",
    );
    accepted(
        &app.client_in_pod(LEGACY, "plain", app.echo(SHOP, "relaxed")),
        "legacy/plain -> shop/relaxed",
    );
    let status = app.inbound_policy("node-1");
    let policy = pod_policy(&status, SHOP, "server");
    assert_eq!(
        (policy.source.as_str(), policy.refused_total),
        ("namespace_annotation", 1)
    );
    assert_eq!(
        pod_policy(&status, SHOP, "relaxed").source,
        "pod_annotation"
    );
    let metrics = app.metrics("node-1");
    assert_eq!(
        metric(&metrics, &refused_series(SHOP, "server")),
        Some(1),
        "{metrics}"
    );
}
