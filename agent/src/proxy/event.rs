//! What the engine reports about each proxied connection: one structured
//! access-log line at close (tracing target `sealmesh_agent::access`, so
//! `--log-level sealmesh_agent::access=off` silences it), and open/close
//! `ConnectionEvent`s on a broadcast channel that tap, edges and metrics
//! subscribe to. Connection attempts the kernel refused (strict inbound
//! policy) reach tap as `Refused` events too, through
//! [`ProxyHandle::publish_refusal`](super::ProxyHandle::publish_refusal).

use std::{
    net::SocketAddr,
    os::fd::OwnedFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use sealmesh_common::{
    authz::{Decider, Verdict},
    consts::ACCESS_LOG_TARGET,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::registry::Workload;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// A local pod's connection, redirected to the outbound listener.
    Outbound,
    /// An HBONE stream from another agent to a local pod.
    Inbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Open,
    Close,
    /// Refused before reaching the pod (see `refused_reason`); no open or
    /// close follows.
    Refused,
}

/// Why a connection was refused before it opened (nothing reached the
/// destination); one value per refusal path of the agent and the kernel.
/// The values are stable: tap, the access log (`refused_reason`) and the
/// `no_tls_reason` label of `sealmesh_tcp_refused_total` carry them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// Outbound: the source cgroup is no pod of this node the agent knows,
    /// also after waiting `--pod-resolve-timeout` for it.
    UnknownSource,
    /// Outbound: the destination is in the cluster's pod or Service
    /// networks but no pod or Service endpoint the agent knows, also after
    /// waiting.
    UnknownDestination,
    /// Outbound: plaintext (to an unmeshed pod or outside the cluster) that
    /// `--deny-plaintext` does not exempt.
    PlaintextDenied,
    /// Outbound: a pod's plaintext to this node's restricted metrics port.
    ProtectedLocalPort,
    /// The destination pod's inbound policy is strict and the attempt did
    /// not come through its node's agent, the node itself or its loopback
    /// (refused by the kernel, or by the agent for an unmeshed pod's
    /// connection it carries).
    StrictInbound,
    /// Outbound: the source's ServiceAccount holds no valid certificate on
    /// this node (fail closed, never plaintext).
    NoSourceCertificate,
    /// Outbound, same node: the destination's ServiceAccount holds no valid
    /// certificate on this node.
    NoDestinationCertificate,
    /// TCP to the peer agent failed, or a dial to it failed just before for
    /// another connection.
    PeerUnreachable,
    /// The peer agent did not complete the handshakes, or did not answer
    /// the CONNECT, within the connect timeout.
    PeerTimeout,
    /// The TLS handshake with the peer agent failed, or it did not speak h2.
    PeerHandshakeFailed,
    /// The peer agent proved another identity than the destination's.
    WrongPeerIdentity,
    /// The HBONE (HTTP/2) connection or stream failed before the stream was
    /// admitted (outbound), or before the reply went out (inbound).
    HboneFailed,
    /// The peer agent refused the CONNECT with a status that names no other
    /// reason here.
    PeerRefused,
    /// Inbound (outbound: the peer answered 405): the request is not a
    /// CONNECT.
    NotConnect,
    /// Inbound (outbound: 400): the CONNECT authority is not an IPv4
    /// address:port.
    BadAuthority,
    /// Inbound (outbound: 404): the target is no meshed pod of the node.
    NotLocalMeshedPod,
    /// Inbound (outbound: 403): the target pod runs as another identity than
    /// the client asked for (SNI).
    IdentityMismatch,
    /// Connecting to the destination pod failed (inbound; outbound direct,
    /// or the peer answered 502).
    TargetUnreachable,
    /// The destination pod refused the TCP connection (outbound: also the
    /// peer's 503).
    TargetRefused,
    /// Connecting to the destination pod timed out (outbound: also the
    /// peer's 504).
    TargetTimeout,
    /// An authorization policy of the destination pod denies the source
    /// (inbound, outbound same-node, the kernel for plaintext; outbound
    /// HBONE: the peer answered 403 naming a policy). The event's `authz`
    /// names the policy and rule.
    PolicyDenied,
    /// The agent stopped handling the connection before it opened (cut at
    /// shutdown).
    Aborted,
}

impl RefusalReason {
    /// Every reason, for the tests that check their values.
    #[cfg(test)]
    pub(crate) const ALL: [Self; 22] = [
        Self::UnknownSource,
        Self::UnknownDestination,
        Self::PlaintextDenied,
        Self::ProtectedLocalPort,
        Self::StrictInbound,
        Self::NoSourceCertificate,
        Self::NoDestinationCertificate,
        Self::PeerUnreachable,
        Self::PeerTimeout,
        Self::PeerHandshakeFailed,
        Self::WrongPeerIdentity,
        Self::HboneFailed,
        Self::PeerRefused,
        Self::NotConnect,
        Self::BadAuthority,
        Self::NotLocalMeshedPod,
        Self::IdentityMismatch,
        Self::TargetUnreachable,
        Self::TargetRefused,
        Self::TargetTimeout,
        Self::PolicyDenied,
        Self::Aborted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownSource => "unknown_source",
            Self::UnknownDestination => "unknown_destination",
            Self::PlaintextDenied => "plaintext_denied",
            Self::ProtectedLocalPort => "protected_local_port",
            Self::StrictInbound => "strict_inbound",
            Self::NoSourceCertificate => "no_source_certificate",
            Self::NoDestinationCertificate => "no_destination_certificate",
            Self::PeerUnreachable => "peer_unreachable",
            Self::PeerTimeout => "peer_timeout",
            Self::PeerHandshakeFailed => "peer_handshake_failed",
            Self::WrongPeerIdentity => "wrong_peer_identity",
            Self::HboneFailed => "hbone_failed",
            Self::PeerRefused => "peer_refused",
            Self::NotConnect => "not_connect",
            Self::BadAuthority => "bad_authority",
            Self::NotLocalMeshedPod => "not_local_meshed_pod",
            Self::IdentityMismatch => "identity_mismatch",
            Self::TargetUnreachable => "target_unreachable",
            Self::TargetRefused => "target_refused",
            Self::TargetTimeout => "target_timeout",
            Self::PolicyDenied => "policy_denied",
            Self::Aborted => "aborted",
        }
    }
}

/// Why a connection was not carried over mTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoTlsReason {
    /// Both pods are meshed and on this node: connected directly after the
    /// same identity checks (the bytes never leave the host).
    SecuredLocal,
    /// The destination (or, for a pod the kernel redirected before the agent
    /// knew it, the source) is a pod that is not meshed.
    NotMeshed,
    /// The destination is neither a pod nor a Service of the cluster.
    OutsideCluster,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Outbound => "outbound",
            Self::Inbound => "inbound",
        }
    }
}

impl NoTlsReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecuredLocal => "secured_local",
            Self::NotMeshed => "not_meshed",
            Self::OutsideCluster => "outside_cluster",
        }
    }
}

/// A pod as events name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn of(w: &Workload) -> Self {
        Self {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
        }
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One connection's open or close. Identities are SPIFFE URIs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionEvent {
    /// Unique per agent run; open and close of one connection share it.
    pub id: u64,
    pub phase: Phase,
    pub direction: Direction,
    /// Unix time of the event, in milliseconds.
    pub timestamp_ms: u64,
    /// The source pod's address; for inbound, the peer agent's when the
    /// source pod could not be verified.
    pub src_addr: SocketAddr,
    /// Where the bytes go (the pod endpoint after Service resolution).
    pub dst_addr: Option<SocketAddr>,
    pub src: Option<PodRef>,
    pub dst: Option<PodRef>,
    pub client_id: Option<String>,
    pub server_id: Option<String>,
    pub tls: bool,
    pub no_tls_reason: Option<NoTlsReason>,
    /// Bytes from the source to the destination (0 at open).
    pub bytes_src_to_dst: u64,
    /// Bytes from the destination back to the source (0 at open).
    pub bytes_dst_to_src: u64,
    /// How long the connection lived (0 at open).
    pub duration_ms: u64,
    /// Why the connection was refused or broke; None for a clean close.
    pub error: Option<String>,
    /// Set exactly when the connection was refused before it opened: on
    /// `Refused` events and on the close of a connection that never opened.
    pub refused_reason: Option<RefusalReason>,
    /// What the destination's authorization policies said, when there is
    /// something to say: a denial, or a dry-run policy that would deny.
    /// Boxed: most connections have nothing here.
    pub authz: Option<Box<AuthzNote>>,
}

/// A policy (`<namespace>/<name>`) and the index of its rule that decided
/// (None: the policy as a whole, e.g. an ALLOW policy none of whose rules
/// matched).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRule {
    pub policy: String,
    pub rule: Option<u32>,
}

impl PolicyRule {
    fn of(decider: &Decider) -> Self {
        Self {
            policy: decider.policy.name.to_string(),
            rule: decider.rule.and_then(|rule| u32::try_from(rule).ok()),
        }
    }
}

impl std::fmt::Display for PolicyRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.policy)?;
        match self.rule {
            Some(rule) => write!(f, " rule {rule}"),
            None => Ok(()),
        }
    }
}

/// The authorization outcome worth reporting for one connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthzNote {
    /// The enforced policy that denied the connection.
    pub denied: Option<PolicyRule>,
    /// A dry-run policy that would have denied the (allowed) connection.
    pub dry_run_denied: Option<PolicyRule>,
}

impl AuthzNote {
    /// None when the verdict allows and no dry-run policy objects.
    pub fn of(verdict: &Verdict) -> Option<Box<Self>> {
        let denied = verdict.denied_by().map(PolicyRule::of);
        let dry_run_denied = verdict.dry_run_denial.as_ref().map(PolicyRule::of);
        (denied.is_some() || dry_run_denied.is_some()).then(|| {
            Box::new(Self {
                denied,
                dry_run_denied,
            })
        })
    }
}

impl ConnectionEvent {
    /// What every event has; the rest is filled in as it is learned.
    pub fn new(id: u64, phase: Phase, direction: Direction, src_addr: SocketAddr) -> Self {
        Self {
            id,
            phase,
            direction,
            timestamp_ms: 0,
            src_addr,
            dst_addr: None,
            src: None,
            dst: None,
            client_id: None,
            server_id: None,
            tls: false,
            no_tls_reason: None,
            bytes_src_to_dst: 0,
            bytes_dst_to_src: 0,
            duration_ms: 0,
            error: None,
            refused_reason: None,
            authz: None,
        }
    }
}

/// Byte counters both splice directions update (once per chunk, not per byte).
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub src_to_dst: AtomicU64,
    pub dst_to_src: AtomicU64,
}

/// Sees what the engine reports, synchronously, on the connection's own task:
/// for state that must not miss an event (open connections, edges, metrics),
/// where a lagging broadcast subscriber would. Implementations must be quick
/// and never block (no I/O, short critical sections).
pub trait ConnectionObserver: Send + Sync + 'static {
    /// The path to the destination is up; `bytes` counts live until close.
    fn connection_opened(&self, event: &Arc<ConnectionEvent>, bytes: &Arc<ByteCounters>);
    /// The connection ended (`opened`), or was refused before it opened.
    fn connection_closed(&self, event: &ConnectionEvent, opened: bool);
    /// A TLS handshake with a peer agent completed in `elapsed`.
    fn tls_handshake(&self, direction: Direction, elapsed: Duration);
}

/// The engine's observers; added while it runs, read on every event.
pub(crate) type Observers = Arc<ArcSwap<Vec<Arc<dyn ConnectionObserver>>>>;

/// Where a connection's events go: the broadcast channel and the observers.
/// The channel carries `Arc`s: its ring is allocated in full up front, and an
/// event is ~270 bytes more than a pointer (1.1 MB of resident memory per
/// agent for 4,096 slots, measured); each tap client then shares one copy.
#[derive(Clone)]
pub(crate) struct EventSink {
    pub events: broadcast::Sender<Arc<ConnectionEvent>>,
    pub observers: Observers,
}

impl EventSink {
    /// Publishes to tap clients, if one listens.
    pub(super) fn publish(&self, event: &Arc<ConnectionEvent>) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event.clone());
        }
    }

    /// Publishes an event not shared yet; builds the shared copy only if a
    /// tap client listens.
    pub(super) fn publish_copy(&self, event: &ConnectionEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(Arc::new(event.clone()));
        }
    }

    pub fn tls_handshake(&self, direction: Direction, elapsed: Duration) {
        for observer in self.observers.load().iter() {
            observer.tls_handshake(direction, elapsed);
        }
    }
}

/// Collects what is known about one connection and reports it: `open` once
/// the path to the destination is up; the close event and access-log line
/// when dropped, so a connection aborted by shutdown is still reported.
pub(crate) struct ConnectionTracker {
    sink: EventSink,
    started: Instant,
    opened: bool,
    /// Shared with the observers that keep open connections (the admin
    /// connection table) rather than copied to them; changed through
    /// [`Self::event_mut`], which copies it only if it is shared by then.
    pub event: Arc<ConnectionEvent>,
    pub bytes: Arc<ByteCounters>,
    /// A second handle on the client's socket to reset it with if the
    /// connection is refused; dropped when it opens, so an established
    /// connection costs the agent one descriptor on this side, not two.
    reset_handle: Option<OwnedFd>,
}

impl ConnectionTracker {
    pub fn new(sink: EventSink, id: u64, direction: Direction, src_addr: SocketAddr) -> Self {
        Self {
            sink,
            started: Instant::now(),
            opened: false,
            event: Arc::new(ConnectionEvent::new(id, Phase::Open, direction, src_addr)),
            bytes: Arc::default(),
            reset_handle: None,
        }
    }

    /// Keeps `handle` (a duplicate of the client's socket) until the
    /// connection opens, for [`Self::reset_handle`].
    pub fn keep_reset_handle(&mut self, handle: OwnedFd) {
        self.reset_handle = Some(handle);
    }

    /// The client's socket while the connection has not opened (to reset it
    /// on refusal); `None` once it opened.
    pub fn reset_handle(&self) -> Option<&OwnedFd> {
        self.reset_handle.as_ref()
    }

    /// The event, to change: copied first if an observer shares it (after
    /// the open; before it, the tracker holds the only reference).
    pub fn event_mut(&mut self) -> &mut ConnectionEvent {
        Arc::make_mut(&mut self.event)
    }

    pub fn set_src(&mut self, w: &Workload) {
        self.event_mut().src = Some(PodRef::of(w));
    }

    pub fn set_dst(&mut self, addr: SocketAddr, w: Option<&Workload>) {
        let event = self.event_mut();
        event.dst_addr = Some(addr);
        event.dst = w.map(PodRef::of);
    }

    /// The connection broke after it opened.
    pub fn fail(&mut self, error: impl std::fmt::Display) {
        self.event_mut().error = Some(error.to_string());
    }

    /// The connection is refused before it opened, for `reason`.
    pub fn refuse(&mut self, reason: RefusalReason, error: impl std::fmt::Display) {
        debug_assert!(!self.opened, "refusing an open connection");
        let event = self.event_mut();
        event.refused_reason = Some(reason);
        event.error = Some(error.to_string());
    }

    /// Whether the path to the destination came up ([`Self::open`]).
    pub fn is_open(&self) -> bool {
        self.opened
    }

    /// Reports the open event to the observers, and to tap clients if any.
    pub fn open(&mut self) {
        self.opened = true;
        self.reset_handle = None;
        // The close event overwrites phase and timestamp.
        let event = self.event_mut();
        event.phase = Phase::Open;
        event.timestamp_ms = unix_ms(SystemTime::now());
        for observer in self.sink.observers.load().iter() {
            observer.connection_opened(&self.event, &self.bytes);
        }
        self.sink.publish(&self.event);
    }
}

impl Drop for ConnectionTracker {
    fn drop(&mut self) {
        let e = Arc::make_mut(&mut self.event);
        e.phase = Phase::Close;
        e.timestamp_ms = unix_ms(SystemTime::now());
        e.bytes_src_to_dst = self.bytes.src_to_dst.load(Ordering::Relaxed);
        e.bytes_dst_to_src = self.bytes.dst_to_src.load(Ordering::Relaxed);
        e.duration_ms = duration_ms(self.started.elapsed());
        if !self.opened && e.refused_reason.is_none() {
            // Every path that refuses says why; a connection dropped
            // unopened without one was cut by shutdown.
            e.refused_reason = Some(RefusalReason::Aborted);
            e.error
                .get_or_insert_with(|| "the agent stopped before the connection opened".to_owned());
        }
        access_log(e, self.opened);
        // Observers first, so a tap subscriber that sees the close finds the
        // edges and metrics already updated.
        for observer in self.sink.observers.load().iter() {
            observer.connection_closed(e, self.opened);
        }
        self.sink.publish(&self.event);
    }
}

fn access_log(e: &ConnectionEvent, opened: bool) {
    let opt = |v: &Option<PodRef>| v.as_ref().map(ToString::to_string).unwrap_or_default();
    let reason = e.no_tls_reason.map(NoTlsReason::as_str).unwrap_or("");
    let direction = e.direction.as_str();
    macro_rules! log {
        ($level:ident) => {
            tracing::$level!(
                target: ACCESS_LOG_TARGET,
                id = e.id,
                direction,
                src_addr = %e.src_addr,
                dst_addr = e.dst_addr.map(|a| a.to_string()).unwrap_or_default(),
                src = opt(&e.src),
                dst = opt(&e.dst),
                client_id = e.client_id.as_deref().unwrap_or(""),
                server_id = e.server_id.as_deref().unwrap_or(""),
                tls = e.tls,
                no_tls_reason = reason,
                refused_reason = e.refused_reason.map(RefusalReason::as_str),
                denied_by = e.authz.as_ref().and_then(|a| a.denied.as_ref()).map(|d| d.to_string()),
                dry_run_denied_by = e.authz.as_ref().and_then(|a| a.dry_run_denied.as_ref()).map(|d| d.to_string()),
                bytes_src_to_dst = e.bytes_src_to_dst,
                bytes_dst_to_src = e.bytes_dst_to_src,
                duration_ms = e.duration_ms,
                error = e.error.as_deref().unwrap_or(""),
                "connection closed"
            )
        };
    }
    // A refusal is worth a warning; a connection that carried bytes and then
    // broke is routine in a mesh (peers reset) and logged at info.
    if e.error.is_some() && !opened {
        log!(warn);
    } else {
        log!(info);
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(duration_ms)
        .unwrap_or_default()
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(events: broadcast::Sender<Arc<ConnectionEvent>>) -> EventSink {
        EventSink {
            events,
            observers: Observers::default(),
        }
    }

    #[test]
    fn reports_open_then_close_with_counts() {
        let (tx, mut rx) = broadcast::channel(4);
        let mut t = ConnectionTracker::new(
            sink(tx),
            7,
            Direction::Outbound,
            "10.0.0.1:5000".parse().unwrap(),
        );
        t.event_mut().tls = true;
        t.open();
        t.bytes.src_to_dst.fetch_add(10, Ordering::Relaxed);
        t.bytes.dst_to_src.fetch_add(20, Ordering::Relaxed);
        drop(t);
        let open = rx.try_recv().unwrap();
        assert_eq!(
            (open.id, open.phase, open.bytes_src_to_dst),
            (7, Phase::Open, 0)
        );
        let close = rx.try_recv().unwrap();
        assert_eq!(close.phase, Phase::Close);
        assert_eq!((close.bytes_src_to_dst, close.bytes_dst_to_src), (10, 20));
        assert!(close.tls);
    }

    #[test]
    fn a_refusal_closes_with_its_reason_and_a_connection_dropped_unopened_as_aborted() {
        let (tx, mut rx) = broadcast::channel(8);
        let src = "10.0.0.1:5000".parse().unwrap();
        let mut refused = ConnectionTracker::new(sink(tx.clone()), 1, Direction::Outbound, src);
        refused.refuse(
            RefusalReason::PlaintextDenied,
            "plaintext to 10.0.0.9:80 (not_meshed) is denied by --deny-plaintext",
        );
        drop(refused);
        let close = rx.try_recv().unwrap();
        assert_eq!(close.phase, Phase::Close);
        assert_eq!(close.refused_reason, Some(RefusalReason::PlaintextDenied));
        assert_eq!(
            close.error.as_deref(),
            Some("plaintext to 10.0.0.9:80 (not_meshed) is denied by --deny-plaintext")
        );

        drop(ConnectionTracker::new(
            sink(tx.clone()),
            2,
            Direction::Inbound,
            src,
        ));
        let cut = rx.try_recv().unwrap();
        assert_eq!(cut.refused_reason, Some(RefusalReason::Aborted));
        assert_eq!(
            cut.error.as_deref(),
            Some("the agent stopped before the connection opened")
        );

        let mut broken = ConnectionTracker::new(sink(tx), 3, Direction::Outbound, src);
        broken.open();
        broken.fail("connection reset by peer");
        drop(broken);
        let _open = rx.try_recv().unwrap();
        let close = rx.try_recv().unwrap();
        assert_eq!(close.refused_reason, None, "it opened: not a refusal");
        assert_eq!(close.error.as_deref(), Some("connection reset by peer"));
    }

    #[test]
    fn the_reset_handle_is_kept_only_until_the_connection_opens() {
        let (tx, _rx) = broadcast::channel(4);
        let mut t = ConnectionTracker::new(
            sink(tx),
            1,
            Direction::Outbound,
            "10.0.0.1:5000".parse().unwrap(),
        );
        let (socket, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        t.keep_reset_handle(OwnedFd::from(socket));
        assert!(t.reset_handle().is_some());
        t.open();
        assert!(t.reset_handle().is_none(), "dropped at open");
    }

    #[test]
    fn serialises_with_snake_case_names() {
        let (tx, _rx) = broadcast::channel(1);
        let mut t = ConnectionTracker::new(
            sink(tx),
            1,
            Direction::Inbound,
            "10.0.0.1:5000".parse().unwrap(),
        );
        t.event_mut().no_tls_reason = Some(NoTlsReason::NotMeshed);
        let json = serde_json::to_value(&*t.event).unwrap();
        assert_eq!(json["direction"], "inbound");
        assert_eq!(json["no_tls_reason"], "not_meshed");
        let back: ConnectionEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, *t.event);
    }
}
