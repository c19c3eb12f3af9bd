//! The TLS engine: the outbound listener that redirected pod connections
//! reach, the inbound HBONE listener, the pool of HBONE connections between
//! them, and the per-connection events and access log.
//!
//! ```text
//! pod ──redirect──▶ outbound (node IP:15001) ──HBONE pool──▶ peer inbound (node IP:15008) ──TCP──▶ pod
//! ```

mod authz;
mod event;
mod hbone;
mod inbound;
mod log_limit;
mod outbound;
mod pool;
mod splice;

use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use rustls_pki_types::CertificateDer;
use sealmesh_common::{
    consts::{HBONE_PORT, OUTBOUND_PORT},
    identity::Identity,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{OwnedSemaphorePermit, Semaphore, broadcast, watch},
    task::JoinSet,
};

pub use event::{
    AuthzNote, ByteCounters, ConnectionEvent, ConnectionObserver, Direction, NoTlsReason, Phase,
    PodRef, PolicyRule, RefusalReason,
};
pub use inbound::InboundRefusal;
pub use outbound::OutboundError;
pub use pool::{HboneConnectionInfo, PeerDialFailed};
pub use splice::SpliceError;

use crate::{
    certs::{CertStore, NoCertificate},
    config::{PlaintextExemptions, Policy},
    ebpf::RedirectTable,
    handover::Listeners,
    registry::WorkloadRegistry,
    tls::{PeerRole, TlsError},
};

/// At most this many refusal lines per window are logged.
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
const REFUSAL_LOG_BURST: u32 = 10;
/// How long a connection waits for the registry to learn its unknown pod:
/// the kubelet creates a pod's cgroup, and reports its IP, moments after the
/// API has the pod, which the agent watches.
pub const DEFAULT_POD_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection events kept for slow subscribers before they lag.
const EVENT_BUFFER: usize = 4096;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The certificates the engine presents and verifies with. `CertStore` is
/// the production implementation; a seam so the engine can be driven by
/// any source of rustls configurations.
pub trait TlsCredentials: Send + Sync + 'static {
    /// Client config presenting `source`'s certificate; Err (fail closed)
    /// when `source` has no valid certificate.
    fn client_config(&self, source: &Identity) -> Result<Arc<rustls::ClientConfig>, NoCertificate>;
    /// Server config choosing the local identity's certificate by SNI and
    /// requiring a client certificate chaining to the trust anchors.
    fn server_config(&self) -> Arc<rustls::ServerConfig>;
    fn has_valid_cert(&self, id: &Identity) -> bool;
    /// For the ServiceAccount of a local meshed pod whose first certificate
    /// is still to come (a new pod's), a receiver marked changed at the next
    /// installation: connections of and to it are held for it instead of
    /// refused. None when there is nothing to wait for.
    fn awaiting_first_certificate(&self, _id: &Identity) -> Option<watch::Receiver<u64>> {
        None
    }
    /// NotAfter of the certificate `client_config` presents for `id`;
    /// `None` when unknown (the peer's certificate alone then bounds how
    /// long a pooled connection takes new streams).
    fn not_after(&self, id: &Identity) -> Option<SystemTime>;
    /// Marked changed whenever the trust anchors change; live connections
    /// then check their peer again with [`TlsCredentials::verify_peer_chain`].
    fn anchor_changes(&self) -> watch::Receiver<u64>;
    /// Whether a chain a peer presented at its handshake still chains to
    /// the current trust anchors.
    fn verify_peer_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: &PeerRole,
    ) -> Result<(), TlsError>;
}

impl TlsCredentials for CertStore {
    fn client_config(&self, source: &Identity) -> Result<Arc<rustls::ClientConfig>, NoCertificate> {
        CertStore::client_config(self, source)
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        CertStore::server_config(self)
    }

    fn has_valid_cert(&self, id: &Identity) -> bool {
        CertStore::has_valid_cert(self, id)
    }

    fn awaiting_first_certificate(&self, id: &Identity) -> Option<watch::Receiver<u64>> {
        CertStore::awaiting_first_certificate(self, id)
    }

    fn not_after(&self, id: &Identity) -> Option<SystemTime> {
        CertStore::not_after(self, id)
    }

    fn anchor_changes(&self) -> watch::Receiver<u64> {
        CertStore::anchor_changes(self)
    }

    fn verify_peer_chain(
        &self,
        chain: &[CertificateDer<'static>],
        role: &PeerRole,
    ) -> Result<(), TlsError> {
        CertStore::verify_peer_chain(self, chain, role)
    }
}

/// An owned copy of the chain a peer presented at its handshake.
pub(crate) fn peer_chain(certs: Option<&[CertificateDer<'_>]>) -> Vec<CertificateDer<'static>> {
    certs
        .unwrap_or_default()
        .iter()
        .map(|cert| cert.clone().into_owned())
        .collect()
}

/// Resolves, with the reason, once the trust anchors changed so that
/// `chain` (what the peer of a live connection presented at its handshake)
/// no longer chains to them: that connection must end. Checks once at
/// once, in case the anchors changed since the handshake.
pub(crate) async fn peer_distrusted(
    credentials: Arc<dyn TlsCredentials>,
    chain: Vec<CertificateDer<'static>>,
    role: PeerRole,
) -> TlsError {
    let mut changes = credentials.anchor_changes();
    changes.mark_changed();
    loop {
        if changes.changed().await.is_err() {
            // The credentials are gone with the engine: nothing changes any more.
            return std::future::pending().await;
        }
        if let Err(error) = credentials.verify_peer_chain(&chain, &role) {
            return error;
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Where redirected pod connections arrive (node IP:OUTBOUND_PORT).
    pub outbound_listen: SocketAddrV4,
    /// Where peers' HBONE connections arrive (node IP:HBONE_PORT).
    pub inbound_listen: SocketAddrV4,
    /// Port of the peers' inbound listeners.
    pub hbone_port: u16,
    pub policy: Policy,
    /// Ports of this node's own listeners that pods may not reach through
    /// the agent (the restricted metrics port): a pod's plaintext passthrough
    /// leaves from the node's address, which such a listener admits.
    pub protected_local_ports: Vec<u16>,
    /// Limit on TCP connect (to pods and peers) and on TLS + h2 handshakes.
    pub connect_timeout: Duration,
    /// How long open connections may finish after shutdown is requested.
    pub drain_timeout: Duration,
    /// How long a connection from (or, in the cluster's networks, to) a pod
    /// the registry does not know yet is held before it is refused.
    pub pod_resolve_timeout: Duration,
    /// What `--deny-plaintext` still lets through.
    pub plaintext_exemptions: PlaintextExemptions,
    /// Open connections each listener may hold; beyond it accepting pauses
    /// (new connections wait in the kernel's backlog) until one closes.
    pub max_connections_per_listener: usize,
}

impl ProxyConfig {
    /// The production layout: both listeners on the node IP, well-known ports.
    pub fn for_node(node_ip: Ipv4Addr, policy: Policy) -> Self {
        Self {
            outbound_listen: SocketAddrV4::new(node_ip, OUTBOUND_PORT),
            inbound_listen: SocketAddrV4::new(node_ip, HBONE_PORT),
            hbone_port: HBONE_PORT,
            policy,
            protected_local_ports: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            pod_resolve_timeout: DEFAULT_POD_RESOLVE_TIMEOUT,
            plaintext_exemptions: PlaintextExemptions::default(),
            max_connections_per_listener: DEFAULT_MAX_CONNECTIONS_PER_LISTENER,
        }
    }
}

/// Open connections per listener unless configured: far above what a node's
/// pods open (each costs the agent a few KiB), below the agent's fd limit.
pub const DEFAULT_MAX_CONNECTIONS_PER_LISTENER: usize = 100_000;

/// The open-connection slots of one listener.
struct ListenerSlots {
    listener: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    /// Whether it is full now (said once per time it fills).
    full: bool,
}

impl ListenerSlots {
    fn new(listener: &'static str, max: usize) -> Self {
        Self {
            listener,
            max,
            slots: Arc::new(Semaphore::new(max)),
            full: false,
        }
    }

    /// A slot for the next connection; waits for one while the listener is full.
    async fn next(&mut self) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            self.no_longer_full();
            return slot;
        }
        if !self.full {
            self.full = true;
            tracing::warn!(
                listener = self.listener,
                max = self.max,
                "listener at its connection limit (--max-connections-per-listener); new connections wait in the backlog until one closes"
            );
        }
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slots are never closed");
        self.no_longer_full();
        slot
    }

    fn no_longer_full(&mut self) {
        if std::mem::take(&mut self.full) {
            tracing::info!(
                listener = self.listener,
                "listener below its connection limit; accepting again"
            );
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "cannot listen on {addr} for {what}: {source}; is another agent running on this node, or is the node IP not on this host?"
    )]
    Bind {
        what: &'static str,
        addr: SocketAddrV4,
        source: std::io::Error,
    },
}

/// What the connection handlers share.
pub(crate) struct Engine {
    cfg: ProxyConfig,
    registry: Arc<dyn WorkloadRegistry>,
    redirects: Arc<dyn RedirectTable>,
    credentials: Arc<dyn TlsCredentials>,
    pool: pool::Pool,
    sink: event::EventSink,
    /// Bounds the lines peers cause by being refused (bad handshakes, stray
    /// connections): what is refused is counted in metrics, not logged.
    refusal_log: log_limit::LogLimiter,
    next_connection_id: AtomicU64,
    /// Whether the accept loop runs (liveness).
    accepting: AtomicBool,
    /// Open connections to local pods, judged again when policies change.
    admissions: authz::OpenAdmissions,
}

impl Engine {
    fn next_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// `lookup`'s answer, asking again on every registry change until it has
/// one or `timeout` passed (None then; with a zero timeout, asks once).
async fn wait_for_registry<T>(
    registry: &dyn WorkloadRegistry,
    timeout: Duration,
    lookup: impl Fn(&dyn WorkloadRegistry) -> Option<T>,
) -> Option<T> {
    // The common case answers at once, without subscribing.
    if let Some(found) = lookup(registry) {
        return Some(found);
    }
    if timeout.is_zero() {
        return None;
    }
    // Looked at again once subscribed: a change in between is not missed.
    let mut changes = registry.subscribe();
    if let Some(found) = lookup(registry) {
        return Some(found);
    }
    tokio::time::timeout(timeout, async {
        loop {
            // The registry lives as long as the engine: a closed channel
            // means shutdown, and the connection is refused.
            changes.changed().await.ok()?;
            if let Some(found) = lookup(registry) {
                return Some(found);
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Whether `id` (a local meshed pod's ServiceAccount) holds a valid
/// certificate, waiting until `deadline` while its first one is on its way
/// from the identity service (a pod that connects, or is connected to, as it
/// starts).
async fn first_certificate_held(
    credentials: &dyn TlsCredentials,
    id: &Identity,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        if credentials.has_valid_cert(id) {
            return true;
        }
        let Some(mut changes) = credentials.awaiting_first_certificate(id) else {
            // Nothing to wait for, unless it was installed just now.
            return credentials.has_valid_cert(id);
        };
        tracing::debug!(identity = %id, "connection held for the first certificate of its ServiceAccount");
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return credentials.has_valid_cert(id),
        }
    }
}

/// A bound, not yet running engine.
pub struct Proxy {
    engine: Arc<Engine>,
    outbound: TcpListener,
    inbound: TcpListener,
}

/// Read-side access to a running engine: events and pool state.
#[derive(Clone)]
pub struct ProxyHandle {
    engine: Arc<Engine>,
}

impl ProxyHandle {
    /// Whether the engine accepts connections: from [`Proxy::run`]'s start
    /// until accepting stops (shutdown, hand-over, or a failed task).
    pub fn is_accepting(&self) -> bool {
        self.engine.accepting.load(Ordering::Acquire)
    }

    /// Open/close events of every connection from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ConnectionEvent>> {
        self.engine.sink.events.subscribe()
    }

    /// Reports every event from now on to `observer`, synchronously.
    pub fn add_observer(&self, observer: Arc<dyn ConnectionObserver>) {
        self.engine.sink.observers.rcu(|observers| {
            let mut observers = Vec::clone(observers);
            observers.push(observer.clone());
            observers
        });
    }

    /// Shows tap clients a connection attempt refused before it reached the
    /// engine (phase `Refused`), under this engine's next connection id.
    pub fn publish_refusal(&self, event: &mut ConnectionEvent) {
        event.id = self.engine.next_id();
        self.engine.sink.publish_copy(event);
    }

    /// HBONE connections currently pooled (all keys).
    pub fn pooled_connections(&self) -> usize {
        self.engine.pool.total_connections()
    }

    /// The pooled HBONE connections with their identities and handshakes.
    pub fn hbone_connections(&self) -> Vec<HboneConnectionInfo> {
        self.engine.pool.connections()
    }
}

impl Proxy {
    /// Binds both listeners; nothing is accepted until [`Proxy::run`].
    pub async fn bind(
        cfg: ProxyConfig,
        registry: Arc<dyn WorkloadRegistry>,
        redirects: Arc<dyn RedirectTable>,
        credentials: Arc<dyn TlsCredentials>,
    ) -> Result<Self, ProxyError> {
        Self::bind_from(
            cfg,
            registry,
            redirects,
            credentials,
            &mut Listeners::default(),
        )
        .await
    }

    /// Like [`Proxy::bind`], taking the listeners a previous agent handed
    /// over from `listeners`.
    pub async fn bind_from(
        cfg: ProxyConfig,
        registry: Arc<dyn WorkloadRegistry>,
        redirects: Arc<dyn RedirectTable>,
        credentials: Arc<dyn TlsCredentials>,
        listeners: &mut Listeners,
    ) -> Result<Self, ProxyError> {
        let mut listen = |what, addr: SocketAddrV4| {
            listeners
                .tcp(addr.into(), |_| listener(addr)?.into_std())
                .map_err(|source| ProxyError::Bind { what, addr, source })
        };
        let outbound = listen("outbound (redirected pod connections)", cfg.outbound_listen)?;
        let inbound = listen("inbound HBONE", cfg.inbound_listen)?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(Self {
            engine: Arc::new(Engine {
                cfg,
                registry,
                redirects,
                credentials,
                pool: pool::Pool::default(),
                sink: event::EventSink {
                    events,
                    observers: Default::default(),
                },
                refusal_log: log_limit::LogLimiter::new(REFUSAL_LOG_WINDOW, REFUSAL_LOG_BURST),
                next_connection_id: AtomicU64::new(1),
                accepting: AtomicBool::new(false),
                admissions: authz::OpenAdmissions::default(),
            }),
            outbound,
            inbound,
        })
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self_addr(&self.outbound)
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self_addr(&self.inbound)
    }

    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            engine: self.engine.clone(),
        }
    }

    /// Serves both listeners until `shutdown` resolves, then stops accepting,
    /// asks HBONE peers to finish (GOAWAY), and gives open connections
    /// `drain_timeout` to end before cutting them.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        self.run_until(shutdown, std::future::ready(())).await;
    }

    /// Like [`Proxy::run`], but after accepting stops (`stop_accepting`: the
    /// listeners were handed to a new agent) open connections may go on
    /// until `stop` resolves; then they have `drain_timeout` to end.
    pub async fn run_until(
        self,
        stop_accepting: impl Future<Output = ()> + Send,
        stop: impl Future<Output = ()> + Send,
    ) {
        let shutdown = stop_accepting;
        let Self {
            engine,
            outbound,
            inbound,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        let rejudging = {
            let engine = engine.clone();
            tokio::spawn(async move {
                authz::follow_policy_changes(&engine.admissions, engine.registry.as_ref()).await;
            })
        };
        // Dropping the handle would leave the task running.
        let _rejudging = AbortOnDrop(rejudging);
        let mut shutdown = std::pin::pin!(shutdown);
        // Known once rather than asked of every accepted socket (a syscall
        // per connection): the listener is bound to one IPv4 address.
        let SocketAddr::V4(outbound_addr) = self_addr(&outbound) else {
            unreachable!("the outbound listener is bound to an IPv4 address")
        };
        tracing::info!(
            outbound = %engine.cfg.outbound_listen,
            inbound = %engine.cfg.inbound_listen,
            "TLS engine listening"
        );
        let max = engine.cfg.max_connections_per_listener;
        let (mut outbound_slots, mut inbound_slots) = (
            ListenerSlots::new("outbound", max),
            ListenerSlots::new("inbound", max),
        );
        // Each listener accepts only while it holds a slot for the connection.
        let (mut outbound_slot, mut inbound_slot) = (None, None);
        let accepting = AcceptingFlag::raise(&engine);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                slot = outbound_slots.next(), if outbound_slot.is_none() => outbound_slot = Some(slot),
                slot = inbound_slots.next(), if inbound_slot.is_none() => inbound_slot = Some(slot),
                accepted = outbound.accept(), if outbound_slot.is_some() => match accepted {
                    Ok((socket, peer)) => {
                        let slot = outbound_slot.take();
                        let engine = engine.clone();
                        // The future is made inside the task: an async block
                        // that captured it would hold it twice (its captured
                        // copy and the one being awaited), doubling every
                        // connection's task.
                        connections.spawn(async move {
                            outbound::handle(engine, socket, peer, outbound_addr).await;
                            drop(slot);
                        });
                    }
                    Err(error) => accept_failed("outbound", error).await,
                },
                accepted = inbound.accept(), if inbound_slot.is_some() => match accepted {
                    Ok((socket, peer)) => {
                        let slot = inbound_slot.take();
                        let (engine, stop_rx) = (engine.clone(), stop_rx.clone());
                        connections.spawn(async move {
                            inbound::serve(engine, socket, peer, stop_rx).await;
                            drop(slot);
                        });
                    }
                    Err(error) => accept_failed("inbound", error).await,
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => log_task_end(done),
            }
        }
        drop(accepting);
        drop((outbound, inbound));
        let _ = stop_tx.send(true);
        tracing::info!(
            open = connections.len(),
            drain_timeout = ?engine.cfg.drain_timeout,
            "TLS engine stopped accepting; finishing open connections"
        );
        let drain_timeout = engine.cfg.drain_timeout;
        let cut = {
            let drained = async {
                while let Some(done) = connections.join_next().await {
                    log_task_end(done);
                }
            };
            let deadline = async {
                stop.await;
                tokio::time::sleep(drain_timeout).await;
            };
            tokio::select! {
                () = drained => false,
                () = deadline => true,
            }
        };
        if cut {
            tracing::warn!(
                cut = connections.len(),
                "connections still open after the drain timeout; closing them"
            );
            connections.shutdown().await;
        }
    }
}

/// Aborts a task when dropped (when the engine stops, however it ends).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The engine's accepting flag, set while the accept loop runs and cleared
/// however it ends (a panic included).
struct AcceptingFlag<'a>(&'a Engine);

impl<'a> AcceptingFlag<'a> {
    fn raise(engine: &'a Engine) -> Self {
        engine.accepting.store(true, Ordering::Release);
        Self(engine)
    }
}

impl Drop for AcceptingFlag<'_> {
    fn drop(&mut self) {
        self.0.accepting.store(false, Ordering::Release);
    }
}

/// Pending connections a listener holds: one agent takes the bursts of every
/// meshed pod of its node (the standard library's 128 is a single server's).
const LISTEN_BACKLOG: u32 = 1024;

/// A listener whose accepted sockets have TCP_NODELAY already: Linux copies
/// it from the listener, which saves a setsockopt per connection.
fn listener(addr: SocketAddrV4) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr.into())?;
    socket.listen(LISTEN_BACKLOG)
}

fn self_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

async fn accept_failed(listener: &str, error: std::io::Error) {
    tracing::error!(listener, %error, "accept failed; retrying shortly");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

fn log_task_end(done: Result<(), tokio::task::JoinError>) {
    if let Err(error) = done
        && error.is_panic()
    {
        tracing::error!(%error, "connection handler panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_listener_waits_for_a_slot_and_takes_it_when_a_connection_closes() {
        let mut slots = ListenerSlots::new("outbound", 2);
        let first = slots.next().await;
        let _second = slots.next().await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), slots.next()).await;
        assert!(waiting.is_err(), "no third slot while two are open");
        assert!(slots.full, "the limit was said");
        drop(first);
        let _third = tokio::time::timeout(Duration::from_secs(1), slots.next())
            .await
            .expect("a closed connection frees its slot");
        assert!(!slots.full);
    }

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_from_the_listener() {
        let listener = listener(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)).unwrap();
        let _client = tokio::net::TcpStream::connect(self_addr(&listener))
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
