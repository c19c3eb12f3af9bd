//! The local testbed on the real kernel (needs root): connectivity, routes, cgroups,
//! cleanup on drop and on panic, concurrent testbeds.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use sealmesh_common::cluster::{ClusterFile, IdentityEndpoint};
use xtask::{
    testapp,
    testbed::{self, MESHED_NAMESPACE, Testbed, TestbedSpec, cgroup},
};

const ECHO_PORT: u16 = 8080;

fn testapp_path() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_testapp"))
}

/// Everything a testbed creates on the host, recorded while it is up.
struct Footprint {
    netns: Vec<String>,
    paths: Vec<PathBuf>,
}

impl Footprint {
    fn of(tb: &Testbed) -> Self {
        let cluster = tb.cluster();
        let mut netns = vec![tb.underlay_netns()];
        netns.extend(cluster.nodes.iter().filter_map(|n| n.netns.clone()));
        netns.extend(cluster.pods.iter().filter_map(|p| p.netns.clone()));
        let node = &cluster.nodes[0];
        let paths = vec![
            node.cgroup.parent().unwrap().to_owned(),
            tb.node_bpffs_dir(&node.name)
                .unwrap()
                .parent()
                .unwrap()
                .to_owned(),
            tb.state_dir(),
        ];
        let footprint = Self { netns, paths };
        for ns in &footprint.netns {
            assert!(
                netns_exists(ns),
                "{ns} should exist while the testbed is up"
            );
        }
        for path in &footprint.paths {
            assert!(
                path.exists(),
                "{} should exist while the testbed is up",
                path.display()
            );
        }
        footprint
    }

    fn of_existing(&self) -> bool {
        self.netns.iter().all(|ns| netns_exists(ns)) && self.paths.iter().all(|p| p.exists())
    }

    fn assert_gone(&self) {
        for ns in &self.netns {
            assert!(
                !netns_exists(ns),
                "network namespace {ns} survived teardown"
            );
        }
        for path in &self.paths {
            assert!(!path.exists(), "{} survived teardown", path.display());
        }
    }
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn echo_server(tb: &Testbed, pod: &str) -> (xtask::testbed::ChildGuard, SocketAddr) {
    let (server, addr) =
        testapp::start_echo_server(tb, testapp_path(), MESHED_NAMESPACE, pod, ECHO_PORT).unwrap();
    let ip = tb.cluster().pod(MESHED_NAMESPACE, pod).unwrap().ip;
    assert_eq!(addr, SocketAddr::from((ip, ECHO_PORT)));
    (server, addr)
}

/// Runs `testapp client` in `pod` against `server`; returns its result line.
fn echo_client(tb: &Testbed, pod: &str, server: SocketAddr, text: &str) -> String {
    let output = tb
        .spawn_in_pod(
            MESHED_NAMESPACE,
            pod,
            testapp::client(testapp_path(), server, text, 3),
        )
        .unwrap()
        .wait_with_output()
        .unwrap();
    assert!(
        output.status.success(),
        "client in {pod} -> {server}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// `ok local=IP:PORT peer=IP:PORT ...` → (local ip, peer)
fn parse_result(line: &str) -> (Ipv4Addr, SocketAddr) {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .parse::<SocketAddr>()
            .unwrap()
    };
    let local = match field("local=") {
        SocketAddr::V4(v4) => *v4.ip(),
        other => panic!("local address {other} is not IPv4"),
    };
    (local, field("peer="))
}

#[test]
fn pods_echo_across_nodes_within_a_node_and_to_the_control_plane() {
    let tb = Testbed::up(&TestbedSpec::meshed(2, 2)).unwrap();
    let pod_ip = |name: &str| tb.cluster().pod(MESHED_NAMESPACE, name).unwrap().ip;
    let (_server, server) = echo_server(&tb, "pod-1-0");

    // Across nodes: pod-0-0 (node-0) -> pod-1-0 (node-1).
    let line = echo_client(&tb, "pod-0-0", server, "across nodes");
    assert!(line.starts_with("ok "), "{line}");
    assert!(
        line.trim_end().ends_with("round_trips=3 bytes=36"),
        "{line}"
    );
    assert_eq!(parse_result(&line), (pod_ip("pod-0-0"), server));

    // Within a node: pod-1-1 -> pod-1-0, both on node-1.
    let line = echo_client(&tb, "pod-1-1", server, "same node");
    assert_eq!(parse_result(&line), (pod_ip("pod-1-1"), server));

    // In-process client in pod-0-1 via run_in_netns; the server sees the pod's IP.
    let netns = tb
        .pod_netns(MESHED_NAMESPACE, "pod-0-1")
        .unwrap()
        .to_owned();
    let (echoed, local) = tb
        .run_in_netns(&netns, || {
            let mut stream = TcpStream::connect(server).unwrap();
            stream.write_all(b"in-process").unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut echoed = String::new();
            stream.read_to_string(&mut echoed).unwrap();
            (echoed, stream.local_addr().unwrap())
        })
        .unwrap();
    assert_eq!(echoed, "in-process");
    assert_eq!(local.ip(), pod_ip("pod-0-1"));

    // A listener bound in the underlay (where the identity service runs) is reachable
    // from a pod and from a node, and sees their own addresses.
    let control_plane = SocketAddr::from((tb.control_plane_ip(), 18080));
    let listener = tb
        .run_in_netns(&tb.underlay_netns(), || TcpListener::bind(control_plane))
        .unwrap()
        .unwrap();
    let accept_peer = std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..2 {
            let (mut conn, peer) = listener.accept().unwrap();
            conn.write_all(b"hi").unwrap();
            peers.push(peer.ip());
        }
        peers
    });
    for netns in [
        tb.pod_netns(MESHED_NAMESPACE, "pod-1-1")
            .unwrap()
            .to_owned(),
        tb.node_netns("node-0").unwrap().to_owned(),
    ] {
        let greeting = tb
            .run_in_netns(&netns, || {
                let mut reply = String::new();
                TcpStream::connect(control_plane)
                    .unwrap()
                    .read_to_string(&mut reply)
                    .unwrap();
                reply
            })
            .unwrap();
        assert_eq!(greeting, "hi");
    }
    let node0_ip = tb.cluster().node("node-0").unwrap().ip;
    assert_eq!(accept_peer.join().unwrap(), [pod_ip("pod-1-1"), node0_ip]);
}

#[test]
fn processes_run_in_their_pod_node_and_underlay_cgroups() {
    let tb = Testbed::up(&TestbedSpec::meshed(2, 1)).unwrap();
    let cgroup_mount = sealmesh_common::host::cgroup2_mount().unwrap();
    let relative =
        |path: &Path| format!("/{}", path.strip_prefix(&cgroup_mount).unwrap().display());
    let sleeper = || {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        cmd
    };

    let pod = tb
        .cluster()
        .pod(MESHED_NAMESPACE, "pod-1-0")
        .unwrap()
        .clone();
    let in_pod = tb
        .spawn_in_pod(MESHED_NAMESPACE, "pod-1-0", sleeper())
        .unwrap();
    assert_eq!(
        cgroup::of_process(in_pod.id()).unwrap(),
        relative(&pod.cgroup)
    );
    assert_eq!(
        pod.cgroup,
        cgroup_mount.join(format!(
            "sealmesh-testbed/{}/node-1/mesh-demo_pod-1-0",
            tb.id()
        ))
    );

    let node = tb.cluster().node("node-0").unwrap().clone();
    let in_node = tb.spawn_in_node("node-0", sleeper()).unwrap();
    assert_eq!(
        cgroup::of_process(in_node.id()).unwrap(),
        relative(&node.cgroup)
    );

    let in_underlay = tb.spawn_in_underlay(sleeper()).unwrap();
    assert_eq!(
        cgroup::of_process(in_underlay.id()).unwrap(),
        format!("/sealmesh-testbed/{}/underlay", tb.id())
    );

    // The pod process sees the pod's network namespace.
    let inode = |pid: u32| std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    use std::os::unix::fs::MetadataExt;
    let pod_netns =
        std::fs::metadata(format!("/run/netns/{}", pod.netns.as_deref().unwrap())).unwrap();
    assert_eq!(inode(in_pod.id()).ino(), pod_netns.ino());

    // A child of a pod process stays in the pod's cgroup.
    let output = tb
        .spawn_in_pod(MESHED_NAMESPACE, "pod-1-0", {
            let mut cmd = Command::new("sh");
            cmd.args(["-c", "cat /proc/self/cgroup"])
                .stdout(std::process::Stdio::piped());
            cmd
        })
        .unwrap()
        .wait_with_output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l == format!("0::{}", relative(&pod.cgroup))),
        "{text}"
    );
}

#[test]
fn no_namespace_has_a_default_route_and_pods_route_only_via_their_gateway() {
    let tb = Testbed::up(&TestbedSpec::meshed(2, 2)).unwrap();
    let footprint = Footprint::of(&tb);
    for netns in &footprint.netns {
        for family in ["-4", "-6"] {
            let out = Command::new("ip")
                .args(["-n", netns, family, "route", "show", "default"])
                .output()
                .unwrap();
            assert!(out.status.success());
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "",
                "default route in {netns} ({family})"
            );
        }
    }
    let routes = |netns: &str| {
        let out = Command::new("ip")
            .args(["-n", netns, "-4", "route", "show"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        routes(tb.pod_netns(MESHED_NAMESPACE, "pod-1-1").unwrap()),
        [
            "10.96.0.0/16 via 10.244.1.1 dev eth0 src 10.244.1.3",
            "10.244.0.0/16 via 10.244.1.1 dev eth0 src 10.244.1.3",
            "10.244.1.1 dev eth0 scope link src 10.244.1.3",
            "172.18.0.0/16 via 10.244.1.1 dev eth0 src 10.244.1.3",
        ]
    );
    assert_eq!(
        routes(tb.node_netns("node-1").unwrap()),
        [
            "10.244.0.0/24 via 172.18.0.2 dev eth0",
            "10.244.1.2 dev p0 scope link src 10.244.1.1",
            "10.244.1.3 dev p1 scope link src 10.244.1.1",
            "172.18.0.0/16 dev eth0 proto kernel scope link src 172.18.0.3",
        ]
    );
    // Nothing leaves the testbed: addresses outside it are unreachable everywhere.
    for netns in &footprint.netns {
        let error = tb
            .run_in_netns(netns, || TcpStream::connect("192.0.2.1:80").unwrap_err())
            .unwrap();
        assert_eq!(
            error.raw_os_error(),
            Some(nix::errno::Errno::ENETUNREACH as i32),
            "{netns}: {error}"
        );
    }
    let forwarding = tb
        .run_in_netns(tb.node_netns("node-1").unwrap(), || {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap()
        })
        .unwrap();
    assert_eq!(forwarding, "1\n");
}

#[test]
fn state_dir_holds_cluster_file_tokens_and_bpffs_dirs() {
    let mut tb = Testbed::up(&TestbedSpec::meshed(2, 1)).unwrap();
    let on_disk = ClusterFile::load(&tb.cluster_file_path()).unwrap();
    assert_eq!(&on_disk, tb.cluster());
    assert_eq!(tb.cluster_file_path(), tb.state_dir().join("cluster.yaml"));
    assert_eq!(
        tb.state_dir(),
        Path::new("/run/sealmesh").join(tb.id().as_str())
    );

    let mut tokens = Vec::new();
    for node in &tb.cluster().nodes {
        let token_file = node.token_file.as_deref().unwrap();
        assert_eq!(
            token_file,
            tb.state_dir().join(format!("{}.token", node.name))
        );
        let meta = std::fs::metadata(token_file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let token = std::fs::read_to_string(token_file).unwrap();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        tokens.push(token);
        let bpffs = tb.node_bpffs_dir(&node.name).unwrap();
        assert!(bpffs.is_dir());
        assert_eq!(
            bpffs,
            sealmesh_common::host::bpffs_mount().unwrap().join(format!(
                "sealmesh-testbed/{}/{}",
                tb.id(),
                node.name
            ))
        );
    }
    for sa in &tb.cluster().service_accounts {
        let token_file = sa.token_file.as_deref().unwrap();
        let meta = std::fs::metadata(token_file).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        tokens.push(std::fs::read_to_string(token_file).unwrap());
    }
    assert_eq!(tokens.len(), 4, "2 nodes + 2 ServiceAccounts");
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 4, "every caller has its own token");

    let endpoint = IdentityEndpoint {
        address: SocketAddr::from((
            tb.control_plane_ip(),
            sealmesh_common::consts::IDENTITY_GRPC_PORT,
        )),
        trust_anchors_file: tb.state_dir().join("ca-bundle.crt"),
    };
    tb.set_identity(endpoint.clone()).unwrap();
    let on_disk = ClusterFile::load(&tb.cluster_file_path()).unwrap();
    assert_eq!(on_disk.identity, Some(endpoint));
    assert_eq!(&on_disk, tb.cluster());
    assert_eq!(on_disk.service_cidr, Some("10.96.0.0/16".parse().unwrap()));

    // A pod left out of the cluster file keeps its network and cgroup.
    let pod = tb.cluster().pods[0].clone();
    tb.unlist_pod(&pod.namespace, &pod.name).unwrap();
    let on_disk = ClusterFile::load(&tb.cluster_file_path()).unwrap();
    assert_eq!(on_disk.pod(&pod.namespace, &pod.name), None);
    assert_eq!(on_disk.pods.len(), tb.cluster().pods.len() - 1);
    assert!(pod.cgroup.is_dir());
    let status = tb
        .spawn_in_pod(&pod.namespace, &pod.name, Command::new("true"))
        .unwrap()
        .wait_with_output()
        .unwrap()
        .status;
    assert!(status.success());
    tb.list_pod(&pod.namespace, &pod.name).unwrap();
    assert_eq!(
        &ClusterFile::load(&tb.cluster_file_path()).unwrap(),
        tb.cluster()
    );

    assert!(tb.node_bpffs_dir("node-9").is_err());
    assert_eq!(
        tb.spawn_in_pod(MESHED_NAMESPACE, "nope", Command::new("true"))
            .unwrap_err()
            .to_string(),
        format!(
            "testbed {} has no pod named \"mesh-demo/nope\"; `cargo xtask testbed list` shows its pods and nodes",
            tb.id()
        )
    );
}

#[test]
fn drop_kills_processes_and_removes_everything() {
    let tb = Testbed::up(&TestbedSpec::meshed(2, 2)).unwrap();
    let footprint = Footprint::of(&tb);
    let (mut server, _) = echo_server(&tb, "pod-0-1");
    drop(tb);
    footprint.assert_gone();
    // The cgroup kill reached the pod's process before its guard did.
    let status = server.child_mut().wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status}");
}

#[test]
fn explicit_down_removes_everything() {
    let tb = Testbed::up(&TestbedSpec::meshed(1, 1)).unwrap();
    let footprint = Footprint::of(&tb);
    tb.down().unwrap();
    footprint.assert_gone();
}

#[test]
fn a_panicking_test_still_cleans_up() {
    let mut footprint = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let tb = Testbed::up(&TestbedSpec::meshed(2, 1)).unwrap();
        footprint = Some(Footprint::of(&tb));
        let _server = echo_server(&tb, "pod-0-0");
        panic!("test failure inside a testbed");
    }));
    assert!(result.is_err());
    footprint.expect("testbed came up").assert_gone();
}

#[test]
fn two_testbeds_run_concurrently_with_the_same_addresses() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Testbed::up(&TestbedSpec::meshed(2, 1)).unwrap());
        let b = s.spawn(|| Testbed::up(&TestbedSpec::meshed(2, 1)).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(a.id(), b.id());
    let (footprint_a, footprint_b) = (Footprint::of(&a), Footprint::of(&b));
    let (_server_a, addr_a) = echo_server(&a, "pod-1-0");
    let (_server_b, addr_b) = echo_server(&b, "pod-1-0");
    assert_eq!(addr_a, addr_b, "same address plan, isolated namespaces");
    assert!(echo_client(&a, "pod-0-0", addr_a, "a").starts_with("ok "));
    assert!(echo_client(&b, "pod-0-0", addr_b, "b").starts_with("ok "));
    drop(a);
    footprint_a.assert_gone();
    // Tearing one down leaves the other working.
    assert!(echo_client(&b, "pod-0-0", addr_b, "still b").starts_with("ok "));
    drop(b);
    footprint_b.assert_gone();
}

#[test]
fn a_testbed_left_running_is_attached_and_removed_by_id() {
    let tb = Testbed::up(&TestbedSpec::meshed(1, 1)).unwrap();
    let footprint = Footprint::of(&tb);
    let cluster = tb.cluster().clone();
    let id = tb.leave_running();
    // Dropped without teardown: still there, as after a crashed `testbed up`.
    assert!(testbed::list().contains(&id));
    let attached = Testbed::attach(&id).unwrap();
    assert_eq!(attached.cluster(), &cluster);
    let (_server, addr) = echo_server(&attached, "pod-0-0");
    assert_eq!(
        addr,
        SocketAddr::from((Ipv4Addr::new(10, 244, 0, 2), ECHO_PORT))
    );
    drop(attached);
    assert!(
        Footprint::of_existing(&footprint),
        "attach does not own the testbed"
    );
    testbed::down_by_id(&id).unwrap();
    footprint.assert_gone();
    assert!(!testbed::list().contains(&id));
    assert_eq!(
        Testbed::attach(&id).unwrap_err().to_string(),
        format!(
            "testbed {id} is not running (no /run/sealmesh/{id}/cluster.yaml); `cargo xtask testbed list` shows running ones"
        )
    );
}

#[test]
fn testapp_is_found_next_to_test_binaries() {
    assert_eq!(testapp::locate().unwrap(), testapp_path());
}

/// `cargo xtask testbed up --kubernetes`: the mesh on an in-process API
/// server until Ctrl-C, with an admin kubeconfig a user (kubectl, sealmesh)
/// reaches it with; the signal takes everything down.
#[test]
fn testbed_up_in_kubernetes_mode_serves_the_api_until_interrupted() {
    use std::io::{BufRead, BufReader};
    let mut up = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args([
            "testbed",
            "up",
            "--kubernetes",
            "--nodes",
            "2",
            "--pods",
            "1",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let (mut id, mut kubeconfig) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        if id.is_none() {
            id = line.split_whitespace().next().map(str::to_owned);
        }
        if let Some(path) = line
            .split("(admin kubeconfig ")
            .nth(1)
            .and_then(|rest| rest.strip_suffix(')'))
        {
            kubeconfig = Some(PathBuf::from(path));
        }
        let done = line == "Kubernetes mode: up until Ctrl-C";
        printed.push(line);
        if done {
            break;
        }
    }
    let kubeconfig = kubeconfig.unwrap_or_else(|| panic!("no kubeconfig in {printed:#?}"));
    let id = id.unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (agents, apps) = runtime.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &Default::default(),
        )
        .await
        .unwrap();
        let client = kube::Client::try_from(config).unwrap();
        let names = |namespace: &str| {
            let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
                kube::Api::namespaced(client.clone(), namespace);
            async move {
                let mut names: Vec<String> = pods
                    .list(&Default::default())
                    .await
                    .unwrap()
                    .items
                    .into_iter()
                    .filter_map(|p| p.metadata.name)
                    .collect();
                names.sort();
                names
            }
        };
        (names("sealmesh").await, names(MESHED_NAMESPACE).await)
    });
    assert_eq!(agents, ["sealmesh-agent-node-0", "sealmesh-agent-node-1"]);
    assert_eq!(apps.len(), 2, "{apps:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(up.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = up.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !testbed::list().iter().any(|t| t.as_str() == id),
        "testbed {id} was taken down"
    );
}
