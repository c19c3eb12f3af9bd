//! Outbound: connections of local meshed pods, redirected by eBPF to the
//! outbound listener. The source pod comes from the kernel-attested cgroup
//! in the redirect record (never from the IP); the destination decides the
//! route: HBONE to the destination's node, a direct connection between two
//! meshed pods of this node, or plaintext to what is not meshed.
//!
//! The kernel also redirects pods the agent has not classified yet (a pod
//! that just started). Such a connection is held until the registry knows
//! the pod by its cgroup, at most `pod_resolve_timeout`, then routed as that
//! pod's (an unmeshed pod's goes out as it would have without the agent), or
//! refused: never sent in plaintext on a guess. Likewise a new pod whose
//! ServiceAccount has no certificate on this node yet (nor the destination
//! pod's, on the same node) is held, at most as long, while the identity
//! service issues the first one.

use std::{
    net::{SocketAddr, SocketAddrV4},
    os::fd::AsFd,
    pin::pin,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::{SendStream, client::ResponseFuture};
use http::StatusCode;
use sealmesh_common::{
    hbone::{connect_request, denied_by},
    identity::Identity,
};
use tokio::net::{
    TcpStream,
    tcp::{OwnedReadHalf, OwnedWriteHalf},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

use super::{
    Engine,
    authz::{self, ProvenSource, Subject},
    event::{AuthzNote, ConnectionTracker, Direction, NoTlsReason, PolicyRule, RefusalReason},
    first_certificate_held, hbone, inbound, peer_chain, peer_distrusted,
    pool::{Dialed, Lease, PeerDialFailed, PoolKey},
    splice::{self, SpliceError},
    wait_for_registry,
};
use crate::{
    certs::NoCertificate,
    ebpf::{Redirect, RedirectSource},
    inbound_policy,
    registry::{Endpoint, NodeInfo, Workload},
    tls::{self, ALPN_HBONE, PeerRole, TlsError},
};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "source cgroup {cgroup} of a redirected connection is not a pod of this node the agent knows (waited {waited:?} for it); refused (fail closed): is the pod in the cluster file or the API, scheduled to this node?"
    )]
    UnknownSource { cgroup: u64, waited: Duration },
    #[error(
        "{target} is in the cluster's pod or Service networks but no pod or Service endpoint the agent knows (waited {waited:?}); refused rather than sent in plaintext to what may be a meshed pod"
    )]
    UnknownDestination {
        target: SocketAddrV4,
        waited: Duration,
    },
    #[error(
        "no valid certificate for source identity {source_id}; refusing its connection to meshed {destination} (fail closed, never plaintext): {reason}"
    )]
    NoSourceCertificate {
        source_id: Identity,
        destination: Identity,
        reason: NoCertificate,
    },
    #[error(
        "no valid certificate for destination identity {destination} on this node; refusing the secured-local connection (fail closed)"
    )]
    NoDestinationCertificate { destination: Identity },
    #[error(
        "plaintext to {target} ({reason}) is denied by --deny-plaintext; mesh the destination or drop the flag"
    )]
    PlaintextDenied {
        target: SocketAddrV4,
        reason: &'static str,
    },
    #[error(
        "{target} is this node's metrics port, which only the node itself and --metrics-allowed-cidrs may read; pods cannot reach it through the agent"
    )]
    ProtectedLocalPort { target: SocketAddrV4 },
    /// An unmeshed pod's plaintext to a local pod the kernel guards.
    #[error(transparent)]
    StrictDestination(Box<inbound_policy::PlaintextRefusal>),
    #[error("cannot connect to {target}: {source}")]
    Connect {
        target: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out connecting to {target}")]
    ConnectTimeout { target: SocketAddr },
    #[error("cannot connect to the agent at {node}: {source}")]
    PeerConnect {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("timed out connecting to the agent at {node}")]
    PeerConnectTimeout { node: SocketAddr },
    #[error("the agent at {node} did not answer CONNECT {authority} within the connect timeout")]
    ConnectUnanswered {
        node: SocketAddr,
        authority: SocketAddrV4,
    },
    #[error("mTLS handshake with the agent at {node} failed: {source}")]
    Handshake {
        node: SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent at {node} did not prove identity {expected}: {source}")]
    PeerIdentity {
        node: SocketAddr,
        expected: Identity,
        source: TlsError,
    },
    #[error("the agent at {node} presented identity {got} but {expected} was asked for; refused")]
    WrongPeer {
        node: SocketAddr,
        expected: Identity,
        got: Identity,
    },
    #[error("the agent at {node} did not negotiate ALPN h2; is it a sealmesh agent?")]
    NoH2 { node: SocketAddr },
    #[error("HBONE to {node}: {source}")]
    Hbone { node: SocketAddr, source: h2::Error },
    #[error(
        "the agent at {node} refused CONNECT {authority} with HTTP {status}{}",
        denied.as_ref().map(|d| format!(": authorization policy {d} of the destination denies this source")).unwrap_or_default()
    )]
    Refused {
        node: SocketAddr,
        authority: SocketAddrV4,
        status: StatusCode,
        /// The policy the peer named in its 403.
        denied: Option<PolicyRule>,
    },
    #[error(transparent)]
    PolicyDenied(#[from] authz::PolicyDenied),
    #[error(transparent)]
    Revoked(#[from] authz::Revoked),
    #[error("HBONE to the destination's agent: {0}")]
    PeerDialFailed(#[from] PeerDialFailed),
    #[error(transparent)]
    Splice(#[from] SpliceError),
}

impl OutboundError {
    /// Why the connection was refused, for an error before it opened; None
    /// for one that broke after it opened (a splice error).
    pub fn refusal_reason(&self) -> Option<RefusalReason> {
        Some(match self {
            Self::UnknownSource { .. } => RefusalReason::UnknownSource,
            Self::UnknownDestination { .. } => RefusalReason::UnknownDestination,
            Self::NoSourceCertificate { .. } => RefusalReason::NoSourceCertificate,
            Self::NoDestinationCertificate { .. } => RefusalReason::NoDestinationCertificate,
            Self::PlaintextDenied { .. } => RefusalReason::PlaintextDenied,
            Self::ProtectedLocalPort { .. } => RefusalReason::ProtectedLocalPort,
            Self::StrictDestination(refusal) => refusal.reason,
            Self::Connect { source, .. }
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                RefusalReason::TargetRefused
            }
            Self::Connect { .. } => RefusalReason::TargetUnreachable,
            Self::ConnectTimeout { .. } => RefusalReason::TargetTimeout,
            Self::PeerConnect { .. } | Self::PeerDialFailed(_) => RefusalReason::PeerUnreachable,
            Self::PeerConnectTimeout { .. } | Self::ConnectUnanswered { .. } => {
                RefusalReason::PeerTimeout
            }
            Self::Handshake { .. } | Self::NoH2 { .. } => RefusalReason::PeerHandshakeFailed,
            Self::PeerIdentity { .. } | Self::WrongPeer { .. } => RefusalReason::WrongPeerIdentity,
            Self::Hbone { .. } => RefusalReason::HboneFailed,
            Self::Refused {
                denied: Some(_), ..
            }
            | Self::PolicyDenied(_) => RefusalReason::PolicyDenied,
            Self::Refused { status, .. } => inbound::peer_refusal_reason(*status),
            Self::Splice(_) | Self::Revoked(_) => return None,
        })
    }
}

/// Where a redirected connection goes.
#[derive(Debug, PartialEq)]
pub(crate) enum Route {
    /// Meshed destination on another node (or this one, forced): HBONE to
    /// `node`, CONNECT to the endpoint.
    Hbone {
        endpoint: Endpoint,
        node: SocketAddr,
    },
    /// Meshed destination on this node: direct connection.
    SecuredLocal { endpoint: Endpoint },
    /// Not meshed / outside the cluster: plaintext passthrough.
    Plaintext {
        target: SocketAddrV4,
        destination: Option<Arc<Workload>>,
        reason: NoTlsReason,
    },
}

/// Chooses the route for a connection to `original_dst`, which the registry
/// resolved to `endpoint` (None: not a pod or Service of the cluster).
pub(crate) fn route(
    local: &NodeInfo,
    hbone_port: u16,
    force_mtls_local: bool,
    original_dst: SocketAddrV4,
    endpoint: Option<Endpoint>,
) -> Route {
    match endpoint {
        None => Route::Plaintext {
            target: original_dst,
            destination: None,
            reason: NoTlsReason::OutsideCluster,
        },
        Some(endpoint) if !endpoint.workload.meshed => Route::Plaintext {
            target: endpoint.addr,
            destination: Some(endpoint.workload),
            reason: NoTlsReason::NotMeshed,
        },
        Some(endpoint) if endpoint.workload.node == local.name && !force_mtls_local => {
            Route::SecuredLocal { endpoint }
        }
        Some(endpoint) => {
            let node = SocketAddr::from((endpoint.workload.node_ip, hbone_port));
            Route::Hbone { endpoint, node }
        }
    }
}

/// Serves one accepted connection on the outbound listener, whose address
/// (one IPv4 address, so every accepted socket's local address) is `listener`.
pub(crate) async fn handle(
    engine: Arc<Engine>,
    client: TcpStream,
    peer: SocketAddr,
    listener: SocketAddrV4,
) {
    let SocketAddr::V4(peer_v4) = peer else {
        tracing::warn!(%peer, "IPv6 connection on the outbound listener; only IPv4 is redirected, refused");
        return;
    };
    let Some(redirect) = engine.redirects.take(peer_v4, listener) else {
        if let Some(suppressed) = engine.refusal_log.admit() {
            tracing::warn!(
                client = %peer,
                %listener,
                suppressed,
                "connection to the outbound port without a redirect record (dialled directly, not redirected by eBPF); refused"
            );
        }
        return;
    };
    let mut tracker = ConnectionTracker::new(
        engine.sink.clone(),
        engine.next_id(),
        Direction::Outbound,
        peer,
    );
    // A second handle on the pod's socket, to reset it if the connection is
    // refused: the app then fails at once (ECONNRESET) instead of reading an
    // orderly end it could take for an empty answer. The tracker drops it
    // when the connection opens.
    if let Ok(handle) = client.as_fd().try_clone_to_owned() {
        tracker.keep_reset_handle(handle);
    }
    if let Err(error) = proxy(&engine, client, redirect, &mut tracker).await {
        // Splice errors (no refusal reason) come only once the path is open.
        match error.refusal_reason().filter(|_| !tracker.is_open()) {
            Some(reason) => {
                if let Some(handle) = tracker.reset_handle() {
                    let abort = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    let _ = nix::sys::socket::setsockopt(
                        handle,
                        nix::sys::socket::sockopt::Linger,
                        &abort,
                    );
                }
                tracker.refuse(reason, error);
            }
            None => tracker.fail(error),
        }
    }
}

/// The pod that made a redirected connection. A pod the kernel did not
/// know is waited for: the registry learns a new pod by its API object and
/// its cgroup, which may come a moment after its first connect.
async fn source_pod(engine: &Engine, redirect: &Redirect) -> Result<Arc<Workload>, OutboundError> {
    let cgroup = redirect.source_cgroup;
    let wait = match redirect.source {
        RedirectSource::MeshedPod => Duration::ZERO,
        RedirectSource::UnknownPod => engine.cfg.pod_resolve_timeout,
    };
    let started = Instant::now();
    let found = wait_for_registry(engine.registry.as_ref(), wait, |registry| {
        registry.by_cgroup(cgroup)
    })
    .await;
    if let Some(source) = &found
        && redirect.source == RedirectSource::UnknownPod
    {
        tracing::debug!(cgroup, pod = %source.name, namespace = %source.namespace, waited_ms = started.elapsed().as_millis(), "connection of a pod the kernel did not know resolved");
    }
    found.ok_or(OutboundError::UnknownSource {
        cgroup,
        waited: started.elapsed(),
    })
}

/// The pod (and port) a connection to `original_dst` goes to, or None when
/// the destination is outside the cluster. An address in the cluster's pod
/// or Service networks that the registry cannot resolve (a pod or Service
/// it has not seen yet) is waited for: guessing "outside the cluster" would
/// send a meshed destination plaintext.
async fn destination(
    engine: &Engine,
    original_dst: SocketAddrV4,
) -> Result<Option<Endpoint>, OutboundError> {
    let started = Instant::now();
    let resolved = wait_for_registry(
        engine.registry.as_ref(),
        engine.cfg.pod_resolve_timeout,
        |registry| match registry.resolve(original_dst) {
            Some(endpoint) => Some(Some(endpoint)),
            None if !registry.in_cluster_network(*original_dst.ip())
                || registry.served_outside_pods(original_dst) =>
            {
                Some(None)
            }
            None => None,
        },
    )
    .await;
    resolved.ok_or(OutboundError::UnknownDestination {
        target: original_dst,
        waited: started.elapsed(),
    })
}

async fn proxy(
    engine: &Engine,
    client: TcpStream,
    redirect: Redirect,
    tracker: &mut ConnectionTracker,
) -> Result<(), OutboundError> {
    let original_dst = redirect.original_dst;
    tracker.event_mut().dst_addr = Some(original_dst.into());
    let source = source_pod(engine, &redirect).await?;
    tracker.set_src(&source);
    if !source.meshed {
        return unmeshed_source(engine, client, original_dst, tracker).await;
    }
    let endpoint = destination(engine, original_dst).await?;
    let policy = engine.cfg.policy;
    match route(
        engine.registry.local_node(),
        engine.cfg.hbone_port,
        policy.force_mtls_local,
        original_dst,
        endpoint,
    ) {
        Route::Plaintext {
            target,
            destination,
            reason,
        } => {
            tracker.set_dst(target.into(), destination.as_deref());
            tracker.event_mut().no_tls_reason = Some(reason);
            if policy.deny_plaintext {
                let service = engine.registry.service_at(*original_dst.ip());
                match engine
                    .cfg
                    .plaintext_exemptions
                    .exemption(original_dst, service.as_ref())
                {
                    Some(exemption) => {
                        tracing::debug!(%original_dst, %target, %exemption, "plaintext despite --deny-plaintext: exempt");
                    }
                    None => {
                        return Err(OutboundError::PlaintextDenied {
                            target,
                            reason: reason.as_str(),
                        });
                    }
                }
            }
            plaintext(engine, client, target, tracker).await
        }
        Route::SecuredLocal { endpoint } => {
            let destination = &endpoint.workload;
            let target = endpoint.addr;
            tracker.set_dst(target.into(), Some(destination));
            // Same checks as HBONE would make: both identities hold a valid
            // certificate, or nothing is carried.
            let deadline = tokio::time::Instant::now() + engine.cfg.pod_resolve_timeout;
            source_client_config(engine, &source, &destination.identity, deadline).await?;
            if !first_certificate_held(engine.credentials.as_ref(), &destination.identity, deadline)
                .await
            {
                return Err(OutboundError::NoDestinationCertificate {
                    destination: destination.identity.clone(),
                });
            }
            tracker.event_mut().client_id = Some(source.identity.to_string());
            tracker.event_mut().server_id = Some(destination.identity.to_string());
            tracker.event_mut().no_tls_reason = Some(NoTlsReason::SecuredLocal);
            let subject = Subject {
                source: ProvenSource::Pod(source.clone()),
                source_ip: source.ip,
                pod_ip: *target.ip(),
                port: target.port(),
            };
            let mut admission = engine.admissions.admit(
                tracker.event.id,
                subject,
                destination,
                engine.registry.as_ref(),
                tracker,
            )?;
            let server = connect(engine, target.into()).await?;
            tracker.open();
            let revoked =
                splice::tcp_tcp(client, server, &tracker.bytes, admission.revoked()).await?;
            match revoked {
                None => Ok(()),
                Some(note) => {
                    let denied = note.denied.clone().expect("revoked for a denial");
                    tracker.event_mut().authz = Some(note);
                    Err(authz::Revoked { denied }.into())
                }
            }
        }
        Route::Hbone { endpoint, node } => {
            hbone_connect(engine, client, &source, &endpoint, node, tracker).await
        }
    }
}

/// A connection of an unmeshed pod, redirected because the kernel did not
/// know the pod yet: carried in plaintext as the pod would have made it
/// (a Service VIP resolved to an endpoint, since the redirect happened
/// before kube-proxy). The pod's later connections no longer reach the
/// agent: the cgroup sync puts it in the unmeshed map.
async fn unmeshed_source(
    engine: &Engine,
    client: TcpStream,
    original_dst: SocketAddrV4,
    tracker: &mut ConnectionTracker,
) -> Result<(), OutboundError> {
    let (target, destination) = match engine.registry.resolve(original_dst) {
        Some(endpoint) => (endpoint.addr, Some(endpoint.workload)),
        None => (original_dst, None),
    };
    tracker.set_dst(target.into(), destination.as_deref());
    tracker.event_mut().no_tls_reason = Some(NoTlsReason::NotMeshed);
    // The kernel trusts every agent connect, so the agent must not carry
    // what no identity vouches for to a pod the kernel guards.
    let default = engine.cfg.policy.default_inbound_policy;
    let source = tracker.event.src_addr.ip();
    if let Some(refusal) = destination
        .as_deref()
        .filter(|pod| pod.node == engine.registry.local_node().name)
        .and_then(|pod| inbound_policy::plaintext_refusal(pod, default, source, target))
    {
        tracker.event_mut().authz = refusal.authz.clone();
        return Err(OutboundError::StrictDestination(Box::new(refusal)));
    }
    plaintext(engine, client, target, tracker).await
}

/// Carries a connection in plaintext to `target`, unless that is one of
/// this node's protected listeners (a pod's plaintext leaves from the node's
/// address, which they admit).
async fn plaintext(
    engine: &Engine,
    client: TcpStream,
    target: SocketAddrV4,
    tracker: &mut ConnectionTracker,
) -> Result<(), OutboundError> {
    if engine.cfg.protected_local_ports.contains(&target.port())
        && crate::metrics::is_local_address((*target.ip()).into())
    {
        return Err(OutboundError::ProtectedLocalPort { target });
    }
    let server = connect(engine, target.into()).await?;
    tracker.open();
    splice::tcp_tcp(client, server, &tracker.bytes, std::future::pending::<()>()).await?;
    Ok(())
}

async fn hbone_connect(
    engine: &Engine,
    client: TcpStream,
    source: &Workload,
    endpoint: &Endpoint,
    node: SocketAddr,
    tracker: &mut ConnectionTracker,
) -> Result<(), OutboundError> {
    let destination = &endpoint.workload;
    let authority = endpoint.addr;
    tracker.set_dst(authority.into(), Some(destination));
    let SocketAddr::V4(source_addr) = tracker.event.src_addr else {
        unreachable!("the outbound listener accepts IPv4 connections only")
    };
    // Boxed: opening the stream (maybe dialling: TLS + h2 handshakes) is
    // by far the largest state of this future and is alive only briefly;
    // unboxed, every connection's task would hold that space for its whole
    // life (memory per proxied connection).
    let (lease, send, response) =
        Box::pin(open_stream(engine, source, endpoint, node, source_addr)).await?;
    tracker.event_mut().tls = true;
    tracker.event_mut().client_id = Some(source.identity.to_string());
    tracker.event_mut().server_id = Some(destination.identity.to_string());
    let (mut read, mut write) = client.into_split();
    let stream = Stream {
        send,
        response,
        lease: &lease,
        node,
        authority,
    };
    let carried = carry_hbone(engine, tracker, &mut read, &mut write, stream).await;
    // A stream the peer cut (reset: e.g. an authorization policy now
    // denies it) resets the pod's socket too: an orderly end would pass
    // for a complete answer.
    if let Err(OutboundError::Splice(SpliceError::H2(_) | SpliceError::StreamClosed)) = &carried {
        splice::reset(read, write);
    }
    drop(lease);
    carried
}

/// An HBONE stream whose CONNECT is sent, its answer still to come.
struct Stream<'a> {
    send: SendStream<Bytes>,
    response: ResponseFuture,
    lease: &'a Lease,
    node: SocketAddr,
    authority: SocketAddrV4,
}

/// Carries the client's first bytes, reads the peer's answer, then
/// carries both directions.
async fn carry_hbone(
    engine: &Engine,
    tracker: &mut ConnectionTracker,
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
    stream: Stream<'_>,
) -> Result<(), OutboundError> {
    let Stream {
        send,
        response,
        lease,
        node,
        authority,
    } = stream;
    let bytes = tracker.bytes.clone();
    // The client's first bytes go out right behind the CONNECT instead of a
    // round trip later: the peer agent is already authenticated, holds them
    // in the stream's window, and passes nothing on unless it admits the
    // stream. A refusal ends the client's connection here.
    let mut upload = pin!(splice::tcp_to_h2(read, send, &bytes.src_to_dst));
    let mut upload_ended = None;
    let response = {
        let mut response = pin!(tokio::time::timeout(engine.cfg.connect_timeout, response));
        loop {
            tokio::select! {
                answered = &mut response => break answered,
                ended = &mut upload, if upload_ended.is_none() => upload_ended = Some(ended),
            }
        }
    };
    let admitted = match response {
        Err(_) => {
            // Silence may mean a dead connection or peer: no new stream
            // picks it (streams open on it go on; a live peer costs a dial).
            lease.discard();
            Err(OutboundError::ConnectUnanswered { node, authority })
        }
        Ok(Err(source)) => Err(OutboundError::Hbone { node, source }),
        Ok(Ok(response)) if response.status() == StatusCode::OK => Ok(response.into_body()),
        Ok(Ok(response)) => {
            let denied = (response.status() == StatusCode::FORBIDDEN)
                .then(|| denied_by(response.headers()))
                .flatten()
                .map(|(policy, rule)| PolicyRule { policy, rule });
            if let Some(denied) = &denied {
                tracker.event_mut().authz = Some(Box::new(AuthzNote {
                    denied: Some(denied.clone()),
                    dry_run_denied: None,
                }));
            }
            Err(OutboundError::Refused {
                node,
                authority,
                status: response.status(),
                denied,
            })
        }
    };
    let recv = match admitted {
        Ok(recv) => recv,
        Err(error) => {
            // What was read ahead never reached the destination.
            bytes.src_to_dst.store(0, Ordering::Relaxed);
            return Err(error);
        }
    };
    tracker.open();
    let download = splice::h2_to_tcp(recv, write, &bytes.dst_to_src);
    match upload_ended {
        Some(ended) => {
            ended?;
            download.await?;
        }
        None => {
            tokio::try_join!(upload, download)?;
        }
    }
    Ok(())
}

/// The client config presenting `source`'s certificate; a new pod's first
/// certificate is waited for until `deadline`.
async fn source_client_config(
    engine: &Engine,
    source: &Workload,
    destination: &Identity,
    deadline: tokio::time::Instant,
) -> Result<Arc<rustls::ClientConfig>, OutboundError> {
    let refused = |reason| OutboundError::NoSourceCertificate {
        source_id: source.identity.clone(),
        destination: destination.clone(),
        reason,
    };
    match engine.credentials.client_config(&source.identity) {
        Ok(config) => Ok(config),
        Err(_)
            if first_certificate_held(engine.credentials.as_ref(), &source.identity, deadline)
                .await =>
        {
            engine
                .credentials
                .client_config(&source.identity)
                .map_err(refused)
        }
        Err(reason) => Err(refused(reason)),
    }
}

/// A CONNECT stream to `endpoint` through the agent at `node`, on a pooled
/// connection authenticated as `source`; the answer is still to come.
async fn open_stream(
    engine: &Engine,
    source: &Workload,
    endpoint: &Endpoint,
    node: SocketAddr,
    source_addr: SocketAddrV4,
) -> Result<(Lease, SendStream<Bytes>, ResponseFuture), OutboundError> {
    let destination = &endpoint.workload;
    let authority = endpoint.addr;
    let deadline = tokio::time::Instant::now() + engine.cfg.pod_resolve_timeout;
    let client_config =
        source_client_config(engine, source, &destination.identity, deadline).await?;
    let key = PoolKey {
        source: source.identity.clone(),
        destination: destination.identity.clone(),
        node,
    };
    let request = connect_request(authority, source_addr);

    // A pooled connection can break between checkout and use; then one
    // retry on a freshly dialled connection.
    let mut retried = false;
    loop {
        let lease = engine
            .pool
            .checkout(&key, || {
                dial(
                    engine,
                    client_config.clone(),
                    engine.credentials.not_after(&source.identity),
                    node,
                    &destination.identity,
                )
            })
            .await?;
        let sent = async {
            let mut sender = lease.send_request().ready().await?;
            sender.send_request(request.clone(), false)
        }
        .await;
        match sent {
            Ok((response, send)) => return Ok((lease, send, response)),
            Err(source) if !retried => {
                tracing::debug!(connection = lease.connection_id(), %node, error = %source, "pooled HBONE connection broken; dialling a new one");
                lease.discard();
                retried = true;
            }
            Err(source) => return Err(OutboundError::Hbone { node, source }),
        }
    }
}

/// Opens a new HBONE connection to `node`, proving `expected`'s identity
/// with `client_config`, whose certificate expires at `local_not_after`.
async fn dial(
    engine: &Engine,
    client_config: Arc<rustls::ClientConfig>,
    local_not_after: Option<SystemTime>,
    node: SocketAddr,
    expected: &Identity,
) -> Result<Dialed<TlsStream<TcpStream>>, OutboundError> {
    let handshake = async {
        let tcp = TcpStream::connect(node)
            .await
            .map_err(|source| OutboundError::PeerConnect { node, source })?;
        let _ = tcp.set_nodelay(true);
        if let Err(error) = hbone::set_keepalive(&tcp) {
            tracing::debug!(%node, %error, "cannot set TCP keepalive on the HBONE connection");
        }
        let started = Instant::now();
        let tls = TlsConnector::from(client_config)
            .connect(tls::server_name(expected), tcp)
            .await
            .map_err(|source| OutboundError::Handshake { node, source })?;
        engine
            .sink
            .tls_handshake(Direction::Outbound, started.elapsed());
        let (_, session) = tls.get_ref();
        // rustls verified the chain and the DNS SAN; the SPIFFE URI SAN is
        // what identities are authorised on, so it must match too.
        let got = tls::peer_identity(
            session.peer_certificates().unwrap_or_default(),
            engine.registry.trust_domain(),
        )
        .map_err(|source| OutboundError::PeerIdentity {
            node,
            expected: expected.clone(),
            source,
        })?;
        if &got != expected {
            return Err(OutboundError::WrongPeer {
                node,
                expected: expected.clone(),
                got,
            });
        }
        if session.alpn_protocol() != Some(ALPN_HBONE) {
            return Err(OutboundError::NoH2 { node });
        }
        let handshake = session
            .handshake_kind()
            .expect("a completed handshake has a kind");
        let peer_not_after = session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| tls::not_after(leaf));
        let retire_at = local_not_after.into_iter().chain(peer_not_after).min();
        let chain = peer_chain(session.peer_certificates());
        let (send, connection) = hbone::client_builder()
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| OutboundError::Hbone { node, source })?;
        Ok(Dialed {
            send,
            connection,
            handshake,
            distrusted: Box::pin(peer_distrusted(
                engine.credentials.clone(),
                chain,
                PeerRole::Server(got.clone()),
            )),
            peer: got,
            retire_at,
        })
    };
    tokio::time::timeout(engine.cfg.connect_timeout, handshake)
        .await
        .map_err(|_| OutboundError::PeerConnectTimeout { node })?
}

async fn connect(engine: &Engine, target: SocketAddr) -> Result<TcpStream, OutboundError> {
    let socket = tokio::time::timeout(engine.cfg.connect_timeout, TcpStream::connect(target))
        .await
        .map_err(|_| OutboundError::ConnectTimeout { target })?
        .map_err(|source| OutboundError::Connect { target, source })?;
    let _ = socket.set_nodelay(true);
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use sealmesh_common::identity::TrustDomain;

    use super::*;

    fn workload(
        name: &str,
        node: &str,
        node_ip: [u8; 4],
        ip: [u8; 4],
        meshed: bool,
    ) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "app".into(),
            service_account: name.into(),
            identity: TrustDomain::default().identity("app", name).unwrap(),
            ip: Some(ip.into()),
            node: node.into(),
            node_ip: node_ip.into(),
            meshed,
            inbound_policy: Default::default(),
            cgroup_id: None,
            authz: Default::default(),
        })
    }

    fn local() -> NodeInfo {
        NodeInfo {
            name: "node-0".into(),
            ip: Ipv4Addr::new(172, 18, 0, 2),
        }
    }

    const DST: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);

    #[test]
    fn every_outbound_refusal_has_its_reason() {
        use std::io::{Error, ErrorKind};

        let td = TrustDomain::default();
        let id = |sa: &str| td.identity("app", sa).unwrap();
        let node: SocketAddr = "172.18.0.3:15008".parse().unwrap();
        let pod: SocketAddr = DST.into();
        let waited = Duration::from_secs(5);
        let refused = |status| OutboundError::Refused {
            node,
            authority: DST,
            status,
            denied: None,
        };
        let cases = [
            (
                OutboundError::UnknownSource { cgroup: 7, waited },
                "unknown_source",
            ),
            (
                OutboundError::UnknownDestination {
                    target: DST,
                    waited,
                },
                "unknown_destination",
            ),
            (
                OutboundError::NoSourceCertificate {
                    source_id: id("client"),
                    destination: id("server"),
                    reason: NoCertificate {
                        identity: id("client"),
                        reason: "not issued yet".into(),
                    },
                },
                "no_source_certificate",
            ),
            (
                OutboundError::NoDestinationCertificate {
                    destination: id("server"),
                },
                "no_destination_certificate",
            ),
            (
                OutboundError::PlaintextDenied {
                    target: DST,
                    reason: "not_meshed",
                },
                "plaintext_denied",
            ),
            (
                OutboundError::ProtectedLocalPort { target: DST },
                "protected_local_port",
            ),
            (
                OutboundError::StrictDestination(Box::new(
                    inbound_policy::plaintext_refusal(
                        &workload("server-0", "node-0", [172, 18, 0, 2], [10, 244, 0, 7], true),
                        sealmesh_common::policy::InboundPolicy::Strict,
                        Ipv4Addr::new(10, 244, 0, 9).into(),
                        DST,
                    )
                    .expect("a strict pod refuses plaintext"),
                )),
                "strict_inbound",
            ),
            (
                OutboundError::Connect {
                    target: pod,
                    source: Error::from(ErrorKind::ConnectionRefused),
                },
                "target_refused",
            ),
            (
                OutboundError::Connect {
                    target: pod,
                    source: Error::from(ErrorKind::HostUnreachable),
                },
                "target_unreachable",
            ),
            (
                OutboundError::ConnectTimeout { target: pod },
                "target_timeout",
            ),
            (
                OutboundError::PeerConnect {
                    node,
                    source: Error::from(ErrorKind::ConnectionRefused),
                },
                "peer_unreachable",
            ),
            (
                OutboundError::PeerDialFailed(PeerDialFailed),
                "peer_unreachable",
            ),
            (OutboundError::PeerConnectTimeout { node }, "peer_timeout"),
            (
                OutboundError::ConnectUnanswered {
                    node,
                    authority: DST,
                },
                "peer_timeout",
            ),
            (
                OutboundError::Handshake {
                    node,
                    source: Error::from(ErrorKind::InvalidData),
                },
                "peer_handshake_failed",
            ),
            (OutboundError::NoH2 { node }, "peer_handshake_failed"),
            (
                OutboundError::PeerIdentity {
                    node,
                    expected: id("server"),
                    source: TlsError::NoSpiffeIdentity,
                },
                "wrong_peer_identity",
            ),
            (
                OutboundError::WrongPeer {
                    node,
                    expected: id("server"),
                    got: id("other"),
                },
                "wrong_peer_identity",
            ),
            (
                OutboundError::Hbone {
                    node,
                    source: h2::Reason::REFUSED_STREAM.into(),
                },
                "hbone_failed",
            ),
            // The peer's status names its reason, so both agents agree.
            (refused(StatusCode::SERVICE_UNAVAILABLE), "target_refused"),
            (refused(StatusCode::BAD_GATEWAY), "target_unreachable"),
            (refused(StatusCode::GATEWAY_TIMEOUT), "target_timeout"),
            (refused(StatusCode::NOT_FOUND), "not_local_meshed_pod"),
            (refused(StatusCode::FORBIDDEN), "identity_mismatch"),
            (refused(StatusCode::BAD_REQUEST), "bad_authority"),
            (refused(StatusCode::METHOD_NOT_ALLOWED), "not_connect"),
            (
                refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
                "peer_refused",
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(
                error.refusal_reason().map(RefusalReason::as_str),
                Some(reason),
                "{error}"
            );
        }
        // A splice error comes after the connection opened: no refusal.
        assert_eq!(
            OutboundError::Splice(SpliceError::StreamClosed).refusal_reason(),
            None
        );
    }

    #[test]
    fn outside_the_cluster_is_plaintext_to_the_original_destination() {
        assert_eq!(
            route(&local(), 15008, false, DST, None),
            Route::Plaintext {
                target: DST,
                destination: None,
                reason: NoTlsReason::OutsideCluster
            }
        );
    }

    #[test]
    fn unmeshed_pods_are_plaintext_to_the_resolved_endpoint() {
        let w = workload("db", "node-1", [172, 18, 0, 3], [10, 244, 1, 5], false);
        let endpoint = Endpoint {
            addr: SocketAddrV4::new(w.ip.unwrap(), 5432),
            workload: w.clone(),
        };
        assert_eq!(
            route(&local(), 15008, false, DST, Some(endpoint)),
            Route::Plaintext {
                target: "10.244.1.5:5432".parse().unwrap(),
                destination: Some(w),
                reason: NoTlsReason::NotMeshed
            }
        );
    }

    #[test]
    fn meshed_pods_elsewhere_go_over_hbone_to_their_node() {
        let w = workload("web", "node-1", [172, 18, 0, 3], [10, 244, 1, 2], true);
        let endpoint = Endpoint {
            addr: SocketAddrV4::new(w.ip.unwrap(), 8080),
            workload: w,
        };
        assert_eq!(
            route(&local(), 15008, false, DST, Some(endpoint.clone())),
            Route::Hbone {
                endpoint,
                node: "172.18.0.3:15008".parse().unwrap()
            }
        );
    }

    #[test]
    fn meshed_pods_here_are_secured_local_unless_mtls_is_forced() {
        let w = workload("web", "node-0", [172, 18, 0, 2], [10, 244, 0, 2], true);
        let endpoint = Endpoint {
            addr: SocketAddrV4::new(w.ip.unwrap(), 8080),
            workload: w,
        };
        assert_eq!(
            route(&local(), 15008, false, DST, Some(endpoint.clone())),
            Route::SecuredLocal {
                endpoint: endpoint.clone()
            }
        );
        assert_eq!(
            route(&local(), 15008, true, DST, Some(endpoint.clone())),
            Route::Hbone {
                endpoint,
                node: "172.18.0.2:15008".parse().unwrap()
            }
        );
    }
}
