//! The redirect programs on a real kernel (needs root): each test builds its own network
//! namespace, cgroup tree and private bpffs, attaches a [`Redirector`] at the "node" cgroup, and
//! runs real client processes placed in the pod / child / node cgroups. Everything is removed by
//! drop guards, also when a test fails.

use std::{
    fs::{self, File},
    io::{ErrorKind, Read},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::Duration,
};

use agent_ebpf::MAP_ABI_VERSION;
use nix::sched::{CloneFlags, setns};
use sealmesh_agent::ebpf::{
    CgroupRole, CgroupRoles, KERNEL_LOG_TARGET, Redirect, RedirectConfig, RedirectSource,
    RedirectTable, Redirector, acceleration::AccelerationChoice,
};
use sealmesh_common::{consts::OUTBOUND_PORT, host};
use support::{Spec, Testbed};
use tracing::field::{Field, Visit};
use tracing_subscriber::{
    filter::LevelFilter,
    layer::{Context, Layer, SubscriberExt},
};

mod support;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// A second network on the node, excluded from redirection by CIDR.
const EXCLUDED_NET_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 1, 1);
/// Where pods "want" to go; nothing listens there, only the redirect makes it reachable.
const REMOTE_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 99), 80);
const EXCLUDED_PORT: u16 = 8081;
const PLAIN_PORT: u16 = 8082;
const LISTENER: SocketAddrV4 = SocketAddrV4::new(NODE_IP, OUTBOUND_PORT);
const WAIT: Duration = Duration::from_secs(10);

/// Connects `count` times to host:port and, by mode: `send` writes "hi" and closes; `wait`
/// blocks until the server closes or resets; `refused` expects every connect to be refused;
/// `hold` opens all connections first, then writes "hi" on each and closes them.
const CLIENT: &str = r#"
import socket, sys
host, port, count, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
if mode == "hold":
    held = [socket.create_connection((host, port), timeout=5) for _ in range(count)]
    for s in held:
        s.sendall(b"hi")
        s.close()
    sys.exit(0)
for _ in range(count):
    if mode == "refused":
        try:
            socket.create_connection((host, port), timeout=5).close()
        except ConnectionRefusedError:
            continue
        sys.exit("connected although nothing should listen")
    if mode == "send":
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"hi")
        s.close()
        continue
    # The server may reset the connection before connect() even returns.
    try:
        socket.create_connection((host, port), timeout=5).recv(1)
    except ConnectionResetError:
        pass
"#;

#[test]
fn loads_attaches_pins_and_uninstalls() {
    let bed = Testbed::new(&TESTBED);
    let redirector = Redirector::load(&bed.config()).expect("the eBPF object loads and attaches");
    let status = redirector.status();
    assert_eq!(
        status.attached_programs,
        [
            "track_redirected",
            "original_peer4",
            "original_peer6",
            "redirect_connect4",
            "redirect_connect6",
            "enforce_strict_inbound"
        ]
    );
    assert_eq!(
        (
            status.meshed_pods,
            status.pending_connects,
            status.pending_accepts,
            status.plaintext_access_entries
        ),
        (0, 0, 0, 0)
    );
    assert_eq!(status.pin_dir, bed.pin_dir());
    // What readiness reads: the same programs, without walking any map.
    assert_eq!(redirector.attached_programs(), status.attached_programs);
    assert_eq!(redirector.pin_dir(), bed.pin_dir());
    let maps = format!("maps-v{MAP_ABI_VERSION}");
    for pin in [
        "links/track_redirected".to_owned(),
        "links/redirect_connect4".to_owned(),
        format!("{maps}/MESHED_PODS"),
        format!("{maps}/UNMESHED_PODS"),
        format!("{maps}/POD_PARENT_CGROUPS"),
        format!("{maps}/AGENT_CGROUPS"),
        "links/enforce_strict_inbound".to_owned(),
        format!("{maps}/STRICT_PODS"),
        format!("{maps}/STRICT_POD_ADDRESSES"),
        format!("{maps}/TRUSTED_CONNECTIONS"),
        format!("{maps}/INBOUND_REFUSALS"),
        format!("{maps}/PLAINTEXT_ACCESS"),
    ] {
        assert!(bed.pin_dir().join(&pin).exists(), "{pin} is pinned");
    }
    // The pod parents and the agent's cgroups are in their maps before anything attaches: the
    // configured ones, and the cgroup the agent (this test process) runs in.
    let own_id = own_cgroup_id();
    assert_eq!(
        redirector.ids(CgroupRole::PodParent).unwrap(),
        [bed.node_cgroup_id()]
    );
    let mut agent = redirector.ids(CgroupRole::Agent).unwrap();
    agent.sort_unstable();
    let mut expected = vec![own_id, AGENT_POD_CGROUP];
    expected.sort_unstable();
    assert_eq!(agent, expected);
    assert_eq!((status.pod_parent_cgroups, status.agent_cgroups), (1, 2));
    // The agent's own cgroup is never meshed.
    let error = redirector
        .insert(CgroupRole::MeshedPod, own_id)
        .expect_err("meshing the agent's own cgroup");
    assert!(
        error
            .to_string()
            .starts_with(&format!("refusing to mesh cgroup {own_id}")),
        "{error}"
    );
    assert_eq!(
        redirector.ids(CgroupRole::MeshedPod).unwrap(),
        Vec::<u64>::new()
    );

    redirector.uninstall().expect("uninstall");
    assert!(
        !bed.pin_dir().exists(),
        "uninstall removes the node's pin directory"
    );
}

#[test]
fn redirects_meshed_pods_and_their_children_only() {
    let bed = Testbed::new(&TESTBED);
    let redirector = Arc::new(Redirector::load(&bed.config()).expect("load"));
    redirector
        .insert(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .expect("mark the pod meshed");
    assert_eq!(
        redirector.ids(CgroupRole::MeshedPod).unwrap(),
        [bed.pod_cgroup_id()]
    );
    let outbound = NetnsListener::take_and_read(&bed, LISTENER, &redirector);
    let plain =
        NetnsListener::take_and_read(&bed, SocketAddrV4::new(NODE_IP, PLAIN_PORT), &redirector);
    let excluded_port =
        NetnsListener::take_and_read(&bed, SocketAddrV4::new(NODE_IP, EXCLUDED_PORT), &redirector);
    let excluded_net = NetnsListener::take_and_read(
        &bed,
        SocketAddrV4::new(EXCLUDED_NET_IP, PLAIN_PORT),
        &redirector,
    );
    let loopback = NetnsListener::take_and_read(
        &bed,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, PLAIN_PORT),
        &redirector,
    );

    // A pod process: redirected, with the original destination and the pod's cgroup.
    bed.run_client(&bed.pod, REMOTE_POD, 1, "send");
    let accepted = outbound.next();
    assert_eq!(accepted.received, b"hi");
    assert_eq!(accepted.local, LISTENER);
    assert_eq!(accepted.redirect, Some(bed.meshed_pod_redirect(REMOTE_POD)));
    assert_eq!(
        redirector.take(accepted.peer, accepted.local),
        None,
        "a record is taken once"
    );

    // A dual-stack (AF_INET6) socket connecting to an IPv4-mapped address is redirected too.
    bed.run_client_to(
        &bed.pod,
        &format!("::ffff:{}", REMOTE_POD.ip()),
        REMOTE_POD.port(),
        1,
        "send",
    );
    let accepted = outbound.next();
    assert_eq!(accepted.received, b"hi");
    assert_eq!(accepted.redirect, Some(bed.meshed_pod_redirect(REMOTE_POD)));

    // A process in a child cgroup of the pod counts as the pod.
    bed.run_client(bed.child(), REMOTE_POD, 1, "send");
    assert_eq!(
        outbound.next().redirect,
        Some(bed.meshed_pod_redirect(REMOTE_POD))
    );

    // Not redirected: a process of the (unmeshed) node cgroup, loopback, an excluded port,
    // an excluded CIDR. Each reaches its real listener and has no record.
    bed.run_client(&bed.node, SocketAddrV4::new(NODE_IP, PLAIN_PORT), 1, "send");
    assert_direct(&plain);
    bed.run_client(
        &bed.pod,
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, PLAIN_PORT),
        1,
        "send",
    );
    assert_direct(&loopback);
    bed.run_client(
        &bed.pod,
        SocketAddrV4::new(NODE_IP, EXCLUDED_PORT),
        1,
        "send",
    );
    assert_direct(&excluded_port);
    bed.run_client(
        &bed.pod,
        SocketAddrV4::new(EXCLUDED_NET_IP, PLAIN_PORT),
        1,
        "send",
    );
    assert_direct(&excluded_net);

    // Unmeshing the pod stops the redirect.
    redirector
        .remove(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .expect("unmark the pod");
    redirector
        .insert(CgroupRole::UnmeshedPod, bed.pod_cgroup_id())
        .expect("mark the pod unmeshed");
    assert_eq!(
        redirector.ids(CgroupRole::MeshedPod).unwrap(),
        Vec::<u64>::new()
    );
    bed.run_client(&bed.pod, SocketAddrV4::new(NODE_IP, PLAIN_PORT), 1, "send");
    assert_direct(&plain);
    outbound.assert_idle();
    assert_eq!(redirector.status().pending_accepts, 0);
}

#[test]
fn classifies_the_connecting_task_by_its_cgroups() {
    let bed = Testbed::new(&TESTBED);
    let redirector = Arc::new(Redirector::load(&bed.config()).expect("load"));
    let outbound = NetnsListener::take_and_read(&bed, LISTENER, &redirector);
    let plain =
        NetnsListener::take_and_read(&bed, SocketAddrV4::new(NODE_IP, PLAIN_PORT), &redirector);
    let plain_addr = SocketAddrV4::new(NODE_IP, PLAIN_PORT);
    let unknown = |cgroup: u64| {
        Some(Redirect {
            original_dst: plain_addr,
            source_cgroup: cgroup,
            source: RedirectSource::UnknownPod,
        })
    };
    let child_id = host::cgroup_id(bed.child()).unwrap();

    // A pod in none of the maps (just started): redirected, marked unknown, so its first
    // connection never leaves in clear. A process in a child cgroup counts as the pod.
    bed.run_client(&bed.pod, plain_addr, 1, "send");
    assert_eq!(outbound.next().redirect, unknown(bed.pod_cgroup_id()));
    bed.run_client(bed.child(), plain_addr, 1, "send");
    assert_eq!(outbound.next().redirect, unknown(bed.pod_cgroup_id()));
    // The pod parent itself is the host: never redirected.
    bed.run_client(&bed.node, plain_addr, 1, "send");
    assert_direct(&plain);

    // Known unmeshed: direct.
    redirector
        .insert(CgroupRole::UnmeshedPod, bed.pod_cgroup_id())
        .unwrap();
    bed.run_client(bed.child(), plain_addr, 1, "send");
    assert_direct(&plain);
    redirector
        .remove(CgroupRole::UnmeshedPod, bed.pod_cgroup_id())
        .unwrap();

    // The agent's cgroup, at or above the task's, below the deepest pod parent: direct.
    redirector.insert(CgroupRole::Agent, child_id).unwrap();
    bed.run_client(bed.child(), plain_addr, 1, "send");
    assert_direct(&plain);
    bed.run_client(&bed.pod, plain_addr, 1, "send");
    assert_eq!(
        outbound.next().redirect,
        unknown(bed.pod_cgroup_id()),
        "the agent's cgroup does not cover its parent"
    );
    redirector.remove(CgroupRole::Agent, child_id).unwrap();

    // An agent cgroup above the deepest pod parent does not make the pods the agent's.
    redirector
        .insert(CgroupRole::Agent, bed.root_cgroup_id())
        .unwrap();
    bed.run_client(&bed.pod, plain_addr, 1, "send");
    assert_eq!(outbound.next().redirect, unknown(bed.pod_cgroup_id()));
    redirector
        .remove(CgroupRole::Agent, bed.root_cgroup_id())
        .unwrap();

    // The deepest pod parent decides which cgroup is the pod (kubepods, then its QoS level).
    redirector
        .insert(CgroupRole::PodParent, bed.pod_cgroup_id())
        .unwrap();
    bed.run_client(bed.child(), plain_addr, 1, "send");
    assert_eq!(outbound.next().redirect, unknown(child_id));
    redirector
        .remove(CgroupRole::PodParent, bed.pod_cgroup_id())
        .unwrap();

    // Meshed at any level wins, as before.
    redirector
        .insert(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .unwrap();
    redirector
        .insert(CgroupRole::UnmeshedPod, child_id)
        .unwrap();
    bed.run_client(bed.child(), plain_addr, 1, "send");
    assert_eq!(
        outbound.next().redirect,
        Some(bed.meshed_pod_redirect(plain_addr))
    );

    // Without a pod parent, nothing below the node is a pod (the host).
    redirector
        .remove(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .unwrap();
    redirector
        .remove(CgroupRole::PodParent, bed.node_cgroup_id())
        .unwrap();
    bed.run_client(&bed.pod, plain_addr, 1, "send");
    assert_direct(&plain);
    outbound.assert_idle();
}

#[test]
fn no_records_leak_over_many_connections() {
    let bed = Testbed::new(&TESTBED);
    let redirector = Arc::new(Redirector::load(&bed.config()).expect("load"));
    redirector
        .insert(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .unwrap();

    // The agent is not listening yet: connects are refused, and their records are deleted.
    bed.run_client(&bed.pod, REMOTE_POD, 50, "refused");
    assert_eq!(
        pending(&redirector),
        (0, 0),
        "refused connects leave no records"
    );

    // Clients that send and close before the agent accepts: their sockets reach CLOSE (via
    // FIN_WAIT2) while the connections still wait in the accept queue; the records must wait too.
    const EARLY_CLOSERS: usize = 20;
    let (open_gate, gate) = mpsc::channel();
    let late = NetnsListener::spawn(
        &bed,
        LISTENER,
        redirector.clone(),
        Mode::TakeAndReadAfter(gate),
    );
    bed.run_client(&bed.pod, REMOTE_POD, EARLY_CLOSERS, "send");
    // Once the listener's kernel acknowledged their FINs (after its delayed-ACK timer), the
    // orphaned sockets have closed (ss lists their time-wait remains as FIN-WAIT-2).
    bed.wait_until_no_socket_in(&["fin-wait-1"]);
    assert_eq!(
        pending(&redirector),
        (0, EARLY_CLOSERS),
        "records of closed but not yet accepted connections are kept"
    );
    open_gate.send(()).unwrap();
    for n in 0..EARLY_CLOSERS {
        let accepted = late.next();
        assert_eq!(accepted.received, b"hi", "connection {n}");
        assert_eq!(
            accepted.redirect,
            Some(bed.meshed_pod_redirect(REMOTE_POD)),
            "connection {n}"
        );
    }
    assert_eq!(
        pending(&redirector),
        (0, 0),
        "the late accepts took every record"
    );
    drop(late);

    // Clients that send and close at once (usually before the accept): all records survive
    // until taken, then nothing is left.
    const CONNECTIONS: usize = 500;
    let outbound = NetnsListener::take_and_read(&bed, LISTENER, &redirector);
    bed.run_client(&bed.pod, REMOTE_POD, CONNECTIONS, "send");
    for n in 0..CONNECTIONS {
        let accepted = outbound.next();
        assert_eq!(
            accepted.redirect,
            Some(bed.meshed_pod_redirect(REMOTE_POD)),
            "connection {n}"
        );
    }
    assert_eq!(pending(&redirector), (0, 0), "every record was taken");

    // Many connections established at once (fewer than the listen backlog: the listener reads
    // one at a time) wait in the map side by side and are told apart by their 4-tuples.
    const HELD: usize = 100;
    bed.run_client(&bed.pod, REMOTE_POD, HELD, "hold");
    let mut clients = std::collections::HashSet::new();
    for n in 0..HELD {
        let accepted = outbound.next();
        assert_eq!(accepted.received, b"hi", "connection {n}");
        assert_eq!(
            accepted.redirect,
            Some(bed.meshed_pod_redirect(REMOTE_POD)),
            "connection {n}"
        );
        clients.insert(accepted.peer);
    }
    assert_eq!(clients.len(), HELD, "every connection had its own record");
    assert_eq!(pending(&redirector), (0, 0), "every held record was taken");
    drop(outbound);

    // Connections reset before the agent took them: sock_ops deletes their records.
    let resetting =
        NetnsListener::spawn(&bed, LISTENER, redirector.clone(), Mode::ResetWithoutTaking);
    bed.run_client(&bed.pod, REMOTE_POD, 20, "wait");
    for _ in 0..20 {
        let accepted = resetting.next();
        assert_eq!(
            redirector.take(accepted.peer, accepted.local),
            None,
            "the record went with the connection"
        );
    }
    assert_eq!(
        pending(&redirector),
        (0, 0),
        "reset connections leave no records"
    );
}

#[test]
fn a_restarted_agent_reuses_the_pinned_state_and_takes_over() {
    let bed = Testbed::new(&TESTBED);
    let first = Redirector::load(&bed.config()).expect("first agent");
    first
        .insert(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .unwrap();
    first.insert(CgroupRole::UnmeshedPod, 77).unwrap();
    drop(first);
    // While no agent runs, the pinned maps keep classifying.
    let between = Redirector::pinned_status(&bed.pin_dir()).unwrap();
    assert_eq!(
        (
            between.meshed_pods,
            between.unmeshed_pods,
            between.pod_parent_cgroups
        ),
        (1, 1, 1)
    );
    // A starting agent marks its cgroups in the pinned maps before it connects anywhere.
    Redirector::admit_agent(&bed.pin_dir(), &[AGENT_POD_CGROUP + 1]).expect("admit");
    assert_eq!(
        Redirector::pinned_status(&bed.pin_dir())
            .unwrap()
            .agent_cgroups,
        3,
        "the previous agent's two and the new one's pod cgroup"
    );
    // The new agent loads with its registry's view, which replaces the previous one's.
    let second = Arc::new(
        Redirector::load(&RedirectConfig {
            agent_cgroups: vec![AGENT_POD_CGROUP + 1],
            meshed_pods: vec![bed.pod_cgroup_id()],
            unmeshed_pods: vec![78],
            ..bed.config()
        })
        .expect("second agent"),
    );
    assert_eq!(
        second.ids(CgroupRole::MeshedPod).unwrap(),
        [bed.pod_cgroup_id()]
    );
    assert_eq!(second.ids(CgroupRole::UnmeshedPod).unwrap(), [78]);
    let mut agent = second.ids(CgroupRole::Agent).unwrap();
    agent.sort_unstable();
    let mut expected = vec![own_cgroup_id(), AGENT_POD_CGROUP + 1];
    expected.sort_unstable();
    assert_eq!(agent, expected, "the previous agent's cgroups are replaced");

    let outbound = NetnsListener::take_and_read(&bed, LISTENER, &second);
    bed.run_client(&bed.pod, REMOTE_POD, 1, "send");
    assert_eq!(
        outbound.next().redirect,
        Some(bed.meshed_pod_redirect(REMOTE_POD))
    );
    drop(outbound);
    let second = Arc::into_inner(second).expect("the listener thread released the redirector");
    second.uninstall().expect("uninstall");
}

#[test]
fn kernel_logs_reach_tracing() {
    let captured = capture_kernel_logs();
    let bed = Testbed::new(&TESTBED);
    let redirector = Arc::new(Redirector::load(&bed.config()).expect("load"));
    redirector
        .insert(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .unwrap();
    let outbound = NetnsListener::take_and_read(&bed, LISTENER, &redirector);
    bed.run_client(&bed.pod, REMOTE_POD, 1, "send");
    assert!(outbound.next().redirect.is_some());

    let expected = format!("redirected cgroup {} to {REMOTE_POD}", bed.pod_cgroup_id());
    let deadline = std::time::Instant::now() + WAIT;
    while !captured.lock().unwrap().contains(&expected) {
        assert!(
            std::time::Instant::now() < deadline,
            "no kernel log {expected:?} among {} captured records",
            captured.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Installs (once per test binary) a subscriber at DEBUG that keeps the messages logged under
/// the eBPF programs' target.
fn capture_kernel_logs() -> Arc<Mutex<Vec<String>>> {
    static CAPTURED: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Arc::new(Mutex::new(Vec::new()));
            let subscriber = tracing_subscriber::registry()
                .with(KernelLogCapture(captured.clone()))
                .with(LevelFilter::DEBUG);
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other subscriber in this test binary");
            captured
        })
        .clone()
}

struct KernelLogCapture(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for KernelLogCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        struct Message(String);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if event.metadata().target() == KERNEL_LOG_TARGET {
            let mut message = Message(String::new());
            event.record(&mut message);
            self.0.lock().unwrap().push(message.0);
        }
    }
}

/// The cgroup this test process (the "agent") runs in.
fn own_cgroup_id() -> u64 {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .unwrap();
    host::cgroup_id(
        &host::cgroup2_mount()
            .unwrap()
            .join(own.trim_start_matches('/')),
    )
    .unwrap()
}

fn pending(redirector: &Redirector) -> (usize, usize) {
    let status = redirector.status();
    (status.pending_connects, status.pending_accepts)
}

fn assert_direct(listener: &NetnsListener) {
    let accepted = listener.next();
    assert_eq!(accepted.received, b"hi");
    assert_eq!(
        accepted.redirect, None,
        "{} was not redirected",
        listener.addr
    );
}

#[test]
fn a_replaced_cidr_exclusion_redirects_the_old_network_again_and_exempts_the_new() {
    let bed = Testbed::new(&TESTBED);
    let redirector = Arc::new(Redirector::load(&bed.config()).expect("load"));
    redirector
        .insert(CgroupRole::MeshedPod, bed.pod_cgroup_id())
        .expect("mark the pod meshed");
    let outbound = NetnsListener::take_and_read(&bed, LISTENER, &redirector);
    let old_net = SocketAddrV4::new(EXCLUDED_NET_IP, PLAIN_PORT);
    let new_net = SocketAddrV4::new(NODE_IP, PLAIN_PORT);
    let old_listener = NetnsListener::take_and_read(&bed, old_net, &redirector);
    let new_listener = NetnsListener::take_and_read(&bed, new_net, &redirector);

    // As when the identity service's endpoint moves to another address.
    let moved: ipnet::Ipv4Net = format!("{NODE_IP}/32").parse().unwrap();
    redirector
        .replace_excluded_cidrs(&[moved])
        .expect("move the exclusion");
    bed.run_client(&bed.pod, old_net, 1, "send");
    let accepted = outbound.next();
    assert_eq!(accepted.received, b"hi");
    assert_eq!(accepted.redirect, Some(bed.meshed_pod_redirect(old_net)));
    old_listener.assert_idle();
    bed.run_client(&bed.pod, new_net, 1, "send");
    assert_direct(&new_listener);

    // Replacing with the same set changes nothing; an empty set exempts nothing.
    redirector.replace_excluded_cidrs(&[moved]).unwrap();
    bed.run_client(&bed.pod, new_net, 1, "send");
    assert_direct(&new_listener);
    redirector.replace_excluded_cidrs(&[]).unwrap();
    bed.run_client(&bed.pod, new_net, 1, "send");
    assert_eq!(
        outbound.next().redirect,
        Some(bed.meshed_pod_redirect(new_net))
    );
    outbound.assert_idle();
}

/// An agent cgroup id given in the configuration (as a Kubernetes-mode agent's pod cgroup).
const AGENT_POD_CGROUP: u64 = 0x5ea1_0000;

/// The testbed's cgroup tree is `<root>/node/pod/child`.
const TESTBED: Spec = Spec {
    name: "ebpftest",
    tests: "the eBPF redirect tests",
    addrs: &[(NODE_IP, 24), (EXCLUDED_NET_IP, 24)],
    child_cgroup: true,
};

impl Testbed {
    /// The record of a connection from the meshed pod to `original_dst`.
    fn meshed_pod_redirect(&self, original_dst: SocketAddrV4) -> Redirect {
        Redirect {
            original_dst,
            source_cgroup: self.pod_cgroup_id(),
            source: RedirectSource::MeshedPod,
        }
    }

    fn config(&self) -> RedirectConfig {
        RedirectConfig {
            node_cgroup: self.node.clone(),
            bpffs_dir: self.pin_dir(),
            listener: LISTENER,
            excluded_ports: vec![EXCLUDED_PORT],
            excluded_cidrs: vec!["10.250.1.0/24".parse().unwrap()],
            sockmap_acceleration: AccelerationChoice::ON,
            pod_parent_cgroups: vec![self.node_cgroup_id()],
            meshed_pods: Vec::new(),
            unmeshed_pods: Vec::new(),
            agent_cgroups: vec![AGENT_POD_CGROUP],
        }
    }

    fn node_cgroup_id(&self) -> u64 {
        host::cgroup_id(&self.node).unwrap()
    }

    /// The testbed's root cgroup, the node's parent.
    fn root_cgroup_id(&self) -> u64 {
        host::cgroup_id(self.node.parent().unwrap()).unwrap()
    }

    /// Runs the client script in the netns as a process of `cgroup`, and waits for it.
    fn run_client(&self, cgroup: &Path, dst: SocketAddrV4, count: usize, mode: &str) {
        self.run_client_to(cgroup, &dst.ip().to_string(), dst.port(), count, mode);
    }

    /// Waits until no TCP socket in the netns is in one of the `ss` states given.
    fn wait_until_no_socket_in(&self, states: &[&str]) {
        let mut args = vec!["netns", "exec", &self.netns, "ss", "-Htn"];
        for state in states {
            args.extend(["state", state]);
        }
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let output = Command::new("ip").args(&args).output().expect("run ss");
            assert!(output.status.success(), "ss failed: {output:?}");
            if output.stdout.is_empty() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sockets still in {states:?}: {}",
                String::from_utf8_lossy(&output.stdout)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like `run_client`, with the host as text (e.g. an IPv4-mapped IPv6 address).
    fn run_client_to(&self, cgroup: &Path, host: &str, port: u16, count: usize, mode: &str) {
        let status = self
            .python(
                cgroup,
                CLIENT,
                &[host, &port.to_string(), &count.to_string(), mode],
            )
            .status()
            .expect("run the client");
        assert!(
            status.success(),
            "client ({mode} x{count} to {host} port {port} from {}) failed: {status}",
            cgroup.display()
        );
    }
}

enum Mode {
    /// What the agent does: take the record on accept, then read the client's bytes.
    TakeAndRead,
    /// Like `TakeAndRead`, but start accepting only once the gate receives (or is dropped).
    TakeAndReadAfter(Receiver<()>),
    /// Reset the connection without taking its record.
    ResetWithoutTaking,
}

struct Accepted {
    peer: SocketAddrV4,
    local: SocketAddrV4,
    received: Vec<u8>,
    redirect: Option<Redirect>,
}

/// A TCP listener inside the test's netns, on its own thread (setns is per thread).
struct NetnsListener {
    addr: SocketAddrV4,
    accepted: Receiver<Accepted>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NetnsListener {
    /// A listener at `addr` that takes each connection's record and reads it to the end.
    fn take_and_read(bed: &Testbed, addr: SocketAddrV4, table: &Arc<Redirector>) -> Self {
        Self::spawn(bed, addr, table.clone(), Mode::TakeAndRead)
    }

    fn spawn(bed: &Testbed, addr: SocketAddrV4, table: Arc<Redirector>, mode: Mode) -> Self {
        let netns = File::open(Path::new("/run/netns").join(&bed.netns)).expect("open the netns");
        let (ready_tx, ready_rx) = mpsc::channel();
        let (accepted_tx, accepted) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let thread = std::thread::spawn(move || {
            setns(&netns, CloneFlags::CLONE_NEWNET).expect("setns");
            let listener = bind_retrying(addr);
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            if let Mode::TakeAndReadAfter(gate) = &mode {
                // Keep watching `stop`: a failing test drops this listener with the gate shut.
                while let Err(RecvTimeoutError::Timeout) =
                    gate.recv_timeout(Duration::from_millis(20))
                {
                    if stop_flag.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
            while !stop_flag.load(Ordering::Relaxed) {
                let (stream, peer) = match listener.accept() {
                    Ok(accepted) => accepted,
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    Err(error) => panic!("accept on {addr}: {error}"),
                };
                let peer = v4(peer);
                let local = v4(stream.local_addr().unwrap());
                let accepted = match mode {
                    Mode::TakeAndRead | Mode::TakeAndReadAfter(_) => {
                        let redirect = table.take(peer, local);
                        Accepted {
                            peer,
                            local,
                            received: read_all(stream),
                            redirect,
                        }
                    }
                    Mode::ResetWithoutTaking => {
                        socket2::SockRef::from(&stream)
                            .set_linger(Some(Duration::ZERO))
                            .unwrap();
                        drop(stream);
                        Accepted {
                            peer,
                            local,
                            received: Vec::new(),
                            redirect: None,
                        }
                    }
                };
                if accepted_tx.send(accepted).is_err() {
                    return;
                }
            }
        });
        ready_rx
            .recv_timeout(WAIT)
            .expect("the listener thread started");
        Self {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    fn next(&self) -> Accepted {
        match self.accepted.recv_timeout(WAIT) {
            Ok(accepted) => accepted,
            Err(RecvTimeoutError::Timeout) => {
                panic!("nothing accepted on {} within {WAIT:?}", self.addr)
            }
            Err(RecvTimeoutError::Disconnected) => panic!("the listener on {} died", self.addr),
        }
    }

    fn assert_idle(&self) {
        if let Ok(accepted) = self.accepted.try_recv() {
            panic!(
                "{} unexpectedly accepted a connection from {}",
                self.addr, accepted.peer
            );
        }
    }
}

impl Drop for NetnsListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Binds, retrying briefly on EADDRINUSE: a previous listener on the address may live on for a
/// moment in a process another test thread is forking (fds are only closed at its exec).
fn bind_retrying(addr: SocketAddrV4) -> TcpListener {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match TcpListener::bind(addr) {
            Ok(listener) => return listener,
            Err(error)
                if error.kind() == ErrorKind::AddrInUse && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("bind {addr} in the netns: {error}"),
        }
    }
}

fn read_all(mut stream: TcpStream) -> Vec<u8> {
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut received = Vec::new();
    stream
        .read_to_end(&mut received)
        .expect("read the client's bytes");
    received
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(addr) => addr,
        SocketAddr::V6(addr) => panic!("unexpected IPv6 address {addr}"),
    }
}
