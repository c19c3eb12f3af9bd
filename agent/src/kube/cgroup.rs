//! Finds a local pod's cgroup v2 directory from its UID, named the way the
//! kubelet names it with either cgroup driver:
//!
//! - systemd: `kubepods.slice/kubepods-pod<uid>.slice` (Guaranteed) and
//!   `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice`
//!   (Burstable, BestEffort), with the UID's dashes written as underscores
//!   (a dash separates slice levels in systemd unit names);
//! - cgroupfs: `kubepods/pod<uid>` and `kubepods/<qos>/pod<uid>`.
//!
//! When the root is itself a systemd slice (kind runs kubelets with
//! `--cgroup-root=/kubelet`, giving `kubelet.slice/kubelet-kubepods.slice/…`),
//! the slice names carry its prefix, as systemd nests slices.

use std::path::{Path, PathBuf};

use sealmesh_common::host;

/// The kubelet's QoS levels below the kubepods cgroup; Guaranteed pods sit
/// directly in it.
const QOS_LEVELS: [&str; 2] = ["burstable", "besteffort"];
const KUBEPODS: &str = "kubepods";
const SLICE_SUFFIX: &str = ".slice";

/// The pod cgroups under one node's cgroup root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroups {
    root: PathBuf,
}

/// A pod's cgroup as found on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub dir: PathBuf,
    /// What `bpf_get_current_cgroup_id` reports for the pod's processes.
    pub id: u64,
}

impl PodCgroups {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every directory the kubelet may have created for the pod, in the
    /// order they are tried. Empty when `uid` is not a UID (API data never
    /// becomes a path outside the root).
    pub fn candidates(&self, uid: &str) -> Vec<PathBuf> {
        if !is_uid(uid) {
            return Vec::new();
        }
        let mut dirs = Vec::with_capacity(2 * (QOS_LEVELS.len() + 1) * 2);
        for kubepods in self.systemd_kubepods_slices() {
            let slice = |name: &str| format!("{name}-pod{}{SLICE_SUFFIX}", uid.replace('-', "_"));
            let top = self.root.join(format!("{kubepods}{SLICE_SUFFIX}"));
            dirs.push(top.join(slice(&kubepods)));
            for qos in QOS_LEVELS {
                let qos_slice = format!("{kubepods}-{qos}");
                dirs.push(
                    top.join(format!("{qos_slice}{SLICE_SUFFIX}"))
                        .join(slice(&qos_slice)),
                );
            }
        }
        let pod_dir = format!("pod{uid}");
        let top = self.root.join(KUBEPODS);
        dirs.push(top.join(&pod_dir));
        for qos in QOS_LEVELS {
            dirs.push(top.join(qos).join(&pod_dir));
        }
        dirs
    }

    /// The cgroups pods are created in, whichever driver and QoS level: `kubepods` and its QoS
    /// children (with a nested root slice's prefix too). Most do not exist on a given node.
    pub fn parent_candidates(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::with_capacity(2 * (QOS_LEVELS.len() + 1) * 2);
        for kubepods in self.systemd_kubepods_slices() {
            let top = self.root.join(format!("{kubepods}{SLICE_SUFFIX}"));
            for qos in QOS_LEVELS {
                dirs.push(top.join(format!("{kubepods}-{qos}{SLICE_SUFFIX}")));
            }
            dirs.push(top);
        }
        let top = self.root.join(KUBEPODS);
        for qos in QOS_LEVELS {
            dirs.push(top.join(qos));
        }
        dirs.push(top);
        dirs
    }

    /// The ids of the pod parent cgroups that exist now.
    pub fn parent_ids(&self) -> Vec<u64> {
        self.parent_candidates()
            .iter()
            .filter_map(|dir| host::cgroup_id(dir).ok())
            .collect()
    }

    /// The pod's cgroup, once the kubelet created it.
    pub fn find(&self, uid: &str) -> Option<PodCgroup> {
        self.candidates(uid).into_iter().find_map(|dir| {
            let id = host::cgroup_id(&dir).ok()?;
            Some(PodCgroup { dir, id })
        })
    }

    /// `kubepods`, and `<root slice>-kubepods` when the root is a slice.
    fn systemd_kubepods_slices(&self) -> Vec<String> {
        let nested = self
            .root
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(SLICE_SUFFIX))
            // "-.slice" is systemd's root slice, whose children carry no prefix.
            .filter(|prefix| !prefix.is_empty() && *prefix != "-")
            .map(|prefix| format!("{prefix}-{KUBEPODS}"));
        std::iter::once(KUBEPODS.to_owned()).chain(nested).collect()
    }
}

/// Kubernetes UIDs are RFC 4122 UUIDs: hex digits and dashes.
fn is_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2d3e-0a1b-4c5d-8e9f-001122334455";

    fn rel(cgroups: &PodCgroups, uid: &str) -> Vec<String> {
        cgroups
            .candidates(uid)
            .iter()
            .map(|p| {
                p.strip_prefix(cgroups.root())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn names_both_drivers_with_underscored_uids_for_systemd() {
        let cgroups = PodCgroups::new("/sys/fs/cgroup");
        assert_eq!(
            rel(&cgroups, UID),
            [
                "kubepods.slice/kubepods-pod6f1c2d3e_0a1b_4c5d_8e9f_001122334455.slice",
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6f1c2d3e_0a1b_4c5d_8e9f_001122334455.slice",
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod6f1c2d3e_0a1b_4c5d_8e9f_001122334455.slice",
                "kubepods/pod6f1c2d3e-0a1b-4c5d-8e9f-001122334455",
                "kubepods/burstable/pod6f1c2d3e-0a1b-4c5d-8e9f-001122334455",
                "kubepods/besteffort/pod6f1c2d3e-0a1b-4c5d-8e9f-001122334455",
            ]
        );
    }

    #[test]
    fn a_slice_root_prefixes_the_nested_slices() {
        let cgroups = PodCgroups::new("/sys/fs/cgroup/kubelet.slice");
        let candidates = rel(&cgroups, UID);
        assert_eq!(candidates.len(), 9);
        assert_eq!(
            candidates[3..6],
            [
                "kubelet-kubepods.slice/kubelet-kubepods-pod6f1c2d3e_0a1b_4c5d_8e9f_001122334455.slice",
                "kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod6f1c2d3e_0a1b_4c5d_8e9f_001122334455.slice",
                "kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod6f1c2d3e_0a1b_4c5d_8e9f_001122334455.slice",
            ]
        );
        assert_eq!(
            rel(&PodCgroups::new("/sys/fs/cgroup/-.slice"), UID).len(),
            6,
            "the root slice adds no prefix"
        );
    }

    #[test]
    fn pod_parents_are_kubepods_and_its_qos_levels_for_both_drivers() {
        let cgroups = PodCgroups::new("/sys/fs/cgroup/kubelet.slice");
        let parents: Vec<String> = cgroups
            .parent_candidates()
            .iter()
            .map(|p| {
                p.strip_prefix(cgroups.root())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            parents,
            [
                "kubepods.slice/kubepods-burstable.slice",
                "kubepods.slice/kubepods-besteffort.slice",
                "kubepods.slice",
                "kubelet-kubepods.slice/kubelet-kubepods-burstable.slice",
                "kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice",
                "kubelet-kubepods.slice",
                "kubepods/burstable",
                "kubepods/besteffort",
                "kubepods",
            ]
        );
        // Every pod candidate sits right below one of them.
        for pod in cgroups.candidates(UID) {
            assert!(
                cgroups
                    .parent_candidates()
                    .contains(&pod.parent().unwrap().to_owned()),
                "{}",
                pod.display()
            );
        }
    }

    #[test]
    fn finds_the_pod_parents_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        let cgroups = PodCgroups::new(dir.path());
        assert_eq!(cgroups.parent_ids(), Vec::<u64>::new());
        std::fs::create_dir_all(dir.path().join("kubepods/besteffort")).unwrap();
        let mut expected = vec![
            host::cgroup_id(&dir.path().join("kubepods/besteffort")).unwrap(),
            host::cgroup_id(&dir.path().join("kubepods")).unwrap(),
        ];
        let mut found = cgroups.parent_ids();
        expected.sort();
        found.sort();
        assert_eq!(found, expected);
    }

    #[test]
    fn refuses_uids_that_are_not_uuids() {
        let cgroups = PodCgroups::new("/sys/fs/cgroup");
        for uid in ["", "../../etc", "ABC", "a/b", "pod 1"] {
            assert_eq!(cgroups.candidates(uid), Vec::<PathBuf>::new(), "{uid:?}");
        }
    }

    #[test]
    fn finds_the_directory_that_exists_and_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        let cgroups = PodCgroups::new(dir.path());
        assert_eq!(cgroups.find(UID), None);
        let pod = dir
            .path()
            .join("kubepods/besteffort")
            .join(format!("pod{UID}"));
        std::fs::create_dir_all(&pod).unwrap();
        assert_eq!(
            cgroups.find(UID),
            Some(PodCgroup {
                id: host::cgroup_id(&pod).unwrap(),
                dir: pod,
            })
        );
    }
}
