//! Map types, map names and globals shared by the eBPF programs (`src/main.rs`, built for the
//! bpf target by agent/build.rs) and the agent's loader (`sealmesh_agent::ebpf`).
//!
//! Every address and port in these types is a plain host-order number (`u32::from(Ipv4Addr)`,
//! `u16` port): the programs convert from the kernel's mixed byte orders at the one place they
//! read a socket field, so the agent never has to think about byte order. The exceptions are
//! [`InboundFlow`], which also carries IPv6 addresses (octets as on the wire), and
//! [`PlaintextSource`], an LPM trie key (bytes in network order; its accessors convert).
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]

use core::net::{Ipv4Addr, SocketAddrV4};

/// Version of the pinned maps' layout and meaning. The agent pins maps under a directory named
/// after it, so an upgraded agent with a different layout never reuses incompatible maps (and the
/// old programs keep their own maps until their links are replaced).
///
/// 2: the connecting task's origin comes from `POD_PARENT_CGROUPS`, `AGENT_CGROUPS` and
/// `UNMESHED_PODS` besides `MESHED_PODS`; records say whether the source pod was known
/// ([`RedirectRecord::source`]).
/// 3: `STRICT_PODS` also holds pods whose authorization policies restrict plaintext; the
/// plaintext they admit is in `PLAINTEXT_ACCESS`.
pub const MAP_ABI_VERSION: u32 = 3;

/// Deepest cgroup level the connect programs inspect when classifying the connecting task by its
/// cgroup and its ancestors. Kubernetes pod cgroups sit at level 3–5 (plus container scopes below
/// them); 32 leaves room for nested setups and keeps the loop small for the verifier.
pub const MAX_CGROUP_DEPTH: i32 = 32;

/// Names of the maps and globals in the eBPF object. The eBPF side declares statics with exactly
/// these names (a map's name is its symbol name); the agent looks them up through these constants.
pub mod names {
    /// `HashMap<u64 cgroup id, u8>`: pod cgroups whose sockets are redirected (pinned).
    pub const MESHED_PODS: &str = "MESHED_PODS";
    /// `HashMap<u64 cgroup id, u8>`: cgroups whose descendants are pods: the node cgroup in local
    /// mode, kubelet's `kubepods` cgroup and its QoS children in Kubernetes mode (pinned).
    pub const POD_PARENT_CGROUPS: &str = "POD_PARENT_CGROUPS";
    /// `HashMap<u64 cgroup id, u8>`: the agent's own cgroup(s); their tasks are never pods
    /// (pinned).
    pub const AGENT_CGROUPS: &str = "AGENT_CGROUPS";
    /// `HashMap<u64 cgroup id, u8>`: pod cgroups the agent knows and that are not meshed (pinned).
    pub const UNMESHED_PODS: &str = "UNMESHED_PODS";
    /// `LruHashMap<u64 socket cookie, RedirectRecord>`: connect4 → sock_ops hand-over (pinned).
    pub const REDIRECT_BY_COOKIE: &str = "REDIRECT_BY_COOKIE";
    /// `LruHashMap<ConnectionKey, RedirectRecord>`: records the agent takes on accept (pinned).
    pub const REDIRECT_BY_CONNECTION: &str = "REDIRECT_BY_CONNECTION";
    /// `HashMap<u16 port, u8>`: destination ports never redirected (per program instance).
    pub const EXCLUDED_PORTS: &str = "EXCLUDED_PORTS";
    /// `LpmTrie<u32 network-order IPv4, u8>`: destination CIDRs never redirected (per instance).
    pub const EXCLUDED_CIDRS: &str = "EXCLUDED_CIDRS";
    /// Global `u32`: the agent's outbound listener address (host order).
    pub const LISTENER_IP4: &str = "LISTENER_IP4";
    /// Global `u16`: the agent's outbound listener port.
    pub const LISTENER_PORT: &str = "LISTENER_PORT";
    /// `LruHashMap<u64 socket cookie, RedirectRecord>`: the original destination of each open
    /// redirected pod socket, for getpeername (pinned).
    pub const ORIGINAL_DST_BY_COOKIE: &str = "ORIGINAL_DST_BY_COOKIE";
    /// `SockHash<SocketTuple>`: both sockets of each accelerated pod <-> agent connection, keyed
    /// by the tuple as the socket itself sees it (pinned).
    pub const ACCELERATED_SOCKETS: &str = "ACCELERATED_SOCKETS";
    /// `LruHashMap<SocketTuple, u8>`: sockets that sent a message through the TCP stack because
    /// their peer was not in `ACCELERATED_SOCKETS` yet; they never switch to redirection, which
    /// could overtake their unread TCP bytes (pinned).
    pub const TCP_ONLY_SENDERS: &str = "TCP_ONLY_SENDERS";
    /// Global `u8`: 1 = sock_ops adds pod <-> agent sockets to `ACCELERATED_SOCKETS`.
    pub const SOCKMAP_ACCELERATION: &str = "SOCKMAP_ACCELERATION";
    /// Program names (their function names in `src/main.rs`).
    pub const CONNECT4_PROGRAM: &str = "redirect_connect4";
    pub const CONNECT6_PROGRAM: &str = "redirect_connect6";
    pub const SOCK_OPS_PROGRAM: &str = "track_redirected";
    pub const GETPEERNAME4_PROGRAM: &str = "original_peer4";
    pub const GETPEERNAME6_PROGRAM: &str = "original_peer6";
    pub const SK_MSG_PROGRAM: &str = "accelerate_msg";

    /// `PerCpuHashMap<u64 cgroup id, StrictPodCounters>`: meshed pod cgroups whose inbound
    /// policy is strict, with what the kernel refused them on each CPU (pinned).
    pub const STRICT_PODS: &str = "STRICT_PODS";
    /// `HashMap<u32 IPv4, u8>`: the addresses of those pods; connects to them from the node or
    /// the agent are recorded as trusted (pinned).
    pub const STRICT_POD_ADDRESSES: &str = "STRICT_POD_ADDRESSES";
    /// `LruHashMap<u64 socket cookie, u8>`: trusted connects, connect4 → sock_ops hand-over
    /// (pinned).
    pub const TRUSTED_SOCKETS: &str = "TRUSTED_SOCKETS";
    /// `LruHashMap<SocketTuple, u8>`: open connections from the node or the agent to strict pods,
    /// keyed by the tuple the connecting socket sees, written before its SYN leaves (pinned).
    pub const TRUSTED_CONNECTIONS: &str = "TRUSTED_CONNECTIONS";
    /// `LruHashMap<InboundFlow, u64 ktime ns>`: connection attempts refused lately, so that a
    /// client's SYN retransmissions are not counted and reported again (pinned).
    pub const REFUSED_FLOWS: &str = "REFUSED_FLOWS";
    /// `RingBuf` of [`InboundRefusal`](super::InboundRefusal): every refused connection attempt,
    /// for the agent's tap, access log and admin API (pinned).
    pub const INBOUND_REFUSALS: &str = "INBOUND_REFUSALS";
    /// `LpmTrie<PlaintextSource, u8>`: the plaintext sources a strict pod admits although they
    /// are not trusted (its authorization policies allow them), as [`plaintext`] decisions
    /// (pinned).
    pub const PLAINTEXT_ACCESS: &str = "PLAINTEXT_ACCESS";
    /// cgroup_skb/ingress program dropping untrusted connection attempts to strict pods.
    pub const STRICT_INBOUND_PROGRAM: &str = "enforce_strict_inbound";
}

/// Capacity of the pinned maps. The redirect maps are LRU so that even records nobody collects
/// (the agent died between a pod's connect and its accept) cannot fill them up.
pub mod capacity {
    pub const MESHED_PODS: u32 = 4096;
    /// kubepods and its two QoS children, for both cgroup drivers and a nested root slice.
    pub const POD_PARENT_CGROUPS: u32 = 64;
    pub const AGENT_CGROUPS: u32 = 16;
    pub const UNMESHED_PODS: u32 = 4096;
    pub const REDIRECT_BY_COOKIE: u32 = 65536;
    pub const REDIRECT_BY_CONNECTION: u32 = 65536;
    pub const EXCLUDED_PORTS: u32 = 64;
    pub const EXCLUDED_CIDRS: u32 = 64;
    pub const ORIGINAL_DST_BY_COOKIE: u32 = 65536;
    /// Two sockets per accelerated connection.
    pub const ACCELERATED_SOCKETS: u32 = 131072;
    pub const TCP_ONLY_SENDERS: u32 = 65536;
    pub const STRICT_PODS: u32 = 4096;
    pub const STRICT_POD_ADDRESSES: u32 = 4096;
    pub const TRUSTED_SOCKETS: u32 = 65536;
    pub const TRUSTED_CONNECTIONS: u32 = 65536;
    pub const REFUSED_FLOWS: u32 = 16384;
    /// Every (port, network) region of every pod the agent enforces authorization policies
    /// for in the kernel; a pod whose regions do not fit gets none (all plaintext refused).
    pub const PLAINTEXT_ACCESS: u32 = 65536;
    /// Bytes (a power of two, a multiple of the page size): 5,461 refusals of 48 bytes (plus
    /// an 8-byte header each) wait for the agent.
    pub const INBOUND_REFUSALS_BYTES: u32 = 256 * 1024;
}

/// Values of [`RedirectRecord::source`]: what connect4 knew about the connecting pod.
pub mod record_source {
    /// The pod's cgroup (or an ancestor) is in `MESHED_PODS`.
    pub const MESHED_POD: u8 = 0;
    /// A pod cgroup in none of the agent's maps: a pod the agent has not resolved yet. The agent
    /// must find it in its registry before routing the connection.
    pub const UNKNOWN_POD: u8 = 1;
}

/// What connect4 knew about a redirected connection: where the pod wanted to go, which pod
/// cgroup (as the kernel reports it) made the connection, and whether that pod was known to be
/// meshed ([`record_source`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectRecord {
    pub source_cgroup: u64,
    pub original_ip4: u32,
    pub original_port: u16,
    pub source: u8,
    /// Explicit padding: every byte of a map value must be initialised.
    pub reserved: u8,
}

impl RedirectRecord {
    pub const fn new(
        source_cgroup: u64,
        source: u8,
        original_ip4: u32,
        original_port: u16,
    ) -> Self {
        Self {
            source_cgroup,
            original_ip4,
            original_port,
            source,
            reserved: 0,
        }
    }

    pub fn original_dst(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::from(self.original_ip4), self.original_port)
    }
}

/// A redirected TCP connection as both ends see it: the pod's (client's) address and the agent
/// listener's address it was redirected to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionKey {
    pub client_ip4: u32,
    pub listener_ip4: u32,
    pub client_port: u16,
    pub listener_port: u16,
}

impl ConnectionKey {
    pub const fn new(
        client_ip4: u32,
        client_port: u16,
        listener_ip4: u32,
        listener_port: u16,
    ) -> Self {
        Self {
            client_ip4,
            listener_ip4,
            client_port,
            listener_port,
        }
    }

    pub fn from_addrs(client: SocketAddrV4, listener: SocketAddrV4) -> Self {
        Self::new(
            u32::from(*client.ip()),
            client.port(),
            u32::from(*listener.ip()),
            listener.port(),
        )
    }
}

/// One TCP socket's connection as that socket sees it (host-order numbers). The two sockets of a
/// local connection see each other's tuple reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketTuple {
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u16,
    pub remote_port: u16,
}

impl SocketTuple {
    pub const fn new(local_ip4: u32, local_port: u16, remote_ip4: u32, remote_port: u16) -> Self {
        Self {
            local_ip4,
            remote_ip4,
            local_port,
            remote_port,
        }
    }

    /// The same connection as the peer socket sees it.
    pub const fn reversed(&self) -> Self {
        Self::new(
            self.remote_ip4,
            self.remote_port,
            self.local_ip4,
            self.local_port,
        )
    }
}

/// `AF_INET` / `AF_INET6`, as [`InboundFlow::family`] holds them.
pub const FAMILY_IPV4: u16 = 2;
pub const FAMILY_IPV6: u16 = 10;

/// `PLAINTEXT_ACCESS` lookups: an entry's key is a [`PlaintextSource`] whose prefix covers the
/// pod and the port and `prefix_len` bits of the source network; the kernel looks a SYN's
/// (pod, destination port, source) up with every bit, and on a miss with [`plaintext::ANY_PORT`]
/// (the regions for ports no policy names). Only a hit with [`plaintext::ALLOW`] admits it.
pub mod plaintext {
    /// Bits of a key before the source address: the pod's cgroup id and the port always match
    /// in full.
    pub const EXACT_BITS: u32 = 64 + 16;
    /// Bits of a full key (an IPv4 source address at the end).
    pub const FULL_BITS: u32 = EXACT_BITS + 32;
    /// The port of the regions for every port no policy names.
    pub const ANY_PORT: u16 = 0;
    /// Values: the region's plaintext is admitted, or refused.
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 0;

    /// The prefix length of an entry for a source network of `source_prefix_len` bits.
    pub const fn prefix_len(source_prefix_len: u8) -> u32 {
        EXACT_BITS + source_prefix_len as u32
    }
}

/// The data of a `PLAINTEXT_ACCESS` key: bytes in network order, since an LPM trie matches
/// from the first byte's highest bit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlaintextSource {
    pod_cgroup: [u8; 8],
    port: [u8; 2],
    source: [u8; 4],
}

impl PlaintextSource {
    /// `source`: the address's octets as on the wire.
    pub const fn new(pod_cgroup: u64, port: u16, source: [u8; 4]) -> Self {
        Self {
            pod_cgroup: pod_cgroup.to_be_bytes(),
            port: port.to_be_bytes(),
            source,
        }
    }

    pub const fn pod_cgroup(&self) -> u64 {
        u64::from_be_bytes(self.pod_cgroup)
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }

    pub const fn source(&self) -> [u8; 4] {
        self.source
    }
}

/// A TCP connection attempt (a SYN) as it arrived at a pod: addresses as octets on the wire
/// (IPv4 in the first four), ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InboundFlow {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    /// [`FAMILY_IPV4`] or [`FAMILY_IPV6`].
    pub family: u16,
    /// Explicit padding: every byte of a map key must be initialised.
    pub reserved: u16,
}

impl InboundFlow {
    pub fn src(&self) -> core::net::SocketAddr {
        self.addr(&self.src_addr, self.src_port)
    }

    pub fn dst(&self) -> core::net::SocketAddr {
        self.addr(&self.dst_addr, self.dst_port)
    }

    fn addr(&self, octets: &[u8; 16], port: u16) -> core::net::SocketAddr {
        if self.family == FAMILY_IPV6 {
            core::net::SocketAddr::new(core::net::Ipv6Addr::from(*octets).into(), port)
        } else {
            let v4 = [octets[0], octets[1], octets[2], octets[3]];
            core::net::SocketAddr::new(Ipv4Addr::from(v4).into(), port)
        }
    }
}

/// One connection attempt the kernel refused to a strict pod (a ring buffer record).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboundRefusal {
    /// The strict pod's cgroup id (the listening socket's cgroup or its ancestor in
    /// `STRICT_PODS`).
    pub pod_cgroup: u64,
    pub flow: InboundFlow,
}

impl InboundRefusal {
    /// Decodes a ring buffer record (the program writes the struct as it lies in memory).
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != core::mem::size_of::<Self>() {
            return None;
        }
        let u16_at = |at: usize| u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        let mut pod_cgroup = [0; 8];
        pod_cgroup.copy_from_slice(&bytes[..8]);
        let mut src_addr = [0; 16];
        src_addr.copy_from_slice(&bytes[8..24]);
        let mut dst_addr = [0; 16];
        dst_addr.copy_from_slice(&bytes[24..40]);
        Some(Self {
            pod_cgroup: u64::from_ne_bytes(pod_cgroup),
            flow: InboundFlow {
                src_addr,
                dst_addr,
                src_port: u16_at(40),
                dst_port: u16_at(42),
                family: u16_at(44),
                reserved: u16_at(46),
            },
        })
    }
}

/// What the kernel counted for one strict pod (on one CPU: `STRICT_PODS` is per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StrictPodCounters {
    /// Connection attempts refused (a client's SYN retransmissions count once).
    pub refused: u64,
    /// Of those, attempts whose report did not fit in the ring buffer (the agent fell behind).
    pub unreported: u64,
}

#[cfg(feature = "user")]
mod pod {
    #![allow(unsafe_code)]
    use super::{
        ConnectionKey, InboundFlow, InboundRefusal, PlaintextSource, RedirectRecord, SocketTuple,
        StrictPodCounters,
    };

    // SAFETY: `#[repr(C)]`, only integer fields, no implicit padding (explicit `reserved`), so
    // every bit pattern is valid and every byte is initialised.
    unsafe impl aya::Pod for RedirectRecord {}
    // SAFETY: `#[repr(C)]`, two u32 then two u16: 12 bytes with no padding, all integers.
    unsafe impl aya::Pod for ConnectionKey {}
    // SAFETY: `#[repr(C)]`, two u32 then two u16: 12 bytes with no padding, all integers.
    unsafe impl aya::Pod for SocketTuple {}
    // SAFETY: `#[repr(C)]`, two 16-byte arrays then four u16: 40 bytes with no padding.
    unsafe impl aya::Pod for InboundFlow {}
    // SAFETY: `#[repr(C)]`, a u64 then a 40-byte InboundFlow: 48 bytes with no padding.
    unsafe impl aya::Pod for InboundRefusal {}
    // SAFETY: `#[repr(C)]`, two u64: 16 bytes with no padding.
    unsafe impl aya::Pod for StrictPodCounters {}
    // SAFETY: `#[repr(C)]`, byte arrays only (8 + 2 + 4): 14 bytes, alignment 1, no padding.
    unsafe impl aya::Pod for PlaintextSource {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<RedirectRecord>(), 16);
        assert_eq!(core::mem::size_of::<ConnectionKey>(), 12);
        assert_eq!(core::mem::size_of::<SocketTuple>(), 12);
        assert_eq!(core::mem::size_of::<InboundFlow>(), 40);
        assert_eq!(core::mem::size_of::<InboundRefusal>(), 48);
        assert_eq!(core::mem::size_of::<StrictPodCounters>(), 16);
        assert_eq!(core::mem::size_of::<PlaintextSource>(), 14);
    }

    #[test]
    fn plaintext_sources_are_matched_from_the_pod_over_the_port_to_the_address() {
        let key = PlaintextSource::new(0x0102_0304_0506_0708, 8080, [10, 244, 1, 7]);
        // The bytes in the order the trie matches them.
        let PlaintextSource {
            pod_cgroup,
            port,
            source,
        } = key;
        assert_eq!(pod_cgroup, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(port, [0x1f, 0x90]);
        assert_eq!(source, [10, 244, 1, 7]);
        assert_eq!(
            (key.pod_cgroup(), key.port(), key.source()),
            (0x0102_0304_0506_0708, 8080, [10, 244, 1, 7])
        );
        assert_eq!(plaintext::prefix_len(0), plaintext::EXACT_BITS);
        assert_eq!(plaintext::prefix_len(32), plaintext::FULL_BITS);
        assert_eq!(
            plaintext::FULL_BITS as usize,
            core::mem::size_of::<PlaintextSource>() * 8
        );
    }

    #[test]
    fn inbound_flows_name_their_addresses_in_either_family() {
        let mut flow = InboundFlow {
            src_addr: [0; 16],
            dst_addr: [0; 16],
            src_port: 40000,
            dst_port: 8080,
            family: FAMILY_IPV4,
            reserved: 0,
        };
        flow.src_addr[..4].copy_from_slice(&[10, 244, 1, 4]);
        flow.dst_addr[..4].copy_from_slice(&[10, 244, 1, 2]);
        assert_eq!(flow.src(), "10.244.1.4:40000".parse().unwrap());
        assert_eq!(flow.dst(), "10.244.1.2:8080".parse().unwrap());
        let refusal = InboundRefusal {
            pod_cgroup: 0x1234_5678_9abc,
            flow,
        };
        let mut bytes = [0u8; 48];
        bytes[..8].copy_from_slice(&refusal.pod_cgroup.to_ne_bytes());
        bytes[8..24].copy_from_slice(&flow.src_addr);
        bytes[24..40].copy_from_slice(&flow.dst_addr);
        bytes[40..42].copy_from_slice(&flow.src_port.to_ne_bytes());
        bytes[42..44].copy_from_slice(&flow.dst_port.to_ne_bytes());
        bytes[44..46].copy_from_slice(&flow.family.to_ne_bytes());
        assert_eq!(InboundRefusal::from_bytes(&bytes), Some(refusal));
        assert_eq!(InboundRefusal::from_bytes(&bytes[..47]), None);
        flow.family = FAMILY_IPV6;
        flow.src_addr = core::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(flow.src(), "[::1]:40000".parse().unwrap());
    }

    #[test]
    fn a_reversed_tuple_is_the_peer_socket_view() {
        let client = SocketTuple::new(0x0af4_0002, 40000, 0xac12_0002, 15001);
        assert_eq!(
            client.reversed(),
            SocketTuple::new(0xac12_0002, 15001, 0x0af4_0002, 40000)
        );
        assert_eq!(client.reversed().reversed(), client);
    }

    #[test]
    fn converts_socket_addresses_to_host_order_numbers() {
        let key = ConnectionKey::from_addrs(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 40000),
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 15001),
        );
        assert_eq!(
            key,
            ConnectionKey::new(0x0a00_0002, 40000, 0x0a00_0001, 15001)
        );
        let record = RedirectRecord::new(7, record_source::MESHED_POD, 0x0afa_0063, 80);
        assert_eq!(
            record.original_dst(),
            SocketAddrV4::new(Ipv4Addr::new(10, 250, 0, 99), 80)
        );
    }
}
