//! Pool of HBONE (h2 over mTLS) connections, keyed by (source identity,
//! destination identity, destination node): a connection authenticates one
//! client identity to one server identity, so only streams of that pair may
//! share it.
//!
//! Streams are multiplexed on a connection until it nears the peer's
//! concurrent-stream limit; then another connection is opened rather than
//! queueing behind the limit (no head-of-line blocking). Connections whose
//! driver ended (peer closed, broken) are dropped; idle ones are closed, and
//! so are those whose peer the trust anchors stopped trusting. A connection
//! takes no new stream once a certificate it was authenticated with expired
//! (its streams go on; it closes when idle): a busy pair never keeps old
//! credentials, so after an issuer or root rotation every new stream runs
//! under the new certificates within one leaf lifetime.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use h2::{
    Ping, PingPong,
    client::{Connection, SendRequest},
};
use rustls::HandshakeKind;
use sealmesh_common::identity::Identity;
use tokio::io::{AsyncRead, AsyncWrite};

use super::hbone::MAX_CONCURRENT_STREAMS;
use crate::tls::TlsError;

/// A connection with no streams for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// A pooled connection is pinged (HTTP/2 PING) this often ...
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// ... and taken out of the pool when the pong takes longer than this: a
/// silently dead peer (host gone, network partitioned) stops taking new
/// streams within `PING_INTERVAL + PING_TIMEOUT`.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub source: Identity,
    pub destination: Identity,
    pub node: SocketAddr,
}

#[derive(Default)]
pub(crate) struct Pool {
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Arc<PooledConnection>>>,
    /// Serialises dials per key so a burst of streams opens one connection,
    /// not one each.
    dialing: tokio::sync::Mutex<()>,
    /// Dials of this key that failed; a stream that waited behind a failed
    /// dial fails at once instead of dialling the unreachable peer again.
    failed_dials: AtomicU64,
}

/// A stream queued behind a dial to the same peer that just failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "the connection to the peer agent failed just now for another stream; not retrying at once"
)]
pub struct PeerDialFailed;

struct PooledConnection {
    id: u64,
    send: SendRequest<Bytes>,
    handshake: HandshakeKind,
    peer: Identity,
    /// See [`Dialed::retire_at`].
    retire_at: Option<SystemTime>,
    streams: AtomicUsize,
    closed: AtomicBool,
    last_released: Mutex<Instant>,
}

impl PooledConnection {
    /// Streams we let run on this connection: the peer's advertised limit
    /// (h2 keeps it current) minus headroom, because h2 frees a stream slot
    /// only after its final frames are flushed, a little after we released it.
    fn stream_budget(&self) -> usize {
        let limit = self
            .send
            .current_max_send_streams()
            .min(MAX_CONCURRENT_STREAMS as usize);
        limit.saturating_sub((limit / 10).max(1)).max(1)
    }
}

/// One stream's claim on a pooled connection; releases it when dropped.
pub(crate) struct Lease {
    conn: Arc<PooledConnection>,
}

impl Lease {
    pub fn send_request(&self) -> SendRequest<Bytes> {
        self.conn.send.clone()
    }

    pub fn connection_id(&self) -> u64 {
        self.conn.id
    }

    /// Marks the connection broken so no new stream picks it.
    pub fn discard(&self) {
        self.conn.closed.store(true, Ordering::Release);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.streams.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.conn.last_released.lock().expect("pool lock poisoned") = Instant::now();
        }
    }
}

/// What a dial must hand back.
pub(crate) struct Dialed<T> {
    pub send: SendRequest<Bytes>,
    /// The future that drives the socket (the pool runs it).
    pub connection: Connection<T, Bytes>,
    /// Full, or resumed from an earlier session's ticket.
    pub handshake: HandshakeKind,
    /// The identity the peer proved (its certificate's SPIFFE URI SAN).
    pub peer: Identity,
    /// Resolves when the peer's certificate no longer chains to the trust
    /// anchors (one was removed): the connection and its streams end then.
    pub distrusted: Pin<Box<dyn Future<Output = TlsError> + Send>>,
    /// When the connection stops taking new streams: the earliest NotAfter
    /// of the two certificates its handshake used (`None`: never).
    pub retire_at: Option<SystemTime>,
}

/// One pooled HBONE connection, as status pages and tests see it.
#[derive(Clone, Debug, PartialEq)]
pub struct HboneConnectionInfo {
    pub id: u64,
    /// The client identity the connection authenticates as.
    pub source: Identity,
    /// The identity the connection was opened for (sent as SNI).
    pub destination: Identity,
    /// The identity the peer proved in the handshake (checked equal to
    /// `destination` before the connection carried anything).
    pub peer: Identity,
    /// The peer agent's HBONE address.
    pub node: SocketAddr,
    /// Whether the TLS handshake was full or resumed a previous session.
    pub handshake: HandshakeKind,
    /// Streams open on it now.
    pub streams: usize,
}

impl Pool {
    /// A stream slot on a connection for `key`, dialling a new connection
    /// with `dial` when none has room.
    pub async fn checkout<T, E, F, Fut>(&self, key: &PoolKey, dial: F) -> Result<Lease, E>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        E: From<PeerDialFailed>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Dialed<T>, E>>,
    {
        let slot = self.slot(key);
        if let Some(lease) = slot.try_lease() {
            return Ok(lease);
        }
        let failures_before = slot.failed_dials.load(Ordering::Acquire);
        let _dialing = slot.dialing.lock().await;
        if let Some(lease) = slot.try_lease() {
            return Ok(lease);
        }
        if slot.failed_dials.load(Ordering::Acquire) != failures_before {
            return Err(PeerDialFailed.into());
        }
        let Dialed {
            send,
            connection,
            handshake,
            peer,
            distrusted,
            retire_at,
        } = dial().await.inspect_err(|_| {
            slot.failed_dials.fetch_add(1, Ordering::AcqRel);
        })?;
        let conn = Arc::new(PooledConnection {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            send,
            handshake,
            peer,
            retire_at,
            streams: AtomicUsize::new(1),
            closed: AtomicBool::new(false),
            last_released: Mutex::new(Instant::now()),
        });
        slot.conns
            .lock()
            .expect("pool lock poisoned")
            .push(conn.clone());
        tokio::spawn(drive(
            connection,
            distrusted,
            Arc::downgrade(&slot),
            conn.clone(),
            key.clone(),
        ));
        Ok(Lease { conn })
    }

    /// Open connections over all keys, for status and tests.
    pub fn total_connections(&self) -> usize {
        let slots = self.slots.lock().expect("pool lock poisoned");
        slots
            .values()
            .map(|slot| {
                slot.conns
                    .lock()
                    .expect("pool lock poisoned")
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .count()
            })
            .sum()
    }

    /// Every open connection, ordered by id (the order they were dialled).
    pub fn connections(&self) -> Vec<HboneConnectionInfo> {
        let slots = self.slots.lock().expect("pool lock poisoned");
        let mut all: Vec<_> = slots
            .iter()
            .flat_map(|(key, slot)| {
                slot.conns
                    .lock()
                    .expect("pool lock poisoned")
                    .iter()
                    .filter(|c| !c.closed.load(Ordering::Acquire))
                    .map(|c| HboneConnectionInfo {
                        id: c.id,
                        source: key.source.clone(),
                        destination: key.destination.clone(),
                        peer: c.peer.clone(),
                        node: key.node,
                        handshake: c.handshake,
                        streams: c.streams.load(Ordering::Acquire),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    fn slot(&self, key: &PoolKey) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("pool lock poisoned");
        // Keys whose connections are all gone are pruned here, on the
        // (rare) path that creates keys, so the map tracks live peers.
        if !slots.contains_key(key) {
            slots.retain(|_, slot| Arc::strong_count(slot) > 1 || !slot.is_empty());
        }
        slots.entry(key.clone()).or_default().clone()
    }
}

impl Slot {
    fn try_lease(&self) -> Option<Lease> {
        let mut conns = self.conns.lock().expect("pool lock poisoned");
        conns.retain(|c| !c.closed.load(Ordering::Acquire));
        let now = SystemTime::now();
        // Fill the fullest connection that still has room: keeps streams
        // together and lets the others go idle and close.
        let conn = conns
            .iter()
            .filter(|c| c.retire_at.is_none_or(|at| now < at))
            .filter(|c| c.streams.load(Ordering::Acquire) < c.stream_budget())
            .max_by_key(|c| c.streams.load(Ordering::Acquire))?;
        conn.streams.fetch_add(1, Ordering::AcqRel);
        Some(Lease { conn: conn.clone() })
    }

    fn is_empty(&self) -> bool {
        self.conns.lock().expect("pool lock poisoned").is_empty()
    }
}

/// Runs a connection until it ends, stays idle too long or loses the
/// anchors' trust, then takes it out of the pool.
async fn drive<T>(
    mut connection: Connection<T, Bytes>,
    mut distrusted: Pin<Box<dyn Future<Output = TlsError> + Send>>,
    slot: Weak<Slot>,
    conn: Arc<PooledConnection>,
    key: PoolKey,
) where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut idle_check = tokio::time::interval(IDLE_TIMEOUT / 3);
    let mut unanswered = std::pin::pin!(unanswered_ping(
        connection
            .ping_pong()
            .expect("a new connection's ping handle is taken once, here")
    ));
    let outcome = loop {
        tokio::select! {
            result = &mut connection => break result.err(),
            () = &mut unanswered => {
                tracing::warn!(connection = conn.id, source = %key.source, destination = %key.destination, node = %key.node, timeout = ?PING_TIMEOUT, "the peer agent did not answer a ping; closing the HBONE connection and its streams");
                if let Some(slot) = slot.upgrade() {
                    slot.conns.lock().expect("pool lock poisoned").retain(|c| !Arc::ptr_eq(c, &conn));
                }
                break None;
            }
            error = &mut distrusted => {
                tracing::warn!(connection = conn.id, source = %key.source, destination = %key.destination, node = %key.node, %error, "the trust anchors no longer trust the peer agent; closing the HBONE connection and its streams");
                if let Some(slot) = slot.upgrade() {
                    slot.conns.lock().expect("pool lock poisoned").retain(|c| !Arc::ptr_eq(c, &conn));
                }
                break None;
            }
            _ = idle_check.tick() => {
                let Some(slot) = slot.upgrade() else { break None };
                // Decide under the slot lock so no lease is taken meanwhile.
                let mut conns = slot.conns.lock().expect("pool lock poisoned");
                let idle = conn.streams.load(Ordering::Acquire) == 0
                    && conn.last_released.lock().expect("pool lock poisoned").elapsed() >= IDLE_TIMEOUT;
                if idle {
                    conn.closed.store(true, Ordering::Release);
                    conns.retain(|c| !Arc::ptr_eq(c, &conn));
                    tracing::debug!(connection = conn.id, source = %key.source, destination = %key.destination, node = %key.node, "closing idle HBONE connection");
                    break None;
                }
            }
        }
    };
    conn.closed.store(true, Ordering::Release);
    if let Some(err) = outcome {
        tracing::info!(connection = conn.id, source = %key.source, destination = %key.destination, node = %key.node, error = %err, "HBONE connection ended");
    }
}

/// Pings every `PING_INTERVAL`; resolves when a pong does not come within
/// `PING_TIMEOUT`. Never resolves once the connection is gone (its driver
/// reports that).
async fn unanswered_ping(mut ping_pong: PingPong) {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use sealmesh_common::identity::TrustDomain;
    use tokio::net::TcpStream;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum TestError {
        Unreachable,
        Queued,
    }

    impl From<PeerDialFailed> for TestError {
        fn from(_: PeerDialFailed) -> Self {
            Self::Queued
        }
    }

    /// Pools one connection to an h2 server over an in-memory pipe; the
    /// server answers (pings included) only while `answering`.
    async fn pooled_connection_to(pool: &Pool, key: &PoolKey, answering: bool) {
        pooled_connection_retiring(pool, key, answering, None).await;
    }

    /// [`pooled_connection_to`], taking no new stream from `retire_at` on.
    async fn pooled_connection_retiring(
        pool: &Pool,
        key: &PoolKey,
        answering: bool,
        retire_at: Option<SystemTime>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            if answering {
                while connection.accept().await.is_some() {}
            } else {
                // Handshaken, then silent: a peer whose host vanished.
                std::future::pending::<()>().await;
            }
        });
        let lease = pool
            .checkout(key, || async {
                let (send, connection) = h2::client::handshake(client_io).await.unwrap();
                Ok::<_, TestError>(Dialed {
                    send,
                    connection,
                    handshake: HandshakeKind::Full,
                    peer: key.destination.clone(),
                    distrusted: Box::pin(std::future::pending()),
                    retire_at,
                })
            })
            .await
            .unwrap();
        drop(lease);
        // Keep the server task alive for the test's duration.
        std::mem::forget(server);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_whose_peer_stops_answering_pings_leave_the_pool() {
        let td = TrustDomain::default();
        let key = |destination: &str| PoolKey {
            source: td.identity("app", "a").unwrap(),
            destination: td.identity("app", destination).unwrap(),
            node: "127.0.0.1:15008".parse().unwrap(),
        };
        let pool = Pool::default();
        pooled_connection_to(&pool, &key("live"), true).await;
        pooled_connection_to(&pool, &key("dead"), false).await;
        assert_eq!(pool.total_connections(), 2);

        tokio::time::sleep(PING_INTERVAL + PING_TIMEOUT + Duration::from_secs(1)).await;
        let left: Vec<_> = pool
            .connections()
            .into_iter()
            .map(|c| c.destination.service_account().to_owned())
            .collect();
        assert_eq!(left, ["live"], "only the answering peer's connection stays");

        // Long after, the live one is still there: answered pings keep it.
        tokio::time::sleep(PING_INTERVAL * 3).await;
        assert_eq!(pool.total_connections(), 1);
    }

    #[tokio::test]
    async fn a_connection_whose_certificates_expired_takes_no_new_stream() {
        let td = TrustDomain::default();
        let key = |destination: &str| PoolKey {
            source: td.identity("app", "a").unwrap(),
            destination: td.identity("app", destination).unwrap(),
            node: "127.0.0.1:15008".parse().unwrap(),
        };
        let pool = Pool::default();
        let past = SystemTime::now() - Duration::from_secs(1);
        let future = SystemTime::now() + Duration::from_secs(3600);
        pooled_connection_retiring(&pool, &key("expired"), true, Some(past)).await;
        pooled_connection_retiring(&pool, &key("valid"), true, Some(future)).await;
        let dialled = |destination: &'static str| {
            let key = key(destination);
            let pool = &pool;
            async move {
                pool.checkout(&key, || async {
                    Err::<Dialed<TcpStream>, _>(TestError::Unreachable)
                })
                .await
                .is_err()
            }
        };
        assert!(dialled("expired").await, "a new connection is dialled");
        assert!(!dialled("valid").await, "the pooled connection is used");
    }

    #[tokio::test]
    async fn streams_queued_behind_a_failed_dial_fail_without_dialling_again() {
        let pool = Arc::new(Pool::default());
        let td = TrustDomain::default();
        let key = PoolKey {
            source: td.identity("app", "a").unwrap(),
            destination: td.identity("app", "b").unwrap(),
            node: "127.0.0.1:15008".parse().unwrap(),
        };
        let dials = Arc::new(AtomicUsize::new(0));
        let checkouts = (0..5).map(|_| {
            let (pool, key, dials) = (pool.clone(), key.clone(), dials.clone());
            tokio::spawn(async move {
                pool.checkout(&key, || async move {
                    dials.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Err::<Dialed<TcpStream>, _>(TestError::Unreachable)
                })
                .await
                .err()
            })
        });
        let mut results = Vec::new();
        for checkout in checkouts.collect::<Vec<_>>() {
            results.push(checkout.await.unwrap());
        }
        assert_eq!(dials.load(Ordering::SeqCst), 1, "one dial for the burst");
        assert_eq!(
            results
                .iter()
                .filter(|r| **r == Some(TestError::Unreachable))
                .count(),
            1
        );
        assert_eq!(
            results
                .iter()
                .filter(|r| **r == Some(TestError::Queued))
                .count(),
            4
        );

        // A later stream tries again.
        let later = pool
            .checkout(&key, || async {
                Err::<Dialed<TcpStream>, _>(TestError::Unreachable)
            })
            .await
            .err();
        assert_eq!(later, Some(TestError::Unreachable));
        assert_eq!(pool.total_connections(), 0);
    }
}
