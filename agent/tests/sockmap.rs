//! Sockmap acceleration and the getpeername fix on a real kernel (needs root). Each test builds
//! its own network namespace, cgroup tree (`<root>/node/pod`) and private bpffs, attaches a
//! [`Redirector`] at the node cgroup, and runs a stand-in agent (an echo server in the node
//! cgroup, listening on the agent's outbound address, so the kernel runs sock_ops for its
//! accepted sockets as it does for the agent's) and pod clients (processes in the pod cgroup
//! whose connects are redirected to it). Everything is removed by drop guards, also on failure.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    process::{ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use sealmesh_agent::ebpf::{
    CgroupRole, CgroupRoles, EbpfStatus, RedirectConfig, Redirector,
    acceleration::{
        self, AccelerationChoice, BACK_PRESSURE_BOUND, KernelLimit, SockmapAcceleration,
    },
};
use sealmesh_common::{consts::OUTBOUND_PORT, host};
use serde_json::Value;
use support::{Process, Spec, Testbed};

mod support;

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
/// Where pods "want" to go; nothing listens there, only the redirect makes it reachable.
const REMOTE_POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 251, 0, 99), 80);
const LISTENER: SocketAddrV4 = SocketAddrV4::new(NODE_IP, OUTBOUND_PORT);
const WAIT: Duration = Duration::from_secs(20);
const BULK_BYTES: usize = 8 << 20;
const SMALL_MESSAGES: usize = 2000;
/// SYN and FIN take one sequence number each way; anything more means payload went over TCP.
const HANDSHAKE_SEQUENCE_SPACE: u64 = 4;

/// The stand-in agent: greets every connection (so a client that waits for the greeting only
/// sends once both sockets are established), echoes until EOF, then half-closes and closes.
const ECHO_SERVER: &str = r#"
import socket, sys, threading
host, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(128)
print("listening", flush=True)
def serve(conn):
    with conn:
        conn.sendall(b"sealmesh\n")
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

/// A pod client. Modes: `bulk N` waits for the greeting, sends N random bytes and half-closes
/// while reading the echo; `eager N` does the same without waiting for the greeting (its first
/// bytes may leave before the agent's socket is established); `small N` does N request/response
/// round trips of 1-97 bytes, then N messages back to back; `hold` waits for the greeting,
/// prints `connected`, and finishes a short exchange once stdin has a line. Each prints one JSON
/// line: getpeername's answer, whether the echo matched, and the TCP byte counters of the socket.
const CLIENT: &str = r#"
import hashlib, json, os, socket, struct, sys, threading
host, port, mode, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
GREETING = b"sealmesh\n"
s = socket.create_connection((host, port), timeout=30)
peer = "%s:%d" % s.getpeername()[:2]
def recv_exact(n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            sys.exit("EOF after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)
def recv_to_eof():
    buf = bytearray()
    while True:
        chunk = s.recv(1 << 16)
        if not chunk:
            return bytes(buf)
        buf += chunk
def send_then_half_close(payload):
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
def tcp_bytes():
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    acked, received = struct.unpack_from("QQ", info, 120)  # tcpi_bytes_acked, tcpi_bytes_received
    return acked, received
expected = b""
if mode in ("bulk", "eager"):
    payload = os.urandom(count)
    if mode == "bulk":
        assert recv_exact(len(GREETING)) == GREETING
    writer = threading.Thread(target=send_then_half_close, args=(payload,))
    writer.start()
    received = recv_to_eof()
    writer.join()
    if mode == "eager":
        expected = GREETING
    expected += payload
elif mode == "small":
    assert recv_exact(len(GREETING)) == GREETING
    for i in range(count):
        message = bytes([i % 251]) * (i % 97 + 1)
        s.sendall(message)
        if recv_exact(len(message)) != message:
            sys.exit("round trip %d: wrong echo" % i)
    payload = b"".join(b"%d;" % i for i in range(count))
    for i in range(count):
        s.sendall(b"%d;" % i)
    s.shutdown(socket.SHUT_WR)
    received = recv_to_eof()
    expected = payload
elif mode == "blocking":
    # What most apps do: a blocking socket without timeout, one thread writing (then
    # half-closing) while another reads to EOF.
    assert recv_exact(len(GREETING)) == GREETING
    s.settimeout(None)
    payload = os.urandom(count)
    writer = threading.Thread(target=send_then_half_close, args=(payload,))
    writer.start()
    received = recv_to_eof()
    writer.join()
    expected = payload
elif mode == "hold":
    assert recv_exact(len(GREETING)) == GREETING
    print(json.dumps({"connected": True, "peer": peer}), flush=True)
    sys.stdin.readline()
    send_then_half_close(b"bye")
    received = recv_to_eof()
    expected = b"bye"
acked, tcp_received = tcp_bytes()
print(json.dumps({
    "peer": peer,
    "match": received == expected,
    "received": len(received),
    "expected": len(expected),
    "received_sha256": hashlib.sha256(received).hexdigest(),
    "expected_sha256": hashlib.sha256(expected).hexdigest(),
    "tcp_bytes": acked + tcp_received,
}), flush=True)
"#;

/// A stand-in agent that greets every connection and then reads nothing.
const SINK_SERVER: &str = r#"
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[1], int(sys.argv[2])))
listener.listen(128)
print("listening", flush=True)
held = []
while True:
    conn, _ = listener.accept()
    conn.sendall(b"sealmesh\n")
    held.append(conn)
"#;

/// A pod client meeting the kernel limits the acceleration probe looks for, against a stand-in
/// agent that never answers. `half-close`: a thread blocks in `recv` (checked in /proc: asleep in
/// the recvfrom syscall), then the main thread half-closes, which wakes it; prints `eagain` if
/// the read failed, `waiting` once the reader sleeps in `recv` again. `flood N`: sends without
/// blocking until the kernel makes it wait or N bytes are queued; prints how many.
const PROBE_CLIENT: &str = r#"
import json, os, socket, sys, threading, time
host, port, mode, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
RECVFROM = {"x86_64": 45, "aarch64": 207}[os.uname().machine]
s = socket.create_connection((host, port), timeout=30)
greeting = b""
while not greeting.endswith(b"\n"):
    greeting += s.recv(64)
if mode == "half-close":
    s.settimeout(None)
    outcome = {}
    def read():
        outcome["tid"] = threading.get_native_id()
        try:
            outcome["read"] = "eof" if s.recv(1) == b"" else "data"
        except BlockingIOError:
            outcome["read"] = "eagain"
    def asleep_in_recv(tid):
        try:
            with open("/proc/self/task/%d/stat" % tid) as f:
                state = f.read().rsplit(") ", 1)[1][0]
            with open("/proc/self/task/%d/syscall" % tid) as f:
                return state == "S" and f.read().split()[0] == str(RECVFROM)
        except OSError:  # the thread has exited
            return False
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 20
    while "tid" not in outcome or not asleep_in_recv(outcome["tid"]):
        if time.monotonic() > deadline:
            sys.exit("the reader never blocked in recv")
        time.sleep(0.001)
    s.shutdown(socket.SHUT_WR)
    while "read" not in outcome and not asleep_in_recv(outcome["tid"]):
        if time.monotonic() > deadline:
            sys.exit("the reader neither returned nor waited again")
        time.sleep(0.001)
    print(json.dumps({"read": outcome.get("read", "waiting")}), flush=True)
elif mode == "flood":
    s.setblocking(False)
    chunk = bytes(64 << 10)
    queued = 0
    while queued < count:
        try:
            queued += s.send(chunk)
        except BlockingIOError:
            break
    print(json.dumps({"queued": queued}), flush=True)
"#;

#[test]
fn accelerated_connections_carry_exact_bytes_without_tcp_and_leave_no_entries() {
    let bed = Testbed::new(&TESTBED);
    let redirector = bed.redirector(AccelerationChoice::ON);
    let _agent = bed.echo_server();
    assert_eq!(redirector.status().sockmap_acceleration, Some(true));

    let bulk = bed.client("bulk", BULK_BYTES);
    assert_exchange(&bulk, BULK_BYTES);
    assert!(
        bulk["tcp_bytes"].as_u64().unwrap() <= HANDSHAKE_SEQUENCE_SPACE,
        "payload skipped TCP both ways: {bulk}"
    );

    let small = bed.client("small", SMALL_MESSAGES);
    assert_exchange(&small, small["expected"].as_u64().unwrap() as usize);
    assert!(
        small["tcp_bytes"].as_u64().unwrap() <= HANDSHAKE_SEQUENCE_SPACE,
        "{small}"
    );

    // A client that sends before the agent's socket is established may have its first bytes
    // go over TCP; whichever way each message went, the stream arrives intact and in order.
    for _ in 0..20 {
        let eager = bed.client("eager", 256 << 10);
        assert_exchange(&eager, (256 << 10) + "sealmesh\n".len());
    }

    wait_for_status(
        &redirector,
        "closed connections leave the sockhash",
        |status| status.accelerated_sockets == 0 && status.original_destinations == 0,
    );
}

#[test]
fn dual_stack_sockets_are_accelerated_and_see_their_original_peer() {
    let bed = Testbed::new(&TESTBED);
    let redirector = bed.redirector(AccelerationChoice::ON);
    let _agent = bed.echo_server();
    let mapped = format!("::ffff:{}", REMOTE_POD.ip());
    let bulk = bed.client_to(&mapped, "bulk", 1 << 20);
    assert_eq!(
        bulk["peer"],
        format!("{mapped}:{}", REMOTE_POD.port()),
        "{bulk}"
    );
    assert_eq!(bulk["match"], true, "{bulk}");
    assert_eq!(bulk["received"], 1 << 20, "{bulk}");
    assert!(
        bulk["tcp_bytes"].as_u64().unwrap() <= HANDSHAKE_SEQUENCE_SPACE,
        "{bulk}"
    );
    wait_for_status(
        &redirector,
        "closed connections leave the sockhash",
        |status| status.accelerated_sockets == 0 && status.original_destinations == 0,
    );
}

#[test]
fn both_sockets_are_in_the_sockhash_while_connected() {
    let bed = Testbed::new(&TESTBED);
    let redirector = bed.redirector(AccelerationChoice::ON);
    let _agent = bed.echo_server();

    let mut held = bed.hold();
    let connected = held.connected();
    assert_eq!(connected["peer"], REMOTE_POD.to_string());
    let status = redirector.status();
    assert_eq!(
        (status.accelerated_sockets, status.original_destinations),
        (2, 1),
        "the pod's socket and the agent's, one original destination: {status:?}"
    );
    let pinned = Redirector::pinned_status(&bed.pin_dir()).unwrap();
    assert_eq!(
        (pinned.accelerated_sockets, pinned.sockmap_acceleration),
        (2, None)
    );

    let done = held.finish();
    assert_exchange(&done, 3);
    assert!(
        done["tcp_bytes"].as_u64().unwrap() <= HANDSHAKE_SEQUENCE_SPACE,
        "{done}"
    );
    wait_for_status(&redirector, "both sockets leave the sockhash", |status| {
        status.accelerated_sockets == 0 && status.original_destinations == 0
    });
}

#[test]
fn connections_of_a_replaced_agent_stay_accelerated() {
    let bed = Testbed::new(&TESTBED);
    let first = bed.redirector(AccelerationChoice::ON);
    let _agent = bed.echo_server();
    let mut held = bed.hold();
    held.connected();

    // The new agent attaches its sk_msg program to the pinned sockhash; the old one goes.
    let second = bed.redirector(AccelerationChoice::ON);
    drop(first);
    assert_eq!(second.status().accelerated_sockets, 2);
    let done = held.finish();
    assert_exchange(&done, 3);
    assert!(
        done["tcp_bytes"].as_u64().unwrap() <= HANDSHAKE_SEQUENCE_SPACE,
        "{done}"
    );

    // New connections are accelerated by the new agent's program.
    let bulk = bed.client("bulk", 1 << 20);
    assert_exchange(&bulk, 1 << 20);
    assert!(
        bulk["tcp_bytes"].as_u64().unwrap() <= HANDSHAKE_SEQUENCE_SPACE,
        "{bulk}"
    );
    wait_for_status(&second, "no sockets left", |status| {
        status.accelerated_sockets == 0
    });
}

/// The kernel probe behind `--sockmap-acceleration auto` against what pod apps meet with
/// acceleration on: a pod reader blocked in `recv` while another of its threads half-closes the
/// socket (Linux 6.18: EAGAIN, as `tcp_bpf_recvmsg` waits once), and a pod sending without
/// blocking to an agent that reads nothing (Linux 6.18: never made to wait). The probe must
/// report each limit exactly when the pod meets it.
#[test]
fn the_kernel_probe_finds_what_pod_apps_meet_with_acceleration_on() {
    let bed = Testbed::new(&TESTBED);
    let limits = acceleration::probe(&bed.pin_dir().join("probe"));
    assert!(
        !bed.pin_dir().join("probe").exists(),
        "the probe removes its scratch pins"
    );
    assert!(
        !limits
            .iter()
            .any(|limit| matches!(limit, KernelLimit::Unsupported(_))),
        "the probe ran: {limits:?}"
    );
    let _sink = bed.stand_in_agent(SINK_SERVER);

    // Over TCP, the same clients see what a TCP socket owes them.
    let without = bed.redirector(AccelerationChoice::OFF);
    let tcp_half_close = bed.probe_client("half-close");
    assert_eq!(tcp_half_close["read"], "waiting", "{tcp_half_close}");
    let tcp_flood = bed.probe_client("flood");
    assert!(
        (tcp_flood["queued"].as_u64().unwrap() as usize) < BACK_PRESSURE_BOUND,
        "TCP made the sender wait: {tcp_flood}"
    );

    let _with = bed.redirector(AccelerationChoice::ON);
    drop(without);
    let half_close = bed.probe_client("half-close");
    assert_eq!(
        limits.contains(&KernelLimit::BlockingReadReturnsEagain),
        half_close["read"] == "eagain",
        "the probe ({limits:?}) and a pod app ({half_close}) agree on blocking reads"
    );
    assert!(
        ["eagain", "waiting"].contains(&half_close["read"].as_str().unwrap()),
        "{half_close}"
    );

    let flood = bed.probe_client("flood");
    let queued = flood["queued"].as_u64().unwrap() as usize;
    let no_back_pressure = limits
        .iter()
        .any(|limit| matches!(limit, KernelLimit::NoBackPressure { .. }));
    assert_eq!(
        no_back_pressure,
        queued >= BACK_PRESSURE_BOUND,
        "the probe ({limits:?}) and a pod app ({flood}) agree on back-pressure"
    );
}

/// `auto` (the default) accelerates exactly when the probe passes, says why not otherwise, and
/// then keeps pod sockets out of the sockhash: a blocking pod app whose writer half-closes reads
/// every byte, over TCP.
#[test]
fn auto_acceleration_follows_the_kernel_probe() {
    let bed = Testbed::new(&TESTBED);
    let probe_dir = acceleration::probe_pin_dir(&bed.pin_dir());
    let choice = AccelerationChoice::decide(SockmapAcceleration::Auto, || {
        acceleration::probe(&probe_dir)
    });
    assert!(!probe_dir.exists(), "the probe removes its scratch pins");
    let redirector = bed.redirector(choice.clone());
    let _agent = bed.echo_server();
    let status = redirector.status();
    let on = choice.limits.is_empty();
    assert_eq!(
        (
            status.sockmap_acceleration,
            status.sockmap_acceleration_limits
        ),
        (Some(on), choice.limits),
    );

    let mut held = bed.hold();
    held.connected();
    assert_eq!(
        redirector.status().accelerated_sockets,
        if on { 2 } else { 0 }
    );
    assert_exchange(&held.finish(), 3);
    for _ in 0..5 {
        let blocking = bed.client("blocking", BULK_BYTES);
        assert_exchange(&blocking, BULK_BYTES);
        if !on {
            assert!(
                blocking["tcp_bytes"].as_u64().unwrap() >= 2 * BULK_BYTES as u64,
                "off: payload went over TCP both ways: {blocking}"
            );
        }
    }
}

#[test]
fn without_acceleration_the_same_bytes_go_over_tcp() {
    let bed = Testbed::new(&TESTBED);
    let redirector = bed.redirector(AccelerationChoice::OFF);
    let _agent = bed.echo_server();
    assert_eq!(redirector.status().sockmap_acceleration, Some(false));

    let mut held = bed.hold();
    assert_eq!(held.connected()["peer"], REMOTE_POD.to_string());
    assert_eq!(redirector.status().accelerated_sockets, 0);
    assert_exchange(&held.finish(), 3);

    let bulk = bed.client("bulk", BULK_BYTES);
    assert_exchange(&bulk, BULK_BYTES);
    assert!(
        bulk["tcp_bytes"].as_u64().unwrap() >= 2 * BULK_BYTES as u64,
        "payload went over TCP both ways: {bulk}"
    );
    let small = bed.client("small", SMALL_MESSAGES);
    assert_exchange(&small, small["expected"].as_u64().unwrap() as usize);
    assert_eq!(redirector.status().accelerated_sockets, 0);
    wait_for_status(&redirector, "original destinations are deleted", |status| {
        status.original_destinations == 0
    });
}

/// The client's report: getpeername gave the original destination and the echo matched.
fn assert_exchange(report: &Value, expected_len: usize) {
    assert_eq!(report["peer"], REMOTE_POD.to_string(), "{report}");
    assert_eq!(report["expected"], expected_len, "{report}");
    assert_eq!(report["received"], report["expected"], "{report}");
    assert_eq!(
        report["received_sha256"], report["expected_sha256"],
        "{report}"
    );
    assert_eq!(report["match"], true, "{report}");
}

fn wait_for_status(redirector: &Redirector, what: &str, done: impl Fn(&EbpfStatus) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = redirector.status();
        if done(&status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {status:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The testbed's cgroup tree is `<root>/node/pod`.
const TESTBED: Spec = Spec {
    name: "sockmaptest",
    tests: "the sockmap tests",
    addrs: &[(NODE_IP, 24)],
    child_cgroup: false,
};

impl Testbed {
    /// Loads the programs and meshes the pod.
    fn redirector(&self, sockmap_acceleration: AccelerationChoice) -> Redirector {
        let redirector = Redirector::load(&RedirectConfig {
            node_cgroup: self.node.clone(),
            bpffs_dir: self.pin_dir(),
            listener: LISTENER,
            excluded_ports: Vec::new(),
            excluded_cidrs: Vec::new(),
            sockmap_acceleration,
            pod_parent_cgroups: vec![host::cgroup_id(&self.node).unwrap()],
            meshed_pods: Vec::new(),
            unmeshed_pods: Vec::new(),
            agent_cgroups: Vec::new(),
        })
        .expect("the eBPF object loads and attaches");
        redirector
            .insert(CgroupRole::MeshedPod, host::cgroup_id(&self.pod).unwrap())
            .expect("mark the pod meshed");
        redirector
    }

    /// `python3 -c <script> <args>` in the netns as a process of `cgroup`, with piped stdin and
    /// stdout.
    fn piped_python(&self, cgroup: &Path, script: &str, args: &[&str]) -> Command {
        let mut command = self.python(cgroup, script, args);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        command
    }

    /// Starts the echoing stand-in agent on the listener, in the node cgroup.
    fn echo_server(&self) -> Process {
        self.stand_in_agent(ECHO_SERVER)
    }

    /// Starts `script` as the stand-in agent on the listener, in the node cgroup.
    fn stand_in_agent(&self, script: &str) -> Process {
        let mut server = Process(
            self.piped_python(
                &self.node,
                script,
                &[&NODE_IP.to_string(), &OUTBOUND_PORT.to_string()],
            )
            .spawn()
            .expect("start the stand-in agent"),
        );
        let mut line = String::new();
        BufReader::new(server.0.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .expect("read the stand-in agent's start line");
        assert_eq!(line, "listening\n", "the stand-in agent started");
        server
    }

    /// Runs a [`PROBE_CLIENT`] in the pod to completion and returns its report.
    fn probe_client(&self, mode: &str) -> Value {
        let output = self
            .piped_python(
                &self.pod,
                PROBE_CLIENT,
                &[
                    &REMOTE_POD.ip().to_string(),
                    &REMOTE_POD.port().to_string(),
                    mode,
                    &BACK_PRESSURE_BOUND.to_string(),
                ],
            )
            .stdin(Stdio::null())
            .output()
            .expect("run the probe client");
        assert!(output.status.success(), "probe client {mode}: {output:?}");
        serde_json::from_slice(&output.stdout).expect("the probe client prints one JSON report")
    }

    fn client_command(&self, mode: &str, count: usize) -> Command {
        self.client_command_to(&REMOTE_POD.ip().to_string(), mode, count)
    }

    fn client_command_to(&self, host: &str, mode: &str, count: usize) -> Command {
        self.piped_python(
            &self.pod,
            CLIENT,
            &[
                host,
                &REMOTE_POD.port().to_string(),
                mode,
                &count.to_string(),
            ],
        )
    }

    /// Runs a pod client to completion and returns its report.
    fn client(&self, mode: &str, count: usize) -> Value {
        self.client_to(&REMOTE_POD.ip().to_string(), mode, count)
    }

    /// Like `client`, to `host` as text (e.g. an IPv4-mapped IPv6 address).
    fn client_to(&self, host: &str, mode: &str, count: usize) -> Value {
        let output = self
            .client_command_to(host, mode, count)
            .stdin(Stdio::null())
            .output()
            .expect("run the client");
        assert!(
            output.status.success(),
            "client {mode} {count} failed: {output:?}"
        );
        serde_json::from_slice(&output.stdout).expect("the client prints one JSON report")
    }

    fn hold(&self) -> HeldClient {
        let mut process = Process(
            self.client_command("hold", 0)
                .spawn()
                .expect("start the client"),
        );
        let stdin = process.0.stdin.take().unwrap();
        let stdout = BufReader::new(process.0.stdout.take().unwrap());
        HeldClient {
            process,
            stdin,
            stdout,
        }
    }
}

/// A `hold` client: connected until told to finish.
struct HeldClient {
    process: Process,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HeldClient {
    fn read_report(&mut self) -> Value {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("read the client's report");
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("report {line:?}: {error}"))
    }

    fn connected(&mut self) -> Value {
        let report = self.read_report();
        assert_eq!(report["connected"], true, "{report}");
        report
    }

    fn finish(mut self) -> Value {
        self.stdin
            .write_all(b"go\n")
            .expect("tell the client to finish");
        let report = self.read_report();
        let status = self.process.0.wait().expect("wait for the client");
        assert!(status.success(), "the held client failed: {status}");
        report
    }
}
