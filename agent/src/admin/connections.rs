//! The agent's view of its connections for the admin API: those open now and
//! the edges (pod pairs) seen since start. Fed synchronously by the TLS
//! engine ([`ConnectionObserver`]), so it never misses an open or a close.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, atomic::Ordering},
    time::Duration,
};

use crate::{
    proxy::{ByteCounters, ConnectionEvent, ConnectionObserver, Direction, NoTlsReason, PodRef},
    registry::WorkloadRegistry,
};

/// Most edges kept; beyond it the least recently seen edge without open
/// connections makes room (edges are per pod pair, so this only bites on
/// very large, churning nodes).
pub const MAX_EDGES: usize = 4096;

/// What makes connections the same edge.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EdgeKey {
    pub src: Option<PodRef>,
    pub dst: Option<PodRef>,
    pub direction: Direction,
    pub client_id: Option<String>,
    pub server_id: Option<String>,
    pub tls: bool,
    pub no_tls_reason: Option<NoTlsReason>,
}

impl EdgeKey {
    fn of(e: &ConnectionEvent) -> Self {
        Self {
            src: e.src.clone(),
            dst: e.dst.clone(),
            direction: e.direction,
            client_id: e.client_id.clone(),
            server_id: e.server_id.clone(),
            tls: e.tls,
            no_tls_reason: e.no_tls_reason,
        }
    }
}

/// Counts of one edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeStats {
    /// Connections opened, plus those refused before opening.
    pub connections_total: u64,
    pub connections_open: u64,
    /// Connections refused or broken.
    pub errors_total: u64,
    /// Of `connections_total`, those refused before they opened.
    pub refused_total: u64,
    /// Of `refused_total`, those an authorization policy denied, and the
    /// policy that denied the latest.
    pub denied_total: u64,
    pub denied_policy: Option<String>,
    /// The latest dry-run policy that would have denied one of the pair's
    /// connections.
    pub dry_run_denied_policy: Option<String>,
    pub last_seen_ms: u64,
    /// The pods' addresses when last seen, to tell whether they are still
    /// the same pods in the registry.
    src_ip: Option<IpAddr>,
    dst_ip: Option<IpAddr>,
}

/// An open connection: its open event and live byte counts.
struct OpenConnection {
    event: Arc<ConnectionEvent>,
    bytes: Arc<ByteCounters>,
}

#[derive(Default)]
struct Table {
    open: HashMap<u64, OpenConnection>,
    edges: HashMap<EdgeKey, EdgeStats>,
}

/// Open connections and edges; see the module docs.
#[derive(Default)]
pub struct ConnectionTable {
    table: Mutex<Table>,
}

impl std::fmt::Debug for ConnectionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.lock();
        f.debug_struct("ConnectionTable")
            .field("open", &table.open.len())
            .field("edges", &table.edges.len())
            .finish()
    }
}

impl ConnectionTable {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().expect("connection table lock poisoned")
    }

    /// Connections open now, oldest first, with their bytes so far and age.
    pub fn open_connections(&self, now_ms: u64) -> Vec<ConnectionEvent> {
        let table = self.lock();
        let mut open: Vec<ConnectionEvent> = table
            .open
            .values()
            .map(|c| {
                let mut e = ConnectionEvent::clone(&c.event);
                e.bytes_src_to_dst = c.bytes.src_to_dst.load(Ordering::Relaxed);
                e.bytes_dst_to_src = c.bytes.dst_to_src.load(Ordering::Relaxed);
                e.duration_ms = now_ms.saturating_sub(e.timestamp_ms);
                e
            })
            .collect();
        open.sort_by_key(|e| e.id);
        open
    }

    /// Every edge, in no particular order.
    pub fn edges(&self) -> Vec<(EdgeKey, EdgeStats)> {
        self.lock()
            .edges
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Drops edges without open connections whose source or destination pod
    /// is no longer in the registry (as the same pod at the same address).
    pub fn forget_departed(&self, registry: &dyn WorkloadRegistry) {
        let present = |pod: &Option<PodRef>, ip: Option<IpAddr>| match (pod, ip) {
            (None, _) => true,
            (Some(pod), Some(IpAddr::V4(ip))) => registry
                .by_ip(ip)
                .is_some_and(|w| w.namespace == pod.namespace && w.name == pod.name),
            (Some(_), _) => false,
        };
        self.lock().edges.retain(|key, stats| {
            stats.connections_open > 0
                || (present(&key.src, stats.src_ip) && present(&key.dst, stats.dst_ip))
        });
    }

    fn touch<'t>(table: &'t mut Table, e: &ConnectionEvent) -> &'t mut EdgeStats {
        let key = EdgeKey::of(e);
        if !table.edges.contains_key(&key) && table.edges.len() >= MAX_EDGES {
            let evict = table
                .edges
                .iter()
                .filter(|(_, s)| s.connections_open == 0)
                .min_by_key(|(_, s)| s.last_seen_ms)
                .map(|(k, _)| k.clone());
            if let Some(evict) = evict {
                table.edges.remove(&evict);
            }
        }
        let stats = table.edges.entry(key).or_insert(EdgeStats {
            connections_total: 0,
            connections_open: 0,
            errors_total: 0,
            refused_total: 0,
            denied_total: 0,
            denied_policy: None,
            dry_run_denied_policy: None,
            last_seen_ms: 0,
            src_ip: None,
            dst_ip: None,
        });
        stats.last_seen_ms = e.timestamp_ms;
        stats.src_ip = e.src.as_ref().map(|_| e.src_addr.ip());
        stats.dst_ip = e.dst.as_ref().and(e.dst_addr).map(|a| a.ip());
        if let Some(dry_run) = e.authz.as_ref().and_then(|a| a.dry_run_denied.as_ref()) {
            stats.dry_run_denied_policy = Some(dry_run.policy.clone());
        }
        stats
    }
}

impl ConnectionObserver for ConnectionTable {
    fn connection_opened(&self, event: &Arc<ConnectionEvent>, bytes: &Arc<ByteCounters>) {
        let mut table = self.lock();
        table.open.insert(
            event.id,
            OpenConnection {
                event: event.clone(),
                bytes: bytes.clone(),
            },
        );
        let stats = Self::touch(&mut table, event);
        stats.connections_total += 1;
        stats.connections_open += 1;
    }

    fn connection_closed(&self, event: &ConnectionEvent, opened: bool) {
        let mut table = self.lock();
        let was_open = table.open.remove(&event.id).is_some();
        let stats = Self::touch(&mut table, event);
        if was_open {
            stats.connections_open = stats.connections_open.saturating_sub(1);
        }
        if !opened {
            // Refused: it never opened, so it is counted here.
            stats.connections_total += 1;
            stats.refused_total += 1;
            if let Some(denied) = event.authz.as_ref().and_then(|a| a.denied.as_ref()) {
                stats.denied_total += 1;
                stats.denied_policy = Some(denied.policy.clone());
            }
        }
        if event.error.is_some() {
            stats.errors_total += 1;
        }
    }

    fn tls_handshake(&self, _: Direction, _: Duration) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::Phase;

    fn event(id: u64, phase: Phase, ts: u64) -> ConnectionEvent {
        ConnectionEvent {
            timestamp_ms: ts,
            dst_addr: Some("10.244.1.2:8080".parse().unwrap()),
            src: Some(PodRef {
                namespace: "shop".into(),
                name: "client".into(),
            }),
            dst: Some(PodRef {
                namespace: "shop".into(),
                name: "server".into(),
            }),
            client_id: Some("spiffe://cluster.local/ns/shop/sa/client".into()),
            server_id: Some("spiffe://cluster.local/ns/shop/sa/server".into()),
            tls: true,
            ..ConnectionEvent::new(
                id,
                phase,
                Direction::Outbound,
                "10.244.0.2:40000".parse().unwrap(),
            )
        }
    }

    #[test]
    fn counts_open_close_and_refusals_per_edge() {
        let table = ConnectionTable::default();
        let bytes = Arc::new(ByteCounters::default());
        table.connection_opened(&Arc::new(event(1, Phase::Open, 1000)), &bytes);
        table.connection_opened(&Arc::new(event(2, Phase::Open, 1001)), &bytes);
        bytes.src_to_dst.store(5, Ordering::Relaxed);
        let open = table.open_connections(1500);
        assert_eq!(open.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((open[0].bytes_src_to_dst, open[0].duration_ms), (5, 500));

        table.connection_closed(&event(1, Phase::Close, 2000), true);
        let mut refused = event(3, Phase::Close, 2100);
        refused.error = Some("refused".into());
        table.connection_closed(&refused, false);

        let edges = table.edges();
        assert_eq!(edges.len(), 1);
        let stats = &edges[0].1;
        assert_eq!(
            (
                stats.connections_total,
                stats.connections_open,
                stats.errors_total,
                stats.refused_total,
                stats.last_seen_ms
            ),
            (3, 1, 1, 1, 2100)
        );
        assert_eq!(table.open_connections(3000).len(), 1);
    }

    #[test]
    fn evicts_the_least_recently_seen_idle_edge_when_full() {
        let table = ConnectionTable::default();
        for i in 0..MAX_EDGES as u64 + 1 {
            let mut e = event(i, Phase::Close, 10 + i);
            e.src.as_mut().unwrap().name = format!("client-{i}");
            table.connection_closed(&e, false);
        }
        let edges = table.edges();
        assert_eq!(edges.len(), MAX_EDGES);
        assert!(
            !edges
                .iter()
                .any(|(k, _)| k.src.as_ref().unwrap().name == "client-0")
        );
    }
}
