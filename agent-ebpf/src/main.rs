//! sealmesh redirect programs, attached by the agent at its node's cgroup.
//!
//! - `redirect_connect4` (cgroup/connect4, and `redirect_connect6` for IPv4-mapped
//!   destinations of dual-stack sockets): classifies the connecting task by its cgroups
//!   ([`current_origin`]); a TCP connect from a meshed pod (its cgroup or an ancestor is in
//!   `MESHED_PODS`), or from a pod the agent has not classified yet, to a non-excluded
//!   destination is rewritten to the agent's outbound listener; the original destination, the
//!   pod's cgroup id and whether it was known are recorded under the socket cookie. The host,
//!   the agent and unmeshed pods connect directly. It always allows the connect: redirection
//!   never blocks, the agent decides.
//! - `track_redirected` (sock_ops): once such a socket is established, moves the record to a map
//!   keyed by the connection as the agent sees it on accept, and deletes records of connections
//!   that die before the agent collected them. With sockmap acceleration on, it also adds both
//!   sockets of each pod <-> agent connection (the redirected pod socket and the agent's accepted
//!   one) to `ACCELERATED_SOCKETS`.
//! - `accelerate_msg` (sk_msg, attached to `ACCELERATED_SOCKETS`): hands each message a socket
//!   of that map sends straight to its peer socket's receive queue, so payload between a pod and
//!   its node's agent skips the TCP/IP stack.
//! - `original_peer4`/`original_peer6` (cgroup/getpeername4/6): a redirected pod socket reports
//!   the destination the pod connected to as its peer, not the agent's listener.
//! - Strict inbound: connect4/connect6 mark a connect from the node itself or the agent to a
//!   strict pod's address as trusted (`TRUSTED_SOCKETS`); `track_redirected` moves the mark to
//!   the connection's tuple before the SYN leaves (`TRUSTED_CONNECTIONS`) and drops it at close.
//!   `enforce_strict_inbound` (cgroup_skb/ingress) drops a SYN to a listening socket of a pod in
//!   `STRICT_PODS` unless its tuple is trusted, it came over the pod's loopback or the pod's
//!   authorization policies admit its IPv4 source on its port (`PLAINTEXT_ACCESS`), counts the
//!   refusal for the pod and reports it in `INBOUND_REFUSALS`.
//!
//! Only built for the bpf target (see the `programs` feature in Cargo.toml).
#![no_std]
#![no_main]

use agent_ebpf::{
    ConnectionKey, FAMILY_IPV4, FAMILY_IPV6, InboundFlow, InboundRefusal, MAX_CGROUP_DEPTH,
    PlaintextSource, RedirectRecord, SocketTuple, StrictPodCounters, capacity, plaintext,
    record_source,
};
use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT2,
        BPF_TCP_LISTEN, bpf_sock_addr, sk_action::SK_PASS,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_skb_ancestor_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuHashMap, RingBuf, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, error};

/// Linux ABI constants the bindings do not carry.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// cgroup/connect4 verdict: let the connect proceed (0 would fail it with EPERM).
const ALLOW: i32 = 1;
/// `127.0.0.0/8`, host order.
const LOOPBACK_NET: u32 = 0x7f00_0000;
const LOOPBACK_MASK: u32 = 0xff00_0000;
/// Third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), network order.
const V4_MAPPED_MARKER: u32 = 0x0000_ffff_u32.to_be();

// The agent overrides these at load time (EbpfLoader::override_global).
#[unsafe(no_mangle)]
static LISTENER_IP4: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static LISTENER_PORT: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static SOCKMAP_ACCELERATION: Global<u8> = Global::new(0);

#[map]
static MESHED_PODS: HashMap<u64, u8> = HashMap::pinned(capacity::MESHED_PODS, 0);
#[map]
static POD_PARENT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(capacity::POD_PARENT_CGROUPS, 0);
#[map]
static AGENT_CGROUPS: HashMap<u64, u8> = HashMap::pinned(capacity::AGENT_CGROUPS, 0);
#[map]
static UNMESHED_PODS: HashMap<u64, u8> = HashMap::pinned(capacity::UNMESHED_PODS, 0);
#[map]
static REDIRECT_BY_COOKIE: LruHashMap<u64, RedirectRecord> =
    LruHashMap::pinned(capacity::REDIRECT_BY_COOKIE, 0);
#[map]
static REDIRECT_BY_CONNECTION: LruHashMap<ConnectionKey, RedirectRecord> =
    LruHashMap::pinned(capacity::REDIRECT_BY_CONNECTION, 0);
#[map]
static ORIGINAL_DST_BY_COOKIE: LruHashMap<u64, RedirectRecord> =
    LruHashMap::pinned(capacity::ORIGINAL_DST_BY_COOKIE, 0);
#[map]
static ACCELERATED_SOCKETS: SockHash<SocketTuple> =
    SockHash::pinned(capacity::ACCELERATED_SOCKETS, 0);
#[map]
static TCP_ONLY_SENDERS: LruHashMap<SocketTuple, u8> =
    LruHashMap::pinned(capacity::TCP_ONLY_SENDERS, 0);
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(capacity::EXCLUDED_PORTS, 0);
/// Keys hold the address in network order: LPM matching goes byte by byte from the first byte.
#[map]
static EXCLUDED_CIDRS: LpmTrie<u32, u8> = LpmTrie::with_max_entries(capacity::EXCLUDED_CIDRS, 0);
#[map]
/// Per CPU: several CPUs refuse at once without atomics; the agent adds the CPUs' counts up.
static STRICT_PODS: PerCpuHashMap<u64, StrictPodCounters> =
    PerCpuHashMap::pinned(capacity::STRICT_PODS, 0);
#[map]
static STRICT_POD_ADDRESSES: HashMap<u32, u8> = HashMap::pinned(capacity::STRICT_POD_ADDRESSES, 0);
#[map]
static TRUSTED_SOCKETS: LruHashMap<u64, u8> = LruHashMap::pinned(capacity::TRUSTED_SOCKETS, 0);
#[map]
static TRUSTED_CONNECTIONS: LruHashMap<SocketTuple, u8> =
    LruHashMap::pinned(capacity::TRUSTED_CONNECTIONS, 0);
#[map]
static REFUSED_FLOWS: LruHashMap<InboundFlow, u64> = LruHashMap::pinned(capacity::REFUSED_FLOWS, 0);
#[map]
static INBOUND_REFUSALS: RingBuf = RingBuf::pinned(capacity::INBOUND_REFUSALS_BYTES, 0);
/// Keys are (pod cgroup, port, source network) in network order; see `agent_ebpf::plaintext`.
#[map]
static PLAINTEXT_ACCESS: LpmTrie<PlaintextSource, u8> =
    LpmTrie::pinned(capacity::PLAINTEXT_ACCESS, 0);

#[cgroup_sock_addr(connect4)]
pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
    if let Err(errno) = try_redirect_connect4(&ctx) {
        error!(
            &ctx,
            "connect4: recording a redirect failed (errno {}); the agent will refuse it", errno
        );
    }
    ALLOW
}

fn try_redirect_connect4(ctx: &SockAddrContext) -> Result<(), i64> {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the lifetime of the program; the
    // verifier checks each field access.
    let sock_addr = unsafe { &mut *ctx.sock_addr };
    if sock_addr.user_family != AF_INET || !is_tcp(sock_addr) {
        return Ok(());
    }
    let origin = current_origin();
    record_trusted_connect(ctx, origin, sock_addr.user_ip4);
    let Some(target) = redirect_target(ctx, origin, sock_addr.user_ip4, sock_addr.user_port) else {
        return Ok(());
    };
    sock_addr.user_ip4 = target.ip_network_order;
    sock_addr.user_port = target.user_port;
    target.recorded
}

/// Dual-stack (AF_INET6) sockets reach IPv4 pods through IPv4-mapped addresses (`::ffff:a.b.c.d`)
/// and never pass connect4: without this, such apps (Java's default, for one) would bypass the
/// mesh. Other IPv6 destinations are left alone: the cluster is IPv4.
#[cgroup_sock_addr(connect6)]
pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
    if let Err(errno) = try_redirect_connect6(&ctx) {
        error!(
            &ctx,
            "connect6: recording a redirect failed (errno {}); the agent will refuse it", errno
        );
    }
    ALLOW
}

fn try_redirect_connect6(ctx: &SockAddrContext) -> Result<(), i64> {
    // SAFETY: as in connect4.
    let sock_addr = unsafe { &mut *ctx.sock_addr };
    if sock_addr.user_family != AF_INET6 || !is_tcp(sock_addr) {
        return Ok(());
    }
    let ip6 = sock_addr.user_ip6;
    if ip6[0] != 0 || ip6[1] != 0 || ip6[2] != V4_MAPPED_MARKER {
        return Ok(());
    }
    let origin = current_origin();
    record_trusted_connect(ctx, origin, ip6[3]);
    let Some(target) = redirect_target(ctx, origin, ip6[3], sock_addr.user_port) else {
        return Ok(());
    };
    sock_addr.user_ip6[3] = target.ip_network_order;
    sock_addr.user_port = target.user_port;
    target.recorded
}

fn is_tcp(sock_addr: &bpf_sock_addr) -> bool {
    sock_addr.type_ == SOCK_STREAM && sock_addr.protocol == IPPROTO_TCP
}

/// Where to send a redirected connect, in the kernel's representation of the sockaddr fields.
struct RedirectTarget {
    ip_network_order: u32,
    /// The port in network order in the low 16 bits, as `user_port` holds it.
    user_port: u32,
    /// Whether the record for the agent was stored. The connect is redirected either way: the
    /// agent refuses a connection it has no record for (fail closed), whereas leaving the
    /// destination alone would let the pod bypass the mesh.
    recorded: Result<(), i64>,
}

/// Decides whether a TCP connect to `dst_ip_network_order`/`user_port` (as the kernel holds
/// them) from a task of `origin` is redirected, and if so records it under the socket cookie.
fn redirect_target(
    ctx: &SockAddrContext,
    origin: Origin,
    dst_ip_network_order: u32,
    user_port: u32,
) -> Option<RedirectTarget> {
    // A pod the agent does not know yet is redirected too: the agent holds the connection until
    // it knows the pod, so a pod's first connections are never sent in clear.
    let (source_cgroup, source) = match origin {
        Origin::Pod {
            cgroup,
            mesh: PodMesh::Meshed,
        } => (cgroup, record_source::MESHED_POD),
        Origin::Pod {
            cgroup,
            mesh: PodMesh::Unknown,
        } => (cgroup, record_source::UNKNOWN_POD),
        _ => return None,
    };
    let dst_ip = u32::from_be(dst_ip_network_order);
    let dst_port = u16::from_be(user_port as u16);
    let listener_ip = LISTENER_IP4.load();
    let listener_port = LISTENER_PORT.load();
    if dst_ip & LOOPBACK_MASK == LOOPBACK_NET
        || (dst_ip == listener_ip && dst_port == listener_port)
        || EXCLUDED_PORTS.get_ptr(dst_port).is_some()
        || EXCLUDED_CIDRS
            .get(Key::new(32, dst_ip_network_order))
            .is_some()
    {
        return None;
    }
    // SAFETY: a cgroup/connect context is always backed by a socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let record = RedirectRecord::new(source_cgroup, source, dst_ip, dst_port);
    let recorded = REDIRECT_BY_COOKIE
        .insert(cookie, record, 0)
        .and_then(|()| ORIGINAL_DST_BY_COOKIE.insert(cookie, record, 0))
        .map_err(i64::from);
    if source == record_source::MESHED_POD {
        debug!(
            ctx,
            "redirected cgroup {} to {:i}:{}", source_cgroup, dst_ip, dst_port
        );
    } else {
        debug!(
            ctx,
            "redirected unknown cgroup {} to {:i}:{}", source_cgroup, dst_ip, dst_port
        );
    }
    Some(RedirectTarget {
        ip_network_order: listener_ip.to_be(),
        user_port: u32::from(listener_port.to_be()),
        recorded,
    })
}

/// Where the connecting task comes from, by its cgroups.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Not below any pod parent cgroup: the node itself (kubelet, system daemons).
    Host,
    /// The agent: one of its cgroups is the task's or an ancestor (below every pod parent).
    Agent,
    /// A pod: `cgroup` is the pod's cgroup (the first ancestor below the deepest pod parent, or
    /// the meshed cgroup that matched).
    Pod { cgroup: u64, mesh: PodMesh },
}

/// What the agent has told the kernel about a pod cgroup.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PodMesh {
    /// In `MESHED_PODS` (at any level of the task's cgroups).
    Meshed,
    /// In `UNMESHED_PODS`.
    Unmeshed,
    /// Neither: a pod the agent has not resolved yet.
    Unknown,
}

/// The deepest marker seen so far while walking the task's cgroups from the root down.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    PodParent,
    Agent,
}

/// Classifies the current task once, walking its cgroup ancestry from the root (bounded by
/// [`MAX_CGROUP_DEPTH`]). A meshed cgroup at any level makes it that meshed pod. Otherwise the
/// deepest of a pod parent and an agent cgroup decides: below an agent cgroup, the agent; below a
/// pod parent, the pod whose cgroup is the first level under the deepest parent; neither (or the
/// parent itself), the host. A cgroup that is both a pod parent and the agent's counts as a pod
/// parent: local-mode agents run in their node's cgroup, which is the pods' parent.
fn current_origin() -> Origin {
    let mut marker = Marker::None;
    let mut pod = 0u64;
    // Level 0 is the root cgroup: never a pod, a pod parent or the agent's.
    for level in 1..MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call; returns 0 past the task's own level.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            break;
        }
        if MESHED_PODS.get_ptr(id).is_some() {
            return Origin::Pod {
                cgroup: id,
                mesh: PodMesh::Meshed,
            };
        }
        if POD_PARENT_CGROUPS.get_ptr(id).is_some() {
            marker = Marker::PodParent;
            pod = 0;
        } else if AGENT_CGROUPS.get_ptr(id).is_some() {
            marker = Marker::Agent;
        } else if marker == Marker::PodParent && pod == 0 {
            pod = id;
        }
    }
    match marker {
        Marker::Agent => Origin::Agent,
        Marker::PodParent if pod != 0 => Origin::Pod {
            cgroup: pod,
            mesh: if UNMESHED_PODS.get_ptr(pod).is_some() {
                PodMesh::Unmeshed
            } else {
                PodMesh::Unknown
            },
        },
        _ => Origin::Host,
    }
}

#[sock_ops]
pub fn track_redirected(ctx: SockOpsContext) -> u32 {
    if let Err(errno) = try_track_redirected(&ctx) {
        error!(
            &ctx,
            "sock_ops: handing a redirect record over failed (errno {})", errno
        );
    }
    // sock_ops return values only matter for ops that ask for a reply; none of ours do.
    1
}

fn try_track_redirected(ctx: &SockOpsContext) -> Result<(), i64> {
    // Only sockets connect4/connect6 recorded are acted on (cookie lookup), so no family filter:
    // for an IPv4-mapped AF_INET6 socket the kernel fills the ip4 fields as for AF_INET.
    match ctx.op() {
        // Before the SYN: record a trusted connect's tuple, and ask for state callbacks on
        // redirected and trusted sockets only, so that a connection that never establishes
        // still gets its records deleted.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            let cookie = socket_cookie(ctx);
            let trusted = trust_connection(ctx, cookie)?;
            if trusted || REDIRECT_BY_COOKIE.get_ptr(cookie).is_some() {
                ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
                    .map_err(i64::from)?;
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let cookie = socket_cookie(ctx);
            let Some(record) = REDIRECT_BY_COOKIE.get_ptr(cookie) else {
                return Ok(());
            };
            // SAFETY: the pointer came from a successful lookup; the record is copied out
            // before the entry is deleted.
            let record = unsafe { *record };
            REDIRECT_BY_CONNECTION
                .insert(connection_key(ctx), record, 0)
                .map_err(i64::from)?;
            REDIRECT_BY_COOKIE.remove(cookie).map_err(i64::from)?;
            // Bytes already queued on the socket (TCP Fast Open data the SYN-ACK did not
            // acknowledge) would be overtaken by redirected messages: such a socket stays on TCP.
            // SAFETY: the verifier checks the context field reads.
            let (snd_nxt, snd_una) = unsafe { ((*ctx.ops).snd_nxt, (*ctx.ops).snd_una) };
            if snd_nxt == snd_una {
                accelerate(ctx, own_tuple(ctx))?;
            }
        }
        // The agent's side of a redirected connection: the listener's child socket, established
        // after the pod's side (whose callback above ran before its final ACK left), so the
        // record sock_ops moved is there unless the connection is not a redirected one.
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let own = own_tuple(ctx);
            if SOCKMAP_ACCELERATION.load() != 0
                && own.local_ip4 == LISTENER_IP4.load()
                && own.local_port == LISTENER_PORT.load()
                && REDIRECT_BY_CONNECTION
                    .get_ptr(ConnectionKey::new(
                        own.remote_ip4,
                        own.remote_port,
                        own.local_ip4,
                        own.local_port,
                    ))
                    .is_some()
            {
                accelerate(ctx, own)?;
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // Absent entries (already moved or taken) are fine: removal errors are ignored.
            let cookie = socket_cookie(ctx);
            let _ = REDIRECT_BY_COOKIE.remove(cookie);
            let _ = ORIGINAL_DST_BY_COOKIE.remove(cookie);
            // The kernel removes the socket from ACCELERATED_SOCKETS itself when it is closed.
            let _ = TCP_ONLY_SENDERS.remove(own_tuple(ctx));
            let _ = TRUSTED_CONNECTIONS.remove(own_tuple(ctx));
            // A client that half-closes right after connecting (send, close) reaches CLOSE from
            // FIN_WAIT2/CLOSING as soon as the listener's kernel acknowledges its FIN — usually
            // before the agent accepted. That connection still waits in the agent's accept queue
            // and needs its record; the agent takes it (and the LRU bounds the rare leftovers).
            // Any other path to CLOSE (reset, timeout, refused) means nobody will accept it.
            let previous_state = ctx.arg(0);
            if previous_state != BPF_TCP_FIN_WAIT2 && previous_state != BPF_TCP_CLOSING {
                let _ = REDIRECT_BY_CONNECTION.remove(connection_key(ctx));
            }
        }
        _ => {}
    }
    Ok(())
}

/// Adds an established pod <-> agent socket to `ACCELERATED_SOCKETS` (when acceleration is on),
/// with state callbacks so its `TCP_ONLY_SENDERS` mark goes when it closes.
fn accelerate(ctx: &SockOpsContext, own: SocketTuple) -> Result<(), i64> {
    if SOCKMAP_ACCELERATION.load() == 0 {
        return Ok(());
    }
    ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32)
        .map_err(i64::from)?;
    // A mark left by an earlier connection with the same tuple must not keep this one on TCP.
    let _ = TCP_ONLY_SENDERS.remove(own);
    // SAFETY: the kernel passes a valid bpf_sock_ops for the lifetime of the program.
    let ops = unsafe { &mut *ctx.ops };
    ACCELERATED_SOCKETS
        .update(own, ops, u64::from(BPF_ANY))
        .map_err(i64::from)
}

/// Sends the message to the peer socket's receive queue. A sender whose peer is not in the map
/// (not established yet, or already closed) passes through TCP, and stays on TCP for good:
/// redirected bytes land in a queue the receiver reads before its TCP queue, so switching
/// later could deliver them ahead of unread TCP bytes.
#[sk_msg]
pub fn accelerate_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the kernel passes a valid sk_msg_md; the verifier checks each field read.
    let msg = unsafe { &*ctx.msg };
    // Same byte orders as in sock_ops: local_port host order, the rest network order.
    let own = SocketTuple::new(
        u32::from_be(msg.local_ip4),
        msg.local_port as u16,
        u32::from_be(msg.remote_ip4),
        u32::from_be(msg.remote_port) as u16,
    );
    if TCP_ONLY_SENDERS.get_ptr(own).is_some() {
        return SK_PASS;
    }
    if ACCELERATED_SOCKETS.redirect_msg(&ctx, own.reversed(), u64::from(BPF_F_INGRESS))
        == i64::from(SK_PASS)
    {
        return SK_PASS;
    }
    // The LRU map makes room by evicting; an insert failure only costs this mark.
    let _ = TCP_ONLY_SENDERS.insert(own, 1, 0);
    SK_PASS
}

/// A redirected pod socket's peer is the destination the pod asked for. Only 1 is a valid
/// verdict for getpeername hooks.
#[cgroup_sock_addr(getpeername4)]
pub fn original_peer4(ctx: SockAddrContext) -> i32 {
    if let Some(record) = original_dst(&ctx) {
        // SAFETY: as in connect4; the verifier allows writing these fields in getpeername.
        let sock_addr = unsafe { &mut *ctx.sock_addr };
        sock_addr.user_ip4 = record.original_ip4.to_be();
        sock_addr.user_port = u32::from(record.original_port.to_be());
    }
    ALLOW
}

/// The same for dual-stack sockets connect6 redirected (IPv4-mapped destinations).
#[cgroup_sock_addr(getpeername6)]
pub fn original_peer6(ctx: SockAddrContext) -> i32 {
    if let Some(record) = original_dst(&ctx) {
        // SAFETY: as in connect4.
        let sock_addr = unsafe { &mut *ctx.sock_addr };
        sock_addr.user_ip6[0] = 0;
        sock_addr.user_ip6[1] = 0;
        sock_addr.user_ip6[2] = V4_MAPPED_MARKER;
        sock_addr.user_ip6[3] = record.original_ip4.to_be();
        sock_addr.user_port = u32::from(record.original_port.to_be());
    }
    ALLOW
}

fn original_dst(ctx: &SockAddrContext) -> Option<RedirectRecord> {
    // SAFETY: a getpeername context is always backed by a socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the pointer came from a successful lookup and is copied out at once.
    ORIGINAL_DST_BY_COOKIE
        .get_ptr(cookie)
        .map(|record| unsafe { *record })
}

fn own_tuple(ctx: &SockOpsContext) -> SocketTuple {
    SocketTuple::new(
        u32::from_be(ctx.local_ip4()),
        ctx.local_port() as u16,
        u32::from_be(ctx.remote_ip4()),
        u32::from_be(ctx.remote_port()) as u16,
    )
}

fn socket_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: sock_ops contexts are always backed by a socket.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The connection as the agent sees it on accept: client = this socket's local end, listener =
/// its remote end. local_port is host order; remote_port holds the network-order port in its
/// upper 16 bits on little-endian (lower on big-endian), which `u32::from_be` normalises.
fn connection_key(ctx: &SockOpsContext) -> ConnectionKey {
    ConnectionKey::new(
        u32::from_be(ctx.local_ip4()),
        ctx.local_port() as u16,
        u32::from_be(ctx.remote_ip4()),
        u32::from_be(ctx.remote_port()) as u16,
    )
}

/// cgroup_skb verdicts.
const SKB_PASS: i32 = 1;
const SKB_DROP: i32 = 0;
/// Every network namespace's `lo`: packets on it come from the same namespace (the pod itself).
const LOOPBACK_IFINDEX: u32 = 1;
/// `__sk_buff.protocol` holds the EtherType as the packet does (network order).
const ETH_P_IP: u32 = (0x0800_u16).to_be() as u32;
const ETH_P_IPV6: u32 = (0x86dd_u16).to_be() as u32;
const IPV6_HEADER_LEN: usize = 40;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// How long a client goes on retransmitting an unanswered SYN (Linux: tcp_syn_retries 6,
/// 1 + 2 + ... + 64 s = 127 s): a refused flow seen again within it is the same attempt.
const SYN_RETRANSMISSION_WINDOW_NS: u64 = 130 * 1_000_000_000;

/// Records a connect from the node itself or the agent to a strict pod's address: sock_ops
/// moves the mark to the connection's tuple before the SYN leaves, and
/// `enforce_strict_inbound` lets that SYN in. Pods, meshed or not, are never trusted: meshed
/// ones reach strict pods through the agent.
fn record_trusted_connect(ctx: &SockAddrContext, origin: Origin, dst_ip_network_order: u32) {
    if !matches!(origin, Origin::Host | Origin::Agent)
        || STRICT_POD_ADDRESSES
            .get_ptr(u32::from_be(dst_ip_network_order))
            .is_none()
    {
        return;
    }
    // SAFETY: a cgroup/connect context is always backed by a socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Err(errno) = TRUSTED_SOCKETS.insert(cookie, 1, 0) {
        error!(
            ctx,
            "connect: recording a trusted connect to a strict pod failed (errno {}); the pod will refuse it",
            errno
        );
    }
}

/// Before the SYN of a socket connect marked trusted: records its tuple. Returns whether it did.
fn trust_connection(ctx: &SockOpsContext, cookie: u64) -> Result<bool, i64> {
    if TRUSTED_SOCKETS.get_ptr(cookie).is_none() {
        return Ok(false);
    }
    TRUSTED_CONNECTIONS
        .insert(own_tuple(ctx), 1, 0)
        .map_err(i64::from)?;
    // Absent already (LRU eviction) is fine: the tuple is recorded.
    let _ = TRUSTED_SOCKETS.remove(cookie);
    Ok(true)
}

#[cgroup_skb(ingress)]
pub fn enforce_strict_inbound(ctx: SkBuffContext) -> i32 {
    // SAFETY: the kernel passes a valid __sk_buff; the verifier checks each field read.
    let skb = unsafe { &*ctx.skb.skb };
    // SAFETY: reading the socket pointer of the context (the receiving socket, or null).
    let sk = unsafe { skb.__bindgen_anon_2.sk };
    // Only connection attempts reach a listening socket: every packet of an established
    // connection passes here. So does the pod's own loopback.
    // SAFETY: `sk` is checked for null first; the verifier allows reading `state`.
    if sk.is_null() || unsafe { (*sk).state } != BPF_TCP_LISTEN || skb.ifindex == LOOPBACK_IFINDEX {
        return SKB_PASS;
    }
    match connection_attempt(&ctx, skb.protocol) {
        Attempt::Other => SKB_PASS,
        Attempt::Syn(flow) => judge_syn(&ctx, flow),
        // A packet to a listener whose TCP header cannot be read (IPv6 extension headers): a
        // strict pod cannot be shown it is trusted, so it is dropped, uncounted.
        Attempt::Unreadable => match strict_pod_of_socket(&ctx) {
            Some(_) => SKB_DROP,
            None => SKB_PASS,
        },
    }
}

/// What a packet to a listening socket is.
enum Attempt {
    /// A SYN without ACK: a connection attempt.
    Syn(InboundFlow),
    /// Part of a handshake the SYN already opened (or noise the TCP stack rejects itself).
    Other,
    Unreadable,
}

fn connection_attempt(ctx: &SkBuffContext, protocol: u32) -> Attempt {
    let parsed = match protocol {
        ETH_P_IP => ipv4_flow(ctx),
        ETH_P_IPV6 => ipv6_flow(ctx),
        _ => return Attempt::Other,
    };
    match parsed {
        Ok(Some((flow, flags))) if flags & (TCP_SYN | TCP_ACK) == TCP_SYN => Attempt::Syn(flow),
        Ok(Some(_)) => Attempt::Other,
        Ok(None) | Err(_) => Attempt::Unreadable,
    }
}

/// The flow and TCP flags of an IPv4 packet (cgroup_skb data starts at the network header).
fn ipv4_flow(ctx: &SkBuffContext) -> Result<Option<(InboundFlow, u8)>, i64> {
    let version_ihl: u8 = ctx.load(0)?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    let src: [u8; 4] = ctx.load(12)?;
    let dst: [u8; 4] = ctx.load(16)?;
    let mut flow = empty_flow(FAMILY_IPV4);
    flow.src_addr[..4].copy_from_slice(&src);
    flow.dst_addr[..4].copy_from_slice(&dst);
    tcp_part(ctx, header_len, flow).map(Some)
}

/// The same for IPv6, when TCP follows the fixed header (None: extension headers).
fn ipv6_flow(ctx: &SkBuffContext) -> Result<Option<(InboundFlow, u8)>, i64> {
    let next_header: u8 = ctx.load(6)?;
    if u32::from(next_header) != IPPROTO_TCP {
        return Ok(None);
    }
    let mut flow = empty_flow(FAMILY_IPV6);
    flow.src_addr = ctx.load(8)?;
    flow.dst_addr = ctx.load(24)?;
    tcp_part(ctx, IPV6_HEADER_LEN, flow).map(Some)
}

fn empty_flow(family: u16) -> InboundFlow {
    InboundFlow {
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: 0,
        family,
        reserved: 0,
    }
}

/// Fills the ports from the TCP header at `offset` and returns the flags.
fn tcp_part(
    ctx: &SkBuffContext,
    offset: usize,
    mut flow: InboundFlow,
) -> Result<(InboundFlow, u8), i64> {
    let ports: [u8; 4] = ctx.load(offset)?;
    let flags: u8 = ctx.load(offset + TCP_FLAGS_OFFSET)?;
    flow.src_port = u16::from_be_bytes([ports[0], ports[1]]);
    flow.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    Ok((flow, flags))
}

fn judge_syn(ctx: &SkBuffContext, flow: InboundFlow) -> i32 {
    if flow.family == FAMILY_IPV4 {
        let [s0, s1, s2, s3, ..] = flow.src_addr;
        let [d0, d1, d2, d3, ..] = flow.dst_addr;
        let tuple = SocketTuple::new(
            u32::from_be_bytes([s0, s1, s2, s3]),
            flow.src_port,
            u32::from_be_bytes([d0, d1, d2, d3]),
            flow.dst_port,
        );
        if TRUSTED_CONNECTIONS.get_ptr(tuple).is_some() {
            return SKB_PASS;
        }
    }
    let Some(pod_cgroup) = strict_pod_of_socket(ctx) else {
        return SKB_PASS;
    };
    if flow.family == FAMILY_IPV4 && plaintext_admitted(pod_cgroup, &flow) {
        return SKB_PASS;
    }
    refuse(pod_cgroup, flow);
    SKB_DROP
}

/// Whether the pod's authorization policies admit this plaintext source on this port: the
/// longest source network listed for the port, else for the ports no policy names, must allow
/// it. Pods strict by their inbound policy have no entries, so nothing is admitted.
fn plaintext_admitted(pod_cgroup: u64, flow: &InboundFlow) -> bool {
    let [s0, s1, s2, s3, ..] = flow.src_addr;
    let lookup = |port| {
        PLAINTEXT_ACCESS
            .get(Key::new(
                plaintext::FULL_BITS,
                PlaintextSource::new(pod_cgroup, port, [s0, s1, s2, s3]),
            ))
            .copied()
    };
    lookup(flow.dst_port).or_else(|| lookup(plaintext::ANY_PORT)) == Some(plaintext::ALLOW)
}

/// The strict pod the receiving socket belongs to: its cgroup or an ancestor in `STRICT_PODS`.
fn strict_pod_of_socket(ctx: &SkBuffContext) -> Option<u64> {
    // Level 0 is the root cgroup, never a pod.
    for level in 1..MAX_CGROUP_DEPTH {
        // SAFETY: plain helper call on the context; returns 0 past the socket's own level.
        let id = unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) };
        if id == 0 {
            return None;
        }
        if STRICT_PODS.get_ptr(id).is_some() {
            return Some(id);
        }
    }
    None
}

/// Counts a refused attempt for the pod and reports it, once per attempt: a client's SYN
/// retransmissions of the same flow are dropped without either.
fn refuse(pod_cgroup: u64, flow: InboundFlow) {
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    match REFUSED_FLOWS.get_ptr_mut(flow) {
        Some(last_seen) => {
            // SAFETY: the pointer came from a successful lookup; a racing update of the same
            // flow's timestamp only shifts its window.
            let previous = unsafe { core::ptr::replace(last_seen, now) };
            if now.wrapping_sub(previous) < SYN_RETRANSMISSION_WINDOW_NS {
                return;
            }
        }
        // The LRU map makes room by evicting; failing costs a second report at worst.
        None => {
            let _ = REFUSED_FLOWS.insert(flow, now, 0);
        }
    }
    let Some(counters) = STRICT_PODS.get_ptr_mut(pod_cgroup) else {
        return;
    };
    // SAFETY: the pointer came from a successful lookup: this CPU's slot, which no other CPU
    // writes, valid for the program's run (which does not nest on a CPU).
    let counters = unsafe { &mut *counters };
    counters.refused += 1;
    let event = InboundRefusal { pod_cgroup, flow };
    if INBOUND_REFUSALS
        .output::<InboundRefusal>(&event, 0)
        .is_err()
    {
        counters.unreported += 1;
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is never executed.
    loop {}
}
