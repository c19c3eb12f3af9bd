//! Prometheus metrics (OpenMetrics text) and liveness/readiness, served over
//! HTTP on `--metrics-listen` (0.0.0.0:15020 by default, like other node
//! agents' probe ports; it carries aggregates, never per-connection data):
//!
//! - `GET /metrics`: every series below;
//! - `GET /healthz/live`: 200 while the agent serves;
//! - `GET /healthz/ready`: 200 when ready, else 503 with the reasons.
//!
//! Series follow Linkerd's TCP metrics. Connection series are labelled
//! `direction`, `tls`, `client_id`, `server_id`, `no_tls_reason`,
//! `src_namespace`, `dst_namespace` — never by pod, connection or port, so
//! their number is bounded by identity pairs — and the series of identities
//! (or, for plaintext, namespaces) that left the node are dropped
//! ([`Metrics::forget_departed`]). Bytes are counted when a connection closes.
//! Certificate series are read from the cert store at each scrape, so only
//! identities the store maintains appear.

use std::{
    collections::{BTreeSet, HashSet},
    sync::{Arc, Mutex},
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
use sealmesh_common::probe::{self, Reply};
use tokio::net::TcpListener;

use crate::{
    certs::CertStore,
    proxy::{ByteCounters, ConnectionEvent, ConnectionObserver, Direction},
};

const PREFIX: &str = "sealmesh";

/// Whether the agent is ready, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub reasons: Vec<String>,
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
            no_tls_reason: e.no_tls_reason.map(|r| r.as_str()).unwrap_or(""),
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

type ConnectionFamily = Family<ConnectionLabels, Counter>;

/// The agent's metrics registry; feed it as a [`ConnectionObserver`].
pub struct Metrics {
    registry: Registry,
    opened: ConnectionFamily,
    closed: ConnectionFamily,
    refused: ConnectionFamily,
    open: Family<ConnectionLabels, Gauge>,
    read_bytes: ConnectionFamily,
    write_bytes: ConnectionFamily,
    handshakes: Family<HandshakeLabels, Histogram>,
    /// Every connection label set in use, so departed ones can be removed.
    label_sets: Mutex<HashSet<ConnectionLabels>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(certs: Arc<CertStore>) -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
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
        let read_bytes = family(
            "tcp_read_bytes",
            "Bytes read from connections' sources (source to destination), counted at close",
        );
        let write_bytes = family(
            "tcp_write_bytes",
            "Bytes written back to connections' sources (destination to source), counted at close",
        );
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
        Self {
            registry,
            opened,
            closed,
            refused,
            open,
            read_bytes,
            write_bytes,
            handshakes,
            label_sets: Mutex::new(HashSet::new()),
        }
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
                for family in [
                    &self.opened,
                    &self.closed,
                    &self.refused,
                    &self.read_bytes,
                    &self.write_bytes,
                ] {
                    family.remove(labels);
                }
                self.open.remove(labels);
            }
            present
        });
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

impl ConnectionObserver for Metrics {
    fn connection_opened(&self, event: &ConnectionEvent, _: &Arc<ByteCounters>) {
        let labels = self.labels(event);
        self.opened.get_or_create(&labels).inc();
        self.open.get_or_create(&labels).inc();
    }

    fn connection_closed(&self, event: &ConnectionEvent, opened: bool) {
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
        self.read_bytes
            .get_or_create(&labels)
            .inc_by(event.bytes_src_to_dst);
        self.write_bytes
            .get_or_create(&labels)
            .inc_by(event.bytes_dst_to_src);
    }

    fn tls_handshake(&self, direction: Direction, elapsed: Duration) {
        self.handshakes
            .get_or_create(&HandshakeLabels {
                direction: direction.as_str(),
            })
            .observe(elapsed.as_secs_f64());
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

/// Serves `/metrics`, `/healthz/live` and `/healthz/ready` on `listener`
/// until `shutdown` resolves.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<dyn Fn() -> Readiness + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    let routes = move |path: &str| match path {
        "/metrics" => Reply::openmetrics(metrics.encode()),
        "/healthz/live" => Reply::text(StatusCode::OK, "ok\n"),
        "/healthz/ready" => {
            let readiness = readiness();
            if readiness.is_ready() {
                Reply::text(StatusCode::OK, "ready\n")
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
            "not found; try /metrics, /healthz/live or /healthz/ready\n",
        ),
    };
    probe::serve(listener, Arc::new(routes), shutdown).await;
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    use sealmesh_common::identity::TrustDomain;

    use super::*;
    use crate::{
        certs::CertStoreConfig,
        proxy::{NoTlsReason, Phase, PodRef},
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
        })
        .unwrap()
    }

    fn plaintext(id: u64, src_namespace: &str) -> ConnectionEvent {
        ConnectionEvent {
            id,
            phase: Phase::Close,
            direction: Direction::Outbound,
            timestamp_ms: 0,
            src_addr: "10.244.0.2:40000".parse().unwrap(),
            dst_addr: Some("10.244.1.3:8080".parse().unwrap()),
            src: Some(PodRef {
                namespace: src_namespace.into(),
                name: "client".into(),
            }),
            dst: Some(PodRef {
                namespace: "legacy".into(),
                name: "plain".into(),
            }),
            client_id: None,
            server_id: None,
            tls: false,
            no_tls_reason: Some(NoTlsReason::NotMeshed),
            bytes_src_to_dst: 11,
            bytes_dst_to_src: 22,
            duration_ms: 5,
            error: None,
        }
    }

    #[tokio::test]
    async fn counts_connections_and_drops_the_series_of_departed_namespaces() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new(store(&dir));
        let bytes = Arc::new(ByteCounters::default());
        for (id, namespace) in [(1, "shop"), (2, "gone")] {
            metrics.connection_opened(&plaintext(id, namespace), &bytes);
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
    async fn refusals_of_unknown_pods_count_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new(store(&dir));
        let unknown_source = ConnectionEvent {
            src: None,
            dst: None,
            no_tls_reason: Some(NoTlsReason::UnknownSource),
            error: Some("source cgroup 7 ... refused".into()),
            ..plaintext(1, "shop")
        };
        let unknown_destination = ConnectionEvent {
            dst: None,
            no_tls_reason: Some(NoTlsReason::UnknownDestination),
            error: Some("10.244.1.3:8080 ... refused".into()),
            ..plaintext(2, "shop")
        };
        metrics.connection_closed(&unknown_source, false);
        metrics.connection_closed(&unknown_destination, false);
        let text = metrics.encode();
        for line in [
            "sealmesh_tcp_refused_total{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"unknown_source\",src_namespace=\"\",dst_namespace=\"\"} 1\n",
            "sealmesh_tcp_refused_total{direction=\"outbound\",tls=\"false\",client_id=\"\",server_id=\"\",no_tls_reason=\"unknown_destination\",src_namespace=\"shop\",dst_namespace=\"\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
