//! Loads the redirect programs (agent-ebpf) at the node's cgroup and exposes their maps.
//!
//! Design, and why:
//! - `cgroup/connect4` runs in the connecting task's context, so the source pod is the cgroup the
//!   kernel reports for that task (or its nearest meshed ancestor, so a pod's child cgroups count
//!   as the pod) — never an IP a pod could spoof. It rewrites the destination to the agent's
//!   outbound listener and records the original destination under the socket cookie.
//! - The programs classify the connecting task once per connect from four pinned cgroup maps the
//!   agent keeps ([`CgroupRole`]): the host (not below a pod parent cgroup), the agent itself, or
//!   a pod (the first cgroup below the deepest pod parent) that is meshed, unmeshed, or not known
//!   to the agent yet. Meshed and unknown pods are redirected (the record says which); the agent
//!   fills every map before it attaches anything. `cgroup/connect6` does the same for
//!   IPv4-mapped destinations of dual-stack sockets, which never pass connect4 and would
//!   otherwise bypass the mesh.
//! - The agent only learns the 4-tuple on accept, so `sock_ops` moves the record, once the
//!   client side is established, to a map keyed by (client ip:port, listener ip:port), which
//!   [`RedirectTable::take`] reads and deletes. A state callback deletes records of connections
//!   that die before the agent collected them; both redirect maps are LRU as a last bound.
//! - Programs attach as bpf links at the node cgroup. The kernel always attaches links in
//!   multi-program mode (what `BPF_F_ALLOW_MULTI` means for legacy attach), so they coexist with
//!   other cgroup programs (CNI, a previous agent) instead of replacing them.
//! - Hitless restarts: the maps holding state (meshed pods, pending redirects) are pinned under
//!   `<bpffs_dir>/maps-v<ABI>` and reused by the next agent; the links are pinned under
//!   `<bpffs_dir>/links` and survive the agent. A starting agent attaches its own programs first
//!   and then atomically renames its link pins over the previous ones, which detaches the old
//!   programs — no connect escapes redirection while agents change. Dropping a [`Redirector`]
//!   therefore keeps redirecting (connections fail closed while no agent listens);
//!   [`Redirector::uninstall`] detaches everything when sealmesh leaves the node.
//! - Exclusions (ports, CIDRs) and the listener address are per program instance (an unpinned
//!   map and load-time globals): each agent brings its own configuration.
//! - Sockmap acceleration (optional): both sockets of the pod <-> agent hop live on this kernel,
//!   so `sock_ops` puts them in a sockhash keyed by the tuple each socket sees and an `sk_msg`
//!   program attached to that map moves every message straight into the peer socket's receive
//!   queue, skipping the TCP/IP stack both ways. The kernel drops sockets from the map when they
//!   close. A sender whose peer is not in the map yet passes through TCP and stays there (bytes
//!   in both queues could be read out of order otherwise). The map is pinned: sockets keep the
//!   sk_msg program they got when added, so connections of a replaced agent stay accelerated,
//!   and the new agent's program (attached before its sock_ops) serves new ones. An agent with
//!   acceleration off neither attaches sk_msg nor adds sockets. By default the agent first probes
//!   the kernel ([`acceleration::probe`]) and stays off where pod sockets in a sockhash would
//!   misbehave: on Linux 6.18 a blocking read on a sockhash socket returns EAGAIN when woken
//!   without data (`tcp_bpf_recvmsg` waits once instead of looping), which ordinary pod apps do
//!   not expect, and redirected bytes bypass the receiver's rcvbuf limit (only the host's TCP
//!   memory bounds them).
//! - `getpeername`: a redirected pod socket's peer is the agent's listener; `cgroup/getpeername4`
//!   (and 6, for dual-stack sockets) reports the original destination instead, from a per-cookie
//!   record connect4 writes and sock_ops deletes when the socket closes (LRU as a last bound).
//! - Strict inbound (`strict`): a `cgroup_skb/ingress` program drops SYNs to strict pods unless
//!   the host or the agent made the connection (marked at connect, moved to the 4-tuple by
//!   sock_ops before the SYN leaves) or the pod's authorization policies admit the plaintext
//!   source on that port (an LPM trie of (pod, port, source network)); its maps and refusal
//!   ring buffer are pinned like the rest.
#![forbid(unsafe_code)]

pub mod acceleration;
mod error;
mod kernel_log;
mod strict;

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use agent_ebpf::{
    ConnectionKey, MAP_ABI_VERSION, RedirectRecord, SocketTuple, StrictPodCounters, capacity,
    names, record_source,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, Map, MapData, MapError, MapInfo, SockHash, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, SkMsg,
        SockOps,
        links::{FdLink, LinkError},
    },
};
use ipnet::Ipv4Net;
use nix::sys::{
    resource::{RLIM_INFINITY, Resource, setrlimit},
    statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs},
};
use sealmesh_common::host;

use self::acceleration::{AccelerationChoice, KernelLimit};
pub use self::error::EbpfError;
pub use self::kernel_log::KERNEL_LOG_TARGET;
use self::kernel_log::{KernelLogForwarder, kernel_log_level};
pub use self::strict::RefusalRing;
use self::strict::StrictInboundMaps;

/// The programs, built for the bpf target by build.rs.
static REDIRECT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sealmesh-redirect"));

const CONNECT4_REQUIREMENT: &str = "cgroup/connect4 programs with bpf links";
const CONNECT6_REQUIREMENT: &str = "cgroup/connect6 programs with bpf links";
const SOCK_OPS_REQUIREMENT: &str = "sock_ops programs with bpf links";
const GETPEERNAME_REQUIREMENT: &str = "cgroup/getpeername programs with bpf links (Linux 5.8+)";
const SK_MSG_REQUIREMENT: &str = "sk_msg programs on a sockhash";
const CGROUP_SKB_REQUIREMENT: &str = "cgroup_skb programs with bpf links";

/// Programs attached at the node cgroup, in attach order (see [`Redirector::load`]).
const CGROUP_PROGRAMS: [&str; 6] = [
    names::SOCK_OPS_PROGRAM,
    names::GETPEERNAME4_PROGRAM,
    names::GETPEERNAME6_PROGRAM,
    names::CONNECT4_PROGRAM,
    names::CONNECT6_PROGRAM,
    names::STRICT_INBOUND_PROGRAM,
];

/// Where and how to redirect meshed pods' connections on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// The node's cgroup v2 directory; every pod cgroup of the node is below it.
    pub node_cgroup: PathBuf,
    /// This node's pin directory on bpffs, e.g. `/sys/fs/bpf/sealmesh/<node>`.
    pub bpffs_dir: PathBuf,
    /// The agent's outbound listener, `<node IP>:OUTBOUND_PORT`.
    pub listener: SocketAddrV4,
    /// Destination ports never redirected.
    pub excluded_ports: Vec<u16>,
    /// Destination networks never redirected.
    pub excluded_cidrs: Vec<Ipv4Net>,
    /// Whether to move pod <-> agent payload between the two sockets with sk_msg instead of
    /// TCP/IP (decided before loading, by [`AccelerationChoice::decide`]).
    pub sockmap_acceleration: AccelerationChoice,
    /// Cgroups whose descendants are pods ([`CgroupRole::PodParent`]), in the maps before the
    /// programs attach; kept current afterwards through [`CgroupRoles`].
    pub pod_parent_cgroups: Vec<u64>,
    /// The node's meshed and unmeshed pods known at start, in the maps before the programs
    /// attach (a first agent would otherwise redirect every pod as unknown until its first sync).
    pub meshed_pods: Vec<u64>,
    pub unmeshed_pods: Vec<u64>,
    /// The agent's cgroups besides the one it runs in (which the redirector adds itself), e.g.
    /// its pod's cgroup in Kubernetes mode ([`CgroupRole::Agent`]).
    pub agent_cgroups: Vec<u64>,
}

/// What connect4 recorded about an accepted redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// Where the pod connected to (a pod IP or a Service VIP).
    pub original_dst: SocketAddrV4,
    /// The pod cgroup the connecting task belonged to, as the kernel reported it.
    pub source_cgroup: u64,
    pub source: RedirectSource,
}

/// What the kernel knew about the source pod when it redirected the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectSource {
    /// Its cgroup was in the meshed-pod map.
    MeshedPod,
    /// Its cgroup was in none of the agent's maps: a pod the agent had not classified yet (just
    /// started, or its cgroup not seen yet). Resolve it before routing.
    UnknownPod,
}

/// The outbound listener's view of the redirect records.
pub trait RedirectTable: Send + Sync + 'static {
    /// Takes (reads and deletes) the record of an accepted redirected connection; None = not redirected.
    fn take(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<Redirect>;
}

/// What a cgroup id means to the connect programs; each role is one pinned map (ids =
/// `sealmesh_common::host::cgroup_id` of the cgroup directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CgroupRole {
    /// A meshed pod's cgroup: its tasks' connections are redirected (`MESHED_PODS`).
    MeshedPod,
    /// A pod the agent knows that is not meshed: its tasks connect directly (`UNMESHED_PODS`).
    UnmeshedPod,
    /// A cgroup whose descendants are pods (`POD_PARENT_CGROUPS`).
    PodParent,
    /// One of the agent's own cgroups: its tasks are never a pod (`AGENT_CGROUPS`).
    Agent,
}

impl CgroupRole {
    /// Every role, in declaration order (which indexes the redirector's maps).
    pub const ALL: [Self; 4] = [
        Self::MeshedPod,
        Self::UnmeshedPod,
        Self::PodParent,
        Self::Agent,
    ];

    pub fn map_name(self) -> &'static str {
        match self {
            Self::MeshedPod => names::MESHED_PODS,
            Self::UnmeshedPod => names::UNMESHED_PODS,
            Self::PodParent => names::POD_PARENT_CGROUPS,
            Self::Agent => names::AGENT_CGROUPS,
        }
    }

    fn capacity(self) -> u32 {
        match self {
            Self::MeshedPod => capacity::MESHED_PODS,
            Self::UnmeshedPod => capacity::UNMESHED_PODS,
            Self::PodParent => capacity::POD_PARENT_CGROUPS,
            Self::Agent => capacity::AGENT_CGROUPS,
        }
    }

    /// What the role is called in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::MeshedPod => "meshed pod",
            Self::UnmeshedPod => "unmeshed pod",
            Self::PodParent => "pod parent",
            Self::Agent => "agent",
        }
    }
}

/// The cgroup maps the connect programs classify tasks with.
pub trait CgroupRoles: Send + Sync {
    fn insert(&self, role: CgroupRole, cgroup_id: u64) -> Result<(), EbpfError>;
    fn remove(&self, role: CgroupRole, cgroup_id: u64) -> Result<(), EbpfError>;
    fn ids(&self, role: CgroupRole) -> Result<Vec<u64>, EbpfError>;
}

/// What [`sync_roles`] changed in one map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleChanges {
    pub added: Vec<u64>,
    pub removed: Vec<u64>,
}

/// Makes the map of each role hold exactly the ids given for it. Every addition comes before
/// every removal, so a cgroup moving between roles (a pod becoming meshed, unmeshed) is never in
/// none of them on the way: the programs never see a known pod as unknown. One failed update
/// does not stop the others ([`EbpfError::CgroupSyncIncomplete`] says what failed and what was
/// applied); a cgroup whose addition failed keeps its old role until the next sync.
pub fn sync_roles(
    roles: &dyn CgroupRoles,
    wanted: &[(CgroupRole, BTreeSet<u64>)],
) -> Result<Vec<(CgroupRole, RoleChanges)>, EbpfError> {
    let mut changes = Vec::with_capacity(wanted.len());
    for (role, ids) in wanted {
        let present: BTreeSet<u64> = roles.ids(*role)?.into_iter().collect();
        changes.push((
            *role,
            RoleChanges {
                added: ids.difference(&present).copied().collect(),
                removed: present.difference(ids).copied().collect(),
            },
        ));
    }
    let mut failures = Vec::new();
    let mut not_added = BTreeSet::new();
    let mut applied: Vec<(CgroupRole, RoleChanges)> = Vec::with_capacity(changes.len());
    for (role, change) in &changes {
        let mut done = RoleChanges::default();
        for &id in &change.added {
            match roles.insert(*role, id) {
                Ok(()) => done.added.push(id),
                Err(error) => {
                    failures.push(format!(
                        "adding cgroup {id} as {}: {error}",
                        role.describe()
                    ));
                    not_added.insert(id);
                }
            }
        }
        applied.push((*role, done));
    }
    for ((role, change), (_, done)) in changes.iter().zip(&mut applied) {
        for &id in change.removed.iter().filter(|id| !not_added.contains(id)) {
            match roles.remove(*role, id) {
                Ok(()) => done.removed.push(id),
                Err(error) => {
                    failures.push(format!(
                        "removing cgroup {id} as {}: {error}",
                        role.describe()
                    ));
                }
            }
        }
    }
    if failures.is_empty() {
        Ok(applied)
    } else {
        Err(EbpfError::CgroupSyncIncomplete { failures, applied })
    }
}

/// A snapshot of the redirect datapath for admin/metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EbpfStatus {
    /// Programs whose link is pinned (and so attached) at the node cgroup.
    pub attached_programs: Vec<&'static str>,
    pub meshed_pods: usize,
    pub unmeshed_pods: usize,
    pub pod_parent_cgroups: usize,
    pub agent_cgroups: usize,
    /// Redirected sockets that are not established yet.
    pub pending_connects: usize,
    /// Established redirected connections the agent has not taken yet.
    pub pending_accepts: usize,
    /// Open redirected pod sockets whose original destination getpeername reports.
    pub original_destinations: usize,
    /// Whether this agent attached the sk_msg program; None when read from pins (the
    /// attachment belongs to a running agent, not to a pin).
    pub sockmap_acceleration: Option<bool>,
    /// What kept `--sockmap-acceleration auto` off on this kernel (empty otherwise).
    pub sockmap_acceleration_limits: Vec<KernelLimit>,
    /// Sockets (two per pod <-> agent connection) in the sockhash.
    pub accelerated_sockets: usize,
    /// Pods whose inbound policy the kernel enforces as strict.
    pub strict_pods: usize,
    /// Open connections from the host or the agent to strict pods.
    pub trusted_connections: usize,
    /// (port, network) regions of the plaintext that strict pods' authorization policies admit.
    pub plaintext_access_entries: usize,
    pub pin_dir: PathBuf,
}

/// The loaded and attached redirect programs and their maps.
pub struct Redirector {
    pins: PinLayout,
    /// The agent's own cgroup and its ancestors: never meshed, or the agent's outbound
    /// connections would be redirected to itself.
    own_cgroups: Vec<u64>,
    /// One map per [`CgroupRole`], in [`CgroupRole::ALL`] order.
    cgroup_maps: [Mutex<HashMap<MapData, u64, u8>>; 4],
    by_connection: Mutex<HashMap<MapData, ConnectionKey, RedirectRecord>>,
    by_cookie: HashMap<MapData, u64, RedirectRecord>,
    original_dsts: HashMap<MapData, u64, RedirectRecord>,
    accelerated_sockets: SockHash<MapData, SocketTuple>,
    excluded_cidrs: Mutex<ExcludedCidrs>,
    sockmap_acceleration: AccelerationChoice,
    strict: StrictInboundMaps,
    links: Vec<AttachedLink>,
    _kernel_log: KernelLogForwarder,
    /// Keeps the programs and the per-instance exclusion maps loaded.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("pin_dir", &self.pins.root)
            .field(
                "links",
                &self.links.iter().map(|link| &link.pin).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

struct AttachedLink {
    program: &'static str,
    pin: PathBuf,
    /// Holding the fd keeps the link attached even after a newer agent replaced the pin.
    _link: FdLink,
}

impl Redirector {
    /// Loads the programs, reuses or creates the pinned maps, attaches at the node cgroup and
    /// pins the links, replacing those of a previous agent.
    pub fn load(cfg: &RedirectConfig) -> Result<Self, EbpfError> {
        check_listener(cfg.listener)?;
        check_exclusion_count("ports", cfg.excluded_ports.len(), capacity::EXCLUDED_PORTS)?;
        check_exclusion_count("CIDRs", cfg.excluded_cidrs.len(), capacity::EXCLUDED_CIDRS)?;
        let node_cgroup = open_node_cgroup(&cfg.node_cgroup)?;
        let own_cgroups = own_cgroup_ids()?;
        let mut agent_cgroups: BTreeSet<u64> = cfg.agent_cgroups.iter().copied().collect();
        agent_cgroups.extend(own_cgroups.first());
        let pins = PinLayout::prepare(&cfg.bpffs_dir)?;
        let accelerate = cfg.sockmap_acceleration.on;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pins.maps)
            .override_global(names::LISTENER_IP4, &u32::from(*cfg.listener.ip()), true)
            .override_global(names::LISTENER_PORT, &cfg.listener.port(), true)
            .override_global(names::SOCKMAP_ACCELERATION, &u8::from(accelerate), true)
            .override_global(aya_log::LEVEL, &kernel_log_level(), false)
            .load(REDIRECT_OBJECT)
            .map_err(EbpfError::from_loader)?;
        let kernel_log = KernelLogForwarder::start(&mut ebpf)?;
        fill_exclusions(&mut ebpf, cfg)?;
        let excluded_cidrs = ExcludedCidrs::take(&mut ebpf, &cfg.excluded_cidrs)?;
        let cgroup_maps = CgroupRole::ALL.map(|role| {
            take_pinned_map(&mut ebpf, &pins, role.map_name(), role.capacity()).map(Mutex::new)
        });
        let [meshed, unmeshed, parents, agent] = cgroup_maps;
        let cgroup_maps = [meshed?, unmeshed?, parents?, agent?];
        let by_cookie = take_pinned_map(
            &mut ebpf,
            &pins,
            names::REDIRECT_BY_COOKIE,
            capacity::REDIRECT_BY_COOKIE,
        )?;
        let by_connection = take_pinned_map(
            &mut ebpf,
            &pins,
            names::REDIRECT_BY_CONNECTION,
            capacity::REDIRECT_BY_CONNECTION,
        )?;
        let original_dsts = take_pinned_map(
            &mut ebpf,
            &pins,
            names::ORIGINAL_DST_BY_COOKIE,
            capacity::ORIGINAL_DST_BY_COOKIE,
        )?;
        let accelerated_sockets = take_pinned_sockhash(&mut ebpf, &pins)?;
        let strict = StrictInboundMaps::take(&mut ebpf, &pins)?;

        // The agent before the pods and pod parents, so that a starting agent below a pod
        // parent is never taken for a pod; all before anything attaches, so that the programs
        // classify tasks correctly from their first connect. Pinned maps may hold a previous
        // agent's entries: they are replaced.
        let roles = PinnedCgroupRoles {
            own_cgroups: &own_cgroups,
            maps: &cgroup_maps,
        };
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<u64>>();
        sync_roles(&roles, &[(CgroupRole::Agent, agent_cgroups)])?;
        sync_roles(
            &roles,
            &[
                (CgroupRole::MeshedPod, set(&cfg.meshed_pods)),
                (CgroupRole::UnmeshedPod, set(&cfg.unmeshed_pods)),
                (CgroupRole::PodParent, set(&cfg.pod_parent_cgroups)),
            ],
        )?;

        // sk_msg before sock_ops: a socket added to the sockhash gets the program attached at
        // that moment. Then sock_ops, since a connect redirected before it runs would reach the
        // agent without a record and be refused; getpeername before connect, so that every
        // redirected socket reports its original peer.
        if accelerate {
            let program: &mut SkMsg = program_mut(&mut ebpf, names::SK_MSG_PROGRAM)?;
            program.load().map_err(|error| {
                EbpfError::from_program(names::SK_MSG_PROGRAM, SK_MSG_REQUIREMENT, "loading", error)
            })?;
            // Stays attached while the object lives (aya detaches on drop); sockets added
            // meanwhile keep the program after that.
            program.attach(accelerated_sockets.fd()).map_err(|error| {
                EbpfError::from_program(
                    names::SK_MSG_PROGRAM,
                    SK_MSG_REQUIREMENT,
                    "attaching",
                    error,
                )
            })?;
        }
        let mut links = Vec::with_capacity(CGROUP_PROGRAMS.len());
        for name in CGROUP_PROGRAMS {
            // The strict-inbound program last: it relies on the others marking trusted connects
            // (until then a previous agent's programs do, on the same pinned maps).
            let link = if name == names::SOCK_OPS_PROGRAM {
                attach_and_pin::<SockOps>(
                    &mut ebpf,
                    &node_cgroup,
                    &pins,
                    name,
                    SOCK_OPS_REQUIREMENT,
                )?
            } else if name == names::STRICT_INBOUND_PROGRAM {
                attach_and_pin::<CgroupSkb>(
                    &mut ebpf,
                    &node_cgroup,
                    &pins,
                    name,
                    CGROUP_SKB_REQUIREMENT,
                )?
            } else {
                let requirement = match name {
                    names::CONNECT4_PROGRAM => CONNECT4_REQUIREMENT,
                    names::CONNECT6_PROGRAM => CONNECT6_REQUIREMENT,
                    _ => GETPEERNAME_REQUIREMENT,
                };
                attach_and_pin::<CgroupSockAddr>(&mut ebpf, &node_cgroup, &pins, name, requirement)?
            };
            links.push(link);
        }
        tracing::info!(
            node_cgroup = %cfg.node_cgroup.display(),
            listener = %cfg.listener,
            pin_dir = %pins.root.display(),
            sockmap_acceleration = accelerate,
            "eBPF redirect programs attached"
        );

        Ok(Self {
            pins,
            own_cgroups,
            cgroup_maps,
            by_connection: Mutex::new(by_connection),
            by_cookie,
            original_dsts,
            accelerated_sockets,
            excluded_cidrs: Mutex::new(excluded_cidrs),
            sockmap_acceleration: cfg.sockmap_acceleration.clone(),
            strict,
            links,
            _kernel_log: kernel_log,
            _ebpf: ebpf,
        })
    }

    /// Makes the destination networks never redirected exactly `cidrs`, for
    /// connections from now on (e.g. the identity service's new address when
    /// its endpoint moves: the old one may become a meshed pod's).
    pub fn replace_excluded_cidrs(&self, cidrs: &[Ipv4Net]) -> Result<(), EbpfError> {
        lock(&self.excluded_cidrs).replace(cidrs)
    }

    /// Programs whose link is pinned (and so attached) at the node cgroup:
    /// one stat per program, no map walk, no lock (readiness probes call it).
    pub fn attached_programs(&self) -> Vec<&'static str> {
        self.links
            .iter()
            .filter(|link| link.pin.exists())
            .map(|link| link.program)
            .collect()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.root
    }

    /// Entry counts: walks every map key by key, so callers run it off the
    /// runtime's workers. The accept path's map is read through its own
    /// handle, never under the lock each accepted connection takes.
    pub fn status(&self) -> EbpfStatus {
        EbpfStatus {
            attached_programs: self.attached_programs(),
            meshed_pods: self.count(CgroupRole::MeshedPod),
            unmeshed_pods: self.count(CgroupRole::UnmeshedPod),
            pod_parent_cgroups: self.count(CgroupRole::PodParent),
            agent_cgroups: self.count(CgroupRole::Agent),
            pending_connects: self.by_cookie.keys().filter(Result::is_ok).count(),
            pending_accepts: count_pinned::<ConnectionKey, RedirectRecord>(
                &self.pins,
                names::REDIRECT_BY_CONNECTION,
            )
            .unwrap_or_else(|error| {
                tracing::debug!(%error, "counting pending accepts failed");
                0
            }),
            original_destinations: self.original_dsts.keys().filter(Result::is_ok).count(),
            sockmap_acceleration: Some(self.sockmap_acceleration.on),
            sockmap_acceleration_limits: self.sockmap_acceleration.limits.clone(),
            accelerated_sockets: self
                .accelerated_sockets
                .keys()
                .filter(Result::is_ok)
                .count(),
            strict_pods: self.strict.strict_pod_count(),
            trusted_connections: self.strict.trusted_connection_count(),
            plaintext_access_entries: self.strict.plaintext_entry_count(),
            pin_dir: self.pins.root.clone(),
        }
    }

    /// Entry counts from a node's pins, without loading anything: works while no agent runs
    /// (operators inspecting a node, tests checking for leaked records).
    pub fn pinned_status(bpffs_dir: &Path) -> Result<EbpfStatus, EbpfError> {
        let pins = PinLayout::at(bpffs_dir);
        Ok(EbpfStatus {
            attached_programs: CGROUP_PROGRAMS
                .into_iter()
                .filter(|program| pins.links.join(program).exists())
                .collect(),
            meshed_pods: count_pinned::<u64, u8>(&pins, names::MESHED_PODS)?,
            unmeshed_pods: count_pinned::<u64, u8>(&pins, names::UNMESHED_PODS)?,
            pod_parent_cgroups: count_pinned::<u64, u8>(&pins, names::POD_PARENT_CGROUPS)?,
            agent_cgroups: count_pinned::<u64, u8>(&pins, names::AGENT_CGROUPS)?,
            pending_connects: count_pinned::<u64, RedirectRecord>(
                &pins,
                names::REDIRECT_BY_COOKIE,
            )?,
            pending_accepts: count_pinned::<ConnectionKey, RedirectRecord>(
                &pins,
                names::REDIRECT_BY_CONNECTION,
            )?,
            original_destinations: count_pinned::<u64, RedirectRecord>(
                &pins,
                names::ORIGINAL_DST_BY_COOKIE,
            )?,
            sockmap_acceleration: None,
            sockmap_acceleration_limits: Vec::new(),
            accelerated_sockets: count_pinned_sockets(&pins)?,
            strict_pods: count_pinned::<u64, StrictPodCounters>(&pins, names::STRICT_PODS)?,
            trusted_connections: count_pinned::<SocketTuple, u8>(
                &pins,
                names::TRUSTED_CONNECTIONS,
            )?,
            plaintext_access_entries: strict::count_pinned_plaintext_entries(&pins)?,
            pin_dir: pins.root,
        })
    }

    /// Detaches the programs and deletes this node's pins (links, maps, and the pin directory
    /// when it is left empty): for removing sealmesh from a node. A plain drop keeps redirecting.
    pub fn uninstall(self) -> Result<(), EbpfError> {
        let root = self.pins.root.clone();
        Self::remove_pins(&root)?;
        // Closing our link fds is what detaches the programs, now that no pin holds them.
        drop(self);
        Ok(())
    }

    /// Deletes the pins under `bpffs_dir` (every link, this ABI's maps, and the directories
    /// left empty), so the programs detach once no process holds them: at once when no agent
    /// runs, else when the agents holding them exit. For removing sealmesh from a node.
    pub fn remove_pins(bpffs_dir: &Path) -> Result<(), EbpfError> {
        let pins = PinLayout::at(bpffs_dir);
        match fs::read_dir(&pins.links) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    remove_pin(&entry.path())?;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(EbpfError::PinDir {
                    path: pins.links.clone(),
                    source,
                });
            }
        }
        for map in [
            names::MESHED_PODS,
            names::UNMESHED_PODS,
            names::POD_PARENT_CGROUPS,
            names::AGENT_CGROUPS,
            names::REDIRECT_BY_COOKIE,
            names::REDIRECT_BY_CONNECTION,
            names::ORIGINAL_DST_BY_COOKIE,
            names::ACCELERATED_SOCKETS,
            names::TCP_ONLY_SENDERS,
            names::STRICT_PODS,
            names::STRICT_POD_ADDRESSES,
            names::TRUSTED_SOCKETS,
            names::TRUSTED_CONNECTIONS,
            names::REFUSED_FLOWS,
            names::INBOUND_REFUSALS,
            names::PLAINTEXT_ACCESS,
        ] {
            remove_pin(&pins.maps.join(map))?;
        }
        // Left only by an agent that died while probing.
        let _ = fs::remove_dir_all(&pins.acceleration_probe);
        for dir in [pins.maps, pins.links, pins.root] {
            match fs::remove_dir(&dir) {
                // Another ABI version's maps or another node's files: not ours to delete.
                Err(error) if error.raw_os_error() == Some(libc::ENOTEMPTY) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(EbpfError::PinDir { path: dir, source }),
                Ok(()) => {}
            }
        }
        Ok(())
    }
}

impl RedirectTable for Redirector {
    fn take(&self, client: SocketAddrV4, listener: SocketAddrV4) -> Option<Redirect> {
        let key = ConnectionKey::from_addrs(client, listener);
        let mut by_connection = lock(&self.by_connection);
        let record = match by_connection.get(&key, 0) {
            Ok(record) => record,
            Err(MapError::KeyNotFound) => return None,
            Err(error) => {
                tracing::warn!(%client, %listener, %error, "reading the redirect record failed; treating the connection as not redirected");
                return None;
            }
        };
        match by_connection.remove(&key) {
            // sock_ops deleted it meanwhile (the client reset): the record is still valid.
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(error) => {
                tracing::warn!(%client, %listener, %error, "deleting a taken redirect record failed; the LRU map will evict it")
            }
        }
        Some(Redirect {
            original_dst: record.original_dst(),
            source_cgroup: record.source_cgroup,
            source: match record.source {
                record_source::MESHED_POD => RedirectSource::MeshedPod,
                // Anything else must be resolved before it is trusted.
                _ => RedirectSource::UnknownPod,
            },
        })
    }
}

impl Redirector {
    fn count(&self, role: CgroupRole) -> usize {
        lock(&self.cgroup_maps[role as usize])
            .keys()
            .filter(Result::is_ok)
            .count()
    }

    fn roles(&self) -> PinnedCgroupRoles<'_> {
        PinnedCgroupRoles {
            own_cgroups: &self.own_cgroups,
            maps: &self.cgroup_maps,
        }
    }

    /// Adds `agent_cgroups` to the agent map of the maps a previous agent pinned under
    /// `bpffs_dir`, if there are any. A starting agent calls this before it opens any
    /// connection: until it has loaded its own programs, the previous agent's classify its
    /// tasks, and an agent whose cgroup is below a pod parent would otherwise be taken for a pod
    /// nobody knows yet.
    pub fn admit_agent(bpffs_dir: &Path, agent_cgroups: &[u64]) -> Result<(), EbpfError> {
        let pin = PinLayout::at(bpffs_dir).maps.join(names::AGENT_CGROUPS);
        let data = match MapData::from_pin(&pin) {
            Ok(data) => data,
            // No agent of this map version ran on the node: nothing classifies tasks yet.
            Err(_) if !pin.exists() => return Ok(()),
            Err(error) => {
                return Err(EbpfError::from_aya(
                    format!("opening pinned map {}", pin.display()),
                    error,
                ));
            }
        };
        let mut map: HashMap<MapData, u64, u8> = HashMap::try_from(Map::HashMap(data))
            .map_err(|error| EbpfError::from_aya(format!("opening {}", pin.display()), error))?;
        for &id in agent_cgroups {
            map.insert(id, 1, 0).map_err(|error| {
                EbpfError::from_aya(
                    format!("adding agent cgroup {id} to {}", pin.display()),
                    error,
                )
            })?;
        }
        Ok(())
    }
}

impl CgroupRoles for Redirector {
    fn insert(&self, role: CgroupRole, cgroup_id: u64) -> Result<(), EbpfError> {
        self.roles().insert(role, cgroup_id)
    }

    fn remove(&self, role: CgroupRole, cgroup_id: u64) -> Result<(), EbpfError> {
        self.roles().remove(role, cgroup_id)
    }

    fn ids(&self, role: CgroupRole) -> Result<Vec<u64>, EbpfError> {
        self.roles().ids(role)
    }
}

/// The cgroup maps, with the rule that the agent's own cgroups are never meshed.
struct PinnedCgroupRoles<'a> {
    own_cgroups: &'a [u64],
    maps: &'a [Mutex<HashMap<MapData, u64, u8>>; 4],
}

impl CgroupRoles for PinnedCgroupRoles<'_> {
    fn insert(&self, role: CgroupRole, cgroup_id: u64) -> Result<(), EbpfError> {
        if role == CgroupRole::MeshedPod && self.own_cgroups.contains(&cgroup_id) {
            return Err(EbpfError::AgentCgroup { cgroup_id });
        }
        lock(&self.maps[role as usize])
            .insert(cgroup_id, 1, 0)
            .map_err(|error| {
                EbpfError::from_aya(
                    format!("adding cgroup {cgroup_id} as {}", role.describe()),
                    error,
                )
            })
    }

    fn remove(&self, role: CgroupRole, cgroup_id: u64) -> Result<(), EbpfError> {
        match lock(&self.maps[role as usize]).remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(error) => Err(EbpfError::from_aya(
                format!("removing {} cgroup {cgroup_id}", role.describe()),
                error,
            )),
        }
    }

    fn ids(&self, role: CgroupRole) -> Result<Vec<u64>, EbpfError> {
        lock(&self.maps[role as usize])
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| {
                EbpfError::from_aya(format!("listing {} cgroups", role.describe()), error)
            })
    }
}

/// The maps hold no invariant a panicking holder could break, so a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The programs send meshed connects to this exact address, so it must be a concrete one.
fn check_listener(listener: SocketAddrV4) -> Result<(), EbpfError> {
    if listener.ip().is_unspecified() || listener.ip().is_loopback() || listener.port() == 0 {
        return Err(EbpfError::InvalidListener(listener));
    }
    Ok(())
}

fn check_exclusion_count(what: &'static str, count: usize, max: u32) -> Result<(), EbpfError> {
    if count > max as usize {
        return Err(EbpfError::TooManyExclusions { what, count, max });
    }
    Ok(())
}

fn open_node_cgroup(path: &Path) -> Result<File, EbpfError> {
    let cgroup2_mount = host::cgroup2_mount().ok_or(EbpfError::Cgroup2NotMounted)?;
    let not_cgroup2 = || EbpfError::NotACgroup2Dir {
        path: path.to_owned(),
        cgroup2_mount: cgroup2_mount.clone(),
    };
    let fs = statfs(path).map_err(|errno| EbpfError::NodeCgroup {
        path: path.to_owned(),
        source: errno.into(),
    })?;
    if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
        return Err(not_cgroup2());
    }
    File::open(path).map_err(|source| EbpfError::NodeCgroup {
        path: path.to_owned(),
        source,
    })
}

/// Ids of the cgroup v2 this process runs in and of its ancestors.
fn own_cgroup_ids() -> Result<Vec<u64>, EbpfError> {
    let cgroup2_mount = host::cgroup2_mount().ok_or(EbpfError::Cgroup2NotMounted)?;
    let own = fs::read_to_string("/proc/self/cgroup").map_err(EbpfError::OwnCgroup)?;
    // The cgroup v2 line is "0::<path>" (also on hybrid hosts).
    let path = own
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| {
            EbpfError::OwnCgroup(io::Error::other("no cgroup v2 entry in /proc/self/cgroup"))
        })?;
    let own_dir = cgroup2_mount.join(path.trim_start_matches('/'));
    own_dir
        .ancestors()
        .take_while(|dir| dir.starts_with(&cgroup2_mount))
        .map(|dir| host::cgroup_id(dir).map_err(EbpfError::OwnCgroup))
        .collect()
}

/// This node's pin paths on bpffs.
struct PinLayout {
    root: PathBuf,
    maps: PathBuf,
    links: PathBuf,
    /// Scratch pins of [`acceleration::probe`], gone once it returns.
    acceleration_probe: PathBuf,
}

impl PinLayout {
    fn at(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            maps: root.join(format!("maps-v{MAP_ABI_VERSION}")),
            links: root.join("links"),
            acceleration_probe: acceleration::probe_pin_dir(root),
        }
    }

    fn prepare(root: &Path) -> Result<Self, EbpfError> {
        // The directory may not exist yet: check the filesystem it will be created on.
        let existing = root
            .ancestors()
            .find(|dir| dir.exists())
            .unwrap_or(Path::new("/"));
        let on_bpffs = statfs(existing).is_ok_and(|fs| fs.filesystem_type() == BPF_FS_MAGIC);
        if !on_bpffs {
            let mounted = match host::bpffs_mount() {
                Some(mount) => format!("bpffs is mounted at {}", mount.display()),
                None => "bpffs is not mounted on this host".to_owned(),
            };
            return Err(EbpfError::BpffsNotMounted {
                dir: root.to_owned(),
                mounted,
            });
        }
        let layout = Self::at(root);
        for dir in [&layout.maps, &layout.links] {
            fs::create_dir_all(dir).map_err(|source| EbpfError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(layout)
    }

    /// Pins `link` at `links/<program>`, atomically replacing a previous agent's pin: rename(2)
    /// over it drops the old pin, so the old program detaches once its agent is gone, while both
    /// stay attached until then (multi-attach; the old connect4 skips already-redirected
    /// destinations and the old sock_ops finds no record left to move).
    fn pin_link(&self, program: &'static str, link: FdLink) -> Result<AttachedLink, EbpfError> {
        let pin = self.links.join(program);
        // bpffs refuses names with a dot (EPERM).
        let staging = self
            .links
            .join(format!("{program}-new-{}", std::process::id()));
        remove_pin(&staging)?;
        let pinned = link.pin(&staging).map_err(|error| {
            EbpfError::from_aya(
                format!("pinning the {program} link at {}", staging.display()),
                error,
            )
        })?;
        fs::rename(&staging, &pin).map_err(|source| EbpfError::PinDir {
            path: pin.clone(),
            source,
        })?;
        Ok(AttachedLink {
            program,
            pin,
            _link: FdLink::from(pinned),
        })
    }
}

fn remove_pin(path: &Path) -> Result<(), EbpfError> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(EbpfError::PinDir {
            path: path.to_owned(),
            source: error,
        }),
        _ => Ok(()),
    }
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(EbpfError::MissingObjectItem(name))?;
    program
        .try_into()
        .map_err(|error| EbpfError::from_aya(format!("reading program {name}"), error))
}

/// The cgroup program types the redirector attaches (aya offers these as inherent methods).
trait CgroupProgram {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError>;
    /// Attaches at `cgroup` as a bpf link and takes the link out of aya's bookkeeping, so that
    /// dropping the program does not detach it; Err(LinkError) when it is not an fd link.
    fn attach_link(&mut self, cgroup: &File) -> Result<Result<FdLink, LinkError>, ProgramError>;
}

// aya passes the attach mode as BPF_LINK_CREATE flags on kernels with cgroup links (≥ 5.7, which
// pinning needs), and the kernel rejects ALLOW_MULTI there with EINVAL because links are always
// multi-attached: `Single` (no flag) is what yields multi-attach on this path.
impl CgroupProgram for SockOps {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }

    fn attach_link(&mut self, cgroup: &File) -> Result<Result<FdLink, LinkError>, ProgramError> {
        let id = self.attach(cgroup, CgroupAttachMode::Single)?;
        self.take_link(id).map(FdLink::try_from)
    }
}

/// The one cgroup_skb program is an ingress one.
impl CgroupProgram for CgroupSkb {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }

    fn attach_link(&mut self, cgroup: &File) -> Result<Result<FdLink, LinkError>, ProgramError> {
        let id = self.attach(
            cgroup,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single,
        )?;
        self.take_link(id).map(FdLink::try_from)
    }
}

impl CgroupProgram for CgroupSockAddr {
    fn load_into_kernel(&mut self) -> Result<(), ProgramError> {
        self.load()
    }

    fn attach_link(&mut self, cgroup: &File) -> Result<Result<FdLink, LinkError>, ProgramError> {
        let id = self.attach(cgroup, CgroupAttachMode::Single)?;
        self.take_link(id).map(FdLink::try_from)
    }
}

/// Loads (verifies) one program, attaches it at the node cgroup and pins its link.
fn attach_and_pin<P: CgroupProgram>(
    ebpf: &mut Ebpf,
    node_cgroup: &File,
    pins: &PinLayout,
    name: &'static str,
    requirement: &'static str,
) -> Result<AttachedLink, EbpfError>
where
    for<'a> &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program: &mut P = program_mut(ebpf, name)?;
    let link = attach_program(program, node_cgroup, name, requirement)?;
    pins.pin_link(name, link)
}

/// Loads (verifies) and attaches one program at the node cgroup, returning its pinnable link.
fn attach_program(
    program: &mut impl CgroupProgram,
    node_cgroup: &File,
    name: &'static str,
    requirement: &'static str,
) -> Result<FdLink, EbpfError> {
    program
        .load_into_kernel()
        .map_err(|error| EbpfError::from_program(name, requirement, "loading", error))?;
    let link = program
        .attach_link(node_cgroup)
        .map_err(|error| EbpfError::from_program(name, requirement, "attaching", error))?;
    // Only kernels older than 5.7 attach without a bpf link; those links cannot be pinned.
    link.map_err(|error| EbpfError::KernelUnsupported {
        action: format!("pinning the link of {name}"),
        requirement,
        source: io::Error::new(io::ErrorKind::Unsupported, error.to_string()),
    })
}

fn fill_exclusions(ebpf: &mut Ebpf, cfg: &RedirectConfig) -> Result<(), EbpfError> {
    let map = ebpf
        .map_mut(names::EXCLUDED_PORTS)
        .ok_or(EbpfError::MissingObjectItem(names::EXCLUDED_PORTS))?;
    let mut ports: HashMap<&mut MapData, u16, u8> = HashMap::try_from(map)
        .map_err(|error| EbpfError::from_aya("opening the excluded ports map", error))?;
    for &port in &cfg.excluded_ports {
        ports
            .insert(port, 1, 0)
            .map_err(|error| EbpfError::from_aya(format!("excluding port {port}"), error))?;
    }

    Ok(())
}

/// The CIDR exclusion map and what it holds, kept so that the set can change
/// while the programs run (the identity service's endpoint moves).
struct ExcludedCidrs {
    map: LpmTrie<MapData, u32, u8>,
    held: BTreeSet<Ipv4Net>,
}

impl ExcludedCidrs {
    fn take(ebpf: &mut Ebpf, cidrs: &[Ipv4Net]) -> Result<Self, EbpfError> {
        let map = ebpf
            .take_map(names::EXCLUDED_CIDRS)
            .ok_or(EbpfError::MissingObjectItem(names::EXCLUDED_CIDRS))?;
        let map = LpmTrie::try_from(map)
            .map_err(|error| EbpfError::from_aya("opening the excluded CIDRs map", error))?;
        let mut excluded = Self {
            map,
            held: BTreeSet::new(),
        };
        excluded.replace(cidrs)?;
        Ok(excluded)
    }

    /// The program looks up the address in network order (LPM matches from the first byte).
    fn key(net: &Ipv4Net) -> Key<u32> {
        Key::new(
            u32::from(net.prefix_len()),
            u32::from_ne_bytes(net.network().octets()),
        )
    }

    /// Makes the map hold exactly `cidrs`: additions first, so that an address
    /// in both the old and the new set is never redirected on the way.
    fn replace(&mut self, cidrs: &[Ipv4Net]) -> Result<(), EbpfError> {
        check_exclusion_count("CIDRs", cidrs.len(), capacity::EXCLUDED_CIDRS)?;
        let wanted: BTreeSet<Ipv4Net> = cidrs.iter().map(Ipv4Net::trunc).collect();
        let new: Vec<Ipv4Net> = wanted.difference(&self.held).copied().collect();
        for net in &new {
            self.map
                .insert(&Self::key(net), 1, 0)
                .map_err(|error| EbpfError::from_aya(format!("excluding CIDR {net}"), error))?;
            self.held.insert(*net);
        }
        let gone: Vec<Ipv4Net> = self.held.difference(&wanted).copied().collect();
        for net in gone {
            self.map.remove(&Self::key(&net)).map_err(|error| {
                EbpfError::from_aya(format!("ending the exclusion of CIDR {net}"), error)
            })?;
            self.held.remove(&net);
        }
        Ok(())
    }
}

/// Entries of a pinned map, opened from its pin.
fn count_pinned<K: aya::Pod, V: aya::Pod>(
    pins: &PinLayout,
    name: &'static str,
) -> Result<usize, EbpfError> {
    let data = MapData::from_pin(pins.maps.join(name))
        .map_err(|error| EbpfError::from_aya(format!("opening pinned map {name}"), error))?;
    let map: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data))
        .map_err(|error| EbpfError::from_aya(format!("opening pinned map {name}"), error))?;
    Ok(map.keys().filter(Result::is_ok).count())
}

/// Sockets in the pinned sockhash, opened from its pin.
fn count_pinned_sockets(pins: &PinLayout) -> Result<usize, EbpfError> {
    let name = names::ACCELERATED_SOCKETS;
    let data = MapData::from_pin(pins.maps.join(name))
        .map_err(|error| EbpfError::from_aya(format!("opening pinned map {name}"), error))?;
    let map: SockHash<MapData, SocketTuple> = SockHash::try_from(Map::SockHash(data))
        .map_err(|error| EbpfError::from_aya(format!("opening pinned map {name}"), error))?;
    Ok(map.keys().filter(Result::is_ok).count())
}

/// Takes a pinned map out of the object, checking that a reused pin has this agent's layout
/// (aya reuses whatever is pinned under the name).
fn take_pinned_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    name: &'static str,
    max_entries: u32,
) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::MissingObjectItem(name))?;
    let info = match &map {
        Map::HashMap(data) | Map::LruHashMap(data) => data.info(),
        _ => return Err(EbpfError::MissingObjectItem(name)),
    }
    .map_err(|error| EbpfError::from_aya(format!("inspecting map {name}"), error))?;
    check_layout::<K, V>(pins, name, &info, max_entries)?;
    HashMap::try_from(map)
        .map_err(|error| EbpfError::from_aya(format!("opening map {name}"), error))
}

/// [`take_pinned_map`] for the sockhash (values are socket fds, u32 in the kernel's layout).
fn take_pinned_sockhash(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
) -> Result<SockHash<MapData, SocketTuple>, EbpfError> {
    let name = names::ACCELERATED_SOCKETS;
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::MissingObjectItem(name))?;
    let Map::SockHash(data) = &map else {
        return Err(EbpfError::MissingObjectItem(name));
    };
    let info = data
        .info()
        .map_err(|error| EbpfError::from_aya(format!("inspecting map {name}"), error))?;
    check_layout::<SocketTuple, u32>(pins, name, &info, capacity::ACCELERATED_SOCKETS)?;
    SockHash::try_from(map)
        .map_err(|error| EbpfError::from_aya(format!("opening map {name}"), error))
}

fn check_layout<K, V>(
    pins: &PinLayout,
    name: &'static str,
    info: &MapInfo,
    max_entries: u32,
) -> Result<(), EbpfError> {
    let expected = (size_of::<K>() as u32, size_of::<V>() as u32, max_entries);
    let found = (info.key_size(), info.value_size(), info.max_entries());
    if found != expected {
        return Err(EbpfError::IncompatiblePinnedMap {
            path: pins.maps.join(name),
            found_key: found.0,
            found_value: found.1,
            found_entries: found.2,
            expected_key: expected.0,
            expected_value: expected.1,
            expected_entries: expected.2,
        });
    }
    Ok(())
}

/// Kernels before 5.11 charge eBPF maps to RLIMIT_MEMLOCK (later ones to the
/// memory cgroup): on those the limit is lifted before loading, which needs
/// CAP_SYS_RESOURCE; later kernels need neither.
pub fn lift_memlock_limit_if_charged() -> Result<(), EbpfError> {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_default();
    if !charges_maps_to_memlock(&release) {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY)
        .map_err(|source| EbpfError::MemlockLimit { release, source })
}

/// Whether kernel `release` (e.g. `5.10.0-21-amd64`) predates memcg-based
/// accounting of eBPF memory (5.11). An unreadable release counts as a
/// modern kernel: the load itself then says what is wrong.
fn charges_maps_to_memlock(release: &str) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>());
    match (numbers.next(), numbers.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) < (5, 11),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_kernels_before_5_11_charge_maps_to_memlock() {
        for (release, charged) in [
            ("4.19.0-25-amd64", true),
            ("5.10.0-21-cloud-amd64", true),
            ("5.11.0", false),
            ("5.15.0-1034-aws", false),
            ("6.18.0", false),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(
                super::charges_maps_to_memlock(release),
                charged,
                "{release}"
            );
        }
    }

    use super::*;

    #[test]
    fn permission_errors_say_which_capabilities_are_needed() {
        let error =
            EbpfError::from_aya("creating map X", io::Error::from_raw_os_error(libc::EPERM));
        assert!(
            matches!(error, EbpfError::MissingPrivileges { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("CAP_BPF"), "{error}");
    }

    #[test]
    fn missing_bpf_syscall_is_explained() {
        let error =
            EbpfError::from_aya("creating map X", io::Error::from_raw_os_error(libc::ENOSYS));
        assert!(
            matches!(error, EbpfError::BpfSyscallUnavailable),
            "{error:?}"
        );
    }

    #[test]
    fn a_pin_directory_outside_bpffs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = PinLayout::prepare(&dir.path().join("node-0"))
            .err()
            .expect("a tmp dir is not bpffs");
        assert!(
            matches!(error, EbpfError::BpffsNotMounted { .. }),
            "{error:?}"
        );
        assert!(
            !dir.path().join("node-0").exists(),
            "nothing is created off bpffs"
        );
    }

    #[test]
    fn a_node_cgroup_outside_cgroup2_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = open_node_cgroup(dir.path()).expect_err("a tmp dir is not a cgroup");
        assert!(
            matches!(error, EbpfError::NotACgroup2Dir { .. }),
            "{error:?}"
        );
    }

    #[test]
    fn the_listener_must_be_a_concrete_node_address() {
        for listener in ["0.0.0.0:15001", "127.0.0.1:15001", "10.0.0.1:0"] {
            let listener: SocketAddrV4 = listener.parse().unwrap();
            assert!(
                matches!(check_listener(listener), Err(EbpfError::InvalidListener(l)) if l == listener)
            );
        }
        assert!(check_listener("10.0.0.1:15001".parse().unwrap()).is_ok());
    }

    #[test]
    fn too_many_exclusions_are_refused_before_loading() {
        let error = check_exclusion_count("ports", 65, capacity::EXCLUDED_PORTS).unwrap_err();
        assert_eq!(
            error.to_string(),
            "too many excluded ports: 65, at most 64 fit in the eBPF map; shorten the list"
        );
    }
}
