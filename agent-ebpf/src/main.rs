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
//!
//! Only built for the bpf target (see the `programs` feature in Cargo.toml).
#![no_std]
#![no_main]

use agent_ebpf::{
    ConnectionKey, MAX_CGROUP_DEPTH, RedirectRecord, SocketTuple, capacity, record_source,
};
use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT2,
        bpf_sock_addr, sk_action::SK_PASS,
    },
    helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, SockHash, lpm_trie::Key},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
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
    let Some(target) = redirect_target(ctx, sock_addr.user_ip4, sock_addr.user_port) else {
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
    let Some(target) = redirect_target(ctx, ip6[3], sock_addr.user_port) else {
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
/// them) from the current task is redirected, and if so records it under the socket cookie.
fn redirect_target(
    ctx: &SockAddrContext,
    dst_ip_network_order: u32,
    user_port: u32,
) -> Option<RedirectTarget> {
    // A pod the agent does not know yet is redirected too: the agent holds the connection until
    // it knows the pod, so a pod's first connections are never sent in clear.
    let (source_cgroup, source) = match current_origin() {
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
        // Before the SYN: ask for state callbacks on redirected sockets only, so that a
        // connection that never establishes still gets its record deleted.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if REDIRECT_BY_COOKIE.get_ptr(socket_cookie(ctx)).is_some() {
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

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this is never executed.
    loop {}
}
