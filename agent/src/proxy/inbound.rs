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
use http::{Method, Request, Response, StatusCode};
use sealmesh_common::identity::Identity;
use tokio::{net::TcpStream, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use super::{
    Engine,
    event::{ConnectionTracker, Direction},
    hbone,
    outbound::FORWARDED_HEADER,
    peer_chain, peer_distrusted, splice, wait_for_registry,
};
use crate::{
    registry::Workload,
    tls::{self, PeerRole},
};

/// Why a CONNECT stream was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum InboundRefusal {
    #[error("method {0} is not supported; HBONE streams are CONNECT")]
    NotConnect(Method),
    #[error("CONNECT authority {0:?} is not an IPv4 address:port")]
    BadAuthority(String),
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
}

impl InboundRefusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadAuthority(_) => StatusCode::BAD_REQUEST,
            Self::NotLocalMeshedPod(_) => StatusCode::NOT_FOUND,
            Self::IdentityMismatch { .. } => StatusCode::FORBIDDEN,
            Self::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            Self::TargetRefused { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::TargetTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// What the handshake established, shared by the connection's streams.
struct Peer {
    addr: SocketAddr,
    client: Identity,
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
    let acceptor = TlsAcceptor::from(engine.credentials.server_config());
    let started = Instant::now();
    let tls = match tokio::time::timeout(engine.cfg.connect_timeout, acceptor.accept(socket)).await
    {
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
        client,
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
    tracker.event.tls = true;
    tracker.event.client_id = Some(peer.client.to_string());
    tracker.event.server_id = Some(peer.requested.to_string());
    if let Some((addr, source)) = forwarded_source(&engine, &peer, &request) {
        tracker.event.src_addr = addr.into();
        tracker.set_src(&source);
    }
    let target = match admit(&engine, &peer, &request, &mut tracker).await {
        Ok(target) => target,
        Err(refusal) => {
            let status = refusal.status();
            tracing::debug!(peer = %peer.addr, client = %peer.client, %status, %refusal, "CONNECT refused");
            let _ = respond.send_response(empty_response(status), true);
            tracker.fail(refusal);
            return;
        }
    };
    let send = match respond.send_response(empty_response(StatusCode::OK), false) {
        Ok(send) => send,
        Err(error) => {
            tracker.fail(format!("HBONE stream closed before the reply: {error}"));
            return;
        }
    };
    tracker.open();
    let bytes = tracker.bytes.clone();
    if let Err(error) = splice::tcp_h2(
        target,
        send,
        request.into_body(),
        &bytes.dst_to_src,
        &bytes.src_to_dst,
    )
    .await
    {
        tracker.fail(error);
    }
}

/// Checks the CONNECT against the handshake's identities and connects to
/// the target pod.
async fn admit(
    engine: &Engine,
    peer: &Peer,
    request: &Request<RecvStream>,
    tracker: &mut ConnectionTracker,
) -> Result<TcpStream, InboundRefusal> {
    if request.method() != Method::CONNECT {
        return Err(InboundRefusal::NotConnect(request.method().clone()));
    }
    let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
    let target: SocketAddrV4 = authority
        .parse()
        .map_err(|_| InboundRefusal::BadAuthority(authority.to_owned()))?;
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
    connect_target(target, engine.cfg.connect_timeout).await
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
    let value = request.headers().get(FORWARDED_HEADER)?.to_str().ok()?;
    let addr: SocketAddrV4 = value
        .strip_prefix("for=\"")?
        .strip_suffix('"')?
        .parse()
        .ok()?;
    engine
        .registry
        .by_ip(*addr.ip())
        .filter(|w| w.identity == peer.client)
        .map(|w| (addr, w))
}

fn empty_response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}
