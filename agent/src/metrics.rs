//! Prometheus metrics (OpenMetrics text) and liveness/readiness, served over
//! HTTP on `--metrics-listen` (0.0.0.0:15020 by default, like other node
//! agents' probe ports; it carries aggregates, never per-connection data):
//!
//! - `GET /metrics`: every series below;
//! - `GET /healthz/live`: 200 while the TLS engine accepts connections;
//! - `GET /healthz/ready`: 200 when ready, else 503 with the reasons.
//!
//! Series follow Linkerd's TCP metrics. Connection series are labelled
//! `direction`, `tls`, `client_id`, `server_id`, `no_tls_reason`,
//! `src_namespace`, `dst_namespace` — never by pod, connection or port, so
//! their number is bounded by identity pairs; on `tcp_refused_total`,
//! which counts connections that never opened, `no_tls_reason` is the
//! refusal reason ([`RefusalReason`], never empty) — and the series of identities
//! (or, for plaintext, namespaces) that left the node are dropped
//! ([`AgentMetrics::forget_departed`]). Bytes count as they flow: a scrape adds
//! the live counters of open connections to the totals of closed ones, so a
//! long-lived stream's traffic shows while it runs, not only at its close.
//! Certificate series are read from the cert store at each scrape, so only
//! identities the store maintains appear.
//!
//! `sealmesh_inbound_refused_total{namespace,pod,reason}` counts the
//! connection attempts the kernel refused each local strict pod, read from
//! the kernel's own counters at each scrape (exact even when the agent was
//! busy or restarted; a pod's series goes when it stops being strict).
//!
//! The port shows identities and traffic counts, so with a strict cluster
//! default (or `--metrics-allowed-cidrs`) it answers only the node itself
//! and the allowed networks; others are refused at accept and counted in
//! `sealmesh_metrics_refused_total` ([`MetricsAccessCheck`]).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, SystemTime},
};

use http::StatusCode;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use sealmesh_common::{
    consts::{HEALTH_LIVE_PATH, HEALTH_READY_PATH},
    probe::{self, Reply},
    process_metrics,
};
use tokio::net::TcpListener;

use crate::{
    certs::CertStore,
    config::MetricsAccess,
    proxy::{
        ByteCounters, ConnectionEvent, ConnectionObserver, Direction, NoTlsReason, PodRef,
        RefusalReason,
    },
    registry::WorkloadRegistry,
};

const PREFIX: &str = "sealmesh";

/// Whether the agent is ready, and why not; and what degrades it without
/// making it unready (it serves from its last state meanwhile).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub reasons: Vec<String>,
    pub warnings: Vec<String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// Labels of every connection series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: &'static str,
    pub tls: &'static str,
    pub client_id: String,
    pub server_id: String,
    pub no_tls_reason: &'static str,
    pub src_namespace: String,
    pub dst_namespace: String,
}

impl ConnectionLabels {
    fn of(e: &ConnectionEvent) -> Self {
        let namespace = |pod: &Option<crate::proxy::PodRef>| {
            pod.as_ref()
                .map(|p| p.namespace.clone())
                .unwrap_or_default()
        };
        Self {
            direction: e.direction.as_str(),
            tls: if e.tls { "true" } else { "false" },
            client_id: e.client_id.clone().unwrap_or_default(),
            server_id: e.server_id.clone().unwrap_or_default(),
            // A refused connection carried nothing, with or without TLS:
            // its reason is the refusal's.
            no_tls_reason: e
                .refused_reason
                .map(RefusalReason::as_str)
                .or(e.no_tls_reason.map(NoTlsReason::as_str))
                .unwrap_or(""),
            src_namespace: namespace(&e.src),
            dst_namespace: namespace(&e.dst),
        }
    }

    /// The side of the connection that runs on this node: its identity
    /// (or, without one, its namespace).
    fn local_side(&self) -> (&str, &str) {
        match self.direction {
            "inbound" => (&self.server_id, &self.dst_namespace),
            _ => (&self.client_id, &self.src_namespace),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    identity: String,
    result: &'static str,
}

/// `<namespace>/<name>` of a policy of this cluster (judged here, so the
/// values are bounded by the policies that exist) and what it did.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthorizationLabels {
    policy: String,
    /// `denied` (refused before it opened), `revoked` (reset when a policy
    /// change denied it), `would_deny` (a dry-run policy).
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedPodLabels {
    namespace: String,
    pod: String,
    reason: &'static str,
}

type ConnectionFamily = Family<ConnectionLabels, Counter>;

/// The kernel's refusal counts of local strict pods
/// ([`InboundPolicyState`](crate::inbound_policy::InboundPolicyState)).
pub trait InboundRefusalCounts: Send + Sync + 'static {
    /// Each pod the kernel guards, with its refusals.
    fn refused_by_pod(&self) -> Vec<PodRefusals>;
}

/// What the kernel refused one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRefusals {
    pub pod: PodRef,
    /// `strict_inbound`, or `policy_denied` for a pod guarded by its
    /// authorization policies.
    pub reason: RefusalReason,
    /// Connection attempts refused.
    pub refused: u64,
    /// Of those, attempts that could not be reported (the agent fell behind).
    pub unreported: u64,
}

/// The agent's metrics registry; feed it as a [`ConnectionObserver`].
pub struct AgentMetrics {
    registry: Registry,
    opened: ConnectionFamily,
    closed: ConnectionFamily,
    refused: ConnectionFamily,
    open: Family<ConnectionLabels, Gauge>,
    bytes: Arc<ByteTotals>,
    handshakes: Family<HandshakeLabels, Histogram>,
    /// Connections the metrics port refused (see [`MetricsAccessCheck`]).
    metrics_refused: Counter,
    authorization: Family<AuthorizationLabels, Counter>,
    /// Every connection label set in use, so departed ones can be removed.
    label_sets: Mutex<HashSet<ConnectionLabels>>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl AgentMetrics {
    pub fn new(certs: Arc<CertStore>, refusals: Arc<dyn InboundRefusalCounts>) -> Self {
        let mut root = Registry::default();
        process_metrics::register(&mut root, "agent", env!("CARGO_PKG_VERSION"));
        let registry = root.sub_registry_with_prefix(PREFIX);
        let mut family = |name: &str, help: &str| {
            let family = ConnectionFamily::default();
            registry.register(name, help, family.clone());
            family
        };
        let opened = family(
            "tcp_open",
            "TCP connections opened (path to the destination up)",
        );
        let closed = family("tcp_close", "TCP connections closed after they opened");
        let refused = family(
            "tcp_refused",
            "TCP connections refused before they opened (fail closed, policy, unreachable)",
        );
        let bytes = Arc::new(ByteTotals::default());
        registry.register_collector(Box::new(ByteCollector {
            totals: bytes.clone(),
        }));
        let open = Family::<ConnectionLabels, Gauge>::default();
        registry.register(
            "tcp_open_connections",
            "TCP connections open now",
            open.clone(),
        );
        // 250µs .. ~4s
        let handshakes = Family::<HandshakeLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.00025, 2.0, 15))) as fn() -> Histogram,
        );
        registry.register(
            "tls_handshake_duration_seconds",
            "Duration of completed mTLS handshakes with peer agents",
            handshakes.clone(),
        );
        registry.register_collector(Box::new(CertificateCollector { certs }));
        registry.register_collector(Box::new(InboundRefusalCollector { refusals }));
        let metrics_refused = Counter::default();
        registry.register(
            "metrics_refused",
            "Connections to this metrics port refused because they came neither from the node nor from --metrics-allowed-cidrs",
            metrics_refused.clone(),
        );
        let authorization = Family::<AuthorizationLabels, Counter>::default();
        registry.register(
            "authorization_decisions",
            "Connections to this node's pods that an authorization policy denied, reset after a policy change, or would deny (dry run), by policy",
            authorization.clone(),
        );
        Self {
            registry: root,
            opened,
            closed,
            refused,
            open,
            bytes,
            handshakes,
            metrics_refused,
            authorization,
            label_sets: Mutex::new(HashSet::new()),
        }
    }

    /// Adds `sealmesh_control_plane_failing{source}`: 1 for each part of
    /// the registry's source (e.g. a Kubernetes API watch) failing now.
    pub fn with_source_health(mut self, registry: Arc<dyn WorkloadRegistry>) -> Self {
        self.registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(SourceHealthCollector { registry }));
        self
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// Drops the connection series whose local side (identity, or namespace
    /// for connections without one) is no longer on this node.
    pub fn forget_departed(
        &self,
        local_identities: &BTreeSet<String>,
        local_namespaces: &BTreeSet<String>,
    ) {
        let mut label_sets = self.label_sets.lock().expect("metrics lock poisoned");
        label_sets.retain(|labels| {
            let (identity, namespace) = labels.local_side();
            let present = if identity.is_empty() {
                local_namespaces.contains(namespace)
            } else {
                local_identities.contains(identity)
            };
            if !present {
                for family in [&self.opened, &self.closed, &self.refused] {
                    family.remove(labels);
                }
                self.open.remove(labels);
                self.bytes.forget(labels);
            }
            present
        });
    }

    /// Counts what a policy of this node's pods decided. An outbound
    /// connection's policy was judged here only when its destination is on
    /// this node (secured local); a peer's 403 is counted by the peer.
    fn count_authorization(&self, e: &ConnectionEvent, opened: bool) {
        let Some(note) = &e.authz else { return };
        let judged_here =
            e.direction == Direction::Inbound || e.no_tls_reason == Some(NoTlsReason::SecuredLocal);
        if !judged_here {
            return;
        }
        let count = |policy: &str, decision| {
            self.authorization
                .get_or_create(&AuthorizationLabels {
                    policy: policy.to_owned(),
                    decision,
                })
                .inc();
        };
        if let Some(denied) = &note.denied {
            count(&denied.policy, if opened { "revoked" } else { "denied" });
        }
        if let Some(dry_run) = &note.dry_run_denied {
            count(&dry_run.policy, "would_deny");
        }
    }

    fn labels(&self, e: &ConnectionEvent) -> ConnectionLabels {
        let labels = ConnectionLabels::of(e);
        let mut label_sets = self.label_sets.lock().expect("metrics lock poisoned");
        if !label_sets.contains(&labels) {
            label_sets.insert(labels.clone());
        }
        labels
    }
}

impl ConnectionObserver for AgentMetrics {
    fn connection_opened(&self, event: &Arc<ConnectionEvent>, bytes: &Arc<ByteCounters>) {
        let labels = self.labels(event);
        self.opened.get_or_create(&labels).inc();
        self.open.get_or_create(&labels).inc();
        self.bytes.opened(event.id, labels, bytes.clone());
    }

    fn connection_closed(&self, event: &ConnectionEvent, opened: bool) {
        self.count_authorization(event, opened);
        let labels = self.labels(event);
        if !opened {
            self.refused.get_or_create(&labels).inc();
            return;
        }
        self.closed.get_or_create(&labels).inc();
        // Absent when the series was dropped while the connection was open.
        if let Some(open) = self.open.get(&labels) {
            open.dec();
        }
        self.bytes.closed(event, labels);
    }

    fn tls_handshake(&self, direction: Direction, elapsed: Duration) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                direction: direction.as_str(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// Bytes per label set: totals of closed connections, and the live counters
/// of open ones (updated by the splice loops, read only at scrape).
#[derive(Debug, Default)]
struct ByteTotals {
    inner: Mutex<HashMap<ConnectionLabels, LabelSetBytes>>,
}

/// One label set's bytes. Open connections are kept under their label set,
/// so each costs an id and a counter handle rather than its own copy of the
/// labels (memory per idle connection).
#[derive(Debug, Default)]
struct LabelSetBytes {
    /// (source to destination, destination to source) of closed connections.
    closed: (u64, u64),
    /// Open connections by event id.
    open: HashMap<u64, Arc<ByteCounters>>,
}

impl ByteTotals {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionLabels, LabelSetBytes>> {
        self.inner.lock().expect("byte totals lock poisoned")
    }

    fn opened(&self, id: u64, labels: ConnectionLabels, bytes: Arc<ByteCounters>) {
        self.lock()
            .entry(labels)
            .or_default()
            .open
            .insert(id, bytes);
    }

    /// Moves a connection's final counts into its totals, in one step with
    /// its removal from the open set, so no scrape sees a total go down.
    fn closed(&self, event: &ConnectionEvent, labels: ConnectionLabels) {
        let mut sets = self.lock();
        let open = sets
            .get_mut(&labels)
            .and_then(|set| set.open.remove(&event.id))
            // Labels that changed since the open (not expected): look
            // through every set rather than keep counting it as open.
            .or_else(|| sets.values_mut().find_map(|set| set.open.remove(&event.id)));
        let counted = match open {
            Some(bytes) => (
                bytes.src_to_dst.load(Ordering::Relaxed),
                bytes.dst_to_src.load(Ordering::Relaxed),
            ),
            // Opened before this observer was added.
            None => (event.bytes_src_to_dst, event.bytes_dst_to_src),
        };
        let total = &mut sets.entry(labels).or_default().closed;
        total.0 += counted.0;
        total.1 += counted.1;
    }

    /// Drops the totals of a departed label set (open connections keep
    /// counting and bring it back when they close).
    fn forget(&self, labels: &ConnectionLabels) {
        let mut sets = self.lock();
        if sets.get(labels).is_some_and(|set| set.open.is_empty()) {
            sets.remove(labels);
        }
    }

    /// (read, written) per label set, open connections included.
    fn now(&self) -> Vec<(ConnectionLabels, u64, u64)> {
        self.lock()
            .iter()
            .map(|(labels, set)| {
                let (read, written) =
                    set.open
                        .values()
                        .fold(set.closed, |(read, written), bytes| {
                            (
                                read + bytes.src_to_dst.load(Ordering::Relaxed),
                                written + bytes.dst_to_src.load(Ordering::Relaxed),
                            )
                        });
                (labels.clone(), read, written)
            })
            .collect()
    }
}

/// `tcp_read_bytes` and `tcp_write_bytes`, from [`ByteTotals`] at each scrape.
#[derive(Debug)]
struct ByteCollector {
    totals: Arc<ByteTotals>,
}

impl Collector for ByteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = self.totals.now();
        if totals.is_empty() {
            return Ok(());
        }
        for (name, help, read) in [
            (
                "tcp_read_bytes",
                "Bytes read from connections' sources (source to destination), open connections included",
                true,
            ),
            (
                "tcp_write_bytes",
                "Bytes written back to connections' sources (destination to source), open connections included",
                false,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for (labels, read_bytes, written_bytes) in &totals {
                let value = if read { *read_bytes } else { *written_bytes };
                ConstCounter::new(value).encode(metric.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// `control_plane_failing`, read from the registry at each scrape.
struct SourceHealthCollector {
    registry: Arc<dyn WorkloadRegistry>,
}

impl std::fmt::Debug for SourceHealthCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceHealthCollector")
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

impl Collector for SourceHealthCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let failures = self.registry.source_failures();
        if failures.is_empty() {
            return Ok(());
        }
        let mut metric = encoder.encode_descriptor(
            "control_plane_failing",
            "1 for each part of the agent's control-plane source failing now (it serves its last state meanwhile)",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (source, _) in failures {
            ConstGauge::new(1i64).encode(metric.encode_family(&SourceLabels { source })?)?;
        }
        Ok(())
    }
}

/// Certificate series, read from the cert store at each scrape.
#[derive(Debug)]
struct CertificateCollector {
    certs: Arc<CertStore>,
}

impl Collector for CertificateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.certs.snapshot();
        let expiry = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0)
        };
        let held: Vec<_> = snapshot
            .iter()
            .filter_map(|s| s.not_after.map(|t| (s.identity.spiffe_uri(), expiry(t))))
            .collect();
        if !held.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "certificate_expiry_timestamp_seconds",
                "NotAfter of the certificate held for each local identity, as a Unix timestamp",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (identity, not_after) in &held {
                let labels = IdentityLabels {
                    identity: identity.clone(),
                };
                ConstGauge::new(*not_after).encode(metric.encode_family(&labels)?)?;
            }
        }
        if !snapshot.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "certificate_refresh",
                "Attempts to obtain a certificate from the identity service, by identity and result",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for status in &snapshot {
                let identity = status.identity.spiffe_uri();
                for (result, count) in [
                    ("success", status.refreshes_succeeded),
                    ("failure", status.refreshes_failed),
                ] {
                    let labels = RefreshLabels {
                        identity: identity.clone(),
                        result,
                    };
                    ConstCounter::new(count).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Refusal counts of strict pods, read from the kernel at each scrape.
struct InboundRefusalCollector {
    refusals: Arc<dyn InboundRefusalCounts>,
}

impl std::fmt::Debug for InboundRefusalCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRefusalCollector")
            .finish_non_exhaustive()
    }
}

impl Collector for InboundRefusalCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pods = self.refusals.refused_by_pod();
        if pods.is_empty() {
            return Ok(());
        }
        let mut unreported = 0;
        {
            let mut metric = encoder.encode_descriptor(
                "inbound_refused",
                "Connection attempts the kernel refused a pod it guards (plaintext that did not come through the node's agent and that the pod's policies refuse), by pod and reason",
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for pod in &pods {
                let labels = RefusedPodLabels {
                    namespace: pod.pod.namespace.clone(),
                    pod: pod.pod.name.clone(),
                    reason: pod.reason.as_str(),
                };
                ConstCounter::new(pod.refused).encode(metric.encode_family(&labels)?)?;
                unreported += pod.unreported;
            }
        }
        let metric = encoder.encode_descriptor(
            "inbound_refusals_unreported",
            "Refused attempts the agent could not show in tap and the access log (it fell behind the kernel); they are counted in sealmesh_inbound_refused_total",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        ConstCounter::new(unreported).encode(metric)
    }
}

/// Who may connect to the metrics port: the node itself and the allowed
/// networks.
#[derive(Clone, Debug)]
pub struct MetricsAccessCheck {
    access: MetricsAccess,
}

impl MetricsAccessCheck {
    pub fn new(access: MetricsAccess) -> Self {
        Self { access }
    }

    /// Whether a connection from `peer`, accepted on `local`, may be served.
    /// The node itself is a peer whose address is one of the host's own (a
    /// packet from elsewhere with such a source is dropped by the kernel as
    /// a martian).
    pub fn admits(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        let ip = match peer.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return v6.is_loopback(),
            },
            ip => ip,
        };
        let IpAddr::V4(v4) = ip else { return false };
        v4.is_loopback()
            || ip == local.ip()
            || self
                .access
                .allowed_cidrs
                .iter()
                .any(|net| net.contains(&v4))
            || is_local_address(ip)
    }
}

/// Whether `ip` is assigned to an interface of this network namespace.
pub(crate) fn is_local_address(ip: IpAddr) -> bool {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| a.address)
            .filter_map(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                _ => None,
            })
            .any(|local| local == ip),
        Err(error) => {
            tracing::warn!(%error, "cannot list this node's addresses; treating {ip} as remote");
            false
        }
    }
}

/// What the health endpoints report.
pub trait Health: Send + Sync {
    /// `Err` with the reason when the agent cannot serve any more and a
    /// restart is the cure.
    fn liveness(&self) -> Result<(), String>;
    fn readiness(&self) -> Readiness;
}

/// Serves `/metrics`, `/healthz/live` and `/healthz/ready` on `listener`
/// until `shutdown` resolves; connections `access` does not admit are
/// closed at once, counted and logged.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<AgentMetrics>,
    health: Arc<dyn Health>,
    access: MetricsAccessCheck,
    shutdown: impl Future<Output = ()>,
) {
    let refused = metrics.metrics_refused.clone();
    let routes = move |path: &str| match path {
        "/metrics" => Reply::openmetrics(metrics.encode()),
        HEALTH_LIVE_PATH => match health.liveness() {
            Ok(()) => Reply::text(StatusCode::OK, "ok\n"),
            Err(reason) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not live: {reason}\n"),
            ),
        },
        HEALTH_READY_PATH => {
            let readiness = health.readiness();

            if readiness.is_ready() && readiness.warnings.is_empty() {
                Reply::text(StatusCode::OK, "ready\n")
            } else if readiness.is_ready() {
                let mut body = String::from("ready, degraded:\n");
                for warning in &readiness.warnings {
                    body.push_str("- ");
                    body.push_str(warning);
                    body.push('\n');
                }
                Reply::text(StatusCode::OK, body)
            } else {
                let mut body = String::from("not ready:\n");
                for reason in &readiness.reasons {
                    body.push_str("- ");
                    body.push_str(reason);
                    body.push('\n');
                }
                Reply::text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        _ => Reply::text(
            StatusCode::NOT_FOUND,
            format!("not found; try /metrics, {HEALTH_LIVE_PATH} or {HEALTH_READY_PATH}\n"),
        ),
    };
    let admit = move |peer: SocketAddr, local: SocketAddr| {
        let admitted = access.admits(peer, local);
        if !admitted {
            refused.inc();
            tracing::warn!(%peer, "metrics port: connection refused; only the node itself and --metrics-allowed-cidrs may read it");
        }
        admitted
    };
    probe::serve_admitting(listener, Arc::new(routes), Arc::new(admit), shutdown).await;
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    use sealmesh_common::identity::TrustDomain;

    use super::*;
    use crate::{
        certs::CertStoreConfig,
        proxy::{Phase, PodRef},
    };

    fn store(dir: &tempfile::TempDir) -> Arc<CertStore> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let anchors = dir.path().join("ca-bundle.crt");
        std::fs::write(&anchors, root.pem()).unwrap();
        CertStore::new(CertStoreConfig {
            identity_addr: "127.0.0.1:1".parse().unwrap(),
            token_file: dir.path().join("token"),
            trust_anchors_file: anchors,
            trust_domain: TrustDomain::default(),
            renewal: Default::default(),
            cache_dir: None,
        })
        .unwrap()
    }

    struct NoStrictPods;

    impl InboundRefusalCounts for NoStrictPods {
        fn refused_by_pod(&self) -> Vec<PodRefusals> {
            Vec::new()
        }
    }

    struct StrictPods;

    impl InboundRefusalCounts for StrictPods {
        fn refused_by_pod(&self) -> Vec<PodRefusals> {
            let pod = |name: &str, reason, refused, unreported| PodRefusals {
                pod: PodRef {
                    namespace: "shop".into(),
                    name: name.into(),
                },
                reason,
                refused,
                unreported,
            };
            vec![
                pod("web", RefusalReason::StrictInbound, 3, 1),
                pod("db", RefusalReason::StrictInbound, 0, 0),
                pod("api", RefusalReason::PolicyDenied, 2, 1),
            ]
        }
    }

    #[tokio::test]
    async fn strict_pods_refusals_are_counted_by_pod_with_no_empty_label() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = AgentMetrics::new(store(&dir), Arc::new(StrictPods));
        let text = metrics.encode();
        for line in [
            "sealmesh_inbound_refused_total{namespace=\"shop\",pod=\"web\",reason=\"strict_inbound\"} 3\n",
            "sealmesh_inbound_refused_total{namespace=\"shop\",pod=\"db\",reason=\"strict_inbound\"} 0\n",
            "sealmesh_inbound_refused_total{namespace=\"shop\",pod=\"api\",reason=\"policy_denied\"} 2\n",
            "sealmesh_inbound_refusals_unreported_total 2\n",
            "sealmesh_metrics_refused_total 0\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        let empty = AgentMetrics::new(store(&dir), Arc::new(NoStrictPods)).encode();
        assert!(!empty.contains("sealmesh_inbound_refused"), "{empty}");
    }

    #[test]
    fn metrics_access_admits_the_node_and_the_allowed_networks_only() {
        let local: SocketAddr = "172.18.0.2:15020".parse().unwrap();
        let node_only = MetricsAccessCheck::new(MetricsAccess::default());
        assert!(!node_only.admits("10.244.0.9:5000".parse().unwrap(), local));
        assert!(node_only.admits("172.18.0.2:5000".parse().unwrap(), local));
        let restricted = MetricsAccessCheck::new(MetricsAccess {
            allowed_cidrs: vec!["10.244.3.0/24".parse().unwrap()],
        });
        for (peer, admitted) in [
            ("172.18.0.2:5000", true),
            ("127.0.0.1:5000", true),
            ("[::1]:5000", true),
            ("[::ffff:127.0.0.1]:5000", true),
            ("10.244.3.17:5000", true),
            ("10.244.0.9:5000", false),
            ("172.18.0.3:5000", false),
            ("[fd00::9]:5000", false),
        ] {
            assert_eq!(
                restricted.admits(peer.parse().unwrap(), local),
                admitted,
                "{peer}"
            );
        }
    }

    fn plaintext(id: u64, src_namespace: &str) -> ConnectionEvent {
        ConnectionEvent {
            dst_addr: Some("10.244.1.3:8080".parse().unwrap()),
            src: Some(PodRef {
                namespace: src_namespace.into(),
                name: "client".into(),
            }),
            dst: Some(PodRef {
                namespace: "legacy".into(),
                name: "plain".into(),
            }),
            no_tls_reason: Some(NoTlsReason::NotMeshed),
            bytes_src_to_dst: 11,
            bytes_dst_to_src: 22,
            duration_ms: 5,
            ..ConnectionEvent::new(
                id,
                Phase::Close,
                Direction::Outbound,
                "10.244.0.2:40000".parse().unwrap(),
            )
        }
    }

    #[tokio::test]
    async fn counts_connections_and_drops_the_series_of_departed_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = AgentMetrics::new(store(&dir), Arc::new(NoStrictPods));
        for (id, namespace) in [(1, "shop"), (2, "gone")] {
            let bytes = Arc::new(ByteCounters::default());
            metrics.connection_opened(&Arc::new(plaintext(id, namespace)), &bytes);
            bytes.src_to_dst.store(11, Ordering::Relaxed);
            bytes.dst_to_src.store(22, Ordering::Relaxed);
            metrics.connection_closed(&plaintext(id, namespace), true);
        }
        metrics.connection_closed(&plaintext(3, "shop"), false);
        metrics.tls_handshake(Direction::Inbound, Duration::from_millis(3));

        let series = |name: &str, namespace: &str| {
            format!(
                "sealmesh_{name}{{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"not_meshed\",src_namespace=\"{namespace}\",dst_namespace=\"legacy\"}}"
            )
        };
        let text = metrics.encode();
        for (name, value) in [
            ("tcp_open_total", "1"),
            ("tcp_close_total", "1"),
            ("tcp_refused_total", "1"),
            ("tcp_open_connections", "0"),
            ("tcp_read_bytes_total", "11"),
            ("tcp_write_bytes_total", "22"),
        ] {
            let line = format!("{} {value}\n", series(name, "shop"));
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        assert!(
            text.contains(
                "sealmesh_tls_handshake_duration_seconds_count{direction=\"inbound\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains(&series("tcp_open_total", "gone")), "{text}");

        metrics.forget_departed(&BTreeSet::new(), &BTreeSet::from(["shop".to_owned()]));
        let text = metrics.encode();
        assert!(!text.contains("src_namespace=\"gone\""), "{text}");
        assert!(text.contains(&series("tcp_open_total", "shop")), "{text}");
    }

    #[tokio::test]
    async fn bytes_of_open_connections_count_as_they_flow_and_never_go_down() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = AgentMetrics::new(store(&dir), Arc::new(NoStrictPods));
        let read = |text: &str| {
            let prefix = "sealmesh_tcp_read_bytes_total{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"not_meshed\",src_namespace=\"shop\",dst_namespace=\"legacy\"} ";
            text.lines()
                .find_map(|line| line.strip_prefix(prefix)?.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no read bytes in\n{text}"))
        };
        let long_lived = Arc::new(ByteCounters::default());
        metrics.connection_opened(&Arc::new(plaintext(1, "shop")), &long_lived);
        long_lived.src_to_dst.store(1000, Ordering::Relaxed);
        assert_eq!(read(&metrics.encode()), 1000, "counted while open");

        let short = Arc::new(ByteCounters::default());
        metrics.connection_opened(&Arc::new(plaintext(2, "shop")), &short);
        short.src_to_dst.store(5, Ordering::Relaxed);
        metrics.connection_closed(&plaintext(2, "shop"), true);
        long_lived.src_to_dst.store(1500, Ordering::Relaxed);
        assert_eq!(read(&metrics.encode()), 1505);

        metrics.connection_closed(&plaintext(1, "shop"), true);
        assert_eq!(read(&metrics.encode()), 1505, "kept at close");
        // What the splice loops counted, not the close event's own figures.
        let text = metrics.encode();
        assert!(
            text.contains("sealmesh_tcp_write_bytes_total{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"not_meshed\",src_namespace=\"shop\",dst_namespace=\"legacy\"} 0\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn refusals_count_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = AgentMetrics::new(store(&dir), Arc::new(NoStrictPods));
        let refused = |id, reason| ConnectionEvent {
            no_tls_reason: None,
            refused_reason: Some(reason),
            error: Some("refused".into()),
            ..plaintext(id, "shop")
        };
        let unknown_source = ConnectionEvent {
            src: None,
            dst: None,
            ..refused(1, RefusalReason::UnknownSource)
        };
        let unknown_destination = ConnectionEvent {
            dst: None,
            ..refused(2, RefusalReason::UnknownDestination)
        };
        // The route said plaintext to an unmeshed pod; the refusal says why
        // nothing was carried.
        let denied = ConnectionEvent {
            no_tls_reason: Some(NoTlsReason::NotMeshed),
            ..refused(3, RefusalReason::PlaintextDenied)
        };
        // An mTLS stream the peer agent refused.
        let over_tls = ConnectionEvent {
            tls: true,
            client_id: Some("spiffe://cluster.local/ns/shop/sa/client".into()),
            server_id: Some("spiffe://cluster.local/ns/legacy/sa/plain".into()),
            ..refused(4, RefusalReason::TargetRefused)
        };
        for event in [&unknown_source, &unknown_destination, &denied, &over_tls] {
            metrics.connection_closed(event, false);
        }
        let text = metrics.encode();
        for line in [
            "sealmesh_tcp_refused_total{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"unknown_source\",src_namespace=\"\",dst_namespace=\"\"} 1\n",
            "sealmesh_tcp_refused_total{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"unknown_destination\",src_namespace=\"shop\",dst_namespace=\"\"} 1\n",
            "sealmesh_tcp_refused_total{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"plaintext_denied\",src_namespace=\"shop\",dst_namespace=\"legacy\"} 1\n",
            "sealmesh_tcp_refused_total{direction=\"outbound\",tls=\"true\",client_id=\"spiffe://cluster.local/ns/shop/sa/client\",server_id=\"spiffe://cluster.local/ns/legacy/sa/plain\",no_tls_reason=\"target_refused\",src_namespace=\"shop\",dst_namespace=\"legacy\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("sealmesh_tcp_refused_total{")
                    && l.contains("no_tls_reason=\"\"")),
            "{text}"
        );
    }

    #[test]
    fn every_refusal_reason_is_its_own_snake_case_label_value() {
        let values: HashSet<&str> = RefusalReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(values.len(), RefusalReason::ALL.len(), "distinct");
        for reason in RefusalReason::ALL {
            let value = reason.as_str();
            assert!(
                !value.is_empty() && value.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{value}"
            );
            // Serialised (tap JSON, the admin API) as the label value.
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::Value::from(value)
            );
            // No refusal reads as a reason a carried connection has.
            assert!(
                !["secured_local", "not_meshed", "outside_cluster"].contains(&value),
                "{value}"
            );
            let labels = ConnectionLabels::of(&ConnectionEvent {
                refused_reason: Some(reason),
                ..ConnectionEvent::new(
                    1,
                    Phase::Close,
                    Direction::Inbound,
                    "10.0.0.1:1".parse().unwrap(),
                )
            });
            assert_eq!(labels.no_tls_reason, value);
        }
    }
}
