//! Facts about the Linux host that several crates need.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Where `ip netns` keeps named network namespaces (bind mounts); the testbed
/// and the CLI's local mode use the same place.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Where cgroup v2 is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones. Read from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    mount_point_of_type("cgroup2")
}

/// The cgroup v2 directory `dir` stands for: `dir` itself when it is on
/// cgroup2, else its `unified` child on a hybrid host (cgroup v1 at
/// `/sys/fs/cgroup`, v2 at `/sys/fs/cgroup/unified`), as a DaemonSet sees
/// the host's `/sys/fs/cgroup` mounted at one fixed path on either kind.
pub fn cgroup2_dir(dir: &Path) -> Option<PathBuf> {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
    let is_cgroup2 =
        |path: &Path| statfs(path).is_ok_and(|fs| fs.filesystem_type() == CGROUP2_SUPER_MAGIC);
    [dir.to_owned(), dir.join("unified")]
        .into_iter()
        .find(|candidate| is_cgroup2(candidate))
}

/// Where bpffs is mounted, if it is.
pub fn bpffs_mount() -> Option<PathBuf> {
    mount_point_of_type("bpf")
}

/// The id the kernel gives a cgroup v2 directory (`bpf_get_current_cgroup_id`,
/// `/proc/<pid>/cgroup` lookups): its inode number on cgroupfs.
pub fn cgroup_id(cgroup_dir: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(cgroup_dir)?.ino())
}

/// Unblocks SIGTERM and SIGINT in the calling thread; threads it starts
/// later inherit the mask. A process whose parent blocked them before
/// spawning it would otherwise never see the kubelet's SIGTERM and could
/// only be killed. Call first in `main`, before a runtime starts threads.
pub fn unblock_termination_signals() -> nix::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    SigSet::from_iter([Signal::SIGTERM, Signal::SIGINT]).thread_unblock()
}

fn mount_point_of_type(fs_type: &str) -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <type> <source> <super opts>"
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        (right.split(' ').next()? == fs_type).then(|| PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_dir_of_a_hybrid_or_unified_cgroup_root_is_found() {
        let mount = cgroup2_mount().expect("cgroup v2 is mounted on hosts that run sealmesh");
        assert_eq!(cgroup2_dir(&mount), Some(mount.clone()));
        // Hybrid: the root of the v1 hierarchy stands for its `unified` child.
        if mount.ends_with("unified") {
            assert_eq!(cgroup2_dir(mount.parent().unwrap()), Some(mount.clone()));
        }
        assert_eq!(cgroup2_dir(Path::new("/proc")), None);
    }

    #[test]
    fn finds_this_hosts_cgroup2_mount() {
        let mount = cgroup2_mount().expect("cgroup2 is mounted on every supported host");
        assert!(
            mount.join("cgroup.controllers").exists(),
            "{} is not a cgroup2 root",
            mount.display()
        );
    }

    #[test]
    fn cgroup_id_is_the_directory_inode() {
        let root = cgroup2_mount().unwrap();
        assert_eq!(cgroup_id(&root).unwrap(), 1, "the cgroup2 root has id 1");
    }

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_octal(r"/a\040b\134c"), r"/a b\c");
    }
}
