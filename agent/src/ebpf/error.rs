//! Errors of the eBPF loader, phrased so an operator knows what to change on the node.

use std::{io, path::PathBuf};

/// Why loading, attaching or using the redirect programs failed.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "kernel {release} charges eBPF maps to RLIMIT_MEMLOCK (kernels before 5.11 do) and the agent \
         cannot lift that limit: {source}; grant the agent CAP_SYS_RESOURCE (the DaemonSet overlay \
         deploy/overlays/kernel-before-5.11 adds it)"
    )]
    MemlockLimit { release: String, source: nix::Error },
    #[error(
        "{} cgroup map update(s) failed, the others were applied (retried at the next sync): {}",
        failures.len(), failures.join("; ")
    )]
    CgroupSyncIncomplete {
        failures: Vec<String>,
        /// What was applied nonetheless, by map.
        applied: Vec<(super::CgroupRole, super::RoleChanges)>,
    },
    #[error(
        "cgroup v2 is not mounted on this host; mount it (`mount -t cgroup2 none /sys/fs/cgroup`) \
         or boot with systemd.unified_cgroup_hierarchy=1: the redirect programs attach to a cgroup v2 directory"
    )]
    Cgroup2NotMounted,
    #[error(
        "node cgroup {path} is not a cgroup v2 directory (cgroup2 is mounted at {cgroup2_mount}); \
         point the agent at the node's directory under that mount"
    )]
    NotACgroup2Dir {
        path: PathBuf,
        cgroup2_mount: PathBuf,
    },
    #[error("cannot open node cgroup {path}: {source}; create it or fix the configured path")]
    NodeCgroup { path: PathBuf, source: io::Error },
    #[error(
        "pin directory {dir} is not on a bpf filesystem ({mounted}); mount bpffs \
         (`mount -t bpf bpf /sys/fs/bpf`) and put the pin directory under it"
    )]
    BpffsNotMounted { dir: PathBuf, mounted: String },
    #[error("cannot prepare pin path {path} on bpffs: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "the kernel has no bpf() syscall (built without CONFIG_BPF_SYSCALL, or blocked by a seccomp \
         profile); sealmesh needs eBPF: use a kernel with CONFIG_BPF_SYSCALL=y and allow bpf() for the agent"
    )]
    BpfSyscallUnavailable,
    #[error(
        "the kernel refused {action}: permission denied; run the agent as root or with CAP_BPF, \
         CAP_NET_ADMIN and CAP_SYS_ADMIN (cgroup attach), and check that kernel.unprivileged_bpf_disabled \
         or a LSM policy does not block it ({source})"
    )]
    MissingPrivileges { action: String, source: io::Error },
    #[error(
        "{action} failed: the kernel does not support {requirement}; use a kernel with CONFIG_CGROUP_BPF=y, \
         Linux 5.7 or newer ({source})"
    )]
    KernelUnsupported {
        action: String,
        requirement: &'static str,
        source: io::Error,
    },
    #[error("the verifier rejected {program}: {source}\nverifier log:\n{log}")]
    Verifier {
        program: &'static str,
        source: io::Error,
        log: String,
    },
    #[error(
        "loading the BTF of the eBPF object failed: {0}; the kernel needs BTF support \
         (CONFIG_DEBUG_INFO_BTF=y, /sys/kernel/btf/vmlinux present)"
    )]
    Btf(#[source] aya::EbpfError),
    #[error(
        "pinned map {path} does not match this agent's layout (key {found_key}B/value {found_value}B/\
         {found_entries} entries, expected {expected_key}B/{expected_value}B/{expected_entries}); \
         something else pinned a map there: remove it"
    )]
    IncompatiblePinnedMap {
        path: PathBuf,
        found_key: u32,
        found_value: u32,
        found_entries: u32,
        expected_key: u32,
        expected_value: u32,
        expected_entries: u32,
    },
    #[error("cannot read this process's cgroup from /proc/self/cgroup: {0}")]
    OwnCgroup(#[source] io::Error),
    #[error(
        "refusing to mesh cgroup {cgroup_id}: the agent itself runs in it (or below it), so its own \
         connections would be redirected to itself; run the agent outside the pod cgroups"
    )]
    AgentCgroup { cgroup_id: u64 },
    #[error(
        "outbound listener {0} cannot be a redirect target: use the node's own IP (not 0.0.0.0 or \
         loopback, which a pod's network namespace would resolve to itself) and a non-zero port"
    )]
    InvalidListener(std::net::SocketAddrV4),
    #[error(
        "too many excluded {what}: {count}, at most {max} fit in the eBPF map; shorten the list"
    )]
    TooManyExclusions {
        what: &'static str,
        count: usize,
        max: u32,
    },
    #[error("eBPF map {map} is full ({max_entries} entries)")]
    MapFull { map: &'static str, max_entries: u32 },
    #[error(
        "the eBPF object has no {0}; the agent and its embedded object are out of sync: rebuild the agent"
    )]
    MissingObjectItem(&'static str),
    #[error("forwarding eBPF logs to tracing: {0}")]
    KernelLog(String),
    #[error("{action} failed: {source}")]
    Aya {
        action: String,
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl EbpfError {
    /// Wraps an aya error, recognising the failures that mean "this node lacks something" so
    /// the message says what to fix instead of quoting an errno.
    pub(crate) fn from_aya(
        action: impl Into<String>,
        error: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let action = action.into();
        match errno_in_chain(&error) {
            Some((libc::EPERM | libc::EACCES, io_error)) => Self::MissingPrivileges {
                action,
                source: io_error,
            },
            Some((libc::ENOSYS, _)) => Self::BpfSyscallUnavailable,
            _ => Self::Aya {
                action,
                source: Box::new(error),
            },
        }
    }

    /// Like [`EbpfError::from_aya`] for loading or attaching a program: EINVAL/EOPNOTSUPP
    /// without a verifier complaint means the kernel lacks the program or attach type.
    pub(crate) fn from_program(
        program: &'static str,
        requirement: &'static str,
        action: &str,
        error: aya::programs::ProgramError,
    ) -> Self {
        let action = format!("{action} {program}");
        if let aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } = &error
        {
            let log = verifier_log.to_string();
            let errno = io_error.raw_os_error();
            if matches!(errno, Some(libc::EPERM | libc::EACCES)) {
                return Self::MissingPrivileges {
                    action,
                    source: clone_io(io_error),
                };
            }
            if log.trim().is_empty() && matches!(errno, Some(libc::EINVAL | libc::EOPNOTSUPP)) {
                return Self::KernelUnsupported {
                    action,
                    requirement,
                    source: clone_io(io_error),
                };
            }
            return Self::Verifier {
                program,
                source: clone_io(io_error),
                log,
            };
        }
        match errno_in_chain(&error) {
            Some((libc::EINVAL | libc::EOPNOTSUPP, io_error)) => Self::KernelUnsupported {
                action,
                requirement,
                source: io_error,
            },
            _ => Self::from_aya(action, error),
        }
    }

    pub(crate) fn from_loader(error: aya::EbpfError) -> Self {
        match error {
            aya::EbpfError::BtfError(_) | aya::EbpfError::BtfRelocationError(_) => Self::Btf(error),
            other => Self::from_aya("loading the eBPF object", other),
        }
    }
}

/// The first io::Error in an error's source chain, with its errno (copied: io::Error is not Clone).
fn errno_in_chain(error: &(dyn std::error::Error + 'static)) -> Option<(i32, io::Error)> {
    let mut current = Some(error);
    while let Some(err) = current {
        if let Some(io_error) = err.downcast_ref::<io::Error>()
            && let Some(errno) = io_error.raw_os_error()
        {
            return Some((errno, io::Error::from_raw_os_error(errno)));
        }
        current = err.source();
    }
    None
}

fn clone_io(error: &io::Error) -> io::Error {
    match error.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(error.kind(), error.to_string()),
    }
}
