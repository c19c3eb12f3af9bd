//! Inbound: HBONE connections from peer agents. The TLS handshake proves the
//! client (a certificate chaining to the anchors, identity in the trust
//! domain) and names the identity it asked for (SNI); each CONNECT stream is
//! then accepted only towards a local meshed pod of exactly that identity.

use std::{
    io,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};
use rustls::server::{Acceptor, ClientHello};
use sealmesh_common::{
    hbone::{
        ConnectRequestError, DENIED_BY_HEADER, denied_by_value, forwarded_for, requested_target,
    },
    identity::Identity,
};
use tokio::{net::TcpStream, sync::watch, task::JoinSet};
use tokio_rustls::LazyConfigAcceptor;

use super::{
    Engine,
    authz::{self, AdmissionGuard, ProvenSource, Subject},
    event::{ConnectionTracker, Direction, RefusalReason},
    first_certificate_held, hbone, peer_chain, peer_distrusted, splice, wait_for_registry,
};
use crate::{
    registry::Workload,
    tls::{self, PeerRole},
};

/// Why a CONNECT stream was refused; each maps to one HTTP status, which
/// the client's agent reads back as the same [`RefusalReason`]
/// ([`peer_refusal_reason`]).
#[derive(Debug, thiserror::Error)]
pub enum InboundRefusal {
    /// Not a CONNECT, or not to an IPv4 address:port.
    #[error(transparent)]
    Request(#[from] ConnectRequestError),
    #[error("{0} is not a meshed pod on this node")]
    NotLocalMeshedPod(SocketAddrV4),
    #[error("pod {pod} runs as {pod_identity} but the client asked for {requested} (SNI); refused")]
    IdentityMismatch {
        pod: String,
        pod_identity: Identity,
        requested: Identity,
    },
    #[error("target {target} unreachable: {source}")]
    Unreachable {
        target: SocketAddrV4,
        source: io::Error,
    },
    #[error("target {target} refused the connection")]
    TargetRefused { target: SocketAddrV4 },
    #[error("timed out connecting to target {target}")]
    TargetTimeout { target: SocketAddrV4 },
    #[error(transparent)]
    PolicyDenied(#[from] authz::PolicyDenied),
}

impl InboundRefusal {
    pub fn reason(&self) -> RefusalReason {
        match self {
            Self::Request(ConnectRequestError::NotConnect(_)) => RefusalReason::NotConnect,
            Self::Request(ConnectRequestError::BadAuthority(_)) => RefusalReason::BadAuthority,
            Self::NotLocalMeshedPod(_) => RefusalReason::NotLocalMeshedPod,
            Self::IdentityMismatch { .. } => RefusalReason::IdentityMismatch,
            Self::Unreachable { .. } => RefusalReason::TargetUnreachable,
            Self::TargetRefused { .. } => RefusalReason::TargetRefused,
            Self::TargetTimeout { .. } => RefusalReason::TargetTimeout,
            Self::PolicyDenied(_) => RefusalReason::PolicyDenied,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Request(ConnectRequestError::NotConnect(_)) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Request(ConnectRequestError::BadAuthority(_)) => StatusCode::BAD_REQUEST,
            Self::NotLocalMeshedPod(_) => StatusCode::NOT_FOUND,
            Self::IdentityMismatch { .. } | Self::PolicyDenied(_) => StatusCode::FORBIDDEN,
            Self::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::TargetRefused { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::TargetTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// The reason a peer agent's refusal `status` stands for ([`InboundRefusal::status`]
/// read back on the client's side); `peer_refused` for any other status
/// (e.g. h2's 431 for an oversized header block). A 403 that names a policy
/// (`hbone::DENIED_BY_HEADER`) is `policy_denied`, read by the caller.
pub(crate) fn peer_refusal_reason(status: StatusCode) -> RefusalReason {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => RefusalReason::NotConnect,
        StatusCode::BAD_REQUEST => RefusalReason::BadAuthority,
        StatusCode::NOT_FOUND => RefusalReason::NotLocalMeshedPod,
        StatusCode::FORBIDDEN => RefusalReason::IdentityMismatch,
        StatusCode::BAD_GATEWAY => RefusalReason::TargetUnreachable,
        StatusCode::SERVICE_UNAVAILABLE => RefusalReason::TargetRefused,
        StatusCode::GATEWAY_TIMEOUT => RefusalReason::TargetTimeout,
        _ => RefusalReason::PeerRefused,
    }
}

/// A client asking (by SNI) for the identity of a local meshed pod whose
/// ServiceAccount's first certificate is still on its way (a pod that just
/// started) waits for it, until `deadline`, rather than fail the handshake.
/// Names of no local meshed pod are not waited for: the client is not
/// authenticated yet.
async fn await_first_server_certificate(
    engine: &Engine,
    hello: &ClientHello<'_>,
    deadline: tokio::time::Instant,
) {
    let Some(requested) = hello
        .server_name()
        .and_then(|sni| engine.registry.trust_domain().parse_dns_name(sni).ok())
    else {
        return;
    };
    if engine.credentials.has_valid_cert(&requested) {
        return;
    }
    let local_meshed = engine
        .registry
        .local_workloads()
        .iter()
        .any(|workload| workload.meshed && workload.identity == requested);
    if local_meshed {
        first_certificate_held(engine.credentials.as_ref(), &requested, deadline).await;
    }
}

/// What the handshake established, shared by the connection's streams.
struct Peer {
    addr: SocketAddr,
    /// Shared with the authorization checks of its streams.
    client: Arc<Identity>,
    requested: Identity,
}

/// Serves one HBONE connection until it closes; on `stop`, asks the peer to
/// finish (GOAWAY) and keeps serving the streams already open.
pub(crate) async fn serve(
    engine: Arc<Engine>,
    socket: TcpStream,
    addr: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    if let Err(error) = hbone::set_keepalive(&socket) {
        tracing::debug!(peer = %addr, %error, "cannot set TCP keepalive on the HBONE connection");
    }
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + engine.cfg.connect_timeout;
    let handshake = async {
        let hello = LazyConfigAcceptor::new(Acceptor::default(), socket).await?;
        await_first_server_certificate(&engine, &hello.client_hello(), deadline).await;
        hello.into_stream(engine.credentials.server_config()).await
    };
    let tls = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(tls)) => {
            engine
                .sink
                .tls_handshake(Direction::Inbound, started.elapsed());
            tls
        }
        Ok(Err(error)) => {
            if let Some(suppressed) = engine.refusal_log.admit() {
                tracing::warn!(peer = %addr, suppressed, %error, "inbound mTLS handshake failed; connection refused");
            }
            return;
        }
        Err(_) => {
            if let Some(suppressed) = engine.refusal_log.admit() {
                tracing::warn!(peer = %addr, suppressed, "inbound mTLS handshake timed out; connection refused");
            }
            return;
        }
    };
    let (_, session) = tls.get_ref();
    let mut distrusted = std::pin::pin!(peer_distrusted(
        engine.credentials.clone(),
        peer_chain(session.peer_certificates()),
        PeerRole::Client,
    ));
    let td = engine.registry.trust_domain();
    let client = match tls::peer_identity(session.peer_certificates().unwrap_or_default(), td) {
        Ok(id) => id,
        Err(error) => {
            if let Some(suppressed) = engine.refusal_log.admit() {
                tracing::warn!(peer = %addr, suppressed, %error, "inbound client identity not accepted; connection refused");
            }
            return;
        }
    };
    // The certificate resolver only answers SNI names of local identities,
    // so a handshake that got here carries a parseable one.
    let requested = match session.server_name().map(|name| td.parse_dns_name(name)) {
        Some(Ok(id)) => id,
        other => {
            if let Some(suppressed) = engine.refusal_log.admit() {
                tracing::warn!(peer = %addr, suppressed, sni = ?session.server_name(), error = ?other.map(|r| r.err()), "inbound SNI is not a local identity name; connection refused");
            }
            return;
        }
    };
    let mut connection = match tokio::time::timeout(
        engine.cfg.connect_timeout,
        hbone::server_builder().handshake::<_, Bytes>(tls),
    )
    .await
    {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            if let Some(suppressed) = engine.refusal_log.admit() {
                tracing::warn!(peer = %addr, suppressed, %client, %error, "inbound HTTP/2 handshake failed");
            }
            return;
        }
        Err(_) => {
            if let Some(suppressed) = engine.refusal_log.admit() {
                tracing::warn!(peer = %addr, suppressed, %client, "inbound HTTP/2 handshake timed out");
            }
            return;
        }
    };
    let peer = Arc::new(Peer {
        addr,
        client: Arc::new(client),
        requested,
    });
    let mut streams = JoinSet::new();
    let mut stopping = *stop.borrow();
    if stopping {
        connection.graceful_shutdown();
    }
    loop {
        tokio::select! {
            next = connection.accept() => match next {
                Some(Ok((request, respond))) => {
                    streams.spawn(stream(engine.clone(), peer.clone(), request, respond));
                }
                Some(Err(error)) => {
                    if !error.is_go_away() && !error.is_io() {
                        tracing::info!(peer = %addr, client = %peer.client, %error, "inbound HBONE connection failed");
                    }
                    break;
                }
                None => break,
            },
            changed = stop.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.graceful_shutdown();
                }
            }
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            error = &mut distrusted => {
                // Returning drops the connection and aborts its streams.
                tracing::warn!(peer = %addr, client = %peer.client, %error, "the trust anchors no longer trust the client agent; closing the HBONE connection and its streams");
                break;
            }
        }
    }
}

/// Serves one CONNECT stream.
async fn stream(
    engine: Arc<Engine>,
    peer: Arc<Peer>,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let mut tracker = ConnectionTracker::new(
        engine.sink.clone(),
        engine.next_id(),
        Direction::Inbound,
        peer.addr,
    );
    tracker.event_mut().tls = true;
    tracker.event_mut().client_id = Some(peer.client.to_string());
    tracker.event_mut().server_id = Some(peer.requested.to_string());
    let source_ip = forwarded_source(&engine, &peer, &request).map(|(addr, source)| {
        tracker.event_mut().src_addr = addr.into();
        tracker.set_src(&source);
        *addr.ip()
    });
    let (target, mut admission) = match admit(&engine, &peer, &request, source_ip, &mut tracker)
        .await
    {
        Ok(admitted) => admitted,
        Err(refusal) => {
            let status = refusal.status();
            tracing::debug!(peer = %peer.addr, client = %peer.client, %status, %refusal, "CONNECT refused");
            let mut response = empty_response(status);
            if let InboundRefusal::PolicyDenied(denied) = &refusal
                && let Some(value) = denied_by_value(&denied.denied.policy, denied.denied.rule)
            {
                response.headers_mut().insert(DENIED_BY_HEADER, value);
            }
            let _ = respond.send_response(response, true);
            tracker.refuse(refusal.reason(), refusal);
            return;
        }
    };
    let send = match respond.send_response(empty_response(StatusCode::OK), false) {
        Ok(send) => send,
        Err(error) => {
            tracker.refuse(
                RefusalReason::HboneFailed,
                format!("HBONE stream closed before the reply: {error}"),
            );
            return;
        }
    };
    tracker.open();
    let bytes = tracker.bytes.clone();
    match splice::tcp_h2(
        target,
        send,
        request.into_body(),
        &bytes.dst_to_src,
        &bytes.src_to_dst,
        admission.revoked(),
    )
    .await
    {
        Ok(None) => {}
        Ok(Some(note)) => {
            if let Some(denied) = note.denied.clone() {
                tracker.fail(authz::Revoked { denied });
            }
            tracker.event_mut().authz = Some(note);
        }
        Err(error) => tracker.fail(error),
    }
}

/// Checks the CONNECT against the handshake's identities and the target
/// pod's authorization policies, and connects to the target pod.
async fn admit<'e>(
    engine: &'e Engine,
    peer: &Peer,
    request: &Request<RecvStream>,
    source_ip: Option<std::net::Ipv4Addr>,
    tracker: &mut ConnectionTracker,
) -> Result<(TcpStream, AdmissionGuard<'e>), InboundRefusal> {
    let target = requested_target(request.method(), request.uri())?;
    let local = engine.registry.local_node();
    // A pod of the cluster's networks this agent has not seen yet (the
    // peer's registry was quicker) is waited for, as the outbound side
    // waits for unknown destinations.
    let wait = if engine.registry.in_cluster_network(*target.ip()) {
        engine.cfg.pod_resolve_timeout
    } else {
        Duration::ZERO
    };
    let pod = wait_for_registry(engine.registry.as_ref(), wait, |registry| {
        registry.by_ip(*target.ip())
    })
    .await
    .filter(|w| w.meshed && w.node == local.name)
    .ok_or(InboundRefusal::NotLocalMeshedPod(target))?;
    tracker.set_dst(target.into(), Some(&pod));
    if pod.identity != peer.requested {
        return Err(InboundRefusal::IdentityMismatch {
            pod: format!("{}/{}", pod.namespace, pod.name),
            pod_identity: pod.identity.clone(),
            requested: peer.requested.clone(),
        });
    }
    let subject = Subject {
        source: ProvenSource::Peer(peer.client.clone()),
        source_ip,
        pod_ip: *target.ip(),
        port: target.port(),
    };
    let admission = engine.admissions.admit(
        tracker.event.id,
        subject,
        &pod,
        engine.registry.as_ref(),
        tracker,
    )?;
    let socket = connect_target(target, engine.cfg.connect_timeout).await?;
    Ok((socket, admission))
}

async fn connect_target(
    target: SocketAddrV4,
    timeout: Duration,
) -> Result<TcpStream, InboundRefusal> {
    match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Err(_) => Err(InboundRefusal::TargetTimeout { target }),
        Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => {
            Err(InboundRefusal::TargetRefused { target })
        }
        Ok(Err(source)) => Err(InboundRefusal::Unreachable { target, source }),
        Ok(Ok(socket)) => {
            let _ = socket.set_nodelay(true);
            Ok(socket)
        }
    }
}

/// The source pod (and its address) named by the client's
/// `forwarded: for="ip:port"` header, believed only when that pod runs as
/// the authenticated client identity.
fn forwarded_source(
    engine: &Engine,
    peer: &Peer,
    request: &Request<RecvStream>,
) -> Option<(SocketAddrV4, Arc<Workload>)> {
    let addr = forwarded_for(request.headers())?;
    engine
        .registry
        .by_ip(*addr.ip())
        .filter(|w| w.identity == *peer.client)
        .map(|w| (addr, w))
}

fn empty_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use std::io;

    use http::Method;
    use sealmesh_common::identity::TrustDomain;

    use super::*;

    #[test]
    fn each_refusal_has_its_status_and_the_client_reads_the_same_reason_back() {
        let target: SocketAddrV4 = "10.244.1.5:80".parse().unwrap();
        let td = TrustDomain::default();
        let refusals = [
            (
                InboundRefusal::from(ConnectRequestError::NotConnect(Method::GET)),
                StatusCode::METHOD_NOT_ALLOWED,
                "not_connect",
            ),
            (
                ConnectRequestError::BadAuthority("server.example:80".into()).into(),
                StatusCode::BAD_REQUEST,
                "bad_authority",
            ),
            (
                InboundRefusal::NotLocalMeshedPod(target),
                StatusCode::NOT_FOUND,
                "not_local_meshed_pod",
            ),
            (
                InboundRefusal::IdentityMismatch {
                    pod: "app/server-0".into(),
                    pod_identity: td.identity("app", "server").unwrap(),
                    requested: td.identity("app", "other").unwrap(),
                },
                StatusCode::FORBIDDEN,
                "identity_mismatch",
            ),
            (
                InboundRefusal::Unreachable {
                    target,
                    source: io::Error::from(io::ErrorKind::HostUnreachable),
                },
                StatusCode::BAD_GATEWAY,
                "target_unreachable",
            ),
            (
                InboundRefusal::TargetRefused { target },
                StatusCode::SERVICE_UNAVAILABLE,
                "target_refused",
            ),
            (
                InboundRefusal::TargetTimeout { target },
                StatusCode::GATEWAY_TIMEOUT,
                "target_timeout",
            ),
        ];
        for (refusal, status, reason) in refusals {
            assert_eq!(refusal.status(), status, "{refusal}");
            assert_eq!(refusal.reason().as_str(), reason, "{refusal}");
            assert_eq!(peer_refusal_reason(status), refusal.reason(), "{status}");
        }
        for other in [
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::OK,
        ] {
            assert_eq!(peer_refusal_reason(other), RefusalReason::PeerRefused);
        }
    }

    #[test]
    fn request_refusals_keep_their_messages() {
        assert_eq!(
            InboundRefusal::from(ConnectRequestError::NotConnect(Method::GET)).to_string(),
            "method GET is not supported; HBONE streams are CONNECT"
        );
        assert_eq!(
            InboundRefusal::from(ConnectRequestError::BadAuthority("[::1]:80".into())).to_string(),
            "CONNECT authority \"[::1]:80\" is not an IPv4 address:port"
        );
    }
}
