//! What the testbed test binaries share: the test app, echo servers and
//! Services in the mesh, clients run in pods, access-log waits, node tokens,
//! command output for assertion messages, and the lines of a running command.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    future::Future,
    io::{BufRead, BufReader, Read},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    sync::mpsc,
    time::{Duration, Instant},
};

use sealmesh_common::{
    cluster::{Service, ServicePort},
    consts::{ACCESS_LOG_TARGET, AGENT_ADMIN_PORT},
};
use sealmesh_proto::admin::admin_client::AdminClient;
use serde_json::Value;
use tonic::transport::Channel;
use xtask::{
    capture::Capture,
    mesh::{Mesh, MeshOptions, locate_binary},
    testapp,
    testbed::{ChildGuard, Testbed, TestbedSpec},
};

/// The meshed namespace of the test apps.
pub const APP_NS: &str = "shop";
/// An unmeshed namespace.
pub const PLAIN_NS: &str = "legacy";
/// Where the echo servers listen in their pods.
pub const ECHO_PORT: u16 = 8080;

pub fn testapp_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testapp"))
}

pub fn sealmesh_path() -> PathBuf {
    locate_binary("sealmesh").expect("sealmesh is built (cargo build --workspace)")
}

/// The SPIFFE ID of ServiceAccount `sa` of [`APP_NS`].
pub fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{APP_NS}/sa/{sa}")
}

/// Service `name` of [`APP_NS`] at `vip:port`, selecting the pods labelled
/// `app: <name>` on [`ECHO_PORT`].
pub fn echo_service(name: &str, vip: Ipv4Addr, port: u16) -> Service {
    Service {
        name: name.into(),
        namespace: APP_NS.into(),
        vip,
        ports: vec![ServicePort {
            name: None,
            port,
            target_port: ECHO_PORT,
        }],
        selector: BTreeMap::from([("app".into(), name.into())]),
    }
}

/// Starts an echo server on [`ECHO_PORT`] in pod `ns/pod`; it stops when the
/// guard drops.
pub fn start_echo_server(mesh: &Mesh, ns: &str, pod: &str) -> ChildGuard {
    testapp::start_echo_server(mesh.testbed(), testapp_path(), ns, pod, ECHO_PORT)
        .expect("echo server starts")
        .0
}

/// [`start_echo_server`] in each `(namespace, pod)`.
pub fn start_echo_servers(mesh: &Mesh, pods: &[(&str, &str)]) -> Vec<ChildGuard> {
    pods.iter()
        .map(|(ns, pod)| start_echo_server(mesh, ns, pod))
        .collect()
}

/// A mesh up on `spec` with [`start_echo_servers`] in `servers`.
pub fn mesh_with_echo_servers(
    spec: &TestbedSpec,
    options: MeshOptions,
    servers: &[(&str, &str)],
) -> (Mesh, Vec<ChildGuard>) {
    let mesh = Mesh::up(spec, options).expect("mesh up");
    let servers = start_echo_servers(&mesh, servers);
    (mesh, servers)
}

pub fn pod_ip(testbed: &Testbed, ns: &str, pod: &str) -> Ipv4Addr {
    testbed.cluster().pod(ns, pod).unwrap().ip
}

/// The echo server of pod `ns/pod`.
pub fn echo_addr(testbed: &Testbed, ns: &str, pod: &str) -> SocketAddr {
    SocketAddr::from((pod_ip(testbed, ns, pod), ECHO_PORT))
}

/// Runs `testapp client` (one round trip of `text`) in pod `ns/pod`, with
/// extra arguments, and waits for it.
pub fn client_in_pod(
    testbed: &Testbed,
    ns: &str,
    pod: &str,
    connect: SocketAddr,
    text: &str,
    extra: &[&str],
) -> Output {
    let mut cmd = testapp::client(testapp_path(), connect, text, 1);
    cmd.args(extra);
    testbed
        .spawn_in_pod(ns, pod, cmd)
        .expect("client starts")
        .wait_with_output()
        .expect("client finishes")
}

/// Waits for `count` access-log events of `node`'s agent matching `pred`.
pub fn wait_access_count(
    mesh: &Mesh,
    node: &str,
    what: &str,
    count: usize,
    pred: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut found = Vec::new();
    mesh.wait_for_agent_log(node, what, |lines| {
        found = lines
            .iter()
            .filter(|l| l["target"] == ACCESS_LOG_TARGET && pred(l))
            .cloned()
            .collect();
        found.len() >= count
    })
    .unwrap();
    found
}

/// Waits for an access-log event of `node`'s agent matching `pred`.
pub fn wait_access(mesh: &Mesh, node: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_access_count(mesh, node, what, 1, pred).remove(0)
}

/// A client of the agent's admin API, which listens on its node's loopback:
/// call it from inside the node's network namespace.
pub async fn admin_client() -> AdminClient<Channel> {
    AdminClient::connect(format!("http://127.0.0.1:{AGENT_ADMIN_PORT}"))
        .await
        .expect("the admin API answers on the node's loopback")
}

/// Runs `call` with an admin client inside `node`'s network namespace.
pub fn admin<T, F, Fut>(mesh: &Mesh, node: &str, call: F) -> T
where
    T: Send,
    F: FnOnce(AdminClient<Channel>) -> Fut + Send,
    Fut: Future<Output = T>,
{
    let netns = mesh.testbed().node_netns(node).unwrap().to_owned();
    mesh.testbed()
        .run_in_netns(&netns, move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move { call(admin_client().await).await })
        })
        .unwrap()
}

/// The file holding the token node `node`'s agent presents to the identity
/// service.
pub fn node_token_file(testbed: &Testbed, node: &str) -> PathBuf {
    testbed
        .cluster()
        .node(node)
        .and_then(|n| n.token_file.clone())
        .expect("every testbed node has a token file")
}

/// What [`node_token_file`] holds.
pub fn node_token(testbed: &Testbed, node: &str) -> String {
    std::fs::read_to_string(node_token_file(testbed, node)).expect("node token readable")
}

/// A capture on the underlay (the wire between the nodes) looking for `markers`.
pub fn capture_underlay(mesh: &Mesh, markers: &[&str]) -> Capture {
    let testbed = mesh.testbed();
    testbed
        .run_in_netns(&testbed.underlay_netns(), || Capture::start(markers))
        .unwrap()
        .unwrap()
}

/// Ends `capture` a moment after the traffic, and checks that it saw the
/// traffic (`what`) and never `marker` in clear.
pub fn assert_marker_never_in_clear(capture: Capture, marker: &str, what: &str) {
    std::thread::sleep(std::time::Duration::from_millis(300));
    let report = capture.finish().unwrap();
    assert!(report.frames > 10, "the capture saw {what}: {report:?}");
    assert_eq!(
        report.hits_for(marker),
        0,
        "marker crossed the underlay in clear: {report:?}"
    );
}

pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines a running child writes to one of its pipes, read by a thread as
/// they come, so that a test can wait for one while the child runs.
pub struct FollowedLines {
    incoming: mpsc::Receiver<String>,
    seen: Vec<String>,
    /// Lines before this one were matched or passed over by a wait.
    next: usize,
}

impl FollowedLines {
    pub fn new(pipe: impl Read + Send + 'static) -> Self {
        let (tx, incoming) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            incoming,
            seen: Vec::new(),
            next: 0,
        }
    }

    /// Waits up to `timeout` for a line after the last one waited for that
    /// matches `pred`, and returns it; panics with every line so far.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.seen[self.next..].iter().position(|l| pred(l)) {
                self.next += found + 1;
                return self.seen[self.next - 1].clone();
            }
            self.next = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.incoming.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!(
                    "no line with {what} within {timeout:?}; lines so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line read so far, after waiting `quiet` for more.
    pub fn all(&mut self, quiet: Duration) -> &[String] {
        while let Ok(line) = self.incoming.recv_timeout(quiet) {
            self.seen.push(line);
        }
        &self.seen
    }
}
