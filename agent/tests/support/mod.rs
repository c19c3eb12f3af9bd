//! The fixture shared by the eBPF test binaries (`ebpf_redirect`, `sockmap`): a unique network
//! namespace, cgroup tree (`<root>/node/pod`, optionally `.../pod/child`) and private bpffs, all
//! removed on drop, also when a test fails.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command},
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use sealmesh_common::host;

/// What differs between the test binaries' testbeds.
pub struct Spec {
    /// Names the netns (`sm-<name>-<id>`), the cgroup root (`sealmesh-<name>-<id>`) and the
    /// bpffs tempdir.
    pub name: &'static str,
    /// For the "need root" message, e.g. "the sockmap tests".
    pub tests: &'static str,
    /// The node's addresses (with their prefix lengths), on a veth in the netns.
    pub addrs: &'static [(Ipv4Addr, u8)],
    /// Whether the pod cgroup gets a `child` cgroup.
    pub child_cgroup: bool,
}

/// A unique namespace, cgroup tree (`<root>/node/pod[/child]`) and private bpffs.
pub struct Testbed {
    pub netns: String,
    cgroup_root: PathBuf,
    pub node: PathBuf,
    pub pod: PathBuf,
    child: Option<PathBuf>,
    bpffs: tempfile::TempDir,
    bpffs_mounted: bool,
}

impl Testbed {
    pub fn new(spec: &Spec) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "{} need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
            spec.tests
        );
        let name = spec.name;
        let id = format!("{:08x}", rand::random::<u32>());
        let cgroup_root = host::cgroup2_mount()
            .expect("cgroup2 is mounted")
            .join(format!("sealmesh-{name}-{id}"));
        let node = cgroup_root.join("node");
        let pod = node.join("pod");
        let child = spec.child_cgroup.then(|| pod.join("child"));
        let mut bed = Self {
            netns: format!("sm-{name}-{id}"),
            cgroup_root,
            node,
            pod,
            child,
            bpffs: tempfile::Builder::new()
                .prefix(&format!("sealmesh-{name}-bpffs-"))
                .tempdir()
                .unwrap(),
            bpffs_mounted: false,
        };
        // From here on, Drop cleans up whatever of the following exists.
        mount(
            Some("bpf"),
            bed.bpffs.path(),
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount bpffs");
        bed.bpffs_mounted = true;
        fs::create_dir_all(bed.child.as_ref().unwrap_or(&bed.pod)).expect("create the cgroup tree");
        let ns = bed.netns.clone();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // A veth pair (both ends in the netns) carries the node addresses; dummy is not built everywhere.
        ip(&[
            "-n", &ns, "link", "add", "sm0", "type", "veth", "peer", "name", "sm1",
        ]);
        for (addr, prefix_len) in spec.addrs {
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/{prefix_len}"),
                "dev",
                "sm0",
            ]);
        }
        ip(&["-n", &ns, "link", "set", "sm0", "up"]);
        ip(&["-n", &ns, "link", "set", "sm1", "up"]);
        bed
    }

    /// The child cgroup of the pod; only with `Spec::child_cgroup`.
    pub fn child(&self) -> &Path {
        self.child
            .as_deref()
            .expect("this testbed has no child cgroup")
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.path().join("sealmesh-testbed/node-0")
    }

    pub fn pod_cgroup_id(&self) -> u64 {
        host::cgroup_id(&self.pod).unwrap()
    }

    /// `python3 -c <script> <args>` in the netns as a process of `cgroup`.
    pub fn python(&self, cgroup: &Path, script: &str, args: &[&str]) -> Command {
        // The shell joins the cgroup first: `ip netns exec` remounts /sys, hiding cgroupfs.
        let mut command = Command::new("sh");
        command
            .args(["-c", r#"echo $$ > "$0" && exec ip netns exec "$@""#])
            .arg(cgroup.join("cgroup.procs"))
            .args([&self.netns, "python3", "-c", script])
            .args(args);
        command
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let dirs = [&self.pod, &self.node, &self.cgroup_root];
        for dir in self.child.iter().chain(dirs) {
            let _ = fs::remove_dir(dir);
        }
        if self.bpffs_mounted {
            // Unmounting drops every pin of this private instance (and so detaches our links).
            let _ = umount2(self.bpffs.path(), MntFlags::MNT_DETACH);
        }
    }
}

/// A child process killed and reaped on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {} failed", args.join(" "));
}
