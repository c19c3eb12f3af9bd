//! Where a testbed puts things: names, paths and addresses, computed in one place.

use std::{
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnet::Ipv4Net;
use rand::Rng;

use super::TestbedError;

/// Parent of every testbed's state dir (cluster file, node tokens).
pub const STATE_ROOT: &str = "/run/sealmesh";
/// Directory under the cgroup2 and bpffs mounts that holds all testbeds.
pub const HOST_DIR: &str = "sealmesh-testbed";
/// Where `ip netns` keeps named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Every testbed namespace name starts with this (`sm-<id>-...`).
pub const NETNS_PREFIX: &str = "sm-";
/// Cluster file name inside the state dir.
pub const CLUSTER_FILE: &str = "cluster.yaml";
/// cgroup (below the testbed's) for processes of the underlay (control plane).
pub const UNDERLAY_CGROUP: &str = "underlay";

/// The underlay bridge's address: the control plane (identity service) listens here.
pub const UNDERLAY_GATEWAY: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 1);
pub const UNDERLAY_PREFIX_LEN: u8 = 16;
/// Node IPs come from this range (kind's).
pub const UNDERLAY_CIDR: Ipv4Net =
    Ipv4Net::new_assert(Ipv4Addr::new(172, 18, 0, 0), UNDERLAY_PREFIX_LEN);
/// All pod CIDRs are inside this range.
pub const POD_SUPERNET: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 244, 0, 0), 16);
/// Service VIPs come from this range (kind's default).
pub const SERVICE_CIDR: Ipv4Net = Ipv4Net::new_assert(Ipv4Addr::new(10, 96, 0, 0), 16);
/// Node k is 172.18.0.(k+2) and pod m of a node is 10.244.k.(m+2), so both are bounded
/// by the last usable host octet, 254.
pub const MAX_NODES: usize = 253;
pub const MAX_PODS_PER_NODE: usize = 253;

/// `node-<k>`.
pub fn node_name(index: usize) -> String {
    format!("node-{index}")
}

/// The underlay bridge's port towards node `index` (the veth whose other
/// end is the node's `eth0`).
pub fn underlay_port(index: usize) -> String {
    format!("n{index}")
}

pub fn node_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 18, 0, host_octet(index))
}

pub fn pod_cidr(node: usize) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(10, 244, node_octet(node), 0), 24)
}

/// The node-side address every pod of the node routes through.
pub fn pod_gateway(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node_octet(node), 1)
}

pub fn pod_ip(node: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node_octet(node), host_octet(pod))
}

fn node_octet(index: usize) -> u8 {
    u8::try_from(index).expect("node index checked against MAX_NODES")
}

fn host_octet(index: usize) -> u8 {
    u8::try_from(index + 2).expect("index checked against MAX_NODES / MAX_PODS_PER_NODE")
}

/// A testbed's unique id, `tb-` and 6 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TestbedId(String);

impl TestbedId {
    pub fn random() -> Self {
        Self(format!(
            "tb-{:06x}",
            rand::rng().random_range(0..0x100_0000u32)
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TestbedId {
    type Err = TestbedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s
            .strip_prefix("tb-")
            .is_some_and(|hex| hex.len() == 6 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if ok {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(TestbedError::BadId(s.to_owned()))
        }
    }
}

impl fmt::Display for TestbedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Host paths that hold every testbed.
#[derive(Clone, Debug)]
pub struct HostPaths {
    cgroup_mount: PathBuf,
    bpffs_mount: PathBuf,
}

impl HostPaths {
    /// Finds the cgroup2 and bpffs mounts; errors say how to get them.
    pub fn detect() -> Result<Self, TestbedError> {
        Ok(Self {
            cgroup_mount: sealmesh_common::host::cgroup2_mount().ok_or(TestbedError::NoCgroup2)?,
            bpffs_mount: sealmesh_common::host::bpffs_mount().ok_or(TestbedError::NoBpffs)?,
        })
    }

    #[cfg(test)]
    pub(crate) fn for_tests(cgroup_mount: &str, bpffs_mount: &str) -> Self {
        Self {
            cgroup_mount: cgroup_mount.into(),
            bpffs_mount: bpffs_mount.into(),
        }
    }

    /// `<cgroup2 mount>/sealmesh-testbed`
    pub fn cgroup_root(&self) -> PathBuf {
        self.cgroup_mount.join(HOST_DIR)
    }

    /// `<bpffs mount>/sealmesh-testbed`
    pub fn bpffs_root(&self) -> PathBuf {
        self.bpffs_mount.join(HOST_DIR)
    }

    pub fn state_root(&self) -> &'static Path {
        Path::new(STATE_ROOT)
    }
}

/// Names and paths of one testbed.
#[derive(Clone, Debug)]
pub struct Layout {
    id: TestbedId,
    host: HostPaths,
}

impl Layout {
    pub fn new(id: TestbedId, host: HostPaths) -> Self {
        Self { id, host }
    }

    pub fn id(&self) -> &TestbedId {
        &self.id
    }

    pub fn host(&self) -> &HostPaths {
        &self.host
    }

    /// `sm-<id>-`: every namespace of this testbed starts with it.
    pub fn netns_prefix(&self) -> String {
        format!("{NETNS_PREFIX}{}-", self.id)
    }

    pub fn underlay_netns(&self) -> String {
        format!("{}u", self.netns_prefix())
    }

    pub fn node_netns(&self, node: usize) -> String {
        format!("{}n{node}", self.netns_prefix())
    }

    pub fn pod_netns(&self, node: usize, pod: usize) -> String {
        format!("{}n{node}-p{pod}", self.netns_prefix())
    }

    /// `<cgroup2>/sealmesh-testbed/<id>`
    pub fn cgroup_dir(&self) -> PathBuf {
        self.host.cgroup_root().join(self.id.as_str())
    }

    pub fn underlay_cgroup(&self) -> PathBuf {
        self.cgroup_dir().join(UNDERLAY_CGROUP)
    }

    pub fn node_cgroup(&self, node_name: &str) -> PathBuf {
        self.cgroup_dir().join(node_name)
    }

    /// Pod names are unique only within a namespace, and `_` is not allowed in
    /// Kubernetes names, so `<namespace>_<pod>` is unique and unambiguous.
    pub fn pod_cgroup(&self, node_name: &str, namespace: &str, pod: &str) -> PathBuf {
        self.node_cgroup(node_name)
            .join(format!("{namespace}_{pod}"))
    }

    /// `<bpffs>/sealmesh-testbed/<id>`
    pub fn bpffs_dir(&self) -> PathBuf {
        self.host.bpffs_root().join(self.id.as_str())
    }

    pub fn node_bpffs_dir(&self, node_name: &str) -> PathBuf {
        self.bpffs_dir().join(node_name)
    }

    /// `/run/sealmesh/<id>`
    pub fn state_dir(&self) -> PathBuf {
        self.host.state_root().join(self.id.as_str())
    }

    /// The tmpfs agents keep their certificates on (`<state>/certs`).
    pub fn cert_cache_mount(&self) -> PathBuf {
        self.state_dir().join("certs")
    }

    /// The Unix socket through which `node`'s agents hand their listeners
    /// over (the DaemonSet's hostPath `/run/sealmesh/agent.sock`, per node).
    pub fn handover_socket(&self, node_name: &str) -> PathBuf {
        self.state_dir().join(format!("handover-{node_name}.sock"))
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.state_dir().join(CLUSTER_FILE)
    }

    pub fn token_file(&self, node_name: &str) -> PathBuf {
        self.state_dir().join(format!("{node_name}.token"))
    }

    /// Token of a ServiceAccount (workload-mode Certify); `_` keeps it distinct
    /// from node tokens and unambiguous.
    pub fn service_account_token_file(&self, namespace: &str, name: &str) -> PathBuf {
        self.state_dir()
            .join(format!("sa-{namespace}_{name}.token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_documented_plan() {
        assert_eq!(node_ip(0), Ipv4Addr::new(172, 18, 0, 2));
        assert_eq!(node_ip(252), Ipv4Addr::new(172, 18, 0, 254));
        assert_eq!(pod_cidr(3).to_string(), "10.244.3.0/24");
        assert_eq!(pod_gateway(3), Ipv4Addr::new(10, 244, 3, 1));
        assert_eq!(pod_ip(3, 0), Ipv4Addr::new(10, 244, 3, 2));
        assert!(POD_SUPERNET.contains(&pod_cidr(MAX_NODES - 1)));
    }

    #[test]
    fn ids_parse_and_reject() {
        let id = TestbedId::random();
        assert_eq!(id.as_str().len(), 9);
        assert_eq!(id.as_str().parse::<TestbedId>().unwrap(), id);
        for bad in ["tb-12345", "tb-1234567", "xx-123456", "tb-12345g", ""] {
            assert!(
                matches!(bad.parse::<TestbedId>(), Err(TestbedError::BadId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn interface_and_namespace_names() {
        let layout = Layout::new(
            "tb-abc123".parse().unwrap(),
            HostPaths::for_tests("/sys/fs/cgroup", "/sys/fs/bpf"),
        );
        assert_eq!(layout.underlay_netns(), "sm-tb-abc123-u");
        assert_eq!(layout.pod_netns(2, 7), "sm-tb-abc123-n2-p7");
        assert_eq!(
            layout.pod_cgroup("node-2", "demo", "web"),
            Path::new("/sys/fs/cgroup/sealmesh-testbed/tb-abc123/node-2/demo_web")
        );
        assert_eq!(
            layout.node_bpffs_dir("node-2"),
            Path::new("/sys/fs/bpf/sealmesh-testbed/tb-abc123/node-2")
        );
        assert_eq!(
            layout.token_file("node-2"),
            Path::new("/run/sealmesh/tb-abc123/node-2.token")
        );
    }
}
