//! Authorization policies enforced by the kernel for plaintext (needs root): a real cluster file
//! read by the local registry, the agent's sync filling the real pinned maps, a server process
//! in the pod's cgroup, and clients in a second network namespace whose SYNs come from chosen
//! source addresses over a veth (the pod's own loopback is always admitted). Everything is
//! removed by drop guards, also when a test fails.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    process::{Command, Stdio},
    sync::Arc,
    time::Duration,
};

use agent_ebpf::{FAMILY_IPV4, InboundRefusal};
use ipnet::Ipv4Net;
use sealmesh_agent::{
    ebpf::{RedirectConfig, Redirector, acceleration::AccelerationChoice},
    inbound_policy::{InboundPolicyState, PlaintextEntry, RefusalSource, StrictPodMaps, sync_now},
    registry::LocalRegistry,
};
use sealmesh_common::{
    authz::AuthorizationPolicy,
    cluster::{ClusterFile, Namespace, Node, Pod},
    consts::{
        INBOUND_POLICY_ANNOTATION, INBOUND_POLICY_STRICT, MESH_LABEL, MESH_LABEL_ENABLED,
        OUTBOUND_PORT,
    },
    policy::InboundPolicy,
};
use support::{Process, Spec, Testbed, ip};

mod support;

/// The pod's address, on the veth end in the testbed's netns.
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const ALLOWED_PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
/// Client sources: inside the allowed block, inside the DENY block within it, and elsewhere.
const OFFICE: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);
const LAB: Ipv4Addr = Ipv4Addr::new(10, 1, 9, 3);
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(192, 168, 7, 7);

const TESTBED: Spec = Spec {
    name: "ptaccess",
    tests: "the plaintext access tests",
    addrs: &[(POD_IP, 24)],
    child_cgroup: false,
};

/// Accepts and closes connections on every port given, after printing "listening".
const SERVER: &str = r#"
import select, socket, sys
socks = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(64)
    socks.append(s)
print("listening", flush=True)
while True:
    ready, _, _ = select.select(socks, [], [])
    for s in ready:
        s.accept()[0].close()
"#;

/// Connects from a source address; prints "admitted", or "dropped" when the SYN goes unanswered.
const CLIENT: &str = r#"
import socket, sys
src, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.bind((src, 0))
s.settimeout(1.0)
try:
    s.connect((dst, port))
    print("admitted")
except socket.timeout:
    print("dropped")
"#;

/// Admits plaintext from 10.1.0.0/16 to 8080 (and any identity anywhere).
const OFFICE_ON_8080: &str = r#"
rules:
  - from: [{ source: { principals: ["*"] } }]
  - from: [{ source: { ipBlocks: [10.1.0.0/16] } }]
    to: [{ operation: { ports: ["8080"] } }]
"#;
/// Refuses the lab network, inside the office block.
const NO_LAB: &str =
    "{ action: DENY, rules: [{ from: [{ source: { ipBlocks: [10.1.9.0/24] } }] }] }";

#[test]
fn policies_admit_their_plaintext_sources_and_the_kernel_drops_the_rest() {
    let bed = Bed::new();
    let maps = bed.redirector.as_ref();
    let pod = bed.testbed.pod_cgroup_id();

    // A permissive pod without policies: not guarded, everything admitted.
    bed.write(&[], false, true);
    assert!(maps.strict_pods().unwrap().is_empty());
    assert_eq!(bed.try_connect(ELSEWHERE, OTHER_PORT), "admitted");

    // The policies refuse some plaintext: the pod is guarded and its regions are in the map.
    bed.write(
        &[("office", OFFICE_ON_8080), ("no-lab", NO_LAB)],
        false,
        true,
    );
    let mut refusals = bed.redirector.take_refusals().unwrap().unwrap();
    assert_eq!(ids(maps.strict_pods().unwrap()), [pod]);
    assert_eq!(maps.strict_addresses().unwrap(), [POD_IP]);
    let net = |text: &str| text.parse::<Ipv4Net>().unwrap();
    let entry = |port, text| PlaintextEntry {
        pod_cgroup: pod,
        port,
        net: net(text),
    };
    assert_eq!(
        entries(maps),
        BTreeMap::from([
            (entry(Some(ALLOWED_PORT), "0.0.0.0/0"), false),
            (entry(Some(ALLOWED_PORT), "10.1.0.0/16"), true),
            (entry(Some(ALLOWED_PORT), "10.1.9.0/24"), false),
            (entry(None, "0.0.0.0/0"), false),
            (entry(None, "10.1.0.0/16"), false),
            (entry(None, "10.1.9.0/24"), false),
        ])
    );
    let status = &bed.state.pods()[0];
    assert!(status.enforced && status.required_by_authorization_policy);
    assert_eq!(bed.redirector.status().plaintext_access_entries, 6);

    assert_eq!(bed.try_connect(OFFICE, ALLOWED_PORT), "admitted");
    assert_eq!(bed.try_connect(OFFICE, OTHER_PORT), "dropped", "other port");
    assert_eq!(
        bed.try_connect(LAB, ALLOWED_PORT),
        "dropped",
        "the DENY block inside the ALLOW block"
    );
    assert_eq!(
        bed.try_connect(ELSEWHERE, ALLOWED_PORT),
        "dropped",
        "other block"
    );
    // Each refusal is counted for the pod and reported with its flow.
    assert_eq!(maps.strict_pods().unwrap()[0].1.refused, 3);
    let reported = next_refusals(&mut refusals, 3);
    let flows: Vec<(u64, [u8; 4], u16)> = reported
        .iter()
        .map(|r| {
            assert_eq!(r.flow.family, FAMILY_IPV4);
            let [a, b, c, d, ..] = r.flow.src_addr;
            (r.pod_cgroup, [a, b, c, d], r.flow.dst_port)
        })
        .collect();
    assert_eq!(
        flows,
        [
            (pod, OFFICE.octets(), OTHER_PORT),
            (pod, LAB.octets(), ALLOWED_PORT),
            (pod, ELSEWHERE.octets(), ALLOWED_PORT),
        ]
    );

    // The map follows a policy change: without the DENY policy the lab is admitted.
    bed.write(&[("office", OFFICE_ON_8080)], false, true);
    assert_eq!(
        entries(maps),
        BTreeMap::from([
            (entry(Some(ALLOWED_PORT), "0.0.0.0/0"), false),
            (entry(Some(ALLOWED_PORT), "10.1.0.0/16"), true),
            (entry(None, "0.0.0.0/0"), false),
            (entry(None, "10.1.0.0/16"), false),
        ])
    );
    assert_eq!(bed.try_connect(LAB, ALLOWED_PORT), "admitted");
    assert_eq!(bed.try_connect(ELSEWHERE, ALLOWED_PORT), "dropped");

    // A strict annotation ignores what the policies allow: no entries, all plaintext refused.
    bed.write(&[("office", OFFICE_ON_8080)], true, true);
    assert!(entries(maps).is_empty());
    assert_eq!(ids(maps.strict_pods().unwrap()), [pod]);
    let status = &bed.state.pods()[0];
    assert!(status.enforced && !status.required_by_authorization_policy);
    assert_eq!(bed.try_connect(OFFICE, ALLOWED_PORT), "dropped");

    // Guarded by its policies again, then the pod goes: its entries go with it.
    bed.write(&[("office", OFFICE_ON_8080)], false, true);
    assert_eq!(entries(maps).len(), 4);
    assert_eq!(bed.try_connect(OFFICE, ALLOWED_PORT), "admitted");
    bed.write(&[("office", OFFICE_ON_8080)], false, false);
    assert!(entries(maps).is_empty());
    assert!(maps.strict_pods().unwrap().is_empty());
    assert!(maps.strict_addresses().unwrap().is_empty());
    assert_eq!(bed.try_connect(ELSEWHERE, OTHER_PORT), "admitted");

    // Uninstalling removes the maps with the pins.
    bed.write(&[("office", OFFICE_ON_8080)], false, true);
    assert_eq!(bed.redirector.status().plaintext_access_entries, 4);
    let pin_dir = bed.testbed.pin_dir();
    drop(refusals);
    bed.uninstall();
    assert!(!pin_dir.exists(), "uninstall removes every pin");
}

/// The testbed, a client network namespace, the pod's server, the registry and the agent's
/// strict-inbound state.
struct Bed {
    state: InboundPolicyState,
    registry: Arc<LocalRegistry>,
    redirector: Arc<Redirector>,
    cluster_file: tempfile::NamedTempFile,
    _server: Process,
    client: ClientNetns,
    // Last: dropping it removes the netns, cgroups and pins the others live in.
    testbed: Testbed,
}

impl Bed {
    fn new() -> Self {
        let testbed = Testbed::new(&TESTBED);
        let client = ClientNetns::new(&testbed);
        let cluster_file = tempfile::NamedTempFile::new().unwrap();
        cluster(&testbed, &[], false, true)
            .save(cluster_file.path())
            .unwrap();
        let registry = LocalRegistry::load(cluster_file.path(), "node-0", Vec::new())
            .expect("the cluster file loads");
        let redirector = Arc::new(
            Redirector::load(&RedirectConfig {
                node_cgroup: testbed.node.clone(),
                bpffs_dir: testbed.pin_dir(),
                listener: std::net::SocketAddrV4::new(NODE_IP, OUTBOUND_PORT),
                excluded_ports: Vec::new(),
                excluded_cidrs: Vec::new(),
                sockmap_acceleration: AccelerationChoice::OFF,
                pod_parent_cgroups: vec![sealmesh_common::host::cgroup_id(&testbed.node).unwrap()],
                meshed_pods: vec![testbed.pod_cgroup_id()],
                unmeshed_pods: Vec::new(),
                agent_cgroups: Vec::new(),
            })
            .expect("the eBPF object loads and attaches"),
        );
        let state = InboundPolicyState::new(
            InboundPolicy::Permissive,
            registry.clone(),
            redirector.clone(),
        );
        let server = start_server(&testbed);
        Self {
            state,
            registry,
            redirector,
            cluster_file,
            _server: server,
            client,
            testbed,
        }
    }

    /// Rewrites the cluster file (policies as (name, spec); the pod strict by annotation; the
    /// pod present) and brings the maps up to date, as the agent does on a change.
    fn write(&self, policies: &[(&str, &str)], strict: bool, pod: bool) {
        let file = cluster(&self.testbed, policies, strict, pod);
        file.save(self.cluster_file.path()).unwrap();
        self.registry.reload().expect("the cluster file reloads");
        sync_now(&self.state).expect("the maps follow the registry");
    }

    fn try_connect(&self, source: Ipv4Addr, port: u16) -> String {
        self.client.connect(source, port)
    }

    fn uninstall(self) {
        let Self {
            state,
            registry,
            redirector,
            cluster_file,
            _server,
            client,
            testbed,
        } = self;
        drop((state, registry, cluster_file, _server, client));
        Arc::into_inner(redirector)
            .expect("no other handle on the redirector")
            .uninstall()
            .expect("uninstall");
        drop(testbed);
    }
}

fn cluster(testbed: &Testbed, policies: &[(&str, &str)], strict: bool, pod: bool) -> ClusterFile {
    let mut file = ClusterFile::new("ptaccess");
    file.nodes.push(Node {
        name: "node-0".into(),
        ip: NODE_IP,
        pod_cidr: "10.250.0.0/24".parse().unwrap(),
        cgroup: testbed.node.clone(),
        token_file: None,
        netns: Some(testbed.netns.clone()),
    });
    file.namespaces.push(Namespace {
        name: "shop".into(),
        labels: BTreeMap::from([(MESH_LABEL.into(), MESH_LABEL_ENABLED.into())]),
        annotations: BTreeMap::new(),
    });
    if pod {
        file.pods.push(Pod {
            name: "web".into(),
            namespace: "shop".into(),
            service_account: "web".into(),
            ip: POD_IP,
            node: "node-0".into(),
            cgroup: testbed.pod.clone(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            annotations: if strict {
                BTreeMap::from([(
                    INBOUND_POLICY_ANNOTATION.into(),
                    INBOUND_POLICY_STRICT.into(),
                )])
            } else {
                BTreeMap::new()
            },
            netns: Some(testbed.netns.clone()),
        });
    }
    file.authorization_policies = policies
        .iter()
        .map(|(name, spec)| AuthorizationPolicy {
            name: (*name).into(),
            namespace: "shop".into(),
            annotations: BTreeMap::new(),
            spec: serde_yaml_ng::from_str(spec).unwrap(),
        })
        .collect();
    file
}

fn start_server(testbed: &Testbed) -> Process {
    let mut child = testbed
        .python(
            &testbed.pod,
            SERVER,
            &[&ALLOWED_PORT.to_string(), &OTHER_PORT.to_string()],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the server");
    let stdout = child.stdout.take().unwrap();
    let server = Process(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening", "the server started");
    server
}

fn ids<T>(pods: Vec<(u64, T)>) -> Vec<u64> {
    pods.into_iter().map(|(id, _)| id).collect()
}

fn entries(maps: &dyn StrictPodMaps) -> BTreeMap<PlaintextEntry, bool> {
    maps.plaintext_entries().unwrap().into_iter().collect()
}

fn next_refusals(ring: &mut impl RefusalSource, count: usize) -> Vec<InboundRefusal> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut refusals = Vec::new();
            while refusals.len() < count {
                let batch = tokio::time::timeout(Duration::from_secs(10), ring.next_batch())
                    .await
                    .expect("refusals reported in time")
                    .unwrap();
                refusals.extend(batch);
            }
            refusals
        })
}

/// A network namespace holding the other end of the testbed's veth, with the client source
/// addresses; removed on drop.
struct ClientNetns {
    name: String,
}

impl ClientNetns {
    fn new(testbed: &Testbed) -> Self {
        let client = Self {
            name: format!("{}-c", testbed.netns),
        };
        let (ns, bed) = (client.name.as_str(), testbed.netns.as_str());
        ip(&["netns", "add", ns]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&["-n", bed, "link", "set", "sm1", "netns", ns]);
        for source in [OFFICE, LAB, ELSEWHERE] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{source}/32"),
                "dev",
                "sm1",
            ]);
        }
        ip(&["-n", ns, "link", "set", "sm1", "up"]);
        ip(&["-n", ns, "route", "add", "10.250.0.0/24", "dev", "sm1"]);
        for net in ["10.1.0.0/16", "192.168.7.0/24"] {
            ip(&["-n", bed, "route", "add", net, "dev", "sm0"]);
        }
        client
    }

    /// A client outside the node's cgroup (so the host, which the programs never see connect).
    fn connect(&self, source: Ipv4Addr, port: u16) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, "python3", "-c", CLIENT])
            .args([source.to_string(), POD_IP.to_string(), port.to_string()])
            .output()
            .expect("run the client");
        assert!(output.status.success(), "client failed: {output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }
}

impl Drop for ClientNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
